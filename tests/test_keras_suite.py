"""Keras's own optimizer tests, from the installed wheel, unchanged, with every optimizer remote.

One pytest subprocess per backend (torch, JAX, TensorFlow) runs Keras's
`keras/src/optimizers/*_test.py` with tests/keras_suite_plugin.py, which turns
each built-in optimizer class those tests construct into
`RemoteOptimizer(<that optimizer>, address)` against the server this module
starts. Every test must pass, or be listed in NOT_APPLICABLE with its reason; a
listed test that passes fails too, so the list only ever shrinks.

Every file is run, `multi_optimizer_test.py` included: MultiOptimizer /
OptimizerMap route variables to several RemoteOptimizers (one job each).
Each backend's run takes about 30 s on an idle machine; the three run at once.
"""

from __future__ import annotations

import fnmatch
import importlib.util
import json
import os
import pathlib
import subprocess
import sys

import pytest

TESTS = pathlib.Path(__file__).parent
BACKENDS = ("torch", "jax", "tensorflow")
SUITE_TIMEOUT_S = 480  # per backend process; about 30 s each on an idle machine
LEFT_OUT: tuple[str, ...] = ()
# Below this many tests that created a remote optimizer, the substitution itself broke.
MIN_EXERCISED = 100

_PRIVATE = "exercises a private Keras method the server replaces"
_MOCKS_UPDATE_PATH = (
    ("jax", "tensorflow"),
    "mocks the in-process update path (`optimizer.assign` versus `Variable.assign`, "
    "`_apply_weight_decay`): the update runs on the server, and the client writes the "
    "server's new values with `Variable.assign`. Sparse numbers: test_sparse_correctness_*",
)
_STATE = "reads a private attribute of Keras's in-process optimizer state, which is on the server"

# {test id pattern (fnmatch): (backends it applies to, why the test does not apply)}.
NOT_APPLICABLE = {
    # The server runs the update; these call the in-process update's private pieces directly.
    "muon_test.py::MuonTest::test_Newton_Schulz": (BACKENDS, f"{_PRIVATE} (Muon.zeropower_via_newtonschulz5)"),
    "muon_test.py::MuonTest::test_lr_adjust_*": (BACKENDS, f"{_PRIVATE} (Muon.lr_adjust)"),
    "muon_test.py::MuonTest::test_should_use_adamw": (BACKENDS, f"{_PRIVATE} (Muon._should_use_adamw)"),
    "muon_test.py::MuonTest::test_*_single_step": (
        BACKENDS,
        f"{_PRIVATE} (Muon._muon_update_step / _adamw_update_step on hand-made variables)",
    ),
    "muon_test.py::MuonTest::test_adamw_weight_decay": (BACKENDS, f"{_PRIVATE} (Optimizer._apply_weight_decay)"),
    "muon_test.py::MuonTest::test_muon_weight_decay": (BACKENDS, f"{_PRIVATE} (Muon._apply_weight_decay)"),
    "nadam_test.py::NadamTest::test_build_with_empty_var_list": (
        BACKENDS,
        "reads Nadam's private `_u_product` variable: the server holds that scalar (build([]) itself works)",
    ),
    # Private state attributes: the state lives on the server, read through `variables` / get_weights().
    "adam_test.py::AdamTest::test_ema*": (BACKENDS, _STATE + " (`_model_variables_moving_average`)"),
    "optimizer_test.py::OptimizerTest::test_ema": (BACKENDS, _STATE + " (`_model_variables_moving_average`)"),
    "optimizer_test.py::OptimizerTest::test_ema_with_model_fit": (
        BACKENDS,
        _STATE + " (`_model_variables_moving_average`)",
    ),
    "multi_optimizer_test.py::MultiOptimizerTest::test_swap_ema_weights_with_multi_optimizer": (
        BACKENDS,
        "tensorflow: the lazily built model below; torch: "
        + _STATE
        + " (`_model_variables_moving_average`, which SwapEMAWeights reads); jax: "
        "MultiOptimizer's stateless_apply (JAX's compiled fit) calls each inner `apply` inside the trace, "
        "which RemoteOptimizer refuses with a ValueError naming `stateless_apply` (eager `apply` works)",
    ),
    "optimizer_test.py::OptimizerTest::test_gradient_accumulation": (BACKENDS, _STATE + " (`_accumulated_gradients`)"),
    "optimizer_test.py::OptimizerTest::test_overwrite_with_gradient_with_gradient_accumulation": (
        BACKENDS,
        "refused at the first call with a ValueError: `overwrite_with_gradient` with gradient accumulation "
        "would need Keras's in-process accumulators (plain `overwrite_with_gradient` works)",
    ),
    # (test_sparse_gradients_scatter_update's optimizer is a test-local class: it stays local and passes.)
    "optimizer_sparse_test.py::OptimizerSparseTest::test_sparse_gradients_[!s]*": _MOCKS_UPDATE_PATH,
    "optimizer_sparse_test.py::OptimizerSparseTest::test_sparse_gradients_sgd*": _MOCKS_UPDATE_PATH,
    # TensorFlow: a model without `keras.Input` creates its variables inside the first traced train
    # step, and they hold no value until that step runs, when the optimizer (built there, lifted out
    # of the trace) must create the job: refused with a ValueError saying to build the model first.
    **{
        test_id: (("tensorflow",), "refused with a clear error: a model built inside the first traced step")
        for test_id in (
            "adam_test.py::AdamTest::test_clipnorm_indexed_slices",
            "lion_test.py::LionTest::test_ema",
            "optimizer_test.py::OptimizerTest::test_tf_checkpointing",
            "schedule_free_adamw_test.py::ScheduleFreeAdamWTest::test_with_model",
        )
    },
    # Keras's LossScaleOptimizer on JAX runs its inner optimizer's `apply` under `jax.lax.cond`,
    # which traces it. A RemoteOptimizer directly inside is handled (client/keras_loss_scale.py);
    # one inside a MultiOptimizer inside is not, and RemoteOptimizer.apply refuses the trace.
    "multi_optimizer_test.py::MultiOptimizerTest::test_multi_optimizer_wrapped_in_loss_scale_optimizer": (
        ("jax",),
        "refused with a ValueError: RemoteOptimizer.apply traced by LossScaleOptimizer's lax.cond "
        "through a MultiOptimizer (a RemoteOptimizer directly inside a LossScaleOptimizer works)",
    ),
    "multi_optimizer_test.py::MultiOptimizerTest::test_serialization": (
        BACKENDS,
        "compares `__class__.__name__` with 'Adam': a remote optimizer's class is `RemoteAdam`, a subclass "
        "of Adam (isinstance holds, and the round trip itself works)",
    ),
}


