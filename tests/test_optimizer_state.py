"""Optimizer state: slot layout, get/set weights, slots, scalars, checkpoints, and all-or-nothing errors."""

from __future__ import annotations

import copy
import pickle

import numpy as np
import pytest

from optserve.server import optimizers
from optserve.server.errors import FailedPreconditionError, InvalidArgumentError, NotFoundError

pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation doesn't accept a copy keyword")

SHAPES = {"kernel": (3, 4), "bias": (5,), "conv_kernel": (2, 3, 2)}


def make(config, dtype=np.float32, seed=0, shapes=SHAPES):
    engine = optimizers.deserialize(config)
    rng = np.random.default_rng(seed)
    engine.build({name: rng.normal(size=shape).astype(dtype) for name, shape in shapes.items()})
    return engine


def gradients(seed, dtype=np.float32, shapes=SHAPES):
    rng = np.random.default_rng(seed)
    return {name: rng.normal(size=shape).astype(dtype) for name, shape in shapes.items()}


def snapshot(engine):
    """Everything observable, as plain values (for 'nothing changed' checks)."""
    return copy.deepcopy(engine.state_dict())


def assert_same_state(a, b):
    assert a.keys() == b.keys()
    for key in a:
        if key in ("variables",):
            assert a[key].keys() == b[key].keys()
            for name in a[key]:
                np.testing.assert_array_equal(a[key][name], b[key][name])
        elif key == "slots":
            assert a[key].keys() == b[key].keys()
            for name in a[key]:
                assert list(a[key][name]) == list(b[key][name])
                for slot in a[key][name]:
                    np.testing.assert_array_equal(a[key][name][slot], b[key][name][slot])
        else:
            assert a[key] == b[key], key


# ------------------------------------------------------------- slot layout
@pytest.mark.parametrize(
    "config, slots",
    [
        ("sgd", []),
        ({"class_name": "SGD", "config": {"momentum": 0.9}}, ["momentum"]),
        ("rmsprop", ["velocity"]),
        (
            {"class_name": "RMSprop", "config": {"momentum": 0.5, "centered": True}},
            ["velocity", "momentum", "average_gradient"],
        ),
        ("adam", ["momentum", "velocity"]),
        ({"class_name": "Adam", "config": {"amsgrad": True}}, ["momentum", "velocity", "velocity_hat"]),
        ("adadelta", ["accumulated_grad", "accumulated_delta_var"]),
        ("adagrad", ["accumulator"]),
        ("adamax", ["momentum", "norm"]),
        ("nadam", ["momentum", "velocity"]),
        ("ftrl", ["accumulator", "linear"]),
        (
            {"class_name": "Adam", "config": {"use_ema": True, "gradient_accumulation_steps": 2}},
            ["average", "gradient_accumulator", "momentum", "velocity"],
        ),
    ],
)
def test_slot_names_follow_keras(config, slots):
    import keras

    engine = make(config)
    assert engine.slot_names("kernel") == slots
    assert list(engine.get_slots()["bias"]) == slots
    # Keras creates the same slots, in the same order for one variable.
    config = engine.get_config()
    keras_optimizer = keras.optimizers.deserialize(config)
    keras_optimizer.build([keras.Variable(np.zeros((2,), np.float32), name="w")])
    keras_slots = [v.name[len("w_") :] for v in keras_optimizer.variables if v.name.startswith("w_")]
    assert keras_slots == slots


def test_initial_slot_values_follow_keras():
    adagrad = make({"class_name": "Adagrad", "config": {"initial_accumulator_value": 0.25}})
    np.testing.assert_array_equal(adagrad.get_slots(["bias"])["bias"]["accumulator"], np.full(5, 0.25, np.float32))
    ftrl = make("ftrl")
    np.testing.assert_array_equal(ftrl.get_slots(["bias"])["bias"]["accumulator"], np.full(5, 0.1, np.float32))
    np.testing.assert_array_equal(ftrl.get_slots(["bias"])["bias"]["linear"], np.zeros(5, np.float32))


