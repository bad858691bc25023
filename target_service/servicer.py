"""ssd.v1 Generation servicer: decode, submit to the scheduler, stream the events back (thin)."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from dataclasses import dataclass

import grpc

from ssd_core.models import LoadedModel, tokenizer_fingerprint
from ssd_protos.ssd.v1 import generation_pb2 as pb
from ssd_protos.ssd.v1 import generation_pb2_grpc as pb_grpc
from target_service.config import TargetConfig
from target_service.convert import MODE_TO_PB, complete_pb, job_from_pb, logprobs_pb, max_prompt_tokens, usage_pb
from target_service.errors import Refused, mapped
from target_service.registry import PROTO_VERSION, DraftRegistry
from target_service.scheduler import Chunk, Done, Failed, Scheduler, Ticket

log = logging.getLogger(__name__)


@dataclass(slots=True)
class TargetApp:
    """What the servicers share once the model is loaded."""

    cfg: TargetConfig
    target: LoadedModel
    scheduler: Scheduler
    registry: DraftRegistry
    replica_id: str


class AppHolder:
    """The app once the target is ready; UNAVAILABLE before (and after shutdown starts)."""

    def __init__(self) -> None:
        self.app: TargetApp | None = None

    def get(self) -> TargetApp:
        if self.app is None:
            raise Refused(grpc.StatusCode.UNAVAILABLE, "target is not ready")
        return self.app


class GenerationServicer(pb_grpc.GenerationServicer):
    def __init__(self, holder: AppHolder) -> None:
        self._holder = holder

    @mapped
    def Generate(self, request: pb.GenerateRequest, context: grpc.ServicerContext) -> Iterator[pb.GenerateResponse]:
        app = self._holder.get()
        ticket = self._submit(app, request, context)
        rid, n_prompt = ticket.job.request_id, len(ticket.job.request.prompt_ids)
        n_done = 0
        for event in ticket.stream(alive=context.is_active):
            if isinstance(event, Chunk):  # the engine detokenizes: the chunks' text adds up to the final text
                n_done += len(event.token_ids)
                chunk = pb.GenerateChunk(token_ids=event.token_ids, text=event.text, usage=usage_pb(n_prompt, n_done),
                                         logprobs=logprobs_pb(event.logprobs),
                                         prompt_logprobs=logprobs_pb(event.prompt_logprobs))
                yield pb.GenerateResponse(request_id=rid, chunk=chunk)
            elif isinstance(event, Done):
                complete = complete_pb(event.result, n_prompt, event.queue_ns, event.total_ns)
                yield pb.GenerateResponse(request_id=rid, complete=complete)
            elif isinstance(event, Failed):
                raise event.error

    @mapped
    def Complete(self, request: pb.CompleteRequest, context: grpc.ServicerContext) -> pb.CompleteResponse:
        app = self._holder.get()
        ticket = self._submit(app, request, context)
        for event in ticket.stream(alive=context.is_active):
            if isinstance(event, Done):
                complete = complete_pb(event.result, len(ticket.job.request.prompt_ids), event.queue_ns, event.total_ns)
                return pb.CompleteResponse(request_id=ticket.job.request_id, complete=complete)
            if isinstance(event, Failed):
                raise event.error
        raise Refused(grpc.StatusCode.CANCELLED, "the call ended before the generation finished")

    @mapped
    def Abort(self, request: pb.AbortRequest, context: grpc.ServicerContext) -> pb.AbortResponse:
        found = self._holder.get().scheduler.abort(request.request_id)
        log.info("abort request_id=%s found=%s reason=%s", request.request_id, found, request.reason or "-")
        return pb.AbortResponse(found=found)

    @mapped
    def GetModelInfo(self, request: pb.ModelInfoRequest, context: grpc.ServicerContext) -> pb.ModelInfoResponse:
        app = self._holder.get()
        cfg, target = app.cfg, app.target
        limits = pb.GenerationLimits(max_tokens=cfg.max_tokens, max_prompt_tokens=max_prompt_tokens(target),
                                     max_lookahead=cfg.max_lookahead, max_fan_out_budget=2 * (cfg.max_lookahead + 1),
                                     max_batch_size=cfg.max_batch, max_stop_strings=cfg.max_stop_strings)
        return pb.ModelInfoResponse(
            model_id=target.name, draft_model_id=",".join(app.registry.draft_model_ids()),
            vocab_size=target.vocab_size, max_context_len=target.max_context, eos_token_ids=target.eos_token_ids,
            supported_modes=list(MODE_TO_PB.values()), default_mode=MODE_TO_PB[cfg.mode_default], limits=limits,
            accepts_text=target.tokenizer is not None,
            tokenizer_fingerprint=tokenizer_fingerprint(target.tokenizer, target.vocab_size),
            default_lookahead=cfg.default_lookahead, target_replica_id=app.replica_id, proto_version=PROTO_VERSION,
        )  # fmt: skip

    @staticmethod
    def _submit(app: TargetApp, request, context: grpc.ServicerContext) -> Ticket:
        job = job_from_pb(request, app.cfg, app.target)
        ticket = app.scheduler.submit(job)
        # The sync server may never resume a generator after a cancel or deadline: this callback
        # (it also runs after a normal end, when the abort finds nothing) is what frees the sequence.
        context.add_callback(lambda: app.scheduler.abort(job.request_id))
        return ticket
