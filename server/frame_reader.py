"""Request frames read by the event loop itself, for data plane sessions that carry nothing else.

A session that also carries gradient frames has a reader thread: those frames are received
straight into the session's arrays with blocking ``recv_into`` calls, which release the GIL. A
frames-only session (``OpenDataPlaneRequest.frames_only``) carries request frames alone: small
pushes answered in one turn of the event loop. For those a reader thread only adds latency: it
wakes on the frame, hands it to the loop (``call_soon_threadsafe`` wakes the loop in turn), then
wakes again when the answer is sent, competing for the GIL with the loop that answers. Here the
loop watches the socket itself (``add_reader``), so a frame's bytes are answered in the same turn
that reads them.

As with the reader thread, one request is answered at a time: the socket is not read again until
the answer is sent, so a worker cannot pile up answers it does not read. A frame that is not a
request frame, or is larger than ``max_request_bytes``, ends the connection.
"""

from __future__ import annotations

import asyncio
import logging
import socket
from typing import Any

from optserve.protos import frames

log = logging.getLogger(__name__)

RECEIVE_BYTES = 256 * 1024  # bytes asked of one recv call


class LoopFrameReader:
    """Reads one connection's request frames on the event loop and hands each to ``on_request``
    (``on_request(session, sequence, payload, answered)``, as the reader thread does); the reader
    itself is ``answered``: its ``set()`` (once the answer is sent) lets it read the next frame."""

    def __init__(
        self,
        session: Any,
        connection: socket.socket,
        loop: asyncio.AbstractEventLoop,
        on_request,
        on_end,
        max_request_bytes: int,
    ):
        self._session = session
        self._connection = connection
        self._loop = loop
        self._on_request = on_request
        self._on_end = on_end
        self._max_request_bytes = max_request_bytes
        self._descriptor = connection.fileno()
        self._buffer = bytearray()
        self._reading = False
        self._answering = False
        self._stopped = False

    def start(self) -> None:
        """Begin reading (event loop). The session's ``close`` stops the reader first."""
        self._connection.setblocking(False)
        self._session.stop_reading = self.stop
        self._watch()

    def stop(self) -> None:
        """Stop watching the socket (before it is closed: a closed descriptor must not stay registered)."""
        self._stopped = True
        self._unwatch()

    def set(self) -> None:
        """The answer to the last frame is sent: read the next one (in a later turn of the loop, so
        that frames already buffered are not answered from within this answer's stack)."""
        self._answering = False
        if not self._stopped:
            self._loop.call_soon(self._resume)

    # ------------------------------------------------------------------ loop

    def _watch(self) -> None:
        if not self._reading and not self._stopped:
            self._loop.add_reader(self._descriptor, self._readable)
            self._reading = True

    def _unwatch(self) -> None:
        if self._reading:
            self._reading = False
            try:
                self._loop.remove_reader(self._descriptor)
            except (ValueError, RuntimeError):  # already closed: nothing is registered any more
                pass

    def _resume(self) -> None:
        if self._stopped or self._answering:
            return
        self._watch()
        self._take_frames()

    def _readable(self) -> None:
        try:
            while True:
                chunk = self._connection.recv(RECEIVE_BYTES)
                if not chunk:
                    self._end()
                    return
                self._buffer += chunk
                if len(chunk) < RECEIVE_BYTES:
                    break
        except (BlockingIOError, InterruptedError):
            pass
        except OSError:
            self._end()
            return
        self._take_frames()

    def _take_frames(self) -> None:
        buffer = self._buffer
        while not self._answering and not self._stopped and len(buffer) >= frames.HEADER.size:
            magic, sequence, nbytes, flags = frames.HEADER.unpack_from(buffer)
            if magic != frames.MAGIC or not flags & frames.REQUEST or nbytes > self._max_request_bytes:
                log.warning(
                    "data plane session %s...: a frame of %d bytes that is not a request frame of at most %d "
                    "bytes (--max-message-bytes), or a bad header; closed",
                    self._session.id[:8],
                    nbytes,
                    self._max_request_bytes,
                )
                self._end()
                return
            end = frames.HEADER.size + nbytes
            if len(buffer) < end:
                return
            payload = bytes(buffer[frames.HEADER.size : end])
            del buffer[:end]
            # One request at a time: the socket is read again once its answer is sent.
            self._answering = True
            self._unwatch()
            self._on_request(self._session, sequence, payload, self)

    def _end(self) -> None:
        self.stop()
        self._on_end(self._session)
