"""Push-apply-pull throughput of the parameter server, beside raw loopback TCP.

    python benchmarks/bench_rpc.py              # full table (about a minute)
    python benchmarks/bench_rpc.py --quick      # fewer sizes and rounds

    python benchmarks/bench_rpc.py --protobuf-requests   # workers built on generated messages
    python benchmarks/bench_rpc.py --tls [--quick]       # cost of TLS (and tokens) against plaintext

The server runs in its own process (``python -m optserve.server serve``), as in
a deployment; workers are threads of this process, each an ``optserve.client.Client``
(requests built as wire bytes, replies split without copying payloads) unless
``--protobuf-requests`` makes them generated-message stubs, as ``batch_chunks``
callers build them. Each payload is one float32 variable, updated by SGD in a
synchronous model of 1 or 2 workers. Times are medians over many steps.

* ``round trips/s``: steps per second, each worker's push answered with the
  new values (push + sum + apply + pull);
* ``GB/s``: tensor bytes moved per second, both directions, all workers;
* ``push GB/s``: one worker's gradient upload and apply alone (return_variables off);
* ``raw GB/s`` and ``push/raw``: a plain socket sending the same bytes over the
  same loopback to a thread receiving into a preallocated buffer, one transfer
  before each push, so that both see the same machine (target: push/raw >= 50%
  at 64 MB);
* ``raw alone`` and ``push/alone``: the same raw transfers back to back, with no
  push in between (caches and the TCP stack stay warm: usually faster);
* ``bare gRPC``: the same bytes streamed as raw ``CHUNK_BYTES`` messages to a
  gRPC server that does nothing with them, the ceiling gRPC itself sets.

``--tls`` instead starts three servers (plaintext, TLS, TLS with a bearer token
checked on every call) and pushes 4 KB and 64 MB to each in turn, round by
round, so that all three see the same machine; it reports the median push time
of each and its ratio to plaintext in the same run.
"""

from __future__ import annotations

import argparse
import functools
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

from optserve.client import Client
from optserve.protos import optserve_pb2 as pb
from optserve.protos import optserve_pb2_grpc as pb_grpc
from optserve.protos import tensors as codec

ROOT = pathlib.Path(__file__).resolve().parents[1]
MB = 1 << 20
SGD_CONFIG = {"class_name": "SGD", "config": {"learning_rate": 1e-3}}


# ------------------------------------------------------------- raw socket


