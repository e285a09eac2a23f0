"""Keras-style eager argument checks for optimizer configs.

Each checker takes ``(name, value)`` and returns the value unchanged, or raises
``InvalidArgumentError`` with a message naming the argument, the allowed range
and the received value, e.g. "`rho` must be in [0, 1]. Received: rho=1.5".
Checks that Keras itself performs keep Keras's wording; the others add range
checks for values Keras would accept but that cannot produce a sensible update.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..errors import InvalidArgumentError

Checker = Callable[[str, Any], Any]


@dataclass(frozen=True)
class Hyperparameter:
    """One constructor argument: its Keras name, Keras default and its check."""

    name: str
    default: Any
    check: Checker


def is_real_number(value: Any) -> bool:
    # bool is an int subclass, but `rho=True` is a mistake, not a number.
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def is_finite_number(value: Any) -> bool:
    return is_real_number(value) and math.isfinite(value)


def received(name: str, value: Any) -> str:
    return f"Received: {name}={value!r}"


def in_interval(low: float, high: float, *, high_open: bool = False) -> Checker:
    """A finite number in [low, high] (or [low, high) when ``high_open``)."""
    closing = ")" if high_open else "]"

    def check(name: str, value: Any) -> Any:
        ok = is_finite_number(value) and low <= value and (value < high if high_open else value <= high)
        if not ok:
            raise InvalidArgumentError(f"`{name}` must be in [{low:g}, {high:g}{closing}. {received(name, value)}")
        return value

    return check


def non_negative(name: str, value: Any) -> Any:
    if not (is_finite_number(value) and value >= 0):
        raise InvalidArgumentError(f"`{name}` must be a finite number >= 0. {received(name, value)}")
    return value


def boolean(name: str, value: Any) -> Any:
    if not isinstance(value, bool):
        raise InvalidArgumentError(f"`{name}` must be a boolean (true or false). {received(name, value)}")
    return value


def optional_positive(name: str, value: Any) -> Any:
    """None (option off) or a finite number > 0.

    Keras treats 0 and negative clip values as "off"; a value that silently
    disables the option it names is rejected here instead.
    """
    if value is None:
        return None
    if not (is_finite_number(value) and value > 0):
        raise InvalidArgumentError(f"`{name}` must be a finite number > 0 or None. {received(name, value)}")
    return value


def optional_non_negative(name: str, value: Any) -> Any:
    if value is None:
        return None
    return non_negative(name, value)


def keras_non_negative(name: str, value: Any) -> Any:
    """Ftrl's own checks, worded as Keras words them."""
    if not is_finite_number(value) or value < 0:
        raise InvalidArgumentError(f"`{name}` needs to be positive or zero. Received: {name}={value!r}.")
    return value


def keras_non_positive(name: str, value: Any) -> Any:
    if not is_finite_number(value) or value > 0:
        raise InvalidArgumentError(f"`{name}` needs to be negative or zero. Received: {name}={value!r}.")
    return value


def learning_rate_float(name: str, value: Any) -> float:
    """Keras accepts only a Python float (or a schedule) as `learning_rate`."""
    if not isinstance(value, float):
        raise InvalidArgumentError(
            "Argument `learning_rate` should be float, or a serialized LearningRateSchedule "
            "(a dict with 'class_name' and 'config'). "
            f"Received instead: learning_rate={value!r}"
        )
    if not math.isfinite(value) or value < 0:
        raise InvalidArgumentError(f"`learning_rate` must be a finite number >= 0. {received(name, value)}")
    return value


def name_string(name: str, value: Any) -> Any:
    if value is not None and not (isinstance(value, str) and value):
        raise InvalidArgumentError(f"`{name}` must be a non-empty string or None. {received(name, value)}")
    return value


def accumulation_steps(name: str, value: Any) -> Any:
    if value is None:
        return None
    if not (isinstance(value, int) and not isinstance(value, bool) and value >= 2):
        raise InvalidArgumentError(
            f"`gradient_accumulation_steps` must be an integer >= 2. Received: gradient_accumulation_steps={value!r}"
        )
    return value


def ema_momentum(name: str, value: Any) -> Any:
    if not (is_finite_number(value) and 0 <= value <= 1):
        raise InvalidArgumentError(f"`ema_momentum` must be in the range [0, 1]. Received: ema_momentum={value!r}")
    return value


def ema_overwrite_frequency(name: str, value: Any) -> Any:
    if value is None:
        return None
    if not (isinstance(value, int) and not isinstance(value, bool) and value >= 1):
        raise InvalidArgumentError(
            f"`ema_overwrite_frequency` must be an integer >= 1 or None. Received: ema_overwrite_frequency={value!r}"
        )
    return value


def sgd_momentum(name: str, value: Any) -> Any:
    # Keras's own wording; like Keras, an int such as 0 is rejected.
    if not isinstance(value, float) or not math.isfinite(value) or value < 0 or value > 1:
        raise InvalidArgumentError(f"`momentum` must be a float between [0, 1]. Received: momentum={value!r}")
    return value


def lion_beta_1(name: str, value: Any) -> Any:
    # Keras's own check and wording.
    if not is_finite_number(value) or value <= 0 or value > 1:
        raise InvalidArgumentError(
            "Argument `beta_1` must be in the [0, 1] range. Otherwise, the optimizer degenerates to "
            f"SignSGD. Received: beta_1={value}."
        )
    return value


def in_half_open_above_zero(name: str, value: Any) -> Any:
    """A finite number in (0, 1] (a divisor that must not vanish)."""
    if not (is_finite_number(value) and 0 < value <= 1):
        raise InvalidArgumentError(f"`{name}` must be in (0, 1]. {received(name, value)}")
    return value


def non_negative_integer(name: str, value: Any) -> Any:
    if not (isinstance(value, int) and not isinstance(value, bool) and value >= 0):
        raise InvalidArgumentError(f"`{name}` must be an integer >= 0. {received(name, value)}")
    return value


def positive_integer(name: str, value: Any) -> Any:
    if not (isinstance(value, int) and not isinstance(value, bool) and value >= 1):
        raise InvalidArgumentError(f"`{name}` must be an integer >= 1. {received(name, value)}")
    return value


def positive_number(name: str, value: Any) -> Any:
    if not (is_finite_number(value) and value > 0):
        raise InvalidArgumentError(f"`{name}` must be a finite number > 0. {received(name, value)}")
    return value


def finite_number(name: str, value: Any) -> Any:
    if not is_finite_number(value):
        raise InvalidArgumentError(f"`{name}` must be a finite number. {received(name, value)}")
    return value


def finite_float(value: Any) -> float | None:
    """``value`` as a float when it is a finite real number, else None."""
    if isinstance(value, (bool, np.bool_)):
        return None
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return number if math.isfinite(number) else None


def describe_names(names: Sequence[str], limit: int = 10) -> str:
    """Up to ``limit`` names, quoted, then how many more there are (for error messages)."""
    shown = ", ".join(repr(n) for n in list(names)[:limit])
    more = len(names) - limit
    return f"{shown}, ... ({more} more)" if more > 0 else shown
