"""Arrays that are handed out again once nobody holds them: no fresh memory per round trip.

A fresh array costs a page fault per 4 KiB page the first time it is written
(on a VM, several microseconds each: ~10 ms for 40 MB, more than copying the
40 MB). Tensors received every round trip (a reply's new values, a server's
snapshot of its variables) therefore come from an :class:`ArrayPool`, which
keeps the arrays it made and gives one out again only when nothing refers to
it any more: every array it hands out is a view of a kept owner array, so the
owner's reference count tells whether the caller (or anything the caller
made from it: slices, views, memoryviews) still holds it. A held array is
never reused; a new one is made instead.
"""

from __future__ import annotations

import itertools
import sys
import threading
from collections.abc import Hashable, Sequence
from concurrent.futures import Executor, ThreadPoolExecutor

import numpy as np

DEFAULT_KEEP = 2  # per key: the caller holding the last result, and the one being filled
COPY_BLOCK_BYTES = 1 << 20  # bytes per block of a parallel copy
PARALLEL_COPY_BYTES = 4 << 20  # below this, one thread copies


class ArrayPool:
    """Reusable arrays by key (a tensor's identity: model, name, dtype, shape)."""

    def __init__(self, keep: int = DEFAULT_KEEP):
        self._keep = keep
        self._owners: dict[Hashable, list[np.ndarray]] = {}
        self._lock = threading.Lock()
        probe: list[np.ndarray] = [np.empty(0)]
        self._idle_references = self._references(probe, 0)  # what the pool's own holding counts

    @staticmethod
    def _references(owners: list[np.ndarray], index: int) -> int:
        return sys.getrefcount(owners[index])

    def empty(self, key: Hashable, shape: tuple[int, ...], dtype: np.dtype) -> np.ndarray:
        """An uninitialised, writable C-contiguous array of ``shape`` and ``dtype``, not held by anyone."""
        dtype = np.dtype(dtype)
        shape = tuple(int(d) for d in shape)
        with self._lock:
            owners = self._owners.setdefault(key, [])
            for index in range(len(owners)):  # by index: a loop variable would count as a holder
                if self._references(owners, index) == self._idle_references:
                    candidate = owners[index]
                    if candidate.shape == shape and candidate.dtype == dtype:
                        return candidate.view()
                    del candidate
            owner = np.empty(shape, dtype)
            if len(owners) < self._keep:
                owners.append(owner)
            return owner.view()

    def forget(self, predicate) -> None:
        """Drop the kept arrays of the keys ``predicate`` selects (a deleted model's)."""
        with self._lock:
            for key in [key for key in self._owners if predicate(key)]:
                del self._owners[key]

    def clear(self) -> None:
        with self._lock:
            self._owners.clear()

    def kept_bytes(self) -> int:
        with self._lock:
            return sum(owner.nbytes for owners in self._owners.values() for owner in owners)


def copy_arrays(pairs: Sequence[tuple[np.ndarray, np.ndarray]], pool: Executor | None, threads: int) -> None:
    """``np.copyto(dst, src)`` for each pair of C-contiguous arrays of one shape and dtype, in
    blocks shared by the calling thread and ``threads - 1`` of ``pool``'s: one core alone does not
    reach the memory's bandwidth (copies release the GIL)."""
    total = sum(dst.nbytes for dst, _ in pairs)
    if pool is None or threads < 2 or total < PARALLEL_COPY_BYTES:
        for dst, src in pairs:
            np.copyto(dst, src)
        return
    blocks = []
    for dst, src in pairs:
        flat_dst, flat_src = dst.reshape(-1).view(np.uint8), src.reshape(-1).view(np.uint8)
        blocks += [
            (flat_dst, flat_src, low, low + COPY_BLOCK_BYTES) for low in range(0, flat_dst.size, COPY_BLOCK_BYTES)
        ]
    next_blocks = itertools.count()

    def copy_blocks() -> None:
        for index in next_blocks:
            if index >= len(blocks):
                break
            dst, src, low, high = blocks[index]
            dst[low:high] = src[low:high]

    futures = [pool.submit(copy_blocks) for _ in range(min(threads, len(blocks)) - 1)]
    try:
        copy_blocks()
    finally:
        for future in futures:
            if not future.cancel():
                future.result()


_client_pool: ThreadPoolExecutor | None = None
_client_pool_lock = threading.Lock()


def copy_in_parallel(pairs: Sequence[tuple[np.ndarray, np.ndarray]]) -> None:
    """``copy_arrays`` with one helper thread of this process (started on first use)."""
    global _client_pool
    if sum(dst.nbytes for dst, _ in pairs) < PARALLEL_COPY_BYTES:
        copy_arrays(pairs, None, 1)
        return
    if _client_pool is None:
        with _client_pool_lock:
            if _client_pool is None:
                _client_pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="optserve-copy")
    copy_arrays(pairs, _client_pool, 2)
