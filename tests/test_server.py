"""The parameter server end to end: every RPC over a real server on a free loopback port."""

from __future__ import annotations

import json
import os
import pathlib
import signal
import subprocess
import sys
import threading
import types

import grpc
import numpy as np
import pytest
import rpc_helpers as rpc
from grpc_health.v1 import health_pb2
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from optserve.protos import optserve_pb2 as pb
from optserve.protos import tensors as codec
from optserve.server import cli
from optserve.server.app import start_server

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _variables():
    return {"w": np.arange(6, dtype=np.float32).reshape(2, 3), "b": np.array([0.5, -1.0], dtype=np.float32)}


def test_health_reports_serving_for_the_server_and_the_service(address):
    assert rpc.health_status(address) == health_pb2.HealthCheckResponse.SERVING
    assert rpc.health_status(address, rpc.SERVICE) == health_pb2.HealthCheckResponse.SERVING


def test_reflection_lists_the_services(address):
    with grpc.insecure_channel(address) as channel:
        stub = reflection_pb2_grpc.ServerReflectionStub(channel)
        request = reflection_pb2.ServerReflectionRequest(list_services="")
        response = next(iter(stub.ServerReflectionInfo(iter([request]), timeout=5)))
    names = {s.name for s in response.list_services_response.service}
    assert {rpc.SERVICE, "grpc.health.v1.Health"} <= names


def test_create_returns_model_info_and_joins_an_identical_spec(stub):
    first = rpc.create_model(stub, "job", _variables(), rpc.sgd(0.5), num_workers=2)
    assert first.created
    info = first.model
    assert info.spec.model_id == "job" and info.spec.num_workers == 2 and info.spec.mode == pb.SYNC
    assert info.spec.sync_timeout_s > 0  # the server default was filled in
    assert json.loads(info.spec.optimizer_config_json)["class_name"] == "SGD"
    assert [(v.name, list(v.shape), v.dtype) for v in info.variables] == [
        ("w", [2, 3], pb.FLOAT32),
        ("b", [2], pb.FLOAT32),
    ]
    assert info.state.step == 0 and info.state.iterations == 0

    # A second worker sends the same spec (other initial values are ignored): it joins.
    other_values = {name: value + 100 for name, value in _variables().items()}
    joined = rpc.create_model(stub, "job", other_values, rpc.sgd(0.5), num_workers=2)
    assert not joined.created
    _, values = rpc.pull(stub, "job")
    np.testing.assert_array_equal(values["w"], _variables()["w"])


def test_create_with_a_different_spec_says_what_differs(stub):
    rpc.create_model(stub, "job", _variables(), rpc.sgd(0.5), num_workers=2)
    error = rpc.rpc_error(
        rpc.create_model, stub, "job", {"w": np.zeros((2, 4), np.float32)}, rpc.sgd(0.1), num_workers=2
    )
    assert error.code() == grpc.StatusCode.ALREADY_EXISTS
    message = error.details()
    assert "learning_rate" in message and "'w'" in message and "'b'" in message
    assert "DeleteModel" in message and "another model_id" in message


def test_push_pull_round_trip_single_worker(stub):
    rpc.create_model(stub, "job", _variables(), rpc.sgd(0.5))
    grads = {"w": np.ones((2, 3), np.float32), "b": np.array([2.0, 4.0], np.float32)}
    result, values = rpc.push(stub, "job", 0, 0, grads, return_variables=True)
    assert (result.step, result.iterations, result.duplicate, list(result.contributors)) == (1, 1, False, [0])
    assert result.learning_rate == pytest.approx(0.5)
    np.testing.assert_array_equal(values["w"], _variables()["w"] - np.float32(0.5))
    np.testing.assert_array_equal(values["b"], np.array([-0.5, -3.0], np.float32))

    result, values = rpc.push(stub, "job", 0, 1, {"b": np.ones(2, np.float32)})
    assert result.step == 2 and values == {}
    state, pulled = rpc.pull(stub, "job", names=["b"])
    assert state.step == 2 and state.iterations == 2
    assert list(pulled) == ["b"]
    np.testing.assert_array_equal(pulled["b"], np.array([-1.0, -3.5], np.float32))


