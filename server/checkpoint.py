"""Durable, atomic checkpoints of the server's state.

A store is one directory::

    <directory>/
      ckpt-00000007/                 a complete checkpoint
        tensors.safetensors          every array, in the safetensors format (optserve.server.checkpoint_files)
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
in ``tensors.safetensors``, each named by its path in the tree (a list item that
is a model's state, with ``spec.model_id``, is named by that id), so standard
tools read them: ``safetensors.numpy.load_file(".../tensors.safetensors")``.
Nothing is ever pickled, so loading a checkpoint cannot run code. Checkpoints of
version 1 (``arrays.bin``) are still read.

Loading verifies the manifest's own checksum, the data file's size and every
array's checksum. :meth:`CheckpointStore.load_latest` skips a damaged
checkpoint with a warning naming it and falls back to the previous one.

:class:`Checkpointer` drives a store for a running server: periodic checkpoints
(every so many seconds, or every so many applied updates, see
:func:`parse_checkpoint_every`), checkpoints on request and a final one at
shutdown, each state collected on the event loop and written on a thread of its own.
"""

from __future__ import annotations

import asyncio
import builtins
import contextlib
import dataclasses
import errno
import hashlib
import json
import logging
import math
import os
import pathlib
import re
import secrets
import shutil
import struct
import threading
import time
import types
from collections.abc import Awaitable, Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any, NamedTuple

import numpy as np

from optserve.server.checkpoint_files import (
    RAW_FILE,
    SAFETENSORS_FILE,
    ArrayFileError,
    read_raw,
    read_safetensors,
    write_safetensors,
)
from optserve.server.errors import (
    FailedPreconditionError,
    InvalidArgumentError,
    OptserveError,
    ResourceExhaustedError,
    UnavailableError,
)

fcntl: types.ModuleType | None
try:  # advisory lock between processes; absent on Windows, where only threads are serialized
    import fcntl
except ImportError:  # pragma: no cover - non-POSIX hosts
    fcntl = None

logger = logging.getLogger(__name__)

FORMAT_NAME = "optserve-checkpoint"
FORMAT_VERSION = 2
READABLE_VERSIONS = {1: RAW_FILE, 2: SAFETENSORS_FILE}  # version -> its data file
MANIFEST_FILE = "manifest.json"
DATA_FILE = SAFETENSORS_FILE
LOCK_FILE = ".lock"
TEMP_PREFIX = ".tmp-"

_CHECKPOINT_NAME = re.compile(r"^ckpt-(\d{8,})$")
_TEMP_NAME = re.compile(r"^\.tmp-ckpt-(\d+)-")
_ARRAY_KINDS = "biufc"  # bool, signed/unsigned int, float, complex: plain bytes, no objects

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
        tree, names, arrays = _encode_tree(state)  # reject a bad state before touching the disk
        with self._lock, self._process_lock(exclusive=True):
            sequence = self._next_sequence()
            self._remove_temp_entries()
            final = self.directory / f"ckpt-{sequence:08d}"
            temp = self.directory / f"{TEMP_PREFIX}ckpt-{sequence:08d}-{secrets.token_hex(4)}"
            temp.mkdir()
            try:
                index, data_bytes = write_safetensors(
                    temp / DATA_FILE, names, arrays, {"format": FORMAT_NAME, "sequence": str(sequence)}
                )
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

    def list(self) -> builtins.list[CheckpointInfo]:  # builtins: `list` is this method in the class body
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

    def _checkpoints(self) -> builtins.list[CheckpointInfo]:
        found = []
        for entry in self.directory.iterdir():
            match = _CHECKPOINT_NAME.match(entry.name)
            if match and entry.is_dir():
                found.append(CheckpointInfo(int(match.group(1)), entry))
        return sorted(found)

    def _temp_entries(self) -> builtins.list[pathlib.Path]:
        return sorted(e for e in self.directory.iterdir() if e.name.startswith(TEMP_PREFIX))

    def _next_sequence(self) -> int:
        # Count damaged and unfinished saves too, so a number is never reused.
        highest = self._last_sequence
        for entry in self.directory.iterdir():
            match = _CHECKPOINT_NAME.match(entry.name) or _TEMP_NAME.match(entry.name)
            if match:
                highest = max(highest, int(match.group(1)))
        return highest + 1

    def remove_stale_temp_entries(self) -> int:
        """At start-up: remove what interrupted saves left (``.tmp-`` entries), unless another
        process is saving into this directory right now. Returns how many were removed."""
        if fcntl is None:  # pragma: no cover - non-POSIX hosts
            return 0
        try:
            handle = open(self.directory / LOCK_FILE, "a")
        except OSError:
            return 0  # a read-only store: nothing can be removed anyway
        with handle, self._lock:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                logger.warning(
                    "Another process is saving into %s; leaving its temporary entries alone.", self.directory
                )
                return 0
            try:
                leftovers = self._temp_entries()
                self._remove_temp_entries()
                return len(leftovers)
            finally:
                fcntl.flock(handle, fcntl.LOCK_UN)

    def _remove_temp_entries(self) -> None:
        # Under the writer lock any temp entry belongs to a save that died.
        for leftover in self._temp_entries():
            logger.warning("Removing %s, left over by an interrupted save or deletion.", leftover)
            _remove(leftover)

    def _prune(self) -> None:
        for info in self._checkpoints()[: -self.keep]:
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


