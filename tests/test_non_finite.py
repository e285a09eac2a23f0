"""Non-finite gradients: reject (the default), skip_step and allow, per model."""

from __future__ import annotations

import threading

import grpc
import numpy as np
import pytest
import rpc_helpers as rpc

from optserve.client.client import Client, InvalidArgumentError
from optserve.protos import optserve_pb2 as pb

ADAM = {"class_name": "Adam", "config": {"learning_rate": 0.1}}


def _initial():
    return {"w": np.arange(6, dtype=np.float32).reshape(2, 3), "b": np.ones(3, np.float32)}


def _grads(poison=None):
    grads = {"w": np.full((2, 3), 0.5, np.float32), "b": np.full(3, 0.25, np.float32)}
    if poison is not None:
        grads["b"][1] = poison
    return grads


def _create(stub, policy=None, **options):
    spec_options = {} if policy is None else {"non_finite_policy": policy}
    spec = pb.ModelSpec(
        model_id="job",
        optimizer_config_json=__import__("json").dumps(ADAM),
        num_workers=options.get("num_workers", 1),
        sync_timeout_s=30,
        **spec_options,
    )

    def requests():
        yield pb.CreateModelRequest(spec=spec)
        for name, value in _initial().items():
            yield pb.CreateModelRequest(variables=list(rpc.codec.encode(name, value)))

    return stub.CreateModel(requests(), timeout=10)


@pytest.mark.parametrize("poison", [np.nan, np.inf, -np.inf])
def test_reject_is_the_default_and_names_the_worker_and_variable(stub, poison):
    created = _create(stub)
    assert created.model.spec.non_finite_policy == pb.NON_FINITE_REJECT
    before = rpc.snapshot(stub, "job")
    error = rpc.rpc_error(rpc.push, stub, "job", 0, 0, _grads(poison))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "Worker 0" in error.details() and "'b'" in error.details()
    assert rpc.trailing(error)["optserve-non-finite-variables"] == "b"
    rpc.assert_same_snapshot(before, rpc.snapshot(stub, "job"))
    assert rpc.push(stub, "job", 0, 0, _grads())[0].step == 1  # a finite push goes on


def test_a_rejected_push_in_a_sync_step_leaves_the_step_waiting_for_a_finite_one(stub):
    _create(stub, pb.NON_FINITE_REJECT, num_workers=2)
    outcome = {}
    parked = threading.Thread(target=lambda: outcome.update(r=rpc.push(stub, "job", 0, 0, _grads())[0]))
    parked.start()
    rpc.wait_until(lambda: rpc.waiting_workers(stub, "job") == [0])
    error = rpc.rpc_error(rpc.push, stub, "job", 1, 0, _grads(np.nan))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT and "Worker 1" in error.details()
    assert rpc.waiting_workers(stub, "job") == [0]  # nothing of it was summed
    result, values = rpc.push(stub, "job", 1, 0, _grads(), return_variables=True)
    parked.join(10)
    assert result.step == outcome["r"].step == 1 and list(result.contributors) == [0, 1]
    assert np.isfinite(values["b"]).all()


