"""Small pushes sent whole on the data plane (request frames): parity, errors, binding, auth, metrics, flow."""

from __future__ import annotations

import socket
import threading
import urllib.request

import numpy as np
import pytest
import rpc_helpers

from optserve.client import Client, InvalidArgumentError, NotFoundError
from optserve.client import data_plane as data_plane_client
from optserve.protos import frames, tensors
from optserve.protos import optserve_pb2 as pb
from optserve.protos.errors import OptserveError
from optserve.server import auth
from optserve.server.app import start_server
from optserve.server.limits import Limits

ADAM = {"class_name": "Adam", "config": {"learning_rate": 0.01}}
SHAPES = {"w": (32, 16), "b": (16,)}  # a few KB: one gRPC message


def variables() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    return {name: rng.standard_normal(shape).astype(np.float32) for name, shape in SHAPES.items()}


def gradients(step: int, worker: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(1000 * step + worker)
    return {name: rng.standard_normal(shape).astype(np.float32) for name, shape in SHAPES.items()}


class FrameCounter:
    """Counts the request frames a client sends (and fails the test if a push fell back to gRPC)."""

    def __init__(self, monkeypatch):
        self.frames = 0
        original = data_plane_client.DataConnection.request

        def counted(connection, payload, timeout, values_of=None):
            self.frames += 1
            return original(connection, payload, timeout, values_of)

        monkeypatch.setattr(data_plane_client.DataConnection, "request", counted)


def _train(address: str, model_id: str, data_plane: bool, steps: int = 4) -> dict[str, dict]:
    with Client(address, shared_memory=False, data_plane=data_plane) as client:
        client.create_model(model_id, ADAM, variables())
        returned: dict[str, np.ndarray] = {}
        for step in range(steps):
            _, returned = client.push_pull(model_id, gradients(step))
        client.push(model_id, gradients(steps))
        _, pulled = client.pull(model_id)
    return {"returned": returned, "pulled": pulled}


def test_small_pushes_travel_as_frames_and_give_grpcs_numbers(address, monkeypatch):
    wired = _train(address, "small-grpc", data_plane=False)
    counter = FrameCounter(monkeypatch)
    framed = _train(address, "small-framed", data_plane=True)
    assert counter.frames == 5  # four push_pulls and a push, none over gRPC
    for kind in ("returned", "pulled"):
        for name in SHAPES:
            np.testing.assert_array_equal(framed[kind][name], wired[kind][name], strict=True)


def test_a_wrong_push_is_refused_as_over_grpc_and_changes_nothing(address, monkeypatch):
    with Client(address, shared_memory=False) as client:
        client.create_model("refused", ADAM, variables())
        client.push("refused", gradients(0))
        counter = FrameCounter(monkeypatch)
        with pytest.raises(InvalidArgumentError, match="Gradient for 'w' has"):
            client.push("refused", {"w": np.ones((3, 3), np.float32)})
        with pytest.raises(NotFoundError, match="no variable 'nope'"):
            client.push("refused", {"nope": np.ones(3, np.float32)})
        bad = gradients(1)
        bad["b"][0] = np.nan
        with pytest.raises(InvalidArgumentError, match="NaN or infinite"):
            client.push("refused", bad)
        assert counter.frames == 3
        assert client.list_models("refused")[0].step == 1
        with pytest.raises(OptserveError) as mismatch:
            client.push("refused", gradients(5), step=5)
        assert mismatch.value.code == "FAILED_PRECONDITION" and mismatch.value.details["current_step"] == "1"


def test_sync_workers_meet_through_frames(address, monkeypatch):
    counter = FrameCounter(monkeypatch)
    with Client(address, shared_memory=False) as admin:
        admin.create_model("sync-framed", ADAM, variables(), num_workers=2)
    returned: dict[int, dict] = {}

    def work(worker: int) -> None:
        with Client(address, shared_memory=False) as client:
            for step in range(3):
                _, returned[worker] = client.push_pull("sync-framed", gradients(step, worker), worker_index=worker)

    threads = [threading.Thread(target=work, args=(worker,)) for worker in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert set(returned) == {0, 1} and counter.frames == 6
    with Client(address, shared_memory=False, data_plane=False) as client:
        assert client.list_models("sync-framed")[0].step == 3
        _, pulled = client.pull("sync-framed")
    for name in SHAPES:
        np.testing.assert_array_equal(returned[0][name], returned[1][name])
        np.testing.assert_array_equal(returned[0][name], pulled[name])


def _session(address: str, stub, model_id: str, worker: int = 0, frames_only: bool = False):
    """A data connection: with ``frames_only`` read by the server's event loop, else by a reader thread."""
    request = pb.OpenDataPlaneRequest(model_id=model_id, worker_index=worker, frames_only=frames_only)
    response = stub.OpenDataPlane(request, timeout=10)
    return data_plane_client.DataConnection(address.rsplit(":", 1)[0], response, None)


def _request(model_id: str, worker: int, step: int, arrays: dict[str, np.ndarray], aggregated=False) -> bytes:
    header = pb.ApplyGradientsHeader(
        model_id=model_id, worker_index=worker, step=step, num_gradients=len(arrays), aggregated=aggregated
    )
    listed = [(name, "", array) for name, array in arrays.items()]
    (message,) = tensors.serialized_chunk_messages(pb.ApplyGradientsRequest(header=header), "gradients", listed)
    return message


def _status(flags: int, answer: bytes, values=None) -> pb.DataPlaneStatus:
    assert flags & frames.STATUS
    return pb.DataPlaneStatus.FromString(answer)


READERS = pytest.mark.parametrize("frames_only", [False, True], ids=["reader-thread", "event-loop"])


@READERS
def test_a_session_pushes_only_for_its_own_model_and_worker(address, stub, frames_only):
    with Client(address, shared_memory=False) as admin:
        admin.create_model(f"bound-{frames_only}", ADAM, variables(), num_workers=2)
        admin.create_model(f"other-{frames_only}", ADAM, variables())
    bound, other = f"bound-{frames_only}", f"other-{frames_only}"
    connection = _session(address, stub, bound, worker=0, frames_only=frames_only)
    for model_id, worker in ((bound, 1), (other, 0)):
        status = _status(*connection.request(_request(model_id, worker, 0, gradients(0)), 10))
        assert status.code == "INVALID_ARGUMENT" and f"serves worker 0 of model '{bound}'" in status.message
    undecodable = _status(*connection.request(b"\xff\xff\xff", 10))
    assert undecodable.code == "INVALID_ARGUMENT" and "could not be decoded" in undecodable.message
    flags, answer, _ = connection.request(_request(bound, 0, 0, gradients(0), aggregated=True), 10)
    assert not flags & frames.STATUS
    assert pb.ApplyGradientsResponse.FromString(answer).result.step == 1  # the push completed step 0
    connection.close()


@READERS
def test_a_request_frame_over_the_message_limit_ends_the_session(frames_only):
    with start_server(host="127.0.0.1", port=0, device="cpu", limits=Limits(max_message_bytes=64 * 1024)) as running:
        with Client(running.address, shared_memory=False) as admin:
            admin.create_model("limited", ADAM, variables())
        _, stub = rpc_helpers.connect(running.address)
        connection = _session(running.address, stub, "limited", frames_only=frames_only)
        frames.send_frame(connection.connection, 1, bytes(64 * 1024 + 1), frames.REQUEST)
        assert connection.connection.recv(1) == b""  # closed, nothing read into the model
        connection.close()


@READERS
def test_a_worker_that_never_reads_its_answers_blocks_nobody(address, stub, frames_only):
    big = {"w": np.zeros(200_000, np.float32)}  # 800 KB: one message, and an answer as large
    unread, bystander = f"unread-{frames_only}", f"bystander-{frames_only}"
    with Client(address, shared_memory=False) as admin:
        admin.create_model(unread, "sgd", big)
        admin.create_model(bystander, ADAM, variables())
    connection = _session(address, stub, unread, frames_only=frames_only)
    connection.connection.settimeout(2)  # the server stops reading once its answers pile up unread
    for step in range(40):  # far more than the socket buffers hold; no answer is read
        header = pb.ApplyGradientsHeader(model_id=unread, step=step, return_variables=True, num_gradients=1)
        (message,) = tensors.serialized_chunk_messages(
            pb.ApplyGradientsRequest(header=header), "gradients", [("w", "", big["w"])]
        )
        try:
            frames.send_frame(connection.connection, step + 1, message, frames.REQUEST)
        except OSError:
            break
    # A blocked event loop would leave these pushes unanswered: their deadline would raise.
    with Client(address, shared_memory=False, timeout=20, retries=0) as client:
        for step in range(3):
            assert client.push_pull(bystander, gradients(step))[0].step == step + 1
    connection.close()


def _answers(connection, count: int) -> list[tuple[int, int, bytes]]:
    """(sequence, flags, payload) of the next ``count`` frames on a data connection."""
    received = []
    for _ in range(count):
        header = bytearray(frames.HEADER.size)
        assert frames.receive_exactly(connection, memoryview(header))
        _, sequence, nbytes, flags = frames.HEADER.unpack(header)
        received.append((sequence, flags, frames.receive_frame_payload(connection, nbytes)))
    return received


@READERS
def test_request_frames_sent_ahead_or_in_pieces_are_answered_in_order(address, stub, frames_only):
    model_id = f"pieces-{frames_only}"
    with Client(address, shared_memory=False) as admin:
        admin.create_model(model_id, ADAM, variables())
    connection = _session(address, stub, model_id, frames_only=frames_only)
    raw = connection.connection
    raw.settimeout(10)
    messages = [_request(model_id, 0, step, gradients(step), aggregated=True) for step in range(4)]
    wire = b"".join(frames.header(n + 1, len(message), frames.REQUEST) + message for n, message in enumerate(messages))
    # Three frames at once, then the fourth one byte at a time: each is answered, in order.
    cut = len(wire) * 3 // 4
    cut = wire.index(frames.MAGIC, cut - 1)
    raw.sendall(wire[:cut])
    for byte in wire[cut:]:
        raw.sendall(bytes([byte]))
    answers = _answers(raw, 4)
    assert [sequence for sequence, _, _ in answers] == [1, 2, 3, 4]
    assert [pb.ApplyGradientsResponse.FromString(payload).result.step for _, _, payload in answers] == [1, 2, 3, 4]
    connection.close()
    with Client(address, shared_memory=False, data_plane=False) as client:
        _, pulled = client.pull(model_id)
    with Client(address, shared_memory=False, data_plane=False) as reference:
        reference.create_model(f"{model_id}-ref", ADAM, variables())
        for step in range(4):
            reference.push(f"{model_id}-ref", gradients(step), aggregated=True)
        _, expected = reference.pull(f"{model_id}-ref")
    for name, value in expected.items():
        np.testing.assert_array_equal(pulled[name], value)


def test_a_frame_that_is_not_a_request_ends_a_frames_only_session(address, stub):
    with Client(address, shared_memory=False) as admin:
        admin.create_model("not-a-request", ADAM, variables())
    connection = _session(address, stub, "not-a-request", frames_only=True)
    connection.connection.settimeout(10)
    connection.connection.sendall(frames.header(1, 8) + bytes(8))  # a gradient frame: this session has none
    assert connection.connection.recv(1) == b""
    connection.close()
    with Client(address, shared_memory=False) as client:  # the worker opens a new session and goes on
        assert client.push_pull("not-a-request", gradients(0))[0].step == 1


def test_a_frames_only_session_read_by_the_event_loop_ends_when_a_newer_one_opens(address, stub):
    with Client(address, shared_memory=False) as admin:
        admin.create_model("replaced", ADAM, variables())
    old = _session(address, stub, "replaced", frames_only=True)
    flags, _, _ = old.request(_request("replaced", 0, 0, gradients(0)), 10)
    assert not flags & frames.STATUS
    new = _session(address, stub, "replaced", frames_only=True)  # the same worker again
    old.connection.settimeout(10)
    assert old.connection.recv(1) == b""  # the server stopped reading it and closed it
    flags, answer, _ = new.request(_request("replaced", 0, 1, gradients(1)), 10)
    assert pb.ApplyGradientsResponse.FromString(answer).result.step == 2
    old.close()
    new.close()


def _token_server(tmp_path, names: dict[str, tuple[str, str, str]]):
    path = tmp_path / "tokens.txt"
    secrets, lines = {}, []
    for name, (role, models, rights) in names.items():
        secrets[name], line = auth.new_token_line(name, role, models, rights)
        lines.append(line)
    path.write_text("\n".join(lines) + "\n")
    return path, secrets, lines


def test_frames_act_as_the_caller_that_opened_the_session_and_end_with_its_token(tmp_path, monkeypatch):
    principals = {"root": ("admin", "*", ""), "worker": ("worker", "team/*", "")}
    path, secrets, lines = _token_server(tmp_path, principals)
    with start_server(host="127.0.0.1", port=0, device="cpu", auth_tokens=path) as running:
        with Client(running.address, token=secrets["root"], shared_memory=False) as admin:
            admin.create_model("team/m", ADAM, variables())
        counter = FrameCounter(monkeypatch)
        with Client(running.address, token=secrets["worker"], shared_memory=False, retries=0) as worker:
            worker.push("team/m", gradients(0), step=0)
            with pytest.raises(OptserveError, match="aggregate right") as refused:
                worker.push("team/m", gradients(1), step=1, aggregated=True)
            assert refused.value.code == "PERMISSION_DENIED"
            assert counter.frames == 2
            path.write_text(lines[0] + "\n")  # the worker's token is revoked
            assert running.reload_auth() is True
            with pytest.raises(OptserveError) as revoked:
                worker.push("team/m", gradients(1), step=1)
            assert revoked.value.code == "UNAUTHENTICATED"
            assert counter.frames == 3  # refused on the data plane, then by gRPC's own check
        with Client(running.address, token=secrets["root"], shared_memory=False, data_plane=False) as admin:
            assert admin.list_models("team/m")[0].step == 1  # nothing of the refused pushes was applied


def test_frames_are_counted_as_apply_gradients_unary_calls(tmp_path):
    with start_server(host="127.0.0.1", port=0, device="cpu", metrics_port=0) as running:
        with Client(running.address, shared_memory=False) as client:
            client.create_model("counted", ADAM, variables())
            for step in range(3):
                client.push_pull("counted", gradients(step))
            with pytest.raises(InvalidArgumentError):
                client.push("counted", {"w": np.ones(2, np.float32)})
            assert ("counted", 0) in client.transport.data_plane._segments
        text = urllib.request.urlopen(f"http://127.0.0.1:{running.metrics_port}/metrics", timeout=10).read().decode()
    handled = {
        line.split('grpc_code="')[1].split('"')[0]: float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line.startswith("optserve_rpc_handled_total") and 'method="ApplyGradientsUnary"' in line
    }
    assert handled.get("OK") == 3 and handled.get("INVALID_ARGUMENT") == 1


def test_a_push_whose_connection_died_goes_over_grpc(address):
    expected = _train(address, "framed-unbroken", data_plane=False)["returned"]
    with Client(address, shared_memory=False) as client:
        client.create_model("framed-broken", ADAM, variables())
        for step in range(4):
            if step == 2:
                client.transport.data_plane._segments[("framed-broken", 0)].connection.shutdown(socket.SHUT_RDWR)
            _, values = client.push_pull("framed-broken", gradients(step))
        assert ("framed-broken", 0) in client.transport.data_plane._segments  # reopened
    for name in SHAPES:
        np.testing.assert_array_equal(values[name], expected[name], strict=True)


def test_a_session_for_frames_only_sets_no_memory_aside_and_a_large_push_replaces_it(server, address):
    plane = server._server._servicer.data_plane
    shapes = {"kernel": (512, 600), "bias": (600,)}  # 1.2 MB: a whole push is larger than one message
    start = {name: np.zeros(shape, np.float32) for name, shape in shapes.items()}
    whole = {name: np.ones(shape, np.float32) for name, shape in shapes.items()}
    with Client(address, shared_memory=False) as client:
        client.create_model("partial", "sgd", start)

        def session():
            (found,) = [s for s in list(plane._sessions.values()) if s.model_id == "partial"]
            return found

        client.push("partial", {"bias": np.ones(600, np.float32)})  # one small variable: a request frame
        assert session().frames_only and session().payload_bytes == 0 and not session().gradients
        client.push("partial", whole)  # a gradient frame: a session with the model's arrays replaces it
        assert not session().frames_only and session().payload_bytes == sum(a.nbytes for a in whole.values())
        full = session()
        _, values = client.push_pull("partial", {"bias": np.ones(600, np.float32)})  # small again: same session
        assert session() is full
    np.testing.assert_array_equal(values["bias"], np.full(600, -0.03, np.float32))
    np.testing.assert_array_equal(values["kernel"], np.full((512, 600), -0.01, np.float32))


def test_a_shared_memory_push_sends_its_header_as_a_frame(address, monkeypatch):
    shapes = {"kernel": (256, 300), "bias": (300,)}  # 300 KB: shared memory's size
    start = {name: np.full(shape, 0.5, np.float32) for name, shape in shapes.items()}
    rng = np.random.default_rng(3)
    steps = [{name: rng.standard_normal(shape).astype(np.float32) for name, shape in shapes.items()} for _ in range(3)]
    results = {}
    counter = FrameCounter(monkeypatch)
    for label, options in {"shared": {}, "grpc": {"shared_memory": False, "data_plane": False}}.items():
        with Client(address, **options) as client:
            client.create_model(f"header-{label}", ADAM, start)
            for gradients_of_step in steps:
                _, results[label] = client.push_pull(f"header-{label}", gradients_of_step)
            if label == "shared":
                assert ("header-shared", 0) in client.transport.shared_memory._segments
                assert counter.frames == 3  # every push's header, none as a gRPC call
                # The data connection dies: the header goes over gRPC, the push over shared memory.
                client.transport.data_plane._segments[("header-shared", 0)].connection.shutdown(socket.SHUT_RDWR)
                assert client.push("header-shared", steps[0]).step == 4
                assert counter.frames == 4
    for name in shapes:
        np.testing.assert_array_equal(results["shared"][name], results["grpc"][name], strict=True)


def test_a_worker_parked_in_a_step_hears_the_server_shut_down_even_when_grpc_is_gone_first(monkeypatch):
    """The server answers a parked push's frame with UNAVAILABLE as it stops. The push then tries
    gRPC (whose retries may find a restarted server); if gRPC finds the server gone too, the error is
    what the server said, not gRPC's "failed to connect"."""
    from optserve.client import UnavailableError

    running = start_server(host="127.0.0.1", port=0, device="cpu")
    try:
        with Client(running.address) as one, Client(running.address, retries=0) as two:
            one.create_model("parked", ADAM, variables(), num_workers=2)
            # Step 0 together (it opens worker 1's data connection), then worker 1 alone in step 1.
            first = threading.Thread(target=two.push, args=("parked", gradients(0, 1)), kwargs={"worker_index": 1})
            first.start()
            one.push("parked", gradients(0, 0), worker_index=0, step=0)
            first.join(15)

            def gone(*args, **kwargs):
                raise UnavailableError("failed to connect to all addresses; Connection refused")

            failures: list = []
            parked = threading.Thread(
                target=lambda: failures.append(
                    pytest.raises(UnavailableError, two.push, "parked", gradients(1, 1), worker_index=1, step=1)
                )
            )
            parked.start()
            rpc_helpers.wait_until(lambda: one.list_models("parked")[0].waiting_workers == [1])
            monkeypatch.setattr(two.transport, "_call", gone)  # gRPC is gone before the answer arrives
            running.stop()
            parked.join(15)
    finally:
        running.stop()
    assert failures and "shutting down" in str(failures[0].value)
