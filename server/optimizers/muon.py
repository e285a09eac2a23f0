"""Muon: momentum orthogonalised by Newton-Schulz iterations (``keras.optimizers.Muon``).

2-D variables (but those whose name contains "embedding" while
``exclude_embeddings``, or matches an ``exclude_layers`` pattern) take the Muon
step: the momentum (Nesterov-corrected by default), normalised by its Frobenius
norm, goes through ``ns_steps`` quintic Newton-Schulz iterations
``A = X X^T; X = a X + (b A + (c A) A) X`` on the wide orientation of the
matrix, and the result, scaled by ``sqrt(max(rows, cols)) * rms_rate``, moves the
variable. Every other variable takes an AdamW step with ``adam_*`` arguments
and ``learning_rate * adam_lr_ratio``. Weight decay is ``weight_decay`` for the
Muon variables and ``adam_weight_decay`` for the others.

The iterations are a staged program (``optserve.server.programs``): matrix
products and elementwise kernels over buffers allocated once per variable, with
the same operand layouts as Keras's NumPy code (a tall matrix is iterated on its
transpose), so that the CPU results are Keras's bit for bit.
"""

from __future__ import annotations

import functools
import re

import numpy as np

from ..errors import InvalidArgumentError
from ..kernels import UpdateKernel
from ..programs import SAME, Elementwise, Host, MatMul, Reduce, Transpose, UpdateProgram
from . import validation as check
from .adam import ADAM, bias_corrected_alpha
from .base import Optimizer
from .validation import Hyperparameter

MOMENTUM = UpdateKernel(
    name="muon_momentum",
    inputs=("grad",),
    state=("momentum",),
    scalars=("momentum_minus_one",),
    body="momentum = momentum + (grad + momentum * momentum_minus_one)\n",
)
NESTEROV_MOMENTUM = UpdateKernel(
    name="muon_nesterov_momentum",
    inputs=("grad",),
    state=("momentum", "out"),
    scalars=("momentum_minus_one", "momentum_coefficient"),
    body="""
momentum = momentum + (grad + momentum * momentum_minus_one)
out = grad + momentum_coefficient * momentum
""",
)
NORMALIZE = UpdateKernel(
    name="muon_normalize",
    inputs=("matrix",),
    state=("out",),
    scalars=("denominator",),
    body="out = matrix / denominator\n",
)
SCALE = UpdateKernel(
    name="muon_scale",
    inputs=("matrix",),
    state=("out",),
    scalars=("muon_c",),
    body="out = muon_c * matrix\n",
)
POLYNOMIAL = UpdateKernel(
    name="muon_polynomial",
    inputs=("gram", "gram_product"),
    state=("out",),
    scalars=("muon_b",),
    body="out = muon_b * gram + gram_product\n",
)
COMBINE = UpdateKernel(
    name="muon_combine",
    inputs=("product",),
    state=("x",),
    scalars=("muon_a",),
    body="x = muon_a * x + product\n",
)
APPLY = UpdateKernel(
    name="muon_apply",
    inputs=("update",),
    state=("var",),
    scalars=("lr",),
    body="var = var - lr * update\n",
)
# Keras's lr_adjust: (lr * update) * sqrt(max(rows, cols)) * rms_rate, left to right.
APPLY_ADJUSTED = UpdateKernel(
    name="muon_apply_adjusted",
    inputs=("update",),
    state=("var",),
    scalars=("lr", "sqrt_scale", "rms_rate"),
    body="var = var - ((lr * update) * sqrt_scale) * rms_rate\n",
)
# Keras adds 1e-7 to the norm (cast to the variable dtype) before dividing.
_NORM_EPSILON = 1e-7


def _normalizer(dtype, values):
    return {"denominator": float(dtype(values["norm"]) + dtype(_NORM_EPSILON))}


