"""docs/protocol.md, checked against a real server with raw protobuf messages.

Everything here is built from the document and the generated messages alone: no
optserve client library and no optserve tensor codec (tensors are encoded by hand,
little-endian, C order, chunked as the document says).
"""

from __future__ import annotations

import json
import pathlib
import re
import threading

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2

from optserve.protos import optserve_pb2 as pb
from optserve.server.app import start_server

DOC = pathlib.Path(__file__).resolve().parents[1] / "docs" / "protocol.md"
SERVICE = "optserve.v1.ParameterServer"
SGD = json.dumps({"class_name": "SGD", "config": {"learning_rate": 0.1}})
TIMEOUT = 20


def golden_bytes() -> bytes:
    block = re.search(r"```golden\n(.*?)```", DOC.read_text(), re.S).group(1)
    return bytes.fromhex(block.replace("\n", " "))


def chunks(name: str, array: np.ndarray, chunk_bytes: int, slot: str = "") -> list[pb.TensorChunk]:
    """A tensor as the document says: every chunk repeats name, slot, dtype, shape; contiguous from 0."""
    dtype = {np.dtype("<f4"): pb.FLOAT32, np.dtype("<f8"): pb.FLOAT64}[array.dtype.newbyteorder("<")]
    raw = np.ascontiguousarray(array, array.dtype.newbyteorder("<")).tobytes()
    pieces = [raw[i : i + chunk_bytes] for i in range(0, len(raw), chunk_bytes)] or [b""]
    offsets = np.cumsum([0] + [len(p) for p in pieces[:-1]])
    return [
        pb.TensorChunk(name=name, slot=slot, dtype=dtype, shape=list(array.shape), offset=int(offset), data=p)
        for offset, p in zip(offsets, pieces)
    ]


def assemble(received: list[pb.TensorChunk]) -> dict[tuple[str, str], np.ndarray]:
    buffers, meta = {}, {}
    for chunk in received:
        key = (chunk.name, chunk.slot)
        buffer = buffers.setdefault(key, bytearray())
        assert chunk.offset == len(buffer), "chunks arrive contiguous and ascending"
        buffer += chunk.data
        meta.setdefault(key, (chunk.dtype, tuple(chunk.shape)))
        assert meta[key] == (chunk.dtype, tuple(chunk.shape)), "every chunk repeats dtype and shape"
    dtypes = {pb.FLOAT32: "<f4", pb.FLOAT64: "<f8"}
    return {key: np.frombuffer(bytes(buffers[key]), dtypes[d]).reshape(s) for key, (d, s) in meta.items()}


class Raw:
    """Calls by method path with the generated messages' own (de)serializers."""

    def __init__(self, channel: grpc.Channel):
        self.channel = channel

    def _method(self, kind, name, request_type, response_type):
        return getattr(self.channel, kind)(
            f"/{SERVICE}/{name}",
            request_serializer=request_type.SerializeToString,
            response_deserializer=response_type.FromString,
        )

    def create(self, messages):
        return self._method("stream_unary", "CreateModel", pb.CreateModelRequest, pb.CreateModelResponse)(
            iter(messages), timeout=TIMEOUT
        )

    def push(self, messages, timeout=TIMEOUT):
        call = self._method("stream_stream", "ApplyGradients", pb.ApplyGradientsRequest, pb.ApplyGradientsResponse)
        return list(call(iter(messages), timeout=timeout))

    def pull(self, request):
        return list(self._method("unary_stream", "Pull", pb.PullRequest, pb.PullResponse)(request, timeout=TIMEOUT))

    def get_weights(self, request):
        call = self._method("unary_stream", "GetWeights", pb.GetWeightsRequest, pb.GetWeightsResponse)
        return list(call(request, timeout=TIMEOUT))

    def set_weights(self, messages):
        return self._method("stream_unary", "SetWeights", pb.SetWeightsRequest, pb.SetWeightsResponse)(
            iter(messages), timeout=TIMEOUT
        )

    def list_models(self, request):
        return self._method("unary_unary", "ListModels", pb.ListModelsRequest, pb.ListModelsResponse)(
            request, timeout=TIMEOUT
        )

    def delete(self, request):
        return self._method("unary_unary", "DeleteModel", pb.DeleteModelRequest, pb.DeleteModelResponse)(
            request, timeout=TIMEOUT
        )

    def checkpoint(self):
        return self._method("unary_unary", "Checkpoint", pb.CheckpointRequest, pb.CheckpointResponse)(
            pb.CheckpointRequest(), timeout=TIMEOUT
        )


