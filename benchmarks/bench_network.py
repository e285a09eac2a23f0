"""The network path (shared memory off) against raw loopback TCP of the same bytes, in one run.

    python benchmarks/bench_network.py            # 5 interleaved rounds (about a minute)
    python benchmarks/bench_network.py --rounds 2 # quicker

Cases, each a median over its round trips, sampled in turn round by round so
that all see the same machine:

* ``raw``: a socket sends 40 MB (10M float32) to a server process that receives
  them into a preallocated buffer and sends 40 MB back from another: the
  machine's limit for moving a 10M push and its reply.
* ``10M``, ``10M/100``: ``Client.push_pull`` of Adam on 10M float32 parameters in
  one variable and in 100, against ``optserve serve`` in its own process, with
  shared memory off (the default data plane carries the bytes), and the same
  with ``data_plane=False`` (gRPC messages only).
* ``4 KB``: ``push_pull`` of one 1024-element variable, sent whole as one frame
  on the data connection, the same with ``data_plane=False`` (one unary gRPC
  call), and the floor a gRPC call sets: a unary call of the same 4 KB to a
  grpc.aio server in its own process that returns the request (``bare unary``).

Targets: raw / ``10M`` >= 0.6; ``10M/100`` / ``10M`` <= 1.1; 4 KB median <= 0.6 ms.
"""

from __future__ import annotations

import argparse
import pathlib
import socket
import statistics
import subprocess
import sys
import textwrap
import time

import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))

from bench_rpc import ServerProcess  # noqa: E402

ADAM = {"class_name": "Adam", "config": {"learning_rate": 1e-3}}
TOTAL = 10_000_000
RAW_BYTES = TOTAL * 4

_ECHO = textwrap.dedent(
    """
    import socket, sys
    size = int(sys.argv[1])
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(1)
    print(listener.getsockname()[1], flush=True)
    connection, _ = listener.accept()
    inbox, outbox = bytearray(size), bytearray(size)
    view = memoryview(inbox)
    while True:
        got = 0
        while got < size:
            n = connection.recv_into(view[got:])
            if not n:
                sys.exit(0)
            got += n
        connection.sendall(outbox)
    """
)


_BARE_UNARY = textwrap.dedent(
    """
    import asyncio, grpc

    async def main():
        server = grpc.aio.server()

        async def echo(request, context):
            return request

        handler = grpc.method_handlers_generic_handler("bare.Echo", {"Echo": grpc.unary_unary_rpc_method_handler(echo)})
        server.add_generic_rpc_handlers((handler,))
        print(server.add_insecure_port("127.0.0.1:0"), flush=True)
        await server.start()
        await server.wait_for_termination()

    asyncio.run(main())
    """
)


class BareUnary:
    """One unary gRPC call of ``nbytes`` to a server that answers with the request."""

    def __init__(self, nbytes: int):
        import grpc

        self.process = subprocess.Popen([sys.executable, "-c", _BARE_UNARY], stdout=subprocess.PIPE, text=True)
        port = int(self.process.stdout.readline())
        self.channel = grpc.insecure_channel(f"127.0.0.1:{port}")
        self.call = self.channel.unary_unary("/bare.Echo/Echo")
        self.payload = bytes(nbytes)
        self.call(self.payload)

    def __call__(self) -> None:
        self.call(self.payload)

    def close(self) -> None:
        self.channel.close()
        self.process.kill()
        self.process.wait(10)


class RawRoundTrip:
    """40 MB up and 40 MB back over loopback, to a receiver in its own process."""

    def __init__(self, nbytes: int):
        self.process = subprocess.Popen([sys.executable, "-c", _ECHO, str(nbytes)], stdout=subprocess.PIPE, text=True)
        port = int(self.process.stdout.readline())
        self.connection = socket.create_connection(("127.0.0.1", port))
        self.outgoing = np.ones(nbytes, np.uint8)
        self.incoming = bytearray(nbytes)

    def __call__(self) -> None:
        self.connection.sendall(self.outgoing)
        view, got = memoryview(self.incoming), 0
        while got < len(self.incoming):
            got += self.connection.recv_into(view[got:])

    def close(self) -> None:
        self.connection.close()
        self.process.wait(10)


def push_pull_case(address: str, model_id: str, count: int, total: int, data_plane: bool):
    from optserve.client import Client

    client = Client(address, timeout=300, shared_memory=False, data_plane=data_plane)
    shapes = {f"v{i:03d}": total // count for i in range(count)}
    client.create_model(model_id, ADAM, {name: np.full(size, 0.5, np.float32) for name, size in shapes.items()})
    rng = np.random.default_rng(0)
    gradients = {name: rng.standard_normal(size, dtype=np.float32) for name, size in shapes.items()}

    def round_trip() -> None:
        client.push_pull(model_id, gradients)

    round_trip()  # opens the data connection, warms the pools
    return round_trip, client


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=5, help="interleaved rounds (default 5)")
    parser.add_argument("--per-round", type=int, default=4, help="round trips per case and round (default 4)")
    args = parser.parse_args(argv)
    server = ServerProcess("--no-shared-memory")
    raw = RawRoundTrip(RAW_BYTES)
    cases = {"raw": raw}
    clients = []
    for label, count, total, plane in [
        ("10M", 1, TOTAL, True),
        ("10M/100", 100, TOTAL, True),
        ("10M gRPC only", 1, TOTAL, False),
        ("10M/100 gRPC only", 100, TOTAL, False),
    ]:
        cases[label], client = push_pull_case(
            server.address, label.replace("/", "-").replace(" ", "-"), count, total, plane
        )
        clients.append(client)
    small, client = push_pull_case(server.address, "4KB", 1, 1024, True)
    clients.append(client)
    small_grpc, client = push_pull_case(server.address, "4KB-gRPC", 1, 1024, False)
    clients.append(client)
    bare = BareUnary(4 * 1024 + 64)
    small_cases = {"4 KB push_pull": small, "4 KB push_pull, gRPC only": small_grpc, "4 KB bare unary": bare}
    times: dict[str, list[float]] = {label: [] for label in [*cases, *small_cases]}
    try:
        for _ in range(args.rounds):
            for label, case in cases.items():
                for _ in range(args.per_round):
                    started = time.perf_counter()
                    case()
                    times[label].append(time.perf_counter() - started)
            for label, case in small_cases.items():
                for _ in range(100):
                    started = time.perf_counter()
                    case()
                    times[label].append(time.perf_counter() - started)
    finally:
        bare.close()
        for client in clients:
            client.close()
        raw.close()
        server.stop()
    median = {label: statistics.median(values) * 1e3 for label, values in times.items()}
    print("| case | median ms | raw / case | x 10M |")
    print("|---|---:|---:|---:|")
    for label in cases:
        ratio = median["raw"] / median[label]
        print(f"| {label} | {median[label]:.2f} | {ratio:.2f} | {median[label] / median['10M']:.2f} |")
    for label in small_cases:
        print(f"| {label} | {median[label]:.3f} | | |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
