"""RemoteOptimizer: a real Keras optimizer whose state lives on a real optserve server.

Real backends: one process per backend (a process can only hold one Keras
backend), each running every check of tests/keras_worker.py. The torch and the
JAX process run at the same time and, first of all, train one shared model as
two synchronous workers. Each check is reported as its own test here.

In-process: Keras on its NumPy backend (set by conftest.py) covers arguments,
configuration, the eager step and the error paths, without a subprocess.
"""

from __future__ import annotations

import importlib.util
import json
import os
import pathlib
import subprocess
import sys
import warnings

import keras_worker
import numpy as np
import pytest

WORKER = pathlib.Path(__file__).with_name("keras_worker.py")
BACKENDS = ("torch", "jax", "tensorflow")
CHECKS = [name[len("check_") :] for name in vars(keras_worker.Checks) if name.startswith("check_")]
WORKER_TIMEOUT_S = 300
# Models trained by two synchronous worker processes, each on half of the batch:
# {model: (backend of worker 0, backend of worker 1)}. A backend listed twice in
# one model gets an extra process that trains that model only.
SHARED_MODELS = {
    "torch-jax": ("torch", "jax"),
    "tf-torch": ("tensorflow", "torch"),
    "tf-tf": ("tensorflow", "tensorflow"),
}


@pytest.fixture(scope="module")
def keras_server():
    from optserve.server.app import start_server

    running = start_server(host="127.0.0.1", port=0, device="cpu")
    try:
        yield running
    finally:
        running.stop()


@pytest.fixture(scope="module")
def server_address(keras_server):
    return keras_server.address


def _installed(backend):
    return importlib.util.find_spec(backend) is not None


def _worker_roles(backends):
    """[(backend, [peer arguments], runs the checks)]: one main process per backend, plus extras.

    Every process trains its shared models in the order of SHARED_MODELS, so no
    two processes wait for each other in opposite orders.
    """
    main = {backend: [] for backend in backends}
    extras = []
    for model, pair in SHARED_MODELS.items():
        if not all(backend in main for backend in pair):
            continue
        for worker_index, backend in enumerate(pair):
            peer = f"{model}:{worker_index}:{len(pair)}"
            if worker_index == 1 and pair[0] == backend:
                extras.append((backend, [peer], False))
            else:
                main[backend].append(peer)
    return [(backend, peers, True) for backend, peers in main.items()] + extras


@pytest.fixture(scope="module")
def worker_reports(server_address, tmp_path_factory):
    """{backend: [report, ...]} from the worker processes of every installed backend, run at the same time."""
    backends = [b for b in BACKENDS if _installed(b)]
    if not backends:
        pytest.skip("no Keras backend (torch, jax, tensorflow) is installed")
    folder = tmp_path_factory.mktemp("keras_workers")
    processes = []
    for number, (backend, peers, runs_checks) in enumerate(_worker_roles(backends)):
        report = folder / f"{number}-{backend}.json"
        log = open(folder / f"{number}-{backend}.log", "w")
        command = [sys.executable, str(WORKER), "--address", server_address, "--report", str(report)]
        for peer in peers:
            command += ["--peer", peer]
        if not runs_checks:
            command += ["--only"]  # an extra peer: its shared models only
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
        reports.setdefault(backend, []).append(json.loads(report.read_text()))
    return reports


def _report(worker_reports, backend):
    if backend not in worker_reports:
        pytest.skip(f"{backend} is not installed")
    return worker_reports[backend][0]


# --------------------------------------------------------------------------- real backends


@pytest.mark.parametrize("check", CHECKS)
@pytest.mark.parametrize("backend", BACKENDS)
def test_backend(worker_reports, backend, check):
    outcome = _report(worker_reports, backend)["checks"].get(check, "the worker did not run this check")
    if outcome.startswith("skip: "):
        pytest.skip(outcome[len("skip: ") :])
    assert outcome == "ok", f"{backend} / {check}:\n{outcome}"


