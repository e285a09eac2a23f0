"""The update-math DSL (server/kernels.py) and the compute backends (server/backends.py)."""

from __future__ import annotations

import shutil
import subprocess
import sys
import textwrap
import threading
import tracemalloc

import numpy as np
import pytest

from optserve.server.backends import NumpyBackend, get_backend
from optserve.server.errors import FailedPreconditionError, InvalidArgumentError
from optserve.server.kernels import CUDA_OPTIONS, CUDA_PREAMBLE, UpdateKernel

ADAM_SCALARS = {"alpha": 1e-3, "beta_1": 0.9, "beta_2": 0.999, "epsilon": 1e-7}


def adam_kernel():
    return UpdateKernel(
        name="adam",
        inputs=("grad",),
        state=("var", "m", "v"),
        scalars=("alpha", "beta_1", "beta_2", "epsilon"),
        body="""
m = m + (grad - m) * (1 - beta_1)
v = v + (square(grad) - v) * (1 - beta_2)
var = var - (m * alpha) / (sqrt(v) + epsilon)
""",
    )


def adam_reference(grad, var, m, v, alpha, beta_1, beta_2, epsilon):
    cast = var.dtype.type
    m += (grad - m) * cast(1 - beta_1)
    v += (np.square(grad) - v) * cast(1 - beta_2)
    var -= (m * cast(alpha)) / (np.sqrt(v) + cast(epsilon))


FTRL_SCALARS = {"lr": 0.01, "lr_power": -0.5, "l1": 0.001, "l2": 0.002, "l2_shrinkage": 0.003}


def ftrl_kernel():
    return UpdateKernel(
        name="ftrl",
        inputs=("grad",),
        state=("var", "accum", "linear"),
        scalars=("lr", "lr_power", "l1", "l2", "l2_shrinkage"),
        body="""
grad_to_use = grad + (2 * l2_shrinkage) * var
new_accum = accum + square(grad)
linear = linear + (grad_to_use - (power(new_accum, -lr_power) - power(accum, -lr_power)) / lr * var)
quadratic = power(new_accum, -lr_power) / lr + 2 * l2
linear_clipped = clip(linear, -l1, l1)
var = (linear_clipped - linear) / quadratic
accum = new_accum
""",
    )


def ftrl_reference(grad, var, accum, linear, lr, lr_power, l1, l2, l2_shrinkage):
    cast = var.dtype.type
    grad_to_use = grad + cast(2 * l2_shrinkage) * var
    new_accum = accum + np.square(grad)
    power = cast(-lr_power)
    linear += grad_to_use - (np.power(new_accum, power) - np.power(accum, power)) / cast(lr) * var
    quadratic = np.power(new_accum, power) / cast(lr) + cast(2 * l2)
    linear_clipped = np.minimum(np.maximum(linear, cast(-l1)), cast(l1))
    var[...] = (linear_clipped - linear) / quadratic
    accum[...] = new_accum


def random_arrays(count, shape, dtype, seed=0):
    rng = np.random.default_rng(seed)
    return [np.asarray(rng.standard_normal(shape), dtype=dtype) for _ in range(count)]


def run_once(body, arrays, scalars=None, state=None, inputs=None, backend=None):
    """Runs a one-off kernel; arrays are copied so the caller keeps the originals."""
    scalars = dict(scalars or {})
    state = tuple(state or [name for name in arrays if name not in (inputs or ())])
    inputs = tuple(inputs or [name for name in arrays if name not in state])
    kernel = UpdateKernel(name="k", inputs=inputs, state=state, scalars=tuple(scalars), body=body)
    copies = {name: np.array(array) for name, array in arrays.items()}
    (backend or get_backend("cpu")).run(kernel, copies, scalars)
    return copies


# A small working set gives many blocks and a low threshold several threads even
# on small arrays, so block and chunk edges are exercised quickly.
SMALL_BLOCKS = NumpyBackend(threads=2, working_set_bytes=1024 * 4 * 6, parallel_threshold=4096)


# ------------------------------------------------------------------ compiler


