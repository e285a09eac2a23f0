"""Shared fixtures: a real optserve server on a free loopback port."""

from __future__ import annotations

import os

import pytest

# Keras (the oracle in parity tests) runs its optimizers on the NumPy backend
# unless a test module asks for another backend before importing keras.
os.environ.setdefault("KERAS_BACKEND", "numpy")


@pytest.fixture
def server():
    """A fresh in-process server on 127.0.0.1:<free port>; yields the RunningServer."""
    from optserve.server.app import start_server

    running = start_server(host="127.0.0.1", port=0, device="cpu")
    try:
        yield running
    finally:
        running.stop()


@pytest.fixture
def address(server):
    return server.address


@pytest.fixture
def stub(address):
    """The generated ParameterServer stub on a channel to the `server` fixture."""
    import rpc_helpers

    channel, stub = rpc_helpers.connect(address)
    with channel:
        yield stub
