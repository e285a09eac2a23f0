"""global_clipnorm over 2 and 3 real shards equals one server, bit for bit (two-phase steps)."""

from __future__ import annotations

import threading
import time
import uuid

import numpy as np
import pytest

from optserve.client import Client, FailedPreconditionError, InvalidArgumentError
from optserve.client.sharded import plan_for_optimizer
from optserve.client.two_phase import commit_step, join_terms, push_held
from optserve.protos import optserve_pb2 as pb

STEPS = 4


@pytest.fixture(scope="module")
def addresses():
    from optserve.server.app import start_server

    servers = [start_server(host="127.0.0.1", port=0, device="cpu") for _ in range(4)]
    try:
        yield [server.address for server in servers]
    finally:
        for server in servers:
            server.stop()


def _model_id() -> str:
    return f"g-{uuid.uuid4().hex[:8]}"


def _variables(mixed_dtypes: bool = False) -> dict:
    rng = np.random.default_rng(0)
    variables = {
        "embedding/embeddings": rng.standard_normal((300, 64)).astype(np.float32),
        "dense/kernel": (rng.standard_normal((64, 48)) * 0.05).astype(np.float32),
        "dense/bias": np.zeros(48, np.float32),
        "norm/gamma": np.ones(48, np.float32),
        "output/kernel": (rng.standard_normal((48, 10)) * 0.05).astype(np.float32),
        "output/bias": np.zeros(10, np.float32),
    }
    if mixed_dtypes:
        variables["output/bias"] = variables["output/bias"].astype(np.float64)
    return variables


def _gradients(variables: dict, step: int, worker: int = 0) -> dict:
    rng = np.random.default_rng((step, worker))
    return {name: rng.standard_normal(v.shape).astype(v.dtype) for name, v in variables.items()}


def _final(client, model_id: str) -> dict:
    weights = client.get_weights(model_id, include_variables=True)
    return {"variables": weights.variables, "slots": weights.slots, "iterations": weights.iterations}


def _assert_identical(actual: dict, expected: dict) -> None:
    assert actual["iterations"] == expected["iterations"]
    assert actual["variables"].keys() == expected["variables"].keys()
    for name, value in expected["variables"].items():
        np.testing.assert_array_equal(actual["variables"][name], value, err_msg=name)
        assert actual["variables"][name].dtype == value.dtype
        for slot, array in expected["slots"][name].items():
            np.testing.assert_array_equal(actual["slots"][name][slot], array, err_msg=f"{name}:{slot}")


def _run(addresses, optimizer, *, workers: int = 1, mode: str = "sync", mixed: bool = False) -> dict:
    """Train STEPS steps; with several workers each pushes every step (sync) or in turn (async)."""
    variables = _variables(mixed)
    model_id = _model_id()
    clients = [Client(addresses) for _ in range(workers)]
    try:
        clients[0].create_model(model_id, optimizer, variables, num_workers=workers, mode=mode)
        for step in range(STEPS):
            if mode == "async" or workers == 1:
                for worker, client in enumerate(clients):
                    client.push(model_id, _gradients(variables, step, worker), worker_index=worker)
                continue
            errors: list = []

            def push(worker: int, s: int = step, errors: list = errors) -> None:
                try:
                    clients[worker].push(model_id, _gradients(variables, s, worker), worker_index=worker)
                except Exception as error:  # noqa: BLE001 - reported below
                    errors.append(error)

            threads = [threading.Thread(target=push, args=(w,)) for w in range(workers)]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join(60)
            assert not errors, errors
        return _final(clients[0], model_id)
    finally:
        for client in clients:
            client.close()


ADAM = {"class_name": "Adam", "config": {"learning_rate": 0.01, "global_clipnorm": 1.0}}
LAMB_ACCUMULATING = {
    "class_name": "Lamb",
    "config": {"learning_rate": 0.01, "global_clipnorm": 0.5, "gradient_accumulation_steps": 2},
}
SGD_SCALED = {
    "class_name": "SGD",
    "config": {"learning_rate": 0.1, "momentum": 0.9, "global_clipnorm": 2.0, "loss_scale_factor": 4.0},
}


@pytest.mark.parametrize("shards", [2, 3])
@pytest.mark.parametrize("optimizer", [ADAM, LAMB_ACCUMULATING, SGD_SCALED], ids=["adam", "lamb-accum", "sgd-scaled"])
def test_global_clipnorm_on_shards_equals_one_server(addresses, shards, optimizer):
    plan = plan_for_optimizer(_variables(), shards, optimizer)
    assert plan.split_variables() == [] and all(plan.shards)
    _assert_identical(_run(addresses[:shards], optimizer), _run(addresses[-1:], optimizer))


def test_mixed_dtypes_take_the_norm_in_the_common_dtype(addresses):
    _assert_identical(_run(addresses[:3], ADAM, mixed=True), _run(addresses[-1:], ADAM, mixed=True))


@pytest.mark.parametrize("optimizer", [ADAM, LAMB_ACCUMULATING], ids=["adam", "lamb-accum"])
def test_two_sync_workers_on_two_shards_equal_one_server(addresses, optimizer):
    _assert_identical(_run(addresses[:2], optimizer, workers=2), _run(addresses[-1:], optimizer, workers=2))


