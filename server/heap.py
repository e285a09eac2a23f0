"""Giving freed heap memory back to the system after refused requests (glibc).

The server keeps freed blocks for reuse (``app.keep_freed_memory_for_reuse``), the
right trade for accepted requests; a refused one must leave the resident size where
it was, so the servicer has a :class:`RefusalTrimmer` trim the heap after refusals.
"""

from __future__ import annotations

import asyncio
import ctypes
import gc


def _malloc_trim():
    try:
        libc = ctypes.CDLL("libc.so.6")
        return libc.malloc_trim
    except (OSError, AttributeError):
        return None


_MALLOC_TRIM = _malloc_trim()


def give_back_freed_memory() -> bool:
    """Return freed heap memory to the system (glibc); after a large request was refused.

    The server keeps freed blocks for reuse (``keep_freed_memory_for_reuse``), the right
    trade for accepted requests; a refused one must leave the resident size where it was.
    """
    # gRPC's per-call objects form reference cycles that may hold the last request message.
    gc.collect()
    if _MALLOC_TRIM is None:
        return False
    return bool(_MALLOC_TRIM(0))


class _MallInfo2(ctypes.Structure):
    _fields_ = [
        (name, ctypes.c_size_t)
        for name in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks")
    ]


def _mallinfo2():
    try:
        function = ctypes.CDLL("libc.so.6").mallinfo2  # glibc 2.33+
    except (OSError, AttributeError):
        return None
    function.restype = _MallInfo2
    return function


_MALLINFO2 = _mallinfo2()
# Less than this free in the heap is not worth a trim's ~20 ms of the event loop.
TRIM_MIN_FREE_BYTES = 4 << 20


def freed_heap_bytes() -> int | None:
    """Bytes freed in the heap and not yet given back (glibc), or None where unknown."""
    return int(_MALLINFO2().fordblks) if _MALLINFO2 is not None else None


class RefusalTrimmer:
    """Gives freed memory back after refused uploads, once their memory really is free.

    A refused call's request bytes (gRPC's buffers, the parsed message, the decoded
    config text) are freed only after the call ended, and gRPC releases some of a
    call's buffers up to a second later still: one trim right after the refusal
    misses them (measured: 40 refused 7.5 MiB configs left +90 MiB). So the trim
    waits until no refused call has ended for ``settle_s`` (during a long burst it
    runs at least every ``max_wait_s``), and is followed by ``follow_ups`` more,
    ``follow_up_s`` apart, each only where the heap holds freed memory worth it.
    A trim (a full garbage collection, then malloc_trim) takes ~20 ms of the event loop.
    """

    def __init__(
        self,
        settle_s: float = 0.3,
        max_wait_s: float = 2.0,
        follow_ups: int = 3,
        follow_up_s: float = 1.0,
        trim=give_back_freed_memory,
        freed=freed_heap_bytes,
    ):
        self.settle_s, self.max_wait_s = settle_s, max_wait_s
        self.follow_ups, self.follow_up_s = follow_ups, follow_up_s
        self._trim, self._freed = trim, freed
        self._handle: asyncio.TimerHandle | None = None
        self._burst_started: float | None = None
        self.trims = 0

    def after(self, context) -> None:
        """Trim once the refused call of ``context`` (a grpc.aio servicer context) has ended."""
        loop = asyncio.get_running_loop()

        def ended(_context=None) -> None:
            loop.call_soon_threadsafe(self.call_ended)

        try:
            context.add_done_callback(ended)
        except (AttributeError, NotImplementedError, RuntimeError):  # a context without callbacks
            self.call_ended()

    def call_ended(self) -> None:
        loop = asyncio.get_running_loop()
        now = loop.time()
        if self._burst_started is None:
            self._burst_started = now
        due = min(now + self.settle_s, self._burst_started + self.max_wait_s)
        self._schedule(max(due, now), self.follow_ups, force=True)

    def _schedule(self, when: float, follow_ups: int, force: bool) -> None:
        if self._handle is not None:
            self._handle.cancel()
        self._handle = asyncio.get_running_loop().call_at(when, self._run, follow_ups, force)

    def _run(self, follow_ups: int, force: bool) -> None:
        self._handle = None
        self._burst_started = None
        freed = None if force else self._freed()
        if force or freed is None or freed >= TRIM_MIN_FREE_BYTES:
            self.trims += 1
            self._trim()
        if follow_ups > 0:
            self._schedule(asyncio.get_running_loop().time() + self.follow_up_s, follow_ups - 1, force=False)
