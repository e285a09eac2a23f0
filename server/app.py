"""Running the parameter server: ``start_server`` (background thread) and ``serve`` (foreground, for the CLI).

The server is a grpc.aio server: a worker parked in a synchronous step is an
awaiting coroutine, not a blocked thread, so any number of them never starve the
health service or reads. Optimizer updates run on a small thread pool.

With a checkpoint directory the server restores the newest valid checkpoint on
start (health NOT_SERVING, every call UNAVAILABLE meanwhile), checkpoints on its
schedule and on request (the Checkpoint RPC), and writes a final checkpoint when
it stops: after the models stop taking pushes and the updates in flight finish.
With a model TTL it deletes models idle for longer than the TTL (``optserve.server.expiry``).
"""

from __future__ import annotations

import asyncio
import ctypes
import logging
import os
import signal
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from optserve.protos.tensors import GRPC_OPTIONS
from optserve.server import auth, shared_memory, tls
from optserve.server.checkpoint import (
    DEFAULT_CHECKPOINT_EVERY,
    DEFAULT_CHECKPOINT_KEEP,
    Checkpointer,
    CheckpointStore,
    describe_models,
    parse_checkpoint_every,
)
from optserve.server.data_plane import DataPlane
from optserve.server.data_plane_requests import RequestFrames
from optserve.server.errors import FailedPreconditionError, InvalidArgumentError, OptserveError
from optserve.server.expiry import ModelExpiry, check_model_ttl
from optserve.server.limits import Limits, ServerLimits
from optserve.server.reflection import enable_reflection
from optserve.server.registry import ModelRegistry
from optserve.server.restore_budget import RestoreBudgetError, check_checkpoint_fits
from optserve.server.servicer import DEFAULT_MAX_REQUEST_BYTES, SERVICE_NAME, ParameterServerServicer, add_to_server

if TYPE_CHECKING:  # imported only with --metrics-port (prometheus-client)
    from optserve.server.metrics import ServerMetrics

log = logging.getLogger(__name__)

DEFAULT_SYNC_TIMEOUT_S = 60.0
DEFAULT_GRACE_S = 2.0
HEALTH_SERVICES = ("", SERVICE_NAME)


def _default_apply_threads() -> int:
    # Applies are memory-bound NumPy loops; a few threads let models update in parallel.
    return max(2, min(8, os.cpu_count() or 2))


def _format_address(host: str, port: int | None) -> str:
    return f"[{host}]:{port}" if ":" in host and not host.startswith("[") else f"{host}:{port}"


