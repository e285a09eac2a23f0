"""Request bounds and precise statuses: each bound answers its documented code, changes nothing,
and leaves health and the other models answering."""

from __future__ import annotations

import contextlib
import json
import threading
import time

import grpc
import numpy as np
import pytest
import rpc_helpers as rpc
from grpc_health.v1 import health_pb2

from optserve.protos import optserve_pb2 as pb
from optserve.server.app import start_server
from optserve.server.limits import MAX_STEP, Limits

SERVICE = "/optserve.v1.ParameterServer/"


@contextlib.contextmanager
def limited_server(sync_timeout_s: float = 60.0, **limits):
    """A server with small limits, a channel and stub to it, and one healthy bystander model."""
    with start_server(device="cpu", sync_timeout_s=sync_timeout_s, limits=Limits(**limits)) as server:
        channel, stub = rpc.connect(server.address)
        with channel:
            rpc.create_model(stub, "bystander", {"w": np.ones(4, np.float32)})
            yield server, stub


def assert_still_serving(server, stub, within_s: float = 1.0) -> None:
    """Health answers SERVING within ``within_s`` and the bystander model still takes a push."""
    started = time.monotonic()
    assert rpc.health_status(server.address) == health_pb2.HealthCheckResponse.SERVING
    assert time.monotonic() - started < within_s
    step = rpc.pull(stub, "bystander")[0].step
    result, _ = rpc.push(stub, "bystander", 0, step, {"w": np.ones(4, np.float32)})
    assert result.step == step + 1


def spec_error(stub, **fields) -> grpc.RpcError:
    spec = pb.ModelSpec(
        model_id=fields.pop("model_id", "m"),
        optimizer_config_json=fields.pop("optimizer_config_json", json.dumps(rpc.sgd())),
        **fields,
    )
    requests = [
        pb.CreateModelRequest(
            spec=spec, variables=[pb.TensorChunk(name="w", dtype=pb.FLOAT32, shape=[2], data=b"\0" * 8)]
        )
    ]
    return rpc.rpc_error(stub.CreateModel, iter(requests), timeout=10)


def create_error(stub, chunks, model_id="m") -> grpc.RpcError:
    spec = pb.ModelSpec(model_id=model_id, optimizer_config_json=json.dumps(rpc.sgd()))
    return rpc.rpc_error(stub.CreateModel, iter([pb.CreateModelRequest(spec=spec, variables=chunks)]), timeout=10)


def model_ids(stub) -> list[str]:
    return [m.spec.model_id for m in stub.ListModels(pb.ListModelsRequest(), timeout=10).models]


# ------------------------------------------------------------------ spec bounds


@pytest.mark.parametrize(
    "fields, words",
    [
        (dict(num_workers=4097), ["num_workers", "[1, 4096]"]),
        (dict(num_workers=-1), ["num_workers"]),
        (dict(num_workers=2**31 - 1), ["num_workers"]),
        (dict(sync_timeout_s=float("inf")), ["sync_timeout_s", "finite"]),
        (dict(sync_timeout_s=float("nan")), ["sync_timeout_s"]),
        (dict(sync_timeout_s=-1.0), ["sync_timeout_s"]),
        (dict(sync_timeout_s=86401.0), ["sync_timeout_s", "86400"]),
        (dict(optimizer_config_json="[" * 5000 + "]" * 5000), ["nest", "32"]),
        (
            dict(optimizer_config_json=json.dumps({"class_name": "SGD", "config": {}, "pad": "x" * 70000})),
            ["at most 65536 bytes"],
        ),
        (dict(non_finite_policy=99), ["non_finite_policy"]),
    ],
)
def test_a_spec_beyond_a_bound_is_invalid_argument(fields, words):
    with limited_server() as (server, stub):
        error = spec_error(stub, **fields)
        assert error.code() == grpc.StatusCode.INVALID_ARGUMENT, error.details()
        for word in words:
            assert word in error.details()
        assert model_ids(stub) == ["bystander"]
        assert_still_serving(server, stub)


def test_num_workers_zero_means_one_worker(stub):
    created = rpc.create_model(stub, "job", {"w": np.ones(2, np.float32)}, num_workers=0)
    assert created.model.spec.num_workers == 1
    result, _ = rpc.push(stub, "job", 0, 0, {"w": np.ones(2, np.float32)})  # one push completes the step
    assert result.step == 1