def test_async_workers_on_three_shards_equal_one_server(addresses):
    expected = _run(addresses[-1:], SGD_SCALED, workers=2, mode="async")
    _assert_identical(_run(addresses[:3], SGD_SCALED, workers=2, mode="async"), expected)


def test_without_global_clipnorm_nothing_is_held(addresses):
    model_id = _model_id()
    plain = {"class_name": "Adam", "config": {"learning_rate": 0.01}}
    with Client(addresses[:2]) as client:
        client.create_model(model_id, plain, _variables())
        piece = client.list_models(model_id)[0].shards[0].model_id
        grads = client._prepare_push(model_id, _gradients(_variables(), 0))[1][0]
        result, joint, _ = push_held(
            client.transports[0],
            piece,
            grads,
            worker_index=0,
            step=0,
            aggregated=False,
            return_variables=False,
            timeout=30,
        )
        assert joint is None and result.step == 1  # applied at once, as without the flag


def test_a_non_finite_gradient_on_one_shard_skips_the_step_on_every_shard(addresses):
    variables = _variables()
    runs = []
    for shards in (addresses[:2], addresses[-1:]):
        model_id = _model_id()
        with Client(shards) as client:
            client.create_model(model_id, ADAM, variables, non_finite_policy="skip_step")
            client.push(model_id, _gradients(variables, 0))
            poisoned = _gradients(variables, 1)
            poisoned["output/bias"][3] = np.inf
            result = client.push(model_id, poisoned)
            assert result.skipped_non_finite and "output/bias" in result.non_finite_variables
            client.push(model_id, _gradients(variables, 2))
            runs.append(_final(client, model_id))
    _assert_identical(*runs)


# ---------------------------------------------------------------------------- failures between the phases


def _held_on_every_shard(client, model_id: str, step: int, worker: int = 0):
    model, per_shard = client._prepare_push(model_id, _gradients(_variables(), step, worker))
    pushed = [
        push_held(
            client.transports[i],
            model.piece_model_id,
            per_shard[i],
            worker_index=worker,
            step=step,
            aggregated=False,
            return_variables=False,
            timeout=30,
        )
        for i in model.active_shards
    ]
    return model, pushed, join_terms(model_id, model.order, [joint for _, joint, _ in pushed], model.active_shards)


def test_a_commit_that_reached_one_shard_is_completed_by_pushing_again(addresses):
    expected = _run(addresses[-1:], ADAM)
    model_id = _model_id()
    with Client(addresses[:2]) as client:
        client.create_model(model_id, ADAM, _variables())
        model, pushed, terms = _held_on_every_shard(client, model_id, 0)
        assert all(joint.held for _, joint, _ in pushed)
        assert [result.step for result, _, _ in pushed] == [0, 0]  # nothing applied yet
        # The worker dies after committing on shard 0 only.
        commit_step(
            client.transports[0],
            model.piece_model_id,
            terms,
            worker_index=0,
            step=0,
            return_variables=False,
            timeout=30,
        )
        assert [s.step for s in client.list_models(model_id)[0].shards] == [1, 0]
    with Client(addresses[:2]) as restarted:  # a new worker process: adopts the lowest step, pushes it again
        for step in range(STEPS):
            result = restarted.push(model_id, _gradients(_variables(), step))
            assert result.step == step + 1
        _assert_identical(_final(restarted, model_id), expected)


def test_a_held_step_without_commit_is_dropped_and_pushed_again(addresses):
    model_id = _model_id()
    with Client(addresses[:2]) as client:
        client.create_model(model_id, ADAM, _variables(), sync_timeout_s=0.3)
        model, _, terms = _held_on_every_shard(client, model_id, 0)
        time.sleep(1.0)
        with pytest.raises(FailedPreconditionError, match="not held for its global norm"):
            commit_step(
                client.transports[1],
                model.piece_model_id,
                terms,
                worker_index=0,
                step=0,
                return_variables=False,
                timeout=30,
            )
        assert client.push(model_id, _gradients(_variables(), 0)).step == 1


def test_every_sync_worker_commits_and_only_the_first_applies(addresses):
    model_id = _model_id()
    with Client(addresses[:2]) as one, Client(addresses[:2]) as two:
        one.create_model(model_id, ADAM, _variables(), num_workers=2)
        model = one._resolve(model_id, 30)
        answers: dict = {}

        def push(client, worker):
            per_shard = client._prepare_push(model_id, _gradients(_variables(), 0, worker))[1]
            answers[worker] = [
                push_held(
                    client.transports[i],
                    model.piece_model_id,
                    per_shard[i],
                    worker_index=worker,
                    step=0,
                    aggregated=False,
                    return_variables=False,
                    timeout=30,
                )
                for i in model.active_shards
            ]

        threads = [threading.Thread(target=push, args=(c, w)) for w, c in enumerate((one, two))]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(60)
        joined = [join_terms(model_id, model.order, [j for _, j, _ in answers[w]], model.active_shards) for w in (0, 1)]
        assert joined[0] == joined[1]  # every worker computes the same joint terms
        first = commit_step(
            one.transports[0],
            model.piece_model_id,
            joined[0],
            worker_index=0,
            step=0,
            return_variables=False,
            timeout=30,
        )[0]
        again = commit_step(
            two.transports[0],
            model.piece_model_id,
            joined[1],
            worker_index=1,
            step=0,
            return_variables=False,
            timeout=30,
        )[0]
        assert (first.duplicate, again.duplicate, first.step, again.step) == (False, True, 1, 1)
        other = list(joined[0])
        other[0] = pb.NormTerm(name=other[0].name, dtype=other[0].dtype, sum_squares=other[0].sum_squares + 1)
        with pytest.raises(FailedPreconditionError, match="applied with other global norm terms"):
            commit_step(
                two.transports[0],
                model.piece_model_id,
                other,
                worker_index=1,
                step=0,
                return_variables=False,
                timeout=30,
            )


