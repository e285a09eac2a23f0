"""Plain NumPy client for an optserve parameter server.

    with Client("127.0.0.1:50051") as client:
        client.create_model("mlp", "adam", {"w": w, "b": b}, num_workers=2)
        result, values = client.push_pull("mlp", {"w": gw, "b": gb}, worker_index=0)

Every call goes through :meth:`Client._invoke`, which owns retries, deadlines and
the translation of gRPC status codes into :class:`OptserveError` subclasses.
Tensors travel chunked (``optserve.protos.tensors``), so no single message ever
holds a whole large tensor; requests are built as wire bytes and replies split
without copying their payloads (see ``_wire_stub``).

Several addresses (``Client(["h1:50051", "h2:50051"])`` or ``"h1:50051,h2:50051"``)
give a ``ShardedClient`` (``optserve.client.sharded``): the same methods, with each
model's variables spread over those servers.

This module imports neither the server, nor Keras, nor CuPy.
"""
from __future__ import annotations

import dataclasses
import json
import random
import sys
import threading
import time
from typing import Any, Callable, Iterable, Mapping, Sequence

import grpc
import numpy as np
from grpc_health.v1 import health_pb2, health_pb2_grpc

from optserve.protos import optserve_pb2 as pb
from optserve.protos import optserve_pb2_grpc as pb_grpc
from optserve.protos import tensors

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
    "ResourceExhaustedError",
    "UnavailableError",
    "UnauthenticatedError",
]

# Trailing-metadata keys the server attaches to errors start with this prefix;
# "optserve-current-step" becomes details["current_step"].
METADATA_PREFIX = "optserve-"

_MODES = {"sync": pb.SYNC, "async": pb.ASYNC}
_MODE_NAMES = {pb.SYNC: "sync", pb.ASYNC: "async", pb.SYNC_MODE_UNSPECIFIED: "sync"}
_POLICIES = {"fail": pb.FAIL, "apply_partial": pb.APPLY_PARTIAL}
_NON_FINITE = {"reject": pb.NON_FINITE_REJECT, "allow": pb.NON_FINITE_ALLOW, "skip_step": pb.NON_FINITE_SKIP_STEP}
_POLICY_NAMES = {pb.FAIL: "fail", pb.APPLY_PARTIAL: "apply_partial", pb.TIMEOUT_POLICY_UNSPECIFIED: "fail"}

# Marks "argument not given" where None is a meaningful value (no deadline).
_DEFAULT: Any = object()


# --------------------------------------------------------------------------- errors


class OptserveError(Exception):
    """A call failed; ``code`` is the gRPC status code name, ``details`` the server's extras."""

    def __init__(self, code: str, message: str, details: Mapping[str, str] | None = None):
        super().__init__(message)
        self.code = code
        self.message = message
        self.details = dict(details or {})

    def __str__(self) -> str:
        return self.message

    def __reduce__(self):  # keep pickling (multiprocessing) working with the 3-argument init
        return (type(self), (self.code, self.message, self.details))


class InvalidArgumentError(OptserveError, ValueError):
    pass


class NotFoundError(OptserveError, KeyError):
    pass


class AlreadyExistsError(OptserveError):
    pass


class FailedPreconditionError(OptserveError):
    pass


class StepMismatchError(FailedPreconditionError):
    """A push named a step other than the model's current one.

    ``current_step`` is the server's step; ``step`` the one that was sent. The
    client never adopts the server's step on its own: call
    :meth:`Client.resync` (or push with ``step=error.current_step``) to go on.
    """

    def __init__(self, code: str, message: str, details: Mapping[str, str] | None = None):
        super().__init__(code, message, details)
        self.current_step = int(self.details["current_step"])
        self.model_id: str | None = None
        self.worker_index: int | None = None
        self.step: int | None = None


class DeadlineExceededError(OptserveError, TimeoutError):
    pass


class ResourceExhaustedError(OptserveError):
    pass


class UnavailableError(OptserveError, ConnectionError):
    pass


class UnauthenticatedError(OptserveError, PermissionError):
    pass