@pytest.mark.parametrize("model", list(SHARED_MODELS))
def test_two_workers_on_half_batches_train_like_one_process_on_the_full_batch(worker_reports, model):
    """torch + jax, TensorFlow + torch, and two TensorFlow processes each share one model."""
    missing = [b for b in SHARED_MODELS[model] if b not in worker_reports]
    if missing:
        pytest.skip(f"{', '.join(missing)} not installed")
    reports = [r for per_backend in worker_reports.values() for r in per_backend if f"peer:{model}" in r["checks"]]
    assert len(reports) == 2
    for report in reports:
        outcome = report["checks"][f"peer:{model}"]
        assert outcome == "ok", f"{report['backend']} worker:\n{outcome}"
    digests = {report["facts"][f"digest:{model}"] for report in reports}
    assert len(digests) == 1, "the two workers ended with different weights"


def test_fit_compiles_the_train_step_with_jax(worker_reports):
    # The JAX checks above ran model.fit with its default, a jit-compiled train step.
    assert _report(worker_reports, "jax")["facts"]["fit_jit_compile"] is True


def test_importing_the_client_does_not_import_keras(worker_reports):
    for per_backend in worker_reports.values():
        for report in per_backend:
            assert report["facts"]["keras_imported_by_client"] is False


# --------------------------------------------------------------------------- in-process, NumPy backend


@pytest.fixture
def keras():
    keras = pytest.importorskip("keras")
    return keras


@pytest.fixture
def RemoteOptimizer(keras):
    from optserve.client import RemoteOptimizer

    return RemoteOptimizer


_model_counter = iter(range(10**6))


@pytest.fixture
def model_id():
    return f"inproc-{next(_model_counter)}"


def _variables(keras, prefix, seed=0):
    rng = np.random.default_rng(seed)
    return [
        keras.Variable(rng.normal(size=(4, 3)).astype("float32"), name=f"{prefix}_kernel"),
        keras.Variable(rng.normal(size=(3,)).astype("float32"), name=f"{prefix}_bias"),
    ]


def _grads(step):
    rng = np.random.default_rng(100 + step)
    return [rng.normal(size=(4, 3)).astype("float32"), rng.normal(size=(3,)).astype("float32")]


def _close(actual, expected):
    for a, e in zip(actual, expected, strict=True):
        # `.value` of a Variable: Keras's Variable.__array__ warns under NumPy 2.
        a, e = (np.asarray(getattr(t, "value", t)) for t in (a, e))
        np.testing.assert_allclose(a, e, rtol=1e-6, atol=1e-7)


def test_remote_optimizer_is_exported_lazily_by_optserve_client(RemoteOptimizer, keras):
    import optserve.client

    assert optserve.client.RemoteOptimizer is RemoteOptimizer
    assert issubclass(RemoteOptimizer, keras.optimizers.Optimizer)


@pytest.mark.parametrize(
    "arguments, message",
    [
        ({"num_workers": 0}, r"`num_workers` must be an integer >= 1. Received: num_workers=0"),
        ({"num_workers": 2, "worker_index": 2}, r"`worker_index` must be an integer in \[0, num_workers\)"),
        ({"worker_index": -1}, r"`worker_index` must be an integer in \[0, num_workers\)"),
        ({"mode": "eventually"}, r"`mode` must be one of \('sync', 'async'\). Received: mode='eventually'"),
        ({"sync_timeout_s": -1}, r"`sync_timeout_s` must be a number >= 0"),
        ({"timeout": 0}, r"`timeout` must be a number > 0 or None. Received: timeout=0"),
        ({"model_id": ""}, r"`model_id` must be a non-empty string"),
        ({"address": "no-port"}, r"host:port"),
    ],
)
def test_arguments_are_checked_eagerly(RemoteOptimizer, arguments, message):
    arguments = {"address": "127.0.0.1:1", **arguments}
    with pytest.raises(ValueError, match=message):
        RemoteOptimizer("adam", **arguments)


def test_unknown_optimizer_arguments_are_an_error(RemoteOptimizer):
    with pytest.raises(ValueError, match="not recognized"):
        RemoteOptimizer("adam", "127.0.0.1:1", momentun=0.9)


def test_every_optimizer_form_gives_the_same_server_config(RemoteOptimizer, keras):
    instance = keras.optimizers.Adam(learning_rate=0.01)
    forms = [
        instance,
        keras.optimizers.serialize(instance),
        {"class_name": "Adam", **instance.get_config()},  # a bare get_config() with its class name
        "Adam",
    ]
    configs = [RemoteOptimizer(form, "127.0.0.1:1", learning_rate=0.01)._server_optimizer_config() for form in forms]
    assert all(config == configs[0] for config in configs)
    assert configs[0]["module"] == "keras.optimizers"
    assert "name" not in configs[0]["config"]  # Keras's instance names differ from worker to worker


