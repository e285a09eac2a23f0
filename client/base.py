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
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

from optserve.client.arguments import (
    Gradient,
    StateChange,
    as_gradients,
    as_tensors,
    check_name,
    check_names,
    check_non_negative,
    check_worker_index,
    model_spec,
    parse_addresses,
    slot_tensors,
    slots_from_list,
)
from optserve.client.learning_rate import check_learning_rate
from optserve.client.steps import StepTracker
from optserve.client.transport import GrpcTransport, RetryPolicy, Transport
from optserve.client.types import ModelInfo, ModelSpec, OptimizerState, OptimizerWeights, StepResult
from optserve.protos.errors import FailedPreconditionError, StepMismatchError

__all__ = ["DEFAULT", "ClientBase", "TransportFactory"]

# Marks "argument not given" where None is a meaningful value (no deadline).
DEFAULT: Any = object()

# Makes the transport to one server: (address, retry policy, extra channel options) -> Transport.
TransportFactory = Callable[[str, RetryPolicy, Sequence[tuple[str, Any]] | None], Transport]


def grpc_transport(
    tls: Any = None, token: Any = None, shared_memory: bool | None = None, data_plane: bool | None = None
) -> TransportFactory:
    """The default factory: gRPC, with this client's TLS settings and token (``optserve.client.security``),
    shared memory with a server on this host unless ``shared_memory`` is False, and the data plane for
    large pushes unless ``data_plane`` is False."""

    def make(address: str, retry: RetryPolicy, options: Sequence[tuple[str, Any]] | None) -> Transport:
        return GrpcTransport(
            address,
            retry=retry,
            options=options,
            tls=tls,
            token=token,
            shared_memory=shared_memory,
            data_plane=data_plane,
        )

    return make


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
        tls: Any = None,
        token: Any = None,
        retry_window_s: float | None = None,
        shared_memory: bool | None = None,
        data_plane: bool | None = None,
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
        check_non_negative("retry_window_s", retry_window_s, allow_none=True)
        retry = RetryPolicy(retries, backoff, self.max_backoff, attempt_timeout, retry_window_s)
        factory = transport_factory or grpc_transport(tls, token, shared_memory, data_plane)
        self._connect(addresses, retry, options, factory)

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
        non_finite_policy: str | None = None,
        worker_index: int | None = None,
        timeout: Any = DEFAULT,
    ) -> ModelInfo:
        """Create a model, or join it when one with the same spec exists (``created`` is False).

        ``non_finite_policy``: what a push holding NaN or inf does: "reject" (INVALID_ARGUMENT,
        nothing applied), "skip_step" (the step is taken without an update) or "allow"; None:
        the server's default, reject (allow for a LossScaleOptimizer, which skips such steps itself).
        ``worker_index`` (optional) is recorded by the server as the creator (``ModelInfo.activity``).
        """
        spec = model_spec(model_id, optimizer, num_workers, mode, sync_timeout_s, timeout_policy, non_finite_policy)
        if worker_index is not None:
            check_worker_index(worker_index)
        arrays = as_tensors(variables, "variables")
        if not arrays:
            raise ValueError("`variables` must hold at least one variable. Received: {}")
        self._check_open()
        info = self._create_model(spec, arrays, self._timeout(timeout, self.timeout), worker_index)
        self.steps.record_model_step(model_id, info.step)
        self._observe(model_id, info)
        return info

    @abc.abstractmethod
    def _create_model(
        self, spec: ModelSpec, variables: dict[str, np.ndarray], timeout: float | None, worker_index: int | None
    ) -> ModelInfo: ...

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

    def delete_model(self, model_id: str, *, if_idle: bool = False, timeout: Any = DEFAULT) -> bool:
        """Delete the model; False if there was none. ``if_idle``: refused (FailedPreconditionError) while in use."""
        check_name(model_id, "model_id")
        self._check_open()
        deleted = self._delete_model(model_id, self._timeout(timeout, self.timeout), bool(if_idle))
        self.steps.forget(model_id)
        return deleted

    @abc.abstractmethod
    def _delete_model(self, model_id: str, timeout: float | None, if_idle: bool) -> bool: ...

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
        learning_rate: Any = None,
        timeout: Any = DEFAULT,
    ) -> OptimizerState:
        """Overwrite slots, variables, the iterations counter, scalars and/or the learning rate in one request.

        ``learning_rate``: a float (0 included), or a new schedule, a Keras-serialized dict
        (``keras.optimizers.schedules.serialize``) or a Keras schedule; used from the next update on.
        As in Keras a float cannot replace a schedule (FailedPreconditionError).

        Everything is checked before anything changes (on one server, by the server,
        atomically; on shards, by the client first, then shard by shard).
        """
        check_name(model_id, "model_id")
        slot_arrays = slot_tensors(slots)
        variable_arrays = as_tensors(variables, "variables")
        if iterations is not None and (not isinstance(iterations, (int, np.integer)) or iterations < 0):
            raise ValueError(f"`iterations` must be an integer >= 0. Received: iterations={iterations!r}")
        scalar_values = {str(k): float(v) for k, v in (scalars or {}).items()}
        rate = check_learning_rate(learning_rate) if learning_rate is not None else None
        timeout = self._timeout(timeout, self.timeout)
        self._check_open()
        return self._set_weights(
            model_id,
            slot_arrays,
            variable_arrays,
            StateChange(None if iterations is None else int(iterations), scalar_values, rate),
            timeout,
        )

    @abc.abstractmethod
    def _set_weights(
        self,
        model_id: str,
        slots: dict[str, dict[str, np.ndarray]],
        variables: dict[str, np.ndarray],
        change: StateChange,
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
