"""The array files of a checkpoint: ``tensors.safetensors`` (version 2) and ``arrays.bin`` (version 1, read only).

Version 2 stores every array in the safetensors format, so any safetensors reader
opens a checkpoint without optserve (``safetensors.numpy.load_file(path)``), each
tensor named by where it sits in the server's state, e.g.
``models/job/engine/variables/dense/kernel`` and
``models/job/engine/slots/dense/kernel/momentum``. The file is written here
directly (an 8-byte little-endian header length, a JSON header, then the tensors
back to back), streaming each array from its memory, so a checkpoint never holds a
second copy of the model. The manifest keeps the SHA-256 of every array and its
exact NumPy dtype: safetensors has no big-endian or complex128 tensors, so such
arrays are stored little-endian, complex ones as (real, imaginary) float pairs in
a trailing axis of 2, and turned back on load.

Version 1 (``arrays.bin``: raw bytes, 64-byte aligned, offsets in the manifest)
is still read, so checkpoints written by earlier versions restore.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import pathlib
import struct
from collections.abc import Sequence

import numpy as np

SAFETENSORS_FILE = "tensors.safetensors"
RAW_FILE = "arrays.bin"  # version 1

_IO_BLOCK = 16 << 20  # hash and write in blocks so a large array is read once, while cache-warm
_ARRAY_KINDS = "biufc"  # bool, signed/unsigned int, float, complex: plain bytes, no objects
_HEADER_ALIGNMENT = 8  # safetensors pads its header so the data starts 8-byte aligned
_MAX_HEADER_BYTES = 100 << 20  # safetensors' own limit on the header

_SAFETENSORS_DTYPES = {
    "bool": "BOOL",
    "uint8": "U8",
    "int8": "I8",
    "uint16": "U16",
    "int16": "I16",
    "uint32": "U32",
    "int32": "I32",
    "uint64": "U64",
    "int64": "I64",
    "float16": "F16",
    "float32": "F32",
    "float64": "F64",
}


class ArrayFileError(ValueError):
    """An array file does not match its manifest (the caller reports the checkpoint as damaged)."""


def _stored_form(array: np.ndarray) -> np.ndarray:
    """The array as safetensors can hold it: little-endian, complex as float pairs, C-contiguous."""
    if array.dtype.kind == "c":
        pairs = np.empty(array.shape + (2,), _stored_dtype(array.dtype))
        pairs[..., 0], pairs[..., 1] = array.real, array.imag
        return pairs
    # Copies only a non-contiguous or big-endian view.
    return np.ascontiguousarray(array, dtype=_stored_dtype(array.dtype))


def _stored_dtype(dtype: np.dtype) -> np.dtype:
    if dtype.kind == "c":
        return np.dtype(f"<f{dtype.itemsize // 2}")
    return dtype.newbyteorder("<") if dtype.byteorder == ">" else dtype


def _byte_view(array: np.ndarray) -> memoryview:
    """The bytes of a C-contiguous array, without copying them."""
    # numpy's stubs declare ndarray.__buffer__ for Python >= 3.12 only; arrays are buffers on every version.
    return memoryview(array.reshape(-1).view(np.uint8))  # type: ignore[arg-type]


def write_safetensors(
    path: pathlib.Path, names: Sequence[str], arrays: Sequence[np.ndarray], metadata: dict[str, str]
) -> tuple[list[dict], int]:
    """Write ``arrays`` under ``names``; returns (manifest index entries, file size). fsyncs the file."""
    stored = [_stored_form(array) for array in arrays]
    header: dict = {"__metadata__": dict(metadata)}
    offset = 0
    for name, array in zip(names, stored):
        header[name] = {
            "dtype": _SAFETENSORS_DTYPES[array.dtype.name],
            "shape": list(array.shape),
            "data_offsets": [offset, offset + array.nbytes],
        }
        offset += array.nbytes
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-(8 + len(text)) % _HEADER_ALIGNMENT)
    index = []
    with open(path, "wb") as handle:
        handle.write(struct.pack("<Q", len(text)))
        handle.write(text)
        for name, original, array in zip(names, arrays, stored):
            raw = _byte_view(array)
            digest = hashlib.sha256()
            for start in range(0, len(raw), _IO_BLOCK):
                block = raw[start : start + _IO_BLOCK]
                digest.update(block)
                handle.write(block)
            index.append(
                {"name": name, "dtype": original.dtype.str, "shape": list(original.shape), "sha256": digest.hexdigest()}
            )
        handle.flush()
        os.fsync(handle.fileno())
    return index, 8 + len(text) + offset


def read_safetensors(path: pathlib.Path, entries: list[dict], expected_size: int) -> list[np.ndarray]:
    """The arrays of the manifest's ``entries``, each checked against its checksum."""
    with open(path, "rb") as handle:
        size = os.fstat(handle.fileno()).st_size
        if size != expected_size:
            raise ArrayFileError(
                f"{SAFETENSORS_FILE} holds {size} bytes, the manifest expects {expected_size} (truncated?)"
            )
        (header_bytes,) = struct.unpack("<Q", handle.read(8))
        if header_bytes > min(_MAX_HEADER_BYTES, size - 8):
            raise ArrayFileError(f"{SAFETENSORS_FILE} has a malformed header")
        try:
            header = json.loads(handle.read(header_bytes))
        except ValueError:
            raise ArrayFileError(f"{SAFETENSORS_FILE} has a malformed header") from None
        if not isinstance(header, dict):
            raise ArrayFileError(f"{SAFETENSORS_FILE} has a malformed header")
        data_start = 8 + header_bytes
        arrays = []
        for number, entry in enumerate(entries):
            try:
                dtype = np.dtype(entry["dtype"])
                shape = tuple(int(d) for d in entry["shape"])
                start, end = (int(v) for v in header[entry["name"]]["data_offsets"])
            except (KeyError, TypeError, ValueError) as error:
                raise ArrayFileError(f"array {number}: malformed index entry ({error!r})") from None
            if dtype.kind not in _ARRAY_KINDS or dtype.fields is not None:
                raise ArrayFileError(f"array {number}: unsupported dtype {dtype}")
            stored_shape = shape + (2,) if dtype.kind == "c" else shape
            array = _read_array(
                handle,
                number,
                dtype=_stored_dtype(dtype),
                shape=stored_shape,
                offset=data_start + start,
                nbytes=end - start,
                file_size=size,
                sha256=entry.get("sha256"),
            )
            arrays.append(_original_form(array, dtype))
    return arrays


