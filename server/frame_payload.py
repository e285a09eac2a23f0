"""A data plane session's gradients (or values) as views of one buffer, in the frame's order.

A gradient frame's payload is every variable's bytes, one after another in the session's
tensor order (``optserve.protos.frames``). Held as one buffer, the payload is received (and a
reply sent, ``views``) as one run of bytes in pieces of ``frames.PIECE_BYTES``, each piece checked for NaN
and infinity while it is in the cache: a model of a hundred small variables then costs what one
variable of the same bytes does, instead of a receive loop and a check per variable.

Where a tensor would not start at a multiple of its item size in such a buffer (float64 after an
odd number of float32), the tensors are separate arrays and are received one by one.
"""

from __future__ import annotations

import math
import socket
from collections.abc import Sequence

import numpy as np

from optserve.protos import frames
from optserve.protos.frames import bytes_of, receive_exactly
from optserve.server.finite import all_finite


class _Piece:
    """``frames.PIECE_BYTES`` (or fewer) of the buffer, and what to check them as."""

    __slots__ = ("view", "whole", "members")

    def __init__(self, view: memoryview, whole: np.ndarray | None, members: list[tuple[str, np.ndarray]]):
        self.view = view  # the piece's bytes, received into
        self.whole = whole  # the piece as one float array where its tensors share a dtype, else None
        self.members = members  # (name, the part of that tensor in this piece)


class FramePayload:
    """The arrays of one frame's payload: ``arrays`` (by name, in frame order) and ``nbytes``."""

    def __init__(self, tensors: Sequence[tuple[str, np.dtype, tuple[int, ...]]]):
        sizes = [math.prod(shape) * np.dtype(dtype).itemsize for _, dtype, shape in tensors]
        offsets = [sum(sizes[:index]) for index in range(len(sizes))]
        self.nbytes = sum(sizes)
        self.names = [name for name, _, _ in tensors]
        self.whole = all(offset % np.dtype(dtype).itemsize == 0 for offset, (_, dtype, _) in zip(offsets, tensors))
        self.arrays: dict[str, np.ndarray]
        self._pieces: list[_Piece] = []
        self._buffer: np.ndarray | None = None
        if not self.whole:
            self.arrays = {name: np.empty(shape, dtype) for name, dtype, shape in tensors}
            return
        buffer = self._buffer = np.empty(self.nbytes, np.uint8)
        self.arrays = {
            name: buffer[offset : offset + size].view(dtype).reshape(shape)
            for offset, size, (name, dtype, shape) in zip(offsets, sizes, tensors)
        }
        spans = [
            (offset, offset + size, name, np.dtype(dtype))
            for offset, size, (name, dtype, _) in zip(offsets, sizes, tensors)
        ]
        for low in range(0, self.nbytes, frames.PIECE_BYTES):
            high = min(low + frames.PIECE_BYTES, self.nbytes)
            inside = [
                (max(start, low), min(end, high), name, dtype)
                for start, end, name, dtype in spans
                if start < high and low < end
            ]
            members = [(name, buffer[start:end].view(dtype)) for start, end, name, dtype in inside]
            dtypes = {dtype for _, _, _, dtype in inside}
            whole = buffer[low:high].view(dtypes.pop()) if len(dtypes) == 1 else None
            self._pieces.append(_Piece(memoryview(buffer[low:high]), whole, members))  # type: ignore[arg-type]

    def owns(self, values: dict[str, np.ndarray]) -> bool:
        """Whether ``values`` are this payload's own arrays, all of them."""
        return len(values) == len(self.arrays) and all(values.get(name) is array for name, array in self.arrays.items())

    def receive_checked(self, connection: socket.socket) -> list[str] | None:
        """Receive the payload, checking it for NaN and infinity piece by piece as it arrives: the
        names of the tensors that are not finite, in frame order; None if the connection ended first."""
        if not self.whole:
            return self._receive_each(connection)
        failed: set[str] = set()
        for piece in self._pieces:
            if not receive_exactly(connection, piece.view):
                return None
            if piece.whole is not None and all_finite(piece.whole):
                continue
            failed.update(name for name, part in piece.members if not all_finite(part))
        return [name for name in self.names if name in failed]

    def views(self, values: dict[str, np.ndarray] | None = None) -> list[memoryview]:
        """The bytes of ``values`` (by default this payload's own arrays; else arrays of the same
        tensors) in frame order, for ``frames.send_views``: one view of the buffer where they are
        its own arrays, else a view per tensor."""
        if values is None:
            values = self.arrays
        if self._buffer is not None and self.owns(values):
            return [memoryview(self._buffer)]  # type: ignore[arg-type]
        return [bytes_of(values[name]) for name in self.names]

    def _receive_each(self, connection: socket.socket) -> list[str] | None:
        failed = []
        for name in self.names:
            array = self.arrays[name]
            view, flat = bytes_of(array), array.reshape(-1)
            finite, per_piece = True, frames.PIECE_BYTES // array.itemsize
            for index, low in enumerate(range(0, view.nbytes, frames.PIECE_BYTES)):
                if not receive_exactly(connection, view[low : low + frames.PIECE_BYTES]):
                    return None
                if finite:
                    finite = all_finite(flat[index * per_piece : (index + 1) * per_piece])
            if not finite:
                failed.append(name)
        return failed
