"""Pushes carried whole on the data plane: one frame each way in place of a gRPC call.

A push that fits one gRPC message costs a unary gRPC round trip, which between
two Python processes takes longer than the push itself (a 4 KB Adam step
applies in tens of microseconds). A worker holding a data plane session
(``optserve.server.data_plane``) can instead send the ApplyGradientsRequest
bytes it would have sent to ApplyGradientsUnary as a request frame; the server
answers with a frame holding the ApplyGradientsResponse bytes, or a
DataPlaneStatus for an error.

Nothing about the push changes but the transport: the frame is handled by the
servicer's own ApplyGradientsUnary (the same decoding, limits, checks, error
translation and logging) through a stand-in for gRPC's servicer context whose
``abort`` raises :class:`FrameAborted`. What the interceptors do for a gRPC call
is done here for the frame: it acts as the caller that opened the session,
whose token must still be in the token file and whose access rule is checked
against each request (a push for another model or worker than the session's is
refused), and it is counted in the RPC metrics as ApplyGradientsUnary.
"""

from __future__ import annotations

import logging
from typing import Any

import grpc

from optserve.protos import frames
from optserve.protos import optserve_pb2 as pb
from optserve.server import auth
from optserve.server.servicer import is_undecodable, request_deserializer

log = logging.getLogger(__name__)

METHOD = "/" + auth.SERVICE_NAME + "/ApplyGradientsUnary"
RPC = "ApplyGradientsUnary"


class FrameAborted(grpc.aio.AbortError):
    """A request frame's handler aborted with a status (raised by :meth:`FrameContext.abort`)."""

    def __init__(self, code: grpc.StatusCode, message: str, metadata):
        super().__init__(message)
        self.status_code, self.message, self.metadata = code, message, tuple(metadata or ())


class FrameContext:
    """What the servicer's handlers use of a grpc.aio servicer context, for one request frame."""

    def __init__(self, session):
        self.session = session
        self._code: grpc.StatusCode | None = None

    def peer(self) -> str:
        return f"data-plane:{self.session.peer}"

    def code(self) -> grpc.StatusCode | None:
        return self._code

    def invocation_metadata(self) -> tuple:
        return ()

    def time_remaining(self) -> float | None:
        return None

    async def abort(self, code: grpc.StatusCode, details: str = "", trailing_metadata=()) -> None:
        self._code = code
        raise FrameAborted(code, details, trailing_metadata)


class RequestFrames:
    """Answers the request frames of every data plane session of one server."""

    def __init__(self, servicer, tokens: auth.TokenTable | None = None, metrics_interceptor=None):
        self._deserialize = request_deserializer(pb.ApplyGradientsRequest)
        self._servicer = servicer
        self._tokens = tokens
        if metrics_interceptor is None:
            self._call = self._unobserved
        else:
            self._call = metrics_interceptor.observed_unary(METHOD, self._admitted, _serialized)

    async def answer(self, session, payload: bytes) -> tuple[int, bytes]:
        """The flags and payload of the answer to one request frame of ``session``."""
        try:
            return 0, await self._call(self._deserialize(payload), FrameContext(session), len(payload))
        except FrameAborted as aborted:
            return frames.STATUS, _status(aborted.status_code, aborted.message, aborted.metadata)

    async def _unobserved(self, request, context: FrameContext, request_bytes: int) -> bytes:
        return _serialized(await self._admitted(request, context))

    async def _admitted(self, request, context: FrameContext):
        """ApplyGradientsUnary, once the checks the interceptors make of a gRPC call passed."""
        try:
            self._admit(context.session, request)
        except auth.Refused as refusal:
            await context.abort(refusal.code, refusal.message)
        return await self._servicer.ApplyGradientsUnary(request, context)

    def _admit(self, session, request: Any) -> None:
        if is_undecodable(request):
            return  # the handler answers INVALID_ARGUMENT, naming the decoding error
        principal = session.principal
        if principal is not None:
            if self._tokens is None or not self._tokens.holds(principal):
                session.close()  # its caller's token was revoked: the session ends with it
                raise auth.Refused(
                    grpc.StatusCode.UNAUTHENTICATED,
                    "The token that opened this data plane session is no longer in the server's token file; "
                    "use a valid token.",
                )
            auth.authorize(principal, RPC, request)
            auth.act_as(principal)  # this frame's task is a context of its own, as each gRPC call is
        if request.HasField("header"):
            header = request.header
            if header.model_id != session.model_id or header.worker_index != session.worker:
                raise auth.Refused(
                    grpc.StatusCode.INVALID_ARGUMENT,
                    f"This data plane session serves worker {session.worker} of model {session.model_id!r}; the "
                    f"request frame pushes for worker {header.worker_index} of model {header.model_id!r}. Open a "
                    "session for that model and worker (OpenDataPlane).",
                )


def _serialized(response) -> bytes:
    return response if isinstance(response, bytes) else response.SerializeToString()


def _status(code: grpc.StatusCode, message: str, metadata) -> bytes:
    status = pb.DataPlaneStatus(code=code.name, message=message)
    for key, value in metadata:
        status.metadata[key] = value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)
    return status.SerializeToString()