def test_skip_step_takes_the_step_without_an_update(stub):
    _create(stub, pb.NON_FINITE_SKIP_STEP, num_workers=2)
    before = rpc.snapshot(stub, "job")
    results = {}
    threads = [
        threading.Thread(
            target=lambda w=w: results.update({w: rpc.push(stub, "job", w, 0, _grads(np.nan if w == 1 else None))[0]})
        )
        for w in range(2)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(10)
    for result in results.values():
        assert result.skipped_non_finite and list(result.non_finite_variables) == ["b"]
        assert (result.step, result.iterations) == (1, 0)
    state, tensors = rpc.snapshot(stub, "job")
    assert (state.step, state.iterations) == (1, 0)
    rpc.assert_same_snapshot((before[0], before[1]), (before[0], tensors))  # variables and slots as they were
    # The next finite step is applied as usual.
    assert not rpc.push(stub, "job", 0, 1, _grads(), aggregated=True)[0].skipped_non_finite


def test_allow_applies_whatever_arrives(stub):
    _create(stub, pb.NON_FINITE_ALLOW)
    result, values = rpc.push(stub, "job", 0, 0, _grads(np.nan), return_variables=True)
    assert not result.skipped_non_finite and result.iterations == 1
    assert np.isnan(values["b"][1])


def test_the_policy_is_part_of_the_spec_a_joining_worker_must_match(stub):
    _create(stub, pb.NON_FINITE_SKIP_STEP)
    error = rpc.rpc_error(_create, stub, pb.NON_FINITE_ALLOW)
    assert error.code() == grpc.StatusCode.ALREADY_EXISTS and "non_finite_policy" in error.details()


def test_the_client_passes_the_policy_through(address):
    with Client(address) as client:
        client.create_model("job", ADAM, _initial(), non_finite_policy="skip_step")
        result = client.push("job", _grads(np.inf))
        assert (result.step, result.iterations) == (1, 0)
        client.create_model("strict", ADAM, _initial())
        with pytest.raises(InvalidArgumentError, match="NaN or infinite"):
            client.push("strict", _grads(np.nan))
        with pytest.raises(ValueError, match="non_finite_policy"):
            client.create_model("bad", ADAM, _initial(), non_finite_policy="ignore")


LOSS_SCALED_ADAM = {
    "class_name": "LossScaleOptimizer",
    "config": {"inner_optimizer": ADAM, "initial_scale": 8.0, "dynamic_growth_steps": 2},
}


def test_a_loss_scale_optimizer_lets_non_finite_gradients_through_by_default(address):
    """It exists to see them: it skips their step and halves its scale, as Keras does."""
    with Client(address) as client:
        client.create_model("scaled", LOSS_SCALED_ADAM, _initial())
        before = client.get_weights("scaled", include_variables=True)
        result = client.push("scaled", _grads(poison=np.inf))
        after = client.get_weights("scaled", include_variables=True)
        assert result.step == 1 and after.iterations == before.iterations  # the step was skipped
        assert client.list_models("scaled")[0].scalars["dynamic_scale"] == 4.0
        with pytest.raises(InvalidArgumentError, match="LossScaleOptimizer"):
            client.create_model("strict", LOSS_SCALED_ADAM, _initial(), non_finite_policy="reject")
        assert [m.model_id for m in client.list_models()] == ["scaled"]


def test_the_finiteness_check_is_exact_where_squares_overflow():
    from optserve.server.model import non_finite_names

    huge = np.full(1000, 3e38, np.float32)  # finite, but their squares overflow
    nan, negative_infinity = np.ones(1000, np.float32), np.ones(1000, np.float64)
    nan[999], negative_infinity[0] = np.nan, -np.inf
    huge_with_infinity = huge.copy()
    huge_with_infinity[500] = np.inf
    found = non_finite_names({"huge": huge, "nan": nan, "-inf": negative_infinity, "both": huge_with_infinity})
    assert found == ["nan", "-inf", "both"]


@pytest.mark.parametrize("helpers", [1, 0])  # a pool with a free thread, and one whose thread never comes
def test_a_large_push_is_checked_in_parallel_pieces_with_the_same_answer(helpers):
    import concurrent.futures
    import threading

    from optserve.server.finite import PARALLEL_CHECK_BYTES, non_finite_names

    size = PARALLEL_CHECK_BYTES // 4
    clean, late_nan, huge = np.ones(size, np.float32), np.ones(size, np.float32), np.full(size, 3e38, np.float32)
    late_nan[-1] = np.nan  # in the last piece
    gradients = {
        "clean": clean,
        "late-nan": late_nan,
        "huge": huge,
        "ints": np.arange(10),
        "tiny-inf": np.array([np.inf]),
    }
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        blocker = threading.Event()
        if not helpers:
            pool.submit(blocker.wait)  # the pool's one thread is busy: its helper stays queued
        found = non_finite_names(gradients, pool)
        blocker.set()
    assert found == ["late-nan", "tiny-inf"]
