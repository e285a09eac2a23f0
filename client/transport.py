"""How a client reaches one optserve server: the :class:`Transport` seam and its gRPC implementation.

``Client`` and ``ShardedClient`` check arguments and track steps; everything
about the wire lives here: the channel (:func:`open_channel`, the one place a
channel is made), the stub, retries and deadlines, the conversion between
protobuf messages and the domain values of ``optserve.client.types``, and the
zero-copy tensor paths (requests built as wire bytes, replies split without
copying their payloads, see :func:`wire_stub`).

A transport takes and returns domain values only, so another one (in-process,
shared memory, a recording fake in tests) can stand in for :class:`GrpcTransport`.

This module imports neither the server, nor Keras, nor CuPy.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import random
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Protocol, TypeVar

import grpc
import numpy as np
from grpc_health.v1 import health_pb2, health_pb2_grpc

from optserve.client import data_plane as data_plane_client
from optserve.client import security
from optserve.client import shared_memory as shared_memory_client
from optserve.client.messages import (
    Tensor,
    model_info,
    optimizer_state,
    read_stream,
    spec_message,
    state_message,
    step_result,
    variable_tensors,
)
from optserve.client.types import (
    ModelInfo,
    ModelSpec,
    OptimizerState,
    OptimizerWeights,
    StepResult,
)
from optserve.protos import errors, frames, tensors
from optserve.protos import optserve_pb2 as pb
from optserve.protos import optserve_pb2_grpc as pb_grpc
from optserve.protos.buffers import ArrayPool
from optserve.protos.errors import DeadlineExceededError, OptserveError, error_from_status

__all__ = ["GrpcTransport", "RetryPolicy", "Transport", "error_from_rpc", "open_channel"]

T = TypeVar("T")


class Transport(Protocol):
    """One server's RPCs, in domain values. ``timeout`` is the whole call's budget in seconds (None: none).

    Every method raises an :class:`~optserve.protos.errors.OptserveError` subclass
    when the server refuses or cannot be reached.
    """

    address: str

    def create_model(
        self,
        spec: ModelSpec,
        variables: Mapping[str, np.ndarray],
        *,
        timeout: float | None,
        worker_index: int | None = None,  # recorded by the server as the creator
    ) -> ModelInfo: ...

    def list_models(self, model_id: str | None, with_stats: bool, *, timeout: float | None) -> list[ModelInfo]: ...

    def delete_model(self, model_id: str, *, timeout: float | None, if_idle: bool = False) -> bool: ...

    def checkpoint(self, *, timeout: float | None) -> tuple[str, int]: ...

    def health(self, service: str, *, timeout: float | None) -> str: ...

    def apply_gradients(
        self,
        model_id: str,
        gradients: Mapping[str, Any],
        *,
        worker_index: int,
        step: int,
        aggregated: bool,
        return_variables: bool,
        timeout: float | None,
    ) -> tuple[StepResult, dict[str, np.ndarray]]: ...

    def pull(
        self, model_id: str, names: Sequence[str], *, timeout: float | None
    ) -> tuple[StepResult, dict[str, np.ndarray]]: ...

    def get_weights(
        self, model_id: str, names: Sequence[str], include_variables: bool, *, timeout: float | None
    ) -> OptimizerWeights: ...

    def set_weights(
        self,
        model_id: str,
        tensors: Sequence[Tensor],
        state: OptimizerState | None,
        *,
        timeout: float | None,
        fields: Sequence[str] = (),  # the fields of `state` to set; empty: all of them
    ) -> OptimizerState: ...

    def close(self) -> None: ...


log = logging.getLogger("optserve.client")

# --------------------------------------------------------------------------- channel and errors


def channel_options(
    backoff: float, max_backoff: float, options: Sequence[tuple[str, Any]] | None = None
) -> list[tuple[str, Any]]:
    """optserve's channel options, the caller's ``options`` last (they win)."""
    merged: dict[str, Any] = dict(tensors.GRPC_OPTIONS)
    # Reconnect about as fast as we retry, instead of gRPC's 1 s..120 s default backoff.
    merged["grpc.initial_reconnect_backoff_ms"] = max(1, int(backoff * 1000))
    merged["grpc.max_reconnect_backoff_ms"] = max(1, int(max_backoff * 1000))
    merged.update(dict(options or ()))
    return list(merged.items())


def open_channel(
    address: str, options: Sequence[tuple[str, Any]], *, tls: Any = None, token: Any = None
) -> grpc.Channel:
    """The channel to one server: every client connection is made here, with its TLS and token
    (``optserve.client.security``; None reads ``OPTSERVE_TLS_*`` / ``OPTSERVE_TOKEN``)."""
    return security.open_channel(address, list(options), tls=tls, token=token)


def error_from_rpc(error: grpc.RpcError) -> OptserveError:
    """A gRPC failure as the error family's class (see ``optserve.protos.errors.error_from_status``)."""
    status = error.code() if hasattr(error, "code") else None
    code = status.name if status is not None else "UNKNOWN"
    message = (error.details() if hasattr(error, "details") else None) or str(error)
    metadata = error.trailing_metadata() if hasattr(error, "trailing_metadata") else None
    return errors.error_from_status(code, message, metadata)


