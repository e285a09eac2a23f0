"""SGD with optional momentum and Nesterov momentum (``keras.optimizers.SGD``)."""

from __future__ import annotations

from ..kernels import UpdateKernel
from . import validation as check
from .base import Optimizer
from .validation import Hyperparameter

PLAIN = UpdateKernel(
    name="sgd",
    inputs=("grad",),
    state=("var",),
    scalars=("lr",),
    body="var = var - grad * lr\n",
)
MOMENTUM = UpdateKernel(
    name="sgd_momentum",
    inputs=("grad",),
    state=("var", "momentum"),
    scalars=("lr", "momentum_coefficient"),
    body="""
momentum = momentum * momentum_coefficient - grad * lr
var = var + momentum
""",
)
# Nesterov: the variable moves by the freshly updated momentum's next step.
NESTEROV = UpdateKernel(
    name="sgd_nesterov",
    inputs=("grad",),
    state=("var", "momentum"),
    scalars=("lr", "momentum_coefficient"),
    body="""
momentum = momentum * momentum_coefficient - grad * lr
var = var + (momentum * momentum_coefficient - grad * lr)
""",
)


class SGD(Optimizer):
    class_name = "SGD"
    default_learning_rate = 0.01
    hyperparameters = (
        Hyperparameter("momentum", 0.0, check.sgd_momentum),
        Hyperparameter("nesterov", False, check.boolean),
    )

    def slot_groups(self):
        # Keras creates the momentum slot only when momentum != 0.
        return [[("momentum", 0.0)]] if self.momentum != 0 else []

    def update_kernel(self):
        if self.momentum == 0:
            return PLAIN
        return NESTEROV if self.nesterov else MOMENTUM

    def update_scalars(self, dtype, lr):
        return {"lr": float(lr), "momentum_coefficient": float(dtype(self.momentum))}
