"""Failures during training: the server killed and restarted, a worker killed mid-step.

The server runs as its own process (``python -m optserve.server serve``) where it
must be killed; the workers are ``optserve demo`` join-mode processes, or client
threads where a test needs exact, known gradients.
"""

from __future__ import annotations

import contextlib
import os
import queue
import re
import signal
import socket
import subprocess
import sys
import threading
import time

import numpy as np
import pytest

from optserve.client import demo
from optserve.client.client import Client, DeadlineExceededError, StepMismatchError
from optserve.server import optimizers
from optserve.server.app import start_server

LISTENING = re.compile(r"optserve listening on (\S+:\d+)")
START_TIMEOUT_S = 30.0
RUN_TIMEOUT_S = 60.0


# ---------------------------------------------------------------------------- processes


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def child_env() -> dict[str, str]:
    return dict(os.environ, PYTHONUNBUFFERED="1")


class Output:
    """Collects a child's merged stdout/stderr lines on a thread; ``wait_for`` a pattern."""

    def __init__(self, process: subprocess.Popen):
        self.process = process
        self.lines: list[str] = []
        self._new: queue.Queue = queue.Queue()
        threading.Thread(target=self._drain, daemon=True).start()

    def _drain(self) -> None:
        for line in self.process.stdout:
            self.lines.append(line.rstrip("\n"))
            self._new.put(line)
        self._new.put(None)

    def wait_for(self, pattern: re.Pattern | str, timeout: float = START_TIMEOUT_S) -> re.Match:
        pattern = re.compile(pattern)
        for line in self.lines:
            if match := pattern.search(line):
                return match
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                line = self._new.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                break
            if line is None:
                break
            if match := pattern.search(line):
                return match
        raise AssertionError(f"{pattern.pattern!r} never appeared. Output:\n{self.text()}")

    def text(self) -> str:
        return "\n".join(self.lines[-60:])


def start_server_process(port: int, checkpoint_dir, every: str) -> tuple[subprocess.Popen, Output]:
    command = [
        sys.executable,
        "-m",
        "optserve.server",
        "serve",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--device",
        "cpu",
        "--checkpoint-dir",
        str(checkpoint_dir),
        "--checkpoint-every",
        every,
    ]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=child_env())
    output = Output(process)
    output.wait_for(LISTENING)
    return process, output


def start_worker(address: str, index: int, steps: int, model_id: str) -> tuple[subprocess.Popen, Output]:
    command = [
        sys.executable,
        "-m",
        "optserve.client.demo",
        "--address",
        address,
        "--worker-index",
        str(index),
        "--num-workers",
        "2",
        "--model-id",
        model_id,
        "--steps",
        str(steps),
        "--retries",
        "20",
    ]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=child_env())
    return process, Output(process)


@contextlib.contextmanager
def reaped(processes: list[subprocess.Popen]):
    """Kill whatever of ``processes`` still runs when the test ends, pass or fail."""
    try:
        yield processes
    finally:
        for process in processes:
            if process.poll() is None:
                process.kill()
            process.wait()