def test_get_weights_sends_slots_in_order_and_can_filter(stub):
    rpc.create_model(stub, "job", _variables(), rpc.sgd(0.5, momentum=0.9))
    rpc.push(stub, "job", 0, 0, {"w": np.ones((2, 3), np.float32), "b": np.ones(2, np.float32)})
    state, tensors = rpc.get_weights(stub, "job")
    assert (state.iterations, state.raw_iterations, state.step) == (1, 1, 1)
    assert state.learning_rate == pytest.approx(0.5)
    assert list(tensors) == [("w", "momentum"), ("b", "momentum")]
    np.testing.assert_array_equal(tensors[("b", "momentum")], np.full(2, -0.5, np.float32))

    _, filtered = rpc.get_weights(stub, "job", names=["b"], include_variables=True)
    assert list(filtered) == [("b", ""), ("b", "momentum")]
    np.testing.assert_array_equal(filtered[("b", "")], np.array([0.0, -1.5], np.float32))


def test_set_weights_overwrites_variables_slots_and_state(stub):
    rpc.create_model(stub, "job", _variables(), rpc.sgd(0.5, momentum=0.9))
    new_w = np.full((2, 3), 7.0, np.float32)
    new_momentum = np.full(2, 0.25, np.float32)
    state = pb.OptimizerState(iterations=5, step=5, learning_rate=0.25)
    response = rpc.set_weights(stub, "job", {("w", ""): new_w, ("b", "momentum"): new_momentum}, state)
    assert (response.state.iterations, response.state.raw_iterations, response.state.step) == (5, 5, 5)
    assert response.state.learning_rate == pytest.approx(0.25)
    got_state, tensors = rpc.get_weights(stub, "job", include_variables=True)
    assert got_state == response.state
    np.testing.assert_array_equal(tensors[("w", "")], new_w)
    np.testing.assert_array_equal(tensors[("b", "momentum")], new_momentum)
    np.testing.assert_array_equal(tensors[("b", "")], _variables()["b"])
    # The model's step moved too: the next push is step 5.
    result, _ = rpc.push(stub, "job", 0, 5, {"b": np.ones(2, np.float32)})
    assert result.step == 6 and result.iterations == 6


def test_list_models_with_stats_and_delete(stub):
    rpc.create_model(stub, "a", _variables())
    rpc.create_model(stub, "b", {"x": np.full(4, 3.0, np.float32)}, mode=pb.ASYNC)
    listed = stub.ListModels(pb.ListModelsRequest(), timeout=5)
    assert sorted(m.spec.model_id for m in listed.models) == ["a", "b"]
    assert all(v.norm == 0 for m in listed.models for v in m.variables)

    (model,) = stub.ListModels(pb.ListModelsRequest(model_id="b", with_stats=True), timeout=5).models
    assert model.spec.mode == pb.ASYNC
    assert model.variables[0].norm == pytest.approx(6.0)

    assert stub.DeleteModel(pb.DeleteModelRequest(model_id="a"), timeout=5).deleted
    assert not stub.DeleteModel(pb.DeleteModelRequest(model_id="a"), timeout=5).deleted
    assert [m.spec.model_id for m in stub.ListModels(pb.ListModelsRequest(), timeout=5).models] == ["b"]
    error = rpc.rpc_error(rpc.pull, stub, "a")
    assert error.code() == grpc.StatusCode.NOT_FOUND and "CreateModel" in error.details()


def test_models_are_independent(stub):
    rpc.create_model(stub, "a", {"x": np.zeros(3, np.float32)}, rpc.sgd(1.0))
    rpc.create_model(stub, "b", {"x": np.zeros(3, np.float32)}, rpc.sgd(1.0))
    rpc.push(stub, "a", 0, 0, {"x": np.ones(3, np.float32)})
    assert rpc.pull(stub, "a")[0].step == 1
    state, values = rpc.pull(stub, "b")
    assert state.step == 0
    np.testing.assert_array_equal(values["x"], np.zeros(3, np.float32))


def test_checkpoint_needs_a_checkpoint_directory(stub):
    error = rpc.rpc_error(stub.Checkpoint, pb.CheckpointRequest(), timeout=5)
    assert error.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "--checkpoint-dir" in error.details() and "GetWeights" in error.details()


def test_a_64_mib_variable_round_trips(stub):
    big = np.random.default_rng(0).standard_normal(16 << 20, dtype=np.float32)  # 64 MiB
    created = rpc.create_model(stub, "big", {"big": big, "small": np.ones(3, np.float32)}, rpc.sgd(0.5, 0.9))
    assert created.created and list(created.model.variables[0].shape) == [16 << 20]
    _, values = rpc.pull(stub, "big")
    np.testing.assert_array_equal(values["big"], big)
    _, tensors = rpc.get_weights(stub, "big", names=["big"], include_variables=True)
    assert list(tensors) == [("big", ""), ("big", "momentum")]
    np.testing.assert_array_equal(tensors[("big", "")], big)
    assert not tensors[("big", "momentum")].any()