def test_keyword_arguments_override_the_wrapped_optimizer(RemoteOptimizer):
    opt = RemoteOptimizer("sgd", "127.0.0.1:1", learning_rate=0.25, momentum=0.5, clipnorm=1.0, name="remote")
    config = opt.wrapped_config["config"]
    assert (config["learning_rate"], config["momentum"], config["clipnorm"]) == (0.25, 0.5, 1.0)
    assert opt.name == "remote" and opt.clipnorm == 1.0
    assert float(opt.learning_rate) == pytest.approx(0.25)


def test_config_round_trip(RemoteOptimizer, keras):
    schedule = keras.optimizers.schedules.ExponentialDecay(1e-2, decay_steps=10000, decay_rate=0.9)
    opt = RemoteOptimizer(
        keras.optimizers.Adam(learning_rate=schedule),
        "127.0.0.1:1",
        model_id="m",
        num_workers=3,
        worker_index=2,
        mode="async",
        sync_timeout_s=5,
        timeout=None,
    )
    assert RemoteOptimizer.from_config(opt.get_config()).get_config() == opt.get_config()
    serialized = keras.optimizers.serialize(opt)
    assert serialized["registered_name"] == "optserve>RemoteOptimizer"
    assert keras.optimizers.deserialize(serialized).get_config() == opt.get_config()


def test_apply_matches_keras_and_state_reads_through(RemoteOptimizer, keras, server_address, model_id):
    def adam_wd():
        return keras.optimizers.Adam(learning_rate=0.05, weight_decay=0.01, clipnorm=0.5)

    remote_vars, local_vars = _variables(keras, "remote"), _variables(keras, "local")
    opt, local = RemoteOptimizer(adam_wd(), server_address, model_id=model_id), adam_wd()
    for step in range(3):
        opt.apply(_grads(step), remote_vars)
        local.apply(_grads(step), local_vars)
    _close(remote_vars, local_vars)
    assert int(opt.iterations) == 3
    assert float(opt.learning_rate) == pytest.approx(float(local.learning_rate))
    local_state = [local.iterations] + [v for v in local.variables[2:]]  # Keras 3 adds learning_rate 2nd
    _close(opt.get_weights(), local_state)
    # `variables` is Keras 3's layout (with the learning rate second); get_weights() is tf.keras's.
    assert [v.name for v in opt.variables] == [
        "iteration",
        "learning_rate",
        "remote_kernel_momentum",
        "remote_kernel_velocity",
        "remote_bias_momentum",
        "remote_bias_velocity",
    ]
    _close(opt.variables, list(local.variables))
    assert opt.weights == opt.variables


def test_none_gradients_are_skipped_with_a_warning(RemoteOptimizer, keras, server_address, model_id):
    remote_vars = _variables(keras, "remote")
    before = np.asarray(remote_vars[1]).copy()
    opt = RemoteOptimizer(keras.optimizers.SGD(learning_rate=0.1), server_address, model_id=model_id)
    kernel_grad = _grads(0)[0]
    with pytest.warns(UserWarning, match="Gradients do not exist"):
        opt.apply_gradients([(kernel_grad, remote_vars[0]), (None, remote_vars[1])])
    np.testing.assert_array_equal(np.asarray(remote_vars[1]), before)
    with pytest.raises(ValueError, match="No gradients provided"):
        opt.apply_gradients([(None, remote_vars[0]), (None, remote_vars[1])])


def test_stateless_apply_without_jax_matches_apply(RemoteOptimizer, keras, server_address, model_id):
    stateless_vars, applied_vars = _variables(keras, "a"), _variables(keras, "b")
    stateless = RemoteOptimizer("adam", server_address, model_id=model_id)
    applied = RemoteOptimizer("adam", server_address, model_id=model_id + "-applied")
    stateless.build(stateless_vars)
    values = [v.value for v in stateless_vars]
    for step in range(2):
        values, optimizer_values = stateless.stateless_apply(
            [v.value for v in stateless.variables], _grads(step), values
        )
        applied.apply(_grads(step), applied_vars)
    _close(values, applied_vars)
    assert int(optimizer_values[0]) == 2