def error_of(call, *args, **kwargs) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as caught:
        call(*args, **kwargs)
    return caught.value


def trailing(error: grpc.RpcError) -> dict[str, str]:
    return dict(error.trailing_metadata() or ())


@pytest.fixture(scope="module")
def servers(tmp_path_factory):
    plain = start_server(port=0, device="cpu")
    with_checkpoints = start_server(
        port=0, device="cpu", checkpoint_dir=tmp_path_factory.mktemp("ckpt"), checkpoint_every="off"
    )
    yield plain, with_checkpoints
    plain.stop()
    with_checkpoints.stop()


@pytest.fixture
def raw(servers):
    with grpc.insecure_channel(servers[0].address) as channel:  # default options: 4 MiB received messages
        yield Raw(channel)


def test_the_golden_chunk_is_what_the_document_says_and_the_server_takes_it(raw):
    data = golden_bytes()
    assert len(data) == 21
    chunk = pb.TensorChunk.FromString(data)
    assert (chunk.name, chunk.slot, chunk.dtype, list(chunk.shape), chunk.offset) == ("w", "", pb.FLOAT32, [2, 2], 8)
    assert np.frombuffer(chunk.data, "<f4").tolist() == [1.0, -2.0]
    assert chunk.SerializeToString() == data
    first = pb.TensorChunk(name="w", dtype=pb.FLOAT32, shape=[2, 2], offset=0, data=np.array([5, 6], "<f4").tobytes())
    spec = pb.ModelSpec(model_id="golden", optimizer_config_json=SGD)
    raw.create([pb.CreateModelRequest(spec=spec, variables=[first]), pb.CreateModelRequest(variables=[chunk])])
    (reply, *more) = raw.pull(pb.PullRequest(model_id="golden"))
    values = assemble([c for message in (reply, *more) for c in message.variables])
    assert values[("w", "")].tolist() == [[5.0, 6.0], [1.0, -2.0]]
    assert raw.delete(pb.DeleteModelRequest(model_id="golden")).deleted


