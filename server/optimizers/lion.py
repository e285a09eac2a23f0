"""Lion, sign of an interpolated momentum (``keras.optimizers.Lion``)."""

from __future__ import annotations

from ..kernels import UpdateKernel
from . import validation as check
from .base import Optimizer
from .validation import Hyperparameter

# Keras casts beta_1 / beta_2 to the variable dtype first and takes 1 - beta
# in that dtype: the host passes both factors.
LION = UpdateKernel(
    name="lion",
    inputs=("grad",),
    state=("var", "momentum"),
    scalars=("lr", "beta_1", "one_minus_beta_1", "beta_2", "one_minus_beta_2"),
    body="""
var = var - lr * sign(momentum * beta_1 + grad * one_minus_beta_1)
momentum = momentum * beta_2 + grad * one_minus_beta_2
""",
)


class Lion(Optimizer):
    class_name = "Lion"
    default_learning_rate = 0.001
    hyperparameters = (
        Hyperparameter("beta_1", 0.9, check.lion_beta_1),
        Hyperparameter("beta_2", 0.99, check.in_interval(0, 1)),
    )

    def slot_groups(self):
        return [[("momentum", 0.0)]]

    def update_kernel(self):
        return LION

    def update_scalars(self, dtype, lr):
        one = dtype(1.0)
        beta_1, beta_2 = dtype(self.beta_1), dtype(self.beta_2)
        return {
            "lr": float(lr),
            "beta_1": float(beta_1),
            "one_minus_beta_1": float(one - beta_1),
            "beta_2": float(beta_2),
            "one_minus_beta_2": float(one - beta_2),
        }
