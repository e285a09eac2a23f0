"""Keras 3 learning-rate schedules as pure functions of the step.

A schedule is an immutable object; ``schedule(step)`` returns the learning rate
the optimizer uses for the update at ``step`` (the raw iteration counter before
its increment) as a Python float.

Parity with ``keras.optimizers.schedules`` (Keras 3.15) is the contract, so each
``_evaluate`` below is a line-by-line transcription of the Keras ``__call__``
through small helpers that reproduce the dtype rules of Keras's NumPy backend
(``_convert``, ``_binary``, ...). Running the same NumPy operations on the same
dtypes in the same order gives bit-identical values, including Keras's less
obvious behaviour:

* everything is computed in float32 when ``initial_learning_rate`` is a float;
* an *integer* ``initial_learning_rate`` makes Keras compute in int32: float
  arguments such as ``decay_rate=0.5`` are truncated and ``pi`` becomes 3. We
  reproduce that rather than silently disagree with a local Keras run;
* the step is the optimizer's int64 ``iterations`` counter, so
  ``PiecewiseConstantDecay`` compares it with boundaries cast to int64.

Validation follows Keras (same argument names, defaults and messages) and adds
type checks, so a config that Keras would only reject when first evaluated is
rejected here when the schedule is built.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from typing import Any, ClassVar

import numpy as np

from optserve.server.errors import InvalidArgumentError

KERAS_MODULE = "keras.optimizers.schedules"

# ---------------------------------------------------------------------------
# Keras's NumPy-backend arithmetic.
#
# Keras converts Python floats to float32 and Python ints to int32, narrows
# 64-bit inputs of its ops to 32 bits, and promotes operands JAX-style. For the
# dtypes that occur in these schedules that promotion reduces to: any float
# operand -> float32, else any integer -> int32, else bool. Plain Python
# operators on tensors are NumPy's own operators and are used as such.
# ---------------------------------------------------------------------------
_FLOAT32 = np.dtype("float32")
_INT32 = np.dtype("int32")
_INT64 = np.dtype("int64")
_BOOL = np.dtype("bool")
_KIND_OF_PYTHON_TYPE = {bool: "b", int: "i", float: "f"}


def _kind(item) -> str:
    """'f', 'i' or 'b' for a dtype-carrying value, a Python scalar or a Python type."""
    if isinstance(item, type):
        return _KIND_OF_PYTHON_TYPE[item]
    dtype = getattr(item, "dtype", None)
    if dtype is not None:
        return "i" if dtype.kind == "u" else dtype.kind
    return _KIND_OF_PYTHON_TYPE[type(item)]


def _result_dtype(*items) -> np.dtype:
    """Keras's ``result_type`` (NumPy backend) restricted to bool/int/float inputs."""
    kinds = {_kind(item) for item in items}
    if "f" in kinds:
        return _FLOAT32
    if "i" in kinds:
        return _INT32
    return _BOOL


def _convert(value, dtype=None) -> np.ndarray:
    """``ops.convert_to_tensor`` / ``ops.cast`` / ``ops.array``."""
    return np.array(value, dtype=_result_dtype(value) if dtype is None else dtype)


def _as_operand(value):
    # Keras's binary ops leave Python scalars alone (they promote weakly).
    return value if isinstance(value, (int, float)) else _convert(value)


def _binary(ufunc, x1, x2, *extra_types):
    """A Keras binary op: promote both operands to one dtype, then apply ``ufunc``."""
    x1, x2 = _as_operand(x1), _as_operand(x2)
    dtype = _result_dtype(x1, x2, *extra_types)
    return ufunc(_convert(x1, dtype), _convert(x2, dtype))


def _add(x1, x2):
    return _binary(np.add, x1, x2)


def _subtract(x1, x2):
    return _binary(np.subtract, x1, x2)


def _multiply(x1, x2):
    return _binary(np.multiply, x1, x2)


def _divide(x1, x2):
    return _binary(np.divide, x1, x2, float)  # true division always yields a float


def _power(x1, x2):
    return _binary(np.power, x1, x2)


def _minimum(x1, x2):
    return _binary(np.minimum, x1, x2)


def _where(condition, x1, x2):
    x1, x2 = _as_operand(x1), _as_operand(x2)
    dtype = _result_dtype(x1, x2)
    return np.where(condition, _convert(x1, dtype), _convert(x2, dtype))


def _float_unary(ufunc, x):
    """``ops.floor``/``ceil``/``cos``: the input is cast to float32 first."""
    return ufunc(_convert(x).astype(_FLOAT32))


def _floor(x):
    return _float_unary(np.floor, x)


