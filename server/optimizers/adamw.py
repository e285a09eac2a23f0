"""AdamW: Adam with decoupled weight decay on by default (``keras.optimizers.AdamW``).

Keras's AdamW is Adam with ``weight_decay=0.004`` by default and ``None``
refused; the decay itself is the common pipeline's decoupled step.
"""

from __future__ import annotations

from ..errors import InvalidArgumentError
from .adam import Adam


class AdamW(Adam):
    class_name = "AdamW"
    common_defaults = {"weight_decay": 0.004}

    @classmethod
    def check_hyperparameters(cls, config):
        if config["weight_decay"] is None:
            # Keras's own message.
            raise InvalidArgumentError("Argument `weight_decay` must be a float. Received: weight_decay=None")