def test_set_weights_checks_everything_and_changes_nothing_on_error(RemoteOptimizer, keras, server_address, model_id):
    opt = RemoteOptimizer(keras.optimizers.SGD(momentum=0.9), server_address, model_id=model_id)
    variables = _variables(keras, "v")
    opt.apply(_grads(0), variables)
    before = opt.get_weights()
    assert [np.shape(w) for w in before] == [(), (4, 3), (3,)]
    with pytest.raises(ValueError, match="expects 3 weights"):
        opt.set_weights(before[:2])
    with pytest.raises(ValueError, match=r"weights\[2\].*shape \(4,\)"):
        opt.set_weights([before[0], before[1], np.zeros(4, "float32")])
    _close(opt.get_weights(), before)

    opt.set_weights([np.array(7), np.full((4, 3), 0.5, "float32"), np.full((3,), -1.0, "float32")])
    assert int(opt.iterations) == 7
    _close(opt.get_weights(), [7, np.full((4, 3), 0.5), np.full((3,), -1.0)])
    _close(opt.variables, [7, 0.01, np.full((4, 3), 0.5), np.full((3,), -1.0)])


def test_state_methods_need_a_built_optimizer(RemoteOptimizer):
    opt = RemoteOptimizer("adam", "127.0.0.1:1")
    for call in (opt.get_weights, lambda: opt.set_weights([np.array(0)])):
        with pytest.raises(ValueError, match="has not yet been built"):
            call()
    with pytest.raises(ValueError, match="must already be built"):
        opt.apply([np.zeros(3, "float32")])


def test_a_learning_rate_set_before_build_creates_the_job_with_it(RemoteOptimizer, keras, server_address, model_id):
    opt = RemoteOptimizer("adam", server_address, model_id=model_id)
    opt.learning_rate = 0.5
    assert float(opt.learning_rate) == 0.5
    opt.build(_variables(keras, "lr_before"))
    assert opt.client.list_models(model_id)[0].learning_rate == 0.5
    assert opt.wrapped_config["config"]["learning_rate"] == 0.5


def test_learning_rates_keras_refuses_are_refused(RemoteOptimizer, keras):
    schedule = keras.optimizers.schedules.ExponentialDecay(0.1, decay_steps=10, decay_rate=0.5)
    opt = RemoteOptimizer(keras.optimizers.SGD(schedule), "127.0.0.1:1")
    with pytest.raises(TypeError, match="not settable"):
        opt.learning_rate = 0.5
    opt.learning_rate = keras.optimizers.schedules.ExponentialDecay(0.2, decay_steps=10, decay_rate=0.5)
    assert opt.wrapped_config["config"]["learning_rate"]["config"]["initial_learning_rate"] == 0.2


def test_a_second_worker_joins_and_adopts_the_servers_values(RemoteOptimizer, keras, server_address, model_id):
    first_vars, second_vars = _variables(keras, "w", seed=1), _variables(keras, "w", seed=2)
    first = RemoteOptimizer("sgd", server_address, model_id=model_id)
    second = RemoteOptimizer("sgd", server_address, model_id=model_id)
    first.build(first_vars)
    second.build(second_vars)
    _close(second_vars, first_vars)


def test_joining_with_other_variables_fails_with_the_differences(RemoteOptimizer, keras, server_address, model_id):
    RemoteOptimizer("sgd", server_address, model_id=model_id).build(_variables(keras, "w"))
    other = [
        keras.Variable(np.zeros((5, 3), "float32"), name="w_kernel"),
        keras.Variable(np.zeros((3,), "float32"), name="w_bias"),
    ]
    from optserve.client import AlreadyExistsError

    with pytest.raises(AlreadyExistsError, match=r"w_kernel.*\[4, 3\].*\[5, 3\]"):
        RemoteOptimizer("sgd", server_address, model_id=model_id).build(other)


def test_variable_paths_must_be_unique(RemoteOptimizer, keras):
    twins = [keras.Variable(np.zeros(2, "float32"), name="same"), keras.Variable(np.zeros(2, "float32"), name="same")]
    with pytest.raises(ValueError, match=r"appear more than once: \['same'\]"):
        RemoteOptimizer("sgd", "127.0.0.1:1").build(twins)


