"""Adadelta (``keras.optimizers.Adadelta``)."""

from __future__ import annotations

from ..kernels import UpdateKernel
from . import validation as check
from .base import Optimizer
from .validation import Hyperparameter

ADADELTA = UpdateKernel(
    name="adadelta",
    inputs=("grad",),
    state=("var", "accumulated_grad", "accumulated_delta_var"),
    scalars=("lr", "rho", "epsilon"),
    body="""
accumulated_grad = rho * accumulated_grad + (1 - rho) * square(grad)
delta_var = -((sqrt(accumulated_delta_var + epsilon) * grad) / sqrt(accumulated_grad + epsilon))
accumulated_delta_var = rho * accumulated_delta_var + (1 - rho) * square(delta_var)
var = var + lr * delta_var
""",
)


class Adadelta(Optimizer):
    class_name = "Adadelta"
    default_learning_rate = 0.001
    hyperparameters = (
        Hyperparameter("rho", 0.95, check.in_interval(0, 1)),
        Hyperparameter("epsilon", 1e-7, check.non_negative),
    )

    def slot_groups(self):
        return [[("accumulated_grad", 0.0), ("accumulated_delta_var", 0.0)]]

    def update_kernel(self):
        return ADADELTA

    def update_scalars(self, dtype, lr):
        return {"lr": float(lr), "rho": self.rho, "epsilon": self.epsilon}