def _ceil(x):
    return _float_unary(np.ceil, x)


def _cos(x):
    return _float_unary(np.cos, x)


def _log(x):
    return np.log(_convert(x), dtype=_FLOAT32)


# ---------------------------------------------------------------------------
# Argument checks (Keras's wording: "Argument `x` ... Received: x=...").
# ---------------------------------------------------------------------------
def _invalid(argument: str, requirement: str, value) -> InvalidArgumentError:
    return InvalidArgumentError(f"Argument `{argument}` {requirement}. Received: {argument}={value!r}")


def _is_number(value) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, (bool, np.bool_))


def _plain_number(argument: str, value):
    """A finite int or float; NumPy scalars become the equivalent Python number."""
    if not _is_number(value):
        raise _invalid(argument, "must be a number", value)
    if isinstance(value, np.generic):
        value = value.item()
    if not math.isfinite(value):
        raise _invalid(argument, "must be finite", value)
    return value


def _positive_number(argument: str, value):
    value = _plain_number(argument, value)
    if value <= 0:
        raise InvalidArgumentError(f"Argument `{argument}` must be > 0. Received: {argument}={value}")
    return value


def _boolean(argument: str, value) -> bool:
    # Keras only tests truthiness; a string "false" would silently mean True.
    if not isinstance(value, (bool, np.bool_)):
        raise _invalid(argument, "must be a boolean", value)
    return bool(value)


def _scope_name(value) -> str:
    # Keras opens ops.name_scope(name) on every call, which rejects these.
    if not isinstance(value, str) or "/" in value:
        raise _invalid("name", "must be a string and cannot contain character `/`", value)
    return value


def _number_list(argument: str, value) -> tuple:
    if not isinstance(value, (list, tuple)):
        raise _invalid(argument, "must be a list of numbers", value)
    return tuple(_plain_number(f"{argument}[{i}]", item) for i, item in enumerate(value))


def _step_tensor(step) -> np.ndarray:
    """The optimizer's ``iterations`` variable: an int64 scalar."""
    if not isinstance(step, (numbers.Integral, np.integer)) or isinstance(step, (bool, np.bool_)):
        raise _invalid("step", "must be a non-negative integer", step)
    if not 0 <= int(step) <= np.iinfo(np.int64).max:
        raise _invalid("step", "must be a non-negative integer within int64", step)
    return np.array(int(step), dtype=_INT64)


# ---------------------------------------------------------------------------
# Schedules
# ---------------------------------------------------------------------------
class LearningRateSchedule:
    """Base class: an immutable schedule; ``schedule(step)`` -> float."""

    # Every schedule is a frozen dataclass (get_config reads its fields).
    __dataclass_fields__: ClassVar[dict[str, Any]]

    def __call__(self, step: int) -> float:
        step_tensor = _step_tensor(step)
        # Some configs Keras accepts reach inf/nan (e.g. t_mul=0); NumPy would
        # only warn about them, and the value itself is what Keras returns.
        with np.errstate(all="ignore"):
            return float(self._evaluate(step_tensor))

    def _evaluate(self, step: np.ndarray):
        raise NotImplementedError

    def get_config(self) -> dict:
        """Keras's ``get_config()``: the constructor arguments, sequences as lists."""
        return {field.name: _config_value(getattr(self, field.name)) for field in dataclasses.fields(self)}

    @classmethod
    def from_config(cls, config: dict) -> LearningRateSchedule:
        return cls(**config)

    def _check_evaluates(self) -> None:
        # Catch configs that Keras accepts but fails on when first evaluated
        # (e.g. an int argument overflowing int32 once Keras casts it).
        try:
            self(0)
        except (ArithmeticError, TypeError, ValueError, IndexError) as error:
            raise InvalidArgumentError(
                f"{type(self).__name__} cannot be evaluated with config {self.get_config()}: {error}"
            ) from error


def _config_value(value):
    return list(value) if isinstance(value, tuple) else value


def _set(schedule, **values) -> None:
    # Normalized values are written once, in __post_init__ of a frozen dataclass.
    for name, value in values.items():
        object.__setattr__(schedule, name, value)