@functools.cache
def newton_schulz_program(shape: tuple, steps: int, nesterov: bool, adjusted: bool) -> UpdateProgram:
    """The Muon update of one 2-D variable of ``shape``."""
    rows, columns = shape
    transposed = rows > columns  # Keras iterates on the wide orientation
    wide = (columns, rows) if transposed else (rows, columns)
    side = min(rows, columns)
    square = (side, side)
    source = "ns_input" if nesterov else "momentum"
    scratch = {
        "x": lambda s: wide,
        "product": lambda s: wide,
        "gram": lambda s: square,
        "scaled_gram": lambda s: square,
        "gram_product": lambda s: square,
        "polynomial": lambda s: square,
    }
    if nesterov:
        scratch["ns_input"] = SAME
    if transposed:
        scratch["y"] = SAME  # the normalised input, whose transpose is Keras's first X
        scratch["update"] = SAME
    stages = [
        Elementwise(NESTEROV_MOMENTUM, {"out": "ns_input"}) if nesterov else Elementwise(MOMENTUM),
        # The squares go to a buffer of the input's shape that is free at this point.
        Reduce("norm", "frobenius_norm", source, scratch="update" if transposed else "product"),
        Host(_normalizer),
        Elementwise(NORMALIZE, {"matrix": source, "out": "y" if transposed else "x"}),
    ]
    for step in range(steps):
        first = transposed and step == 0  # X is still the transposed view of y
        current = "y" if first else "x"
        stages += [
            MatMul("gram", current, current, transpose_left=first, transpose_right=not first),
            Elementwise(SCALE, {"matrix": "gram", "out": "scaled_gram"}),
            MatMul("gram_product", "scaled_gram", "gram"),
            Elementwise(POLYNOMIAL, {"out": "polynomial"}),
            MatMul("product", "polynomial", current, transpose_right=first),
        ]
        if first:
            stages.append(Transpose("x", "y"))
        stages.append(Elementwise(COMBINE))
    if transposed:
        final = "y" if steps == 0 else "update"
        if steps:
            stages.append(Transpose("update", "x"))
    else:
        final = "x"
    if adjusted:
        scale = float(np.sqrt(np.float32(max(rows, columns))))  # Keras: sqrt of an int, in float32
        stages += [Host(lambda dtype, values: {"sqrt_scale": scale}), Elementwise(APPLY_ADJUSTED, {"update": final})]
    else:
        stages.append(Elementwise(APPLY, {"update": final}))
    return UpdateProgram(name=f"muon_{rows}x{columns}", stages=stages, scratch=scratch)


def _exclude_layers(name, value):
    if value is None:
        return []  # Keras keeps `exclude_layers or []`
    if not isinstance(value, (list, tuple)) or not all(isinstance(item, str) for item in value):
        raise InvalidArgumentError(
            f"`exclude_layers` must be a list of regular expressions (strings) or None. Received: {name}={value!r}"
        )
    for pattern in value:
        try:
            re.compile(pattern)
        except re.error as error:
            raise InvalidArgumentError(
                f"`exclude_layers` holds an invalid regular expression {pattern!r}: {error}"
            ) from None
    return list(value)


def _optional_finite(name, value):
    return None if value is None else check.finite_number(name, value)


class Muon(Optimizer):
    class_name = "Muon"
    default_learning_rate = 0.001
    common_defaults = {"weight_decay": 0.004}
    hyperparameters = (
        Hyperparameter("adam_beta_1", 0.9, check.in_interval(0, 1, high_open=True)),
        Hyperparameter("adam_beta_2", 0.999, check.in_interval(0, 1)),
        Hyperparameter("epsilon", 1e-7, check.non_negative),
        Hyperparameter("exclude_layers", None, _exclude_layers),
        Hyperparameter("muon_a", 3.4445, check.finite_number),
        Hyperparameter("muon_b", -4.7750, check.finite_number),
        Hyperparameter("muon_c", 2.0315, check.finite_number),
        Hyperparameter("adam_lr_ratio", 1, check.non_negative),
        Hyperparameter("momentum", 0.95, check.in_interval(0, 1)),
        Hyperparameter("ns_steps", 5, check.non_negative_integer),
        Hyperparameter("nesterov", True, check.boolean),
        Hyperparameter("exclude_embeddings", True, check.boolean),
        Hyperparameter("adam_weight_decay", 0.004, check.optional_non_negative),
        Hyperparameter("rms_rate", 0.2, _optional_finite),
    )

    def uses_adamw(self, name: str, shape: tuple) -> bool:
        """Keras's ``_should_use_adamw``: the variable is identified by its path (our name)."""
        if len(shape) != 2:
            return True
        if self.exclude_embeddings and "embedding" in name.lower():
            return True
        return any(re.search(pattern, name) for pattern in self.exclude_layers)

    def slot_groups_for(self, name, shape):
        if self.uses_adamw(name, shape):
            return [[("momentum", 0.0)], [("velocity", 0.0)]]
        return [[("momentum", 0.0)]]

    def update_kernel_for(self, name, shape):
        if self.uses_adamw(name, shape):
            return ADAM
        return newton_schulz_program(tuple(shape), self.ns_steps, self.nesterov, self.rms_rate is not None)

    def weight_decay_for(self, name, shape):
        return self.adam_weight_decay if self.uses_adamw(name, shape) else self._config["weight_decay"]

    def update_scalars(self, dtype, lr):
        # Keras multiplies its float32 learning rate by adam_lr_ratio before the cast.
        adam_lr = dtype(np.float32(lr) * np.float32(self.adam_lr_ratio))
        alpha = bias_corrected_alpha(dtype, adam_lr, self.adam_beta_1, self.adam_beta_2, self.iterations + 1)
        return {
            # AdamW variables
            "alpha": float(alpha),
            "beta_1": self.adam_beta_1,
            "beta_2": self.adam_beta_2,
            "epsilon": self.epsilon,
            # Muon variables
            "lr": float(lr),
            "momentum_minus_one": self.momentum - 1,
            "momentum_coefficient": self.momentum,
            "muon_a": self.muon_a,
            "muon_b": self.muon_b,
            "muon_c": self.muon_c,
            "rms_rate": self.rms_rate if self.rms_rate is not None else 0.0,
        }
