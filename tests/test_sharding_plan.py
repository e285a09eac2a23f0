"""plan_placement / ShardPlan: deterministic, balanced, exact split and join."""

from __future__ import annotations

import json
import random

import numpy as np
import pytest

from optserve.client.sharding import MIN_SPLIT_BYTES, Piece, ShardPlan, plan_placement

# ---------------------------------------------------------------------------- realistic variable lists


def resnet50_variables() -> dict:
    """Keras ResNet50's kernel, batch-norm and head shapes (about 25.6M parameters)."""
    variables = {}

    def conv(name, size, cin, cout):
        variables[f"{name}/kernel"] = ((size, size, cin, cout), "float32")

    def batch_norm(name, channels):
        for part in ("gamma", "beta", "moving_mean", "moving_variance"):
            variables[f"{name}/{part}"] = ((channels,), "float32")

    conv("conv1", 7, 3, 64)
    batch_norm("conv1_bn", 64)
    channels = 64
    for stage, (blocks, width) in enumerate([(3, 64), (4, 128), (6, 256), (3, 512)], start=2):
        for block in range(1, blocks + 1):
            prefix = f"conv{stage}_block{block}"
            if block == 1:
                conv(f"{prefix}_0_conv", 1, channels, 4 * width)
                batch_norm(f"{prefix}_0_bn", 4 * width)
            conv(f"{prefix}_1_conv", 1, channels, width)
            batch_norm(f"{prefix}_1_bn", width)
            conv(f"{prefix}_2_conv", 3, width, width)
            batch_norm(f"{prefix}_2_bn", width)
            conv(f"{prefix}_3_conv", 1, width, 4 * width)
            batch_norm(f"{prefix}_3_bn", 4 * width)
            channels = 4 * width
    variables["predictions/kernel"] = ((2048, 1000), "float32")
    variables["predictions/bias"] = ((1000,), "float32")
    return variables


def transformer_variables(layers=12, width=768, hidden=3072, vocab=30522, positions=512) -> dict:
    """A BERT-base-like encoder (about 110M parameters; the token embedding is 21% of them)."""
    variables = {
        "embeddings/token": ((vocab, width), "float32"),
        "embeddings/position": ((positions, width), "float32"),
        "embeddings/norm/gamma": ((width,), "float32"),
        "embeddings/norm/beta": ((width,), "float32"),
    }
    for layer in range(layers):
        prefix = f"encoder/layer_{layer}"
        for projection in ("query", "key", "value", "output"):
            variables[f"{prefix}/attention/{projection}/kernel"] = ((width, width), "float32")
            variables[f"{prefix}/attention/{projection}/bias"] = ((width,), "float32")
        variables[f"{prefix}/ffn/intermediate/kernel"] = ((width, hidden), "float32")
        variables[f"{prefix}/ffn/intermediate/bias"] = ((hidden,), "float32")
        variables[f"{prefix}/ffn/output/kernel"] = ((hidden, width), "float32")
        variables[f"{prefix}/ffn/output/bias"] = ((width,), "float32")
        for norm in ("attention_norm", "ffn_norm"):
            variables[f"{prefix}/{norm}/gamma"] = ((width,), "float32")
            variables[f"{prefix}/{norm}/beta"] = ((width,), "float32")
    return variables


def _total_bytes(variables) -> int:
    return sum(int(np.prod(shape)) * np.dtype(dtype).itemsize for shape, dtype in variables.values())


def _values(variables, seed=0) -> dict:
    rng = np.random.default_rng(seed)
    out = {}
    for name, (shape, dtype) in variables.items():
        raw = rng.integers(0, 256, size=int(np.prod(shape)) * np.dtype(dtype).itemsize, dtype=np.uint8)
        out[name] = raw.view(dtype).reshape(shape)  # arbitrary bit patterns, NaN payloads included
    return out


def _assert_bitwise_equal(actual: dict, expected: dict):
    assert list(actual) == sorted(expected)
    for name, array in expected.items():
        assert actual[name].dtype == array.dtype and actual[name].shape == array.shape, name
        assert actual[name].tobytes() == array.tobytes(), name


# ---------------------------------------------------------------------------- determinism


@pytest.mark.parametrize("num_shards", [2, 3, 5])
def test_same_variables_in_any_order_give_the_same_plan(num_shards):
    variables = transformer_variables(layers=4)
    reference = plan_placement(variables, num_shards)
    for seed in range(5):
        items = list(variables.items())
        random.Random(seed).shuffle(items)
        shuffled = plan_placement(dict(items), num_shards)
        assert shuffled.to_dict() == reference.to_dict()
        assert shuffled.fingerprint() == reference.fingerprint()
        assert shuffled == reference


