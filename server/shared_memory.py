"""Shared memory for workers on the server's host: segments, sessions and their cleanup.

A session belongs to one (model, worker). Its segment is one file in the
shared-memory directory (``/dev/shm``), created with a random name and mode
0600, laid out as::

    [nonce: NONCE_BYTES][pad to a page][gradients of every variable][values of every variable]

each tensor aligned to ``ALIGNMENT`` bytes. The worker writes its gradients
into the gradient region and names the session in an ordinary push
(``ApplyGradientsHeader.shared_memory_session``); the server applies straight
from views of that region and writes the new values into the value region.
Control (steps, sync aggregation, errors, auth) stays on gRPC.

Nothing is left behind when either side dies: the client deletes the name as
soon as it has mapped the segment (the mappings stay valid), the server deletes
it on the session's first push and after ``UNCLAIMED_TTL_S`` if no push comes,
and a server starting sweeps the names of servers that died before either could
(``sweep_stale``). The memory itself goes when the last mapping goes.

One worker never sees another's memory: each session has its own segment,
whose name and id are random and told only to the caller that opened it (an RPC
through the same authentication as every other), and a push naming a session
must name the session's model and worker.
"""

from __future__ import annotations

import asyncio
import logging
import math
import mmap
import os
import re
import secrets
from collections.abc import Iterable
from typing import Any

import numpy as np

from optserve.server.errors import FailedPreconditionError, InvalidArgumentError
from optserve.server.limits import Reservation
from optserve.server.worker_sessions import WorkerSessions

log = logging.getLogger(__name__)

DEFAULT_DIRECTORY = "/dev/shm"
NAME_PREFIX = "optserve-"
NONCE_BYTES = 16
HEADER_BYTES = 4096
ALIGNMENT = 64
UNCLAIMED_TTL_S = 30.0
_NAME_PATTERN = re.compile(rf"^{re.escape(NAME_PREFIX)}(\d+)-[0-9a-f]+$")


