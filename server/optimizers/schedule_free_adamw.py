"""Schedule-Free AdamW (``keras.optimizers.ScheduleFreeAdamW``).

The variable holds the interpolation y; the ``momentum`` slot holds the
sequence z the gradient steps move (it starts as a copy of the variable); the
average x is recovered from y and the old z on every step, as Keras does.
"""

from __future__ import annotations

import numpy as np

from ..kernels import UpdateKernel
from . import validation as check
from .base import VARIABLE_VALUE, Optimizer
from .validation import Hyperparameter

# x_old is computed before `momentum` is assigned, so it reads the old z.
SCHEDULE_FREE_ADAMW = UpdateKernel(
    name="schedule_free_adamw",
    inputs=("grad",),
    state=("var", "momentum", "velocity"),
    scalars=(
        "lr",
        "beta_1",
        "one_minus_beta_1",
        "one_minus_beta_2",
        "bias_correction_2",
        "epsilon",
        "weight",
        "one_minus_weight",
    ),
    body="""
velocity = velocity + (square(grad) - velocity) * one_minus_beta_2
x_old = (var - one_minus_beta_1 * momentum) / beta_1
momentum = momentum - (lr * grad) / (sqrt(velocity / bias_correction_2) + epsilon)
x_new = one_minus_weight * x_old + weight * momentum
var = one_minus_beta_1 * momentum + beta_1 * x_new
""",
)


class ScheduleFreeAdamW(Optimizer):
    class_name = "ScheduleFreeAdamW"
    default_learning_rate = 0.0025
    hyperparameters = (
        # x_old divides by beta_1.
        Hyperparameter("beta_1", 0.9, check.in_half_open_above_zero),
        # beta_2 = 1 would divide by 1 - beta_2^t = 0.
        Hyperparameter("beta_2", 0.999, check.in_interval(0, 1, high_open=True)),
        Hyperparameter("epsilon", 1e-8, check.non_negative),
        Hyperparameter("warmup_steps", 0, check.non_negative_integer),
    )

    def slot_groups(self):
        return [[("momentum", VARIABLE_VALUE), ("velocity", 0.0)]]

    def update_kernel(self):
        return SCHEDULE_FREE_ADAMW

    def update_scalars(self, dtype, lr):
        one = dtype(1.0)
        local_step = dtype(self.iterations + 1)
        beta_1, beta_2 = dtype(self.beta_1), dtype(self.beta_2)
        if self.warmup_steps > 0:
            lr = lr * np.minimum(local_step / dtype(self.warmup_steps), one)
        weight = one / local_step
        return {
            "lr": float(lr),
            "beta_1": float(beta_1),
            "one_minus_beta_1": float(one - beta_1),
            "one_minus_beta_2": float(one - beta_2),
            "bias_correction_2": float(one - np.power(beta_2, local_step)),
            "epsilon": float(dtype(self.epsilon)),
            "weight": float(weight),
            "one_minus_weight": float(one - weight),
        }
