"""Adam, optionally AMSGrad (``keras.optimizers.Adam``)."""

from __future__ import annotations

import numpy as np

from ..kernels import UpdateKernel
from . import validation as check
from .base import Optimizer
from .validation import Hyperparameter

_MOMENTS = """
momentum = momentum + (grad - momentum) * (1 - beta_1)
velocity = velocity + (square(grad) - velocity) * (1 - beta_2)
"""
ADAM = UpdateKernel(
    name="adam",
    inputs=("grad",),
    state=("var", "momentum", "velocity"),
    scalars=("alpha", "beta_1", "beta_2", "epsilon"),
    body=_MOMENTS + "var = var - (momentum * alpha) / (sqrt(velocity) + epsilon)\n",
)
AMSGRAD = UpdateKernel(
    name="adam_amsgrad",
    inputs=("grad",),
    state=("var", "momentum", "velocity", "velocity_hat"),
    scalars=("alpha", "beta_1", "beta_2", "epsilon"),
    body=_MOMENTS
    + """
velocity_hat = maximum(velocity_hat, velocity)
var = var - (momentum * alpha) / (sqrt(velocity_hat) + epsilon)
""",
)


def bias_corrected_alpha(dtype, lr, beta_1: float, beta_2: float, step: int):
    """Keras's ``lr * sqrt(1 - beta_2^t) / (1 - beta_1^t)`` in the variable dtype."""
    local_step = dtype(step)
    beta_1_power = np.power(dtype(beta_1), local_step)
    beta_2_power = np.power(dtype(beta_2), local_step)
    return lr * np.sqrt(dtype(1) - beta_2_power) / (dtype(1) - beta_1_power)


class Adam(Optimizer):
    class_name = "Adam"
    default_learning_rate = 0.001
    hyperparameters = (
        # beta_1 = 1 would divide by 1 - beta_1^t = 0.
        Hyperparameter("beta_1", 0.9, check.in_interval(0, 1, high_open=True)),
        Hyperparameter("beta_2", 0.999, check.in_interval(0, 1)),
        Hyperparameter("epsilon", 1e-7, check.non_negative),
        Hyperparameter("amsgrad", False, check.boolean),
    )

    def slot_groups(self):
        groups = [[("momentum", 0.0), ("velocity", 0.0)]]
        if self.amsgrad:
            groups.append([("velocity_hat", 0.0)])
        return groups

    def update_kernel(self):
        return AMSGRAD if self.amsgrad else ADAM

    def update_scalars(self, dtype, lr):
        alpha = bias_corrected_alpha(dtype, lr, self.beta_1, self.beta_2, self.iterations + 1)
        return {"alpha": float(alpha), "beta_1": self.beta_1, "beta_2": self.beta_2, "epsilon": self.epsilon}
