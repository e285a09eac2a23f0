"""Parity of ``optserve.server.schedules`` with ``keras.optimizers.schedules`` (Keras 3.15).

What we hold: **exact equality** with Keras on its NumPy backend (the project's
oracle) at every step tested, for every config in ``CASES``: steps 0..300 and
some large ones up to 10**12. That is stricter than "equal to float32
rounding" and it is attainable because the module runs the same NumPy
operations on the same dtypes in the same order as Keras's ``__call__``; any
reordering or float64 shortcut would show up here as a one-ulp difference.
Keras's other backends evaluate cos/pow with their own float32 kernels, so they
differ from the NumPy backend (and from us) by a few float32 ulps (measured
against the JAX backend on float configs like those below, steps 0..300: at
most 5.3e-7 relative);
that is float32 rounding, not a semantic difference, and is not tested here
because importing a second backend would take most of a minute.

Keras is given the step as an int64 variable, exactly as its optimizers do
(``schedule(self._iterations)``); the NaN that some odd but accepted configs
produce (``t_mul < 1``) compares equal to NaN.
"""

from __future__ import annotations

import dataclasses
import inspect
import json
import subprocess
import sys

import numpy as np
import pytest

from optserve.server import schedules
from optserve.server.errors import InvalidArgumentError

STEPS = list(range(301)) + [1000, 4095, 4096, 65537, 10**6, 2**24 + 1, 2**31 + 7, 10**12]

# (id, class_name, config): several non-default configs per class. The
# "int_*" rows pass an integer initial_learning_rate, for which Keras computes
# in int32 (decay_rate=0.5 truncates to 0, pi becomes 3): parity covers them too.
CASES = [
    ("exp_default", "ExponentialDecay", dict(initial_learning_rate=0.1, decay_steps=1000, decay_rate=0.96)),
    (
        "exp_staircase",
        "ExponentialDecay",
        dict(initial_learning_rate=0.05, decay_steps=7, decay_rate=0.5, staircase=True),
    ),
    (
        "exp_growth_float_steps",
        "ExponentialDecay",
        dict(initial_learning_rate=0.01, decay_steps=3.5, decay_rate=1.01, name="grow"),
    ),
    ("exp_int_lr", "ExponentialDecay", dict(initial_learning_rate=1, decay_steps=10, decay_rate=0.5)),
    ("pw_basic", "PiecewiseConstantDecay", dict(boundaries=[10, 20], values=[0.1, 0.05, 0.01])),
    (
        "pw_float_boundaries",
        "PiecewiseConstantDecay",
        dict(boundaries=[0.5, 10.5, 100.7], values=[1.0, 0.5, 0.25, 0.125]),
    ),
    ("pw_boundary_zero", "PiecewiseConstantDecay", dict(boundaries=[0], values=[1.0, 0.5])),
    ("pw_int_values", "PiecewiseConstantDecay", dict(boundaries=[5, 10], values=[3, 2, 1])),
    ("pw_float_then_int", "PiecewiseConstantDecay", dict(boundaries=[5, 50], values=[0.3, 1, 2])),
    ("pw_not_increasing", "PiecewiseConstantDecay", dict(boundaries=[20, 10], values=[0.1, 0.2, 0.3])),
    ("poly_default", "PolynomialDecay", dict(initial_learning_rate=0.1, decay_steps=100)),
    (
        "poly_sqrt_cycle",
        "PolynomialDecay",
        dict(initial_learning_rate=0.1, decay_steps=50, end_learning_rate=0.001, power=0.5, cycle=True),
    ),
    (
        "poly_square",
        "PolynomialDecay",
        dict(initial_learning_rate=0.2, decay_steps=17, end_learning_rate=0.02, power=2.0),
    ),
    ("poly_cycle_every_step", "PolynomialDecay", dict(initial_learning_rate=0.3, decay_steps=1, power=3.0, cycle=True)),
    ("poly_int_lr", "PolynomialDecay", dict(initial_learning_rate=1, decay_steps=100)),
    ("inv_default", "InverseTimeDecay", dict(initial_learning_rate=0.1, decay_steps=10, decay_rate=0.5)),
    (
        "inv_staircase",
        "InverseTimeDecay",
        dict(initial_learning_rate=0.1, decay_steps=7, decay_rate=2.0, staircase=True),
    ),
    ("inv_int_lr", "InverseTimeDecay", dict(initial_learning_rate=1, decay_steps=10, decay_rate=0.5)),
    ("cos_default", "CosineDecay", dict(initial_learning_rate=0.1, decay_steps=100)),
    ("cos_alpha", "CosineDecay", dict(initial_learning_rate=0.1, decay_steps=250, alpha=0.1)),
    (
        "cos_warmup_from_zero",
        "CosineDecay",
        dict(initial_learning_rate=0.0, decay_steps=200, alpha=0.05, warmup_target=0.1, warmup_steps=50),
    ),
    (
        "cos_warmup_from_nonzero",
        "CosineDecay",
        dict(initial_learning_rate=0.01, decay_steps=30, warmup_target=0.2, warmup_steps=13),
    ),
    (
        "cos_int_lr_warmup",
        "CosineDecay",
        dict(initial_learning_rate=0, decay_steps=100, warmup_target=0.1, warmup_steps=20),
    ),
    ("cos_int_lr", "CosineDecay", dict(initial_learning_rate=1, decay_steps=100)),
    ("sgdr_default", "CosineDecayRestarts", dict(initial_learning_rate=0.1, first_decay_steps=10)),
    (
        "sgdr_equal_periods",
        "CosineDecayRestarts",
        dict(initial_learning_rate=0.1, first_decay_steps=20, t_mul=1.0, m_mul=0.9, alpha=0.05),
    ),
    (
        "sgdr_growing",
        "CosineDecayRestarts",
        dict(initial_learning_rate=0.05, first_decay_steps=7, t_mul=1.5, m_mul=0.7, alpha=0.01),
    ),
    ("sgdr_shrinking_periods", "CosineDecayRestarts", dict(initial_learning_rate=0.1, first_decay_steps=10, t_mul=0.5)),
    ("sgdr_int_lr", "CosineDecayRestarts", dict(initial_learning_rate=1, first_decay_steps=10)),
]
CASE_IDS = [case_id for case_id, _, _ in CASES]


