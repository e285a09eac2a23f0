"""Memory and latency under the server's limits: peak RSS of accepting a model, refused
requests, and small pushes while another client uploads a big model.

    python benchmarks/bench_limits.py                    # 1 GiB models, 1 GiB upload
    python benchmarks/bench_limits.py --size 256M        # smaller (a shared or small machine)
    python benchmarks/bench_limits.py --cases memory --json

Every case runs its own ``python -m optserve.server serve --port 0 --device cpu``
process, so its resident size is the server's alone (the client is this process).

* ``memory``: for SGD (no momentum: state = the variables) and Adam (variables and
  two slots: 3x), the server's peak resident size while it accepts a ``--size``
  model, over the model's state size: ``(VmHWM during CreateModel - VmRSS before) /
  state bytes``, the peak reset (``/proc/PID/clear_refs``) just before the call.
  1.0 means the server needed nothing beyond the state it keeps.
* ``refusals``: resident size before and after 40 CreateModel calls with a 25 MB
  optimizer config (over the message limit: refused by gRPC), 40 with a 7.5 MiB one
  (received whole, then refused by the server), each refused, and after one model
  over ``--max-memory``.
* ``contention``: p50/p99 latency of 4 KB push round trips (one worker, SGD) alone,
  then while a second client uploads a ``--size`` model to the same server.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import threading
import time

import bench_rpc
import numpy as np

from optserve.client import Client
from optserve.server.limits import parse_byte_size

MiB = 1 << 20


class ServerProcess(bench_rpc.ServerProcess):
    """The benchmarks' server, whose memory this benchmark reads from /proc."""

    def __init__(self, *flags: str):
        super().__init__(*flags, log_level="ERROR")

    def status(self, key: str) -> int:
        with open(f"/proc/{self.process.pid}/status") as status:
            return next(int(line.split()[1]) * 1024 for line in status if line.startswith(key + ":"))

    def reset_peak(self) -> None:
        with open(f"/proc/{self.process.pid}/clear_refs", "w") as clear_refs:
            clear_refs.write("5")