def _aligned(offset: int) -> int:
    return -(-offset // ALIGNMENT) * ALIGNMENT


VALUE_REGIONS = 3  # shared_memory_values_region: the two value regions, then the gradient region


class Layout:
    """Where each variable's gradient and its two values live in a segment: a region of every
    gradient, then two regions of every value."""

    def __init__(self, variables: Iterable[tuple[str, np.dtype, tuple[int, ...]]]):
        specs = [(name, np.dtype(dtype), tuple(shape)) for name, dtype, shape in variables]
        offset = HEADER_BYTES
        regions = []
        for _ in range(3):
            offsets = []
            for _, dtype, shape in specs:
                offsets.append(offset)
                offset = _aligned(offset + math.prod(shape) * dtype.itemsize)
            regions.append(offsets)
        # (name, dtype, shape, gradient offset, value offset, second value offset)
        self.entries: list[tuple[str, np.dtype, tuple[int, ...], int, int, int]] = [
            (name, dtype, shape, *offsets) for (name, dtype, shape), *offsets in zip(specs, *regions, strict=True)
        ]
        self.size = max(offset, HEADER_BYTES)


class Session:
    """One worker's segment, mapped by the server."""

    def __init__(self, directory: str, model, worker: int, layout: Layout, reservation: Any):
        self.id = secrets.token_hex(16)
        self.model = model
        self.model_id = model.model_id
        self.worker = worker
        self.layout = layout
        self.reservation = reservation
        self.nonce = secrets.token_bytes(NONCE_BYTES)
        self.path = os.path.join(directory, f"{NAME_PREFIX}{os.getpid()}-{secrets.token_hex(16)}")
        self.buffer = _create_segment(self.path, layout.size)
        self.buffer[:NONCE_BYTES] = self.nonce
        self.gradients: dict[str, np.ndarray] = {}
        self.values: dict[str, np.ndarray] = {}
        self.second_values: dict[str, np.ndarray] = {}
        for name, dtype, shape, gradient_offset, value_offset, second_value_offset in layout.entries:
            count = math.prod(shape)
            self.gradients[name] = _view(self.buffer, dtype, shape, count, gradient_offset)
            self.values[name] = _view(self.buffer, dtype, shape, count, value_offset)
            self.second_values[name] = _view(self.buffer, dtype, shape, count, second_value_offset)
        self.claimed = False
        self.expiry: asyncio.TimerHandle | None = None

    def unlink(self) -> None:
        """Delete the segment's name (the memory stays while mapped)."""
        try:
            os.unlink(self.path)
        except FileNotFoundError:
            pass  # the worker deleted it once it had mapped it
        except OSError as error:
            log.warning("could not delete shared memory segment %s: %s", self.path, error)

    def claim(self) -> None:
        """The first push: the worker has mapped the segment, its name is no longer needed."""
        if not self.claimed:
            self.claimed = True
            self.cancel_expiry()
            self.unlink()

    def cancel_expiry(self) -> None:
        if self.expiry is not None:
            self.expiry.cancel()
            self.expiry = None

    def close(self) -> None:
        """Forget the segment: its name goes now, its memory once every view of it is gone
        (a push still applying from it keeps it)."""
        self.cancel_expiry()
        self.unlink()
        self.reservation.release()
        self.gradients, self.values, self.second_values = {}, {}, {}

    def values_in(self, region: int) -> dict[str, np.ndarray]:
        """The arrays of ``shared_memory_values_region`` ``region``, which a push's values go into."""
        if not 0 <= region < VALUE_REGIONS:
            raise InvalidArgumentError(
                f"The push asks for its values in shared memory region {region}; a segment has regions 0 and 1 "
                "(its value regions) and 2 (its gradient region)."
            )
        return (self.values, self.second_values, self.gradients)[region]

    def gradients_for(self, names: Iterable[str]) -> dict[str, np.ndarray]:
        selected: dict[str, np.ndarray] = {}
        for name in names:
            if name not in self.gradients:
                raise InvalidArgumentError(
                    f"The push names gradient {name!r} in shared memory, but session {self.id[:8]}... of model "
                    f"{self.model_id!r} has no variable of that name; name only the model's variables."
                )
            if name in selected:
                raise InvalidArgumentError(f"The push names gradient {name!r} twice; name each variable once.")
            selected[name] = self.gradients[name]
        return selected

    def write_values(self, values: dict[str, np.ndarray], region: int = 0, copy_many=None) -> None:
        """Copy ``values`` into ``region`` (see values_in; ``copy_many``: a backend's parallel copy)."""
        targets = self.values_in(region)
        pairs = [(targets[name], value) for name, value in values.items()]
        if copy_many is None:
            for target, value in pairs:
                np.copyto(target, value)
        else:
            copy_many(pairs)


def _create_segment(path: str, size: int) -> mmap.mmap:
    """A new file of ``size`` bytes whose pages are all backed (no SIGBUS in a full /dev/shm), mapped."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        try:
            os.posix_fallocate(fd, 0, size)
        except OSError as error:
            os.unlink(path)
            raise FailedPreconditionError(
                f"The server's shared-memory directory has no room for {size} bytes ({error.strerror}); "
                "pushes use gRPC. Give the container more shared memory (docker --shm-size, a k8s "
                "emptyDir medium: Memory on /dev/shm; see deploy/README.md)."
            ) from None
        return mmap.mmap(fd, size)
    except BaseException:
        if os.path.exists(path):
            os.unlink(path)
        raise
    finally:
        os.close(fd)


def _view(buffer: mmap.mmap, dtype: np.dtype, shape: tuple, count: int, offset: int) -> np.ndarray:
    return np.frombuffer(buffer, dtype=dtype, count=count, offset=offset).reshape(shape)


def sweep_stale(directory: str) -> list[str]:
    """Delete segments left by servers that are no longer running (killed before their workers
    mapped them); returns the paths deleted."""
    deleted: list[str] = []
    try:
        names = os.listdir(directory)
    except OSError:
        return deleted
    for name in names:
        match = _NAME_PATTERN.match(name)
        if not match or _alive(int(match.group(1))):
            continue
        path = os.path.join(directory, name)
        try:
            if os.stat(path).st_uid != os.getuid():
                continue  # another user's server: not ours to judge
            os.unlink(path)
            deleted.append(path)
        except OSError:
            continue
    if deleted:
        log.info("deleted %d shared memory segment(s) of servers no longer running", len(deleted))
    return deleted


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class SharedMemorySessions(WorkerSessions):
    """Every session of the server, by id; one per (model, worker)."""

    what = "Shared memory session"

    def __init__(self, directory: str | None = DEFAULT_DIRECTORY, memory=None):
        super().__init__()
        self.directory = directory  # None: shared memory is off
        self.memory = memory  # the server's ByteBudget (segments count against --max-memory), or None
        if directory is not None:
            sweep_stale(directory)

    @property
    def enabled(self) -> bool:
        return self.directory is not None

    def open(self, model, worker: int) -> Session:
        if self.directory is None:
            raise FailedPreconditionError(
                "Shared memory is disabled on this server (--no-shared-memory); pushes use gRPC."
            )
        if not os.path.isdir(self.directory):
            raise FailedPreconditionError(
                f"The server has no shared-memory directory {self.directory!r}; pushes use gRPC."
            )
        self._make_room(model, worker)
        layout = Layout((v.name, v.dtype, v.shape) for v in model.spec.variables)
        reservation = Reservation(self.memory) if self.memory is not None else NoReservation()
        reservation.take(layout.size, what=f"Shared memory for model {model.model_id!r}")
        try:
            session = Session(self.directory, model, worker, layout, reservation)
        except BaseException:
            reservation.release()
            raise
        self._add(session)
        session.expiry = asyncio.get_running_loop().call_later(UNCLAIMED_TTL_S, self._expire, session)
        return session

    def get(self, session_id: str, model_id: str, worker: int) -> Session:
        session = self._known(session_id, model_id, worker)
        if session is None:
            raise FailedPreconditionError(
                "The push names a shared memory session this server does not know (it restarted, the model "
                "was deleted, or the worker opened a newer one); open a new one or push over gRPC.",
                details={"shared_memory": "unknown-session"},
            )
        return session

    def _expire(self, session: Session) -> None:
        """No push named the session in time (a worker on another host, or one that died): drop it."""
        session.expiry = None
        if not session.claimed and self._sessions.get(session.id) is session:
            self._forget(session)


class NoReservation:
    def take(self, nbytes: int, cap: int | None = None, what: str = "", force: bool = False) -> None:
        pass

    def release(self) -> None:
        pass