def test_slots_have_the_variable_dtype():
    engine = make("adam", dtype=np.float64)
    for slots in engine.get_slots().values():
        assert all(value.dtype == np.float64 for value in slots.values())


# -------------------------------------------------------------- get_weights
def test_get_weights_is_tf_keras_layout_for_rmsprop_on_a_dense_layer():
    engine = make("rmsprop", shapes={"dense/kernel": (20, 10), "dense/bias": (10,)})
    for step in range(10):
        engine.apply(gradients(step, shapes={"dense/kernel": (20, 10), "dense/bias": (10,)}))
    weights = engine.get_weights()
    assert [w.shape for w in weights] == [(), (20, 10), (10,)]
    assert int(weights[0]) == 10 and weights[0].dtype == np.int64
    slots = engine.get_slots()
    np.testing.assert_array_equal(weights[1], slots["dense/kernel"]["velocity"])
    np.testing.assert_array_equal(weights[2], slots["dense/bias"]["velocity"])
    assert engine.weights_description() == ["iterations", "dense/kernel:velocity", "dense/bias:velocity"]


def test_get_weights_goes_variable_by_variable_and_includes_pipeline_slots():
    engine = make({"class_name": "RMSprop", "config": {"momentum": 0.5, "use_ema": True}})
    assert engine.weights_description() == [
        "iterations",
        "kernel:average",
        "kernel:velocity",
        "kernel:momentum",
        "bias:average",
        "bias:velocity",
        "bias:momentum",
        "conv_kernel:average",
        "conv_kernel:velocity",
        "conv_kernel:momentum",
    ]
    weights = engine.get_weights()
    slots = engine.get_slots()
    flat = [value for per_variable in slots.values() for value in per_variable.values()]
    assert len(weights) == 1 + len(flat)
    for mine, expected in zip(weights[1:], flat):
        np.testing.assert_array_equal(mine, expected)


def test_get_weights_match_keras_optimizer_variables_by_name():
    import keras

    engine = make({"class_name": "Adam", "config": {"amsgrad": True, "learning_rate": 0.01}})
    keras_variables = [keras.Variable(value, name=name) for name, value in engine.read_variables().items()]
    keras_optimizer = keras.optimizers.deserialize(engine.get_config())
    for step in range(3):
        grads = gradients(step)
        keras_optimizer.apply(list(grads.values()), keras_variables)
        engine.apply(grads)
    by_name = {v.name: np.asarray(v.value) for v in keras_optimizer.variables}
    weights = engine.get_weights()
    assert int(weights[0]) == int(np.asarray(keras_optimizer.iterations.value))
    for description, value in zip(engine.weights_description()[1:], weights[1:]):
        name, slot = description.split(":")
        np.testing.assert_array_equal(value, by_name[f"{name}_{slot}"])


def test_set_weights_round_trip_continues_identically():
    config = {"class_name": "Nadam", "config": {"learning_rate": 0.01}}
    original = make(config)
    for step in range(3):
        original.apply(gradients(step))
    restored = make(config)
    restored.assign_variables(original.read_variables())
    restored.set_weights(original.get_weights())
    restored.set_scalars(original.get_scalars())  # Nadam's u_product lives beside the weights
    assert restored.iterations == 3
    for step in range(3, 6):
        original.apply(gradients(step))
        restored.apply(gradients(step))
    assert_same_state(original.state_dict(), restored.state_dict())


def test_set_weights_accepts_other_real_dtypes_like_keras_assign():
    engine = make("rmsprop", shapes={"dense/kernel": (20, 10), "dense/bias": (10,)})
    engine.set_weights([np.array(10), np.ones([20, 10]), np.zeros([10])])  # float64 and int values
    assert engine.iterations == 10
    assert engine.get_weights()[1].dtype == np.float32
    np.testing.assert_array_equal(engine.get_weights()[1], np.ones([20, 10], np.float32))


