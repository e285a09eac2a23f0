"""The servicer's side of the data plane: sessions as messages, pushes that name one, their replies."""

from __future__ import annotations

import asyncio

import numpy as np

from optserve.protos import frames
from optserve.protos import optserve_pb2 as pb
from optserve.protos import tensors as codec
from optserve.server.data_plane import DataPlane, DataSession
from optserve.server.errors import FailedPreconditionError, InvalidArgumentError


def open_response(session: DataSession, port: int) -> pb.OpenDataPlaneResponse:
    return pb.OpenDataPlaneResponse(
        session_id=session.id,
        port=port,
        secret=session.secret,
        tensors=[
            pb.SharedTensor(name=name, dtype=codec.dtype_to_proto(dtype), shape=shape)
            for name, dtype, shape in session.tensors
        ],
    )


def session_for(data_plane: DataPlane | None, header: pb.ApplyGradientsHeader, chunks: int) -> DataSession:
    """The session a push names, checked against its model and worker."""
    if data_plane is None:
        raise FailedPreconditionError(
            "The push names a data plane session, but this server has no data plane; push over gRPC.",
            details={"data_plane": "unknown-session"},
        )
    if chunks:
        raise InvalidArgumentError(
            "A push through the data plane carries no gradient chunks; send the gradients as its frame or in "
            "chunks, not both."
        )
    return data_plane.get(header.data_plane_session, header.model_id, header.worker_index)


async def reply_through(
    session: DataSession,
    sequence: int,
    first: pb.ApplyGradientsResponse,
    values: dict[str, np.ndarray] | None,
    executor,
) -> pb.ApplyGradientsResponse:
    """Send the reply frame (the new values, or a frame saying none follow), then the result."""
    if values:
        await asyncio.get_running_loop().run_in_executor(executor, session.send_values, sequence, values)
    else:
        await session.send_soon(sequence, b"", frames.NO_VALUES)
    first.variables_in_data_plane = bool(values)
    return first