@dataclasses.dataclass(frozen=True)
class RetryPolicy:
    """How a call is retried: after UNAVAILABLE, or after its own per-attempt deadline expired.

    Retrying a push is safe: the server counts a (worker, step) once.
    """

    retries: int = 5
    backoff: float = 0.2  # first pause (seconds), doubled each time, with jitter
    max_backoff: float = 5.0
    attempt_timeout: float | None = None  # deadline of one attempt; None: the call's whole budget
    # Keep retrying an unavailable server for this long (seconds), however many attempts that
    # takes: a server restarting (a container restart) is waited for. None: ``retries`` alone.
    retry_window_s: float | None = None

    def run(self, attempt: Callable[[float | None], T], timeout: float | None) -> T:
        """``attempt(deadline_seconds)`` with retries; any gRPC failure becomes an OptserveError."""
        deadline = None if timeout is None else time.monotonic() + timeout
        window_ends = None if self.retry_window_s is None else time.monotonic() + self.retry_window_s
        delay = self.backoff
        attempt_number = 0
        while True:
            attempt_timeout = self._attempt_timeout(deadline)
            started = time.monotonic()
            try:
                return attempt(attempt_timeout)
            except grpc.RpcError as rpc_error:
                error = error_from_rpc(rpc_error)
                waiting = error.code == "UNAVAILABLE" and window_ends is not None and time.monotonic() < window_ends
                last_attempt = attempt_number >= self.retries and not waiting
                if last_attempt or not self._retryable(error, started, attempt_timeout, deadline):
                    raise error from None
                if waiting and window_ends is not None and attempt_number == self.retries:
                    log.warning(
                        "%s; waiting for the server for up to %.0f s more.", error, window_ends - time.monotonic()
                    )
            attempt_number += 1
            pause = min(delay, self.max_backoff) * random.uniform(0.5, 1.0)
            if deadline is not None:
                pause = min(pause, max(0.0, deadline - time.monotonic()))
            time.sleep(pause)
            delay *= 2

    def _attempt_timeout(self, deadline: float | None) -> float | None:
        remaining = None if deadline is None else max(0.0, deadline - time.monotonic())
        if self.attempt_timeout is None:
            return remaining
        return self.attempt_timeout if remaining is None else min(remaining, self.attempt_timeout)

    def _retryable(
        self, error: OptserveError, started: float, attempt_timeout: float | None, deadline: float | None
    ) -> bool:
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


_SERVICE_PATH = "/" + pb.DESCRIPTOR.services_by_name["ParameterServer"].full_name + "/"


