"""What every optserve client shares: the public API, its argument checks and step tracking.

:class:`ClientBase` implements the public methods once: each checks its
arguments (Keras-style messages, nothing sent on a bad one), resolves the step
a push names through the :class:`~optserve.client.steps.StepTracker`, and hands
checked domain values to a small set of ``_``-prefixed operations. ``Client``
implements those over one :class:`~optserve.client.transport.Transport`;
``ShardedClient`` over one transport per shard and a shard plan.
"""

from __future__ import annotations

import abc
import json
import sys
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Literal, overload

import numpy as np

from optserve.client.steps import StepTracker
from optserve.client.transport import GrpcTransport, RetryPolicy, Transport
from optserve.client.types import ModelInfo, ModelSpec, OptimizerState, OptimizerWeights, StepResult
from optserve.protos import tensors
from optserve.protos.errors import FailedPreconditionError, InvalidArgumentError, NotFoundError, StepMismatchError
from optserve.protos.tensors import SparseGradient

__all__ = ["DEFAULT", "ClientBase", "TransportFactory", "optimizer_config_json", "parse_address", "parse_addresses"]

# A gradient as a push takes it: dense, or rows of the variable.
Gradient = np.ndarray | SparseGradient

# Marks "argument not given" where None is a meaningful value (no deadline).
DEFAULT: Any = object()

# Makes the transport to one server: (address, retry policy, extra channel options) -> Transport.
TransportFactory = Callable[[str, RetryPolicy, Sequence[tuple[str, Any]] | None], Transport]

_MODES = ("sync", "async")
_POLICIES = ("fail", "apply_partial")


def grpc_transport(address: str, retry: RetryPolicy, options: Sequence[tuple[str, Any]] | None) -> Transport:
    return GrpcTransport(address, retry=retry, options=options)


