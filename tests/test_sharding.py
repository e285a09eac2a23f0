"""A model sharded over 2 or 3 real servers trains exactly like on one (client/sharded.py)."""

from __future__ import annotations

import concurrent.futures
import inspect as pyinspect
import json
import uuid

import numpy as np
import pytest

from optserve.client import (
    AlreadyExistsError,
    Client,
    FailedPreconditionError,
    InvalidArgumentError,
    NotFoundError,
    demo,
    inspect,
)
from optserve.client.sharded import ShardedClient, ShardedModelInfo, plan_for_optimizer

ADAM = {"class_name": "Adam", "config": {"learning_rate": 0.01}}
NADAM_SCHEDULED = {
    "class_name": "Nadam",
    "config": {
        "learning_rate": {
            "class_name": "ExponentialDecay",
            "config": {"initial_learning_rate": 0.02, "decay_steps": 2, "decay_rate": 0.5},
        }
    },
}
STEPS = 4


@pytest.fixture(scope="module")
def addresses():
    from optserve.server.app import start_server

    servers = [start_server(host="127.0.0.1", port=0, device="cpu") for _ in range(3)]
    try:
        yield [server.address for server in servers]
    finally:
        for server in servers:
            server.stop()


def _model_id() -> str:
    return f"m-{uuid.uuid4().hex[:8]}"


def _variables() -> dict:
    """A small text model: the embedding dominates (3.6 MB, split over the shards), then kernels, biases."""
    rng = np.random.default_rng(0)
    return {
        "embedding/embeddings": rng.standard_normal((1500, 600)).astype(np.float32),
        "dense/kernel": (rng.standard_normal((600, 256)) * 0.05).astype(np.float32),
        "dense/bias": np.zeros(256, np.float32),
        "layer_norm/gamma": np.ones(256, np.float32),
        "layer_norm/beta": np.zeros(256, np.float32),
        "output/kernel": (rng.standard_normal((256, 10)) * 0.05).astype(np.float32),
        "output/bias": np.zeros(10, np.float32),
    }


def _gradients(step: int, worker: int = 0) -> dict:
    rng = np.random.default_rng((step, worker))
    return {name: rng.standard_normal(value.shape).astype(np.float32) for name, value in _variables().items()}


def _train(client: Client, model_id: str, optimizer, steps: int = STEPS, **create) -> dict:
    client.create_model(model_id, optimizer, _variables(), **create)
    history = []
    for step in range(steps):
        result, values = client.push_pull(model_id, _gradients(step))
        history.append((result.step, result.iterations, result.learning_rate, values))
    return {"history": history, "weights": client.get_weights(model_id, include_variables=True)}


def _assert_same_training(actual: dict, expected: dict) -> None:
    for (step, iterations, rate, values), (step_1, iterations_1, rate_1, values_1) in zip(
        actual["history"], expected["history"]
    ):
        assert (step, iterations, rate) == (step_1, iterations_1, rate_1)
        assert list(values) == list(values_1)
        for name in values_1:
            np.testing.assert_allclose(values[name], values_1[name], rtol=1e-6, atol=1e-7, err_msg=name)
    weights, weights_1 = actual["weights"], expected["weights"]
    assert (weights.iterations, weights.step, weights.scalars) == (
        weights_1.iterations,
        weights_1.step,
        weights_1.scalars,
    )
    as_list, as_list_1 = weights.as_list(), weights_1.as_list()
    assert len(as_list) == len(as_list_1)
    for array, array_1 in zip(as_list, as_list_1):
        assert array.shape == array_1.shape and array.dtype == array_1.dtype
        np.testing.assert_allclose(array, array_1, rtol=1e-6, atol=1e-7)
    assert list(weights.variables) == list(weights_1.variables) == list(_variables())


_one_shard_runs: dict[str, dict] = {}


def _one_shard(addresses, name: str, optimizer) -> dict:
    if name not in _one_shard_runs:
        with Client(addresses[0]) as client:
            _one_shard_runs[name] = _train(client, _model_id(), optimizer)
    return _one_shard_runs[name]


# ---------------------------------------------------------------------------- the address decides the client


