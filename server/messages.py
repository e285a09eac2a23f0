"""Conversions between optserve.v1 messages and the server's own objects: a model's
spec fields and enums, optimizer state, step results, model listings. Pure
functions; the servicer (``optserve.server.servicer``) calls them on each side
of a domain call.
"""

from __future__ import annotations

import json

from optserve.protos import optserve_pb2 as pb
from optserve.protos import tensors as codec
from optserve.server.errors import InvalidArgumentError
from optserve.server.generation import ServerGeneration
from optserve.server.limits import Reservation
from optserve.server.model import StepOutcome
from optserve.server.model_access import ModelSummary
from optserve.server.model_spec import APPLY_PARTIAL, ASYNC, FAIL, SYNC
from optserve.server.optimizer_state import OptimizerStatus, StateUpdate

MODE_FROM_PROTO = {pb.SYNC_MODE_UNSPECIFIED: SYNC, pb.SYNC: SYNC, pb.ASYNC: ASYNC}
_MODE_TO_PROTO = {SYNC: pb.SYNC, ASYNC: pb.ASYNC}
POLICY_FROM_PROTO = {pb.TIMEOUT_POLICY_UNSPECIFIED: FAIL, pb.FAIL: FAIL, pb.APPLY_PARTIAL: APPLY_PARTIAL}
_POLICY_TO_PROTO = {FAIL: pb.FAIL, APPLY_PARTIAL: pb.APPLY_PARTIAL}
# Unspecified: the server's default (reject; allow for a LossScaleOptimizer), see make_spec.
NON_FINITE_FROM_PROTO = {
    pb.NON_FINITE_POLICY_UNSPECIFIED: None,
    pb.NON_FINITE_REJECT: "reject",
    pb.NON_FINITE_ALLOW: "allow",
    pb.NON_FINITE_SKIP_STEP: "skip_step",
}
_NON_FINITE_TO_PROTO = {
    "reject": pb.NON_FINITE_REJECT,
    "allow": pb.NON_FINITE_ALLOW,
    "skip_step": pb.NON_FINITE_SKIP_STEP,
}


def generation_message(generation: ServerGeneration) -> pb.ServerGeneration:
    return pb.ServerGeneration(server_id=generation.server_id, restored_checkpoint=generation.restored_checkpoint)


def state_message(status: OptimizerStatus, generation: pb.ServerGeneration | None = None) -> pb.OptimizerState:
    schedule = json.dumps(status.schedule, sort_keys=True) if status.schedule is not None else ""
    return pb.OptimizerState(
        iterations=status.iterations,
        raw_iterations=status.raw_iterations,
        learning_rate=status.learning_rate,
        step=status.step,
        scalars=status.scalars,
        learning_rate_schedule_json=schedule,
        generation=generation,
    )


STATE_FIELDS = ("iterations", "raw_iterations", "learning_rate", "learning_rate_schedule_json", "step", "scalars")


def state_update(state: pb.OptimizerState, state_fields) -> StateUpdate:
    """The part of a SetWeights state to write: the fields named in ``state_fields``, or all of them.

    Without ``state_fields`` (as from clients that predate it) an absent learning rate
    (proto3 sends 0 as absent) and an empty schedule keep the current ones.
    """
    named = list(state_fields)
    unknown = sorted(set(named) - set(STATE_FIELDS))
    if unknown:
        raise InvalidArgumentError(
            f"`state_fields` names unknown OptimizerState fields {unknown}; the fields are {list(STATE_FIELDS)}."
        )
    fields = set(named or STATE_FIELDS)
    rate = None
    if "learning_rate" in fields and (named or state.HasField("learning_rate")):
        rate = state.learning_rate
    schedule = None
    if "learning_rate_schedule_json" in fields and (named or state.learning_rate_schedule_json):
        schedule = _parse_schedule(state.learning_rate_schedule_json)
    return StateUpdate(
        iterations=state.iterations if "iterations" in fields else None,
        raw_iterations=state.raw_iterations if "raw_iterations" in fields else None,
        step=state.step if "step" in fields else None,
        learning_rate=rate,
        schedule=schedule,
        scalars=dict(state.scalars) if "scalars" in fields else {},
    )