def _original_form(array: np.ndarray, dtype: np.dtype) -> np.ndarray:
    if dtype.kind == "c":
        original = np.empty(array.shape[:-1], dtype)
        original.real, original.imag = array[..., 0], array[..., 1]
        return original
    return array.astype(dtype, copy=False) if array.dtype != dtype else array


def read_raw(path: pathlib.Path, entries: list[dict], expected_size: int) -> list[np.ndarray]:
    """Version 1: the arrays of ``arrays.bin`` at the manifest's offsets, each checked."""
    with open(path, "rb") as handle:
        size = os.fstat(handle.fileno()).st_size
        if size != expected_size:
            raise ArrayFileError(f"{RAW_FILE} holds {size} bytes, the manifest expects {expected_size} (truncated?)")
        arrays = []
        for number, entry in enumerate(entries):
            try:
                dtype = np.dtype(entry["dtype"])
                shape = tuple(int(d) for d in entry["shape"])
                offset, nbytes = int(entry["offset"]), int(entry["nbytes"])
            except (KeyError, TypeError, ValueError) as error:
                raise ArrayFileError(f"array {number}: malformed index entry ({error!r})") from None
            arrays.append(
                _read_array(
                    handle,
                    number,
                    dtype=dtype,
                    shape=shape,
                    offset=offset,
                    nbytes=nbytes,
                    file_size=size,
                    sha256=entry.get("sha256"),
                )
            )
    return arrays


def _read_array(
    handle, number: int, *, dtype: np.dtype, shape: tuple, offset: int, nbytes: int, file_size: int, sha256
) -> np.ndarray:
    if dtype.kind not in _ARRAY_KINDS or dtype.fields is not None or min(shape, default=0) < 0:
        raise ArrayFileError(f"array {number}: unsupported dtype {dtype} or shape {shape}")
    if math.prod(shape) * dtype.itemsize != nbytes or offset < 0 or offset + nbytes > file_size:
        raise ArrayFileError(f"array {number}: index entry does not fit the data file")
    array = np.empty(shape, dtype=dtype)
    raw = _byte_view(array)
    handle.seek(offset)
    if handle.readinto(raw) != nbytes:
        raise ArrayFileError(f"array {number}: short read from the data file")
    digest = hashlib.sha256()
    for start in range(0, nbytes, _IO_BLOCK):
        digest.update(raw[start : start + _IO_BLOCK])
    if digest.hexdigest() != sha256:
        raise ArrayFileError(f"array {number} (dtype {dtype}, shape {shape}) checksum mismatch")
    return array
