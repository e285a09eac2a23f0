"""Update kernels compiled for the host CPU: the NumPy backend's fast path.

A kernel's NumPy program makes one ufunc pass per operation over each block
(Adam: twelve); the same body compiled as one C++ loop reads and writes each
element once, in registers, and the compiler vectorizes it. The C++ is generated
from the kernel's one definition (``UpdateKernel.c_operation``, shared with the
CUDA kernel), so there is still one source of the math.

The results are NumPy's bit for bit, and that is checked rather than assumed:

* only kernels whose every operation is exactly rounded in IEEE arithmetic are
  compiled (``+ - * /``, sqrt, comparisons, min/max, abs, sign, select); exp,
  log and power differ between NumPy's SIMD routines and the C library by an ulp,
  so a kernel using them keeps its NumPy program;
* the compiler may not contract ``a * b + c`` into a fused multiply-add
  (``-ffp-contract=off``) nor reorder anything (no fast-math);
* every compiled kernel is run once against its NumPy program on probe values
  (NaN, infinities, signed zeros, subnormals, huge and tiny numbers) before it is
  used; a kernel that differs in one bit is not used.

Compiled libraries are kept in a private cache directory (``OPTSERVE_KERNEL_CACHE``,
else ``$XDG_CACHE_HOME/optserve/kernels``, else ``~/.cache/optserve/kernels``),
keyed by the source, the compiler, its flags and the CPU, so a process compiles a
kernel only the first time the machine sees it (about half a second). That compile
runs on a background thread (``get_ready``): a step never waits for the compiler;
the kernel runs its NumPy program, with the same bits, until its library is ready. Without a
C++ compiler (``OPTSERVE_CXX``, ``CXX``, else ``c++``/``g++``/``clang++`` on the
path) or with ``OPTSERVE_NATIVE_KERNELS=0``, every kernel runs its NumPy program.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
import threading
from pathlib import Path

import numpy as np

from optserve.server.kernels import HOST_PREAMBLE, UpdateKernel

log = logging.getLogger(__name__)

# Operations whose C++ result is NumPy's exactly (both round once, as IEEE 754 says).
EXACT_FUNCTIONS = frozenset(
    {
        "add",
        "subtract",
        "multiply",
        "divide",
        "negative",
        "sqrt",
        "square",
        "abs",
        "sign",
        "maximum",
        "minimum",
        "where",
        "less",
        "less_equal",
        "greater",
        "greater_equal",
        "equal",
        "not_equal",
    }
)
_C_TYPES = {np.dtype(np.float32): ("float", ctypes.c_float), np.dtype(np.float64): ("double", ctypes.c_double)}
FLAGS = ("-O3", "-march=native", "-fno-math-errno", "-ffp-contract=off", "-std=c++17", "-fPIC", "-shared")
ENABLE_ENV = "OPTSERVE_NATIVE_KERNELS"
CACHE_ENV = "OPTSERVE_KERNEL_CACHE"
COMPILE_TIMEOUT_S = 120


def native_source(kernel: UpdateKernel, dtype) -> str | None:
    """The C++ of ``kernel`` over ``n`` elements of ``dtype``; None where it cannot be exact."""
    dtype = np.dtype(dtype)
    if dtype not in _C_TYPES or not kernel.functions() <= EXACT_FUNCTIONS:
        return None
    c_type = _C_TYPES[dtype][0]
    parameters = ["int64_t n"]
    parameters += [f"const T* __restrict__ p_{name}" for name in kernel.inputs]
    parameters += [f"T* __restrict__ p_{name}" for name in kernel.state]
    parameters += [f"const T c{index}" for index in range(len(kernel.host_values))]
    loads = [f"const T in_{name} = p_{name}[i];" for name in kernel.inputs]
    loads += [f"T& s_{name} = p_{name}[i];" for name in kernel.state]
    body = "\n".join("        " + line for line in loads + kernel.c_operation().splitlines())
    return (
        "#include <cmath>\n#include <cstdint>\n"
        "using std::fabs;\nusing std::sqrt;\n"
        f"typedef {c_type} T;\n{HOST_PREAMBLE}"
        f'extern "C" void {symbol(kernel)}({", ".join(parameters)}) {{\n'
        "    for (int64_t i = 0; i < n; ++i) {\n"
        f"{body}\n"
        "    }\n}\n"
    )


def symbol(kernel: UpdateKernel) -> str:
    return f"optserve_{kernel.name}"


class NativeKernel:
    """A compiled kernel for one dtype: ``run`` updates elements ``[low, high)`` of flat arrays."""

    def __init__(self, function, kernel: UpdateKernel, dtype: np.dtype):
        self.kernel = kernel
        self.dtype = dtype
        self.itemsize = dtype.itemsize
        scalar = _C_TYPES[dtype][1]
        function.restype = None
        function.argtypes = (
            [ctypes.c_int64] + [ctypes.c_void_p] * len(kernel.array_names) + [scalar] * len(kernel.host_values)
        )
        self._function = function

    def run(self, addresses, constants, low: int, high: int) -> None:
        """``addresses``: each flat array's data pointer, in ``kernel.array_names`` order.

        ctypes drops the GIL for the call, so several threads run blocks at once."""
        offset = low * self.itemsize
        self._function(high - low, *[address + offset for address in addresses], *constants)


class NativeKernels:
    """Compiles, checks and caches native kernels; ``get`` answers None wherever NumPy must do."""

    def __init__(self, compiler: str | None = None, cache_dir: str | os.PathLike | None = None, enabled=None):
        if enabled is None:
            enabled = os.environ.get(ENABLE_ENV, "1").strip().lower() not in ("0", "false", "no", "off")
        self.enabled = bool(enabled)
        self._compiler = compiler
        self._cache_dir = Path(cache_dir) if cache_dir is not None else None
        self._directory_checked: Path | None = None
        self._built: dict = {}
        self._lock = threading.Lock()
        self._queued: list = []  # (kernel, dtype) waiting for the background compiler, oldest first
        self._compiling: set = set()  # those queued or being compiled
        self._idle = threading.Condition(self._lock)
        if hasattr(os, "register_at_fork"):
            # A fork taken while another thread compiles must not leave the child's lock held.
            os.register_at_fork(after_in_child=self._new_lock)
        self._identity: str | None = None
        self.compiled = 0  # libraries compiled by this process (the rest came from the cache)

    def describe(self) -> str:
        """For the server's start-up line: how kernels run on the CPU."""
        if not self.enabled:
            return f"NumPy programs ({ENABLE_ENV}=0)"
        compiler = self._find_compiler()
        return f"compiled by {compiler}" if compiler else "NumPy programs (no C++ compiler)"

    def _new_lock(self) -> None:
        # The child has none of the parent's threads: no compile is under way there.
        self._lock = threading.Lock()
        self._idle = threading.Condition(self._lock)
        self._queued, self._compiling = [], set()

    def get(self, kernel: UpdateKernel, dtype) -> NativeKernel | None:
        """The compiled kernel (waiting for its compile if need be), or None where NumPy must do."""
        native = self.get_ready(kernel, dtype)
        if native is not None:
            return native
        key = (kernel, np.dtype(dtype))
        with self._lock:
            self._idle.wait_for(lambda: key not in self._compiling)
            return self._built.get(key)

    def get_ready(self, kernel: UpdateKernel, dtype) -> NativeKernel | None:
        """The compiled kernel if it is at hand (built, or in the cache), else None, after queueing its
        compile on the background thread: the caller runs the NumPy program meanwhile."""
        if not self.enabled:
            return None
        key = (kernel, np.dtype(dtype))
        try:
            return self._built[key]
        except KeyError:
            pass
        with self._lock:
            if key in self._built or key in self._compiling:
                return self._built.get(key)
            if not self._needs_compiling(kernel, key[1]):
                self._built[key] = self._build(kernel, key[1])  # loaded from the cache, or None: milliseconds
                return self._built[key]
            self._compiling.add(key)
            self._queued.append(key)
            if len(self._queued) == 1 and len(self._compiling) == 1:
                threading.Thread(target=self._compile_queued, name="optserve-kernel-compiler", daemon=True).start()
            return None

    def wait_idle(self, timeout: float | None = None) -> bool:
        """Wait until no compile is queued or under way; False if ``timeout`` passed first."""
        with self._lock:
            return self._idle.wait_for(lambda: not self._compiling, timeout)

    def _compile_queued(self) -> None:
        """The background compiler: one compile at a time (they share the cores with the steps)."""
        while True:
            with self._lock:
                if not self._queued:
                    return
                key = self._queued[0]
            built = self._build(*key)  # outside the lock: get_ready never waits for the compiler
            with self._lock:
                self._built[key] = built
                self._queued.remove(key)
                self._compiling.discard(key)
                self._idle.notify_all()

    def _needs_compiling(self, kernel: UpdateKernel, dtype: np.dtype) -> bool:
        """Whether building the kernel means running the compiler (its library is not in the cache)."""
        source = native_source(kernel, dtype)
        compiler = self._find_compiler() if source is not None else None
        return source is not None and compiler is not None and not self._library_path(compiler, source).exists()

    def _build(self, kernel: UpdateKernel, dtype: np.dtype) -> NativeKernel | None:
        source = native_source(kernel, dtype)
        if source is None:
            return None
        compiler = self._find_compiler()
        if compiler is None:
            return None
        try:
            library = self._library(compiler, source)
            native = NativeKernel(getattr(ctypes.CDLL(str(library)), symbol(kernel)), kernel, dtype)
        except (OSError, subprocess.SubprocessError, AttributeError) as exc:
            said = getattr(exc, "stderr", None)
            said = said.decode(errors="replace").strip()[-2000:] if isinstance(said, bytes) else ""
            log.warning(
                "kernel %s (%s) runs its NumPy program: compiling it failed: %s%s",
                kernel.name,
                dtype,
                exc,
                f"\n{said}" if said else "",
            )
            return None
        mismatch = probe_mismatch(kernel, native)
        if mismatch:
            log.warning(
                "kernel %s (%s) runs its NumPy program: the compiled kernel differs from it (%s)",
                kernel.name,
                dtype,
                mismatch,
            )
            return None
        return native

    def _find_compiler(self) -> str | None:
        if self._compiler is None:
            wanted = os.environ.get("OPTSERVE_CXX") or os.environ.get("CXX")
            candidates = [wanted] if wanted else ["c++", "g++", "clang++"]
            found = next((path for path in map(shutil.which, candidates) if path), None)
            if found is None:
                log.info("no C++ compiler found (%s): kernels run their NumPy programs", ", ".join(candidates))
            self._compiler = found or ""
        return self._compiler or None

    def _library_path(self, compiler: str, source: str) -> Path:
        digest = hashlib.sha256("\0".join([self._machine(compiler), *FLAGS, source]).encode()).hexdigest()[:32]
        return self._directory() / f"kernel-{digest}.so"

    def _library(self, compiler: str, source: str) -> Path:
        directory = self._directory()
        library = self._library_path(compiler, source)
        if library.exists():
            return library
        with tempfile.TemporaryDirectory(dir=directory) as scratch:
            source_path = Path(scratch) / "kernel.cpp"
            source_path.write_text(source)
            built = Path(scratch) / "kernel.so"
            subprocess.run(
                [compiler, *FLAGS, str(source_path), "-o", str(built)],
                check=True,
                capture_output=True,
                timeout=COMPILE_TIMEOUT_S,
            )
            os.replace(built, library)  # atomic: a process racing us loads either library, both whole
        self.compiled += 1
        return library

    def _machine(self, compiler: str) -> str:
        """What a library compiled with -march=native depends on: the compiler and this CPU."""
        if self._identity is None:
            version = subprocess.run(
                [compiler, "--version"], capture_output=True, text=True, timeout=COMPILE_TIMEOUT_S
            ).stdout
            self._identity = "\0".join([compiler, version, platform.machine(), _cpu_flags()])
        return self._identity

    def _directory(self) -> Path:
        if self._directory_checked is None:
            self._directory_checked = _private_cache_dir(self._cache_dir)
        return self._directory_checked


