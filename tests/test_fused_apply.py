"""One pass over all of a model's variables: NumpyBackend.run_many and copy_many, and the engine using them."""

from __future__ import annotations

import numpy as np
import pytest

from optserve.server import optimizers
from optserve.server.backends import NumpyBackend
from optserve.server.errors import InvalidArgumentError
from optserve.server.optimizers.adam import ADAM

SCALARS = {"alpha": 1e-3, "beta_1": 0.9, "beta_2": 0.999, "epsilon": 1e-7}
# Sizes around block edges, empty and single-element variables, and one larger than a block.
SIZES = [0, 1, 7, 1023, 1024, 40_000, 100_000, 150_001, 300_000]


def _arrays(size: int, dtype, seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {
        "grad": rng.standard_normal(size).astype(dtype),
        "var": rng.standard_normal(size).astype(dtype),
        "momentum": rng.standard_normal(size).astype(dtype) * 0.1,
        "velocity": np.abs(rng.standard_normal(size)).astype(dtype) * 0.01,
    }


def _copies(calls):
    return [{name: array.copy() for name, array in arrays.items()} for arrays in calls]


@pytest.mark.parametrize("threads", [1, 2])
def test_run_many_is_bit_identical_to_one_run_per_variable(threads):
    backend = NumpyBackend(threads=threads, parallel_threshold=1024)
    calls = [_arrays(size, np.float32 if i % 3 else np.float64, i) for i, size in enumerate(SIZES)]
    expected = _copies(calls)
    for arrays in expected:
        backend.run(ADAM, arrays, SCALARS)
    backend.run_many(ADAM, calls, SCALARS)
    for got, want in zip(calls, expected, strict=True):
        for name in want:
            np.testing.assert_array_equal(got[name], want[name], strict=True)


def test_run_many_checks_every_call_before_touching_any():
    backend = NumpyBackend(threads=2, parallel_threshold=1024)
    good = _arrays(50_000, np.float32, 0)
    before = _copies([good])[0]
    bad = _arrays(10, np.float32, 1)
    bad["velocity"] = bad["velocity"][:5]  # shapes disagree
    with pytest.raises(InvalidArgumentError, match="share one shape"):
        backend.run_many(ADAM, [good, bad], SCALARS)
    for name in before:
        np.testing.assert_array_equal(good[name], before[name])
    overlapping = _arrays(10, np.float32, 2)
    overlapping["momentum"] = overlapping["var"]
    with pytest.raises(InvalidArgumentError, match="overlap"):
        backend.run_many(ADAM, [good, overlapping], SCALARS)
    for name in before:
        np.testing.assert_array_equal(good[name], before[name])


def test_run_many_of_nothing_or_empty_arrays_is_a_no_op():
    backend = NumpyBackend(threads=2)
    backend.run_many(ADAM, [], SCALARS)
    backend.run_many(ADAM, [_arrays(0, np.float32, 0)], SCALARS)


class _OneAtATime:
    """The NumPy backend without run_many: the engine falls back to one run per variable."""

    def __init__(self):
        self._backend = NumpyBackend(threads=2)

    def __getattr__(self, name):
        if name == "run_many":
            raise AttributeError(name)
        return getattr(self._backend, name)


@pytest.mark.parametrize(
    "config",
    [
        {"class_name": "Adam", "config": {"learning_rate": 1e-3}},
        {"class_name": "Adam", "config": {"learning_rate": 1e-3, "amsgrad": True, "clipnorm": 0.5}},
        {"class_name": "SGD", "config": {"learning_rate": 0.1, "momentum": 0.9, "nesterov": True}},
        {"class_name": "RMSprop", "config": {"learning_rate": 1e-3, "centered": True, "global_clipnorm": 1.0}},
        {"class_name": "Ftrl", "config": {"learning_rate": 1e-2}},
    ],
)
def test_engine_apply_over_many_variables_matches_one_at_a_time(config):
    rng = np.random.default_rng(5)
    shapes = {f"v{i}": (size,) for i, size in enumerate(SIZES[1:])} | {"m": (33, 64), "d": (3,)}
    initial = {name: rng.standard_normal(shape).astype(np.float32) for name, shape in shapes.items()}
    initial["d"] = initial["d"].astype(np.float64)
    fused = optimizers.deserialize(config, backend=NumpyBackend(threads=2, parallel_threshold=1024))
    single = optimizers.deserialize(config, backend=_OneAtATime())
    fused.build(initial)
    single.build(initial)
    for _ in range(3):
        grads = {name: rng.standard_normal(value.shape).astype(value.dtype) for name, value in initial.items()}
        del grads["v2"]  # a variable without a gradient is left alone
        fused.apply(grads)
        single.apply(grads)
    got, want = fused.read_variables(), single.read_variables()
    for name in want:
        np.testing.assert_array_equal(got[name], want[name], strict=True)
    for name, slots in single.get_slots().items():
        for slot, value in slots.items():
            np.testing.assert_array_equal(fused.get_slots()[name][slot], value, strict=True)


def test_copy_many_copies_every_pair_whole():
    backend = NumpyBackend(threads=2, parallel_threshold=1024)
    sources = [np.arange(size, dtype=np.float32) * 0.5 for size in (0, 5, 300_000, 1 << 20)]
    sources.append(np.arange(12, dtype=np.float64).reshape(3, 4))
    targets = [np.zeros_like(source) for source in sources]
    backend.copy_many(list(zip(targets, sources)))
    for target, source in zip(targets, sources, strict=True):
        np.testing.assert_array_equal(target, source, strict=True)


def test_read_variables_into_given_arrays():
    engine = optimizers.deserialize({"class_name": "SGD", "config": {"learning_rate": 0.1}})
    engine.build({"w": np.ones((2, 3), np.float32), "b": np.ones(3, np.float64)})
    engine.apply({"w": np.ones((2, 3), np.float32), "b": np.ones(3, np.float64)})
    given = {"w": np.empty((2, 3), np.float32), "b": np.empty(3, np.float64)}
    values = engine.read_variables(allocate=lambda name, shape, dtype: given[name])
    assert all(values[name] is given[name] for name in given)
    np.testing.assert_allclose(values["w"], 0.9)
    np.testing.assert_allclose(values["b"], 0.9)


def _twin_engines(config, initial):
    """Two engines of ``config`` built from copies of the same ``initial`` values."""
    engines = []
    for _ in range(2):
        engine = optimizers.deserialize(config, backend=NumpyBackend(threads=2, parallel_threshold=1024))
        engine.build({name: value.copy() for name, value in initial.items()})
        engines.append(engine)
    return engines


REPLY_CONFIGS = [
    {"class_name": "Adam", "config": {"learning_rate": 1e-3}},
    {"class_name": "Adam", "config": {"learning_rate": 1e-3, "weight_decay": 0.01, "clipnorm": 0.5}},
    {"class_name": "SGD", "config": {"learning_rate": 0.1, "momentum": 0.9, "use_ema": True}},
    {"class_name": "RMSprop", "config": {"learning_rate": 1e-3, "gradient_accumulation_steps": 2}},
    {"class_name": "Ftrl", "config": {"learning_rate": 1e-2}},
    {"class_name": "Muon", "config": {"learning_rate": 1e-2}},
    {"class_name": "LossScaleOptimizer", "config": {"inner_optimizer": {"class_name": "Adam", "config": {}}}},
]


@pytest.mark.parametrize("config", REPLY_CONFIGS, ids=lambda config: config["class_name"])
def test_apply_writes_the_new_values_into_reply_arrays_bit_for_bit(config):
    """``apply(reply_into=...)``: the values after the step land in every reply array (by the update
    kernel where it can), identical to reading them after an apply without replies."""
    rng = np.random.default_rng(11)
    shapes = {"v0": (300_001,), "v1": (7,), "m": (33, 64), "none": (5,)}
    initial = {name: rng.standard_normal(shape).astype(np.float32) for name, shape in shapes.items()}
    replying, plain = _twin_engines(config, initial)
    for step in range(4):
        grads = {name: rng.standard_normal(value.shape).astype(np.float32) for name, value in initial.items()}
        del grads["none"]  # no gradient: its value still goes into the reply
        if step == 2 and config["class_name"] == "LossScaleOptimizer":
            grads["v1"][0] = np.inf  # a skipped step replies the unchanged values
        regions = [{name: np.full(shape, np.nan, np.float32) for name, shape in shapes.items()} for _ in range(2)]
        allocators = [lambda name, shape, dtype, region=region: region[name] for region in regions]
        allocators.append(lambda name, shape, dtype: np.empty(shape, dtype))
        written = replying.apply(grads, reply_into=allocators)
        assert plain.apply(grads) is None
        expected = plain.read_variables()
        assert written is not None and len(written) == 3
        for index, values in enumerate(written):
            for name in shapes:
                if index < 2:
                    assert values[name] is regions[index][name]
                np.testing.assert_array_equal(values[name], expected[name], strict=True)
        for name, value in replying.read_variables().items():
            np.testing.assert_array_equal(value, expected[name], strict=True)
    if config["class_name"] == "Adam":
        assert ("var", 3) in ADAM._copying  # the update kernel itself wrote the replies


def test_reply_arrays_sharing_memory_with_a_gradient_are_written_after_the_update():
    engine = optimizers.deserialize({"class_name": "SGD", "config": {"learning_rate": 0.5}})
    engine.build({"w": np.ones(8, np.float32)})
    buffer = np.ones(8, np.float32)
    # The reply goes into the gradient's own memory: the kernel must not write it while reading it.
    written = engine.apply({"w": buffer}, reply_into=[lambda name, shape, dtype: buffer])
    assert written is not None and written[0]["w"] is buffer
    np.testing.assert_array_equal(buffer, np.full(8, 0.5, np.float32))
    np.testing.assert_array_equal(engine.read_variables()["w"], np.full(8, 0.5, np.float32))


ADDEND_CONFIGS = REPLY_CONFIGS + [
    {"class_name": "Adam", "config": {"learning_rate": 1e-3, "clipvalue": 0.1}},
    {"class_name": "Nadam", "config": {"learning_rate": 1e-3, "loss_scale_factor": 8.0}},
]


@pytest.mark.parametrize("config", ADDEND_CONFIGS, ids=lambda config: str(sorted(config["config"])))
def test_apply_with_addends_is_bit_identical_to_summing_first(config):
    """``apply(grads, addends=...)`` (a sync step's last push): the update kernel adds the addend
    where it can, and the step is the one of the gradients summed with np.add first."""
    rng = np.random.default_rng(17)
    shapes = {"v0": (300_001,), "v1": (7,), "m": (33, 64), "only_addend": (5,), "none": (4,)}
    initial = {name: rng.standard_normal(shape).astype(np.float32) for name, shape in shapes.items()}
    summing, plain = _twin_engines(config, initial)
    for step in range(4):
        grads = {name: rng.standard_normal(shape).astype(np.float32) for name, shape in shapes.items()}
        addends = {name: rng.standard_normal(shape).astype(np.float32) for name, shape in shapes.items()}
        del grads["only_addend"], grads["none"], addends["none"]
        if step == 2:
            addends["v1"][0] = np.inf  # non-finite sums behave as summed first (a loss scale skips)
        totals = {name: np.add(grads.get(name, 0), addend) for name, addend in addends.items()}
        totals |= {name: grads[name] for name in grads if name not in addends}
        kept = {name: addend.copy() for name, addend in addends.items()}
        region = {name: np.empty(shape, np.float32) for name, shape in shapes.items()}
        written = summing.apply(grads, addends=addends, reply_into=[lambda n, s, d, region=region: region[n]])
        plain.apply(totals)
        expected = plain.read_variables()
        for name, value in summing.read_variables().items():
            np.testing.assert_array_equal(value, expected[name], strict=True)
            np.testing.assert_array_equal(written[0][name], expected[name], strict=True)
        for name, slots in plain.get_slots().items():
            for slot, value in slots.items():
                np.testing.assert_array_equal(summing.get_slots()[name][slot], value, strict=True)
        for name, addend in addends.items():
            np.testing.assert_array_equal(addend, kept[name], strict=True)  # addends are only read
    if config == REPLY_CONFIGS[0]:
        assert ADAM._summing is not None and ("var", 1) in ADAM._summing._copying  # one pass did it all


def test_addends_are_checked_like_gradients_before_anything_changes():
    engine = optimizers.deserialize({"class_name": "Adam", "config": {"learning_rate": 0.1}})
    engine.build({"w": np.ones(8, np.float32)})
    before = engine.get_weights()
    grads = {"w": np.ones(8, np.float32)}
    with pytest.raises(InvalidArgumentError, match="shape"):
        engine.apply(grads, addends={"w": np.ones(9, np.float32)})
    with pytest.raises(InvalidArgumentError, match="dtype"):
        engine.apply(grads, addends={"w": np.ones(8, np.float64)})
    with pytest.raises(optimizers.base.NotFoundError, match="unknown"):
        engine.apply(grads, addends={"x": np.ones(8, np.float32)})
    for now, then in zip(engine.get_weights(), before, strict=True):
        np.testing.assert_array_equal(now, then, strict=True)
    np.testing.assert_array_equal(grads["w"], np.ones(8, np.float32))


def test_a_summing_kernel_adds_with_one_rounding_as_numpy_does():
    kernel = ADAM.summing()
    assert kernel.inputs == ("grad", "grad_addend") and kernel.state == ADAM.state
    assert ADAM.summing() is kernel and "summed_grad" in kernel.body
    rng = np.random.default_rng(3)
    grad, addend = (rng.standard_normal(5000).astype(np.float32) * 1e30 for _ in range(2))
    state = {name: np.abs(rng.standard_normal(5000)).astype(np.float32) for name in ADAM.state}
    scalars = dict(SCALARS)
    summed = {name: value.copy() for name, value in state.items()}
    NumpyBackend(threads=1).run(kernel, {"grad": grad, "grad_addend": addend, **summed}, scalars)
    NumpyBackend(threads=1).run(ADAM, {"grad": np.add(grad, addend), **state}, scalars)
    for name in state:
        np.testing.assert_array_equal(summed[name], state[name], strict=True)