class TestFolding:
    def test_scalar_only_subexpressions_become_one_host_value(self):
        kernel = adam_kernel()
        constants = kernel.host_constants(ADAM_SCALARS, np.float32)
        # (1 - beta_1), (1 - beta_2), alpha, epsilon: each one value.
        assert len(constants) == 4
        assert all(type(value) is np.float32 for value in constants)

    def test_folding_happens_in_float64_then_casts(self):
        kernel = UpdateKernel(name="k", inputs=(), state=("x",), scalars=("b",), body="x = x * (1 - b)")
        (value,) = kernel.host_constants({"b": 0.9}, np.float32)
        assert value == np.float32(1.0 - 0.9)  # python float first, as Keras does
        assert value != np.float32(1) - np.float32(0.9)

    def test_nested_host_expression_folds_to_a_single_constant(self):
        kernel = UpdateKernel(
            name="k",
            inputs=(),
            state=("x",),
            scalars=("lr", "b1", "b2"),
            body="x = x - x * (lr * sqrt(1 - b2) / (1 - b1))",
        )
        assert len(kernel.host_values) == 1
        (value,) = kernel.host_constants({"lr": 0.01, "b1": 0.9, "b2": 0.999}, np.float64)
        assert value == 0.01 * np.sqrt(1 - 0.999) / (1 - 0.9)

    def test_identical_host_expressions_share_a_constant(self):
        kernel = UpdateKernel(
            name="k", inputs=(), state=("x", "y"), scalars=("b",), body="x = x * (1 - b)\ny = y * (1 - b)"
        )
        assert len(kernel.host_values) == 1

    def test_folding_goes_through_named_host_temporaries(self):
        kernel = UpdateKernel(name="k", inputs=(), state=("x",), scalars=("b",), body="c = 1 - b\nd = c * 2\nx = x * d")
        assert len(kernel.host_values) == 1
        assert kernel.host_constants({"b": 0.25}, np.float64) == (1.5,)

    def test_literals_are_folded_too(self):
        out = run_once("x = x * 0.5 + 2", {"x": np.array([1.0, 2.0], np.float32)})
        assert out["x"].tolist() == [2.5, 3.0]
        assert out["x"].dtype == np.float32

    def test_left_associative_chains_are_not_reordered(self):
        # (x * a) * b keeps two roundings; only a whole scalar subtree folds.
        kernel = UpdateKernel(name="k", inputs=(), state=("x",), scalars=("a", "b"), body="x = x * a * b")
        assert len(kernel.host_values) == 2

    @pytest.mark.parametrize(
        "expression, expected",
        [
            ("a / b", np.inf),
            ("-a / b", -np.inf),
            ("b / b", np.nan),
            ("sqrt(-a)", np.nan),
            ("log(b)", -np.inf),
            ("exp(a * 1000)", np.inf),
            ("power(b, -a)", np.inf),
            ("power(-a, 0.5)", np.nan),
            ("maximum(a, b / b)", np.nan),
            ("sign(b / b)", np.nan),
        ],
    )
    def test_host_folding_follows_ieee_where_python_would_raise(self, expression, expected):
        kernel = UpdateKernel(name="k", inputs=(), state=("x",), scalars=("a", "b"), body=f"x = x + {expression}")
        (value,) = kernel.host_constants({"a": 1.0, "b": 0.0}, np.float64)
        np.testing.assert_equal(value, expected)

    @pytest.mark.parametrize("function", ["maximum", "minimum"])
    @pytest.mark.parametrize("a, b", [(0.0, -0.0), (-0.0, 0.0), (1.0, np.nan), (np.nan, 1.0)])
    def test_host_maximum_minimum_match_numpy_on_ties_and_nans(self, function, a, b):
        kernel = UpdateKernel(name="k", inputs=(), state=("x",), scalars=("a", "b"), body=f"x = {function}(a, b)")
        (value,) = kernel.host_constants({"a": a, "b": b}, np.float64)
        expected = getattr(np, function)(np.float64(a), np.float64(b))
        np.testing.assert_equal(value, expected)
        assert np.signbit(value) == np.signbit(expected)


class TestSemantics:
    def test_state_read_before_assignment_sees_the_old_value(self):
        x = np.array([1.0, 2.0], np.float32)
        y = np.array([10.0, 20.0], np.float32)
        out = run_once("y = y + x\nx = x * 3\ny = y + x", {"x": x, "y": y})
        assert out["x"].tolist() == [3.0, 6.0]
        assert out["y"].tolist() == [14.0, 28.0]  # 10 + 1 + 3

    def test_a_temporary_keeps_a_states_old_value(self):
        out = run_once("old = x\nx = x * 2\ny = old + x", {"x": np.array([1.0, 5.0]), "y": np.zeros(2)})
        assert out["x"].tolist() == [2.0, 10.0]
        assert out["y"].tolist() == [3.0, 15.0]

    def test_temporaries_can_be_reassigned(self):
        out = run_once("t = x + 1\nt = t * t\nx = t - 1", {"x": np.array([1.0, 2.0])})
        assert out["x"].tolist() == [3.0, 8.0]

    def test_state_never_assigned_is_left_alone(self):
        kernel = UpdateKernel(name="k", inputs=("g",), state=("x", "unused"), scalars=(), body="x = x + g")
        assert kernel.assigned_state == ("x",)
        arrays = {"g": np.ones(3), "x": np.zeros(3), "unused": np.full(3, 7.0)}
        get_backend("cpu").run(kernel, arrays, {})
        assert arrays["x"].tolist() == [1.0] * 3 and arrays["unused"].tolist() == [7.0] * 3

    def test_state_assigned_a_plain_value(self):
        out = run_once("x = g\ny = 0.25", {"g": np.arange(3.0), "x": np.ones(3), "y": np.ones(3)}, inputs=("g",))
        assert out["x"].tolist() == [0.0, 1.0, 2.0]
        assert out["y"].tolist() == [0.25] * 3

    def test_dead_temporaries_are_dropped(self):
        kernel = UpdateKernel(name="k", inputs=("g",), state=("x",), scalars=(), body="t = sqrt(g)\nx = x + g")
        assert "sqrt" not in kernel.numpy_program.source

    def test_temporaries_live_in_block_scratch(self):
        program = adam_kernel().numpy_program
        assert program.float_scratch == 2  # registers are reused once dead
        assert "out=a_m" in program.source and "out=a_var" in program.source

    def test_no_full_size_temporaries(self):
        backend = NumpyBackend(threads=1)
        kernel = adam_kernel()
        size = 1 << 20
        grad, var, m, v = random_arrays(4, size, np.float32)
        v = np.abs(v)
        backend.run(kernel, {"grad": grad, "var": var, "m": m, "v": v}, ADAM_SCALARS)  # scratch is made once
        tracemalloc.start()
        try:
            backend.run(kernel, {"grad": grad, "var": var, "m": m, "v": v}, ADAM_SCALARS)
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
        assert peak < size * 4 // 8, f"peak {peak} bytes: a full-size temporary was allocated"