class RawLoopback:
    """Plain TCP over loopback to a receiving thread: the best case for moving bytes.

    Both ends use buffers allocated (and touched) once, so no transfer pays for
    allocation or page faults. Each transfer gets a fresh connection (set up
    before the clock starts): measured here, that is faster than reusing one
    connection, whose later transfers restart from TCP's idle congestion window.
    """

    def __init__(self, nbytes: int):
        self.nbytes = nbytes
        self._payload = np.ones(nbytes // 4, np.float32).tobytes()
        self._buffer = memoryview(bytearray(len(self._payload)))
        self._listener = socket.create_server(("127.0.0.1", 0))
        self._closing = False
        self._receiver = threading.Thread(target=self._receive, daemon=True)
        self._receiver.start()

    def _receive(self) -> None:
        while True:
            connection, _ = self._listener.accept()
            if self._closing:
                connection.close()
                return
            with connection:
                received = 0
                while received < len(self._buffer):
                    got = connection.recv_into(self._buffer[received:], len(self._buffer) - received)
                    if not got:
                        break
                    received += got
                connection.sendall(b"k")  # acknowledge once every byte arrived

    def seconds(self) -> float:
        """Time of one transfer of ``nbytes``, until the receiver has all of them."""
        with socket.create_connection(self._listener.getsockname()) as sender:
            start = time.perf_counter()
            sender.sendall(self._payload)
            sender.recv(1)
            return time.perf_counter() - start

    def gbps(self, repeats: int) -> float:
        return self.nbytes / statistics.median(self.seconds() for _ in range(repeats)) / 1e9

    def close(self) -> None:
        # Closing a listening socket does not wake a thread blocked in accept(): connect once more.
        self._closing = True
        socket.create_connection(self._listener.getsockname()).close()
        self._receiver.join()
        self._listener.close()


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
        handler = grpc.stream_stream_rpc_method_handler(
            _drain, request_deserializer=_passthrough, response_serializer=_passthrough
        )
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
            drain = channel.stream_stream(
                "/bench.Bare/Drain", request_serializer=_passthrough, response_deserializer=_passthrough
            )
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
    """One ``optserve serve`` child on a free loopback port (the benchmarks' server)."""

    def __init__(self, *extra_args: str, log_level: str = "WARNING"):
        command = [
            sys.executable,
            "-m",
            "optserve.server",
            "serve",
            "--host",
            "127.0.0.1",
            "--port",
            "0",
            "--device",
            "cpu",
            "--log-level",
            log_level,
            *extra_args,
        ]
        self.process = subprocess.Popen(command, stdout=subprocess.PIPE, text=True, cwd=ROOT)
        line = self.process.stdout.readline().strip()
        if not line.startswith("optserve listening on "):
            self.process.kill()
            raise RuntimeError(f"server did not start: {line!r}")
        self.address = line.rsplit(" ", 1)[1]

    def stop(self, timeout: float = 30) -> None:
        self.process.terminate()
        try:
            self.process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()

    def __enter__(self) -> ServerProcess:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop(timeout=60)


def _passthrough(message) -> bytes:
    return message


class Worker:
    """One worker's connection: an optserve ``Client``, used as an application uses it, on gRPC
    alone (this benchmark measures gRPC's path; bench_ray.py and bench_network.py the others)."""

    def __init__(self, address: str, **client_options):
        options = {"shared_memory": False, "data_plane": False, **client_options}
        self.client = Client(address, timeout=120, **options)

    def create_model(self, model_id: str, arrays: dict, num_workers: int) -> None:
        self.client.create_model(model_id, SGD_CONFIG, arrays, num_workers=num_workers)

    def push(self, model_id: str, step: int, worker: int, arrays: dict, return_variables: bool) -> int:
        """One push; returns the payload bytes received back."""
        if not return_variables:
            self.client.push(model_id, arrays, worker_index=worker, step=step)
            return 0
        _, values = self.client.push_pull(model_id, arrays, worker_index=worker, step=step)
        return sum(value.nbytes for value in values.values())

    def delete_model(self, model_id: str) -> None:
        self.client.delete_model(model_id)

    def close(self) -> None:
        self.client.close()


class ProtobufWorker(Worker):
    """A worker that builds and reads generated protobuf messages (``batch_chunks``), for comparison:
    every payload is copied into a ``bytes``, into the message, and again when gRPC serializes it."""

    def __init__(self, address: str):
        self.channel = grpc.insecure_channel(address, options=codec.GRPC_OPTIONS)
        self.stub = pb_grpc.ParameterServerStub(self.channel)

    def create_model(self, model_id: str, arrays: dict, num_workers: int) -> None:
        spec = pb.ModelSpec(
            model_id=model_id, num_workers=num_workers, mode=pb.SYNC, optimizer_config_json=json.dumps(SGD_CONFIG)
        )
        self.stub.CreateModel(_protobuf_messages(pb.CreateModelRequest(spec=spec), "variables", arrays), timeout=120)

    def push(self, model_id: str, step: int, worker: int, arrays: dict, return_variables: bool) -> int:
        header = pb.ApplyGradientsHeader(
            model_id=model_id, worker_index=worker, step=step, return_variables=return_variables
        )
        requests = _protobuf_messages(pb.ApplyGradientsRequest(header=header), "gradients", arrays)
        assembler = codec.TensorAssembler()
        for response in self.stub.ApplyGradients(requests, timeout=120):
            assembler.add_all(response.variables)
        return sum(value.nbytes for value in assembler.result().values())

    def delete_model(self, model_id: str) -> None:
        self.stub.DeleteModel(pb.DeleteModelRequest(model_id=model_id), timeout=30)

    def close(self) -> None:
        self.channel.close()


def _protobuf_messages(first, field: str, arrays: dict):
    """Generated messages built as ``batch_chunks`` callers build them, serialized by gRPC."""
    batches = codec.batch_chunks(codec.encode_many((name, "", a) for name, a in arrays.items()))
    getattr(first, field).extend(next(batches, []))
    yield first
    for batch in batches:
        yield type(first)(**{field: batch})


def push_against_raw(address: str, nbytes: int, rounds: int, worker_type: type[Worker] = Worker) -> dict:
    """One worker's pushes (return_variables off) against raw loopback transfers of the same bytes.

    ``push`` and ``raw`` (GB/s) are medians over ``rounds`` pushes and raw transfers
    taken in turn, so that both see the same machine: the same load from other jobs,
    the same caches (each pushes 64 MB through them). ``raw_alone`` is the median
    of as many raw transfers back to back, before the pushes, with nothing in between.
    """
    model_id = f"bench-push-{nbytes}"
    arrays = {"w": np.ones(nbytes // 4, np.float32)}
    worker = worker_type(address)
    raw = RawLoopback(nbytes)
    try:
        worker.create_model(model_id, arrays, 1)
        raw_alone = raw.gbps(rounds)
        push_times, raw_times = [], []
        for step in range(rounds + 1):  # step 0 warms up connections and allocators
            raw_seconds = raw.seconds()
            start = time.perf_counter()
            worker.push(model_id, step, 0, arrays, False)
            if step:
                push_times.append(time.perf_counter() - start)
                raw_times.append(raw_seconds)
        worker.delete_model(model_id)
    finally:
        raw.close()
        worker.close()
    return {
        "push": nbytes / statistics.median(push_times) / 1e9,
        "raw": nbytes / statistics.median(raw_times) / 1e9,
        "raw_alone": raw_alone,
    }


def run_case(
    address: str,
    nbytes: int,
    workers: int,
    rounds: int,
    return_variables: bool = True,
    worker_type: type[Worker] = Worker,
) -> dict:
    """Each worker pushes ``rounds`` steps; returns throughput and the median step time."""
    model_id = f"bench-{nbytes}-{workers}-{return_variables}"
    arrays = {"w": np.ones(nbytes // 4, np.float32)}
    clients = [worker_type(address) for _ in range(workers)]
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
    clients[0].delete_model(model_id)
    for c in clients:
        c.close()
    step = statistics.median(step_times)
    return {"round_trips_per_s": 1 / step, "gbps": sum(moved) / rounds / step / 1e9, "seconds_per_step": step}


# ------------------------------------------------------------- TLS cost


def make_test_pki(directory: pathlib.Path) -> dict:
    """A throwaway CA and a certificate for 127.0.0.1 (needs `cryptography`, in the `test` extra)."""
    import datetime
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    now = datetime.datetime.now(datetime.timezone.utc)

    def certificate(subject, issuer, public_key, signing_key, ca: bool):
        builder = (
            x509.CertificateBuilder()
            .subject_name(subject)
            .issuer_name(issuer)
            .public_key(public_key)
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(hours=1))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
        )
        if not ca:
            builder = builder.add_extension(
                x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False
            )
        return builder.sign(signing_key, hashes.SHA256())

    ca_key, server_key = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "bench CA")])
    server_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "bench server")])
    ca = certificate(ca_name, ca_name, ca_key.public_key(), ca_key, True)
    server = certificate(server_name, ca_name, server_key.public_key(), ca_key, False)
    paths = {name: directory / name for name in ("ca.pem", "server.pem", "server.key")}
    paths["ca.pem"].write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    paths["server.pem"].write_bytes(server.public_bytes(serialization.Encoding.PEM))
    paths["server.key"].write_bytes(
        server_key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )
    return paths


