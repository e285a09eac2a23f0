"""Reading and writing a model between its steps: ``pull``, ``get_weights``,
``summary`` and ``set_weights``. ``ModelAccess`` is a part of ``Model``
(``optserve.server.model``, which holds the step protocol), split out by topic;
each of its calls runs holding the model's lock, all of it or nothing.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable, Mapping
from typing import TYPE_CHECKING, Any

import numpy as np

from optserve.server import schedules, text
from optserve.server.activity import ModelActivity
from optserve.server.activity import nbytes as _nbytes
from optserve.server.errors import FailedPreconditionError, InvalidArgumentError, NotFoundError
from optserve.server.model_spec import ModelSpec, VariableMeta
from optserve.server.optimizer_state import OptimizerStatus, StateUpdate, check_state_update, write_weights

if TYPE_CHECKING:
    from optserve.server.activity import ModelEvents
    from optserve.server.step_records import PendingStep, RecentSteps, StepRecord
    from optserve.server.usage import Activity

MAX_LISTED_NAMES = 10


@dataclasses.dataclass(frozen=True)
class VariableSummary:
    meta: VariableMeta
    slots: tuple[str, ...]
    norm: float | None


@dataclasses.dataclass(frozen=True)
class ModelSummary:
    spec: ModelSpec
    status: OptimizerStatus
    variables: tuple[VariableSummary, ...]
    waiting_workers: tuple[int, ...]
    activity: ModelActivity | None = None
    usage: Any = None  # optserve.server.usage.ActivitySummary


def listed(names: Iterable[str]) -> str:
    """Up to MAX_LISTED_NAMES names, quoted, then how many more there are (for error messages)."""
    names = list(names)
    shown = ", ".join(repr(n) for n in names[:MAX_LISTED_NAMES])
    return shown + (f" and {len(names) - MAX_LISTED_NAMES} more" if len(names) > MAX_LISTED_NAMES else "")


class ModelAccess:
    """A model's variables, slots and optimizer state, read and written between steps."""

    if TYPE_CHECKING:  # provided by Model
        spec: ModelSpec
        _engine: Any
        _variables: dict[str, VariableMeta]
        _step: int
        _pending: PendingStep | None
        _history: dict[int, StepRecord]
        _recent_async: dict[int, RecentSteps]
        events: ModelEvents
        activity: ModelActivity
        usage: Activity

        @property
        def model_id(self) -> str: ...

        def waiting_workers(self) -> tuple[int, ...]: ...

        def _ensure_open(self) -> None: ...

        async def _exclusive(self, body: Callable[[], Any]) -> Any: ...

        async def _run(self, function: Callable[..., Any], *args: Any) -> Any: ...

        def _notify(self, applied: int) -> None: ...

    # --------------------------------------------------------------- reads

    def select_names(self, names: Iterable[str] | None) -> list[str]:
        """Validate a name filter; empty or None selects every variable, in build order."""
        names = list(names or ())
        if not names:
            return list(self._variables)
        unknown = [n for n in names if n not in self._variables]
        if unknown:
            raise NotFoundError(
                f"Model {self.model_id!r} has no variable {listed(unknown)}; "
                f"its variables are {listed(self._variables)}."
            )
        return list(dict.fromkeys(names))

    async def pull(self, names: Iterable[str] | None = None) -> tuple[OptimizerStatus, dict]:
        selected = self.select_names(names)

        async def read():
            self._ensure_open()
            values = await self._run(self._engine.read_variables, selected)
            self.events.sent(_nbytes(values.values()))
            return self._status(), values

        return await self._exclusive(read)

    async def get_weights(
        self, names: Iterable[str] | None = None, include_variables: bool = False
    ) -> tuple[OptimizerStatus, list[tuple[str, str, np.ndarray]]]:
        """Optimizer state, then ``(variable, slot, value)`` in Keras order, variable by variable."""
        selected = self.select_names(names)

        def read_tensors():
            slots = self._engine.get_slots(selected)
            values = self._engine.read_variables(selected) if include_variables else {}
            tensors = []
            for name in selected:
                if include_variables:
                    tensors.append((name, "", values[name]))
                tensors.extend((name, slot, value) for slot, value in slots.get(name, {}).items())
            return tensors

        async def read():
            self._ensure_open()
            tensors = await self._run(read_tensors)
            self.events.sent(_nbytes(value for _, _, value in tensors))
            return self._status(), tensors

        return await self._exclusive(read)

    async def summary(self, with_stats: bool = False) -> ModelSummary:
        def norms() -> dict[str, float]:
            values = self._engine.read_variables()
            return {name: float(np.linalg.norm(value.reshape(-1))) for name, value in values.items()}

        async def read():
            self._ensure_open()
            norm_by_name = await self._run(norms) if with_stats else {}
            variables = tuple(
                VariableSummary(meta, tuple(self._engine.slot_names(meta.name)), norm_by_name.get(meta.name))
                for meta in self.spec.variables
            )
            return ModelSummary(
                self.spec, self._status(), variables, self.waiting_workers(), self.activity, self.usage.summary()
            )

        return await self._exclusive(read)

    def _status(self) -> OptimizerStatus:
        schedule = self._engine.learning_rate_schedule
        return OptimizerStatus(
            iterations=int(self._engine.iterations),
            raw_iterations=int(self._engine.raw_iterations),
            learning_rate=float(self._engine.current_learning_rate()),
            step=self._step,
            scalars={k: float(v) for k, v in self._engine.get_scalars().items()},
            schedule=schedules.serialize(schedule) if schedule is not None else None,
        )

    # -------------------------------------------------------------- writes

    async def set_weights(
        self, tensors: Mapping[tuple[str, str], np.ndarray], state: OptimizerStatus | StateUpdate | None = None
    ) -> OptimizerStatus:
        """Overwrite variables (slot ""), slots and/or the optimizer state: all of it, or nothing.

        A new learning rate or schedule is used from the next update on.
        """
        update = StateUpdate.of(state) if state is not None else None

        async def write():
            self._ensure_open()
            self.events.received(_nbytes(tensors.values()))
            variables, slots = self._split_weights(tensors)
            self._check_state(update)
            await self._run(write_weights, self._engine, variables, slots, update)
            if update is not None and update.step is not None and update.step != self._step:
                self._step = int(update.step)
                # Step numbers may be reused now (a restore rewinds them): forget which pushes were seen.
                self._history.clear()
                self._recent_async.clear()
            self._notify(applied=0)
            return self._status()

        return await self._exclusive(write)

    def _split_weights(self, tensors) -> tuple[dict, dict]:
        variables: dict[str, np.ndarray] = {}
        slots: dict[str, dict[str, np.ndarray]] = {}
        for (name, slot), value in tensors.items():
            if name not in self._variables:
                raise NotFoundError(
                    f"Model {self.model_id!r} has no variable {name!r}; its variables are {listed(self._variables)}."
                )
            if slot:
                allowed = list(self._engine.slot_names(name))
                if slot not in allowed:
                    raise NotFoundError(
                        f"Variable {name!r} of model {self.model_id!r} has no slot {slot!r}; "
                        f"its slots are {allowed or 'none'} (slot '' is the variable itself)."
                    )
                slots.setdefault(name, {})[slot] = value
            else:
                var = self._variables[name]
                if tuple(value.shape) != var.shape or value.dtype != var.dtype:
                    raise InvalidArgumentError(
                        f"New value for {name!r} has {text.tensor(value.shape, value.dtype)}, "
                        f"but the variable has {var.describe()}."
                    )
                variables[name] = value
        return variables, slots

    def _check_state(self, state: StateUpdate | None) -> None:
        if state is None:
            return
        check_state_update(self.model_id, self._engine, state)
        if state.step is not None and state.step != self._step and self._pending is not None:
            raise FailedPreconditionError(
                f"Step {self._step} of model {self.model_id!r} is in progress (workers "
                f"{sorted(self._pending.contributors)} pushed it); set `step` between steps.",
                details={"current_step": self._step},
            )
