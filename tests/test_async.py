"""Asynchronous mode: every push applied as it arrives, atomically, none lost, none applied twice."""

from __future__ import annotations

import threading

import grpc
import numpy as np
import rpc_helpers as rpc

from optserve.protos import optserve_pb2 as pb

WORKERS = 8
PUSHES = 50


def test_concurrent_pushes_lose_no_update(address):
    size = 1000
    channel, stub = rpc.connect(address)
    with channel:
        rpc.create_model(
            stub,
            "job",
            {"w": np.zeros(size, np.float32), "b": np.zeros(3, np.float32)},
            rpc.sgd(1.0),
            num_workers=WORKERS,
            mode=pb.ASYNC,
        )
    failures = []

    def worker(index):
        # One channel per worker, as separate processes would have.
        worker_channel, worker_stub = rpc.connect(address)
        with worker_channel:
            for step in range(PUSHES):
                try:
                    rpc.push(
                        worker_stub,
                        "job",
                        index,
                        step,
                        {"w": np.ones(size, np.float32), "b": np.full(3, index, np.float32)},
                    )
                except grpc.RpcError as error:  # pragma: no cover - reported below
                    failures.append(error)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(WORKERS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not failures
    channel, stub = rpc.connect(address)
    with channel:
        state, values = rpc.pull(stub, "job")
    assert (state.step, state.iterations) == (WORKERS * PUSHES, WORKERS * PUSHES)
    np.testing.assert_array_equal(values["w"], np.full(size, -WORKERS * PUSHES, np.float32))
    np.testing.assert_array_equal(values["b"], np.full(3, -PUSHES * sum(range(WORKERS)), np.float32))


def test_each_push_applies_at_once_without_waiting_for_the_other_workers(stub):
    rpc.create_model(stub, "job", {"w": np.zeros(2, np.float32)}, rpc.sgd(1.0), num_workers=4, mode=pb.ASYNC)
    result, values = rpc.push(stub, "job", 2, 0, {"w": np.ones(2, np.float32)}, return_variables=True, timeout=5)
    assert (result.step, result.iterations, list(result.contributors), result.duplicate) == (1, 1, [2], False)
    np.testing.assert_array_equal(values["w"], [-1.0, -1.0])
    result, _ = rpc.push(stub, "job", 3, 0, {"w": np.ones(2, np.float32)}, timeout=5)
    assert result.step == 2  # another worker's step 0 is a different push


def test_a_repeated_push_is_answered_but_not_applied_again(stub):
    rpc.create_model(stub, "job", {"w": np.zeros(2, np.float32)}, rpc.sgd(1.0), num_workers=2, mode=pb.ASYNC)
    rpc.push(stub, "job", 0, 0, {"w": np.ones(2, np.float32)})
    rpc.push(stub, "job", 0, 1, {"w": np.ones(2, np.float32)})
    again, values = rpc.push(stub, "job", 0, 0, {"w": np.ones(2, np.float32)}, return_variables=True)
    assert again.duplicate and (again.step, again.iterations) == (2, 2)
    np.testing.assert_array_equal(values["w"], [-2.0, -2.0])


def test_worker_index_is_checked(stub):
    rpc.create_model(stub, "job", {"w": np.zeros(2, np.float32)}, rpc.sgd(1.0), num_workers=2, mode=pb.ASYNC)
    error = rpc.rpc_error(rpc.push, stub, "job", 2, 0, {"w": np.ones(2, np.float32)})
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT and "[0, 2)" in error.details()
