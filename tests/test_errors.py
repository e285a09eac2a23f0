"""Refused requests: the right status code, a message that says what to do, and no change at all."""

from __future__ import annotations

import json
import logging
import threading

import grpc
import numpy as np
import pytest
import rpc_helpers as rpc

from optserve.protos import optserve_pb2 as pb
from optserve.protos import tensors as codec
from optserve.server import errors, optimizers
from optserve.server.app import start_server
from optserve.server.model import Model
from optserve.server.servicer import status_for

ADAM = {"class_name": "Adam", "config": {"learning_rate": 0.01}}
SCHEDULED = {
    "class_name": "SGD",
    "config": {
        "momentum": 0.9,
        "learning_rate": {
            "class_name": "ExponentialDecay",
            "config": {"initial_learning_rate": 0.1, "decay_steps": 10, "decay_rate": 0.5},
        },
    },
}


def _variables():
    return {"w": np.arange(6, dtype=np.float32).reshape(2, 3), "b": np.ones(2, np.float32)}


def _grads(scale=1.0):
    return {"w": np.full((2, 3), scale, np.float32), "b": np.full(2, scale, np.float32)}


@pytest.fixture
def trained(stub):
    """A model with non-trivial state (one update applied)."""
    rpc.create_model(stub, "job", _variables(), ADAM)
    rpc.push(stub, "job", 0, 0, _grads())
    return rpc.snapshot(stub, "job")


def _raw_push(stub, requests):
    return list(stub.ApplyGradients(iter(requests), timeout=10))


def _header(step=1, worker=0, model_id="job"):
    return pb.ApplyGradientsHeader(model_id=model_id, worker_index=worker, step=step)


def _chunks(name, array, slot=""):
    return list(codec.encode(name, array, slot))


# ------------------------------------------------------------------ pushes


@pytest.mark.parametrize(
    "gradients, code, words",
    [
        ({"nope": np.ones(2, np.float32)}, grpc.StatusCode.NOT_FOUND, ["'nope'", "'w'"]),
        (
            {"w": np.ones((3, 2), np.float32)},
            grpc.StatusCode.INVALID_ARGUMENT,
            ["shape [3, 2] float32", "shape [2, 3] float32"],
        ),
        ({"b": np.ones(2, np.float64)}, grpc.StatusCode.INVALID_ARGUMENT, ["float64", "float32"]),
        ({"b": np.ones(2, np.float32), "w": np.ones(1, np.float32)}, grpc.StatusCode.INVALID_ARGUMENT, ["'w'"]),
        # A push without gradients is valid (a step of a shard none of whose variables got a gradient).
    ],
)
def test_a_bad_push_is_refused_whole(stub, trained, gradients, code, words):
    error = rpc.rpc_error(rpc.push, stub, "job", 0, 1, gradients)
    assert error.code() == code
    for word in words:
        assert word in error.details()
    rpc.assert_same_snapshot(trained, rpc.snapshot(stub, "job"))


@pytest.mark.parametrize(
    "requests, words",
    [
        ([pb.ApplyGradientsRequest(gradients=_chunks("b", np.ones(2, np.float32)))], ["header"]),
        (
            [pb.ApplyGradientsRequest(header=_header(), gradients=_chunks("b", np.ones(2, np.float32), slot="m"))],
            ["slot", "b/m"],
        ),
        (
            [
                pb.ApplyGradientsRequest(
                    header=_header(),
                    gradients=[pb.TensorChunk(name="b", dtype=pb.FLOAT32, shape=[2], offset=4, data=b"\0" * 4)],
                )
            ],
            ["offset"],
        ),
        (
            [
                pb.ApplyGradientsRequest(
                    header=_header(), gradients=[pb.TensorChunk(name="b", dtype=pb.FLOAT32, shape=[2], data=b"\0" * 4)]
                )
            ],
            ["4 of 8 bytes"],
        ),
        (
            [
                pb.ApplyGradientsRequest(
                    header=_header(), gradients=[pb.TensorChunk(name="b", dtype=99, shape=[2], data=b"\0" * 8)]
                )
            ],
            ["dtype"],
        ),
        (
            [pb.ApplyGradientsRequest(header=_header(step=-1), gradients=_chunks("b", np.ones(2, np.float32)))],
            ["`step` must be >= 0"],
        ),
        (
            [pb.ApplyGradientsRequest(header=_header(worker=-1), gradients=_chunks("b", np.ones(2, np.float32)))],
            ["worker_index", "[0, 1)"],
        ),
        ([], ["no messages"]),
    ],
)
def test_a_malformed_push_is_invalid_argument(stub, trained, requests, words):
    error = rpc.rpc_error(_raw_push, stub, requests)
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    for word in words:
        assert word in error.details()
    rpc.assert_same_snapshot(trained, rpc.snapshot(stub, "job"))