def test_several_addresses_make_a_sharded_client():
    for address in ("127.0.0.1:1,127.0.0.1:2", ["127.0.0.1:1", "127.0.0.1:2"], " 127.0.0.1:1 , 127.0.0.1:2 "):
        with Client(address) as client:
            assert isinstance(client, ShardedClient) and isinstance(client, Client)
            assert client.addresses == ["127.0.0.1:1", "127.0.0.1:2"]
            assert client.address == "127.0.0.1:1,127.0.0.1:2"
    with Client(["127.0.0.1:1"]) as client:
        assert type(client) is Client
    with pytest.raises(ValueError, match="listed once"):
        Client("127.0.0.1:1,127.0.0.1:1")
    with pytest.raises(ValueError, match="host:port"):
        Client("127.0.0.1:1,nowhere")


def test_the_sharded_client_offers_the_client_api_with_the_same_signatures():
    def api(cls):
        return {
            name: pyinspect.signature(member)
            for name, member in pyinspect.getmembers(cls, callable)
            if not name.startswith("_")
        }

    client_api, sharded_api = api(Client), api(ShardedClient)
    assert set(client_api) <= set(sharded_api), set(client_api) - set(sharded_api)
    differing = {
        name: (client_api[name], sharded_api[name]) for name in client_api if client_api[name] != sharded_api[name]
    }
    assert not differing
    assert pyinspect.signature(Client.__init__) == pyinspect.signature(ShardedClient.__init__)
    assert {"push", "pull", "create_model", "get_weights", "set_weights"} <= set(client_api)


# ---------------------------------------------------------------------------- same numbers as one shard


@pytest.mark.parametrize("num_shards", [2, 3])
@pytest.mark.parametrize("name, optimizer", [("adam", ADAM), ("nadam+schedule", NADAM_SCHEDULED)])
def test_sharded_training_equals_one_shard(addresses, num_shards, name, optimizer):
    expected = _one_shard(addresses, name, optimizer)
    with Client(addresses[:num_shards]) as client:
        model_id = _model_id()
        actual = _train(client, model_id, optimizer)
        info = client.list_models(model_id)[0]
    assert info.plan.split_variables() == ["embedding/embeddings"]
    assert len({shard for shard, _ in info.plan.locate("embedding/embeddings")}) == min(num_shards, 3)
    assert info.plan.imbalance() <= 1.3
    _assert_same_training(actual, expected)
    if name.startswith("nadam"):
        assert actual["weights"].scalars["u_product"] != 1.0  # the scalar moved, identically on every shard


def test_two_workers_on_two_shards_equal_one_worker_on_the_summed_gradient(addresses):
    model_id = _model_id()
    with Client(addresses[:2], timeout=60) as client:
        client.create_model(model_id, ADAM, _variables(), num_workers=2, sync_timeout_s=30.0)
        with concurrent.futures.ThreadPoolExecutor(2) as pool:  # both workers share one client
            for step in range(3):
                futures = [
                    pool.submit(client.push_pull, model_id, _gradients(step, worker), worker_index=worker)
                    for worker in (0, 1)
                ]
                answers = [future.result(timeout=60) for future in futures]
                assert [result.contributors for result, _ in answers] == [[0, 1], [0, 1]]
        _, sharded = client.pull(model_id)
    with Client(addresses[2]) as single:
        reference = _model_id()
        single.create_model(reference, ADAM, _variables())
        for step in range(3):
            summed = {
                name: g0 + g1 for (name, g0), g1 in zip(_gradients(step, 0).items(), _gradients(step, 1).values())
            }
            result, values = single.push_pull(reference, summed)
    assert result.step == 3
    for name in values:
        np.testing.assert_allclose(sharded[name], values[name], rtol=1e-6, atol=1e-7, err_msg=name)


def test_async_workers_on_two_shards(addresses):
    model_id = _model_id()
    with Client(addresses[:2]) as client:
        client.create_model(model_id, ADAM, _variables(), num_workers=2, mode="async")
        with concurrent.futures.ThreadPoolExecutor(2) as pool:
            futures = [
                pool.submit(
                    lambda w: [client.push(model_id, _gradients(s, w), worker_index=w) for s in range(3)], worker
                )
                for worker in (0, 1)
            ]
            for future in futures:
                future.result(timeout=60)
        info = client.list_models(model_id)[0]
        assert [(shard.step, shard.iterations) for shard in info.shards] == [(6, 6), (6, 6)]


def test_clipnorm_keeps_variables_whole_and_matches_one_shard(addresses):
    clipped = {"class_name": "Adam", "config": {"learning_rate": 0.01, "clipnorm": 1.0}}
    assert plan_for_optimizer(_variables(), 3, clipped).split_variables() == []
    expected = _one_shard(addresses, "adam+clipnorm", clipped)
    with Client(addresses) as client:
        model_id = _model_id()
        actual = _train(client, model_id, clipped)
        assert client.list_models(model_id)[0].plan.split_variables() == []
    _assert_same_training(actual, expected)


