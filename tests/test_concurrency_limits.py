"""Concurrency limits and dead workers: streams per server and per connection, the in-flight
byte budget, stalled uploads, and workers whose push breaks off."""

from __future__ import annotations

import json
import logging
import subprocess
import sys
import textwrap
import threading
import time

import grpc
import numpy as np
import rpc_helpers as rpc
from test_limits import assert_still_serving, limited_server

from optserve.protos import optserve_pb2 as pb
from optserve.protos import optserve_pb2_grpc as pb_grpc

MiB = 1 << 20
SGD_1 = {"class_name": "SGD", "config": {"learning_rate": 1.0}}


class Upload:
    """A push or CreateModel whose stream sends ``first`` messages, then stalls until released."""

    def __init__(self, stub, method: str, first: list):
        self.release = threading.Event()
        self.error: grpc.RpcError | None = None
        self.result = None
        self.done = threading.Event()

        def requests():
            yield from first
            self.release.wait(30)

        if method == "ApplyGradients":
            self.call = stub.ApplyGradients(requests(), timeout=30)
        else:
            self.call = getattr(stub, method).future(requests(), timeout=30)
        threading.Thread(target=self._wait, daemon=True).start()

    def _wait(self) -> None:
        try:
            self.result = list(self.call) if hasattr(self.call, "__iter__") else self.call.result()
        except grpc.RpcError as error:
            self.error = error
        except (grpc.FutureCancelledError, ValueError):
            pass  # cancelled by the test
        finally:
            self.done.set()

    def outcome(self, timeout: float = 10.0) -> Upload:
        assert self.done.wait(timeout), "the call did not end"
        return self

    def cancel(self) -> None:
        self.call.cancel()
        self.release.set()


def push_header(model_id: str, worker: int, step: int = 0, num_gradients: int | None = 1) -> pb.ApplyGradientsRequest:
    header = pb.ApplyGradientsHeader(model_id=model_id, worker_index=worker, step=step)
    if num_gradients is not None:
        header.num_gradients = num_gradients
    return pb.ApplyGradientsRequest(header=header)


def partial_gradient(n: int) -> pb.ApplyGradientsRequest:
    """The first half of an ``n``-float gradient for "w"."""
    return pb.ApplyGradientsRequest(
        gradients=[pb.TensorChunk(name="w", dtype=pb.FLOAT32, shape=[n], data=b"\0" * (2 * n))]
    )


class Push(threading.Thread):
    def __init__(self, stub, model_id, worker, step, gradients, **options):
        super().__init__(daemon=True)
        self.args, self.options = (stub, model_id, worker, step, gradients), options
        self.result = self.error = None
        self.start()

    def run(self):
        try:
            self.result, _ = rpc.push(*self.args, **self.options)
        except grpc.RpcError as error:
            self.error = error

    def outcome(self, timeout=10.0):
        self.join(timeout)
        assert not self.is_alive(), "push did not return"
        return self


def _code(call) -> grpc.StatusCode | None:
    try:
        call()
    except grpc.RpcError as error:
        return error.code()
    return None


# ------------------------------------------------------------------ streams


def test_calls_beyond_max_streams_are_refused_while_health_answers():
    with limited_server(max_streams=3) as (server, stub):
        rpc.create_model(stub, "job", {"w": np.ones(2, np.float32)}, num_workers=3, sync_timeout_s=30)
        parked = [Push(stub, "job", w, 0, {"w": np.ones(2, np.float32)}) for w in range(2)]
        # Two parked pushes and this Pull make three; one more call is refused.
        rpc.wait_until(lambda: rpc.waiting_workers(stub, "job") == [0, 1])
        stalled = Upload(stub, "ApplyGradients", [push_header("job", 2, num_gradients=0)])
        rpc.wait_until(lambda: _code(lambda: rpc.pull(stub, "job")) == grpc.StatusCode.RESOURCE_EXHAUSTED)
        error = rpc.rpc_error(rpc.pull, stub, "bystander")
        assert "--max-streams" in error.details()
        started = time.monotonic()
        assert rpc.health_status(server.address) == 1  # SERVING: health is not counted
        assert time.monotonic() - started < 1.0
        stalled.release.set()  # worker 2's (empty) push completes the step
        for push in parked:
            assert push.outcome().result.step == 1
        assert_still_serving(server, stub)


