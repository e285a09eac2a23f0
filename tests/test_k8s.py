"""deploy/k8s/: the manifests validate against a pinned Kubernetes (offline), agree with each
other, and the commands their pods run work as plain processes: N shards, probes, metrics,
an Indexed Job's workers, a SIGTERM with its final checkpoint."""

from __future__ import annotations

import functools
import pathlib
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.request

import grpc
import pytest
import yaml
from grpc_health.v1 import health_pb2, health_pb2_grpc

ROOT = pathlib.Path(__file__).resolve().parents[1]
K8S = ROOT / "deploy" / "k8s"
KUBERNETES_VERSION = "1.31.0"  # the oldest Kubernetes these manifests promise to work on
APPLIED = ("service.yaml", "statefulset.yaml", "worker-job.yaml")
EXAMPLES = ("secrets.example.yaml",)


@functools.cache
def documents(name: str) -> list[dict]:
    return [doc for doc in yaml.safe_load_all((K8S / name).read_text()) if doc]


def one(kind: str) -> dict:
    found = [doc for name in APPLIED for doc in documents(name) if doc["kind"] == kind]
    assert len(found) == 1, kind
    return found[0]


def flag(args: list[str], name: str) -> str:
    return args[args.index(name) + 1]


def container(workload: dict) -> dict:
    containers = workload["spec"]["template"]["spec"]["containers"]
    assert len(containers) == 1
    return containers[0]


@pytest.fixture
def no_network(monkeypatch):
    """Validation must work offline: any attempt to reach the network fails the test."""

    def refuse(*args, **kwargs):
        raise AssertionError(f"network access during validation: {args!r}")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "getaddrinfo", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


@pytest.mark.parametrize("name", APPLIED + EXAMPLES)
def test_manifests_validate_against_the_pinned_kubernetes_offline(name, no_network):
    import kubernetes_validate

    for document in documents(name):
        kubernetes_validate.validate(document, KUBERNETES_VERSION, strict=True)


def test_a_wrong_field_fails_validation(no_network):
    import kubernetes_validate

    broken = yaml.safe_load(yaml.safe_dump(one("StatefulSet")))
    broken["spec"]["replicas"] = "two"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, KUBERNETES_VERSION, strict=True)
    broken = yaml.safe_load(yaml.safe_dump(one("StatefulSet")))
    broken["spec"]["template"]["spec"]["containers"][0]["readinessProbe"]["grpc"]["prt"] = 1
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, KUBERNETES_VERSION, strict=True)


def test_kustomization_applies_every_manifest_but_the_examples():
    kustomization = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    assert sorted(kustomization["resources"]) == sorted(APPLIED)
    manifests = {p.name for p in K8S.glob("*.yaml")} - {"kustomization.yaml"}
    assert manifests == set(APPLIED + EXAMPLES)


def test_shards_behind_a_headless_service_with_a_volume_each():
    service, shards = one("Service"), one("StatefulSet")
    assert service["spec"]["clusterIP"] == "None"
    assert shards["spec"]["serviceName"] == service["metadata"]["name"]
    labels = shards["spec"]["template"]["metadata"]["labels"]
    assert service["spec"]["selector"].items() <= labels.items()
    assert shards["spec"]["selector"]["matchLabels"].items() <= labels.items()
    args = container(shards)["args"]
    assert args[0] == "serve" and flag(args, "--host") == "0.0.0.0"
    (claim,) = shards["spec"]["volumeClaimTemplates"]
    mounts = {m["name"]: m["mountPath"] for m in container(shards)["volumeMounts"]}
    assert mounts[claim["metadata"]["name"]] == flag(args, "--checkpoint-dir")
    assert claim["spec"]["accessModes"] == ["ReadWriteOnce"]


