"""Adagrad (``keras.optimizers.Adagrad``)."""

from __future__ import annotations

from ..kernels import UpdateKernel
from . import validation as check
from .base import Optimizer
from .validation import Hyperparameter

ADAGRAD = UpdateKernel(
    name="adagrad",
    inputs=("grad",),
    state=("var", "accumulator"),
    scalars=("lr", "epsilon"),
    body="""
accumulator = accumulator + square(grad)
var = var - (lr * grad) / sqrt(accumulator + epsilon)
""",
)


class Adagrad(Optimizer):
    class_name = "Adagrad"
    default_learning_rate = 0.001
    hyperparameters = (
        Hyperparameter("initial_accumulator_value", 0.1, check.non_negative),
        Hyperparameter("epsilon", 1e-7, check.non_negative),
    )

    def slot_groups(self):
        # Keras starts the accumulator at initial_accumulator_value, not 0.
        return [[("accumulator", self.initial_accumulator_value)]]

    def update_kernel(self):
        return ADAGRAD

    def update_scalars(self, dtype, lr):
        return {"lr": float(lr), "epsilon": self.epsilon}