# ---------------------------------------------------------------------------- bad input


def test_commits_with_wrong_terms_are_refused_and_change_nothing(addresses):
    model_id = _model_id()
    with Client(addresses[:2]) as client:
        client.create_model(model_id, ADAM, _variables())
        model, pushed, terms = _held_on_every_shard(client, model_id, 0)
        transport, piece = client.transports[0], model.piece_model_id
        own = pushed[0][1].terms[0]
        tampered = [
            pb.NormTerm(name=t.name, dtype=t.dtype, sum_squares=np.nextafter(np.float32(t.sum_squares), np.inf))
            if t.name == own.name
            else t
            for t in terms
        ]
        wrong_dtype = [pb.NormTerm(name=t.name, dtype=pb.FLOAT64, sum_squares=t.sum_squares) for t in terms]
        cases = [
            ([], InvalidArgumentError, "carries no terms"),
            (tampered, InvalidArgumentError, f"does not carry this server's term for {own.name!r}"),
            (wrong_dtype, InvalidArgumentError, "does not carry this server's term"),
            ([t for t in terms if t.name != own.name], InvalidArgumentError, "the commit has none"),
            (list(terms) + [terms[0]], InvalidArgumentError, "more than once"),
            ([pb.NormTerm(name="x", dtype=pb.INT32, sum_squares=1.0)], InvalidArgumentError, "float32 or float64"),
        ]
        for bad, error, message in cases:
            with pytest.raises(error, match=message):
                commit_step(transport, piece, bad, worker_index=0, step=0, return_variables=False, timeout=30)
        with pytest.raises(FailedPreconditionError, match="current step is 0"):
            commit_step(transport, piece, terms, worker_index=0, step=5, return_variables=False, timeout=30)
        assert [s.step for s in client.list_models(model_id)[0].shards] == [0, 0]
        for index in model.active_shards:  # the right terms still commit
            commit_step(
                client.transports[index], piece, terms, worker_index=0, step=0, return_variables=False, timeout=30
            )
        assert [s.step for s in client.list_models(model_id)[0].shards] == [1, 1]


def test_set_weights_between_the_phases_voids_the_held_step(addresses):
    model_id = _model_id()
    with Client(addresses[:2]) as client:
        client.create_model(model_id, ADAM, _variables())
        model, _, terms = _held_on_every_shard(client, model_id, 0)
        client.set_weights(model_id, variables={"dense/bias": np.ones(48, np.float32)})
        with pytest.raises(FailedPreconditionError, match="state changed"):
            commit_step(
                client.transports[model.plan.shard_of("dense/bias")],
                model.piece_model_id,
                terms,
                worker_index=0,
                step=0,
                return_variables=False,
                timeout=30,
            )


def test_what_shards_cannot_compute_jointly_is_refused_at_creation(addresses):
    accumulating = {"class_name": "Adam", "config": {"global_clipnorm": 1.0, "gradient_accumulation_steps": 2}}
    loss_scaled = {"class_name": "LossScaleOptimizer", "config": {"inner_optimizer": {"class_name": "Adam"}}}
    with Client(addresses[:2]) as client:
        with pytest.raises(ValueError, match="needs mode 'sync' on several shards"):
            client.create_model(_model_id(), accumulating, _variables(), mode="async")
        with pytest.raises(ValueError, match="LossScaleOptimizer skips a step"):
            client.create_model(_model_id(), loss_scaled, _variables())


@pytest.mark.parametrize(
    "optimizer",
    [
        {"class_name": "Lamb", "config": {"learning_rate": 0.01}},
        {"class_name": "Adafactor", "config": {"learning_rate": 0.01}},
        {"class_name": "Muon", "config": {"learning_rate": 0.01}},
    ],
    ids=["lamb", "adafactor", "muon"],
)
def test_whole_variable_optimizers_keep_a_large_variable_whole(addresses, optimizer):
    big = {"big/kernel": np.ones((2048, 512), np.float32), "small/kernel": np.ones((16, 16), np.float32)}
    assert plan_for_optimizer(big, 3, optimizer).split_variables() == []
    assert plan_for_optimizer(big, 3, {"class_name": "Adam"}).split_variables() == ["big/kernel"]