def _encode_tree(state: Any) -> tuple[Any, list[str], list[np.ndarray]]:
    """JSON-able tree with arrays replaced by ``{"$array": i}``, plus the arrays' names and the
    arrays, in index order."""
    arrays: list[np.ndarray] = []
    names: list[str] = []
    taken: set[str] = set()

    def add(array: np.ndarray, where: str) -> int:
        name = where.lstrip("/") or "state"
        if name in taken:  # keys with "/" in them could make two paths alike
            name = f"{name}#{len(arrays)}"
        taken.add(name)
        names.append(name)
        arrays.append(_checked_array(array, where))
        return len(arrays) - 1

    def encode(value: Any, where: str) -> Any:
        if value is None or isinstance(value, (bool, str)):
            return value
        if isinstance(value, int) and not isinstance(value, np.generic):
            return int(value)
        if isinstance(value, float) and not isinstance(value, np.generic):
            return float(value)
        if isinstance(value, np.ndarray):
            return {_TAG_ARRAY: add(value, where)}
        if isinstance(value, np.generic):
            return {_TAG_SCALAR: add(np.asarray(value), where)}
        if isinstance(value, list):
            return [encode(item, f"{where}/{_segment(i, item)}") for i, item in enumerate(value)]
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

    tree = encode(state, "")
    return tree, names, arrays


def _segment(index: int, item: Any) -> str:
    """A list item's part of an array name: a model's state is named by its model_id."""
    spec = item.get("spec") if isinstance(item, dict) else None
    model_id = spec.get("model_id") if isinstance(spec, dict) else None
    return model_id if isinstance(model_id, str) and model_id else str(index)


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
        ((tag, payload),) = tree.items()
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
    version = manifest.get("version")
    if manifest.get("format") != FORMAT_NAME or version not in READABLE_VERSIONS:
        raise CorruptCheckpointError(
            f"unknown format {manifest.get('format')!r} version {version!r}; this optserve reads "
            f"{FORMAT_NAME!r} versions {sorted(READABLE_VERSIONS)}"
        )
    if manifest.get("data_file") != READABLE_VERSIONS[version]:  # never follow a path out of the checkpoint
        raise CorruptCheckpointError(f"unexpected data file {manifest.get('data_file')!r}")
    return manifest


def _read_arrays(data_path: pathlib.Path, body: dict) -> list[np.ndarray]:
    read = read_safetensors if body["version"] == 2 else read_raw
    try:
        return read(data_path, body["arrays"], body["data_bytes"])
    except ArrayFileError as error:
        raise CorruptCheckpointError(str(error)) from None
    except (OSError, struct.error) as error:
        raise CorruptCheckpointError(f"cannot read {data_path.name}: {error}") from None


# ---------------------------------------------------------------------- a running server's checkpoints

DEFAULT_CHECKPOINT_EVERY = "60s"
DEFAULT_CHECKPOINT_KEEP = 3

_SECONDS_PER_UNIT = {
    "": 1,
    "s": 1,
    "sec": 1,
    "secs": 1,
    "second": 1,
    "seconds": 1,
    "m": 60,
    "min": 60,
    "mins": 60,
    "minute": 60,
    "minutes": 60,
    "h": 3600,
    "hour": 3600,
    "hours": 3600,
}
_STEP_UNITS = ("step", "steps")
_EVERY = re.compile(r"^(\d+(?:\.\d*)?|\.\d+)\s*([a-z]*)$")
_OFF = ("0", "off", "never", "none")