def _cpu_flags() -> str:
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            return next((line for line in cpuinfo if line.startswith(("flags", "Features"))), "")
    except OSError:
        return platform.processor()


def _private_cache_dir(directory: Path | None = None) -> Path:
    """``directory`` (default: the configured cache), if only this user can write it, else a fresh
    temporary one: a library loaded from it runs as this process."""
    if directory is None:
        configured = os.environ.get(CACHE_ENV)
        base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
        directory = Path(configured) if configured else Path(base) / "optserve" / "kernels"
    try:
        directory.mkdir(parents=True, exist_ok=True, mode=0o700)
        info = directory.stat()
        if info.st_uid == os.getuid() and not info.st_mode & 0o022:
            return directory
        log.warning("kernel cache %s is not private to this user; using a temporary one", directory)
    except OSError as exc:
        log.info("kernel cache %s is not usable (%s); using a temporary one", directory, exc)
    return Path(tempfile.mkdtemp(prefix="optserve-kernels-"))


# ------------------------------------------------------------------ the probe

_PROBE_VALUES = (
    0.0,
    -0.0,
    1.0,
    -1.0,
    0.5,
    -2.5,
    1e-3,
    -7.25e2,
    1e30,
    -1e30,
    1e-30,
    3.4e38,
    1e-40,
    -1e-42,
    np.inf,
    -np.inf,
    np.nan,
)
PROBE_SIZE = 4099  # not a multiple of any vector width: the loop's scalar tail runs too