def test_every_rpc_as_the_document_describes(servers, raw):
    kernel = np.arange(6, dtype="<f4").reshape(2, 3)
    bias = np.array([0.5, -1.0], "<f8")
    spec = pb.ModelSpec(model_id="doc", optimizer_config_json=SGD, num_workers=2, sync_timeout_s=30)
    # The spec in the first message only; the tensors later, kernel split in 3 chunks of 8 bytes.
    created = raw.create(
        [
            pb.CreateModelRequest(spec=spec),
            pb.CreateModelRequest(variables=chunks("kernel", kernel, 8)),
            pb.CreateModelRequest(variables=chunks("bias", bias, 1 << 20)),
        ]
    )
    assert created.created and created.model.state.step == 0
    joined = raw.create(
        [pb.CreateModelRequest(spec=spec, variables=chunks("kernel", kernel, 1 << 20) + chunks("bias", bias, 1 << 20))]
    )
    assert not joined.created and joined.model.state.step == 0  # a joiner reads the step here

    # Step 0: worker 1 pushes nothing (a contribution all the same), worker 0 pushes both gradients.
    answers = {}

    def push(worker, gradients):
        header = pb.ApplyGradientsHeader(model_id="doc", worker_index=worker, step=0)
        answers[worker] = raw.push(
            [pb.ApplyGradientsRequest(header=header), pb.ApplyGradientsRequest(gradients=gradients)]
        )

    gradient = np.ones((2, 3), "<f4")
    waiting = threading.Thread(target=push, args=(1, []))
    waiting.start()
    push(0, chunks("kernel", gradient, 1 << 20) + chunks("bias", np.ones(2, "<f8"), 1 << 20))
    waiting.join(TIMEOUT)
    for worker in (0, 1):
        result = answers[worker][0].result
        assert (result.step, result.iterations, list(result.contributors)) == (1, 1, [0, 1])
        assert result.learning_rate == pytest.approx(0.1)
    repeated = raw.push(
        [pb.ApplyGradientsRequest(header=pb.ApplyGradientsHeader(model_id="doc", worker_index=1, step=0))]
    )
    assert repeated[0].result.duplicate and repeated[0].result.step == 1

    future = error_of(
        raw.push, [pb.ApplyGradientsRequest(header=pb.ApplyGradientsHeader(model_id="doc", worker_index=0, step=5))]
    )
    assert future.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert trailing(future)["optserve-current-step"] == "1"
    wrong = error_of(
        raw.push,
        [
            pb.ApplyGradientsRequest(
                header=pb.ApplyGradientsHeader(model_id="doc", worker_index=0, step=1),
                gradients=chunks("kernel", np.ones((3, 2), "<f4"), 1 << 20),
            )
        ],
    )
    assert wrong.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "shape [3, 2] float32" in wrong.details() and "shape [2, 3] float32" in wrong.details()
    no_header = error_of(raw.push, [pb.ApplyGradientsRequest(gradients=chunks("bias", bias, 1 << 20))])
    assert no_header.code() == grpc.StatusCode.INVALID_ARGUMENT

    # Pull: state in the first message only, then tensors.
    first, *rest = raw.pull(pb.PullRequest(model_id="doc", names=["kernel"]))
    assert first.state.step == 1 and all(not m.HasField("state") for m in rest)
    pulled = assemble([c for m in (first, *rest) for c in m.variables])
    np.testing.assert_array_equal(pulled[("kernel", "")], kernel - 0.1 * gradient)

    first, *rest = raw.get_weights(pb.GetWeightsRequest(model_id="doc", include_variables=True))
    assert first.state.iterations == 1 and first.state.step == 1
    weights = assemble([c for m in (first, *rest) for c in m.tensors])
    assert set(weights) == {("kernel", ""), ("bias", "")}  # SGD without momentum has no slots

    # SetWeights with `state` present (field presence), tensors in a later message.
    state = pb.OptimizerState(iterations=7, step=3)
    reply = raw.set_weights(
        [
            pb.SetWeightsRequest(model_id="doc", state=state),
            pb.SetWeightsRequest(tensors=chunks("bias", np.zeros(2, "<f8"), 1 << 20)),
        ]
    )
    assert (reply.state.iterations, reply.state.raw_iterations, reply.state.step) == (7, 7, 3)
    assert reply.state.learning_rate == pytest.approx(0.1)  # 0 keeps the rate
    tensors_only = raw.set_weights(
        [pb.SetWeightsRequest(model_id="doc", tensors=chunks("bias", np.ones(2, "<f8"), 1 << 20))]
    )
    assert tensors_only.state.iterations == 7  # no state: counters untouched
    legacy = pb.SetWeightsRequest(model_id="doc", has_state=True)
    legacy.state.CopyFrom(pb.OptimizerState(iterations=8, step=3))
    assert raw.set_weights([legacy]).state.iterations == 8
    disagree = error_of(
        raw.set_weights,
        [pb.SetWeightsRequest(model_id="doc", state=pb.OptimizerState(iterations=2, raw_iterations=5, step=3))],
    )
    assert disagree.code() == grpc.StatusCode.INVALID_ARGUMENT

    listed = raw.list_models(pb.ListModelsRequest(model_id="doc", with_stats=True)).models[0]
    assert [v.name for v in listed.variables] == ["kernel", "bias"]
    assert all(v.HasField("norm") for v in listed.variables)
    assert listed.variables[1].norm == pytest.approx(np.sqrt(2))
    assert not any(v.HasField("norm") for v in raw.list_models(pb.ListModelsRequest()).models[0].variables)
    assert error_of(raw.list_models, pb.ListModelsRequest(model_id="nope")).code() == grpc.StatusCode.NOT_FOUND

    missing = error_of(raw.pull, pb.PullRequest(model_id="nope"))
    assert missing.code() == grpc.StatusCode.NOT_FOUND
    assert raw.delete(pb.DeleteModelRequest(model_id="doc")).deleted
    assert not raw.delete(pb.DeleteModelRequest(model_id="doc")).deleted

    no_dir = error_of(raw.checkpoint)
    assert no_dir.code() == grpc.StatusCode.FAILED_PRECONDITION
    with grpc.insecure_channel(servers[1].address) as channel:
        written = Raw(channel).checkpoint()
    assert written.path and written.models == 0