@pytest.fixture(scope="module")
def keras():
    keras = pytest.importorskip("keras")
    if keras.backend.backend() != "numpy":
        pytest.skip(f"exact parity is defined against Keras's NumPy backend (KERAS_BACKEND={keras.backend.backend()})")
    return keras


def keras_values(keras, schedule, steps):
    step_variable = keras.Variable(0, dtype="int64")  # what Keras optimizers pass
    values = []
    with np.errstate(all="ignore"):  # overflow/NaN in odd configs is part of the parity
        for step in steps:
            step_variable.assign(step)
            values.append(float(schedule(step_variable)))
    return np.array(values)


def bare(class_name, config):
    return {"class_name": class_name, "config": dict(config)}


# --------------------------------------------------------------------------- values


@pytest.mark.parametrize("class_name, config", [case[1:] for case in CASES], ids=CASE_IDS)
def test_values_equal_keras_at_every_step(keras, class_name, config):
    ours = schedules.deserialize(bare(class_name, config))
    theirs = keras.optimizers.schedules.deserialize(bare(class_name, config))
    expected = keras_values(keras, theirs, STEPS)
    actual = np.array([ours(step) for step in STEPS])
    np.testing.assert_array_equal(actual, expected)


def test_calls_are_pure_and_accept_numpy_integers():
    schedule = schedules.CosineDecayRestarts(0.1, 10)
    first = schedule(37)
    schedule(500), schedule(0)
    assert schedule(37) == first == schedule(np.int64(37)) == schedule(np.uint16(37))
    assert isinstance(first, float)