def probe_arrays(kernel: UpdateKernel, dtype: np.dtype, seed: int = 0) -> dict[str, np.ndarray]:
    """Arrays for every name of ``kernel``: random values mixed with every special value."""
    rng = np.random.default_rng(seed)
    dtype = np.dtype(dtype)
    arrays = {}
    for index, name in enumerate(kernel.array_names):
        values = (rng.standard_normal(PROBE_SIZE) * 10.0 ** rng.integers(-3, 3, PROBE_SIZE)).astype(dtype)
        # Each special value meets every other one across the arrays at some element.
        special = np.asarray(_PROBE_VALUES, dtype=dtype)
        picks = rng.integers(0, special.size, PROBE_SIZE // 2)
        values[: PROBE_SIZE // 2] = special[(picks + index) % special.size]
        arrays[name] = values
    return arrays


def probe_constants(kernel: UpdateKernel, dtype: np.dtype) -> tuple:
    scalars = {name: 0.1 + 0.37 * index for index, name in enumerate(kernel.scalars)}
    return kernel.host_constants(scalars, dtype)


def probe_mismatch(kernel: UpdateKernel, native: NativeKernel) -> str:
    """'' when ``native`` gives its NumPy program's result bit for bit on probe arrays, else what differs."""
    dtype = native.dtype
    for seed in (0, 1):
        expected = probe_arrays(kernel, dtype, seed)
        actual = {name: array.copy() for name, array in expected.items()}
        constants = probe_constants(kernel, dtype)
        run_numpy_program(kernel, expected, constants)
        native.run([actual[name].ctypes.data for name in kernel.array_names], constants, 0, PROBE_SIZE)
        for name in kernel.state:
            difference = bits_differ(expected[name], actual[name])
            if difference:
                return f"state {name!r}: {difference}"
    return ""


def run_numpy_program(kernel: UpdateKernel, arrays: dict, constants: tuple) -> None:
    program = kernel.numpy_program
    size = next(iter(arrays.values())).size
    dtype = next(iter(arrays.values())).dtype
    scratch = [np.empty(size, dtype) for _ in range(program.float_scratch)]
    scratch += [np.empty(size, np.bool_) for _ in range(program.bool_scratch)]
    with np.errstate(all="ignore"):
        program.step(*[arrays[name] for name in kernel.array_names], *scratch, *constants)


def bits_differ(expected: np.ndarray, actual: np.ndarray) -> str:
    """'' when both hold the same numbers bit for bit (any NaN matches any NaN), else the first difference."""
    both_nan = np.isnan(expected) & np.isnan(actual)
    differ = (expected.view(f"u{expected.itemsize}") != actual.view(f"u{actual.itemsize}")) & ~both_nan
    if not differ.any():
        return ""
    index = int(np.flatnonzero(differ)[0])
    return f"{int(differ.sum())} element(s) differ, first at {index}: {expected[index]!r} against {actual[index]!r}"


_SHARED: NativeKernels | None = None
_SHARED_LOCK = threading.Lock()


def shared_native_kernels() -> NativeKernels:
    """The process's native kernels (compiled once, shared by every backend)."""
    global _SHARED
    if _SHARED is None:
        with _SHARED_LOCK:
            if _SHARED is None:
                _SHARED = NativeKernels()
    return _SHARED
