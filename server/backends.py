"""Compute backends: where variables and slots live and where kernels run.

``get_backend("cpu")`` is the NumPy backend below; ``get_backend("gpu")`` is the
CuPy backend of ``optserve.server.cupy_backend``, which is imported only then
(importing this module never imports CuPy). ``"auto"`` picks the GPU when CuPy
imports and sees a device, else the CPU.

The NumPy backend runs a kernel's generated program over cache-sized blocks:
every temporary lives in a small per-thread scratch buffer, so one update reads
and writes each array once from main memory instead of once per ufunc, and the
blocks are shared among the usable cores' threads (ufuncs release the GIL).
"""

from __future__ import annotations

import itertools
import os
import threading
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from optserve.protos.buffers import copy_arrays
from optserve.server import bound_state
from optserve.server.bound_state import BoundCall
from optserve.server.errors import FailedPreconditionError, InvalidArgumentError
from optserve.server.kernels import SUPPORTED_DTYPES, UpdateKernel
from optserve.server.native_kernels import NativeKernel, NativeKernels, shared_native_kernels

DEVICES = ("auto", "cpu", "gpu")

# Bytes of one block's working set (all arrays' slices plus scratch), per
# thread. Not L2-sized on purpose: each ufunc call costs about a microsecond of
# Python dispatch plus a GIL hand-off between the threads, which L2-sized blocks
# (16K float32 elements for Adam) cannot amortise; 2 MiB blocks stay in L3
# across a kernel's passes and measured fastest (benchmarks/README.md).
DEFAULT_WORKING_SET_BYTES = 2 * 1024 * 1024
# Below this many elements a call runs on the calling thread only: handing work
# to the pool costs more than it saves.
DEFAULT_PARALLEL_THRESHOLD = 1 << 17
# With threads, each gets about this many blocks (blocks are never made smaller
# than MIN_PARALLEL_BLOCK elements, where per-call overhead starts to show).
BLOCKS_PER_THREAD = 4
MIN_PARALLEL_BLOCK = 16 * 1024
# Elements per block of a native kernel (one call through ctypes costs a few microseconds).
NATIVE_BLOCK = 1 << 18


def check_dtype(dtype, what="arrays") -> np.dtype:
    dtype = np.dtype(dtype)
    if dtype not in SUPPORTED_DTYPES:
        raise InvalidArgumentError(f"{what} must be float32 or float64. Received: dtype={dtype.name}")
    return dtype


def _usable_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def check_kernel_arrays(kernel: UpdateKernel, arrays: Mapping, array_type) -> tuple:
    """Validates the arrays of one kernel call; returns (arrays in kernel order, dtype, shape).

    Shared by every backend so that they reject exactly the same calls.
    """
    if not isinstance(arrays, (dict, Mapping)):
        raise InvalidArgumentError(
            f"Kernel `{kernel.name}`: `arrays` must be a dict. Received: {type(arrays).__name__}"
        )
    names = kernel.array_names
    if len(arrays) != len(names) or any(name not in arrays for name in names):
        missing = [name for name in names if name not in arrays]
        unexpected = [name for name in arrays if name not in names]
        raise InvalidArgumentError(
            f"Kernel `{kernel.name}` takes arrays {list(names)}. Missing: {missing}; unexpected: {unexpected}."
        )
    ordered = [arrays[name] for name in names]
    for name, array in zip(names, ordered):
        if not isinstance(array, array_type):
            raise InvalidArgumentError(
                f"Kernel `{kernel.name}`: `{name}` must be a {array_type.__module__}.{array_type.__name__}. "
                f"Received: {type(array).__name__}"
            )
    first = ordered[0]
    dtype, shape = first.dtype, first.shape
    if dtype not in SUPPORTED_DTYPES:
        check_dtype(dtype, f"Kernel `{kernel.name}`: arrays")
    for name, array in zip(names, ordered):
        if array.dtype != dtype or array.shape != shape:
            raise InvalidArgumentError(
                f"Kernel `{kernel.name}`: all arrays must share one shape and dtype. "
                f"`{names[0]}` is {shape} {dtype.name}, `{name}` is {array.shape} {array.dtype.name}"
            )
    for name, array in zip(names[len(kernel.inputs) :], ordered[len(kernel.inputs) :]):
        flags = array.flags
        if not flags.c_contiguous:
            raise InvalidArgumentError(
                f"Kernel `{kernel.name}`: state array `{name}` must be C-contiguous (it is updated in place)."
            )
        if not flags.writeable:
            raise InvalidArgumentError(f"Kernel `{kernel.name}`: state array `{name}` is read-only.")
    return ordered, dtype, shape


