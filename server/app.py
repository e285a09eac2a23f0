"""Running the parameter server: ``start_server`` (background thread) and ``serve`` (foreground, for the CLI).

The server is a grpc.aio server: a worker parked in a synchronous step is an
awaiting coroutine, not a blocked thread, so any number of them never starve the
health service or reads. Optimizer updates run on a small thread pool.

With a checkpoint directory the server restores the newest valid checkpoint on
start (health NOT_SERVING, every call UNAVAILABLE meanwhile), checkpoints on its
schedule and on request (the Checkpoint RPC), and writes a final checkpoint when
it stops: after the models stop taking pushes and the updates in flight finish.
"""
from __future__ import annotations

import asyncio
import ctypes
import logging
import os
import signal
import threading
from concurrent.futures import ThreadPoolExecutor

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from optserve.protos.tensors import GRPC_OPTIONS
from optserve.server.checkpoint import (
    DEFAULT_CHECKPOINT_EVERY,
    DEFAULT_CHECKPOINT_KEEP,
    Checkpointer,
    CheckpointStore,
    describe_models,
    parse_checkpoint_every,
)
from optserve.server.errors import FailedPreconditionError, InvalidArgumentError, OptserveError
from optserve.server.limits import Limits, ServerLimits
from optserve.server.registry import ModelRegistry
from optserve.server.servicer import DEFAULT_MAX_REQUEST_BYTES, SERVICE_NAME, ParameterServerServicer, add_to_server

log = logging.getLogger(__name__)

DEFAULT_SYNC_TIMEOUT_S = 60.0
DEFAULT_GRACE_S = 2.0
HEALTH_SERVICES = ("", SERVICE_NAME)


def _default_apply_threads() -> int:
    # Applies are memory-bound NumPy loops; a few threads let models update in parallel.
    return max(2, min(8, os.cpu_count() or 2))