def test_documented_boundaries_and_edges():
    piecewise = schedules.PiecewiseConstantDecay([100, 110], [1.0, 0.5, 0.1])
    assert [piecewise(s) for s in (0, 100, 101, 110, 111)] == [1.0, 1.0, 0.5, 0.5, np.float32(0.1)]
    # cycle=True at step 0 uses one full period, not ceil(0) = 0 periods.
    poly = schedules.PolynomialDecay(0.1, 10, end_learning_rate=0.0, cycle=True)
    assert poly(0) == np.float32(0.1)
    assert poly(10) == 0.0 and poly(11) > 0.0
    # Integer initial_learning_rate: Keras truncates decay_rate=0.5 to 0.
    assert schedules.ExponentialDecay(1, 10, 0.5)(5) == 0.0


# --------------------------------------------------------------------------- serialization


@pytest.mark.parametrize("class_name, config", [case[1:] for case in CASES], ids=CASE_IDS)
def test_serialization_matches_keras(keras, class_name, config):
    keras_schedules = keras.optimizers.schedules
    theirs = keras_schedules.deserialize(bare(class_name, config))
    ours = schedules.deserialize(bare(class_name, config))

    assert ours.get_config() == theirs.get_config()
    assert schedules.serialize(ours) == keras_schedules.serialize(theirs)
    # Keras's form (after a JSON trip) comes back to an equal schedule, and
    # Keras reads ours back to the same config.
    wire = json.loads(json.dumps(keras_schedules.serialize(theirs)))
    assert schedules.deserialize(wire) == ours
    assert keras_schedules.deserialize(schedules.serialize(ours)).get_config() == ours.get_config()
    assert schedules.is_serialized_schedule(wire)


def test_defaults_and_signatures_match_keras(keras):
    for class_name, cls in schedules.REGISTRY.items():
        keras_cls = getattr(keras.optimizers.schedules, class_name)
        ours = [(p.name, p.default) for p in inspect.signature(cls).parameters.values()]
        theirs = [(p.name, p.default) for p in inspect.signature(keras_cls).parameters.values()]
        assert ours == theirs, class_name


def test_cases_cover_registry_and_registry_covers_keras(keras):
    keras_schedules = keras.optimizers.schedules
    keras_classes = {
        name
        for name in dir(keras_schedules)
        if isinstance(getattr(keras_schedules, name), type)
        and issubclass(getattr(keras_schedules, name), keras_schedules.LearningRateSchedule)
        and getattr(keras_schedules, name) is not keras_schedules.LearningRateSchedule
    }
    assert {class_name for _, class_name, _ in CASES} == set(schedules.REGISTRY)
    assert set(schedules.REGISTRY) == keras_classes
    for class_name, cls in schedules.REGISTRY.items():
        assert cls.__name__ == class_name
        assert issubclass(cls, schedules.LearningRateSchedule)


def test_is_serialized_schedule():
    assert schedules.is_serialized_schedule(bare("CosineDecay", {}))
    assert schedules.is_serialized_schedule(schedules.serialize(schedules.CosineDecay(0.1, 5)))
    for obj in (
        "adam",
        "CosineDecay",
        0.1,
        None,
        {},
        {"class_name": "Adam", "config": {}},
        {"config": {"decay_steps": 1}},
    ):
        assert not schedules.is_serialized_schedule(obj), obj


def test_deserialize_accepts_a_schedule_and_legacy_module():
    schedule = schedules.ExponentialDecay(0.1, 10, 0.9)
    assert schedules.deserialize(schedule) is schedule
    legacy = {
        "module": "keras.src.optimizers.schedules.learning_rate_schedule",
        "class_name": "ExponentialDecay",
        "registered_name": "ExponentialDecay",
        "config": schedule.get_config(),
    }
    assert schedules.deserialize(legacy) == schedule