def test_a_step_timeout_carries_the_documented_metadata(raw):
    spec = pb.ModelSpec(
        model_id="late", optimizer_config_json=SGD, num_workers=2, sync_timeout_s=0.2, timeout_policy=pb.FAIL
    )
    raw.create([pb.CreateModelRequest(spec=spec, variables=chunks("w", np.zeros(2, "<f4"), 8))])
    timed_out = error_of(
        raw.push, [pb.ApplyGradientsRequest(header=pb.ApplyGradientsHeader(model_id="late", worker_index=0, step=0))]
    )
    assert timed_out.code() == grpc.StatusCode.ABORTED
    assert trailing(timed_out)["optserve-current-step"] == "0"
    assert trailing(timed_out)["optserve-missing-workers"] == "1"
    raw.delete(pb.DeleteModelRequest(model_id="late"))


def test_chunks_out_of_order_or_a_single_large_chunk(raw):
    spec = pb.ModelSpec(model_id="chunks", optimizer_config_json=SGD)
    a, b = chunks("w", np.zeros(4, "<f4"), 8)
    refused = error_of(raw.create, [pb.CreateModelRequest(spec=spec, variables=[b, a])])
    assert refused.code() == grpc.StatusCode.INVALID_ARGUMENT
    # One 5 MB chunk in one message: within the server's 8 MiB per message.
    big = np.zeros(5_000_000 // 4, "<f4")
    created = raw.create([pb.CreateModelRequest(spec=spec, variables=chunks("w", big, len(big) * 4))])
    assert created.created
    raw.delete(pb.DeleteModelRequest(model_id="chunks"))


def test_health_and_both_reflection_versions(servers):
    with grpc.insecure_channel(servers[0].address) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        for service in ("", SERVICE):
            assert (
                health.Check(health_pb2.HealthCheckRequest(service=service), timeout=TIMEOUT).status
                == health_pb2.HealthCheckResponse.SERVING
            )
        for package in ("grpc.reflection.v1", "grpc.reflection.v1alpha"):
            call = channel.stream_stream(
                f"/{package}.ServerReflection/ServerReflectionInfo",
                request_serializer=reflection_pb2.ServerReflectionRequest.SerializeToString,
                response_deserializer=reflection_pb2.ServerReflectionResponse.FromString,
            )
            listed, described = call(
                iter(
                    [
                        reflection_pb2.ServerReflectionRequest(list_services=""),
                        reflection_pb2.ServerReflectionRequest(file_containing_symbol=SERVICE),
                    ]
                ),
                timeout=TIMEOUT,
            )
            names = {s.name for s in listed.list_services_response.service}
            assert {
                SERVICE,
                "grpc.health.v1.Health",
                "grpc.reflection.v1.ServerReflection",
                "grpc.reflection.v1alpha.ServerReflection",
            } <= names, package
            assert described.file_descriptor_response.file_descriptor_proto, package
        (v1,) = channel.stream_stream(
            "/grpc.reflection.v1.ServerReflection/ServerReflectionInfo",
            request_serializer=reflection_pb2.ServerReflectionRequest.SerializeToString,
            response_deserializer=reflection_pb2.ServerReflectionResponse.FromString,
        )(
            iter(
                [reflection_pb2.ServerReflectionRequest(file_containing_symbol="grpc.reflection.v1.ServerReflection")]
            ),
            timeout=TIMEOUT,
        )
        assert v1.file_descriptor_response.file_descriptor_proto


def test_field_presence_kept_the_wire_format():
    """`optional` kept field numbers and wire types: bytes of the old form read the same."""
    state_bytes = pb.OptimizerState(iterations=3).SerializeToString()
    old_form = b"\x0a\x01m" + b"\x12" + bytes([len(state_bytes)]) + state_bytes + b"\x18\x01"
    request = pb.SetWeightsRequest.FromString(old_form)
    assert request.HasField("state") and request.has_state and request.state.iterations == 3
    info = pb.VariableInfo(name="w", norm=0.0)
    assert info.SerializeToString() == b"\x0a\x01w" + b"\x29" + bytes(8)  # field 5, fixed64, 0.0
    assert not pb.VariableInfo.FromString(b"\x0a\x01w").HasField("norm")