FUNCTION_CASES = [
    ("x = sqrt(a)", lambda a, b, c: np.sqrt(a)),
    ("x = square(a)", lambda a, b, c: np.square(a)),
    ("x = abs(a)", lambda a, b, c: np.abs(a)),
    ("x = sign(a)", lambda a, b, c: np.sign(a)),
    ("x = exp(a)", lambda a, b, c: np.exp(a)),
    ("x = log(a)", lambda a, b, c: np.log(a)),
    ("x = -a", lambda a, b, c: -a),
    ("x = +a", lambda a, b, c: a),
    ("x = a - b / c", lambda a, b, c: a - b / c),
    ("x = maximum(a, b)", lambda a, b, c: np.maximum(a, b)),
    ("x = minimum(a, b)", lambda a, b, c: np.minimum(a, b)),
    ("x = clip(a, b, c)", lambda a, b, c: np.clip(a, b, c)),
    ("x = clip(a, -0.5, 0.5)", lambda a, b, c: np.clip(a, -0.5, 0.5)),
    ("x = power(abs(a), b)", lambda a, b, c: np.power(np.abs(a), b)),
    ("x = power(abs(a), 1.5)", lambda a, b, c: np.power(np.abs(a), 1.5)),
    ("x = where(a < b, a, c)", lambda a, b, c: np.where(a < b, a, c)),
    ("x = where(a <= 0, 0, c)", lambda a, b, c: np.where(a <= 0, 0, c)),
    ("x = where(a > b, a * 2, b * 3)", lambda a, b, c: np.where(a > b, a * 2, b * 3)),
    ("x = where(a >= b, 1, -1)", lambda a, b, c: np.where(a >= b, 1, -1)),
    ("x = where(a == a, a, b)", lambda a, b, c: np.where(a == a, a, b)),
    ("x = where(a != 0, b, a)", lambda a, b, c: np.where(a != 0, b, a)),
]


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("body, reference", FUNCTION_CASES, ids=[case[0] for case in FUNCTION_CASES])
def test_every_function_matches_numpy(body, reference, dtype):
    a, b, c = random_arrays(3, 1000, dtype)
    a[:5] = [0.0, -0.0, np.nan, np.inf, -1.0]
    b[:3] = [np.nan, 1.0, 0.0]
    arrays = {"a": a, "b": b, "c": c, "x": np.zeros(1000, dtype)}
    with np.errstate(all="ignore"):
        expected = reference(a, b, c).astype(dtype)
    out = run_once(body, arrays, inputs=("a", "b", "c"), backend=SMALL_BLOCKS)
    np.testing.assert_array_equal(out["x"], expected)
    assert out["x"].dtype == dtype


@pytest.mark.parametrize(
    "body, expected",
    [
        ("x = where(x < y, x, y)", np.minimum),
        ("x = where(x > y, y, x)", np.minimum),
        ("x = where(y > x, y, x)", np.maximum),
        ("y = where(x > y, x, y)", None),
    ],
)
def test_where_writing_into_one_of_its_branches(body, expected):
    x = np.array([1.0, 5.0, -2.0, 3.0])
    y = np.array([2.0, 4.0, -3.0, 3.0])
    out = run_once(body, {"x": x, "y": y})
    if expected is None:
        np.testing.assert_array_equal(out["y"], np.maximum(x, y))
    else:
        np.testing.assert_array_equal(out["x"], expected(x, y))


