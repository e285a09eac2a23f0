"""Reading and writing an optimizer's state: variables, slots, scalars, the
iteration counter, tf.keras's ``get_weights`` layout, and ``state_dict`` for
checkpoints. ``StateAccess`` is a part of ``Optimizer`` (``optimizers/base.py``),
split out by topic. Every write checks all it is given before it writes anything.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from ..errors import InvalidArgumentError, NotFoundError
from .validation import describe_names, finite_float

if TYPE_CHECKING:
    from .base import _Variable

STATE_FORMAT = "optserve.optimizer_state/1"


class StateAccess:
    """The state of an ``Optimizer``, read and written as NumPy arrays on the host."""

    if TYPE_CHECKING:  # provided by Optimizer
        class_name: str
        _backend: Any
        _config: dict[str, Any]
        _variables: dict[str, _Variable]
        _built: bool
        _raw_iterations: int
        _learning_rate: Any
        _schedule: Any
        _weight_decay_names: list[str] | None

        @property
        def iterations(self) -> int: ...

        def _require_built(self) -> None: ...

        def _require_variable(self, name: str) -> _Variable: ...

        def _require_variables(self, names: Iterable[str]) -> list[_Variable]: ...

        def _weights_layout(self) -> list[tuple[str, str]]: ...

        def _slot_names(self, name: str) -> list[str]: ...

        def get_config(self) -> dict[str, Any]: ...

        def optimizer_scalars(self) -> dict[str, tuple[float, np.dtype]]: ...

        def assign_optimizer_scalars(self, values: Mapping[str, float]) -> None: ...

        def build(self, variables: Mapping[str, Any], adopt: bool = False) -> None: ...

        def exclude_from_weight_decay(self, var_names: Sequence[str] | None = None) -> None: ...

        def _set_learning_rate_config(self, value: Any) -> None: ...

        @classmethod
        def _validated_learning_rate(cls, value: Any) -> Any: ...

    # -------------------------------------------------------------- arrays
    def _host_copy(self, array) -> np.ndarray:
        return np.asarray(self._backend.to_host(array))  # to_host returns a fresh copy

    def read_variables(self, names: Iterable[str] | None = None, allocate: Any = None) -> dict[str, np.ndarray]:
        """Host copies of the variables; ``allocate(name, shape, dtype)``, when given, provides
        the arrays they are copied into (reused buffers, so that a read faults in no memory)."""
        self._require_built()
        selected = self._variables.values() if names is None else self._require_variables(names)
        if allocate is None:
            return {variable.name: self._host_copy(variable.value) for variable in selected}
        return self._read_into(list(selected), [allocate])[0]

    def read_variables_into_each(self, allocators: Sequence[Any]) -> list[dict[str, np.ndarray]]:
        """Every variable copied into the arrays of each of ``allocators`` (as ``read_variables``'s
        ``allocate``), all in one parallel copy: one step's reply for several workers at once."""
        self._require_built()
        return self._read_into(list(self._variables.values()), allocators)

    def _read_into(self, selected: list[_Variable], allocators: Sequence[Any]) -> list[dict[str, np.ndarray]]:
        targets = self._allocated(selected, allocators)
        self._copy_out(selected, targets)
        return targets

    @staticmethod
    def _allocated(selected: list[_Variable], allocators: Sequence[Any]) -> list[dict[str, np.ndarray]]:
        """``{name: allocate(name, shape, dtype)}`` over ``selected``, for each of ``allocators``."""
        return [{v.name: allocate(v.name, v.shape, v.dtype) for v in selected} for allocate in allocators]

    def _copy_out(self, selected: list[_Variable], targets: list[dict[str, np.ndarray]]) -> None:
        """The values of ``selected`` copied into each of ``targets``, in one parallel copy."""
        self._backend.copy_to_host_many([(values[v.name], v.value) for v in selected for values in targets])

    @staticmethod
    def _checked_value(what: str, value: Any, variable: _Variable, shape: tuple | None = None) -> np.ndarray:
        """A host array of the variable's (or the given slot) shape, cast to its dtype as Keras's assign does."""
        shape, dtype = (variable.shape if shape is None else tuple(shape)), variable.dtype
        try:
            host = np.asarray(value)
        except Exception as error:  # noqa: BLE001 - any unconvertible value is the caller's error
            raise InvalidArgumentError(f"{what}: not an array ({error}).") from None
        if host.dtype.kind not in "fiu" or host.dtype == np.bool_:
            raise InvalidArgumentError(f"{what} has dtype {host.dtype}; expected a real number array ({dtype}).")
        if tuple(host.shape) != tuple(shape):
            raise InvalidArgumentError(f"{what} has shape {tuple(host.shape)}; expected {tuple(shape)}.")
        return np.ascontiguousarray(host, dtype=dtype).reshape(shape)  # (ascontiguousarray makes 0-d 1-d)

    def assign_variables(self, values: Mapping[str, Any]) -> None:
        """Overwrite variables (any subset); every value is checked before any is written."""
        self._require_built()
        checked = []
        for name, value in self._mapping("values", values).items():
            variable = self._require_variable(name)
            checked.append((variable, self._checked_value(f"Value for variable '{name}'", value, variable)))
        for variable, host in checked:
            self._backend.copy_into(variable.value, host)

    @staticmethod
    def _mapping(what: str, value: Any) -> Mapping:
        if not isinstance(value, Mapping):
            raise InvalidArgumentError(f"`{what}` must be a mapping. Received: {type(value).__name__}")
        return value

    def get_slots(self, names: Iterable[str] | None = None) -> dict[str, dict[str, np.ndarray]]:
        """``{variable: {slot: host copy}}``, slots in Keras order."""
        self._require_built()
        selected = self._variables.values() if names is None else self._require_variables(names)
        return {v.name: {slot: self._host_copy(array) for slot, array in v.slots.items()} for v in selected}

    def set_slots(self, values: Mapping[str, Mapping[str, Any]]) -> None:
        """Overwrite slots (any subset of variables and slots), all checked first."""
        self._require_built()
        checked = []
        for name, slots in self._mapping("values", values).items():
            variable = self._require_variable(name)
            for slot, value in self._mapping(f"values[{name!r}]", slots).items():
                if slot not in variable.slots:
                    raise NotFoundError(
                        f"Variable '{name}' has no slot {slot!r}. Its slots: {describe_names(list(variable.slots))}"
                    )
                what = f"Slot '{slot}' of variable '{name}'"
                array = variable.slots[slot]
                checked.append((array, self._checked_value(what, value, variable, array.shape)))
        for array, host in checked:
            self._backend.copy_into(array, host)

    def get_scalars(self) -> dict[str, float]:
        return {name: value for name, (value, _) in self.optimizer_scalars().items()}

    def set_scalars(self, values: Mapping[str, Any]) -> None:
        known = self.optimizer_scalars()
        values = dict(self._mapping("values", values))
        for name, value in values.items():
            if name not in known:
                allowed = ", ".join(known) or "none"
                raise NotFoundError(f"{self.class_name} has no optimizer-wide scalar {name!r}. Known: {allowed}")
            if finite_float(value) is None:
                raise InvalidArgumentError(f"Scalar {name!r} must be a finite number. Received: {name}={value!r}")
        self.assign_optimizer_scalars({name: float(value) for name, value in values.items()})

    def set_iterations(self, raw_iterations: int) -> None:
        """Set the raw iteration counter (the public one follows from it)."""
        self._raw_iterations = self._checked_iterations("raw_iterations", raw_iterations)

    @staticmethod
    def _checked_iterations(what: str, value: Any) -> int:
        host = np.asarray(value)
        is_count = host.shape == () and host.dtype.kind in "iuf" and np.isfinite(host) and host >= 0
        if not (is_count and host == np.floor(host)):
            raise InvalidArgumentError(f"{what} must be an integer >= 0. Received: {value!r}")
        return int(host)

    def get_weights(self) -> list[np.ndarray]:
        """tf.keras's layout: ``[iterations, *slots]``, variable by variable, each
        variable's slots in Keras order (see ``weights_description()``)."""
        self._require_built()
        weights = [np.array(self.iterations, dtype=np.int64)]
        weights += [self._host_copy(self._variables[name].slots[slot]) for name, slot in self._weights_layout()]
        return weights

    def weights_description(self) -> list[str]:
        """What each ``get_weights()`` entry is, e.g. ``"dense/kernel:velocity"``."""
        self._require_built()
        return ["iterations"] + [f"{name}:{slot}" for name, slot in self._weights_layout()]

    def set_weights(self, weights: Sequence[Any]) -> None:
        """Inverse of ``get_weights``; checked entry by entry before anything is assigned.

        Entry 0 is the public iteration counter; under gradient accumulation the
        position inside the current accumulation cycle is kept.
        """
        self._require_built()
        layout = self._weights_layout()
        expected = 1 + len(layout)
        if isinstance(weights, (str, bytes, Mapping)) or not isinstance(weights, Sequence):
            raise InvalidArgumentError(f"`weights` must be a list of {expected} arrays.")
        if len(weights) != expected:
            raise InvalidArgumentError(
                f"`weights` has {len(weights)} entries; expected {expected}: {', '.join(self.weights_description())}."
            )
        iterations = self._checked_iterations("Entry 0 (iterations)", weights[0])
        slot_values = []
        for index, (name, slot) in enumerate(layout, start=1):
            variable = self._variables[name]
            what = f"Entry {index} (slot '{slot}' of variable '{name}')"
            array = variable.slots[slot]
            slot_values.append((array, self._checked_value(what, weights[index], variable, array.shape)))
        for array, host in slot_values:
            self._backend.copy_into(array, host)
        steps = self._config["gradient_accumulation_steps"]
        self._raw_iterations = iterations * steps + self._raw_iterations % steps if steps else iterations

    # ----------------------------------------------------------- checkpoints
    def state_dict(self) -> dict[str, Any]:
        """Everything needed to resume, as plain NumPy arrays and Python values."""
        self._require_built()
        return {
            "format": STATE_FORMAT,
            "config": self.get_config(),
            "raw_iterations": self._raw_iterations,
            "learning_rate": self._learning_rate,
            "scalars": self.get_scalars(),
            "weight_decay_exclusions": list(self._weight_decay_names) if self._weight_decay_names else None,
            "variables": self.read_variables(),
            "slots": self.get_slots(),
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore ``state_dict()`` output; builds the optimizer first when it is not built.

        The optimizer must be of the same class; the variables (names, shapes)
        must match when it is already built. Everything is checked first.
        """
        state = self._mapping("state", state)
        if state.get("format") != STATE_FORMAT:
            raise InvalidArgumentError(
                f"Unknown optimizer state format {state.get('format')!r}; expected {STATE_FORMAT!r}."
            )
        saved_class = (state.get("config") or {}).get("class_name")
        if saved_class != self.class_name:
            raise InvalidArgumentError(f"State was saved by a {saved_class} optimizer; this one is {self.class_name}.")
        variables = self._mapping("state['variables']", state.get("variables"))
        slots = self._mapping("state['slots']", state.get("slots"))
        if self._built:
            if list(variables) != list(self._variables):
                raise InvalidArgumentError(
                    f"State holds variables {describe_names(list(variables))}; this optimizer holds "
                    f"{describe_names(list(self._variables))}."
                )
            self._checked_slot_sets(slots)
            self._load_built_state(state, variables, slots)
            return
        self.build(variables)
        try:
            self._checked_slot_sets(slots)
            self._load_built_state(state, {}, slots)
        except Exception:
            self._variables, self._built = {}, False  # a failed load leaves it unbuilt
            raise

    def _checked_slot_sets(self, slots: Mapping[str, Any]) -> None:
        for name in self._variables:
            expected = self._slot_names(name)
            saved = list(self._mapping(f"state['slots'][{name!r}]", slots.get(name, {})))
            if saved != expected:
                raise InvalidArgumentError(f"State has slots {saved} for variable '{name}'; expected {expected}.")

    def _load_built_state(self, state, variables, slots) -> None:
        raw_iterations = self._checked_iterations("state['raw_iterations']", state.get("raw_iterations"))
        exclusions = state.get("weight_decay_exclusions")
        if exclusions is not None and not isinstance(exclusions, (list, tuple)):
            raise InvalidArgumentError(
                f"state['weight_decay_exclusions'] must be a list or None. Received: {exclusions!r}"
            )
        learning_rate = state.get("learning_rate")
        # A schedule set after creation (set_learning_rate) is only in the saved config.
        saved_rate = ((state.get("config") or {}).get("config") or {}).get("learning_rate")
        schedule = self._validated_learning_rate(saved_rate) if isinstance(saved_rate, Mapping) else None
        if schedule is None and self._schedule is None and learning_rate is not None:
            learning_rate = self._validated_learning_rate(learning_rate)
        # Check everything, then write.
        scalars = dict(self._mapping("state['scalars']", state.get("scalars", {})))
        for name in scalars:
            if name not in self.optimizer_scalars():
                raise InvalidArgumentError(f"State has unknown optimizer-wide scalar {name!r}.")
        checked_variables = {
            name: self._checked_value(f"State value of variable '{name}'", value, self._variables[name])
            for name, value in variables.items()
        }
        checked_slots = {
            (name, slot): self._checked_value(
                f"State slot '{slot}' of variable '{name}'",
                value,
                self._variables[name],
                self._variables[name].slots[slot].shape,
            )
            for name, variable_slots in slots.items()
            for slot, value in variable_slots.items()
        }
        for name, value in scalars.items():
            if finite_float(value) is None:
                raise InvalidArgumentError(f"State scalar {name!r} must be a finite number. Received: {value!r}")
        if exclusions is not None:
            self.exclude_from_weight_decay(exclusions)
        for name, host in checked_variables.items():
            self._backend.copy_into(self._variables[name].value, host)
        for (name, slot), host in checked_slots.items():
            self._backend.copy_into(self._variables[name].slots[slot], host)
        self.assign_optimizer_scalars({name: float(value) for name, value in scalars.items()})
        if schedule is not None:
            self._set_learning_rate_config(schedule)
        elif self._schedule is None and learning_rate is not None:
            self._learning_rate = learning_rate
        self._raw_iterations = raw_iterations