@dataclasses.dataclass(frozen=True)
class CheckpointSchedule:
    """When a running server checkpoints on its own: every ``seconds``, every ``steps``
    applied updates (all models together), or neither (only on request and at shutdown)."""

    seconds: float | None = None
    steps: int | None = None

    def __str__(self) -> str:
        if self.seconds:
            return f"every {self.seconds:g} s"
        if self.steps:
            return f"every {self.steps} step{'s' if self.steps > 1 else ''}"
        return "only on request and at shutdown"


def parse_checkpoint_every(value: Any) -> CheckpointSchedule:
    """``--checkpoint-every``: ``60s``, ``5m``, ``1h``, ``30`` (seconds), ``500steps`` or
    ``500 steps`` (applied updates, all models together), ``0`` or ``off`` (never).

    Also takes a number of seconds, None (never) or a CheckpointSchedule.
    """
    if isinstance(value, CheckpointSchedule):
        return value
    if value is None:
        return CheckpointSchedule()
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        text = repr(float(value)) if math.isfinite(value) and value >= 0 else "?"
    elif isinstance(value, str):
        text = value.strip().lower()
    else:
        text = "?"
    if text in _OFF:
        return CheckpointSchedule()
    match = _EVERY.match(text)
    if match:
        number, unit = match.groups()
        if unit in _STEP_UNITS and number.isdigit():
            return CheckpointSchedule(steps=int(number)) if int(number) else CheckpointSchedule()
        if unit in _SECONDS_PER_UNIT:
            seconds = float(number) * _SECONDS_PER_UNIT[unit]
            return CheckpointSchedule(seconds=seconds) if seconds else CheckpointSchedule()
    raise InvalidArgumentError(
        "`checkpoint_every` must be a time (60s, 5m, 1h, or seconds as 30), a number of applied "
        f"updates (500steps), or 0/off. Received: checkpoint_every={value!r}"
    )


