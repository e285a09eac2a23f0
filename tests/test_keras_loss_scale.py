"""Loss scaling and mixed precision through RemoteOptimizer, against local Keras, on every backend.

* `RemoteOptimizer(LossScaleOptimizer(Adam()))`: the server keeps the scale
  and skips non-finite steps; the worker's `scale_loss` reads the server's scale.
* `LossScaleOptimizer(RemoteOptimizer(Adam()))`, which Keras's `compile` makes
  by itself under `mixed_float16`: the scale stays in the worker.

One worker process per installed backend (tests/keras_loss_scale_worker.py),
all at the same time; each check is reported as its own test. In-process
tests on the NumPy backend cover the eager path, classes and configs.
"""

from __future__ import annotations

import importlib.util
import json
import os
import pathlib
import subprocess
import sys

import keras_loss_scale_worker
import numpy as np
import pytest

WORKER = pathlib.Path(__file__).with_name("keras_loss_scale_worker.py")
BACKENDS = ("torch", "jax", "tensorflow")
CHECKS = [name[len("check_") :] for name in vars(keras_loss_scale_worker.Checks) if name.startswith("check_")]
WORKER_TIMEOUT_S = 300


@pytest.fixture(scope="module")
def server_address():
    from optserve.server.app import start_server

    running = start_server(host="127.0.0.1", port=0, device="cpu")
    try:
        yield running.address
    finally:
        running.stop()