def test_a_bad_push_does_not_touch_a_pending_merge_buffer(stub):
    rpc.create_model(stub, "job", _variables(), ADAM, num_workers=2)
    good = threading.Thread(target=rpc.push, args=(stub, "job", 0, 0, _grads(1.0)))
    good.start()
    rpc.wait_until(lambda: rpc.waiting_workers(stub, "job") == [0])
    error = rpc.rpc_error(rpc.push, stub, "job", 1, 0, {"w": _grads(100.0)["w"], "b": np.ones(3, np.float32)})
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert rpc.waiting_workers(stub, "job") == [0]
    rpc.push(stub, "job", 1, 0, _grads(2.0))
    good.join(10)
    engine = optimizers.deserialize(ADAM)
    engine.build(_variables())
    engine.apply(_grads(3.0))
    _, values = rpc.pull(stub, "job")
    for name, value in engine.read_variables().items():
        np.testing.assert_array_equal(values[name], value)


def test_unknown_model_is_not_found_everywhere(stub):
    rpc.create_model(stub, "job", _variables())
    calls = [
        lambda: rpc.push(stub, "nope", 0, 0, _grads()),
        lambda: rpc.pull(stub, "nope"),
        lambda: rpc.get_weights(stub, "nope"),
        lambda: rpc.set_weights(stub, "nope", {("w", ""): _variables()["w"]}),
        lambda: stub.ListModels(pb.ListModelsRequest(model_id="nope"), timeout=5),
    ]
    for call in calls:
        error = rpc.rpc_error(call)
        assert error.code() == grpc.StatusCode.NOT_FOUND
        assert "'nope'" in error.details() and "'job'" in error.details() and "CreateModel" in error.details()


def test_unknown_variable_names_in_reads_are_not_found(stub, trained):
    for call in (lambda: rpc.pull(stub, "job", ["w", "zz"]), lambda: rpc.get_weights(stub, "job", ["zz"])):
        error = rpc.rpc_error(call)
        assert error.code() == grpc.StatusCode.NOT_FOUND and "'zz'" in error.details()


# ------------------------------------------------------------- SetWeights


@pytest.mark.parametrize(
    "tensors, state, code, words",
    [
        (
            {("w", ""): np.zeros((2, 3), np.float32), ("zz", ""): np.zeros(2, np.float32)},
            None,
            grpc.StatusCode.NOT_FOUND,
            ["'zz'"],
        ),
        (
            {("w", ""): np.zeros((2, 3), np.float32), ("b", "nope"): np.zeros(2, np.float32)},
            None,
            grpc.StatusCode.NOT_FOUND,
            ["'nope'", "momentum", "velocity"],
        ),
        (
            {("w", ""): np.zeros((2, 3), np.float32), ("b", ""): np.zeros(3, np.float32)},
            None,
            grpc.StatusCode.INVALID_ARGUMENT,
            ["'b'", "shape [3] float32"],
        ),
        (
            {("w", "momentum"): np.zeros((2, 3), np.float32), ("b", "velocity"): np.zeros(5, np.float32)},
            None,
            grpc.StatusCode.INVALID_ARGUMENT,
            ["velocity"],
        ),
        (
            {("w", ""): np.zeros((2, 3), np.float32)},
            pb.OptimizerState(iterations=-1),
            grpc.StatusCode.INVALID_ARGUMENT,
            ["iterations"],
        ),
        (
            {("w", ""): np.zeros((2, 3), np.float32)},
            pb.OptimizerState(iterations=3, raw_iterations=7),
            grpc.StatusCode.INVALID_ARGUMENT,
            ["disagree"],
        ),
        (
            {("w", ""): np.zeros((2, 3), np.float32)},
            pb.OptimizerState(scalars={"u_product": 1.0}),
            grpc.StatusCode.NOT_FOUND,
            ["u_product"],
        ),
    ],
)
def test_set_weights_is_validated_whole(stub, trained, tensors, state, code, words):
    error = rpc.rpc_error(rpc.set_weights, stub, "job", tensors, state)
    assert error.code() == code
    for word in words:
        assert word in error.details()
    rpc.assert_same_snapshot(trained, rpc.snapshot(stub, "job"))