def test_where_with_a_folded_condition():
    arrays = {"g": np.array([1.0, 2.0]), "x": np.zeros(2)}
    on = run_once("x = where(flag > 0, g, -g)", arrays, {"flag": 1.0}, inputs=("g",))
    off = run_once("x = where(flag > 0, g, -g)", arrays, {"flag": 0.0}, inputs=("g",))
    assert on["x"].tolist() == [1.0, 2.0] and off["x"].tolist() == [-1.0, -2.0]
    kernel = UpdateKernel(name="k", inputs=(), state=("x",), scalars=("a",), body="x = x + where(a > 1, a, 1)")
    assert len(kernel.host_values) == 1  # a host-only where folds entirely


# ----------------------------------------------------------------- validation


def make(body, inputs=("g",), state=("x",), scalars=("s",), name="k"):
    return UpdateKernel(name=name, inputs=inputs, state=state, scalars=scalars, body=body)


@pytest.mark.parametrize(
    "body, message",
    [
        ("x = x + y", "unknown name `y`"),
        ("x = t\nt = g", "unknown name `t`"),
        ("x = tanh(g)", "unknown function"),
        ("x = np.sqrt(g)", "unknown function"),
        ("g = x", "`g` is an input and cannot be assigned"),
        ("s = x", "`s` is a scalar and cannot be assigned"),
        ("sqrt = x", "function name"),
        ("x = sqrt", "is a function"),
        ("x = g < 0", "comparison is only allowed as the first argument of where"),
        ("x = where(g, x, 0)", "first argument of where() must be a comparison"),
        ("x = where(0 < g < 1, x, 0)", "chained comparisons"),
        ("x = where(g < 0 and g > 1, x, 0)", "must be a comparison"),
        ("x = maximum(g)", "maximum() takes 2 argument(s)"),
        ("x = sqrt(g, g)", "sqrt() takes 1 argument(s)"),
        ("x = clip(g, lo=0, hi=1)", "no keyword arguments"),
        ("x += g", "only assignments"),
        ("x = y = g", "exactly one plain name"),
        ("x, y = g, g", "exactly one plain name"),
        ("x = g ** 2", "unsupported operator"),
        ("x = g // 2", "unsupported operator"),
        ("x = 'a'", "only numeric literals"),
        ("x = True", "only numeric literals"),
        ("x = g[0]", "unsupported expression"),
        ("x = g if s else x", "unsupported expression"),
        ("x = not g", "unsupported unary operator"),
        ("x = (g", "not valid Python syntax"),
        ("", "no statements"),
    ],
)
def test_invalid_bodies_are_rejected_at_construction(body, message):
    with pytest.raises(InvalidArgumentError, match=message.replace("(", r"\(").replace(")", r"\)")):
        make(body)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"name": "my kernel"}, "`name` must be a Python identifier"),
        ({"inputs": ("g", "g")}, "declared twice"),
        ({"state": ("x", "g")}, "declared twice"),
        ({"scalars": ("x",)}, "declared twice"),
        ({"inputs": ("1g",)}, "must be a Python identifier"),
        ({"inputs": ("_g",)}, "underscore"),
        ({"inputs": ("exp",)}, "function name"),
        ({"scalars": "s"}, "not a string"),
        ({"state": ()}, "at least one array"),
    ],
)
def test_invalid_declarations_are_rejected(kwargs, message):
    arguments = {"name": "k", "inputs": ("g",), "state": ("x",), "scalars": ("s",), "body": "x = x"}
    arguments.update(kwargs)
    with pytest.raises(InvalidArgumentError, match=message):
        UpdateKernel(**arguments)


# ---------------------------------------------------------- NumPy backend


def sizes_around_blocks(backend, kernel, dtype):
    block = backend.block_size(kernel.numpy_program, dtype)
    return [0, 1, 7, block - 1, block, block + 1, 3 * block, 3 * block + 5]


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("backend", [SMALL_BLOCKS, get_backend("cpu")], ids=["small-blocks", "default"])
def test_adam_like_body_matches_reference(backend, dtype):
    kernel = adam_kernel()
    for size in sizes_around_blocks(backend, kernel, dtype):
        grad, var, m, v = random_arrays(4, size, dtype, seed=size)
        v = np.abs(v)
        expected = [var.copy(), m.copy(), v.copy()]
        adam_reference(grad, *expected, **ADAM_SCALARS)
        arrays = {"grad": grad, "var": var, "m": m, "v": v}
        backend.run(kernel, arrays, ADAM_SCALARS)
        for name, value in zip(("var", "m", "v"), expected):
            np.testing.assert_array_equal(arrays[name], value, err_msg=f"{name} at size {size}")
            assert arrays[name].dtype == dtype


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("backend", [SMALL_BLOCKS, get_backend("cpu")], ids=["small-blocks", "default"])
def test_ftrl_like_body_matches_reference(backend, dtype):
    kernel = ftrl_kernel()
    for size in sizes_around_blocks(backend, kernel, dtype):
        grad, var, accum, linear = random_arrays(4, size, dtype, seed=size)
        accum = np.abs(accum) + dtype(0.1)
        expected = [var.copy(), accum.copy(), linear.copy()]
        with np.errstate(all="ignore"):
            ftrl_reference(grad, *expected, **FTRL_SCALARS)
        arrays = {"grad": grad, "var": var, "accum": accum, "linear": linear}
        backend.run(kernel, arrays, FTRL_SCALARS)
        for name, value in zip(("var", "accum", "linear"), expected):
            np.testing.assert_array_equal(arrays[name], value, err_msg=f"{name} at size {size}")


