"""optserve against a Ray actor parameter server doing the same work, on one machine.

    pip install -e ".[bench]"                 # Ray
    python benchmarks/bench_ray.py            # every case (a few minutes)
    python benchmarks/bench_ray.py --quick    # fewer cases and rounds (under ~2 minutes)
    python benchmarks/bench_ray.py --no-shared-memory   # optserve over gRPC only

What a user would build instead of optserve on one machine is a Ray actor
holding the arrays: workers call it with their gradients, Ray moves the arrays
through its shared-memory object store, the actor applies Adam in NumPy and
returns the new weights. Both sides here do the same work per round trip:

* one worker process pushes one step's gradients, the server applies Adam
  (the same update rule: Keras's, in NumPy) and the new weights come back to
  the worker (optserve: ``Client.push_pull``; Ray: one actor method call and
  ``ray.get`` of its result);
* the server is one process (``optserve serve``; one Ray actor), the workers
  are separate processes (a ``multiprocessing`` pool; Ray actors);
* cases: 100K, 1M and 10M float32 parameters in one variable, and 10M in 100
  variables; 1 and 2 workers; async (every push applied on its own) and sync
  (the workers' gradients summed per step, applied once).

Runs are interleaved ABAB (optserve, Ray, optserve, Ray, ...) so that both see
the same machine; a case's time is the median round trip over its runs, and
``ratio`` is Ray's time over optserve's (above 1: optserve is faster).
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing
import os
import pathlib
import statistics
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))

from bench_rpc import ServerProcess  # noqa: E402

ADAM = {"learning_rate": 1e-3, "beta_1": 0.9, "beta_2": 0.999, "epsilon": 1e-7}
ADAM_CONFIG = {"class_name": "Adam", "config": dict(ADAM)}

# (label, number of variables, float32 parameters in all)
SIZES = [("100K", 1, 100_000), ("1M", 1, 1_000_000), ("10M", 1, 10_000_000), ("10M/100", 100, 10_000_000)]
# (workers, mode)
SETUPS = [(1, "async"), (1, "sync"), (2, "async"), (2, "sync")]
QUICK_SETUPS = [(1, "async"), (2, "sync")]


def variable_shapes(count: int, total: int) -> dict[str, int]:
    return {f"v{i:03d}": total // count for i in range(count)}


def rounds_for(total: int, quick: bool) -> int:
    rounds = 60 if total <= 1_000_000 else 15
    return max(5, rounds // 3) if quick else rounds


# ------------------------------------------------------------------ the same Adam, in NumPy


class NumpyAdam:
    """Keras's Adam update, in place, in NumPy (what the Ray actor runs)."""

    def __init__(self, weights: dict[str, np.ndarray]):
        self.weights = weights
        self.m = {name: np.zeros_like(w) for name, w in weights.items()}
        self.v = {name: np.zeros_like(w) for name, w in weights.items()}
        self.iterations = 0

    def apply(self, gradients: dict[str, np.ndarray]) -> None:
        self.iterations += 1
        t = float(self.iterations)
        lr = ADAM["learning_rate"] * np.sqrt(1 - ADAM["beta_2"] ** t) / (1 - ADAM["beta_1"] ** t)
        for name, g in gradients.items():
            m, v, w = self.m[name], self.v[name], self.weights[name]
            m += (g - m) * (1 - ADAM["beta_1"])
            v += (np.square(g) - v) * (1 - ADAM["beta_2"])
            w -= (m * np.float32(lr)) / (np.sqrt(v) + ADAM["epsilon"])


# ------------------------------------------------------------------ Ray


