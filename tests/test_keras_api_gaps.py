"""RemoteOptimizer where Keras's API goes past plain updates (Keras on its NumPy backend, a real server).

`exclude_from_weight_decay` in both forms on one server and on two shards,
gradients cast to the variable's dtype, `overwrite_with_gradient`, `variables`
in Keras 3's layout, `build([])` and a callable learning rate: each against
local Keras over several steps. Keras's own optimizer tests run through
RemoteOptimizer in tests/test_keras_suite.py.
"""

from __future__ import annotations

import numpy as np
import pytest

pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation doesn't accept a copy keyword")

_ids = iter(range(10**6))


@pytest.fixture(scope="module")
def keras():
    import keras

    if keras.backend.backend() != "numpy":
        pytest.skip("these checks run Keras on its NumPy backend")
    return keras


@pytest.fixture(scope="module")
def servers():
    from optserve.server.app import start_server

    running = [start_server(host="127.0.0.1", port=0, device="cpu") for _ in range(2)]
    try:
        yield [r.address for r in running]
    finally:
        for r in running:
            r.stop()


def _model_variables(keras, dtype="float32"):
    rng = np.random.default_rng(7)
    return [
        keras.Variable(rng.normal(size=(4, 3)).astype(dtype), dtype=dtype, name="kernel"),
        keras.Variable(rng.normal(size=(3,)).astype(dtype), dtype=dtype, name="bias"),
        keras.Variable(rng.normal(size=(3,)).astype(dtype), dtype=dtype, name="gamma"),
    ]


def _grads(step, dtype="float32"):
    rng = np.random.default_rng(50 + step)
    return [rng.normal(size=s).astype(dtype) for s in [(4, 3), (3,), (3,)]]


def _remote(address, optimizer, **kwargs):
    from optserve.client import RemoteOptimizer

    return RemoteOptimizer(optimizer, address, model_id=f"gaps-{next(_ids)}", **kwargs)


def _train(optimizer, variables, steps=4, dtype="float32"):
    for step in range(steps):
        optimizer.apply(_grads(step, dtype), variables)


@pytest.mark.parametrize("shards", [1, 2])
@pytest.mark.parametrize("form", ["var_names", "var_list"])
def test_exclude_from_weight_decay_equals_local_keras(keras, servers, shards, form):
    make = lambda: keras.optimizers.AdamW(learning_rate=0.1, weight_decay=0.2)  # noqa: E731
    local_vars, remote_vars = _model_variables(keras), _model_variables(keras)
    local, remote = make(), _remote(servers[:shards] if shards > 1 else servers[0], make())
    if form == "var_names":
        local.exclude_from_weight_decay(var_names=["bias", "^gam"])
        remote.exclude_from_weight_decay(var_names=["bias", "^gam"])
    else:
        local.exclude_from_weight_decay(var_list=local_vars[1:])
        remote.exclude_from_weight_decay(var_list=remote_vars[1:])
    _train(local, local_vars)
    _train(remote, remote_vars)
    for mine, theirs in zip(remote_vars, local_vars, strict=True):
        np.testing.assert_array_equal(np.asarray(mine), np.asarray(theirs), err_msg=mine.name)
    # Without the exclusions the bias would differ: the test can fail.
    plain_vars = _model_variables(keras)
    _train(make(), plain_vars)
    assert not np.array_equal(np.asarray(plain_vars[1]), np.asarray(local_vars[1]))


def test_a_worker_excluding_other_variables_cannot_join(keras, servers):
    from optserve.client import RemoteOptimizer

    model_id = f"gaps-join-{next(_ids)}"
    first = RemoteOptimizer(keras.optimizers.AdamW(weight_decay=0.1), servers[0], model_id=model_id, num_workers=2)
    first.exclude_from_weight_decay(var_names=["bias"])
    first.build(_model_variables(keras))
    second = RemoteOptimizer(
        keras.optimizers.AdamW(weight_decay=0.1), servers[0], model_id=model_id, num_workers=2, worker_index=1
    )
    with pytest.raises(Exception, match="weight_decay_exclusions"):
        second.build(_model_variables(keras))
    agreeing = RemoteOptimizer(
        keras.optimizers.AdamW(weight_decay=0.1), servers[0], model_id=model_id, num_workers=2, worker_index=1
    )
    agreeing.exclude_from_weight_decay(var_names=["bias"])
    agreeing.build(_model_variables(keras))


def test_exclusions_must_come_before_build_and_survive_the_config(keras, servers):
    remote = _remote(servers[0], keras.optimizers.AdamW(weight_decay=0.1))
    remote.exclude_from_weight_decay(var_names=["bias"])
    remote.build(_model_variables(keras))
    with pytest.raises(ValueError, match="before the optimizer is built"):
        remote.exclude_from_weight_decay(var_names=["kernel"])
    config = remote.get_config()
    assert config["weight_decay_exclusions"] == ["^bias$"]
    rebuilt = type(remote).from_config(config)
    rebuilt.build(_model_variables(keras))  # joins the job: the same exclusions


