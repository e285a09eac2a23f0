"""The plain Python client against a real server (and a fake one for failures a real one never shows)."""

from __future__ import annotations

import concurrent.futures
import socket
import subprocess
import sys
import threading
import time

import grpc
import numpy as np
import pytest

from optserve.client import (
    AlreadyExistsError,
    Client,
    DeadlineExceededError,
    FailedPreconditionError,
    InvalidArgumentError,
    NotFoundError,
    OptserveError,
    StepMismatchError,
    UnavailableError,
)
from optserve.client.client import error_from_rpc, optimizer_config_json
from optserve.protos import optserve_pb2 as pb
from optserve.protos import optserve_pb2_grpc as pb_grpc
from optserve.protos import tensors

SGD = {"class_name": "SGD", "config": {"learning_rate": 0.5}}


def _variables():
    return {
        "dense/kernel": np.arange(6, dtype=np.float32).reshape(2, 3) / 10,
        "dense/bias": np.zeros(3, np.float32),
    }


def _ones_like(values):
    return {name: np.ones_like(value) for name, value in values.items()}


@pytest.fixture
def client(address):
    with Client(address, timeout=30) as c:
        yield c


# ------------------------------------------------------------------ import hygiene and arguments


def test_importing_the_client_imports_no_server_keras_or_cupy():
    code = (
        "import sys, optserve.client\n"
        "heavy = sorted(m for m in sys.modules if m.split('.')[0] in ('keras', 'cupy', 'jax', 'torch')"
        " or m.startswith('optserve.server'))\n"
        "print(heavy)\n"
    )
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip() == "[]"


@pytest.mark.parametrize("address", ["", "localhost", ":50051", "host:port"])
def test_malformed_address(address):
    with pytest.raises(ValueError, match="host:port"):
        Client(address)


def test_one_address_in_a_list_is_fine():
    with Client(["127.0.0.1:1"]) as c:
        assert c.address == "127.0.0.1:1"


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(num_workers=0), "`num_workers` must be an integer >= 1"),
        (dict(mode="eventual"), "`mode` must be one of 'sync', 'async'. Received: mode='eventual'"),
        (dict(timeout_policy="retry"), "`timeout_policy` must be one of"),
        (dict(sync_timeout_s=-1.0), "`sync_timeout_s` must be a number >= 0"),
    ],
)
def test_create_model_arguments_are_checked_before_sending(kwargs, message):
    with Client("127.0.0.1:1", retries=0) as c:  # nothing listens there: a send would fail differently
        with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
            c.create_model("m", "adam", _variables(), **kwargs)


def test_unsupported_gradient_dtype_fails_before_sending():
    with Client("127.0.0.1:1", retries=0) as c:
        with pytest.raises(ValueError, match=r"grads\['w'\].*Unsupported dtype 'complex64'"):
            c.push("m", {"w": np.zeros(2, np.complex64)}, step=0)


def test_optimizer_config_forms():
    assert optimizer_config_json("adam") == '"adam"'
    assert '"class_name": "SGD"' in optimizer_config_json(SGD)
    with pytest.raises(ValueError, match="'class_name'"):
        optimizer_config_json({"learning_rate": 0.1})

    class Custom:
        def get_config(self):
            return {"learning_rate": np.float32(0.25)}

    text = optimizer_config_json(Custom())
    assert '"class_name": "Custom"' in text and '"learning_rate": 0.25' in text


# ------------------------------------------------------------------ models


def test_create_join_conflict_list_delete(client):
    info = client.create_model("m", SGD, _variables(), num_workers=2, sync_timeout_s=5.0)
    assert info.created is True
    assert (info.model_id, info.optimizer, info.mode, info.num_workers) == ("m", "SGD", "sync", 2)
    assert (info.step, info.iterations, info.learning_rate) == (0, 0, 0.5)
    assert [(v.name, v.shape, v.dtype) for v in info.variables] == [
        ("dense/kernel", (2, 3), "float32"),
        ("dense/bias", (3,), "float32"),
    ]
    assert client.create_model("m", SGD, _variables(), num_workers=2, sync_timeout_s=5.0).created is False
    with pytest.raises(AlreadyExistsError, match="num_workers"):
        client.create_model("m", SGD, _variables(), num_workers=3)

    listed = client.list_models(with_stats=True)
    assert [m.model_id for m in listed] == ["m"]
    norms = {v.name: v.norm for v in listed[0].variables}
    assert norms["dense/kernel"] == pytest.approx(np.linalg.norm(_variables()["dense/kernel"]))
    assert client.list_models()[0].variables[0].norm is None

    assert client.delete_model("m") is True
    assert client.list_models() == []


@pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")  # inside keras
def test_optimizer_given_as_keras_object_name_and_dict(client):
    keras = pytest.importorskip("keras")
    forms = {
        "from-object": keras.optimizers.Adam(learning_rate=0.003),
        "from-serialized": keras.optimizers.serialize(keras.optimizers.Adam(learning_rate=0.003)),
        "from-name": "adam",
    }
    for model_id, optimizer in forms.items():
        info = client.create_model(model_id, optimizer, _variables())
        assert info.optimizer.lower() == "adam"
        assert [v.slots for v in info.variables] == [["momentum", "velocity"]] * 2
    assert client.list_models("from-object")[0].learning_rate == pytest.approx(0.003)
    assert client.list_models("from-name")[0].learning_rate == pytest.approx(0.001)


def test_health(client):
    assert client.health() == "SERVING"


# ------------------------------------------------------------------ pushes and step tracking


def test_push_pull_and_step_tracking(client):
    client.create_model("m", SGD, _variables())
    grads = _ones_like(_variables())
    first = client.push("m", grads)
    assert (first.step, first.iterations, first.duplicate, first.contributors) == (1, 1, False, [0])
    result, values = client.push_pull("m", grads)  # step=None: the client pushes step 1 now
    assert result.step == 2
    np.testing.assert_allclose(values["dense/kernel"], _variables()["dense/kernel"] - 2 * 0.5)
    state, pulled = client.pull("m", names=["dense/bias"])
    assert state.step == 2 and list(pulled) == ["dense/bias"]
    np.testing.assert_allclose(pulled["dense/bias"], -1.0)


def test_a_repeated_push_is_not_applied_twice(client):
    client.create_model("m", SGD, _variables())
    grads = _ones_like(_variables())
    client.push("m", grads, step=0)
    again, values = client.push_pull("m", grads, step=0)
    assert again.duplicate is True and again.step == 1
    np.testing.assert_allclose(values["dense/bias"], -0.5)


def test_none_gradients_leave_their_variable_alone(client):
    client.create_model("m", SGD, _variables())
    _, values = client.push_pull("m", {"dense/kernel": None, "dense/bias": np.ones(3, np.float32)})
    np.testing.assert_array_equal(values["dense/kernel"], _variables()["dense/kernel"])
    np.testing.assert_allclose(values["dense/bias"], -0.5)


def test_sync_step_sums_the_workers_gradients(client):
    client.create_model("m", SGD, _variables(), num_workers=2, sync_timeout_s=20.0)
    grads = _ones_like(_variables())
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        futures = [pool.submit(client.push_pull, "m", grads, worker_index=w) for w in (0, 1)]
        results = [f.result(timeout=30) for f in futures]
    for result, values in results:
        assert result.step == 1 and result.contributors == [0, 1]
        np.testing.assert_allclose(values["dense/bias"], -2 * 0.5)
    assert client.next_step("m", 0) == client.next_step("m", 1) == 1


def test_aggregated_push_is_applied_once_without_waiting(client):
    client.create_model("m", SGD, _variables(), num_workers=2, sync_timeout_s=20.0)
    result, values = client.push_pull("m", _ones_like(_variables()), aggregated=True)
    assert result.step == 1 and result.iterations == 1
    np.testing.assert_allclose(values["dense/bias"], -0.5)


def test_async_mode_applies_every_push(client):
    client.create_model("m", SGD, _variables(), num_workers=2, mode="async")
    client.push("m", _ones_like(_variables()), worker_index=0)
    result, values = client.push_pull("m", _ones_like(_variables()), worker_index=1)
    assert result.iterations == 2 and result.contributors == [1]
    np.testing.assert_allclose(values["dense/bias"], -1.0)


def test_apply_partial_reports_the_missing_workers(client):
    client.create_model("m", SGD, _variables(), num_workers=3, sync_timeout_s=0.3, timeout_policy="apply_partial")
    result = client.push("m", _ones_like(_variables()), worker_index=1)
    assert (result.step, result.contributors, result.missing_workers) == (1, [1], [0, 2])