def test_max_workers_and_max_sync_timeout_are_configurable():
    with limited_server(sync_timeout_s=5.0, max_workers=8, max_sync_timeout_s=5.0) as (server, stub):
        assert spec_error(stub, num_workers=9).code() == grpc.StatusCode.INVALID_ARGUMENT
        assert spec_error(stub, sync_timeout_s=6.0).code() == grpc.StatusCode.INVALID_ARGUMENT
        created = rpc.create_model(stub, "job", {"w": np.ones(2, np.float32)}, num_workers=8, sync_timeout_s=5.0)
        assert created.model.spec.num_workers == 8


def test_health_answers_while_a_4096_worker_step_times_out_and_the_status_fits_the_trailers():
    with limited_server() as (server, stub):
        rpc.create_model(stub, "wide", {"w": np.ones(4, np.float32)}, num_workers=4096, sync_timeout_s=1.5)
        outcome = {}

        def park():
            try:
                rpc.push(stub, "wide", 0, 0, {"w": np.ones(4, np.float32)})
            except grpc.RpcError as error:
                outcome["error"] = error

        parked = threading.Thread(target=park)
        parked.start()
        rpc.wait_until(lambda: rpc.waiting_workers(stub, "wide") == [0])
        assert_still_serving(server, stub)
        parked.join(10)
        error = outcome["error"]
        # The real status, not "Stream removed": 4095 missing workers are listed as one range.
        assert error.code() == grpc.StatusCode.ABORTED
        metadata = rpc.trailing(error)
        assert metadata["optserve-reason"] == "sync-timeout"
        assert metadata["optserve-missing-workers"] == "1-4095"
        assert_still_serving(server, stub)


# ------------------------------------------------------------------ counters


def test_setting_a_step_near_int64_overflow_is_refused_and_changes_nothing():
    with limited_server() as (server, stub):
        before = rpc.snapshot(stub, "bystander")
        for field in ("step", "iterations", "raw_iterations"):
            error = rpc.rpc_error(rpc.set_weights, stub, "bystander", state=pb.OptimizerState(**{field: 2**63 - 1}))
            assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert f"`{field}` must be >= 0 and at most {MAX_STEP}" in error.details()
        rpc.assert_same_snapshot(before, rpc.snapshot(stub, "bystander"))
        # The bound itself is fine, and the model keeps answering (ListModels included) after a push.
        rpc.set_weights(stub, "bystander", state=pb.OptimizerState(step=MAX_STEP))
        result, _ = rpc.push(stub, "bystander", 0, MAX_STEP, {"w": np.ones(4, np.float32)})
        assert result.step == MAX_STEP + 1
        assert model_ids(stub) == ["bystander"]


def test_an_async_push_step_beyond_the_bound_is_invalid_argument(stub):
    rpc.create_model(stub, "job", {"w": np.ones(2, np.float32)}, mode=pb.ASYNC)
    error = rpc.rpc_error(rpc.push, stub, "job", 0, 2**62, {"w": np.ones(2, np.float32)})
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT


# ------------------------------------------------------------------ tensors


@pytest.mark.parametrize(
    "chunk, words",
    [
        (pb.TensorChunk(name="w", dtype=pb.FLOAT32, shape=[1] * 65, data=b"\0" * 4), ["65 dimensions", "32"]),
        (pb.TensorChunk(name="w", dtype=pb.FLOAT32, shape=[0, 2**62, 2**62]), ["elements"]),
        (pb.TensorChunk(name="w", dtype=pb.FLOAT32, shape=[-1]), ["negative"]),
        (pb.TensorChunk(name="x" * 2000, dtype=pb.FLOAT32, shape=[1], data=b"\0" * 4), ["at most 1024 bytes"]),
        (pb.TensorChunk(name="x" * (1 << 20), dtype=pb.FLOAT32, shape=[1], data=b"\0" * 4), ["at most 1024 bytes"]),
        (pb.TensorChunk(name="w", slot="s" * 5000, dtype=pb.FLOAT32, shape=[1], data=b"\0" * 4), ["slot name"]),
    ],
)
def test_a_tensor_beyond_a_bound_is_invalid_argument(chunk, words):
    with limited_server() as (server, stub):
        error = create_error(stub, [chunk])
        assert error.code() == grpc.StatusCode.INVALID_ARGUMENT, error.details()
        assert len(error.details()) < 4096
        for word in words:
            assert word in error.details()
        assert model_ids(stub) == ["bystander"]
        assert_still_serving(server, stub)


