"""Dynamic loss scaling around another optimizer (``keras.optimizers.LossScaleOptimizer``).

The worker multiplies its loss by the current scale; the server keeps the scale
(a float32, like Keras's ``dynamic_scale`` variable) and its growth counter
(``step_counter``) and applies Keras's rule on every call:

* all gradients finite: the inner optimizer applies ``grad / scale`` (the
  division runs where ``loss_scale_factor`` would divide, so it costs no extra
  pass or buffer), then after ``dynamic_growth_steps`` finite steps in a row the
  scale doubles and the counter restarts, else the counter counts up;
* any gradient non-finite: the step is skipped (no variable, slot or counter of
  the inner optimizer changes), the scale halves and the counter restarts.

Everything else (slots, weights, learning rate, iterations) is the inner
optimizer's; the two scalars join the inner optimizer's optimizer-wide scalars
(``get_scalars()``), so they travel in GetState/SetState and checkpoints.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from ..errors import InvalidArgumentError
from . import validation as check
from .base import Optimizer, _resolve_backend
from .state_access import STATE_FORMAT

STEP_COUNTER = "step_counter"
DYNAMIC_SCALE = "dynamic_scale"
DEFAULT_INITIAL_SCALE = 2.0**15
DEFAULT_GROWTH_STEPS = 2000

# Keras accepts these base arguments only at their defaults (older configs carry them).
_BASE_DEFAULTS = {
    "weight_decay": None,
    "clipnorm": None,
    "global_clipnorm": None,
    "clipvalue": None,
    "use_ema": False,
    "ema_momentum": 0.99,
    "ema_overwrite_frequency": None,
    "loss_scale_factor": None,
    "gradient_accumulation_steps": None,
}


class LossScaleOptimizer:
    """Keras's LossScaleOptimizer over an engine optimizer; delegates all but the scaling."""

    class_name = "LossScaleOptimizer"
    hyperparameters = ()

    def __init__(
        self,
        backend: Any = None,
        inner_optimizer: Any = None,
        initial_scale: Any = DEFAULT_INITIAL_SCALE,
        dynamic_growth_steps: Any = DEFAULT_GROWTH_STEPS,
        name: Any = None,
        **kwargs: Any,
    ):
        self._check_keras_arguments(kwargs)
        backend = _resolve_backend(backend)
        self.inner_optimizer = self._inner(inner_optimizer, backend)
        self.initial_scale = check.positive_number("initial_scale", initial_scale)
        self.dynamic_growth_steps = check.positive_integer("dynamic_growth_steps", dynamic_growth_steps)
        self.name = check.name_string("name", name) or "loss_scale_optimizer"
        with np.errstate(over="ignore"):
            scale = float(np.float32(initial_scale))
        if not math.isfinite(scale):
            raise InvalidArgumentError(
                f"`initial_scale` must be finite in float32. Received: initial_scale={initial_scale!r}"
            )
        self._step_counter = 0
        # Keras: the inner optimizer's own loss scaling is disabled.
        self.inner_optimizer._config["loss_scale_factor"] = None
        self.inner_optimizer.dynamic_loss_scale = scale

    @staticmethod
    def _check_keras_arguments(kwargs: dict) -> None:
        # Keras's checks and wording.
        if not kwargs.pop("dynamic", True):
            raise InvalidArgumentError(
                "LossScaleOptimizer no longer supports `dynamic=False`. Instead, simply set "
                "`loss_scale_factor` directly on the `inner_optimizer`."
            )
        for argument, default in _BASE_DEFAULTS.items():
            if argument in kwargs and kwargs.pop(argument) != default:
                raise InvalidArgumentError(
                    f"LossScaleOptimizer does not support `{argument}`. "
                    f"Instead, set `{argument}` on the `inner_optimizer`."
                )
        if kwargs:
            raise InvalidArgumentError(f"LossScaleOptimizer does not support arguments: `{'`, `'.join(kwargs)}`.")

    @staticmethod
    def _inner(config: Any, backend: Any) -> Optimizer:
        from . import deserialize

        if config is None:
            raise InvalidArgumentError("LossScaleOptimizer needs `inner_optimizer`: the serialized optimizer it wraps.")
        inner = config if isinstance(config, Optimizer) else deserialize(config, backend=backend)
        if not isinstance(inner, Optimizer):
            raise InvalidArgumentError(
                "The `inner_optimizer` of a LossScaleOptimizer cannot be another LossScaleOptimizer."
            )
        return inner

    def __getattr__(self, name: str) -> Any:
        # Everything not about the scaling is the inner optimizer's.
        inner = self.__dict__.get("inner_optimizer")
        if inner is None:
            raise AttributeError(name)
        return getattr(inner, name)

    def __repr__(self) -> str:
        return f"<LossScaleOptimizer name={self.name!r} scale={self.dynamic_scale} inner={self.inner_optimizer!r}>"

    # ------------------------------------------------------------------ config
    def get_config(self) -> dict[str, Any]:
        return {
            "module": "keras.optimizers",
            "class_name": self.class_name,
            "config": {
                "name": self.name,
                "inner_optimizer": self.inner_optimizer.get_config(),
                "initial_scale": self.initial_scale,
                "dynamic_growth_steps": self.dynamic_growth_steps,
            },
            "registered_name": None,
        }

    @property
    def dynamic_scale(self) -> float:
        scale = self.inner_optimizer.dynamic_loss_scale
        assert scale is not None  # set when the inner optimizer is wrapped
        return scale

    @property
    def step_counter(self) -> int:
        return self._step_counter

    # ------------------------------------------------------------------- apply
    def apply(
        self,
        grads: Mapping[str, Any],
        *,
        count_empty_step: bool = False,
        reply_into: Sequence[Any] | None = None,
        addends: Mapping[str, Any] | None = None,
    ) -> list[dict[str, np.ndarray]] | None:
        """One Keras LossScaleOptimizer.apply: skip and shrink on non-finite gradients.
        ``reply_into``, ``addends``: as the inner optimizer's ``apply`` takes them (the addends are
        added first: the finiteness test is of the sums)."""
        inner = self.inner_optimizer
        inner._require_built()
        grads = inner.sum_into(grads, addends)
        checked = inner._validated_gradients(grads, allow_empty=count_empty_step)
        if not self._all_finite(grad for _, grad in checked):
            self._set_scale(self.dynamic_scale * 0.5)
            self._step_counter = 0
            return None if reply_into is None else inner.read_variables_into_each(reply_into)
        replies = inner.apply(grads, count_empty_step=count_empty_step, reply_into=reply_into)
        if self._step_counter == self.dynamic_growth_steps - 1:
            self._set_scale(self.dynamic_scale * 2.0)
            self._step_counter = 0
        else:
            self._step_counter += 1
        return replies

    def _all_finite(self, gradients) -> bool:
        # max and min propagate NaN and show an infinity: two reads, no temporary array.
        xp = getattr(self.inner_optimizer._backend, "xp", np)
        with np.errstate(all="ignore"):
            return all(
                grad.size == 0 or bool(xp.isfinite(xp.max(grad)) and xp.isfinite(xp.min(grad))) for grad in gradients
            )

    def _set_scale(self, value: float) -> None:
        # Keras multiplies its float32 variable: the result is rounded to float32 (and may overflow to inf).
        with np.errstate(over="ignore"):
            self.inner_optimizer.dynamic_loss_scale = float(np.float32(value))

    # ----------------------------------------------------------------- scalars
    def get_scalars(self) -> dict[str, float]:
        return {
            **self.inner_optimizer.get_scalars(),
            STEP_COUNTER: float(self._step_counter),
            DYNAMIC_SCALE: self.dynamic_scale,
        }

    def set_scalars(self, values: Mapping[str, Any]) -> None:
        values = dict(self.inner_optimizer._mapping("values", values))
        own = {name: values.pop(name) for name in (STEP_COUNTER, DYNAMIC_SCALE) if name in values}
        checked = self._checked_own_scalars(own)
        self.inner_optimizer.set_scalars(values)
        self._assign_own_scalars(checked)

    def _checked_own_scalars(self, own: Mapping[str, Any]) -> dict[str, Any]:
        checked: dict[str, float] = {}
        if STEP_COUNTER in own:
            value = own[STEP_COUNTER]
            if not (check.is_finite_number(value) and value >= 0 and float(value).is_integer()):
                raise InvalidArgumentError(f"`step_counter` must be an integer >= 0. Received: step_counter={value!r}")
            checked[STEP_COUNTER] = int(value)
        if DYNAMIC_SCALE in own:
            value = own[DYNAMIC_SCALE]
            finite = check.is_finite_number(value) and value > 0 and math.isfinite(float(np.float32(value)))
            if not finite:
                raise InvalidArgumentError(
                    f"`dynamic_scale` must be a finite number > 0 in float32. Received: dynamic_scale={value!r}"
                )
            checked[DYNAMIC_SCALE] = float(np.float32(value))
        return checked

    def _assign_own_scalars(self, checked: Mapping[str, Any]) -> None:
        if STEP_COUNTER in checked:
            self._step_counter = checked[STEP_COUNTER]
        if DYNAMIC_SCALE in checked:
            self.inner_optimizer.dynamic_loss_scale = checked[DYNAMIC_SCALE]

    # ------------------------------------------------------------- checkpoints
    def state_dict(self) -> dict[str, Any]:
        return {**self.inner_optimizer.state_dict(), "config": self.get_config(), "scalars": self.get_scalars()}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        state = dict(self.inner_optimizer._mapping("state", state))
        if state.get("format") != STATE_FORMAT:
            raise InvalidArgumentError(
                f"Unknown optimizer state format {state.get('format')!r}; expected {STATE_FORMAT!r}."
            )
        config = state.get("config") or {}
        if config.get("class_name") != self.class_name:
            raise InvalidArgumentError(
                f"State was saved by a {config.get('class_name')} optimizer; this one is {self.class_name}."
            )
        scalars = dict(self.inner_optimizer._mapping("state['scalars']", state.get("scalars", {})))
        own = self._checked_own_scalars(
            {name: scalars.pop(name) for name in (STEP_COUNTER, DYNAMIC_SCALE) if name in scalars}
        )
        inner_config = (config.get("config") or {}).get("inner_optimizer") or {}
        self.inner_optimizer.load_state_dict({**state, "config": inner_config, "scalars": scalars})
        self._assign_own_scalars(own)
