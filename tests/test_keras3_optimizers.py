"""Keras 3's newer optimizers in the engine: Keras's golden values, odd shapes, LossScaleOptimizer.

* Golden values: the numbers of Keras 3.15's own ``*_test.py`` beside each
  optimizer (``keras/src/optimizers/``), reproduced with the same tolerances.
* Lamb, Adafactor and Muon are not elementwise (norms, axis means, matrix
  products): they are checked bit for bit against Keras on shapes where those
  operations' order matters (tall and wide matrices, 3-D, scalars, 1000 elements).
* LossScaleOptimizer: runs with injected inf/NaN gradients skip exactly the steps
  Keras skips and end with Keras's scale, counter, weights and slots.
* Staged programs allocate nothing in steady state on the NumPy backend.
"""

from __future__ import annotations

import json
import tracemalloc
import warnings

import numpy as np
import pytest
import test_optimizer_parity as parity
from test_optimizer_parity import keras_float64_arithmetic  # noqa: F401 - a fixture

from optserve.server import optimizers
from optserve.server.errors import InvalidArgumentError, NotFoundError
from optserve.server.native_kernels import shared_native_kernels

pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation doesn't accept a copy keyword")


def engine(class_name, **config):
    return optimizers.deserialize({"class_name": class_name, "config": config})


def run(optimizer, initial, gradients):
    """Builds on {"x": initial}, applies each gradient; returns the values after each step."""
    optimizer.build({"x": np.asarray(initial, np.float32)})
    values = []
    for grad in gradients:
        optimizer.apply({"x": np.asarray(grad, np.float32)})
        values.append(optimizer.read_variables()["x"])
    return values


# ------------------------------------------------------------- golden values
SINGLE_STEPS = [
    ("AdamW", {"learning_rate": 0.5}, [0.4980, 1.4960, 2.494, 3.492]),
    ("Lion", {"learning_rate": 0.5}, [0.5, 1.5, 2.5, 3.5]),
    ("Lamb", {"learning_rate": 0.5}, [-0.3693, 0.6306, 1.6306, 2.6306]),
    ("Adafactor", {"learning_rate": 0.5}, [-0.3693, 0.6307, 1.6307, 2.6307]),
    # Keras calls update_step directly (no weight decay): AdamW steps for a vector.
    ("Muon", {"learning_rate": 0.5, "adam_weight_decay": None}, [0.5, 1.5, 2.5, 3.5]),
]


@pytest.mark.parametrize("class_name, config, expected", SINGLE_STEPS, ids=[s[0] for s in SINGLE_STEPS])
def test_keras_single_step(class_name, config, expected):
    [after] = run(engine(class_name, **config), [1.0, 2.0, 3.0, 4.0], [[1.0, 6.0, 7.0, 2.0]])
    np.testing.assert_allclose(after, expected, rtol=1e-4, atol=1e-4)


def test_keras_single_step_2d():
    [adafactor] = run(engine("Adafactor", learning_rate=0.5), [[1.0, 2.0], [3.0, 4.0]], [[[1.0, 6.0], [7.0, 2.0]]])
    np.testing.assert_allclose(adafactor, [[0.7007, -0.0081], [1.2492, 3.4407]], rtol=1e-4, atol=1e-4)
    [muon] = run(
        engine("Muon", learning_rate=0.5, weight_decay=0.0), [[1.0, 2.0], [3.0, 4.0]], [[[1.0, 6.0], [7.0, 2.0]]]
    )
    np.testing.assert_allclose(muon, [[0.988775, 1.887053], [2.873428, 3.97035]], rtol=1e-2, atol=1e-2)


