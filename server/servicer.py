"""The gRPC face of the parameter server: decode requests, call the models, encode answers.

Exceptions become gRPC status codes in exactly one place, :func:`status_for`.
Tensor payloads travel as 1 MiB chunks both ways (``optserve.protos.tensors``).
Large responses are serialized off the event loop, straight from the arrays
(``tensors.serialized_chunk_messages``), and the new values of a synchronous
step are serialized once for all of its workers.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import inspect
import logging
import traceback
from collections.abc import AsyncIterator, Iterable

import grpc
import numpy as np

from optserve.protos import errors, frames
from optserve.protos import optserve_pb2 as pb
from optserve.protos import optserve_pb2_grpc as pb_grpc
from optserve.protos import tensors as codec
from optserve.server import auth, data_plane_rpc, heap, messages, shared_memory_rpc, unary_reply
from optserve.server import limits as bounds
from optserve.server import usage as calls
from optserve.server.data_plane import DataPlane
from optserve.server.errors import (
    AbortedError,
    FailedPreconditionError,
    InvalidArgumentError,
    OptserveError,
)
from optserve.server.generation import ServerGeneration
from optserve.server.limits import Reservation, ServerLimits
from optserve.server.model_spec import SYNC, check_model_id, parse_optimizer_config
from optserve.server.registry import ModelRegistry
from optserve.server.request_tensors import RequestTensors
from optserve.server.shared_memory import SharedMemorySessions
from optserve.server.sparse import densify_gradients
from optserve.server.two_phase import terms_from_messages

log = logging.getLogger(__name__)

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["ParameterServer"].full_name
DEFAULT_MAX_REQUEST_BYTES = 4 << 30
METADATA_PREFIX = errors.METADATA_PREFIX  # error details travel as trailing metadata under this prefix


# ------------------------------------------------------------------ errors


def status_for(exc: BaseException) -> tuple[grpc.StatusCode, str, tuple[tuple[str, str], ...]]:
    """The one mapping from an exception to (status code, message, trailing metadata)."""
    if isinstance(exc, OptserveError):
        code = getattr(grpc.StatusCode, exc.code, grpc.StatusCode.INTERNAL)
        return (code, *bounds.bounded_status(exc.message, errors.status_metadata(exc)))
    if isinstance(exc, codec.TensorFormatError):
        return grpc.StatusCode.INVALID_ARGUMENT, bounds.bounded_text(str(exc), bounds.MAX_STATUS_MESSAGE_CHARS), ()
    if isinstance(exc, MemoryError):
        return (
            grpc.StatusCode.RESOURCE_EXHAUSTED,
            "The server ran out of memory for this request; send smaller requests or give the server more memory.",
            (),
        )
    return (
        grpc.StatusCode.INTERNAL,
        f"Internal server error ({type(exc).__name__}); the server log has the details.",
        (),
    )


async def _abort(context: grpc.aio.ServicerContext, exc: Exception, rpc: str) -> None:
    code, message, metadata = status_for(exc)
    if code == grpc.StatusCode.INTERNAL:
        log.error("%s failed", rpc, exc_info=exc)
    else:
        log.debug("%s refused: %s %s", rpc, code.name, message)
    # The exception outlives the call in reference cycles (gRPC keeps the abort's context):
    # drop the request payloads its frames hold now instead of at the next full collection.
    traceback.clear_frames(exc.__traceback__)
    if rpc in _STREAMED_REQUESTS:
        _REFUSAL_TRIMMER.after(context)  # a refused upload leaves the resident size where it was
    await context.abort(code, message, trailing_metadata=metadata)


_REFUSAL_TRIMMER = heap.RefusalTrimmer()


def _cancelled(rpc: str) -> None:
    """An upload that gRPC ended (a message over --max-message-bytes, the client hung up) leaves its
    buffers behind as a refusal does."""
    if rpc in _STREAMED_REQUESTS:
        _REFUSAL_TRIMMER.call_ended()


class _Undecodable:
    """What the request deserializer returns for bytes that are not a valid message."""

    __slots__ = ("error",)

    def __init__(self, error: str):
        self.error = error


def is_undecodable(request) -> bool:
    """Whether the deserializer could not decode the request (its handler answers INVALID_ARGUMENT)."""
    return isinstance(request, _Undecodable)


def _decoded(request, rpc: str):
    if isinstance(request, _Undecodable):
        raise InvalidArgumentError(
            f"The {rpc} request could not be decoded ({request.error}); send a valid optserve.v1 {rpc}Request message."
        )
    return request


async def _decoded_stream(requests, rpc: str, idle_timeout_s: float):
    async for request in bounds.idle_guarded(requests, idle_timeout_s):
        yield _decoded(request, rpc)


_METHODS = pb.DESCRIPTOR.services_by_name["ParameterServer"].methods_by_name
_STREAMED_REQUESTS = {name for name, method in _METHODS.items() if method.client_streaming}


def _request_of(self, request, rpc: str):
    """The request (or stream) as the handler reads it: decoded, and for streams guarded against stalls."""
    if rpc in _STREAMED_REQUESTS:
        return _decoded_stream(request, rpc, self.limits.limits.stream_idle_timeout_s)
    return _decoded(request, rpc)


def _translating_errors(method):
    """Wrap an RPC handler (coroutine or async generator) so every exception reaches the client as a status."""
    rpc = method.__name__

    if inspect.isasyncgenfunction(method):

        @functools.wraps(method)
        async def streaming(self, request, context):
            entered = False
            try:
                self.limits.streams.enter()
                entered = True
                async for response in method(self, _request_of(self, request, rpc), context):
                    yield response
            except grpc.aio.AbortError:
                raise
            except asyncio.CancelledError:
                _cancelled(rpc)
                raise
            except Exception as exc:  # noqa: BLE001 - the single translation point
                request = None  # noqa: F841 - not held by the abort's traceback
                await _abort(context, exc, rpc)
            finally:
                if entered:
                    self.limits.streams.leave()

        return streaming

    @functools.wraps(method)
    async def unary(self, request, context):
        entered = False
        try:
            self.limits.streams.enter()
            entered = True
            return await method(self, _request_of(self, request, rpc), context)
        except grpc.aio.AbortError:
            raise
        except asyncio.CancelledError:
            _cancelled(rpc)
            raise
        except Exception as exc:  # noqa: BLE001 - the single translation point
            request = None  # noqa: F841 - not held by the abort's traceback
            await _abort(context, exc, rpc)
        finally:
            if entered:
                self.limits.streams.leave()

    return unary


# ---------------------------------------------------------------- tensors


def _reply_region(header: pb.ApplyGradientsHeader, shared, data) -> dict[str, np.ndarray] | None:
    """The arrays a push's reply is written into: the region of its shared-memory session that it
    names, or its data-plane session's values."""
    if shared is not None:
        return shared.values_in(header.shared_memory_values_region)
    return None if data is None else data.values