@dataclasses.dataclass(frozen=True)
class _StepDecay(LearningRateSchedule):
    """What ExponentialDecay and InverseTimeDecay share: their arguments and decay progress."""

    initial_learning_rate: float
    decay_steps: float
    decay_rate: float
    staircase: bool = False
    name: str = ""

    def __post_init__(self):
        _set(
            self,
            initial_learning_rate=_plain_number("initial_learning_rate", self.initial_learning_rate),
            decay_steps=_positive_number("decay_steps", self.decay_steps),
            decay_rate=_plain_number("decay_rate", self.decay_rate),
            staircase=_boolean("staircase", self.staircase),
            name=_scope_name(self.name),
        )
        self._check_evaluates()

    def _progress(self, step):
        """(initial rate, decay rate, step / decay_steps floored if staircase), in Keras's dtypes."""
        initial_learning_rate = _convert(self.initial_learning_rate)
        dtype = initial_learning_rate.dtype
        decay_steps = _convert(self.decay_steps, dtype)
        decay_rate = _convert(self.decay_rate, dtype)
        p = _convert(step, dtype) / decay_steps
        if self.staircase:
            p = _floor(p)
        return initial_learning_rate, decay_rate, p


@dataclasses.dataclass(frozen=True)
class ExponentialDecay(_StepDecay):
    """``initial_learning_rate * decay_rate ** (step / decay_steps)``, floored exponent if staircase."""

    name: str = "ExponentialDecay"

    def _evaluate(self, step):
        initial_learning_rate, decay_rate, p = self._progress(step)
        return _multiply(initial_learning_rate, _power(decay_rate, p))


@dataclasses.dataclass(frozen=True)
class PiecewiseConstantDecay(LearningRateSchedule):
    """``values[i]`` while ``boundaries[i-1] < step <= boundaries[i]``."""

    boundaries: list
    values: list
    name: str = "PiecewiseConstant"

    def __post_init__(self):
        boundaries = _number_list("boundaries", self.boundaries)
        values = _number_list("values", self.values)
        if len(boundaries) != len(values) - 1:
            raise InvalidArgumentError(
                "The length of boundaries should be 1 less than the length of "
                f"values. Received: boundaries={list(boundaries)} of length "
                f"{len(boundaries)}, and values={list(values)} "
                f"of length {len(values)}."
            )
        if not boundaries:
            raise _invalid("boundaries", "must not be empty", list(boundaries))
        if isinstance(values[0], int) and any(isinstance(v, float) for v in values):
            # Keras sums the values in the dtype of values[0] and fails on the
            # first float; written as a float, values[0] makes it all float32.
            raise _invalid(
                "values",
                "must not mix floats into integer values (values[0] is an int, so "
                "Keras computes in int32); write the values as floats, e.g. 1.0",
                list(values),
            )
        _set(self, boundaries=boundaries, values=values, name=_scope_name(self.name))
        self._check_evaluates()

    def _evaluate(self, step):
        # The step stays int64 (Keras's convert_to_tensor returns a variable's
        # value as is), and each boundary is cast to it: 10.5 compares as 10.
        boundaries = [_convert(b).astype(step.dtype) for b in self.boundaries]
        values = [_convert(v) for v in self.values]
        result_dtype = values[0].dtype
        result = np.array(0, dtype=result_dtype)
        # Sum of (step in range) * value over the ranges, as Keras writes it.
        result += _convert(step <= boundaries[0], result_dtype) * values[0]
        result += _convert(step > boundaries[-1], result_dtype) * values[-1]
        for low, high, value in zip(boundaries[:-1], boundaries[1:], values[1:-1]):
            result += _convert((step > low) & (step <= high), result_dtype) * value
        return result


@dataclasses.dataclass(frozen=True)
class PolynomialDecay(LearningRateSchedule):
    """From ``initial_learning_rate`` to ``end_learning_rate`` along ``(1 - step/decay_steps) ** power``."""

    initial_learning_rate: float
    decay_steps: float
    end_learning_rate: float = 0.0001
    power: float = 1.0
    cycle: bool = False
    name: str = "PolynomialDecay"

    def __post_init__(self):
        _set(
            self,
            initial_learning_rate=_plain_number("initial_learning_rate", self.initial_learning_rate),
            decay_steps=_positive_number("decay_steps", self.decay_steps),
            end_learning_rate=_plain_number("end_learning_rate", self.end_learning_rate),
            power=_plain_number("power", self.power),
            cycle=_boolean("cycle", self.cycle),
            name=_scope_name(self.name),
        )
        self._check_evaluates()

    def _evaluate(self, step):
        initial_learning_rate = _convert(self.initial_learning_rate)
        dtype = initial_learning_rate.dtype
        end_learning_rate = _convert(self.end_learning_rate, dtype)
        power = _convert(self.power, dtype)
        global_step = _convert(step, dtype)
        decay_steps = _convert(self.decay_steps, dtype)
        if self.cycle:
            # The first multiple of decay_steps at or above the step; at step 0
            # the multiplier is 1, not ceil(0) = 0.
            multiplier = _where(np.equal(global_step, 0), 1.0, _ceil(global_step / self.decay_steps))
            decay_steps = _multiply(decay_steps, multiplier)
        else:
            global_step = _minimum(global_step, decay_steps)
        p = _divide(global_step, decay_steps)
        return _add(
            _multiply(initial_learning_rate - end_learning_rate, _power(1 - p, power)),
            end_learning_rate,
        )


