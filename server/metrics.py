"""Prometheus metrics of a parameter server (``optserve serve --metrics-port PORT``).

One :class:`ServerMetrics` per server, with a registry of its own (several servers
in one process never share series). Three sources feed it:

- :class:`RpcMetricsInterceptor`, a grpc.aio server interceptor: every RPC by
  service, method and status code, its latency, the calls in flight and the
  wire bytes each way;
- the models, through :class:`ModelMetrics` (the ``events`` hooks of
  ``optserve.server.model.Model``): pushes, duplicates, applied steps, apply and
  sync-wait seconds, step timeouts and partial applies, tensor bytes in and out;
- a collector that reads the live models when scraped: waiting workers,
  learning rate, iterations, step and the bytes held by variables and slots.

Label cardinality stays bounded: the first ``max_model_labels`` models get a
``model`` label of their own, later ones share ``model="_other"``; a deleted
model's series are removed. Methods are the services' own (a finite set), codes
the 17 gRPC status codes.
"""

from __future__ import annotations

import asyncio
import os
import pathlib
import threading
import time
from collections.abc import Iterable
from typing import Any

import grpc
from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    disable_created_metrics,
    start_http_server,
)
from prometheus_client.core import GaugeMetricFamily

from optserve.server.activity import ModelEvents

DEFAULT_MAX_MODEL_LABELS = 100
OTHER_MODELS = "_other"

# Seconds; an apply of a large model takes tens of ms, a sync wait up to the step timeout.
APPLY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
WAIT_BUCKETS = (0.001, 0.005, 0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)
RPC_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
CHECKPOINT_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)


