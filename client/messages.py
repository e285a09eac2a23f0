"""The wire's messages as the client's domain values, and back (``optserve.client.types``)."""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np

from optserve.client.activity import activity_from_message
from optserve.client.types import (
    ModelInfo,
    ModelSpec,
    OptimizerState,
    ServerGeneration,
    StepResult,
    VariableInfo,
)
from optserve.protos import optserve_pb2 as pb
from optserve.protos import tensors
from optserve.protos.errors import OptserveError

# (name, slot, array): one tensor as the wire names it; slot "" is the variable itself.
Tensor = tuple[str, str, np.ndarray]

_MODES = {"sync": pb.SYNC, "async": pb.ASYNC}
_MODE_NAMES = {pb.SYNC: "sync", pb.ASYNC: "async", pb.SYNC_MODE_UNSPECIFIED: "sync"}
_POLICIES = {"fail": pb.FAIL, "apply_partial": pb.APPLY_PARTIAL}
_NON_FINITE = {"reject": pb.NON_FINITE_REJECT, "allow": pb.NON_FINITE_ALLOW, "skip_step": pb.NON_FINITE_SKIP_STEP}
_POLICY_NAMES = {pb.FAIL: "fail", pb.APPLY_PARTIAL: "apply_partial", pb.TIMEOUT_POLICY_UNSPECIFIED: "fail"}


def variable_tensors(arrays: Mapping[str, Any]) -> list[Tensor]:
    return [(name, "", array) for name, array in arrays.items()]


def spec_message(spec: ModelSpec) -> pb.ModelSpec:
    return pb.ModelSpec(
        model_id=spec.model_id,
        optimizer_config_json=spec.optimizer_config_json,
        num_workers=spec.num_workers,
        mode=_MODES[spec.mode],
        sync_timeout_s=spec.sync_timeout_s,
        timeout_policy=_POLICIES[spec.timeout_policy],
        non_finite_policy=(
            pb.NON_FINITE_POLICY_UNSPECIFIED if spec.non_finite_policy is None else _NON_FINITE[spec.non_finite_policy]
        ),
    )


def state_message(state: OptimizerState) -> pb.OptimizerState:
    message = pb.OptimizerState(
        iterations=state.iterations,
        raw_iterations=state.raw_iterations,
        learning_rate=state.learning_rate,
        step=state.step,
    )
    message.scalars.update(state.scalars)
    if state.learning_rate_schedule is not None:
        message.learning_rate_schedule_json = json.dumps(state.learning_rate_schedule, default=_json_default)
    return message


def _json_default(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    raise TypeError(f"Object of type {type(value).__name__} is not JSON serializable")


def generation(message: pb.StepResult | pb.OptimizerState) -> ServerGeneration | None:
    if not message.HasField("generation"):
        return None  # a server from before generations were reported
    return ServerGeneration(message.generation.server_id, message.generation.restored_checkpoint)


def step_result(message: pb.StepResult) -> StepResult:
    return StepResult(
        step=int(message.step),
        iterations=int(message.iterations),
        learning_rate=float(message.learning_rate),
        duplicate=bool(message.duplicate),
        contributors=[int(w) for w in message.contributors],
        missing_workers=[int(w) for w in message.missing_workers],
        generation=generation(message),
        skipped_non_finite=bool(message.skipped_non_finite),
        non_finite_variables=list(message.non_finite_variables),
        scalars={str(k): float(v) for k, v in message.scalars.items()},
    )


def optimizer_state(message: pb.OptimizerState) -> OptimizerState:
    return OptimizerState(
        iterations=int(message.iterations),
        raw_iterations=int(message.raw_iterations),
        learning_rate=float(message.learning_rate),
        step=int(message.step),
        scalars={k: float(v) for k, v in sorted(message.scalars.items())},
        generation=generation(message),
        learning_rate_schedule=_parse_config(message.learning_rate_schedule_json),
    )


def _parse_config(text: str) -> Any:
    try:
        return json.loads(text) if text else None
    except ValueError:
        return text


def optimizer_class_name(config: Any) -> str:
    """``"Adam"`` from any of the accepted config forms ("adam", serialized dict, bare config)."""
    if isinstance(config, str):
        return config
    if isinstance(config, Mapping):
        name = config.get("class_name") or config.get("registered_name")
        if name:
            return str(name)
        inner = config.get("config")
        if isinstance(inner, Mapping) and inner.get("name"):
            return str(inner["name"])
    return "?"


def model_info(message: pb.ModelInfo, *, created: bool | None = None, with_stats: bool = False) -> ModelInfo:
    config = _parse_config(message.spec.optimizer_config_json)
    variables = [
        VariableInfo(
            name=v.name,
            shape=tuple(int(d) for d in v.shape),
            dtype=tensors.dtype_from_proto(v.dtype).name if v.dtype else "?",
            slots=list(v.slots),
            norm=float(v.norm) if with_stats else None,
        )
        for v in message.variables
    ]
    state = optimizer_state(message.state)
    return ModelInfo(
        model_id=message.spec.model_id,
        created=created,
        step=state.step,
        iterations=state.iterations,
        learning_rate=state.learning_rate,
        num_workers=int(message.spec.num_workers),
        mode=_MODE_NAMES.get(message.spec.mode, "sync"),
        variables=variables,
        optimizer=optimizer_class_name(config),
        optimizer_config=config,
        raw_iterations=state.raw_iterations,
        scalars=state.scalars,
        sync_timeout_s=float(message.spec.sync_timeout_s),
        timeout_policy=_POLICY_NAMES.get(message.spec.timeout_policy, "fail"),
        waiting_workers=[int(w) for w in message.waiting_workers],
        generation=state.generation,
        activity=activity_from_message(message),
        learning_rate_schedule=state.learning_rate_schedule,
    )


def read_stream(
    responses: Iterable[bytes], message_type: Any, head_field: str, chunk_field: str, allocate=None
) -> tuple[Any, dict[tuple[str, str], np.ndarray]]:
    """(first message's ``head_field``, {(name, slot): array}) from a server stream of wire bytes;
    ``allocate``: see TensorAssembler (the transport's reused receive arrays)."""
    head = None
    assembler = tensors.TensorAssembler(allocate=allocate)
    try:
        for raw in responses:
            response, chunks = tensors.split_message(raw, message_type, chunk_field)
            if head is None and response.HasField(head_field):
                head = getattr(response, head_field)
            assembler.add_all(chunks)
        values = assembler.result()
    except tensors.TensorFormatError as error:
        raise OptserveError(f"The server's reply is malformed: {error}") from None
    if head is None:
        raise OptserveError(f"The server's reply carried no {head_field!r}.")
    return head, values
