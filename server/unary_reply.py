"""ApplyGradientsUnary: a push in one message, answered in one message (the fast path for small pushes)."""

from __future__ import annotations

import math

from optserve.protos import optserve_pb2 as pb
from optserve.server.errors import FailedPreconditionError

# The largest value payload a unary reply carries; larger ones stream (ApplyGradients).
MAX_UNARY_REPLY_BYTES = 16 << 20


def check_fits(model, header: pb.ApplyGradientsHeader) -> None:
    """Refuse, before anything is applied, a push whose reply would not fit in one message."""
    if header.shared_memory_session or header.data_plane_session:
        return  # the values go through shared memory, or on the data connection
    nbytes = sum(math.prod(v.shape) * v.dtype.itemsize for v in model.spec.variables)
    if nbytes > MAX_UNARY_REPLY_BYTES:
        raise FailedPreconditionError(
            f"Model {model.model_id!r} has {nbytes} bytes of variables, more than one unary reply carries "
            f"({MAX_UNARY_REPLY_BYTES}); nothing was applied. Push with the streaming ApplyGradients.",
            details={"unary": "reply-too-large"},
        )


async def one(request):
    yield request


async def merged(responses, message_type):
    """The messages of a streamed reply as one message. A reply of one message is that message as
    it is (a message, or its bytes; the response serializer passes bytes through): a small push's
    reply is not copied into a new message and parsed or serialized again. Messages are only read,
    never merged into, since one may be shared by the replies of a step's workers."""
    lone = reply = None
    async for response in responses:
        if reply is None and lone is None:
            lone = response
            continue
        if reply is None:
            reply = message_type()
            _merge(reply, lone)
        _merge(reply, response)
    if reply is not None:
        return reply
    return message_type() if lone is None else lone


def _merge(reply, response) -> None:
    if isinstance(response, bytes):
        reply.MergeFromString(response)
    else:
        reply.MergeFrom(response)