def test_set_weights_keeps_the_position_inside_an_accumulation_cycle():
    engine = make({"class_name": "SGD", "config": {"gradient_accumulation_steps": 3}})
    for step in range(4):
        engine.apply(gradients(step))
    assert (engine.iterations, engine.raw_iterations) == (1, 4)
    engine.set_weights(engine.get_weights())
    assert (engine.iterations, engine.raw_iterations) == (1, 4)
    weights = engine.get_weights()
    weights[0] = np.array(5)
    engine.set_weights(weights)
    assert (engine.iterations, engine.raw_iterations) == (5, 16)


@pytest.mark.parametrize(
    "mutate, message",
    [
        (lambda w: w[:-1], "`weights` has 6 entries; expected 7: iterations, kernel:momentum, kernel:velocity"),
        (lambda w: w + [np.zeros(3)], "`weights` has 8 entries; expected 7"),
        (
            lambda w: [w[0], w[1], np.zeros((4, 3)), *w[3:]],
            "Entry 2 (slot 'velocity' of variable 'kernel') has shape (4, 3); expected (3, 4).",
        ),
        (
            lambda w: [*w[:5], np.zeros((2, 3)), w[6]],
            "Entry 5 (slot 'momentum' of variable 'conv_kernel') has shape (2, 3); expected (2, 3, 2).",
        ),
        (lambda w: [np.array(-1), *w[1:]], "Entry 0 (iterations) must be an integer >= 0. Received: array(-1)"),
        (lambda w: [np.array(1.5), *w[1:]], "Entry 0 (iterations) must be an integer >= 0"),
        (lambda w: [np.array([1, 2]), *w[1:]], "Entry 0 (iterations) must be an integer >= 0"),
        (lambda w: [w[0], np.full((3, 4), "x"), *w[2:]], "Entry 1 (slot 'momentum' of variable 'kernel') has dtype"),
        (lambda w: {"weights": w}, "`weights` must be a list of 7 arrays."),
    ],
)
def test_set_weights_errors_say_which_entry_and_change_nothing(mutate, message):
    engine = make("adam")
    engine.apply(gradients(0))
    before = snapshot(engine)
    fresh = [w + 1 for w in engine.get_weights()]  # different values, so a partial write would show
    with pytest.raises(InvalidArgumentError) as raised:
        engine.set_weights(mutate(fresh))
    assert message in str(raised.value)
    assert_same_state(before, snapshot(engine))


# -------------------------------------------------------------- apply errors
@pytest.mark.parametrize(
    "grads, error, message",
    [
        (
            lambda g: {**g, "unknown": np.zeros(2, np.float32)},
            NotFoundError,
            "Gradient(s) for unknown variable(s) 'unknown'. This optimizer holds: 'kernel', 'bias', 'conv_kernel'",
        ),
        (
            lambda g: {**g, "bias": np.zeros(4, np.float32)},
            InvalidArgumentError,
            "Gradient for variable 'bias' has shape (4,); expected (5,).",
        ),
        (
            lambda g: {**g, "conv_kernel": g["conv_kernel"].astype(np.float64)},
            InvalidArgumentError,
            "Gradient for variable 'conv_kernel' has dtype float64; expected float32.",
        ),
        (
            lambda g: {**g, "kernel": g["kernel"].astype(np.int32)},
            InvalidArgumentError,
            "Gradient for variable 'kernel' has dtype int32; expected float32.",
        ),
        (lambda g: {name: None for name in g}, InvalidArgumentError, "No gradients provided for any variable."),
        (lambda g: {}, InvalidArgumentError, "No gradients provided for any variable."),
        (lambda g: list(g.values()), InvalidArgumentError, "Gradients must be a {name: array} mapping"),
    ],
)
@pytest.mark.parametrize(
    "config",
    [
        "sgd",
        {"class_name": "Adam", "config": {"use_ema": True, "clipnorm": 1.0, "weight_decay": 0.1}},
        {"class_name": "Nadam", "config": {"gradient_accumulation_steps": 2, "loss_scale_factor": 4.0}},
    ],
    ids=["sgd", "adam-ema-clip-decay", "nadam-accumulation"],
)
def test_apply_errors_change_nothing(config, grads, error, message):
    engine = make(config)
    engine.apply(gradients(0))
    before = snapshot(engine)
    with pytest.raises(error) as raised:
        engine.apply(grads(gradients(1)))
    assert message in str(raised.value)
    assert_same_state(before, snapshot(engine))


