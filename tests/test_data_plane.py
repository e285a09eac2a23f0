"""The data plane: a large push's bytes over TCP beside gRPC. Parity, sync, isolation, fallback, cleanup."""

from __future__ import annotations

import socket
import threading

import numpy as np
import pytest
import rpc_helpers

from optserve.client import Client, InvalidArgumentError
from optserve.protos import frames
from optserve.protos import optserve_pb2 as pb
from optserve.protos.errors import OptserveError
from optserve.server.app import start_server

ADAM = {"class_name": "Adam", "config": {"learning_rate": 0.01}}
SHAPES = {"w": (512, 520), "b": (7,)}  # ~1 MiB: more than one gRPC message


def variables(seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {name: rng.standard_normal(shape).astype(np.float32) for name, shape in SHAPES.items()}


def gradients(step: int, worker: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(1000 * step + worker)
    return {name: rng.standard_normal(shape).astype(np.float32) for name, shape in SHAPES.items()}


def _over_data_plane(client: Client, model_id: str, worker: int = 0) -> bool:
    return (model_id, worker) in client.transport.data_plane._segments


def _train(address: str, model_id: str, data_plane_on: bool, steps: int = 4) -> dict[str, np.ndarray]:
    with Client(address, shared_memory=False, data_plane=data_plane_on) as client:
        client.create_model(model_id, ADAM, variables())
        values: dict[str, np.ndarray] = {}
        for step in range(steps):
            _, values = client.push_pull(model_id, gradients(step))
        assert _over_data_plane(client, model_id) == data_plane_on
        client.push(model_id, gradients(steps))  # a push without values back
        _, pulled = client.pull(model_id)
        return {"returned": values, "pulled": pulled}


def test_push_pull_over_the_data_plane_is_bit_identical_to_grpc(address):
    planed = _train(address, "over-data-plane", True)
    wired = _train(address, "over-grpc", False)
    for kind in ("returned", "pulled"):
        for name in SHAPES:
            np.testing.assert_array_equal(planed[kind][name], wired[kind][name], strict=True)


def test_sync_workers_over_the_data_plane_sum_like_grpc(address):
    results = {}
    for on in (True, False):
        model_id = f"sync-{on}"
        with Client(address, shared_memory=False) as admin:
            admin.create_model(model_id, ADAM, variables(), num_workers=2)
        returned: dict[int, dict] = {}

        def work(worker: int, on=on, model_id=model_id, returned=returned) -> None:
            with Client(address, shared_memory=False, data_plane=on) as client:
                for step in range(3):
                    _, returned[worker] = client.push_pull(model_id, gradients(step, worker), worker_index=worker)
                if _over_data_plane(client, model_id, worker) != on:
                    returned.pop(worker)

        threads = [threading.Thread(target=work, args=(worker,)) for worker in range(2)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(60)
        assert set(returned) == {0, 1}
        for name in SHAPES:
            np.testing.assert_array_equal(returned[0][name], returned[1][name])
        results[on] = returned[0]
    for name in SHAPES:
        np.testing.assert_array_equal(results[True][name], results[False][name], strict=True)


def _open(stub, model_id: str, worker: int = 0) -> pb.OpenDataPlaneResponse:
    return stub.OpenDataPlane(pb.OpenDataPlaneRequest(model_id=model_id, worker_index=worker), timeout=10)


def _connect(address: str, response: pb.OpenDataPlaneResponse, secret: bytes | None = None) -> socket.socket:
    connection = socket.create_connection((address.rsplit(":", 1)[0], response.port), timeout=10)
    connection.sendall(response.secret if secret is None else secret)
    return connection


def test_a_connection_without_the_secret_is_closed_and_a_session_serves_one_worker(address, stub):
    with Client(address) as admin:
        admin.create_model("isolated", ADAM, variables(), num_workers=2)
    response = _open(stub, "isolated", 0)
    intruder = _connect(address, response, secret=bytes(frames.SECRET_BYTES))
    assert intruder.recv(1) == b""  # closed by the server
    intruder.close()
    owner = _connect(address, response)
    assert owner.recv(1) == frames.ATTACHED
    header = pb.ApplyGradientsHeader(
        model_id="isolated", worker_index=1, step=0, data_plane_session=response.session_id, data_plane_sequence=1
    )
    request = pb.ApplyGradientsRequest(header=header)
    with pytest.raises(Exception) as refused:
        stub.ApplyGradientsUnary(request, timeout=10)
    assert "belongs to model 'isolated', worker 0" in str(refused.value)
    owner.close()


def test_a_bad_frame_ends_the_session_and_its_pushes_are_refused(address, stub):
    with Client(address) as admin:
        admin.create_model("bad-frame", ADAM, variables())
    response = _open(stub, "bad-frame")
    connection = _connect(address, response)
    assert connection.recv(1) == frames.ATTACHED
    connection.sendall(frames.header(1, 12) + bytes(12))  # not the model's size
    assert connection.recv(1) == b""
    header = pb.ApplyGradientsHeader(
        model_id="bad-frame", step=0, data_plane_session=response.session_id, data_plane_sequence=1
    )
    with pytest.raises(Exception) as refused:
        stub.ApplyGradientsUnary(pb.ApplyGradientsRequest(header=header), timeout=10)
    assert "does not know" in str(refused.value)


def test_a_broken_connection_falls_back_to_grpc_and_loses_nothing(address):
    expected = _train(address, "unbroken", False)["returned"]
    with Client(address, shared_memory=False) as client:
        client.create_model("broken", ADAM, variables())
        for step in range(4):
            if step == 2:  # the connection dies between two pushes
                client.transport.data_plane._segments[("broken", 0)].connection.shutdown(socket.SHUT_RDWR)
            _, values = client.push_pull("broken", gradients(step))
        assert _over_data_plane(client, "broken")  # reopened after the fallback
    for name in SHAPES:
        np.testing.assert_array_equal(values[name], expected[name], strict=True)


def test_a_server_without_a_data_plane_is_served_over_grpc():
    with start_server(host="127.0.0.1", port=0, device="cpu", data_plane=False) as running:
        address = f"127.0.0.1:{running.port}"
        with Client(address, shared_memory=False) as client:
            client.create_model("plain", ADAM, variables())
            _, values = client.push_pull("plain", gradients(0))
            assert not _over_data_plane(client, "plain")
            assert not client.transport.data_plane.available  # asked once, then never again
            _, stub = rpc_helpers.connect(address)
            with pytest.raises(Exception) as refused:
                _open(stub, "plain")
            assert "no data plane" in str(refused.value)
    assert set(values) == set(SHAPES)


def test_sessions_end_with_their_model(server, address):
    plane = server._server._servicer.data_plane
    with Client(address, shared_memory=False) as client:
        client.create_model("short-lived", ADAM, variables())
        client.push_pull("short-lived", gradients(0))
        assert any(s.model_id == "short-lived" for s in list(plane._sessions.values()))
        client.delete_model("short-lived")
        client.create_model("next", ADAM, variables())
        client.push_pull("next", gradients(0))  # opening a session sweeps those of closed models
        assert not any(s.model_id == "short-lived" for s in list(plane._sessions.values()))
    with pytest.raises(InvalidArgumentError):
        with Client(address, shared_memory=False) as client:
            client.push_pull("next", {"w": np.ones((3, 3), np.float32)})  # a wrong shape: gRPC words it


def test_a_fixed_data_port_is_used_and_a_taken_one_is_named():
    probe = socket.socket()
    probe.bind(("127.0.0.1", 0))
    port = probe.getsockname()[1]
    probe.close()
    with start_server(host="127.0.0.1", port=0, device="cpu", data_port=port) as running:
        assert running._server.data_port == port
        with Client(f"127.0.0.1:{running.port}", shared_memory=False) as client:
            client.create_model("fixed", ADAM, variables())
            client.push_pull("fixed", gradients(0))
            assert _over_data_plane(client, "fixed")
        with pytest.raises(OSError, match="--data-port"):
            start_server(host="127.0.0.1", port=0, device="cpu", data_port=port)


def test_a_frame_is_checked_for_nan_as_it_arrives_and_a_non_finite_push_changes_nothing(address):
    with Client(address, shared_memory=False) as client:
        client.create_model("checked", ADAM, variables())
        client.push("checked", gradients(0))
        bad = gradients(1)
        bad["w"][-1, -1] = np.inf  # in the last piece of the frame
        with pytest.raises(InvalidArgumentError, match="NaN or infinite values in 'w'"):
            client.push("checked", bad)
        huge = gradients(1)
        huge["w"][:4] = 3e38  # finite, though their squares overflow: the exact check lets them through
        assert client.push("checked", huge).step == 2
        assert _over_data_plane(client, "checked")
        assert client.list_models("checked")[0].step == 2


def test_a_refused_large_push_keeps_its_connection_for_the_next(address):
    with Client(address, shared_memory=False) as client:
        client.create_model("refused-large", ADAM, variables())
        client.push("refused-large", gradients(0))
        connection = client.transport.data_plane._segments[("refused-large", 0)]
        with pytest.raises(OptserveError) as ahead:
            client.push("refused-large", gradients(1), step=7)  # its frame arrived; its step is refused
        assert ahead.value.code == "FAILED_PRECONDITION" and ahead.value.details["current_step"] == "1"
        _, values = client.push_pull("refused-large", gradients(1))
        assert client.transport.data_plane._segments[("refused-large", 0)] is connection  # the same connection
        assert set(values) == set(SHAPES) and client.list_models("refused-large")[0].step == 2
