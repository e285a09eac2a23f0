"""Model lifecycle: `optserve delete`, who created a model and its last activity, --model-ttl."""

from __future__ import annotations

import json
import logging
import os
import pathlib
import re
import signal
import subprocess
import sys
import threading
import time

import numpy as np
import pytest

from optserve.client import Client, inspect
from optserve.client.client import FailedPreconditionError, NotFoundError
from optserve.server.app import start_server
from optserve.server.cli import build_parser
from optserve.server.cli import main as optserve_main
from optserve.server.errors import InvalidArgumentError

VARIABLES = {"w": np.ones(4, np.float32)}


def _optserve_command() -> list[str]:
    script = pathlib.Path(sys.executable).with_name("optserve")
    return [str(script)] if script.exists() else [sys.executable, "-m", "optserve.server.cli"]


def _run(capsys, argv):
    code = optserve_main(argv)
    out, err = capsys.readouterr()
    return code, out, err


def _wait_for(condition, what: str, deadline_s: float = 20.0):
    deadline = time.monotonic() + deadline_s
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def _park_worker(address: str, model_id: str, worker_index: int = 0):
    """A worker pushing step 0 of a 2-worker sync model: it waits there for the other one."""
    errors: list[BaseException] = []

    def push():
        try:
            with Client(address, timeout=30) as client:
                client.push(model_id, {"w": np.ones(4, np.float32)}, worker_index=worker_index, step=0)
        except BaseException as error:  # noqa: BLE001 - handed to the test
            errors.append(error)

    thread = threading.Thread(target=push, daemon=True)
    thread.start()
    with Client(address) as client:
        _wait_for(lambda: client.list_models(model_id)[0].waiting_workers == [worker_index], "the parked push")
    return thread, errors


# ----------------------------------------------------------------- optserve delete


def test_delete_removes_the_model_and_says_what_it_was(address, capsys):
    with Client(address) as client:
        client.create_model("job", "adam", VARIABLES)
        client.push("job", {"w": np.ones(4, np.float32)})
    code, out, err = _run(capsys, ["delete", address, "job"])
    assert code == 0, err
    assert "Deleted model 'job'" in out and "Adam, step 1, iterations 1, 1 variable (4 parameters)" in out
    assert "last activity: push by worker 0" in out
    with Client(address) as client:
        assert client.list_models() == []


def test_delete_of_an_unknown_model_exits_1_and_names_the_models_there(address, capsys):
    with Client(address) as client:
        client.create_model("kept", "sgd", VARIABLES)
    code, out, err = _run(capsys, ["delete", address, "gone"])
    assert code == 1
    assert out == ""
    assert "No model 'gone'" in err and "'kept'" in err
    with Client(address) as client:
        assert [m.model_id for m in client.list_models()] == ["kept"]


def test_delete_refuses_a_model_with_a_parked_worker_unless_forced(address, capsys):
    with Client(address) as client:
        client.create_model("sync", "sgd", VARIABLES, num_workers=2, sync_timeout_s=60)
    thread, errors = _park_worker(address, "sync")
    code, out, err = _run(capsys, ["delete", address, "sync"])
    assert code == 1
    assert "not deleted" in err and "workers [0] pushed step 0" in err and "--force" in err
    with Client(address) as client:
        assert client.list_models("sync")[0].waiting_workers == [0]  # unchanged, the worker still waits
    code, out, err = _run(capsys, ["delete", address, "sync", "--force"])
    assert code == 0, err
    thread.join(10)
    assert len(errors) == 1 and isinstance(errors[0], FailedPreconditionError)
    assert "was deleted" in errors[0].message


def test_delete_if_idle_through_the_client(address):
    with Client(address) as client:
        client.create_model("m", "sgd", VARIABLES)
        assert client.delete_model("m", if_idle=True) is True
        assert client.delete_model("m", if_idle=True) is False


def test_delete_of_an_unreachable_server_exits_2(capsys):
    code, out, err = _run(capsys, ["delete", "127.0.0.1:1", "m", "--timeout", "2"])
    assert code == 2 and "cannot reach" in err