_ERROR_BY_CODE: dict[str, type[OptserveError]] = {
    "INVALID_ARGUMENT": InvalidArgumentError,
    "OUT_OF_RANGE": InvalidArgumentError,
    "NOT_FOUND": NotFoundError,
    "ALREADY_EXISTS": AlreadyExistsError,
    "FAILED_PRECONDITION": FailedPreconditionError,
    "DEADLINE_EXCEEDED": DeadlineExceededError,
    "ABORTED": DeadlineExceededError,  # the server ended a step (sync-timeout, worker-lost); ``code`` tells
    "RESOURCE_EXHAUSTED": ResourceExhaustedError,
    "UNAVAILABLE": UnavailableError,
    "UNAUTHENTICATED": UnauthenticatedError,
    "PERMISSION_DENIED": UnauthenticatedError,
}


def _metadata_details(metadata) -> dict[str, str]:
    details = {}
    for key, value in metadata or ():
        if key.startswith(METADATA_PREFIX):
            if isinstance(value, bytes):
                value = value.decode("utf-8", "replace")
            details[key[len(METADATA_PREFIX):].replace("-", "_")] = value
    return details


def error_from_rpc(error: grpc.RpcError) -> OptserveError:
    """The one place where a gRPC failure becomes a client exception."""
    status = error.code() if hasattr(error, "code") else None
    code = status.name if status is not None else "UNKNOWN"
    message = (error.details() if hasattr(error, "details") else None) or str(error)
    metadata = error.trailing_metadata() if hasattr(error, "trailing_metadata") else None
    details = _metadata_details(metadata)
    if code == "FAILED_PRECONDITION" and "current_step" in details:
        return StepMismatchError(code, message, details)
    return _ERROR_BY_CODE.get(code, OptserveError)(code, message, details)


# --------------------------------------------------------------------------- results


@dataclasses.dataclass
class StepResult:
    step: int                # the model's step after the update: the next step to push
    iterations: int
    learning_rate: float     # the rate the next update uses
    duplicate: bool = False  # the push had been counted already and was not applied again
    contributors: list[int] = dataclasses.field(default_factory=list)
    missing_workers: list[int] = dataclasses.field(default_factory=list)  # left out under APPLY_PARTIAL


@dataclasses.dataclass
class VariableInfo:
    name: str
    shape: tuple[int, ...]
    dtype: str
    slots: list[str]
    norm: float | None = None  # L2 norm, when asked for (``with_stats=True``)


@dataclasses.dataclass
class ModelInfo:
    model_id: str
    created: bool | None     # from create_model: False when an identical model was joined
    step: int
    iterations: int
    learning_rate: float
    num_workers: int
    mode: str                # "sync" | "async"
    variables: list[VariableInfo]
    optimizer: str = ""      # optimizer class name, e.g. "Adam"
    optimizer_config: Any = None
    raw_iterations: int = 0
    scalars: dict[str, float] = dataclasses.field(default_factory=dict)
    sync_timeout_s: float = 0.0
    timeout_policy: str = "fail"
    waiting_workers: list[int] = dataclasses.field(default_factory=list)


@dataclasses.dataclass
class OptimizerState:
    iterations: int
    raw_iterations: int
    learning_rate: float
    step: int
    scalars: dict[str, float] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass
class OptimizerWeights(OptimizerState):
    slots: dict[str, dict[str, np.ndarray]] = dataclasses.field(default_factory=dict)
    variables: dict[str, np.ndarray] = dataclasses.field(default_factory=dict)

    def slot_list(self) -> list[np.ndarray]:
        """Slots in Keras order, variable by variable."""
        return [array for per_var in self.slots.values() for array in per_var.values()]

    def as_list(self) -> list[np.ndarray]:
        """tf.keras ``get_weights()`` layout: ``[iterations, *slots]``."""
        return [np.array(self.iterations, dtype=np.int64), *self.slot_list()]


def _step_result(message: pb.StepResult) -> StepResult:
    return StepResult(
        step=int(message.step),
        iterations=int(message.iterations),
        learning_rate=float(message.learning_rate),
        duplicate=bool(message.duplicate),
        contributors=[int(w) for w in message.contributors],
        missing_workers=[int(w) for w in message.missing_workers],
    )


def _state(message: pb.OptimizerState) -> OptimizerState:
    return OptimizerState(
        iterations=int(message.iterations),
        raw_iterations=int(message.raw_iterations),
        learning_rate=float(message.learning_rate),
        step=int(message.step),
        scalars={k: float(v) for k, v in sorted(message.scalars.items())},
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


def _model_info(message: pb.ModelInfo, *, created: bool | None = None, with_stats: bool = False) -> ModelInfo:
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
    state = _state(message.state)
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
    )