def memory_case(size: int) -> list[dict]:
    results = []
    for name, config, arrays in (("SGD", "sgd", 1), ("Adam", "adam", 3)):
        variables = {"kernel": np.full(size // 4 - 1024, 0.01, np.float32), "bias": np.zeros(1024, np.float32)}
        with ServerProcess() as server, Client(server.address, timeout=600) as client:
            time.sleep(0.5)
            before = server.status("VmRSS")
            server.reset_peak()
            started = time.perf_counter()
            client.create_model("big", config, variables)
            seconds = time.perf_counter() - started
            peak, after = server.status("VmHWM"), server.status("VmRSS")
        state = size * arrays
        results.append(
            {
                "optimizer": name,
                "state_bytes": state,
                "create_s": seconds,
                "peak_over_state": (peak - before) / state,
                "kept_over_state": (after - before) / state,
            }
        )
        del variables
    return results


def refusals_case(size: int) -> dict:
    with ServerProcess("--max-memory", str(size)) as server, Client(server.address, timeout=600) as client:
        client.create_model("small", "sgd", {"w": np.ones(4, np.float32)})
        time.sleep(1.5)
        before = server.status("VmRSS")
        config = {"class_name": "SGD", "config": {"name": "x" * 25_000_000}}
        refused = 0
        for index in range(40):
            try:
                client.create_model(f"m{index}", config, {"w": np.ones(1, np.float32)})
            except Exception:  # noqa: BLE001 - refusals are the point
                refused += 1
        time.sleep(1.5)  # the server trims after refused uploads, at most once a second
        after_configs = server.status("VmRSS")
        # Under --max-message-bytes, so the server receives and decodes each one whole.
        mid_config = {"class_name": "SGD", "config": {"name": "x" * (15 << 19)}}
        for index in range(40):
            try:
                client.create_model(f"mid{index}", mid_config, {"w": np.ones(1, np.float32)})
            except Exception:  # noqa: BLE001
                refused += 1
        time.sleep(1.5)
        after_mid_configs = server.status("VmRSS")
        try:
            client.create_model(
                "over", "sgd", {"a": np.ones(size // 8, np.float32), "b": np.ones(size // 2, np.float32)}
            )
        except Exception:  # noqa: BLE001
            refused += 1
        time.sleep(1.5)
        after_model = server.status("VmRSS")
    return {
        "refused": refused,
        "rss_before": before,
        "rss_after_configs": after_configs,
        "rss_after_mid_configs": after_mid_configs,
        "rss_after_model": after_model,
    }


def _push_latencies(client: Client, seconds: float, stop: threading.Event | None = None) -> list[float]:
    gradient = {"w": np.ones(1024, np.float32)}  # 4 KB
    latencies = []
    ends = time.monotonic() + seconds
    while time.monotonic() < ends and not (stop is not None and stop.is_set()):
        started = time.perf_counter()
        client.push("small", gradient)
        latencies.append(time.perf_counter() - started)
    return latencies


def contention_case(size: int, seconds: float) -> dict:
    with (
        ServerProcess() as server,
        Client(server.address, timeout=600) as pusher,
        Client(server.address, timeout=600) as uploader,
    ):
        pusher.create_model("small", "sgd", {"w": np.zeros(1024, np.float32)})
        _push_latencies(pusher, 0.5)  # warm up
        alone = _push_latencies(pusher, seconds)
        big = {"kernel": np.full(size // 4, 0.01, np.float32)}
        upload_seconds = []
        uploading = threading.Event()
        finished = threading.Event()

        def upload():
            uploading.set()
            started = time.perf_counter()
            uploader.create_model("big", "adam", big)
            upload_seconds.append(time.perf_counter() - started)
            finished.set()

        thread = threading.Thread(target=upload)
        thread.start()
        uploading.wait()
        during = _push_latencies(pusher, 600, stop=finished)
        thread.join()

    def quantiles(values):
        values = sorted(values)
        return {
            "count": len(values),
            "p50_ms": 1000 * statistics.median(values),
            "p99_ms": 1000 * values[min(len(values) - 1, int(0.99 * len(values)))],
        }

    return {
        "alone": quantiles(alone),
        "during_upload": quantiles(during),
        "upload_s": upload_seconds[0],
        "upload_bytes": size,
    }


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--size", type=parse_byte_size, default=1 << 30, help="model / upload size: 1G, 256M, ... (default 1G)"
    )
    parser.add_argument("--cases", default="memory,refusals,contention", help="which cases to run")
    parser.add_argument("--seconds", type=float, default=3.0, help="pushes timed alone (default 3)")
    parser.add_argument("--json", action="store_true", help="print the results as JSON")
    args = parser.parse_args(argv)
    cases = [case.strip() for case in args.cases.split(",") if case.strip()]
    results = {"size": args.size, "cores": os.cpu_count()}
    if "memory" in cases:
        results["memory"] = memory_case(args.size)
    if "refusals" in cases:
        results["refusals"] = refusals_case(args.size)
    if "contention" in cases:
        results["contention"] = contention_case(args.size, args.seconds)
    if args.json:
        print(json.dumps(results, indent=2))
    else:
        _print(results)
    return 0


def _print(results: dict) -> None:
    size = results["size"]
    print(f"optserve bench_limits: {size / MiB:.0f} MiB models, {results['cores']} cores")
    for row in results.get("memory", []):
        print(
            f"  create {row['optimizer']:<4}  state {row['state_bytes'] / MiB:7.0f} MiB  "
            f"peak/state {row['peak_over_state']:.2f}  kept/state {row['kept_over_state']:.2f}  "
            f"{row['create_s']:.1f} s"
        )
    if "refusals" in results:
        row = results["refusals"]
        print(
            f"  refusals: {row['refused']} refused; RSS {row['rss_before'] / MiB:.0f} MiB before, "
            f"{row['rss_after_configs'] / MiB:.0f} MiB after 40 x 25 MB configs, "
            f"{row['rss_after_mid_configs'] / MiB:.0f} MiB after 40 x 7.5 MiB configs, "
            f"{row['rss_after_model'] / MiB:.0f} MiB after a model over --max-memory"
        )
    if "contention" in results:
        row = results["contention"]
        alone, during = row["alone"], row["during_upload"]
        print(
            f"  4 KB pushes alone:          p50 {alone['p50_ms']:.2f} ms  p99 {alone['p99_ms']:.2f} ms  "
            f"({alone['count']} pushes)"
        )
        print(
            f"  during a {size / MiB:.0f} MiB upload:  p50 {during['p50_ms']:.2f} ms  p99 {during['p99_ms']:.2f} ms  "
            f"({during['count']} pushes; upload {row['upload_s']:.1f} s)"
        )


if __name__ == "__main__":
    sys.exit(main())
