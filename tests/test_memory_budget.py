"""Memory budgets: a model that would not fit is refused before it is received, refusals
give memory back, and health and the other models keep answering."""

from __future__ import annotations

import contextlib
import json
import re
import subprocess
import sys
import threading
import time

import grpc
import numpy as np
import pytest
import rpc_helpers as rpc
from test_limits import assert_still_serving, limited_server, model_ids

from optserve.protos import optserve_pb2 as pb

MiB = 1 << 20
ADAM = {"class_name": "Adam", "config": {"learning_rate": 0.01}}


def _floats(nbytes: int) -> np.ndarray:
    return np.ones(nbytes // 4, np.float32)


def test_a_model_over_the_memory_budget_is_refused_with_resource_exhausted():
    with limited_server(max_memory=2 * MiB) as (server, stub):
        error = rpc.rpc_error(rpc.create_model, stub, "big", {"w": _floats(3 * MiB)})
        assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "--max-memory" in error.details()
        assert model_ids(stub) == ["bystander"]
        assert_still_serving(server, stub)


def test_slots_count_against_the_budget_and_deleting_a_model_gives_its_bytes_back():
    with limited_server(max_memory=4 * MiB) as (server, stub):
        # Adam keeps two slots: 1 MiB of variables is 3 MiB of state.
        rpc.create_model(stub, "first", {"w": _floats(MiB)}, ADAM)
        error = rpc.rpc_error(rpc.create_model, stub, "second", {"w": _floats(MiB)}, ADAM)
        assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        rpc.create_model(stub, "sgd", {"w": _floats(MiB // 2)})  # SGD without momentum: its variables only
        assert stub.DeleteModel(pb.DeleteModelRequest(model_id="first"), timeout=10).deleted
        rpc.create_model(stub, "second", {"w": _floats(MiB)}, ADAM)
        assert sorted(model_ids(stub)) == ["bystander", "second", "sgd"]


def test_a_synchronous_model_counts_its_merge_buffer():
    with limited_server(max_memory=int(2.5 * MiB)) as (server, stub):
        rpc.create_model(stub, "one-worker", {"w": _floats(2 * MiB)})
        stub.DeleteModel(pb.DeleteModelRequest(model_id="one-worker"), timeout=10)
        error = rpc.rpc_error(rpc.create_model, stub, "two-workers", {"w": _floats(2 * MiB)}, num_workers=2)
        assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED


def test_the_per_model_quota_refuses_one_large_model_but_not_several_small_ones():
    with limited_server(max_memory=64 * MiB, max_model_bytes=MiB) as (server, stub):
        error = rpc.rpc_error(rpc.create_model, stub, "big", {"w": _floats(2 * MiB)})
        assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "--max-model-bytes" in error.details()
        for i in range(4):
            rpc.create_model(stub, f"small{i}", {"w": _floats(MiB // 2)})
        assert_still_serving(server, stub)


def test_the_number_of_models_is_bounded():
    with limited_server(max_models=3) as (server, stub):
        rpc.create_model(stub, "a", {"w": np.ones(2, np.float32)})
        rpc.create_model(stub, "b", {"w": np.ones(2, np.float32)})
        error = rpc.rpc_error(rpc.create_model, stub, "c", {"w": np.ones(2, np.float32)})
        assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "--max-models" in error.details()
        # Joining an existing model is no new model.
        assert not rpc.create_model(stub, "a", {"w": np.ones(2, np.float32)}).created


def test_a_model_that_does_not_fit_is_refused_before_the_rest_of_it_is_sent():
    with limited_server(max_memory=MiB) as (server, stub):
        spec = pb.ModelSpec(model_id="big", optimizer_config_json=json.dumps(rpc.sgd()))
        declared = pb.TensorChunk(name="w", dtype=pb.FLOAT32, shape=[1 << 28], data=b"\0" * 1024)
        never_sent = threading.Event()

        def requests():
            yield pb.CreateModelRequest(spec=spec, variables=[declared])
            never_sent.wait(30)  # the rest of the 1 GiB would follow; the answer must come first

        started = time.monotonic()
        try:
            error = rpc.rpc_error(stub.CreateModel, requests(), timeout=20)
        finally:
            never_sent.set()
        assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert time.monotonic() - started < 5
        assert_still_serving(server, stub)


# ---------------------------------------------------------------- a real server process


def _rss(pid: int, key: str = "VmRSS") -> int:
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    raise AssertionError(f"no {key} for {pid}")


@contextlib.contextmanager
def _server_process():
    command = [
        sys.executable,
        "-m",
        "optserve.server",
        "serve",
        "--port",
        "0",
        "--device",
        "cpu",
        "--log-level",
        "WARNING",
        "--max-memory",
        "256M",
    ]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, text=True)
    try:
        line = process.stdout.readline()
        address = re.search(r"listening on (\S+)", line).group(1)
        channel, stub = rpc.connect(address)
        with channel:
            rpc.create_model(stub, "bystander", {"w": np.ones(4, np.float32)})
            yield process, address, stub
    finally:
        process.terminate()
        process.wait(30)


@pytest.fixture(scope="module")
def server_process():
    with _server_process() as served:
        yield served


@pytest.fixture
def fresh_server_process():
    """A server process no other test has used: what earlier calls left in its heap (freed memory
    reused, fragments) would blur a peak measured in it."""
    with _server_process() as served:
        yield served


def _settled_rss(pid: int) -> int:
    time.sleep(1.5)  # the server trims after refused uploads, at most once a second
    return _rss(pid)


def test_refused_large_requests_give_their_memory_back(server_process):
    process, address, stub = server_process
    before = _settled_rss(process.pid)
    big_config = json.dumps({"class_name": "SGD", "config": {"name": "x" * 25_000_000}})
    for i in range(20):  # benchmarks/bench_limits.py sends 40
        spec = pb.ModelSpec(model_id=f"m{i}", optimizer_config_json=big_config)
        error = rpc.rpc_error(stub.CreateModel, iter([pb.CreateModelRequest(spec=spec)]), timeout=30)
        assert error.code() in (grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.INVALID_ARGUMENT)
    # Under the message limit: received and decoded whole, then refused by the server (its memory
    # is freed only after the call ended, some of it a moment later).
    mid_config = json.dumps({"class_name": "SGD", "config": {"name": "x" * (6 * MiB)}})
    for i in range(20):
        spec = pb.ModelSpec(model_id=f"mid{i}", optimizer_config_json=mid_config)
        error = rpc.rpc_error(stub.CreateModel, iter([pb.CreateModelRequest(spec=spec)]), timeout=30)
        assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    # A model over --max-memory, refused after its first 32 MiB variable arrived whole.
    error = rpc.rpc_error(rpc.create_model, stub, "huge", {"a": _floats(32 * MiB), "b": _floats(256 * MiB)})
    assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    after = _settled_rss(process.pid)
    assert after - before < 24 * MiB, (before, after)
    assert model_ids(stub) == ["bystander"]


def reset_peak_rss(pid: int) -> None:
    with open(f"/proc/{pid}/clear_refs", "w") as clear_refs:
        clear_refs.write("5")  # VmHWM := VmRSS


def test_accepting_a_model_peaks_near_its_state_size(fresh_server_process):
    process, address, stub = fresh_server_process
    variables = 32 * MiB
    state = 3 * variables  # Adam: the variables and two slots
    before = _settled_rss(process.pid)
    reset_peak_rss(process.pid)
    rpc.create_model(stub, "adam", {"w": _floats(variables)}, ADAM)
    growth = _rss(process.pid, "VmHWM") - before
    stub.DeleteModel(pb.DeleteModelRequest(model_id="adam"), timeout=10)
    # The decoded request becomes the variable (no second copy of it): a copy would make 4/3.
    assert growth < 1.3 * state, growth / state


def test_the_trim_waits_until_refused_calls_settle_then_checks_again():
    import asyncio

    from optserve.server.heap import TRIM_MIN_FREE_BYTES, RefusalTrimmer

    freed = [TRIM_MIN_FREE_BYTES]  # what the heap holds freed at each follow-up

    async def scenario() -> list[float]:
        loop = asyncio.get_running_loop()
        started = loop.time()
        trims: list[float] = []
        trimmer = RefusalTrimmer(
            settle_s=0.1,
            max_wait_s=1.0,
            follow_ups=2,
            follow_up_s=0.1,
            trim=lambda: trims.append(loop.time()),
            freed=lambda: freed.pop(0) if freed else 0,
        )
        for _ in range(3):  # a burst of refusals: one trim, after the last of them
            trimmer.call_ended()
            await asyncio.sleep(0.03)
        await asyncio.sleep(0.6)
        return [t - started for t in trims]

    trims = asyncio.run(scenario())
    # The settled trim, then the first follow-up (memory freed meanwhile); the second found nothing.
    assert len(trims) == 2, trims
    assert trims[0] >= 0.06 + 0.1 - 0.01
