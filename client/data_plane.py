"""The client's side of the data plane (``optserve.server.data_plane``): a push's bytes over plain TCP.

A push too large for one gRPC message, to a server not on this host (or
without shared memory), sends its gradients as one frame on the session's
connection, straight from the arrays, and pushes over gRPC naming the frame;
the new values come back on the connection, read straight into arrays the
caller then owns (reused once dropped, see ``optserve.protos.buffers``). A
push that fits one gRPC message is sent whole as a request frame instead, and
its answer read from the connection: no gRPC call at all.

Anything that does not work out (a server with TLS or an older one, a port
that cannot be reached, a connection that breaks) leaves the push on gRPC; the
session is then dropped and the next large push opens a new one.
``OPTSERVE_DATA_PLANE=0`` turns it off for a process.
"""

from __future__ import annotations

import math
import socket
import threading
from collections.abc import Sequence
from typing import Any

import numpy as np

from optserve.client.shared_memory import SegmentUnusable, SharedMemorySessions, switched_on
from optserve.protos import frames, tensors
from optserve.protos import optserve_pb2 as pb
from optserve.protos.buffers import ArrayPool
from optserve.protos.frames import bytes_of

ENVIRONMENT_SWITCH = "OPTSERVE_DATA_PLANE"
CONNECT_TIMEOUT_S = 5.0
SOCKET_BUFFER_BYTES = 4 << 20


def enabled_by_default() -> bool:
    return switched_on(ENVIRONMENT_SWITCH)


class DataPlaneBroken(Exception):
    """The connection failed mid-push: the push goes over gRPC (where a duplicate step is answered as such)."""


class DataPlaneTimeout(Exception):
    """A request frame got no answer within the call's deadline."""


def _receive_exactly(connection: socket.socket, view: memoryview) -> None:
    if not frames.receive_exactly(connection, view):
        raise DataPlaneBroken("the server closed the data connection")


class DataConnection:
    """One session's connection; one push at a time (``lock``)."""

    def __init__(self, host: str, response: pb.OpenDataPlaneResponse, arrays: ArrayPool):
        self.session_id = response.session_id
        self.frames_only = not response.tensors  # the server set nothing aside for gradient frames
        self.lock = threading.Lock()
        self._arrays = arrays
        self.tensors = [
            (t.name, tensors.dtype_from_proto(t.dtype), tuple(int(d) for d in t.shape)) for t in response.tensors
        ]
        self._names = {name for name, _, _ in self.tensors}
        self.payload_bytes = sum(math.prod(shape) * dtype.itemsize for _, dtype, shape in self.tensors)
        self._sequence = 0
        try:
            connection = socket.create_connection((host, response.port), timeout=CONNECT_TIMEOUT_S)
        except OSError as error:
            raise SegmentUnusable(f"cannot reach the data port {host}:{response.port} ({error})") from None
        try:
            connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            for option in (socket.SO_SNDBUF, socket.SO_RCVBUF):
                connection.setsockopt(socket.SOL_SOCKET, option, SOCKET_BUFFER_BYTES)
            connection.sendall(response.secret)
            if connection.recv(1) != frames.ATTACHED:
                raise OSError("the server did not take the secret")
            connection.settimeout(None)
        except OSError as error:
            connection.close()
            raise SegmentUnusable(f"the data port did not take the session ({error})") from None
        self.connection = connection

    def fits(self, gradients: Sequence[tuple[str, str, Any]]) -> bool:
        """Whether the push is one dense gradient of every variable, of its shape and dtype."""
        if len(gradients) != len(self.tensors) or {name for name, _, _ in gradients} != self._names:
            return False
        expected = {name: (dtype, shape) for name, dtype, shape in self.tensors}
        return all(
            not slot and isinstance(array, np.ndarray) and (array.dtype, array.shape) == expected[name]
            for name, slot, array in gradients
        )

    def send_gradients(self, gradients: Sequence[tuple[str, str, np.ndarray]]) -> int:
        """Send the frame of one push; returns its number."""
        self._sequence += 1
        by_name = {name: array for name, _, array in gradients}
        try:
            views = [memoryview(frames.header(self._sequence, self.payload_bytes))]
            views += [bytes_of(by_name[name]) for name, _, _ in self.tensors]
            frames.send_views(self.connection, views)
        except OSError as error:
            raise DataPlaneBroken(f"the data connection broke while sending ({error})") from None
        return self._sequence

    def _read_values(self, header: bytearray) -> dict[str, np.ndarray] | None:
        """The values of a reply frame whose header was read; None: the frame said none follow."""
        _, _, nbytes, flags = frames.HEADER.unpack(header)
        if flags & frames.NO_VALUES:
            return None
        if nbytes != self.payload_bytes:
            raise DataPlaneBroken(f"a reply of {nbytes} bytes, {self.payload_bytes} expected")
        values = {}
        for name, dtype, shape in self.tensors:
            values[name] = out = self._arrays.empty((self.session_id, name), shape, dtype)
            _receive_exactly(self.connection, bytes_of(out))
        return values

    def request(
        self, payload: bytes, timeout: float | None, values_of: int | None = None
    ) -> tuple[int, bytes, dict[str, np.ndarray] | None]:
        """Send a push (an ApplyGradientsRequest message) as a request frame; returns the answer's
        flags and payload (an ApplyGradientsResponse message, or with flag STATUS a DataPlaneStatus)
        and, for a push naming gradient frame ``values_of``, the values of its reply frame (None:
        none came), which the server sends before the answer."""
        self._sequence += 1
        sequence = self._sequence
        header = bytearray(frames.HEADER.size)
        values = None
        self.connection.settimeout(timeout)
        try:
            frames.send_frame(self.connection, sequence, payload, frames.REQUEST)
            while True:
                _receive_exactly(self.connection, memoryview(header))
                magic, number, nbytes, flags = frames.HEADER.unpack(header)
                if magic == frames.MAGIC and number == sequence:
                    break
                if magic != frames.MAGIC or number != values_of or values is not None:
                    raise DataPlaneBroken(f"an unexpected frame {number} (waiting for {sequence})")
                values = self._read_values(header)
                values_of = None  # one reply frame at most
            answer = frames.receive_frame_payload(self.connection, nbytes)
        except TimeoutError:
            raise DataPlaneTimeout(f"no answer within {timeout:.3g} s") from None
        except OSError as error:
            raise DataPlaneBroken(f"the data connection broke ({error})") from None
        finally:
            try:
                self.connection.settimeout(None)
            except OSError:
                pass
        if answer is None:
            raise DataPlaneBroken("the server closed the data connection")
        return flags, answer, values

    def close(self) -> None:
        try:
            self.connection.close()
        except OSError:
            pass


class DataPlaneSessions(SharedMemorySessions):
    """A transport's data connections by (model, worker)."""

    what = "data plane"

    def __init__(self, open_session, host: str | None):
        super().__init__(open_session)
        self._host = host
        self.available = host is not None

    def _attach(self, response: Any) -> DataConnection:
        assert self._host is not None  # not available otherwise
        return DataConnection(self._host, response, self._arrays)

    def _suits(self, segment: Any, **options: Any) -> bool:
        # A frames-only session takes no gradient frame: a push of gradient frames replaces it.
        return bool(options.get("frames_only")) or not segment.frames_only

    def _closed(self, segment: Any) -> None:
        segment.close()


def host_of(address: str) -> str | None:
    """The host part of a gRPC target ``host:port`` (``[v6]:port``); None for other kinds of target."""
    if "://" in address or address.startswith(("unix:", "dns:", "ipv4:", "ipv6:")):
        return None
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit():
        return None
    return host.strip("[]")
