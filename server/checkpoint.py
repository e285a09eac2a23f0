"""Durable, atomic checkpoints of the server's state.

A store is one directory::

    <directory>/
      ckpt-00000007/                 a complete checkpoint
        arrays.bin                   every array's raw C-order bytes, each 64-byte aligned
        manifest.json                structure, array index, SHA-256 of every array and of itself
      ckpt-00000008/
      .tmp-ckpt-00000009-1f2e3d4c/   a save in progress or an interrupted one: never read
      .lock                          serializes writers of different processes

A save writes everything into a ``.tmp-`` directory, fsyncs the files and the
directory, and only then renames it to ``ckpt-<sequence>``: a checkpoint is
either complete or invisible. Older checkpoints beyond ``keep`` are deleted only
after the new one is durable. Sequence numbers continue across restarts (the
next one is above every name in the directory, damaged and unfinished included).

The state is a tree of dicts, lists and tuples whose leaves are JSON values
(str, int, float, bool, None), NumPy arrays and NumPy scalars. Arrays are stored
as raw bytes with dtype and shape in the manifest; nothing is ever pickled, so
loading a checkpoint cannot run code.

Loading verifies the manifest's own checksum, the data file's size and every
array's checksum. :meth:`CheckpointStore.load_latest` skips a damaged
checkpoint with a warning naming it and falls back to the previous one.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import os
import pathlib
import re
import secrets
import shutil
import threading
import time
from typing import Any, Iterator, NamedTuple

import numpy as np

from optserve.server.errors import FailedPreconditionError, InvalidArgumentError

try:  # advisory lock between processes; absent on Windows, where only threads are serialized
    import fcntl
except ImportError:  # pragma: no cover - non-POSIX hosts
    fcntl = None

logger = logging.getLogger(__name__)

FORMAT_NAME = "optserve-checkpoint"
FORMAT_VERSION = 1
MANIFEST_FILE = "manifest.json"
DATA_FILE = "arrays.bin"
LOCK_FILE = ".lock"
TEMP_PREFIX = ".tmp-"

_ALIGNMENT = 64               # array offsets in arrays.bin; lets readers map arrays in place
_IO_BLOCK = 16 << 20          # hash and write in blocks so a large array is read once, while cache-warm
_CHECKPOINT_NAME = re.compile(r"^ckpt-(\d{8,})$")
_TEMP_NAME = re.compile(r"^\.tmp-ckpt-(\d+)-")
_ARRAY_KINDS = "biufc"        # bool, signed/unsigned int, float, complex: plain bytes, no objects

# Tags of the encoded tree. A user dict whose keys all are strings not starting
# with "$" is stored as a plain JSON object; any other dict as "$dict" pairs.
_TAG_ARRAY = "$array"
_TAG_SCALAR = "$scalar"
_TAG_TUPLE = "$tuple"
_TAG_DICT = "$dict"


class CorruptCheckpointError(FailedPreconditionError):
    """A checkpoint cannot be read back: missing or damaged files, checksum mismatch, unknown format."""


class CheckpointInfo(NamedTuple):
    sequence: int
    path: pathlib.Path


class CheckpointStore:
    """Atomic checkpoints in ``directory``, keeping the newest ``keep``.

    Safe for one writing thread plus readers in the same process; an advisory
    file lock also keeps two processes from saving into one directory at once.
    """

    def __init__(self, directory: str | os.PathLike, keep: int = 3):
        if isinstance(keep, bool) or not isinstance(keep, int) or keep < 1:
            raise InvalidArgumentError(f"`keep` must be an integer >= 1. Received: keep={keep!r}")
        self.directory = pathlib.Path(directory)
        self.keep = keep
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
        except FileExistsError:
            raise InvalidArgumentError(
                f"`directory` must be a directory. Received: directory={str(self.directory)!r} (a file)"
            ) from None
        self._lock = threading.Lock()
        self._last_sequence = 0

    # ------------------------------------------------------------------ public API

    def save(self, state: Any) -> pathlib.Path:
        """Write ``state`` as the next checkpoint; returns its path once it is durable.

        Arrays are written straight from their memory (no copy when C-contiguous);
        the caller must not modify them until ``save`` returns.
        """
        tree, arrays = _encode_tree(state)  # reject a bad state before touching the disk
        with self._lock, self._process_lock(exclusive=True):
            sequence = self._next_sequence()
            self._remove_temp_entries()
            final = self.directory / f"ckpt-{sequence:08d}"
            temp = self.directory / f"{TEMP_PREFIX}ckpt-{sequence:08d}-{secrets.token_hex(4)}"
            temp.mkdir()
            try:
                index, data_bytes = _write_arrays(temp / DATA_FILE, arrays)
                _write_manifest(temp / MANIFEST_FILE, _manifest_body(sequence, tree, index, data_bytes))
                _fsync_directory(temp)
                os.rename(temp, final)
                _fsync_directory(self.directory)
            except BaseException:
                shutil.rmtree(temp, ignore_errors=True)
                raise
            self._last_sequence = sequence
            self._prune()
        return final

    def load(self, path: str | os.PathLike) -> Any:
        """The state saved in checkpoint ``path``; raises CorruptCheckpointError if it is damaged."""
        path = pathlib.Path(path)
        with self._lock, self._process_lock(exclusive=False):
            return _load_checkpoint(path)

    def load_latest(self) -> tuple[Any, pathlib.Path] | None:
        """``(state, path)`` of the newest readable checkpoint, or None when there is none."""
        with self._lock, self._process_lock(exclusive=False):
            for leftover in self._temp_entries():
                logger.warning("Ignoring unfinished checkpoint %s (a save was interrupted).", leftover)
            for info in reversed(self._checkpoints()):
                try:
                    return _load_checkpoint(info.path), info.path
                except CorruptCheckpointError as error:
                    logger.warning("Skipping damaged checkpoint %s: %s", info.path, error.message)
        return None

    def list(self) -> list[CheckpointInfo]:
        """Finished checkpoints, oldest first (their contents are not verified)."""
        with self._lock:
            return self._checkpoints()

    def describe(self, path: str | os.PathLike) -> dict:
        """Summary from a checkpoint's manifest (checked), without reading its arrays."""
        path = pathlib.Path(path)
        body = _read_manifest(path)
        return {
            "path": str(path),
            "sequence": body["sequence"],
            "saved_at": body["saved_at"],
            "num_arrays": len(body["arrays"]),
            "data_bytes": body["data_bytes"],
        }

    # ------------------------------------------------------------------ directory bookkeeping

    def _checkpoints(self) -> list[CheckpointInfo]:
        found = []
        for entry in self.directory.iterdir():
            match = _CHECKPOINT_NAME.match(entry.name)
            if match and entry.is_dir():
                found.append(CheckpointInfo(int(match.group(1)), entry))
        return sorted(found)

    def _temp_entries(self) -> list[pathlib.Path]:
        return sorted(e for e in self.directory.iterdir() if e.name.startswith(TEMP_PREFIX))

    def _next_sequence(self) -> int:
        # Count damaged and unfinished saves too, so a number is never reused.
        highest = self._last_sequence
        for entry in self.directory.iterdir():
            match = _CHECKPOINT_NAME.match(entry.name) or _TEMP_NAME.match(entry.name)
            if match:
                highest = max(highest, int(match.group(1)))
        return highest + 1

    def _remove_temp_entries(self) -> None:
        # Under the writer lock any temp entry belongs to a save that died.
        for leftover in self._temp_entries():
            logger.warning("Removing %s, left over by an interrupted save or deletion.", leftover)
            _remove(leftover)

    def _prune(self) -> None:
        for info in self._checkpoints()[:-self.keep]:
            # Rename first: a half-deleted directory must never look like a checkpoint.
            doomed = self.directory / f"{TEMP_PREFIX}ckpt-{info.sequence:08d}-deleted"
            try:
                os.rename(info.path, doomed)
            except OSError as error:
                logger.warning("Could not delete old checkpoint %s: %s", info.path, error)
                continue
            _remove(doomed)

    @contextlib.contextmanager
    def _process_lock(self, *, exclusive: bool) -> Iterator[None]:
        if fcntl is None:  # pragma: no cover - non-POSIX hosts
            yield
            return
        try:
            handle = open(self.directory / LOCK_FILE, "a")
        except OSError:
            if exclusive:
                raise
            yield  # a read-only store (e.g. a restore from a read-only mount) has no writers to fear
            return
        with handle:
            fcntl.flock(handle, fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH)
            try:
                yield
            finally:
                fcntl.flock(handle, fcntl.LOCK_UN)