_RAMP = np.arange(0.1, 1.1, 0.1)
GOLDEN = [
    (
        "AdamW",
        {"learning_rate": 1.0, "weight_decay": 0.5, "epsilon": 2},
        np.array(
            [
                [0.4998, 0.4998, 0.4998, 0.4998, 0.4998, 0.4998, 0.4998, 0.4998, 0.4998, 0.4998],
                [0.2486, 0.2475, 0.2463, 0.2451, 0.244, 0.2428, 0.2417, 0.2405, 0.2394, 0.2382],
                [0.1223, 0.1198, 0.1174, 0.1149, 0.1124, 0.11, 0.1075, 0.1051, 0.1027, 0.1003],
                [0.0586, 0.0549, 0.0512, 0.0475, 0.0439, 0.0402, 0.0366, 0.033, 0.0294, 0.0258],
                [0.0263, 0.0215, 0.0167, 0.012, 0.0073, 0.0026, -0.0021, -0.0067, -0.0113, -0.0159],
            ]
        ),
    ),
    ("Lion", {}, np.tile([[0.999], [0.998], [0.997], [0.996], [0.995]], (1, 10))),
    ("Lamb", {}, np.tile([[0.999], [0.9982], [0.9974], [0.9965], [0.9955]], (1, 10))),
    (
        "Adafactor",
        {
            "learning_rate": 0.5,
            "beta_2_decay": -0.65,
            "epsilon_1": 1e-15,
            "epsilon_2": 1e-4,
            "clip_threshold": 0.9,
            "relative_step": False,
        },
        np.array(
            [
                [0.55, 0.55, 0.55, 0.55, 0.55, 0.55, 0.55, 0.55, 0.55, 0.55],
                [0.3031, 0.3026, 0.3025, 0.3024, 0.3024, 0.3024, 0.3024, 0.3024, 0.3024, 0.3024],
                [0.1671, 0.1665, 0.1663, 0.1663, 0.1663, 0.1663, 0.1663, 0.1663, 0.1663, 0.1663],
                [0.0923, 0.0916, 0.0915, 0.0914, 0.0914, 0.0914, 0.0914, 0.0914, 0.0914, 0.0914],
                [0.0554, 0.0548, 0.0546, 0.0546, 0.0546, 0.0546, 0.0546, 0.0545, 0.0545, 0.0545],
            ]
        ),
    ),
]


@pytest.mark.parametrize("class_name, config, golden", GOLDEN, ids=[g[0] for g in GOLDEN])
def test_keras_correctness_with_golden(class_name, config, golden):
    # Keras: one step with 0.01 everywhere, then the 0.1 .. 1.0 ramp; x checked before each ramp step.
    values = run(engine(class_name, **config), np.ones(10), [np.full(10, 0.01)] + [_RAMP] * 4)
    for step, expected in enumerate(golden):
        np.testing.assert_allclose(values[step], expected, rtol=5e-4, atol=5e-4, err_msg=f"step {step}")


@pytest.mark.parametrize("class_name", ["AdamW", "Lion", "Lamb", "Adafactor", "ScheduleFreeAdamW"])
def test_keras_weight_decay_and_exclusion(class_name):
    # Keras applies three fresh optimizers to var1 (zero gradients): 2 * (1 - 0.004)^3.
    var1 = np.float32(2.0)
    for _ in range(3):
        decayed = engine(class_name, learning_rate=1.0, weight_decay=0.004)
        decayed.build({"var1": var1, "exclude": np.float32(2.0)})
        decayed.exclude_from_weight_decay(["exclude"])
        decayed.apply({"var1": np.float32(0.0), "exclude": np.float32(0.0)})
        values = decayed.read_variables()
        var1 = values["var1"]
        assert values["exclude"] == pytest.approx(2.0, abs=1e-6)
    if class_name != "ScheduleFreeAdamW":  # Keras checks only the exclusion for it
        assert var1 == pytest.approx(1.9760959, abs=1e-6)


