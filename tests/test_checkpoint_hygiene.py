"""Checkpoint directory hygiene: interrupted saves are cleaned up at start-up; a full disk says what helps."""

from __future__ import annotations

import errno
import fcntl

import numpy as np
import pytest

from optserve.client.client import Client, ResourceExhaustedError
from optserve.server.app import start_server
from optserve.server.checkpoint import LOCK_FILE, CheckpointStore
from optserve.server.errors import FailedPreconditionError


def _leftover(directory, name: str) -> None:
    temp = directory / name
    temp.mkdir()
    (temp / "data.bin").write_bytes(b"\0" * 4096)


def test_stale_temporary_directories_are_removed_at_start_up(tmp_path):
    _leftover(tmp_path, ".tmp-ckpt-00000003-deadbeef")
    _leftover(tmp_path, ".tmp-ckpt-00000001-deleted")
    with start_server(device="cpu", checkpoint_dir=tmp_path):
        assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".tmp-")) == []


def test_temporary_directories_of_a_save_in_another_process_are_left_alone(tmp_path):
    _leftover(tmp_path, ".tmp-ckpt-00000003-deadbeef")
    store = CheckpointStore(tmp_path)
    with open(tmp_path / LOCK_FILE, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)  # another process saving right now
        assert store.remove_stale_temp_entries() == 0
        fcntl.flock(handle, fcntl.LOCK_UN)
    assert (tmp_path / ".tmp-ckpt-00000003-deadbeef").exists()
    assert store.remove_stale_temp_entries() == 1


def test_a_full_disk_says_what_helps(tmp_path, monkeypatch):
    def disk_full(self, state):
        raise OSError(errno.ENOSPC, "No space left on device")

    with (
        start_server(device="cpu", checkpoint_dir=tmp_path, checkpoint_every="off") as server,
        Client(server.address) as client,
    ):
        client.create_model("job", "sgd", {"w": np.ones(4, np.float32)})
        monkeypatch.setattr(CheckpointStore, "save", disk_full)
        with pytest.raises(ResourceExhaustedError) as error:
            client.checkpoint()
    message = str(error.value)
    for words in (
        "bytes free",
        "Free space there",
        "--checkpoint-keep",
        "larger disk",
        "previous checkpoints are intact",
    ):
        assert words in message


def test_a_checkpoint_with_a_step_beyond_the_bound_is_refused_at_start_up(tmp_path):
    with (
        start_server(device="cpu", checkpoint_dir=tmp_path, checkpoint_every="off") as server,
        Client(server.address) as client,
    ):
        client.create_model("job", "sgd", {"w": np.ones(4, np.float32)})
    store = CheckpointStore(tmp_path)
    state = store.load(store.list()[-1].path)
    state["models"][0]["step"] = 2**63 - 1  # as an unbounded SetWeights once allowed
    store.save(state)
    with pytest.raises(FailedPreconditionError, match="beyond the bound"):
        start_server(device="cpu", checkpoint_dir=tmp_path)
