"""The values the client API takes and returns, free of gRPC and protobuf.

A :class:`~optserve.client.transport.Transport` speaks in these types, so that
``Client`` and ``ShardedClient`` never touch a wire message.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

__all__ = ["ModelInfo", "ModelSpec", "OptimizerState", "OptimizerWeights", "StepResult", "VariableInfo"]


@dataclasses.dataclass(frozen=True)
class ModelSpec:
    """What ``create_model`` asks for, checked already (see ``optserve.client.base``)."""

    model_id: str
    optimizer_config_json: str
    num_workers: int = 1
    mode: str = "sync"  # "sync" | "async"
    sync_timeout_s: float = 0.0
    timeout_policy: str = "fail"  # "fail" | "apply_partial"


@dataclasses.dataclass
class StepResult:
    step: int  # the model's step after the update: the next step to push
    iterations: int
    learning_rate: float  # the rate the next update uses
    duplicate: bool = False  # the push had been counted already and was not applied again
    contributors: list[int] = dataclasses.field(default_factory=list)
    missing_workers: list[int] = dataclasses.field(default_factory=list)  # left out under APPLY_PARTIAL


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


@dataclasses.dataclass
class OptimizerState:
    iterations: int
    raw_iterations: int
    learning_rate: float
    step: int
    scalars: dict[str, float] = dataclasses.field(default_factory=dict)


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