def test_streams_per_connection_are_bounded():
    with limited_server(max_streams_per_connection=2) as (server, stub):
        rpc.create_model(stub, "job", {"w": np.ones(2, np.float32)}, num_workers=3, sync_timeout_s=30)
        pushes = [Push(stub, "job", w, 0, {"w": np.ones(2, np.float32)}, timeout=5) for w in range(3)]
        # A connection of its own (channels to one address otherwise share theirs).
        channel = grpc.insecure_channel(server.address, options=[("grpc.use_local_subchannel_pool", 1)])
        with channel:
            other = pb_grpc.ParameterServerStub(channel)
            rpc.wait_until(lambda: len(rpc.waiting_workers(other, "job")) == 2)
            time.sleep(0.5)
            # The third waits in its client, or is refused with UNAVAILABLE (REFUSED_STREAM: safe to retry).
            assert len(rpc.waiting_workers(other, "job")) == 2
            codes = sorted(push.outcome().error.code().name for push in pushes)
            assert codes[:2] == ["DEADLINE_EXCEEDED", "DEADLINE_EXCEEDED"]
            assert codes[2] in ("DEADLINE_EXCEEDED", "UNAVAILABLE")


# ------------------------------------------------------------------ stalled uploads and the in-flight budget


def test_a_stalled_upload_is_dropped_after_the_idle_timeout():
    with limited_server(stream_idle_timeout_s=1.0) as (server, stub):
        rpc.create_model(stub, "job", {"w": np.ones(1024, np.float32)})
        before = rpc.snapshot(stub, "job")
        stalled = Upload(stub, "ApplyGradients", [push_header("job", 0), partial_gradient(1024)])
        assert_still_serving(server, stub)
        error = stalled.outcome(timeout=10).error
        assert error.code() == grpc.StatusCode.ABORTED
        assert rpc.trailing(error)["optserve-reason"] == "idle-stream"
        stalled.release.set()
        rpc.assert_same_snapshot(before, rpc.snapshot(stub, "job"))


