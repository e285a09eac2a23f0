"""Prometheus metrics: a real sync run scraped over HTTP, label bounds, the CLI flag, the dashboard."""

from __future__ import annotations

import json
import pathlib
import re
import subprocess
import sys
import threading
import time
import urllib.request

import grpc
import numpy as np
import pytest
import rpc_helpers
from prometheus_client.parser import text_string_to_metric_families

from optserve.protos import optserve_pb2 as pb
from optserve.server.app import start_server

ROOT = pathlib.Path(__file__).resolve().parents[1]
DASHBOARD = ROOT / "deploy" / "grafana-dashboard.json"
SHAPE = (4, 3)
PAYLOAD = int(np.prod(SHAPE)) * 4  # float32 bytes of one gradient


def scrape(port: int) -> dict[tuple[str, tuple], float]:
    """``{(sample name, sorted labels): value}`` of one scrape."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
        assert response.status == 200
        assert response.headers["Content-Type"].startswith("text/plain")
        text = response.read().decode()
    samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return samples


def value(samples, name: str, **labels) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def _gradient(seed: int) -> dict[str, np.ndarray]:
    return {"w": np.random.default_rng(seed).standard_normal(SHAPE).astype(np.float32)}


def _push_all(stub, model_id: str, step: int, workers=(0, 1)) -> list:
    results, errors = [None] * len(workers), []

    def run(slot, worker):
        try:
            results[slot] = rpc_helpers.push(stub, model_id, worker, step, _gradient(step * 10 + worker))[0]
        except grpc.RpcError as error:
            errors.append(error)

    threads = [threading.Thread(target=run, args=(i, w)) for i, w in enumerate(workers)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(20)
    return [r for r in results if r is not None] + errors


def test_a_sync_run_with_two_workers_and_a_step_timeout_moves_the_metrics_by_what_happened(tmp_path):
    server = start_server(port=0, device="cpu", metrics_port=0, checkpoint_dir=tmp_path, checkpoint_every="off")
    channel, stub = rpc_helpers.connect(server.address)
    try:
        before = scrape(server.metrics_port)
        assert value(before, "optserve_models") == 0
        sgd = rpc_helpers.sgd(learning_rate=0.1, momentum=0.9)
        initial = {"w": np.zeros(SHAPE, np.float32)}
        rpc_helpers.create_model(
            stub, "job", initial, sgd, num_workers=2, sync_timeout_s=0.4, timeout_policy=pb.APPLY_PARTIAL
        )
        rpc_helpers.create_model(
            stub, "strict", initial, sgd, num_workers=2, sync_timeout_s=0.3, timeout_policy=pb.FAIL
        )
        for step in range(3):
            assert all(isinstance(r, pb.StepResult) for r in _push_all(stub, "job", step))
        duplicate, _ = rpc_helpers.push(stub, "job", 0, 2, _gradient(20))
        assert duplicate.duplicate
        waiting_started = time.perf_counter()
        lone: list = []
        pusher = threading.Thread(target=lambda: lone.extend(_push_all(stub, "job", 3, workers=(0,))))
        pusher.start()  # worker 1 is missing: the step is applied after 0.4 s
        time.sleep(0.15)
        during = scrape(server.metrics_port)
        pusher.join(20)
        (partial,) = lone
        assert list(partial.missing_workers) == [1]
        (failed,) = _push_all(stub, "strict", 0, workers=(0,))  # FAIL policy: nothing applied
        assert failed.code() == grpc.StatusCode.ABORTED
        assert time.perf_counter() - waiting_started >= 0.7
        rpc_helpers.pull(stub, "job")
        stub.Checkpoint(pb.CheckpointRequest(), timeout=20)
        after = scrape(server.metrics_port)
    finally:
        channel.close()
        server.stop()

    job, strict = {"model": "job"}, {"model": "strict"}
    rpc = {"grpc_service": "optserve.v1.ParameterServer"}
    # While worker 0 waits alone in step 3:
    assert value(during, "optserve_model_waiting_workers", **job) == 1
    assert value(during, "optserve_rpc_in_flight", grpc_method="ApplyGradients", **rpc) == 1
    assert value(during, "optserve_rpc_in_flight_received_bytes") > PAYLOAD
    assert value(during, "optserve_model_steps_total", **job) == 3
    assert value(during, "optserve_model_step_timeouts_total", **job) == 0
    assert value(after, "optserve_model_steps_total", **job) == 4
    assert value(after, "optserve_model_pushes_total", **job) == 8  # 3 x 2, a duplicate, a lone push
    assert value(after, "optserve_model_duplicate_pushes_total", **job) == 1
    assert value(after, "optserve_model_received_bytes_total", **job) == 8 * PAYLOAD
    assert value(after, "optserve_model_sent_bytes_total", **job) == PAYLOAD  # the pull
    assert value(after, "optserve_model_apply_seconds_count", **job) == 4
    assert value(after, "optserve_model_sync_wait_seconds_count", **job) == 7  # duplicates do not wait
    assert value(after, "optserve_model_sync_wait_seconds_sum", **job) >= 0.35  # the timer starts a bit earlier
    assert value(after, "optserve_model_step_timeouts_total", **job) == 1
    assert value(after, "optserve_model_partial_applies_total", **job) == 1
    assert value(after, "optserve_model_steps_total", **strict) == 0
    assert value(after, "optserve_model_step_timeouts_total", **strict) == 1
    assert value(after, "optserve_model_partial_applies_total", **strict) == 0
    assert value(after, "optserve_model_sync_wait_seconds_sum", **strict) >= 0.25
    assert value(after, "optserve_model_waiting_workers", **job) == 0
    assert value(after, "optserve_model_iterations", **job) == 4
    assert value(after, "optserve_model_step", **job) == 4
    assert value(after, "optserve_model_learning_rate", **job) == pytest.approx(0.1)
    assert value(after, "optserve_model_state_bytes", **job) == 2 * PAYLOAD  # variable + momentum
    assert value(after, "optserve_state_bytes") == 4 * PAYLOAD
    assert value(after, "optserve_models") == 2

    assert value(after, "optserve_rpc_handled_total", grpc_method="ApplyGradients", grpc_code="OK", **rpc) == 8
    assert value(after, "optserve_rpc_handled_total", grpc_method="ApplyGradients", grpc_code="ABORTED", **rpc) == 1
    assert value(after, "optserve_rpc_handled_total", grpc_method="CreateModel", grpc_code="OK", **rpc) == 2
    assert value(after, "optserve_rpc_started_total", grpc_method="ApplyGradients", **rpc) == 9
    assert value(after, "optserve_rpc_duration_seconds_count", grpc_method="ApplyGradients", **rpc) == 9
    assert (
        value(after, "optserve_rpc_duration_seconds_bucket", grpc_method="ApplyGradients", le="0.25", **rpc) <= 7
    )  # the lone pushes waited for their timeout
    assert value(after, "optserve_rpc_in_flight", grpc_method="ApplyGradients", **rpc) == 0
    assert value(after, "optserve_rpc_in_flight_received_bytes") == 0
    assert value(after, "optserve_rpc_received_bytes_total", grpc_method="ApplyGradients", **rpc) > 9 * PAYLOAD
    assert value(after, "optserve_rpc_sent_bytes_total", grpc_method="Pull", **rpc) > PAYLOAD
    assert value(after, "optserve_checkpoints_total") == 1
    assert value(after, "optserve_checkpoint_failures_total") == 0
    assert value(after, "optserve_checkpoint_duration_seconds_count") == 1
    assert value(after, "optserve_checkpoint_size_bytes") > 4 * PAYLOAD
    assert 0 <= value(after, "optserve_checkpoint_age_seconds") < 60


class _FakeModel:
    def __init__(self, model_id):
        self.model_id = model_id
        self.events = None

    def gauges(self):
        return {"waiting": 1, "lr": 0.5, "iterations": 3, "step": 3, "bytes": 10}


def test_model_labels_are_bounded_and_a_deleted_models_series_go():
    from optserve.server.metrics import OTHER_MODELS, ServerMetrics

    metrics = ServerMetrics(max_model_labels=2)
    models = [_FakeModel(f"m{i}") for i in range(4)]
    for model in models:
        metrics.model_added(model)
        model.events.pushed(8, duplicate=False)
        model.events.applied(0.01, partial=False)
    from prometheus_client import generate_latest

    text = generate_latest(metrics.registry).decode()
    labels = set(re.findall(r'optserve_model_steps_total\{model="([^"]+)"\}', text))
    assert labels == {"m0", "m1", OTHER_MODELS}
    assert f'optserve_model_steps_total{{model="{OTHER_MODELS}"}} 2.0' in text
    assert f'optserve_model_waiting_workers{{model="{OTHER_MODELS}"}} 2.0' in text
    metrics.model_removed(models[0])
    text = generate_latest(metrics.registry).decode()
    assert 'model="m0"' not in text
    assert "optserve_models 3.0" in text
    with pytest.raises(ValueError, match="max_model_labels"):
        ServerMetrics(max_model_labels=0)


def test_optserve_serve_metrics_port_serves_prometheus_text():
    process = subprocess.Popen(
        [sys.executable, "-m", "optserve.server.cli", "serve", "--port", "0", "--metrics-port", "0", "--device", "cpu"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        port = None
        deadline = time.monotonic() + 60
        while port is None and time.monotonic() < deadline:
            line = process.stderr.readline()
            if not line:
                break
            found = re.search(r"metrics on http://127\.0\.0\.1:(\d+)/metrics", line)
            if found:
                port = int(found.group(1))
        assert port, "the server did not announce its metrics port"
        samples = scrape(port)
        assert value(samples, "optserve_models") == 0
        assert ("optserve_checkpoint_age_seconds", ()) in samples
    finally:
        process.terminate()
        process.wait(30)
    assert process.returncode == 0


def test_metrics_port_must_be_a_port():
    result = subprocess.run(
        [sys.executable, "-m", "optserve.server.cli", "serve", "--metrics-port", "70000"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2
    assert "--metrics-port" in result.stderr


def _exported_names() -> set[str]:
    from prometheus_client import generate_latest

    from optserve.server.metrics import ServerMetrics

    metrics = ServerMetrics()
    model = _FakeModel("m")
    metrics.model_added(model)
    metrics.checkpoint_saved(0.1, ROOT)
    text = generate_latest(metrics.registry).decode()
    # The collector's families show only with a model; counters and histograms show their samples.
    names = set(re.findall(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)", text, re.M))
    return names | {
        "optserve_rpc_started_total",
        "optserve_rpc_handled_total",
        "optserve_rpc_in_flight",
        "optserve_rpc_received_bytes_total",
        "optserve_rpc_sent_bytes_total",
        *(f"optserve_rpc_duration_seconds_{s}" for s in ("bucket", "sum", "count")),
    }


def test_the_grafana_dashboard_uses_only_exported_metrics():
    dashboard = json.loads(DASHBOARD.read_text())
    expressions = [target["expr"] for panel in dashboard["panels"] for target in panel.get("targets", [])]
    assert len(expressions) >= 10
    used = {name for expr in expressions for name in re.findall(r"\b(optserve_[a-z0-9_]+)", expr)}
    assert used, "the dashboard queries no optserve metric"
    unknown = used - _exported_names()
    assert not unknown, f"the dashboard queries metrics the server does not export: {sorted(unknown)}"
    templated = [v["query"] for v in dashboard.get("templating", {}).get("list", []) if "query" in v]
    for query in templated:
        text = query if isinstance(query, str) else query.get("query", "")
        assert set(re.findall(r"\b(optserve_[a-z0-9_]+)", text)) <= _exported_names()
