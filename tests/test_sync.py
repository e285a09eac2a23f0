"""Synchronous steps: the merge buffer, duplicates, stale and future pushes, timeouts, aggregated pushes."""

from __future__ import annotations

import threading

import grpc
import numpy as np
import pytest
import rpc_helpers as rpc
from grpc_health.v1 import health_pb2

from optserve.protos import optserve_pb2 as pb
from optserve.server import optimizers
from optserve.server.app import start_server

ADAM = {"class_name": "Adam", "config": {"learning_rate": 0.01}}


class Push(threading.Thread):
    """One worker's push on its own thread (it blocks until the step completes)."""

    def __init__(self, stub, model_id, worker, step, gradients, **options):
        super().__init__(daemon=True)
        self.args = (stub, model_id, worker, step, gradients)
        self.options = options
        self.result = self.values = self.error = None
        self.start()

    def run(self):
        try:
            self.result, self.values = rpc.push(*self.args, **self.options)
        except grpc.RpcError as error:
            self.error = error

    def outcome(self, timeout=10.0):
        self.join(timeout)
        assert not self.is_alive(), "push did not return"
        return self


def _initial():
    rng = np.random.default_rng(1)
    return {
        "kernel": rng.standard_normal((20, 10)).astype(np.float32),
        "bias": rng.standard_normal(10).astype(np.float32),
    }


def _gradients(seed, exact=False):
    rng = np.random.default_rng(seed)
    grads = {"kernel": rng.standard_normal((20, 10)), "bias": rng.standard_normal(10)}
    if exact:  # multiples of 1/64 below 4: float32 sums of a few of them are exact in any order
        grads = {k: np.round(v * 64) / 64 for k, v in grads.items()}
    return {k: v.astype(np.float32) for k, v in grads.items()}


def _summed(pushes):
    total = {name: np.array(value, copy=True) for name, value in pushes[0].items()}
    for grads in pushes[1:]:
        for name, value in grads.items():
            total[name] += value
    return total


def _reference(config, initial, steps):
    """The engine applying each step's summed gradients directly, in one process."""
    engine = optimizers.deserialize(config)
    engine.build(initial)
    for pushes in steps:
        engine.apply(_summed(pushes))
    return engine.read_variables()


def test_four_workers_give_the_engine_result_on_the_summed_gradients(stub):
    rpc.create_model(stub, "job", _initial(), ADAM, num_workers=4)
    steps = [[_gradients(10 * step + worker) for worker in range(4)] for step in range(3)]
    for step, pushes in enumerate(steps):
        threads = []
        for worker, grads in enumerate(pushes):
            threads.append(Push(stub, "job", worker, step, grads, return_variables=True))
            if worker < 3:  # arrival order = worker order, so the float sum order is known
                rpc.wait_until(lambda worker=worker: rpc.waiting_workers(stub, "job") == list(range(worker + 1)))
        outcomes = [t.outcome() for t in threads]
        assert all(o.error is None for o in outcomes), [o.error for o in outcomes]
        for o in outcomes:
            assert (o.result.step, o.result.iterations, list(o.result.contributors)) == (
                step + 1,
                step + 1,
                [0, 1, 2, 3],
            )
            assert not o.result.duplicate
    expected = _reference(ADAM, _initial(), steps)
    for o in outcomes:
        for name in expected:
            np.testing.assert_array_equal(o.values[name], expected[name])
    _, pulled = rpc.pull(stub, "job")
    for name in expected:
        np.testing.assert_array_equal(pulled[name], expected[name])


