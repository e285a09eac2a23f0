"""Plain NumPy client for an optserve parameter server.

    with Client("127.0.0.1:50051") as client:
        client.create_model("mlp", "adam", {"w": w, "b": b}, num_workers=2)
        result, values = client.push_pull("mlp", {"w": gw, "b": gb}, worker_index=0)

``Client`` checks arguments and tracks steps (``optserve.client.base``); it
reaches its server through one :class:`~optserve.client.transport.Transport`,
by default :class:`~optserve.client.transport.GrpcTransport`, which owns the
channel, retries, deadlines and the tensor wire format. Errors are the project's
one family (``optserve.protos.errors``), re-exported here.

Several addresses (``Client(["h1:50051", "h2:50051"])`` or ``"h1:50051,h2:50051"``)
give a ``ShardedClient`` (``optserve.client.sharded``): the same methods, with each
model's variables spread over those servers.

This module imports neither the server, nor Keras, nor CuPy.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from optserve.client.arguments import (
    StateChange,
    model_not_found,
    optimizer_config_json,
    parse_address,
    parse_addresses,
    weight_tensors,
)
from optserve.client.base import DEFAULT, ClientBase, TransportFactory
from optserve.client.messages import optimizer_class_name
from optserve.client.steps import StepTracker
from optserve.client.transport import RetryPolicy, Transport, error_from_rpc
from optserve.client.types import (
    ModelInfo,
    ModelSpec,
    OptimizerState,
    OptimizerWeights,
    ServerGeneration,
    StepResult,
    VariableInfo,
)
from optserve.protos.errors import (
    METADATA_PREFIX,
    AbortedError,
    AlreadyExistsError,
    DeadlineExceededError,
    FailedPreconditionError,
    InvalidArgumentError,
    NotFoundError,
    OptserveError,
    ResourceExhaustedError,
    StepMismatchError,
    UnauthenticatedError,
    UnavailableError,
)
from optserve.protos.tensors import SparseGradient

__all__ = [
    "Client",
    "ModelInfo",
    "VariableInfo",
    "StepResult",
    "OptimizerState",
    "OptimizerWeights",
    "OptserveError",
    "InvalidArgumentError",
    "NotFoundError",
    "AlreadyExistsError",
    "FailedPreconditionError",
    "StepMismatchError",
    "DeadlineExceededError",
    "AbortedError",
    "ResourceExhaustedError",
    "UnavailableError",
    "UnauthenticatedError",
    "ServerGeneration",
    "SparseGradient",
    "StepTracker",
]

# Also importable from here, as before the transport seam existed.
_REEXPORTED = (
    DEFAULT,
    METADATA_PREFIX,
    error_from_rpc,
    optimizer_class_name,
    optimizer_config_json,
    parse_address,
    parse_addresses,
)


class Client(ClientBase):
    """Connection to one optserve server, or to several shards of one.

    Given several addresses (a list, or one string with commas), ``Client(...)``
    returns a :class:`optserve.client.sharded.ShardedClient` with the same methods,
    which spreads each model's variables over those servers.

    Args:
        address: ``"host:port"``, or several of them for a sharded client.
        timeout: seconds a call may take in all, retries included (None: no limit).
            Each method also takes ``timeout=`` to override it for one call.
        retries: how many times a call is retried after UNAVAILABLE (server not up,
            connection lost) or after its own per-attempt deadline expired.
            Retrying a push is safe: the server counts a (worker, step) once.
        backoff, max_backoff: first and largest pause between attempts (seconds,
            doubled each time, with jitter).
        push_timeout: default deadline of ``push``/``push_pull``. None (the default)
            means no client deadline: a synchronous push waits for the other workers,
            and the server's ``sync_timeout_s`` bounds that wait.
        attempt_timeout: optional deadline of a single attempt; an attempt that runs
            out of it is retried (keep it above the time a synchronous step may take).
        options: extra gRPC channel options, ``[(key, value), ...]``.
        step_tracker: a :class:`~optserve.client.steps.StepTracker` to share with
            others (default: this client's own).
        transport_factory: ``(address, retry_policy, options) -> Transport``
            (default: :class:`~optserve.client.transport.GrpcTransport`).
        tls, token: TLS settings and bearer token (``optserve.client.security``);
            None reads them from ``OPTSERVE_TLS_*`` and ``OPTSERVE_TOKEN``.
        retry_window_s: keep retrying a server that is unavailable for this many
            seconds (e.g. 300 to wait through a container restart), logging that
            it waits; None (the default): ``retries`` attempts only.
        shared_memory: pushes to a server on this host pass gradients and new
            values through shared memory (``optserve.client.shared_memory``);
            False: always gRPC; None (the default): on unless
            ``OPTSERVE_SHARED_MEMORY=0``. Falls back to gRPC by itself.
        data_plane: pushes larger than one gRPC message (and not through shared
            memory) send their bytes over a TCP connection beside gRPC
            (``optserve.client.data_plane``; never with TLS); False: always gRPC
            messages; None (the default): on unless ``OPTSERVE_DATA_PLANE=0``.
            Falls back to gRPC by itself.
    """

    transport: Transport

    def __new__(cls, address: str | Sequence[str], *args: Any, **kwargs: Any):
        # Several addresses select the sharded client. It is not a subclass (it is
        # registered as a virtual one below), so Python does not run Client.__init__ on it.
        if cls is Client and len(parse_addresses(address)) > 1:
            from optserve.client.sharded import ShardedClient

            return ShardedClient(address, *args, **kwargs)
        return super().__new__(cls)

    def _connect(
        self,
        addresses: list[str],
        retry: RetryPolicy,
        options: Sequence[tuple[str, Any]] | None,
        factory: TransportFactory,
    ) -> None:
        if len(addresses) != 1:
            raise ValueError(
                f"`address` of a {type(self).__name__} must be one 'host:port'; use "
                f"ShardedClient for several. Received: address={self.address!r}"
            )
        self.transport = factory(addresses[0], retry, options)

    def _disconnect(self) -> None:
        self.transport.close()

    def __repr__(self) -> str:
        return f"Client({self.address!r})"

    # ------------------------------------------------------------------ operations over the transport

    def _server_step(self, model_id: str, timeout: float | None) -> int:
        return self._model(model_id, timeout).step

    def _model(self, model_id: str, timeout: float | None) -> ModelInfo:
        found = self.transport.list_models(model_id, False, timeout=timeout)
        if not found:
            raise model_not_found(model_id)
        return found[0]

    def _create_model(
        self, spec: ModelSpec, variables: dict[str, np.ndarray], timeout: float | None, worker_index: int | None
    ) -> ModelInfo:
        return self.transport.create_model(spec, variables, timeout=timeout, worker_index=worker_index)

    def _list_models(self, model_id: str | None, with_stats: bool, timeout: float | None) -> list[ModelInfo]:
        return self.transport.list_models(model_id, with_stats, timeout=timeout)

    def _delete_model(self, model_id: str, timeout: float | None, if_idle: bool) -> bool:
        return self.transport.delete_model(model_id, timeout=timeout, if_idle=if_idle)

    def _checkpoint(self, timeout: float | None) -> tuple[str, int]:
        return self.transport.checkpoint(timeout=timeout)

    def _health(self, service: str, timeout: float | None) -> str:
        return self.transport.health(service, timeout=timeout)

    def _apply_gradients(
        self,
        model_id: str,
        prepared: Any,
        worker_index: int,
        step: int,
        aggregated: bool,
        return_variables: bool,
        timeout: float | None,
    ) -> tuple[StepResult, dict[str, np.ndarray]]:
        return self.transport.apply_gradients(
            model_id,
            prepared,
            worker_index=worker_index,
            step=step,
            aggregated=aggregated,
            return_variables=return_variables,
            timeout=timeout,
        )

    def _pull(self, model_id: str, names: list[str], timeout: float | None) -> tuple[StepResult, dict[str, np.ndarray]]:
        return self.transport.pull(model_id, names, timeout=timeout)

    def _get_weights(
        self, model_id: str, names: list[str], include_variables: bool, timeout: float | None
    ) -> OptimizerWeights:
        return self.transport.get_weights(model_id, names, include_variables, timeout=timeout)

    def _set_weights(
        self,
        model_id: str,
        slots: dict[str, dict[str, np.ndarray]],
        variables: dict[str, np.ndarray],
        change: StateChange,
        timeout: float | None,
    ) -> OptimizerState:
        state, fields = change.state_for(self._model(model_id, timeout)) if change else (None, [])
        result = self.transport.set_weights(
            model_id, weight_tensors(slots, variables), state, timeout=timeout, fields=fields
        )
        change.check_taken(result)
        return result
