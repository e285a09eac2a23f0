"""Optimizer configs: Keras's serialize() form round-trips, identifiers, and every validation error.

The engine's ``get_config()`` must equal ``keras.optimizers.serialize()`` of the
same optimizer. One documented exception: an optimizer created without a
``name`` is named ``snake_case(class name)`` ("adam", "rm_sprop"), while Keras
appends a per-process counter ("adam_3"), so those comparisons set the name.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

from optserve.server import optimizers
from optserve.server.errors import InvalidArgumentError

# Keras's own Variable.__array__ predates NumPy 2's `copy` keyword.
pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation doesn't accept a copy keyword")

CLASS_NAMES = [
    "SGD",
    "RMSprop",
    "Adam",
    "Adadelta",
    "Adagrad",
    "Adamax",
    "Nadam",
    "Ftrl",
    "AdamW",
    "Lion",
    "Lamb",
    "ScheduleFreeAdamW",
    "Adafactor",
    "Muon",
]
WRAPPER_NAMES = ["LossScaleOptimizer"]  # tested in tests/test_keras3_optimizers.py

NON_DEFAULT_ARGUMENTS = {
    "SGD": {"learning_rate": 0.05, "momentum": 0.9, "nesterov": True},
    "RMSprop": {"learning_rate": 0.01, "rho": 0.8, "momentum": 0.5, "epsilon": 1e-5, "centered": True},
    "Adam": {"learning_rate": 0.02, "beta_1": 0.8, "beta_2": 0.99, "epsilon": 1e-4, "amsgrad": True},
    "Adadelta": {"learning_rate": 1.0, "rho": 0.5, "epsilon": 1e-4},
    "Adagrad": {"learning_rate": 0.1, "initial_accumulator_value": 0.5, "epsilon": 1e-3},
    "Adamax": {"learning_rate": 0.02, "beta_1": 0.8, "beta_2": 0.99, "epsilon": 1e-4},
    "Nadam": {"learning_rate": 0.02, "beta_1": 0.8, "beta_2": 0.99, "epsilon": 1e-4},
    "Ftrl": {
        "learning_rate": 0.1,
        "learning_rate_power": -0.7,
        "initial_accumulator_value": 0.3,
        "l1_regularization_strength": 0.01,
        "l2_regularization_strength": 0.02,
        "l2_shrinkage_regularization_strength": 0.03,
        "beta": 0.4,
    },
    "AdamW": {
        "learning_rate": 0.02,
        "weight_decay": 0.1,
        "beta_1": 0.8,
        "beta_2": 0.99,
        "epsilon": 1e-4,
        "amsgrad": True,
    },
    "Lion": {"learning_rate": 0.02, "beta_1": 0.8, "beta_2": 0.9},
    "Lamb": {"learning_rate": 0.02, "beta_1": 0.8, "beta_2": 0.99, "epsilon": 1e-4},
    "ScheduleFreeAdamW": {"learning_rate": 0.02, "beta_1": 0.8, "beta_2": 0.99, "epsilon": 1e-4, "warmup_steps": 10},
    "Adafactor": {
        "learning_rate": 0.02,
        "beta_2_decay": -0.5,
        "epsilon_1": 1e-20,
        "epsilon_2": 1e-2,
        "clip_threshold": 0.5,
        "relative_step": False,
    },
    "Muon": {
        "learning_rate": 0.02,
        "adam_beta_1": 0.8,
        "adam_beta_2": 0.99,
        "adam_weight_decay": 0.1,
        "epsilon": 1e-4,
        "exclude_layers": ["dense"],
        "exclude_embeddings": False,
        "muon_a": 3.0,
        "muon_b": -4.0,
        "muon_c": 2.0,
        "adam_lr_ratio": 0.1,
        "momentum": 0.9,
        "ns_steps": 3,
        "nesterov": False,
        "rms_rate": None,
    },
}
COMMON_ARGUMENTS = [
    {},
    {"clipnorm": 1.5, "weight_decay": 0.01},
    {"global_clipnorm": 2.0, "use_ema": True, "ema_momentum": 0.9, "ema_overwrite_frequency": 5},
    {"clipvalue": 0.5, "loss_scale_factor": 64.0, "gradient_accumulation_steps": 4},
]
SCHEDULES = [
    ("ExponentialDecay", {"initial_learning_rate": 0.1, "decay_steps": 10, "decay_rate": 0.9, "staircase": True}),
    ("PiecewiseConstantDecay", {"boundaries": [10, 20], "values": [0.1, 0.01, 0.001]}),
    (
        "PolynomialDecay",
        {"initial_learning_rate": 0.1, "decay_steps": 10, "end_learning_rate": 0.01, "power": 2.0, "cycle": True},
    ),
    ("InverseTimeDecay", {"initial_learning_rate": 0.1, "decay_steps": 5, "decay_rate": 0.5}),
    (
        "CosineDecay",
        {"initial_learning_rate": 0.0, "decay_steps": 100, "alpha": 0.1, "warmup_target": 0.1, "warmup_steps": 10},
    ),
    ("CosineDecayRestarts", {"initial_learning_rate": 0.1, "first_decay_steps": 10, "t_mul": 2.0, "m_mul": 0.5}),
]


def keras_serialized(class_name, **kwargs):
    import keras

    return keras.optimizers.serialize(getattr(keras.optimizers, class_name)(**kwargs))


# ------------------------------------------------------------ round trips
@pytest.mark.parametrize("class_name", CLASS_NAMES)
def test_defaults_match_keras_except_the_automatic_name(class_name):
    import keras

    expected = keras.optimizers.serialize(getattr(keras.optimizers, class_name)())
    ours = optimizers.deserialize(class_name.lower()).get_config()
    assert expected["config"].pop("name").startswith(ours["config"].pop("name"))
    assert ours == expected


@pytest.mark.parametrize("common", COMMON_ARGUMENTS, ids=lambda c: ",".join(c) or "defaults")
@pytest.mark.parametrize("class_name", CLASS_NAMES)
def test_get_config_equals_keras_serialize(class_name, common):
    kwargs = {**NON_DEFAULT_ARGUMENTS[class_name], **common, "name": "my_optimizer"}
    expected = keras_serialized(class_name, **kwargs)
    engine = optimizers.deserialize(expected)
    assert engine.get_config() == expected
    # And back through JSON text, as the wire carries it.
    assert optimizers.deserialize(json.dumps(expected)).get_config() == expected
    assert optimizers.deserialize(json.dumps(engine.get_config())).get_config() == expected


@pytest.mark.parametrize("schedule_name, schedule_config", SCHEDULES, ids=[s[0] for s in SCHEDULES])
def test_schedule_carrying_config_round_trips(schedule_name, schedule_config):
    import keras

    schedule = getattr(keras.optimizers.schedules, schedule_name)(**schedule_config)
    expected = keras_serialized("Adam", learning_rate=schedule, name="scheduled")
    assert isinstance(expected["config"]["learning_rate"], dict)
    engine = optimizers.deserialize(json.loads(json.dumps(expected)))
    assert engine.get_config() == expected
    for step in (0, 1, 7, 10, 11, 25):
        engine.set_iterations(step)
        assert engine.current_learning_rate() == float(np.asarray(schedule(step), dtype=np.float32))


@pytest.mark.parametrize("class_name", CLASS_NAMES)
def test_keras_accepts_the_engine_config(class_name):
    import keras

    arguments = NON_DEFAULT_ARGUMENTS[class_name]
    config = optimizers.deserialize({"class_name": class_name, "config": arguments}).get_config()
    rebuilt = keras.optimizers.deserialize(json.loads(json.dumps(config)))
    if class_name == "Lamb":
        # Keras 3.15's own deserialize() does not know Lamb (it is missing from its
        # lookup table and comes back as the string "Lamb"); the class reads the config.
        assert rebuilt == "Lamb"
        rebuilt = keras.optimizers.Lamb.from_config(json.loads(json.dumps(config))["config"])
    assert keras.optimizers.serialize(rebuilt) == config


def test_float_learning_rate_is_kept_as_keras_float32_variable_keeps_it():
    config = optimizers.deserialize({"class_name": "SGD", "config": {"learning_rate": 0.1}}).get_config()
    assert config["config"]["learning_rate"] == float(np.float32(0.1)) == 0.10000000149011612


# ------------------------------------------------------------ identifiers
@pytest.mark.parametrize(
    "identifier, class_name",
    [
        ("adam", "Adam"),
        ("Adam", "Adam"),
        ("ADAM", "Adam"),
        ("sgd", "SGD"),
        ("SGD", "SGD"),
        ("rmsprop", "RMSprop"),
        ("RMSprop", "RMSprop"),
        ("adadelta", "Adadelta"),
        ("Adagrad", "Adagrad"),
        ("adamax", "Adamax"),
        ("nadam", "Nadam"),
        ("ftrl", "Ftrl"),
        ('"adam"', "Adam"),
        (" nadam ", "Nadam"),
        (b"sgd", "SGD"),
        ("adamw", "AdamW"),
        ("Lion", "Lion"),
        ("lamb", "Lamb"),
        ("schedulefreeadamw", "ScheduleFreeAdamW"),
    ],
)
def test_string_identifiers_give_keras_defaults(identifier, class_name):
    import keras

    engine = optimizers.deserialize(identifier)
    # (Keras's own get() misses Lamb, see test_keras_accepts_the_engine_config; the class gives its defaults.)
    expected = keras.optimizers.serialize(getattr(keras.optimizers, class_name)())
    ours = engine.get_config()
    assert ours["class_name"] == class_name
    expected["config"].pop("name"), ours["config"].pop("name")
    assert ours == expected


@pytest.mark.parametrize(
    "config",
    [
        {"class_name": "adam", "config": {"learning_rate": 0.01}},
        {"class_name": "Adam", "config": {"learning_rate": 0.01}, "module": None, "registered_name": None},
        {"class_name": "Adam", "learning_rate": 0.01},  # a get_config() dict with class_name added
        {
            "module": "keras.optimizers",
            "class_name": "Adam",
            "config": {"learning_rate": 0.01},
            "registered_name": "Adam",
        },
        json.dumps({"class_name": "Adam", "config": {"learning_rate": 0.01}}),
    ],
    ids=["lowercase", "none-module", "flat", "registered", "json"],
)
def test_other_accepted_config_forms(config):
    engine = optimizers.deserialize(config)
    assert engine.class_name == "Adam"
    assert engine.current_learning_rate() == float(np.float32(0.01))


def test_class_name_without_config_gives_defaults():
    assert optimizers.deserialize({"class_name": "Ftrl"}).get_config() == optimizers.deserialize("ftrl").get_config()


def test_get_passes_an_optimizer_through_and_serialize_is_get_config():
    engine = optimizers.deserialize("adam")
    assert optimizers.get(engine) is engine
    assert optimizers.serialize(engine) == engine.get_config()
    assert isinstance(optimizers.get("sgd"), optimizers.SGD)


def test_legacy_zero_decay_is_accepted_like_keras():
    assert (
        optimizers.deserialize({"class_name": "Adam", "config": {"decay": 0.0}}).get_config()
        == optimizers.deserialize("adam").get_config()
    )


def test_hyperparameters_read_as_attributes():
    engine = optimizers.deserialize({"class_name": "RMSprop", "config": {"rho": 0.8, "centered": True}})
    assert (engine.rho, engine.centered, engine.momentum, engine.clipnorm) == (0.8, True, 0.0, None)
    with pytest.raises(AttributeError):
        engine.not_an_argument  # noqa: B018 - reading it is what must raise


# ------------------------------------------------------------ validation
# (class, arguments, exact message or a fragment of it)
INVALID_ARGUMENTS = [
    ("RMSprop", {"rho": 1.5}, "`rho` must be in [0, 1]. Received: rho=1.5"),
    ("Adadelta", {"rho": -0.1}, "`rho` must be in [0, 1]. Received: rho=-0.1"),
    ("RMSprop", {"rho": "0.9"}, "`rho` must be in [0, 1]. Received: rho='0.9'"),
    ("RMSprop", {"rho": True}, "`rho` must be in [0, 1]. Received: rho=True"),
    ("RMSprop", {"momentum": 1.5}, "`momentum` must be in [0, 1]. Received: momentum=1.5"),
    ("RMSprop", {"epsilon": -1e-7}, "`epsilon` must be a finite number >= 0. Received: epsilon=-1e-07"),
    ("RMSprop", {"centered": 1}, "`centered` must be a boolean (true or false). Received: centered=1"),
    ("SGD", {"momentum": 1.5}, "`momentum` must be a float between [0, 1]. Received: momentum=1.5"),
    ("SGD", {"momentum": 1}, "`momentum` must be a float between [0, 1]. Received: momentum=1"),
    ("SGD", {"momentum": -0.5}, "`momentum` must be a float between [0, 1]. Received: momentum=-0.5"),
    ("SGD", {"nesterov": "yes"}, "`nesterov` must be a boolean (true or false). Received: nesterov='yes'"),
    ("Adam", {"beta_1": 1.0}, "`beta_1` must be in [0, 1). Received: beta_1=1.0"),
    ("Adam", {"beta_2": 1.5}, "`beta_2` must be in [0, 1]. Received: beta_2=1.5"),
    ("Adam", {"epsilon": float("nan")}, "`epsilon` must be a finite number >= 0. Received: epsilon=nan"),
    ("Adam", {"amsgrad": "true"}, "`amsgrad` must be a boolean (true or false). Received: amsgrad='true'"),
    ("Adamax", {"beta_1": -0.1}, "`beta_1` must be in [0, 1). Received: beta_1=-0.1"),
    ("Adamax", {"beta_2": 2}, "`beta_2` must be in [0, 1]. Received: beta_2=2"),
    ("Nadam", {"beta_2": 1.0}, "`beta_2` must be in [0, 1). Received: beta_2=1.0"),
    ("Nadam", {"beta_1": 1.1}, "`beta_1` must be in [0, 1]. Received: beta_1=1.1"),
    (
        "Adagrad",
        {"initial_accumulator_value": -0.1},
        "`initial_accumulator_value` must be a finite number >= 0. Received: initial_accumulator_value=-0.1",
    ),
    (
        "Ftrl",
        {"initial_accumulator_value": -0.1},
        "`initial_accumulator_value` needs to be positive or zero. Received: initial_accumulator_value=-0.1.",
    ),
    (
        "Ftrl",
        {"learning_rate_power": 0.5},
        "`learning_rate_power` needs to be negative or zero. Received: learning_rate_power=0.5.",
    ),
    (
        "Ftrl",
        {"l1_regularization_strength": -1.0},
        "`l1_regularization_strength` needs to be positive or zero. Received: l1_regularization_strength=-1.0.",
    ),
    (
        "Ftrl",
        {"l2_regularization_strength": -1.0},
        "`l2_regularization_strength` needs to be positive or zero. Received: l2_regularization_strength=-1.0.",
    ),
    (
        "Ftrl",
        {"l2_shrinkage_regularization_strength": -1.0},
        "`l2_shrinkage_regularization_strength` needs to be positive or zero. "
        "Received: l2_shrinkage_regularization_strength=-1.0.",
    ),
    ("Ftrl", {"beta": -0.5}, "`beta` must be a finite number >= 0. Received: beta=-0.5"),
    ("Ftrl", {"learning_rate": 0.0}, "`learning_rate` must be > 0 for Ftrl. Received: learning_rate=0.0"),
    ("Adam", {"learning_rate": 1}, "Argument `learning_rate` should be float"),
    ("Adam", {"learning_rate": "0.1"}, "Received instead: learning_rate='0.1'"),
    (
        "Adam",
        {"learning_rate": float("nan")},
        "`learning_rate` must be a finite number >= 0. Received: learning_rate=nan",
    ),
    (
        "Adam",
        {"learning_rate": float("inf")},
        "`learning_rate` must be a finite number >= 0. Received: learning_rate=inf",
    ),
    ("Adam", {"learning_rate": -0.1}, "`learning_rate` must be a finite number >= 0. Received: learning_rate=-0.1"),
    ("Adam", {"learning_rate": 1e39}, "`learning_rate` must be finite in float32. Received: learning_rate=1e+39"),
    ("Adam", {"learning_rate": [0.1]}, "Received instead: learning_rate=[0.1]"),
    ("Adam", {"learning_rate": {"class_name": "Warmup", "config": {}}}, "Unknown learning rate schedule: 'Warmup'"),
    (
        "Adam",
        {"learning_rate": {"class_name": "ExponentialDecay", "config": {"initial_learning_rate": 0.1}}},
        "Missing required argument(s) for ExponentialDecay",
    ),
    (
        "Adam",
        {
            "learning_rate": {
                "class_name": "ExponentialDecay",
                "config": {"initial_learning_rate": 0.1, "decay_steps": 10, "decay_rate": 0.9, "warmup": 3},
            }
        },
        "Unknown argument(s) for ExponentialDecay",
    ),
    ("Adam", {"weight_decay": -0.1}, "`weight_decay` must be a finite number >= 0. Received: weight_decay=-0.1"),
    ("Adam", {"clipnorm": 0.0}, "`clipnorm` must be a finite number > 0 or None. Received: clipnorm=0.0"),
    ("Adam", {"clipvalue": -1.0}, "`clipvalue` must be a finite number > 0 or None. Received: clipvalue=-1.0"),
    (
        "Adam",
        {"global_clipnorm": float("inf")},
        "`global_clipnorm` must be a finite number > 0 or None. Received: global_clipnorm=inf",
    ),
    (
        "Adam",
        {"clipnorm": 1.0, "clipvalue": 1.0},
        "Only one of `clipnorm`, `clipvalue` and `global_clipnorm` can be set. "
        "Received: clipnorm=1.0, clipvalue=1.0, global_clipnorm=None",
    ),
    ("SGD", {"clipnorm": 1.0, "global_clipnorm": 2.0}, "Only one of `clipnorm`, `clipvalue` and `global_clipnorm`"),
    ("Adam", {"use_ema": "yes"}, "`use_ema` must be a boolean (true or false). Received: use_ema='yes'"),
    (
        "Adam",
        {"use_ema": True, "ema_momentum": 1.5},
        "`ema_momentum` must be in the range [0, 1]. Received: ema_momentum=1.5",
    ),
    (
        "Adam",
        {"use_ema": True, "ema_overwrite_frequency": 0},
        "`ema_overwrite_frequency` must be an integer >= 1 or None. Received: ema_overwrite_frequency=0",
    ),
    (
        "Adam",
        {"use_ema": True, "ema_overwrite_frequency": 2.5},
        "`ema_overwrite_frequency` must be an integer >= 1 or None. Received: ema_overwrite_frequency=2.5",
    ),
    (
        "Adam",
        {"loss_scale_factor": 0.0},
        "`loss_scale_factor` must be a finite number > 0 or None. Received: loss_scale_factor=0.0",
    ),
    (
        "Adam",
        {"gradient_accumulation_steps": 1},
        "`gradient_accumulation_steps` must be an integer >= 2. Received: gradient_accumulation_steps=1",
    ),
    (
        "Adam",
        {"gradient_accumulation_steps": 2.0},
        "`gradient_accumulation_steps` must be an integer >= 2. Received: gradient_accumulation_steps=2.0",
    ),
    (
        "Adam",
        {"gradient_accumulation_steps": True},
        "`gradient_accumulation_steps` must be an integer >= 2. Received: gradient_accumulation_steps=True",
    ),
    ("Adam", {"name": 5}, "`name` must be a non-empty string or None. Received: name=5"),
    ("Adam", {"name": ""}, "`name` must be a non-empty string or None. Received: name=''"),
    ("Adam", {"decay": 0.1}, "Argument `decay` is no longer supported"),
    ("Adam", {"foo": 1}, "Argument(s) not recognized: {'foo': 1}. Adam accepts: name, learning_rate, weight_decay"),
    ("SGD", {"jit_compile": True, "is_legacy_optimizer": False}, "Argument(s) not recognized: {'jit_compile': True, "),
    ("SGD", {"rho": 0.9}, "Argument(s) not recognized: {'rho': 0.9}"),
    ("AdamW", {"weight_decay": None}, "Argument `weight_decay` must be a float. Received: weight_decay=None"),
    ("AdamW", {"weight_decay": -0.1}, "`weight_decay` must be a finite number >= 0. Received: weight_decay=-0.1"),
    (
        "Lion",
        {"beta_1": 0.0},
        "Argument `beta_1` must be in the [0, 1] range. Otherwise, the optimizer degenerates "
        "to SignSGD. Received: beta_1=0.0.",
    ),
    ("Lion", {"beta_1": 1.5}, "Received: beta_1=1.5."),
    ("Lion", {"beta_2": 1.5}, "`beta_2` must be in [0, 1]. Received: beta_2=1.5"),
    ("Lion", {"epsilon": 1e-7}, "Argument(s) not recognized: {'epsilon': 1e-07}"),
    ("Lamb", {"beta_1": 1.0}, "`beta_1` must be in [0, 1). Received: beta_1=1.0"),
    ("Lamb", {"epsilon": -1.0}, "`epsilon` must be a finite number >= 0. Received: epsilon=-1.0"),
    ("ScheduleFreeAdamW", {"beta_1": 0.0}, "`beta_1` must be in (0, 1]. Received: beta_1=0.0"),
    ("ScheduleFreeAdamW", {"beta_2": 1.0}, "`beta_2` must be in [0, 1). Received: beta_2=1.0"),
    ("ScheduleFreeAdamW", {"warmup_steps": -1}, "`warmup_steps` must be an integer >= 0. Received: warmup_steps=-1"),
    ("ScheduleFreeAdamW", {"warmup_steps": 2.5}, "`warmup_steps` must be an integer >= 0. Received: warmup_steps=2.5"),
    (
        "Adafactor",
        {"clip_threshold": 0.0},
        "`clip_threshold` must be a finite number > 0. Received: clip_threshold=0.0",
    ),
    ("Adafactor", {"relative_step": 1}, "`relative_step` must be a boolean (true or false). Received: relative_step=1"),
    ("Adafactor", {"beta_2_decay": float("nan")}, "`beta_2_decay` must be a finite number. Received: beta_2_decay=nan"),
    ("Adafactor", {"epsilon_1": -1e-30}, "`epsilon_1` must be a finite number >= 0. Received: epsilon_1=-1e-30"),
    ("Muon", {"ns_steps": -1}, "`ns_steps` must be an integer >= 0. Received: ns_steps=-1"),
    ("Muon", {"momentum": 1.5}, "`momentum` must be in [0, 1]. Received: momentum=1.5"),
    ("Muon", {"exclude_layers": "dense"}, "`exclude_layers` must be a list of regular expressions"),
    ("Muon", {"exclude_layers": ["(unclosed"]}, "`exclude_layers` holds an invalid regular expression '(unclosed'"),
    ("Muon", {"rms_rate": "0.2"}, "`rms_rate` must be a finite number. Received: rms_rate='0.2'"),
    ("Muon", {"adam_weight_decay": -1.0}, "`adam_weight_decay` must be a finite number >= 0"),
    ("Muon", {"beta_1": 0.9}, "Argument(s) not recognized: {'beta_1': 0.9}. Muon accepts: name, learning_rate"),
]


@pytest.mark.parametrize(
    "class_name, arguments, message",
    INVALID_ARGUMENTS,
    ids=[f"{c}-{','.join(a)}-{i}" for i, (c, a, _) in enumerate(INVALID_ARGUMENTS)],
)
def test_invalid_arguments_are_rejected_with_keras_style_messages(class_name, arguments, message):
    with pytest.raises(InvalidArgumentError) as raised:
        optimizers.deserialize({"class_name": class_name, "config": arguments})
    assert message in str(raised.value)
    assert isinstance(raised.value, ValueError)  # callers catching Keras's ValueError still do


# Where Keras itself checks, the engine says exactly what Keras says.
KERAS_WORDED = [
    ("SGD", {"momentum": 1.5}),
    ("Adam", {"gradient_accumulation_steps": 1}),
    ("Adam", {"use_ema": True, "ema_momentum": 2.0}),
    ("Adam", {"use_ema": True, "ema_overwrite_frequency": 0.5}),
    ("Adam", {"clipnorm": 1.0, "global_clipnorm": 1.0}),
    ("Ftrl", {"learning_rate_power": 0.5}),
    ("Ftrl", {"initial_accumulator_value": -1.0}),
    ("Ftrl", {"l1_regularization_strength": -1.0}),
    ("Ftrl", {"l2_regularization_strength": -1.0}),
    ("Ftrl", {"l2_shrinkage_regularization_strength": -1.0}),
    ("Adam", {"foo": 1}),
    ("AdamW", {"weight_decay": None}),
    ("Lion", {"beta_1": 0.0}),
    ("Lion", {"beta_1": 1.5}),
]


@pytest.mark.parametrize("class_name, arguments", KERAS_WORDED, ids=[f"{c}-{','.join(a)}" for c, a in KERAS_WORDED])
def test_messages_of_checks_keras_makes_are_keras_messages(class_name, arguments):
    import keras

    with pytest.raises(ValueError) as keras_error:
        getattr(keras.optimizers, class_name)(**arguments)
    with pytest.raises(InvalidArgumentError) as ours:
        optimizers.deserialize({"class_name": class_name, "config": arguments})
    assert str(ours.value).startswith(str(keras_error.value))


@pytest.mark.parametrize(
    "config, message",
    [
        (
            "foo",
            "Unknown optimizer: 'foo'. Supported: Adadelta, Adafactor, Adagrad, Adam, AdamW, Adamax, Ftrl, Lamb, "
            "Lion, LossScaleOptimizer, Muon, Nadam, RMSprop, SGD, ScheduleFreeAdamW (case-insensitive).",
        ),
        ("Yogi", "Unknown optimizer: 'Yogi'. Supported: Adadelta, Adafactor"),
        ({"class_name": "MultiOptimizer", "config": {}}, "Unknown optimizer: 'MultiOptimizer'"),
        ({"config": {"learning_rate": 0.1}}, "An optimizer config needs a string 'class_name'"),
        ({"class_name": 3}, "An optimizer config needs a string 'class_name'"),
        ({"class_name": "Adam", "config": [0.1]}, "The optimizer 'config' must be a dict"),
        ({"class_name": "Adam", "config": {}, "learning_rate": 0.1}, "Unexpected key(s) ['learning_rate'] next to"),
        (
            {"module": "my_project.optimizers", "class_name": "Adam", "config": {}},
            "Only Keras's built-in optimizers are supported",
        ),
        ({"class_name": "Adam", "config": {}, "registered_name": "Custom>Adam"}, "Custom optimizers are not supported"),
        ("{not json", "The optimizer config is not valid JSON"),
        (json.dumps(json.dumps("adam")), "JSON text encoded twice"),
        ("[1, 2]", "Could not interpret optimizer identifier"),
        ("", "Unknown optimizer: ''"),
        (None, "Could not interpret optimizer identifier"),
        (42, "Could not interpret optimizer identifier"),
    ],
)
def test_unusable_configs_are_rejected(config, message):
    with pytest.raises(InvalidArgumentError) as raised:
        optimizers.deserialize(config)
    assert message in str(raised.value)


def test_learning_rate_setter_follows_keras():
    engine = optimizers.deserialize("adam")
    engine.set_learning_rate(0.1)
    assert engine.current_learning_rate() == float(np.float32(0.1))
    assert engine.get_config()["config"]["learning_rate"] == float(np.float32(0.1))
    with pytest.raises(InvalidArgumentError, match="must be a finite number >= 0"):
        engine.set_learning_rate(float("nan"))
    with pytest.raises(InvalidArgumentError, match="must be > 0 for Ftrl"):
        optimizers.deserialize("ftrl").set_learning_rate(0.0)
    scheduled = optimizers.deserialize(
        {
            "class_name": "SGD",
            "config": {
                "learning_rate": {
                    "class_name": "ExponentialDecay",
                    "config": {"initial_learning_rate": 0.1, "decay_steps": 10, "decay_rate": 0.5},
                }
            },
        }
    )
    from optserve.server.errors import FailedPreconditionError

    with pytest.raises(FailedPreconditionError, match="is not settable"):
        scheduled.set_learning_rate(0.1)


def test_registry_holds_every_keras_optimizer():
    import keras

    assert sorted(cls.class_name for cls in optimizers.REGISTRY.values()) == sorted(CLASS_NAMES + WRAPPER_NAMES)
    # Every optimizer class Keras exports (but its MultiOptimizer, a container of others) is here.
    exported = {
        name
        for name in dir(keras.optimizers)
        if isinstance(getattr(keras.optimizers, name), type)
        and issubclass(getattr(keras.optimizers, name), keras.optimizers.Optimizer)
        and name not in ("Optimizer", "MultiOptimizer")
    }
    assert exported <= {cls.class_name for cls in optimizers.REGISTRY.values()}
    for name, cls in optimizers.REGISTRY.items():
        assert name == cls.class_name.lower()