def tls_cost(quick: bool) -> int:
    import tempfile

    from optserve.server.auth import new_token_line

    with tempfile.TemporaryDirectory() as scratch:
        pki = make_test_pki(pathlib.Path(scratch))
        token, line = new_token_line("bench", "admin", "*")
        (pathlib.Path(scratch) / "tokens.txt").write_text(line + "\n")
        tls_args = ("--tls-cert", str(pki["server.pem"]), "--tls-key", str(pki["server.key"]))
        setups = {
            "plaintext": ((), {"tls": False, "token": False}),
            "TLS": (tls_args, {"tls": {"ca": pki["ca.pem"]}, "token": False}),
            "TLS + token": (
                (*tls_args, "--auth-tokens", str(pathlib.Path(scratch) / "tokens.txt")),
                {"tls": {"ca": pki["ca.pem"]}, "token": token},
            ),
        }
        servers = {name: ServerProcess(*args) for name, (args, _) in setups.items()}
        print(
            f"optserve bench_rpc --tls: 3 servers (separate processes), {os.cpu_count()} cores, one worker "
            "each, push without return_variables, setups taken in turn every round"
        )
        try:
            rows = [(nbytes, tls_case(servers, setups, nbytes, quick)) for nbytes in (4096, 64 * MB)]
        finally:
            for server in servers.values():
                server.stop()
    header = f"{'payload':>8} {'setup':>12} {'median push':>12} {'GB/s':>7} {'vs plaintext':>12}"
    print(header)
    print("-" * len(header))
    for nbytes, times in rows:
        for name, seconds in times.items():
            label = "64MB" if nbytes >= MB else "4KB"
            print(
                f"{label:>8} {name:>12} {seconds * 1e3:>9.3f} ms {nbytes / seconds / 1e9:>7.3f} "
                f"{seconds / times['plaintext']:>11.2f}x"
            )
    return 0


