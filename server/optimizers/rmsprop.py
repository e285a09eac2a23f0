"""RMSprop, optionally centered and with momentum (``keras.optimizers.RMSprop``)."""

from __future__ import annotations

from ..kernels import UpdateKernel
from . import validation as check
from .base import Optimizer
from .validation import Hyperparameter


def _rmsprop_kernel(centered: bool, with_momentum: bool) -> UpdateKernel:
    # Keras: epsilon sits inside the square root, added to the (centered) velocity.
    lines = ["velocity = rho * velocity + (1 - rho) * square(grad)"]
    if centered:
        lines.append("average_gradient = rho * average_gradient + (1 - rho) * grad")
        lines.append("increment = (lr * grad) / sqrt(velocity - square(average_gradient) + epsilon)")
    else:
        lines.append("increment = (lr * grad) / sqrt(velocity + epsilon)")
    if with_momentum:
        lines.append("momentum = momentum_coefficient * momentum + increment")
        lines.append("var = var - momentum")
    else:
        lines.append("var = var - increment")
    state = ("var", "velocity") + (("momentum",) if with_momentum else ()) + (("average_gradient",) if centered else ())
    return UpdateKernel(
        name="rmsprop" + ("_centered" if centered else "") + ("_momentum" if with_momentum else ""),
        inputs=("grad",),
        state=state,
        scalars=("lr", "rho", "epsilon") + (("momentum_coefficient",) if with_momentum else ()),
        body="\n".join(lines) + "\n",
    )


KERNELS = {(c, m): _rmsprop_kernel(c, m) for c in (False, True) for m in (False, True)}


class RMSprop(Optimizer):
    class_name = "RMSprop"
    default_learning_rate = 0.001
    hyperparameters = (
        Hyperparameter("rho", 0.9, check.in_interval(0, 1)),
        Hyperparameter("momentum", 0.0, check.in_interval(0, 1)),
        Hyperparameter("epsilon", 1e-7, check.non_negative),
        Hyperparameter("centered", False, check.boolean),
    )

    def slot_groups(self):
        groups = [[("velocity", 0.0)]]
        if self.momentum > 0:
            groups.append([("momentum", 0.0)])
        if self.centered:
            groups.append([("average_gradient", 0.0)])
        return groups

    def update_kernel(self):
        return KERNELS[(self.centered, self.momentum > 0)]

    def update_scalars(self, dtype, lr):
        # rho, epsilon and momentum enter Keras's ops as Python floats.
        return {"lr": float(lr), "rho": self.rho, "epsilon": self.epsilon, "momentum_coefficient": self.momentum}
