"""Adafactor (``keras.optimizers.Adafactor``).

For a variable of 2 or more dimensions the second moment is factored over the
last two axes: a row statistic ``r`` (the last axis reduced) and a column
statistic ``c`` (the second-to-last reduced) are moving averages of the mean
squared gradient, and the full ``velocity`` is rebuilt from them on every step
as ``(r / mean(r)) outer c``. Smaller variables keep a plain moving average in
``velocity`` (and, as in Keras, scalar placeholders in ``r`` and ``c``). The
update is then clipped by its RMS and scaled by the variable's RMS.

Slots per variable, in Keras's order: ``r``, ``c``, ``velocity``. (Keras names
the ``r`` and ``c`` variables after the model variable itself; here they are
called by the attribute names Keras keeps them in.)
"""

from __future__ import annotations

import numpy as np

from ..kernels import UpdateKernel
from ..programs import SAME, AxisMean, Broadcast, Elementwise, Host, Reduce, UpdateProgram
from . import validation as check
from .base import Optimizer
from .validation import Hyperparameter

REGULATED_SQUARE = UpdateKernel(
    name="adafactor_regulated_square",
    inputs=("grad",),
    state=("out",),
    scalars=("epsilon_1",),
    body="out = square(grad) + epsilon_1\n",
)
# r and c: moving averages of the row / column means of the regulated square.
FACTOR_AVERAGE = UpdateKernel(
    name="adafactor_factor_average",
    inputs=("mean",),
    state=("factor",),
    scalars=("beta_2_t", "one_minus_beta_2_t"),
    body="factor = beta_2_t * factor + one_minus_beta_2_t * mean\n",
)
SCALED_GRADIENT = UpdateKernel(
    name="adafactor_scaled_gradient",
    inputs=("grad", "velocity"),
    state=("out",),
    scalars=(),
    body="out = grad / sqrt(velocity)\n",
)
# Variables of fewer than 2 dimensions: an unfactored moving average.
UNFACTORED = UpdateKernel(
    name="adafactor_unfactored",
    inputs=("grad",),
    state=("velocity", "out"),
    scalars=("epsilon_1", "beta_2_t", "one_minus_beta_2_t"),
    body="""
velocity = beta_2_t * velocity + one_minus_beta_2_t * (square(grad) + epsilon_1)
out = grad / sqrt(velocity)
""",
)
APPLY = UpdateKernel(
    name="adafactor_apply",
    inputs=("update",),
    state=("var",),
    scalars=("alpha_t", "clip_denominator"),
    body="var = var - alpha_t * (update / clip_denominator)\n",
)


def _step_sizes(dtype, values):
    """alpha_t = max(epsilon_2, rms(var)) * rho_t; the update's RMS clip denominator."""
    alpha_t = np.maximum(dtype(values["epsilon_2"]), np.sqrt(values["var_mean_square"])) * dtype(values["rho_t"])
    clip = np.maximum(dtype(1.0), np.sqrt(values["update_mean_square"]) / dtype(values["clip_threshold"]))
    return {"alpha_t": float(alpha_t), "clip_denominator": float(clip)}


def _rows(shape):
    return shape[:-1]


def _columns(shape):
    return shape[:-2] + shape[-1:]


def _row_mean(shape):
    return shape[:-2] + (1,)


def _scalar(shape):
    return ()


_RMS_OF_VAR = Reduce("var_mean_square", "mean_squares", "var", scratch="squares")
_RMS_OF_UPDATE = Reduce("update_mean_square", "mean_squares", "update", scratch="squares")
_FINISH = (_RMS_OF_UPDATE, Host(_step_sizes), Elementwise(APPLY))

FACTORED = UpdateProgram(
    name="adafactor_factored",
    scratch={"update": SAME, "squares": SAME, "row_mean": _rows, "column_mean": _columns, "r_mean": _row_mean},
    stages=(
        _RMS_OF_VAR,
        Elementwise(REGULATED_SQUARE, {"out": "update"}),
        AxisMean("row_mean", "update", axis=-1),
        AxisMean("column_mean", "update", axis=-2),
        Elementwise(FACTOR_AVERAGE, {"factor": "r", "mean": "row_mean"}),
        Elementwise(FACTOR_AVERAGE, {"factor": "c", "mean": "column_mean"}),
        # velocity = expand_dims(r / mean(r, -1, keepdims), -1) * expand_dims(c, -2)
        AxisMean("r_mean", "r", axis=-1, keepdims=True),
        Broadcast("row_mean", "divide", "r", "r_mean"),
        Broadcast("velocity", "multiply", "row_mean", "c", left_axis=-1, right_axis=-2),
        Elementwise(SCALED_GRADIENT, {"out": "update"}),
        *_FINISH,
    ),
)
UNFACTORED_PROGRAM = UpdateProgram(
    name="adafactor_unfactored",
    scratch={"update": SAME, "squares": SAME},
    stages=(_RMS_OF_VAR, Elementwise(UNFACTORED, {"out": "update"}), *_FINISH),
)


class Adafactor(Optimizer):
    class_name = "Adafactor"
    default_learning_rate = 0.001
    hyperparameters = (
        Hyperparameter("beta_2_decay", -0.8, check.finite_number),
        Hyperparameter("epsilon_1", 1e-30, check.non_negative),
        Hyperparameter("epsilon_2", 1e-3, check.non_negative),
        Hyperparameter("clip_threshold", 1.0, check.positive_number),
        Hyperparameter("relative_step", True, check.boolean),
    )

    def slot_groups_for(self, name, shape):
        if len(shape) < 2:
            return [[("r", 0.0, _scalar)], [("c", 0.0, _scalar)], [("velocity", 0.0)]]
        return [[("r", 0.0, _rows)], [("c", 0.0, _columns)], [("velocity", 0.0)]]

    def update_kernel_for(self, name, shape):
        return FACTORED if len(shape) >= 2 else UNFACTORED_PROGRAM

    def update_scalars(self, dtype, lr):
        local_step = dtype(self.iterations + 1)
        inverse_sqrt_step = dtype(1) / np.sqrt(local_step)
        if self._schedule is None and self.relative_step:
            lr = np.minimum(lr, inverse_sqrt_step)
        beta_2_t = dtype(1) - np.power(local_step, dtype(self.beta_2_decay))
        return {
            "lr": float(lr),
            "rho_t": float(np.minimum(lr, inverse_sqrt_step)),
            "epsilon_1": self.epsilon_1,
            "epsilon_2": self.epsilon_2,
            "clip_threshold": self.clip_threshold,
            "beta_2_t": float(beta_2_t),
            "one_minus_beta_2_t": float(dtype(1) - beta_2_t),
        }
