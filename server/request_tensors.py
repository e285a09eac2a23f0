"""A request's tensors reassembled from their chunks, each refused over a limit before
its array is allocated (CreateModel, ApplyGradients, SetWeights)."""

from __future__ import annotations

import math
from collections.abc import Iterable

import numpy as np

from optserve.protos import optserve_pb2 as pb
from optserve.protos import tensors as codec
from optserve.server import limits as bounds
from optserve.server.errors import InvalidArgumentError, ResourceExhaustedError
from optserve.server.limits import Reservation, ServerLimits


class RequestTensors:
    """Reassembles a request's tensors, refusing one over a limit before allocating it.

    Each new tensor's first chunk (name, dtype, shape) is checked against the bounds,
    then ``admit(chunk, nbytes)`` (the RPC's own checks and reservations), then its
    bytes are taken from the in-flight budget; only then is its array allocated.
    ``release()`` gives the in-flight bytes back once the request is done with.
    """

    def __init__(self, max_bytes: int, limits: ServerLimits, admit=None):
        self._assembler = codec.TensorAssembler()
        self._max_bytes = max_bytes
        self._limits = limits
        self._admit = admit
        self._seen: set[tuple[str, str]] = set()
        self._names: set[str] = set()
        self.inflight = Reservation(limits.inflight)

    async def add_all(self, chunks: Iterable[pb.TensorChunk]) -> None:
        for chunk in chunks:
            key = (chunk.name, chunk.slot)
            if key not in self._seen:
                await self._admit_tensor(chunk)
                self._seen.add(key)
            self._assembler.add(chunk)

    def release(self) -> None:
        self.inflight.release()

    @property
    def count(self) -> int:
        return len(self._seen)

    def broken_off(self, header) -> bool:
        """Whether the stream ended before the push was whole: a tensor short of its bytes,
        or fewer tensors than the header's ``num_gradients`` (when the client declared it)."""
        if header.HasField("num_gradients") and len(self._seen) < header.num_gradients:
            return True
        try:
            self._assembler.result()
        except codec.TensorFormatError:
            return True
        return False

    async def _admit_tensor(self, chunk) -> None:
        limits = self._limits.limits
        bounds.check_name(chunk.name, "variable", limits)
        bounds.check_name(chunk.slot, "slot", limits)
        self._names.add(chunk.name)
        if len(self._names) > limits.max_variables:
            raise InvalidArgumentError(
                f"A request may carry at most {limits.max_variables} variables (a server started with a "
                "larger --max-variables takes more)."
            )
        shape = bounds.check_shape(chunk.name, chunk.shape, limits)
        nbytes = self._check_room(chunk, shape)
        if self._admit is not None:
            self._admit(chunk.name, chunk.slot, codec.dtype_from_proto(chunk.dtype), shape, nbytes)
        await self.inflight.wait_take(nbytes, limits.stream_idle_timeout_s)

    def _check_room(self, chunk, shape) -> int:
        # Python integers: an absurd shape must not wrap around to a small size.
        nbytes = math.prod(shape) * codec.dtype_from_proto(chunk.dtype).itemsize
        if self.inflight.nbytes + nbytes > self._max_bytes:
            raise ResourceExhaustedError(
                f"The request's tensors exceed the server's limit of {self._max_bytes} bytes (at tensor "
                f"{chunk.name!r}). Start the server with a larger --max-request-bytes, or send fewer "
                "variables per call."
            )
        return nbytes

    def result(self) -> dict[tuple[str, str], np.ndarray]:
        return self._assembler.result()

    def variables(self, what: str) -> dict[str, np.ndarray]:
        """The tensors as ``{name: array}``; every one must be a variable (slot "")."""
        tensors = self.result()
        slotted = [f"{name}/{slot}" for name, slot in tensors if slot]
        if slotted:
            raise InvalidArgumentError(f"{what} tensors must have an empty slot; received slot tensors {slotted[:10]}.")
        return codec.variables_only(tensors)
