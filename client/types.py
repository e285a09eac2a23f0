"""The values the client API takes and returns, free of gRPC and protobuf.

A :class:`~optserve.client.transport.Transport` speaks in these types, so that
``Client`` and ``ShardedClient`` never touch a wire message.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

__all__ = [
    "ModelInfo",
    "ModelSpec",
    "OptimizerState",
    "OptimizerWeights",
    "ServerGeneration",
    "StepResult",
    "VariableInfo",
]


@dataclasses.dataclass(frozen=True)
class ServerGeneration:
    """Which run of the server(s) answered (see ``ServerGeneration`` in optserve.proto).

    ``server_id`` is new at every server start; ``restored_checkpoint`` names the
    checkpoint that start restored ("" when none). A sharded client's results
    carry the shards' generations joined by commas, in shard order.
    """

    server_id: str
    restored_checkpoint: str = ""

    @classmethod
    def combine(cls, generations: list[ServerGeneration | None]) -> ServerGeneration | None:
        """One generation for several servers: it changes when any of theirs does."""
        if not generations or any(g is None for g in generations):
            return None
        known = [g for g in generations if g is not None]
        if len(known) == 1:
            return known[0]
        return cls(",".join(g.server_id for g in known), ",".join(g.restored_checkpoint for g in known))


@dataclasses.dataclass(frozen=True)
class ModelSpec:
    """What ``create_model`` asks for, checked already (see ``optserve.client.base``)."""

    model_id: str
    optimizer_config_json: str
    num_workers: int = 1
    mode: str = "sync"  # "sync" | "async"
    sync_timeout_s: float = 0.0
    timeout_policy: str = "fail"  # "fail" | "apply_partial"
    # "reject" | "skip_step" | "allow": a push holding NaN or inf. None: the server's default
    # (reject; allow for a LossScaleOptimizer, which skips such steps itself).
    non_finite_policy: str | None = None


@dataclasses.dataclass
class StepResult:
    step: int  # the model's step after the update: the next step to push
    iterations: int
    learning_rate: float  # the rate the next update uses
    duplicate: bool = False  # the push had been counted already and was not applied again
    contributors: list[int] = dataclasses.field(default_factory=list)
    missing_workers: list[int] = dataclasses.field(default_factory=list)  # left out under APPLY_PARTIAL
    generation: ServerGeneration | None = None  # None: the server does not say
    # Under the non-finite policy "skip_step": the step was taken without an update, because of these.
    skipped_non_finite: bool = False
    non_finite_variables: list[str] = dataclasses.field(default_factory=list)
    # The optimizer-wide scalars after the update (e.g. a LossScaleOptimizer's dynamic_scale); {}: not sent.
    scalars: dict[str, float] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass
class VariableInfo:
    name: str
    shape: tuple[int, ...]
    dtype: str
    slots: list[str]
    norm: float | None = None  # L2 norm, when asked for (``with_stats=True``)


@dataclasses.dataclass
class ModelInfo:
    model_id: str
    created: bool | None  # from create_model: False when an identical model was joined
    step: int
    iterations: int
    learning_rate: float
    num_workers: int
    mode: str  # "sync" | "async"
    variables: list[VariableInfo]
    optimizer: str = ""  # optimizer class name, e.g. "Adam"
    optimizer_config: Any = None
    raw_iterations: int = 0
    scalars: dict[str, float] = dataclasses.field(default_factory=dict)
    sync_timeout_s: float = 0.0
    timeout_policy: str = "fail"
    waiting_workers: list[int] = dataclasses.field(default_factory=list)
    generation: ServerGeneration | None = None
    # Creator and last activity (optserve.client.activity.ModelActivity); None from servers that do not say.
    activity: Any = None
    learning_rate_schedule: dict | None = None  # the serialized schedule the rate follows; None: a float rate


@dataclasses.dataclass
class OptimizerState:
    iterations: int
    raw_iterations: int
    learning_rate: float
    step: int
    scalars: dict[str, float] = dataclasses.field(default_factory=dict)
    generation: ServerGeneration | None = None  # in replies only
    learning_rate_schedule: dict | None = None  # the serialized schedule the rate follows; None: a float rate


@dataclasses.dataclass
class OptimizerWeights(OptimizerState):
    slots: dict[str, dict[str, np.ndarray]] = dataclasses.field(default_factory=dict)
    variables: dict[str, np.ndarray] = dataclasses.field(default_factory=dict)

    def slot_list(self) -> list[np.ndarray]:
        """Slots in Keras order, variable by variable."""
        return [array for per_var in self.slots.values() for array in per_var.values()]

    def as_list(self) -> list[np.ndarray]:
        """tf.keras ``get_weights()`` layout: ``[iterations, *slots]``."""
        return [np.array(self.iterations, dtype=np.int64), *self.slot_list()]