def test_apply_before_build_is_a_failed_precondition():
    with pytest.raises(FailedPreconditionError, match="call build"):
        optimizers.deserialize("adam").apply({"kernel": np.zeros(3, np.float32)})


def test_a_subset_of_gradients_updates_only_those_variables():
    engine = make("sgd")
    before = engine.read_variables()
    grads = gradients(0)
    engine.apply({"kernel": grads["kernel"], "bias": None})
    after = engine.read_variables()
    assert not np.array_equal(after["kernel"], before["kernel"])
    np.testing.assert_array_equal(after["bias"], before["bias"])
    np.testing.assert_array_equal(after["conv_kernel"], before["conv_kernel"])
    assert engine.iterations == 1


@pytest.mark.parametrize(
    "config",
    [
        {"class_name": "Adam", "config": {"clipnorm": 0.1}},
        {"class_name": "Adam", "config": {"global_clipnorm": 0.1, "loss_scale_factor": 8.0}},
        {"class_name": "SGD", "config": {"clipvalue": 0.1, "gradient_accumulation_steps": 2}},
    ],
)
def test_incoming_gradients_are_never_written_and_may_be_read_only(config):
    engine = make(config)
    for step in range(4):
        grads = gradients(step)
        originals = {name: value.copy() for name, value in grads.items()}
        for value in grads.values():
            value.flags.writeable = False
        engine.apply(grads)
        for name in grads:
            np.testing.assert_array_equal(grads[name], originals[name])


def test_non_contiguous_gradients_are_accepted():
    engine = make("adam")
    reference = make("adam")
    grads = gradients(0)
    strided = {name: np.asfortranarray(value) for name, value in grads.items()}
    engine.apply(strided)
    reference.apply(grads)
    assert_same_state(engine.state_dict(), reference.state_dict())


# ------------------------------------------------------------ variables
def test_build_copies_and_read_variables_returns_copies():
    values = {"w": np.ones(3, np.float32)}
    engine = optimizers.deserialize("sgd")
    engine.build(values)
    values["w"][:] = 5
    read = engine.read_variables()
    np.testing.assert_array_equal(read["w"], np.ones(3, np.float32))
    read["w"][:] = 7
    np.testing.assert_array_equal(engine.read_variables(["w"])["w"], np.ones(3, np.float32))
    assert engine.variable_names == ["w"]


@pytest.mark.parametrize(
    "variables, error, message",
    [
        ({}, InvalidArgumentError, "non-empty {name: array} mapping"),
        ({"w": np.zeros(3, np.int32)}, InvalidArgumentError, "Variable 'w' has dtype int32; supported dtypes are"),
        ({"w": np.zeros(3, np.float16)}, InvalidArgumentError, "Variable 'w' has dtype float16"),
        ({"": np.zeros(3, np.float32)}, InvalidArgumentError, "Variable names must be non-empty strings"),
        ({3: np.zeros(3, np.float32)}, InvalidArgumentError, "Variable names must be non-empty strings"),
    ],
)
def test_build_errors(variables, error, message):
    engine = optimizers.deserialize("adam")
    with pytest.raises(error, match=message.replace("{", r"\{").replace("(", r"\(")):
        engine.build(variables)
    assert not engine.built