def tls_case(servers: dict, setups: dict, nbytes: int, quick: bool) -> dict:
    rounds = (9 if quick else 25) if nbytes >= MB else (300 if quick else 2000)
    arrays = {"w": np.ones(nbytes // 4, np.float32)}
    model_id = f"bench-tls-{nbytes}"
    workers = {name: Worker(servers[name].address, **setups[name][1]) for name in servers}
    times: dict[str, list[float]] = {name: [] for name in servers}
    try:
        for worker in workers.values():
            worker.create_model(model_id, arrays, 1)
        for step in range(rounds + 1):  # step 0 warms up connections and allocators
            for name, worker in workers.items():
                start = time.perf_counter()
                worker.push(model_id, step, 0, arrays, False)
                if step:
                    times[name].append(time.perf_counter() - start)
        for worker in workers.values():
            worker.delete_model(model_id)
    finally:
        for worker in workers.values():
            worker.close()
    return {name: statistics.median(values) for name, values in times.items()}


def rounds_for(nbytes: int, quick: bool) -> int:
    budget = (128 if quick else 640) * MB  # bytes pushed per case: a few seconds each
    return max(5 if quick else 9, min(300 if quick else 1000, budget // nbytes))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer sizes and rounds")
    parser.add_argument(
        "--protobuf-requests",
        action="store_true",
        help="build requests as generated messages (as batch_chunks callers do)",
    )
    parser.add_argument(
        "--data-plane", action="store_true", help="workers use the data plane beside gRPC (the default path off-host)"
    )
    parser.add_argument("--tls", action="store_true", help="the cost of TLS and tokens against plaintext")
    parser.add_argument("--bare-grpc-server", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.bare_grpc_server:
        run_bare_grpc_server()
        return 0
    if args.tls:
        return tls_cost(args.quick)
    worker_type = ProtobufWorker if args.protobuf_requests else Worker
    if args.data_plane:
        if args.protobuf_requests:
            parser.error("--data-plane is a path of optserve's Client, not of generated-message workers")
        worker_type = functools.partial(worker_type, data_plane=True)
    sizes = [1 * MB, 64 * MB] if args.quick else [1 * MB, 16 * MB, 64 * MB]
    repeats = 5 if args.quick else 9
    server = ServerProcess()
    encoding = "generated-message" if args.protobuf_requests else "optserve Client"
    encoding += ", data plane" if args.data_plane else ", gRPC alone"
    print(
        f"optserve bench_rpc: server {server.address} (separate process), {os.cpu_count()} cores, "
        f"float32, SGD, {encoding} workers"
    )
    try:
        rows = []
        for nbytes in sizes:
            # Raw loopback throughput varies a lot from one transfer to the next on a shared
            # machine: take at least 15 pairs (9 with --quick) for the ratio.
            pairs = max(rounds_for(nbytes, args.quick), 9 if args.quick else 15)
            push = push_against_raw(server.address, nbytes, pairs, worker_type)
            push["bare"] = bare_grpc_gbps(nbytes, repeats)
            for workers in (1, 2):
                case = run_case(
                    server.address, nbytes, workers, rounds_for(nbytes, args.quick), worker_type=worker_type
                )
                rows.append((f"{nbytes // MB}MB", workers, case, push))
        for workers in (1, 2):
            case = run_case(server.address, 4096, workers, 300 if args.quick else 2000, worker_type=worker_type)
            rows.append(("4KB", workers, case, None))
    finally:
        server.stop()
    print_table(rows)
    return 0


def print_table(rows) -> None:
    header = (
        f"{'payload':>8} {'workers':>7} {'round trips/s':>13} {'GB/s':>6} {'push GB/s':>9} "
        f"{'raw GB/s':>8} {'push/raw':>8} {'raw alone':>9} {'push/alone':>10} {'bare gRPC':>9} {'push/bare':>9}"
    )
    print(header)
    print("-" * len(header))
    for payload, workers, case, push in rows:
        line = f"{payload:>8} {workers:>7} {case['round_trips_per_s']:>13.1f} {case['gbps']:>6.3f}"
        if push:
            line += (
                f" {push['push']:>9.3f} {push['raw']:>8.3f} {push['push'] / push['raw']:>8.0%}"
                f" {push['raw_alone']:>9.3f} {push['push'] / push['raw_alone']:>10.0%}"
                f" {push['bare']:>9.3f} {push['push'] / push['bare']:>9.0%}"
            )
        print(line)


if __name__ == "__main__":
    sys.exit(main())