def finish(process: subprocess.Popen, output: Output, what: str) -> None:
    try:
        status = process.wait(timeout=RUN_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        process.kill()
        raise AssertionError(f"{what} did not finish. Output:\n{output.text()}") from None
    assert status == 0, f"{what} exited with {status}. Output:\n{output.text()}"


def model_step(client: Client, model_id: str) -> int:
    found = client.list_models(timeout=5)
    return next((info.step for info in found if info.model_id == model_id), -1)


def wait_for_step(client: Client, model_id: str, step: int, timeout: float = RUN_TIMEOUT_S) -> int:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        current = model_step(client, model_id)
        if current >= step:
            return current
        time.sleep(0.005)
    raise AssertionError(f"model {model_id!r} never reached step {step}")


# ---------------------------------------------------------------------------- the expected result


def uninterrupted_demo_params(steps: int, seed: int = 0, batch_size: int = 64) -> dict[str, np.ndarray]:
    """What two join-mode demo workers train to without any failure, computed here.

    A worker's batch depends only on (seed, worker, step) and its gradients on the
    model's values at that step; the server sums the two pushes (a + b is exact in
    either order) and applies one update.
    """
    engine = optimizers.deserialize(demo.optimizer_config("adam", 0.01), backend="cpu")
    engine.build(demo.initial_params(seed))
    task = demo.teacher()
    for step in range(steps):
        params = engine.read_variables()
        total = None
        for worker in range(2):
            rng = np.random.default_rng((seed, worker, step))
            _, grads = demo.loss_and_grads(params, *demo.make_batch(rng, batch_size, task))
            grads = {name: g / 2 for name, g in grads.items()}
            total = grads if total is None else {name: total[name] + grads[name] for name in grads}
        engine.apply(total)
    return engine.read_variables()


# ---------------------------------------------------------------------------- server killed


def test_a_server_killed_mid_training_resumes_from_its_checkpoint_and_the_workers_finish(tmp_path):
    steps, kill_at = 300, 80
    port = free_port()
    address = f"127.0.0.1:{port}"
    checkpoints = tmp_path / "checkpoints"
    server, server_output = start_server_process(port, checkpoints, "20steps")
    with reaped([server]) as processes, Client(address) as client:
        workers = [start_worker(address, index, steps, "job") for index in range(2)]
        processes += [process for process, _ in workers]
        killed_at = wait_for_step(client, "job", kill_at)
        server.send_signal(signal.SIGKILL)
        server.wait()
        assert killed_at < steps, "training ended before the server could be killed"

        server, server_output = start_server_process(port, checkpoints, "20steps")
        processes.append(server)
        restored = server_output.wait_for(r"Restored checkpoint \S+: model 'job' at step (\d+)")
        assert 20 <= int(restored.group(1)) < steps  # a checkpoint from mid-training, not the start

        for index, (process, output) in enumerate(workers):
            finish(process, output, f"worker {index}")
            assert f"done at step {steps}" in output.text()
        info = client.list_models("job")[0]
        assert (info.step, info.iterations) == (steps, steps)  # no step lost, none applied twice
        _, values = client.pull("job")
    expected = uninterrupted_demo_params(steps)
    for name, value in expected.items():
        np.testing.assert_array_equal(values[name], value, err_msg=name)


def test_after_a_kill_every_step_is_applied_exactly_once(tmp_path):
    """SGD with learning rate 1 and integer gradients: the final value is exact arithmetic."""
    steps, kill_at = 60, 20
    port = free_port()
    address = f"127.0.0.1:{port}"
    checkpoints = tmp_path / "checkpoints"
    server, _ = start_server_process(port, checkpoints, "7steps")
    with reaped([server]) as processes, Client(address) as client:
        client.create_model(
            "exact",
            {"class_name": "SGD", "config": {"learning_rate": 1.0}},
            {"x": np.zeros(4, np.float32)},
            num_workers=2,
        )
        failures: list[BaseException] = []

        def worker(index: int) -> None:
            try:
                with Client(address, retries=40, backoff=0.05, max_backoff=0.5) as own:
                    step = own.resync("exact", index)
                    while step < steps:
                        gradient = np.full(4, (index + 1) * (step + 1), np.float32)
                        try:
                            result = own.push("exact", {"x": gradient}, worker_index=index, step=step)
                        except StepMismatchError:
                            step = own.resync("exact", index)  # restored from an older checkpoint
                            continue
                        step = result.step
                        time.sleep(0.005)  # slow enough for the test to kill the server mid-run
            except BaseException as error:  # noqa: BLE001 - reported by the test thread
                failures.append(error)

        threads = [threading.Thread(target=worker, args=(index,)) for index in range(2)]
        for thread in threads:
            thread.start()
        killed_at = wait_for_step(client, "exact", kill_at)
        server.send_signal(signal.SIGKILL)
        server.wait()
        server, output = start_server_process(port, checkpoints, "7steps")
        processes.append(server)
        for thread in threads:
            thread.join(RUN_TIMEOUT_S)
        assert not failures, failures
        assert killed_at < steps
        info = client.list_models("exact")[0]
        _, values = client.pull("exact")
    assert (info.step, info.iterations) == (steps, steps)
    # Step s subtracts 1 * (s + 1) + 2 * (s + 1): every step exactly once.
    np.testing.assert_array_equal(values["x"], np.full(4, -3 * steps * (steps + 1) / 2, np.float32))


# ---------------------------------------------------------------------------- worker killed


def test_a_worker_killed_mid_step_times_the_step_out_and_a_restarted_worker_rejoins():
    steps = 200
    with start_server(device="cpu") as server, Client(server.address) as client:
        # The demo's model, created ahead of the workers with a short step timeout; they join it.
        client.create_model(
            "job",
            demo.optimizer_config("adam", 0.01),
            demo.initial_params(0),
            num_workers=2,
            sync_timeout_s=0.5,
            timeout_policy="fail",
        )
        first, first_output = start_worker(server.address, 0, steps, "job")
        second, second_output = start_worker(server.address, 1, steps, "job")
        with reaped([first, second]) as processes:
            wait_for_step(client, "job", 20)
            second.send_signal(signal.SIGKILL)
            second.wait()
            # The remaining worker's step times out (FAIL: nothing applied) and it pushes it again.
            first_output.wait_for(r"step (\d+) timed out waiting for the other workers; pushing it again")
            stalled_at = model_step(client, "job")

            second, second_output = start_worker(server.address, 1, steps, "job")
            processes.append(second)
            rejoined = second_output.wait_for(r"joined model 'job' .*; step (\d+) of")
            assert int(rejoined.group(1)) == stalled_at
            finish(first, first_output, "worker 0")
            finish(second, second_output, "restarted worker 1")
        info = client.list_models("job")[0]
        assert (info.step, info.iterations) == (steps, steps)


def _push_in_background(client: Client, model_id: str, grads, **kwargs) -> threading.Thread:
    thread = threading.Thread(target=client.push, args=(model_id, grads), kwargs=kwargs)
    thread.start()
    return thread


def test_apply_partial_goes_on_without_a_dead_worker_and_takes_it_back():
    ones, twos = np.ones(2, np.float32), np.full(2, 2.0, np.float32)
    with start_server(device="cpu") as server, Client(server.address) as first, Client(server.address) as second:
        first.create_model(
            "partial",
            {"class_name": "SGD", "config": {"learning_rate": 1.0}},
            {"x": np.zeros(2, np.float32)},
            num_workers=2,
            sync_timeout_s=0.3,
            timeout_policy="apply_partial",
        )
        other = _push_in_background(second, "partial", {"x": twos}, worker_index=1, step=0)
        first.push("partial", {"x": ones}, worker_index=0, step=0)
        other.join()
        # Worker 1 is gone: after the timeout, step 1 is applied with worker 0's gradient alone.
        alone = first.push("partial", {"x": ones}, worker_index=0, step=1)
        assert (alone.step, alone.contributors, alone.missing_workers) == (2, [0], [1])
        # Worker 1 comes back: the step it missed is over, so it resyncs and takes part again.
        with pytest.raises(StepMismatchError) as missed:
            second.push("partial", {"x": twos}, worker_index=1, step=1)
        assert missed.value.current_step == 2
        assert second.resync("partial", 1) == 2
        other = _push_in_background(second, "partial", {"x": twos}, worker_index=1)
        together = first.push("partial", {"x": ones}, worker_index=0, step=2)
        other.join()
        assert (together.step, together.contributors, together.missing_workers) == (3, [0, 1], [])
        _, values = first.pull("partial")
    np.testing.assert_array_equal(values["x"], np.full(2, -(3.0 + 1.0 + 3.0), np.float32))


def test_fail_policy_refuses_the_step_and_applies_nothing():
    with start_server(device="cpu") as server, Client(server.address) as client:
        client.create_model(
            "strict",
            {"class_name": "SGD", "config": {"learning_rate": 1.0}},
            {"x": np.zeros(2, np.float32)},
            num_workers=2,
            sync_timeout_s=0.2,
        )
        with pytest.raises(DeadlineExceededError) as timed_out:
            client.push("strict", {"x": np.ones(2, np.float32)}, worker_index=0, step=0)
        assert timed_out.value.details["missing_workers"] == "1"
        info = client.list_models("strict")[0]
        assert (info.step, info.iterations, info.waiting_workers) == (0, 0, [])