def test_multidimensional_and_zero_dimensional_arrays():
    kernel = adam_kernel()
    for shape in [(), (3, 4, 5), (0, 3), (1000, 37)]:
        grad, var, m, v = random_arrays(4, shape, np.float32)
        np.abs(v, out=v)
        expected = [var.copy(), m.copy(), v.copy()]
        adam_reference(grad, *expected, **ADAM_SCALARS)
        arrays = {"grad": grad, "var": var, "m": m, "v": v}
        SMALL_BLOCKS.run(kernel, arrays, ADAM_SCALARS)
        np.testing.assert_array_equal(arrays["var"], expected[0])
        assert arrays["var"].shape == shape


def test_repeated_steps_match_reference():
    kernel = adam_kernel()
    grad, var, m, v = random_arrays(4, 5000, np.float32)
    v = np.abs(v)
    expected = [var.copy(), m.copy(), v.copy()]
    for _ in range(3):
        adam_reference(grad, *expected, **ADAM_SCALARS)
        SMALL_BLOCKS.run(kernel, {"grad": grad, "var": var, "m": m, "v": v}, ADAM_SCALARS)
    np.testing.assert_array_equal(var, expected[0])


def test_concurrent_calls_from_several_threads():
    """Server threads may update different models at once: scratch is per thread, the pool shared."""
    kernel = adam_kernel()
    backend = NumpyBackend(threads=2, working_set_bytes=64 * 1024, parallel_threshold=8192)
    jobs = []
    for seed in range(4):
        grad, var, m, v = random_arrays(4, 50_000 + seed, np.float32, seed=seed)
        np.abs(v, out=v)
        expected = [var.copy(), m.copy(), v.copy()]
        for _ in range(3):
            adam_reference(grad, *expected, **ADAM_SCALARS)
        jobs.append(({"grad": grad, "var": var, "m": m, "v": v}, expected))

    def work(arrays):
        for _ in range(3):
            backend.run(kernel, arrays, ADAM_SCALARS)

    threads = [threading.Thread(target=work, args=(arrays,)) for arrays, _ in jobs]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    for arrays, expected in jobs:
        for name, value in zip(("var", "m", "v"), expected):
            np.testing.assert_array_equal(arrays[name], value)


def test_scalars_take_the_arrays_dtype():
    out = run_once("x = x * s", {"x": np.array([1.0], np.float32)}, {"s": np.float64(1 / 3)})
    assert out["x"].dtype == np.float32
    assert out["x"][0] == np.float32(1.0) * np.float32(1 / 3)
    for value in (2, np.int64(2), np.float32(2.0), np.array(2.0)):
        assert run_once("x = x * s", {"x": np.array([1.5])}, {"s": value})["x"].tolist() == [3.0]


def test_non_contiguous_input_is_handled():
    kernel = adam_kernel()
    base = random_arrays(1, (200, 10), np.float32)[0]
    grad = base[::2]  # strided view
    var, m, v = random_arrays(3, (100, 10), np.float32, seed=3)
    v = np.abs(v)
    expected = [var.copy(), m.copy(), v.copy()]
    adam_reference(np.ascontiguousarray(grad), *expected, **ADAM_SCALARS)
    SMALL_BLOCKS.run(kernel, {"grad": grad, "var": var, "m": m, "v": v}, ADAM_SCALARS)
    np.testing.assert_array_equal(var, expected[0])


