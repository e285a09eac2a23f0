"""What a model reports as it works, beyond its state.

:class:`ModelEvents` are the model's hooks for the metrics (``optserve.server.metrics``
replaces the no-op default). :class:`ModelActivity` is what a live view shows:
push counts and times, always on and cheap (a count and a sum of seconds per
push), and the norm of each update, measured only while someone watches (``ListModels`` with
``track_updates``, renewed by each refresh of ``optserve inspect --watch``): it
needs a copy of the variables before each update, about as much memory traffic as
the update itself, so it stops ``TRACK_UPDATES_S`` seconds after the last request.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Mapping

import numpy as np

TRACK_UPDATES_S = 60.0


class ModelActivity:
    def __init__(self):
        self.pushes = 0
        self.push_seconds = 0.0
        self.update_norm: float | None = None  # of the last update applied while tracked
        self._track_until = 0.0

    def pushed(self, seconds: float) -> None:
        self.pushes += 1
        self.push_seconds += seconds

    def track_updates(self) -> None:
        self._track_until = time.monotonic() + TRACK_UPDATES_S

    @property
    def tracking(self) -> bool:
        return time.monotonic() < self._track_until


def update_norm(before: Mapping[str, np.ndarray], after: Mapping[str, np.ndarray]) -> float:
    """L2 norm of the change of all variables together, in float64."""
    total = 0.0
    for name, old in before.items():
        change = after[name].astype(np.float64) - old
        total += float(np.dot(change.reshape(-1), change.reshape(-1)))
    return float(np.sqrt(total))


class ModelEvents:
    """What a model reports as it works; these do nothing (``optserve.server.metrics`` counts them).
    Called on the event loop thread."""

    def pushed(self, payload_bytes: int, duplicate: bool) -> None: ...
    def received(self, payload_bytes: int) -> None: ...
    def sent(self, payload_bytes: int) -> None: ...
    def applied(self, seconds: float, partial: bool) -> None: ...
    def waited(self, seconds: float) -> None: ...
    def timed_out(self) -> None: ...


def nbytes(arrays: Iterable[np.ndarray]) -> int:
    return sum(int(a.nbytes) for a in arrays)
