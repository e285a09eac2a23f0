"""RemoteOptimizer with Keras 3's newer optimizers, through a real server (Keras on its NumPy backend).

Each optimizer is driven twice, remotely (its update runs on the server) and
locally in Keras, with the same gradients; the variables, the optimizer state
read back through ``get_weights()`` and the counters must be Keras's. On the CPU
backend the server's math is Keras's operation for operation, so the results are
compared bit for bit.
"""

from __future__ import annotations

import numpy as np
import pytest

# Keras's own Variable.__array__ predates NumPy 2's `copy` keyword.
pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation doesn't accept a copy keyword")


@pytest.fixture(scope="module")
def keras():
    import keras

    if keras.backend.backend() != "numpy":
        pytest.skip("these checks run Keras on its NumPy backend")
    return keras


@pytest.fixture(scope="module")
def server_address():
    from optserve.server.app import start_server

    running = start_server(host="127.0.0.1", port=0, device="cpu")
    try:
        yield running.address
    finally:
        running.stop()


_model_ids = iter(range(10**6))

# A wide and a tall matrix, a vector and an embedding table (Muon gives the last AdamW steps).
SHAPES = {"dense_kernel": (6, 4), "dense_bias": (4,), "tall_kernel": (9, 3), "token_embedding": (5, 3)}


def _variables(keras, seed=0):
    rng = np.random.default_rng(seed)
    return [keras.Variable(rng.normal(size=shape).astype("float32"), name=name) for name, shape in SHAPES.items()]


def _gradients(step):
    rng = np.random.default_rng(100 + step)
    return [rng.normal(size=shape).astype("float32") for shape in SHAPES.values()]


OPTIMIZERS = [
    ("AdamW", {"learning_rate": 0.05, "weight_decay": 0.1}),
    ("AdamW", {"learning_rate": 0.05, "amsgrad": True, "clipnorm": 0.5}),
    ("Lion", {"learning_rate": 0.01, "beta_1": 0.8, "weight_decay": 0.05}),
    ("Lamb", {"learning_rate": 0.05, "global_clipnorm": 1.0}),
    ("ScheduleFreeAdamW", {"learning_rate": 0.05, "warmup_steps": 2}),
    ("Adafactor", {"learning_rate": 0.05}),
    ("Muon", {"learning_rate": 0.05, "adam_lr_ratio": 0.5}),
]


@pytest.mark.parametrize("class_name, arguments", OPTIMIZERS, ids=[f"{c}-{i}" for i, (c, _) in enumerate(OPTIMIZERS)])
def test_remote_optimizer_trains_like_local_keras(keras, server_address, class_name, arguments):
    from optserve.client import RemoteOptimizer

    def make():
        return getattr(keras.optimizers, class_name)(**arguments)

    remote_vars, local_vars = _variables(keras), _variables(keras)
    remote = RemoteOptimizer(make(), server_address, model_id=f"keras3-{next(_model_ids)}")
    local = make()
    for step in range(4):
        remote.apply(_gradients(step), remote_vars)
        local.apply(_gradients(step), local_vars)
        for mine, theirs in zip(remote_vars, local_vars, strict=True):
            np.testing.assert_array_equal(np.asarray(mine), np.asarray(theirs), err_msg=f"{class_name} step {step}")
    assert int(remote.iterations) == int(local.iterations) == 4
    assert float(remote.learning_rate) == float(local.learning_rate)
    # get_weights() is tf.keras's layout, [iterations, *slots variable by variable]; Keras 3's
    # `variables` put the learning rate second and group some slots, so match them by name
    # (Adafactor names its r and c after the model variable: those match in order).
    local_by_name = {}
    for variable in local.variables[2:]:
        local_by_name.setdefault(variable.name, []).append(np.asarray(variable))
    remote_state = remote.get_weights()
    assert len(remote_state) == 1 + sum(map(len, local_by_name.values()))
    assert int(remote_state[0]) == int(local.iterations)
    # `variables` is Keras 3's layout too: [iterations, learning_rate, *slots].
    assert remote.variables[1].name == "learning_rate"
    for variable, value in zip(remote.variables[2:], remote_state[1:], strict=True):
        name = variable.name if variable.name in local_by_name else variable.name.rsplit("_", 1)[0]
        expected = local_by_name[name].pop(0)
        np.testing.assert_array_equal(np.asarray(value, np.float64), np.asarray(expected, np.float64), err_msg=name)