class ServerMetrics:
    """Every metric of one server; its ``registry`` is what ``/metrics`` shows."""

    def __init__(self, max_model_labels: int = DEFAULT_MAX_MODEL_LABELS):
        # No "_created" series next to every counter: they double the output and no dashboard uses them.
        disable_created_metrics()
        if max_model_labels < 1:
            raise ValueError(f"`max_model_labels` must be >= 1. Received: max_model_labels={max_model_labels}")
        self.registry = CollectorRegistry(auto_describe=True)
        self.max_model_labels = max_model_labels
        self._labels: dict[str, str] = {}  # model_id -> its label
        self._models: dict[str, object] = {}  # model_id -> live Model (read by the collector)
        self._lock = threading.Lock()  # the collector runs on the HTTP thread
        self._http: Any = None  # the WSGI server of start_http_server
        r = self.registry
        per_model = ("model",)
        self.steps = Counter("optserve_model_steps", "Optimizer updates applied.", per_model, registry=r)
        self.pushes = Counter(
            "optserve_model_pushes", "Gradient pushes accepted (duplicates included).", per_model, registry=r
        )
        self.duplicates = Counter(
            "optserve_model_duplicate_pushes",
            "Pushes already counted before (retries), answered without applying them.",
            per_model,
            registry=r,
        )
        self.received = Counter(
            "optserve_model_received_bytes",
            "Tensor payload bytes received for the model (gradients, weights).",
            per_model,
            registry=r,
        )
        self.sent = Counter(
            "optserve_model_sent_bytes",
            "Tensor payload bytes sent for the model (pulls, weights, push replies).",
            per_model,
            registry=r,
        )
        self.apply_seconds = Histogram(
            "optserve_model_apply_seconds",
            "Seconds one optimizer update took.",
            per_model,
            buckets=APPLY_BUCKETS,
            registry=r,
        )
        self.sync_wait_seconds = Histogram(
            "optserve_model_sync_wait_seconds",
            "Seconds a synchronous push waited for its step to be applied (0 for the push completing it).",
            per_model,
            buckets=WAIT_BUCKETS,
            registry=r,
        )
        self.step_timeouts = Counter(
            "optserve_model_step_timeouts",
            "Synchronous steps that reached their sync timeout (either policy).",
            per_model,
            registry=r,
        )
        self.partial_applies = Counter(
            "optserve_model_partial_applies",
            "Steps applied without every worker (timeout_policy APPLY_PARTIAL).",
            per_model,
            registry=r,
        )
        rpc = ("grpc_service", "grpc_method")
        self.rpcs_started = Counter("optserve_rpc_started", "RPCs started.", rpc, registry=r)
        self.rpcs_handled = Counter(
            "optserve_rpc_handled", "RPCs finished, by status code.", (*rpc, "grpc_code"), registry=r
        )
        self.rpc_seconds = Histogram(
            "optserve_rpc_duration_seconds",
            "Seconds from an RPC's start to its status.",
            rpc,
            buckets=RPC_BUCKETS,
            registry=r,
        )
        self.rpcs_in_flight = Gauge("optserve_rpc_in_flight", "RPCs (streams included) in progress.", rpc, registry=r)
        self.rpc_received = Counter(
            "optserve_rpc_received_bytes", "Serialized request bytes received.", rpc, registry=r
        )
        self.rpc_sent = Counter("optserve_rpc_sent_bytes", "Serialized response bytes sent.", rpc, registry=r)
        self.in_flight_bytes = Gauge(
            "optserve_rpc_in_flight_received_bytes",
            "Request bytes received by RPCs that have not finished yet.",
            registry=r,
        )
        self.checkpoints = Counter("optserve_checkpoints", "Checkpoints written.", registry=r)
        self.checkpoint_failures = Counter(
            "optserve_checkpoint_failures", "Checkpoints that could not be written.", registry=r
        )
        self.checkpoint_seconds = Histogram(
            "optserve_checkpoint_duration_seconds",
            "Seconds to collect and write one checkpoint.",
            buckets=CHECKPOINT_BUCKETS,
            registry=r,
        )
        self.checkpoint_bytes = Gauge(
            "optserve_checkpoint_size_bytes", "Size of the newest checkpoint on disk.", registry=r
        )
        self.checkpoint_timestamp = Gauge(
            "optserve_checkpoint_last_success_timestamp_seconds",
            "Unix time of the newest checkpoint written.",
            registry=r,
        )
        self._last_checkpoint: float | None = None
        self.checkpoint_age = Gauge(
            "optserve_checkpoint_age_seconds",
            "Seconds since the newest checkpoint was written (NaN before the first).",
            registry=r,
        )
        self.checkpoint_age.set_function(self._checkpoint_age)
        r.register(_LiveModelCollector(self))

    # ------------------------------------------------------------ models

    def model_added(self, model) -> None:
        """A model was created or restored (loop thread): its events feed this server's metrics."""
        with self._lock:
            label = self._labels.get(model.model_id)
            if label is None:
                own = sum(1 for value in self._labels.values() if value != OTHER_MODELS)
                label = model.model_id if own < self.max_model_labels else OTHER_MODELS
                self._labels[model.model_id] = label
            self._models[model.model_id] = model
        model.events = ModelMetrics(self, label)

    def model_removed(self, model) -> None:
        """A model was deleted: its own series go (a shared ``_other`` series stays)."""
        with self._lock:
            self._models.pop(model.model_id, None)
            label = self._labels.pop(model.model_id, None)
        model.events = ModelEvents()
        if label is None or label == OTHER_MODELS:
            return
        for metric in (
            self.steps,
            self.pushes,
            self.duplicates,
            self.received,
            self.sent,
            self.apply_seconds,
            self.sync_wait_seconds,
            self.step_timeouts,
            self.partial_applies,
        ):
            try:
                metric.remove(label)
            except KeyError:
                pass  # never observed

    def live_models(self) -> list[tuple[str, Any]]:
        with self._lock:
            return [(self._labels[model_id], model) for model_id, model in self._models.items()]

    # ------------------------------------------------------------ checkpoints

    def checkpoint_saved(self, seconds: float, path: os.PathLike | str) -> None:
        self.checkpoints.inc()
        self.checkpoint_seconds.observe(seconds)
        self._last_checkpoint = time.time()
        self.checkpoint_timestamp.set(self._last_checkpoint)
        self.checkpoint_bytes.set(_directory_bytes(pathlib.Path(path)))

    def checkpoint_failed(self, seconds: float) -> None:
        self.checkpoint_failures.inc()
        self.checkpoint_seconds.observe(seconds)

    def _checkpoint_age(self) -> float:
        last = self._last_checkpoint
        return float("nan") if last is None else max(0.0, time.time() - last)

    # ------------------------------------------------------------ HTTP

    def serve_http(self, host: str, port: int) -> int:
        """Serve ``/metrics`` on ``host:port`` (a thread of its own); returns the port bound."""
        self._http, _ = start_http_server(port, addr=host.strip("[]"), registry=self.registry)
        return int(self._http.server_port)

    def stop_http(self) -> None:
        if self._http is not None:
            self._http.shutdown()
            self._http.server_close()
            self._http = None

    def interceptor(self) -> RpcMetricsInterceptor:
        return RpcMetricsInterceptor(self)


def _directory_bytes(path: pathlib.Path) -> int:
    try:
        return sum(entry.stat().st_size for entry in path.iterdir() if entry.is_file())
    except OSError:
        return 0