def test_schedule_free_adamw_warmup_makes_smaller_first_steps():
    def first_step(**config):
        [after] = run(engine("ScheduleFreeAdamW", learning_rate=0.5, **config), [1.0, 2.0, 3.0], [[1.0, 1.0, 1.0]])
        return np.abs(after - [1.0, 2.0, 3.0])

    assert np.all(first_step(warmup_steps=10) < first_step(warmup_steps=0))
    values = run(engine("ScheduleFreeAdamW", learning_rate=0.01), [1.0, 2.0, 3.0], [[0.1, 0.1, 0.1]] * 10)
    assert np.all(values[-1] < [1.0, 2.0, 3.0])


def test_muon_newton_schulz_golden():
    from optserve.server.backends import get_backend
    from optserve.server.optimizers.muon import newton_schulz_program

    program = newton_schulz_program((2, 2), 5, False, False)
    grad = np.array([[0.2499, 0.9105], [0.2655, 0.8824]], np.float32)
    arrays = {"grad": grad, "var": np.zeros((2, 2), np.float32), "momentum": np.zeros((2, 2), np.float32)}
    arrays.update({name: np.zeros(shape, np.float32) for name, shape in program.scratch_shapes((2, 2)).items()})
    # Momentum starts at 0, so with momentum_minus_one = -1 the momentum is the gradient; lr = -1 leaves
    # the orthogonalised matrix itself in `var`.
    scalars = {"momentum_minus_one": -1.0, "lr": -1.0, "muon_a": 3.4445, "muon_b": -4.7750, "muon_c": 2.0315}
    program.run(get_backend("cpu"), arrays, scalars, np.float32)
    np.testing.assert_allclose(arrays["var"], [[-0.4422, 0.6457], [0.7285, 0.2968]], rtol=1e-3, atol=1e-3)


def test_muon_chooses_adamw_and_weight_decay_like_keras():
    muon = engine("Muon", exclude_layers=["var"])
    assert muon.uses_adamw("my_var", (2, 2))
    assert muon.uses_adamw("embedding/embeddings", (2, 2))
    assert not engine("Muon").uses_adamw("dense/kernel", (2, 2))
    assert engine("Muon").uses_adamw("dense/bias", (2,))
    assert not engine("Muon", exclude_embeddings=False).uses_adamw("embedding/embeddings", (2, 2))
    # Keras's _apply_weight_decay tests: weight_decay for the Muon variables, adam_weight_decay for the others.
    for shape, config in (((2, 2), {"weight_decay": 0.01}), ((), {"adam_weight_decay": 0.01})):
        optimizer = engine("Muon", learning_rate=1.0, **config)
        value = np.arange(1.0, 1.0 + np.prod(shape, dtype=int)).reshape(shape).astype(np.float32)
        optimizer.build({"w": value})
        optimizer._apply_weight_decay([(optimizer._variables["w"], None, False)], 1.0)
        np.testing.assert_allclose(optimizer.read_variables()["w"], value - value * 0.01, rtol=1e-6)


# ----------------------------------------------- bit identity on odd shapes
ODD_SHAPES = {
    "tall": (70, 30),
    "wide": (24, 90),
    "token_embedding": (40, 8),
    "vector": (1000,),
    "deep": (3, 33, 17),
    "scalar": (),
    "small_tall": (5, 3),
}
ODD_CASES = [
    parity.Case("Lamb", learning_rate=0.02),
    parity.Case("Lamb", learning_rate=0.02, weight_decay=0.1, beta_1=0.0),
    parity.Case("Adafactor", learning_rate=0.05),
    parity.Case("Adafactor", learning_rate=0.05, relative_step=False, clip_threshold=0.1),
    parity.Case("Muon", learning_rate=0.02),
    parity.Case("Muon", learning_rate=0.02, nesterov=False, adam_lr_ratio=0.1, rms_rate=None),
    parity.Case("Muon", learning_rate=0.02, ns_steps=0),
    parity.Case("ScheduleFreeAdamW", learning_rate=0.02, warmup_steps=2),
]


