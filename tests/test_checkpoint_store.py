"""CheckpointStore: exact round trips, atomic saves, pruning, damaged checkpoints skipped."""

from __future__ import annotations

import json
import logging
import os
import threading
import tracemalloc

import numpy as np
import pytest

from optserve.server.checkpoint import (
    DATA_FILE,
    MANIFEST_FILE,
    CheckpointStore,
    CorruptCheckpointError,
)
from optserve.server.errors import InvalidArgumentError


def _state(seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    kernel = rng.standard_normal((20, 10)).astype(np.float32)
    return {
        "models": {
            "mlp": {
                "spec": {"optimizer_config_json": '{"class_name": "Adam"}', "num_workers": 2, "mode": "SYNC"},
                "optimizer": {
                    "iterations": np.int64(7 + seed),
                    "variables": {"dense/kernel": kernel, "dense/bias": np.zeros(10, np.float32)},
                    "slots": {
                        "dense/kernel": {"momentum": kernel * 0.5, "velocity": rng.random((20, 10))},
                        "dense/bias": {"momentum": np.arange(10, dtype=np.float64)},
                    },
                    "scalars": {"u_product": 0.961, "lr": np.float32(1e-3)},
                },
                "sync": {"step": 12, "pending": {0: [1, 2], 3: []}, "contributors": (0, 1)},
            }
        },
        "created_at": 1732540000.25,
        "counts": np.array([1, -2, 3], dtype=np.int32),
        "flags": [True, False, None, "text", float("inf")],
    }


def _assert_same(actual, expected, where="state"):
    assert type(actual) is type(expected), f"{where}: {type(actual)} != {type(expected)}"
    if isinstance(expected, dict):
        assert list(actual) == list(expected), where
        for key in expected:
            _assert_same(actual[key], expected[key], f"{where}[{key!r}]")
    elif isinstance(expected, (list, tuple)):
        assert len(actual) == len(expected), where
        for i, (a, e) in enumerate(zip(actual, expected)):
            _assert_same(a, e, f"{where}[{i}]")
    elif isinstance(expected, (np.ndarray, np.generic)):
        assert actual.dtype == expected.dtype and actual.shape == expected.shape, where
        assert np.asarray(actual).tobytes() == np.asarray(expected).tobytes(), where  # bitwise
    else:
        assert actual == expected, where


def _sequences(store):
    return [info.sequence for info in store.list()]


def test_round_trip_is_exact(tmp_path):
    store = CheckpointStore(tmp_path, keep=3)
    state = _state()
    path = store.save(state)
    assert path.name == "ckpt-00000001"
    loaded, loaded_path = store.load_latest()
    assert loaded_path == path
    _assert_same(loaded, state)


def test_round_trip_of_unusual_values(tmp_path):
    store = CheckpointStore(tmp_path)
    transposed = np.arange(12, dtype=np.float64).reshape(3, 4).T  # not C-contiguous
    state = {
        "$looks_like_a_tag": {"$array": 3},
        "int_and_float_keys": {1: "one", 2.5: "two and a half", None: "none"},
        "empty": np.zeros((0, 5), np.float32),
        "zero_dim": np.array(3.5, np.float64),
        "scalars": [np.float64(2.0), np.int32(-4), np.bool_(True), np.uint8(255)],
        "transposed": transposed,
        "big_endian": np.arange(4, dtype=">i8"),
        "mixed": [np.ones(3, np.float16), np.array([1 + 2j], np.complex128), np.array([True, False])],
        "nan_payload": np.array([np.nan, -0.0, 1e-45], np.float32),
        "nested": (1, (2, [3, {"deep": np.arange(3, dtype=np.uint16)}])),
        "big_int": 2**80,
    }
    store.save(state)
    loaded, _ = store.load_latest()
    _assert_same(loaded, state)
    np.testing.assert_array_equal(loaded["transposed"], transposed)


def test_loaded_arrays_are_writable_and_independent(tmp_path):
    store = CheckpointStore(tmp_path)
    store.save({"a": np.ones(4, np.float32), "b": np.ones(4, np.float32)})
    loaded, _ = store.load_latest()
    loaded["a"] += 1
    assert loaded["a"].flags.writeable
    np.testing.assert_array_equal(loaded["b"], np.ones(4, np.float32))


def test_keeps_only_the_newest_k(tmp_path):
    store = CheckpointStore(tmp_path, keep=2)
    for seed in range(5):
        store.save(_state(seed))
    assert _sequences(store) == [4, 5]
    assert sorted(p.name for p in tmp_path.iterdir()) == [".lock", "ckpt-00000004", "ckpt-00000005"]
    loaded, path = store.load_latest()
    assert path.name == "ckpt-00000005"
    assert loaded["models"]["mlp"]["optimizer"]["iterations"] == 7 + 4


def _newest(store):
    return store.list()[-1].path


def _corrupt_and_expect_fallback(store, caplog, damage):
    store.save(_state(0))
    store.save(_state(1))
    newest = _newest(store)
    damage(newest)
    with caplog.at_level(logging.WARNING, logger="optserve.server.checkpoint"):
        loaded, path = store.load_latest()
    assert path.name == "ckpt-00000001"
    _assert_same(loaded, _state(0))
    assert str(newest) in caplog.text
    with pytest.raises(CorruptCheckpointError):
        store.load(newest)
    return caplog.text


def test_truncated_data_file_falls_back_to_previous(tmp_path, caplog):
    def truncate(path):
        data = path / DATA_FILE
        os.truncate(data, data.stat().st_size - 100)

    text = _corrupt_and_expect_fallback(CheckpointStore(tmp_path), caplog, truncate)
    assert "truncated" in text


def test_flipped_byte_is_a_checksum_mismatch(tmp_path, caplog):
    def flip(path):
        data = path / DATA_FILE
        raw = bytearray(data.read_bytes())
        raw[len(raw) // 2] ^= 0x01
        data.write_bytes(bytes(raw))

    text = _corrupt_and_expect_fallback(CheckpointStore(tmp_path), caplog, flip)
    assert "checksum mismatch" in text


def test_edited_manifest_is_a_checksum_mismatch(tmp_path, caplog):
    def edit(path):
        manifest_path = path / MANIFEST_FILE
        manifest = json.loads(manifest_path.read_text())
        manifest["tree"]["created_at"] = 0.0
        manifest_path.write_text(json.dumps(manifest))

    text = _corrupt_and_expect_fallback(CheckpointStore(tmp_path), caplog, edit)
    assert "manifest.json checksum mismatch" in text


def test_missing_or_truncated_manifest_falls_back(tmp_path, caplog):
    store = CheckpointStore(tmp_path)
    _corrupt_and_expect_fallback(store, caplog, lambda path: (path / MANIFEST_FILE).unlink())
    store.save(_state(2))  # ckpt-3, then damage it the other way
    third = _newest(store)
    text = (third / MANIFEST_FILE).read_text()
    (third / MANIFEST_FILE).write_text(text[: len(text) // 2])
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="optserve.server.checkpoint"):
        _, path = store.load_latest()
    assert path.name == "ckpt-00000001"
    assert str(third) in caplog.text


def test_leftover_temp_directory_is_ignored_then_removed(tmp_path, caplog):
    store = CheckpointStore(tmp_path)
    store.save(_state(0))
    leftover = tmp_path / ".tmp-ckpt-00000002-deadbeef"
    leftover.mkdir()
    (leftover / DATA_FILE).write_bytes(b"half written")
    with caplog.at_level(logging.WARNING, logger="optserve.server.checkpoint"):
        _, path = store.load_latest()
    assert path.name == "ckpt-00000001"
    assert leftover.name in caplog.text
    assert _sequences(store) == [1]
    assert store.save(_state(1)).name == "ckpt-00000003"  # numbers are never reused
    assert not leftover.exists()


def test_sequence_continues_after_reopening(tmp_path):
    first = CheckpointStore(tmp_path, keep=2)
    for seed in range(3):
        first.save(_state(seed))
    reopened = CheckpointStore(tmp_path, keep=2)
    assert reopened.save(_state(3)).name == "ckpt-00000004"
    (tmp_path / "ckpt-00000004" / MANIFEST_FILE).unlink()  # a damaged newest still holds its number
    assert CheckpointStore(tmp_path, keep=2).save(_state(4)).name == "ckpt-00000005"


def test_empty_or_all_damaged_store_loads_none(tmp_path, caplog):
    store = CheckpointStore(tmp_path / "new" / "dir")
    assert store.load_latest() is None
    store.save(_state())
    (_newest(store) / DATA_FILE).unlink()
    with caplog.at_level(logging.WARNING, logger="optserve.server.checkpoint"):
        assert store.load_latest() is None
    assert "ckpt-00000001" in caplog.text


def test_failed_save_leaves_nothing_behind(tmp_path, monkeypatch):
    store = CheckpointStore(tmp_path)
    store.save(_state(0))

    def fail(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr("optserve.server.checkpoint._write_manifest", fail)
    with pytest.raises(OSError, match="No space left"):
        store.save(_state(1))
    assert sorted(p.name for p in tmp_path.iterdir()) == [".lock", "ckpt-00000001"]
    _assert_same(store.load_latest()[0], _state(0))


@pytest.mark.parametrize(
    "bad, fragment",
    [
        ({"x": np.array([object()], dtype=object)}, "dtype object at /x"),
        ({"x": {1, 2}}, "type set at /x"),
        ({"x": [b"raw"]}, "type bytes at /x/0"),
        ({(1, 2): 3}, "dict key of type tuple"),
        ({np.int64(1): 3}, "dict key of type int64"),
    ],
)
def test_unsupported_values_are_rejected_before_writing(tmp_path, bad, fragment):
    store = CheckpointStore(tmp_path)
    with pytest.raises(InvalidArgumentError, match="Cannot checkpoint") as info:
        store.save(bad)
    assert fragment in str(info.value)
    assert store.list() == []
    assert [p.name for p in tmp_path.iterdir()] == []


@pytest.mark.parametrize("keep", [0, -1, 1.5, True, "3"])
def test_keep_must_be_a_positive_integer(tmp_path, keep):
    with pytest.raises(InvalidArgumentError, match=r"`keep` must be an integer >= 1. Received: keep="):
        CheckpointStore(tmp_path, keep=keep)


def test_directory_that_is_a_file_is_rejected(tmp_path):
    target = tmp_path / "file"
    target.write_text("x")
    with pytest.raises(InvalidArgumentError, match="`directory` must be a directory"):
        CheckpointStore(target)


def test_describe_reads_the_manifest_only(tmp_path):
    store = CheckpointStore(tmp_path)
    path = store.save(_state())
    summary = store.describe(path)
    assert summary["sequence"] == 1 and summary["num_arrays"] == 8
    assert summary["data_bytes"] == (path / DATA_FILE).stat().st_size


def test_concurrent_saves_get_distinct_sequences(tmp_path):
    store = CheckpointStore(tmp_path, keep=4)
    paths, errors = [], []

    def writer(seed):
        try:
            for _ in range(5):
                paths.append(store.save(_state(seed)))
        except Exception as error:  # pragma: no cover - reported below
            errors.append(error)

    threads = [threading.Thread(target=writer, args=(seed,)) for seed in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors
    assert sorted(p.name for p in paths) == [f"ckpt-{n:08d}" for n in range(1, 16)]
    assert _sequences(store) == [12, 13, 14, 15]
    for info in store.list():
        store.load(info.path)


def test_save_streams_large_arrays_without_copying(tmp_path):
    big = np.ones(16 << 20, np.float32)  # 64 MiB
    store = CheckpointStore(tmp_path)
    tracemalloc.start()
    try:
        store.save({"big": big, "small": np.arange(10)})
        _, save_peak = tracemalloc.get_traced_memory()
        tracemalloc.reset_peak()
        loaded, _ = store.load_latest()
        _, load_peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert save_peak < 4 << 20, f"save allocated {save_peak} bytes for a 64 MiB array"
    assert load_peak < big.nbytes + (4 << 20), f"load allocated {load_peak} bytes"
    assert np.array_equal(loaded["big"], big)