class ModelMetrics(ModelEvents):
    """What one model reports, as the series of its label."""

    def __init__(self, metrics: ServerMetrics, label: str):
        self._steps = metrics.steps.labels(label)
        self._pushes = metrics.pushes.labels(label)
        self._duplicates = metrics.duplicates.labels(label)
        self._received = metrics.received.labels(label)
        self._sent = metrics.sent.labels(label)
        self._apply = metrics.apply_seconds.labels(label)
        self._wait = metrics.sync_wait_seconds.labels(label)
        self._timeouts = metrics.step_timeouts.labels(label)
        self._partial = metrics.partial_applies.labels(label)

    def pushed(self, payload_bytes: int, duplicate: bool) -> None:
        self._pushes.inc()
        self._received.inc(payload_bytes)
        if duplicate:
            self._duplicates.inc()

    def received(self, payload_bytes: int) -> None:
        self._received.inc(payload_bytes)

    def sent(self, payload_bytes: int) -> None:
        self._sent.inc(payload_bytes)

    def applied(self, seconds: float, partial: bool) -> None:
        self._steps.inc()
        self._apply.observe(seconds)
        if partial:
            self._partial.inc()

    def waited(self, seconds: float) -> None:
        self._wait.observe(seconds)

    def timed_out(self) -> None:
        self._timeouts.inc()


class _LiveModelCollector:
    """Gauges read from the live models at scrape time (the models change on the server's loop;
    these reads are of plain attributes, consistent enough for a gauge)."""

    def __init__(self, metrics: ServerMetrics):
        self._metrics = metrics

    def describe(self) -> Iterable:
        return []  # a collector whose series come and go: nothing to check at registration

    def collect(self) -> Iterable:
        families = {
            "waiting": GaugeMetricFamily(
                "optserve_model_waiting_workers",
                "Workers that pushed the synchronous step in progress.",
                labels=["model"],
            ),
            "lr": GaugeMetricFamily(
                "optserve_model_learning_rate", "Learning rate of the next update.", labels=["model"]
            ),
            "iterations": GaugeMetricFamily(
                "optserve_model_iterations", "The optimizer's iterations counter.", labels=["model"]
            ),
            "step": GaugeMetricFamily(
                "optserve_model_step", "The model's current step (the next one to push).", labels=["model"]
            ),
            "bytes": GaugeMetricFamily(
                "optserve_model_state_bytes",
                "Bytes held by the model's variables and optimizer slots.",
                labels=["model"],
            ),
        }
        total_bytes = 0
        models = GaugeMetricFamily("optserve_models", "Models held by the server.")
        state = GaugeMetricFamily("optserve_state_bytes", "Bytes held by every model's variables and slots.")
        live = self._metrics.live_models()
        shared: dict[str, float] = {"waiting": 0, "bytes": 0}
        for label, model in live:
            try:
                reading = model.gauges()
            except Exception:  # noqa: BLE001 - a model being deleted must not break the scrape
                continue
            total_bytes += reading["bytes"]
            if label == OTHER_MODELS:
                shared["waiting"] += reading["waiting"]
                shared["bytes"] += reading["bytes"]
                continue
            for key, family in families.items():
                family.add_metric([label], reading[key])
        if any(label == OTHER_MODELS for label, _ in live):
            for key, value in shared.items():
                families[key].add_metric([OTHER_MODELS], value)
        models.add_metric([], len(live))
        state.add_metric([], total_bytes)
        return [*families.values(), models, state, *_principal_families(model for _, model in live)]


def _principal_families(models: Iterable) -> list:
    """Each principal's models and reserved state (optserve.server.quotas), with --auth-tokens."""
    counts: dict[str, int] = {}
    reserved: dict[str, int] = {}
    for model in models:
        memory = getattr(model, "memory", None)
        owner = memory.owner_name if memory is not None else ""
        if owner and memory is not None:
            counts[owner] = counts.get(owner, 0) + 1
            reserved[owner] = reserved.get(owner, 0) + memory.nbytes
    held = GaugeMetricFamily(
        "optserve_principal_models",
        "Models created by each principal (its --max-models-per-principal use).",
        labels=["principal"],
    )
    state = GaugeMetricFamily(
        "optserve_principal_state_bytes",
        "Bytes of state of each principal's models (its --max-memory-per-principal use).",
        labels=["principal"],
    )
    for owner in sorted(counts):
        held.add_metric([owner], counts[owner])
        state.add_metric([owner], reserved[owner])
    return [held, state]


# ---------------------------------------------------------------- RPCs


class _CallBytes:
    __slots__ = ("received",)

    def __init__(self):
        self.received = 0