class NumpyBackend:
    """Arrays are NumPy arrays in host memory; kernels run blocked and in place."""

    name = "cpu"
    xp = np

    def __init__(
        self,
        threads: int | None = None,
        working_set_bytes: int = DEFAULT_WORKING_SET_BYTES,
        parallel_threshold: int = DEFAULT_PARALLEL_THRESHOLD,
        native: NativeKernels | bool | None = None,
    ):
        self.threads = max(1, min(_usable_cores(), 8) if threads is None else int(threads))
        self.working_set_bytes = int(working_set_bytes)
        self.parallel_threshold = int(parallel_threshold)
        self._pool: ThreadPoolExecutor | None = None
        self._pool_lock = threading.Lock()
        self._scratch = threading.local()
        self._block_sizes: dict = {}
        # Compiled kernels (optserve.server.native_kernels); None: every kernel runs its NumPy program.
        if native is None or native is True:
            native = shared_native_kernels()
        self.native: NativeKernels | None = native or None
        if hasattr(os, "register_at_fork"):
            # A forked child has none of the parent's threads: start a new pool there.
            os.register_at_fork(after_in_child=self._forget_pool)

    def _forget_pool(self) -> None:
        self._pool = None
        self._pool_lock = threading.Lock()

    def __repr__(self):
        kernels = "NumPy programs" if self.native is None else self.native.describe()
        return f"NumpyBackend(threads={self.threads}, kernels: {kernels})"

    # ------------------------------------------------------------ storage

    def asarray(self, host_array, dtype=None) -> np.ndarray:
        """An owned, C-contiguous copy."""
        return np.array(host_array, dtype=dtype, order="C", copy=True)

    def to_host(self, array) -> np.ndarray:
        return np.array(array, copy=True)

    def full(self, shape, value, dtype) -> np.ndarray:
        return np.full(shape, value, dtype=dtype)

    def copy_to_host_many(self, pairs: Sequence[tuple[np.ndarray, np.ndarray]]) -> None:
        """Device arrays copied into host arrays ``(out, array)``: here both are host arrays."""
        self.copy_many(pairs)

    def copy_many(self, pairs: Sequence[tuple[np.ndarray, np.ndarray]]) -> None:
        """``np.copyto(dst, src)`` for each pair of C-contiguous arrays of one shape, in blocks
        shared among the kernel threads (one core alone does not reach memory bandwidth)."""
        pool = self._get_pool() if self.threads > 1 else None
        copy_arrays(pairs, pool, self.threads)

    def copy_into(self, dst: np.ndarray, src) -> None:
        src = np.asarray(src)
        if src.shape != dst.shape:
            raise InvalidArgumentError(f"copy_into: shapes differ. Received: dst {dst.shape}, src {src.shape}")
        np.copyto(dst, src, casting="same_kind")

    def sum_squares(self, array) -> float:
        """sum(array ** 2) in the array's own dtype, as Keras computes norms for clipping."""
        array = np.asarray(array)
        return float(np.sum(np.square(array), keepdims=True).reshape(()))

    # ------------------------------------------- staged-program primitives
    # Each is the NumPy call Keras's NumPy backend makes for the same operation
    # (see optserve.server.programs), so the results are Keras's bit for bit.

    def reduce_scalar(self, function: str, array, scratch=None):
        """One host value in the array's dtype: sum or mean of squares, or a matrix norm."""
        with np.errstate(all="ignore"):
            squares = np.square(array) if scratch is None else np.square(array, out=scratch)
            if function == "frobenius_norm":
                # np.linalg.norm(x, axis=(-2, -1)) is sqrt(add.reduce(x * x, axis=(-2, -1))):
                # the same sum, with the squares kept in scratch instead of a new array.
                return np.sqrt(np.sum(squares))
            return np.sum(squares) if function == "sum_squares" else np.mean(squares)

    def axis_mean(self, out, array, axis: int, keepdims: bool) -> None:
        with np.errstate(all="ignore"):
            np.mean(array, axis=axis, keepdims=keepdims, out=out)

    def broadcast(self, function: str, out, left, right, left_axis=None, right_axis=None) -> None:
        left = left if left_axis is None else np.expand_dims(left, left_axis)
        right = right if right_axis is None else np.expand_dims(right, right_axis)
        with np.errstate(all="ignore"):
            getattr(np, function)(left, right, out=out)

    def transpose_into(self, out, array) -> None:
        np.copyto(out, np.swapaxes(array, -1, -2))

    def matmul(self, out, left, right, transpose_left=False, transpose_right=False) -> None:
        left = np.swapaxes(left, -1, -2) if transpose_left else left
        right = np.swapaxes(right, -1, -2) if transpose_right else right
        with np.errstate(all="ignore"):
            np.matmul(left, right, out=out)

    # ------------------------------------------------------------- kernels

    def run(self, kernel: UpdateKernel, arrays: Mapping, scalars: Mapping) -> None:
        """Applies ``kernel`` in place; validates everything before touching any array."""
        self.run_many(kernel, [arrays], scalars)

    def bind_state(self, arrays: Mapping[str, np.ndarray]) -> bound_state.BoundState | None:
        """``arrays`` (a variable's value and slots, never reallocated) checked once as kernel state:
        a ``BoundCall`` of them brings only the arrays new in each call (None: they cannot be bound)."""
        return bound_state.bind(arrays)

    def run_many(self, kernel: UpdateKernel, calls: Sequence[Mapping], scalars: Mapping) -> None:
        """Applies ``kernel`` to several independent sets of arrays (one per variable of a model) as
        one pass: every call's blocks go to the threads from one counter, so a model of many small
        variables keeps both cores busy, as one large variable does. Every call is validated before
        any array is touched; of a ``BoundCall`` (``bind_state``), only the arrays new in it are."""
        natives: dict = {}
        checked: list = []  # (arrays in kernel order, dtype, their data addresses for a native kernel)

        def native_for(dtype):
            if dtype not in natives:
                natives[dtype] = self._native(kernel, dtype)
            return natives[dtype]

        for arrays in calls:
            if isinstance(arrays, BoundCall):
                quick = bound_state.checked(kernel, arrays, native_for(arrays.state.dtype) is not None)
                if quick is not None:
                    checked.append(quick)
                    continue
                arrays = arrays.state.full_arrays(kernel, arrays.arrays)  # the full check names the fault
            ordered, dtype, _ = check_kernel_arrays(kernel, arrays, np.ndarray)
            check_no_overlap(kernel, ordered)
            addresses = None if native_for(dtype) is None else [array.ctypes.data for array in ordered]
            checked.append((ordered, dtype, addresses))
        constants = {dtype: kernel.host_constants(scalars, dtype) for dtype in natives}
        inputs = len(kernel.inputs)
        program = kernel.numpy_program
        keep_alive: list = []  # contiguous copies of strided inputs, while a native kernel reads them
        total = sum(ordered[0].size for ordered, _, _ in checked)
        if total == 0:
            return
        blocks = []  # (flat arrays, or their addresses for a native kernel; constants, low, high, native)
        block_by_dtype: dict = {}
        for ordered, dtype, addresses in checked:
            size = ordered[0].size
            if size == 0:
                continue
            native = natives[dtype]
            flat: list
            if addresses is None:
                # State is C-contiguous (checked), so reshape gives a view that writes
                # through; a strided input is copied once.
                flat = [np.ascontiguousarray(array).reshape(-1) for array in ordered[:inputs]]
                flat += [array.reshape(-1) for array in ordered[inputs:]]
            else:
                flat = list(addresses)
                for index, array in enumerate(ordered[:inputs]):
                    if flat[index] is None or not array.flags.c_contiguous:
                        copy = np.ascontiguousarray(array)
                        keep_alive.append(copy)
                        flat[index] = copy.ctypes.data
            block = block_by_dtype.get(dtype)
            if block is None:
                block = block_by_dtype[dtype] = self._block_for(program, dtype, total, native is not None)
            if size * 2 < block * 3:  # round(size / block) <= 1: one block
                blocks.append((flat, constants[dtype], 0, size, native))
                continue
            # Even blocks, up to 1.5 blocks long: a variable just over one block stays one block,
            # and a longer one is cut into equal parts, never a block and a sliver.
            count = max(1, round(size / block))
            even = -(-size // count)
            blocks += [(flat, constants[dtype], low, min(low + even, size), native) for low in range(0, size, even)]
        workers = 1 if total < self.parallel_threshold else min(self.threads, len(blocks))
        if workers == 1:
            self._run_listed(program, blocks, iter(range(len(blocks))))
            return
        # Blocks are handed out one at a time from a shared counter (its next()
        # is atomic under the GIL) rather than split in fixed halves, so a core
        # that is busy with something else simply takes fewer blocks instead of
        # holding up the whole update.
        next_blocks = itertools.count()
        pool = self._get_pool()
        futures = [pool.submit(self._run_listed, program, blocks, next_blocks) for _ in range(workers - 1)]
        try:
            self._run_listed(program, blocks, next_blocks)
        finally:
            for future in futures:
                # A helper still queued (the pool busy with another call) has
                # nothing left to do: drop it instead of waiting for it.
                if not future.cancel():
                    future.result()

    def _native(self, kernel: UpdateKernel, dtype) -> NativeKernel | None:
        # Never waits for the compiler: until a kernel's library is ready its NumPy program runs.
        return None if self.native is None else self.native.get_ready(kernel, dtype)

    def _run_listed(self, program, blocks, block_indices) -> None:
        """Runs the program on entries of ``blocks`` taken from ``block_indices`` until they run out."""
        scratch_by_dtype: dict = {}
        step = program.step
        errors = None  # NumPy's error state, set aside while a NumPy program runs
        try:
            for index in block_indices:
                if index >= len(blocks):
                    break
                flat, constants, low, high, native = blocks[index]
                if native is not None:
                    native.run(flat, constants, low, high)
                    continue
                if errors is None:
                    errors = np.seterr(all="ignore")  # inf/nan follow IEEE, as in Keras; no warnings
                    largest = max(high - low for _, _, low, high, _ in blocks)
                dtype = flat[0].dtype
                scratch = scratch_by_dtype.get(dtype)
                if scratch is None:
                    scratch = scratch_by_dtype[dtype] = self._scratch_buffers(program, dtype, largest)
                length = high - low
                step(*[array[low:high] for array in flat], *[buffer[:length] for buffer in scratch], *constants)
        finally:
            if errors is not None:
                np.seterr(**errors)

    def _block_for(self, program, dtype, size, native=False) -> int:
        # A native kernel keeps no scratch and makes one pass: its blocks only share the work out.
        block = NATIVE_BLOCK if native else self.block_size(program, dtype)
        if self.threads > 1 and size >= self.parallel_threshold:
            # Several blocks per thread, so that no thread is left alone with a
            # long last block while the others idle.
            wanted = -(-size // (self.threads * BLOCKS_PER_THREAD))
            block = min(block, max(MIN_PARALLEL_BLOCK, -(-wanted // 1024) * 1024))
        return block

    def block_size(self, program, dtype) -> int:
        """Elements per block so that all slices plus scratch fit the working-set budget."""
        key = (program, dtype)
        block = self._block_sizes.get(key)
        if block is None:
            block = self._block_sizes[key] = self._compute_block_size(program, dtype)
        return block

    def _compute_block_size(self, program, dtype) -> int:
        buffers = len(program.array_names) + program.float_scratch
        bytes_per_element = buffers * np.dtype(dtype).itemsize + program.bool_scratch
        block = self.working_set_bytes // max(bytes_per_element, 1)
        return max(1024, block // 1024 * 1024)  # whole cache lines, SIMD-friendly

    def _get_pool(self) -> ThreadPoolExecutor:
        if self._pool is None:
            with self._pool_lock:
                if self._pool is None:
                    self._pool = ThreadPoolExecutor(max_workers=self.threads - 1, thread_name_prefix="optserve-kernel")
        return self._pool

    def _scratch_buffers(self, program, dtype, block):
        """This thread's scratch for ``block`` elements, kept across calls so that
        no page is allocated or faulted in per step."""
        cache = getattr(self._scratch, "buffers", None)
        if cache is None:
            cache = self._scratch.buffers = {}
        floats, bools = cache.get(dtype, ((), ()))
        enough = (
            len(floats) >= program.float_scratch
            and len(bools) >= program.bool_scratch
            and all(buffer.size >= block for buffer in floats[:1] + bools[:1])
        )
        if not enough:
            capacity = max([block] + [buffer.size for buffer in floats[:1] + bools[:1]])
            floats = tuple(np.empty(capacity, dtype) for _ in range(max(program.float_scratch, len(floats))))
            bools = tuple(np.empty(capacity, np.bool_) for _ in range(max(program.bool_scratch, len(bools))))
            cache[dtype] = (floats, bools)
        return [buffer[:block] for buffer in floats[: program.float_scratch] + bools[: program.bool_scratch]]


def check_no_overlap(kernel: UpdateKernel, ordered, may_share_memory=np.may_share_memory) -> None:
    """A state array sharing memory with another array would be read after being
    written within one element's update; refuse it."""
    names = kernel.array_names
    for i in range(len(kernel.inputs), len(names)):
        state = ordered[i]
        for j in range(len(names)):
            if j == i or (j > len(kernel.inputs) - 1 and j < i):
                continue  # each pair once; inputs may overlap one another
            other = ordered[j]
            if other is state or (
                # Two arrays that each own their buffer cannot overlap: skip the memory check.
                (state.base is not None or other.base is not None) and may_share_memory(state, other)
            ):
                raise InvalidArgumentError(
                    f"Kernel `{kernel.name}`: arrays `{names[min(i, j)]}` and `{names[max(i, j)]}` overlap "
                    "in memory; a state array must not share memory with any other array."
                )


_BACKENDS: dict = {}
_BACKENDS_LOCK = threading.Lock()


def _gpu_backend():
    from optserve.server import cupy_backend  # the only path that imports CuPy

    return cupy_backend.CupyBackend()


def get_backend(device: str = "auto"):
    """The shared backend for ``device`` ("auto", "cpu" or "gpu")."""
    if device not in DEVICES:
        raise InvalidArgumentError(f"`device` must be one of {list(DEVICES)}. Received: device={device!r}")
    with _BACKENDS_LOCK:
        if device in _BACKENDS:
            return _BACKENDS[device]
        if device == "cpu":
            backend = NumpyBackend()
        elif device == "gpu":
            backend = _gpu_backend()
        else:
            try:
                backend = _gpu_backend()
            except FailedPreconditionError:
                backend = _BACKENDS.get("cpu") or NumpyBackend()
        _BACKENDS[device] = backend
        _BACKENDS.setdefault(backend.name, backend)
        return backend