def test_a_refusal_after_writing_started_rolls_everything_back(stub):
    # The schedule's learning rate can only be refused by the engine once the variables are written.
    rpc.create_model(stub, "sched", _variables(), SCHEDULED)
    rpc.push(stub, "sched", 0, 0, _grads())
    before = rpc.snapshot(stub, "sched")
    new = {("w", ""): np.zeros((2, 3), np.float32), ("b", "momentum"): np.full(2, 5.0, np.float32)}
    error = rpc.rpc_error(rpc.set_weights, stub, "sched", new, pb.OptimizerState(iterations=4, learning_rate=0.5))
    assert error.code() == grpc.StatusCode.FAILED_PRECONDITION and "schedule" in error.details()
    rpc.assert_same_snapshot(before, rpc.snapshot(stub, "sched"))


def test_set_weights_cannot_move_the_step_while_a_step_is_pending(stub):
    rpc.create_model(stub, "job", _variables(), ADAM, num_workers=2, sync_timeout_s=5)
    parked = threading.Thread(target=rpc.push, args=(stub, "job", 0, 0, _grads()))
    parked.start()
    rpc.wait_until(lambda: rpc.waiting_workers(stub, "job") == [0])
    before = rpc.snapshot(stub, "job")
    error = rpc.rpc_error(rpc.set_weights, stub, "job", {}, pb.OptimizerState(step=3))
    assert error.code() == grpc.StatusCode.FAILED_PRECONDITION and "in progress" in error.details()
    rpc.assert_same_snapshot(before, rpc.snapshot(stub, "job"))
    rpc.push(stub, "job", 1, 0, _grads())
    parked.join(10)


# ------------------------------------------------------------ CreateModel


@pytest.mark.parametrize(
    "config_json, variables, fields, words",
    [
        ("{", _variables(), {}, ["JSON"]),
        ("", _variables(), {}, ["empty"]),
        (json.dumps("nope"), _variables(), {}, ["nope", "Adam"]),
        (json.dumps({"class_name": "Adam", "config": {"bogus": 1}}), _variables(), {}, ["bogus"]),
        (json.dumps({"class_name": "Adam", "config": {"beta_1": 2.0}}), _variables(), {}, ["beta_1"]),
        (json.dumps("adam"), {}, {}, ["no variables"]),
        (json.dumps("adam"), {"i": np.ones(2, np.int32)}, {}, ["int32"]),
        (json.dumps("adam"), _variables(), {"model_id": ""}, ["model_id"]),
        (json.dumps("adam"), _variables(), {"num_workers": -2}, ["num_workers"]),
        (json.dumps("adam"), _variables(), {"sync_timeout_s": -1.0}, ["sync_timeout_s"]),
    ],
)
def test_a_bad_create_is_invalid_argument_and_creates_nothing(stub, config_json, variables, fields, words):
    spec = dict(model_id="job", optimizer_config_json=config_json)
    spec.update(fields)
    requests = [pb.CreateModelRequest(spec=pb.ModelSpec(**spec))]
    requests += [pb.CreateModelRequest(variables=list(codec.encode(n, a))) for n, a in variables.items()]
    error = rpc.rpc_error(stub.CreateModel, iter(requests), timeout=10)
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    for word in words:
        assert word in error.details()
    assert not stub.ListModels(pb.ListModelsRequest(), timeout=5).models


def test_create_without_a_spec_first_is_invalid(stub):
    requests = [pb.CreateModelRequest(variables=list(codec.encode("w", np.ones(2, np.float32))))]
    error = rpc.rpc_error(stub.CreateModel, iter(requests), timeout=10)
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT and "spec" in error.details()


# ------------------------------------------------------------ size limits