# ---------------------------------------------------------------------- tree encoding


def _encode_tree(state: Any) -> tuple[Any, list[np.ndarray]]:
    """JSON-able tree with arrays replaced by ``{"$array": i}``, plus the arrays in index order."""
    arrays: list[np.ndarray] = []

    def encode(value: Any, where: str) -> Any:
        if value is None or isinstance(value, (bool, str)):
            return value
        if isinstance(value, int) and not isinstance(value, np.generic):
            return int(value)
        if isinstance(value, float) and not isinstance(value, np.generic):
            return float(value)
        if isinstance(value, np.ndarray):
            arrays.append(_checked_array(value, where))
            return {_TAG_ARRAY: len(arrays) - 1}
        if isinstance(value, np.generic):
            arrays.append(_checked_array(np.asarray(value), where))
            return {_TAG_SCALAR: len(arrays) - 1}
        if isinstance(value, list):
            return [encode(item, f"{where}/{i}") for i, item in enumerate(value)]
        if isinstance(value, tuple):
            return {_TAG_TUPLE: [encode(item, f"{where}/{i}") for i, item in enumerate(value)]}
        if isinstance(value, dict):
            return encode_dict(value, where)
        raise InvalidArgumentError(
            f"Cannot checkpoint a value of type {type(value).__name__} at {where or '/'}; "
            "allowed: dict, list, tuple, str, int, float, bool, None, NumPy arrays and scalars."
        )

    def encode_dict(value: dict, where: str) -> Any:
        for key in value:
            if not _is_json_key(key):
                raise InvalidArgumentError(
                    f"Cannot checkpoint a dict key of type {type(key).__name__} at {where or '/'}; "
                    "keys must be str, int, float, bool or None."
                )
        if all(isinstance(key, str) and not key.startswith("$") for key in value):
            return {key: encode(item, f"{where}/{key}") for key, item in value.items()}
        return {_TAG_DICT: [[key, encode(item, f"{where}/{key}")] for key, item in value.items()]}

    return encode(state, ""), arrays


