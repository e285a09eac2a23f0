"""Argument checks and request building shared by every client: Keras-style messages, nothing sent on a bad one."""

from __future__ import annotations

import dataclasses
import json
import sys
from collections.abc import Mapping, Sequence
from typing import Any, Literal, overload

import numpy as np

from optserve.client.learning_rate import set_learning_rate
from optserve.client.types import ModelInfo, ModelSpec, OptimizerState, OptimizerWeights
from optserve.protos import tensors
from optserve.protos.errors import InvalidArgumentError, NotFoundError, OptserveError
from optserve.protos.tensors import SparseGradient

# A gradient as a push takes it: dense, or rows of the variable.
Gradient = np.ndarray | SparseGradient

_MODES = ("sync", "async")
_POLICIES = ("fail", "apply_partial")
_NON_FINITE_POLICIES = ("reject", "skip_step", "allow")


def parse_addresses(address: str | Sequence[str]) -> list[str]:
    """``"host:port"``, ``"h1:p1,h2:p2"`` or a list of ``host:port`` -> the list, each one checked."""
    if isinstance(address, str):
        addresses = [a.strip() for a in address.split(",")]
    elif isinstance(address, Sequence):
        addresses = [str(a).strip() for a in address]
    else:
        raise ValueError(f"`address` must be 'host:port' or a list of them. Received: address={address!r}")
    addresses = [a for a in addresses if a]
    if not addresses:
        raise ValueError(f"`address` must be 'host:port'. Received: address={address!r}")
    for one in addresses:
        host, sep, port = one.rpartition(":")
        if not sep or not host or not port.isdigit():
            raise ValueError(f"`address` must be 'host:port'. Received: address={one!r}")
    repeated = sorted({a for a in addresses if addresses.count(a) > 1})
    if repeated:
        # Two shards on one server would store their pieces under the same model id.
        raise ValueError(
            f"Each shard address may be listed once. Received {', '.join(repeated)} more than once "
            f"in address={address!r}"
        )
    return addresses


def parse_address(address: str | Sequence[str]) -> str:
    """One ``host:port``, or several joined by commas (a sharded client's address)."""
    return ",".join(parse_addresses(address))