def test_schedules_are_immutable():
    schedule = schedules.PiecewiseConstantDecay([1, 2], [0.3, 0.2, 0.1])
    with pytest.raises(dataclasses.FrozenInstanceError):
        schedule.values = [1.0, 1.0, 1.0]
    config = schedule.get_config()
    config["values"][0] = 9.0
    assert schedule(0) == np.float32(0.3)


def test_numpy_scalar_arguments_become_python_numbers():
    schedule = schedules.ExponentialDecay(np.float64(0.1), np.int64(10), np.float32(0.5))
    config = schedule.get_config()
    assert type(config["initial_learning_rate"]) is float and type(config["decay_steps"]) is int
    assert schedule(5) == schedules.ExponentialDecay(0.1, 10, 0.5)(5)


def test_module_does_not_import_keras():
    code = "import sys, optserve.server.schedules; print('keras' in sys.modules)"
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert run.stdout.strip() == "False"


# --------------------------------------------------------------------------- validation


@pytest.mark.parametrize(
    "class_name, steps_argument, extra",
    [
        ("ExponentialDecay", "decay_steps", dict(decay_rate=0.5)),
        ("PolynomialDecay", "decay_steps", {}),
        ("InverseTimeDecay", "decay_steps", dict(decay_rate=0.5)),
        ("CosineDecay", "decay_steps", {}),
        ("CosineDecayRestarts", "first_decay_steps", {}),
    ],
)
@pytest.mark.parametrize("bad_steps", [0, -3, 0.0])
def test_non_positive_decay_steps_rejected_like_keras(keras, class_name, steps_argument, extra, bad_steps):
    config = dict(initial_learning_rate=0.1, **{steps_argument: bad_steps}, **extra)
    with pytest.raises(ValueError) as keras_error:
        getattr(keras.optimizers.schedules, class_name)(**config)
    with pytest.raises(InvalidArgumentError) as our_error:
        schedules.deserialize(bare(class_name, config))
    assert str(our_error.value) == str(keras_error.value)
    assert f"must be > 0. Received: {steps_argument}={bad_steps}" in str(our_error.value)


def test_piecewise_length_mismatch_rejected_like_keras(keras):
    args = ([10, 20], [0.1, 0.2])
    with pytest.raises(ValueError) as keras_error:
        keras.optimizers.schedules.PiecewiseConstantDecay(*args)
    with pytest.raises(InvalidArgumentError) as our_error:
        schedules.PiecewiseConstantDecay(*args)
    assert str(our_error.value) == str(keras_error.value)


@pytest.mark.parametrize(
    "class_name, config, keras_call_error",
    [
        # Keras builds these but fails on the first call; we reject them up front.
        ("PiecewiseConstantDecay", dict(boundaries=[5], values=[1, 0.5]), TypeError),
        ("PiecewiseConstantDecay", dict(boundaries=[], values=[0.1]), IndexError),
        ("PiecewiseConstantDecay", dict(boundaries=[2**33], values=[0.1, 0.2]), OverflowError),
        ("ExponentialDecay", dict(initial_learning_rate=0.1, decay_steps=10, decay_rate=0.5, name=None), ValueError),
        ("CosineDecay", dict(initial_learning_rate=0.1, decay_steps=10, name="a/b"), ValueError),
    ],
)
def test_configs_keras_cannot_evaluate_are_rejected(keras, class_name, config, keras_call_error):
    keras_schedule = getattr(keras.optimizers.schedules, class_name)(**config)
    with pytest.raises(keras_call_error):
        keras_schedule(keras.Variable(0, dtype="int64"))
    with pytest.raises(InvalidArgumentError):
        schedules.deserialize(bare(class_name, config))


