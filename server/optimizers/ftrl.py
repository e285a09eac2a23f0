"""FTRL-proximal (``keras.optimizers.Ftrl``)."""

from __future__ import annotations

from ..errors import InvalidArgumentError
from ..kernels import UpdateKernel
from . import validation as check
from .base import Optimizer
from .validation import Hyperparameter

# The variable is recomputed from `linear`, not incremented; `linear` sees the
# shrinkage-augmented gradient while the accumulator sees the raw one.
FTRL = UpdateKernel(
    name="ftrl",
    inputs=("grad",),
    state=("var", "accumulator", "linear"),
    scalars=("lr", "accumulator_power", "shrinkage", "l1", "two_l2"),
    body="""
grad_to_use = grad + shrinkage * var
new_accumulator = accumulator + square(grad)
new_power = power(new_accumulator, accumulator_power)
linear = linear + (grad_to_use - ((new_power - power(accumulator, accumulator_power)) / lr) * var)
quadratic = new_power / lr + two_l2
var = (clip(linear, -l1, l1) - linear) / quadratic
accumulator = new_accumulator
""",
)


class Ftrl(Optimizer):
    class_name = "Ftrl"
    default_learning_rate = 0.001
    hyperparameters = (
        Hyperparameter("learning_rate_power", -0.5, check.keras_non_positive),
        Hyperparameter("initial_accumulator_value", 0.1, check.keras_non_negative),
        Hyperparameter("l1_regularization_strength", 0.0, check.keras_non_negative),
        Hyperparameter("l2_regularization_strength", 0.0, check.keras_non_negative),
        Hyperparameter("l2_shrinkage_regularization_strength", 0.0, check.keras_non_negative),
        Hyperparameter("beta", 0.0, check.non_negative),
    )

    @classmethod
    def check_hyperparameters(cls, config):
        # Every term of the update divides by the learning rate.
        learning_rate = config["learning_rate"]
        if isinstance(learning_rate, float) and learning_rate <= 0:
            raise InvalidArgumentError(
                f"`learning_rate` must be > 0 for Ftrl. Received: learning_rate={learning_rate!r}"
            )

    def set_learning_rate(self, value):
        if isinstance(value, (int, float)) and not isinstance(value, bool) and value <= 0:
            raise InvalidArgumentError(f"`learning_rate` must be > 0 for Ftrl. Received: learning_rate={value!r}")
        super().set_learning_rate(value)

    def slot_groups(self):
        return [[("accumulator", self.initial_accumulator_value), ("linear", 0.0)]]

    def update_kernel(self):
        return FTRL

    def update_scalars(self, dtype, lr):
        # Keras: l2 + beta / (2 * lr), then doubled, all in the variable dtype.
        l2 = dtype(self.l2_regularization_strength) + dtype(self.beta) / (dtype(2.0) * lr)
        return {
            "lr": float(lr),
            "accumulator_power": -self.learning_rate_power,
            "shrinkage": 2 * self.l2_shrinkage_regularization_strength,
            "l1": self.l1_regularization_strength,
            "two_l2": float(dtype(2) * l2),
        }
