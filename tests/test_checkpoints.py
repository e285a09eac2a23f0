"""Checkpoints of a running server: on request, periodic, at shutdown; restoring them; damaged ones.

A crash is ``RunningServer.stop(final_checkpoint=False)``: what changed after the
last checkpoint is lost, exactly as when the process is killed. Starting a new
server on the same directory is the restart.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import os
import re
import signal
import subprocess
import sys
import threading

import numpy as np
import pytest
import rpc_helpers as rpc
from grpc_health.v1 import health_pb2

from optserve.client.client import (
    Client,
    FailedPreconditionError,
    ResourceExhaustedError,
    StepMismatchError,
    UnavailableError,
)
from optserve.server import cli, errors
from optserve.server.app import ParameterServer, start_server
from optserve.server.checkpoint import (
    DATA_FILE,
    MANIFEST_FILE,
    CheckpointSchedule,
    CheckpointStore,
    parse_checkpoint_every,
)
from optserve.server.errors import InvalidArgumentError

NADAM = {
    "class_name": "Nadam",
    "config": {
        "use_ema": True,
        "learning_rate": {
            "class_name": "ExponentialDecay",
            "config": {"initial_learning_rate": 0.1, "decay_steps": 3, "decay_rate": 0.5},
        },
    },
}
SGD = {"class_name": "SGD", "config": {"learning_rate": 1.0}}


def _variables():
    return {"w": np.arange(6, dtype=np.float32).reshape(2, 3), "b": np.array([0.5, -1.0], np.float32)}


def _grads(step: int, worker: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng((step, worker))
    return {name: rng.standard_normal(value.shape).astype(np.float32) for name, value in _variables().items()}


def _serve(directory, **options):
    options.setdefault("checkpoint_every", "off")
    return start_server(device="cpu", checkpoint_dir=directory, **options)


def _sync_step(clients: list[Client], model_id: str, step: int) -> None:
    """Every worker of ``clients`` pushes ``step``; returns once it is applied."""
    threads = [
        threading.Thread(
            target=client.push, args=(model_id, _grads(step, index)), kwargs={"worker_index": index, "step": step}
        )
        for index, client in enumerate(clients[1:], start=1)
    ]
    for thread in threads:
        thread.start()
    clients[0].push(model_id, _grads(step, 0), worker_index=0, step=step)
    for thread in threads:
        thread.join()


def _everything(client: Client, model_id: str):
    info = client.list_models(model_id)[0]
    weights = client.get_weights(model_id, include_variables=True)
    return info, weights


def _assert_same_state(before, after) -> None:
    (info_a, weights_a), (info_b, weights_b) = before, after
    for field in (
        "step",
        "iterations",
        "raw_iterations",
        "learning_rate",
        "scalars",
        "num_workers",
        "mode",
        "optimizer_config",
        "sync_timeout_s",
        "timeout_policy",
    ):
        assert getattr(info_a, field) == getattr(info_b, field), field
    assert [(v.name, v.shape, v.dtype, v.slots) for v in info_a.variables] == [
        (v.name, v.shape, v.dtype, v.slots) for v in info_b.variables
    ]
    assert list(weights_a.variables) == list(weights_b.variables)
    for name in weights_a.variables:
        assert weights_a.variables[name].tobytes() == weights_b.variables[name].tobytes(), name
        assert list(weights_a.slots.get(name, {})) == list(weights_b.slots.get(name, {}))
        for slot, value in weights_a.slots.get(name, {}).items():
            assert value.tobytes() == weights_b.slots[name][slot].tobytes(), (name, slot)


def _checkpoint_step(path, model_id: str) -> int:
    state = CheckpointStore(path.parent).load(path)
    return next(model["step"] for model in state["models"] if model["spec"]["model_id"] == model_id)


# ---------------------------------------------------------------------------- restore = the state before


def test_a_restored_server_holds_exactly_the_state_it_checkpointed_and_trains_on_identically(tmp_path):
    """Nadam with EMA and a schedule: variables, slots, counters, u_product, schedule position, step."""
    with (
        start_server(device="cpu") as reference,
        Client(reference.address) as ref,
        Client(reference.address) as ref_two,
    ):
        ref.create_model("sync", NADAM, _variables(), num_workers=2)
        ref.create_model("async", SGD, _variables(), mode="async")
        server = _serve(tmp_path)
        with Client(server.address) as one, Client(server.address) as two:
            one.create_model("sync", NADAM, _variables(), num_workers=2)
            one.create_model("async", SGD, _variables(), mode="async")
            for step in range(4):
                _sync_step([one, two], "sync", step)
                _sync_step([ref, ref_two], "sync", step)
                one.push("async", _grads(step), step=step)
                ref.push("async", _grads(step), step=step)
            path, models = one.checkpoint()
            assert models == 2 and os.path.dirname(path) == str(tmp_path)
            before = {m: _everything(one, m) for m in ("sync", "async")}
        server.stop(final_checkpoint=False)

        with _serve(tmp_path) as restarted, Client(restarted.address) as one, Client(restarted.address) as two:
            for model_id, state in before.items():
                _assert_same_state(state, _everything(one, model_id))
            assert before["sync"][0].scalars["u_product"] != 1.0  # there was optimizer-wide state to carry
            # One more step on both: the schedule position, u_product and slots all carried over.
            _sync_step([one, two], "sync", 4)
            _sync_step([ref, ref_two], "sync", 4)
            _assert_same_state(_everything(ref, "sync"), _everything(one, "sync"))


def test_after_a_crash_pushes_the_checkpoint_counted_are_duplicates_and_later_ones_are_told_the_step(tmp_path):
    server = _serve(tmp_path)
    with Client(server.address) as one, Client(server.address, retries=0) as two:
        one.create_model("job", SGD, _variables(), num_workers=2)
        for step in range(3):
            _sync_step([one, two], "job", step)
        one.checkpoint()  # steps 0-2 are in it
        _sync_step([one, two], "job", 3)  # lost in the crash
        refused = []
        parked = threading.Thread(
            target=lambda: refused.append(
                pytest.raises(UnavailableError, two.push, "job", _grads(4, 1), worker_index=1, step=4)
            )
        )
        parked.start()  # half of step 4 is collected when the server dies
        rpc.wait_until(lambda: one.list_models("job")[0].waiting_workers == [1])
        server.stop(final_checkpoint=False)
        parked.join()
        assert refused, "the parked worker was not told the server went away"

    with _serve(tmp_path) as restarted, Client(restarted.address) as one, Client(restarted.address) as two:
        info = one.list_models("job")[0]
        assert (info.step, info.iterations, info.waiting_workers) == (3, 3, [])
        retried = one.push("job", _grads(2, 0), worker_index=0, step=2)  # its answer was lost in the crash
        assert (retried.duplicate, retried.step, retried.iterations) == (True, 3, 3)
        with pytest.raises(StepMismatchError) as ahead:
            one.push("job", _grads(4, 0), worker_index=0, step=4)
        assert ahead.value.current_step == 3
        assert one.resync("job", 0) == 3
        _sync_step([one, two], "job", 3)  # the lost step, pushed again
        assert one.list_models("job")[0].iterations == 4


def test_async_pushes_the_checkpoint_counted_are_duplicates_after_a_restart(tmp_path):
    server = _serve(tmp_path)
    with Client(server.address) as client:
        client.create_model("free", SGD, _variables(), mode="async")
        for step in (10, 11):
            client.push("free", _grads(step), step=step)
        client.checkpoint()
    server.stop(final_checkpoint=False)
    with _serve(tmp_path) as restarted, Client(restarted.address) as client:
        assert client.push("free", _grads(11), step=11).duplicate
        assert not client.push("free", _grads(12), step=12).duplicate
        assert client.list_models("free")[0].iterations == 3


# ---------------------------------------------------------------------------- when checkpoints are written


def test_the_checkpoint_rpc_and_cli_command_write_one_and_say_where(tmp_path, capsys):
    with _serve(tmp_path) as server, Client(server.address) as client:
        client.create_model("job", SGD, _variables())
        client.push("job", _grads(0))
        assert cli.main(["checkpoint", server.address]) == 0
        printed = capsys.readouterr().out.strip()
        assert printed == str(tmp_path / "ckpt-00000001")
        assert _checkpoint_step(tmp_path / "ckpt-00000001", "job") == 1
        path, models = client.checkpoint()
        assert (path, models) == (str(tmp_path / "ckpt-00000002"), 1)


def test_without_a_checkpoint_dir_the_rpc_and_the_cli_say_how_to_get_one(server, capsys):
    with Client(server.address) as client, pytest.raises(FailedPreconditionError, match="--checkpoint-dir"):
        client.checkpoint()
    assert cli.main(["checkpoint", server.address]) == 1
    assert "FAILED_PRECONDITION" in capsys.readouterr().err


def test_periodic_checkpoints_by_steps_keep_the_newest(tmp_path):
    store = CheckpointStore(tmp_path)
    with _serve(tmp_path, checkpoint_every="3steps", checkpoint_keep=2) as server, Client(server.address) as client:
        client.create_model("a", SGD, _variables())
        client.create_model("b", SGD, _variables())
        for step in range(2):
            client.push("a", _grads(step))
        client.push("b", _grads(0))  # updates of all models count together
        rpc.wait_until(lambda: len(store.list()) == 1)
        newest = store.list()[-1].path
        assert (_checkpoint_step(newest, "a"), _checkpoint_step(newest, "b")) == (2, 1)
        for round_ in range(2):
            for step in range(3):
                client.push("a", _grads(step))
            rpc.wait_until(lambda round_=round_: store.list()[-1].sequence == round_ + 2)
        assert [info.sequence for info in store.list()] == [2, 3]  # keep 2
        assert _checkpoint_step(store.list()[-1].path, "a") == 8


def test_periodic_checkpoints_by_time_only_when_something_changed(tmp_path):
    store = CheckpointStore(tmp_path)
    with _serve(tmp_path, checkpoint_every=0.05) as server, Client(server.address) as client:
        client.create_model("job", SGD, _variables())
        client.push("job", _grads(0))
        rpc.wait_until(lambda: store.list() and _checkpoint_step(store.list()[-1].path, "job") == 1)
        written = len(store.list())
        threading.Event().wait(0.3)  # several periods without a change
        assert len(store.list()) == written
        client.push("job", _grads(1))
        rpc.wait_until(lambda: _checkpoint_step(store.list()[-1].path, "job") == 2)


def test_a_failing_save_is_reported_and_the_server_keeps_serving(tmp_path, monkeypatch, caplog):
    def disk_full(self, state):
        raise OSError(errno.ENOSPC, "No space left on device")

    store = CheckpointStore(tmp_path)
    with _serve(tmp_path, checkpoint_every="1step") as server, Client(server.address) as client:
        client.create_model("job", SGD, _variables())
        monkeypatch.setattr(CheckpointStore, "save", disk_full)
        with caplog.at_level(logging.ERROR, logger="optserve.server.checkpoint"):
            client.push("job", _grads(0))  # the save after it fails: logged, nothing else
            rpc.wait_until(lambda: "No space left on device" in caplog.text)
        assert "keeps serving" in caplog.text
        with pytest.raises(ResourceExhaustedError, match="No space left on device.*previous checkpoints are intact"):
            client.checkpoint()
        monkeypatch.undo()  # space again
        assert client.push("job", _grads(1)).step == 2
        rpc.wait_until(lambda: store.list() and _checkpoint_step(store.list()[-1].path, "job") == 2)
    assert [info.sequence for info in store.list()] == [1]


def test_stop_writes_a_final_checkpoint_of_what_changed(tmp_path):
    store = CheckpointStore(tmp_path)
    server = _serve(tmp_path)
    with Client(server.address) as client:
        client.create_model("job", SGD, _variables())
        client.push("job", _grads(0))
    server.stop()
    assert [info.sequence for info in store.list()] == [1]
    assert _checkpoint_step(store.list()[-1].path, "job") == 1
    _serve(tmp_path).stop()  # restored, nothing changed: no new checkpoint
    assert [info.sequence for info in store.list()] == [1]


# ---------------------------------------------------------------------------- damaged checkpoints


def _damage_truncated(path):
    data = path / DATA_FILE
    os.truncate(data, data.stat().st_size - 3)


def _damage_flipped_byte(path):
    with open(path / DATA_FILE, "r+b") as handle:
        handle.seek(10)
        byte = handle.read(1)
        handle.seek(10)
        handle.write(bytes([byte[0] ^ 0xFF]))


def _damage_manifest(path):
    text = (path / MANIFEST_FILE).read_text()
    (path / MANIFEST_FILE).write_text(text[: len(text) // 2])


@pytest.mark.parametrize(
    "damage",
    [_damage_truncated, _damage_flipped_byte, _damage_manifest],
    ids=["truncated-data", "corrupted-data", "half-a-manifest"],
)
def test_a_damaged_newest_checkpoint_falls_back_to_the_previous_one(tmp_path, caplog, damage):
    server = _serve(tmp_path)
    with Client(server.address) as client:
        client.create_model("job", SGD, _variables())
        client.push("job", _grads(0))
        client.checkpoint()
        client.push("job", _grads(1))
        newest, _ = client.checkpoint()
    server.stop(final_checkpoint=False)
    damage(tmp_path / os.path.basename(newest))
    # A save that died half-way leaves a temporary directory: never read, removed at start-up.
    (tmp_path / ".tmp-ckpt-00000003-dead").mkdir()
    (tmp_path / ".tmp-ckpt-00000003-dead" / MANIFEST_FILE).write_text("{")
    with caplog.at_level(logging.WARNING), _serve(tmp_path) as restarted, Client(restarted.address) as client:
        assert client.list_models("job")[0].step == 1
    assert f"Skipping damaged checkpoint {newest}" in caplog.text
    assert "Removing" in caplog.text and ".tmp-ckpt-00000003-dead" in caplog.text
    assert not (tmp_path / ".tmp-ckpt-00000003-dead").exists()


# ---------------------------------------------------------------------------- restoring: NOT_SERVING


def test_health_is_not_serving_and_calls_unavailable_while_restoring(tmp_path, monkeypatch):
    server = _serve(tmp_path)
    with Client(server.address) as client:
        client.create_model("job", SGD, _variables())
        client.push("job", _grads(0))
    server.stop()

    release = threading.Event()
    load_latest = CheckpointStore.load_latest

    def held_load_latest(self):
        release.wait(10)
        return load_latest(self)

    monkeypatch.setattr(CheckpointStore, "load_latest", held_load_latest)
    restoring = ParameterServer(device="cpu", checkpoint_dir=tmp_path, checkpoint_every="off")
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    started = asyncio.run_coroutine_threadsafe(restoring.start(), loop)
    try:
        rpc.wait_until(lambda: restoring.port)
        address = f"127.0.0.1:{restoring.port}"
        rpc.wait_until(lambda: _health_or_none(address) is not None)
        for service in ("", rpc.SERVICE):
            assert rpc.health_status(address, service) == health_pb2.HealthCheckResponse.NOT_SERVING
        with Client(address, retries=0) as client, pytest.raises(UnavailableError, match="restoring"):
            client.list_models()
        release.set()
        started.result(10)
        for service in ("", rpc.SERVICE):
            assert rpc.health_status(address, service) == health_pb2.HealthCheckResponse.SERVING
        with Client(address) as client:
            assert client.list_models("job")[0].step == 1
    finally:
        release.set()
        asyncio.run_coroutine_threadsafe(restoring.stop(final_checkpoint=False), loop).result(10)
        loop.call_soon_threadsafe(loop.stop)
        thread.join()
        loop.close()


def _health_or_none(address):
    try:
        return rpc.health_status(address)
    except Exception:  # noqa: BLE001 - not listening yet
        return None


def test_a_checkpoint_that_cannot_be_restored_stops_the_start_with_a_clear_error(tmp_path):
    CheckpointStore(tmp_path).save({"format": "something else", "models": []})
    with pytest.raises(errors.FailedPreconditionError, match="Cannot restore checkpoint .*ckpt-00000001.*move it out"):
        _serve(tmp_path)


# ---------------------------------------------------------------------------- the serve command


def test_sigterm_makes_serve_write_a_final_checkpoint_and_exit_0(tmp_path):
    command = [
        sys.executable,
        "-m",
        "optserve.server",
        "serve",
        "--port",
        "0",
        "--device",
        "cpu",
        "--checkpoint-dir",
        str(tmp_path),
        "--checkpoint-every",
        "off",
    ]
    with subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=dict(os.environ, PYTHONUNBUFFERED="1")
    ) as process:
        try:
            address = re.search(r"optserve listening on (\S+)", process.stdout.readline()).group(1)
            with Client(address) as one, Client(address, retries=0) as two:
                one.create_model("job", SGD, _variables(), num_workers=2)
                for step in range(2):
                    _sync_step([one, two], "job", step)
                failures = []
                parked = threading.Thread(
                    target=lambda: failures.append(
                        pytest.raises(UnavailableError, two.push, "job", _grads(2, 1), worker_index=1, step=2)
                    )
                )
                parked.start()
                rpc.wait_until(lambda: one.list_models("job")[0].waiting_workers == [1])
                process.send_signal(signal.SIGTERM)
                parked.join(15)
                assert failures and "shutting down" in str(failures[0].value)
            assert process.wait(timeout=15) == 0
            log = process.stderr.read()
        finally:
            if process.poll() is None:
                process.kill()
    assert "Final checkpoint" in log and "Traceback" not in log, log
    [checkpoint] = CheckpointStore(tmp_path).list()
    assert _checkpoint_step(checkpoint.path, "job") == 2  # the half-collected step 2 is not in it


# ---------------------------------------------------------------------------- options


@pytest.mark.parametrize(
    "text, expected",
    [
        ("60s", CheckpointSchedule(seconds=60.0)),
        ("5m", CheckpointSchedule(seconds=300.0)),
        ("1h", CheckpointSchedule(seconds=3600.0)),
        ("30", CheckpointSchedule(seconds=30.0)),
        ("0.5s", CheckpointSchedule(seconds=0.5)),
        (2.5, CheckpointSchedule(seconds=2.5)),
        ("500steps", CheckpointSchedule(steps=500)),
        ("500 steps", CheckpointSchedule(steps=500)),
        ("1 step", CheckpointSchedule(steps=1)),
        ("0", CheckpointSchedule()),
        ("off", CheckpointSchedule()),
        (None, CheckpointSchedule()),
    ],
)
def test_checkpoint_every_forms(text, expected):
    assert parse_checkpoint_every(text) == expected


@pytest.mark.parametrize("text", ["-5s", "1.5steps", "5 parsecs", "", "s", float("inf"), True, [60]])
def test_checkpoint_every_refuses_anything_else(text):
    with pytest.raises(InvalidArgumentError, match=r"`checkpoint_every` must be .* Received: checkpoint_every="):
        parse_checkpoint_every(text)


@pytest.mark.parametrize(
    "argv, message",
    [
        (["serve", "--checkpoint-every", "60s"], "--checkpoint-every needs --checkpoint-dir"),
        (["serve", "--checkpoint-keep", "2"], "--checkpoint-keep needs --checkpoint-dir"),
        (["serve", "--checkpoint-dir", "d", "--checkpoint-every", "soon"], "--checkpoint-every: must be a time"),
        (["serve", "--checkpoint-dir", "d", "--checkpoint-keep", "0"], "--checkpoint-keep: must be > 0"),
    ],
)
def test_serve_refuses_bad_checkpoint_flags(argv, message, capsys):
    with pytest.raises(SystemExit) as exited:
        cli.main(argv)
    assert exited.value.code == 2
    assert message in capsys.readouterr().err


def test_serve_refuses_a_checkpoint_dir_that_is_a_file(tmp_path):
    not_a_directory = tmp_path / "file"
    not_a_directory.write_text("")
    with pytest.raises(InvalidArgumentError, match="must be a directory"):
        _serve(not_a_directory)
