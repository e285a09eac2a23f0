"""Running a coroutine at once, in the caller's turn of the event loop, instead of as a task.

A task starts in a later turn of the loop, and each turn costs a poll of the
selector and a pass over the ready callbacks: tens of microseconds, which is
the whole cost of a small model's push. Most of those coroutines never wait
(their work runs inline), so they can run to their end right away; one that
does wait is handed to a task from where it waits, and goes on exactly as a
task would have run it.
"""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Coroutine
from typing import Any

_NOT_DONE = object()


def start(coroutine: Coroutine) -> tuple[Any, Any]:
    """Run ``coroutine`` until it first waits: ``(result, None)`` if it ran to its end, else
    ``(_NOT_DONE, what it waits for)`` to hand to :func:`resume`. Its exceptions propagate."""
    try:
        waiting_for = coroutine.send(None)
    except StopIteration as finished:
        return finished.value, None
    return _NOT_DONE, waiting_for


def finished(result: Any) -> bool:
    return result is not _NOT_DONE


async def resume(coroutine: Coroutine, waiting_for: Any) -> Any:
    """Drive a coroutine that :func:`start` left waiting to its end, as its task would.

    ``waiting_for`` is what it yielded: the future it awaits, or None (a bare yield). It is sent
    on once that future is done, and reads the future's outcome itself; a cancellation of this
    coroutine is passed on to it, as a task passes one on."""
    while True:
        try:
            if waiting_for is None:
                await asyncio.sleep(0)
            else:
                waiting_for._asyncio_future_blocking = False
                await asyncio.wait([waiting_for])
        except asyncio.CancelledError as cancelled:
            if waiting_for is not None:
                waiting_for.cancel()
            step = functools.partial(coroutine.throw, cancelled)
        else:
            step = functools.partial(coroutine.send, None)
        try:
            waiting_for = step()
        except StopIteration as done:
            return done.value


def run(coroutine: Coroutine) -> asyncio.Future:
    """``coroutine``'s outcome as a future: done already when it never waited, else a task's."""
    try:
        result, waiting_for = start(coroutine)
    except Exception as error:  # noqa: BLE001 - its failure is the future's
        failed = asyncio.get_running_loop().create_future()
        failed.set_exception(error)
        return failed
    if not finished(result):
        return asyncio.ensure_future(resume(coroutine, waiting_for))
    done = asyncio.get_running_loop().create_future()
    done.set_result(result)
    return done
