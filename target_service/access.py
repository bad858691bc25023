"""Who may call what on the Generation API: callers need the `client` role, and a request belongs
to the caller that started it (its identity, or its connection when anonymous): only that caller,
or an `operator`, may Abort it. A layer over GenerationServicer, so the servicer stays thin."""

from __future__ import annotations

import logging
import threading

import grpc

from ssd_core.auth import AuthError, Authenticator, Principal, grpc_principal, require
from ssd_protos.ssd.v1 import generation_pb2 as pb
from target_service.errors import Refused, mapped
from target_service.scheduler import Ticket
from target_service.servicer import AppHolder, GenerationServicer, TargetApp

log = logging.getLogger(__name__)


class GuardedGenerationServicer(GenerationServicer):
    """GenerationServicer with authentication, the `client` role, and request ownership."""

    def __init__(self, holder: AppHolder, auth: Authenticator) -> None:
        super().__init__(holder)
        self._auth = auth
        self._owners: dict[str, str] = {}  # request_id -> owner key, while the RPC runs
        self._lock = threading.Lock()

    def _caller(self, context: grpc.ServicerContext, what: str) -> Principal:
        try:
            principal = grpc_principal(self._auth, context)
            require(principal, "client", what)
        except AuthError as exc:
            raise Refused(grpc.StatusCode[exc.code], str(exc)) from None
        return principal

    def _submit(self, app: TargetApp, request, context: grpc.ServicerContext) -> Ticket:
        owner = self._caller(context, "generate").owner_key
        ticket = super()._submit(app, request, context)
        rid = ticket.job.request_id
        with self._lock:
            self._owners[rid] = owner
        context.add_callback(lambda: self._release(rid, owner))
        return ticket

    def _release(self, rid: str, owner: str) -> None:
        with self._lock:
            if self._owners.get(rid) == owner:
                del self._owners[rid]

    @mapped
    def Abort(self, request: pb.AbortRequest, context: grpc.ServicerContext) -> pb.AbortResponse:
        principal = self._caller(context, "abort requests")
        with self._lock:
            owner = self._owners.get(request.request_id)
        if owner is None:  # unknown or finished: nothing to abort, nothing revealed
            return pb.AbortResponse(found=False)
        if owner != principal.owner_key and "operator" not in principal.roles:
            log.warning("abort of request_id=%s by %s refused: started by another caller", request.request_id,
                        principal.owner_key)
            raise Refused(grpc.StatusCode.PERMISSION_DENIED,
                          f"request {request.request_id!r} was started by another caller")
        return super().Abort.__wrapped__(self, request, context)

    @mapped
    def GetModelInfo(self, request: pb.ModelInfoRequest, context: grpc.ServicerContext) -> pb.ModelInfoResponse:
        self._caller(context, "read model info")
        return super().GetModelInfo.__wrapped__(self, request, context)