def _assert_bit_identical(case, ours, theirs):
    for step, (mine, keras_state) in enumerate(zip(ours, theirs, strict=True)):
        for kind in ("variables", "slots"):
            assert sorted(mine[kind]) == sorted(keras_state[kind])
            for key, expected in keras_state[kind].items():
                np.testing.assert_array_equal(mine[kind][key], expected, err_msg=f"{case!r} step {step} {key}")


def _odd_shape_trajectories(monkeypatch, case):
    monkeypatch.setattr(parity, "SHAPES", ODD_SHAPES)
    case.steps = 4
    initial, steps = parity._inputs(case)
    spec = parity._spec(case)
    config, theirs = parity.keras_trajectory(spec, initial, steps)
    return parity.engine_trajectory(config, spec, initial, steps), theirs


@pytest.mark.parametrize("case", ODD_CASES, ids=repr)
def test_staged_optimizers_are_bit_identical_on_odd_shapes(monkeypatch, case):
    ours, theirs = _odd_shape_trajectories(monkeypatch, case)
    _assert_bit_identical(case, ours, theirs)


@pytest.mark.parametrize("class_name", ["Lamb", "Adafactor", "Muon"])
def test_staged_optimizers_are_bit_identical_in_float64(monkeypatch, keras_float64_arithmetic, class_name):
    case = parity.Case(class_name, dtype="float64", learning_rate=0.02)
    ours, theirs = _odd_shape_trajectories(monkeypatch, case)
    _assert_bit_identical(case, ours, theirs)


def test_adafactor_slots_are_factored_and_checked_by_their_own_shapes():
    adafactor = engine("Adafactor")
    adafactor.build({"w": np.ones((4, 3, 5), np.float32), "b": np.ones(5, np.float32)})
    slots = adafactor.get_slots()
    assert {slot: value.shape for slot, value in slots["w"].items()} == {
        "r": (4, 3),
        "c": (4, 5),
        "velocity": (4, 3, 5),
    }
    assert {slot: value.shape for slot, value in slots["b"].items()} == {"r": (), "c": (), "velocity": (5,)}
    with pytest.raises(InvalidArgumentError, match=r"shape \(4, 3, 5\); expected \(4, 3\)"):
        adafactor.set_slots({"w": {"r": np.zeros((4, 3, 5), np.float32)}})
    adafactor.set_slots({"w": {"r": np.full((4, 3), 2.0, np.float32)}})
    assert adafactor.get_slots(["w"])["w"]["r"][0, 0] == 2.0
    restored = engine("Adafactor")
    restored.load_state_dict(adafactor.state_dict())
    np.testing.assert_array_equal(restored.get_slots()["w"]["r"], adafactor.get_slots()["w"]["r"])
    assert (
        restored.weights_description()
        == adafactor.weights_description()
        == ["iterations", "w:r", "w:c", "w:velocity", "b:r", "b:c", "b:velocity"]
    )
    weights = adafactor.get_weights()
    assert [w.shape for w in weights] == [(), (4, 3), (4, 5), (4, 3, 5), (), (), (5,)]
    weights[2] = np.full((4, 5), 3.0, np.float32)
    restored.set_weights(weights)
    assert restored.get_slots(["w"])["w"]["c"][0, 0] == 3.0
    weights[5] = np.zeros(5, np.float32)  # b's c is a scalar placeholder
    with pytest.raises(
        InvalidArgumentError, match=r"Entry 5 \(slot 'c' of variable 'b'\) has shape \(5,\); expected \(\)"
    ):
        restored.set_weights(weights)


def test_muon_slots_differ_per_variable_like_keras():
    muon = engine("Muon")
    muon.build({"dense/kernel": np.ones((3, 4), np.float32), "dense/bias": np.ones(4, np.float32)})
    assert muon.slot_names("dense/kernel") == ["momentum"]
    assert muon.slot_names("dense/bias") == ["momentum", "velocity"]
    assert len(muon.get_weights()) == 4