def ray_classes():
    """The Ray actors (defined here so that importing this module does not need Ray)."""
    import ray

    @ray.remote(num_cpus=0)
    class RayParameterServer:
        def __init__(self, shapes: dict[str, int], num_workers: int, mode: str):
            self.adam = NumpyAdam({name: np.full(size, 0.5, np.float32) for name, size in shapes.items()})
            self.num_workers = num_workers
            self.sync = mode == "sync" and num_workers > 1
            self.sums: dict[str, np.ndarray] | None = None
            self.arrived = 0
            self.step_done: asyncio.Future | None = None

        async def push_pull(self, gradients: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
            if not self.sync:
                self.adam.apply(gradients)
                return self.adam.weights
            if self.sums is None:
                self.sums = {name: g.copy() for name, g in gradients.items()}  # Ray's arrays are read-only
                self.step_done = asyncio.get_running_loop().create_future()
            else:
                for name, g in gradients.items():
                    self.sums[name] += g
            self.arrived += 1
            done = self.step_done
            assert done is not None
            if self.arrived == self.num_workers:
                self.adam.apply(self.sums)
                self.sums, self.arrived, self.step_done = None, 0, None
                done.set_result(None)
            await done
            return self.adam.weights

    @ray.remote(num_cpus=0)
    class RayWorker:
        def run(self, server, shapes: dict[str, int], rounds: int, seed: int) -> list[float]:
            return worker_rounds(lambda grads: ray.get(server.push_pull.remote(grads)), shapes, rounds, seed)

    return RayParameterServer, RayWorker


def worker_rounds(round_trip, shapes: dict[str, int], rounds: int, seed: int) -> list[float]:
    """``rounds`` timed round trips (after one untimed warm-up); each checks it got every weight back."""
    rng = np.random.default_rng(seed)
    gradients = {name: rng.standard_normal(size, dtype=np.float32) for name, size in shapes.items()}
    times = []
    for index in range(rounds + 1):
        started = time.perf_counter()
        weights = round_trip(gradients)
        if index:
            times.append(time.perf_counter() - started)
        assert len(weights) == len(shapes)
    return times


class RaySide:
    def __init__(self):
        import ray

        self.ray = ray
        ray.init(
            num_cpus=2,
            include_dashboard=False,
            log_to_driver=False,
            object_store_memory=2 << 30,
            configure_logging=False,
            # A fresh session directory: a stale one left by a killed run can keep Ray from starting.
            _temp_dir=tempfile.mkdtemp(prefix="ray-"),
        )
        self.server_class, worker_class = ray_classes()
        self.workers = [worker_class.remote() for _ in range(2)]

    def run(self, shapes: dict[str, int], workers: int, mode: str, rounds: int) -> float:
        server = self.server_class.remote(shapes, workers, mode)
        try:
            runs = [self.workers[i].run.remote(server, shapes, rounds, i) for i in range(workers)]
            return statistics.median(self.ray.get(runs)[0])
        finally:
            self.ray.kill(server)

    def close(self) -> None:
        self.ray.shutdown()


# ------------------------------------------------------------------ optserve


def optserve_worker(address: str, model_id: str, worker: int, shapes, rounds: int, shared_memory: bool) -> list[float]:
    from optserve.client import Client

    with Client(address, timeout=300, shared_memory=shared_memory) as client:
        return worker_rounds(
            lambda grads: client.push_pull(model_id, grads, worker_index=worker)[1], shapes, rounds, worker
        )


class OptserveSide:
    def __init__(self, shared_memory: bool):
        from optserve.client import Client

        self.server = ServerProcess()
        self.client = Client(self.server.address, timeout=300)
        self.shared_memory = shared_memory
        self.pool = multiprocessing.get_context("spawn").Pool(2)
        self.cases = 0

    def run(self, shapes: dict[str, int], workers: int, mode: str, rounds: int) -> float:
        self.cases += 1
        model_id = f"bench-ray-{self.cases}"
        weights = {name: np.full(size, 0.5, np.float32) for name, size in shapes.items()}
        self.client.create_model(model_id, ADAM_CONFIG, weights, num_workers=workers, mode=mode)
        try:
            args = [(self.server.address, model_id, i, shapes, rounds, self.shared_memory) for i in range(workers)]
            runs = [self.pool.apply_async(optserve_worker, a) for a in args]
            return statistics.median(runs[0].get())
        finally:
            self.client.delete_model(model_id)

    def close(self) -> None:
        self.pool.close()
        self.pool.join()
        self.client.close()
        self.server.stop()


# ------------------------------------------------------------------ main


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="fewer cases and rounds (under ~2 minutes)")
    parser.add_argument("--repeats", type=int, default=None, help="ABAB pairs per case (default 2; quick: 1)")
    parser.add_argument("--no-shared-memory", action="store_true", help="optserve over gRPC only (the network path)")
    parser.add_argument(
        "--sizes", default=",".join(label for label, _, _ in SIZES), help="cases to run, e.g. 10M,10M/100"
    )
    args = parser.parse_args(argv)
    try:
        import ray
    except ImportError:
        print("Ray is not installed: pip install -e '.[bench]'", file=sys.stderr)
        return 2
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    repeats = args.repeats or (1 if args.quick else 2)
    setups = QUICK_SETUPS if args.quick else SETUPS
    print(f"Ray {ray.__version__}; optserve shared memory {'off' if args.no_shared_memory else 'on'}; Adam")
    # Ray first: it starts its processes with fork and exec, which can hang in a process that
    # already has gRPC's threads (the optserve client).
    peer = RaySide()
    try:
        optserve = OptserveSide(shared_memory=not args.no_shared_memory)
    except BaseException:
        peer.close()
        raise
    rows = []
    try:
        wanted = args.sizes.split(",")
        for label, count, total in [size for size in SIZES if size[0] in wanted]:
            shapes = variable_shapes(count, total)
            for workers, mode in setups:
                rounds = rounds_for(total, args.quick)
                times: dict[str, list[float]] = {"optserve": [], "ray": []}
                for _ in range(repeats):  # ABAB
                    times["optserve"].append(optserve.run(shapes, workers, mode, rounds))
                    times["ray"].append(peer.run(shapes, workers, mode, rounds))
                ours, theirs = statistics.median(times["optserve"]), statistics.median(times["ray"])
                rows.append((label, workers, mode, ours, theirs))
                print(
                    f"{label:>8} {workers}w {mode:5}  optserve {ours * 1e3:8.2f} ms  ray {theirs * 1e3:8.2f} ms"
                    f"  ratio {theirs / ours:5.2f}x",
                    flush=True,
                )
    finally:
        optserve.close()
        peer.close()
    print()
    print("| size | workers | mode | optserve ms | Ray ms | optserve vs Ray |")
    print("|---|---|---|---|---|---|")
    for label, workers, mode, ours, theirs in rows:
        print(f"| {label} | {workers} | {mode} | {ours * 1e3:.2f} | {theirs * 1e3:.2f} | {theirs / ours:.2f}x |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