@dataclasses.dataclass(frozen=True)
class InverseTimeDecay(_StepDecay):
    """``initial_learning_rate / (1 + decay_rate * step / decay_steps)``, floored ratio if staircase."""

    name: str = "InverseTimeDecay"

    def _evaluate(self, step):
        initial_learning_rate, decay_rate, p = self._progress(step)
        one = _convert(_convert(1), initial_learning_rate.dtype)
        return _divide(initial_learning_rate, _add(one, _multiply(decay_rate, p)))


@dataclasses.dataclass(frozen=True)
class CosineDecay(LearningRateSchedule):
    """Optional linear warmup to ``warmup_target``, then cosine decay to ``alpha`` times it."""

    initial_learning_rate: float
    decay_steps: float
    alpha: float = 0.0
    name: str = "CosineDecay"
    warmup_target: float | None = None
    warmup_steps: float = 0

    def __post_init__(self):
        warmup_target = self.warmup_target
        if warmup_target is not None:
            warmup_target = _plain_number("warmup_target", warmup_target)
        _set(
            self,
            initial_learning_rate=_plain_number("initial_learning_rate", self.initial_learning_rate),
            decay_steps=_positive_number("decay_steps", self.decay_steps),
            alpha=_plain_number("alpha", self.alpha),
            name=_scope_name(self.name),
            warmup_target=warmup_target,
            warmup_steps=_plain_number("warmup_steps", self.warmup_steps),
        )
        self._check_evaluates()

    def _decay(self, step, decay_steps, decay_from_lr, dtype):
        completed_fraction = _divide(step, decay_steps)
        pi = _convert(math.pi, dtype)
        cosine_decayed = 0.5 * (1.0 + _cos(_multiply(pi, completed_fraction)))
        # alpha stays a Python number here, as in Keras (weak promotion).
        decayed = (1 - self.alpha) * cosine_decayed + self.alpha
        return _multiply(decay_from_lr, decayed)

    @staticmethod
    def _warmup(step, warmup_steps, warmup_target, initial_learning_rate):
        completed_fraction = step / warmup_steps
        total_step_delta = warmup_target - initial_learning_rate
        return total_step_delta * completed_fraction + initial_learning_rate

    def _evaluate(self, step):
        initial_learning_rate = _convert(self.initial_learning_rate)
        dtype = initial_learning_rate.dtype
        decay_steps = _convert(self.decay_steps, dtype)
        global_step = _convert(step, dtype)
        if self.warmup_target is None:
            global_step = _minimum(global_step, decay_steps)
            return self._decay(global_step, decay_steps, initial_learning_rate, dtype)

        warmup_target = _convert(self.warmup_target, dtype)
        warmup_steps = _convert(self.warmup_steps, dtype)
        global_step = _minimum(global_step, decay_steps + warmup_steps)
        if global_step < warmup_steps:
            return self._warmup(global_step, warmup_steps, warmup_target, initial_learning_rate)
        return self._decay(global_step - warmup_steps, decay_steps, warmup_target, dtype)