# --------------------------------------------------------------------------- argument helpers


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
        raise ValueError(f"Each shard address may be listed once. Received {', '.join(repeated)} more than once "
                         f"in address={address!r}")
    return addresses


def parse_address(address: str | Sequence[str]) -> str:
    """One ``host:port``, or several joined by commas (a sharded client's address)."""
    return ",".join(parse_addresses(address))


def _json_default(value):
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    raise TypeError(f"Object of type {type(value).__name__} is not JSON serializable")


def optimizer_config_json(optimizer) -> str:
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


def _serialize_optimizer_object(optimizer) -> dict:
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


def _check_name(name, what: str) -> str:
    if not isinstance(name, str) or not name:
        raise ValueError(f"`{what}` must be a non-empty string. Received: {what}={name!r}")
    return name


def _as_tensors(values: Mapping[str, Any] | None, what: str, *, drop_none: bool = False) -> dict[str, np.ndarray]:
    """Arrays checked for a wire dtype up front, so a bad one fails before any byte is sent."""
    if values is None:
        return {}
    if not isinstance(values, Mapping):
        raise TypeError(f"`{what}` must be a dict {{name: array}}. Received: {type(values).__name__}")
    arrays = {}
    for name, value in values.items():
        _check_name(name, f"{what} name")
        if value is None and drop_none:
            continue  # like Keras: a None gradient leaves its variable alone
        array = np.asarray(value)
        try:
            tensors.dtype_to_proto(array.dtype)
        except tensors.TensorFormatError as error:
            raise ValueError(f"`{what}[{name!r}]`: {error}") from None
        arrays[name] = array
    return arrays


def _names(names) -> list[str]:
    if names is None:
        return []
    if isinstance(names, str):
        return [names]
    return [_check_name(n, "names") for n in names]


def _variable_tensors(arrays: Mapping[str, np.ndarray]) -> list[tuple[str, str, np.ndarray]]:
    return [(name, "", array) for name, array in arrays.items()]


_SERVICE_PATH = "/" + pb.DESCRIPTOR.services_by_name["ParameterServer"].full_name + "/"


def _wire_stub(channel: grpc.Channel) -> pb_grpc.ParameterServerStub:
    """The generated stub, except that the calls carrying tensors send and receive wire bytes.

    Requests are built by ``tensors.serialized_chunk_messages`` (each payload copied
    once, from the array into the message) and responses are split by
    ``tensors.split_message`` (payloads copied once, into the arrays), instead of
    going through protobuf objects, which copy every payload two more times.
    A serializer or deserializer of None makes gRPC pass the bytes through.
    """
    stub = pb_grpc.ParameterServerStub(channel)
    stub.CreateModel = channel.stream_unary(
        _SERVICE_PATH + "CreateModel", request_serializer=None,
        response_deserializer=pb.CreateModelResponse.FromString, _registered_method=True)
    stub.ApplyGradients = channel.stream_stream(
        _SERVICE_PATH + "ApplyGradients", request_serializer=None, response_deserializer=None,
        _registered_method=True)
    stub.Pull = channel.unary_stream(
        _SERVICE_PATH + "Pull", request_serializer=pb.PullRequest.SerializeToString, response_deserializer=None,
        _registered_method=True)
    stub.GetWeights = channel.unary_stream(
        _SERVICE_PATH + "GetWeights", request_serializer=pb.GetWeightsRequest.SerializeToString,
        response_deserializer=None, _registered_method=True)
    stub.SetWeights = channel.stream_unary(
        _SERVICE_PATH + "SetWeights", request_serializer=None,
        response_deserializer=pb.SetWeightsResponse.FromString, _registered_method=True)
    return stub


# --------------------------------------------------------------------------- the client