def test_schedule_free_adamw_momentum_starts_as_the_variable():
    optimizer = engine("ScheduleFreeAdamW")
    initial = np.arange(6, dtype=np.float32).reshape(2, 3)
    optimizer.build({"w": initial})
    np.testing.assert_array_equal(optimizer.get_slots()["w"]["momentum"], initial)
    np.testing.assert_array_equal(optimizer.get_slots()["w"]["velocity"], np.zeros((2, 3), np.float32))


# ------------------------------------------------ steady-state allocations
@pytest.mark.parametrize("class_name", ["Lamb", "Adafactor", "Muon"])
def test_staged_programs_allocate_no_arrays_in_steady_state(class_name):
    shape = (512, 512)
    optimizer = engine(class_name)
    optimizer.build({"w": np.ones(shape, np.float32)})
    grad = np.random.default_rng(0).normal(size=shape).astype(np.float32)
    optimizer.apply({"w": grad})  # first call: block scratch and caches
    # A kernel new to this machine compiles on a background thread, whose work tracemalloc would
    # count: the steady state is the one after the compiler is done.
    assert shared_native_kernels().wait_idle(timeout=120)
    optimizer.apply({"w": grad})
    tracemalloc.start()
    try:
        optimizer.apply({"w": grad})
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    # What is left are NumPy's fixed-size iterator buffers (a reduction along a strided axis).
    variable_bytes = grad.nbytes
    assert peak < variable_bytes / 8, f"{class_name}: a step allocated {peak} bytes (variable: {variable_bytes})"


# --------------------------------------------------------- LossScaleOptimizer
def _keras_lso(keras, inner_class, inner_config, **config):
    return keras.optimizers.LossScaleOptimizer(getattr(keras.optimizers, inner_class)(**inner_config), **config)


LSO_CASES = [
    ("Adam", {"learning_rate": 0.01}, {"initial_scale": 8.0, "dynamic_growth_steps": 3}, "float32"),
    (
        "SGD",
        {"learning_rate": 0.1, "momentum": 0.9, "gradient_accumulation_steps": 2},
        {"dynamic_growth_steps": 2},
        "float32",
    ),
    ("Lamb", {"learning_rate": 0.02, "use_ema": True, "loss_scale_factor": 4.0}, {"initial_scale": 1024.0}, "float32"),
    (
        "Adafactor",
        {"learning_rate": 0.05, "clipnorm": 1.0},
        {"initial_scale": 2.0**10, "dynamic_growth_steps": 4},
        "float32",
    ),
    ("AdamW", {"learning_rate": 0.01}, {"initial_scale": 16.0, "dynamic_growth_steps": 2}, "float64"),
]
NON_FINITE_STEPS = {2: ("bias", np.inf), 3: ("kernel", np.nan), 9: ("kernel", -np.inf)}