def test_cli_serve_prints_the_address_answers_health_and_stops_on_sigterm():
    command = [
        sys.executable,
        "-m",
        "optserve.server",
        "serve",
        "--port",
        "0",
        "--device",
        "cpu",
        "--log-level",
        "WARNING",
    ]
    with subprocess.Popen(
        command,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=ROOT,
        env=dict(os.environ, PYTHONUNBUFFERED="1"),
    ) as process:
        try:
            line = process.stdout.readline().strip()
            assert line.startswith("optserve listening on 127.0.0.1:"), line
            address = line.rsplit(" ", 1)[1]
            assert int(address.rsplit(":", 1)[1]) > 0
            assert rpc.health_status(address, rpc.SERVICE) == health_pb2.HealthCheckResponse.SERVING
            process.send_signal(signal.SIGTERM)
            assert process.wait(timeout=15) == 0
            assert process.stdout.read() == ""  # exactly one line on stdout
        finally:
            if process.poll() is None:
                process.kill()


def test_cli_runs_inspect_and_demo_from_the_client_package_lazily(monkeypatch):
    calls = []
    for name in ("inspect", "demo"):
        module = types.ModuleType(f"optserve.client.{name}")
        module.main = lambda argv, name=name: calls.append((name, argv)) or 0
        monkeypatch.setitem(sys.modules, f"optserve.client.{name}", module)
    assert cli.main(["inspect", "--address", "x:1"]) == 0
    assert cli.main(["demo"]) == 0
    assert calls == [("inspect", ["--address", "x:1"]), ("demo", [])]


def test_serve_does_not_import_the_client_commands():
    code = (
        "import sys; import optserve.server.cli as cli; cli.build_parser(); "
        "assert not any(m.startswith('optserve.client') for m in sys.modules), sorted(sys.modules)"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT)


def test_a_busy_port_is_an_error_not_a_shared_port(server):
    with pytest.raises(OSError, match="another server"):
        start_server(host="127.0.0.1", port=server.port, device="cpu")