@pytest.mark.parametrize(
    "class_name, config, message",
    [
        (
            "ExponentialDecay",
            dict(initial_learning_rate="0.1", decay_steps=10, decay_rate=0.5),
            "Argument `initial_learning_rate` must be a number. Received: initial_learning_rate='0.1'",
        ),
        (
            "ExponentialDecay",
            dict(initial_learning_rate=True, decay_steps=10, decay_rate=0.5),
            "`initial_learning_rate` must be a number",
        ),
        (
            "ExponentialDecay",
            dict(initial_learning_rate=0.1, decay_steps=10, decay_rate=float("nan")),
            "Argument `decay_rate` must be finite. Received: decay_rate=nan",
        ),
        (
            "InverseTimeDecay",
            dict(initial_learning_rate=0.1, decay_steps=10, decay_rate=0.5, staircase="no"),
            "Argument `staircase` must be a boolean. Received: staircase='no'",
        ),
        ("PolynomialDecay", dict(initial_learning_rate=0.1, decay_steps=float("inf")), "`decay_steps` must be finite"),
        ("PolynomialDecay", dict(initial_learning_rate=0.1, decay_steps=10, cycle=1), "`cycle` must be a boolean"),
        ("PiecewiseConstantDecay", dict(boundaries=10, values=[0.1, 0.2]), "`boundaries` must be a list of numbers"),
        (
            "PiecewiseConstantDecay",
            dict(boundaries=[10], values=[0.1, None]),
            "Argument `values[1]` must be a number. Received: values[1]=None",
        ),
        (
            "CosineDecay",
            dict(initial_learning_rate=0.1, decay_steps=10, warmup_target="0.2"),
            "`warmup_target` must be a number",
        ),
        ("CosineDecayRestarts", dict(initial_learning_rate=0.1, first_decay_steps=10, name=""), None),
        (
            "CosineDecayRestarts",
            dict(initial_learning_rate=0.1, first_decay_steps=10, t_mul=None),
            "`t_mul` must be a number",
        ),
    ],
)
def test_argument_checks(class_name, config, message):
    if message is None:  # accepted, as by Keras
        schedules.deserialize(bare(class_name, config))
        return
    with pytest.raises(InvalidArgumentError) as error:
        schedules.deserialize(bare(class_name, config))
    assert message in str(error.value)


@pytest.mark.parametrize(
    "obj, message",
    [
        ("ExponentialDecay", "must be a dict with 'class_name' and 'config'"),
        ({"config": {}}, "must be a dict with 'class_name' and 'config'"),
        (bare("LinearWarmup", {}), "Unknown learning rate schedule: 'LinearWarmup'. Supported: ["),
        ({"class_name": "CosineDecay", "config": None}, "'config' of a CosineDecay must be a dict"),
        (
            bare("CosineDecay", dict(initial_learning_rate=0.1, decay_steps=10, warmup=5)),
            "Unknown argument(s) for CosineDecay: ['warmup']. Allowed: ['initial_learning_rate'",
        ),
        (
            bare("ExponentialDecay", dict(initial_learning_rate=0.1, decay_steps=10)),
            "Missing required argument(s) for ExponentialDecay: ['decay_rate']",
        ),
        (
            {"module": "my_project.schedules", "class_name": "CosineDecay", "config": {}},
            "Only Keras's built-in learning rate schedules are supported",
        ),
        (
            {
                "module": "keras.optimizers.schedules",
                "class_name": "CosineDecay",
                "registered_name": "MyPackage>CosineDecay",
                "config": {},
            },
            "Custom learning rate schedules are not supported",
        ),
    ],
)
def test_deserialize_rejects(obj, message):
    with pytest.raises(InvalidArgumentError) as error:
        schedules.deserialize(obj)
    assert message in str(error.value)


def test_serialize_rejects_non_schedules():
    with pytest.raises(InvalidArgumentError):
        schedules.serialize({"class_name": "CosineDecay"})


@pytest.mark.parametrize("step", [-1, 1.5, True, "3", None, 2**63])
def test_step_must_be_a_non_negative_integer(step):
    with pytest.raises(InvalidArgumentError) as error:
        schedules.ExponentialDecay(0.1, 10, 0.5)(step)
    assert "Argument `step` must be a non-negative integer" in str(error.value)
