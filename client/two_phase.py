"""The client side of two-phase steps: a sharded model's global norm, equal to one server's.

Keras's ``global_clipnorm`` needs the norm over the gradients of all variables; each
shard holds only some. So a push to a model with more than one shard goes in two phases
(see ``optserve.server.two_phase`` and ``CommitStep`` in ``protos/optserve.proto``):

1. Every shard gets its gradients with ``hold_for_joint_norm``. A shard whose update
   clips by the global norm keeps it and answers with its *terms* (one sum of squares
   per variable with a gradient, in the variable's dtype).
2. The terms of every shard are joined in the whole model's variable order (the order
   one server holds them in) and committed to each shard that holds the step; each
   applies with the norm taken as one server takes it.

In SYNC mode every worker receives the same terms from every shard (they are those of
the summed gradients) and so commits the same joint terms: the first commit applies,
the others are answered as duplicates, and a worker dying between the phases changes
nothing as long as one worker commits. A shard that applied the step already (a
repeated push after a failure) answers with the terms it applied, so pushing a step
again completes it on the shards that still hold it.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from optserve.client.messages import read_stream, step_result
from optserve.client.types import StepResult
from optserve.protos import optserve_pb2 as pb
from optserve.protos import tensors
from optserve.protos.errors import FailedPreconditionError

__all__ = ["push_held", "commit_step", "join_terms"]

_COMMIT_PATH = "/optserve.v1.ParameterServer/CommitStep"


def _commit_call(transport: Any):
    call = getattr(transport, "_commit_step_call", None)
    if call is None:
        call = transport._channel.unary_stream(
            _COMMIT_PATH,
            request_serializer=pb.CommitStepRequest.SerializeToString,
            response_deserializer=None,
            _registered_method=True,
        )
        transport._commit_step_call = call
    return call


def push_held(
    transport: Any,
    model_id: str,
    gradients: Mapping[str, Any],
    *,
    worker_index: int,
    step: int,
    aggregated: bool,
    return_variables: bool,
    timeout: float | None,
) -> tuple[StepResult, pb.JointNormTerms | None, dict[str, np.ndarray]]:
    """``transport.apply_gradients`` asking the server to hold an update that needs the global norm.

    Returns (result, the server's terms or None when it applied without a norm, variables).
    """
    header = pb.ApplyGradientsHeader(
        model_id=model_id,
        worker_index=worker_index,
        step=int(step),
        aggregated=bool(aggregated),
        return_variables=bool(return_variables),
        hold_for_joint_norm=True,
    )
    tensor_list, sparse = tensors.gradient_tensors(gradients)
    header.num_gradients = len(tensor_list)
    first = pb.ApplyGradientsRequest(header=header)
    if sparse:
        first.sparse_gradients.extend(sparse)

    def attempt(deadline: float | None) -> tuple[Any, dict]:
        requests = tensors.serialized_chunk_messages(first, "gradients", tensor_list)
        responses = transport._stub.ApplyGradients(requests, timeout=deadline)
        return read_stream(responses, pb.ApplyGradientsResponse, "result", "variables")

    result, values = transport._call(attempt, timeout)
    joint = result.joint_norm if result.HasField("joint_norm") else None
    return step_result(result), joint, tensors.variables_only(values)


def commit_step(
    transport: Any,
    model_id: str,
    terms: Sequence[pb.NormTerm],
    *,
    worker_index: int,
    step: int,
    return_variables: bool,
    timeout: float | None,
) -> tuple[StepResult, dict[str, np.ndarray]]:
    """The second phase on one shard: apply its held step with every shard's ``terms``."""
    request = pb.CommitStepRequest(
        model_id=model_id,
        worker_index=worker_index,
        step=int(step),
        terms=list(terms),
        return_variables=bool(return_variables),
    )
    call = _commit_call(transport)

    def attempt(deadline: float | None) -> tuple[Any, dict]:
        return read_stream(call(request, timeout=deadline), pb.ApplyGradientsResponse, "result", "variables")

    result, values = transport._call(attempt, timeout)
    return step_result(result), tensors.variables_only(values)


def join_terms(
    model_id: str, order: Sequence[str], answers: Sequence[pb.JointNormTerms | None], shards: Sequence[int]
) -> list[pb.NormTerm]:
    """Every shard's terms in the model's variable order; all shards must have answered with terms."""
    missing = [index for index, answer in zip(shards, answers) if answer is None]
    if missing:
        raise FailedPreconditionError(
            f"The shards of model {model_id!r} disagree on whether this step needs the global norm (shards "
            f"{missing} applied it without one). Their optimizers are out of step; restore the model from a "
            "checkpoint or create it again."
        )
    by_name = {term.name: term for answer in answers if answer is not None for term in answer.terms}
    return [by_name[name] for name in order if name in by_name]