def test_build_twice_is_a_failed_precondition():
    engine = make("adam")
    with pytest.raises(FailedPreconditionError, match="already built"):
        engine.build({"w": np.zeros(2, np.float32)})


def test_assign_variables_is_all_or_nothing_and_casts():
    engine = make("adam")
    before = snapshot(engine)
    with pytest.raises(InvalidArgumentError, match=r"Value for variable 'bias' has shape \(4,\); expected \(5,\)"):
        engine.assign_variables({"kernel": np.zeros((3, 4)), "bias": np.zeros(4)})
    with pytest.raises(NotFoundError, match="Unknown variable 'nope'"):
        engine.assign_variables({"kernel": np.zeros((3, 4)), "nope": np.zeros(4)})
    assert_same_state(before, snapshot(engine))
    engine.assign_variables({"kernel": np.full((3, 4), 2.0)})  # float64 values, float32 variable
    np.testing.assert_array_equal(engine.read_variables(["kernel"])["kernel"], np.full((3, 4), 2.0, np.float32))


def test_read_unknown_variable_is_not_found():
    with pytest.raises(NotFoundError, match="Unknown variable 'nope'"):
        make("adam").read_variables(["nope"])
    with pytest.raises(NotFoundError):
        make("adam").slot_names("nope")


# ----------------------------------------------------------------- slots
def test_set_slots_is_all_or_nothing():
    engine = make("adam")
    engine.apply(gradients(0))
    before = snapshot(engine)
    good = np.ones((3, 4), np.float32)
    no_slot = "Variable 'bias' has no slot 'velocity_hat'. Its slots: 'momentum', 'velocity'"
    with pytest.raises(NotFoundError, match=no_slot):
        engine.set_slots({"kernel": {"momentum": good}, "bias": {"velocity_hat": np.ones(5)}})
    wrong_shape = r"Slot 'velocity' of variable 'bias' has shape \(3,\); expected \(5,\)"
    with pytest.raises(InvalidArgumentError, match=wrong_shape):
        engine.set_slots({"kernel": {"momentum": good}, "bias": {"velocity": np.ones(3)}})
    with pytest.raises(NotFoundError, match="Unknown variable 'nope'"):
        engine.set_slots({"kernel": {"momentum": good}, "nope": {}})
    assert_same_state(before, snapshot(engine))
    engine.set_slots({"kernel": {"momentum": good}})
    np.testing.assert_array_equal(engine.get_slots(["kernel"])["kernel"]["momentum"], good)


def test_get_slots_returns_copies():
    engine = make("adam")
    slots = engine.get_slots()
    slots["kernel"]["momentum"][:] = 9
    assert not engine.get_slots()["kernel"]["momentum"].any()


# --------------------------------------------------------------- scalars
def test_nadam_u_product_is_optimizer_state():
    engine = make("nadam")
    assert engine.get_scalars() == {"u_product": 1.0}
    engine.apply(gradients(0))
    u_product = engine.get_scalars()["u_product"]
    expected = np.float32(1.0) * np.float32(0.9) * (np.float32(1) - np.float32(0.5) * np.float32(0.96))
    assert u_product == float(expected)
    engine.set_scalars({"u_product": 0.5})
    assert engine.get_scalars() == {"u_product": 0.5}
    with pytest.raises(NotFoundError, match="Nadam has no optimizer-wide scalar 'beta'. Known: u_product"):
        engine.set_scalars({"beta": 1.0})
    with pytest.raises(InvalidArgumentError, match="must be a finite number"):
        engine.set_scalars({"u_product": float("inf")})
    assert engine.get_scalars() == {"u_product": 0.5}


def test_nadam_u_product_takes_the_first_variable_dtype():
    engine = optimizers.deserialize("nadam")
    engine.build({"a": np.ones(2, np.float64), "b": np.ones(2, np.float32)})
    engine.apply({"a": np.ones(2), "b": np.ones(2, np.float32)})
    assert engine.get_scalars()["u_product"] == float(0.9 * (1 - 0.5 * 0.96))