def test_adamw_refuses_no_weight_decay_like_keras(keras, server_address):
    from optserve.client import RemoteOptimizer

    with pytest.raises(ValueError, match="Argument `weight_decay` must be a float"):
        RemoteOptimizer(keras.optimizers.AdamW(), server_address, weight_decay=None)


def test_an_unknown_optimizer_is_refused_at_creation_naming_the_supported_ones(server_address):
    """What the server answers a config it cannot run: INVALID_ARGUMENT with the supported list."""
    import grpc
    import rpc_helpers

    channel, stub = rpc_helpers.connect(server_address)
    with channel:
        with pytest.raises(grpc.RpcError) as raised:
            rpc_helpers.create_model(
                stub, "unknown-optimizer", {"w": np.zeros(3, np.float32)}, {"class_name": "Yogi", "config": {}}
            )
    assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "Unknown optimizer: 'Yogi'. Supported: Adadelta, Adafactor, Adagrad, Adam, AdamW" in raised.value.details()
    assert "LossScaleOptimizer, Muon" in raised.value.details()


def test_loss_scale_optimizer_on_a_server_skips_non_finite_steps_and_reports_its_scale(server_address):
    import rpc_helpers

    config = {
        "class_name": "LossScaleOptimizer",
        "config": {
            "inner_optimizer": {"class_name": "Adam", "config": {"learning_rate": 0.01}},
            "initial_scale": 256.0,
            "dynamic_growth_steps": 2,
        },
    }
    variables = {"w": np.ones((2, 3), np.float32)}
    channel, stub = rpc_helpers.connect(server_address)
    with channel:
        rpc_helpers.create_model(stub, "loss-scaled", variables, config)
        finite = {"w": np.full((2, 3), 256.0, np.float32)}
        rpc_helpers.push(stub, "loss-scaled", 0, 0, finite)
        before = rpc_helpers.snapshot(stub, "loss-scaled")
        assert (before[0].iterations, before[0].scalars["dynamic_scale"], before[0].scalars["step_counter"]) == (
            1,
            256,
            1,
        )
        poisoned = {"w": finite["w"].copy()}
        poisoned["w"][1, 2] = np.inf
        rpc_helpers.push(stub, "loss-scaled", 0, 1, poisoned)
        state, tensors = rpc_helpers.snapshot(stub, "loss-scaled")
        # Skipped: nothing of the Adam state moved; the scale halved and the counter restarted.
        assert (state.iterations, state.scalars["dynamic_scale"], state.scalars["step_counter"]) == (1, 128, 0)
        for key, value in before[1].items():
            np.testing.assert_array_equal(tensors[key], value, err_msg=str(key))
        rpc_helpers.push(stub, "loss-scaled", 0, 2, {"w": np.full((2, 3), 128.0, np.float32)})
        rpc_helpers.push(stub, "loss-scaled", 0, 3, {"w": np.full((2, 3), 128.0, np.float32)})
        state, _ = rpc_helpers.get_weights(stub, "loss-scaled")
        assert (state.iterations, state.scalars["dynamic_scale"], state.scalars["step_counter"]) == (3, 256, 0)
        # The scale is settable like any optimizer-wide scalar (a restore, an operator's fix).
        state.scalars["dynamic_scale"] = 1024.0
        assert rpc_helpers.set_weights(stub, "loss-scaled", state=state).state.scalars["dynamic_scale"] == 1024.0