class ClientBase(abc.ABC):
    """The public API of ``Client`` and ``ShardedClient``; see :class:`optserve.client.Client` for the arguments.

    ``step_tracker`` lets several clients (or a ``RemoteOptimizer`` and its client)
    share one record of steps; ``transport_factory`` makes the transport to each
    server (default: gRPC).
    """

    def __init__(
        self,
        address: str | Sequence[str],
        *,
        timeout: float | None = 60.0,
        retries: int = 5,
        backoff: float = 0.2,
        max_backoff: float = 5.0,
        options: Sequence[tuple[str, Any]] | None = None,
        push_timeout: float | None = None,
        attempt_timeout: float | None = None,
        step_tracker: StepTracker | None = None,
        transport_factory: TransportFactory | None = None,
    ):
        addresses = parse_addresses(address)
        check_non_negative("timeout", timeout, allow_none=True)
        check_non_negative("push_timeout", push_timeout, allow_none=True)
        check_non_negative("attempt_timeout", attempt_timeout, allow_none=True)
        check_non_negative("backoff", backoff)
        check_non_negative("max_backoff", max_backoff)
        if not isinstance(retries, int) or retries < 0:
            raise ValueError(f"`retries` must be an integer >= 0. Received: retries={retries!r}")
        self.address = ",".join(addresses)
        self.timeout = timeout
        self.push_timeout = push_timeout
        self.attempt_timeout = attempt_timeout
        self.retries = retries
        self.backoff = backoff
        self.max_backoff = max(max_backoff, backoff)
        self.steps = step_tracker if step_tracker is not None else StepTracker()
        self._closed = False
        retry = RetryPolicy(retries, backoff, self.max_backoff, attempt_timeout)
        self._connect(addresses, retry, options, transport_factory or grpc_transport)

    @abc.abstractmethod
    def _connect(
        self,
        addresses: list[str],
        retry: RetryPolicy,
        options: Sequence[tuple[str, Any]] | None,
        factory: TransportFactory,
    ) -> None:
        """Open the transports (nothing is sent yet)."""

    # ------------------------------------------------------------------ lifecycle

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            self._disconnect()

    @abc.abstractmethod
    def _disconnect(self) -> None: ...

    def __enter__(self):
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _check_open(self) -> None:
        if self._closed:
            raise ValueError("This Client is closed.")

    def _timeout(self, timeout: Any, default: float | None) -> float | None:
        value = default if timeout is DEFAULT else timeout
        check_non_negative("timeout", value, allow_none=True)
        return value

    # ------------------------------------------------------------------ steps

    def _observe(self, model_id: str, reply: StepResult | ModelInfo | OptimizerState) -> None:
        """Note the counters and the server generation a reply carried (see ``StepTracker.progress``)."""
        self.steps.record_progress(
            model_id,
            step=reply.step,
            iterations=reply.iterations,
            learning_rate=reply.learning_rate,
            generation=reply.generation,
        )

    def next_step(self, model_id: str, worker_index: int = 0) -> int:
        """The step a push from ``worker_index`` will name by default (asks the server once if unknown)."""
        step = self.steps.step_for(model_id, worker_index)
        if step is None:
            step = self._server_step(model_id, self.timeout)
            self.steps.record_worker_step(model_id, worker_index, step)
        return step

    def resync(self, model_id: str, worker_index: int | None = None, *, timeout: Any = DEFAULT) -> int:
        """Adopt the server's current step for one worker (or every worker when None); returns it."""
        step = self._server_step(model_id, self._timeout(timeout, self.timeout))
        if worker_index is None:
            self.steps.record_model_step(model_id, step)
        else:
            self.steps.record_worker_step(model_id, worker_index, step)
        return step

    @abc.abstractmethod
    def _server_step(self, model_id: str, timeout: float | None) -> int:
        """The step the server(s) would take a push for now."""

    # ------------------------------------------------------------------ models

    def create_model(
        self,
        model_id: str,
        optimizer: Any,
        variables: Mapping[str, Any],
        *,
        num_workers: int = 1,
        mode: str = "sync",
        sync_timeout_s: float = 0.0,
        timeout_policy: str = "fail",
        timeout: Any = DEFAULT,
    ) -> ModelInfo:
        """Create a model, or join it when one with the same spec exists (``created`` is False)."""
        spec = model_spec(model_id, optimizer, num_workers, mode, sync_timeout_s, timeout_policy)
        arrays = as_tensors(variables, "variables")
        if not arrays:
            raise ValueError("`variables` must hold at least one variable. Received: {}")
        self._check_open()
        info = self._create_model(spec, arrays, self._timeout(timeout, self.timeout))
        self.steps.record_model_step(model_id, info.step)
        self._observe(model_id, info)
        return info

    @abc.abstractmethod
    def _create_model(self, spec: ModelSpec, variables: dict[str, np.ndarray], timeout: float | None) -> ModelInfo: ...

    def list_models(
        self, model_id: str | None = None, with_stats: bool = False, *, timeout: Any = DEFAULT
    ) -> list[ModelInfo]:
        """Every model, or just ``model_id`` (NotFoundError if it does not exist)."""
        self._check_open()
        models = self._list_models(model_id, bool(with_stats), self._timeout(timeout, self.timeout))
        for info in models:
            self._observe(info.model_id, info)
        return models

    @abc.abstractmethod
    def _list_models(self, model_id: str | None, with_stats: bool, timeout: float | None) -> list[ModelInfo]: ...

    def delete_model(self, model_id: str, *, timeout: Any = DEFAULT) -> bool:
        """Delete the model; False if there was none."""
        check_name(model_id, "model_id")
        self._check_open()
        deleted = self._delete_model(model_id, self._timeout(timeout, self.timeout))
        self.steps.forget(model_id)
        return deleted

    @abc.abstractmethod
    def _delete_model(self, model_id: str, timeout: float | None) -> bool: ...

    def checkpoint(self, *, timeout: Any = DEFAULT) -> tuple[str, int]:
        """Ask the server(s) to write a checkpoint now; returns (path(s), number of models)."""
        self._check_open()
        return self._checkpoint(self._timeout(timeout, self.timeout))

    @abc.abstractmethod
    def _checkpoint(self, timeout: float | None) -> tuple[str, int]: ...

    def health(self, service: str = "", *, timeout: Any = DEFAULT) -> str:
        """Standard gRPC health check: "SERVING", "NOT_SERVING", ..."""
        self._check_open()
        return self._health(service, self._timeout(timeout, self.timeout))

    @abc.abstractmethod
    def _health(self, service: str, timeout: float | None) -> str: ...

    # ------------------------------------------------------------------ gradients

    def push(
        self,
        model_id: str,
        grads: Mapping[str, Any],
        *,
        worker_index: int = 0,
        step: int | None = None,
        aggregated: bool = False,
        timeout: Any = DEFAULT,
    ) -> StepResult:
        """Push gradients for one step; returns once the step's update has been applied.

        ``step=None`` uses the step this client tracks for (model, worker). The
        default deadline is ``push_timeout`` (None: wait as long as the server's
        synchronous step lasts).
        """
        result, _ = self._push(model_id, grads, worker_index, step, aggregated, False, timeout)
        return result

    def push_pull(
        self,
        model_id: str,
        grads: Mapping[str, Any],
        *,
        worker_index: int = 0,
        step: int | None = None,
        aggregated: bool = False,
        timeout: Any = DEFAULT,
    ) -> tuple[StepResult, dict[str, np.ndarray]]:
        """Push gradients and receive the updated variables in the same round trip."""
        return self._push(model_id, grads, worker_index, step, aggregated, True, timeout)

    def _push(
        self,
        model_id: str,
        grads: Mapping[str, Any],
        worker_index: int,
        step: int | None,
        aggregated: bool,
        return_variables: bool,
        timeout: Any,
    ) -> tuple[StepResult, dict[str, np.ndarray]]:
        check_name(model_id, "model_id")
        check_worker_index(worker_index)
        arrays = as_gradients(grads)
        timeout = self._timeout(timeout, self.push_timeout)
        self._check_open()
        prepared = self._prepare_push(model_id, arrays)
        if step is None:
            step = self.next_step(model_id, worker_index)
        elif not isinstance(step, (int, np.integer)) or step < 0:
            raise ValueError(f"`step` must be an integer >= 0 or None. Received: step={step!r}")
        try:
            result, values = self._apply_gradients(
                model_id, prepared, int(worker_index), int(step), bool(aggregated), return_variables, timeout
            )
        except StepMismatchError as error:
            raise _explained(error, model_id, int(worker_index), int(step)) from None
        self.steps.record_worker_step(model_id, worker_index, result.step)
        self._observe(model_id, result)
        return result, values

    def _prepare_push(self, model_id: str, gradients: dict[str, Gradient]) -> Any:
        """Check a push against what the client knows of the model before a step is chosen."""
        return gradients

    @abc.abstractmethod
    def _apply_gradients(
        self,
        model_id: str,
        prepared: Any,
        worker_index: int,
        step: int,
        aggregated: bool,
        return_variables: bool,
        timeout: float | None,
    ) -> tuple[StepResult, dict[str, np.ndarray]]: ...

    def pull(
        self, model_id: str, names: Any = None, *, timeout: Any = DEFAULT
    ) -> tuple[StepResult, dict[str, np.ndarray]]:
        """Current variable values (all, or ``names``) and the model's step."""
        check_name(model_id, "model_id")
        wanted = check_names(names)
        self._check_open()
        result, values = self._pull(model_id, wanted, self._timeout(timeout, self.timeout))
        self.steps.record_model_step(model_id, result.step, forward_only=True)
        self._observe(model_id, result)
        return result, values

    @abc.abstractmethod
    def _pull(
        self, model_id: str, names: list[str], timeout: float | None
    ) -> tuple[StepResult, dict[str, np.ndarray]]: ...

    # ------------------------------------------------------------------ optimizer state

    def get_weights(
        self, model_id: str, names: Any = None, include_variables: bool = False, *, timeout: Any = DEFAULT
    ) -> OptimizerWeights:
        """Optimizer state: counters, scalars and every slot (Keras order); variables if asked."""
        check_name(model_id, "model_id")
        wanted = check_names(names)
        self._check_open()
        weights = self._get_weights(model_id, wanted, bool(include_variables), self._timeout(timeout, self.timeout))
        self._observe(model_id, weights)
        return weights

    @abc.abstractmethod
    def _get_weights(
        self, model_id: str, names: list[str], include_variables: bool, timeout: float | None
    ) -> OptimizerWeights: ...

    def set_weights(
        self,
        model_id: str,
        *,
        slots: Mapping[str, Mapping[str, Any]] | None = None,
        variables: Mapping[str, Any] | None = None,
        iterations: int | None = None,
        scalars: Mapping[str, float] | None = None,
        timeout: Any = DEFAULT,
    ) -> OptimizerState:
        """Overwrite slots, variables, the iterations counter and/or scalars in one request.

        Everything is checked before anything changes (on one server, by the server,
        atomically; on shards, by the client first, then shard by shard).
        """
        check_name(model_id, "model_id")
        slot_arrays = slot_tensors(slots)
        variable_arrays = as_tensors(variables, "variables")
        if iterations is not None and (not isinstance(iterations, (int, np.integer)) or iterations < 0):
            raise ValueError(f"`iterations` must be an integer >= 0. Received: iterations={iterations!r}")
        scalar_values = {str(k): float(v) for k, v in (scalars or {}).items()}
        timeout = self._timeout(timeout, self.timeout)
        self._check_open()
        return self._set_weights(
            model_id,
            slot_arrays,
            variable_arrays,
            None if iterations is None else int(iterations),
            scalar_values,
            timeout,
        )

    @abc.abstractmethod
    def _set_weights(
        self,
        model_id: str,
        slots: dict[str, dict[str, np.ndarray]],
        variables: dict[str, np.ndarray],
        iterations: int | None,
        scalars: dict[str, float],
        timeout: float | None,
    ) -> OptimizerState: ...

    def set_weights_list(self, model_id: str, weights_list: Sequence[Any], *, timeout: Any = DEFAULT) -> OptimizerState:
        """Set state from the tf.keras ``get_weights()`` layout ``[iterations, *slots]``.

        Count and shapes are checked against the server's slot layout first; nothing
        is sent when they do not match.
        """
        timeout = self._timeout(timeout, self.timeout)
        layout = self.get_weights(model_id, timeout=timeout)
        slots = slots_from_list(model_id, weights_list, layout)
        iterations = np.asarray(weights_list[0])
        return self.set_weights(model_id, slots=slots, iterations=int(iterations.reshape(-1)[0]), timeout=timeout)