@pytest.mark.parametrize(
    "inner_class, inner_config, config, dtype", LSO_CASES, ids=[f"{c[0]}-{c[3]}" for c in LSO_CASES]
)
def test_loss_scale_optimizer_skips_the_steps_keras_skips(
    keras_float64_arithmetic, inner_class, inner_config, config, dtype
):
    import keras

    rng = np.random.default_rng(3)
    shapes = {"kernel": (3, 4), "bias": (4,)}
    initial = {name: rng.normal(size=shape).astype(dtype) for name, shape in shapes.items()}
    variables = [keras.Variable(value, name=name, dtype=dtype) for name, value in initial.items()]
    theirs = _keras_lso(keras, inner_class, inner_config, **config)
    serialized = keras.optimizers.serialize(theirs)
    ours = optimizers.deserialize(json.loads(json.dumps(serialized)))
    assert ours.get_config() == serialized
    theirs.build(variables)
    ours.build(initial)
    skipped = 0
    for step in range(12):
        scale = float(np.asarray(theirs.dynamic_scale))
        grads = {name: (rng.normal(size=shape) * scale).astype(dtype) for name, shape in shapes.items()}
        if step in NON_FINITE_STEPS:
            name, value = NON_FINITE_STEPS[step]
            grads[name].flat[1] = value
            skipped += 1
        iterations = int(ours.iterations)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            theirs.apply([keras.ops.convert_to_tensor(g) for g in grads.values()], variables)
        ours.apply(grads)
        what = f"step {step}"
        assert ours.dynamic_scale == float(np.asarray(theirs.dynamic_scale)), what
        assert ours.step_counter == int(np.asarray(theirs.step_counter)), what
        assert ours.iterations == int(np.asarray(theirs.iterations)), what
        if step in NON_FINITE_STEPS:
            assert ours.iterations == iterations, f"{what}: a skipped step advanced the counter"
        for name, variable in zip(shapes, variables):
            np.testing.assert_array_equal(ours.read_variables()[name], parity._value(variable), err_msg=what)
        keras_slots = parity._keras_slots(theirs.inner_optimizer, dict(zip(shapes, variables)))
        our_slots = {f"{n}_{slot}": v for n, per in ours.get_slots().items() for slot, v in per.items()}
        assert sorted(our_slots) == sorted(keras_slots)
        for key, expected in keras_slots.items():
            np.testing.assert_array_equal(our_slots[key], expected, err_msg=f"{what}: {key}")
    assert skipped == 3
    assert ours.get_scalars()["dynamic_scale"] == ours.dynamic_scale


def test_loss_scale_optimizer_keras_unit_tests():
    finite = optimizers.deserialize(
        {
            "class_name": "LossScaleOptimizer",
            "config": {
                "inner_optimizer": {"class_name": "SGD", "config": {"learning_rate": 0.5, "loss_scale_factor": 100.0}}
            },
        }
    )
    assert finite.inner_optimizer.loss_scale_factor is None  # Keras disables the inner scaling
    finite.build({"x": np.array([1.0, 2.0, 3.0, 4.0], np.float32)})
    finite.apply({"x": np.array([1.0, 6.0, 7.0, 2.0], np.float32) * finite.initial_scale})
    np.testing.assert_allclose(finite.read_variables()["x"], [0.5, -1.0, -0.5, 3.0], rtol=1e-4, atol=1e-4)
    infinite = optimizers.deserialize({"class_name": "LossScaleOptimizer", "config": {"inner_optimizer": "sgd"}})
    infinite.build({"x": np.array([1.0, 2.0, 3.0, 4.0], np.float32)})
    infinite.apply({"x": np.full(4, np.inf, np.float32)})
    np.testing.assert_array_equal(infinite.read_variables()["x"], [1.0, 2.0, 3.0, 4.0])
    assert (infinite.dynamic_scale, infinite.step_counter, infinite.iterations) == (2.0**14, 0, 0)


def test_loss_scale_optimizer_config_of_a_mixed_precision_model_round_trips():
    import keras

    keras.mixed_precision.set_global_policy("mixed_float16")
    try:
        model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2)])
        model.compile(optimizer=keras.optimizers.AdamW(learning_rate=0.01), loss="mse")
        assert isinstance(model.optimizer, keras.optimizers.LossScaleOptimizer)  # Keras wrapped it
        serialized = keras.optimizers.serialize(model.optimizer)
    finally:
        keras.mixed_precision.set_global_policy("float32")
    ours = optimizers.deserialize(json.dumps(serialized))
    assert ours.get_config() == serialized
    assert ours.inner_optimizer.class_name == "AdamW"


@pytest.mark.parametrize(
    "arguments",
    [
        {"dynamic": False},
        {"weight_decay": 0.1},
        {"use_ema": True},
        {"foo": 1, "bar": 2},
    ],
    ids=lambda a: ",".join(a),
)
def test_loss_scale_optimizer_refuses_what_keras_refuses_in_keras_words(arguments):
    import keras

    with pytest.raises(ValueError) as keras_error:
        keras.optimizers.LossScaleOptimizer(keras.optimizers.SGD(), **arguments)
    with pytest.raises(InvalidArgumentError) as ours:
        optimizers.deserialize({"class_name": "LossScaleOptimizer", "config": {"inner_optimizer": "sgd", **arguments}})
    assert str(ours.value) == str(keras_error.value)