def _format_address(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host and not host.startswith("[") else f"{host}:{port}"


class ParameterServer:
    """One grpc.aio server with its registry, health service and executor; lives on one event loop."""

    def __init__(self, host: str = "127.0.0.1", port: int = 0, device: str = "auto", *,
                 sync_timeout_s: float = DEFAULT_SYNC_TIMEOUT_S,
                 max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES,
                 apply_threads: int | None = None,
                 checkpoint_dir: str | os.PathLike | None = None,
                 checkpoint_every=DEFAULT_CHECKPOINT_EVERY,
                 checkpoint_keep: int = DEFAULT_CHECKPOINT_KEEP,
                 limits: Limits | None = None):
        _check_options(sync_timeout_s, max_request_bytes, apply_threads)
        self.limits = limits or Limits()
        if sync_timeout_s > self.limits.max_sync_timeout_s:
            raise InvalidArgumentError(
                f"`sync_timeout_s` must be at most max_sync_timeout_s={self.limits.max_sync_timeout_s:g}. "
                f"Received: sync_timeout_s={sync_timeout_s}")
        self.host = host
        self.requested_port = port
        self.device = device
        self.sync_timeout_s = float(sync_timeout_s)
        self.max_request_bytes = int(max_request_bytes)
        self.apply_threads = apply_threads or _default_apply_threads()
        self.checkpoint_dir = checkpoint_dir
        self.checkpoint_schedule = parse_checkpoint_every(checkpoint_every)
        self.checkpoint_keep = checkpoint_keep
        self.port: int | None = None
        # Set by stop() when the final checkpoint could not be written.
        self.final_checkpoint_error: BaseException | None = None
        self._server: grpc.aio.Server | None = None
        self._health: health.aio.HealthServicer | None = None
        self._registry: ModelRegistry | None = None
        self._executor: ThreadPoolExecutor | None = None
        self._checkpointer: Checkpointer | None = None

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
        # No SO_REUSEPORT: a second server on a busy port must fail, not silently share it.
        options = dict(GRPC_OPTIONS)
        options.update({
            "grpc.so_reuseport": 0,
            "grpc.max_receive_message_length": self.limits.max_message_bytes,
            "grpc.max_concurrent_streams": self.limits.max_streams_per_connection,
        })
        self._server = grpc.aio.server(options=list(options.items()))
        add_to_server(ParameterServerServicer(self._registry, self.max_request_bytes, self._checkpointer,
                                              server_limits), self._server)
        self._health = health.aio.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(self._health, self._server)
        reflection.enable_server_reflection(
            (SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME), self._server)
        where = _format_address(self.host, self.requested_port)
        try:
            self.port = self._server.add_insecure_port(where)
        except RuntimeError as exc:  # grpc raises when the bind fails
            raise OSError(f"Could not listen on {where} ({exc}); is another server using the port?") from None
        if not self.port:
            raise OSError(f"Could not listen on {where}; is another server using the port?")
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
        for service in HEALTH_SERVICES:
            await self._health.set(service, health_pb2.HealthCheckResponse.SERVING)
        checkpoints = (f"; checkpoints in {self.checkpoint_dir} {self.checkpoint_schedule}, keeping "
                       f"{self.checkpoint_keep}" if self._checkpointer is not None else "")
        log.info("optserve serving on %s (device %s, %r)%s", self.address, self.device, backend, checkpoints)

    async def _restore(self) -> None:
        found = await self._checkpointer.load_latest()
        if found is None:
            log.info("No checkpoint in %s yet; starting without models.", self.checkpoint_dir)
            return
        state, path = found
        try:
            await self._registry.restore(state)
        except (OptserveError, KeyError, TypeError, ValueError, AttributeError) as error:
            message = error.message if isinstance(error, OptserveError) else repr(error)
            raise FailedPreconditionError(
                f"Cannot restore checkpoint {path}: {message}. Its files are intact but their content does not "
                f"fit this optserve version; move it out of {self.checkpoint_dir} to start from the one before it."
            ) from error
        log.info("Restored checkpoint %s: %s.", path, describe_models(state["models"]))

    async def _abandon_start(self) -> None:
        await self._server.stop(None)
        if self._checkpointer is not None:
            await self._checkpointer.close(final=False)
        self._executor.shutdown(wait=True)
        self._server = None

    async def stop(self, grace: float | None = DEFAULT_GRACE_S, *, final_checkpoint: bool = True) -> None:
        """NOT_SERVING first, then refuse waiting workers, write the final checkpoint (with a
        checkpoint directory, unless ``final_checkpoint`` is False), then let calls in flight
        finish within ``grace``."""
        if self._server is None:
            return
        await self._health.enter_graceful_shutdown()
        self._registry.close()
        if self._checkpointer is not None:
            # After close(): no new update starts; the snapshot waits for those in flight.
            try:
                path = await self._checkpointer.close(final=final_checkpoint)
            except Exception as error:  # noqa: BLE001 - the shutdown goes on; the caller is told
                self.final_checkpoint_error = error
                message = error.message if isinstance(error, OptserveError) else repr(error)
                log.error("The final checkpoint failed: %s. The updates since the last checkpoint are lost.",
                          message)
            else:
                if path is not None:
                    log.info("Final checkpoint: %s", path)
        await self._server.stop(grace)
        self._executor.shutdown(wait=True)
        self._server = None
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
    def final_checkpoint_error(self) -> BaseException | None:
        return self._server.final_checkpoint_error

    def stop(self, grace: float | None = DEFAULT_GRACE_S, *, final_checkpoint: bool = True) -> None:
        """Stop as ``ParameterServer.stop`` does; ``final_checkpoint=False`` loses what changed
        since the last checkpoint, as a crash would."""
        if not self._thread.is_alive():
            return
        asyncio.run_coroutine_threadsafe(
            self._server.stop(grace, final_checkpoint=final_checkpoint), self._loop).result()
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join()

    def __enter__(self) -> "RunningServer":
        return self

    def __exit__(self, *exc_info) -> None:
        self.stop()

    def __repr__(self) -> str:
        return f"RunningServer({self.address!r})"


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
    ``checkpoint_every``, ``checkpoint_keep``, ``limits`` (an ``optserve.server.limits.Limits``)
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
    refused request (``limits.give_back_freed_memory``) returns them.
    Returns False where it does not apply (not glibc).
    """
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return False
    m_trim_threshold, m_mmap_threshold, m_arena_max = -1, -3, -8
    limit = 1 << 30
    return (bool(libc.mallopt(m_mmap_threshold, limit)) and bool(libc.mallopt(m_trim_threshold, limit))
            and bool(libc.mallopt(m_arena_max, 1)))


def serve(host: str = "127.0.0.1", port: int = 50051, device: str = "auto", *,
          grace: float = DEFAULT_GRACE_S, on_listening=None, **options) -> int:
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
        await server.start()
        if on_listening is not None:
            on_listening(server.address)
        await stopping.wait()
        log.info("signal received; shutting down")
        await server.stop(grace)
        return 1 if server.final_checkpoint_error is not None else 0

    return asyncio.run(main())
