"""The client's seams: a Transport behind Client, one StepTracker, server generations in replies."""

from __future__ import annotations

import copy
import pickle

import numpy as np
import pytest

from optserve.client import (
    Client,
    FailedPreconditionError,
    InvalidArgumentError,
    NotFoundError,
    OptserveError,
    ServerGeneration,
    StepMismatchError,
    StepResult,
    StepTracker,
)
from optserve.client.transport import GrpcTransport, RetryPolicy
from optserve.protos import errors
from optserve.server import errors as server_errors


class RecordingTransport:
    """A Transport that answers pushes itself and records every call."""

    def __init__(self, address, retry, options):
        self.address, self.retry, self.options = address, retry, options
        self.calls: list[tuple] = []
        self.closed = False

    def list_models(self, model_id, with_stats, *, timeout):
        self.calls.append(("list_models", model_id))
        raise NotFoundError(f"Model {model_id!r} not found.")

    def apply_gradients(self, model_id, gradients, *, worker_index, step, aggregated, return_variables, timeout):
        self.calls.append(("apply_gradients", model_id, sorted(gradients), worker_index, step))
        return StepResult(
            step=step + 1, iterations=step + 1, learning_rate=0.1, generation=ServerGeneration("run-1")
        ), {}

    def close(self):
        self.closed = True


def test_a_client_runs_over_any_transport_and_checks_arguments_before_it():
    made = []

    def factory(address, retry, options):
        made.append(RecordingTransport(address, retry, options))
        return made[-1]

    with Client("127.0.0.1:1", retries=2, backoff=0.5, transport_factory=factory) as client:
        transport = made[0]
        assert transport.retry == RetryPolicy(retries=2, backoff=0.5, max_backoff=5.0, attempt_timeout=None)
        assert client.push("m", {"w": np.ones(2, np.float32)}, step=3).step == 4
        assert client.next_step("m") == 4  # tracked, not asked
        for bad in ({"w": np.ones(2, np.complex64)}, {"": np.ones(2)}, "not a dict"):
            with pytest.raises((ValueError, TypeError)):
                client.push("m", bad, step=4)
        with pytest.raises(ValueError, match="worker_index"):
            client.push("m", {"w": np.ones(2, np.float32)}, worker_index=-1)
        assert transport.calls == [("apply_gradients", "m", ["w"], 0, 3)]
        assert client.steps.progress("m").generation == ServerGeneration("run-1")
    assert transport.closed


def test_a_sharded_client_makes_one_transport_per_shard():
    made = []
    with Client(
        ["127.0.0.1:1", "127.0.0.1:2"],
        transport_factory=lambda *args: made.append(RecordingTransport(*args)) or made[-1],
    ) as client:
        assert [t.address for t in made] == ["127.0.0.1:1", "127.0.0.1:2"] == client.addresses
        assert client.transports == made
    assert all(t.closed for t in made)


def test_the_default_transport_is_grpc_and_a_closed_client_refuses_calls():
    client = Client("127.0.0.1:1")
    assert isinstance(client.transport, GrpcTransport)
    client.close()
    with pytest.raises(ValueError, match="closed"):
        client.pull("m")


# ---------------------------------------------------------------------------- errors


def test_client_and_server_raise_the_same_error_classes():
    assert server_errors.InvalidArgumentError is InvalidArgumentError
    assert server_errors.StepMismatchError is StepMismatchError
    error = errors.error_from_status("FAILED_PRECONDITION", "behind", [("optserve-current-step", "4")])
    assert isinstance(error, StepMismatchError) and error.current_step == 4
    assert isinstance(errors.error_from_status("OUT_OF_RANGE", "x"), InvalidArgumentError)
    unknown = errors.error_from_status("DATA_LOSS", "gone")
    assert type(unknown) is OptserveError and unknown.code == "DATA_LOSS"
    assert errors.status_metadata(server_errors.FailedPreconditionError("x", details={"current_step": 7})) == (
        ("optserve-current-step", "7"),
    )