def _as_variables(values: dict[str, np.ndarray]) -> list[tuple[str, str, np.ndarray]]:
    return [(name, "", value) for name, value in values.items()]


def _payload_bytes(arrays: Iterable[np.ndarray]) -> int:
    return sum(np.asarray(a).nbytes for a in arrays)


def _serializer(message_type):
    """Response serializer that also passes through messages already serialized to bytes."""
    serialize = message_type.SerializeToString

    def serialize_response(message) -> bytes:
        return message if isinstance(message, bytes) else serialize(message)

    return serialize_response


_HANDLER_FACTORIES = {
    (False, False): grpc.unary_unary_rpc_method_handler,
    (True, False): grpc.stream_unary_rpc_method_handler,
    (False, True): grpc.unary_stream_rpc_method_handler,
    (True, True): grpc.stream_stream_rpc_method_handler,
}


# Requests whose tensor chunks are split out of the wire bytes without copying
# their payloads: the TensorAssembler then copies each payload once, into its array.
_CHUNKED_REQUEST_FIELDS = {
    "CreateModelRequest": "variables",
    "ApplyGradientsRequest": "gradients",
    "SetWeightsRequest": "tensors",
}


def request_deserializer(message_type):
    """Bytes to ``message_type``, or an _Undecodable the handler answers INVALID_ARGUMENT for."""
    field = _CHUNKED_REQUEST_FIELDS.get(message_type.DESCRIPTOR.name)
    deserialize = codec.split_deserializer(message_type, field) if field else message_type.FromString

    def deserialize_or_mark(data: bytes):
        # Raising here would answer UNKNOWN/INTERNAL: the handler answers INVALID_ARGUMENT instead.
        try:
            return deserialize(data)
        except Exception as error:  # noqa: BLE001 - DecodeError, TensorFormatError, RecursionError
            return _Undecodable(bounds.bounded_text(str(error) or type(error).__name__, 200))

    return deserialize_or_mark