# ---------------------------------------------------------------------------- one plan for every worker


def test_every_client_finds_the_same_plan_and_order(addresses):
    model_id = _model_id()
    with Client(addresses) as first, Client(",".join(addresses)) as second, Client(addresses) as reader:
        created = first.create_model(model_id, ADAM, _variables())
        joined = second.create_model(model_id, ADAM, _variables())
        assert (created.created, joined.created) == (True, False)
        first.push(model_id, _gradients(0))
        attached = reader.list_models(model_id)[0]  # never saw the variables
        assert isinstance(attached, ShardedModelInfo) and attached.fingerprint == created.fingerprint
        plans = [created.plan, joined.plan, attached.plan]
        assert plans[0].to_dict() == plans[1].to_dict() == plans[2].to_dict()
        assert [v.name for v in attached.variables] == list(_variables())
        assert [v.shape for v in attached.variables] == [v.shape for v in _variables().values()]
        _, values = reader.pull(model_id)
        _, expected = first.pull(model_id)
        assert list(values) == list(expected)
        assert all(np.array_equal(values[name], expected[name]) for name in values)
        read = reader.get_weights(model_id).as_list()
        assert all(np.array_equal(a, b) for a, b in zip(read, first.get_weights(model_id).as_list()))
        assert reader.next_step(model_id) == 1


def test_a_worker_with_another_plan_cannot_join(addresses):
    model_id = _model_id()
    with Client(addresses[:2]) as client:
        client.create_model(model_id, ADAM, _variables())
        other = dict(_variables(), extra=np.zeros(3, np.float32))
        with pytest.raises(AlreadyExistsError, match="another placement"):
            client.create_model(model_id, ADAM, other)
    with Client(addresses[:3]) as three:  # another number of shards: another plan
        with pytest.raises(AlreadyExistsError, match="another placement"):
            three.create_model(model_id, ADAM, _variables())
    with Client(addresses[1::-1]) as swapped:  # the same servers in another order
        with pytest.raises(FailedPreconditionError, match="in the same order"):
            swapped.pull(model_id)
        with pytest.raises(AlreadyExistsError):
            swapped.create_model(model_id, ADAM, _variables())


def test_delete_removes_every_piece(addresses):
    model_id = _model_id()
    with Client(addresses) as client:
        client.create_model(model_id, ADAM, _variables())
        assert client.delete_model(model_id) is True
        assert client.delete_model(model_id) is False
        with pytest.raises(NotFoundError):
            client.pull(model_id)
    for address in addresses:
        with Client(address) as shard:
            assert not [m for m in shard.list_models() if m.model_id.startswith(model_id)]


# ---------------------------------------------------------------------------- state, steps and errors


def test_set_weights_and_weights_list_round_trip_through_split_slots(addresses):
    model_id = _model_id()
    with Client(addresses[:2]) as client:
        client.create_model(model_id, ADAM, _variables())
        client.push(model_id, _gradients(0))
        weights = client.get_weights(model_id)
        doubled = [weights.as_list()[0] + 5, *[2 * a for a in weights.as_list()[1:]]]
        state = client.set_weights_list(model_id, doubled)
        assert state.iterations == weights.iterations + 5
        again = client.get_weights(model_id).as_list()
        assert all(np.array_equal(a, b) for a, b in zip(again, doubled))
        new_embedding = np.full((1500, 600), 0.5, np.float32)
        client.set_weights(model_id, variables={"embedding/embeddings": new_embedding})
        assert np.array_equal(client.pull(model_id, ["embedding/embeddings"])[1]["embedding/embeddings"], new_embedding)
        before = client.pull(model_id, ["output/bias"])[1]["output/bias"]
        with pytest.raises(NotFoundError, match="no slot 'nope'"):
            client.set_weights(
                model_id,
                slots={"dense/bias": {"nope": np.zeros(256, np.float32)}},
                variables={"output/bias": np.ones(10, np.float32)},
            )
        assert np.array_equal(client.pull(model_id, ["output/bias"])[1]["output/bias"], before)  # nothing written


def test_a_push_is_checked_before_anything_is_sent(addresses):
    model_id = _model_id()
    with Client(addresses[:2]) as client:
        client.create_model(model_id, ADAM, _variables())
        with pytest.raises(NotFoundError, match="no variable"):
            client.push(model_id, {"nope": np.zeros(3, np.float32)})
        with pytest.raises(InvalidArgumentError, match="shape"):
            client.push(model_id, {"dense/bias": np.zeros(3, np.float32)})
        assert client.resync(model_id) == 0