class ParameterServer:
    """One grpc.aio server with its registry, health service and executor; lives on one event loop."""

    def __init__(
        self,
        host: str = "127.0.0.1",
        port: int = 0,
        device: str = "auto",
        *,
        sync_timeout_s: float = DEFAULT_SYNC_TIMEOUT_S,
        max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES,
        apply_threads: int | None = None,
        checkpoint_dir: str | os.PathLike | None = None,
        checkpoint_every=DEFAULT_CHECKPOINT_EVERY,
        checkpoint_keep: int = DEFAULT_CHECKPOINT_KEEP,
        tls_cert: str | os.PathLike | None = None,
        tls_key: str | os.PathLike | None = None,
        tls_client_ca: str | os.PathLike | None = None,
        auth_tokens: str | os.PathLike | None = None,
        metrics_port: int | None = None,
        model_ttl_s: float | None = None,
        limits: Limits | None = None,
        shared_memory_dir: str | None = shared_memory.DEFAULT_DIRECTORY,
        data_plane: bool = True,
        data_port: int = 0,
    ):
        _check_options(sync_timeout_s, max_request_bytes, apply_threads)
        # Security (optserve.server.tls, optserve.server.auth): checked here, before anything binds.
        self.tls = tls.server_tls(tls_cert, tls_key, tls_client_ca)
        self.tokens = auth.TokenTable(auth_tokens) if auth_tokens is not None else None
        if (
            self.tokens is None
            and limits is not None
            and (limits.max_models_per_principal is not None or limits.max_memory_per_principal is not None)
        ):
            raise InvalidArgumentError(
                "--max-models-per-principal and --max-memory-per-principal need --auth-tokens: without a "
                "token file there are no principals, and only the server-wide limits apply."
            )
        # Models idle for longer are deleted (None: never); see optserve.server.expiry.
        self.model_ttl_s = check_model_ttl(model_ttl_s)
        _check_options(sync_timeout_s, max_request_bytes, apply_threads)
        self.limits = limits or Limits()
        if sync_timeout_s > self.limits.max_sync_timeout_s:
            raise InvalidArgumentError(
                f"`sync_timeout_s` must be at most max_sync_timeout_s={self.limits.max_sync_timeout_s:g}. "
                f"Received: sync_timeout_s={sync_timeout_s}"
            )
        self.host = host
        # Where segments for workers on this host are made (optserve.server.shared_memory); None: off.
        self.shared_memory_dir = shared_memory_dir
        # A TCP port beside gRPC for large pushes' bytes (optserve.server.data_plane); never with TLS,
        # whose bytes stay on gRPC.
        self.data_plane_enabled = bool(data_plane) and self.tls is None
        self.requested_data_port = int(data_port)  # 0: an ephemeral port
        self.data_port: int | None = None
        self.requested_port = port
        self.device = device
        self.sync_timeout_s = float(sync_timeout_s)
        self.max_request_bytes = int(max_request_bytes)
        self.apply_threads = apply_threads or _default_apply_threads()
        self.checkpoint_dir = checkpoint_dir
        self.checkpoint_schedule = parse_checkpoint_every(checkpoint_every)
        self.checkpoint_keep = checkpoint_keep
        self.port: int | None = None
        self.requested_metrics_port = metrics_port  # None: no /metrics endpoint
        self.metrics_port: int | None = None  # the port bound, once serving
        self.metrics: ServerMetrics | None = None  # with a metrics port
        # Set by stop() when the final checkpoint could not be written.
        self.final_checkpoint_error: BaseException | None = None
        self._server: grpc.aio.Server | None = None
        self._health: health.aio.HealthServicer | None = None
        self._registry: ModelRegistry | None = None
        self._executor: ThreadPoolExecutor | None = None
        self._checkpointer: Checkpointer | None = None
        self._expiry: ModelExpiry | None = None
        self._servicer: ParameterServerServicer | None = None

    @property
    def address(self) -> str:
        return _format_address(self.host, self.port)

    async def start(self) -> None:
        from optserve.server.backends import get_backend

        backend = get_backend(self.device)
        store = None
        if self.checkpoint_dir is not None:
            store = CheckpointStore(self.checkpoint_dir, keep=self.checkpoint_keep)  # checks before binding
            store.remove_stale_temp_entries()  # an interrupted save's files are of no use to anyone
        self._executor = ThreadPoolExecutor(self.apply_threads, thread_name_prefix="optserve-apply")
        server_limits = ServerLimits(self.limits)
        self._registry = ModelRegistry(backend, self._executor, self.sync_timeout_s, limits=server_limits)
        if store is not None:
            self._checkpointer = Checkpointer(store, self.checkpoint_schedule, self._registry.snapshot)
            self._registry.on_change = self._checkpointer.note_change
            self._registry.begin_restore()
        interceptors = []
        metrics_interceptor = None
        if self.requested_metrics_port is not None:
            from optserve.server.metrics import ServerMetrics

            self.metrics = ServerMetrics()
            self._registry.observer = self.metrics
            if self._checkpointer is not None:
                self._checkpointer.observer = self.metrics
            metrics_interceptor = self.metrics.interceptor()
            interceptors.append(metrics_interceptor)
        # No SO_REUSEPORT: a second server on a busy port must fail, not silently share it.
        mutual_tls = self.tls is not None and self.tls.mutual
        if self.tokens is not None:
            interceptors.append(auth.AuthInterceptor(self.tokens, verified_certificates=mutual_tls))
        options = dict(GRPC_OPTIONS)
        options.update(
            {
                "grpc.so_reuseport": 0,
                "grpc.max_receive_message_length": self.limits.max_message_bytes,
                "grpc.max_concurrent_streams": self.limits.max_streams_per_connection,
            }
        )
        self._server = grpc.aio.server(interceptors=interceptors, options=list(options.items()))
        sessions = None
        if self.shared_memory_dir is not None:
            sessions = shared_memory.SharedMemorySessions(self.shared_memory_dir, server_limits.memory)
        data = None
        if self.data_plane_enabled:
            data = DataPlane(self.host, server_limits.memory, self.requested_data_port, self.limits.max_message_bytes)
            self.data_port = data.start(asyncio.get_running_loop())
        self._servicer = ParameterServerServicer(
            self._registry,
            self.max_request_bytes,
            self._checkpointer,
            server_limits,
            shared_memory=sessions,
            data_plane=data,
        )
        if data is not None:  # pushes that travel whole on the data plane meet the servicer there
            data.requests = RequestFrames(self._servicer, self.tokens, metrics_interceptor)
        add_to_server(self._servicer, self._server)
        self._health = health.aio.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(self._health, self._server)
        enable_reflection((SERVICE_NAME, health.SERVICE_NAME), self._server)
        where = _format_address(self.host, self.requested_port)
        try:
            if self.tls is None:
                self.port = self._server.add_insecure_port(where)
            else:
                self.port = self._server.add_secure_port(where, self.tls.credentials())
        except RuntimeError as exc:  # grpc raises when the bind fails
            raise OSError(f"Could not listen on {where} ({exc}); is another server using the port?") from None
        if not self.port:
            raise OSError(f"Could not listen on {where}; is another server using the port?")
        if self.metrics is not None and self.requested_metrics_port is not None:
            self.metrics_port = self.metrics.serve_http(self.host, self.requested_metrics_port)
            log.info("Prometheus metrics on http://%s/metrics", _format_address(self.host, self.metrics_port))
        for service in HEALTH_SERVICES:
            await self._health.set(service, health_pb2.HealthCheckResponse.NOT_SERVING)
        await self._server.start()
        if self._checkpointer is not None:
            # Listening already, so health checks see NOT_SERVING (and calls UNAVAILABLE) while restoring.
            try:
                await self._restore()
            except BaseException:
                await self._abandon_start()
                raise
            self._registry.end_restore()
            self._checkpointer.start()
        if self.model_ttl_s is not None:
            self._expiry = ModelExpiry(self._registry, self.model_ttl_s, self._checkpointer)
            self._expiry.start()
        for service in HEALTH_SERVICES:
            await self._health.set(service, health_pb2.HealthCheckResponse.SERVING)
        checkpoints = (
            f"; checkpoints in {self.checkpoint_dir} {self.checkpoint_schedule}, keeping {self.checkpoint_keep}"
            if self._checkpointer is not None
            else ""
        )
        ttl = f"; idle models deleted after {self.model_ttl_s:g} s" if self.model_ttl_s is not None else ""
        log.info(
            "optserve serving on %s (device %s, %r)%s%s%s",
            self.address,
            self.device,
            backend,
            checkpoints,
            ttl,
            self._security_summary(),
        )
        for warning in tls.exposure_warnings(self.host, self.tls, self.tokens is not None):
            log.warning("%s", warning)
        if self.tokens is not None and not len(self.tokens):
            log.warning(
                "The token file %s lists nobody: every call but health and reflection is refused.", self.tokens.path
            )
        if self.tokens is not None and self.tokens.lists_certificates and not (self.tls and self.tls.mutual):
            log.warning(
                "The token file %s has cert_cn= lines, which count only with --tls-client-ca "
                "(client certificates verified); without it they are ignored.",
                self.tokens.path,
            )

    def _security_summary(self) -> str:
        transport = "plaintext" if self.tls is None else ("mTLS" if self.tls.mutual else "TLS")
        tokens = f", {len(self.tokens)} principal(s) from {self.tokens.path}" if self.tokens is not None else ""
        return f"; {transport}{tokens}"

    def reload_auth(self) -> bool:
        """Reread the token file (SIGHUP); False when there is none or it did not parse (old tokens stay)."""
        return self.tokens.reload() if self.tokens is not None else False

    async def _restore(self) -> None:
        checkpointer, registry = self._checkpointer, self._registry
        assert checkpointer is not None and registry is not None  # start() made both before restoring
        check_checkpoint_fits(checkpointer.store, registry.limits.memory.capacity)  # before reading its arrays
        found = await checkpointer.load_latest()
        if found is None:
            log.info("No checkpoint in %s yet; starting without models.", self.checkpoint_dir)
            return
        state, path = found
        try:
            await registry.restore(state, self.tokens.by_name if self.tokens is not None else None)
        except RestoreBudgetError as error:
            raise RestoreBudgetError(f"Cannot restore checkpoint {path}: {error.message}") from error
        except (OptserveError, KeyError, TypeError, ValueError, AttributeError) as error:
            message = error.message if isinstance(error, OptserveError) else repr(error)
            raise FailedPreconditionError(
                f"Cannot restore checkpoint {path}: {message}. Its files are intact but their content does not "
                f"fit this optserve version; move it out of {self.checkpoint_dir} to start from the one before it."
            ) from error
        if self._servicer is not None:  # replies name the checkpoint this start restored
            self._servicer.generation = self._servicer.generation.restored(path.name)
        log.info("Restored checkpoint %s: %s.", path, describe_models(state["models"]))

    async def _abandon_start(self) -> None:
        if self.metrics is not None:
            self.metrics.stop_http()
        server, executor = self._server, self._executor
        assert server is not None and executor is not None  # start() made both before anything can fail
        await server.stop(None)
        if self._checkpointer is not None:
            await self._checkpointer.close(final=False)
        executor.shutdown(wait=True)
        self._server = None
        if self._servicer is not None and self._servicer.data_plane is not None:
            self._servicer.data_plane.close()

    async def stop(self, grace: float | None = DEFAULT_GRACE_S, *, final_checkpoint: bool = True) -> None:
        """NOT_SERVING first, then refuse waiting workers, write the final checkpoint (with a
        checkpoint directory, unless ``final_checkpoint`` is False), then let calls in flight
        finish within ``grace``."""
        server, health_servicer, registry, executor = self._server, self._health, self._registry, self._executor
        if server is None or health_servicer is None or registry is None or executor is None:
            return  # not started, or start() was abandoned
        await health_servicer.enter_graceful_shutdown()
        if self._expiry is not None:
            await self._expiry.stop()
        registry.close()
        if self._checkpointer is not None:
            # After close(): no new update starts; the snapshot waits for those in flight.
            try:
                path = await self._checkpointer.close(final=final_checkpoint)
            except Exception as error:  # noqa: BLE001 - the shutdown goes on; the caller is told
                self.final_checkpoint_error = error
                message = error.message if isinstance(error, OptserveError) else repr(error)
                log.error("The final checkpoint failed: %s. The updates since the last checkpoint are lost.", message)
            else:
                if path is not None:
                    log.info("Final checkpoint: %s", path)
        await server.stop(grace)
        executor.shutdown(wait=True)
        self._server = None
        if self._servicer is not None and self._servicer.shared_memory is not None:
            self._servicer.shared_memory.close()
        if self._servicer is not None and self._servicer.data_plane is not None:
            self._servicer.data_plane.close()
        if self.metrics is not None:
            self.metrics.stop_http()
        log.info("optserve on %s stopped", self.address)