def test_optserve_delete_as_a_command(address):
    with Client(address) as client:
        client.create_model("cli", "sgd", VARIABLES)
    run = subprocess.run([*_optserve_command(), "delete", address, "cli"], capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stderr
    assert "Deleted model 'cli'" in run.stdout
    run = subprocess.run([*_optserve_command(), "delete", address, "cli"], capture_output=True, text=True, timeout=60)
    assert run.returncode == 1 and "No model 'cli'" in run.stderr


# ----------------------------------------------------------------- activity


def test_listing_reports_the_creator_and_the_last_activity(address):
    before = time.time()
    with Client(address) as client:
        client.create_model("job", "sgd", VARIABLES, worker_index=3, num_workers=4, mode="async")
        activity = client.list_models("job")[0].activity
        assert activity.creator_worker == 3
        assert activity.creator_peer.startswith("ipv")  # the creator's address as gRPC saw it
        assert before - 1 <= activity.created_unix_s <= time.time() + 1
        assert activity.last_activity == "create" and activity.calls_in_flight == 0
        client.push("job", {"w": np.ones(4, np.float32)}, worker_index=2)
        activity = client.list_models("job")[0].activity
        assert (activity.last_activity, activity.last_worker) == ("push", 2)
        assert activity.last_activity_unix_s >= activity.created_unix_s
        client.pull("job")
        assert client.list_models("job")[0].activity.last_activity == "pull"
        client.get_weights("job")
        assert client.list_models("job")[0].activity.last_activity == "get_weights"
        client.set_weights("job", variables={"w": np.zeros(4, np.float32)})
        assert client.list_models("job")[0].activity.last_activity == "set_weights"
        client.create_model("job", "sgd", VARIABLES, worker_index=1, num_workers=4, mode="async")
        activity = client.list_models("job")[0].activity
        assert (activity.last_activity, activity.last_worker, activity.creator_worker) == ("join", 1, 3)
        # Listing is not activity: watching a model never keeps it alive.
        time.sleep(0.2)
        assert client.list_models("job")[0].activity.idle_s >= 0.2


def test_a_creator_that_does_not_say_its_index(address):
    with Client(address) as client:
        client.create_model("anon", "sgd", VARIABLES)
        assert client.list_models("anon")[0].activity.creator_worker is None


def test_a_parked_worker_is_a_call_in_flight(address):
    with Client(address) as client:
        client.create_model("sync", "sgd", VARIABLES, num_workers=2, sync_timeout_s=60)
    thread, _ = _park_worker(address, "sync", worker_index=1)
    with Client(address) as client:
        activity = client.list_models("sync")[0].activity
        assert activity.calls_in_flight == 1 and activity.idle_s == 0 and activity.in_use
        assert activity.describe_last() == "in use (1 call in flight; last: push by worker 1)"
        client.push("sync", {"w": np.ones(4, np.float32)}, worker_index=0, step=0)
    thread.join(10)
    with Client(address) as client:
        assert client.list_models("sync")[0].activity.calls_in_flight == 0


def test_inspect_shows_the_last_activity(address, capsys):
    with Client(address) as client:
        client.create_model("job", "sgd", VARIABLES, worker_index=0)
        client.push("job", {"w": np.ones(4, np.float32)})
    assert inspect.main([address]) == 0
    out, _ = capsys.readouterr()
    assert "LAST ACTIVITY" in out.splitlines()[2]
    assert "push by worker 0, " in out and " s ago" in out
    assert inspect.main([address, "job"]) == 0
    out, _ = capsys.readouterr()
    assert "created by:" in out and "worker 0 (ipv" in out and " UTC" in out
    assert "last activity: push by worker 0" in out
    assert inspect.main([address, "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    activity = data["models"][0]["activity"]
    assert activity["creator_worker"] == 0 and activity["last_activity"] == "push"
    assert activity["last_worker"] == 0 and activity["calls_in_flight"] == 0


def test_activity_survives_a_checkpoint_and_restore(tmp_path):
    with start_server(checkpoint_dir=tmp_path, checkpoint_every="off") as running:
        with Client(running.address) as client:
            client.create_model("job", "sgd", VARIABLES, worker_index=5)
            client.push("job", {"w": np.ones(4, np.float32)}, worker_index=0)
            saved = client.list_models("job")[0].activity
    with start_server(checkpoint_dir=tmp_path, checkpoint_every="off") as running:
        with Client(running.address) as client:
            restored = client.list_models("job")[0].activity
    assert restored.creator_worker == 5 and restored.creator_peer == saved.creator_peer
    assert restored.created_unix_s == saved.created_unix_s
    assert (restored.last_activity, restored.last_worker) == ("push", 0)
    assert restored.last_activity_unix_s == saved.last_activity_unix_s


# ----------------------------------------------------------------- --model-ttl

TTL_S = 1.5


def _model_ids(address: str) -> set[str]:
    with Client(address) as client:
        return {m.model_id for m in client.list_models()}


def test_model_ttl_deletes_idle_models_but_never_one_in_use(caplog):
    caplog.set_level(logging.INFO, logger="optserve.server.registry")
    with start_server(model_ttl_s=TTL_S) as running:
        address = running.address
        with Client(address) as client:
            client.create_model("idle", "sgd", VARIABLES)
            client.create_model("busy", "sgd", VARIABLES, mode="async")
            client.create_model("parked", "sgd", VARIABLES, num_workers=2, sync_timeout_s=120)
        thread, errors = _park_worker(address, "parked")
        stop = threading.Event()

        def keep_busy():
            with Client(address) as client:
                while not stop.is_set():
                    client.push("busy", {"w": np.ones(4, np.float32)})
                    stop.wait(0.05)

        pusher = threading.Thread(target=keep_busy, daemon=True)
        pusher.start()
        try:
            _wait_for(lambda: "idle" not in _model_ids(address), "the idle model to expire")
            # Two more TTLs: the model pushed to and the one with a parked worker stay.
            time.sleep(2 * TTL_S)
            assert _model_ids(address) == {"busy", "parked"}
        finally:
            stop.set()
            pusher.join(10)
        with Client(address) as client:
            client.push("parked", {"w": np.ones(4, np.float32)}, worker_index=1, step=0)
        thread.join(10)
        assert errors == []
        # Nobody uses them any more: both go too.
        _wait_for(lambda: not _model_ids(address), "the finished models to expire")
        with Client(address) as client, pytest.raises(NotFoundError):
            client.push("busy", {"w": np.ones(4, np.float32)})
    messages = [r.getMessage() for r in caplog.records if "--model-ttl" in r.getMessage()]
    assert any(m.startswith("model 'idle' deleted after") and "last activity: create" in m for m in messages)
    assert any(m.startswith("model 'busy' deleted after") and "last activity: push by worker 0" in m for m in messages)


def test_model_ttl_leaves_no_expired_model_in_the_checkpoints(tmp_path):
    with start_server(model_ttl_s=TTL_S, checkpoint_dir=tmp_path, checkpoint_every="off") as running:
        with Client(running.address) as client:
            client.create_model("old", "sgd", VARIABLES)
            client.checkpoint()  # holds "old"
        _wait_for(lambda: not _model_ids(running.address), "the model to expire")
        running.stop(final_checkpoint=False)  # as a crash would: only what was written counts
    with start_server(checkpoint_dir=tmp_path) as running:
        assert _model_ids(running.address) == set()


def test_model_ttl_option_is_checked():
    with pytest.raises(InvalidArgumentError, match="model_ttl_s"):
        start_server(model_ttl_s=-1.0)
    with pytest.raises(InvalidArgumentError, match="model_ttl_s"):
        start_server(model_ttl_s=float("inf"))
    parser = build_parser()
    assert parser.parse_args(["serve", "--model-ttl", "10m"]).model_ttl == 600
    assert parser.parse_args(["serve", "--model-ttl", "90"]).model_ttl == 90
    assert parser.parse_args(["serve", "--model-ttl", "1.5h"]).model_ttl == 5400
    assert parser.parse_args(["serve", "--model-ttl", "off"]).model_ttl == 0
    assert parser.parse_args(["serve"]).model_ttl == 0
    for bad in ("-5", "soon", "10x", "inf"):
        with pytest.raises(SystemExit):
            parser.parse_args(["serve", "--model-ttl", bad])


def test_optserve_serve_with_a_model_ttl():
    command = [*_optserve_command(), "serve", "--port", "0", "--device", "cpu", "--model-ttl", "1s"]
    with subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=dict(os.environ, PYTHONUNBUFFERED="1")
    ) as process:
        try:
            address = re.search(r"optserve listening on (\S+)", process.stdout.readline()).group(1)
            with Client(address) as client:
                client.create_model("job", "sgd", VARIABLES, worker_index=0)
            _wait_for(lambda: not _model_ids(address), "the model to expire")
            process.send_signal(signal.SIGTERM)
            assert process.wait(timeout=30) == 0
            log = process.stderr.read()
        finally:
            if process.poll() is None:
                process.kill()
    assert "idle models deleted after 1 s" in log
    assert re.search(r"model 'job' deleted after \d+ s idle \(--model-ttl 1 s; last activity: create\)", log), log


def test_delete_of_a_sharded_model_deletes_every_piece(capsys):
    servers = [start_server(device="cpu") for _ in range(2)]
    try:
        shards = ",".join(server.address for server in servers)
        variables = {"a": np.ones((8, 4), np.float32), "b": np.ones(6, np.float32)}
        with Client(shards) as client:
            client.create_model("big", "sgd", variables)
        code, out, err = _run(capsys, ["delete", shards, "big"])
        assert code == 0, err
        assert "Deleted model 'big'" in out
        for server in servers:
            assert _model_ids(server.address) == set()
        code, _, err = _run(capsys, ["delete", shards, "big"])
        assert code == 1 and "big" in err
    finally:
        for server in servers:
            server.stop()
