"""The data plane: a plain TCP connection beside gRPC for a push's tensor bytes.

gRPC in Python moves a large push as 1 MiB messages, each copied into and out
of protobuf bytes; a socket moves the same bytes with ``sendall`` from the
arrays and ``recv_into`` straight into the arrays the update reads, at the
speed of loopback or the network. Control stays on gRPC exactly as with
shared memory (``optserve.server.shared_memory``): the worker opens a session
with ``OpenDataPlane`` (authenticated like every call) and gets a random
secret, connects to the data port and presents the secret, then per push sends
one frame of gradient bytes and pushes over gRPC naming the session and the
frame. The reply's values go back on the connection as the frame of the same
number, before the gRPC reply. A push small enough for one gRPC message may
instead come whole as a request frame, answered on the connection alone
(``optserve.server.data_plane_requests``). Frames and their header are in
``protos/optserve.proto`` (OpenDataPlaneRequest).

A session belongs to one (model, worker), and only its connection writes into
its arrays; a push naming it must name its model and worker. A connection that
presents no known secret within ``HANDSHAKE_TIMEOUT_S`` is closed. A session
ends with its connection, its model, or a newer session of the same worker.

Threads: the accept loop and each connection's reader block in the socket
calls (which release the GIL); everything they learn reaches the event loop
through ``call_soon_threadsafe``. A frames-only session's connection is read by
the event loop itself once attached (``optserve.server.frame_reader``). Large
replies are sent from the executor; answers to request frames from the event
loop, which never waits for a socket to drain (``send_soon``), while the reader
waits for the answer to be sent before it reads the next frame.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import math
import secrets
import socket
import threading
from typing import Any

import numpy as np

from optserve.protos import frames
from optserve.protos.frames import SECRET_BYTES, receive_exactly
from optserve.server import eager
from optserve.server.errors import AbortedError, FailedPreconditionError
from optserve.server.frame_payload import FramePayload
from optserve.server.frame_reader import LoopFrameReader
from optserve.server.limits import Reservation
from optserve.server.shared_memory import NoReservation
from optserve.server.worker_sessions import WorkerSessions

log = logging.getLogger(__name__)

HANDSHAKE_TIMEOUT_S = 10.0
FRAME_TIMEOUT_S = 60.0  # a push's frame must have arrived by then
MAX_HANDSHAKES = 64
SOCKET_BUFFER_BYTES = 4 << 20


class DataSession:
    """One worker's session: the arrays its frames land in and its reply values, and its connection."""

    def __init__(
        self, model, worker: int, reservation: Any, loop: asyncio.AbstractEventLoop, principal=None, frames_only=False
    ):
        self.id = secrets.token_hex(16)
        self.principal = principal  # who opened it (None without --auth-tokens); its requests act as them
        self.secret = secrets.token_bytes(SECRET_BYTES)
        self.model = model
        self.model_id = model.model_id
        self.worker = worker
        self.reservation = reservation
        # A frames-only session carries request frames alone: it holds no arrays for gradient frames.
        self.frames_only = frames_only
        variables = () if frames_only else model.spec.variables
        self.tensors = [(v.name, np.dtype(v.dtype), tuple(v.shape)) for v in variables]
        # Each frame's payload is one buffer (optserve.server.frame_payload): received and sent whole.
        self._gradient_payload = FramePayload(self.tensors)
        self._value_payload = FramePayload(self.tensors)
        self.gradients = self._gradient_payload.arrays
        self.values = self._value_payload.arrays
        self.payload_bytes = self._gradient_payload.nbytes
        self.connection: socket.socket | None = None
        self.peer = ""  # the worker's address, once connected
        self.closed = False
        self._loop = loop
        self._frames: dict[int, asyncio.Future] = {}
        self._send_lock = threading.Lock()
        self._stop_writing: Any = None
        # Set by a reader on the event loop (optserve.server.frame_reader): stops it before the socket closes.
        self.stop_reading: Any = None

    # -------------------------------------------------------- reader thread

    def read_frames(self, connection: socket.socket, on_end, on_request=None, max_request_bytes: int = 0) -> None:
        """Receive frames until the connection ends (reader thread): gradient bytes into the
        arrays, a request frame to ``on_request(session, sequence, payload, answered)`` on the
        event loop; the next frame is read once ``answered`` (a threading.Event) is set."""
        header = bytearray(frames.HEADER.size)
        try:
            while receive_exactly(connection, memoryview(header)):
                magic, sequence, nbytes, flags = frames.HEADER.unpack(header)
                if magic == frames.MAGIC and flags & frames.REQUEST and on_request is not None:
                    if nbytes > max_request_bytes:
                        log.warning(
                            "data plane session %s...: a request frame of %d bytes, over --max-message-bytes "
                            "(%d); closed",
                            self.id[:8],
                            nbytes,
                            max_request_bytes,
                        )
                        return
                    payload = frames.receive_frame_payload(connection, nbytes)
                    if payload is None:
                        return
                    answered = threading.Event()
                    try:
                        self._loop.call_soon_threadsafe(on_request, self, sequence, payload, answered)
                    except RuntimeError:
                        return  # the server's loop has closed
                    # One request at a time: a worker cannot pile up answers it does not read.
                    while not answered.wait(1.0):
                        if self.closed or self._loop.is_closed():
                            return
                    continue
                if magic != frames.MAGIC or nbytes != self.payload_bytes or self.frames_only:
                    log.warning(
                        "data plane session %s...: a frame of %d bytes (expected %d) or a bad header; closed",
                        self.id[:8],
                        nbytes,
                        self.payload_bytes,
                    )
                    return
                non_finite = self._gradient_payload.receive_checked(connection)
                if non_finite is None:
                    return
                self._loop.call_soon_threadsafe(self._arrived, sequence, non_finite)
        except (OSError, RuntimeError):  # the connection ended, or the server's loop closed
            pass
        finally:
            try:
                self._loop.call_soon_threadsafe(on_end, self)
            except RuntimeError:
                pass  # the server's loop has already closed: nothing is left to tell

    # ----------------------------------------------------------- event loop

    def _frame(self, sequence: int) -> asyncio.Future:
        future = self._frames.get(sequence)
        if future is None:
            future = self._frames[sequence] = self._loop.create_future()
        return future

    def _arrived(self, sequence: int, non_finite: list[str]) -> None:
        future = self._frame(sequence)
        if not future.done():
            future.set_result(non_finite)

    async def gradients_of(self, sequence: int) -> tuple[dict[str, np.ndarray], list[str]]:
        """The gradients of frame ``sequence``, once it has arrived whole, and the names of those
        holding a NaN or an infinity (checked as they arrived)."""
        future = self._frame(sequence)
        try:
            await asyncio.wait_for(asyncio.shield(future), FRAME_TIMEOUT_S)
        except asyncio.TimeoutError:
            raise AbortedError(
                f"The push names data plane frame {sequence}, which did not arrive within {FRAME_TIMEOUT_S:.0f} s; "
                "push again (or over gRPC).",
                details={"data_plane": "no-frame"},
            ) from None
        finally:
            self._frames.pop(sequence, None)
        if self.closed:
            raise _unknown_session()
        return self.gradients, future.result()

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        self.reservation.release()
        for future in self._frames.values():
            if not future.done():
                future.set_result(None)  # its waiter sees `closed`
        if self._stop_writing is not None:
            self._stop_writing()
        if self.stop_reading is not None:
            self.stop_reading()
        if self.connection is not None:
            try:
                self.connection.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            self.connection.close()

    # ------------------------------------------------------------- executor

    def send_values(self, sequence: int, values: dict[str, np.ndarray]) -> None:
        """The reply frame of the values of every variable (a frame saying none follow is sent
        with ``send_soon``, from the event loop)."""
        connection = self.connection
        if connection is None or self.closed:
            return
        with self._send_lock:
            try:
                views = self._value_payload.views(values)  # the session's own values: one run of bytes
                frames.send_views(connection, [memoryview(frames.header(sequence, self.payload_bytes)), *views])
            except OSError as error:
                log.info("data plane session %s...: the reply could not be sent (%s)", self.id[:8], error)

    # ----------------------------------------------------------- event loop

    def send_soon(self, sequence: int, payload: bytes, flags: int) -> asyncio.Future:
        """Send one frame from the event loop without ever blocking it: what the socket does not
        take at once is sent as it drains. Done once sent, or once the connection failed."""
        done = self._loop.create_future()
        connection = self.connection
        if connection is None or self.closed or not self._send_lock.acquire(blocking=False):
            # No connection, or a values frame still being sent: only a worker that does not wait
            # for its answers gets here, and its session ends.
            self.close()
            done.set_result(None)
            return done
        pending = [memoryview(frames.header(sequence, len(payload), flags) + payload)]

        def send_some() -> bool:
            try:
                sent = connection.send(pending[0], socket.MSG_DONTWAIT)
            except (BlockingIOError, InterruptedError):
                return False
            except OSError as error:
                log.info("data plane session %s...: an answer could not be sent (%s)", self.id[:8], error)
                pending[0] = pending[0][:0]
                return True
            pending[0] = pending[0][sent:]
            return not pending[0].nbytes

        def finish() -> None:
            self._send_lock.release()
            if not done.done():
                done.set_result(None)

        if send_some():
            finish()
            return done
        descriptor = connection.fileno()

        def stop_writing() -> None:
            self._loop.remove_writer(descriptor)
            self._stop_writing = None
            finish()

        def writable() -> None:
            if self.closed or send_some():
                stop_writing()

        self._stop_writing = stop_writing  # close() ends a send still waiting for room
        self._loop.add_writer(descriptor, writable)
        return done


