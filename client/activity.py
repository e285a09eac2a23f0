"""A model's creator and last activity as ListModels reports them (``ModelInfo.activity``)."""

from __future__ import annotations

import dataclasses
import datetime

from optserve.protos import optserve_pb2 as pb


@dataclasses.dataclass
class ModelActivity:
    created_unix_s: float  # wall clock of the server, seconds since the Unix epoch
    creator_worker: int | None  # None: the creating client did not say
    creator_peer: str  # e.g. "ipv4:10.0.0.5:41236"; "" when unknown
    last_activity_unix_s: float  # last push, pull, get/set of weights, create or join
    last_activity: str  # "push", "pull", "get_weights", "set_weights", "create", "join"
    last_worker: int | None  # the worker of the last call, when it said
    calls_in_flight: int  # calls on the model running now (parked workers included)
    idle_s: float  # seconds since the last call ended; 0 while in use

    @property
    def in_use(self) -> bool:
        return self.calls_in_flight > 0

    def describe_last(self) -> str:
        """``"push by worker 1, 3 s ago"``, or ``"in use (2 calls in flight; last: push by worker 1)"``."""
        what = self.last_activity + (f" by worker {self.last_worker}" if self.last_worker is not None else "")
        if self.in_use:
            calls = f"{self.calls_in_flight} call{'s' if self.calls_in_flight != 1 else ''} in flight"
            return f"in use ({calls}; last: {what})"
        return f"{what}, {format_age(self.idle_s)} ago"

    def describe_creator(self) -> str:
        """``"worker 0 (ipv4:127.0.0.1:5000) at 2026-12-01 21:58:03 UTC"``."""
        who = f"worker {self.creator_worker}" if self.creator_worker is not None else "a client"
        if self.creator_peer:
            who += f" ({self.creator_peer})"
        return f"{who} at {format_time(self.created_unix_s)}"


def activity_from_message(message: pb.ModelInfo) -> ModelActivity | None:
    """None for a server that does not report activity."""
    if not message.HasField("activity"):
        return None
    a = message.activity
    return ModelActivity(
        created_unix_s=float(a.created_unix_s),
        creator_worker=int(a.creator_worker) if a.HasField("creator_worker") else None,
        creator_peer=a.creator_peer,
        last_activity_unix_s=float(a.last_activity_unix_s),
        last_activity=a.last_activity,
        last_worker=int(a.last_worker) if a.HasField("last_worker") else None,
        calls_in_flight=int(a.calls_in_flight),
        idle_s=float(a.idle_s),
    )


def format_age(seconds: float) -> str:
    """``"42 s"``, ``"5 min"``, ``"3.2 h"``, ``"2.0 d"``."""
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.0f} min"
    if seconds < 172800:
        return f"{seconds / 3600:.1f} h"
    return f"{seconds / 86400:.1f} d"


def format_time(unix_s: float) -> str:
    return datetime.datetime.fromtimestamp(unix_s, datetime.timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")