def test_step_mismatch_is_raised_not_skipped_and_resync_adopts_the_server_step(client, address):
    client.create_model("m", SGD, _variables())
    with pytest.raises(StepMismatchError) as caught:
        client.push("m", _ones_like(_variables()), step=7)
    error = caught.value
    assert isinstance(error, FailedPreconditionError)
    assert (error.current_step, error.step, error.worker_index, error.model_id) == (0, 7, 0, "m")
    assert "resync" in str(error)

    # Another client moves the model on; this one's tracked step is now stale.
    with Client(address) as other:
        other.push("m", _ones_like(_variables()), step=0)
        other.push("m", _ones_like(_variables()), step=1)
    client.pull("m")  # learn step 2 ...
    client.steps.record_worker_step("m", 0, 5)  # ... then pretend this worker lost track
    with pytest.raises(StepMismatchError) as caught:
        client.push("m", _ones_like(_variables()))
    assert caught.value.current_step == 2
    assert client.next_step("m", 0) == 5, "the client must not adopt the server's step by itself"
    assert client.resync("m", 0) == 2
    assert client.push("m", _ones_like(_variables())).step == 3


def test_next_step_asks_the_server_for_an_unknown_model(client, address):
    client.create_model("m", SGD, _variables())
    client.push("m", _ones_like(_variables()))
    with Client(address) as fresh:
        assert fresh.next_step("m", 0) == 1
        assert fresh.push("m", _ones_like(_variables())).step == 2


def test_sync_step_timeout_is_a_deadline_error_naming_the_missing_worker(client):
    client.create_model("m", SGD, _variables(), num_workers=2, sync_timeout_s=0.3)
    with pytest.raises(DeadlineExceededError, match=r"workers \[1\]") as caught:
        client.push("m", _ones_like(_variables()), worker_index=0)
    assert isinstance(caught.value, TimeoutError)
    assert caught.value.details["missing_workers"] == "1"
    assert client.pull("m")[0].iterations == 0


def test_call_level_timeout_bounds_a_waiting_push(client):
    client.create_model("m", SGD, _variables(), num_workers=2, sync_timeout_s=30.0)
    started = time.monotonic()
    with pytest.raises(DeadlineExceededError):
        client.push("m", _ones_like(_variables()), worker_index=0, timeout=0.3)
    assert time.monotonic() - started < 25  # the client's deadline, not the server's 30 s step timeout


# ------------------------------------------------------------------ optimizer state


def test_get_and_set_weights(client):
    client.create_model("m", {"class_name": "Adam", "config": {"learning_rate": 0.1}}, _variables())
    client.push("m", _ones_like(_variables()))
    weights = client.get_weights("m", include_variables=True)
    assert (weights.iterations, weights.raw_iterations, weights.step) == (1, 1, 1)
    assert list(weights.slots) == ["dense/kernel", "dense/bias"]
    assert list(weights.slots["dense/kernel"]) == ["momentum", "velocity"]
    np.testing.assert_allclose(weights.slots["dense/bias"]["momentum"], 0.1)  # (1 - beta_1) * g
    assert set(weights.variables) == set(_variables())
    as_list = weights.as_list()
    assert len(as_list) == 5 and int(as_list[0]) == 1 and as_list[0].dtype == np.int64

    only_bias = client.get_weights("m", names=["dense/bias"])
    assert list(only_bias.slots) == ["dense/bias"] and only_bias.variables == {}

    new_momentum = np.full(3, 7.0, np.float32)
    state = client.set_weights(
        "m",
        slots={"dense/bias": {"momentum": new_momentum}},
        variables={"dense/bias": np.full(3, 2.0, np.float32)},
        iterations=10,
    )
    assert state.iterations == 10 and state.step == 1
    after = client.get_weights("m", include_variables=True)
    np.testing.assert_array_equal(after.slots["dense/bias"]["momentum"], new_momentum)
    np.testing.assert_array_equal(after.variables["dense/bias"], 2.0)
    np.testing.assert_array_equal(after.slots["dense/kernel"]["momentum"], weights.slots["dense/kernel"]["momentum"])


def test_set_weights_rejects_unknown_slot_and_changes_nothing(client):
    client.create_model("m", "adam", _variables())
    before = client.get_weights("m", include_variables=True)
    with pytest.raises(NotFoundError, match="no slot 'nope'"):
        client.set_weights(
            "m",
            slots={"dense/bias": {"nope": np.zeros(3, np.float32)}},
            variables={"dense/bias": np.ones(3, np.float32)},
        )
    after = client.get_weights("m", include_variables=True)
    np.testing.assert_array_equal(after.variables["dense/bias"], before.variables["dense/bias"])


