"""`optserve inspect ADDRESS --watch` / `optserve top`: a live table, driven for a fixed number of refreshes."""

from __future__ import annotations

import io
import re
import socket
import subprocess
import sys
import threading

import numpy as np
import pytest
import rpc_helpers

from optserve.client import inspect
from optserve.client.watch import CLEAR, watch

GRADIENT = {"w": np.ones(4, np.float32)}


def _table(frame: str) -> dict[str, dict[str, str]]:
    lines = frame.splitlines()
    header_at = next(i for i, line in enumerate(lines) if line.startswith("MODEL"))
    header = lines[header_at]
    starts = [m.start() for m in re.finditer(r"\S+(?: \S+)*", header)]
    names = re.findall(r"\S+(?: \S+)*", header)
    rows = {}
    for line in lines[header_at + 1 :]:
        if not line.strip() or line.startswith("unreachable"):
            break
        cells = [line[a:b].strip() for a, b in zip(starts, starts[1:] + [None])]
        rows[cells[0]] = dict(zip(names, cells))
    return rows


@pytest.fixture
def training(stub):
    """A 2-worker sync model trained continuously (SGD 0.1, gradient 1 per worker) until stopped."""
    rpc_helpers.create_model(stub, "live", {"w": np.zeros(4, np.float32)}, rpc_helpers.sgd(0.1), num_workers=2)
    stop = threading.Event()

    def worker(index):
        step = 0
        while not stop.is_set():
            rpc_helpers.push(stub, "live", index, step, GRADIENT)
            step += 1

    threads = [threading.Thread(target=worker, args=(i,), daemon=True) for i in range(2)]
    for thread in threads:
        thread.start()
    yield
    stop.set()
    for thread in threads:
        thread.join(30)


def test_watch_refreshes_a_table_with_rates_latency_and_norms(address, training, capsys):
    assert inspect.main([address, "--watch", "--count", "3", "--interval", "0.4"]) == 0
    out = capsys.readouterr().out
    assert CLEAR not in out  # not a terminal: frames one after the other
    frames = re.split(r"\n\n(?=optserve )", out)
    assert len(re.findall(r"^optserve \S+  \d\d:\d\d:\d\d  1 model$", out, re.M)) == 3
    first, last = _table(frames[0])["live"], _table(frames[-1])["live"]
    assert first["STEPS/S"] == "-" and first["PUSH MS"] == "-"  # no earlier reading to compare with
    assert float(last["STEPS/S"]) > 0 and float(last["PUSH MS"]) > 0
    assert re.fullmatch(r"[012]/2", last["WAITING"])
    assert float(last["LEARNING RATE"]) == pytest.approx(0.1)
    assert int(last["ITERATIONS"]) == int(last["STEP"]) > 0
    # Each step applies 0.1 * (1 + 1) to each of the 4 elements: an update of norm 0.2 * 2 = 0.4.
    assert float(last["UPDATE NORM"]) == pytest.approx(0.4, rel=1e-5)
    assert float(last["VARIABLE NORM"]) == pytest.approx(0.4 * int(last["ITERATIONS"]), rel=0.05)


def test_on_a_terminal_each_refresh_redraws_in_place(address):
    out = io.StringIO()
    assert watch([address], interval=0.05, count=2, out=out, clear=True) == 0
    assert out.getvalue().count(CLEAR) == 2 and "No models." in out.getvalue()


def test_an_unreachable_server_is_shown_and_the_watch_goes_on():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    out = io.StringIO()
    assert watch([f"127.0.0.1:{port}"], interval=0.05, count=2, timeout=1, out=out, clear=False) == 0
    assert out.getvalue().count("unreachable: 127.0.0.1:") == 2


def test_optserve_top_is_inspect_watch(address):
    run = subprocess.run(
        [sys.executable, "-m", "optserve.server", "top", address, "--count", "1"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert run.returncode == 0, run.stderr
    assert run.stdout.startswith(f"optserve {address}") and "No models." in run.stdout


@pytest.mark.parametrize(
    "argv, message",
    [
        (["127.0.0.1:1", "--count", "2"], "--count needs --watch"),
        (["127.0.0.1:1", "--watch", "--json"], "does not combine"),
        (["127.0.0.1:1", "--watch", "--interval", "0"], "must be > 0"),
    ],
)
def test_watch_usage_errors(argv, message, capsys):
    with pytest.raises(SystemExit) as info:
        inspect.main(argv)
    assert info.value.code == 2 and message in capsys.readouterr().err