def wire_stub(channel: grpc.Channel) -> pb_grpc.ParameterServerStub:
    """The generated stub, except that the calls carrying tensors send and receive wire bytes.

    Requests are built by ``tensors.serialized_chunk_messages`` (each payload copied
    once, from the array into the message) and responses are split by
    ``tensors.split_message`` (payloads copied once, into the arrays), instead of
    going through protobuf objects, which copy every payload two more times.
    A serializer or deserializer of None makes gRPC pass the bytes through.
    """
    stub = pb_grpc.ParameterServerStub(channel)
    stub.CreateModel = channel.stream_unary(
        _SERVICE_PATH + "CreateModel",
        request_serializer=None,
        response_deserializer=pb.CreateModelResponse.FromString,
        _registered_method=True,
    )
    stub.ApplyGradients = channel.stream_stream(
        _SERVICE_PATH + "ApplyGradients", request_serializer=None, response_deserializer=None, _registered_method=True
    )
    stub.Pull = channel.unary_stream(
        _SERVICE_PATH + "Pull",
        request_serializer=pb.PullRequest.SerializeToString,
        response_deserializer=None,
        _registered_method=True,
    )
    stub.GetWeights = channel.unary_stream(
        _SERVICE_PATH + "GetWeights",
        request_serializer=pb.GetWeightsRequest.SerializeToString,
        response_deserializer=None,
        _registered_method=True,
    )
    stub.ApplyGradientsUnary = channel.unary_unary(
        _SERVICE_PATH + "ApplyGradientsUnary",
        request_serializer=None,
        response_deserializer=None,
        _registered_method=True,
    )
    stub.SetWeights = channel.stream_unary(
        _SERVICE_PATH + "SetWeights",
        request_serializer=None,
        response_deserializer=pb.SetWeightsResponse.FromString,
        _registered_method=True,
    )
    return stub


# --------------------------------------------------------------------------- the gRPC transport