def _unknown_session() -> FailedPreconditionError:
    return FailedPreconditionError(
        "The push names a data plane session this server does not know (its connection closed, the server "
        "restarted, or the worker opened a newer one); open a new one or push over gRPC.",
        details={"data_plane": "unknown-session"},
    )


class DataPlane(WorkerSessions):
    """The data port and its sessions: one per (model, worker)."""

    what = "Data plane session"

    def __init__(self, host: str, memory=None, port: int = 0, max_request_bytes: int = 8 << 20):
        super().__init__()
        # Answers request frames (optserve.server.data_plane_requests); set once the servicer exists.
        self.requests: Any = None
        self.max_request_bytes = max_request_bytes
        self._answering: set[asyncio.Future] = set()
        self.host = host
        self.requested_port = port
        self.memory = memory
        self.port: int | None = None
        self._listener: socket.socket | None = None
        self._by_secret: dict[bytes, DataSession] = {}
        self._secrets_lock = threading.Lock()  # _by_secret is read by connection threads
        self._handshakes = threading.BoundedSemaphore(MAX_HANDSHAKES)
        self._loop: asyncio.AbstractEventLoop | None = None

    def start(self, loop: asyncio.AbstractEventLoop) -> int:
        self._loop = loop
        family = socket.AF_INET6 if ":" in self.host else socket.AF_INET
        listener = socket.socket(family, socket.SOCK_STREAM)
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            listener.bind((self.host.strip("[]"), self.requested_port))
        except OSError as error:
            listener.close()
            raise OSError(
                f"Could not open the data port {self.requested_port} on {self.host} ({error.strerror}); choose "
                "another --data-port, or 0 for any free port."
            ) from None
        listener.listen(64)
        self._listener = listener
        self.port = listener.getsockname()[1]
        threading.Thread(target=self._accept, name="optserve-data-plane", daemon=True).start()
        return self.port

    def _accept(self) -> None:
        listener = self._listener
        while listener is not None:
            try:
                connection, _ = listener.accept()
            except OSError:
                return  # closed
            if not self._handshakes.acquire(blocking=False):
                connection.close()  # too many connections that have not said who they are
                continue
            threading.Thread(target=self._serve, args=(connection,), name="optserve-data", daemon=True).start()

    def _serve(self, connection: socket.socket) -> None:
        try:
            connection.settimeout(HANDSHAKE_TIMEOUT_S)
            secret = bytearray(SECRET_BYTES)
            session = self._attach(connection, secret) if receive_exactly(connection, memoryview(secret)) else None
        except OSError:
            session = None
        finally:
            self._handshakes.release()
        if session is None:
            connection.close()
            return
        try:
            connection.sendall(frames.ATTACHED)
        except OSError:
            self._loop.call_soon_threadsafe(self._connection_ended, session)  # type: ignore[union-attr]
            return
        connection.settimeout(None)
        on_request = self._on_request if self.requests is not None else None
        if session.frames_only and on_request is not None:
            # Request frames alone: the event loop reads them itself, one thread hop less per push.
            try:
                self._loop.call_soon_threadsafe(self._read_on_loop, session, connection)  # type: ignore[union-attr]
            except RuntimeError:
                connection.close()  # the server's loop has closed
            return
        session.read_frames(connection, self._connection_ended, on_request, self.max_request_bytes)

    def _read_on_loop(self, session: DataSession, connection: socket.socket) -> None:
        if session.closed or self._loop is None:
            return  # closed while it was handed over: its socket is closed with it
        reader = LoopFrameReader(
            session, connection, self._loop, self._on_request, self._connection_ended, self.max_request_bytes
        )
        reader.start()

    def _attach(self, connection: socket.socket, secret: bytearray) -> DataSession | None:
        with self._secrets_lock:
            session = None
            for known, candidate in self._by_secret.items():
                if hmac.compare_digest(known, bytes(secret)):
                    session = candidate
            if session is None or session.connection is not None or session.closed:
                return None
            del self._by_secret[bytes(secret)]  # one connection per session
            for option, value in ((socket.SO_SNDBUF, SOCKET_BUFFER_BYTES), (socket.SO_RCVBUF, SOCKET_BUFFER_BYTES)):
                connection.setsockopt(socket.SOL_SOCKET, option, value)
            connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            session.connection = connection
            try:
                host, port = connection.getpeername()[:2]
                session.peer = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
            except OSError:
                pass
            return session

    # ----------------------------------------------------------- event loop

    def _on_request(self, session: DataSession, sequence: int, payload: bytes, answered) -> None:
        # Answered in this turn of the loop when nothing in it waits (a small model's push).
        answering = eager.run(self._answer(session, sequence, payload, answered))
        if not answering.done():
            self._answering.add(answering)
            answering.add_done_callback(self._answering.discard)

    async def _answer(self, session: DataSession, sequence: int, payload: bytes, answered) -> None:
        """``answered``: set once the answer is sent (a threading.Event the reader thread waits on,
        or the LoopFrameReader), so that the next frame is read."""
        try:
            if not session.closed:
                flags, reply = await self.requests.answer(session, payload)
                await session.send_soon(sequence, reply, flags)
        except Exception:  # noqa: BLE001 - the handler answers every refusal itself; this is a bug
            log.exception("data plane session %s...: a request frame failed; closed", session.id[:8])
            session.close()
        finally:
            answered.set()  # the reader may take the next frame (or see the connection end)

    def open(self, model, worker: int, principal=None, frames_only: bool = False) -> DataSession:
        if self._loop is None or self.port is None:
            raise FailedPreconditionError("This server has no data plane; pushes use gRPC.")
        self._make_room(model, worker)
        reservation = Reservation(self.memory) if self.memory is not None else NoReservation()
        if not frames_only:  # the gradients and the values of a push, each the size of the model
            nbytes = 2 * sum(math.prod(v.shape) * np.dtype(v.dtype).itemsize for v in model.spec.variables)
            reservation.take(nbytes, what=f"The data plane for model {model.model_id!r}")
        session = DataSession(model, worker, reservation, self._loop, principal, frames_only)
        self._add(session)
        with self._secrets_lock:
            self._by_secret[session.secret] = session
        self._loop.call_later(HANDSHAKE_TIMEOUT_S * 3, self._expire_unattached, session)
        return session

    def get(self, session_id: str, model_id: str, worker: int) -> DataSession:
        session = self._known(session_id, model_id, worker)
        if session is None:
            raise _unknown_session()
        return session

    def _expire_unattached(self, session: DataSession) -> None:
        if session.connection is None and not session.closed:
            self._forget(session)

    def _connection_ended(self, session: DataSession) -> None:
        self._forget(session)

    def _drop(self, session: DataSession) -> None:
        with self._secrets_lock:
            self._by_secret.pop(session.secret, None)
        super()._drop(session)

    def close(self) -> None:
        listener, self._listener = self._listener, None
        if listener is not None:
            try:
                listener.shutdown(socket.SHUT_RDWR)  # wakes the accept thread
            except OSError:
                pass
            listener.close()
        for task in list(self._answering):
            task.cancel()
        super().close()