def add_to_server(servicer: ParameterServerServicer, server) -> None:
    """Register the servicer as the generated ``add_ParameterServerServicer_to_server`` does,
    except that streamed responses may be pre-serialized bytes and tensor-carrying
    requests arrive split (see ``_CHUNKED_REQUEST_FIELDS``)."""
    service = pb.DESCRIPTOR.services_by_name["ParameterServer"]
    handlers = {}
    for method in service.methods:
        factory = _HANDLER_FACTORIES[(method.client_streaming, method.server_streaming)]
        handlers[method.name] = factory(
            getattr(servicer, method.name),
            request_deserializer=request_deserializer(getattr(pb, method.input_type.name)),
            response_serializer=_serializer(getattr(pb, method.output_type.name)),
        )
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(service.full_name, handlers),))
    server.add_registered_method_handlers(service.full_name, handlers)


# -------------------------------------------------------------- servicer


class ParameterServerServicer(pb_grpc.ParameterServerServicer):
    """optserve.v1.ParameterServer on grpc.aio; every handler runs on the server's event loop."""

    def __init__(
        self,
        registry: ModelRegistry,
        max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES,
        checkpointer=None,
        limits: ServerLimits | None = None,
        shared_memory: SharedMemorySessions | None = None,
        data_plane: DataPlane | None = None,
    ):
        self.registry = registry
        self.max_request_bytes = int(max_request_bytes)
        self.checkpointer = checkpointer  # optserve.server.checkpoint.Checkpointer, when checkpointing
        self.limits = limits or registry.limits
        # Segments for workers on this host (optserve.server.shared_memory); None: off.
        self.shared_memory = shared_memory
        # The data port beside gRPC (optserve.server.data_plane); None: off.
        self.data_plane = data_plane
        self.generation = ServerGeneration.new()  # the app records the checkpoint it restores

    @property
    def generation(self) -> ServerGeneration:
        """Which run of the server this is; every reply carries it."""
        return self._generation_value

    @generation.setter
    def generation(self, value: ServerGeneration) -> None:
        self._generation_value = value
        self._generation = messages.generation_message(value)  # built once, not per reply

    @_translating_errors
    async def CreateModel(self, request_iterator: AsyncIterator[pb.CreateModelRequest], context):
        spec = fields = None
        worker = None
        state = Reservation(self.limits.memory)  # the new model's state, reserved as its variables arrive
        tensors = None
        try:
            async for request in request_iterator:
                if tensors is None:  # the first message
                    if not request.HasField("spec"):
                        raise InvalidArgumentError("The first CreateModelRequest must carry `spec`.")
                    spec = request.spec
                    worker = request.worker_index if request.HasField("worker_index") else None
                    # Refuse a bad spec before its (possibly large) variables are read.
                    fields = self._spec_fields(spec)
                    tensors = RequestTensors(self.max_request_bytes, self.limits, self._state_admission(fields, state))
                await tensors.add_all(request.variables)
            if tensors is None or fields is None:
                raise InvalidArgumentError("CreateModel received no messages; send the spec, then the variables.")
            model, created = await self.registry.create_or_join(
                variables=tensors.variables("Initial variable"),
                reservation=state,
                worker=worker,
                peer=context.peer() or "",
                **fields,
            )
        except BaseException:
            if not state.transferred:  # refused before the registry had it: give back what was reserved
                state.release()
            raise
        finally:
            if tensors is not None:
                tensors.release()
        info = messages.model_info(await model.summary(), self._generation, model.memory)
        return pb.CreateModelResponse(created=created, model=info)

    def _spec_fields(self, spec: pb.ModelSpec) -> dict:
        """A spec's fields, every one checked against the server's bounds (nothing is allocated yet)."""
        limits = self.limits.limits
        check_model_id(spec.model_id)
        bounds.check_config_text(spec.optimizer_config_json, limits)
        return dict(
            model_id=spec.model_id,
            optimizer_config=parse_optimizer_config(spec.optimizer_config_json),
            num_workers=bounds.check_num_workers(spec.num_workers, limits),
            **messages.spec_choices(spec),
            sync_timeout_s=bounds.check_sync_timeout(spec.sync_timeout_s, limits),
        )

    def _state_admission(self, fields: dict, state: Reservation):
        """Reserve each new variable's state before it is received; joining an existing model reserves nothing."""
        if self.registry.has(fields["model_id"]):
            return None
        self.registry.check_room_for_model(self.limits.limits.max_models)
        principal = auth.current_principal()  # None without --auth-tokens: only the server's limits
        if principal is not None and state.owner is None:
            state.owner = self.limits.principals.claim_model(principal, fields["model_id"])
        engine = self.registry.new_engine(fields["optimizer_config"])
        workers = fields["num_workers"] if fields["mode"] == SYNC else 1
        quota = self.limits.limits.max_model_bytes  # None: only --max-memory bounds a model
        what = f"Model {fields['model_id']!r}"

        def admit(name, slot, dtype, shape, nbytes: int) -> None:
            arrays = engine.arrays_per_variable(name, tuple(shape))
            state.take(bounds.state_bytes(nbytes, arrays, workers), cap=quota, what=what)

        return admit

    @_translating_errors
    async def ApplyGradients(self, request_iterator: AsyncIterator[pb.ApplyGradientsRequest], context):
        async for response in self._push(request_iterator, context):
            yield response

    @_translating_errors
    async def ApplyGradientsUnary(self, request: pb.ApplyGradientsRequest, context):
        """One message each way; a reply too large for one message is refused before anything applies."""
        if request.HasField("header") and request.header.return_variables:
            unary_reply.check_fits(self.registry.get(request.header.model_id), request.header)
        return await unary_reply.merged(self._push(unary_reply.one(request), context), pb.ApplyGradientsResponse)

    @_translating_errors
    async def OpenSharedMemory(self, request: pb.OpenSharedMemoryRequest, context):
        if self.shared_memory is None:
            raise FailedPreconditionError("Shared memory is disabled on this server; pushes use gRPC.")
        model = self.registry.get(request.model_id)
        model.check_push_header(request.worker_index, model.step)
        session = self.shared_memory.open(model, request.worker_index)
        return shared_memory_rpc.open_response(session)

    @_translating_errors
    async def OpenDataPlane(self, request: pb.OpenDataPlaneRequest, context):
        if self.data_plane is None:
            raise FailedPreconditionError(
                "This server has no data plane (TLS, or --no-data-plane); pushes use gRPC.",
                details={"data_plane": "off"},
            )
        model = self.registry.get(request.model_id)
        model.check_push_header(request.worker_index, model.step)
        session = self.data_plane.open(model, request.worker_index, auth.current_principal(), request.frames_only)
        return data_plane_rpc.open_response(session, self.data_plane.port or 0)

    async def _push(self, request_iterator: AsyncIterator[pb.ApplyGradientsRequest], context):
        header = model = tensors = session = data_session = non_finite = None
        sparse_declared: list = []
        try:
            with contextlib.ExitStack() as in_use:
                try:
                    async for request in request_iterator:
                        if tensors is None:  # the first message
                            if not request.HasField("header"):
                                raise InvalidArgumentError("The first ApplyGradientsRequest must carry `header`.")
                            header = request.header
                            sparse_declared = list(request.sparse_gradients)
                            bounds.check_counter("step", header.step, self.limits.limits)
                            model = self.registry.get(header.model_id)
                            model.check_push_header(header.worker_index, header.step)
                            in_use.enter_context(model.usage.call(calls.PUSH, header.worker_index))
                            # Sparse gradients arrive as index and row tensors, checked when densified.
                            check_chunk = None if sparse_declared else model.check_gradient_chunk
                            tensors = RequestTensors(self.max_request_bytes, self.limits, check_chunk)
                        await tensors.add_all(request.gradients)
                except (asyncio.CancelledError, AbortedError):
                    # The worker hung up (or stalled) mid-upload: its partial push is dropped here, and
                    # the step it belonged to must not wait for it (see Model.worker_lost).
                    if model is not None and header is not None:
                        model.worker_lost(header.worker_index, header.step)
                    raise
                if header is None or model is None or tensors is None:
                    raise InvalidArgumentError(
                        "ApplyGradients received no messages; send a header, then the gradients."
                    )
                if tensors.broken_off(header):
                    # gRPC ends the request stream of a cancelled call (the worker hung up, its
                    # connection dropped) as it ends a finished one: only a push that is not
                    # whole tells them apart. It is discarded, and its step must not wait for it.
                    model.worker_lost(header.worker_index, header.step)
                    tensors.variables("Gradient")  # names the tensor short of its bytes, if one is
                    raise InvalidArgumentError(
                        f"The push's stream ended after {tensors.count} of the {header.num_gradients} gradients "
                        "its header declared; nothing of it was applied. Send the whole push again."
                    )
                if header.shared_memory_session:
                    session = shared_memory_rpc.session_for(self.shared_memory, header, tensors.count)
                    gradients = session.gradients_for(header.shared_memory_gradients)
                elif header.data_plane_session:
                    data_session = data_plane_rpc.session_for(self.data_plane, header, tensors.count)
                    gradients, non_finite = await data_session.gradients_of(header.data_plane_sequence)
                elif sparse_declared:
                    gradients = await self._densified(model, tensors.result(), sparse_declared)
                else:
                    gradients = tensors.variables("Gradient")
                try:
                    outcome = await model.push(
                        header.worker_index,
                        header.step,
                        gradients,
                        aggregated=header.aggregated,
                        return_variables=header.return_variables,
                        hold_for_joint_norm=header.hold_for_joint_norm,
                        reply_into=_reply_region(header, session, data_session),
                        non_finite=non_finite,
                    )
                except asyncio.CancelledError:
                    # Its push arrived whole, so it stays in the step: the worker (or its replacement)
                    # pushing the step again is answered as a duplicate.
                    log.info(
                        "model %r: worker %d hung up while its push for step %d waited; it still counts",
                        header.model_id,
                        header.worker_index,
                        header.step,
                    )
                    raise
        except BaseException:
            if data_session is not None and header is not None:
                # The worker waits on its connection: tell it no values follow (never blocking the loop).
                data_session.send_soon(header.data_plane_sequence, b"", frames.NO_VALUES)
            raise
        finally:
            if tensors is not None:
                tensors.release()
        first = pb.ApplyGradientsResponse(result=messages.step_result(outcome, self._generation))
        values = outcome.variables or {}
        if data_session is not None:
            yield await data_plane_rpc.reply_through(
                data_session, header.data_plane_sequence, first, outcome.variables, self.registry.executor
            )
            return
        if session is not None:
            region = header.shared_memory_values_region
            yield await shared_memory_rpc.reply_through(session, region, first, values, self.registry.executor)
            return
        if _payload_bytes(values.values()) <= codec.CHUNK_BYTES:
            for message in codec.chunk_messages(first, "variables", _as_variables(values)):
                yield message
            return
        # Every worker of a synchronous step gets the same values: encode them once for all.
        yield first
        encoding = outcome.memo.get("encoded_variables")
        if encoding is None:
            encoding = outcome.memo["encoded_variables"] = asyncio.ensure_future(
                self._encode(pb.ApplyGradientsResponse(), "variables", _as_variables(values))
            )
        for message in await asyncio.shield(encoding):
            yield message

    @_translating_errors
    async def CommitStep(self, request: pb.CommitStepRequest, context):
        """The second phase of a two-phase step (optserve.server.two_phase)."""
        bounds.check_counter("step", request.step, self.limits.limits)
        model = self.registry.get(request.model_id)
        joint = terms_from_messages(request.terms, codec.dtype_from_proto)
        with model.usage.call(calls.PUSH, request.worker_index):
            outcome = await model.commit(request.worker_index, request.step, joint, request.return_variables)
        first = pb.ApplyGradientsResponse(result=messages.step_result(outcome, self._generation))
        for message in await self._encode(first, "variables", _as_variables(outcome.variables or {})):
            yield message

    async def _densified(self, model, received: dict, declared: list) -> dict[str, np.ndarray]:
        """A push with sparse gradients as the dense one it stands for (built off the event loop)."""
        dense, sparse = codec.split_gradients(received, declared)
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self.registry.executor, densify_gradients, model, dense, sparse)

    @_translating_errors
    async def Pull(self, request: pb.PullRequest, context):
        model = self.registry.get(request.model_id)
        with model.usage.call(calls.PULL):
            status, values = await model.pull(request.names)
        first = pb.PullResponse(
            state=pb.StepResult(
                step=status.step,
                iterations=status.iterations,
                learning_rate=status.learning_rate,
                generation=self._generation,
            )
        )
        for message in await self._encode(first, "variables", _as_variables(values)):
            yield message

    @_translating_errors
    async def GetWeights(self, request: pb.GetWeightsRequest, context):
        model = self.registry.get(request.model_id)
        with model.usage.call(calls.GET_WEIGHTS):
            status, tensors = await model.get_weights(request.names, request.include_variables)
        first = pb.GetWeightsResponse(state=messages.state_message(status, self._generation))
        for message in await self._encode(first, "tensors", tensors):
            yield message

    async def _encode(self, first, field: str, tensors: list[tuple[str, str, np.ndarray]]) -> list:
        """Response messages for ``tensors``: large ones as wire bytes built off the event loop."""
        if _payload_bytes(a for _, _, a in tensors) <= codec.CHUNK_BYTES:
            return list(codec.chunk_messages(first, field, tensors))
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(
            self.registry.executor, lambda: list(codec.serialized_chunk_messages(first, field, tensors))
        )

    @_translating_errors
    async def SetWeights(self, request_iterator: AsyncIterator[pb.SetWeightsRequest], context):
        first = tensors = state = None
        try:
            with contextlib.ExitStack() as in_use:
                async for request in request_iterator:
                    if tensors is None:  # the first message
                        first = request
                        model = self.registry.get(request.model_id)  # fail fast, before the payload
                        # has_state: clients from before field presence
                        has_state = request.HasField("state") or request.has_state
                        if has_state:
                            for field in ("step", "iterations", "raw_iterations"):
                                bounds.check_counter(field, getattr(request.state, field), self.limits.limits)
                        state = messages.state_update(request.state, request.state_fields) if has_state else None
                        in_use.enter_context(model.usage.call(calls.SET_WEIGHTS))
                        tensors = RequestTensors(self.max_request_bytes, self.limits, model.check_weight_chunk)
                    await tensors.add_all(request.tensors)
                if first is None or tensors is None:
                    raise InvalidArgumentError("SetWeights received no messages; send the model_id first.")
                model = self.registry.get(first.model_id)
                status = await model.set_weights(tensors.result(), state)
        finally:
            if tensors is not None:
                tensors.release()
        return pb.SetWeightsResponse(state=messages.state_message(status, self._generation))

    @_translating_errors
    async def ListModels(self, request: pb.ListModelsRequest, context):
        """One page of models in model_id order, at most ``max_list_bytes`` (a single larger model
        fills a page alone); ``next_page_token`` says where the next page starts."""
        response = pb.ListModelsResponse()
        budget = self.limits.limits.max_list_bytes
        models = sorted(self.registry.models(request.model_id), key=lambda m: m.model_id)
        models = [m for m in models if m.model_id > request.page_token] if request.page_token else models
        for model in models:
            if not auth.visible(model.model_id):
                continue  # another tenant's model (optserve.server.auth)
            if request.track_updates:
                model.activity.track_updates()
            try:
                info = messages.model_info(await model.summary(request.with_stats), self._generation, model.memory)
            except OptserveError:
                if request.model_id or not model.closed:
                    raise  # a model deleted while listing everything is simply left out
                continue
            if response.models and response.ByteSize() + info.ByteSize() + 16 > budget:
                response.next_page_token = response.models[-1].spec.model_id
                break
            response.models.append(info)
        return response

    @_translating_errors
    async def DeleteModel(self, request: pb.DeleteModelRequest, context):
        return pb.DeleteModelResponse(deleted=self.registry.delete(request.model_id, if_idle=request.if_idle))

    @_translating_errors
    async def Checkpoint(self, request: pb.CheckpointRequest, context):
        if self.checkpointer is None:
            raise FailedPreconditionError(
                "This server was started without a checkpoint directory, so it cannot write checkpoints. "
                "Start it with `optserve serve --checkpoint-dir DIR`, or save a model's state with "
                "GetWeights (include_variables=true) and restore it with SetWeights."
            )
        path, models = await self.checkpointer.save("requested")
        return pb.CheckpointResponse(path=str(path), models=models)
