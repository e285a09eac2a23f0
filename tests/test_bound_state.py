"""State bound once (optserve.server.bound_state): a BoundCall is refused exactly where the full
check refuses the same arrays as a dict, with the same message, and otherwise gives the same bits."""

from __future__ import annotations

import gc
import sys

import numpy as np
import pytest

from optserve.server import bound_state, optimizers
from optserve.server.backends import NumpyBackend
from optserve.server.bound_state import BoundCall
from optserve.server.errors import InvalidArgumentError
from optserve.server.optimizers.adam import ADAM

SCALARS = {"alpha": 1e-3, "beta_1": 0.9, "beta_2": 0.999, "epsilon": 1e-7}
COPYING = ADAM.copying("var", 1)
SUMMING = ADAM.summing()
SIZE = 96


def _state(seed: int, dtype=np.float32) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {
        "var": rng.standard_normal(SIZE).astype(dtype),
        "momentum": rng.standard_normal(SIZE).astype(dtype) * 0.1,
        "velocity": np.abs(rng.standard_normal(SIZE)).astype(dtype) * 0.01,
    }


def _grad(seed: int, dtype=np.float32) -> np.ndarray:
    return np.random.default_rng(seed + 100).standard_normal(SIZE).astype(dtype)


def _bad_calls():
    """(label, kernel, a function of the state arrays giving the call's own arrays)."""
    wide = np.zeros(2 * SIZE, np.float32)
    return [
        ("grad is the variable", ADAM, lambda s: {"grad": s["var"]}),
        ("grad overlaps the velocity", ADAM, lambda s: {"grad": s["velocity"]}),
        ("grad of another shape", ADAM, lambda s: {"grad": np.zeros(SIZE + 1, np.float32)}),
        ("grad of another dtype", ADAM, lambda s: {"grad": np.zeros(SIZE, np.float64)}),
        ("grad not an array", ADAM, lambda s: {"grad": [0.0] * SIZE}),
        ("grad missing", ADAM, lambda s: {}),
        ("an unexpected array", ADAM, lambda s: {"grad": _grad(0), "extra": _grad(1)}),
        ("copy is the momentum", COPYING, lambda s: {"grad": _grad(0), "copy_0": s["momentum"]}),
        ("copy overlaps the gradient", COPYING, lambda s: {"grad": wide[:SIZE], "copy_0": wide[SIZE // 2 :][:SIZE]}),
        ("copy read-only", COPYING, lambda s: {"grad": _grad(0), "copy_0": _read_only(np.zeros(SIZE, np.float32))}),
        ("copy strided", COPYING, lambda s: {"grad": _grad(0), "copy_0": wide[::2]}),
        ("addend is the variable", SUMMING, lambda s: {"grad": _grad(0), "grad_addend": s["var"]}),
        ("strided grad spanning the momentum", ADAM, lambda s: {"grad": _spanning(s)}),
    ]


def _read_only(array: np.ndarray) -> np.ndarray:
    array.flags.writeable = False
    return array


def _spanning(state) -> np.ndarray:
    # A strided view whose bounds cover the momentum: may_share_memory says it may overlap.
    both = np.zeros(4 * SIZE, np.float32)
    state["momentum"] = both[SIZE : 2 * SIZE]
    return both[::4]


@pytest.mark.parametrize("label, kernel, make", _bad_calls(), ids=[case[0] for case in _bad_calls()])
def test_a_bound_call_is_refused_as_the_full_check_refuses_it(label, kernel, make):
    backend = NumpyBackend(threads=1)
    if backend.native is not None:
        backend.native.get(kernel, np.float32)  # compiled now (where a compiler is), not in the background
    for native in (True, False):
        backend.native = backend.native if native else None
        state = _state(0)
        arrays = make(state)
        bound = bound_state.bind(state)
        assert bound is not None
        before = {name: array.copy() for name, array in state.items()}
        with pytest.raises(InvalidArgumentError) as full:
            backend.run(kernel, {**{n: state[n] for n in kernel.state if n in state}, **arrays}, SCALARS)
        with pytest.raises(InvalidArgumentError) as quick:
            backend.run_many(kernel, [BoundCall(bound, arrays)], SCALARS)
        assert str(quick.value) == str(full.value)
        for name, array in before.items():
            np.testing.assert_array_equal(state[name], array)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_bound_calls_give_the_bits_of_dict_calls(dtype):
    backend = NumpyBackend(threads=1)
    wide = np.zeros(3 * SIZE, dtype)
    strided_grad = wide[::3]
    strided_grad[:] = _grad(3, dtype)
    cases = [
        (ADAM, lambda s: {"grad": _grad(1, dtype)}),
        (COPYING, lambda s: {"grad": _grad(2, dtype), "copy_0": np.empty(SIZE, dtype)}),
        (SUMMING, lambda s: {"grad": _grad(4, dtype), "grad_addend": _grad(5, dtype)}),
        (ADAM, lambda s: {"grad": strided_grad}),  # strided inputs are read, never written
        (SUMMING, lambda s: {"grad": s["var"][::-1].copy(), "grad_addend": strided_grad}),
    ]
    for kernel, make in cases:
        quick_state, full_state = _state(7, dtype), _state(7, dtype)
        bound = bound_state.bind(quick_state)
        for _ in range(3):
            quick_arrays, full_arrays = make(quick_state), make(full_state)
            backend.run_many(kernel, [BoundCall(bound, quick_arrays)], SCALARS)
            backend.run(kernel, {**{n: full_state[n] for n in kernel.state if n in full_state}, **full_arrays}, SCALARS)
            for name in full_state:
                np.testing.assert_array_equal(quick_state[name], full_state[name], strict=True)
            if "copy_0" in quick_arrays:
                np.testing.assert_array_equal(quick_arrays["copy_0"], quick_state["var"], strict=True)


def test_only_arrays_that_pass_as_state_are_bound():
    good = _state(0)
    assert bound_state.bind(good) is not None
    assert bound_state.bind({}) is None
    assert bound_state.bind({**good, "momentum": good["var"]}) is None  # the same memory twice
    assert bound_state.bind({**good, "velocity": np.zeros(SIZE, np.float64)}) is None
    assert bound_state.bind({**good, "velocity": np.zeros(SIZE + 1, np.float32)}) is None
    assert bound_state.bind({**good, "velocity": np.zeros(2 * SIZE, np.float32)[::2]}) is None
    assert bound_state.bind({**good, "velocity": _read_only(np.zeros(SIZE, np.float32))}) is None
    assert bound_state.bind({name: np.zeros(0, np.float32) for name in good}) is None
    assert bound_state.bind({name: np.zeros(SIZE, np.int32) for name in good}) is None


def test_data_addresses_are_remembered_for_views_only_while_they_live():
    owner = np.zeros(1000, np.float32)
    view = owner[10:20]
    assert bound_state.data_address(view) == view.ctypes.data
    assert bound_state.data_address(view) == view.ctypes.data  # from the cache
    assert bound_state.data_address(owner) == owner.ctypes.data
    assert id(owner) not in bound_state._ADDRESSES  # an owner could be resized: never cached
    key = id(view)
    assert key in bound_state._ADDRESSES
    del view
    gc.collect()
    assert key not in bound_state._ADDRESSES
    other = owner[500:510]  # may reuse the id: its own address is given
    assert bound_state.data_address(other) == other.ctypes.data


def test_an_optimizer_binds_its_variables_and_steps_as_before():
    values = {"a": np.linspace(-1, 1, 300, dtype=np.float32), "b": np.linspace(0, 2, 40, dtype=np.float64)}
    grads = {name: np.cos(value * 3) for name, value in values.items()}
    config = {"class_name": "Adam", "config": {"learning_rate": 0.01}}
    bound, plain = optimizers.deserialize(config), optimizers.deserialize(config)
    bound.build(values)
    plain.build(values)
    for variable in plain._variables.values():
        variable.bound = False  # never bound: every call goes through the full check
    for _ in range(4):
        replies = bound.apply(grads, reply_into=[lambda name, shape, dtype: np.empty(shape, dtype)])
        plain.apply(grads)
        for name, value in plain.read_variables().items():
            np.testing.assert_array_equal(bound.read_variables()[name], value, strict=True)
            np.testing.assert_array_equal(replies[0][name], value, strict=True)
    assert all(variable.bound for variable in bound._variables.values())


def test_a_call_bringing_the_last_calls_arrays_again_is_checked_where_they_changed():
    backend = NumpyBackend(threads=1)
    state = _state(0)
    bound = bound_state.bind(state)
    region = np.zeros(2 * SIZE, np.float32)  # a session's region: the same views at every step
    grad, copy = region[:SIZE], region[SIZE:]
    grad[:] = _grad(0)
    call = {"grad": grad, "copy_0": copy}
    backend.run_many(COPYING, [BoundCall(bound, call)], SCALARS)
    backend.run_many(COPYING, [BoundCall(bound, call)], SCALARS)  # remembered: not checked again
    np.testing.assert_array_equal(copy, state["var"])
    copy.flags.writeable = False
    with pytest.raises(InvalidArgumentError, match="read-only"):
        backend.run_many(COPYING, [BoundCall(bound, call)], SCALARS)
    copy.flags.writeable = True
    copy.shape = (SIZE // 2, 2)
    with pytest.raises(InvalidArgumentError, match="share one shape"):
        backend.run_many(COPYING, [BoundCall(bound, call)], SCALARS)
    moved = {"grad": grad, "copy_0": state["momentum"]}  # another array under the same name
    with pytest.raises(InvalidArgumentError, match="overlap"):
        backend.run_many(COPYING, [BoundCall(bound, moved)], SCALARS)


def test_what_a_bound_state_remembers_does_not_keep_the_arrays_alive():
    backend = NumpyBackend(threads=1)
    state = _state(0)
    bound = bound_state.bind(state)
    owner = np.zeros(SIZE, np.float32)
    copy = owner.view()
    backend.run_many(COPYING, [BoundCall(bound, {"grad": _grad(0), "copy_0": copy})], SCALARS)
    before = sys.getrefcount(owner)
    del copy
    gc.collect()
    assert sys.getrefcount(owner) == before - 1  # nothing but the view held it (an array pool's test)
