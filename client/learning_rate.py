"""The learning rate part of ``Client.set_weights(learning_rate=...)``: a float, or a new schedule.

A float replaces a float learning rate (0 included); a schedule, given as
``keras.optimizers.schedules.serialize(schedule)`` (or a Keras schedule object, or a
bare ``{"class_name", "config"}`` dict), replaces either. As in Keras, a float cannot
replace a schedule: the server answers FAILED_PRECONDITION. The new rate is used from
the next update on, by every worker of the model.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Mapping
from typing import Any

import numpy as np


def check_learning_rate(learning_rate: Any) -> float | dict:
    """A float >= 0, or a serialized schedule as a dict; refused eagerly otherwise."""
    if isinstance(learning_rate, Mapping):
        if not isinstance(learning_rate.get("class_name"), str):
            raise ValueError(
                "`learning_rate` given as a dict must be a serialized schedule with 'class_name' and 'config' "
                f"(keras.optimizers.schedules.serialize). Received keys: {sorted(learning_rate)}"
            )
        return dict(learning_rate)
    if _is_keras_schedule(learning_rate):
        return sys.modules["keras"].optimizers.schedules.serialize(learning_rate)
    if isinstance(learning_rate, (int, float, np.integer, np.floating)) and not isinstance(learning_rate, bool):
        value = float(learning_rate)
        if math.isfinite(value) and value >= 0:
            return value
    raise ValueError(
        "`learning_rate` must be a finite float >= 0 or a learning rate schedule (a Keras schedule, or "
        f"keras.optimizers.schedules.serialize(schedule)). Received: learning_rate={learning_rate!r}"
    )


def set_learning_rate(state: Any, learning_rate: float | dict) -> str:
    """Put a checked learning rate into ``state`` (an OptimizerState); returns the wire field it goes to."""
    if isinstance(learning_rate, dict):
        state.learning_rate_schedule = learning_rate
        return "learning_rate_schedule_json"
    state.learning_rate = learning_rate
    return "learning_rate"


def _is_keras_schedule(value: Any) -> bool:
    # Only look for Keras where it is imported already: a schedule object implies it is.
    keras = sys.modules.get("keras")
    return keras is not None and isinstance(value, keras.optimizers.schedules.LearningRateSchedule)