def test_placement_is_pinned():
    # A fixed expected answer: workers running different releases must agree, so the
    # algorithm (largest first onto the least-loaded shard, ties by name, then by shard index)
    # may not drift silently.
    variables = {
        name: ((units * 256,), "float32")
        for name, units in [("e", 4), ("a", 8), ("d", 5), ("b", 7), ("c", 6), ("f", 4)]
    }
    plan = plan_placement(variables, 2)
    assert [[p.part_name for p in shard] for shard in plan.shards] == [["a", "d", "e"], ["b", "c", "f"]]
    assert plan.loads() == [17 * 1024, 17 * 1024]


def test_greedy_beats_round_robin():
    # Round robin in name order would put both big variables on shard 0.
    variables = {
        "a_big": ((1000,), "float32"),
        "b": ((10,), "float32"),
        "c_big": ((1000,), "float32"),
        "d": ((10,), "float32"),
    }
    plan = plan_placement(variables, 2)
    assert plan.shard_of("a_big") != plan.shard_of("c_big")
    assert plan.imbalance() == 1.0


# ---------------------------------------------------------------------------- balance


@pytest.mark.parametrize("model", [resnet50_variables, transformer_variables])
@pytest.mark.parametrize("num_shards", [2, 3])
def test_realistic_models_are_balanced(model, num_shards):
    variables = model()
    plan = plan_placement(variables, num_shards)
    loads = plan.loads()
    assert sum(loads) == _total_bytes(variables)
    assert max(loads) <= 1.3 * sum(loads) / num_shards, loads
    assert plan.imbalance() <= 1.3
    placed = sorted(name for shard in plan.shards for name in {p.var_name for p in shard})
    assert sorted(set(placed)) == sorted(variables)


def test_default_threshold_splits_a_dominant_embedding():
    variables = transformer_variables(layers=2, vocab=50000)  # the embedding is ~70% of the model
    plan = plan_placement(variables, 3)
    assert plan.split_variables() == ["embeddings/token"]
    assert len({shard for shard, _ in plan.locate("embeddings/token")}) == 3
    assert plan.imbalance() <= 1.3
    unsplit = plan_placement(variables, 3, split_threshold_bytes=1 << 40)
    assert unsplit.split_variables() == [] and unsplit.imbalance() > 2


# ---------------------------------------------------------------------------- splitting


def test_split_variable_parts_are_named_contiguous_and_on_distinct_shards():
    variables = {"dense/kernel": ((10, 4), "float32"), "dense/bias": ((4,), "float32")}
    plan = plan_placement(variables, 3, split_threshold_bytes=64)
    located = plan.locate("dense/kernel")
    assert [piece for _, piece in located] == [
        Piece("dense/kernel#part0of3", "dense/kernel", 0, 4, (4, 4), 64),
        Piece("dense/kernel#part1of3", "dense/kernel", 4, 7, (3, 4), 48),
        Piece("dense/kernel#part2of3", "dense/kernel", 7, 10, (3, 4), 48),
    ]
    assert len({shard for shard, _ in located}) == 3
    bias = Piece("dense/bias", "dense/bias", 0, 4, (4,), 16)
    assert plan.locate("dense/bias") == [(plan.shard_of("dense/bias"), bias)]
    assert plan.split_variables() == ["dense/kernel"] and plan.is_split("dense/kernel")


@pytest.mark.parametrize("num_shards", [2, 3, 4])
def test_split_then_join_restores_every_variable_bitwise(num_shards):
    variables = {
        "embedding": ((1000, 16), "float32"),
        "kernel64": ((300, 7), "float64"),
        "half": ((401, 3), "float16"),
        "counts": ((50, 2, 2), "int64"),
        "bias": ((16,), "float32"),
        "step": ((), "int64"),
        "empty": ((0, 8), "float32"),
    }
    values = _values(variables)
    plan = plan_placement(variables, num_shards, split_threshold_bytes=1000)
    assert plan.split_variables() == ["counts", "embedding", "half", "kernel64"]
    per_shard = plan.split(values)
    assert len(per_shard) == num_shards
    for shard, parts in enumerate(per_shard):
        assert list(parts) == [p.part_name for p in plan.shards[shard]]
        assert sum(a.nbytes for a in parts.values()) == plan.loads()[shard]
    for shard, piece in plan.locate("embedding"):
        assert np.shares_memory(per_shard[shard][piece.part_name], values["embedding"])  # views, not copies
    # What comes back from the servers is a fresh copy of each part.
    returned = [{k: np.array(v, copy=True) for k, v in parts.items()} for parts in per_shard]
    _assert_bitwise_equal(plan.join(returned), values)


