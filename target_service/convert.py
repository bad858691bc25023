"""ssd.v1 Generation messages <-> the target's jobs and results (the public API's codec).

Everything in a request is validated here, so a bad request fails with INVALID_ARGUMENT before it
reaches the engine thread. Zero / unset fields mean "server default", as the proto says.
"""

from __future__ import annotations

import math
import uuid

from ssd_core.config import MAX_LOGPROBS, BackupKind, Mode, SamplingParams, SpecConfig
from ssd_core.engine import Request, Result
from ssd_core.errors import InvalidParameter
from ssd_core.logprobs import TokenLogprob
from ssd_core.models import LoadedModel
from ssd_protos.ssd.v1 import generation_pb2 as pb
from target_service.config import TargetConfig
from target_service.scheduler import Job

MODES = {pb.DECODE_MODE_AR: Mode.AR, pb.DECODE_MODE_SD: Mode.SD, pb.DECODE_MODE_SSD: Mode.SSD,
         pb.DECODE_MODE_AUTO: Mode.AUTO}
MODE_TO_PB = {v: k for k, v in MODES.items()}
BACKUPS = {pb.BACKUP_KIND_FAST: BackupKind.FAST, pb.BACKUP_KIND_JIT: BackupKind.JIT}
FINISH = {"eos": pb.FINISH_REASON_EOS, "length": pb.FINISH_REASON_LENGTH, "stop": pb.FINISH_REASON_STOP,
          "abort": pb.FINISH_REASON_ABORT}


def job_from_pb(request: pb.GenerateRequest | pb.CompleteRequest, cfg: TargetConfig, target: LoadedModel) -> Job:
    """A validated Job (raises InvalidParameter naming the field)."""
    prompt = _prompt(request, cfg, target)
    params = _sampling(request.sampling, cfg, target)
    spec = _speculation(request.speculation, cfg)
    request_id = request.request_id or uuid.uuid4().hex
    if len(request_id) > 256:
        raise InvalidParameter("request_id", request_id[:32] + "...", "longer than 256 characters")
    return Job(Request(prompt, params, request_id), spec)


def _prompt(request: pb.GenerateRequest | pb.CompleteRequest, cfg: TargetConfig,
            target: LoadedModel) -> tuple[int, ...]:
    kind = request.WhichOneof("prompt")
    if kind == "text":
        if target.tokenizer is None:
            raise InvalidParameter("prompt.text", "...", "this target has no tokenizer: send prompt token_ids")
        ids = tuple(target.tokenizer.encode(request.text, add_special_tokens=False))
    elif kind == "token_ids":
        ids = tuple(request.token_ids.ids)
    else:
        raise InvalidParameter("prompt", None, "missing: set text or token_ids")
    if not ids:
        raise InvalidParameter("prompt", "", "the prompt is empty")
    if any(not 0 <= t < target.vocab_size for t in ids):
        raise InvalidParameter("prompt.token_ids", "...", f"token ids must be in [0, {target.vocab_size})")
    if len(ids) > max_prompt_tokens(target):
        raise InvalidParameter("prompt", f"{len(ids)} tokens", f"longer than {max_prompt_tokens(target)} tokens "
                               f"(context {target.max_context})")
    return ids


def _sampling(m: pb.SamplingParams, cfg: TargetConfig, target: LoadedModel) -> SamplingParams:
    logprobs = m.logprobs if m.HasField("logprobs") else None
    prompt_logprobs = m.prompt_logprobs if m.HasField("prompt_logprobs") else None
    for name, value in (("logprobs", logprobs), ("prompt_logprobs", prompt_logprobs)):
        if value is not None and value > MAX_LOGPROBS:
            raise InvalidParameter(name, value, f"at most {MAX_LOGPROBS} alternatives")
    if m.score_only:
        if prompt_logprobs is None:
            raise InvalidParameter("score_only", True, "needs prompt_logprobs (scoring returns the prompt's logprobs)")
        if m.max_tokens:
            raise InvalidParameter("max_tokens", m.max_tokens, "must be 0 with score_only")
    max_tokens = 0 if m.score_only else (m.max_tokens or cfg.default_max_tokens)
    if max_tokens > cfg.max_tokens:
        raise InvalidParameter("max_tokens", max_tokens, f"over the limit of {cfg.max_tokens}")
    if not math.isfinite(m.temperature):
        raise InvalidParameter("temperature", m.temperature, "must be finite")
    if len(m.stop) > cfg.max_stop_strings:
        raise InvalidParameter("stop", len(m.stop), f"at most {cfg.max_stop_strings} stop strings")
    if m.stop and target.tokenizer is None:
        raise InvalidParameter("stop", list(m.stop), "stop strings need a tokenizer on the target")
    top_p = m.top_p if m.top_p != 0.0 else 1.0
    vocab = target.vocab_size
    for name, ids in (("stop_token_ids", list(m.stop_token_ids)), ("logit_bias", list(m.logit_bias))):
        if any(not 0 <= t < vocab for t in ids):
            raise InvalidParameter(name, sorted(ids)[:8], f"token ids must be in [0, {vocab})")
    for name in ("presence_penalty", "frequency_penalty"):
        if not math.isfinite(getattr(m, name)):
            raise InvalidParameter(name, getattr(m, name), "must be finite")
    repetition = m.repetition_penalty if m.HasField("repetition_penalty") else 1.0
    return SamplingParams(max_new_tokens=max_tokens, temperature=m.temperature, top_k=m.top_k, top_p=top_p,
                          seed=m.seed if m.HasField("seed") else None, stop=tuple(m.stop), ignore_eos=m.ignore_eos,
                          stop_token_ids=frozenset(m.stop_token_ids), presence_penalty=m.presence_penalty,
                          frequency_penalty=m.frequency_penalty, repetition_penalty=repetition,
                          logit_bias=tuple(sorted(m.logit_bias.items())), logprobs=logprobs,
                          prompt_logprobs=prompt_logprobs)