@pytest.mark.parametrize("variable_dtype, gradient_dtype", [("float32", "float64"), ("float64", "float32")])
def test_gradients_are_cast_to_the_variables_dtype_like_keras(keras, servers, variable_dtype, gradient_dtype):
    make = lambda: keras.optimizers.RMSprop(learning_rate=0.01)  # noqa: E731
    local_vars, remote_vars = _model_variables(keras, variable_dtype), _model_variables(keras, variable_dtype)
    local, remote = make(), _remote(servers[0], make())
    _train(local, local_vars, dtype=gradient_dtype)
    _train(remote, remote_vars, dtype=gradient_dtype)
    for mine, theirs in zip(remote_vars, local_vars, strict=True):
        assert mine.dtype == variable_dtype
        if variable_dtype == "float32":
            np.testing.assert_array_equal(np.asarray(mine), np.asarray(theirs))
        else:  # Keras's NumPy backend rounds some float64 steps through float32; the server does not
            np.testing.assert_allclose(np.asarray(mine), np.asarray(theirs), rtol=1e-6)


def test_overwrite_with_gradient_variables_take_their_gradient_like_keras(keras, servers):
    local_vars, remote_vars = _model_variables(keras), _model_variables(keras)
    local_vars[1].overwrite_with_gradient = True
    remote_vars[1].overwrite_with_gradient = True
    local = keras.optimizers.Adam(learning_rate=0.1)
    remote = _remote(servers[0], keras.optimizers.Adam(learning_rate=0.1))
    _train(local, local_vars)
    _train(remote, remote_vars)
    for mine, theirs in zip(remote_vars, local_vars, strict=True):
        np.testing.assert_array_equal(np.asarray(mine), np.asarray(theirs), err_msg=mine.name)
    _, server_values = remote.client.pull(remote.model_id)
    np.testing.assert_array_equal(server_values["bias"], _grads(3)[1])


def test_overwrite_with_gradient_and_accumulation_is_refused_at_the_first_call(keras, servers):
    variables = _model_variables(keras)
    variables[0].overwrite_with_gradient = True
    remote = _remote(servers[0], keras.optimizers.SGD(gradient_accumulation_steps=2))
    with pytest.raises(ValueError, match="overwrite_with_gradient"):
        remote.apply(_grads(0), variables)


def test_variables_are_keras_3s_layout_and_get_weights_tf_keras(keras, servers):
    local_vars, remote_vars = _model_variables(keras), _model_variables(keras)
    local = keras.optimizers.SGD(learning_rate=0.5, momentum=0.9)
    remote = _remote(servers[0], keras.optimizers.SGD(learning_rate=0.5, momentum=0.9))
    _train(local, local_vars, steps=2)
    _train(remote, remote_vars, steps=2)
    assert [v.name for v in remote.variables] == [v.name for v in local.variables]
    for mine, theirs in zip(remote.variables, local.variables, strict=True):
        np.testing.assert_array_equal(np.asarray(mine), np.asarray(theirs), err_msg=mine.name)
    assert len(remote.get_weights()) == len(local.variables) - 1  # tf.keras's: no learning rate
    # set_weights takes either layout: another optimizer's `variables` set the rate too.
    other = _remote(servers[0], keras.optimizers.SGD(learning_rate=0.1, momentum=0.9))
    other.build(_model_variables(keras))
    other.set_weights(local.variables)
    assert float(other.learning_rate) == 0.5
    np.testing.assert_array_equal(other.get_weights()[1], np.asarray(local.variables[2]))
    # A schedule replaces the rate variable, as in Keras.
    remote.learning_rate = keras.optimizers.schedules.ExponentialDecay(0.5, 10, 0.9)
    assert "learning_rate" not in [v.name for v in remote.variables]


def test_build_with_no_variables_is_accepted(keras, servers):
    remote = _remote(servers[0], "adam")
    remote.build([])
    assert remote.built
    assert [int(w) for w in remote.get_weights()] == [0]


def test_a_callable_learning_rate_is_called_before_each_step_like_keras(keras, servers):
    schedule, now = [0.1, 0.1, 0.05, 0.01], {"step": 0}

    def rate():
        return schedule[now["step"]]

    local_vars, remote_vars = _model_variables(keras), _model_variables(keras)
    local = keras.optimizers.SGD(learning_rate=rate)
    remote = _remote(servers[0], keras.optimizers.SGD(learning_rate=rate))
    # Keras tracks no learning-rate variable for a callable rate.
    assert [v.name for v in remote.variables] == [v.name for v in local.variables] == ["iteration"]
    for step in range(4):
        now["step"] = step
        local.apply(_grads(step), local_vars)
        remote.apply(_grads(step), remote_vars)
        for mine, theirs in zip(remote_vars, local_vars, strict=True):
            np.testing.assert_array_equal(np.asarray(mine), np.asarray(theirs), err_msg=f"step {step}")
    assert float(remote.learning_rate) == pytest.approx(0.01)