def test_probes_ports_grace_and_scrape_annotations_match_the_server_command():
    shards = one("StatefulSet")
    server = container(shards)
    args = server["args"]
    ports = {p["name"]: p["containerPort"] for p in server["ports"]}
    assert ports["grpc"] == int(flag(args, "--port"))
    assert ports["metrics"] == int(flag(args, "--metrics-port"))
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert server[probe]["grpc"]["port"] == ports["grpc"], probe
        assert "exec" not in server[probe] and "httpGet" not in server[probe], probe
    assert server["readinessProbe"]["grpc"]["service"] == "optserve.v1.ParameterServer"
    startup = server["startupProbe"]
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 300, "a restore may take minutes"
    # SIGTERM -> the final checkpoint -> --grace for calls in flight: all before SIGKILL.
    grace = shards["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
    assert grace >= float(flag(args, "--grace")) + 60
    annotations = shards["spec"]["template"]["metadata"]["annotations"]
    assert annotations["prometheus.io/scrape"] == "true"
    assert int(annotations["prometheus.io/port"]) == ports["metrics"]
    assert annotations["prometheus.io/path"] == "/metrics"
    service_ports = {p["name"]: p["port"] for p in one("Service")["spec"]["ports"]}
    assert service_ports == ports


def test_tls_and_token_secrets_are_mounted_optionally():
    spec = one("StatefulSet")["spec"]["template"]["spec"]
    secrets = {v["secret"]["secretName"]: v for v in spec["volumes"] if "secret" in v}
    assert set(secrets) == {"optserve-tls", "optserve-tokens"}
    assert all(v["secret"]["optional"] for v in secrets.values())
    examples = {doc["metadata"]["name"] for doc in documents("secrets.example.yaml")}
    assert examples == set(secrets)


def shard_addresses() -> list[str]:
    shards, service = one("StatefulSet"), one("Service")
    port = flag(container(shards)["args"], "--port")
    return [
        f"{shards['metadata']['name']}-{i}.{service['metadata']['name']}:{port}"
        for i in range(shards["spec"]["replicas"])
    ]


def test_the_indexed_job_runs_one_worker_per_index_against_every_shard():
    job = one("Job")
    spec = job["spec"]
    worker = container(job)
    args = worker["args"]
    assert spec["completionMode"] == "Indexed"
    assert spec["completions"] == spec["parallelism"] == int(flag(args, "--num-workers"))
    env = {e["name"]: e for e in worker["env"]}
    index_var = re.fullmatch(r"\$\((\w+)\)", flag(args, "--worker-index")).group(1)
    assert (
        env[index_var]["valueFrom"]["fieldRef"]["fieldPath"]
        == "metadata.annotations['batch.kubernetes.io/job-completion-index']"
    )
    assert flag(args, "--address").split(",") == shard_addresses()
    assert spec["template"]["spec"]["restartPolicy"] == "OnFailure"
    assert int(flag(args, "--retries")) >= 8


# ---------------------------------------------------------------------------- the pods' commands, run


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def replace_flags(args: list[str], values: dict[str, str]) -> list[str]:
    args = list(args)
    for name, value in values.items():
        args[args.index(name) + 1] = value
    return args


def expand(args: list[str], env: dict[str, str]) -> list[str]:
    """Kubernetes' $(VAR) expansion of container args."""
    return [re.sub(r"\$\((\w+)\)", lambda m: env[m.group(1)], arg) for arg in args]


def optserve(args: list[str], **kwargs) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "optserve.server", *args], text=True, **kwargs)


def wait_listening(process: subprocess.Popen) -> str:
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        line = process.stdout.readline()
        found = re.search(r"optserve listening on (\S+)", line or "")
        if found:
            return found.group(1)
        if not line and process.poll() is not None:
            break
    raise AssertionError("the shard did not start")


def probe(address: str, service: str) -> int:
    with grpc.insecure_channel(address) as channel:
        return (
            health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=service), timeout=10).status
        )


def test_the_pods_commands_train_a_sharded_job_and_stop_with_a_final_checkpoint(tmp_path):
    shards, job = one("StatefulSet"), one("Job")
    server = container(shards)
    annotations = shards["spec"]["template"]["metadata"]["annotations"]
    servers, addresses, metrics_ports = [], [], []
    try:
        for index in range(shards["spec"]["replicas"]):
            metrics_port = free_port()
            args = replace_flags(
                server["args"],
                {
                    "--host": "127.0.0.1",
                    "--port": str(free_port()),
                    "--metrics-port": str(metrics_port),
                    "--checkpoint-dir": str(tmp_path / f"shard-{index}"),
                    "--device": "cpu",
                },
            )
            servers.append(optserve(args, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL))
            addresses.append(wait_listening(servers[-1]))
            metrics_ports.append(metrics_port)
        for address in addresses:
            for kind in ("startupProbe", "readinessProbe", "livenessProbe"):
                service = server[kind]["grpc"].get("service", "")
                assert probe(address, service) == health_pb2.HealthCheckResponse.SERVING, (address, kind)

        worker = container(job)
        workers = []
        for index in range(job["spec"]["completions"]):
            env = {"WORKER_INDEX": str(index)}  # what the Job controller puts in the annotation
            args = replace_flags(expand(worker["args"], env), {"--address": ",".join(addresses), "--steps": "3"})
            workers.append(optserve(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE))
        for process in workers:
            out, err = process.communicate(timeout=240)
            assert process.returncode == 0, out + err

        for port in metrics_ports:
            url = f"http://127.0.0.1:{port}{annotations['prometheus.io/path']}"
            with urllib.request.urlopen(url, timeout=10) as response:
                text = response.read().decode()
            # A sharded model is stored on each shard as "k8s-demo@<placement>".
            steps = re.search(r'optserve_model_steps_total\{model="k8s-demo@[0-9a-f]+"\} (\S+)', text)
            assert steps and float(steps.group(1)) == 3.0, text[:2000]
    finally:
        for process in servers:
            process.send_signal(signal.SIGTERM)
        grace = shards["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
        codes = [process.wait(timeout=grace) for process in servers]
    assert codes == [0] * len(servers)
    for index in range(len(servers)):
        checkpoints = sorted((tmp_path / f"shard-{index}").glob("ckpt-*"))
        assert checkpoints, f"shard {index} wrote no final checkpoint"
        assert (checkpoints[-1] / "tensors.safetensors").exists()
