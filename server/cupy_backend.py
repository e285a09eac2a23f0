"""The CuPy backend: variables and slots live on one GPU; each update is one fused kernel.

This is the only module of optserve that imports CuPy, and
``optserve.server.backends`` imports it only when a GPU backend is asked for.
Each ``UpdateKernel`` becomes one ``cupy.ElementwiseKernel`` built from
``UpdateKernel.cuda_source()`` on first use and cached (CuPy itself compiles it
once per dtype).
"""

from __future__ import annotations

import threading
from collections.abc import Mapping, Sequence

import numpy as np

from optserve.server.backends import check_kernel_arrays, check_no_overlap
from optserve.server.errors import FailedPreconditionError, InvalidArgumentError
from optserve.server.kernels import UpdateKernel

_INSTALL_HINT = (
    "Install CuPy for your CUDA version (e.g. `pip install 'optserve[gpu]'`, which installs "
    "cupy-cuda12x) on a machine with an NVIDIA GPU, or run on the CPU with device='cpu' "
    "(`optserve serve --device cpu`)."
)


def load_cupy():
    """Imports CuPy and checks that a GPU is visible; FailedPreconditionError otherwise."""
    try:
        import cupy
    except Exception as exc:  # ImportError, or a broken CUDA install failing at import
        raise FailedPreconditionError(
            f"The GPU backend needs CuPy, which failed to import ({exc}). {_INSTALL_HINT}"
        ) from None
    try:
        devices = cupy.cuda.runtime.getDeviceCount()
    except Exception as exc:  # CUDARuntimeError when the driver is missing
        raise FailedPreconditionError(f"CuPy found no usable GPU ({exc}). {_INSTALL_HINT}") from None
    if devices < 1:
        raise FailedPreconditionError(f"CuPy found no GPU. {_INSTALL_HINT}")
    return cupy


class CupyBackend:
    """Arrays are CuPy arrays on the current device; kernels run as fused ElementwiseKernels."""

    name = "gpu"

    def __init__(self):
        self.xp = load_cupy()
        self._kernels: dict = {}
        self._lock = threading.Lock()

    def __repr__(self):
        return f"CupyBackend(device={self.xp.cuda.Device().id})"

    # ------------------------------------------------------------ storage

    def asarray(self, host_array, dtype=None):
        """An owned, C-contiguous copy on the device."""
        return self.xp.array(host_array, dtype=dtype, order="C", copy=True)

    def to_host(self, array) -> np.ndarray:
        if isinstance(array, np.ndarray):
            return np.array(array, copy=True)
        return self.xp.asnumpy(array)

    def full(self, shape, value, dtype):
        return self.xp.full(shape, value, dtype=dtype)

    def copy_many(self, pairs) -> None:
        for dst, src in pairs:
            self.xp.copyto(dst, src)

    def copy_to_host_many(self, pairs) -> None:
        for out, array in pairs:
            if isinstance(array, np.ndarray):
                np.copyto(out, array)
            else:
                array.get(out=out)  # straight into the (reused) host array

    def copy_into(self, dst, src) -> None:
        src = self.xp.asarray(src)
        if src.shape != dst.shape:
            raise InvalidArgumentError(f"copy_into: shapes differ. Received: dst {dst.shape}, src {src.shape}")
        self.xp.copyto(dst, src, casting="same_kind")

    def sum_squares(self, array) -> float:
        """sum(array ** 2) in the array's own dtype, as Keras computes norms for clipping."""
        array = self.xp.asarray(array)
        return float(self.xp.sum(self.xp.square(array)))

    # ------------------------------------------- staged-program primitives

    def reduce_scalar(self, function: str, array, scratch=None):
        """One host value in the array's dtype: sum or mean of squares, or a matrix norm."""
        xp = self.xp
        squares = xp.square(array) if scratch is None else xp.square(array, out=scratch)
        if function == "frobenius_norm":
            return xp.sqrt(xp.sum(squares)).get()
        reduced = xp.sum(squares) if function == "sum_squares" else xp.mean(squares)
        return reduced.get()

    def axis_mean(self, out, array, axis: int, keepdims: bool) -> None:
        self.xp.mean(array, axis=axis, keepdims=keepdims, out=out)

    def broadcast(self, function: str, out, left, right, left_axis=None, right_axis=None) -> None:
        xp = self.xp
        left = left if left_axis is None else xp.expand_dims(left, left_axis)
        right = right if right_axis is None else xp.expand_dims(right, right_axis)
        getattr(xp, function)(left, right, out=out)

    def transpose_into(self, out, array) -> None:
        self.xp.copyto(out, self.xp.swapaxes(array, -1, -2))

    def matmul(self, out, left, right, transpose_left=False, transpose_right=False) -> None:
        xp = self.xp
        left = xp.swapaxes(left, -1, -2) if transpose_left else left
        right = xp.swapaxes(right, -1, -2) if transpose_right else right
        xp.matmul(left, right, out=out)

    # ------------------------------------------------------------- kernels

    def elementwise_kernel(self, kernel: UpdateKernel):
        """The cached ElementwiseKernel of ``kernel`` (built on first use)."""
        compiled = self._kernels.get(kernel)
        if compiled is None:
            with self._lock:
                compiled = self._kernels.get(kernel)
                if compiled is None:
                    source = kernel.cuda_source()
                    compiled = self.xp.ElementwiseKernel(
                        source.in_params,
                        source.out_params,
                        source.operation,
                        source.name,
                        preamble=source.preamble,
                        options=source.options,
                    )
                    self._kernels[kernel] = compiled
        return compiled

    def run(self, kernel: UpdateKernel, arrays: Mapping, scalars: Mapping) -> None:
        """Applies ``kernel`` in place; validates everything before touching any array."""
        self.run_many(kernel, [arrays], scalars)

    def run_many(self, kernel: UpdateKernel, calls: Sequence[Mapping], scalars: Mapping) -> None:
        """``run`` for several independent sets of arrays, every one validated before any runs
        (one launch each: a GPU launch is cheap next to the host loop it replaces)."""
        checked = []
        for arrays in calls:
            ordered, dtype, _ = check_kernel_arrays(kernel, arrays, self.xp.ndarray)
            check_no_overlap(kernel, ordered, self.xp.may_share_memory)
            checked.append((ordered, kernel.host_constants(scalars, dtype)))
        compiled = self.elementwise_kernel(kernel)
        for ordered, constants in checked:
            if ordered[0].size:
                compiled(*ordered[: len(kernel.inputs)], *constants, *ordered[len(kernel.inputs) :])