def _speculation(m: pb.SpeculationParams, cfg: TargetConfig) -> SpecConfig:
    if m.mode == pb.DECODE_MODE_UNSPECIFIED:
        mode = cfg.mode_default
    elif m.mode in MODES:
        mode = MODES[m.mode]
    else:
        raise InvalidParameter("speculation.mode", m.mode, "unknown decode mode (use AR, SD, SSD or AUTO)")
    if mode is Mode.AR:
        return SpecConfig(mode=Mode.AR)  # one AR lane whatever the other fields say
    if m.backup != pb.BACKUP_KIND_UNSPECIFIED and m.backup not in BACKUPS:
        raise InvalidParameter("speculation.backup", m.backup, "unknown backup kind (use FAST or JIT)")
    if m.lookahead > cfg.max_lookahead:
        raise InvalidParameter("speculation.lookahead", m.lookahead, f"over the limit of {cfg.max_lookahead}")
    fan_out = tuple(m.fan_out) or cfg.fan_out
    lookahead = m.lookahead or (len(fan_out) - 1 if fan_out else cfg.lookahead)
    if lookahead is not None and lookahead < 1:
        raise InvalidParameter("speculation.fan_out", list(fan_out), "needs at least 2 entries (F_0..F_K)")
    if mode is Mode.SD:
        fan_out = ()
    elif fan_out and len(fan_out) != lookahead + 1:
        raise InvalidParameter("speculation.fan_out", list(fan_out), f"needs lookahead+1 = {lookahead + 1} entries")
    saguaro_c = m.saguaro_c if m.HasField("saguaro_c") else cfg.saguaro_c
    if not math.isfinite(saguaro_c):
        raise InvalidParameter("speculation.saguaro_c", saguaro_c, "must be finite")
    backup = BACKUPS.get(m.backup, cfg.backup)
    return SpecConfig(mode=mode, lookahead=lookahead, fan_out=fan_out, saguaro_c=round(saguaro_c, 6), backup=backup)


def max_prompt_tokens(target: LoadedModel) -> int:
    return target.max_context - 2  # room for at least one new token


def usage_pb(prompt_tokens: int, completion_tokens: int) -> pb.Usage:
    return pb.Usage(prompt_tokens=prompt_tokens, completion_tokens=completion_tokens)


def logprobs_pb(records: tuple[TokenLogprob, ...]) -> list[pb.TokenLogprob]:
    return [pb.TokenLogprob(token_id=r.token_id, logprob=r.logprob,
                            top=[pb.TopLogprob(token_id=t, logprob=lp) for t, lp in r.top]) for r in records]


def complete_pb(result: Result, prompt_tokens: int, queue_ns: int, total_ns: int) -> pb.GenerateComplete:
    s = result.stats
    stats = pb.SpeculationStats(
        rounds=s.rounds, mean_accepted_length=s.mean_accepted_length, acceptance_rate=s.acceptance_rate,
        cache_hit_rate=s.cache_hit_rate, backup_uses=s.backup_uses, tokens_per_s=s.tokens_per_s,
        queue_ns=queue_ns, decode_ns=int(max(s.end_s - s.start_s, 0.0) * 1e9), total_ns=total_ns,
        prefill_ns=int(s.prefill_s * 1e9), verify_ns=int(s.target_forward_s * 1e9), speculation_wait_ns=int(s.speculate_s * 1e9),
        plan_lookahead=s.plan_lookahead, plan_rounds=s.plan_rounds,
    )  # fmt: skip
    return pb.GenerateComplete(token_ids=list(result.token_ids), text=result.text,
                               finish_reason=FINISH.get(result.finish_reason, pb.FINISH_REASON_UNSPECIFIED),
                               usage=usage_pb(prompt_tokens, len(result.token_ids)), stats=stats,
                               logprobs=logprobs_pb(result.logprobs),
                               prompt_logprobs=logprobs_pb(result.prompt_logprobs))
