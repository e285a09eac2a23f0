"""Sparse gradients (rows of a variable, as tf.IndexedSlices): applied exactly as their dense form."""

from __future__ import annotations

import concurrent.futures
import importlib.util
import json
import pathlib
import subprocess
import sys
import uuid

import grpc
import numpy as np
import pytest
import rpc_helpers as rpc

from optserve.client import Client, InvalidArgumentError, NotFoundError, SparseGradient
from optserve.protos import optserve_pb2 as pb
from optserve.protos import tensors as codec

ADAM = {"class_name": "Adam", "config": {"learning_rate": 0.01}}
ROWS, WIDTH = 40, 3


def _variables() -> dict:
    rng = np.random.default_rng(0)
    return {"emb": rng.standard_normal((ROWS, WIDTH)).astype(np.float32), "bias": np.zeros(WIDTH, np.float32)}


def _sparse(step: int, worker: int = 0) -> SparseGradient:
    rng = np.random.default_rng((step, worker))
    indices = rng.integers(0, ROWS, 8)
    indices[1] = indices[0]  # a repeated index: its rows are summed
    return SparseGradient(indices, rng.standard_normal((8, WIDTH)).astype(np.float32))


def _bias_gradient(step: int) -> np.ndarray:
    return np.full(WIDTH, 0.1 * (step + 1), np.float32)


def _model_id() -> str:
    return f"sparse-{uuid.uuid4().hex[:8]}"


def _assert_same_state(client: Client, model_a: str, model_b: str) -> None:
    a, b = (client.get_weights(m, include_variables=True) for m in (model_a, model_b))
    assert (a.iterations, a.step) == (b.iterations, b.step)
    for name in a.variables:
        np.testing.assert_array_equal(a.variables[name], b.variables[name], err_msg=name)
        for slot in a.slots[name]:
            np.testing.assert_array_equal(a.slots[name][slot], b.slots[name][slot], err_msg=f"{name}/{slot}")


# ---------------------------------------------------------------------------- the value


def test_a_sparse_gradient_densifies_with_repeated_indices_summed():
    gradient = SparseGradient([3, 1, 3], np.array([[1, 2], [3, 4], [10, 20]], np.float32))
    np.testing.assert_array_equal(gradient.densify((5, 2)), [[0, 0], [3, 4], [0, 0], [11, 22], [0, 0]])
    part = gradient.rows(2, 5)
    assert part.indices.tolist() == [1, 1] and part.values.tolist() == [[1, 2], [10, 20]]
    assert SparseGradient([], np.zeros((0, 2), np.float32)).densify((3, 2)).tolist() == [[0, 0]] * 3


@pytest.mark.parametrize(
    "indices, values, message",
    [
        ([[0, 1]], np.zeros((2, 2), np.float32), "1-D array of integers"),
        ([0.5], np.zeros((1, 2), np.float32), "1-D array of integers"),
        ([0, 1], np.zeros((3, 2), np.float32), "one row per index"),
        ([0], np.zeros((1, 2), np.complex64), "Unsupported dtype"),
    ],
)
def test_a_malformed_sparse_gradient_is_refused_when_made(indices, values, message):
    with pytest.raises(InvalidArgumentError, match=message):
        SparseGradient(indices, values)


# ---------------------------------------------------------------------------- one server


def test_a_sparse_push_applies_exactly_its_dense_form(address):
    sparse_id, dense_id = _model_id(), _model_id()
    with Client(address) as client:
        for model_id in (sparse_id, dense_id):
            client.create_model(model_id, ADAM, _variables())
        for step in range(3):
            gradient = _sparse(step)
            _, sparse_values = client.push_pull(sparse_id, {"emb": gradient, "bias": _bias_gradient(step)})
            _, dense_values = client.push_pull(
                dense_id, {"emb": gradient.densify((ROWS, WIDTH)), "bias": _bias_gradient(step)}
            )
            np.testing.assert_array_equal(sparse_values["emb"], dense_values["emb"])
        _assert_same_state(client, sparse_id, dense_id)


def test_rows_a_sparse_push_leaves_out_still_have_their_slots_decay(address):
    model_id = _model_id()
    with Client(address) as client:
        client.create_model(model_id, ADAM, _variables())
        client.push(model_id, {"emb": SparseGradient([5], np.ones((1, WIDTH), np.float32))})
        first = client.get_weights(model_id).slots["emb"]["momentum"][5].copy()
        assert np.all(first != 0)
        client.push(model_id, {"emb": SparseGradient([7], np.ones((1, WIDTH), np.float32))})
        np.testing.assert_allclose(client.get_weights(model_id).slots["emb"]["momentum"][5], first * 0.9, rtol=1e-6)


