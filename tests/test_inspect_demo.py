"""`optserve inspect` and `optserve demo` against real servers."""

from __future__ import annotations

import json
import pathlib
import re
import subprocess
import sys

import numpy as np
import pytest

from optserve.client import Client, demo, inspect


@pytest.fixture
def populated(address):
    with Client(address) as client:
        client.create_model(
            "mlp",
            {"class_name": "Adam", "config": {"learning_rate": 0.01}},
            {"dense/kernel": np.full((3, 4), 2.0, np.float32), "dense/bias": np.zeros(4, np.float32)},
            num_workers=2,
            sync_timeout_s=5.0,
        )
        client.create_model("linear", "sgd", {"w": np.ones(5, np.float64)}, mode="async")
    return address


def _run_inspect(capsys, argv):
    code = inspect.main(argv)
    out, err = capsys.readouterr()
    return code, out, err


def test_inspect_lists_the_models(populated, capsys):
    code, out, _ = _run_inspect(capsys, [populated])
    assert code == 0
    assert "2 models on " + populated in out
    header, *rows = [line for line in out.splitlines()[2:] if line.strip()]
    assert header.split()[:4] == ["MODEL", "OPTIMIZER", "MODE", "WORKERS"]
    by_id = {row.split()[0]: row.split() for row in rows}
    assert by_id["mlp"][1:5] == ["Adam", "sync", "2", "0"]
    assert by_id["linear"][2:4] == ["async", "1"]
    assert by_id["mlp"][8] == "16"  # parameters (the last activity follows)


def test_inspect_shows_one_model_with_norms_and_slots(populated, capsys):
    code, out, _ = _run_inspect(capsys, [populated, "mlp"])
    assert code == 0
    assert re.search(r"optimizer:\s+Adam\(", out) and re.search(r"mode:\s+sync, 2 workers", out)
    kernel_row = next(line for line in out.splitlines() if line.startswith("dense/kernel"))
    assert kernel_row.split()[1:6] == ["(3,", "4)", "float32", "6.9282", "momentum,"]  # norm of 12 twos


def test_inspect_slots_flag_fetches_slot_norms(populated, capsys):
    code, out, _ = _run_inspect(capsys, [populated, "mlp", "--slots"])
    assert code == 0
    assert re.search(r"^\s+/velocity\s+\(3, 4\)\s+float32\s+0$", out, re.M)


def test_inspect_json(populated, capsys):
    code, out, _ = _run_inspect(capsys, [populated, "--json"])
    assert code == 0
    data = json.loads(out)
    assert {m["model_id"] for m in data["models"]} == {"mlp", "linear"}
    code, out, _ = _run_inspect(capsys, [populated, "mlp", "--json", "--slots"])
    model = json.loads(out)
    assert model["optimizer"] == "Adam" and model["num_workers"] == 2
    assert model["variables"][0] == {
        "name": "dense/kernel",
        "shape": [3, 4],
        "dtype": "float32",
        "slots": ["momentum", "velocity"],
        "norm": pytest.approx(np.sqrt(48)),
    }
    assert model["slot_stats"]["dense/bias"]["momentum"] == {"shape": [4], "dtype": "float32", "norm": 0.0}


def test_inspect_unknown_model(populated, capsys):
    code, _, err = _run_inspect(capsys, [populated, "nope"])
    assert code == inspect.EXIT_NOT_FOUND and "'nope'" in err


def test_inspect_unreachable_server(capsys):
    code, out, err = _run_inspect(capsys, ["127.0.0.1:1", "--timeout", "2"])
    assert code == inspect.EXIT_UNREACHABLE and out == ""
    assert "cannot reach a server at 127.0.0.1:1" in err


def test_demo_against_a_running_server(address, capsys):
    code = demo.main(["--address", address, "--steps", "20", "--batch-size", "32"])
    out, err = capsys.readouterr()
    assert code == 0, out + err
    assert "step 20/20" in out and "The loss fell" in out
    with Client(address) as client:
        assert client.list_models() == []  # the demo cleans up after itself


def test_numpy_gradients_match_finite_differences():
    params = {k: v.astype(np.float64) for k, v in demo.initial_params(3).items()}
    x, y = demo.make_batch(np.random.default_rng(0), 8)
    x = x.astype(np.float64)
    _, grads = demo.loss_and_grads(params, x, y)
    for name in params:
        index = (0,) * params[name].ndim
        shifted = {k: v.copy() for k, v in params.items()}
        shifted[name][index] += 1e-6
        numeric = (
            demo.loss_and_grads(shifted, x, y, with_grads=False)[0]
            - demo.loss_and_grads(params, x, y, with_grads=False)[0]
        ) / 1e-6
        assert grads[name][index] == pytest.approx(numeric, rel=1e-3, abs=1e-6)


def _optserve_command() -> list[str]:
    script = pathlib.Path(sys.executable).with_name("optserve")
    if script.exists():
        return [str(script)]
    return [sys.executable, "-m", "optserve.server.cli"]


def test_optserve_demo_starts_its_own_server():
    run = subprocess.run([*_optserve_command(), "demo", "--steps", "30"], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stdout + run.stderr
    losses = [float(m) for m in re.findall(r"step\s+\d+/30\s+loss (\d+\.\d+)", run.stdout)]
    assert len(losses) >= 3 and losses[-1] < losses[0]
    assert re.search(r"Held-out loss:\s+(\S+) -> (\S+)", run.stdout)
    assert "listening" not in run.stderr or "Traceback" not in run.stderr


def test_join_mode_worker_checkpoints_the_finished_job(tmp_path, capsys):
    """A finished job is made durable: restored workers would never come back for its last steps."""
    from optserve.server.app import start_server
    from optserve.server.checkpoint import CheckpointStore

    running = start_server(device="cpu", checkpoint_dir=str(tmp_path), checkpoint_every="off")
    try:
        code = demo.main(
            [
                "--address",
                running.address,
                "--workers",
                "1",
                "--worker-index",
                "0",
                "--num-workers",
                "1",
                "--steps",
                "5",
                "--model-id",
                "joined",
            ]
        )
        assert code == 0, capsys.readouterr().err
        state, _ = CheckpointStore(tmp_path).load_latest()
        (saved,) = state["models"]
        assert saved["spec"]["model_id"] == "joined" and saved["step"] == 5
    finally:
        running.stop()
    assert "final state checkpointed" in capsys.readouterr().out


def test_join_mode_worker_without_checkpoints_still_succeeds(address, capsys):
    code = demo.main(
        [
            "--address",
            address,
            "--workers",
            "1",
            "--worker-index",
            "0",
            "--num-workers",
            "1",
            "--steps",
            "3",
            "--model-id",
            "joined",
        ]
    )
    assert code == 0
    assert "checkpointed" not in capsys.readouterr().out