def _check_options(sync_timeout_s, max_request_bytes, apply_threads) -> None:
    # The checkpoint options are checked by parse_checkpoint_every and CheckpointStore.
    if not sync_timeout_s > 0:
        raise InvalidArgumentError(f"`sync_timeout_s` must be > 0. Received: sync_timeout_s={sync_timeout_s}")
    if max_request_bytes <= 0:
        raise InvalidArgumentError(f"`max_request_bytes` must be > 0. Received: max_request_bytes={max_request_bytes}")
    if apply_threads is not None and apply_threads < 1:
        raise InvalidArgumentError(f"`apply_threads` must be >= 1. Received: apply_threads={apply_threads}")


class RunningServer:
    """A server running on its own thread's event loop (tests, embedding). ``stop()`` it when done."""

    def __init__(self, server: ParameterServer, loop: asyncio.AbstractEventLoop, thread: threading.Thread):
        self._server = server
        self._loop = loop
        self._thread = thread
        self.host = server.host
        self.port = server.port
        self.address = server.address

    @property
    def metrics_port(self) -> int | None:
        return self._server.metrics_port

    @property
    def final_checkpoint_error(self) -> BaseException | None:
        return self._server.final_checkpoint_error

    def reload_auth(self) -> bool:
        """Reread the token file, as SIGHUP does for ``optserve serve``."""
        return asyncio.run_coroutine_threadsafe(_call(self._server.reload_auth), self._loop).result()

    def stop(self, grace: float | None = DEFAULT_GRACE_S, *, final_checkpoint: bool = True) -> None:
        """Stop as ``ParameterServer.stop`` does; ``final_checkpoint=False`` loses what changed
        since the last checkpoint, as a crash would."""
        if not self._thread.is_alive():
            return
        asyncio.run_coroutine_threadsafe(
            self._server.stop(grace, final_checkpoint=final_checkpoint), self._loop
        ).result()
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join()

    def __enter__(self) -> RunningServer:
        return self

    def __exit__(self, *exc_info) -> None:
        self.stop()

    def __repr__(self) -> str:
        return f"RunningServer({self.address!r})"


