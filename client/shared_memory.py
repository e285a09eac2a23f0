"""The client's side of shared memory with a server on the same host (``optserve.server.shared_memory``).

For each (model, worker) the transport asks the server for a session
(``OpenSharedMemory``), opens the segment file the server names, and checks
that it starts with the nonce the server sent: only a process sharing the
server's ``/dev/shm`` (the same host, the same IPC namespace) and its user
(the file is 0600) can. It then maps the segment and deletes its name at once,
so that nothing is left behind whoever dies first. Pushes write the gradients
into the segment and send only the header over gRPC; the new values are read
back from it.

Anything that does not work out (an older server, shared memory disabled on
either side, another host, no room) leaves that transport on gRPC; nothing
fails because of it. ``OPTSERVE_SHARED_MEMORY=0`` turns it off for a process.
"""

from __future__ import annotations

import logging
import math
import mmap
import os
import sys
import threading
from collections.abc import Sequence
from typing import Any

import numpy as np

from optserve.protos import optserve_pb2 as pb
from optserve.protos import tensors
from optserve.protos.buffers import ArrayPool, copy_in_parallel

log = logging.getLogger("optserve.client")

ENVIRONMENT_SWITCH = "OPTSERVE_SHARED_MEMORY"


def switched_on(variable: str) -> bool:
    """An on-by-default switch of the environment: off only when ``variable`` says 0, false, no or off."""
    return os.environ.get(variable, "1").strip().lower() not in ("0", "false", "no", "off")


def enabled_by_default() -> bool:
    return switched_on(ENVIRONMENT_SWITCH)


class SharedSegment:
    """One mapped session: views of its gradient and value regions, used by one push at a time.

    A push's new values are handed out as arrays in one of the segment's two value regions, not
    copied: the next push has its values written into a region none of whose arrays the caller
    still holds (each region's arrays are views of a memoryview of their own, whose reference
    count says whether any is alive). A caller holding the arrays of both gets the values written
    into the gradient region instead, copied out into arrays it owns. A server from before the
    second region gets one region, copied out.
    """

    def __init__(self, response: pb.OpenSharedMemoryResponse, arrays: ArrayPool | None = None):
        self.session_id = response.session_id
        self._arrays = arrays if arrays is not None else ArrayPool()
        self.lock = threading.Lock()
        self.buffer = _map_verified(response.path, response.size, response.nonce)
        self.gradients: dict[str, np.ndarray] = {}
        self.values: dict[str, np.ndarray] = {}
        for tensor in response.tensors:
            dtype = tensors.dtype_from_proto(tensor.dtype)
            shape = tuple(int(d) for d in tensor.shape)
            count = math.prod(shape)
            self.gradients[tensor.name] = _view(self.buffer, dtype, shape, count, tensor.gradient_offset)
            self.values[tensor.name] = _view(self.buffer, dtype, shape, count, tensor.value_offset)
        two_regions = bool(response.tensors) and all(t.second_value_offset for t in response.tensors)
        # Regions handed out (0 and 1: value_offset, second_value_offset): each a memoryview of the
        # region's bytes and the variables' arrays in it, which are never given out themselves.
        self._regions = (
            [_Region(self.buffer, response.tensors, offset) for offset in ("value_offset", "second_value_offset")]
            if two_regions
            else []
        )
        self.region = 0  # the region the next push's values go into (shared_memory_values_region)

    def fits(self, gradients: Sequence[tuple[str, str, Any]]) -> bool:
        """Whether every gradient is a dense array of its variable's shape and dtype (else the push
        goes over gRPC, where the server words the error)."""
        for name, slot, array in gradients:
            target = self.gradients.get(name)
            if (
                slot
                or target is None
                or not isinstance(array, np.ndarray)
                or array.shape != target.shape
                or array.dtype != target.dtype
            ):
                return False
        return True

    def write_gradients(self, gradients: list[tuple[str, str, np.ndarray]]) -> list[str]:
        """Write a push's gradients, and choose where its values go (``region``)."""
        copy_in_parallel([(self.gradients[name], np.ascontiguousarray(array)) for name, _, array in gradients])
        free = [index for index, region in enumerate(self._regions) if region.free()]
        self.region = free[0] if free else (GRADIENT_REGION if self._regions else 0)
        return [name for name, _, _ in gradients]

    def read_values(self) -> dict[str, np.ndarray]:
        """The new values: arrays in a value region, the caller's until it drops them; else (a
        region still held, an older server) copied out into arrays from a pool."""
        if self._regions and self.region != GRADIENT_REGION:
            return self._regions[self.region].hand_out()
        written = self.gradients if self.region == GRADIENT_REGION else self.values
        values = {
            name: self._arrays.empty((self.session_id, name), view.shape, view.dtype) for name, view in written.items()
        }
        copy_in_parallel([(values[name], view) for name, view in written.items()])
        return values


GRADIENT_REGION = 2  # shared_memory_values_region of the segment's gradient region


