"""Setting the learning rate of a running model: a float, or a new schedule, as in Keras.

Engine (parity with Keras's ``optimizer.learning_rate = ...``), checkpoint and config
round trips, the SetWeights RPC (``state_fields``, the schedule field, old-style
requests) and ``Client.set_weights(learning_rate=...)``.
"""

from __future__ import annotations

import json
import re
import warnings

import grpc
import numpy as np
import pytest
import rpc_helpers as rpc

from optserve.client import Client
from optserve.client.client import FailedPreconditionError
from optserve.client.client import InvalidArgumentError as ClientInvalidArgument
from optserve.protos import optserve_pb2 as pb
from optserve.server import optimizers
from optserve.server.app import start_server
from optserve.server.errors import FailedPreconditionError as EngineFailedPrecondition
from optserve.server.errors import InvalidArgumentError

pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation doesn't accept a copy keyword")

DECAY = {
    "module": "keras.optimizers.schedules",
    "class_name": "ExponentialDecay",
    "config": {
        "initial_learning_rate": 0.5,
        "decay_steps": 2,
        "decay_rate": 0.5,
        "staircase": False,
        "name": "ExponentialDecay",
    },
    "registered_name": None,
}
COSINE = {
    "module": "keras.optimizers.schedules",
    "class_name": "CosineDecay",
    "config": {
        "initial_learning_rate": 0.2,
        "decay_steps": 10,
        "alpha": 0.0,
        "name": "CosineDecay",
        "warmup_target": None,
        "warmup_steps": 0,
    },
    "registered_name": None,
}
SHAPES = {"kernel": (3, 4), "bias": (5,)}


def _initial():
    rng = np.random.default_rng(0)
    return {name: rng.normal(size=shape).astype(np.float32) for name, shape in SHAPES.items()}


def _grads(seed):
    rng = np.random.default_rng(100 + seed)
    return {name: rng.normal(size=shape).astype(np.float32) for name, shape in SHAPES.items()}


def _engine(config):
    engine = optimizers.deserialize(config)
    engine.build(_initial())
    return engine


# --------------------------------------------------------------------- engine


def test_learning_rate_changes_match_keras_step_by_step():
    """ReduceLROnPlateau-style float changes, then a new schedule, then another one: same numbers as Keras."""
    import keras

    variables = {name: keras.Variable(value, name=name) for name, value in _initial().items()}
    local = keras.optimizers.Adam(learning_rate=0.01)
    local.build(list(variables.values()))
    engine = _engine(keras.optimizers.serialize(local))
    changes = {2: 0.005, 4: 0.0, 5: DECAY, 8: COSINE}
    for step in range(11):
        change = changes.get(step)
        if change is not None:
            local.learning_rate = keras.optimizers.schedules.deserialize(change) if isinstance(change, dict) else change
            engine.set_learning_rate(change)
        keras_rate = np.float32(keras.ops.convert_to_numpy(local.learning_rate))
        assert engine.current_learning_rate() == float(keras_rate), step
        grads = _grads(step)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            local.apply([keras.ops.convert_to_tensor(grads[name]) for name in variables], list(variables.values()))
        engine.apply(grads)
        for name, value in engine.read_variables().items():
            np.testing.assert_array_equal(
                value, keras.ops.convert_to_numpy(variables[name]), err_msg=f"{name} at step {step}"
            )
    keras_config = keras.optimizers.serialize(local)["config"]
    assert engine.get_config()["config"]["learning_rate"] == keras_config["learning_rate"] == COSINE


def test_a_float_cannot_replace_a_schedule_but_a_schedule_can():
    engine = _engine({"class_name": "SGD", "config": {"learning_rate": DECAY}})
    with pytest.raises(EngineFailedPrecondition, match="hence its learning rate is not settable"):
        engine.set_learning_rate(0.1)
    assert engine.get_config()["config"]["learning_rate"] == DECAY
    engine.set_learning_rate(COSINE)
    assert engine.get_config()["config"]["learning_rate"] == COSINE
    assert engine.current_learning_rate() == pytest.approx(0.2)