@pytest.mark.parametrize(
    "config",
    [
        {
            "class_name": "LossScaleOptimizer",
            "config": {
                "inner_optimizer": {"class_name": "Adafactor", "config": {"learning_rate": 0.05}},
                "initial_scale": 4.0,
                "dynamic_growth_steps": 2,
            },
        },
        {"class_name": "Muon", "config": {"learning_rate": 0.05}},
        {"class_name": "ScheduleFreeAdamW", "config": {"learning_rate": 0.05, "warmup_steps": 3}},
    ],
    ids=["LossScaleOptimizer(Adafactor)", "Muon", "ScheduleFreeAdamW"],
)
def test_a_checkpoint_restores_the_new_optimizers_exactly(tmp_path, config):
    """Factored slots of their own shapes, per-variable slot sets and the loss scale survive a restart."""
    from optserve.client import Client
    from optserve.server.app import start_server

    variables = {"w": np.arange(12, dtype=np.float32).reshape(4, 3) / 10, "b": np.ones(3, np.float32)}

    def gradients(step):
        rng = np.random.default_rng(step)
        grads = {name: (rng.normal(size=value.shape) * 4).astype(np.float32) for name, value in variables.items()}
        if step == 1:
            grads["b"][0] = np.nan  # skipped by the LossScaleOptimizer, a NaN update for the others
        return grads

    def run(client, steps):
        for step in steps:
            client.push("job", gradients(step), step=step)

    with start_server(device="cpu") as reference, Client(reference.address) as straight:
        # A NaN gradient is the point here: let it through to the optimizer.
        straight.create_model("job", config, variables, non_finite_policy="allow")
        run(straight, range(5))
        expected = straight.get_weights("job", include_variables=True)
        expected_scalars = straight.list_models("job")[0].scalars
        server = start_server(device="cpu", checkpoint_dir=tmp_path, checkpoint_every="off")
        with Client(server.address) as first:
            first.create_model("job", config, variables, non_finite_policy="allow")
            run(first, range(3))
            first.checkpoint()
        server.stop(final_checkpoint=False)
        with (
            start_server(device="cpu", checkpoint_dir=tmp_path, checkpoint_every="off") as restarted,
            Client(restarted.address) as resumed,
        ):
            run(resumed, range(3, 5))
            actual = resumed.get_weights("job", include_variables=True)
            assert resumed.list_models("job")[0].scalars == expected_scalars
    for name, value in expected.variables.items():
        assert actual.variables[name].tobytes() == value.tobytes(), name
        assert list(actual.slots[name]) == list(expected.slots[name])
        for slot, slot_value in expected.slots[name].items():
            assert actual.slots[name][slot].shape == slot_value.shape
            assert actual.slots[name][slot].tobytes() == slot_value.tobytes(), (name, slot)


def _golden_cases():
    import test_keras3_optimizers as engine_tests

    return engine_tests.GOLDEN, engine_tests._RAMP


@pytest.mark.parametrize("index", range(4))
def test_keras_golden_values_through_remote_optimizer(keras, server_address, index):
    """The numbers of Keras's own correctness tests, with the update run on the server."""
    from optserve.client import RemoteOptimizer

    golden_cases, ramp = _golden_cases()
    class_name, config, golden = golden_cases[index]
    x = keras.Variable(np.ones(10, np.float32), name="golden_x")
    optimizer = RemoteOptimizer(
        getattr(keras.optimizers, class_name)(**config), server_address, model_id=f"golden-{next(_model_ids)}"
    )
    optimizer.apply([np.full(10, 0.01, np.float32)], [x])
    for step, expected in enumerate(golden):
        np.testing.assert_allclose(np.asarray(x), expected, rtol=5e-4, atol=5e-4, err_msg=f"{class_name} {step}")
        optimizer.apply([ramp.astype(np.float32)], [x])
