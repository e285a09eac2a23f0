"""Kernels compiled for the host (optserve.server.native_kernels): NumPy's results bit for bit, or not used."""

from __future__ import annotations

import logging
import os
import shutil
import stat

import numpy as np
import pytest
from test_kernels import optimizer_kernels

from optserve.server import native_kernels, optimizers
from optserve.server.backends import NumpyBackend
from optserve.server.kernels import UpdateKernel
from optserve.server.native_kernels import NativeKernels, bits_differ, native_source, probe_arrays, probe_constants
from optserve.server.optimizers.adam import ADAM

DTYPES = [np.dtype(np.float32), np.dtype(np.float64)]
needs_compiler = pytest.mark.skipif(
    not any(shutil.which(name) for name in ("c++", "g++", "clang++")), reason="no C++ compiler on this machine"
)


@pytest.fixture(scope="module")
def natives(tmp_path_factory) -> NativeKernels:
    return NativeKernels(cache_dir=tmp_path_factory.mktemp("kernels"), enabled=True)


def _exact(kernel: UpdateKernel) -> bool:
    return kernel.functions() <= native_kernels.EXACT_FUNCTIONS


def test_only_exactly_rounded_operations_are_compiled():
    kernels = {kernel.name: kernel for kernel in optimizer_kernels()}
    # Ftrl raises to a power: NumPy's and the C library's pow differ in the last bit.
    assert "power" in kernels["ftrl"].functions()
    assert native_source(kernels["ftrl"], np.float32) is None
    assert native_source(kernels["adam"], np.float32) is not None
    assert native_source(kernels["adam"], np.float16) is None  # only float32 and float64
    assert "-ffp-contract=off" in native_kernels.FLAGS
    assert not any("fast-math" in flag or flag == "-Ofast" for flag in native_kernels.FLAGS)


@needs_compiler
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_every_exact_optimizer_kernel_compiles_and_matches_its_numpy_program(natives, dtype):
    """Each kernel against its NumPy program on values the probe did not see, in odd-sized blocks."""
    exact = [kernel for kernel in optimizer_kernels() if _exact(kernel)]
    assert len(exact) > 20
    exact += [kernel.summing() for kernel in exact if "grad" in kernel.inputs][:2]  # a sync step's last push
    for kernel in exact:
        native = natives.get(kernel, dtype)
        assert native is not None, kernel.name
        expected = probe_arrays(kernel, dtype, seed=7)
        actual = {name: array.copy() for name, array in expected.items()}
        constants = probe_constants(kernel, dtype)
        native_kernels.run_numpy_program(kernel, expected, constants)
        addresses = [actual[name].ctypes.data for name in kernel.array_names]
        size = next(iter(actual.values())).size
        for low, high in ((0, 1), (1, 1000), (1000, 1001), (1001, size)):
            native.run(addresses, constants, low, high)
        for name in kernel.state:
            assert bits_differ(expected[name], actual[name]) == "", (kernel.name, name)


@needs_compiler
def test_a_compiled_kernel_that_differs_from_numpy_is_not_used(natives, monkeypatch, caplog):
    kernel = UpdateKernel(
        name="probe_fma", inputs=("grad",), state=("var",), scalars=("lr",), body="var = var - grad * lr"
    )
    # A fused multiply-add rounds once where NumPy rounds twice: the probe must notice.
    monkeypatch.setattr(kernel, "c_operation", lambda: "s_var = std::fma(-in_grad, c0, s_var);")
    with caplog.at_level(logging.WARNING, logger=native_kernels.__name__):
        assert natives.get(kernel, np.float32) is None
    assert "differs from it" in caplog.text
    backend = NumpyBackend(threads=1, native=natives)
    arrays = {"grad": np.float32([0.1, 0.2, 0.3]), "var": np.float32([1.0, 2.0, 3.0])}
    backend.run(kernel, arrays, {"lr": 0.3})  # runs the NumPy program instead
    assert np.array_equal(arrays["var"], np.float32([1.0, 2.0, 3.0]) - np.float32([0.1, 0.2, 0.3]) * np.float32(0.3))


def test_without_a_compiler_or_when_disabled_kernels_run_their_numpy_programs(tmp_path, monkeypatch, caplog):
    assert NativeKernels(compiler="", cache_dir=tmp_path, enabled=True).get(ADAM, np.float32) is None
    monkeypatch.setenv("PATH", str(tmp_path))  # no compiler on the path
    monkeypatch.delenv("CXX", raising=False)
    monkeypatch.delenv("OPTSERVE_CXX", raising=False)
    assert NativeKernels(cache_dir=tmp_path, enabled=True).get(ADAM, np.float32) is None
    monkeypatch.setenv(native_kernels.ENABLE_ENV, "0")
    assert not NativeKernels(cache_dir=tmp_path).enabled
    broken = tmp_path / "broken-c++"
    broken.write_text("#!/bin/sh\necho 'internal compiler error' >&2\nexit 1\n")
    broken.chmod(0o755)
    monkeypatch.setenv("OPTSERVE_CXX", str(broken))
    with caplog.at_level(logging.WARNING, logger=native_kernels.__name__):
        assert NativeKernels(cache_dir=tmp_path, enabled=True).get(ADAM, np.float32) is None
    assert "compiling it failed" in caplog.text and "internal compiler error" in caplog.text


