"""Push-apply-pull throughput of the parameter server, beside raw loopback TCP.

    python benchmarks/bench_rpc.py              # full table (about a minute)
    python benchmarks/bench_rpc.py --quick      # fewer sizes and rounds

    python benchmarks/bench_rpc.py --protobuf-requests   # build requests as generated messages

The server runs in its own process (``python -m optserve.server serve``), as in
a deployment; workers are threads of this process. Each payload is one float32
variable, updated by SGD in a synchronous model of 1 or 2 workers. Requests are
encoded like the server's responses (``tensors.serialized_chunk_messages``, each
payload copied once) unless ``--protobuf-requests`` builds them as generated
messages the way ``batch_chunks`` callers do. Times are medians over many steps.

* ``round trips/s``: steps per second, each worker's push answered with the
  new values (push + sum + apply + pull);
* ``GB/s``: tensor bytes moved per second, both directions, all workers;
* ``push GB/s`` and ``push/raw``: one worker's gradient upload and apply alone
  (return_variables off) against a plain socket sending the same bytes over
  the same loopback, measured just before and after (target: >= 50% at 64 MB);
* ``bare gRPC GB/s``: the same bytes streamed as raw 1 MiB messages to a gRPC
  server that does nothing with them, the ceiling gRPC itself sets.
"""
from __future__ import annotations

import argparse
import json
import os
import pathlib
import socket
import statistics
import subprocess
import sys
import threading
import time

import grpc
import numpy as np

from optserve.protos import optserve_pb2 as pb
from optserve.protos import optserve_pb2_grpc as pb_grpc
from optserve.protos import tensors as codec

ROOT = pathlib.Path(__file__).resolve().parents[1]
MB = 1 << 20


# ------------------------------------------------------------- raw socket


def raw_socket_gbps(nbytes: int, repeats: int) -> float:
    """Median throughput of sending ``nbytes`` over loopback TCP to a receiving thread.

    Both ends use buffers allocated (and touched) once, so this is the socket's
    best case: no allocation or page faults per transfer.
    """
    payload = np.ones(nbytes // 4, np.float32).tobytes()
    buffer = memoryview(bytearray(payload))
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]
    rates = []
    for _ in range(repeats):
        receiver = threading.Thread(target=_receive, args=(listener, buffer))
        receiver.start()
        with socket.create_connection(("127.0.0.1", port)) as sender:
            start = time.perf_counter()
            sender.sendall(payload)
            sender.recv(1)  # the receiver acknowledges once every byte arrived
            rates.append(nbytes / (time.perf_counter() - start) / 1e9)
        receiver.join()
    listener.close()
    return statistics.median(rates)


def _receive(listener: socket.socket, buffer: memoryview) -> None:
    connection, _ = listener.accept()
    with connection:
        received = 0
        while received < len(buffer):
            received += connection.recv_into(buffer[received:], len(buffer) - received)
        connection.sendall(b"k")


# ------------------------------------------------------------- bare gRPC


async def _drain(requests, context):
    async for _ in requests:
        pass
    yield b"ok"


def run_bare_grpc_server() -> None:
    """A grpc.aio server whose one method reads a stream of raw bytes messages and answers "ok"."""
    import asyncio

    async def main():
        server = grpc.aio.server(options=codec.GRPC_OPTIONS)
        handler = grpc.stream_stream_rpc_method_handler(_drain, request_deserializer=_passthrough,
                                                        response_serializer=_passthrough)
        server.add_generic_rpc_handlers([grpc.method_handlers_generic_handler("bench.Bare", {"Drain": handler})])
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        print(f"bare gRPC listening on 127.0.0.1:{port}", flush=True)
        await server.wait_for_termination()

    asyncio.run(main())