def _explained(error: StepMismatchError, model_id: str, worker_index: int, step: int) -> FailedPreconditionError:
    """A step mismatch with what was pushed; a clash at the right step is not one (resync would not help)."""
    if error.current_step == step:
        # The step was right; the push clashed otherwise (e.g. aggregated and
        # per-worker pushes mixed in one step).
        plain = FailedPreconditionError(error.message, details=error.details, code=error.code)
        plain.shard_index, plain.address = error.shard_index, error.address
        return plain
    error.model_id, error.worker_index, error.step = model_id, worker_index, step
    error.message = (
        f"{error.message} (model {model_id!r}, worker {worker_index} pushed step {step}; "
        f"the server is at step {error.current_step}. Call resync() to adopt it.)"
    )
    error.args = (error.message,)
    return error


# --------------------------------------------------------------------------- argument checks


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
    model_id: Any, optimizer: Any, num_workers: Any, mode: Any, sync_timeout_s: Any, timeout_policy: Any
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
    return ModelSpec(
        model_id=model_id,
        optimizer_config_json=optimizer_config_json(optimizer),
        num_workers=int(num_workers),
        mode=mode_key,
        sync_timeout_s=float(sync_timeout_s),
        timeout_policy=policy_key,
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


def model_not_found(model_id: str) -> NotFoundError:
    return NotFoundError(f"Model {model_id!r} not found.")