@pytest.mark.parametrize(
    "config, message",
    [
        ({}, "LossScaleOptimizer needs `inner_optimizer`"),
        ({"inner_optimizer": "yogi"}, "Unknown optimizer: 'yogi'"),
        (
            {"inner_optimizer": {"class_name": "LossScaleOptimizer", "config": {"inner_optimizer": "sgd"}}},
            "cannot be another LossScaleOptimizer",
        ),
        ({"inner_optimizer": "sgd", "initial_scale": 0.0}, "`initial_scale` must be a finite number > 0"),
        ({"inner_optimizer": "sgd", "initial_scale": 1e39}, "`initial_scale` must be finite in float32"),
        ({"inner_optimizer": "sgd", "dynamic_growth_steps": 0}, "`dynamic_growth_steps` must be an integer >= 1"),
        ({"inner_optimizer": "sgd", "weight_decay": None, "use_ema": False}, None),  # defaults pass, as in Keras
    ],
)
def test_loss_scale_optimizer_validation(config, message):
    document = {"class_name": "LossScaleOptimizer", "config": config}
    if message is None:
        assert optimizers.deserialize(document).get_config()["config"]["inner_optimizer"]["class_name"] == "SGD"
        return
    with pytest.raises(InvalidArgumentError, match=message):
        optimizers.deserialize(document)


def _lso_adam():
    return optimizers.deserialize(
        {
            "class_name": "LossScaleOptimizer",
            "config": {
                "inner_optimizer": {"class_name": "Nadam", "config": {"learning_rate": 0.01}},
                "initial_scale": 64.0,
                "dynamic_growth_steps": 3,
            },
        }
    )


def test_loss_scale_optimizer_state_travels_with_the_inner_state():
    rng = np.random.default_rng(5)
    gradients = [{"w": (rng.normal(size=(3, 2)) * 64).astype(np.float32)} for _ in range(7)]
    gradients[1]["w"][0, 0] = np.inf
    straight, first = _lso_adam(), _lso_adam()
    for optimizer in (straight, first):
        optimizer.build({"w": np.ones((3, 2), np.float32)})
    for grads in gradients:
        straight.apply(grads)
    for grads in gradients[:4]:
        first.apply(grads)
    scalars = first.get_scalars()
    assert set(scalars) == {"u_product", "step_counter", "dynamic_scale"}
    resumed = _lso_adam()
    resumed.load_state_dict(first.state_dict())
    assert resumed.get_scalars() == scalars
    for grads in gradients[4:]:
        resumed.apply(grads)
    np.testing.assert_array_equal(resumed.read_variables()["w"], straight.read_variables()["w"])
    assert resumed.get_scalars() == straight.get_scalars()
    with pytest.raises(InvalidArgumentError, match="State was saved by a Nadam optimizer"):
        _lso_adam().load_state_dict(straight.inner_optimizer.state_dict())


def test_loss_scale_optimizer_scalars_are_checked_before_any_is_set():
    optimizer = _lso_adam()
    optimizer.build({"w": np.ones(3, np.float32)})
    optimizer.set_scalars({"dynamic_scale": 512.0, "step_counter": 2})
    assert (optimizer.dynamic_scale, optimizer.step_counter) == (512.0, 2)
    for values, error in [
        ({"dynamic_scale": 0.0}, InvalidArgumentError),
        ({"step_counter": 1.5}, InvalidArgumentError),
        ({"dynamic_scale": 8.0, "nope": 1.0}, NotFoundError),
    ]:
        with pytest.raises(error):
            optimizer.set_scalars(values)
        assert (optimizer.dynamic_scale, optimizer.step_counter) == (512.0, 2)
