"""`model.fit` survives a server restart: it waits, adopts the restored step and variables, and finishes.

A real `optserve serve` process with a checkpoint directory is stopped under
running Keras workers (tests/keras_restart_worker.py, one process each) and
started again on the same port from its checkpoints. The workers' gradients
are a known constant, so the final kernel says exactly how many updates the
server applied, and the workers' logs say how many steps the restore lost.
"""

from __future__ import annotations

import json
import pathlib
import re
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from test_failures import child_env, free_port, reaped, start_server_process, wait_for_step

from optserve.client import Client

WORKER = pathlib.Path(__file__).with_name("keras_restart_worker.py")
STEPS = 60
WORKER_TIMEOUT_S = 300
LOST = re.compile(r"(\d+) step\(s\) are lost")


def start_worker(backend, address, model_id, num_workers, worker_index, report):
    env = {**child_env(), "KERAS_BACKEND": backend, "TF_CPP_MIN_LOG_LEVEL": "2"}
    command = [
        sys.executable,
        str(WORKER),
        "--address",
        address,
        "--model-id",
        model_id,
        "--num-workers",
        str(num_workers),
        "--worker-index",
        str(worker_index),
        "--steps",
        str(STEPS),
        "--report",
        str(report),
    ]
    return subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def finish(process, report):
    try:
        output, _ = process.communicate(timeout=WORKER_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        process.kill()
        output, _ = process.communicate()
    assert process.returncode == 0 and report.exists(), f"worker exited {process.returncode}:\n{output[-4000:]}"
    return json.loads(report.read_text())


def expected_kernel(iterations):
    from keras_restart_worker import FEATURES, LEARNING_RATE

    return 1.0 - LEARNING_RATE * iterations * FEATURES


def restart(server, port, checkpoints, signal_number, down_s):
    server.send_signal(signal_number)
    server.wait(timeout=60)
    time.sleep(down_s)
    return start_server_process(port, checkpoints, "5steps")


def test_sync_workers_fit_through_a_sigkill_and_a_restore_from_an_older_checkpoint(tmp_path):
    """torch + JAX workers in sync mode: both converge on the restored step and finish."""
    pytest.importorskip("torch")
    pytest.importorskip("jax")
    port = free_port()
    checkpoints = tmp_path / "checkpoints"
    server, _ = start_server_process(port, checkpoints, "5steps")
    address = f"127.0.0.1:{port}"
    reports = [tmp_path / "torch.json", tmp_path / "jax.json"]
    workers = [
        start_worker(backend, address, "restart-sync", 2, index, report)
        for index, (backend, report) in enumerate(zip(("torch", "jax"), reports))
    ]
    with reaped([*workers]):
        with Client(address, timeout=30) as client:
            wait_for_step(client, "restart-sync", 17, timeout=WORKER_TIMEOUT_S)
        server, _ = restart(server, port, checkpoints, signal.SIGKILL, down_s=1.0)
        with reaped([server]):
            results = [finish(worker, report) for worker, report in zip(workers, reports)]
            with Client(address, timeout=30) as client:
                final = client.get_weights("restart-sync", include_variables=True)
            server.send_signal(signal.SIGTERM)
            server.wait(timeout=60)

    lost = {int(match.group(1)) for r in results for line in r["log"] if (match := LOST.search(line))}
    assert len(lost) == 1 and 0 < lost.pop() <= 5 + 2, [r["log"] for r in results]
    for result in results:
        np.testing.assert_allclose(result["kernel"], expected_kernel(final.iterations), rtol=1e-5)
        assert result["server_iterations"] == final.iterations
    assert STEPS - 7 <= final.iterations < STEPS, final.iterations  # some steps lost, the rest applied once
    (kernel,) = final.variables.values()
    np.testing.assert_allclose(kernel.reshape(-1), expected_kernel(final.iterations), rtol=1e-5)


def test_fit_waits_through_a_sigterm_and_ten_seconds_down_and_loses_nothing(tmp_path):
    """TensorFlow worker: SIGTERM writes a final checkpoint; fit waits 10 s and ends with every step."""
    pytest.importorskip("tensorflow")
    port = free_port()
    checkpoints = tmp_path / "checkpoints"
    server, _ = start_server_process(port, checkpoints, "5steps")
    address = f"127.0.0.1:{port}"
    report = tmp_path / "tf.json"
    worker = start_worker("tensorflow", address, "restart-term", 1, 0, report)
    with reaped([worker]):
        with Client(address, timeout=30) as client:
            wait_for_step(client, "restart-term", 12, timeout=WORKER_TIMEOUT_S)
        server, _ = restart(server, port, checkpoints, signal.SIGTERM, down_s=10.0)
        with reaped([server]):
            result = finish(worker, report)
            server.send_signal(signal.SIGTERM)
            server.wait(timeout=60)
    assert result["iterations"] == STEPS == result["server_iterations"], result
    np.testing.assert_allclose(result["kernel"], expected_kernel(STEPS), rtol=1e-5)
    assert any("unavailable" in line for line in result["log"]), result["log"]
    assert not any(LOST.search(line) for line in result["log"]), result["log"]