@dataclasses.dataclass(frozen=True)
class CosineDecayRestarts(LearningRateSchedule):
    """SGDR: cosine decay over periods of ``first_decay_steps * t_mul**i`` with peaks ``m_mul**i``."""

    initial_learning_rate: float
    first_decay_steps: float
    t_mul: float = 2.0
    m_mul: float = 1.0
    alpha: float = 0.0
    name: str = "SGDRDecay"

    def __post_init__(self):
        _set(
            self,
            initial_learning_rate=_plain_number("initial_learning_rate", self.initial_learning_rate),
            first_decay_steps=_positive_number("first_decay_steps", self.first_decay_steps),
            t_mul=_plain_number("t_mul", self.t_mul),
            m_mul=_plain_number("m_mul", self.m_mul),
            alpha=_plain_number("alpha", self.alpha),
            name=_scope_name(self.name),
        )
        self._check_evaluates()

    @staticmethod
    def _restart_and_fraction(completed_fraction, t_mul, dtype):
        """Index of the current period and the fraction of it completed."""
        if np.equal(t_mul, 1.0):
            i_restart = _floor(completed_fraction)
            return i_restart, completed_fraction - i_restart
        # Periods grow geometrically: solve sum_{k<i} t_mul**k <= fraction.
        i_restart = _floor(_log(_convert(1.0 - completed_fraction * (1.0 - t_mul), dtype)) / _log(t_mul))
        sum_r = _divide(1.0 - _power(t_mul, i_restart), (1.0 - t_mul))
        fraction = _divide(_subtract(completed_fraction, sum_r), _power(t_mul, i_restart))
        return i_restart, fraction

    def _evaluate(self, step):
        initial_learning_rate = _convert(self.initial_learning_rate)
        dtype = initial_learning_rate.dtype
        first_decay_steps = _convert(self.first_decay_steps, dtype)
        alpha = _convert(self.alpha, dtype)
        t_mul = _convert(self.t_mul, dtype)
        m_mul = _convert(self.m_mul, dtype)

        completed_fraction = _convert(step, dtype) / first_decay_steps
        i_restart, completed_fraction = self._restart_and_fraction(completed_fraction, t_mul, dtype)
        m_fac = _power(m_mul, i_restart)
        cosine_decayed = 0.5 * m_fac * (1.0 + _cos(_multiply(_convert(math.pi, dtype), completed_fraction)))
        decayed = _add(_multiply((1 - alpha), cosine_decayed), alpha)
        return _multiply(initial_learning_rate, decayed)


# ---------------------------------------------------------------------------
# (De)serialization in Keras's form
# ---------------------------------------------------------------------------
REGISTRY: dict[str, type[LearningRateSchedule]] = {
    cls.__name__: cls
    for cls in (
        ExponentialDecay,
        PiecewiseConstantDecay,
        PolynomialDecay,
        InverseTimeDecay,
        CosineDecay,
        CosineDecayRestarts,
    )
}


def is_serialized_schedule(obj: Any) -> bool:
    """True for a dict whose ``class_name`` names one of the schedules in REGISTRY."""
    return isinstance(obj, dict) and obj.get("class_name") in REGISTRY


def serialize(schedule: LearningRateSchedule) -> dict:
    """The dict ``keras.optimizers.schedules.serialize`` produces for the same schedule."""
    if not isinstance(schedule, LearningRateSchedule):
        raise InvalidArgumentError(f"Expected a learning rate schedule. Received: {schedule!r}")
    return {
        "module": KERAS_MODULE,
        "class_name": type(schedule).__name__,
        "config": schedule.get_config(),
        "registered_name": None,
    }


def deserialize(obj: Any) -> LearningRateSchedule:
    """A schedule from Keras's serialized form or a bare ``{"class_name", "config"}``."""
    if isinstance(obj, LearningRateSchedule):
        return obj
    if not isinstance(obj, dict) or not isinstance(obj.get("class_name"), str):
        raise InvalidArgumentError(
            f"A learning rate schedule must be a dict with 'class_name' and 'config'. Received: {obj!r}"
        )
    class_name = obj["class_name"]
    cls = REGISTRY.get(class_name)
    if cls is None:
        raise InvalidArgumentError(f"Unknown learning rate schedule: '{class_name}'. Supported: {sorted(REGISTRY)}")
    _check_origin(obj, class_name)
    config = obj.get("config")
    if not isinstance(config, dict):
        raise InvalidArgumentError(f"The 'config' of a {class_name} must be a dict. Received: config={config!r}")
    _check_arguments(cls, config)
    return cls.from_config(config)


def _check_origin(obj: dict, class_name: str) -> None:
    # Only Keras's built-in schedules exist here; a custom registered class
    # that happens to share a name must not be silently replaced.
    module = obj.get("module")
    if module is not None and not (isinstance(module, str) and module.split(".")[0] == "keras"):
        raise InvalidArgumentError(
            f"Only Keras's built-in learning rate schedules are supported. "
            f"Received: module={module!r} for class_name='{class_name}'"
        )
    registered_name = obj.get("registered_name")
    if registered_name not in (None, class_name):
        raise InvalidArgumentError(
            f"Custom learning rate schedules are not supported. Received: registered_name={registered_name!r}"
        )


def _check_arguments(cls: type, config: dict) -> None:
    fields = dataclasses.fields(cls)
    allowed = [field.name for field in fields]
    unknown = sorted(set(config) - set(allowed), key=str)
    if unknown:
        raise InvalidArgumentError(f"Unknown argument(s) for {cls.__name__}: {unknown}. Allowed: {allowed}")
    missing = [field.name for field in fields if field.default is dataclasses.MISSING and field.name not in config]
    if missing:
        raise InvalidArgumentError(f"Missing required argument(s) for {cls.__name__}: {missing}")