def test_the_former_client_signature_of_errors_still_works():
    error = NotFoundError("NOT_FOUND", "Model 'm' not found.", {"why": "gone"})
    assert (error.code, error.message, str(error), error.details) == (
        "NOT_FOUND",
        "Model 'm' not found.",
        "Model 'm' not found.",
        {"why": "gone"},
    )
    mismatch = StepMismatchError("FAILED_PRECONDITION", "behind", {"current_step": "2"})
    assert mismatch.current_step == 2
    assert OptserveError("UNKNOWN", "odd").code == "UNKNOWN"
    with pytest.raises(TypeError, match="former"):
        OptserveError("a message", 3)


def test_an_error_names_its_shard_in_declared_fields_and_survives_pickling():
    error = NotFoundError("Model 'm' not found.", details={"why": "gone"})
    assert error.shard_index is None and error.address is None
    on_shard = error.on_shard(1, "h2:50051")
    assert (on_shard.shard_index, on_shard.address) == (1, "h2:50051")
    assert str(on_shard) == "shard 1 (h2:50051): Model 'm' not found." and type(on_shard) is NotFoundError
    assert on_shard.on_shard(0, "h1:50051") is on_shard  # the first shard to report it keeps it
    assert error.shard_index is None  # the original is left alone
    copied = pickle.loads(pickle.dumps(on_shard))
    assert (type(copied), str(copied), copied.shard_index, copied.details) == (
        NotFoundError,
        str(on_shard),
        1,
        {"why": "gone"},
    )
    mismatch = pickle.loads(pickle.dumps(StepMismatchError("behind", details={"current_step": "3"})))
    assert mismatch.current_step == 3 and mismatch.code == "FAILED_PRECONDITION"


# ---------------------------------------------------------------------------- step tracker and generations


def test_the_step_tracker_counts_generation_changes_and_copies_without_its_lock():
    tracker = StepTracker()
    assert not tracker.record_progress("m", step=1, generation=ServerGeneration("a"))
    assert not tracker.record_progress("m", step=2, generation=ServerGeneration("a"))
    assert tracker.record_progress("m", step=0, generation=ServerGeneration("b", "ckpt-1"))
    assert tracker.progress("m").restarts == 1 and tracker.progress("m").step == 0
    tracker.record_worker_step("m", 0, 5)
    clone = copy.deepcopy(tracker)
    assert clone.step_for("m", 0) == 5 and clone.progress("m") == tracker.progress("m")


def test_replies_carry_the_server_generation_and_a_restart_from_a_checkpoint_shows(tmp_path):
    from optserve.server.app import start_server

    variables = {"w": np.zeros(3, np.float32)}
    with start_server(device="cpu", checkpoint_dir=tmp_path) as server, Client(server.address) as client:
        info = client.create_model("m", "sgd", variables)
        first = client.push("m", {"w": np.ones(3, np.float32)})
        assert first.generation is not None and first.generation == info.generation
        assert first.generation.restored_checkpoint == ""
        client.checkpoint()
        client.push("m", {"w": np.ones(3, np.float32)})
    with start_server(device="cpu", checkpoint_dir=tmp_path) as server, Client(server.address) as client2:
        result, _ = client2.pull("m")
        assert result.step >= 1
        assert result.generation.server_id != first.generation.server_id
        assert result.generation.restored_checkpoint != ""
        assert client2.get_weights("m").generation == result.generation
        assert client2.list_models("m")[0].generation == result.generation


def test_a_client_that_sees_a_new_generation_counts_a_restart(tmp_path):
    from optserve.server.app import start_server

    tracker = StepTracker()
    variables = {"w": np.zeros(3, np.float32)}
    with (
        start_server(device="cpu", checkpoint_dir=tmp_path) as server,
        Client(server.address, step_tracker=tracker) as client,
    ):
        client.create_model("m", "sgd", variables)
        client.push("m", {"w": np.ones(3, np.float32)})
    with (
        start_server(device="cpu", checkpoint_dir=tmp_path) as server,
        Client(server.address, step_tracker=tracker) as client,
    ):
        client.pull("m")
        assert tracker.progress("m").restarts == 1
        with pytest.raises(FailedPreconditionError):
            client.push("m", {"w": np.ones(3, np.float32)}, step=7)