def test_other_optimizers_have_no_scalars():
    for name in ("sgd", "rmsprop", "adam", "adadelta", "adagrad", "adamax", "ftrl"):
        engine = make(name)
        assert engine.get_scalars() == {}
        with pytest.raises(NotFoundError, match="Known: none"):
            engine.set_scalars({"u_product": 1.0})


# ---------------------------------------------------------- counters, lr
def test_counters_under_gradient_accumulation():
    engine = make({"class_name": "Adam", "config": {"gradient_accumulation_steps": 3}})
    before = engine.read_variables()
    for step in range(2):
        engine.apply(gradients(step))
    assert (engine.iterations, engine.raw_iterations) == (0, 2)
    np.testing.assert_array_equal(engine.read_variables()["kernel"], before["kernel"])
    engine.apply(gradients(2))
    assert (engine.iterations, engine.raw_iterations) == (1, 3)
    assert not np.array_equal(engine.read_variables()["kernel"], before["kernel"])
    assert not engine.get_slots()["kernel"]["gradient_accumulator"].any()


def test_schedule_reads_the_raw_counter():
    engine = make(
        {
            "class_name": "SGD",
            "config": {
                "gradient_accumulation_steps": 2,
                "learning_rate": {
                    "class_name": "PiecewiseConstantDecay",
                    "config": {"boundaries": [0, 1], "values": [0.5, 0.25, 0.125]},
                },
            },
        }
    )
    rates = []
    for step in range(4):
        rates.append(engine.current_learning_rate())
        engine.apply(gradients(step))
    assert rates == [0.5, 0.25, 0.125, 0.125]


def test_set_iterations_validates():
    engine = make("adam")
    engine.set_iterations(7)
    assert engine.iterations == 7
    for bad in (-1, 1.5, "3", None):
        with pytest.raises(InvalidArgumentError, match="raw_iterations must be an integer >= 0"):
            engine.set_iterations(bad)
    assert engine.iterations == 7


# ----------------------------------------------------------- checkpoints
@pytest.mark.parametrize(
    "config",
    [
        {"class_name": "Nadam", "config": {"use_ema": True, "gradient_accumulation_steps": 2}},
        {"class_name": "Ftrl", "config": {"weight_decay": 0.1, "l1_regularization_strength": 0.01}},
        {
            "class_name": "RMSprop",
            "config": {
                "momentum": 0.5,
                "centered": True,
                "learning_rate": {
                    "class_name": "ExponentialDecay",
                    "config": {"initial_learning_rate": 0.1, "decay_steps": 2, "decay_rate": 0.5},
                },
            },
        },
    ],
    ids=["nadam", "ftrl", "rmsprop-schedule"],
)
def test_state_dict_restores_into_a_fresh_optimizer_and_continues_identically(config):
    original = make(config)
    original.exclude_from_weight_decay(["bias"])
    for step in range(3):
        original.apply(gradients(step))
    state = pickle.loads(pickle.dumps(original.state_dict()))  # plain data, survives a checkpoint file
    restored = optimizers.deserialize(state["config"])
    restored.load_state_dict(state)
    assert restored.variable_names == original.variable_names
    assert_same_state(original.state_dict(), restored.state_dict())
    for step in range(3, 7):
        original.apply(gradients(step))
        restored.apply(gradients(step))
    assert_same_state(original.state_dict(), restored.state_dict())


def test_state_dict_keeps_a_changed_learning_rate():
    original = make("adam")
    original.set_learning_rate(0.25)
    restored = optimizers.deserialize("adam")
    restored.load_state_dict(original.state_dict())
    assert restored.current_learning_rate() == 0.25


