"""The optimizer state a model reports (OptimizerStatus) and a SetWeights changes (StateUpdate),
checked as a whole and written to the engine all or nothing."""

from __future__ import annotations

import dataclasses
import math
from typing import Any

from optserve.server.errors import InvalidArgumentError, NotFoundError


@dataclasses.dataclass(frozen=True)
class OptimizerStatus:
    iterations: int
    raw_iterations: int
    learning_rate: float
    step: int
    scalars: dict
    schedule: dict | None = None  # the serialized schedule the rate follows; None for a float rate


@dataclasses.dataclass(frozen=True)
class StateUpdate:
    """What a SetWeights changes in the optimizer state; None (and empty scalars) keep the current value.

    ``iterations`` alone moves the raw counter by as much (its offset under gradient
    accumulation stays); ``raw_iterations`` alone sets ``iterations`` to raw // steps.
    ``schedule`` (a serialized Keras schedule) replaces the learning rate, float or schedule;
    ``learning_rate`` replaces a float rate, and on a schedule is accepted only as the
    schedule's own current value (what GetWeights reported), as Keras refuses to set it.
    """

    iterations: int | None = None
    raw_iterations: int | None = None
    step: int | None = None
    learning_rate: float | None = None
    schedule: dict | None = None
    scalars: dict = dataclasses.field(default_factory=dict)

    @classmethod
    def of(cls, state: OptimizerStatus | StateUpdate) -> StateUpdate:
        """Every field of an OptimizerStatus; a learning rate of 0 there keeps the current one."""
        if isinstance(state, StateUpdate):
            return state
        return cls(
            iterations=state.iterations,
            raw_iterations=state.raw_iterations,
            step=state.step,
            learning_rate=state.learning_rate or None,
            schedule=state.schedule,
            scalars=dict(state.scalars),
        )


def check_state_update(model_id: str, engine: Any, state: StateUpdate) -> None:
    """Refuse a state ``engine`` cannot take, before anything is written."""
    for field in ("iterations", "raw_iterations", "step"):
        value = getattr(state, field)
        if value is not None and value < 0:
            raise InvalidArgumentError(f"`{field}` must be >= 0. Received: {field}={value}")
    _raw_iterations(engine, state)
    if state.learning_rate is not None and (not math.isfinite(state.learning_rate) or state.learning_rate < 0):
        raise InvalidArgumentError(
            f"`learning_rate` must be a finite number >= 0. Received: learning_rate={state.learning_rate}"
        )
    if state.schedule is not None:
        # Checked exactly as the schedule of a CreateModel config, before anything is written.
        from optserve.server.optimizers.base import schedules_deserialize

        schedules_deserialize(state.schedule)
    unknown = sorted(set(state.scalars) - set(engine.get_scalars()))
    if unknown:
        known = sorted(engine.get_scalars()) or "none"
        raise NotFoundError(f"The optimizer of model {model_id!r} has no scalar {unknown}; it has {known}.")


def write_weights(engine: Any, variables, slots, state: StateUpdate | None) -> None:
    """Executor thread: write everything, restoring what was written if any part is refused."""
    previous_slots = engine.get_slots(list(slots)) if slots else {}
    previous_slots = {n: {s: previous_slots[n][s] for s in wanted} for n, wanted in slots.items()}
    previous_variables = engine.read_variables(list(variables)) if variables else {}
    previous_counters = _read_counters(engine)
    previous_rate = engine.learning_rate_setting()
    try:
        if slots:
            engine.set_slots(slots)
        if variables:
            engine.assign_variables(variables)
        if state is not None:
            _write_counters(engine, state)
    except BaseException:
        if slots:
            engine.set_slots(previous_slots)
        if variables:
            engine.assign_variables(previous_variables)
        engine.restore_learning_rate_setting(previous_rate)
        _write_counters(engine, previous_counters)
        raise


# ------------------------------------------------------- engine counters


def _read_counters(engine) -> StateUpdate:
    """The counters and scalars (not the learning rate), to write back when a write is undone."""
    return StateUpdate(
        iterations=int(engine.iterations), raw_iterations=int(engine.raw_iterations), scalars=dict(engine.get_scalars())
    )


def _accumulation_steps(engine) -> int:
    # An attribute, not the config: a LossScaleOptimizer's is its inner optimizer's.
    return int(getattr(engine, "gradient_accumulation_steps", None) or 1)


def _raw_iterations(engine, state: StateUpdate) -> int | None:
    """The raw counter a state asks for (None: unchanged): ``raw_iterations``, or derived from
    ``iterations`` when only that is set (both given with raw 0: as if only ``iterations`` were)."""
    steps = _accumulation_steps(engine)
    if state.iterations is None:
        return None if state.raw_iterations is None else int(state.raw_iterations)
    if state.raw_iterations is None:
        # Keep the raw counter's offset (it only differs under gradient accumulation).
        return int(engine.raw_iterations) + int(state.iterations) - int(engine.iterations)
    if state.raw_iterations or not state.iterations:
        raw = int(state.raw_iterations)
    else:
        raw = int(state.iterations) * steps
    if raw // steps != state.iterations:
        raise InvalidArgumentError(
            f"`iterations` ({state.iterations}) and `raw_iterations` ({state.raw_iterations}) disagree: with "
            f"gradient_accumulation_steps={steps}, iterations must be raw_iterations // {steps}. "
            "Set one of them (the other 0) or both consistently."
        )
    return raw


def _write_counters(engine, state: StateUpdate) -> None:
    """Counters first: a schedule's value is read at the new counter."""
    raw = _raw_iterations(engine, state)
    if raw is not None:
        engine.set_iterations(raw)
    if state.schedule is not None:
        engine.set_learning_rate(state.schedule)
    rate = state.learning_rate
    # A schedule's own current value (a state read back) is accepted as is; Keras refuses any other.
    on_its_schedule = engine.learning_rate_schedule is not None and math.isclose(
        rate or 0.0, engine.current_learning_rate(), rel_tol=1e-6, abs_tol=0.0
    )
    if rate is not None and not on_its_schedule and rate != engine.current_learning_rate():
        engine.set_learning_rate(rate)
    if state.scalars:
        engine.set_scalars(dict(state.scalars))