class _Region:
    """One value region: its arrays, and whether the caller still holds any handed out."""

    def __init__(self, buffer: mmap.mmap, tensors_of: Sequence[pb.SharedTensor], field: str):
        starts = [getattr(t, field) for t in tensors_of]
        ends = [getattr(t, field) + math.prod(t.shape) * tensors.dtype_from_proto(t.dtype).itemsize for t in tensors_of]
        low = min(starts)
        # The region's bytes: every array of the region, and every view of one, refers to it.
        self._owner = np.frombuffer(memoryview(buffer)[low : max(ends)], dtype=np.uint8)
        self._arrays = {
            tensor.name: self._owner[start - low : end - low]
            .view(tensors.dtype_from_proto(tensor.dtype))
            .reshape(tuple(int(d) for d in tensor.shape))
            for tensor, start, end in zip(tensors_of, starts, ends, strict=True)
        }
        self._idle = sys.getrefcount(self._owner)  # what the region's own arrays count

    def free(self) -> bool:
        return sys.getrefcount(self._owner) == self._idle

    def hand_out(self) -> dict[str, np.ndarray]:
        return {name: array.view() for name, array in self._arrays.items()}


class SegmentUnusable(Exception):
    """The segment the server named cannot be used from here (another host, another user, ...)."""


def _map_verified(path: str, size: int, nonce: bytes) -> mmap.mmap:
    try:
        fd = os.open(path, os.O_RDWR)
    except OSError as error:
        raise SegmentUnusable(f"cannot open {path} ({error.strerror})") from None
    try:
        if os.fstat(fd).st_size != size:
            raise SegmentUnusable(f"{path} is not the server's segment (size)")
        buffer = mmap.mmap(fd, size)
    finally:
        os.close(fd)
    if bytes(buffer[: len(nonce)]) != nonce or not nonce:
        buffer.close()
        raise SegmentUnusable(f"{path} is not the server's segment (nonce)")
    try:
        os.unlink(path)  # mapped by both sides now: the name is no longer needed
    except OSError:
        pass
    return buffer


def _view(buffer: mmap.mmap, dtype: np.dtype, shape: tuple, count: int, offset: int) -> np.ndarray:
    return np.frombuffer(buffer, dtype=dtype, count=count, offset=offset).reshape(shape)


class SharedMemorySessions:
    """A transport's segments by (model, worker), and whether its server offers shared memory at all."""

    what = "shared memory"

    def __init__(self, open_session):
        self._open_session = open_session  # (model_id, worker_index) -> pb.OpenSharedMemoryResponse
        self._segments: dict[tuple[str, int], SharedSegment] = {}
        self._arrays = ArrayPool()  # every segment's copies of the values, by (session, name)
        self._guard = threading.Lock()
        self.available = True

    def segment(self, model_id: str, worker: int, **options: Any) -> Any:
        """The segment for pushes of (model, worker), opened on first use (``options`` go to the
        session's opening); None: push over gRPC."""
        if not self.available:
            return None
        key = (model_id, worker)
        with self._guard:
            segment = self._segments.get(key)
        if segment is not None and self._suits(segment, **options):
            return segment
        if segment is not None:
            self.discard(model_id, worker, segment)  # a session of another kind replaces it
        try:
            segment = self._attach(self._open_session(model_id, worker, **options))
        except SegmentUnusable as reason:
            log.info("%s with the server is not possible (%s); pushes use gRPC", self.what, reason)
            self.available = False
            return None
        except Exception as error:  # noqa: BLE001 - an older server, disabled, no room: gRPC does the job
            code = getattr(error, "code", "")
            if code in ("UNIMPLEMENTED", "FAILED_PRECONDITION", "PERMISSION_DENIED"):
                log.info("the server offers no %s (%s); pushes use gRPC", self.what, error)
                self.available = False
            else:
                log.debug("%s for model %r not opened (%s); this push uses gRPC", self.what, model_id, error)
            return None
        with self._guard:
            self._segments[key] = segment
        return segment

    def _attach(self, response: Any) -> Any:
        """The usable session of the server's answer; SegmentUnusable if it cannot be used from here."""
        return SharedSegment(response, self._arrays)

    def _suits(self, segment: Any, **options: Any) -> bool:
        """Whether an open ``segment`` serves a push that asks for ``options``."""
        return True

    def _closed(self, segment: Any) -> None:
        """``segment`` will not be used again."""

    def discard(self, model_id: str, worker: int, segment: Any) -> None:
        """Never use ``segment`` again (the server may still read from it); the next push opens a new one."""
        with self._guard:
            if self._segments.get((model_id, worker)) is segment:
                del self._segments[(model_id, worker)]
        self._closed(segment)
        self._arrays.forget(lambda key: key[0] == segment.session_id)

    def forget_model(self, model_id: str) -> None:
        with self._guard:
            for key in [k for k in self._segments if k[0] == model_id]:
                segment = self._segments.pop(key)
                self._closed(segment)
                self._arrays.forget(lambda pooled, session=segment.session_id: pooled[0] == session)

    def close(self) -> None:
        with self._guard:
            segments = list(self._segments.values())
            self._segments.clear()
        for segment in segments:
            self._closed(segment)
        self._arrays.clear()
