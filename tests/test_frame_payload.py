"""A gradient frame's payload as one buffer (optserve.server.frame_payload): received and sent
whole, its non-finite tensors named as a receive per tensor would name them."""

from __future__ import annotations

import socket
import threading

import numpy as np
import pytest

from optserve.protos import frames
from optserve.server.frame_payload import FramePayload

PIECE = frames.PIECE_BYTES


def _tensors(layout):
    return [(f"t{index}", np.dtype(dtype), shape) for index, (dtype, shape) in enumerate(layout)]


def _values(tensors, seed=0):
    rng = np.random.default_rng(seed)
    return {name: rng.standard_normal(shape).astype(dtype) for name, dtype, shape in tensors}


def _wire(tensors, values) -> bytes:
    return b"".join(np.ascontiguousarray(values[name]).tobytes() for name, _, _ in tensors)


def _received(payload: FramePayload, data: bytes):
    sender, receiver = socket.socketpair()
    try:

        def send() -> None:
            sender.sendall(data)
            sender.shutdown(socket.SHUT_WR)  # a short payload then ends with the connection

        thread = threading.Thread(target=send)
        thread.start()
        result = payload.receive_checked(receiver)
        thread.join()
        return result
    finally:
        sender.close()
        receiver.close()


LAYOUTS = {
    "many small": [(np.float32, (300,))] * 40,
    "one spanning pieces": [(np.float32, (3 * PIECE // 4 + 5,))],
    "float64 then float32": [(np.float64, (1000,)), (np.float32, (PIECE // 4 + 7,)), (np.float32, (3,))],
    "a piece of two dtypes": [(np.float32, (PIECE // 4 - 2,)), (np.float64, (10,))],
    "misaligned": [(np.float32, (3,)), (np.float64, (5,)), (np.float32, (PIECE // 2,))],
}


@pytest.mark.parametrize("layout", LAYOUTS.values(), ids=LAYOUTS.keys())
def test_a_payload_is_received_whole_and_its_non_finite_tensors_named(layout):
    tensors = _tensors(layout)
    payload = FramePayload(tensors)
    assert payload.whole == (layout is not LAYOUTS["misaligned"])
    values = _values(tensors)
    assert _received(payload, _wire(tensors, values)) == []
    for name, value in values.items():
        np.testing.assert_array_equal(payload.arrays[name], value, strict=True)
    # Poison the last element of some tensors and the first of others: exactly those are named.
    poisoned = [name for index, (name, _, _) in enumerate(tensors) if index % 3 != 1]
    for index, name in enumerate(poisoned):
        flat = values[name].reshape(-1)
        flat[-1 if index % 2 else 0] = np.nan if index % 2 else -np.inf
    assert _received(payload, _wire(tensors, values)) == poisoned
    assert _received(payload, _wire(tensors, values)[:-1]) is None  # the connection ended first


def test_a_payload_of_large_finite_values_whose_squares_overflow_is_finite():
    tensors = _tensors([(np.float32, (PIECE // 8,)), (np.float32, (100,))])
    payload = FramePayload(tensors)
    values = {name: np.full(shape, 3e38, dtype) for name, dtype, shape in tensors}
    assert _received(payload, _wire(tensors, values)) == []


def _sent(send, send_buffer: int | None = None) -> bytes:
    """What ``send(socket)`` puts on a connection, read by another thread as it comes."""
    sender, receiver = socket.socketpair()
    if send_buffer is not None:
        sender.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, send_buffer)  # partial sends
    chunks: list[bytes] = []

    def read() -> None:
        while chunk := receiver.recv(1 << 16):
            chunks.append(chunk)

    thread = threading.Thread(target=read)
    thread.start()
    try:
        send(sender)
        sender.shutdown(socket.SHUT_WR)
        thread.join()
    finally:
        sender.close()
        receiver.close()
    return b"".join(chunks)


@pytest.mark.parametrize("layout", LAYOUTS.values(), ids=LAYOUTS.keys())
def test_a_payload_is_sent_in_frame_order(layout):
    tensors = _tensors(layout)
    payload = FramePayload(tensors)
    values = _values(tensors, seed=3)
    for name, value in values.items():
        payload.arrays[name][...] = value
    assert payload.owns(payload.arrays) and not payload.owns(dict(values))
    assert _sent(lambda connection: frames.send_views(connection, payload.views())) == _wire(tensors, values)
    # Arrays of the same tensors that are not the payload's own (a reply's snapshot) go out alike.
    assert _sent(lambda connection: frames.send_views(connection, payload.views(values))) == _wire(tensors, values)


def test_views_are_sent_gathered_in_order_whatever_their_sizes():
    rng = np.random.default_rng(5)
    sizes = [0, 1, 3, PIECE - 1, 2, PIECE * 2 + 5] + [4] * 1500 + [PIECE // 3] * 4
    views = [memoryview(rng.integers(0, 256, size, dtype=np.uint8).tobytes()) for size in sizes]
    sent = _sent(lambda connection: frames.send_views(connection, views), send_buffer=64 * 1024)
    assert sent == b"".join(bytes(view) for view in views)
