"""Who created a model, when it was last used, and whether it is in use now.

``optserve inspect`` shows it, ``optserve delete`` refuses to delete a model in use
(unless forced), and ``--model-ttl`` deletes models idle for longer than the TTL.

A model is *in use* while any call on it is in flight (a stream being read, an
update being applied, a worker parked in a synchronous step waiting for the
others) or while a synchronous step holds pushes of workers that hung up (see
``Model.in_use_reason``). Its *idle time* runs from the end of its last call:
reads of the model's listing (ListModels, ``optserve inspect``) are not activity,
so watching a model never keeps it alive.

Times shown to people are wall-clock (``time.time()``); idle time is measured on
the monotonic clock, so a clock step never makes a model look idle. Loop thread only.
"""

from __future__ import annotations

import contextlib
import dataclasses
import time
from collections.abc import Iterator, Mapping
from typing import Any

# What a call on a model was, as shown by `optserve inspect`.
CREATE, JOIN, PUSH, PULL = "create", "join", "push", "pull"
GET_WEIGHTS, SET_WEIGHTS = "get_weights", "set_weights"


@dataclasses.dataclass
class ActivityRecord:
    created_unix_s: float
    creator_worker: int | None = None
    creator_peer: str = ""
    last_unix_s: float = 0.0
    last_kind: str = CREATE
    last_worker: int | None = None


@dataclasses.dataclass(frozen=True)
class ActivitySummary:
    """A consistent reading of a model's activity, for ListModels."""

    record: ActivityRecord
    calls_in_flight: int
    idle_s: float


class Activity:
    """The activity of one model; ``call()`` brackets every call on it."""

    def __init__(self, record: ActivityRecord | None = None):
        now = time.time()
        self.record = record if record is not None else ActivityRecord(created_unix_s=now, last_unix_s=now)
        self._calls = 0
        self._idle_since = time.monotonic()

    @classmethod
    def created_by(cls, worker: int | None, peer: str) -> Activity:
        activity = cls()
        activity.record.creator_worker = worker
        activity.record.creator_peer = peer
        return activity

    def note(self, kind: str, worker: int | None = None) -> None:
        """Record a call (or an event such as a join) as the model's last activity."""
        self.record.last_unix_s = time.time()
        self.record.last_kind = kind
        self.record.last_worker = worker
        self._idle_since = time.monotonic()

    @contextlib.contextmanager
    def call(self, kind: str, worker: int | None = None) -> Iterator[None]:
        """The model is in use for the duration; its idle time starts again when the call ends."""
        self._calls += 1
        self.note(kind, worker)
        try:
            yield
        finally:
            self._calls -= 1
            self._idle_since = time.monotonic()

    @property
    def calls_in_flight(self) -> int:
        return self._calls

    def idle_seconds(self) -> float:
        """Seconds since the last call ended; 0 while a call is in flight."""
        return 0.0 if self._calls else max(0.0, time.monotonic() - self._idle_since)

    def summary(self) -> ActivitySummary:
        return ActivitySummary(dataclasses.replace(self.record), self._calls, self.idle_seconds())

    # ---------------------------------------------------------- checkpoints

    def state(self) -> dict:
        return dataclasses.asdict(self.record)

    @classmethod
    def restored(cls, state: Mapping[str, Any] | None) -> Activity:
        """The activity saved in a checkpoint; its idle time starts at the restore, so a TTL
        gives the workers of a restarted server a full TTL to come back."""
        if not state:
            return cls()
        fields = {f.name for f in dataclasses.fields(ActivityRecord)}
        record = ActivityRecord(**{k: v for k, v in state.items() if k in fields})
        return cls(record)
