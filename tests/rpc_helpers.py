"""Drive an optserve server through the generated stubs (no client library), for the server tests."""

from __future__ import annotations

import json
import time
from collections.abc import Iterable, Mapping

import grpc
import numpy as np
from grpc_health.v1 import health_pb2, health_pb2_grpc

from optserve.protos import optserve_pb2 as pb
from optserve.protos import optserve_pb2_grpc as pb_grpc
from optserve.protos import tensors as codec

SERVICE = "optserve.v1.ParameterServer"
TIMEOUT_S = 20.0


def sgd(learning_rate: float = 0.1, momentum: float = 0.0) -> dict:
    return {"class_name": "SGD", "config": {"learning_rate": learning_rate, "momentum": momentum}}


def connect(address: str) -> tuple[grpc.Channel, pb_grpc.ParameterServerStub]:
    channel = grpc.insecure_channel(address, options=codec.GRPC_OPTIONS)
    return channel, pb_grpc.ParameterServerStub(channel)


def health_status(address: str, service: str = "") -> int:
    with grpc.insecure_channel(address) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        return stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=5).status


def _batches(tensors: Iterable[tuple[str, str, np.ndarray]]):
    return codec.batch_chunks(codec.encode_many(tensors))


def _variable_tensors(values: Mapping[str, np.ndarray]):
    return ((name, "", np.asarray(value)) for name, value in values.items())


def create_model(
    stub,
    model_id: str,
    variables: Mapping[str, np.ndarray],
    optimizer=None,
    *,
    num_workers: int = 1,
    mode=pb.SYNC,
    sync_timeout_s: float = 0.0,
    timeout_policy=pb.FAIL,
    non_finite_policy=pb.NON_FINITE_POLICY_UNSPECIFIED,
) -> pb.CreateModelResponse:
    config = optimizer if optimizer is not None else sgd()
    spec = pb.ModelSpec(
        model_id=model_id,
        optimizer_config_json=json.dumps(config),
        num_workers=num_workers,
        mode=mode,
        sync_timeout_s=sync_timeout_s,
        timeout_policy=timeout_policy,
        non_finite_policy=non_finite_policy,
    )

    def requests():
        yield pb.CreateModelRequest(spec=spec)
        for batch in _batches(_variable_tensors(variables)):
            yield pb.CreateModelRequest(variables=batch)

    return stub.CreateModel(requests(), timeout=TIMEOUT_S)


def push(
    stub,
    model_id: str,
    worker: int,
    step: int,
    gradients: Mapping[str, np.ndarray],
    *,
    aggregated: bool = False,
    return_variables: bool = False,
    timeout: float = TIMEOUT_S,
) -> tuple[pb.StepResult, dict[str, np.ndarray]]:
    header = pb.ApplyGradientsHeader(
        model_id=model_id, worker_index=worker, step=step, aggregated=aggregated, return_variables=return_variables
    )

    def requests():
        yield pb.ApplyGradientsRequest(header=header)
        for batch in _batches(_variable_tensors(gradients)):
            yield pb.ApplyGradientsRequest(gradients=batch)

    result = None
    assembler = codec.TensorAssembler()
    for response in stub.ApplyGradients(requests(), timeout=timeout):
        if result is None:
            result = response.result
        assembler.add_all(response.variables)
    return result, codec.variables_only(assembler.result())


def pull(stub, model_id: str, names: Iterable[str] = ()) -> tuple[pb.StepResult, dict[str, np.ndarray]]:
    state = None
    assembler = codec.TensorAssembler()
    for response in stub.Pull(pb.PullRequest(model_id=model_id, names=list(names)), timeout=TIMEOUT_S):
        if state is None:
            state = response.state
        assembler.add_all(response.variables)
    return state, codec.variables_only(assembler.result())


def get_weights(
    stub, model_id: str, names: Iterable[str] = (), include_variables: bool = False
) -> tuple[pb.OptimizerState, dict[tuple[str, str], np.ndarray]]:
    """State and ``{(variable, slot): value}`` in the order the server sent them."""
    state = None
    assembler = codec.TensorAssembler()
    request = pb.GetWeightsRequest(model_id=model_id, names=list(names), include_variables=include_variables)
    for response in stub.GetWeights(request, timeout=TIMEOUT_S):
        if state is None:
            state = response.state
        assembler.add_all(response.tensors)
    return state, assembler.result()


def set_weights(
    stub, model_id: str, tensors: Mapping[tuple[str, str], np.ndarray] = (), state: pb.OptimizerState | None = None
) -> pb.SetWeightsResponse:
    tensors = dict(tensors)

    def requests():
        first = pb.SetWeightsRequest(model_id=model_id, has_state=state is not None)
        if state is not None:
            first.state.CopyFrom(state)
        yield first
        for batch in _batches((name, slot, value) for (name, slot), value in tensors.items()):
            yield pb.SetWeightsRequest(tensors=batch)

    return stub.SetWeights(requests(), timeout=TIMEOUT_S)


def snapshot(stub, model_id: str):
    """Everything observable about a model's state, to compare before and after a refused request."""
    state, tensors = get_weights(stub, model_id, include_variables=True)
    return state, tensors


def assert_same_snapshot(before, after) -> None:
    (state_a, tensors_a), (state_b, tensors_b) = before, after
    assert state_a == state_b
    assert list(tensors_a) == list(tensors_b)
    for key in tensors_a:
        np.testing.assert_array_equal(tensors_a[key], tensors_b[key], err_msg=str(key))


def rpc_error(call, *args, **kwargs) -> grpc.RpcError:
    """Run ``call`` and return the RpcError it raised (fails the test if it succeeded)."""
    try:
        call(*args, **kwargs)
    except grpc.RpcError as error:
        return error
    raise AssertionError(f"{getattr(call, '__name__', call)} succeeded; expected an error")


def trailing(error: grpc.RpcError) -> dict[str, str]:
    return {key: value for key, value in (error.trailing_metadata() or ())}


def wait_until(predicate, timeout: float = 10.0, interval: float = 0.01) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached in time")
        time.sleep(interval)


def waiting_workers(stub, model_id: str) -> list[int]:
    response = stub.ListModels(pb.ListModelsRequest(model_id=model_id), timeout=TIMEOUT_S)
    return list(response.models[0].waiting_workers)
