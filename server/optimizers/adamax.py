"""Adamax, Adam with the infinity norm (``keras.optimizers.Adamax``)."""

from __future__ import annotations

import numpy as np

from ..kernels import UpdateKernel
from . import validation as check
from .base import Optimizer
from .validation import Hyperparameter

ADAMAX = UpdateKernel(
    name="adamax",
    inputs=("grad",),
    state=("var", "momentum", "norm"),
    scalars=("lr", "beta_1", "beta_2", "epsilon", "bias_correction"),
    body="""
momentum = momentum + (grad - momentum) * (1 - beta_1)
norm = maximum(beta_2 * norm, abs(grad))
var = var - (lr * momentum) / (bias_correction * (norm + epsilon))
""",
)


class Adamax(Optimizer):
    class_name = "Adamax"
    default_learning_rate = 0.001
    hyperparameters = (
        # beta_1 = 1 would divide by 1 - beta_1^t = 0.
        Hyperparameter("beta_1", 0.9, check.in_interval(0, 1, high_open=True)),
        Hyperparameter("beta_2", 0.999, check.in_interval(0, 1)),
        Hyperparameter("epsilon", 1e-7, check.non_negative),
    )

    def slot_groups(self):
        return [[("momentum", 0.0), ("norm", 0.0)]]

    def update_kernel(self):
        return ADAMAX

    def update_scalars(self, dtype, lr):
        beta_1_power = np.power(dtype(self.beta_1), dtype(self.iterations + 1))
        return {
            "lr": float(lr),
            "beta_1": self.beta_1,
            "beta_2": self.beta_2,
            "epsilon": self.epsilon,
            "bias_correction": float(dtype(1) - beta_1_power),
        }