def adam_arrays(size=10, dtype=np.float32):
    grad, var, m, v = random_arrays(4, size, dtype)
    return {"grad": grad, "var": var, "m": m, "v": np.abs(v)}


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda a, s: a.update(grad=a["grad"].astype(np.int32)), "float32 or float64"),
        (lambda a, s: a.update({name: a[name].astype(np.float16) for name in a}), "float32 or float64"),
        (lambda a, s: a.update(m=a["m"].astype(np.float64)), "share one shape and dtype"),
        (lambda a, s: a.update(m=a["m"][:5]), "share one shape and dtype"),
        (lambda a, s: a.pop("v"), r"Missing: \['v'\]"),
        (lambda a, s: a.update(extra=a["v"].copy()), r"unexpected: \['extra'\]"),
        (lambda a, s: a.update(grad=list(a["grad"])), "must be a numpy.ndarray"),
        (lambda a, s: a.update(var=np.zeros((10, 2), np.float32)[:, 0]), "must be C-contiguous"),
        (lambda a, s: a["m"].setflags(write=False), "read-only"),
        (lambda a, s: a.update(m=a["v"]), "overlap"),
        (lambda a, s: a.update(grad=a["var"]), "overlap"),
        (lambda a, s: a.update(grad=a["var"][:]), "overlap"),
        (lambda a, s: a.update(v=a["grad"].reshape(2, 5).reshape(-1)), "overlap"),
        (lambda a, s: s.pop("alpha"), r"Missing: \['alpha'\]"),
        (lambda a, s: s.update(gamma=1.0), r"unexpected: \['gamma'\]"),
        (lambda a, s: s.update(alpha="big"), "must be a real number"),
        (lambda a, s: s.update(alpha=np.ones(2)), "must be a real number"),
        (lambda a, s: s.update(alpha=True), "must be a real number"),
        (lambda a, s: s.update(alpha=10**400), "must be a real number"),
    ],
)
def test_invalid_calls_are_rejected_and_change_nothing(change, message):
    arrays, scalars = adam_arrays(), dict(ADAM_SCALARS)
    change(arrays, scalars)
    before = {name: np.array(value, copy=True) for name, value in arrays.items()}
    with pytest.raises(InvalidArgumentError, match=message):
        get_backend("cpu").run(adam_kernel(), arrays, scalars)
    for name, value in before.items():
        np.testing.assert_array_equal(np.asarray(arrays[name]), value)


def test_backend_storage_helpers():
    backend = get_backend("cpu")
    host = np.arange(6, dtype=np.float64).reshape(2, 3)
    owned = backend.asarray(host.T, dtype=np.float32)
    assert owned.flags.c_contiguous and owned.dtype == np.float32 and not np.shares_memory(owned, host)
    back = backend.to_host(owned)
    assert isinstance(back, np.ndarray) and not np.shares_memory(back, owned)
    filled = backend.full((2, 2), 0.1, np.float32)
    assert filled.dtype == np.float32 and filled[0, 0] == np.float32(0.1)
    backend.copy_into(filled, np.ones((2, 2)))
    assert filled.tolist() == [[1.0, 1.0], [1.0, 1.0]]
    with pytest.raises(InvalidArgumentError, match="shapes differ"):
        backend.copy_into(filled, np.ones(3))


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_sum_squares_is_computed_in_the_arrays_dtype(dtype):
    array = random_arrays(1, (300, 7), dtype)[0]
    result = get_backend("cpu").sum_squares(array)
    assert isinstance(result, float)
    assert result == float(np.sum(np.square(array)))


def test_get_backend_caches_and_validates():
    assert get_backend("cpu") is get_backend("cpu")
    assert isinstance(get_backend("cpu"), NumpyBackend)
    assert get_backend("cpu").name == "cpu" and get_backend("cpu").xp is np
    with pytest.raises(InvalidArgumentError, match="`device` must be one of"):
        get_backend("tpu")


def gpu_available() -> bool:
    try:
        from optserve.server.cupy_backend import load_cupy

        load_cupy()
        return True
    except FailedPreconditionError:
        return False


@pytest.mark.skipif(gpu_available(), reason="a GPU is present; this checks the CPU-only message")
def test_gpu_backend_without_cupy_says_what_to_do():
    with pytest.raises(FailedPreconditionError, match="device='cpu'"):
        get_backend("gpu")
    assert get_backend("auto").name == "cpu"