def _is_json_key(key: Any) -> bool:
    # NumPy scalar keys would come back as Python numbers: refuse rather than change their type.
    if isinstance(key, str) or key is None:
        return True
    return isinstance(key, (int, float, bool)) and not isinstance(key, np.generic)


def _checked_array(array: np.ndarray, where: str) -> np.ndarray:
    if array.dtype.kind not in _ARRAY_KINDS or array.dtype.fields is not None:
        raise InvalidArgumentError(
            f"Cannot checkpoint an array of dtype {array.dtype} at {where or '/'}; "
            "allowed: bool, integer, float and complex dtypes."
        )
    return array


def _decode_tree(tree: Any, arrays: list[np.ndarray]) -> Any:
    if isinstance(tree, list):
        return [_decode_tree(item, arrays) for item in tree]
    if not isinstance(tree, dict):
        return tree
    if len(tree) == 1:
        (tag, payload), = tree.items()
        if tag == _TAG_ARRAY:
            return arrays[payload]
        if tag == _TAG_SCALAR:
            return arrays[payload][()]
        if tag == _TAG_TUPLE:
            return tuple(_decode_tree(item, arrays) for item in payload)
        if tag == _TAG_DICT:
            return {key: _decode_tree(item, arrays) for key, item in payload}
    return {key: _decode_tree(item, arrays) for key, item in tree.items()}


# ---------------------------------------------------------------------- writing


def _byte_view(array: np.ndarray) -> memoryview:
    """The bytes of a C-contiguous array, without copying them."""
    return memoryview(array.reshape(-1).view(np.uint8))


def _write_arrays(path: pathlib.Path, arrays: list[np.ndarray]) -> tuple[list[dict], int]:
    index = []
    offset = 0
    with open(path, "wb") as handle:
        for array in arrays:
            padding = -offset % _ALIGNMENT
            handle.write(b"\0" * padding)
            offset += padding
            raw = _byte_view(np.ascontiguousarray(array))  # copies only a non-contiguous view
            digest = hashlib.sha256()
            for start in range(0, len(raw), _IO_BLOCK):
                block = raw[start:start + _IO_BLOCK]
                digest.update(block)
                handle.write(block)
            index.append({
                "dtype": array.dtype.str,
                "shape": list(array.shape),
                "offset": offset,
                "nbytes": len(raw),
                "sha256": digest.hexdigest(),
            })
            offset += len(raw)
        handle.flush()
        os.fsync(handle.fileno())
    return index, offset


def _manifest_body(sequence: int, tree: Any, index: list[dict], data_bytes: int) -> dict:
    return {
        "format": FORMAT_NAME,
        "version": FORMAT_VERSION,
        "sequence": sequence,
        "saved_at": time.time(),
        "data_file": DATA_FILE,
        "data_bytes": data_bytes,
        "arrays": index,
        "tree": tree,
    }


def _canonical_json(body: dict) -> bytes:
    # Key order is kept, not sorted: it is part of the state (variables keep their build order),
    # and json.loads gives the keys back in file order, so the checksum is reproducible.
    return json.dumps(body, separators=(",", ":")).encode()


def _write_manifest(path: pathlib.Path, body: dict) -> None:
    manifest = dict(body, manifest_sha256=hashlib.sha256(_canonical_json(body)).hexdigest())
    with open(path, "w", encoding="utf-8") as handle:
        json.dump(manifest, handle)
        handle.flush()
        os.fsync(handle.fileno())