def test_in_a_sync_step_sparse_and_dense_pushes_sum_like_dense_ones(address):
    mixed_id, dense_id = _model_id(), _model_id()
    with Client(address) as client, concurrent.futures.ThreadPoolExecutor(2) as pool:
        for model_id in (mixed_id, dense_id):
            client.create_model(model_id, ADAM, _variables(), num_workers=2)
        for step in range(2):
            for model_id, sparse_form in ((mixed_id, True), (dense_id, False)):
                grads = [_sparse(step, worker) for worker in range(2)]
                pushes = [
                    pool.submit(
                        client.push,
                        model_id,
                        {"emb": g if (sparse_form and worker == 0) else g.densify((ROWS, WIDTH))},
                        worker_index=worker,
                    )
                    for worker, g in enumerate(grads)
                ]
                assert [p.result().step for p in pushes] == [step + 1] * 2
        _assert_same_state(client, mixed_id, dense_id)


@pytest.mark.parametrize(
    "gradient, error, message",
    [
        (SparseGradient([0, ROWS], np.ones((2, WIDTH), np.float32)), InvalidArgumentError, f"index {ROWS}, outside"),
        (SparseGradient([-1], np.ones((1, WIDTH), np.float32)), InvalidArgumentError, "index -1, outside"),
        (SparseGradient([0], np.ones((1, WIDTH + 1), np.float32)), InvalidArgumentError, "rows of shape"),
        (SparseGradient([0], np.ones((1, WIDTH), np.float64)), InvalidArgumentError, "dtype float64"),
    ],
)
def test_a_sparse_push_that_does_not_fit_is_refused_and_changes_nothing(address, gradient, error, message):
    model_id = _model_id()
    with Client(address) as client:
        client.create_model(model_id, ADAM, _variables())
        before = client.get_weights(model_id, include_variables=True)
        with pytest.raises(error, match=message):
            client.push(model_id, {"emb": gradient, "bias": _bias_gradient(0)})
        after = client.get_weights(model_id, include_variables=True)
        assert (after.step, after.iterations) == (0, 0)
        np.testing.assert_array_equal(after.variables["emb"], before.variables["emb"])
        with pytest.raises(NotFoundError, match="no variable 'nope'"):
            client.push(model_id, {"nope": SparseGradient([0], np.ones((1, WIDTH), np.float32))})
        with pytest.raises(InvalidArgumentError, match="scalar"):
            client.create_model(model_id + "s", "sgd", {"s": np.float32(1)})
            client.push(model_id + "s", {"s": SparseGradient([0], np.ones((1,), np.float32))})


def _raw_push(stub, model_id: str, tensors, sparse_names):
    first = pb.ApplyGradientsRequest(
        header=pb.ApplyGradientsHeader(model_id=model_id, step=0),
        sparse_gradients=[pb.SparseGradient(name=n) for n in sparse_names],
    )
    return list(stub.ApplyGradients(iter(codec.chunk_messages(first, "gradients", tensors)), timeout=rpc.TIMEOUT_S))


@pytest.mark.parametrize(
    "tensors, declared, message",
    [
        (
            [("emb", "sparse_indices", np.array([0])), ("emb", "sparse_values", np.ones((1, WIDTH), np.float32))],
            [],
            "must have an empty slot",
        ),  # undeclared: refused as by a server that knows no sparse form
        ([("emb", "sparse_indices", np.array([0]))], ["emb"], "lacks its ['sparse_values'] tensor"),
        (
            [
                ("emb", "", np.ones((ROWS, WIDTH), np.float32)),
                ("emb", "sparse_indices", np.array([0])),
                ("emb", "sparse_values", np.ones((1, WIDTH), np.float32)),
            ],
            ["emb"],
            "both dense and sparse",
        ),
        (
            [
                ("emb", "sparse_indices", np.array([0.0], np.float32)),
                ("emb", "sparse_values", np.ones((1, WIDTH), np.float32)),
            ],
            ["emb"],
            "1-D array of integers",
        ),
    ],
)
def test_the_wire_form_is_checked(address, stub, tensors, declared, message):
    model_id = _model_id()
    with Client(address) as client:
        client.create_model(model_id, ADAM, _variables())
        with pytest.raises(grpc.RpcError) as caught:
            _raw_push(stub, model_id, tensors, declared)
        assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert message in caught.value.details()
        assert client.list_models(model_id)[0].step == 0