def test_subsets_split_and_join():
    variables = {"w": ((8, 2), "float32"), "b": ((2,), "float32")}
    plan = plan_placement(variables, 2, split_threshold_bytes=16)
    values = _values(variables)
    per_shard = plan.split({"w": values["w"]})
    assert all("b" not in parts for parts in per_shard)
    assert list(plan.join(per_shard)) == ["w"]
    assert plan.join([{}, {}]) == {}


def test_join_rejects_incomplete_misplaced_or_misshapen_parts():
    variables = {"w": ((8, 2), "float32"), "b": ((2,), "float32")}
    plan = plan_placement(variables, 2, split_threshold_bytes=16)
    per_shard = plan.split(_values(variables))
    first_part = "w#part0of2"
    home = plan.shard_of(first_part)
    missing = [dict(parts) for parts in per_shard]
    del missing[home][first_part]
    with pytest.raises(ValueError, match=r"'w' is incomplete: missing parts \['w#part0of2'\]"):
        plan.join(missing)
    swapped = [dict(per_shard[1]), dict(per_shard[0])]
    with pytest.raises(ValueError, match="the plan places it on shard"):
        plan.join(swapped)
    misshapen = [dict(parts) for parts in per_shard]
    misshapen[home][first_part] = np.zeros((3, 2), np.float32)
    with pytest.raises(ValueError, match=r"has shape \(3, 2\); the plan expects \(4, 2\)"):
        plan.join(misshapen)
    with pytest.raises(ValueError, match="Expected the parts of 2 shards. Received: 1"):
        plan.join(per_shard[:1])
    with pytest.raises(ValueError, match="'nope' from shard 0 is not in this plan"):
        plan.join([{"nope": np.zeros(1)}, {}])


def test_split_rejects_unknown_or_misshapen_values():
    plan = plan_placement({"w": ((4, 2), "float32")}, 2)
    with pytest.raises(ValueError, match="'x' is not in this plan"):
        plan.split({"x": np.zeros(1)})
    with pytest.raises(ValueError, match=r"'w' has shape \(2, 4\); the plan expects \(4, 2\)"):
        plan.split({"w": np.zeros((2, 4))})


# ---------------------------------------------------------------------------- edge cases


def test_one_shard_holds_everything_unsplit():
    variables = transformer_variables(layers=1, vocab=1000)
    plan = plan_placement(variables, 1, split_threshold_bytes=1)
    assert plan.split_variables() == []
    assert [p.part_name for p in plan.shards[0]] == sorted(variables)
    assert plan.imbalance() == 1.0


def test_more_shards_than_variables_leaves_shards_empty():
    variables = {"a": ((3,), "float32"), "b": ((5,), "float32")}
    plan = plan_placement(variables, 5)
    assert sorted(len(shard) for shard in plan.shards) == [0, 0, 0, 1, 1]
    assert plan.loads() == [20, 12, 0, 0, 0]
    values = _values(variables)
    _assert_bitwise_equal(plan.join(plan.split(values)), values)


def test_zero_size_and_scalar_variables_are_never_split():
    variables = {
        "no_rows": ((0, 4), "float32"),
        "no_cols": ((6, 0), "float32"),
        "scalar": ((), "float64"),
        "one_row": ((1, 64), "float32"),
        "two_rows": ((2, 64), "float32"),
    }
    plan = plan_placement(variables, 4, split_threshold_bytes=1)
    assert plan.split_variables() == ["two_rows"]  # at most one part per row
    assert len(plan.locate("two_rows")) == 2
    ((_, scalar),) = plan.locate("scalar")
    assert (scalar.row_start, scalar.row_stop, scalar.shape, scalar.nbytes) == (None, None, (), 8)
    values = _values(variables)
    _assert_bitwise_equal(plan.join(plan.split(values)), values)


def test_empty_model():
    plan = plan_placement({}, 3)
    assert plan.shards == [[], [], []] and plan.loads() == [0, 0, 0] and plan.imbalance() == 1.0
    assert plan.join(plan.split({})) == {}


def test_default_threshold_leaves_small_models_whole():
    variables = {"dense/kernel": ((16, 32), "float32"), "dense/bias": ((32,), "float32")}
    plan = plan_placement(variables, 2)
    assert plan.split_threshold_bytes == MIN_SPLIT_BYTES
    assert plan.split_variables() == []


