"""``optserve inspect ADDRESS --watch`` (also ``optserve top ADDRESS``): a live table of the models.

Every ``--interval`` seconds one ListModels call per server (with variable norms
and update-norm tracking) gives a reading; rates are the differences between two
readings. Per model: step, steps per second, mean push latency, workers waiting
in the step in progress, learning rate, iterations, the L2 norm of the last
update and of all variables. On a terminal the table redraws in place; otherwise
(a pipe, ``--count N`` in scripts and tests) each refresh is printed after the
previous one. A server that stops answering shows as unreachable until it is back.

Each refresh reads every variable once on the server (the norms), and while
watched each update also copies the variables to measure the update's norm: keep
the interval at a few seconds for large models.
"""

from __future__ import annotations

import dataclasses
import math
import sys
import time
from collections.abc import Iterable, Sequence
from typing import TextIO

import grpc

from optserve.client import security
from optserve.protos import optserve_pb2 as pb
from optserve.protos import optserve_pb2_grpc as pb_grpc
from optserve.protos.tensors import GRPC_OPTIONS

CLEAR = "\x1b[H\x1b[2J"
HEADER = [
    "MODEL",
    "STEP",
    "STEPS/S",
    "PUSH MS",
    "WAITING",
    "LEARNING RATE",
    "ITERATIONS",
    "UPDATE NORM",
    "VARIABLE NORM",
]


@dataclasses.dataclass(frozen=True)
class Reading:
    at: float
    info: pb.ModelInfo


class Watcher:
    """Reads the models of one or more servers and formats the differences between readings."""

    def __init__(self, addresses: Sequence[str], model_id: str = "", timeout: float = 5.0, *, tls=None, token=None):
        self.addresses = list(addresses)
        self.model_id = model_id
        self.timeout = timeout
        self._channels = [
            security.open_channel(address, GRPC_OPTIONS, tls=tls, token=token) for address in self.addresses
        ]
        self._stubs = [pb_grpc.ParameterServerStub(channel) for channel in self._channels]
        self._previous: dict[tuple[int, str], Reading] = {}

    def close(self) -> None:
        for channel in self._channels:
            channel.close()

    def __enter__(self) -> Watcher:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    def frame(self) -> str:
        """One refresh: a title line and the table."""
        rows, problems = [], []
        for shard, (address, stub) in enumerate(zip(self.addresses, self._stubs)):
            try:
                infos = self._read(stub)
            except grpc.RpcError as error:
                problems.append(f"{address}: {error.code().name} {error.details() or ''}".rstrip())
                continue
            now = time.monotonic()
            for info in infos:
                key = (shard, info.spec.model_id)
                reading = Reading(now, info)
                name = info.spec.model_id if len(self.addresses) == 1 else f"{shard}:{info.spec.model_id}"
                rows.append(model_row(name, self._previous.get(key), reading))
                self._previous[key] = reading
        where = self.addresses[0] if len(self.addresses) == 1 else f"{len(self.addresses)} servers"
        title = f"optserve {where}  {time.strftime('%H:%M:%S')}  {len(rows)} model{'s' if len(rows) != 1 else ''}"
        lines = [title, ""]
        lines.append(format_table(HEADER, rows) if rows else "No models.")
        lines.extend(f"unreachable: {problem}" for problem in problems)
        return "\n".join(lines)

    def _read(self, stub) -> Iterable[pb.ModelInfo]:
        request = pb.ListModelsRequest(model_id=self.model_id, with_stats=True, track_updates=True)
        return stub.ListModels(request, timeout=self.timeout).models


def model_row(name: str, previous: Reading | None, current: Reading) -> list[str]:
    info = current.info
    steps_per_s = push_ms = "-"
    if previous is not None and current.at > previous.at:
        elapsed = current.at - previous.at
        stepped = info.state.step - previous.info.state.step
        if stepped >= 0:  # a restore or a rewound step makes the difference meaningless
            steps_per_s = f"{stepped / elapsed:.2f}"
        pushes = info.pushes - previous.info.pushes
        if pushes > 0:
            push_ms = f"{1000 * (info.push_seconds - previous.info.push_seconds) / pushes:.1f}"
    if info.spec.mode == pb.ASYNC:
        waiting = "-"
    else:
        waiting = f"{len(info.waiting_workers)}/{info.spec.num_workers}"
    norms = [v.norm for v in info.variables if v.HasField("norm")]
    variable_norm = _number(math.sqrt(sum(n * n for n in norms))) if norms else "-"
    update_norm = _number(info.update_norm) if info.HasField("update_norm") else "-"
    return [
        name,
        str(info.state.step),
        steps_per_s,
        push_ms,
        waiting,
        _number(info.state.learning_rate),
        str(info.state.iterations),
        update_norm,
        variable_norm,
    ]


def format_table(header: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(cell) for cell in column) for column in zip(header, *rows)]
    return "\n".join(
        "  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip() for row in [header, *rows]
    )


def _number(value: float) -> str:
    return f"{value:.6g}"


def watch(
    addresses: Sequence[str],
    *,
    model_id: str = "",
    interval: float = 2.0,
    count: int | None = None,
    timeout: float = 5.0,
    out: TextIO | None = None,
    clear: bool | None = None,
    tls=None,
    token=None,
) -> int:
    """Refresh every ``interval`` seconds, ``count`` times (None: until Ctrl-C). Returns the exit status."""
    out = out or sys.stdout
    if clear is None:
        clear = out.isatty()
    shown = 0
    with Watcher(addresses, model_id, timeout, tls=tls, token=token) as watcher:
        try:
            while count is None or shown < count:
                started = time.monotonic()
                text = watcher.frame()
                out.write((CLEAR + text + "\n") if clear else (text + "\n\n"))
                out.flush()
                shown += 1
                if count is not None and shown >= count:
                    break
                time.sleep(max(0.0, interval - (time.monotonic() - started)))
        except KeyboardInterrupt:
            out.write("\n")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """``optserve top ADDRESS [MODEL]``: the same as ``optserve inspect ADDRESS [MODEL] --watch``."""
    from optserve.client import inspect

    return inspect.main([*(sys.argv[1:] if argv is None else argv), "--watch"])