class Client:
    """Connection to one optserve server, or to several shards of one.

    Given several addresses (a list, or one string with commas), ``Client(...)``
    returns a :class:`optserve.client.sharded.ShardedClient`, a subclass with the
    same methods that spreads each model's variables over those servers.

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
    """

    def __new__(cls, address: str | Sequence[str], *args, **kwargs):
        # Several addresses select the sharded client; Python then runs its __init__
        # with the same arguments, so every caller of Client(...) gets sharding for free.
        if cls is Client and len(parse_addresses(address)) > 1:
            from optserve.client.sharded import ShardedClient

            return super().__new__(ShardedClient)
        return super().__new__(cls)

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
    ):
        self.address = parse_address(address)
        _check_non_negative("timeout", timeout, allow_none=True)
        _check_non_negative("push_timeout", push_timeout, allow_none=True)
        _check_non_negative("attempt_timeout", attempt_timeout, allow_none=True)
        _check_non_negative("backoff", backoff)
        _check_non_negative("max_backoff", max_backoff)
        if not isinstance(retries, int) or retries < 0:
            raise ValueError(f"`retries` must be an integer >= 0. Received: retries={retries!r}")
        self.timeout = timeout
        self.push_timeout = push_timeout
        self.attempt_timeout = attempt_timeout
        self.retries = retries
        self.backoff = backoff
        self.max_backoff = max(max_backoff, backoff)
        channel_options = dict(tensors.GRPC_OPTIONS)
        # Reconnect about as fast as we retry, instead of gRPC's 1 s..120 s default backoff.
        channel_options["grpc.initial_reconnect_backoff_ms"] = max(1, int(backoff * 1000))
        channel_options["grpc.max_reconnect_backoff_ms"] = max(1, int(self.max_backoff * 1000))
        channel_options.update(dict(options or ()))
        self._channel = grpc.insecure_channel(self.address, options=list(channel_options.items()))
        self._stub = _wire_stub(self._channel)
        self._health = health_pb2_grpc.HealthStub(self._channel)
        self._lock = threading.Lock()
        self._model_steps: dict[str, int] = {}
        self._worker_steps: dict[tuple[str, int], int] = {}
        self._closed = False

    def __repr__(self) -> str:
        return f"Client({self.address!r})"

    # ------------------------------------------------------------------ lifecycle

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            self._channel.close()

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ------------------------------------------------------------------ calls

    def _invoke(self, attempt: Callable[[float | None], Any], timeout: float | None) -> Any:
        """Run ``attempt(deadline_seconds)`` with retries; map any gRPC failure to OptserveError."""
        if self._closed:
            raise ValueError("This Client is closed.")
        deadline = None if timeout is None else time.monotonic() + timeout
        delay = self.backoff
        for attempt_number in range(self.retries + 1):
            attempt_timeout = self._attempt_timeout(deadline)
            started = time.monotonic()
            try:
                return attempt(attempt_timeout)
            except grpc.RpcError as rpc_error:
                error = error_from_rpc(rpc_error)
                last_attempt = attempt_number == self.retries
                if last_attempt or not self._retryable(error, started, attempt_timeout, deadline):
                    raise error from None
            pause = min(delay, self.max_backoff) * random.uniform(0.5, 1.0)
            if deadline is not None:
                pause = min(pause, max(0.0, deadline - time.monotonic()))
            time.sleep(pause)
            delay *= 2
        raise AssertionError("unreachable")  # pragma: no cover

    def _attempt_timeout(self, deadline: float | None) -> float | None:
        remaining = None if deadline is None else max(0.0, deadline - time.monotonic())
        if self.attempt_timeout is None:
            return remaining
        return self.attempt_timeout if remaining is None else min(remaining, self.attempt_timeout)

    def _retryable(self, error: OptserveError, started: float, attempt_timeout, deadline) -> bool:
        if deadline is not None and time.monotonic() >= deadline:
            return False  # the caller's whole budget is spent
        if error.code == "UNAVAILABLE":
            return True
        # Only our own per-attempt deadline is worth retrying; a DEADLINE_EXCEEDED the
        # server sends (a synchronous step whose workers did not all arrive) is final.
        own_deadline_hit = (
            self.attempt_timeout is not None
            and attempt_timeout is not None
            and time.monotonic() - started >= attempt_timeout
        )
        return error.code == "DEADLINE_EXCEEDED" and own_deadline_hit and not error.details

    def _timeout(self, timeout, default) -> float | None:
        value = default if timeout is _DEFAULT else timeout
        _check_non_negative("timeout", value, allow_none=True)
        return value

    # ------------------------------------------------------------------ step tracking

    def _record_model_step(self, model_id: str, step: int, *, forward_only: bool = False) -> None:
        """Adopt the model's step for every worker of this client.

        ``forward_only`` (reads such as pull): a read that started before another
        thread's push finished may carry an older step, and moving that worker back
        would make its next push look like a repeat of the step it already pushed.
        """
        with self._lock:
            keep = (lambda old: max(old, step)) if forward_only else (lambda old: step)
            self._model_steps[model_id] = keep(self._model_steps.get(model_id, step))
            for key, old in self._worker_steps.items():
                if key[0] == model_id:
                    self._worker_steps[key] = keep(old)

    def _record_worker_step(self, model_id: str, worker_index: int, step: int) -> None:
        with self._lock:
            self._worker_steps[(model_id, worker_index)] = step

    def _forget_model(self, model_id: str) -> None:
        with self._lock:
            self._model_steps.pop(model_id, None)
            for key in [k for k in self._worker_steps if k[0] == model_id]:
                del self._worker_steps[key]

    def next_step(self, model_id: str, worker_index: int = 0) -> int:
        """The step a push from ``worker_index`` will name by default (asks the server once if unknown)."""
        with self._lock:
            step = self._worker_steps.get((model_id, worker_index), self._model_steps.get(model_id))
        if step is None:
            step = self._server_step(model_id, timeout=self.timeout)
            self._record_worker_step(model_id, worker_index, step)
        return step

    def resync(self, model_id: str, worker_index: int | None = None, *, timeout=_DEFAULT) -> int:
        """Adopt the server's current step for one worker (or every worker when None); returns it."""
        step = self._server_step(model_id, timeout=self._timeout(timeout, self.timeout))
        if worker_index is None:
            self._record_model_step(model_id, step)
        else:
            self._record_worker_step(model_id, worker_index, step)
        return step

    def _server_step(self, model_id: str, timeout) -> int:
        return self._model(model_id, timeout).step

    def _model(self, model_id: str, timeout) -> ModelInfo:
        found = self._list_models(_check_name(model_id, "model_id"), with_stats=False, timeout=timeout)
        if not found:
            raise NotFoundError("NOT_FOUND", f"Model {model_id!r} not found.")
        return found[0]

    # ------------------------------------------------------------------ models

    def create_model(
        self,
        model_id: str,
        optimizer,
        variables: Mapping[str, Any],
        *,
        num_workers: int = 1,
        mode: str = "sync",
        sync_timeout_s: float = 0.0,
        timeout_policy: str = "fail",
        non_finite_policy: str = "reject",
        timeout=_DEFAULT,
    ) -> ModelInfo:
        """Create a model, or join it when one with the same spec exists (``created`` is False).

        ``non_finite_policy``: what a push holding NaN or inf does: "reject" (INVALID_ARGUMENT),
        "skip_step" (the step is taken without an update) or "allow".
        """
        spec = _model_spec(model_id, optimizer, num_workers, mode, sync_timeout_s, timeout_policy,
                           non_finite_policy)
        arrays = _as_tensors(variables, "variables")
        if not arrays:
            raise ValueError("`variables` must hold at least one variable. Received: {}")

        def attempt(deadline):
            requests = tensors.serialized_chunk_messages(
                pb.CreateModelRequest(spec=spec), "variables", _variable_tensors(arrays))
            return self._stub.CreateModel(requests, timeout=deadline)

        response = self._invoke(attempt, self._timeout(timeout, self.timeout))
        info = _model_info(response.model, created=bool(response.created))
        self._record_model_step(model_id, info.step)
        return info

    def list_models(self, model_id: str | None = None, with_stats: bool = False, *, timeout=_DEFAULT) -> list[ModelInfo]:
        """Every model, or just ``model_id`` (NotFoundError if it does not exist)."""
        return self._list_models(model_id, with_stats, self._timeout(timeout, self.timeout))

    def _list_models(self, model_id, with_stats, timeout) -> list[ModelInfo]:
        models, token = [], ""
        while True:  # the server answers in pages (ListModelsResponse.next_page_token)
            request = pb.ListModelsRequest(model_id=model_id or "", with_stats=bool(with_stats), page_token=token)
            response = self._invoke(lambda deadline: self._stub.ListModels(request, timeout=deadline), timeout)
            models += [_model_info(m, with_stats=with_stats) for m in response.models]
            token = response.next_page_token
            if not token:
                return models

    def delete_model(self, model_id: str, *, timeout=_DEFAULT) -> bool:
        request = pb.DeleteModelRequest(model_id=_check_name(model_id, "model_id"))
        response = self._invoke(
            lambda deadline: self._stub.DeleteModel(request, timeout=deadline), self._timeout(timeout, self.timeout)
        )
        self._forget_model(model_id)
        return bool(response.deleted)

    def checkpoint(self, *, timeout=_DEFAULT) -> tuple[str, int]:
        """Ask the server to write a checkpoint now; returns (path, number of models)."""
        response = self._invoke(
            lambda deadline: self._stub.Checkpoint(pb.CheckpointRequest(), timeout=deadline),
            self._timeout(timeout, self.timeout),
        )
        return response.path, int(response.models)

    def health(self, service: str = "", *, timeout=_DEFAULT) -> str:
        """Standard gRPC health check: "SERVING", "NOT_SERVING", ..."""
        request = health_pb2.HealthCheckRequest(service=service)
        response = self._invoke(
            lambda deadline: self._health.Check(request, timeout=deadline), self._timeout(timeout, self.timeout)
        )
        return health_pb2.HealthCheckResponse.ServingStatus.Name(response.status)

    # ------------------------------------------------------------------ gradients

    def push(self, model_id: str, grads: Mapping[str, Any], *, worker_index: int = 0, step: int | None = None,
             aggregated: bool = False, timeout=_DEFAULT) -> StepResult:
        """Push gradients for one step; returns once the step's update has been applied.

        ``step=None`` uses the step this client tracks for (model, worker). The
        default deadline is ``push_timeout`` (None: wait as long as the server's
        synchronous step lasts).
        """
        result, _ = self._apply_gradients(model_id, grads, worker_index, step, aggregated, False, timeout)
        return result

    def push_pull(self, model_id: str, grads: Mapping[str, Any], *, worker_index: int = 0, step: int | None = None,
                  aggregated: bool = False, timeout=_DEFAULT) -> tuple[StepResult, dict[str, np.ndarray]]:
        """Push gradients and receive the updated variables in the same round trip."""
        return self._apply_gradients(model_id, grads, worker_index, step, aggregated, True, timeout)

    def _apply_gradients(self, model_id, grads, worker_index, step, aggregated, return_variables, timeout):
        _check_name(model_id, "model_id")
        _check_worker_index(worker_index)
        arrays = _as_tensors(grads, "grads", drop_none=True)
        timeout = self._timeout(timeout, self.push_timeout)
        if step is None:
            step = self.next_step(model_id, worker_index)
        elif not isinstance(step, (int, np.integer)) or step < 0:
            raise ValueError(f"`step` must be an integer >= 0 or None. Received: step={step!r}")
        header = pb.ApplyGradientsHeader(
            model_id=model_id, worker_index=worker_index, step=int(step),
            aggregated=bool(aggregated), return_variables=bool(return_variables),
            num_gradients=len(arrays),  # lets the server tell a push that broke off from a whole one
        )

        def attempt(deadline):
            # Built lazily, one message at a time as gRPC sends them: a push holds one extra
            # message of memory, not a copy of all its gradients (measured faster, too).
            requests = tensors.serialized_chunk_messages(
                pb.ApplyGradientsRequest(header=header), "gradients", _variable_tensors(arrays))
            responses = self._stub.ApplyGradients(requests, timeout=deadline)
            return _read_stream(responses, pb.ApplyGradientsResponse, "result", "variables")

        try:
            result_message, values = self._invoke(attempt, timeout)
        except StepMismatchError as error:
            if error.current_step == step:
                # The step was right; the push clashed otherwise (e.g. aggregated and
                # per-worker pushes mixed in one step): resyncing would not help.
                raise FailedPreconditionError(error.code, error.message, error.details) from None
            error.model_id, error.worker_index, error.step = model_id, worker_index, int(step)
            error.message = (
                f"{error.message} (model {model_id!r}, worker {worker_index} pushed step {step}; "
                f"the server is at step {error.current_step}. Call resync() to adopt it.)"
            )
            raise
        result = _step_result(result_message)
        self._record_worker_step(model_id, worker_index, result.step)
        return result, tensors.variables_only(values)

    def pull(self, model_id: str, names=None, *, timeout=_DEFAULT) -> tuple[StepResult, dict[str, np.ndarray]]:
        """Current variable values (all, or ``names``) and the model's step."""
        request = pb.PullRequest(model_id=_check_name(model_id, "model_id"), names=_names(names))

        def attempt(deadline):
            return _read_stream(self._stub.Pull(request, timeout=deadline), pb.PullResponse, "state", "variables")

        state, values = self._invoke(attempt, self._timeout(timeout, self.timeout))
        result = _step_result(state)
        self._record_model_step(model_id, result.step, forward_only=True)
        return result, tensors.variables_only(values)

    # ------------------------------------------------------------------ optimizer state

    def get_weights(self, model_id: str, names=None, include_variables: bool = False, *,
                    timeout=_DEFAULT) -> OptimizerWeights:
        """Optimizer state: counters, scalars and every slot (Keras order); variables if asked."""
        request = pb.GetWeightsRequest(
            model_id=_check_name(model_id, "model_id"), names=_names(names),
            include_variables=bool(include_variables),
        )

        def attempt(deadline):
            return _read_stream(self._stub.GetWeights(request, timeout=deadline), pb.GetWeightsResponse, "state",
                                "tensors")

        state_message, values = self._invoke(attempt, self._timeout(timeout, self.timeout))
        state = _state(state_message)
        slots: dict[str, dict[str, np.ndarray]] = {}
        variables: dict[str, np.ndarray] = {}
        for (name, slot), array in values.items():
            if slot:
                slots.setdefault(name, {})[slot] = array
            else:
                variables[name] = array
        return OptimizerWeights(**dataclasses.asdict(state), slots=slots, variables=variables)

    def set_weights(self, model_id: str, *, slots: Mapping[str, Mapping[str, Any]] | None = None,
                    variables: Mapping[str, Any] | None = None, iterations: int | None = None,
                    scalars: Mapping[str, float] | None = None, timeout=_DEFAULT) -> OptimizerState:
        """Overwrite slots, variables, the iterations counter and/or scalars in one request.

        The server validates the whole request before changing anything.
        """
        _check_name(model_id, "model_id")
        tensor_list = _slot_tensors(slots) + [(n, "", a) for n, a in _as_tensors(variables, "variables").items()]
        if iterations is not None and (not isinstance(iterations, (int, np.integer)) or iterations < 0):
            raise ValueError(f"`iterations` must be an integer >= 0. Received: iterations={iterations!r}")
        scalars = {str(k): float(v) for k, v in (scalars or {}).items()}
        timeout = self._timeout(timeout, self.timeout)
        state = None
        if iterations is not None or scalars:
            state = self._state_for_update(model_id, iterations, scalars, timeout)

        def attempt(deadline):
            first = pb.SetWeightsRequest(model_id=model_id, has_state=state is not None)
            if state is not None:
                first.state.CopyFrom(state)
            requests = tensors.serialized_chunk_messages(first, "tensors", tensor_list)
            return self._stub.SetWeights(requests, timeout=deadline)

        response = self._invoke(attempt, timeout)
        return _state(response.state)

    def _state_for_update(self, model_id, iterations, scalars, timeout) -> pb.OptimizerState:
        # The request carries a whole OptimizerState; fields the caller did not give keep
        # the server's current values.
        current = self._model(model_id, timeout)
        state = pb.OptimizerState(
            iterations=current.iterations, raw_iterations=current.raw_iterations,
            learning_rate=current.learning_rate, step=current.step,
        )
        state.scalars.update(current.scalars)
        state.scalars.update(scalars)
        if iterations is not None:
            # Keep the raw counter's offset (it only differs under gradient accumulation).
            state.raw_iterations = current.raw_iterations + (int(iterations) - current.iterations)
            state.iterations = int(iterations)
        return state

    def set_weights_list(self, model_id: str, weights_list: Sequence[Any], *, timeout=_DEFAULT) -> OptimizerState:
        """Set state from the tf.keras ``get_weights()`` layout ``[iterations, *slots]``.

        Count and shapes are checked against the server's slot layout first; nothing
        is sent when they do not match.
        """
        timeout = self._timeout(timeout, self.timeout)
        layout = self.get_weights(model_id, timeout=timeout)
        slots = _slots_from_list(model_id, weights_list, layout)
        iterations = np.asarray(weights_list[0])
        return self.set_weights(model_id, slots=slots, iterations=int(iterations.reshape(-1)[0]), timeout=timeout)