def test_a_new_schedule_is_checked_as_in_a_config():
    engine = _engine({"class_name": "SGD", "config": {"learning_rate": 0.1}})
    bad = {
        "class_name": "ExponentialDecay",
        "config": {"initial_learning_rate": 0.1, "decay_steps": 0, "decay_rate": 0.5},
    }
    with pytest.raises(InvalidArgumentError) as from_set:
        engine.set_learning_rate(bad)
    with pytest.raises(InvalidArgumentError) as from_config:
        optimizers.deserialize({"class_name": "SGD", "config": {"learning_rate": bad}})
    assert str(from_set.value) == str(from_config.value)
    with pytest.raises(InvalidArgumentError, match="Unknown learning rate schedule"):
        engine.set_learning_rate({"class_name": "Warmup", "config": {}})
    assert engine.current_learning_rate() == pytest.approx(0.1)


@pytest.mark.parametrize("original", [0.1, DECAY])
def test_a_replaced_schedule_survives_state_dict_and_load_state_dict(original):
    engine = _engine({"class_name": "SGD", "config": {"learning_rate": original}})
    engine.apply(_grads(0))
    engine.set_learning_rate(COSINE)
    engine.apply(_grads(1))
    restored = optimizers.deserialize({"class_name": "SGD", "config": {"learning_rate": original}})
    restored.load_state_dict(engine.state_dict())
    assert restored.get_config() == engine.get_config()
    assert restored.current_learning_rate() == engine.current_learning_rate()
    engine.apply(_grads(2))
    restored.apply(_grads(2))
    for name, value in engine.read_variables().items():
        np.testing.assert_array_equal(restored.read_variables()[name], value)


# ------------------------------------------------------------------------ RPC


@pytest.fixture
def stub(address):
    channel, stub = rpc.connect(address)
    yield stub
    channel.close()


def _sgd_model(client, model_id="m", learning_rate=0.1):
    client.create_model(
        model_id, {"class_name": "SGD", "config": {"learning_rate": learning_rate}}, {"w": np.ones(3, np.float32)}
    )


def _push_and_read(client, model_id="m", gradient=1.0):
    result = client.push(model_id, {"w": np.full(3, gradient, np.float32)})
    _, values = client.pull(model_id)
    return result, values["w"]


def test_client_sets_a_float_learning_rate_for_the_next_update(address):
    with Client(address) as client:
        _sgd_model(client)
        client.push("m", {"w": np.ones(3, np.float32)})
        state = client.set_weights("m", learning_rate=0.25)
        assert state.learning_rate == 0.25 and state.iterations == 1 and state.learning_rate_schedule is None
        _, w = _push_and_read(client)
        np.testing.assert_array_equal(w, np.float32(1) - np.float32(0.1) - np.float32(0.25))
        state = client.set_weights("m", learning_rate=0.0)  # 0 is a rate like any other
        assert state.learning_rate == 0.0
        result, w2 = _push_and_read(client)
        np.testing.assert_array_equal(w2, w)
        assert result.iterations == 3 and result.learning_rate == 0.0


def test_client_replaces_the_rate_by_a_schedule(address):
    with Client(address) as client:
        _sgd_model(client)
        for _ in range(2):
            client.push("m", {"w": np.ones(3, np.float32)})
        state = client.set_weights("m", learning_rate=DECAY)
        expected = optimizers.deserialize({"class_name": "SGD", "config": {"learning_rate": DECAY}})
        expected.build({"w": np.ones(3, np.float32)})
        expected.set_iterations(2)
        assert state.learning_rate == expected.current_learning_rate()
        assert state.learning_rate_schedule == DECAY and state.iterations == 2
        [info] = client.list_models("m")
        assert info.learning_rate_schedule == DECAY
        result = client.push("m", {"w": np.ones(3, np.float32)})
        expected.apply({"w": np.ones(3, np.float32)})  # the same schedule value at iteration 2
        assert result.learning_rate == expected.current_learning_rate()
        # As in Keras: a float cannot replace it now, a new schedule can.
        with pytest.raises(FailedPreconditionError, match="hence its learning rate is not settable"):
            client.set_weights("m", learning_rate=0.1, variables={"w": np.zeros(3, np.float32)})
        _, values = client.pull("m")
        assert not np.array_equal(values["w"], np.zeros(3, np.float32))  # refused whole
        assert client.set_weights("m", learning_rate=COSINE).learning_rate_schedule == COSINE