@pytest.fixture(scope="module")
def worker_reports(server_address, tmp_path_factory):
    backends = [b for b in BACKENDS if importlib.util.find_spec(b) is not None]
    if not backends:
        pytest.skip("no Keras backend (torch, jax, tensorflow) is installed")
    folder = tmp_path_factory.mktemp("loss_scale_workers")
    processes = []
    for backend in backends:
        report = folder / f"{backend}.json"
        log = open(folder / f"{backend}.log", "w")
        command = [sys.executable, str(WORKER), "--address", server_address, "--report", str(report)]
        env = {**os.environ, "KERAS_BACKEND": backend, "TF_CPP_MIN_LOG_LEVEL": "2"}
        processes.append((backend, report, log, subprocess.Popen(command, env=env, stdout=log, stderr=log)))
    reports = {}
    for backend, report, log, process in processes:
        try:
            process.wait(timeout=WORKER_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        log.close()
        if not report.exists():
            output = pathlib.Path(log.name).read_text()[-4000:]
            pytest.fail(f"The {backend} worker (exit code {process.returncode}) wrote no report:\n{output}")
        reports[backend] = json.loads(report.read_text())
    return reports


@pytest.mark.parametrize("check", CHECKS)
@pytest.mark.parametrize("backend", BACKENDS)
def test_backend(worker_reports, backend, check):
    if backend not in worker_reports:
        pytest.skip(f"{backend} is not installed")
    outcome = worker_reports[backend]["checks"].get(check, "the worker did not run this check")
    if outcome.startswith("skip: "):
        pytest.skip(outcome[len("skip: ") :])
    assert outcome == "ok", f"{backend} / {check}:\n{outcome}"


# --------------------------------------------------------------------------- in-process, NumPy backend


@pytest.fixture
def keras():
    return pytest.importorskip("keras")


@pytest.fixture
def address(server_address):
    return server_address


def _loss_scale(keras, growth_steps=2):
    return keras.optimizers.LossScaleOptimizer(
        keras.optimizers.Adam(learning_rate=0.01), initial_scale=2.0**10, dynamic_growth_steps=growth_steps
    )


def _pair(keras, prefix):
    rng = np.random.default_rng(5)
    values = [rng.normal(size=(4, 3)).astype("float32"), rng.normal(size=(3,)).astype("float32")]
    make = lambda: [keras.Variable(v, name=f"{prefix}_{i}") for i, v in enumerate(values)]  # noqa: E731
    return make(), make()


def test_injected_infinities_skip_the_steps_keras_skips(keras, address):
    from optserve.client import RemoteOptimizer

    remote = RemoteOptimizer(_loss_scale(keras), address)
    local = _loss_scale(keras)
    remote_vars, local_vars = _pair(keras, "skip")
    rng = np.random.default_rng(6)
    seen = []
    for step in range(8):
        grads = [rng.normal(size=(4, 3)).astype("float32"), rng.normal(size=(3,)).astype("float32")]
        if step in (2, 3):
            grads[0][1, 1] = np.inf if step == 2 else np.nan
        scale = float(local.scale_loss(1.0))
        assert float(remote.scale_loss(1.0)) == scale
        remote.apply([g * scale for g in grads], remote_vars)
        local.apply([g * scale for g in grads], local_vars)
        seen.append((_value(remote.dynamic_scale), _value(remote.step_counter), _value(remote.iterations)))
        assert seen[-1] == (_value(local.dynamic_scale), _value(local.step_counter), _value(local.iterations))
    for a, b in zip(remote_vars, local_vars):
        np.testing.assert_array_equal(np.asarray(a.value), np.asarray(b.value))  # bit-identical
    assert [s[2] for s in seen] == [1, 2, 2, 2, 3, 4, 5, 6]  # steps 2 and 3 skipped
    assert [s[0] for s in seen] == [1024.0, 2048.0, 1024.0, 512.0, 512.0, 1024.0, 1024.0, 2048.0]


def test_the_step_answer_carries_the_scale(keras, address):
    from optserve.client import Client

    with Client(address) as client:
        config = keras.optimizers.serialize(_loss_scale(keras))
        client.create_model("answer-scale", config, {"w": np.ones(3, "float32")})
        result, _ = client.push_pull("answer-scale", {"w": np.full(3, np.inf, "float32")})
        assert result.scalars["dynamic_scale"] == 512.0 and result.scalars["step_counter"] == 0.0
        result, _ = client.push_pull("answer-scale", {"w": np.ones(3, "float32")})
        assert result.scalars["dynamic_scale"] == 512.0 and result.scalars["step_counter"] == 1.0


def test_classes_names_and_configs(keras, address):
    from optserve.client import RemoteOptimizer

    sgd = RemoteOptimizer(keras.optimizers.SGD(), address)
    assert isinstance(sgd, keras.optimizers.SGD) and isinstance(sgd, RemoteOptimizer)
    assert type(sgd).__name__ == "RemoteSGD" and sgd.name.startswith("sgd")
    assert type(RemoteOptimizer(keras.optimizers.SGD(momentum=0.5), address)) is type(sgd)  # one class per Keras class
    assert not hasattr(sgd, "inner_optimizer")
    serialized = keras.optimizers.serialize(sgd)
    assert serialized["registered_name"] == "optserve>RemoteOptimizer"
    assert type(keras.optimizers.deserialize(serialized)) is type(sgd)
    assert keras.saving.get_registered_object("optserve>RemoteOptimizer") is RemoteOptimizer

    lso = RemoteOptimizer(_loss_scale(keras), address, name="scaled")
    assert isinstance(lso, keras.optimizers.LossScaleOptimizer) and lso.name == "scaled"
    assert isinstance(lso.inner_optimizer, keras.optimizers.Adam)
    assert float(lso.scale_loss(3.0)) == 3072.0  # before build: initial_scale, as Keras
    again = RemoteOptimizer.from_config(lso.get_config())
    assert type(again) is type(lso) and again.get_config() == lso.get_config()
    assert "name" not in lso._server_optimizer_config()["config"]["inner_optimizer"]["config"]


def test_weights_list_round_trip_includes_the_scale(keras, address):
    from optserve.client import RemoteOptimizer

    opt = RemoteOptimizer(_loss_scale(keras), address)
    variables, _ = _pair(keras, "weights")
    opt.apply([np.full((4, 3), np.inf, "float32"), np.ones(3, "float32")], variables)
    weights = opt.get_weights()
    # get_weights in tf.keras's layout; `variables` in Keras 3's, with the learning rate second.
    assert len(weights) == 7 and len(opt.variables) == 8
    assert (int(weights[-2]), float(weights[-1])) == (0, 512.0)
    opt.set_weights([*weights[:-2], np.int64(1), np.float32(64.0)])
    assert (_value(opt.step_counter), _value(opt.dynamic_scale)) == (1, 64.0)
    assert opt.client.get_weights(opt.model_id).scalars["dynamic_scale"] == 64.0
    # `variables`' layout is accepted too, and its learning rate is set.
    keras3_layout = [weights[0], np.float32(0.25), *weights[1:-2], np.int64(2), np.float32(32.0)]
    opt.set_weights(keras3_layout)
    assert (_value(opt.step_counter), _value(opt.dynamic_scale)) == (2, 32.0)
    assert float(opt.learning_rate) == 0.25
    assert opt.client.get_weights(opt.model_id).scalars["dynamic_scale"] == 32.0
    with pytest.raises(ValueError, match="step_counter, dynamic_scale"):
        opt.set_weights([weights[0]])


def _value(variable):
    return np.asarray(variable.value).item()


def test_learning_rate_reaches_the_inner_optimizer(keras, address):
    from optserve.client import RemoteOptimizer

    opt = RemoteOptimizer(_loss_scale(keras), address, model_id="lso-join")
    opt.learning_rate = 0.5  # before the job exists: the inner optimizer's config
    assert opt.wrapped_config["config"]["inner_optimizer"]["config"]["learning_rate"] == 0.5
    variables, _ = _pair(keras, "join")
    opt.apply([np.ones((4, 3), "float32"), np.ones(3, "float32")], variables)
    assert float(opt.learning_rate) == 0.5
    opt.learning_rate = 0.25  # on the server, for the next update
    assert opt.client.list_models("lso-join")[0].learning_rate == 0.25


def test_a_second_optimizer_joins_the_job_and_reads_its_scale(keras, address):
    from optserve.client import RemoteOptimizer

    first = RemoteOptimizer(_loss_scale(keras), address, model_id="lso-second")
    variables, again = _pair(keras, "second")
    first.apply([np.full((4, 3), np.inf, "float32"), np.ones(3, "float32")], variables)
    second = RemoteOptimizer(_loss_scale(keras), address, model_id="lso-second")
    second.build(again)
    assert (_value(second.dynamic_scale), _value(second.step_counter)) == (512.0, 0)
    assert float(second.scale_loss(1.0)) == 512.0
