"""Sparse against dense pushes of an embedding table: bytes on the wire and time per push.

    python benchmarks/bench_sparse.py              # 1M x 64 float32 table, 1k rows per step
    python benchmarks/bench_sparse.py --quick      # fewer steps
    python benchmarks/bench_sparse.py --rows 100000 --touched 1000

The server runs in its own process (``python -m optserve.server serve``); one
``optserve.client.Client`` pushes, with ``return_variables`` off, either a
``SparseGradient`` of the touched rows or the dense gradient it stands for.
Both update the whole table (the server densifies, as Keras does with
``tf.IndexedSlices``), so the time saved is the transfer of untouched rows.
Bytes are those of the request messages (what ``serialized_chunk_messages``
builds); times are medians over the steps. Numbers depend on the machine: read
the ratios.
"""

from __future__ import annotations

import argparse
import pathlib
import statistics
import subprocess
import sys
import time

import numpy as np

from optserve.client import Client, SparseGradient
from optserve.protos import optserve_pb2 as pb
from optserve.protos import tensors as codec

ROOT = pathlib.Path(__file__).resolve().parents[1]
SGD = {"class_name": "SGD", "config": {"learning_rate": 1e-3}}
ADAM = {"class_name": "Adam", "config": {"learning_rate": 1e-3}}


def request_bytes(gradients: dict) -> int:
    tensors, declared = codec.gradient_tensors(gradients)
    first = pb.ApplyGradientsRequest(
        header=pb.ApplyGradientsHeader(model_id="bench", step=0), sparse_gradients=declared
    )
    return sum(len(message) for message in codec.serialized_chunk_messages(first, "gradients", tensors))


def time_pushes(client: Client, model_id: str, make_gradients, steps: int) -> float:
    client.push(model_id, make_gradients(0))  # warm-up
    times = []
    for step in range(1, steps + 1):
        gradients = make_gradients(step)
        start = time.perf_counter()
        client.push(model_id, gradients)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--width", type=int, default=64)
    parser.add_argument("--touched", type=int, default=1000, help="rows with a gradient per step")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--quick", action="store_true", help="3 steps")
    parser.add_argument("--optimizer", choices=("sgd", "adam"), default="sgd")
    args = parser.parse_args()
    steps = 3 if args.quick else args.steps
    shape = (args.rows, args.width)
    rng = np.random.default_rng(0)

    def sparse(step: int) -> dict:
        indices = np.random.default_rng(step).integers(0, args.rows, args.touched)
        return {"table": SparseGradient(indices, np.ones((args.touched, args.width), np.float32))}

    def dense(step: int) -> dict:
        return {"table": sparse(step)["table"].densify(shape)}

    sparse_bytes, dense_bytes = request_bytes(sparse(0)), request_bytes(dense(0))
    command = [
        sys.executable,
        "-m",
        "optserve.server",
        "serve",
        "--port",
        "0",
        "--device",
        "cpu",
        "--host",
        "127.0.0.1",
        "--log-level",
        "WARNING",
    ]
    server = subprocess.Popen(command, stdout=subprocess.PIPE, text=True, cwd=ROOT)
    try:
        line = server.stdout.readline().strip() if server.stdout else ""
        if not line.startswith("optserve listening on "):
            raise RuntimeError(f"server did not start: {line!r}")
        address = line.rsplit(" ", 1)[1]
        with Client(address, timeout=600) as client:
            table = {"table": rng.standard_normal(shape, dtype=np.float32)}
            optimizer = SGD if args.optimizer == "sgd" else ADAM
            client.create_model("sparse", optimizer, table)
            client.create_model("dense", optimizer, table)
            del table
            sparse_s = time_pushes(client, "sparse", sparse, steps)
            dense_s = time_pushes(client, "dense", dense, steps)
            np.testing.assert_array_equal(client.pull("sparse")[1]["table"], client.pull("dense")[1]["table"])
    finally:
        server.terminate()
        server.wait(timeout=30)
    print(
        f"optserve bench_sparse: {args.rows} x {args.width} float32 table, {args.touched} rows per push, "
        f"{args.optimizer}, median of {steps} pushes (server in its own process)"
    )
    print(f"{'form':>8} {'request bytes':>15} {'push ms':>10}")
    print(f"{'sparse':>8} {sparse_bytes:>15,} {sparse_s * 1e3:>10.1f}")
    print(f"{'dense':>8} {dense_bytes:>15,} {dense_s * 1e3:>10.1f}")
    print(
        f"dense/sparse: bytes {dense_bytes / sparse_bytes:.0f}x, push time {dense_s / sparse_s:.2f}x "
        "(the same values result; both update every row)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