async def _call(function):
    return function()


def _finish_tasks(loop: asyncio.AbstractEventLoop) -> None:
    """Cancel what is still pending on a stopped loop (as asyncio.run does) so nothing is destroyed mid-flight."""
    pending = [task for task in asyncio.all_tasks(loop) if not task.done()]
    for task in pending:
        task.cancel()
    if pending:
        loop.run_until_complete(asyncio.gather(*pending, return_exceptions=True))


def start_server(host: str = "127.0.0.1", port: int = 0, device: str = "auto", **options) -> RunningServer:
    """Start a server on a background thread and return once it is serving.

    ``options``: ``sync_timeout_s``, ``max_request_bytes``, ``apply_threads``, ``checkpoint_dir``,
    ``checkpoint_every``, ``checkpoint_keep``, ``tls_cert``, ``tls_key``, ``tls_client_ca``, ``auth_tokens``,
    ``metrics_port``, ``model_ttl_s``, ``limits`` (an ``optserve.server.limits.Limits``)
    (see ParameterServer and ``optserve serve --help``).
    """
    server = ParameterServer(host, port, device, **options)
    loop = asyncio.new_event_loop()
    started = threading.Event()
    failure: list[BaseException] = []

    def run() -> None:
        asyncio.set_event_loop(loop)
        try:
            loop.run_until_complete(server.start())
        except BaseException as exc:  # noqa: BLE001 - handed to the caller's thread
            failure.append(exc)
            started.set()
            loop.close()
            return
        started.set()
        try:
            loop.run_forever()
        finally:
            _finish_tasks(loop)
            loop.close()

    thread = threading.Thread(target=run, name=f"optserve-{host}:{port}", daemon=True)
    thread.start()
    started.wait()
    if failure:
        thread.join()
        raise failure[0]
    return RunningServer(server, loop, thread)


