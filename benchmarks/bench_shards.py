"""Aggregate push-apply-pull throughput of one model sharded over 1, 2 and 4 server processes.

    python benchmarks/bench_shards.py                   # 64 MB of float32, Adam, 1/2/4 shards
    python benchmarks/bench_shards.py --quick           # fewer steps
    python benchmarks/bench_shards.py --shards 1,2,3 --total-mb 128 --optimizer sgd --json
    python benchmarks/bench_shards.py --two-phase       # global_clipnorm's two-phase step vs none, 2 shards

Every shard is its own ``python -m optserve.server serve --port 0 --device cpu``
process; the client is ``optserve.client.Client(addresses)`` (a ShardedClient
for several addresses), driving one worker in this process that calls
``push_pull`` with the whole model's gradients each step. The model is the same
in every case: ``--total-mb`` of float32 over ``--variables`` variables of
uneven, model-like sizes (a few large kernels, many small ones, bias vectors).
Reported per shard count, after ``--warmup`` untimed steps:

* ``steps/s``: completed push-apply-pull steps per second;
* ``GB/s``: gradient bytes pushed plus variable bytes pulled per second;
* ``vs 1 shard``: the ratio of steps/s to the first case (one shard).

``--two-phase`` measures what ``global_clipnorm`` costs on several shards (a push
held on every shard, its norm terms joined on the client, a CommitStep to every
shard; see ``optserve.client.two_phase``): on ``--two-phase-shards`` shards (default
2), the optimizer without clipping, then with ``global_clipnorm`` (which keeps every
variable whole), then with ``clipnorm`` (also whole, one phase: the same placement
and a norm per variable, so the difference to it is the second round trip).

The shards share this machine's cores with each other and with the client, so
the scaling shows what more processes buy on this host, not on separate hosts.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import numpy as np
from bench_rpc import ServerProcess

from optserve.client import Client

MB = 1 << 20
ROW_ELEMENTS = 256  # every variable is (rows, 256) or a bias vector
SERVER_START_TIMEOUT_S = 60.0


def model_variables(total_bytes: int, count: int, seed: int = 0) -> dict[str, np.ndarray]:
    """``count`` float32 variables of uneven sizes adding up to about ``total_bytes``.

    A quarter are bias-like vectors; the kernels' sizes follow a log-normal spread,
    like the layers of a real network, so the placement has something to balance.
    """
    rng = np.random.default_rng(seed)
    biases = max(1, count // 4)
    kernels = max(1, count - biases)
    bias_rows = [ROW_ELEMENTS * int(rng.integers(1, 5)) for _ in range(biases)]
    budget = total_bytes // 4 - sum(bias_rows)
    weights = rng.lognormal(mean=0.0, sigma=1.0, size=kernels)
    rows = np.maximum(1, np.floor(weights / weights.sum() * budget / ROW_ELEMENTS)).astype(int)
    variables = {}
    for index, count_rows in enumerate(rows):
        variables[f"layer_{index:03d}/kernel"] = np.full((int(count_rows), ROW_ELEMENTS), 0.01, np.float32)
    for index, size in enumerate(bias_rows):
        variables[f"layer_{index:03d}/bias"] = np.zeros(size, np.float32)
    return variables


def run_case(num_shards: int, variables: dict, optimizer, steps: int, warmup: int, label: str = "") -> dict:
    servers = []
    try:
        for _ in range(num_shards):
            servers.append(ServerProcess())
        addresses = [server.address for server in servers]
        gradients = {name: np.full_like(value, 1e-3) for name, value in variables.items()}
        model_bytes = sum(value.nbytes for value in variables.values())
        with Client(addresses, timeout=300) as client:
            info = client.create_model("bench", optimizer, variables)
            imbalance = info.plan.imbalance() if num_shards > 1 else 1.0
            split = len(info.plan.split_variables()) if num_shards > 1 else 0
            for _ in range(warmup):
                client.push_pull("bench", gradients)
            times = []
            for _ in range(steps):
                started = time.perf_counter()
                _, values = client.push_pull("bench", gradients)
                times.append(time.perf_counter() - started)
            assert sum(value.nbytes for value in values.values()) == model_bytes
    finally:
        for server in servers:
            server.stop()
    seconds = statistics.median(times)
    return {
        "shards": num_shards,
        "case": label,
        "steps_per_s": 1 / seconds,
        "gbps": 2 * model_bytes / seconds / 1e9,
        "seconds_per_step": seconds,
        "imbalance": imbalance,
        "split_variables": split,
    }


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shards", default="1,2,4", help="shard counts to measure, first is the baseline")
    parser.add_argument("--total-mb", type=float, default=64.0, help="model size in MiB of float32 (default 64)")
    parser.add_argument("--variables", type=int, default=48, help="number of variables (default 48)")
    parser.add_argument("--optimizer", default="adam", help="Keras optimizer name (default adam)")
    parser.add_argument("--steps", type=int, default=None, help="timed steps per case (default 15; 6 with --quick)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps first (default 2)")
    parser.add_argument("--quick", action="store_true", help="fewer timed steps")
    parser.add_argument("--json", action="store_true", help="print the results as JSON")
    parser.add_argument("--two-phase", action="store_true", help="global_clipnorm vs none on several shards")
    parser.add_argument("--two-phase-shards", type=int, default=2, help="shards for --two-phase (default 2)")
    args = parser.parse_args(argv)
    counts = [int(part) for part in args.shards.split(",") if part.strip()]
    if not counts or min(counts) < 1:
        parser.error(f"--shards must list positive integers. Received: {args.shards!r}")
    steps = args.steps or (6 if args.quick else 15)
    variables = model_variables(int(args.total_mb * MB), args.variables)
    model_bytes = sum(value.nbytes for value in variables.values())
    if not args.json:
        print(
            f"optserve bench_shards: {model_bytes / MB:.1f} MiB float32 in {len(variables)} variables "
            f"(largest {max(v.nbytes for v in variables.values()) / MB:.1f} MiB), {args.optimizer}, "
            f"{os.cpu_count()} cores, median of {steps} steps after {args.warmup} warm-up steps\n",
            flush=True,
        )
    results = []
    for count, optimizer, label in _cases(args, counts):
        results.append(run_case(count, variables, optimizer, steps, args.warmup, label))
        if not args.json:
            _print_row(results[-1], results[0], header=len(results) == 1)
    if args.json:
        baseline = results[0]["steps_per_s"]
        for result in results:
            result["vs_first"] = result["steps_per_s"] / baseline
        print(
            json.dumps(
                {
                    "model_bytes": model_bytes,
                    "variables": len(variables),
                    "optimizer": args.optimizer,
                    "cores": os.cpu_count(),
                    "results": results,
                },
                indent=2,
            )
        )
    return 0


def _cases(args, counts: list[int]) -> list[tuple[int, object, str]]:
    if not args.two_phase:
        return [(count, args.optimizer, args.optimizer) for count in counts]
    shards = args.two_phase_shards
    # A norm that never clips: the numbers do not change, the protocol does.
    clipped = {"class_name": args.optimizer, "config": {"global_clipnorm": 1e30}}
    per_variable = {"class_name": args.optimizer, "config": {"clipnorm": 1e30}}
    return [
        (shards, args.optimizer, "none"),
        (shards, clipped, "global_clipnorm"),
        (shards, per_variable, "clipnorm"),
    ]


def _print_row(result: dict, baseline: dict, header: bool) -> None:
    if header:
        print(
            f"{'case':>16}  {'shards':>6}  {'steps/s':>8}  {'ms/step':>8}  {'GB/s':>6}  "
            f"{'vs first':>11}"
            f"  {'imbalance':>9}  {'split':>5}"
        )
    ratio = result["steps_per_s"] / baseline["steps_per_s"]
    print(
        f"{result['case']:>16}  {result['shards']:>6}  {result['steps_per_s']:>8.2f}  "
        f"{1000 * result['seconds_per_step']:>8.1f}  "
        f"{result['gbps']:>6.2f}  {ratio:>10.2f}x  {result['imbalance']:>9.3f}  {result['split_variables']:>5}",
        flush=True,
    )


if __name__ == "__main__":
    sys.exit(main())
