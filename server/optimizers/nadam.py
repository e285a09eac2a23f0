"""Nadam, Adam with Nesterov momentum (``keras.optimizers.Nadam``)."""

from __future__ import annotations

import numpy as np

from ..errors import InvalidArgumentError
from ..kernels import UpdateKernel
from . import validation as check
from .base import Optimizer
from .validation import Hyperparameter

# The momentum-schedule factors are host scalars; the kernel keeps Keras's
# operation order: (u_t_1 * m) / (1 - u_product_t_1) + ((1 - u_t) * g) / (1 - u_product_t).
NADAM = UpdateKernel(
    name="nadam",
    inputs=("grad",),
    state=("var", "momentum", "velocity"),
    scalars=(
        "lr",
        "one_minus_beta_1",
        "one_minus_beta_2",
        "epsilon",
        "u_t_1",
        "one_minus_u_t",
        "one_minus_u_product_t_1",
        "one_minus_u_product_t",
        "one_minus_beta_2_power",
    ),
    body="""
momentum = momentum + (grad - momentum) * one_minus_beta_1
velocity = velocity + (square(grad) - velocity) * one_minus_beta_2
m_hat = (u_t_1 * momentum) / one_minus_u_product_t_1 + (one_minus_u_t * grad) / one_minus_u_product_t
v_hat = velocity / one_minus_beta_2_power
var = var - (m_hat * lr) / (sqrt(v_hat) + epsilon)
""",
)
MOMENTUM_DECAY = 0.96


def momentum_schedule(dtype, beta_1, step):
    """u_t = beta_1 * (1 - 0.5 * 0.96^t), in ``dtype`` arithmetic as Keras computes it."""
    return dtype(beta_1) * (dtype(1.0) - dtype(0.5) * np.power(dtype(MOMENTUM_DECAY), dtype(step)))


class Nadam(Optimizer):
    class_name = "Nadam"
    default_learning_rate = 0.001
    hyperparameters = (
        Hyperparameter("beta_1", 0.9, check.in_interval(0, 1)),
        # beta_2 = 1 would divide the velocity by 1 - beta_2^t = 0.
        Hyperparameter("beta_2", 0.999, check.in_interval(0, 1, high_open=True)),
        Hyperparameter("epsilon", 1e-7, check.non_negative),
    )

    def __init__(self, backend=None, **kwargs):
        super().__init__(backend, **kwargs)
        # Product of every u_t so far: optimizer-wide state that no slot can rebuild.
        # Keras keeps it in the dtype of the first variable.
        self._u_product_dtype = np.dtype(np.float32)
        self._u_product = 1.0

    def on_build(self):
        self._u_product_dtype = next(iter(self._variables.values())).dtype
        self._u_product = float(self._u_product_dtype.type(self._u_product))

    def slot_groups(self):
        return [[("momentum", 0.0), ("velocity", 0.0)]]

    def update_kernel(self):
        return NADAM

    def before_update_step(self):
        # Keras: u_product * beta_1 * (1 - 0.5 * 0.96^t), multiplied left to right.
        dtype = self._u_product_dtype.type
        decay = dtype(1.0) - dtype(0.5) * np.power(dtype(MOMENTUM_DECAY), dtype(self.iterations + 1))
        self._u_product = float(dtype(self._u_product) * dtype(self.beta_1) * decay)

    def optimizer_scalars(self):
        return {"u_product": (self._u_product, self._u_product_dtype)}

    def assign_optimizer_scalars(self, values):
        if "u_product" in values:
            value = values["u_product"]
            if not np.isfinite(value):
                raise InvalidArgumentError(f"`u_product` must be finite. Received: u_product={value!r}")
            self._u_product = float(self._u_product_dtype.type(value))

    def update_scalars(self, dtype, lr):
        one = dtype(1)
        local_step = self.iterations + 1
        u_t = momentum_schedule(dtype, self.beta_1, local_step)
        u_t_1 = momentum_schedule(dtype, self.beta_1, local_step + 1)
        u_product_t = dtype(self._u_product)
        u_product_t_1 = u_product_t * u_t_1
        beta_2_power = np.power(dtype(self.beta_2), dtype(local_step))
        return {
            "lr": float(lr),
            "one_minus_beta_1": float(one - dtype(self.beta_1)),
            "one_minus_beta_2": float(one - dtype(self.beta_2)),
            "epsilon": self.epsilon,
            "u_t_1": float(u_t_1),
            "one_minus_u_t": float(one - u_t),
            "one_minus_u_product_t_1": float(one - u_product_t_1),
            "one_minus_u_product_t": float(one - u_product_t),
            "one_minus_beta_2_power": float(one - beta_2_power),
        }