class Checkpointer:
    """Checkpoints of a running server into ``store``; use on the server's event loop.

    ``snapshot()`` is a coroutine function returning the state to save; it runs on
    the event loop (so it can take the models' locks). The state is written on a
    thread of this checkpointer, one save at a time, while the loop keeps serving.
    A periodic save that fails is logged and retried at the next period; serving
    goes on either way.
    """

    def __init__(self, store: CheckpointStore, schedule: CheckpointSchedule, snapshot: Callable[[], Awaitable[Any]]):
        self.store = store
        self.schedule = schedule
        self._snapshot = snapshot
        self._writer = ThreadPoolExecutor(1, thread_name_prefix="optserve-checkpoint")
        self._lock = asyncio.Lock()
        self._changes = 0  # changes of state not in a checkpoint yet
        self._steps = 0  # updates applied since the last save started
        self._periodic: asyncio.Task | None = None
        self._step_save: asyncio.Task | None = None
        self._saves: set[asyncio.Task] = set()  # saves started and not finished
        self._closed = False
        # Told of each save's outcome (``optserve.server.metrics.ServerMetrics``), when set.
        self.observer: Any = None  # optserve.server.metrics.ServerMetrics, with --metrics-port

    # ------------------------------------------------------------ lifecycle

    async def load_latest(self) -> tuple[Any, pathlib.Path] | None:
        """The newest readable checkpoint (damaged ones are skipped with a warning), or None."""
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._writer, self.store.load_latest)

    def start(self) -> None:
        """Begin periodic checkpoints by time (step-based ones follow ``note_change``)."""
        if self.schedule.seconds and self._periodic is None:
            self._periodic = asyncio.ensure_future(self._every(self.schedule.seconds))

    async def close(self, final: bool = True) -> pathlib.Path | None:
        """Stop the periodic saves; with ``final``, write what changed since the last checkpoint.

        Returns the final checkpoint's path (None when nothing had changed or ``final``
        is False); a failure to write it is raised, after the checkpointer is closed.
        """
        if self._closed:
            return None
        self._closed = True  # from now on no save is started but this final one
        if self._periodic is not None:
            self._periodic.cancel()
        try:
            if self._saves:
                await asyncio.wait(set(self._saves))  # saves in flight finish first
            if not final:
                return None
            if not self._changes:
                logger.info("Nothing changed since the last checkpoint; no final checkpoint needed.")
                return None
            path, _ = await self._shielded_save("final")
            return path
        finally:
            self._writer.shutdown(wait=True)

    # ------------------------------------------------------------ saving

    def note_change(self, applied: int = 0) -> None:
        """A change of the server's state, with ``applied`` optimizer updates (loop thread)."""
        self._changes += 1
        self._steps += applied
        self._maybe_save_for_steps()

    async def save(self, reason: str = "requested") -> tuple[pathlib.Path, int]:
        """Write a checkpoint now; returns (its path, the number of models in it)."""
        if self._closed:
            raise UnavailableError("The server is shutting down; it writes its final checkpoint itself.")
        return await self._shielded_save(reason)

    async def save_logged(self, reason: str) -> None:
        """Write a checkpoint now; a failure is logged, never raised (for the server's own saves)."""
        await self._save_logged(reason)

    async def _save_logged(self, reason: str) -> None:
        """A save of the checkpointer's own (periodic): a failure is logged, never raised."""
        if self._closed:
            return
        try:
            await self._shielded_save(reason)
        except asyncio.CancelledError:
            raise
        except Exception as error:  # noqa: BLE001 - a failed save must not stop the server
            message = error.message if isinstance(error, OptserveError) else repr(error)
            logger.error(
                "Checkpoint (%s) failed: %s. The server keeps serving; the previous checkpoints are intact.",
                reason,
                message,
            )

    async def _shielded_save(self, reason: str) -> tuple[pathlib.Path, int]:
        # Runs to completion even if the caller (an RPC, the periodic loop) is cancelled.
        task = asyncio.ensure_future(self._save(reason))
        self._saves.add(task)
        task.add_done_callback(self._saves.discard)
        task.add_done_callback(_retrieve_exception)
        return await asyncio.shield(task)

    async def _save(self, reason: str) -> tuple[pathlib.Path, int]:
        async with self._lock:
            changes, self._changes, self._steps = self._changes, 0, 0
            started = time.monotonic()
            try:
                state = await self._snapshot()
                loop = asyncio.get_running_loop()
                path = await loop.run_in_executor(self._writer, self.store.save, state)
            except BaseException as error:
                if self.observer is not None:
                    self.observer.checkpoint_failed(time.monotonic() - started)
                # Those changes are still in no checkpoint. (Step counting starts over, so
                # a disk that stays full is tried again after as many steps, not at once.)
                self._changes += changes
                if isinstance(error, OSError):
                    raise _write_error(self.store.directory, error) from error
                raise
        if self.observer is not None:
            self.observer.checkpoint_saved(time.monotonic() - started, path)
        models = state.get("models", []) if isinstance(state, dict) else []
        logger.info(
            "Checkpoint %s written (%s) in %.2f s: %s",
            path,
            reason,
            time.monotonic() - started,
            describe_models(models),
        )
        return path, len(models)

    async def _every(self, seconds: float) -> None:
        while True:
            await asyncio.sleep(seconds)
            if self._changes:
                await self._save_logged(f"every {seconds:g} s")

    def _maybe_save_for_steps(self) -> None:
        every = self.schedule.steps
        if not every or self._closed or self._steps < every:
            return
        if self._step_save is not None and not self._step_save.done():
            return  # the running save's successor is decided when it ends
        self._step_save = asyncio.ensure_future(self._save_logged(f"after {self._steps} updates"))
        self._step_save.add_done_callback(lambda _: self._maybe_save_for_steps())


def describe_models(models: list) -> str:
    """``"model 'a' at step 10"``-style summary of a server state's models, for the log."""
    if not models:
        return "no models"
    shown = [f"model {m['spec']['model_id']!r} at step {m['step']}" for m in models[:10]]
    more = f" and {len(models) - 10} more" if len(models) > 10 else ""
    return ", ".join(shown) + more


def _free_bytes(directory: pathlib.Path) -> int | None:
    try:
        return shutil.disk_usage(directory).free
    except OSError:
        return None


def _write_error(directory: pathlib.Path, error: OSError) -> OptserveError:
    what = f"Could not write a checkpoint into {directory}: {error.strerror or error}"
    if error.errno in (errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC)):
        free = _free_bytes(directory)
        room = f" ({free} bytes free)" if free is not None else ""
        return ResourceExhaustedError(
            f"{what}{room}. Free space there, lower --checkpoint-keep (each kept "
            "checkpoint holds every model's variables and slots), or point "
            "--checkpoint-dir at a larger disk; the previous "
            "checkpoints are intact."
        )
    return OptserveError(f"{what}. The previous checkpoints are intact.")


def _retrieve_exception(task: asyncio.Task) -> None:
    if not task.cancelled():
        task.exception()