def _parse_schedule(text: str) -> dict:
    if not text.strip():
        raise InvalidArgumentError(
            "`learning_rate_schedule_json` is empty; send keras.optimizers.schedules.serialize(schedule) as JSON."
        )
    try:
        schedule = json.loads(text)
    except ValueError as exc:
        raise InvalidArgumentError(
            f"`learning_rate_schedule_json` is not valid JSON ({exc}). Received: {text[:200]!r}"
        ) from None
    if not isinstance(schedule, dict):
        raise InvalidArgumentError(
            "`learning_rate_schedule_json` must be a JSON object, a serialized schedule with 'class_name' and "
            f"'config' (keras.optimizers.schedules.serialize). Received: {text[:200]!r}"
        )
    return schedule


def step_result(outcome: StepOutcome, generation: pb.ServerGeneration | None = None) -> pb.StepResult:
    return pb.StepResult(
        step=outcome.step,
        iterations=outcome.iterations,
        learning_rate=outcome.learning_rate,
        duplicate=outcome.duplicate,
        contributors=outcome.contributors,
        missing_workers=outcome.missing,
        generation=generation,
        skipped_non_finite=bool(outcome.non_finite),
        non_finite_variables=outcome.non_finite,
        joint_norm=_joint_norm(outcome.joint_norm),
        scalars=outcome.scalars,
    )


def _joint_norm(joint) -> pb.JointNormTerms | None:
    if joint is None:
        return None
    terms = [
        pb.NormTerm(name=t.name, dtype=codec.dtype_to_proto(t.dtype), sum_squares=t.sum_squares) for t in joint.terms
    ]
    return pb.JointNormTerms(terms=terms, held=joint.held)


def model_info(
    summary: ModelSummary, generation: pb.ServerGeneration | None = None, memory: Reservation | None = None
) -> pb.ModelInfo:
    spec = summary.spec
    return pb.ModelInfo(
        owner=memory.owner_name if memory is not None else "",
        state_bytes=memory.nbytes if memory is not None else 0,
        spec=pb.ModelSpec(
            model_id=spec.model_id,
            optimizer_config_json=spec.optimizer_config_json,
            num_workers=spec.num_workers,
            mode=_MODE_TO_PROTO[spec.mode],
            sync_timeout_s=spec.sync_timeout_s,
            timeout_policy=_POLICY_TO_PROTO[spec.timeout_policy],
            non_finite_policy=_NON_FINITE_TO_PROTO[spec.non_finite_policy],
        ),
        state=state_message(summary.status, generation),
        variables=[_variable_info(v) for v in summary.variables],
        waiting_workers=summary.waiting_workers,
        **_activity_fields(summary.activity),
        activity=_activity_message(summary.usage),
    )


def _activity_fields(activity) -> dict:
    if activity is None:
        return {}
    fields = {"pushes": activity.pushes, "push_seconds": activity.push_seconds}
    if activity.update_norm is not None:
        fields["update_norm"] = activity.update_norm
    return fields


def _activity_message(summary) -> pb.ModelActivity | None:
    if summary is None:
        return None
    record = summary.record
    message = pb.ModelActivity(
        created_unix_s=record.created_unix_s,
        creator_peer=record.creator_peer,
        last_activity_unix_s=record.last_unix_s,
        last_activity=record.last_kind,
        calls_in_flight=summary.calls_in_flight,
        idle_s=summary.idle_s,
    )
    if record.creator_worker is not None:
        message.creator_worker = record.creator_worker
    if record.last_worker is not None:
        message.last_worker = record.last_worker
    return message


def _variable_info(summary) -> pb.VariableInfo:
    info = pb.VariableInfo(
        name=summary.meta.name,
        dtype=codec.dtype_to_proto(summary.meta.dtype),
        shape=summary.meta.shape,
        slots=summary.slots,
    )
    if summary.norm is not None:  # only when asked for (with_stats)
        info.norm = summary.norm
    return info


def spec_choices(spec: pb.ModelSpec) -> dict[str, str | None]:
    """A spec's enum fields (``mode``, ``timeout_policy``, ``non_finite_policy``) by the server's names."""
    return {
        "mode": enum_value(spec.mode, MODE_FROM_PROTO, "mode"),
        "timeout_policy": enum_value(spec.timeout_policy, POLICY_FROM_PROTO, "timeout_policy"),
        "non_finite_policy": enum_value(spec.non_finite_policy, NON_FINITE_FROM_PROTO, "non_finite_policy"),
    }


def enum_value(value: int, table: dict, field: str):
    try:
        return table[value]
    except KeyError:
        raise InvalidArgumentError(f"Unknown `{field}` value {value}.") from None