def test_variables_per_model_are_bounded():
    with limited_server(max_variables=4) as (server, stub):
        chunks = [pb.TensorChunk(name=f"v{i}", dtype=pb.FLOAT32, shape=[1], data=b"\0" * 4) for i in range(5)]
        error = create_error(stub, chunks)
        assert error.code() == grpc.StatusCode.INVALID_ARGUMENT and "at most 4 variables" in error.details()
        assert model_ids(stub) == ["bystander"]
        rpc.create_model(stub, "four", {f"v{i}": np.ones(1, np.float32) for i in range(4)})


def test_a_push_with_a_shape_other_than_the_variables_is_refused_before_it_is_received(stub):
    rpc.create_model(stub, "job", {"w": np.ones(4, np.float32)})
    before = rpc.snapshot(stub, "job")
    # Declares 1 GiB but sends 4 bytes: refused on the declaration, nothing allocated.
    header = pb.ApplyGradientsRequest(header=pb.ApplyGradientsHeader(model_id="job"))
    chunk = pb.TensorChunk(name="w", dtype=pb.FLOAT32, shape=[1 << 28], data=b"\0" * 4)
    error = rpc.rpc_error(
        lambda: list(stub.ApplyGradients(iter([header, pb.ApplyGradientsRequest(gradients=[chunk])]), timeout=10))
    )
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT and "variable has shape [4] float32" in error.details()
    rpc.assert_same_snapshot(before, rpc.snapshot(stub, "job"))


# ------------------------------------------------------------------ statuses


@pytest.mark.parametrize(
    "method, streaming_response",
    [
        ("Pull", True),
        ("GetWeights", True),
        ("ListModels", False),
        ("DeleteModel", False),
        ("Checkpoint", False),
        ("CommitStep", True),
    ],
)
def test_undecodable_bytes_on_unary_requests_are_invalid_argument(address, method, streaming_response):
    with grpc.insecure_channel(address) as channel:
        kind = channel.unary_stream if streaming_response else channel.unary_unary
        call = kind(SERVICE + method, request_serializer=lambda raw: raw, response_deserializer=lambda raw: raw)
        for garbage in (b"\xff\xff\xff", b"\x0a\x05ab", b"\x08" + b"\xff" * 11):
            with pytest.raises(grpc.RpcError) as error:
                response = call(garbage, timeout=10)
                if streaming_response:
                    list(response)
            assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT, (garbage, error.value.details())
            assert "could not be decoded" in error.value.details()


def test_an_error_naming_a_huge_value_keeps_its_status_and_bounded_metadata(stub):
    rpc.create_model(stub, "job", {"w": np.ones(2, np.float32)})
    error = rpc.rpc_error(rpc.pull, stub, "n" * (1 << 20))
    assert error.code() == grpc.StatusCode.NOT_FOUND
    assert len(error.details()) <= 2200 and "more characters" in error.details()


# ------------------------------------------------------------------ listing


def test_list_models_pages_stay_under_the_limit_and_cover_every_model():
    with limited_server(max_list_bytes=4000) as (server, stub):
        padded = {"class_name": "SGD", "config": {"learning_rate": 0.1, "name": "n" * 1500}}
        for i in range(6):
            rpc.create_model(stub, f"m{i}", {"w": np.ones(2, np.float32)}, padded)
        seen, token, pages = [], "", 0
        while True:
            response = stub.ListModels(pb.ListModelsRequest(page_token=token), timeout=10)
            assert response.ByteSize() <= 4000
            seen += [m.spec.model_id for m in response.models]
            pages += 1
            token = response.next_page_token
            if not token:
                break
        assert seen == ["bystander"] + [f"m{i}" for i in range(6)]
        assert pages > 2
