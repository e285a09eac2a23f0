"""Tensor codec shared by client and server: NumPy arrays <-> TensorChunk messages.

A tensor travels as dtype + shape + raw little-endian C-order bytes, split into
chunks of at most ``CHUNK_BYTES`` so no message nears gRPC's 4 MiB default.
Small tensors are batched several to a message by :func:`batch_chunks`.
"""
from __future__ import annotations

from typing import Iterable, Iterator, Mapping

import numpy as np

from optserve.protos import optserve_pb2 as pb

CHUNK_BYTES = 1 << 20          # payload bytes per chunk / per batched message
MAX_MESSAGE_BYTES = 64 << 20   # raised limit on both ends; chunking keeps us far below it

_NP_BY_DTYPE = {
    pb.FLOAT32: np.dtype("<f4"),
    pb.FLOAT64: np.dtype("<f8"),
    pb.FLOAT16: np.dtype("<f2"),
    pb.INT32: np.dtype("<i4"),
    pb.INT64: np.dtype("<i8"),
}
_DTYPE_BY_NAME = {v.name: k for k, v in _NP_BY_DTYPE.items()}

GRPC_OPTIONS = [
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
]


class TensorFormatError(ValueError):
    """A tensor on the wire is malformed (bad dtype, shape, byte count or chunk order)."""


def dtype_to_proto(dtype) -> int:
    name = np.dtype(dtype).name
    try:
        return _DTYPE_BY_NAME[name]
    except KeyError:
        allowed = ", ".join(sorted(_DTYPE_BY_NAME))
        raise TensorFormatError(f"Unsupported dtype {name!r}; allowed: {allowed}.") from None


def dtype_from_proto(code: int) -> np.dtype:
    try:
        return _NP_BY_DTYPE[code]
    except KeyError:
        raise TensorFormatError(f"Unknown or unspecified tensor dtype code {code}.") from None


def _pieces(array, chunk_bytes: int) -> Iterator[tuple[int, list[int], int, memoryview]]:
    """``(dtype code, shape, byte offset, payload view)`` of each chunk of one tensor (at least one)."""
    array = np.asarray(array)
    code = dtype_to_proto(array.dtype)
    little = np.ascontiguousarray(array, dtype=array.dtype.newbyteorder("<"))
    raw = memoryview(little).cast("B") if little.size else memoryview(b"")
    shape = list(array.shape)
    offset = 0
    while True:
        piece = raw[offset:offset + chunk_bytes]
        yield code, shape, offset, piece
        offset += len(piece)
        if offset >= len(raw):
            return


def encode(name: str, array, slot: str = "", chunk_bytes: int = CHUNK_BYTES) -> Iterator[pb.TensorChunk]:
    """Yield the chunks of one tensor (at least one, even when it is empty)."""
    for code, shape, offset, piece in _pieces(array, chunk_bytes):
        yield pb.TensorChunk(name=name, slot=slot, dtype=code, shape=shape, offset=offset, data=bytes(piece))


def encode_many(tensors: Iterable[tuple[str, str, np.ndarray]], chunk_bytes: int = CHUNK_BYTES) -> Iterator[pb.TensorChunk]:
    """Chunks of several ``(name, slot, array)`` tensors, in order."""
    for name, slot, array in tensors:
        yield from encode(name, array, slot, chunk_bytes)


def batch_chunks(chunks: Iterable[pb.TensorChunk], max_bytes: int = CHUNK_BYTES) -> Iterator[list[pb.TensorChunk]]:
    """Group chunks into lists whose payloads add up to at most ``max_bytes`` (one message each)."""
    batch: list[pb.TensorChunk] = []
    size = 0
    for chunk in chunks:
        n = len(chunk.data)
        if batch and size + n > max_bytes:
            yield batch
            batch, size = [], 0
        batch.append(chunk)
        size += n
    if batch:
        yield batch


def chunk_messages(first, field: str, tensors: Iterable[tuple[str, str, np.ndarray]],
                   chunk_bytes: int = CHUNK_BYTES) -> Iterator:
    """Stream messages carrying ``(name, slot, array)`` tensors as chunks in their repeated ``field``.

    Yields ``first`` (always, with the first batch), then new messages of its type.
    Chunks and batching are those of ``batch_chunks(encode_many(tensors))``, but
    each chunk is built inside its message: no intermediate TensorChunk, whose
    payload a ``field.extend`` would copy once more.
    """
    message, size = first, 0
    for name, slot, array in tensors:
        for code, shape, offset, piece in _pieces(array, chunk_bytes):
            if size and size + len(piece) > chunk_bytes:
                yield message
                message, size = type(first)(), 0
            getattr(message, field).add(name=name, slot=slot, dtype=code, shape=shape, offset=offset,
                                        data=bytes(piece))
            size += len(piece)
    yield message