def test_load_state_dict_errors_change_nothing():
    engine = make("adam")
    engine.apply(gradients(0))
    before = snapshot(engine)
    state = make("adam", seed=1).state_dict()
    wrong_class = make("nadam").state_dict()
    with pytest.raises(InvalidArgumentError, match="State was saved by a Nadam optimizer; this one is Adam"):
        engine.load_state_dict(wrong_class)
    other_variables = make("adam", shapes={"w": (2,)}).state_dict()
    with pytest.raises(InvalidArgumentError, match="State holds variables 'w'"):
        engine.load_state_dict(other_variables)
    bad_shape = copy.deepcopy(state)
    bad_shape["slots"]["bias"]["velocity"] = np.zeros(4, np.float32)
    with pytest.raises(InvalidArgumentError, match=r"State slot 'velocity' of variable 'bias' has shape \(4,\)"):
        engine.load_state_dict(bad_shape)
    missing_slot = copy.deepcopy(state)
    del missing_slot["slots"]["bias"]["velocity"]
    with pytest.raises(InvalidArgumentError, match="State has slots \\['momentum'\\] for variable 'bias'"):
        engine.load_state_dict(missing_slot)
    with pytest.raises(InvalidArgumentError, match="Unknown optimizer state format"):
        engine.load_state_dict({**state, "format": "other"})
    assert_same_state(before, snapshot(engine))


def test_failed_load_into_an_unbuilt_optimizer_leaves_it_unbuilt():
    state = make("adam").state_dict()
    del state["slots"]["bias"]["momentum"]
    engine = optimizers.deserialize("adam")
    with pytest.raises(InvalidArgumentError):
        engine.load_state_dict(state)
    assert not engine.built and engine.variable_names == []


# -------------------------------------------------------- weight decay, EMA
def test_weight_decay_exclusions_match_by_name_like_keras():
    engine = make({"class_name": "SGD", "config": {"weight_decay": 0.5, "learning_rate": 0.1}})
    engine.exclude_from_weight_decay(["bias", "^conv"])
    before = engine.read_variables()
    zero = {name: np.zeros(shape, np.float32) for name, shape in SHAPES.items()}
    engine.apply(zero)
    after = engine.read_variables()
    np.testing.assert_array_equal(after["bias"], before["bias"])
    np.testing.assert_array_equal(after["conv_kernel"], before["conv_kernel"])
    lr, wd = np.float32(0.1), np.float32(0.5)
    np.testing.assert_array_equal(after["kernel"], before["kernel"] - before["kernel"] * wd * lr)
    with pytest.raises(InvalidArgumentError, match="not a valid regular expression"):
        engine.exclude_from_weight_decay(["("])


def test_finalize_variable_values_takes_the_moving_averages():
    engine = make({"class_name": "SGD", "config": {"use_ema": True, "learning_rate": 0.1}})
    for step in range(3):
        engine.apply(gradients(step))
    averages = {name: slots["average"] for name, slots in engine.get_slots().items()}
    engine.finalize_variable_values()
    for name, value in engine.read_variables().items():
        np.testing.assert_array_equal(value, averages[name])


@pytest.mark.parametrize(
    "config",
    [
        "adam",
        {"class_name": "Nadam", "config": {"gradient_accumulation_steps": 2, "use_ema": True, "weight_decay": 0.1}},
        {"class_name": "Adam", "config": {"loss_scale_factor": 8.0, "clipvalue": 1.0}},
    ],
    ids=["adam", "nadam-accumulation-ema-decay", "adam-loss-scale-clipvalue"],
)
def test_apply_allocates_no_full_size_arrays_per_step(config):
    import tracemalloc

    size = 1 << 20
    engine = optimizers.deserialize(config)
    engine.build({"w": np.zeros(size, np.float32)})
    grads = {"w": np.ones(size, np.float32)}
    engine.apply(grads)
    engine.apply(grads)  # warm: kernel scratch exists now
    tracemalloc.start()
    try:
        for _ in range(3):
            engine.apply(grads)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < size * 4 // 10, f"apply allocated {peak} bytes for a {size * 4}-byte variable"