@needs_compiler
def test_a_library_is_compiled_once_per_machine_and_kept_in_a_private_directory(tmp_path):
    cache = tmp_path / "cache"
    first = NativeKernels(cache_dir=cache, enabled=True)
    assert first.get(ADAM, np.float32) is not None and first.compiled == 1
    second = NativeKernels(cache_dir=cache, enabled=True)
    assert second.get(ADAM, np.float32) is not None and second.compiled == 0  # loaded from the cache
    assert [path.suffix for path in cache.iterdir()] == [".so"]


@needs_compiler
def test_a_step_never_waits_for_the_compiler(tmp_path):
    """A kernel not yet compiled runs its NumPy program while the background thread compiles it
    (here a compiler that does nothing until the test lets it go); then the library is used."""
    go = tmp_path / "go"
    slow = tmp_path / "slow-c++"
    real = shutil.which("c++") or shutil.which("g++") or shutil.which("clang++")
    slow.write_text(
        f'#!/bin/sh\n[ "$1" = --version ] || while [ ! -e "{go}" ]; do sleep 0.05; done\nexec "{real}" "$@"\n'
    )
    slow.chmod(0o755)
    natives = NativeKernels(compiler=str(slow), cache_dir=tmp_path / "cache", enabled=True)
    arrays = probe_arrays(ADAM, np.float32, seed=4)
    expected = {name: array.copy() for name, array in arrays.items()}
    backend = NumpyBackend(threads=1, native=natives)
    scalars = {"alpha": 1e-3, "beta_1": 0.9, "beta_2": 0.999, "epsilon": 1e-7}
    backend.run(ADAM, arrays, scalars)  # returns with the compiler still held back
    assert natives.get_ready(ADAM, np.float32) is None and not natives.wait_idle(timeout=0.2)
    native_kernels.run_numpy_program(ADAM, expected, ADAM.host_constants(scalars, np.float32))
    for name in ADAM.state:
        assert bits_differ(expected[name], arrays[name]) == "", name
    go.touch()
    assert natives.wait_idle(timeout=120)
    assert natives.get_ready(ADAM, np.float32) is not None and natives.compiled == 1
    # Another process finds the library in the cache and uses it at once.
    again = NativeKernels(compiler=str(slow), cache_dir=tmp_path / "cache", enabled=True)
    assert again.get_ready(ADAM, np.float32) is not None and again.compiled == 0


def test_a_cache_directory_others_can_write_is_not_used(tmp_path, monkeypatch):
    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o777)
    monkeypatch.setenv(native_kernels.CACHE_ENV, str(shared))
    chosen = native_kernels._private_cache_dir()  # from the environment
    assert chosen != shared and not stat.S_IMODE(os.stat(chosen).st_mode) & 0o077
    private = tmp_path / "private"
    monkeypatch.setenv(native_kernels.CACHE_ENV, str(private))
    assert native_kernels._private_cache_dir() == private
    assert stat.S_IMODE(os.stat(private).st_mode) == 0o700


@needs_compiler
@pytest.mark.parametrize("name", ["Adam", "SGD", "RMSprop", "Adagrad", "Adadelta", "Adamax", "Nadam", "Lion"])
def test_a_model_of_many_variables_trains_bit_identically_with_and_without_native_kernels(natives, name):
    rng = np.random.default_rng(3)
    sizes = [1, 7, 1000, 70_000, 300_001]
    weights = {f"v{i}": rng.standard_normal(size).astype(np.float32) for i, size in enumerate(sizes)}
    config = {"class_name": name, "config": {"learning_rate": 0.01}}
    engines = []
    for backend in (NumpyBackend(threads=2, parallel_threshold=1024, native=natives), NumpyBackend(native=False)):
        engine = optimizers.deserialize(config, backend=backend)
        engine.build({key: value.copy() for key, value in weights.items()})
        engines.append(engine)
    assert engines[0]._backend.native is natives and engines[1]._backend.native is None
    for step in range(4):
        gradients = {key: rng.standard_normal(value.shape).astype(np.float32) for key, value in weights.items()}
        gradients["v0"][:] = np.nan if step == 2 else gradients["v0"]
        for engine in engines:
            engine.apply(gradients)
        assert natives.wait_idle(timeout=120)  # later steps run the compiled kernels
    assert any(native is not None for native in natives._built.values())
    native_values, numpy_values = (engine.read_variables() for engine in engines)
    for key in weights:
        assert bits_differ(numpy_values[key], native_values[key]) == "", key
