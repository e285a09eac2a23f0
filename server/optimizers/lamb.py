"""Lamb: Adam moments scaled by a per-variable trust ratio (``keras.optimizers.Lamb``).

Not elementwise: the ratio ``||var|| / ||update||`` needs two norms of the whole
variable between the moment update and the variable update, so Lamb is a staged
program (``optserve.server.programs``): moments and update, two reductions, the
ratio on the host, the variable update.
"""

from __future__ import annotations

import numpy as np

from ..kernels import UpdateKernel
from ..programs import SAME, Elementwise, Host, Reduce, UpdateProgram
from . import validation as check
from .adam import _MOMENTS
from .base import Optimizer
from .validation import Hyperparameter

# Keras: m_hat = m / (1 - beta_1^t); update = m_hat / (sqrt(v / (1 - beta_2^t)) + epsilon).
MOMENTS_AND_UPDATE = UpdateKernel(
    name="lamb_moments",
    inputs=("grad",),
    state=("momentum", "velocity", "update"),
    scalars=("beta_1", "beta_2", "one_minus_beta_1_power", "one_minus_beta_2_power", "epsilon"),
    body=_MOMENTS
    + """
update = (momentum / one_minus_beta_1_power) / (sqrt(velocity / one_minus_beta_2_power) + epsilon)
""",
)
APPLY = UpdateKernel(
    name="lamb_apply",
    inputs=("update",),
    state=("var",),
    scalars=("ratio_lr",),
    body="var = var - ratio_lr * update\n",
)


def trust_ratio(dtype, values):
    """ratio = ||w|| / ||u|| when both are > 0, else 1 (Keras's nested where), times lr."""
    w_norm = np.sqrt(values["var_square_sum"])
    u_norm = np.sqrt(values["update_square_sum"])
    ratio = dtype(np.where(w_norm > 0, np.where(u_norm > 0, w_norm / u_norm, dtype(1.0)), dtype(1.0)))
    return {"ratio_lr": float(ratio * dtype(values["lr"]))}


LAMB = UpdateProgram(
    name="lamb",
    scratch={"update": SAME, "squares": SAME},
    stages=(
        Elementwise(MOMENTS_AND_UPDATE),
        Reduce("var_square_sum", "sum_squares", "var", scratch="squares"),
        Reduce("update_square_sum", "sum_squares", "update", scratch="squares"),
        Host(trust_ratio),
        Elementwise(APPLY),
    ),
)


class Lamb(Optimizer):
    class_name = "Lamb"
    default_learning_rate = 0.001
    hyperparameters = (
        Hyperparameter("beta_1", 0.9, check.in_interval(0, 1, high_open=True)),
        Hyperparameter("beta_2", 0.999, check.in_interval(0, 1, high_open=True)),
        Hyperparameter("epsilon", 1e-7, check.non_negative),
    )

    def slot_groups(self):
        return [[("momentum", 0.0), ("velocity", 0.0)]]

    def update_kernel(self):
        return LAMB

    def update_scalars(self, dtype, lr):
        local_step = dtype(self.iterations + 1)
        one = dtype(1.0)
        return {
            "lr": float(lr),
            "beta_1": self.beta_1,
            "beta_2": self.beta_2,
            "one_minus_beta_1_power": float(one - np.power(dtype(self.beta_1), local_step)),
            "one_minus_beta_2_power": float(one - np.power(dtype(self.beta_2), local_step)),
            "epsilon": self.epsilon,
        }
