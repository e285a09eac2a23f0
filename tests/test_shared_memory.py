"""Shared memory for workers on the server's host: negotiation, fallback, parity, isolation, cleanup."""

from __future__ import annotations

import os
import pathlib
import signal
import subprocess
import sys
import textwrap
import threading
import time

import numpy as np
import pytest
import rpc_helpers

from optserve.client import Client, InvalidArgumentError
from optserve.protos import optserve_pb2 as pb
from optserve.server import optimizers, shared_memory
from optserve.server.app import start_server
from optserve.server.backends import NumpyBackend

pytestmark = pytest.mark.skipif(not os.path.isdir("/dev/shm"), reason="needs /dev/shm")


@pytest.fixture(autouse=True)
def _no_request_frames(monkeypatch):
    """These models' pushes are small, and small pushes would go whole over the data plane
    (tests/test_data_plane_requests.py): shared memory is what is tested here."""
    monkeypatch.setenv("OPTSERVE_DATA_PLANE", "0")


ROOT = pathlib.Path(__file__).resolve().parents[1]
ADAM = {"class_name": "Adam", "config": {"learning_rate": 0.01}}


def variables(seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {"w": rng.standard_normal((64, 33)).astype(np.float32), "b": rng.standard_normal(7).astype(np.float32)}


def gradients(step: int, worker: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(1000 * step + worker)
    return {"w": rng.standard_normal((64, 33)).astype(np.float32), "b": rng.standard_normal(7).astype(np.float32)}


def segments(directory: str = "/dev/shm") -> list[str]:
    return sorted(name for name in os.listdir(directory) if name.startswith(shared_memory.NAME_PREFIX))


def _uses_shared_memory(client: Client, model_id: str, worker: int = 0) -> bool:
    return (model_id, worker) in client.transport.shared_memory._segments


def _train(address: str, shared: bool, model_id: str, steps: int = 4) -> dict[str, np.ndarray]:
    with Client(address, shared_memory=shared) as client:
        client.create_model(model_id, ADAM, variables())
        values: dict[str, np.ndarray] = {}
        for step in range(steps):
            _, values = client.push_pull(model_id, gradients(step))
        assert _uses_shared_memory(client, model_id) == shared
        return values


def test_push_pull_through_shared_memory_is_bit_identical_to_grpc(address):
    shared = _train(address, True, "through-shm")
    wired = _train(address, False, "through-grpc")
    for name in wired:
        np.testing.assert_array_equal(shared[name], wired[name])
        assert shared[name].flags.writeable


def test_values_are_handed_out_in_the_segment_and_never_written_while_held(address):
    with Client(address) as client:
        client.create_model("held", ADAM, variables())
        _, first = client.push_pull("held", gradients(0))
        assert _uses_shared_memory(client, "held")
        segment = client.transport.shared_memory._segments[("held", 0)]
        whole = np.frombuffer(segment.buffer, np.uint8)

        def in_segment(values) -> bool:
            return all(np.shares_memory(value, whole) for value in values.values())

        def where(values) -> set[int]:
            return {value.__array_interface__["data"][0] for value in values.values()}

        assert in_segment(first)  # the values were not copied
        first_at, kept = where(first), {name: value.copy() for name, value in first.items()}
        _, second = client.push_pull("held", gradients(1))  # `first` is held: the other region
        assert in_segment(second) and not where(second) & first_at
        _, third = client.push_pull("held", gradients(2))  # both held: copied out of the segment
        assert not in_segment(third)
        for name in kept:  # no later push wrote into arrays the caller still holds
            np.testing.assert_array_equal(first[name], kept[name])
        del first
        _, fourth = client.push_pull("held", gradients(3))  # `first`'s region is free again
        assert in_segment(fourth) and where(fourth) == first_at
        values = {"second": second, "third": third, "fourth": fourth}
    with Client(address, shared_memory=False, data_plane=False) as wired:
        wired.create_model("held-grpc", ADAM, variables())
        for step, label in enumerate(["first", "second", "third", "fourth"]):
            _, expected = wired.push_pull("held-grpc", gradients(step))
            if label in values:
                for name in expected:
                    np.testing.assert_array_equal(values[label][name], expected[name], strict=True)


def test_segment_names_are_gone_once_mapped_and_values_are_the_servers(address):
    with Client(address) as client:
        client.create_model("named", ADAM, variables())
        client.push("named", gradients(0))
        assert _uses_shared_memory(client, "named")
        assert segments() == []  # the worker deleted the name as soon as it had mapped it
        _, pulled = client.pull("named")
        _, returned = client.push_pull("named", gradients(1))
        _, after = client.pull("named")
        for name in after:
            np.testing.assert_array_equal(returned[name], after[name])
            assert not np.array_equal(pulled[name], after[name])


def test_disabled_on_the_client_uses_grpc(address, monkeypatch):
    monkeypatch.setenv("OPTSERVE_SHARED_MEMORY", "0")
    with Client(address) as client:
        client.create_model("env-off", ADAM, variables())
        client.push("env-off", gradients(0))
        assert not _uses_shared_memory(client, "env-off")
        assert not client.transport.shared_memory.available


def test_disabled_on_the_server_falls_back_to_grpc():
    running = start_server(host="127.0.0.1", port=0, device="cpu", shared_memory_dir=None)
    try:
        with Client(running.address) as client:
            client.create_model("server-off", ADAM, variables())
            result, values = client.push_pull("server-off", gradients(0))
            assert result.step == 1 and set(values) == {"w", "b"}
            assert not client.transport.shared_memory.available  # asked once, then gRPC for good
        channel, stub = rpc_helpers.connect(running.address)
        with channel:
            with pytest.raises(Exception) as refused:
                stub.OpenSharedMemory(pb.OpenSharedMemoryRequest(model_id="server-off"), timeout=20)
            assert refused.value.code().name == "FAILED_PRECONDITION"
    finally:
        running.stop()


def test_a_segment_the_client_cannot_open_falls_back_to_grpc(tmp_path):
    """A worker on another host: the path the server names does not exist where the worker runs."""
    running = start_server(host="127.0.0.1", port=0, device="cpu", shared_memory_dir=str(tmp_path))
    try:
        with Client(running.address) as client:
            client.create_model("elsewhere", ADAM, variables())
            original = client.transport._open_shared_memory

            def elsewhere(model_id, worker):
                response = original(model_id, worker)
                response.path = response.path + "-on-another-host"
                return response

            client.transport.shared_memory._open_session = elsewhere
            result, values = client.push_pull("elsewhere", gradients(0))
            assert result.step == 1 and set(values) == {"w", "b"}
            assert not client.transport.shared_memory.available
    finally:
        running.stop()
    assert segments(str(tmp_path)) == []  # the server deleted the unclaimed segment when it stopped


def test_errors_are_unchanged_through_shared_memory(address):
    with Client(address) as client:
        client.create_model("errors", ADAM, variables(), num_workers=1)
        client.push("errors", gradients(0))
        assert _uses_shared_memory(client, "errors")
        with pytest.raises(InvalidArgumentError, match="has shape \\[5\\] float32"):
            client.push("errors", {"w": np.ones(5, np.float32)})  # goes over gRPC: the server words it
        with pytest.raises(Exception) as mismatch:
            client.push("errors", gradients(1), step=7)
        assert "pushed step 7" in str(mismatch.value)
        with pytest.raises(InvalidArgumentError, match="NaN or infinite"):
            client.push("errors", {"b": np.full(7, np.nan, np.float32)})
        assert client.push("errors", gradients(1)).step == 2  # nothing of the refused pushes applied


def test_a_session_serves_only_its_own_model_and_worker(address):
    with Client(address) as client:
        client.create_model("mine", ADAM, variables())
        client.create_model("theirs", ADAM, variables(1))
        client.push("mine", gradients(0))
        session = client.transport.shared_memory._segments[("mine", 0)].session_id
    channel, stub = rpc_helpers.connect(address)
    with channel:
        header = pb.ApplyGradientsHeader(
            model_id="theirs", worker_index=0, step=0, shared_memory_session=session, shared_memory_gradients=["w"]
        )
        with pytest.raises(Exception) as refused:
            stub.ApplyGradientsUnary(pb.ApplyGradientsRequest(header=header), timeout=20)
        assert refused.value.code().name == "INVALID_ARGUMENT" and "belongs to model 'mine'" in refused.value.details()
        guessed = pb.ApplyGradientsHeader(
            model_id="theirs", worker_index=0, step=0, shared_memory_session="0" * 32, shared_memory_gradients=["w"]
        )
        with pytest.raises(Exception) as unknown:
            stub.ApplyGradientsUnary(pb.ApplyGradientsRequest(header=guessed), timeout=20)
        assert unknown.value.code().name == "FAILED_PRECONDITION"
    with Client(address, shared_memory=False) as client:
        assert client.pull("theirs")[0].step == 0


def test_segments_are_private_files_with_random_names(address):
    channel, stub = rpc_helpers.connect(address)
    with channel, Client(address) as client:
        client.create_model("private", ADAM, variables(), num_workers=2)
        first = stub.OpenSharedMemory(pb.OpenSharedMemoryRequest(model_id="private", worker_index=0), timeout=20)
        second = stub.OpenSharedMemory(pb.OpenSharedMemoryRequest(model_id="private", worker_index=1), timeout=20)
        assert first.path != second.path and first.session_id != second.session_id and first.nonce != second.nonce
        assert os.stat(first.path).st_mode & 0o777 == 0o600
        again = stub.OpenSharedMemory(pb.OpenSharedMemoryRequest(model_id="private", worker_index=0), timeout=20)
        assert not os.path.exists(first.path)  # a worker's new session replaces its old one
        client.delete_model("private")
    for response in (second, again):
        if os.path.exists(response.path):
            os.unlink(response.path)  # unclaimed: as a worker would once mapped


def test_sync_with_two_workers_through_shared_memory_matches_grpc(address):
    def run(shared: bool, model_id: str) -> dict[str, np.ndarray]:
        clients = [Client(address, shared_memory=shared) for _ in range(2)]
        clients[0].create_model(model_id, ADAM, variables(), num_workers=2, mode="sync")
        results: dict[int, dict[str, np.ndarray]] = {}

        def work(worker: int) -> None:
            for step in range(3):
                _, results[worker] = clients[worker].push_pull(model_id, gradients(step, worker), worker_index=worker)

        threads = [threading.Thread(target=work, args=(w,)) for w in range(2)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(60)
        for worker in range(2):
            assert _uses_shared_memory(clients[worker], model_id, worker) == shared
            np.testing.assert_array_equal(results[0]["w"], results[1]["w"])
        for client in clients:
            client.close()
        return results[0]

    shared, wired = run(True, "sync-shm"), run(False, "sync-grpc")
    for name in wired:
        np.testing.assert_array_equal(shared[name], wired[name])


@pytest.mark.parametrize("rows", [64, 9000], ids=["small", "large"])
@pytest.mark.parametrize("shared", [(True, True), (True, False)], ids=["both-shared", "one-over-grpc"])
def test_each_sync_worker_gets_the_step_values_in_its_own_region_or_a_snapshot(address, rows, shared):
    """A sync step writes its values into every waiting worker's region at once; a worker on gRPC in
    the same step gets a snapshot. Both get the values a local apply of the summed gradients gives."""
    rng = np.random.default_rng(rows)
    start = {"w": rng.standard_normal((rows, 33)).astype(np.float32), "b": rng.standard_normal(7).astype(np.float32)}
    pushed = [[{k: rng.standard_normal(v.shape).astype(np.float32) for k, v in start.items()} for _ in range(2)]]
    pushed += [[{k: rng.standard_normal(v.shape).astype(np.float32) for k, v in start.items()} for _ in range(2)]]
    model_id = f"sync-regions-{rows}-{shared[1]}"
    clients = [Client(address, shared_memory=flag) for flag in shared]
    clients[0].create_model(model_id, ADAM, start, num_workers=2, mode="sync")
    results: dict[int, list] = {0: [], 1: []}

    def work(worker: int) -> None:
        for grads in pushed:
            _, values = clients[worker].push_pull(model_id, grads[worker], worker_index=worker)
            results[worker].append({k: np.array(v) for k, v in values.items()})

    threads = [threading.Thread(target=work, args=(w,)) for w in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    engine = optimizers.deserialize(ADAM, backend=NumpyBackend(native=False))
    engine.build({k: v.copy() for k, v in start.items()})
    for step, grads in enumerate(pushed):
        engine.apply({k: grads[0][k] + grads[1][k] for k in start})
        expected = engine.read_variables()
        for worker in range(2):
            for name in start:
                np.testing.assert_array_equal(results[worker][step][name], expected[name])
    for worker, flag in enumerate(shared):
        assert _uses_shared_memory(clients[worker], model_id, worker) == flag
    for client in clients:
        client.close()


def test_a_restarted_server_is_pushed_to_over_grpc_then_a_new_segment():
    running = start_server(host="127.0.0.1", port=0, device="cpu")
    port = running.port
    with Client(running.address, retries=20, backoff=0.05) as client:
        client.create_model("restart", ADAM, variables())
        client.push("restart", gradients(0))
        running.stop()
        running = start_server(host="127.0.0.1", port=port, device="cpu")
        try:
            client.create_model("restart", ADAM, variables())
            assert client.push("restart", gradients(0), step=0).step == 1  # the old session is unknown: gRPC
            assert client.push("restart", gradients(1)).step == 2  # and a new session after it
            assert _uses_shared_memory(client, "restart")
        finally:
            running.stop()


# ------------------------------------------------------------------ real processes, SIGKILL

WORKER = textwrap.dedent(
    """
    import sys, numpy as np
    from optserve.client import Client
    client = Client(sys.argv[1])
    client.create_model("killed", "adam", {"w": np.zeros(1 << 18, np.float32)})
    client.push("killed", {"w": np.ones(1 << 18, np.float32)})
    assert ("killed", 0) in client.transport.shared_memory._segments
    print("pushed", flush=True)
    while True:
        client.push_pull("killed", {"w": np.ones(1 << 18, np.float32)})
    """
)


def _server_process(directory: pathlib.Path) -> tuple[subprocess.Popen, str]:
    command = [sys.executable, "-m", "optserve.server", "serve", "--host", "127.0.0.1", "--port", "0"]
    command += ["--device", "cpu", "--log-level", "WARNING", "--shared-memory-dir", str(directory)]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, text=True, cwd=ROOT)
    line = process.stdout.readline().strip()
    assert line.startswith("optserve listening on "), line
    return process, line.rsplit(" ", 1)[1]


def _worker_process(address: str) -> subprocess.Popen:
    worker = subprocess.Popen([sys.executable, "-c", WORKER, address], stdout=subprocess.PIPE, text=True, cwd=ROOT)
    assert worker.stdout.readline().strip() == "pushed"
    return worker


def test_no_segment_is_left_after_sigkill_of_the_worker_or_the_server(tmp_path):
    server, address = _server_process(tmp_path)
    try:
        worker = _worker_process(address)
        time.sleep(0.3)  # mid-loop
        worker.send_signal(signal.SIGKILL)
        worker.wait(30)
        assert segments(str(tmp_path)) == []
        worker = _worker_process(address)  # the server goes on serving the model
        server.send_signal(signal.SIGKILL)
        server.wait(30)
        assert segments(str(tmp_path)) == []
        worker.kill()
        worker.wait(30)
    finally:
        server.kill()
        server.wait(30)


def test_a_starting_server_deletes_segments_of_servers_no_longer_running(tmp_path):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    stale = tmp_path / f"{shared_memory.NAME_PREFIX}{int(dead.stdout)}-abcdef"
    live = tmp_path / f"{shared_memory.NAME_PREFIX}{os.getpid()}-abcdef"
    stale.write_bytes(b"x")
    live.write_bytes(b"x")
    assert shared_memory.sweep_stale(str(tmp_path)) == [str(stale)]
    assert live.exists()