def test_requests_over_max_request_bytes_are_resource_exhausted():
    with start_server(device="cpu", max_request_bytes=4096) as server:
        channel, stub = rpc.connect(server.address)
        with channel:
            error = rpc.rpc_error(rpc.create_model, stub, "big", {"w": np.ones(2048, np.float32)})
            assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert "--max-request-bytes" in error.details()
            assert not stub.ListModels(pb.ListModelsRequest(), timeout=5).models

            rpc.create_model(stub, "job", {"w": np.ones(512, np.float32), "b": np.ones(512, np.float32)})
            at_the_limit = {"w": np.ones(512, np.float32), "b": np.ones(512, np.float32)}
            rpc.push(stub, "job", 0, 0, at_the_limit)  # exactly the limit: accepted
            before = rpc.snapshot(stub, "job")
            error = rpc.rpc_error(
                rpc.push,
                stub,
                "job",
                0,
                1,
                {"w": np.ones(512, np.float32), "b": np.ones(512, np.float32), "x": np.ones(1, np.float32)},
            )
            assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            rpc.assert_same_snapshot(before, rpc.snapshot(stub, "job"))


# --------------------------------------------------------------- mapping


@pytest.mark.parametrize(
    "exception, code",
    [
        (errors.InvalidArgumentError("x"), grpc.StatusCode.INVALID_ARGUMENT),
        (errors.NotFoundError("x"), grpc.StatusCode.NOT_FOUND),
        (errors.AlreadyExistsError("x"), grpc.StatusCode.ALREADY_EXISTS),
        (errors.FailedPreconditionError("x"), grpc.StatusCode.FAILED_PRECONDITION),
        (errors.ResourceExhaustedError("x"), grpc.StatusCode.RESOURCE_EXHAUSTED),
        (errors.DeadlineExceededError("x"), grpc.StatusCode.DEADLINE_EXCEEDED),
        (errors.UnavailableError("x"), grpc.StatusCode.UNAVAILABLE),
        (codec.TensorFormatError("x"), grpc.StatusCode.INVALID_ARGUMENT),
        (MemoryError(), grpc.StatusCode.RESOURCE_EXHAUSTED),
        (RuntimeError("secret internals"), grpc.StatusCode.INTERNAL),
    ],
)
def test_every_exception_maps_to_one_status(exception, code):
    got, message, _ = status_for(exception)
    assert got == code
    assert "secret internals" not in message


def test_details_travel_as_trailing_metadata():
    _, _, metadata = status_for(errors.FailedPreconditionError("x", details={"current_step": 7}))
    assert metadata == (("optserve-current-step", "7"),)


def test_an_unexpected_exception_is_internal_and_logged(stub, trained, monkeypatch, caplog):
    async def broken(self, with_stats=False):
        raise RuntimeError("boom in summary")

    monkeypatch.setattr(Model, "summary", broken)
    with caplog.at_level(logging.ERROR, logger="optserve.server.servicer"):
        error = rpc.rpc_error(stub.ListModels, pb.ListModelsRequest(), timeout=5)
    assert error.code() == grpc.StatusCode.INTERNAL
    assert "RuntimeError" in error.details() and "boom" not in error.details()
    assert any("boom in summary" in str(r.exc_info[1]) for r in caplog.records if r.exc_info)


def test_an_absurd_declared_shape_is_refused_before_allocating(stub, trained):
    chunk = pb.TensorChunk(name="w", dtype=pb.FLOAT32, shape=[1 << 40, 1 << 40], data=b"\0" * 4)
    error = rpc.rpc_error(_raw_push, stub, [pb.ApplyGradientsRequest(header=_header(), gradients=[chunk])])
    # Beyond the server's bound on elements per tensor (Limits.max_elements): a malformed request.
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    rpc.assert_same_snapshot(trained, rpc.snapshot(stub, "job"))


@pytest.mark.parametrize("method", ["CreateModel", "ApplyGradients", "SetWeights"])
def test_corrupt_request_bytes_are_invalid_argument(address, method):
    """Tensor-carrying requests are split from their wire bytes by the server's own parser."""
    channel = grpc.insecure_channel(address)
    with channel:
        kind = channel.stream_stream if method == "ApplyGradients" else channel.stream_unary
        call = kind(
            f"/optserve.v1.ParameterServer/{method}",
            request_serializer=lambda raw: raw,
            response_deserializer=lambda raw: raw,
        )
        with pytest.raises(grpc.RpcError) as error:
            response = call(iter([b"\x12\x05\x0a\x01w\x18"]), timeout=10)
            if method == "ApplyGradients":
                list(response)
    assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "Malformed" in error.value.details()
