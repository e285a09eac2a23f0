"""The step protocol's bookkeeping: one synchronous step's merge buffer and the steps remembered.

``PendingStep`` sums the pushes of one synchronous step; ``StepRecord`` is what a
completed step leaves behind (who contributed), so a retried push is answered as a
duplicate; ``RecentSteps`` does the same per worker in async mode.
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
from collections.abc import Iterable, Mapping

import numpy as np

# Completed steps (sync) or pushed steps per worker (async) remembered to
# recognise a retried push. A client retries within seconds, so a few
# thousand steps of memory is generous while staying a few hundred KiB.
REMEMBERED_STEPS = 4096


@dataclasses.dataclass(frozen=True)
class StepRecord:
    contributors: tuple[int, ...]
    missing: tuple[int, ...]
    aggregated: bool

    def covers(self, worker: int) -> bool:
        # An aggregated push carries every worker's gradients: the step is done for all of them.
        return self.aggregated or worker in self.contributors


class PendingStep:
    """The merge buffer of one synchronous step."""

    def __init__(self, step: int, loop: asyncio.AbstractEventLoop):
        self.step = step
        self.contributors: list[int] = []
        self.sums: dict[str, np.ndarray] = {}
        self.return_variables = False
        # Where each contributor's reply goes: its shared-memory value region, written once the step
        # is applied; a waiter without one needs a snapshot of the variables.
        self.reply_regions: dict[int, Mapping[str, np.ndarray]] = {}
        self.needs_snapshot = False
        self.hold = False  # hold for the joint norm (optserve.server.two_phase)
        self.future: asyncio.Future = loop.create_future()
        # Waiters may all have hung up; the result must not warn as "never retrieved".
        self.future.add_done_callback(_retrieve)
        self.timer: asyncio.TimerHandle | None = None

    def accumulate(self, gradients: Mapping[str, np.ndarray], add_many) -> None:
        """Sum a validated push into the step (runs on an executor thread).

        The first push's decoded arrays become the step's accumulators: they are
        fresh, owned copies already, so adopting them saves an allocation and a
        copy per variable, and later pushes add into them in place, by
        ``add_many([(total, gradient), ...])`` (the engine's ``add_host_arrays``).
        """
        additions = []
        for name, gradient in gradients.items():
            total = self.sums.get(name)
            if total is None:
                self.sums[name] = gradient
            else:
                additions.append((total, gradient))
        add_many(additions)

    def add_reply_region(self, worker: int, region: Mapping[str, np.ndarray] | None) -> None:
        """``worker`` wants the step's variables, in ``region`` (None: in a snapshot)."""
        if region is None or self.reply_regions.get(worker, region) is not region:
            self.needs_snapshot = True
        if region is not None:
            self.reply_regions[worker] = region

    def missing(self, num_workers: int) -> tuple[int, ...]:
        return tuple(w for w in range(num_workers) if w not in self.contributors)

    def cancel_timer(self) -> None:
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None

    def fail(self, error: BaseException) -> None:
        self.cancel_timer()
        if not self.future.done():
            self.future.set_exception(error)


def _retrieve(future: asyncio.Future) -> None:
    if not future.cancelled():
        future.exception()


def done_future(value) -> asyncio.Future:
    future = asyncio.get_running_loop().create_future()
    future.set_result(value)
    return future


class RecentSteps:
    """A bounded set of the steps one worker pushed (async mode duplicate detection)."""

    def __init__(self, size: int = REMEMBERED_STEPS):
        self._order: collections.deque[int] = collections.deque()
        self._steps: set[int] = set()
        self._size = size

    def __contains__(self, step: int) -> bool:
        return step in self._steps

    def add(self, step: int) -> None:
        self._order.append(step)
        self._steps.add(step)
        if len(self._order) > self._size:
            self._steps.discard(self._order.popleft())

    def steps(self) -> list[int]:
        """Oldest first, as ``add`` received them."""
        return list(self._order)

    @classmethod
    def of(cls, steps: Iterable[int]) -> RecentSteps:
        recent = cls()
        for step in steps:
            recent.add(int(step))
        return recent