def bare_grpc_gbps(nbytes: int, repeats: int) -> float:
    """Median throughput of streaming ``nbytes`` as 1 MiB raw messages to a do-nothing gRPC server:
    what gRPC itself allows, with no protobuf, decoding or optimizer work."""
    process = subprocess.Popen([sys.executable, __file__, "--bare-grpc-server"], stdout=subprocess.PIPE, text=True)
    try:
        address = process.stdout.readline().split()[-1]
        with grpc.insecure_channel(address, options=codec.GRPC_OPTIONS) as channel:
            drain = channel.stream_stream("/bench.Bare/Drain", request_serializer=_passthrough,
                                          response_deserializer=_passthrough)
            piece = bytes(min(nbytes, codec.CHUNK_BYTES))
            messages = [piece] * (nbytes // len(piece))
            list(drain(iter(messages), timeout=120))  # warm-up
            rates = []
            for _ in range(repeats):
                start = time.perf_counter()
                list(drain(iter(messages), timeout=120))
                rates.append(nbytes / (time.perf_counter() - start) / 1e9)
        return statistics.median(rates)
    finally:
        process.kill()
        process.wait()


# --------------------------------------------------------------- server


class ServerProcess:
    def __init__(self):
        command = [sys.executable, "-m", "optserve.server", "serve", "--port", "0", "--device", "cpu",
                   "--log-level", "WARNING"]
        self.process = subprocess.Popen(command, stdout=subprocess.PIPE, text=True, cwd=ROOT)
        line = self.process.stdout.readline().strip()
        if not line.startswith("optserve listening on "):
            self.process.kill()
            raise RuntimeError(f"server did not start: {line!r}")
        self.address = line.rsplit(" ", 1)[1]

    def stop(self) -> None:
        self.process.terminate()
        self.process.wait(timeout=30)


def _passthrough(message) -> bytes:
    return message


class Worker:
    """One worker's connection. Requests are encoded as the server encodes its responses
    (``tensors.serialized_chunk_messages``: each payload copied once), so the numbers
    measure the server rather than the request encoding."""

    def __init__(self, address: str):
        self.channel = grpc.insecure_channel(address, options=codec.GRPC_OPTIONS)
        self.stub = pb_grpc.ParameterServerStub(self.channel)
        self.apply_gradients = self.channel.stream_stream(
            "/optserve.v1.ParameterServer/ApplyGradients", request_serializer=_passthrough,
            response_deserializer=pb.ApplyGradientsResponse.FromString)
        self.create = self.channel.stream_unary(
            "/optserve.v1.ParameterServer/CreateModel", request_serializer=_passthrough,
            response_deserializer=pb.CreateModelResponse.FromString)

    encode = staticmethod(lambda first, field, arrays: _serialized(first, field, arrays))

    def create_model(self, model_id: str, arrays: dict, num_workers: int) -> None:
        config = json.dumps({"class_name": "SGD", "config": {"learning_rate": 1e-3}})
        spec = pb.ModelSpec(model_id=model_id, num_workers=num_workers, mode=pb.SYNC, optimizer_config_json=config)
        self.create(self.encode(pb.CreateModelRequest(spec=spec), "variables", arrays), timeout=120)

    def push(self, model_id: str, step: int, worker: int, arrays: dict, return_variables: bool) -> int:
        """One push; returns the payload bytes received back."""
        header = pb.ApplyGradientsHeader(model_id=model_id, worker_index=worker, step=step,
                                         return_variables=return_variables)
        requests = self.encode(pb.ApplyGradientsRequest(header=header), "gradients", arrays)
        received = 0
        for response in self.apply_gradients(requests, timeout=120):
            received += sum(len(chunk.data) for chunk in response.variables)
        return received

    def close(self) -> None:
        self.channel.close()


def _serialized(first, field: str, arrays: dict):
    return codec.serialized_chunk_messages(first, field, [(name, "", a) for name, a in arrays.items()])


def _protobuf_messages(first, field: str, arrays: dict):
    """Generated messages built as ``batch_chunks`` callers build them, serialized by gRPC."""
    batches = codec.batch_chunks(codec.encode_many((name, "", a) for name, a in arrays.items()))
    getattr(first, field).extend(next(batches, []))
    yield first.SerializeToString()
    for batch in batches:
        yield type(first)(**{field: batch}).SerializeToString()


def run_case(address: str, nbytes: int, workers: int, rounds: int, return_variables: bool = True) -> dict:
    """Each worker pushes ``rounds`` steps; returns throughput and the median step time."""
    model_id = f"bench-{nbytes}-{workers}-{return_variables}"
    arrays = {"w": np.ones(nbytes // 4, np.float32)}
    clients = [Worker(address) for _ in range(workers)]
    clients[0].create_model(model_id, arrays, workers)
    moved = [0] * workers
    step_times: list[float] = []
    barrier = threading.Barrier(workers)

    def worker_loop(index: int) -> None:
        for step in range(rounds + 1):  # step 0 warms up connections and allocators
            barrier.wait()
            start = time.perf_counter()
            received = clients[index].push(model_id, step, index, arrays, return_variables)
            if index == 0 and step:
                step_times.append(time.perf_counter() - start)
            if step:
                moved[index] += nbytes + received

    threads = [threading.Thread(target=worker_loop, args=(i,)) for i in range(workers)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    clients[0].stub.DeleteModel(pb.DeleteModelRequest(model_id=model_id), timeout=30)
    for c in clients:
        c.close()
    step = statistics.median(step_times)
    return {"round_trips_per_s": 1 / step, "gbps": sum(moved) / rounds / step / 1e9, "seconds_per_step": step}


def rounds_for(nbytes: int, quick: bool) -> int:
    budget = (128 if quick else 640) * MB  # bytes pushed per case: a few seconds each
    return max(5 if quick else 9, min(300 if quick else 1000, budget // nbytes))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer sizes and rounds")
    parser.add_argument("--protobuf-requests", action="store_true",
                        help="build requests as generated messages (as batch_chunks callers do)")
    parser.add_argument("--bare-grpc-server", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.bare_grpc_server:
        run_bare_grpc_server()
        return 0
    if args.protobuf_requests:
        Worker.encode = staticmethod(_protobuf_messages)
    sizes = [1 * MB, 64 * MB] if args.quick else [1 * MB, 16 * MB, 64 * MB]
    repeats = 5 if args.quick else 9
    server = ServerProcess()
    encoding = "generated messages" if args.protobuf_requests else "wire-encoded"
    print(f"optserve bench_rpc: server {server.address} (separate process), {os.cpu_count()} cores, "
          f"float32, SGD, {encoding} requests")
    try:
        rows = []
        for nbytes in sizes:
            raw_before = raw_socket_gbps(nbytes, repeats)
            single = run_case(server.address, nbytes, 1, rounds_for(nbytes, args.quick), return_variables=False)
            raw = (raw_before + raw_socket_gbps(nbytes, repeats)) / 2
            bare = bare_grpc_gbps(nbytes, repeats)
            push_gbps = nbytes / single["seconds_per_step"] / 1e9
            for workers in (1, 2):
                case = run_case(server.address, nbytes, workers, rounds_for(nbytes, args.quick))
                rows.append((f"{nbytes // MB}MB", workers, case, (push_gbps, raw, bare)))
        for workers in (1, 2):
            rows.append(("4KB", workers, run_case(server.address, 4096, workers, 300 if args.quick else 2000), None))
    finally:
        server.stop()
    print_table(rows)
    return 0


def print_table(rows) -> None:
    header = (f"{'payload':>8} {'workers':>7} {'round trips/s':>13} {'GB/s':>6} {'push GB/s':>9} "
              f"{'raw GB/s':>8} {'push/raw':>8} {'bare gRPC GB/s':>14} {'push/bare':>9}")
    print(header)
    print("-" * len(header))
    for payload, workers, case, push in rows:
        line = f"{payload:>8} {workers:>7} {case['round_trips_per_s']:>13.1f} {case['gbps']:>6.3f}"
        if push:
            push_gbps, raw, bare = push
            line += f" {push_gbps:>9.3f} {raw:>8.3f} {push_gbps / raw:>8.0%} {bare:>14.3f} {push_gbps / bare:>9.0%}"
        print(line)


if __name__ == "__main__":
    sys.exit(main())
