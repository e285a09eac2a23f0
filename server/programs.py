"""Staged updates: the update-math DSL for optimizers that are not purely elementwise.

Most optimizers are one ``UpdateKernel`` (``optserve.server.kernels``): a fused
elementwise program. Some need more: Lamb scales its update by a per-variable
trust ratio (two norms), Adafactor keeps factored row/column statistics (means
along an axis, an outer product), Muon orthogonalises its momentum with
Newton-Schulz iterations (matrix products). An ``UpdateProgram`` writes such an
update once, as a list of stages over named arrays::

    LAMB = UpdateProgram(
        name="lamb",
        scratch={"update": SAME, "squares": SAME},
        stages=(
            Elementwise(MOMENTS),                        # momentum, velocity, update
            Reduce("var_square_sum", "sum_squares", "var", scratch="squares"),
            Reduce("update_square_sum", "sum_squares", "update", scratch="squares"),
            Host(trust_ratio),                           # host math on the reductions
            Elementwise(APPLY),                          # var -= ratio * lr * update
        ),
    )

Stages run in order, per variable. Array names are ``grad``, ``var``, the
variable's slots and the program's ``scratch`` arrays (allocated once per
variable at build, so a steady-state step allocates no array); host values are
the step's scalars plus what ``Reduce`` and ``Host`` stages add. The primitives
are the same few calls on every backend (``reduce_scalar``, ``axis_mean``,
``broadcast``, ``matmul``, ``transpose_into`` besides ``run``), so a program is one definition of
the math for NumPy and CuPy alike; each primitive is the very NumPy call Keras's
NumPy backend makes, which keeps the CPU results bit-identical to Keras.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np

from optserve.server.errors import InvalidArgumentError
from optserve.server.kernels import UpdateKernel

REDUCTIONS = ("sum_squares", "mean_squares", "frobenius_norm")
BROADCAST_FUNCTIONS = ("multiply", "divide")


def SAME(shape: tuple) -> tuple:  # noqa: N802 - reads as a constant in scratch declarations
    """Scratch shaped like the variable."""
    return tuple(shape)


@dataclasses.dataclass(frozen=True)
class Elementwise:
    """Runs ``kernel``; ``bind`` maps the kernel's array names to program array names."""

    kernel: UpdateKernel
    bind: Mapping[str, str] = dataclasses.field(default_factory=dict)

    def array(self, name: str) -> str:
        return self.bind.get(name, name)


@dataclasses.dataclass(frozen=True)
class Reduce:
    """A per-variable reduction to one host value in the array's dtype.

    ``sum_squares``: sum(x ** 2); ``mean_squares``: mean(x ** 2);
    ``frobenius_norm``: the 2-D matrix norm. ``scratch`` (an array of the same
    shape) receives the squares so that the reduction allocates nothing.
    """

    into: str
    function: str
    array: str
    scratch: str | None = None


@dataclasses.dataclass(frozen=True)
class Host:
    """Host math: ``function(dtype, values) -> {name: value}`` adds host values."""

    function: Callable[[type, dict], Mapping[str, Any]]


@dataclasses.dataclass(frozen=True)
class AxisMean:
    """``into = mean(array, axis, keepdims)``, reduced in the array's dtype."""

    into: str
    array: str
    axis: int
    keepdims: bool = False


@dataclasses.dataclass(frozen=True)
class Broadcast:
    """``into = function(expand_dims(left, left_axis), expand_dims(right, right_axis))``
    with NumPy broadcasting (an axis of None: the operand as it is)."""

    into: str
    function: str
    left: str
    right: str
    left_axis: int | None = None
    right_axis: int | None = None


@dataclasses.dataclass(frozen=True)
class MatMul:
    """``into = op(left) @ op(right)`` where op transposes the last two axes when asked."""

    into: str
    left: str
    right: str
    transpose_left: bool = False
    transpose_right: bool = False


@dataclasses.dataclass(frozen=True)
class Transpose:
    """``into = array`` with its last two axes swapped, copied into ``into``'s own layout."""

    into: str
    array: str


STAGE_TYPES = (Elementwise, Reduce, Host, AxisMean, Broadcast, MatMul, Transpose)


class UpdateProgram:
    """A staged per-variable update (see the module docstring)."""

    def __init__(self, name: str, stages, scratch: Mapping[str, Callable[[tuple], tuple]] | None = None):
        self.name = name
        self.stages: tuple = tuple(stages)
        self.scratch = dict(scratch or {})
        for stage in self.stages:
            if isinstance(stage, Reduce) and stage.function not in REDUCTIONS:
                raise InvalidArgumentError(
                    f"Program `{name}`: unknown reduction {stage.function!r}; allowed: {list(REDUCTIONS)}"
                )
            if isinstance(stage, Broadcast) and stage.function not in BROADCAST_FUNCTIONS:
                raise InvalidArgumentError(
                    f"Program `{name}`: unknown broadcast function {stage.function!r}; "
                    f"allowed: {list(BROADCAST_FUNCTIONS)}"
                )
            if not isinstance(stage, STAGE_TYPES):
                raise InvalidArgumentError(f"Program `{name}`: not a stage: {stage!r}")

    def __repr__(self):
        return f"UpdateProgram(name={self.name!r}, stages={len(self.stages)})"

    @property
    def kernels(self) -> tuple[UpdateKernel, ...]:
        """The elementwise kernels of the program (for compiling and inspection)."""
        return tuple(stage.kernel for stage in self.stages if isinstance(stage, Elementwise))

    def scratch_shapes(self, shape: tuple) -> dict[str, tuple]:
        return {name: tuple(make(tuple(shape))) for name, make in self.scratch.items()}

    def run(self, backend, arrays: Mapping[str, Any], scalars: Mapping[str, Any], dtype: type) -> dict:
        """Runs every stage on ``arrays`` in place; returns the final host values."""
        values = dict(scalars)
        for stage in self.stages:
            if isinstance(stage, Elementwise):
                kernel = stage.kernel
                backend.run(
                    kernel,
                    {name: arrays[stage.array(name)] for name in kernel.array_names},
                    {name: values[name] for name in kernel.scalars},
                )
            elif isinstance(stage, Reduce):
                scratch = arrays[stage.scratch] if stage.scratch else None
                values[stage.into] = dtype(backend.reduce_scalar(stage.function, arrays[stage.array], scratch))
            elif isinstance(stage, Host):
                with np.errstate(all="ignore"):
                    values.update(stage.function(dtype, values))
            elif isinstance(stage, AxisMean):
                backend.axis_mean(arrays[stage.into], arrays[stage.array], stage.axis, stage.keepdims)
            elif isinstance(stage, Broadcast):
                backend.broadcast(
                    stage.function,
                    arrays[stage.into],
                    arrays[stage.left],
                    arrays[stage.right],
                    stage.left_axis,
                    stage.right_axis,
                )
            elif isinstance(stage, Transpose):
                backend.transpose_into(arrays[stage.into], arrays[stage.array])
            else:
                backend.matmul(
                    arrays[stage.into],
                    arrays[stage.left],
                    arrays[stage.right],
                    stage.transpose_left,
                    stage.transpose_right,
                )
        return values
