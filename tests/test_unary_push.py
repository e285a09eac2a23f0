"""ApplyGradientsUnary: pushes that fit in one message go as one call each way; the rest stream."""

from __future__ import annotations

import asyncio

import grpc
import numpy as np
import pytest
import rpc_helpers

from optserve.client import Client
from optserve.protos import optserve_pb2 as pb
from optserve.protos import tensors as codec
from optserve.server import unary_reply

SGD = {"class_name": "SGD", "config": {"learning_rate": 0.5}}


def test_a_small_push_goes_unary_and_matches_the_streamed_one(address):
    gradient = {"w": np.full(16, 2.0, np.float32)}
    results = {}
    for unary in (True, False):
        with Client(address, shared_memory=False) as client:
            client.transport._unary = unary
            client.create_model(f"small-{unary}", SGD, {"w": np.ones(16, np.float32)})
            results[unary] = client.push_pull(f"small-{unary}", gradient)
    assert results[True][0].step == results[False][0].step == 1
    np.testing.assert_array_equal(results[True][1]["w"], results[False][1]["w"])
    np.testing.assert_array_equal(results[True][1]["w"], np.zeros(16, np.float32))


def test_a_reply_too_large_for_one_message_is_refused_before_applying_and_then_streamed(address):
    big = unary_reply.MAX_UNARY_REPLY_BYTES // 4 + 1
    variables = {"big": np.zeros(big, np.float32), "b": np.ones(4, np.float32)}
    channel, stub = rpc_helpers.connect(address)
    with channel, Client(address, shared_memory=False) as client:
        client.create_model("large-reply", SGD, variables)
        header = pb.ApplyGradientsHeader(model_id="large-reply", worker_index=0, step=0, return_variables=True)
        first = pb.ApplyGradientsRequest(header=header)
        (request,) = codec.chunk_messages(first, "gradients", [("b", "", np.ones(4, np.float32))])
        with pytest.raises(grpc.RpcError) as refused:
            stub.ApplyGradientsUnary(request, timeout=30)
        assert refused.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert "ApplyGradients" in refused.value.details()
        assert client.pull("large-reply", ["b"])[0].step == 0  # nothing applied
        result, values = client.push_pull("large-reply", {"b": np.ones(4, np.float32)})
        assert result.step == 1 and values["big"].shape == (big,)  # streamed instead, applied once
        np.testing.assert_array_equal(values["b"], np.full(4, 0.5, np.float32))
        assert "large-reply" in client.transport._streamed_models


def test_a_reply_of_one_message_is_that_message_and_more_are_merged_without_touching_them():
    async def merged(*responses):
        async def stream():
            for response in responses:
                yield response

        return await unary_reply.merged(stream(), pb.ApplyGradientsResponse)

    first = pb.ApplyGradientsResponse(result=pb.StepResult(step=3))
    assert asyncio.run(merged(first)) is first  # not copied
    as_bytes = first.SerializeToString()
    assert asyncio.run(merged(as_bytes)) is as_bytes  # passed through to the serializer
    assert asyncio.run(merged()) == pb.ApplyGradientsResponse()
    second = pb.ApplyGradientsResponse(variables=[pb.TensorChunk(name="w", data=b"1234")])
    both = asyncio.run(merged(first, second.SerializeToString()))
    assert both.result.step == 3 and both.variables[0].name == "w"
    assert not first.variables and not second.HasField("result")  # the parts are read, never merged into