def _keras_tf_and_optserve(address: str, steps: list, table: np.ndarray) -> tuple[dict, object]:
    """The table and slots after ``steps`` of (indices, rows): Keras (TensorFlow, tf.IndexedSlices), optserve."""
    job = {"optimizer": ADAM, "table": table.tolist(), "steps": steps}
    worker = pathlib.Path(__file__).with_name("tf_sparse_worker.py")
    done = subprocess.run(
        [sys.executable, str(worker)], input=json.dumps(job), capture_output=True, text=True, timeout=300, check=True
    )
    keras_result = json.loads(done.stdout.strip().splitlines()[-1])
    model_id = _model_id()
    with Client(address) as client:
        client.create_model(model_id, ADAM, {"table": table})
        for indices, rows in steps:
            client.push(model_id, {"table": SparseGradient(indices, np.asarray(rows, np.float32))})
        return keras_result, client.get_weights(model_id, include_variables=True)


needs_tensorflow = pytest.mark.skipif(
    importlib.util.find_spec("tensorflow") is None, reason="TensorFlow is not installed"
)


@needs_tensorflow
def test_sparse_pushes_match_keras_applying_tf_indexed_slices(address):
    rng = np.random.default_rng(7)
    table = rng.standard_normal((ROWS, WIDTH)).astype(np.float32)
    steps = [
        (rng.choice(ROWS, 6, replace=False).tolist(), rng.standard_normal((6, WIDTH)).astype(np.float32).tolist())
        for _ in range(3)
    ]
    keras_result, weights = _keras_tf_and_optserve(address, steps, table)
    np.testing.assert_array_equal(weights.variables["table"], np.asarray(keras_result["table"], np.float32))
    for ours, theirs in zip(weights.slot_list(), keras_result["slots"]):
        np.testing.assert_array_equal(ours, np.asarray(theirs, np.float32))


@needs_tensorflow
def test_with_repeated_indices_only_the_repeated_rows_follow_the_dense_sum_not_keras_tf(address):
    # Keras's TensorFlow backend squares an IndexedSlices row by row before the rows are
    # summed (Adam's second moment gets g1**2 + g2**2); optserve, like a dense gradient and
    # like Keras's other backends, sums the rows first ((g1 + g2)**2). Every other row matches.
    rng = np.random.default_rng(8)
    table = rng.standard_normal((ROWS, WIDTH)).astype(np.float32)
    indices = [3, 3, 10, 11]
    steps = [(indices, rng.standard_normal((4, WIDTH)).astype(np.float32).tolist())]
    keras_result, weights = _keras_tf_and_optserve(address, steps, table)
    keras_table = np.asarray(keras_result["table"], np.float32)
    others = [row for row in range(ROWS) if row != 3]
    np.testing.assert_array_equal(weights.variables["table"][others], keras_table[others])
    assert not np.array_equal(weights.variables["table"][3], keras_table[3])


# ---------------------------------------------------------------------------- shards


@pytest.fixture(scope="module")
def two_servers():
    from optserve.server.app import start_server

    servers = [start_server(host="127.0.0.1", port=0, device="cpu") for _ in range(2)]
    try:
        yield [server.address for server in servers]
    finally:
        for server in servers:
            server.stop()


def test_a_sharded_client_sends_each_shard_its_rows_rebased(two_servers):
    rng = np.random.default_rng(1)
    variables = {"table": rng.standard_normal((3000, 100)).astype(np.float32), "bias": np.zeros(8, np.float32)}
    model_id = _model_id()
    with Client(two_servers) as sharded, Client(two_servers[0]) as single:
        info = sharded.create_model(model_id, ADAM, variables)
        assert info.plan.is_split("table")
        single.create_model(model_id, ADAM, variables)
        for step in range(3):
            indices = rng.integers(0, 3000, 50)
            if step == 1:
                indices = rng.integers(0, 100, 50)  # rows of the first part only: the others still decay
            gradient = SparseGradient(indices, rng.standard_normal((50, 100)).astype(np.float32))
            grads = {"table": gradient, "bias": np.ones(8, np.float32)}
            _, sharded_values = sharded.push_pull(model_id, grads)
            _, single_values = single.push_pull(model_id, grads)
            np.testing.assert_array_equal(sharded_values["table"], single_values["table"])
        a, b = sharded.get_weights(model_id), single.get_weights(model_id)
        for slot in a.slots["table"]:
            np.testing.assert_array_equal(a.slots["table"][slot], b.slots["table"][slot])
        before = sharded.pull(model_id)[1]["table"]
        with pytest.raises(InvalidArgumentError, match="index 3000, outside"):
            sharded.push(model_id, {"table": SparseGradient([0, 3000], np.ones((2, 100), np.float32))})
        np.testing.assert_array_equal(sharded.pull(model_id)[1]["table"], before)
        assert sharded.resync(model_id) == 3