def _varint(value: int) -> bytes:
    out = bytearray()
    while value > 0x7F:
        out.append(value & 0x7F | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


_DATA_TAG = _varint(pb.TensorChunk.DESCRIPTOR.fields_by_name["data"].number << 3 | 2)


def serialized_chunk_messages(first, field: str, tensors: Iterable[tuple[str, str, np.ndarray]],
                              chunk_bytes: int = CHUNK_BYTES) -> Iterator[bytes]:
    """The wire bytes of the messages :func:`chunk_messages` would yield, built directly.

    Each payload is copied once, from the array into the message bytes (instead
    of into a ``bytes``, then into the message, then into its serialization), and
    the result can be written to any number of streams without serializing again.
    Receivers parse it as ordinary messages of ``first``'s type.
    """
    tag = _varint(first.DESCRIPTOR.fields_by_name[field].number << 3 | 2)
    parts: list = [first.SerializeToString()]
    size = 0
    for name, slot, array in tensors:
        for code, shape, offset, piece in _pieces(array, chunk_bytes):
            if size and size + len(piece) > chunk_bytes:
                yield b"".join(parts)
                parts, size = [], 0
            head = pb.TensorChunk(name=name, slot=slot, dtype=code, shape=shape, offset=offset).SerializeToString()
            data_length = _varint(len(piece))
            body = len(head) + len(_DATA_TAG) + len(data_length) + len(piece)
            parts += [tag, _varint(body), head, _DATA_TAG, data_length, piece]
            size += len(piece)
    yield b"".join(parts)


class TensorAssembler:
    """Reassembles tensors from chunks; checks dtype, shape, offsets and byte counts.

    ``result()`` returns ``{(name, slot): ndarray}`` in order of first appearance.
    Arrays are writable, native-endian copies owned by the caller.
    """

    def __init__(self, max_total_bytes: int | None = None):
        self._arrays: dict[tuple[str, str], np.ndarray] = {}
        self._filled: dict[tuple[str, str], int] = {}
        self._max_total = max_total_bytes
        self.total_bytes = 0

    def add(self, chunk: pb.TensorChunk) -> None:
        key = (chunk.name, chunk.slot)
        label = chunk.name + (f"/{chunk.slot}" if chunk.slot else "")
        dtype = dtype_from_proto(chunk.dtype)
        shape = tuple(int(d) for d in chunk.shape)
        if any(d < 0 for d in shape):
            raise TensorFormatError(f"Tensor {label!r} has a negative dimension in shape {shape}.")
        array = self._arrays.get(key)
        if array is None:
            if chunk.offset != 0:
                raise TensorFormatError(f"Tensor {label!r}: first chunk must start at offset 0, got {chunk.offset}.")
            nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
            self.total_bytes += nbytes
            if self._max_total is not None and self.total_bytes > self._max_total:
                raise TensorFormatError(
                    f"Request tensors exceed the server's limit of {self._max_total} bytes "
                    f"(at tensor {label!r}); raise --max-request-bytes or send fewer variables per call."
                )
            array = np.empty(shape, dtype=dtype.newbyteorder("="))
            self._arrays[key] = array
            self._filled[key] = 0
        elif array.dtype != dtype.newbyteorder("=") or array.shape != shape:
            raise TensorFormatError(f"Tensor {label!r}: chunks disagree on dtype or shape.")
        filled = self._filled[key]
        if chunk.offset != filled:
            raise TensorFormatError(f"Tensor {label!r}: chunk at offset {chunk.offset}, expected {filled}.")
        end = filled + len(chunk.data)
        if end > array.nbytes:
            raise TensorFormatError(
                f"Tensor {label!r}: {end} bytes received for shape {shape} and dtype {dtype.name} "
                f"({array.nbytes} bytes expected)."
            )
        if chunk.data:
            flat = array.reshape(-1).view(np.uint8)
            src = np.frombuffer(chunk.data, dtype=np.uint8)
            flat[filled:end] = src
        self._filled[key] = end

    def add_all(self, chunks: Iterable[pb.TensorChunk]) -> None:
        for chunk in chunks:
            self.add(chunk)

    def result(self) -> dict[tuple[str, str], np.ndarray]:
        for key, array in self._arrays.items():
            if self._filled[key] != array.nbytes:
                label = key[0] + (f"/{key[1]}" if key[1] else "")
                raise TensorFormatError(
                    f"Tensor {label!r}: only {self._filled[key]} of {array.nbytes} bytes received."
                )
        if np.little_endian is False:  # pragma: no cover - big-endian hosts
            for array in self._arrays.values():
                array.byteswap(inplace=True)
        return dict(self._arrays)


def decode_all(chunks: Iterable[pb.TensorChunk]) -> dict[tuple[str, str], np.ndarray]:
    assembler = TensorAssembler()
    assembler.add_all(chunks)
    return assembler.result()


def variables_only(tensors: Mapping[tuple[str, str], np.ndarray]) -> dict[str, np.ndarray]:
    """``{name: array}`` of the entries whose slot is empty."""
    return {name: a for (name, slot), a in tensors.items() if not slot}