def test_concurrent_creates_make_one_model_the_others_join(address):
    results = []

    def create():
        channel, stub = rpc.connect(address)
        with channel:
            results.append(rpc.create_model(stub, "job", _variables(), rpc.sgd(0.5), num_workers=4).created)

    threads = [threading.Thread(target=create) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(20)
    assert sorted(results) == [False, False, False, True]


def test_optimizer_wide_scalars_travel_with_the_state(stub):
    rpc.create_model(stub, "nadam", _variables(), {"class_name": "Nadam", "config": {"learning_rate": 0.01}})
    rpc.push(stub, "nadam", 0, 0, {"w": np.ones((2, 3), np.float32)})
    state, tensors = rpc.get_weights(stub, "nadam")
    assert set(state.scalars) == {"u_product"} and state.scalars["u_product"] != 1.0
    assert [slot for name, slot in tensors if name == "w"] == ["momentum", "velocity"]
    state.scalars["u_product"] = 0.5
    response = rpc.set_weights(stub, "nadam", state=state)
    assert response.state.scalars["u_product"] == pytest.approx(0.5)
    assert rpc.get_weights(stub, "nadam")[0] == response.state


# Empty pushes: a shard of a sharded model whose variables got no gradient in a step.


def test_an_empty_push_is_a_step_that_changes_no_variable(stub):
    rpc.create_model(stub, "job", _variables(), rpc.sgd(0.5, 0.9))
    result, values = rpc.push(stub, "job", 0, 0, {}, return_variables=True)
    assert (result.step, result.iterations, result.duplicate) == (1, 1, False)
    for name, value in _variables().items():
        np.testing.assert_array_equal(values[name], value)
    assert rpc.push(stub, "job", 0, 0, {})[0].duplicate  # a retried empty push is a duplicate too


def test_an_empty_push_is_a_workers_contribution_to_a_sync_step(stub):
    rpc.create_model(stub, "job", _variables(), rpc.sgd(1.0), num_workers=2)
    empty = threading.Thread(target=rpc.push, args=(stub, "job", 0, 0, {}))
    empty.start()
    rpc.wait_until(lambda: rpc.waiting_workers(stub, "job") == [0])
    result, values = rpc.push(stub, "job", 1, 0, {"b": np.ones(2, np.float32)}, return_variables=True)
    empty.join()
    assert (result.step, result.iterations, list(result.contributors)) == (1, 1, [0, 1])
    np.testing.assert_array_equal(values["b"], _variables()["b"] - 1)
    np.testing.assert_array_equal(values["w"], _variables()["w"])


@pytest.mark.filterwarnings("ignore:Gradients do not exist for variables")
def test_an_empty_push_does_what_keras_does_to_variables_without_a_gradient(stub):
    """The server holds `b` only (one shard); Keras holds `w` and `b` and gets no gradient for `b`
    on most steps. Counters, u_product, the EMA and the accumulators must agree."""
    keras = pytest.importorskip("keras")
    config = {"learning_rate": 0.1, "use_ema": True, "gradient_accumulation_steps": 2}
    rpc.create_model(stub, "shard", {"b": _variables()["b"]}, {"class_name": "Nadam", "config": config})
    kw, kb = keras.Variable(_variables()["w"], name="w"), keras.Variable(_variables()["b"], name="b")
    optimizer = keras.optimizers.Nadam(**config)
    optimizer.build([kw, kb])
    rng = np.random.default_rng(0)
    for step in range(7):
        gw = rng.standard_normal((2, 3)).astype(np.float32)
        gb = rng.standard_normal(2).astype(np.float32) if step % 3 == 2 else None
        optimizer.apply([gw, gb], [kw, kb])
        rpc.push(stub, "shard", 0, step, {} if gb is None else {"b": gb})
    state, tensors = rpc.get_weights(stub, "shard", include_variables=True)
    assert (state.iterations, state.raw_iterations) == (int(optimizer.iterations), int(optimizer._iterations))
    assert state.raw_iterations == 7
    assert state.scalars["u_product"] == pytest.approx(float(optimizer._u_product), rel=0, abs=0)
    keras_slots = {v.path.rsplit("/", 1)[-1]: np.asarray(v) for v in optimizer.variables}
    np.testing.assert_array_equal(tensors[("b", "")], np.asarray(kb))
    for (_name, slot), value in tensors.items():
        if slot:
            np.testing.assert_array_equal(value, keras_slots[f"b_{slot}"], err_msg=slot)


# The server's response encoders (protos/tensors.py): same messages as batch_chunks(encode_many(...)).


def _mixed_tensors():
    rng = np.random.default_rng(3)
    return [
        ("big", "", rng.standard_normal(300_000).astype(np.float32)),  # 1.2 MB: two chunks
        ("m", "momentum", np.arange(7, dtype=">f8")),  # big-endian input
        ("empty", "", np.zeros((0, 4), np.float32)),
        ("scalar", "", np.float64(2.5)),
        *[(f"small{i}", "", np.full(1000, i, np.float32)) for i in range(300)],
    ]  # batched several a message


def _reference_messages(first, field, tensors, chunk_bytes):
    batches = list(codec.batch_chunks(codec.encode_many(tensors, chunk_bytes), chunk_bytes))
    getattr(first, field).extend(batches[0])
    return [first] + [type(first)(**{field: batch}) for batch in batches[1:]]


@pytest.mark.parametrize("chunk_bytes", [1 << 20, 4096])
def test_response_encoders_match_batched_chunks(chunk_bytes):
    def first():
        return pb.PullResponse(state=pb.StepResult(step=4, contributors=[0, 2]))

    expected = _reference_messages(first(), "variables", _mixed_tensors(), chunk_bytes)
    built = list(codec.chunk_messages(first(), "variables", _mixed_tensors(), chunk_bytes))
    wire = [
        pb.PullResponse.FromString(raw)
        for raw in codec.serialized_chunk_messages(first(), "variables", _mixed_tensors(), chunk_bytes)
    ]
    assert built == expected and wire == expected
    decoded = codec.decode_all(chunk for message in wire for chunk in message.variables)
    for name, slot, array in _mixed_tensors():
        np.testing.assert_array_equal(decoded[(name, slot)], array)


def test_response_encoders_send_the_first_message_alone_when_there_are_no_tensors():
    first = pb.GetWeightsResponse(state=pb.OptimizerState(iterations=3))
    assert list(codec.chunk_messages(first, "tensors", [])) == [first]
    assert list(codec.serialized_chunk_messages(first, "tensors", [])) == [first.SerializeToString()]