class GrpcTransport:
    """:class:`Transport` over one gRPC channel, with retries (see :class:`RetryPolicy`)."""

    def __init__(
        self,
        address: str,
        *,
        retry: RetryPolicy | None = None,
        options: Sequence[tuple[str, Any]] | None = None,
        tls: Any = None,
        token: Any = None,
        shared_memory: bool | None = None,
        data_plane: bool | None = None,
    ):
        self.address = address
        self.retry = retry or RetryPolicy()
        self._channel = open_channel(
            address, channel_options(self.retry.backoff, self.retry.max_backoff, options), tls=tls, token=token
        )
        self._stub = wire_stub(self._channel)
        self._health = health_pb2_grpc.HealthStub(self._channel)
        self._closed = False
        # Pushes through shared memory when the server is on this host (optserve.client.shared_memory).
        use_shared_memory = shared_memory_client.enabled_by_default() if shared_memory is None else shared_memory
        self.shared_memory = shared_memory_client.SharedMemorySessions(self._open_shared_memory)
        self._received = ArrayPool()  # replies' tensors (_receive_arrays)
        self.shared_memory.available = bool(use_shared_memory)
        # Large pushes' bytes over a TCP connection beside gRPC (optserve.client.data_plane).
        use_data_plane = data_plane_client.enabled_by_default() if data_plane is None else data_plane
        self.data_plane = data_plane_client.DataPlaneSessions(
            self._open_data_plane, data_plane_client.host_of(address) if use_data_plane and tls is None else None
        )
        self._unary = True  # False once the server turned out not to know ApplyGradientsUnary
        self._streamed_models: set[str] = set()  # models whose replies are too large for one message
        # Per pushing thread: the UNAVAILABLE a server answered on the data connection (shutting down,
        # say), for when gRPC then finds it gone as well.
        self._heard = threading.local()

    def __repr__(self) -> str:
        return f"GrpcTransport({self.address!r})"

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            self.shared_memory.close()
            self.data_plane.close()
            self._received.clear()
            self._channel.close()

    def _call(self, attempt: Callable[[float | None], T], timeout: float | None) -> T:
        if self._closed:
            raise ValueError("This Client is closed.")
        return self.retry.run(attempt, timeout)

    # ------------------------------------------------------------------ models

    def create_model(
        self,
        spec: ModelSpec,
        variables: Mapping[str, np.ndarray],
        *,
        timeout: float | None,
        worker_index: int | None = None,
    ) -> ModelInfo:
        first = pb.CreateModelRequest(spec=spec_message(spec), worker_index=worker_index)
        tensor_list = variable_tensors(variables)

        def attempt(deadline: float | None) -> pb.CreateModelResponse:
            requests = tensors.serialized_chunk_messages(first, "variables", tensor_list)
            return self._stub.CreateModel(requests, timeout=deadline)

        response = self._call(attempt, timeout)
        return model_info(response.model, created=bool(response.created))

    def list_models(self, model_id: str | None, with_stats: bool, *, timeout: float | None) -> list[ModelInfo]:
        models: list[ModelInfo] = []
        page_token = ""
        while True:  # the server answers in pages that stay under the message limit
            request = pb.ListModelsRequest(model_id=model_id or "", with_stats=bool(with_stats), page_token=page_token)
            response: pb.ListModelsResponse = self._call(functools.partial(self._list_page, request), timeout)
            models += [model_info(m, with_stats=with_stats) for m in response.models]
            page_token = response.next_page_token
            if not page_token:
                return models

    def _list_page(self, request: pb.ListModelsRequest, deadline: float | None) -> pb.ListModelsResponse:
        return self._stub.ListModels(request, timeout=deadline)

    def delete_model(self, model_id: str, *, timeout: float | None, if_idle: bool = False) -> bool:
        request = pb.DeleteModelRequest(model_id=model_id, if_idle=bool(if_idle))
        response = self._call(lambda deadline: self._stub.DeleteModel(request, timeout=deadline), timeout)
        self.shared_memory.forget_model(model_id)
        self.data_plane.forget_model(model_id)
        self._received.forget(lambda key: key[0] == model_id)
        return bool(response.deleted)

    def checkpoint(self, *, timeout: float | None) -> tuple[str, int]:
        response = self._call(lambda deadline: self._stub.Checkpoint(pb.CheckpointRequest(), timeout=deadline), timeout)
        return response.path, int(response.models)

    def health(self, service: str, *, timeout: float | None) -> str:
        request = health_pb2.HealthCheckRequest(service=service)
        response = self._call(lambda deadline: self._health.Check(request, timeout=deadline), timeout)
        return health_pb2.HealthCheckResponse.ServingStatus.Name(response.status)

    # ------------------------------------------------------------------ tensors

    def apply_gradients(
        self,
        model_id: str,
        gradients: Mapping[str, Any],
        *,
        worker_index: int,
        step: int,
        aggregated: bool,
        return_variables: bool,
        timeout: float | None,
    ) -> tuple[StepResult, dict[str, np.ndarray]]:
        self._heard.unavailable = None
        try:
            return self._apply_gradients(model_id, gradients, worker_index, step, aggregated, return_variables, timeout)
        except OptserveError as failure:
            said = self._heard.unavailable
            if said is not None and failure.code == "UNAVAILABLE" and failure is not said:
                # gRPC found the server gone too: what the server itself said is the better reason.
                raise said from None
            raise
        finally:
            self._heard.unavailable = None

    def _apply_gradients(
        self, model_id, gradients, worker_index, step, aggregated, return_variables, timeout
    ) -> tuple[StepResult, dict[str, np.ndarray]]:
        header = pb.ApplyGradientsHeader(
            model_id=model_id,
            worker_index=worker_index,
            step=int(step),
            aggregated=bool(aggregated),
            return_variables=bool(return_variables),
        )
        tensor_list, sparse = tensors.gradient_tensors(gradients)
        # Lets the server tell a push that broke off (a cancelled stream ends like a whole one) from a whole one.
        header.num_gradients = len(tensor_list)
        if not sparse:
            payload = _payload_bytes(tensor_list)
            framed = (
                payload <= tensors.CHUNK_BYTES
                and self.data_plane.available
                and self._unary
                and model_id not in self._streamed_models
            )
            pushed = None
            if framed and payload <= _FRAMED_BEFORE_SHARED_BYTES:
                pushed = self._push_framed(header, tensor_list, timeout)
                framed = False  # tried
            if pushed is None:
                pushed = self._push_shared(header, tensor_list, timeout)
            if pushed is None and framed:
                pushed = self._push_framed(header, tensor_list, timeout)
            if pushed is None and self.data_plane.available and payload > tensors.CHUNK_BYTES:
                pushed = self._push_data_plane(header, tensor_list, timeout)
            if pushed is not None:
                return pushed
        first = pb.ApplyGradientsRequest(header=header)
        if sparse:
            first.sparse_gradients.extend(sparse)
        elif self._unary and model_id not in self._streamed_models:
            messages = list(tensors.serialized_chunk_messages(first, "gradients", tensor_list))
            if len(messages) == 1:
                pushed = self._push_unary(header, messages[0], timeout)
                if pushed is not None:
                    return pushed

        def attempt(deadline: float | None) -> tuple[Any, dict]:
            # Built lazily, one message at a time as gRPC sends them: a push holds one extra
            # message of memory, not a copy of all its gradients (measured faster, too).
            requests = tensors.serialized_chunk_messages(first, "gradients", tensor_list)
            responses = self._stub.ApplyGradients(requests, timeout=deadline)
            return read_stream(
                responses, pb.ApplyGradientsResponse, "result", "variables", self._receive_arrays(model_id)
            )

        result, values = self._call(attempt, timeout)
        return step_result(result), tensors.variables_only(values)

    def _push_unary(
        self, header: pb.ApplyGradientsHeader, request: bytes, timeout: float | None
    ) -> tuple[StepResult, dict[str, np.ndarray]] | None:
        """A push in one message each way; None: the server wants it streamed (nothing was applied)."""

        def attempt(deadline: float | None) -> tuple[Any, dict]:
            reply = self._stub.ApplyGradientsUnary(request, timeout=deadline)
            return read_stream(
                [reply], pb.ApplyGradientsResponse, "result", "variables", self._receive_arrays(header.model_id)
            )

        try:
            result, values = self._call(attempt, timeout)
        except OptserveError as error:
            if error.code == "UNIMPLEMENTED":
                self._unary = False  # a server from before the unary path
                return None
            if error.code == "FAILED_PRECONDITION" and error.details.get("unary"):
                self._streamed_models.add(header.model_id)
                return None
            raise
        return step_result(result), tensors.variables_only(values)

    def _receive_arrays(self, model_id: str):
        """Where a reply's tensors are assembled: arrays reused once the caller has dropped them."""
        pool = self._received

        def allocate(name: str, slot: str, shape: tuple, dtype: np.dtype) -> np.ndarray:
            return pool.empty((model_id, name, slot), shape, dtype)

        return allocate

    def _open_data_plane(self, model_id: str, worker_index: int, frames_only: bool = False) -> pb.OpenDataPlaneResponse:
        request = pb.OpenDataPlaneRequest(model_id=model_id, worker_index=worker_index, frames_only=frames_only)
        return self._call(lambda deadline: self._stub.OpenDataPlane(request, timeout=deadline), _OPEN_TIMEOUT_S)

    def _push_data_plane(
        self, header: pb.ApplyGradientsHeader, tensor_list: list[Tensor], timeout: float | None
    ) -> tuple[StepResult, dict[str, np.ndarray]] | None:
        """A push whose gradients go over the data connection as a frame of bytes, its header as a
        request frame naming it, and whose values come back on the connection; None: push over gRPC."""
        connection = self.data_plane.segment(header.model_id, header.worker_index)
        if connection is None or not connection.fits(tensor_list):
            return None

        def request(connection) -> tuple[int, bytes, dict | None]:
            planed = _without_chunks(header)
            planed.data_plane_session = connection.session_id
            planed.data_plane_sequence = connection.send_gradients(tensor_list)
            message = pb.ApplyGradientsRequest(header=planed).SerializeToString()
            return connection.request(message, timeout, values_of=planed.data_plane_sequence)

        return self._on_data_connection(header, connection, request, values_frame=True)

    def _push_framed(
        self, header: pb.ApplyGradientsHeader, tensor_list: list[Tensor], timeout: float | None
    ) -> tuple[StepResult, dict[str, np.ndarray]] | None:
        """A push that fits one message, sent whole on the data connection in place of a unary gRPC
        call (optserve.server.data_plane_requests); None: push over gRPC."""
        first = pb.ApplyGradientsRequest(header=header)
        messages = list(tensors.serialized_chunk_messages(first, "gradients", tensor_list))
        if len(messages) != 1:
            return None
        connection = self.data_plane.segment(header.model_id, header.worker_index, frames_only=True)
        if connection is None:
            return None
        return self._on_data_connection(header, connection, lambda c: c.request(messages[0], timeout))

    def _on_data_connection(
        self, header: pb.ApplyGradientsHeader, connection, request, values_frame: bool = False
    ) -> tuple[StepResult, dict[str, np.ndarray]] | None:
        """``request(connection)`` (frames out, answer in) and its answer as a push's outcome (its
        values in a frame of their own with ``values_frame``); None: the push goes over gRPC (the
        data connection broke, the server wants it elsewhere)."""
        exchanged = self._exchange_frames(header, connection, request)
        if exchanged is None:
            return None
        flags, answer, values = exchanged
        if flags & frames.STATUS:
            self._refused_on_frames(header, connection, answer)
            return None
        if values_frame:
            response = pb.ApplyGradientsResponse.FromString(answer)
            if response.variables_in_data_plane and values is None:
                self.data_plane.discard(header.model_id, header.worker_index, connection)
                raise OptserveError("The server's reply is malformed: its values did not arrive on the data plane.")
            return step_result(response.result), values or {}
        result, received = read_stream(
            [answer], pb.ApplyGradientsResponse, "result", "variables", self._receive_arrays(header.model_id)
        )
        return step_result(result), tensors.variables_only(received)

    def _exchange_frames(self, header: pb.ApplyGradientsHeader, connection, request) -> tuple | None:
        """``request(connection)`` holding the connection: (flags, answer, values); None: another push
        holds it, or it broke (then it is dropped; if the push was applied, gRPC's push of the same
        step is answered as a duplicate)."""
        model_id, worker = header.model_id, header.worker_index
        if not connection.lock.acquire(blocking=False):
            return None
        try:
            return request(connection)
        except data_plane_client.DataPlaneBroken as why:
            log.info("data plane push for model %r not possible (%s); it goes over gRPC", model_id, why)
            self.data_plane.discard(model_id, worker, connection)
            return None
        except data_plane_client.DataPlaneTimeout as why:
            self.data_plane.discard(model_id, worker, connection)  # its answer may still come
            raise DeadlineExceededError(f"The push to model {model_id!r} got no answer ({why}).") from None
        finally:
            connection.lock.release()

    def _refused_on_frames(self, header: pb.ApplyGradientsHeader, connection, answer: bytes) -> None:
        """Raise the error of a DataPlaneStatus answer, or return when gRPC should carry the push: the
        model's replies are too large for one message, or the server is unavailable (kept for
        ``apply_gradients``), refuses the caller's token (gRPC words that itself) or no longer knows
        the session."""
        status = pb.DataPlaneStatus.FromString(answer)
        error = error_from_status(status.code, status.message, status.metadata.items())
        if error.code == "FAILED_PRECONDITION" and error.details.get("unary"):
            self._streamed_models.add(header.model_id)
            return
        if error.code in ("UNAVAILABLE", "UNAUTHENTICATED") or error.details.get("data_plane"):
            self.data_plane.discard(header.model_id, header.worker_index, connection)
            if error.code == "UNAVAILABLE":
                self._heard.unavailable = error
            return
        raise error

    def _open_shared_memory(self, model_id: str, worker_index: int) -> pb.OpenSharedMemoryResponse:
        request = pb.OpenSharedMemoryRequest(model_id=model_id, worker_index=worker_index)
        return self._call(lambda deadline: self._stub.OpenSharedMemory(request, timeout=deadline), _OPEN_TIMEOUT_S)

    def _push_header(
        self, header: pb.ApplyGradientsHeader, request: bytes, timeout: float | None
    ) -> pb.ApplyGradientsResponse:
        """Send ``request``, a push whose tensors travel elsewhere (shared memory), as a request
        frame on the worker's data connection where it has one, else as a unary gRPC call (also
        when the connection fails, or the server is unavailable: gRPC's retries take over)."""
        sessions = self.data_plane
        if sessions.available:
            connection = sessions.segment(header.model_id, header.worker_index, frames_only=True)
            exchanged = None
            if connection is not None:
                exchanged = self._exchange_frames(header, connection, lambda c: c.request(request, timeout))
            if exchanged is not None:
                flags, answer, _ = exchanged
                if not flags & frames.STATUS:
                    return pb.ApplyGradientsResponse.FromString(answer)
                self._refused_on_frames(header, connection, answer)

        def attempt(deadline: float | None) -> pb.ApplyGradientsResponse:
            return pb.ApplyGradientsResponse.FromString(self._stub.ApplyGradientsUnary(request, timeout=deadline))

        return self._call(attempt, timeout)

    def _push_shared(
        self, header: pb.ApplyGradientsHeader, tensor_list: list[Tensor], timeout: float | None
    ) -> tuple[StepResult, dict[str, np.ndarray]] | None:
        """A push whose gradients and new values go through shared memory; None: push over gRPC."""
        segment = self.shared_memory.segment(header.model_id, header.worker_index)
        if segment is None or not segment.fits(tensor_list) or not segment.lock.acquire(blocking=False):
            return None  # no segment, gradients the server must word an error about, or another push in it
        try:
            names = segment.write_gradients(tensor_list)
            shared = _without_chunks(header)
            shared.shared_memory_session = segment.session_id
            shared.shared_memory_gradients.extend(names)
            shared.shared_memory_values_region = segment.region
            request = pb.ApplyGradientsRequest(header=shared).SerializeToString()
            try:
                response = self._push_header(header, request, timeout)
            except OptserveError as error:
                if error.code not in _SERVER_REFUSALS or error.details.get("shared_memory"):
                    # The server may still read this segment (a push it holds), or no longer knows it:
                    # it is never written again; the next push opens a new one.
                    self.shared_memory.discard(header.model_id, header.worker_index, segment)
                if error.details.get("shared_memory") or error.code == "UNIMPLEMENTED":
                    return None  # the server restarted (or forgot the session): this push goes over gRPC
                raise
            values = segment.read_values() if response.variables_in_shared_memory else {}
        finally:
            segment.lock.release()
        return step_result(response.result), values

    def pull(
        self, model_id: str, names: Sequence[str], *, timeout: float | None
    ) -> tuple[StepResult, dict[str, np.ndarray]]:
        request = pb.PullRequest(model_id=model_id, names=list(names))

        def attempt(deadline: float | None) -> tuple[Any, dict]:
            return read_stream(
                self._stub.Pull(request, timeout=deadline),
                pb.PullResponse,
                "state",
                "variables",
                self._receive_arrays(model_id),
            )

        state, values = self._call(attempt, timeout)
        return step_result(state), tensors.variables_only(values)

    def get_weights(
        self, model_id: str, names: Sequence[str], include_variables: bool, *, timeout: float | None
    ) -> OptimizerWeights:
        request = pb.GetWeightsRequest(model_id=model_id, names=list(names), include_variables=bool(include_variables))

        def attempt(deadline: float | None) -> tuple[Any, dict]:
            return read_stream(
                self._stub.GetWeights(request, timeout=deadline), pb.GetWeightsResponse, "state", "tensors"
            )

        state_message, values = self._call(attempt, timeout)
        slots: dict[str, dict[str, np.ndarray]] = {}
        variables: dict[str, np.ndarray] = {}
        for (name, slot), array in values.items():
            if slot:
                slots.setdefault(name, {})[slot] = array
            else:
                variables[name] = array
        state = optimizer_state(state_message)
        fields = {field.name: getattr(state, field.name) for field in dataclasses.fields(state)}
        return OptimizerWeights(**fields, slots=slots, variables=variables)

    def set_weights(
        self,
        model_id: str,
        tensors_to_set: Sequence[Tensor],
        state: OptimizerState | None,
        *,
        timeout: float | None,
        fields: Sequence[str] = (),
    ) -> OptimizerState:
        first = pb.SetWeightsRequest(model_id=model_id, has_state=state is not None, state_fields=list(fields))
        if state is not None:
            first.state.CopyFrom(state_message(state))

        def attempt(deadline: float | None) -> pb.SetWeightsResponse:
            requests = tensors.serialized_chunk_messages(first, "tensors", tensors_to_set)
            return self._stub.SetWeights(requests, timeout=deadline)

        return optimizer_state(self._call(attempt, timeout).state)


# Up to this many bytes of gradients, one frame each way on the data connection beats shared
# memory, whose push still takes a gRPC call (measured: 64 KB 0.8 against 1.6 ms); above it,
# shared memory's copies win (1 MB: 5.4 against 3.2 ms).
_FRAMED_BEFORE_SHARED_BYTES = 128 * 1024

# Opening a shared-memory session is a control call of its own, bounded apart from the push.
_OPEN_TIMEOUT_S = 30.0


def _without_chunks(header: pb.ApplyGradientsHeader) -> pb.ApplyGradientsHeader:
    """A copy of ``header`` for a push whose gradients travel outside the request (no chunks follow)."""
    copy = pb.ApplyGradientsHeader()
    copy.CopyFrom(header)
    copy.num_gradients = 0
    return copy


def _payload_bytes(tensor_list: list[Tensor]) -> int:
    return sum(getattr(array, "nbytes", 0) for _, _, array in tensor_list)


# Answers after which the server holds nothing of a push: its shared-memory segment may be reused.
_SERVER_REFUSALS = frozenset(
    {"INVALID_ARGUMENT", "FAILED_PRECONDITION", "NOT_FOUND", "PERMISSION_DENIED", "ABORTED", "RESOURCE_EXHAUSTED"}
)