def test_set_weights_list_round_trip(client):
    client.create_model("m", "adam", _variables())
    client.push("m", _ones_like(_variables()))
    weights = client.get_weights("m").as_list()
    doubled = [weights[0] + 4] + [w * 2 for w in weights[1:]]
    state = client.set_weights_list("m", doubled)
    assert state.iterations == 5
    for got, want in zip(client.get_weights("m").as_list(), doubled):
        np.testing.assert_allclose(got, want)


@pytest.mark.parametrize(
    "mutate, message",
    [
        (lambda w: w[:-1], r"expects 5 weights \(\[iterations\] \+ 4 slots\); received 4"),
        (lambda w: w + [w[-1]], "received 6"),
        (
            lambda w: [w[0], w[1].T, *w[2:]],
            r"weights\[1\] \(slot 'momentum' of variable 'dense/kernel'\) "
            r"has shape \(3, 2\); expected \(2, 3\)",
        ),
        (lambda w: [np.zeros(2), *w[1:]], r"weights\[0\] must be the iterations counter"),
    ],
)
def test_set_weights_list_is_checked_locally_and_sends_nothing(client, monkeypatch, mutate, message):
    client.create_model("m", "adam", _variables())
    weights = client.get_weights("m").as_list()
    sent = []
    monkeypatch.setattr(client.transport, "set_weights", lambda *a, **k: sent.append(a))
    with pytest.raises(ValueError, match=message) as caught:
        client.set_weights_list("m", mutate(weights))
    assert isinstance(caught.value, InvalidArgumentError)
    assert sent == []


# ------------------------------------------------------------------ errors


def test_server_errors_map_to_client_exceptions(client):
    with pytest.raises(NotFoundError) as caught:
        client.pull("missing")
    assert isinstance(caught.value, KeyError) and caught.value.code == "NOT_FOUND"
    assert "'missing'" in str(caught.value) and not str(caught.value).startswith(('"', "'"))  # no KeyError quoting

    client.create_model("m", SGD, _variables())
    with pytest.raises(InvalidArgumentError, match="has shape \\[2\\] float32") as caught:
        client.push("m", {"dense/bias": np.ones(2, np.float32)})
    assert isinstance(caught.value, ValueError)
    with pytest.raises(NotFoundError, match="no variable 'nope'"):
        client.push("m", {"nope": np.ones(2, np.float32)})
    assert client.pull("m")[0].step == 0  # rejected pushes changed nothing
    with pytest.raises(InvalidArgumentError, match="optimizer"):
        client.create_model("bad", {"class_name": "NoSuchOptimizer", "config": {}}, _variables())


def test_closed_client_refuses_calls(address):
    c = Client(address)
    c.close()
    with pytest.raises(ValueError, match="closed"):
        c.list_models()


# ------------------------------------------------------------------ large tensors


def test_push_pull_of_a_64_mib_tensor(client):
    n = 16 << 20  # float32: 64 MiB, as big as a whole gRPC message may be
    client.create_model("big", {"class_name": "SGD", "config": {"learning_rate": 1.0}}, {"w": np.zeros(n, np.float32)})
    gradient = np.arange(n, dtype=np.float32)
    result, values = client.push_pull("big", {"w": gradient})
    assert result.step == 1
    assert values["w"].shape == (n,) and values["w"][-1] == -(n - 1) and values["w"][12345] == -12345
    np.testing.assert_array_equal(values["w"][::65537], -gradient[::65537])


def test_large_state_round_trips_exactly_through_wire_bytes(client):
    """Requests built as wire bytes and replies split by hand, several messages each way, every dtype."""
    variables = {
        "w": np.random.default_rng(0).standard_normal((700, 1001)).astype(np.float32),  # 2.8 MB: 3 messages
        "d": np.linspace(-3, 3, 150_001),  # float64, odd size
        "b": np.arange(5, dtype=">f4"),  # big-endian input
    }
    client.create_model("m", {"class_name": "SGD", "config": {"learning_rate": 0.5, "momentum": 0.5}}, variables)
    _, pulled = client.pull("m")
    for name, value in variables.items():
        assert pulled[name].dtype == value.dtype.newbyteorder("=") and pulled[name].flags.writeable
        np.testing.assert_array_equal(pulled[name], value)
    grads = {name: np.ones_like(value) for name, value in variables.items()}
    _, values = client.push_pull("m", grads)
    weights = client.get_weights("m", include_variables=True)
    for name, value in variables.items():
        np.testing.assert_array_equal(values[name], value - 0.5)
        np.testing.assert_array_equal(weights.variables[name], value - 0.5)
        np.testing.assert_array_equal(weights.slots[name]["momentum"], np.full(value.shape, -0.5))
    momentum = {name: {"momentum": np.full(value.shape, 2.0, value.dtype)} for name, value in variables.items()}
    client.set_weights("m", slots=momentum)
    np.testing.assert_array_equal(client.get_weights("m").slots["w"]["momentum"], momentum["w"]["momentum"])