def _fsync_directory(path: pathlib.Path) -> None:
    """Make a directory's entries (new files, a rename) durable."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # pragma: no cover - hosts that cannot open directories
        return
    try:
        os.fsync(fd)
    except OSError as error:  # pragma: no cover - some network file systems refuse
        logger.debug("fsync of directory %s failed: %s", path, error)
    finally:
        os.close(fd)


def _remove(path: pathlib.Path) -> None:
    try:
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        else:
            path.unlink()
    except OSError as error:
        logger.warning("Could not remove %s: %s", path, error)


# ---------------------------------------------------------------------- reading


def _load_checkpoint(path: pathlib.Path) -> Any:
    body = _read_manifest(path)
    arrays = _read_arrays(path / body["data_file"], body)
    try:
        return _decode_tree(body["tree"], arrays)
    except (KeyError, IndexError, TypeError, ValueError) as error:
        raise CorruptCheckpointError(f"malformed structure in {MANIFEST_FILE}: {error!r}") from None


def _read_manifest(path: pathlib.Path) -> dict:
    try:
        text = (path / MANIFEST_FILE).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise CorruptCheckpointError(f"{MANIFEST_FILE} is missing") from None
    except (OSError, UnicodeDecodeError) as error:
        raise CorruptCheckpointError(f"cannot read {MANIFEST_FILE}: {error}") from None
    try:
        manifest = json.loads(text)
        claimed = manifest.pop("manifest_sha256")
    except (ValueError, KeyError, TypeError, AttributeError):
        raise CorruptCheckpointError(f"{MANIFEST_FILE} is not a checkpoint manifest (truncated?)") from None
    if hashlib.sha256(_canonical_json(manifest)).hexdigest() != claimed:
        raise CorruptCheckpointError(f"{MANIFEST_FILE} checksum mismatch")
    if manifest.get("format") != FORMAT_NAME or manifest.get("version") != FORMAT_VERSION:
        raise CorruptCheckpointError(
            f"unknown format {manifest.get('format')!r} version {manifest.get('version')!r}; "
            f"this optserve reads {FORMAT_NAME!r} version {FORMAT_VERSION}"
        )
    if manifest.get("data_file") != DATA_FILE:  # never follow a path out of the checkpoint
        raise CorruptCheckpointError(f"unexpected data file {manifest.get('data_file')!r}")
    return manifest


def _read_arrays(data_path: pathlib.Path, body: dict) -> list[np.ndarray]:
    try:
        size = data_path.stat().st_size
    except OSError as error:
        raise CorruptCheckpointError(f"cannot read {DATA_FILE}: {error}") from None
    if size != body["data_bytes"]:
        raise CorruptCheckpointError(
            f"{DATA_FILE} holds {size} bytes, the manifest expects {body['data_bytes']} (truncated?)"
        )
    arrays = []
    try:
        with open(data_path, "rb") as handle:
            for number, entry in enumerate(body["arrays"]):
                arrays.append(_read_one_array(handle, number, entry, size))
    except OSError as error:
        raise CorruptCheckpointError(f"cannot read {DATA_FILE}: {error}") from None
    return arrays


def _read_one_array(handle, number: int, entry: dict, file_size: int) -> np.ndarray:
    try:
        dtype = np.dtype(entry["dtype"])
        shape = tuple(int(d) for d in entry["shape"])
        offset, nbytes = int(entry["offset"]), int(entry["nbytes"])
    except (KeyError, TypeError, ValueError) as error:
        raise CorruptCheckpointError(f"array {number}: malformed index entry ({error!r})") from None
    if dtype.kind not in _ARRAY_KINDS or dtype.fields is not None or min(shape, default=0) < 0:
        raise CorruptCheckpointError(f"array {number}: unsupported dtype {dtype} or shape {shape}")
    if math.prod(shape) * dtype.itemsize != nbytes or offset < 0 or offset + nbytes > file_size:
        raise CorruptCheckpointError(f"array {number}: index entry does not fit {DATA_FILE}")
    array = np.empty(shape, dtype=dtype)
    raw = _byte_view(array)
    handle.seek(offset)
    if handle.readinto(raw) != nbytes:
        raise CorruptCheckpointError(f"array {number}: short read from {DATA_FILE}")
    digest = hashlib.sha256()
    for start in range(0, nbytes, _IO_BLOCK):
        digest.update(raw[start:start + _IO_BLOCK])
    if digest.hexdigest() != entry.get("sha256"):
        raise CorruptCheckpointError(f"array {number} (dtype {dtype}, shape {shape}) checksum mismatch")
    return array