# --------------------------------------------------------------------------- helpers used by Client


def _check_non_negative(name: str, value, allow_none: bool = False) -> None:
    if value is None and allow_none:
        return
    if not isinstance(value, (int, float)) or isinstance(value, bool) or value < 0:
        raise ValueError(f"`{name}` must be a number >= 0{' or None' if allow_none else ''}. Received: {name}={value!r}")


def _check_worker_index(worker_index) -> None:
    if not isinstance(worker_index, (int, np.integer)) or isinstance(worker_index, bool) or worker_index < 0:
        raise ValueError(f"`worker_index` must be an integer >= 0. Received: worker_index={worker_index!r}")


def _model_spec(model_id, optimizer, num_workers, mode, sync_timeout_s, timeout_policy,
                non_finite_policy="reject") -> pb.ModelSpec:
    _check_name(model_id, "model_id")
    if not isinstance(num_workers, (int, np.integer)) or isinstance(num_workers, bool) or num_workers < 1:
        raise ValueError(f"`num_workers` must be an integer >= 1. Received: num_workers={num_workers!r}")
    mode_key = str(mode).lower()
    if mode_key not in _MODES:
        raise ValueError(f"`mode` must be one of 'sync', 'async'. Received: mode={mode!r}")
    _check_non_negative("sync_timeout_s", sync_timeout_s)
    policy_key = str(timeout_policy).lower()
    if policy_key not in _POLICIES:
        raise ValueError(
            f"`timeout_policy` must be one of 'fail', 'apply_partial'. Received: timeout_policy={timeout_policy!r}"
        )
    non_finite_key = str(non_finite_policy).lower()
    if non_finite_key not in _NON_FINITE:
        raise ValueError("`non_finite_policy` must be one of 'reject', 'skip_step', 'allow'. "
                         f"Received: non_finite_policy={non_finite_policy!r}")
    return pb.ModelSpec(
        model_id=model_id,
        optimizer_config_json=optimizer_config_json(optimizer),
        num_workers=int(num_workers),
        mode=_MODES[mode_key],
        sync_timeout_s=float(sync_timeout_s),
        timeout_policy=_POLICIES[policy_key],
        non_finite_policy=_NON_FINITE[non_finite_key],
    )