# ------------------------------------------------------------------ retries (fake server)


class _FlakyServicer(pb_grpc.ParameterServerServicer):
    """Fails the first ``failures`` calls of each method with UNAVAILABLE, then answers."""

    def __init__(self, failures=1, code=grpc.StatusCode.UNAVAILABLE, metadata=()):
        self.failures = failures
        self.code = code
        self.metadata = metadata
        self.calls = {"ListModels": 0, "ApplyGradients": 0}
        self.received_messages = []

    def _maybe_fail(self, method, context):
        self.calls[method] += 1
        if self.calls[method] <= self.failures:
            context.set_trailing_metadata(self.metadata)
            context.abort(self.code, f"{method} failed on purpose")

    def ListModels(self, request, context):
        self._maybe_fail("ListModels", context)
        return pb.ListModelsResponse()

    def ApplyGradients(self, request_iterator, context):
        messages = list(request_iterator)
        self._maybe_fail("ApplyGradients", context)
        self.received_messages.append(messages)
        header = messages[0].header
        yield pb.ApplyGradientsResponse(result=pb.StepResult(step=header.step + 1, iterations=header.step + 1))


@pytest.fixture
def fake_server():
    servers = []

    def start(servicer):
        server = grpc.server(concurrent.futures.ThreadPoolExecutor(4), options=tensors.GRPC_OPTIONS)
        pb_grpc.add_ParameterServerServicer_to_server(servicer, server)
        port = server.add_insecure_port("127.0.0.1:0")
        server.start()
        servers.append(server)
        return f"127.0.0.1:{port}"

    yield start
    for server in servers:
        server.stop(None)


def test_unavailable_is_retried_and_a_push_keeps_its_step(fake_server):
    servicer = _FlakyServicer(failures=2)
    with Client(fake_server(servicer), retries=3, backoff=0.01) as c:
        assert c.list_models() == []
        grads = {"w": np.zeros(300_000, np.float32)}  # 1.2 MB: more than one message
        assert c.push("m", grads, step=4).step == 5
    assert servicer.calls == {"ListModels": 3, "ApplyGradients": 3}
    (messages,) = servicer.received_messages
    assert len(messages) == 2 and messages[0].header.step == 4
    assert all(m.ByteSize() < 2 * tensors.CHUNK_BYTES for m in messages)


def test_requests_are_the_messages_protobuf_would_build(fake_server):
    servicer = _FlakyServicer(failures=0)
    grads = {"w": np.arange(700_000, dtype=np.float32), "b": np.arange(3, dtype=">f8")}
    with Client(fake_server(servicer)) as c:
        c.push("m", grads, step=2, worker_index=1)
    (messages,) = servicer.received_messages
    header = pb.ApplyGradientsHeader(model_id="m", worker_index=1, step=2, num_gradients=2)
    batches = list(tensors.batch_chunks(tensors.encode_many((n, "", a) for n, a in grads.items())))
    expected = [pb.ApplyGradientsRequest(header=header, gradients=batches[0])]
    expected += [pb.ApplyGradientsRequest(gradients=batch) for batch in batches[1:]]
    assert messages == expected


class _MalformedReplyServicer(pb_grpc.ParameterServerServicer):
    def Pull(self, request, context):
        yield pb.PullResponse(
            state=pb.StepResult(step=1),
            variables=[pb.TensorChunk(name="w", dtype=pb.FLOAT32, shape=[4], data=b"\0" * 12)],
        )  # 12 of 16 bytes


def test_a_malformed_reply_is_an_internal_error(fake_server):
    with Client(fake_server(_MalformedReplyServicer()), retries=0) as c:
        with pytest.raises(OptserveError, match="malformed.*only 12 of 16 bytes") as caught:
            c.pull("m")
    assert caught.value.code == "INTERNAL"