def _installed(backend):
    return importlib.util.find_spec(backend) is not None


def _keras_test_files():
    spec = importlib.util.find_spec("keras")
    folder = pathlib.Path(spec.origin).parent / "src" / "optimizers"
    return sorted(str(path) for path in folder.glob("*_test.py") if path.name not in LEFT_OUT)


def not_applicable(test_id, backend):
    for pattern, (backends, reason) in NOT_APPLICABLE.items():
        if backend in backends and fnmatch.fnmatchcase(test_id, pattern):
            return reason
    return None


@pytest.fixture(scope="module")
def suite_server():
    from optserve.server.app import start_server

    running = start_server(host="127.0.0.1", port=0, device="cpu")
    try:
        yield running.address
    finally:
        running.stop()


@pytest.fixture(scope="module")
def suite_reports(suite_server, tmp_path_factory):
    """{backend: report} of Keras's optimizer tests, one subprocess per installed backend, run at once."""
    folder = tmp_path_factory.mktemp("keras_suite")
    (folder / "pytest.ini").write_text("[pytest]\n")
    files = _keras_test_files()
    processes = []
    for backend in (b for b in BACKENDS if _installed(b)):
        report = folder / f"{backend}.json"
        log = open(folder / f"{backend}.log", "w")
        env = {
            **os.environ,
            "KERAS_BACKEND": backend,
            "TF_CPP_MIN_LOG_LEVEL": "2",
            "PYTHONPATH": os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")]),
            "OPTSERVE_KERAS_SUITE_ADDRESS": suite_server,
            "OPTSERVE_KERAS_SUITE_REPORT": str(report),
        }
        command = [sys.executable, "-m", "pytest", "-q", "-p", "keras_suite_plugin", "-p", "no:cacheprovider"]
        command += ["-c", str(folder / "pytest.ini"), "--rootdir", str(folder), *files]
        process = subprocess.Popen(command, env=env, cwd=folder, stdout=log, stderr=log)
        processes.append((backend, report, log, process))
    reports = {}
    for backend, report, log, process in processes:
        try:
            process.wait(timeout=SUITE_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        log.close()
        if not report.exists():
            output = pathlib.Path(log.name).read_text()[-4000:]
            pytest.fail(
                f"Keras's optimizer tests on {backend} (exit code {process.returncode}) wrote no report:\n{output}"
            )
        reports[backend] = json.loads(report.read_text())["tests"]
    return reports


@pytest.mark.parametrize("backend", BACKENDS)
def test_keras_optimizer_tests_pass_with_remote_optimizers(suite_reports, backend):
    if backend not in suite_reports:
        pytest.skip(f"{backend} is not installed")
    tests = suite_reports[backend]
    exercised = [test_id for test_id, entry in tests.items() if entry.get("remote_optimizers")]
    assert len(exercised) >= MIN_EXERCISED, f"only {len(exercised)} tests created a RemoteOptimizer"
    unexpected, stale = [], []
    for test_id, entry in sorted(tests.items()):
        failed = entry.get("outcome") in ("failed", "error")
        listed = not_applicable(test_id, backend)
        if failed and listed is None:
            unexpected.append(f"{test_id}: {entry.get('message', '')}")
        elif not failed and listed is not None and entry.get("outcome") == "passed":
            stale.append(f"{test_id} (listed: {listed})")
    assert not unexpected, f"{len(unexpected)} of Keras's tests failed on {backend}:\n" + "\n\n".join(unexpected)
    assert not stale, "these tests pass now; remove them from NOT_APPLICABLE:\n" + "\n".join(stale)


def test_every_not_applicable_entry_matches_a_test(suite_reports):
    """An entry that matches no test of any backend is a typo or a test Keras removed."""
    if not suite_reports:
        pytest.skip("no Keras backend is installed")
    for pattern, (backends, _) in NOT_APPLICABLE.items():
        ran = [backend for backend in backends if backend in suite_reports]
        if ran:
            assert any(fnmatch.fnmatchcase(t, pattern) for b in ran for t in suite_reports[b]), pattern