def test_importing_backends_never_imports_cupy():
    script = textwrap.dedent(
        """
        import sys
        import optserve.server.backends as backends
        import optserve.server.kernels as kernels
        backends.get_backend("cpu")
        kernels.UpdateKernel(name="k", inputs=(), state=("x",), scalars=(), body="x = x * 2").cuda_source()
        assert "cupy" not in sys.modules, "cupy was imported"
        print("ok")
        """
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "ok"


# ------------------------------------------------------------ CUDA source


def test_generated_cuda_source_for_adam():
    source = adam_kernel().cuda_source()
    assert source.name == "optserve_adam"
    assert source.in_params == "T in_grad, T c0, T c1, T c2, T c3"
    assert source.out_params == "T s_var, T s_m, T s_v"
    assert source.operation == textwrap.dedent(
        """\
        T v_var = s_var;
        T v_m = s_m;
        T v_v = s_v;
        v_m = (v_m + ((in_grad - v_m) * c0));
        v_v = (v_v + ((os_square(in_grad) - v_v) * c1));
        v_var = (v_var - ((v_m * c2) / (sqrt(v_v) + c3)));
        s_var = v_var;
        s_m = v_m;
        s_v = v_v;"""
    )
    assert source.preamble == CUDA_PREAMBLE
    assert source.options == CUDA_OPTIONS == ("--fmad=false",)


def test_generated_cuda_source_for_temporaries_and_functions():
    kernel = UpdateKernel(
        name="mixed",
        inputs=("g",),
        state=("x", "y", "z"),
        scalars=("lo", "hi"),
        body="""
old = x
x = clip(g, lo, hi)
t = where(g < 0, -g, abs(old))
y = power(t, 0.5) + sign(g) + exp(log(t))
""",
    )
    source = kernel.cuda_source()
    assert source.in_params == "T in_g, T c0, T c1, T c2, T c3"
    assert source.out_params == "T s_x, T s_y, T s_z"
    assert source.operation.splitlines() == [
        "T v_x = s_x;",
        "T v_y;",
        "const T t0 = v_x;",
        "v_x = os_minimum(os_maximum(in_g, c0), c1);",
        "const T t1 = ((in_g < c2) ? (-in_g) : fabs(t0));",
        "v_y = ((pow(t1, c3) + os_sign(in_g)) + exp(log(t1)));",
        "s_x = v_x;",
        "s_y = v_y;",
    ]
    assert kernel.host_constants({"lo": -1.0, "hi": 1.0}, np.float64) == (-1.0, 1.0, 0.0, 0.5)


def test_generated_cuda_source_compiles_as_cpp(tmp_path):
    """Without a GPU, a host C++ compiler still checks the generated code's syntax and types."""
    kernels = [
        adam_kernel(),
        ftrl_kernel(),
        make("y = where(s > 0, g, -x)\nx = sign(y) * exp(log(abs(y)))", state=("x", "y")),
    ]
    _compile_as_cpp(kernels, tmp_path)


def optimizer_kernels():
    """Every UpdateKernel the optimizers run: module-level kernels and those of staged programs."""
    import importlib
    import pkgutil

    from optserve.server import optimizers
    from optserve.server.optimizers.muon import newton_schulz_program
    from optserve.server.programs import UpdateProgram

    found = {}
    for module_info in pkgutil.iter_modules(optimizers.__path__):
        module = importlib.import_module(f"{optimizers.__name__}.{module_info.name}")
        for value in vars(module).values():
            if isinstance(value, (tuple, list)):
                candidates = value
            elif isinstance(value, UpdateProgram):
                candidates = value.kernels
            else:
                candidates = (value,)
            for candidate in candidates:
                if isinstance(candidate, UpdateKernel):
                    found[candidate.name] = candidate
    for kernel in newton_schulz_program((5, 3), 2, True, True).kernels:
        found[kernel.name] = kernel
    return list(found.values())


def test_every_optimizer_kernel_compiles_as_cpp(tmp_path):
    kernels = optimizer_kernels()
    names = {kernel.name for kernel in kernels}
    # The staged optimizers' kernels are among them.
    assert {
        "lion",
        "lamb_moments",
        "lamb_apply",
        "schedule_free_adamw",
        "adafactor_factor_average",
        "adafactor_apply",
        "muon_nesterov_momentum",
        "muon_combine",
        "muon_apply_adjusted",
        "adam",
        "ftrl",
    } <= names
    _compile_as_cpp(kernels, tmp_path)


def _compile_as_cpp(kernels, tmp_path):
    compiler = shutil.which("g++") or shutil.which("clang++")
    if compiler is None:
        pytest.skip("no C++ compiler found; the generated CUDA source is not compiled")
    units = [
        "#include <cmath>",
        "using std::sqrt; using std::exp; using std::log; using std::pow; using std::fabs;",
        "#define __device__",
        "#define __forceinline__ inline",
        CUDA_PREAMBLE,
    ]
    for kernel in kernels:
        source = kernel.cuda_source()
        parameters = [f"const {p}" for p in source.in_params.split(", ")]
        parameters += [p.replace("T ", "T &") for p in source.out_params.split(", ")]
        for c_type in ("float", "double"):
            units.append(
                f"namespace {source.name}_{c_type} {{ typedef {c_type} T;\n"
                f"void kernel({', '.join(parameters)}) {{\n{source.operation}\n}} }}"
            )
    path = tmp_path / "kernels.cpp"
    path.write_text("\n".join(units) + "\n")
    result = subprocess.run(
        [compiler, "-std=c++14", "-Wall", "-Werror", "-fsyntax-only", str(path)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr


def _nvrtc():
    """CuPy's NVRTC bindings with the NVRTC library loaded; skips where either is missing."""
    nvrtc = pytest.importorskip("cupy_backends.cuda.libs.nvrtc", reason="CuPy is not installed")
    try:
        nvrtc.getVersion()
    except Exception as exc:  # the library is not there (CuPy without nvidia-cuda-nvrtc)
        pytest.skip(f"NVRTC is not available: {exc}")
    return nvrtc


def _device_code(kernel, c_type: str) -> str:
    """The generated element code as one CUDA kernel over raw pointers: what the ElementwiseKernel
    that optserve.server.cupy_backend builds compiles, without a GPU to launch it on."""
    source = kernel.cuda_source()
    parameters = [f"const T* __restrict__ p_{name}" for name in kernel.inputs]
    parameters += [f"T* __restrict__ p_{name}" for name in kernel.state]
    parameters += [f"const T c{index}" for index in range(len(kernel.host_values))]
    loads = [f"const T in_{name} = p_{name}[i];" for name in kernel.inputs]
    loads += [f"T& s_{name} = p_{name}[i];" for name in kernel.state]
    return (
        f"typedef {c_type} T;\n{source.preamble}"
        f'extern "C" __global__ void {source.name}({", ".join(parameters)}, long long n) {{\n'
        "    long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x;\n"
        "    if (i >= n) return;\n" + "\n".join(loads) + "\n" + source.operation + "\n}\n"
    )


def test_every_optimizer_kernel_compiles_to_ptx_with_nvrtc_and_no_fused_multiply_add():
    """The CUDA compiler itself, without a GPU: every kernel's device code compiles for float and
    double, and ``--fmad=false`` keeps every multiply and add rounded on its own, as NumPy does."""
    from optserve.server.native_kernels import EXACT_FUNCTIONS

    nvrtc = _nvrtc()
    kernels = optimizer_kernels()
    summing = [kernel.summing() for kernel in kernels if "grad" in kernel.inputs]
    variants = [kernel.copying("var", 2) for kernel in kernels + summing if "var" in kernel.state]
    assert len(summing) > 20
    for kernel in kernels + summing + variants:
        for c_type in ("float", "double"):
            program = nvrtc.createProgram(_device_code(kernel, c_type), f"{kernel.name}.cu", [], [])
            try:
                nvrtc.compileProgram(program, [*kernel.cuda_source().options, "--gpu-architecture=compute_70"])
            except Exception:
                pytest.fail(f"{kernel.name} ({c_type}) does not compile:\n{nvrtc.getProgramLog(program)}")
            ptx = nvrtc.getPTX(program)
            ptx = ptx.decode() if isinstance(ptx, bytes) else ptx
            assert ".entry" in ptx, (kernel.name, c_type)
            # CUDA's own pow, exp and log use fused multiply-adds inside; the kernel's arithmetic never does.
            if kernel.functions() <= EXACT_FUNCTIONS:
                assert "fma." not in ptx, (kernel.name, c_type)


# ------------------------------------------------------------------ CuPy


@pytest.fixture(scope="module")
def gpu():
    pytest.importorskip("cupy", reason="CuPy is not installed; the GPU backend is not exercised")
    if not gpu_available():
        pytest.skip("CuPy is installed but no GPU is visible; the GPU backend is not exercised")
    return get_backend("gpu")


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("make_kernel, scalars", [(adam_kernel, ADAM_SCALARS), (ftrl_kernel, FTRL_SCALARS)])
def test_cupy_matches_numpy(gpu, make_kernel, scalars, dtype):
    kernel = make_kernel()
    for size in [0, 1, 1000, 100_003]:
        host = dict(zip(kernel.array_names, random_arrays(4, size, dtype, seed=size)))
        host[kernel.state[2 if kernel.name == "adam" else 1]] = np.abs(
            host[kernel.state[2 if kernel.name == "adam" else 1]]
        ) + dtype(0.1)
        device = {name: gpu.asarray(value) for name, value in host.items()}
        get_backend("cpu").run(kernel, host, scalars)
        gpu.run(kernel, device, scalars)
        for name in kernel.state:
            np.testing.assert_allclose(
                gpu.to_host(device[name]), host[name], rtol=2e-6 if dtype == np.float32 else 1e-14
            )


@pytest.mark.parametrize("body, reference", FUNCTION_CASES, ids=[case[0] for case in FUNCTION_CASES])
def test_cupy_functions_match_numpy(gpu, body, reference):
    a, b, c = random_arrays(3, 1000, np.float64)
    a[:5] = [0.0, -0.0, np.nan, np.inf, -1.0]
    b[:3] = [np.nan, 1.0, 0.0]
    kernel = UpdateKernel(name="k", inputs=("a", "b", "c"), state=("x",), scalars=(), body=body)
    host = {"a": a, "b": b, "c": c, "x": np.zeros(1000)}
    device = {name: gpu.asarray(value) for name, value in host.items()}
    get_backend("cpu").run(kernel, host, {})
    gpu.run(kernel, device, {})
    np.testing.assert_allclose(gpu.to_host(device["x"]), host["x"], rtol=1e-14, equal_nan=True)


def test_cupy_rejects_what_numpy_rejects(gpu):
    arrays = {name: gpu.asarray(value) for name, value in adam_arrays().items()}
    arrays["m"] = arrays["m"].astype(np.float64)
    with pytest.raises(InvalidArgumentError, match="share one shape and dtype"):
        gpu.run(adam_kernel(), arrays, ADAM_SCALARS)


def test_cupy_storage_helpers(gpu):
    array = gpu.asarray(np.arange(4.0), dtype=np.float32)
    assert gpu.sum_squares(array) == 14.0
    gpu.copy_into(array, np.ones(4, np.float32))
    assert gpu.to_host(array).tolist() == [1.0] * 4
    assert gpu.full((2,), 0.5, np.float32).dtype == np.float32
