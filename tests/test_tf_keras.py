"""The tf_keras (Keras 2) RemoteOptimizer against a real server, in one tf_keras process.

tests/tf_keras_worker.py runs every check in a subprocess with
`TF_USE_LEGACY_KERAS=1` (so `tf.keras` is tf_keras) and reports each; each
check is one test here.
"""

from __future__ import annotations

import ast
import importlib.util
import json
import os
import pathlib
import subprocess
import sys

import pytest

WORKER = pathlib.Path(__file__).with_name("tf_keras_worker.py")
# The check names, read without importing the worker (importing it imports TensorFlow).
CHECKS = [
    node.name[len("check_") :]
    for cls in ast.parse(WORKER.read_text()).body
    if isinstance(cls, ast.ClassDef) and cls.name == "Checks"
    for node in cls.body
    if isinstance(node, ast.FunctionDef) and node.name.startswith("check_")
]
WORKER_TIMEOUT_S = 300

pytestmark = pytest.mark.skipif(importlib.util.find_spec("tf_keras") is None, reason="tf_keras is not installed")


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    from optserve.server.app import start_server

    running = start_server(host="127.0.0.1", port=0, device="cpu")
    folder = tmp_path_factory.mktemp("tf_keras_worker")
    path, log_path = folder / "report.json", folder / "worker.log"
    env = {**os.environ, "TF_USE_LEGACY_KERAS": "1", "TF_CPP_MIN_LOG_LEVEL": "2"}
    try:
        with open(log_path, "w") as log:
            process = subprocess.run(
                [sys.executable, str(WORKER), "--address", running.address, "--report", str(path)],
                env=env,
                stdout=log,
                stderr=log,
                timeout=WORKER_TIMEOUT_S,
            )
    finally:
        running.stop()
    if not path.exists():
        pytest.fail(
            f"The tf_keras worker (exit code {process.returncode}) wrote no report:\n{log_path.read_text()[-4000:]}"
        )
    return json.loads(path.read_text())


@pytest.mark.parametrize("check", CHECKS)
def test_tf_keras(report, check):
    outcome = report["checks"].get(check, "the worker did not run this check")
    assert outcome == "ok", f"{check}:\n{outcome}"
