"""The servicer's side of shared memory: sessions as messages, pushes that name one, their replies."""

from __future__ import annotations

import asyncio

import numpy as np

from optserve.protos import optserve_pb2 as pb
from optserve.protos import tensors as codec
from optserve.server.backends import get_backend
from optserve.server.errors import FailedPreconditionError, InvalidArgumentError
from optserve.server.shared_memory import Session, SharedMemorySessions

# Below this, writing the values on the event loop costs less than a hop to the executor.
_INLINE_WRITE_BYTES = 1 << 20


def open_response(session: Session) -> pb.OpenSharedMemoryResponse:
    return pb.OpenSharedMemoryResponse(
        session_id=session.id,
        path=session.path,
        nonce=session.nonce,
        size=session.layout.size,
        tensors=[
            pb.SharedTensor(
                name=name,
                dtype=codec.dtype_to_proto(dtype),
                shape=shape,
                gradient_offset=gradient_offset,
                value_offset=value_offset,
                second_value_offset=second_value_offset,
            )
            for name, dtype, shape, gradient_offset, value_offset, second_value_offset in session.layout.entries
        ],
    )


def session_for(sessions: SharedMemorySessions | None, header: pb.ApplyGradientsHeader, chunks: int) -> Session:
    """The session a push names (checked against its model and worker); claims the segment."""
    if sessions is None:
        raise FailedPreconditionError(
            "The push names a shared memory session, but shared memory is disabled on this server; push over gRPC.",
            details={"shared_memory": "unknown-session"},
        )
    if chunks:
        raise InvalidArgumentError(
            "A push through shared memory carries no gradient chunks; send the gradients in the segment or in "
            "chunks, not both."
        )
    session = sessions.get(header.shared_memory_session, header.model_id, header.worker_index)
    session.claim()
    return session


async def reply_through(
    session: Session, region: int, first: pb.ApplyGradientsResponse, values: dict[str, np.ndarray], executor
) -> pb.ApplyGradientsResponse:
    """The push's reply: the new values written into the session's ``region``, the result on gRPC."""
    if values:
        targets = session.values_in(region)
        if all(targets.get(name) is value for name, value in values.items()):
            pass  # the model wrote them there (Model.push's reply_into)
        elif sum(v.nbytes for v in values.values()) <= _INLINE_WRITE_BYTES:
            session.write_values(values, region)
        else:
            copy_many = get_backend("cpu").copy_many  # host to host, on the kernel threads
            await asyncio.get_running_loop().run_in_executor(executor, session.write_values, values, region, copy_many)
        first.variables_in_shared_memory = True
    return first