def test_aggregated_gradients_are_applied_once_without_waiting(RemoteOptimizer, keras, server_address, model_id):
    # experimental_aggregate_gradients=False: this push already holds every worker's sum.
    remote_vars, local_vars = _variables(keras, "r"), _variables(keras, "l")
    opt = RemoteOptimizer(
        keras.optimizers.SGD(learning_rate=0.1),
        server_address,
        model_id=model_id,
        num_workers=2,
        worker_index=0,
        sync_timeout_s=30,
    )
    opt.apply_gradients(zip(_grads(0), remote_vars), experimental_aggregate_gradients=False)
    keras.optimizers.SGD(learning_rate=0.1).apply(_grads(0), local_vars)
    _close(remote_vars, local_vars)
    assert int(opt.iterations) == 1


def test_async_mode_applies_each_push_as_it_arrives(RemoteOptimizer, keras, server_address, model_id):
    remote_vars, local_vars = _variables(keras, "r"), _variables(keras, "l")
    opt = RemoteOptimizer(
        keras.optimizers.SGD(learning_rate=0.1),
        server_address,
        model_id=model_id,
        num_workers=2,
        worker_index=1,
        mode="async",
    )
    local = keras.optimizers.SGD(learning_rate=0.1)
    for step in range(2):  # worker 0 never pushes; nothing waits for it
        opt.apply(_grads(step), remote_vars)
        local.apply(_grads(step), local_vars)
    _close(remote_vars, local_vars)
    assert int(opt.iterations) == 2


def test_constraints_are_applied_and_sent_back(RemoteOptimizer, keras, server_address, model_id):
    remote = keras.Variable(np.full((3,), 0.05, "float32"), name="c")
    remote.constraint = keras.constraints.NonNeg()
    opt = RemoteOptimizer(keras.optimizers.SGD(learning_rate=1.0), server_address, model_id=model_id)
    opt.apply([np.array([1.0, -1.0, 0.0], "float32")], [remote])
    _close([remote], [np.array([0.0, 1.05, 0.05])])
    _, values = opt.client.pull(model_id)
    _close([values["c"]], [np.asarray(remote)])


def test_ema_finalize_sets_the_averages_here_and_on_the_server(RemoteOptimizer, keras, server_address, model_id):
    def sgd():
        return keras.optimizers.SGD(learning_rate=0.1, use_ema=True, ema_momentum=0.5)

    remote_vars, local_vars = _variables(keras, "r"), _variables(keras, "l")
    opt, local = RemoteOptimizer(sgd(), server_address, model_id=model_id), sgd()
    for step in range(3):
        opt.apply(_grads(step), remote_vars)
        local.apply(_grads(step), local_vars)
    opt.finalize_variable_values(remote_vars)
    local.finalize_variable_values(local_vars)
    _close(remote_vars, local_vars)
    _, values = opt.client.pull(model_id)
    _close([values["r_kernel"], values["r_bias"]], local_vars)


def test_no_warning_when_nothing_is_wrong(RemoteOptimizer, keras, server_address, model_id):
    variables = _variables(keras, "quiet")
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        opt = RemoteOptimizer("adam", server_address, model_id=model_id)
        opt.apply(_grads(0), variables)
        opt.get_weights()


def test_a_learning_rate_set_after_build_goes_to_the_server_from_worker_0_only(
    RemoteOptimizer, keras, server_address, model_id, caplog
):
    first = RemoteOptimizer("sgd", server_address, model_id=model_id, num_workers=2, worker_index=0)
    second = RemoteOptimizer("sgd", server_address, model_id=model_id, num_workers=2, worker_index=1)
    first.build(_variables(keras, "lr_after"))
    second.build(_variables(keras, "lr_after"))
    first.learning_rate = 0.25
    assert first.client.list_models(model_id)[0].learning_rate == 0.25
    assert float(first.learning_rate) == 0.25
    with caplog.at_level("WARNING", logger="optserve.client.keras"):
        second.learning_rate = 0.75
    assert "worker 0 sets the rate" in caplog.text
    assert first.client.list_models(model_id)[0].learning_rate == 0.25
