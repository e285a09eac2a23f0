"""Checkpoint files readable without optserve (safetensors), and version-1 checkpoints still restoring."""

from __future__ import annotations

import numpy as np
import pytest
from checkpoint_v1 import write_v1_checkpoint
from safetensors.numpy import load_file

from optserve.client.client import Client
from optserve.server.app import start_server
from optserve.server.checkpoint import DATA_FILE, CheckpointStore

ADAM = {"class_name": "Adam", "config": {"learning_rate": 0.01}}


def _variables():
    return {"dense/kernel": np.arange(6, dtype=np.float32).reshape(2, 3), "bias": np.array([0.5, -1.0], np.float64)}


def _grads(step):
    rng = np.random.default_rng(step)
    return {name: rng.standard_normal(v.shape).astype(v.dtype) for name, v in _variables().items()}


def _trained_server(directory):
    server = start_server(device="cpu", checkpoint_dir=directory, checkpoint_every="off")
    with Client(server.address) as client:
        client.create_model("job", ADAM, _variables())
        for step in range(3):
            client.push("job", _grads(step))
        path, _ = client.checkpoint()
        weights = client.get_weights("job", include_variables=True)
    return server, path, weights


def test_a_checkpoints_arrays_load_with_safetensors_and_equal_get_weights(tmp_path):
    server, path, weights = _trained_server(tmp_path)
    server.stop(final_checkpoint=False)
    tensors = load_file(f"{path}/{DATA_FILE}")
    for name, value in weights.variables.items():
        stored = tensors[f"models/job/engine/variables/{name}"]
        assert stored.dtype == value.dtype and stored.tobytes() == value.tobytes(), name
        slots = weights.slots[name]
        assert set(slots) == {"momentum", "velocity"}
        for slot, slot_value in slots.items():
            assert tensors[f"models/job/engine/slots/{name}/{slot}"].tobytes() == slot_value.tobytes()


def test_unusual_dtypes_are_stored_as_safetensors_can_hold_them_and_come_back_exact(tmp_path):
    store = CheckpointStore(tmp_path)
    state = {
        "complex": np.array([1 + 2j, -3.5j], np.complex128),
        "big_endian": np.arange(3, dtype=">i4"),
        "scalar": np.float16(1.5),
        "empty": np.zeros((0, 2), np.float32),
    }
    path = store.save(state)
    tensors = load_file(str(path / DATA_FILE))
    np.testing.assert_array_equal(tensors["complex"], [[1.0, 2.0], [0.0, -3.5]])
    assert tensors["big_endian"].dtype == np.dtype("<i4")
    assert tensors["scalar"].size == 1 and tensors["scalar"].reshape(()) == 1.5
    loaded = store.load(path)
    assert loaded["complex"].dtype == np.complex128 and loaded["big_endian"].dtype == np.dtype(">i4")
    np.testing.assert_array_equal(loaded["complex"], state["complex"])
    assert loaded["scalar"] == state["scalar"] and isinstance(loaded["scalar"], np.float16)


def test_a_version_1_checkpoint_restores_and_the_next_one_is_version_2(tmp_path):
    first = tmp_path / "first"
    server, path, weights = _trained_server(first)
    server.stop(final_checkpoint=False)
    state = CheckpointStore(first).load(path)
    old = tmp_path / "old"
    write_v1_checkpoint(old, 5, state)
    restored = start_server(device="cpu", checkpoint_dir=old, checkpoint_every="off")
    try:
        with Client(restored.address) as client:
            again = client.get_weights("job", include_variables=True)
            assert client.list_models("job")[0].step == 3
            for name, value in weights.variables.items():
                assert again.variables[name].tobytes() == value.tobytes()
                for slot, slot_value in weights.slots[name].items():
                    assert again.slots[name][slot].tobytes() == slot_value.tobytes()
            client.push("job", _grads(3))
            newest, _ = client.checkpoint()
    finally:
        restored.stop(final_checkpoint=False)
    assert newest.endswith("ckpt-00000006")
    assert CheckpointStore(old).describe(newest)["sequence"] == 6
    assert "models/job/engine/variables/bias" in load_file(f"{newest}/{DATA_FILE}")


@pytest.mark.parametrize("where", ["header-length", "data"])
def test_a_damaged_safetensors_file_is_skipped_for_the_previous_checkpoint(tmp_path, where, caplog):
    store = CheckpointStore(tmp_path)
    store.save({"a": np.ones(4, np.float32)})
    newest = store.save({"a": np.zeros(4, np.float32)})
    data = newest / DATA_FILE
    raw = bytearray(data.read_bytes())
    position = 0 if where == "header-length" else len(raw) - 1
    raw[position] ^= 0xFF
    data.write_bytes(bytes(raw))
    state, path = store.load_latest()
    assert path.name == "ckpt-00000001"
    np.testing.assert_array_equal(state["a"], np.ones(4, np.float32))
    assert f"Skipping damaged checkpoint {newest}" in caplog.text
