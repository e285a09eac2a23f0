"""Tensor codec shared by client and server: NumPy arrays <-> TensorChunk messages.

A tensor travels as dtype + shape + raw little-endian C-order bytes, split into
chunks of at most ``CHUNK_BYTES`` so no message nears gRPC's default limit: 4 MiB
(4194304 bytes) for each received message, whatever the length of the stream;
senders have no default limit. A peer with default options can take them all.
Small tensors are batched several to a message by :func:`batch_chunks`.

Large payloads are the cost to watch: each copy of a 64 MB tensor costs a few
milliseconds. Senders build wire bytes straight from the arrays
(:func:`serialized_chunk_messages`: one copy) and receivers may split wire bytes
without parsing the payloads into protobuf objects (:func:`split_message`: no
copy), so that :class:`TensorAssembler` copies each payload once, into its array.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any, NamedTuple

import numpy as np
from google.protobuf.message import DecodeError

from optserve.protos import optserve_pb2 as pb
from optserve.protos.errors import InvalidArgumentError

CHUNK_BYTES = 1 << 20  # payload bytes per chunk / per batched message
MAX_MESSAGE_BYTES = 64 << 20  # raised limit on both ends; chunking keeps us far below it

_WIRE_DTYPES: tuple[tuple[pb.DType, np.dtype], ...] = (
    (pb.FLOAT32, np.dtype("<f4")),
    (pb.FLOAT64, np.dtype("<f8")),
    (pb.FLOAT16, np.dtype("<f2")),
    (pb.INT32, np.dtype("<i4")),
    (pb.INT64, np.dtype("<i8")),
)
_NP_BY_DTYPE: dict[int, np.dtype] = {int(code): dtype for code, dtype in _WIRE_DTYPES}
_DTYPE_BY_NAME: dict[str, pb.DType] = {dtype.name: code for code, dtype in _WIRE_DTYPES}
# The same, keyed by dtype object: a dict lookup instead of building dtype.name on every tensor.
_DTYPE_BY_NP: dict[np.dtype, pb.DType] = {dtype: code for code, dtype in _WIRE_DTYPES}
# (memoryview(ndarray) below: numpy's stubs declare ndarray.__buffer__ for Python >= 3.12
# only, though arrays are buffers on every version.)

GRPC_OPTIONS = [
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
]


class TensorFormatError(ValueError):
    """A tensor on the wire is malformed (bad dtype, shape, byte count or chunk order)."""


def dtype_to_proto(dtype: Any) -> pb.DType:
    code = _DTYPE_BY_NP.get(dtype) if isinstance(dtype, np.dtype) else None
    if code is not None:
        return code
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


def _pieces(array: Any, chunk_bytes: int) -> Iterator[tuple[pb.DType, list[int], int, memoryview]]:
    """``(dtype code, shape, byte offset, payload view)`` of each chunk of one tensor (at least one)."""
    array = np.asarray(array)
    code = dtype_to_proto(array.dtype)
    little = np.ascontiguousarray(array, dtype=array.dtype.newbyteorder("<"))
    raw = memoryview(little).cast("B") if little.size else memoryview(b"")  # type: ignore[arg-type]  # numpy stubs, see above
    shape = list(array.shape)
    offset = 0
    while True:
        piece = raw[offset : offset + chunk_bytes]
        yield code, shape, offset, piece
        offset += len(piece)
        if offset >= len(raw):
            return


def encode(name: str, array, slot: str = "", chunk_bytes: int = CHUNK_BYTES) -> Iterator[pb.TensorChunk]:
    """Yield the chunks of one tensor (at least one, even when it is empty)."""
    for code, shape, offset, piece in _pieces(array, chunk_bytes):
        yield pb.TensorChunk(name=name, slot=slot, dtype=code, shape=shape, offset=offset, data=bytes(piece))


def encode_many(
    tensors: Iterable[tuple[str, str, np.ndarray]], chunk_bytes: int = CHUNK_BYTES
) -> Iterator[pb.TensorChunk]:
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


def chunk_messages(
    first, field: str, tensors: Iterable[tuple[str, str, np.ndarray]], chunk_bytes: int = CHUNK_BYTES
) -> Iterator:
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
            getattr(message, field).add(name=name, slot=slot, dtype=code, shape=shape, offset=offset, data=bytes(piece))
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


def serialized_chunk_messages(
    first, field: str, tensors: Iterable[tuple[str, str, np.ndarray]], chunk_bytes: int = CHUNK_BYTES
) -> Iterator[bytes]:
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


class WireChunk(NamedTuple):
    """A TensorChunk read by :func:`split_message`: ``data`` is a view into the received bytes."""

    name: str
    slot: str
    dtype: int
    shape: tuple[int, ...]
    offset: int
    data: memoryview


# Messages at least this large are split by hand (payload views, no copies); smaller
# ones are parsed by protobuf, whose copies cost nothing at that size.
SPLIT_MIN_BYTES = 64 << 10
# Chunks this small on average are parsed by protobuf too: splitting by hand costs a
# few microseconds of Python per chunk, more than copying a small payload.
SPLIT_MIN_AVERAGE_CHUNK_BYTES = 16 << 10

_WIRE_VARINT, _WIRE_FIXED64, _WIRE_LENGTH_DELIMITED, _WIRE_FIXED32 = 0, 1, 2, 5
_DATA_FIELD = pb.TensorChunk.DESCRIPTOR.fields_by_name["data"].number


def _read_varint(buffer: bytes, position: int, end: int) -> tuple[int, int]:
    value = shift = 0
    while position < end:
        byte = buffer[position]
        position += 1
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            return value, position
        shift += 7
        if shift >= 70:
            break
    raise TensorFormatError("Malformed message: a varint is truncated or too long.")


def _fields(buffer: bytes, start: int, end: int) -> Iterator[tuple[int, int, int, int, int]]:
    """``(field number, wire type, key start, value start, value end)`` of each field in ``buffer[start:end]``.

    For length-delimited fields the value excludes its length prefix.
    """
    position = start
    while position < end:
        key_start = position
        key, position = _read_varint(buffer, position, end)
        number, wire_type = key >> 3, key & 7
        if wire_type == _WIRE_VARINT:
            _, value_end = _read_varint(buffer, position, end)
        elif wire_type == _WIRE_FIXED64:
            value_end = position + 8
        elif wire_type == _WIRE_LENGTH_DELIMITED:
            length, position = _read_varint(buffer, position, end)
            value_end = position + length
        elif wire_type == _WIRE_FIXED32:
            value_end = position + 4
        else:  # groups: not part of any proto3 message
            raise TensorFormatError(f"Malformed message: unsupported wire type {wire_type} in field {number}.")
        if number == 0 or value_end > end:
            raise TensorFormatError("Malformed message: a field is truncated or has number 0.")
        yield number, wire_type, key_start, position, value_end
        position = value_end


def _parse(message_type, data):
    try:
        return message_type.FromString(data)
    except DecodeError as error:
        raise TensorFormatError(f"Malformed {message_type.DESCRIPTOR.name}: {error}") from None


def _wire_chunk(buffer: bytes, view: memoryview, start: int, end: int) -> WireChunk:
    """One TensorChunk from ``buffer[start:end]``: payload as a view, the rest parsed by protobuf."""
    rest: list[bytes] = []
    data_span = (start, start)
    for number, wire_type, key_start, value_start, value_end in _fields(buffer, start, end):
        if number == _DATA_FIELD and wire_type == _WIRE_LENGTH_DELIMITED:
            data_span = (value_start, value_end)  # protobuf semantics: the last one wins
        else:
            rest.append(buffer[key_start:value_end])
    head = _parse(pb.TensorChunk, b"".join(rest))
    return WireChunk(
        head.name, head.slot, head.dtype, tuple(head.shape), head.offset, view[data_span[0] : data_span[1]]
    )


def split_message(data: bytes, message_type, field: str) -> tuple:
    """``(message without its chunks, chunks)`` from the wire bytes of a message with a repeated TensorChunk ``field``.

    The result is what ``message_type.FromString(data)`` holds, with ``field``
    moved out: a large message's chunks are :class:`WireChunk` whose ``data`` is a
    view into ``data`` (no payload is copied); a small one's are ordinary
    TensorChunk messages. Either kind goes to :meth:`TensorAssembler.add`.
    Raises TensorFormatError on malformed bytes.
    """
    if len(data) >= SPLIT_MIN_BYTES:
        split = _split_large(data, message_type, field)
        if split is not None:
            return split
    message = _parse(message_type, data)
    chunks = list(getattr(message, field))
    message.ClearField(field)
    return message, chunks


def _split_large(data: bytes, message_type, field: str) -> tuple | None:
    """:func:`split_message` by hand, or None when the message holds many small chunks."""
    number = message_type.DESCRIPTOR.fields_by_name[field].number
    most_chunks = len(data) // SPLIT_MIN_AVERAGE_CHUNK_BYTES
    rest: list[bytes] = []
    spans: list[tuple[int, int]] = []
    for field_number, wire_type, key_start, value_start, value_end in _fields(data, 0, len(data)):
        if field_number == number and wire_type == _WIRE_LENGTH_DELIMITED:
            spans.append((value_start, value_end))
            if len(spans) > most_chunks:
                return None
        else:
            rest.append(data[key_start:value_end])
    view = memoryview(data)
    chunks = [_wire_chunk(data, view, start, end) for start, end in spans]
    return _parse(message_type, b"".join(rest)), chunks


class SplitMessage:
    """A received message with its TensorChunk field split off by :func:`split_message`.

    Reads like the message itself (``request.HasField("header")``, ``request.header``),
    except that the chunk field is a list of chunks whose payloads were not copied.
    """

    __slots__ = ("message", "chunks", "field")

    def __init__(self, message, chunks: list, field: str):
        self.message = message
        self.chunks = chunks
        self.field = field

    def __getattr__(self, name: str):
        if name == self.field:
            return self.chunks
        return getattr(self.message, name)


def split_deserializer(message_type, field: str):
    """A gRPC request or response deserializer: wire bytes -> :class:`SplitMessage`.

    For handlers that feed the chunks to a :class:`TensorAssembler`: each payload is
    then copied once, into its array, instead of three times (protobuf parsing,
    reading ``data``, the array).
    """

    def deserialize(data: bytes) -> SplitMessage:
        message, chunks = split_message(data, message_type, field)
        return SplitMessage(message, chunks, field)

    return deserialize


class TensorAssembler:
    """Reassembles tensors from chunks; checks dtype, shape, offsets and byte counts.

    Chunks are TensorChunk messages or :class:`WireChunk` (anything with their fields).
    ``result()`` returns ``{(name, slot): ndarray}`` in order of first appearance.
    Arrays are writable, native-endian copies owned by the caller.
    """

    def __init__(self, max_total_bytes: int | None = None, allocate=None):
        # allocate(name, slot, shape, dtype) -> a writable C-contiguous array to fill (reused buffers,
        # see optserve.protos.buffers); np.empty when None.
        self._allocate = allocate
        self._arrays: dict[tuple[str, str], np.ndarray] = {}
        self._bytes: dict[tuple[str, str], memoryview] = {}  # each array's memory, as bytes
        self._filled: dict[tuple[str, str], int] = {}
        self._max_total = max_total_bytes
        self.total_bytes = 0

    def add(self, chunk) -> None:
        # Read the payload once: each read of a TensorChunk's ``data`` copies it.
        data = chunk.data
        key = (chunk.name, chunk.slot)
        array = self._arrays.get(key)
        if array is None:
            self._start(key, chunk)
        else:
            self._check_same_tensor(key, chunk)
        filled = self._filled[key]
        if chunk.offset != filled:
            raise TensorFormatError(f"Tensor {_label(key)!r}: chunk at offset {chunk.offset}, expected {filled}.")
        end = filled + len(data)
        target = self._bytes[key]
        if end > len(target):
            array = self._arrays[key]
            raise TensorFormatError(
                f"Tensor {_label(key)!r}: {end} bytes received for shape {list(array.shape)} and dtype "
                f"{array.dtype.name} ({array.nbytes} bytes expected)."
            )
        if end > filled:
            target[filled:end] = data
        self._filled[key] = end

    def _start(self, key: tuple[str, str], chunk) -> None:
        """Allocate the array of a tensor seen for the first time."""
        dtype = dtype_from_proto(chunk.dtype)
        shape = tuple(int(d) for d in chunk.shape)
        if any(d < 0 for d in shape):
            raise TensorFormatError(f"Tensor {_label(key)!r} has a negative dimension in shape {list(shape)}.")
        if chunk.offset != 0:
            raise TensorFormatError(f"Tensor {_label(key)!r}: first chunk must start at offset 0, got {chunk.offset}.")
        nbytes = math.prod(shape) * dtype.itemsize  # exact: no int64 wrap-around for absurd shapes
        self.total_bytes += nbytes
        if self._max_total is not None and self.total_bytes > self._max_total:
            raise TensorFormatError(
                f"Request tensors exceed the server's limit of {self._max_total} bytes "
                f"(at tensor {_label(key)!r}); raise --max-request-bytes or send fewer variables per call."
            )
        if self._allocate is None:
            array = np.empty(shape, dtype=dtype.newbyteorder("="))
        else:
            array = self._allocate(key[0], key[1], shape, dtype.newbyteorder("="))
        self._arrays[key] = array
        self._bytes[key] = memoryview(array.reshape(-1).view(np.uint8))  # type: ignore[arg-type]  # numpy stubs, see above
        self._filled[key] = 0

    def _check_same_tensor(self, key: tuple[str, str], chunk) -> None:
        array = self._arrays[key]
        dtype = dtype_from_proto(chunk.dtype)
        if array.dtype != dtype.newbyteorder("=") or array.shape != tuple(int(d) for d in chunk.shape):
            raise TensorFormatError(f"Tensor {_label(key)!r}: chunks disagree on dtype or shape.")

    def add_all(self, chunks: Iterable) -> None:
        for chunk in chunks:
            self.add(chunk)

    def result(self) -> dict[tuple[str, str], np.ndarray]:
        for key, array in self._arrays.items():
            if self._filled[key] != array.nbytes:
                raise TensorFormatError(
                    f"Tensor {_label(key)!r}: only {self._filled[key]} of {array.nbytes} bytes received."
                )
        if sys.byteorder == "big":  # pragma: no cover - the bytes arrived little-endian
            for array in self._arrays.values():
                array.byteswap(inplace=True)
        return dict(self._arrays)


def _label(key: tuple[str, str]) -> str:
    name, slot = key
    return name + (f"/{slot}" if slot else "")


def decode_all(chunks: Iterable[pb.TensorChunk]) -> dict[tuple[str, str], np.ndarray]:
    assembler = TensorAssembler()
    assembler.add_all(chunks)
    return assembler.result()


def variables_only(tensors: Mapping[tuple[str, str], np.ndarray]) -> dict[str, np.ndarray]:
    """``{name: array}`` of the entries whose slot is empty."""
    return {name: a for (name, slot), a in tensors.items() if not slot}


# ------------------------------------------------------------------ sparse gradients

# Slots under which a sparse gradient's two tensors travel (see SparseGradient in optserve.proto).
SPARSE_INDICES_SLOT = "sparse_indices"
SPARSE_VALUES_SLOT = "sparse_values"
_INDEX_DTYPES = (np.dtype("int32"), np.dtype("int64"))


class SparseGradient:
    """A gradient given by rows: ``values[i]`` is the gradient of row ``indices[i]``; other rows are zero.

    What Keras's TensorFlow backend gets for an embedding (``tf.IndexedSlices``).
    ``indices`` is 1-D and integer (repeats are summed); ``values`` has shape
    ``(len(indices), *variable.shape[1:])`` and the variable's dtype. It is
    applied exactly as the dense gradient :meth:`densify` gives, so every row's
    optimizer slots decay as under Keras (see ``optserve.server.sparse`` for
    repeated indices under Keras's TensorFlow backend). Bad shapes or dtypes raise
    ``InvalidArgumentError`` (a ``ValueError``) here, or when checked against the
    variable, before anything is applied.
    """

    __slots__ = ("indices", "values")

    def __init__(self, indices: Any, values: Any):
        indices = np.asarray(indices)
        values = np.asarray(values)
        if indices.ndim != 1 or not (np.issubdtype(indices.dtype, np.integer) or indices.size == 0):
            raise InvalidArgumentError(
                "`indices` of a SparseGradient must be a 1-D array of integers. "
                f"Received: shape {indices.shape} {indices.dtype.name}"
            )
        if indices.dtype not in _INDEX_DTYPES:
            indices = indices.astype(np.int64)
        if values.ndim < 1 or values.shape[0] != indices.shape[0]:
            raise InvalidArgumentError(
                "`values` of a SparseGradient must have one row per index, shape (len(indices), *row_shape). "
                f"Received: {indices.shape[0]} indices and values of shape {values.shape}"
            )
        try:
            dtype_to_proto(values.dtype)
        except TensorFormatError as error:
            raise InvalidArgumentError(f"`values` of a SparseGradient: {error}") from None
        self.indices: np.ndarray = indices
        self.values: np.ndarray = values

    def __repr__(self) -> str:
        return f"SparseGradient({len(self.indices)} rows of shape {self.values.shape[1:]} {self.values.dtype.name})"

    @property
    def dtype(self) -> np.dtype:
        return self.values.dtype

    @property
    def nbytes(self) -> int:
        return int(self.indices.nbytes + self.values.nbytes)

    def check_against(self, name: str, shape: Sequence[int], dtype: Any) -> None:
        """Refuse (InvalidArgumentError) rows that do not fit variable ``name`` of ``shape`` and ``dtype``."""
        shape = tuple(int(d) for d in shape)
        if not shape:
            raise InvalidArgumentError(
                f"Sparse gradient for {name!r}: the variable is a scalar, which has no rows; send a dense gradient."
            )
        if self.values.shape[1:] != shape[1:]:
            raise InvalidArgumentError(
                f"Sparse gradient for {name!r} has rows of shape {self.values.shape[1:]}, but the variable of "
                f"shape {shape} has rows of shape {shape[1:]}."
            )
        if self.values.dtype != np.dtype(dtype):
            raise InvalidArgumentError(
                f"Sparse gradient for {name!r} has dtype {self.values.dtype.name}, but the variable has "
                f"{np.dtype(dtype).name}; send rows of the variable's dtype."
            )
        if self.indices.size:
            low, high = int(self.indices.min()), int(self.indices.max())
            if low < 0 or high >= shape[0]:
                bad = low if low < 0 else high
                raise InvalidArgumentError(
                    f"Sparse gradient for {name!r} has index {bad}, outside the variable's {shape[0]} rows "
                    f"[0, {shape[0]})."
                )

    def densify(self, shape: Sequence[int], dtype: Any = None) -> np.ndarray:
        """The dense gradient: zeros of ``shape`` with each row added at its index (repeats summed)."""
        dense = np.zeros(tuple(shape), dtype=self.values.dtype if dtype is None else dtype)
        if np.unique(self.indices).size == self.indices.size:
            dense[self.indices] = self.values  # no repeats: each row lands on a zero row
        else:
            np.add.at(dense, self.indices, self.values)
        return dense

    def rows(self, start: int, stop: int) -> SparseGradient:
        """The rows with indices in ``[start, stop)``, re-based to start at 0 (a part of a split variable)."""
        keep = (self.indices >= start) & (self.indices < stop)
        return SparseGradient(self.indices[keep] - self.indices.dtype.type(start), self.values[keep])


def gradient_tensors(gradients: Mapping[str, Any]) -> tuple[list[tuple[str, str, Any]], list[pb.SparseGradient]]:
    """The tensors of a push (dense ones with slot "", sparse ones as two slotted tensors) and its declarations."""
    tensors: list[tuple[str, str, Any]] = []
    declared: list[pb.SparseGradient] = []
    for name, gradient in gradients.items():
        if isinstance(gradient, SparseGradient):
            tensors.append((name, SPARSE_INDICES_SLOT, gradient.indices))
            tensors.append((name, SPARSE_VALUES_SLOT, gradient.values))
            declared.append(pb.SparseGradient(name=name))
        else:
            tensors.append((name, "", gradient))
    return tensors, declared


def split_gradients(
    tensors: Mapping[tuple[str, str], np.ndarray], declared: Iterable[Any]
) -> tuple[dict[str, np.ndarray], dict[str, tuple[SparseGradient, tuple[int, ...]]]]:
    """A received push's tensors -> (dense {name: array}, sparse {name: (SparseGradient, declared shape)}).

    Raises TensorFormatError for tensors that fit neither form.
    """
    sparse_shapes: dict[str, tuple[int, ...]] = {}
    for declaration in declared:
        if declaration.name in sparse_shapes:
            raise TensorFormatError(f"Sparse gradient {declaration.name!r} is declared twice.")
        sparse_shapes[declaration.name] = tuple(int(d) for d in declaration.dense_shape)
    dense: dict[str, np.ndarray] = {}
    parts: dict[str, dict[str, np.ndarray]] = {}
    for (name, slot), array in tensors.items():
        if not slot:
            dense[name] = array
        elif name in sparse_shapes and slot in (SPARSE_INDICES_SLOT, SPARSE_VALUES_SLOT):
            parts.setdefault(name, {})[slot] = array
        else:
            raise TensorFormatError(
                f"Gradient tensors must have an empty slot; received slot tensor {_label((name, slot))!r}"
                + ("" if name in sparse_shapes else " (a sparse gradient must be declared in `sparse_gradients`)")
                + "."
            )
    sparse: dict[str, tuple[SparseGradient, tuple[int, ...]]] = {}
    for name, shape in sparse_shapes.items():
        if name in dense:
            raise TensorFormatError(f"Gradient {name!r} is sent both dense and sparse; send one of them.")
        found = parts.get(name, {})
        missing = [slot for slot in (SPARSE_INDICES_SLOT, SPARSE_VALUES_SLOT) if slot not in found]
        if missing:
            raise TensorFormatError(f"Sparse gradient {name!r} lacks its {missing} tensor.")
        try:
            sparse[name] = SparseGradient(found[SPARSE_INDICES_SLOT], found[SPARSE_VALUES_SLOT]), shape
        except InvalidArgumentError as error:
            raise TensorFormatError(f"Sparse gradient {name!r}: {error.message}") from None
    return dense, sparse