def test_retries_give_up_with_unavailable(fake_server):
    servicer = _FlakyServicer(failures=10)
    with Client(fake_server(servicer), retries=2, backoff=0.01) as c:
        with pytest.raises(UnavailableError, match="failed on purpose") as caught:
            c.list_models()
    assert isinstance(caught.value, ConnectionError)
    assert servicer.calls["ListModels"] == 3


def test_other_errors_are_not_retried_and_carry_their_metadata(fake_server):
    servicer = _FlakyServicer(
        failures=10,
        code=grpc.StatusCode.FAILED_PRECONDITION,
        metadata=(("optserve-current-step", "12"), ("other", "x")),
    )
    with Client(fake_server(servicer), retries=3, backoff=0.01) as c:
        with pytest.raises(StepMismatchError) as caught:
            c.push("m", {"w": np.zeros(2, np.float32)}, step=3)
    assert servicer.calls["ApplyGradients"] == 1
    assert caught.value.current_step == 12 and caught.value.details == {"current_step": "12"}


class _SlowFirstServicer(pb_grpc.ParameterServerServicer):
    def __init__(self):
        self.calls = 0

    def ListModels(self, request, context):
        self.calls += 1
        if self.calls == 1:
            time.sleep(1.0)  # longer than the client's per-attempt deadline
        return pb.ListModelsResponse()


def test_an_attempt_past_its_own_deadline_is_retried(fake_server):
    servicer = _SlowFirstServicer()
    with Client(fake_server(servicer), retries=2, backoff=0.01, attempt_timeout=0.2) as c:
        assert c.list_models() == []
    assert servicer.calls == 2
    with Client(fake_server(_SlowFirstServicer()), retries=2, backoff=0.01) as c:
        with pytest.raises(DeadlineExceededError):  # a call-level deadline is final
            c.list_models(timeout=0.2)


def test_a_server_that_starts_late_is_reached_by_retrying():
    from optserve.server.app import start_server

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    started = []
    timer = threading.Timer(0.5, lambda: started.append(start_server(host="127.0.0.1", port=port, device="cpu")))
    timer.start()
    try:
        with Client(f"127.0.0.1:{port}", retries=8, backoff=0.2, max_backoff=1.0) as c:
            assert c.health() == "SERVING"
    finally:
        timer.join()
        for server in started:
            server.stop()


def test_error_from_rpc_maps_every_listed_code():
    class FakeRpcError(grpc.RpcError):
        def __init__(self, code):
            self._code = code

        def code(self):
            return self._code

        def details(self):
            return "why"

        def trailing_metadata(self):
            return ()

    expected = {
        grpc.StatusCode.INVALID_ARGUMENT: ValueError,
        grpc.StatusCode.NOT_FOUND: KeyError,
        grpc.StatusCode.DEADLINE_EXCEEDED: TimeoutError,
        grpc.StatusCode.UNAVAILABLE: ConnectionError,
        grpc.StatusCode.UNAUTHENTICATED: PermissionError,
        grpc.StatusCode.ALREADY_EXISTS: AlreadyExistsError,
        grpc.StatusCode.INTERNAL: OptserveError,
    }
    for code, kind in expected.items():
        error = error_from_rpc(FakeRpcError(code))
        assert isinstance(error, kind) and isinstance(error, OptserveError)
        assert error.code == code.name and str(error) == "why"


def test_a_retry_window_waits_for_a_server_that_comes_up_later(caplog):
    """`retry_window_s` keeps retrying an unavailable server (a container restart) past `retries`."""
    import threading
    import time

    from test_failures import free_port

    from optserve.server.app import start_server

    port = free_port()
    started = []

    def start_later():
        time.sleep(1.5)
        started.append(start_server(host="127.0.0.1", port=port, device="cpu"))

    thread = threading.Thread(target=start_later)
    thread.start()
    try:
        with caplog.at_level("WARNING", logger="optserve.client"):
            with Client(f"127.0.0.1:{port}", retries=1, backoff=0.05, max_backoff=0.2, retry_window_s=60) as client:
                assert client.health() == "SERVING"
        assert "waiting for the server" in caplog.text
    finally:
        thread.join()
        for server in started:
            server.stop()
    with Client(f"127.0.0.1:{port}", retries=1, backoff=0.05, timeout=5) as client:
        with pytest.raises(UnavailableError):
            client.health()  # no window: two attempts, then the error