def test_client_refuses_a_bad_learning_rate_eagerly(address):
    with Client(address) as client:
        _sgd_model(client)
        for bad in (-0.1, float("nan"), float("inf"), "fast", True, [0.1]):
            with pytest.raises(ValueError, match="`learning_rate` must be"):
                client.set_weights("m", learning_rate=bad)
        with pytest.raises(ValueError, match="serialized schedule"):
            client.set_weights("m", learning_rate={"initial_learning_rate": 0.1})
        with pytest.raises(ClientInvalidArgument, match="Unknown learning rate schedule"):
            client.set_weights("m", learning_rate={"class_name": "Nope", "config": {}})
        assert client.list_models("m")[0].learning_rate == pytest.approx(0.1)


def test_client_accepts_a_keras_schedule_object(address):
    import keras

    with Client(address) as client:
        _sgd_model(client)
        schedule = keras.optimizers.schedules.ExponentialDecay(0.5, decay_steps=2, decay_rate=0.5)
        state = client.set_weights("m", learning_rate=schedule)
        assert state.learning_rate_schedule == keras.optimizers.schedules.serialize(schedule)
        assert state.learning_rate == 0.5


def test_a_set_schedule_survives_a_checkpoint_and_restore(tmp_path):
    with start_server(checkpoint_dir=tmp_path, checkpoint_every="off") as running:
        with Client(running.address) as client:
            _sgd_model(client)
            client.push("m", {"w": np.ones(3, np.float32)})
            client.set_weights("m", learning_rate=DECAY)
            before = client.get_weights("m", include_variables=True)
    with start_server(checkpoint_dir=tmp_path, checkpoint_every="off") as running:
        with Client(running.address) as client:
            after = client.get_weights("m", include_variables=True)
            assert after.learning_rate_schedule == DECAY
            assert after.learning_rate == before.learning_rate and after.iterations == 1
            # Joining with the config the model was created with still works after the change.
            _sgd_model(client)
            assert client.list_models("m")[0].learning_rate_schedule == DECAY


def test_set_weights_with_state_fields_changes_only_those_fields(stub, address):
    with Client(address) as client:
        _sgd_model(client)
        for _ in range(3):
            client.push("m", {"w": np.ones(3, np.float32)})
    # Only the learning rate: the zeros in the other fields are not written.
    request = pb.SetWeightsRequest(
        model_id="m", has_state=True, state_fields=["learning_rate"], state=pb.OptimizerState(learning_rate=0.5)
    )
    state = stub.SetWeights(iter([request]), timeout=10).state
    assert (state.learning_rate, state.iterations, state.raw_iterations, state.step) == (0.5, 3, 3, 3)
    # Only iterations: the step stays, the raw counter moves with it.
    request = pb.SetWeightsRequest(
        model_id="m", has_state=True, state_fields=["iterations"], state=pb.OptimizerState(iterations=10)
    )
    state = stub.SetWeights(iter([request]), timeout=10).state
    assert (state.iterations, state.raw_iterations, state.step, state.learning_rate) == (10, 10, 3, 0.5)
    request = pb.SetWeightsRequest(
        model_id="m",
        has_state=True,
        state_fields=["learning_rate_schedule_json"],
        state=pb.OptimizerState(learning_rate_schedule_json=json.dumps(DECAY)),
    )
    state = stub.SetWeights(iter([request]), timeout=10).state
    assert json.loads(state.learning_rate_schedule_json) == DECAY and state.iterations == 10