def test_concurrent_workers_merge_every_push_once(stub):
    rpc.create_model(stub, "job", _initial(), ADAM, num_workers=4)
    steps = [[_gradients(100 + 10 * step + worker, exact=True) for worker in range(4)] for step in range(5)]

    def worker_loop(worker, failures):
        for step in range(len(steps)):
            try:
                rpc.push(stub, "job", worker, step, steps[step][worker])
            except grpc.RpcError as error:  # pragma: no cover - reported below
                failures.append(error)

    failures = []
    threads = [threading.Thread(target=worker_loop, args=(w, failures)) for w in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert not failures
    state, values = rpc.pull(stub, "job")
    assert (state.step, state.iterations) == (5, 5)
    expected = _reference(ADAM, _initial(), steps)
    for name in expected:
        np.testing.assert_array_equal(values[name], expected[name])


def test_a_duplicate_push_of_a_pending_step_waits_and_is_not_applied_twice(stub):
    rpc.create_model(stub, "job", _initial(), ADAM, num_workers=2)
    g0, g1 = _gradients(1, exact=True), _gradients(2, exact=True)
    first = Push(stub, "job", 0, 0, g0)
    rpc.wait_until(lambda: rpc.waiting_workers(stub, "job") == [0])
    retry = Push(stub, "job", 0, 0, g0, return_variables=True)
    other = Push(stub, "job", 1, 0, g1)
    first, retry, other = first.outcome(), retry.outcome(), other.outcome()
    assert first.error is None and retry.error is None and other.error is None
    assert not first.result.duplicate and retry.result.duplicate and not other.result.duplicate
    assert retry.result.iterations == 1 and list(retry.result.contributors) == [0, 1]
    expected = _reference(ADAM, _initial(), [[g0, g1]])
    np.testing.assert_array_equal(retry.values["kernel"], expected["kernel"])


def test_a_duplicate_push_of_a_completed_step_is_answered_from_the_record(stub):
    rpc.create_model(stub, "job", _initial(), ADAM, num_workers=2)
    g0, g1 = _gradients(1), _gradients(2)
    Push(stub, "job", 0, 0, g0), Push(stub, "job", 1, 0, g1)
    rpc.wait_until(lambda: rpc.pull(stub, "job")[0].step == 1)
    result, values = rpc.push(stub, "job", 1, 0, g1, return_variables=True)
    assert result.duplicate and (result.step, result.iterations) == (1, 1)
    assert list(result.contributors) == [0, 1]
    np.testing.assert_array_equal(values["bias"], rpc.pull(stub, "job")[1]["bias"])
    assert rpc.pull(stub, "job")[0].iterations == 1


def test_a_push_for_a_future_step_names_the_current_step(stub):
    rpc.create_model(stub, "job", _initial(), ADAM, num_workers=2)
    before = rpc.snapshot(stub, "job")
    error = rpc.rpc_error(rpc.push, stub, "job", 1, 3, _gradients(1))
    assert error.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "current step is 0" in error.details() and "push step 0" in error.details()
    assert rpc.trailing(error)["optserve-current-step"] == "0"
    rpc.assert_same_snapshot(before, rpc.snapshot(stub, "job"))


def test_a_missing_worker_ends_the_step_with_aborted_sync_timeout(stub):
    rpc.create_model(stub, "job", _initial(), ADAM, num_workers=2, sync_timeout_s=0.5)
    before = rpc.snapshot(stub, "job")
    error = Push(stub, "job", 0, 0, _gradients(0)).outcome().error
    # ABORTED, not DEADLINE_EXCEEDED: the server's step timeout is told apart from the caller's deadline.
    assert error is not None and error.code() == grpc.StatusCode.ABORTED
    assert rpc.trailing(error)["optserve-reason"] == "sync-timeout"
    assert "workers [1]" in error.details() and "nothing was applied" in error.details()
    assert rpc.trailing(error)["optserve-missing-workers"] == "1"
    assert rpc.trailing(error)["optserve-current-step"] == "0"
    rpc.assert_same_snapshot(before, rpc.snapshot(stub, "job"))
    assert rpc.waiting_workers(stub, "job") == []

    # The buffer was discarded: a full retry of step 0 applies only the new pushes.
    steps = [[_gradients(10, exact=True), _gradients(11, exact=True)]]
    retries = [Push(stub, "job", w, 0, steps[0][w]) for w in range(2)]
    assert all(r.outcome().error is None for r in retries)
    _, values = rpc.pull(stub, "job")
    np.testing.assert_array_equal(values["kernel"], _reference(ADAM, _initial(), steps)["kernel"])


def test_apply_partial_applies_the_pushes_that_arrived_and_says_who_was_missing(stub):
    rpc.create_model(stub, "job", _initial(), ADAM, num_workers=3, sync_timeout_s=0.8, timeout_policy=pb.APPLY_PARTIAL)
    g0, g1 = _gradients(1, exact=True), _gradients(2, exact=True)
    pushes = [Push(stub, "job", 0, 0, g0)]
    rpc.wait_until(lambda: rpc.waiting_workers(stub, "job") == [0])
    pushes.append(Push(stub, "job", 1, 0, g1, return_variables=True))
    outcomes = [p.outcome() for p in pushes]
    for o in outcomes:
        assert o.error is None
        assert list(o.result.contributors) == [0, 1] and list(o.result.missing_workers) == [2]
        assert (o.result.step, o.result.iterations) == (1, 1)
    expected = _reference(ADAM, _initial(), [[g0, g1]])
    np.testing.assert_array_equal(outcomes[1].values["kernel"], expected["kernel"])

    # The late worker's push for the finished step is stale; it is told the current step.
    before = rpc.snapshot(stub, "job")
    error = rpc.rpc_error(rpc.push, stub, "job", 2, 0, _gradients(3))
    assert error.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "current step is 1" in error.details()
    assert rpc.trailing(error)["optserve-current-step"] == "1"
    rpc.assert_same_snapshot(before, rpc.snapshot(stub, "job"))


def test_the_server_default_timeout_applies_when_the_model_sets_none():
    with start_server(device="cpu", sync_timeout_s=0.3) as server:
        channel, stub = rpc.connect(server.address)
        with channel:
            created = rpc.create_model(stub, "job", _initial(), ADAM, num_workers=2)
            assert created.model.spec.sync_timeout_s == pytest.approx(0.3)
            error = Push(stub, "job", 0, 0, _gradients(1)).outcome().error
            assert error.code() == grpc.StatusCode.ABORTED


def test_aggregated_pushes_apply_once_per_step(stub):
    rpc.create_model(stub, "job", _initial(), ADAM, num_workers=2)
    g = _gradients(5)
    first, _ = rpc.push(stub, "job", 1, 0, g, aggregated=True)
    assert (first.step, first.iterations, first.duplicate, list(first.contributors)) == (1, 1, False, [1])
    second, _ = rpc.push(stub, "job", 0, 0, g, aggregated=True)
    assert second.duplicate and second.iterations == 1
    _, values = rpc.pull(stub, "job")
    np.testing.assert_array_equal(values["kernel"], _reference(ADAM, _initial(), [[g]])["kernel"])

    # Mixing a per-worker push and an aggregated one in one step is refused.
    parked = Push(stub, "job", 0, 1, g)
    rpc.wait_until(lambda: rpc.waiting_workers(stub, "job") == [0])
    error = rpc.rpc_error(rpc.push, stub, "job", 1, 1, g, aggregated=True)
    assert error.code() == grpc.StatusCode.FAILED_PRECONDITION and "aggregated" in error.details()
    assert rpc.waiting_workers(stub, "job") == [0]
    rpc.push(stub, "job", 1, 1, g)
    assert parked.outcome().error is None


def test_health_and_reads_answer_while_workers_are_parked(stub, address):
    rpc.create_model(stub, "job", _initial(), ADAM, num_workers=4)
    rpc.create_model(stub, "other", _initial(), ADAM)
    parked = [Push(stub, "job", w, 0, _gradients(w)) for w in range(3)]
    rpc.wait_until(lambda: rpc.waiting_workers(stub, "job") == [0, 1, 2])
    for step in range(3):
        assert rpc.health_status(address) == health_pb2.HealthCheckResponse.SERVING
        assert rpc.health_status(address, rpc.SERVICE) == health_pb2.HealthCheckResponse.SERVING
        state, tensors = rpc.get_weights(stub, "job", include_variables=True)
        assert state.step == 0 and ("kernel", "velocity") in tensors
        assert rpc.push(stub, "other", 0, step, _gradients(9))[0].step == step + 1
    assert all(p.is_alive() for p in parked)
    rpc.push(stub, "job", 3, 0, _gradients(3))
    assert all(p.outcome().error is None for p in parked)


def test_deleting_a_model_releases_its_parked_workers(stub):
    rpc.create_model(stub, "job", _initial(), ADAM, num_workers=2)
    parked = Push(stub, "job", 0, 0, _gradients(1))
    rpc.wait_until(lambda: rpc.waiting_workers(stub, "job") == [0])
    assert stub.DeleteModel(pb.DeleteModelRequest(model_id="job"), timeout=5).deleted
    error = parked.outcome().error
    assert error.code() == grpc.StatusCode.FAILED_PRECONDITION and "deleted" in error.details()


def test_rewinding_the_step_forgets_the_pushes_seen_for_the_reused_step_numbers(stub):
    rpc.create_model(stub, "job", _initial(), ADAM)
    rpc.push(stub, "job", 0, 0, _gradients(1))
    state, _ = rpc.get_weights(stub, "job")
    state.step = 0
    rpc.set_weights(stub, "job", state=state)
    result, _ = rpc.push(stub, "job", 0, 0, _gradients(2))
    assert not result.duplicate and (result.step, result.iterations) == (1, 2)


def test_a_worker_that_hung_up_while_parked_can_retry_its_push(stub):
    rpc.create_model(stub, "job", _initial(), ADAM, num_workers=2)
    g0, g1 = _gradients(1, exact=True), _gradients(2, exact=True)
    impatient = Push(stub, "job", 0, 0, g0, timeout=1.0)  # the client gives up waiting
    rpc.wait_until(lambda: rpc.waiting_workers(stub, "job") == [0])
    assert impatient.outcome().error.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert rpc.waiting_workers(stub, "job") == [0]  # its gradients stay merged
    retry = Push(stub, "job", 0, 0, g0, return_variables=True)
    rpc.push(stub, "job", 1, 0, g1)
    retry = retry.outcome()
    assert retry.error is None and retry.result.duplicate and retry.result.iterations == 1
    expected = _reference(ADAM, _initial(), [[g0, g1]])
    np.testing.assert_array_equal(retry.values["kernel"], expected["kernel"])


def test_the_last_push_of_a_step_is_summed_by_the_update_itself(stub, monkeypatch):
    """The step's last push goes to the update as addends (no separate summing pass) and the
    result is still the arrival-order sum; with skip_step the sum is looked at first, so the
    pushes are summed before the update."""
    from optserve.server.optimizers.base import Optimizer

    calls = []
    apply = Optimizer.apply

    def spy(self, grads, **options):
        calls.append(sorted(options.get("addends") or ()))
        return apply(self, grads, **options)

    monkeypatch.setattr(Optimizer, "apply", spy)
    rpc.create_model(stub, "job", _initial(), ADAM, num_workers=3)
    steps = [[_gradients(40 + worker) for worker in range(3)]]
    threads = []
    for worker, grads in enumerate(steps[0]):
        threads.append(Push(stub, "job", worker, 0, grads, return_variables=True))
        if worker < 2:
            rpc.wait_until(lambda worker=worker: rpc.waiting_workers(stub, "job") == list(range(worker + 1)))
    outcomes = [t.outcome() for t in threads]
    assert all(o.error is None for o in outcomes), [o.error for o in outcomes]
    assert calls == [["bias", "kernel"]]
    expected = _reference(ADAM, _initial(), steps)
    for o in outcomes:
        for name in expected:
            np.testing.assert_array_equal(o.values[name], expected[name])

    calls.clear()
    rpc.create_model(stub, "skipping", _initial(), ADAM, num_workers=2, non_finite_policy=pb.NON_FINITE_SKIP_STEP)
    threads = [Push(stub, "skipping", 0, 0, _gradients(1))]
    rpc.wait_until(lambda: rpc.waiting_workers(stub, "skipping") == [0])
    threads.append(Push(stub, "skipping", 1, 0, _gradients(2)))
    assert all(t.outcome().error is None for t in threads)
    assert calls == [[]]