def _json_default(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    raise TypeError(f"Object of type {type(value).__name__} is not JSON serializable")


def optimizer_config_json(optimizer: Any) -> str:
    """JSON for ``ModelSpec.optimizer_config_json`` from a name, a dict or an optimizer object."""
    if isinstance(optimizer, str):
        if not optimizer.strip():
            raise ValueError(f"`optimizer` must not be empty. Received: optimizer={optimizer!r}")
        return json.dumps(optimizer)
    if isinstance(optimizer, Mapping):
        if "class_name" not in optimizer:
            raise ValueError(
                "`optimizer` given as a dict must have a 'class_name' key "
                f"(a keras.optimizers.serialize() result or a get_config() dict). Received keys: {sorted(optimizer)}"
            )
        return json.dumps(dict(optimizer), default=_json_default)
    if hasattr(optimizer, "get_config"):
        return json.dumps(_serialize_optimizer_object(optimizer), default=_json_default)
    raise TypeError(
        "`optimizer` must be a name such as 'adam', a config dict with 'class_name', "
        f"or an object with get_config(). Received: optimizer={optimizer!r}"
    )


def _serialize_optimizer_object(optimizer: Any) -> dict:
    # A Keras optimizer can only exist once keras has been imported, so looking in
    # sys.modules never imports keras on behalf of a caller who does not use it.
    keras = sys.modules.get("keras")
    if keras is not None and isinstance(optimizer, keras.optimizers.Optimizer):
        return keras.optimizers.serialize(optimizer)
    return {
        "module": type(optimizer).__module__,
        "class_name": type(optimizer).__name__,
        "config": optimizer.get_config(),
        "registered_name": None,
    }


def check_name(name: Any, what: str) -> str:
    if not isinstance(name, str) or not name:
        raise ValueError(f"`{what}` must be a non-empty string. Received: {what}={name!r}")
    return name


def as_tensors(values: Mapping[str, Any] | None, what: str, *, drop_none: bool = False) -> dict[str, np.ndarray]:
    """Arrays checked for a wire dtype up front, so a bad one fails before any byte is sent."""
    return _checked_values(values, what, drop_none=drop_none, sparse=False)


def as_gradients(grads: Mapping[str, Any] | None) -> dict[str, Gradient]:
    """A push's gradients: arrays as :func:`as_tensors` checks them, or :class:`SparseGradient` rows."""
    return _checked_values(grads, "grads", drop_none=True, sparse=True)


@overload
def _checked_values(
    values: Mapping[str, Any] | None, what: str, *, drop_none: bool, sparse: Literal[False]
) -> dict[str, np.ndarray]: ...


@overload
def _checked_values(
    values: Mapping[str, Any] | None, what: str, *, drop_none: bool, sparse: Literal[True]
) -> dict[str, Gradient]: ...


def _checked_values(
    values: Mapping[str, Any] | None, what: str, *, drop_none: bool, sparse: bool
) -> dict[str, Gradient] | dict[str, np.ndarray]:
    if values is None:
        return {}
    if not isinstance(values, Mapping):
        raise TypeError(f"`{what}` must be a dict {{name: array}}. Received: {type(values).__name__}")
    arrays: dict[str, Any] = {}
    for name, value in values.items():
        check_name(name, f"{what} name")
        if value is None and drop_none:
            continue  # like Keras: a None gradient leaves its variable alone
        if sparse and isinstance(value, SparseGradient):
            arrays[name] = value  # checked when made
            continue
        array = np.asarray(value)
        try:
            tensors.dtype_to_proto(array.dtype)
        except tensors.TensorFormatError as error:
            raise ValueError(f"`{what}[{name!r}]`: {error}") from None
        arrays[name] = array
    return arrays


def check_names(names: Any) -> list[str]:
    if names is None:
        return []
    if isinstance(names, str):
        return [names]
    return [check_name(n, "names") for n in names]


def check_non_negative(name: str, value: Any, allow_none: bool = False) -> None:
    if value is None and allow_none:
        return
    if not isinstance(value, (int, float)) or isinstance(value, bool) or value < 0:
        raise ValueError(
            f"`{name}` must be a number >= 0{' or None' if allow_none else ''}. Received: {name}={value!r}"
        )


def check_worker_index(worker_index: Any) -> None:
    if not isinstance(worker_index, (int, np.integer)) or isinstance(worker_index, bool) or worker_index < 0:
        raise ValueError(f"`worker_index` must be an integer >= 0. Received: worker_index={worker_index!r}")


def model_spec(
    model_id: Any,
    optimizer: Any,
    num_workers: Any,
    mode: Any,
    sync_timeout_s: Any,
    timeout_policy: Any,
    non_finite_policy: Any = None,
) -> ModelSpec:
    check_name(model_id, "model_id")
    if not isinstance(num_workers, (int, np.integer)) or isinstance(num_workers, bool) or num_workers < 1:
        raise ValueError(f"`num_workers` must be an integer >= 1. Received: num_workers={num_workers!r}")
    mode_key = str(mode).lower()
    if mode_key not in _MODES:
        raise ValueError(f"`mode` must be one of 'sync', 'async'. Received: mode={mode!r}")
    check_non_negative("sync_timeout_s", sync_timeout_s)
    policy_key = str(timeout_policy).lower()
    if policy_key not in _POLICIES:
        raise ValueError(
            f"`timeout_policy` must be one of 'fail', 'apply_partial'. Received: timeout_policy={timeout_policy!r}"
        )
    non_finite_key = None if non_finite_policy is None else str(non_finite_policy).lower()
    if non_finite_key is not None and non_finite_key not in _NON_FINITE_POLICIES:
        raise ValueError(
            "`non_finite_policy` must be one of 'reject', 'skip_step', 'allow'. "
            f"Received: non_finite_policy={non_finite_policy!r}"
        )
    return ModelSpec(
        model_id=model_id,
        optimizer_config_json=optimizer_config_json(optimizer),
        num_workers=int(num_workers),
        mode=mode_key,
        sync_timeout_s=float(sync_timeout_s),
        timeout_policy=policy_key,
        non_finite_policy=non_finite_key,
    )


def slot_tensors(slots: Mapping[str, Mapping[str, Any]] | None) -> dict[str, dict[str, np.ndarray]]:
    if slots is None:
        return {}
    if not isinstance(slots, Mapping):
        raise TypeError(f"`slots` must be a dict {{variable: {{slot: array}}}}. Received: {type(slots).__name__}")
    out: dict[str, dict[str, np.ndarray]] = {}
    for name, per_var in slots.items():
        check_name(name, "slots variable name")
        out[name] = as_tensors(per_var, f"slots[{name!r}]")
    return out


def slots_from_list(
    model_id: str, weights_list: Sequence[Any], layout: OptimizerWeights
) -> dict[str, dict[str, np.ndarray]]:
    expected = [(name, slot, array) for name, per_var in layout.slots.items() for slot, array in per_var.items()]
    weights_list = list(weights_list)
    if len(weights_list) != len(expected) + 1:
        raise InvalidArgumentError(
            f"Model {model_id!r} expects {len(expected) + 1} weights ([iterations] + {len(expected)} slots); "
            f"received {len(weights_list)}.",
        )
    iterations = np.asarray(weights_list[0])
    if iterations.size != 1 or not np.issubdtype(iterations.dtype, np.number):
        raise InvalidArgumentError(
            f"weights[0] must be the iterations counter (one number); received shape {iterations.shape} "
            f"and dtype {iterations.dtype}.",
        )
    slots: dict[str, dict[str, np.ndarray]] = {}
    for index, ((name, slot, reference), value) in enumerate(zip(expected, weights_list[1:]), start=1):
        array = np.asarray(value)
        if array.shape != reference.shape:
            raise InvalidArgumentError(
                f"weights[{index}] (slot {slot!r} of variable {name!r}) has shape {array.shape}; "
                f"expected {reference.shape}.",
            )
        try:
            array = array.astype(reference.dtype, casting="same_kind", copy=False)
        except TypeError:
            raise InvalidArgumentError(
                f"weights[{index}] (slot {slot!r} of variable {name!r}) has dtype {array.dtype}; "
                f"expected {reference.dtype}.",
            ) from None
        slots.setdefault(name, {})[slot] = array
    return slots


def weight_tensors(
    slots: Mapping[str, Mapping[str, np.ndarray]], variables: Mapping[str, np.ndarray]
) -> list[tuple[str, str, np.ndarray]]:
    """A SetWeights request's tensors: slots, then variables (slot "")."""
    tensor_list = [(name, slot, array) for name, per_var in slots.items() for slot, array in per_var.items()]
    return tensor_list + [(name, "", array) for name, array in variables.items()]


def updated_state(current: ModelInfo, iterations: int | None, scalars: Mapping[str, float]) -> OptimizerState:
    """The whole OptimizerState a SetWeights request carries: what was not given keeps ``current``'s value."""
    state = OptimizerState(
        iterations=current.iterations,
        raw_iterations=current.raw_iterations,
        learning_rate=current.learning_rate,
        step=current.step,
        scalars={**current.scalars, **scalars},
    )
    if iterations is not None:
        # Keep the raw counter's offset (it only differs under gradient accumulation).
        state.raw_iterations = current.raw_iterations + (iterations - current.iterations)
        state.iterations = iterations
    return state


@dataclasses.dataclass(frozen=True)
class StateChange:
    """The optimizer-state part of a ``set_weights`` call: the fields to set, and nothing else."""

    iterations: int | None = None
    scalars: Mapping[str, float] = dataclasses.field(default_factory=dict)
    learning_rate: float | dict | None = None  # checked by optserve.client.learning_rate

    def __bool__(self) -> bool:
        return self.iterations is not None or bool(self.scalars) or self.learning_rate is not None

    def state_for(self, current: ModelInfo) -> tuple[OptimizerState, list[str]]:
        """The OptimizerState a SetWeights request carries, and the names of the fields it sets.

        The server sets only the named fields, so counters an update moves meanwhile are
        never written back; the others carry ``current``'s values for servers that
        predate field names and set every field.
        """
        state = updated_state(current, self.iterations, self.scalars)
        fields = ["iterations"] * (self.iterations is not None) + ["scalars"] * bool(self.scalars)
        if self.learning_rate is not None:
            fields.append(set_learning_rate(state, self.learning_rate))
        return state, fields

    def check_taken(self, result: OptimizerState) -> None:
        if isinstance(self.learning_rate, dict) and result.learning_rate_schedule is None:
            raise OptserveError("UNIMPLEMENTED", "The server ignored the new schedule: it is too old to set one.")


def model_not_found(model_id: str) -> NotFoundError:
    return NotFoundError(f"Model {model_id!r} not found.")