def test_arrays_are_accepted_as_specs():
    values = {"w": np.zeros((3, 2), np.float16), "b": np.zeros(2, np.float32)}
    plan = plan_placement(values, 2)
    assert plan.variables["w"].shape == (3, 2) and plan.variables["w"].dtype == np.float16


# ---------------------------------------------------------------------------- errors


@pytest.mark.parametrize("num_shards", [0, -1, 1.5, True, "2", None])
def test_num_shards_must_be_a_positive_integer(num_shards):
    with pytest.raises(ValueError, match=r"`num_shards` must be an integer >= 1. Received: num_shards="):
        plan_placement({"w": ((2,), "float32")}, num_shards)


@pytest.mark.parametrize("threshold", [0, -5, 2.5])
def test_split_threshold_must_be_a_positive_integer(threshold):
    with pytest.raises(ValueError, match="`split_threshold_bytes` must be an integer >= 1"):
        plan_placement({"w": ((2,), "float32")}, 2, split_threshold_bytes=threshold)


@pytest.mark.parametrize(
    "spec, fragment",
    [
        (((2, -1), "float32"), "shape must hold integers >= 0"),
        (((2.5,), "float32"), "shape must be a sequence of integers"),
        (((True,), "float32"), "shape must hold integers >= 0"),
        (((2,), "not-a-dtype"), "unknown dtype"),
        (((2,), None), "unknown dtype"),
        ("float32", "must be given as (shape, dtype)"),
    ],
)
def test_bad_variable_specs_are_rejected(spec, fragment):
    with pytest.raises(ValueError) as info:
        plan_placement({"w": spec}, 2)
    assert fragment in str(info.value)


def test_bad_mappings_are_rejected():
    with pytest.raises(TypeError, match="`variables` must be a mapping"):
        plan_placement([("w", ((2,), "float32"))], 2)
    with pytest.raises(ValueError, match="non-empty strings"):
        plan_placement({"": ((2,), "float32")}, 2)


def test_part_name_collisions_are_rejected():
    variables = {"w": ((8,), "float32"), "w#part0of2": ((1,), "float32")}
    with pytest.raises(ValueError, match="collides with variable 'w#part0of2'"):
        plan_placement(variables, 2, split_threshold_bytes=16)
    plan_placement(variables, 2)  # nothing split: no collision


# ---------------------------------------------------------------------------- serialization


def test_to_dict_round_trips_through_json():
    plan = plan_placement(transformer_variables(layers=2, vocab=50000), 3)
    data = json.loads(json.dumps(plan.to_dict()))
    restored = ShardPlan.from_dict(data)
    assert restored == plan and restored.fingerprint() == plan.fingerprint()
    assert restored.shards == plan.shards and restored.variables == plan.variables
    assert restored.split_threshold_bytes == plan.split_threshold_bytes


def _tampered(mutate):
    plan = plan_placement(
        {"w": ((10, 2), "float32"), "b": ((2,), "float32"), "s": ((), "int64")}, 2, split_threshold_bytes=40
    )
    data = json.loads(json.dumps(plan.to_dict()))
    mutate(data)
    return data


@pytest.mark.parametrize(
    "mutate, fragment",
    [
        (lambda d: d.update(version=99), "Not a shard plan"),
        (lambda d: d.update(num_shards=3), "lists 2 shards but num_shards=3"),
        (lambda d: d["shards"][0].clear(), "do not tile it exactly once"),
        (lambda d: d["shards"][0][0]["rows"].__setitem__(1, 4), "do not tile it exactly once"),
        (lambda d: d["shards"][1].extend(d["shards"][0]), "do not tile it exactly once"),
        (
            lambda d: d["shards"][0].append({"part": "x", "variable": "x", "rows": None, "shape": [], "nbytes": 4}),
            "unknown variable 'x'",
        ),
        (lambda d: d.pop("variables"), "Malformed shard plan"),
    ],
)
def test_from_dict_rejects_inconsistent_plans(mutate, fragment):
    with pytest.raises(ValueError) as info:
        ShardPlan.from_dict(_tampered(mutate))
    assert fragment in str(info.value)


def test_repr_summarizes():
    plan = plan_placement({"w": ((4,), "float32")}, 2)
    assert repr(plan) == "ShardPlan(num_shards=2, variables=1, pieces=1, loads=[16, 0], imbalance=2.000)"