def _read_stream(responses: Iterable[bytes], message_type, head_field: str, chunk_field: str):
    """(first message's ``head_field``, {(name, slot): array}) from a server stream of wire bytes."""
    head = None
    assembler = tensors.TensorAssembler()
    try:
        for raw in responses:
            response, chunks = tensors.split_message(raw, message_type, chunk_field)
            if head is None and response.HasField(head_field):
                head = getattr(response, head_field)
            assembler.add_all(chunks)
        values = assembler.result()
    except tensors.TensorFormatError as error:
        raise OptserveError("INTERNAL", f"The server's reply is malformed: {error}") from None
    if head is None:
        raise OptserveError("INTERNAL", f"The server's reply carried no {head_field!r}.")
    return head, values


def _slot_tensors(slots) -> list[tuple[str, str, np.ndarray]]:
    if slots is None:
        return []
    if not isinstance(slots, Mapping):
        raise TypeError(f"`slots` must be a dict {{variable: {{slot: array}}}}. Received: {type(slots).__name__}")
    out = []
    for name, per_var in slots.items():
        _check_name(name, "slots variable name")
        for slot, array in _as_tensors(per_var, f"slots[{name!r}]").items():
            out.append((name, slot, array))
    return out


def _slots_from_list(model_id: str, weights_list, layout: OptimizerWeights) -> dict[str, dict[str, np.ndarray]]:
    expected = [(name, slot, array) for name, per_var in layout.slots.items() for slot, array in per_var.items()]
    weights_list = list(weights_list)
    if len(weights_list) != len(expected) + 1:
        raise InvalidArgumentError(
            "INVALID_ARGUMENT",
            f"Model {model_id!r} expects {len(expected) + 1} weights ([iterations] + {len(expected)} slots); "
            f"received {len(weights_list)}.",
        )
    iterations = np.asarray(weights_list[0])
    if iterations.size != 1 or not np.issubdtype(iterations.dtype, np.number):
        raise InvalidArgumentError(
            "INVALID_ARGUMENT",
            f"weights[0] must be the iterations counter (one number); received shape {iterations.shape} "
            f"and dtype {iterations.dtype}.",
        )
    slots: dict[str, dict[str, np.ndarray]] = {}
    for index, ((name, slot, reference), value) in enumerate(zip(expected, weights_list[1:]), start=1):
        array = np.asarray(value)
        if array.shape != reference.shape:
            raise InvalidArgumentError(
                "INVALID_ARGUMENT",
                f"weights[{index}] (slot {slot!r} of variable {name!r}) has shape {array.shape}; "
                f"expected {reference.shape}.",
            )
        try:
            array = array.astype(reference.dtype, casting="same_kind", copy=False)
        except TypeError:
            raise InvalidArgumentError(
                "INVALID_ARGUMENT",
                f"weights[{index}] (slot {slot!r} of variable {name!r}) has dtype {array.dtype}; "
                f"expected {reference.dtype}.",
            ) from None
        slots.setdefault(name, {})[slot] = array
    return slots