def _split_method(full_method: str) -> tuple[str, str]:
    _, _, rest = full_method.partition("/")
    service, _, method = rest.partition("/")
    return service or "unknown", method or "unknown"


def _code_name(context) -> str:
    code = context.code()
    if code is None:
        return "OK"
    if isinstance(code, grpc.StatusCode):
        return code.name
    for status in grpc.StatusCode:  # some grpc versions hand back the integer value
        if status.value[0] == code:
            return status.name
    return "UNKNOWN"


class RpcMetricsInterceptor(grpc.aio.ServerInterceptor):
    """Counts, times and sizes every RPC of the server it is installed in."""

    def __init__(self, metrics: ServerMetrics):
        self._m = metrics

    async def intercept_service(self, continuation, handler_call_details):
        handler = await continuation(handler_call_details)
        if handler is None:
            return None  # UNIMPLEMENTED: no series for names nobody serves
        labels = _split_method(handler_call_details.method)
        call_bytes = _CallBytes()  # a handler is wrapped per call: its deserializer sees this call's bytes
        m = self._m
        received, sent = m.rpc_received.labels(*labels), m.rpc_sent.labels(*labels)

        def deserialize(data: bytes, parse=handler.request_deserializer):
            received.inc(len(data))
            m.in_flight_bytes.inc(len(data))
            call_bytes.received += len(data)
            return parse(data) if parse is not None else data

        def serialize(message, encode=handler.response_serializer):
            data = encode(message) if encode is not None else message
            sent.inc(len(data))
            return data

        kind = (
            ("stream" if handler.request_streaming else "unary")
            + "_"
            + ("stream" if handler.response_streaming else "unary")
        )
        behavior = getattr(handler, kind)
        wrapped = (self._streaming if handler.response_streaming else self._unary)(behavior, labels, call_bytes)
        return handler._replace(request_deserializer=deserialize, response_serializer=serialize, **{kind: wrapped})

    def observed_unary(self, full_method: str, behavior, serialize):
        """``behavior(request, context)`` counted, timed and sized as a unary call of ``full_method``
        that arrived another way than gRPC (a data plane request frame): the function returned takes
        ``(request, context, request_bytes)`` and returns the response's bytes."""
        labels = _split_method(full_method)
        m = self._m
        received, sent = m.rpc_received.labels(*labels), m.rpc_sent.labels(*labels)

        async def observed(request, context, request_bytes: int) -> bytes:
            received.inc(request_bytes)
            m.in_flight_bytes.inc(request_bytes)
            call_bytes = _CallBytes()
            call_bytes.received = request_bytes
            data = serialize(await self._unary(behavior, labels, call_bytes)(request, context))
            sent.inc(len(data))
            return data

        return observed

    def _begin(self, labels):
        self._m.rpcs_started.labels(*labels).inc()
        self._m.rpcs_in_flight.labels(*labels).inc()
        return time.perf_counter()

    def _end(self, labels, started: float, context, call_bytes: _CallBytes, failure: BaseException | None):
        m = self._m
        if failure is None or isinstance(failure, grpc.aio.AbortError):
            code = _code_name(context)
        elif isinstance(failure, (asyncio.CancelledError, GeneratorExit)):  # the client went away
            code = "CANCELLED"
        else:
            code = "UNKNOWN"
        m.rpcs_handled.labels(*labels, code).inc()
        m.rpc_seconds.labels(*labels).observe(time.perf_counter() - started)
        m.rpcs_in_flight.labels(*labels).dec()
        m.in_flight_bytes.dec(call_bytes.received)
        call_bytes.received = 0

    def _unary(self, behavior, labels, call_bytes):
        async def observed(request, context):
            started = self._begin(labels)
            failure = None
            try:
                result = behavior(request, context)
                if hasattr(result, "__await__"):
                    result = await result
                return result
            except BaseException as exc:
                failure = exc
                raise
            finally:
                self._end(labels, started, context, call_bytes, failure)

        return observed

    def _streaming(self, behavior, labels, call_bytes):
        async def observed(request, context):
            started = self._begin(labels)
            failure = None
            try:
                responses = behavior(request, context)
                if hasattr(responses, "__aiter__"):
                    async for response in responses:
                        yield response
                else:  # a synchronous iterator, or a coroutine writing with context.write
                    if hasattr(responses, "__await__"):
                        await responses
                    else:
                        for response in responses:
                            yield response
            except BaseException as exc:
                failure = exc
                raise
            finally:
                self._end(labels, started, context, call_bytes, failure)

        return observed