def test_set_weights_without_state_fields_keeps_an_absent_learning_rate(stub, address):
    with Client(address) as client:
        _sgd_model(client)
        client.push("m", {"w": np.ones(3, np.float32)})
    # The whole state, as clients that predate state_fields send it: a rate of 0 is absent on the wire.
    state = rpc.set_weights(stub, "m", state=pb.OptimizerState(iterations=1, raw_iterations=1, step=1)).state
    assert state.learning_rate == pytest.approx(0.1) and not state.learning_rate_schedule_json
    state = rpc.set_weights(
        stub, "m", state=pb.OptimizerState(iterations=1, raw_iterations=1, step=1, learning_rate=0.0)
    ).state
    assert state.learning_rate == 0.0  # present: set, 0 included


def test_a_state_read_back_sets_the_same_schedule(stub, address):
    with Client(address) as client:
        client.create_model(
            "m", {"class_name": "SGD", "config": {"learning_rate": DECAY}}, {"w": np.ones(3, np.float32)}
        )
        client.push("m", {"w": np.ones(3, np.float32)})
    before = rpc.snapshot(stub, "m")
    state, tensors = before
    rpc.set_weights(stub, "m", tensors, state)
    rpc.assert_same_snapshot(before, rpc.snapshot(stub, "m"))


@pytest.mark.parametrize(
    "fields, state, message",
    [
        (["learning_rate", "lr"], pb.OptimizerState(), "unknown OptimizerState fields \\['lr'\\]"),
        (["learning_rate_schedule_json"], pb.OptimizerState(), "is empty"),
        ([], pb.OptimizerState(learning_rate_schedule_json="{nope"), "not valid JSON"),
        ([], pb.OptimizerState(learning_rate_schedule_json='"ExponentialDecay"'), "must be a JSON object"),
        (
            ["learning_rate_schedule_json"],
            pb.OptimizerState(
                learning_rate_schedule_json='{"class_name": "ExponentialDecay",'
                ' "config": {"initial_learning_rate": 0.1}}'
            ),
            "decay_steps",
        ),
        (["learning_rate"], pb.OptimizerState(learning_rate=-1.0), "must be a finite number >= 0"),
    ],
)
def test_bad_learning_rate_requests_are_refused_whole(stub, address, fields, state, message):
    with Client(address) as client:
        _sgd_model(client)
        client.push("m", {"w": np.ones(3, np.float32)})
    before = rpc.snapshot(stub, "m")
    request = pb.SetWeightsRequest(
        model_id="m",
        has_state=True,
        state_fields=fields,
        state=state,
        tensors=[pb.TensorChunk(name="w", dtype=pb.FLOAT32, shape=[3], data=np.zeros(3, np.float32).tobytes())],
    )
    with pytest.raises(grpc.RpcError) as error:
        stub.SetWeights(iter([request]), timeout=10)
    assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert re.search(message, error.value.details()), error.value.details()
    rpc.assert_same_snapshot(before, rpc.snapshot(stub, "m"))


def test_a_float_on_a_schedule_is_failed_precondition_over_rpc(stub, address):
    with Client(address) as client:
        client.create_model(
            "m", {"class_name": "SGD", "config": {"learning_rate": DECAY}}, {"w": np.ones(3, np.float32)}
        )
    before = rpc.snapshot(stub, "m")
    request = pb.SetWeightsRequest(
        model_id="m", has_state=True, state_fields=["learning_rate"], state=pb.OptimizerState(learning_rate=0.01)
    )
    with pytest.raises(grpc.RpcError) as error:
        stub.SetWeights(iter([request]), timeout=10)
    assert error.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "This optimizer was created with a `LearningRateSchedule` object" in error.value.details()
    rpc.assert_same_snapshot(before, rpc.snapshot(stub, "m"))


def test_setting_iterations_on_a_schedule_model_moves_its_rate_along(address):
    # Only the counter is named in the request: the schedule's rate follows it, nothing refuses it.
    with Client(address) as client:
        client.create_model(
            "m", {"class_name": "SGD", "config": {"learning_rate": DECAY}}, {"w": np.ones(3, np.float32)}
        )
        state = client.set_weights("m", iterations=4)
        assert state.iterations == 4 and state.raw_iterations == 4 and state.step == 0
        assert state.learning_rate == pytest.approx(0.125) and state.learning_rate_schedule == DECAY