def keep_freed_memory_for_reuse() -> bool:
    """Have glibc's malloc keep large freed blocks in the process instead of unmapping them.

    Every request allocates tensor-sized arrays. By default glibc maps each block
    over 32 MiB afresh and unmaps it on free, so each 64 MiB request pays for
    16k page faults again (measured: a 64 MiB push took 117 ms instead of 66 ms).
    Reusing the blocks trades that for a resident size that does not shrink
    after a model is deleted, the right trade for a dedicated server process.
    One malloc arena for all threads: with one per thread, each of gRPC's threads
    would keep the largest message it ever received at the top of its own arena,
    where nothing gives it back (measured: 40 refused 25 MB requests left +100-150 MB);
    in the one arena, freed blocks are reused by every thread and a trim after a
    refused request (``heap.RefusalTrimmer``) returns them.
    Returns False where it does not apply (not glibc).
    """
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return False
    m_trim_threshold, m_mmap_threshold, m_arena_max = -1, -3, -8
    limit = 1 << 30
    return (
        bool(libc.mallopt(m_mmap_threshold, limit))
        and bool(libc.mallopt(m_trim_threshold, limit))
        and bool(libc.mallopt(m_arena_max, 1))
    )


def serve(
    host: str = "127.0.0.1",
    port: int = 50051,
    device: str = "auto",
    *,
    grace: float = DEFAULT_GRACE_S,
    on_listening=None,
    **options,
) -> int:
    """Serve in the foreground until SIGTERM or SIGINT; returns the exit status: 0 on a clean
    stop, 1 when the final checkpoint could not be written.

    Meant for a process of its own (``optserve serve``): it tunes the process's allocator
    (:func:`keep_freed_memory_for_reuse`) and installs signal handlers. ``on_listening(address)``
    is called once the server is serving (after restoring its checkpoint).
    """
    keep_freed_memory_for_reuse()

    async def main() -> int:
        server = ParameterServer(host, port, device, **options)
        stopping = asyncio.Event()
        loop = asyncio.get_running_loop()
        # Installed before start: a signal during a long restore stops the server once it is up.
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stopping.set)
        if hasattr(signal, "SIGHUP"):
            loop.add_signal_handler(signal.SIGHUP, server.reload_auth)  # reread --auth-tokens
        await server.start()
        if on_listening is not None:
            on_listening(server.address)
        await stopping.wait()
        log.info("signal received; shutting down")
        await server.stop(grace)
        return 1 if server.final_checkpoint_error is not None else 0

    return asyncio.run(main())
