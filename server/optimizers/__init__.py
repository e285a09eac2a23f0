"""The optimizer engine: Keras 3.15's optimizers over named NumPy/CuPy arrays.

``deserialize`` takes what Keras produces or accepts for an optimizer:

* ``keras.optimizers.serialize(opt)``: ``{"module", "class_name", "config",
  "registered_name"}``, a schedule nested in ``config["learning_rate"]`` in the
  same form;
* a bare ``{"class_name": ..., "config": {...}}``, or a ``get_config()`` dict
  with a ``"class_name"`` key added;
* a string identifier such as ``"adam"`` / ``"Adam"`` / ``"SGD"``
  (case-insensitive, Keras defaults);
* the JSON text of any of these.

Anything else (an unknown optimizer or argument, an out-of-range value) raises
``InvalidArgumentError`` naming what is allowed.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from ..errors import InvalidArgumentError
from .adadelta import Adadelta
from .adafactor import Adafactor
from .adagrad import Adagrad
from .adam import Adam
from .adamax import Adamax
from .adamw import AdamW
from .base import Optimizer
from .ftrl import Ftrl
from .lamb import Lamb
from .lion import Lion
from .loss_scale_optimizer import LossScaleOptimizer
from .muon import Muon
from .nadam import Nadam
from .rmsprop import RMSprop
from .schedule_free_adamw import ScheduleFreeAdamW
from .sgd import SGD

__all__ = [
    "Adadelta",
    "Adafactor",
    "Adagrad",
    "Adam",
    "AdamW",
    "Adamax",
    "Ftrl",
    "Lamb",
    "Lion",
    "LossScaleOptimizer",
    "Muon",
    "Nadam",
    "Optimizer",
    "RMSprop",
    "SGD",
    "ScheduleFreeAdamW",
    "REGISTRY",
    "deserialize",
    "get",
    "serialize",
]

# Keras class name, lower-cased -> class (Keras looks names up the same way).
REGISTRY: dict[str, Any] = {
    cls.class_name.lower(): cls
    for cls in (
        SGD,
        RMSprop,
        Adam,
        Adadelta,
        Adagrad,
        Adamax,
        Nadam,
        Ftrl,
        AdamW,
        Lion,
        Lamb,
        ScheduleFreeAdamW,
        Adafactor,
        Muon,
        LossScaleOptimizer,
    )
}
ENGINE_TYPES = (Optimizer, LossScaleOptimizer)
_ENVELOPE_KEYS = ("module", "class_name", "config", "registered_name")


def supported_names() -> list[str]:
    return sorted(cls.class_name for cls in REGISTRY.values())


def serialize(optimizer: Optimizer) -> dict[str, Any]:
    """``keras.optimizers.serialize``'s form of ``optimizer``."""
    if not isinstance(optimizer, ENGINE_TYPES):
        raise InvalidArgumentError(f"Expected an optimizer. Received: {optimizer!r}")
    return optimizer.get_config()


# The config key that carries `exclude_from_weight_decay(var_names=...)` patterns.
WEIGHT_DECAY_EXCLUSIONS = "weight_decay_exclusions"


def get(identifier: Any, backend: Any = None) -> Optimizer | LossScaleOptimizer:
    """``keras.optimizers.get``: an optimizer is returned as is; anything else is deserialized."""
    if isinstance(identifier, ENGINE_TYPES):
        return identifier
    return deserialize(identifier, backend=backend)


def deserialize(config: Any, backend: Any = None) -> Optimizer | LossScaleOptimizer:
    """A new, unbuilt optimizer from any form Keras serializes or identifies it by."""
    if isinstance(config, (bytes, bytearray)):
        config = config.decode("utf-8")
    if isinstance(config, str):
        return _from_string(config, backend)
    if isinstance(config, Mapping):
        class_name, arguments = _split_config(config)
        # Not a constructor argument in Keras either: `exclude_from_weight_decay(var_names=...)`
        # before build. A client sends the patterns in the config, so every worker must agree.
        exclusions = arguments.pop(WEIGHT_DECAY_EXCLUSIONS, None)
        engine = _lookup(class_name)(backend=backend, **arguments)
        if exclusions is not None:
            if not isinstance(exclusions, (list, tuple)) or not hasattr(engine, "exclude_from_weight_decay"):
                raise InvalidArgumentError(
                    f"`{WEIGHT_DECAY_EXCLUSIONS}` must be a list of regular expressions (strings) of a plain "
                    f"optimizer's config. Received: {exclusions!r}"
                )
            engine.exclude_from_weight_decay(list(exclusions))
        return engine
    raise InvalidArgumentError(
        "Could not interpret optimizer identifier: expected a name such as 'adam', a serialized "
        f"optimizer dict or its JSON text. Received: {config!r}"
    )


def _from_string(text: str, backend: Any) -> Optimizer | LossScaleOptimizer:
    stripped = text.strip()
    try:
        decoded = json.loads(stripped)
    except json.JSONDecodeError as error:
        if stripped[:1] in ("{", "[", '"'):
            raise InvalidArgumentError(f"The optimizer config is not valid JSON: {error}") from None
        return _lookup(stripped)(backend=backend)  # a plain identifier such as adam
    if isinstance(decoded, str) and decoded.strip()[:1] in ("{", "[", '"'):
        raise InvalidArgumentError("The optimizer config is JSON text encoded twice.")
    return deserialize(decoded, backend=backend)


def _split_config(config: Mapping[str, Any]) -> tuple[str, dict[str, Any]]:
    class_name = config.get("class_name")
    if not isinstance(class_name, str):
        raise InvalidArgumentError(
            "An optimizer config needs a string 'class_name' (one of "
            f"{', '.join(supported_names())}). Received keys: {sorted(map(str, config))}"
        )
    _check_origin(config, class_name)
    if "config" in config:
        arguments = config["config"]
        extra = sorted(set(config) - set(_ENVELOPE_KEYS))
        if extra:
            raise InvalidArgumentError(
                f"Unexpected key(s) {extra} next to 'config'; allowed: {', '.join(_ENVELOPE_KEYS)}."
            )
        if not isinstance(arguments, Mapping):
            raise InvalidArgumentError(f"The optimizer 'config' must be a dict. Received: config={arguments!r}")
    else:  # a get_config() dict with "class_name" added
        arguments = {k: v for k, v in config.items() if k not in _ENVELOPE_KEYS}
    return class_name, dict(arguments)


def _check_origin(config: Mapping[str, Any], class_name: str) -> None:
    # Only Keras's built-in optimizers exist here; a custom registered class
    # that shares a built-in's name must not be silently replaced by it.
    module = config.get("module")
    if module is not None and not (isinstance(module, str) and module.split(".")[0] == "keras"):
        raise InvalidArgumentError(
            f"Only Keras's built-in optimizers are supported. Received: module={module!r} for class_name={class_name!r}"
        )
    registered_name = config.get("registered_name")
    if registered_name is not None and str(registered_name).lower() != class_name.lower():
        raise InvalidArgumentError(
            f"Custom optimizers are not supported. Received: registered_name={registered_name!r}"
        )


def _lookup(class_name: str) -> type[Optimizer]:
    cls = REGISTRY.get(class_name.lower())
    if cls is None:
        raise InvalidArgumentError(
            f"Unknown optimizer: {class_name!r}. Supported: {', '.join(supported_names())} (case-insensitive)."
        )
    return cls