def test_a_request_larger_than_the_in_flight_budget_is_refused_at_once():
    with limited_server(max_inflight_bytes=MiB) as (server, stub):
        error = rpc.rpc_error(rpc.create_model, stub, "big", {"w": np.ones(MiB // 2, np.float32)})
        assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "--max-inflight-bytes" in error.details()
        assert_still_serving(server, stub)


def test_an_upload_waits_for_in_flight_room_and_health_answers_meanwhile():
    with limited_server(max_inflight_bytes=MiB, stream_idle_timeout_s=20.0) as (server, stub):
        spec = pb.ModelSpec(model_id="first", optimizer_config_json=json.dumps(rpc.sgd()))
        holder = Upload(
            stub,
            "CreateModel",
            [
                pb.CreateModelRequest(
                    spec=spec,
                    variables=[pb.TensorChunk(name="w", dtype=pb.FLOAT32, shape=[200_000], data=b"\0" * 4096)],
                )
            ],
        )  # 800 KB held
        time.sleep(0.3)
        waiter = Push(stub, "bystander", 0, 0, {"w": np.ones(4, np.float32)})  # tiny: fits beside it
        assert waiter.outcome().error is None
        second = threading.Thread(target=rpc.create_model, args=(stub, "second", {"w": np.ones(100_000, np.float32)}))
        second.start()  # 400 KB: waits for the holder
        time.sleep(0.5)
        assert second.is_alive()
        assert_still_serving(server, stub)
        holder.cancel()
        second.join(10)
        assert not second.is_alive()
        assert "second" in [m.spec.model_id for m in stub.ListModels(pb.ListModelsRequest(), timeout=10).models]


# ------------------------------------------------------------------ dead workers


def test_a_worker_that_hangs_up_mid_upload_ends_its_step_at_once():
    with limited_server() as (server, stub):
        rpc.create_model(stub, "job", {"w": np.zeros(1024, np.float32)}, SGD_1, num_workers=2, sync_timeout_s=60)
        before = rpc.snapshot(stub, "job")
        parked = Push(stub, "job", 0, 0, {"w": np.ones(1024, np.float32)})
        rpc.wait_until(lambda: rpc.waiting_workers(stub, "job") == [0])
        dying = Upload(stub, "ApplyGradients", [push_header("job", 1), partial_gradient(1024)])
        time.sleep(0.3)
        started = time.monotonic()
        dying.cancel()
        error = parked.outcome(timeout=10).error
        assert time.monotonic() - started < 3.0  # not the 60 s step timeout
        assert error.code() == grpc.StatusCode.ABORTED
        assert rpc.trailing(error)["optserve-reason"] == "worker-lost"
        assert rpc.trailing(error)["optserve-missing-workers"] == "1"
        rpc.assert_same_snapshot(before, rpc.snapshot(stub, "job"))  # FAIL policy: nothing applied
        # Both push step 0 again (worker 1 restarted): applied once, from the new pushes only.
        again = [Push(stub, "job", w, 0, {"w": np.full(1024, 2.0, np.float32)}) for w in range(2)]
        assert [p.outcome().result.step for p in again] == [1, 1]
        np.testing.assert_array_equal(rpc.pull(stub, "job")[1]["w"], np.full(1024, -4.0, np.float32))


def test_under_apply_partial_a_lost_worker_lets_the_others_step_at_once():
    with limited_server() as (server, stub):
        rpc.create_model(
            stub,
            "job",
            {"w": np.zeros(4, np.float32)},
            SGD_1,
            num_workers=2,
            sync_timeout_s=60,
            timeout_policy=pb.APPLY_PARTIAL,
        )
        parked = Push(stub, "job", 0, 0, {"w": np.ones(4, np.float32)})
        rpc.wait_until(lambda: rpc.waiting_workers(stub, "job") == [0])
        dying = Upload(stub, "ApplyGradients", [push_header("job", 1)])
        time.sleep(0.3)
        dying.cancel()
        result = parked.outcome(timeout=5).result
        assert (result.step, list(result.contributors), list(result.missing_workers)) == (1, [0], [1])


def test_a_killed_worker_process_is_noticed_at_once(address, stub):
    rpc.create_model(stub, "job", {"w": np.zeros(4096, np.float32)}, num_workers=2, sync_timeout_s=60)
    parked = Push(stub, "job", 0, 0, {"w": np.ones(4096, np.float32)})
    rpc.wait_until(lambda: rpc.waiting_workers(stub, "job") == [0])
    script = textwrap.dedent(f"""
        import sys, time, grpc
        from optserve.protos import optserve_pb2 as pb, optserve_pb2_grpc as pb_grpc
        stub = pb_grpc.ParameterServerStub(grpc.insecure_channel({address!r}))
        def requests():
            yield pb.ApplyGradientsRequest(header=pb.ApplyGradientsHeader(model_id="job", worker_index=1))
            yield pb.ApplyGradientsRequest(gradients=[pb.TensorChunk(name="w", dtype=pb.FLOAT32, shape=[4096],
                                                                     data=bytes(4096))])
            print("uploading", flush=True)
            time.sleep(60)
        list(stub.ApplyGradients(requests()))
    """)
    worker = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    try:
        assert worker.stdout.readline().strip() == "uploading"
        time.sleep(0.3)
        worker.kill()
        started = time.monotonic()
        error = parked.outcome(timeout=10).error
        assert time.monotonic() - started < 5.0
        assert error.code() == grpc.StatusCode.ABORTED
        assert rpc.trailing(error)["optserve-reason"] == "worker-lost"
    finally:
        worker.kill()
        worker.wait()


def test_a_worker_that_hangs_up_after_its_push_arrived_still_counts(stub, caplog):
    rpc.create_model(stub, "job", {"w": np.zeros(4, np.float32)}, SGD_1, num_workers=2, sync_timeout_s=60)
    with caplog.at_level(logging.INFO, logger="optserve.server.servicer"):
        impatient = Push(stub, "job", 0, 0, {"w": np.ones(4, np.float32)}, timeout=0.5)
        assert impatient.outcome().error.code() == grpc.StatusCode.DEADLINE_EXCEEDED  # its own deadline
        rpc.wait_until(lambda: "worker 0 hung up while its push for step 0 waited" in caplog.text)
    assert rpc.waiting_workers(stub, "job") == [0]  # its gradient stays in the step
    result = Push(stub, "job", 1, 0, {"w": np.ones(4, np.float32)}).outcome().result
    assert (result.step, list(result.contributors)) == (1, [0, 1])