def test_a_push_that_gives_a_shard_no_gradient(addresses):
    model_id = _model_id()
    with Client(addresses[:2]) as client:
        info = client.create_model(model_id, ADAM, _variables())
        only = info.plan.shards[1][0].var_name
        grads = {name: (g if name == only else None) for name, g in _gradients(0).items()}
        if client._counts_empty_push(0):  # the server counts an empty push as a step
            result = client.push(model_id, grads)
            assert (result.step, result.iterations) == (1, 1)
        else:
            with pytest.raises(InvalidArgumentError, match="no gradient for any variable on shards \\[0\\]"):
                client.push(model_id, grads)
            assert [s.step for s in client.list_models(model_id)[0].shards] == [0, 0]  # nothing was sent


def test_a_repeated_push_completes_a_step_some_shards_missed(addresses):
    model_id = _model_id()
    with Client(addresses[:2]) as client:
        info = client.create_model(model_id, ADAM, _variables())
        # Shard 0 applies step 0 on its own, as if the push to shard 1 had been lost.
        shard0_parts = {piece.part_name for piece in info.plan.shards[0]}
        parts = info.plan.split(_gradients(0))[0]
        with Client(addresses[0]) as shard0:  # straight to the first server, bypassing the plan
            shard0.push(f"{model_id}@{info.fingerprint}", {p: parts[p] for p in shard0_parts})
        assert client.resync(model_id) == 0  # the lowest step of the shards
        result = client.push(model_id, _gradients(0))
        assert (result.step, result.iterations, result.duplicate) == (1, 1, False)
        assert [s.step for s in client.list_models(model_id)[0].shards] == [1, 1]


# ---------------------------------------------------------------------------- inspect and demo


def test_inspect_shows_the_placement(addresses, capsys):
    model_id = _model_id()
    with Client(addresses) as client:
        client.create_model(model_id, ADAM, _variables())
    target = ",".join(addresses)
    assert inspect.main([target, model_id]) == 0
    out = capsys.readouterr().out
    assert "placement:" in out and "3 shards" in out and "imbalance" in out
    for index, address in enumerate(addresses):
        assert any(line.split()[:2] == [str(index), address] for line in out.splitlines())
    row = next(line for line in out.splitlines() if line.startswith("embedding/embeddings"))
    assert "[0:500]" in row and "[1000:1500]" in row
    assert inspect.main([target, model_id, "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    placement = data["placement"]
    assert placement["plan"]["format"] == "optserve-shard-plan" and placement["num_shards"] == 3
    assert [shard["address"] for shard in placement["shards"]] == addresses
    assert sum(shard["bytes"] for shard in placement["shards"]) == sum(v.nbytes for v in _variables().values())
    assert inspect.main([target]) == 0
    listing = capsys.readouterr().out
    assert "on 3 shards" in listing and any(line.startswith(model_id) for line in listing.splitlines())


def test_demo_join_mode_trains_to_the_step_and_resumes(addresses, capsys):
    model_id = _model_id()
    argv = [
        "--address",
        ",".join(addresses[:2]),
        "--workers",
        "1",
        "--worker-index",
        "0",
        "--num-workers",
        "1",
        "--model-id",
        model_id,
        "--batch-size",
        "16",
    ]
    assert demo.main(argv + ["--steps", "4"]) == 0
    assert "created model" in capsys.readouterr().out
    assert demo.main(argv + ["--steps", "6"]) == 0  # a restart goes on from the job's step
    out = capsys.readouterr().out
    assert "joined model" in out and "step 4 of 6" in out and "done at step 6" in out
    with Client(addresses[:2]) as client:
        assert client.list_models(model_id)[0].step == 6  # left on the servers


def test_demo_join_mode_exits_nonzero_without_a_server(capsys):
    code = demo.main(
        ["--address", "127.0.0.1:1,127.0.0.1:2", "--worker-index", "1", "--num-workers", "2", "--retries", "0"]
    )
    assert code == demo.EXIT_UNAVAILABLE
    assert "no server at" in capsys.readouterr().err


def test_demo_trains_on_shards(addresses, capsys):
    code = demo.main(["--address", ",".join(addresses[:2]), "--steps", "10", "--batch-size", "32"])
    out, err = capsys.readouterr()
    assert code == 0, out + err
    assert "2 shards" in out and "The loss fell" in out
