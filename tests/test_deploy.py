"""deploy/: the compose file, the Dockerfile and the health check, checked without Docker.

Every command a container runs is checked against the real CLI (`--help`), the
Dockerfile's COPY sources and entry point against the repository, and the
compose health check is run as a plain process against a real server.
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import io
import json
import pathlib
import re
import shlex
import socket
import subprocess
import sys
from concurrent import futures

import pytest
import tomllib

yaml = pytest.importorskip("yaml", reason="PyYAML (the `test` extra) parses docker-compose.yml")

ROOT = pathlib.Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"
COMPOSE_FILE = DEPLOY / "docker-compose.yml"
DOCKERFILE = DEPLOY / "Dockerfile"
SERVER_PORT = "50051"


# ---------------------------------------------------------------------------- helpers


@functools.cache
def compose() -> dict:
    return yaml.safe_load(COMPOSE_FILE.read_text())


def services() -> dict:
    return compose()["services"]


def worker_names() -> list[str]:
    return sorted(name for name, service in services().items() if service["command"][0] == "demo")


def flag_value(command: list[str], flag: str) -> str:
    return command[command.index(flag) + 1]


def dockerfile_instructions() -> list[tuple[str, str]]:
    """``(INSTRUCTION, arguments)`` pairs, continuation lines joined, comments dropped."""
    logical, pending = [], ""
    for line in DOCKERFILE.read_text().splitlines():
        stripped = line.strip()
        if not stripped or stripped.startswith("#"):
            continue
        pending += " " + stripped[:-1] if stripped.endswith("\\") else " " + stripped
        if not stripped.endswith("\\"):
            logical.append(pending.strip())
            pending = ""
    return [(text.split(None, 1)[0].upper(), text.split(None, 1)[1]) for text in logical]


def exec_form(arguments: str) -> list[str]:
    return json.loads(arguments)


@functools.cache
def cli_help(subcommand: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "optserve.server", subcommand, "--help"], capture_output=True, text=True, timeout=120
    )


def require_subcommand(subcommand: str) -> str:
    """The subcommand's --help text; fails when the CLI lacks the subcommand a container runs."""
    run = cli_help(subcommand)
    assert run.returncode == 0, f"`optserve {subcommand} --help` failed:\n{run.stdout}{run.stderr}"
    return run.stdout


def interpolate(text: str) -> str:
    """Compose's ``${VAR:-default}`` with VAR unset: the default."""
    return re.sub(r"\$\{\w+(?::?-([^}]*))?\}", lambda match: match.group(1) or "", text)


def container_commands() -> list[tuple[str, list[str]]]:
    """``(where, argv after the entry point)`` of every command the image runs."""
    commands = [
        (f"service {name}", [interpolate(str(arg)) for arg in service["command"]])
        for name, service in services().items()
    ]
    cmd = [exec_form(args) for instruction, args in dockerfile_instructions() if instruction == "CMD"]
    return commands + [("Dockerfile CMD", cmd[-1])]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def healthcheck_argv(address: str) -> list[str]:
    """The compose health check as a local command line, aimed at ``address``."""
    test = services()["server"]["healthcheck"]["test"]
    argv = [arg.replace(f"127.0.0.1:{SERVER_PORT}", address) for arg in test[1:]]
    if argv[0] == "python":
        argv[0] = sys.executable
    elif argv[0] == "optserve":
        argv[:1] = [sys.executable, "-m", "optserve.server"]
    return argv


# ---------------------------------------------------------------------------- docker-compose.yml


def test_server_service():
    server = services()["server"]
    assert server["command"] == [
        "serve",
        "--host",
        "0.0.0.0",
        "--port",
        SERVER_PORT,
        "--device",
        "auto",
        "--checkpoint-dir",
        "/checkpoints",
        "--checkpoint-every",
        "60s",
    ]
    assert server["restart"] == "unless-stopped"
    assert "checkpoints:/checkpoints" in server["volumes"]
    assert any(str(port).endswith(f":{SERVER_PORT}:{SERVER_PORT}") for port in server["ports"])
    assert "checkpoints" in compose()["volumes"]


def test_server_checkpoints_into_its_volume_and_has_time_for_the_final_one():
    from optserve.server import cli

    server = services()["server"]
    args = cli.build_parser().parse_args(server["command"])
    targets = [volume.split(":")[1] for volume in server["volumes"]]  # "source:target[:mode]"
    assert args.checkpoint_dir in targets
    assert args.checkpoint_every.seconds == 60
    # SIGTERM -> final checkpoint -> calls in flight get --grace: Docker must wait longer before SIGKILL.
    grace_period = int(re.fullmatch(r"(\d+)s", server["stop_grace_period"]).group(1))
    assert grace_period > args.grace


def test_workers_come_back_and_ride_out_a_server_restart():
    for name in worker_names():
        worker = services()[name]
        assert worker["restart"] == "on-failure", name
        assert int(flag_value(worker["command"], "--retries")) >= 8, name


def test_every_service_builds_the_one_image_from_the_repository():
    for name, service in services().items():
        build = service["build"]
        assert (COMPOSE_FILE.parent / build["context"]).resolve() == ROOT, name
        assert (ROOT / build["dockerfile"]).resolve() == DOCKERFILE, name
        assert service["image"] == services()["server"]["image"], name


def test_healthcheck_uses_the_grpc_health_service_from_inside_the_image():
    check = services()["server"]["healthcheck"]
    test = check["test"]
    assert test[0] == "CMD", "exec form: no shell needed in the image"
    assert test[1:4] == ["python", "-m", "optserve.client.health"] or test[1:3] == ["optserve", "health"]
    assert f"127.0.0.1:{SERVER_PORT}" in test
    assert not any(word in " ".join(test) for word in ("grpc_health_probe", "curl", "wget"))
    for key in ("interval", "timeout", "retries", "start_period"):
        assert key in check, key


def test_workers_wait_for_a_healthy_server_and_share_one_model():
    names = worker_names()
    assert len(names) >= 2
    indices = []
    for name in names:
        worker = services()[name]
        command = worker["command"]
        assert worker["depends_on"]["server"]["condition"] == "service_healthy", name
        assert flag_value(command, "--address") == f"server:{SERVER_PORT}", name
        assert flag_value(command, "--num-workers") == str(len(names)), name
        assert flag_value(command, "--workers") == "1", name
        assert flag_value(command, "--model-id") == flag_value(services()[names[0]]["command"], "--model-id")
        indices.append(int(flag_value(command, "--worker-index")))
    assert sorted(indices) == list(range(len(names)))


def test_gpu_reservation_is_offered_commented_out():
    text = COMPOSE_FILE.read_text()
    assert re.search(r"#\s*- driver: nvidia", text) and re.search(r"#\s*capabilities: \[gpu\]", text)
    assert "deploy" not in services()["server"]  # CPU by default: runs on hosts without a GPU


# ---------------------------------------------------------------------------- commands are real


def unknown_flags(subcommand: str, arguments: list[str], help_text: str) -> list[str]:
    """Flags of ``arguments`` the subcommand's real parser does not know (hidden flags count as known).

    Parsing also checks the values: a flag whose value the CLI rejects fails the test.
    """
    from optserve.server import cli

    module_name = getattr(cli, "CLIENT_COMMANDS", {}).get(subcommand, (None,))[0]
    owner = importlib.import_module(module_name) if module_name else cli
    build_parser = getattr(owner, "build_parser", None)
    if build_parser is None:  # no parser to ask: fall back to the help text
        flags = {arg.split("=", 1)[0] for arg in arguments if arg.startswith("--")}
        return sorted(f for f in flags if not re.search(rf"(?<![\w-]){re.escape(f)}(?![\w-])", help_text))
    prefix = [] if module_name else [subcommand]
    errors = io.StringIO()
    try:
        with contextlib.redirect_stderr(errors):
            _, unknown = build_parser().parse_known_args(prefix + arguments)
    except SystemExit:
        pytest.fail(f"`optserve {subcommand}` rejects {arguments}: {errors.getvalue().strip()}")
    return sorted({arg.split("=", 1)[0] for arg in unknown if arg.startswith("--")})


@pytest.mark.parametrize(
    "where, command", [pytest.param(where, command, id=where.split()[-1]) for where, command in container_commands()]
)
def test_container_commands_are_real_optserve_subcommands(where, command):
    subcommand, *arguments = command
    help_text = require_subcommand(subcommand)
    missing = unknown_flags(subcommand, arguments, help_text)
    assert not missing, f"{where}: `optserve {subcommand}` has no {missing}"


def test_health_subcommand_when_the_cli_offers_it():
    help_text = require_subcommand("health")
    assert "--timeout" in help_text and "--service" in help_text


def test_healthcheck_module_runs():
    run = subprocess.run(
        [sys.executable, "-m", "optserve.client.health", "--help"], capture_output=True, text=True, timeout=60
    )
    assert run.returncode == 0 and "exit 0 only when it is SERVING" in run.stdout


# ---------------------------------------------------------------------------- Dockerfile


def test_dockerfile_base_user_and_entrypoint():
    instructions = dockerfile_instructions()
    args = dict(re.match(r"(\w+)=?(.*)", a).groups() for i, a in instructions if i == "ARG")
    assert args["PYTHON_IMAGE"] == "python:3.11-slim"
    assert args["WITH_CUDA"] == "0"
    assert all(a.split()[0] == "${PYTHON_IMAGE}" for i, a in instructions if i == "FROM")
    users = [a for i, a in instructions if i == "USER"]
    assert users and users[-1].split(":")[0] not in ("0", "root")
    entrypoint = exec_form([a for i, a in instructions if i == "ENTRYPOINT"][-1])
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    assert entrypoint == ["optserve"] and entrypoint[0] in scripts
    assert [a for i, a in instructions if i == "EXPOSE"] == [SERVER_PORT]


def test_dockerfile_installs_the_gpu_extra_only_on_request():
    run_steps = " ".join(a for i, a in dockerfile_instructions() if i == "RUN")
    assert 'if [ "$WITH_CUDA" = "1" ]' in run_steps
    assert '".[gpu]"' in run_steps
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    assert any(req.startswith("cupy-cuda12x") for req in extras["gpu"])


def copy_sources() -> list[str]:
    sources = []
    for instruction, arguments in dockerfile_instructions():
        words = shlex.split(arguments)
        if instruction in ("COPY", "ADD") and not any(w.startswith("--from") for w in words):
            sources += [w for w in words[:-1] if not w.startswith("--")]
    return sources


@pytest.mark.parametrize("source", copy_sources())
def test_copy_sources_exist(source):
    path = ROOT / source
    assert path.exists(), f"COPY {source}: not in the build context (the repository root)"


def test_copied_folders_cover_the_packages():
    # The package is optserve/, whose links lead to the top-level folders: all of them must be copied.
    links = [path for path in (ROOT / "optserve").iterdir() if path.is_symlink()]
    folders = {"optserve"} | {path.resolve().relative_to(ROOT).as_posix() for path in links}
    assert {"protos", "server", "client"} <= folders
    assert folders <= {source.rstrip("/") for source in copy_sources()}
    assert "pyproject.toml" in copy_sources()


def test_dockerignore_keeps_the_venv_out_of_the_context():
    lines = (DEPLOY / "Dockerfile.dockerignore").read_text().splitlines()
    ignored = [line.strip() for line in lines if line.strip() and not line.lstrip().startswith("#")]
    assert {".venv", ".git", "**/__pycache__"} <= set(ignored)
    assert not set(copy_sources()) & set(ignored)


# ---------------------------------------------------------------------------- the health check, for real


@pytest.fixture
def live_server(request):
    pytest.importorskip("optserve.server.app", reason="the server application is not written yet")
    return request.getfixturevalue("server")


def test_compose_healthcheck_passes_against_a_real_server(live_server):
    run = subprocess.run(healthcheck_argv(live_server.address), capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stdout + run.stderr


def test_compose_healthcheck_fails_when_nothing_listens():
    run = subprocess.run(healthcheck_argv(f"127.0.0.1:{free_port()}"), capture_output=True, text=True, timeout=60)
    assert run.returncode == 1


def test_health_reports_the_server_service_too(live_server, capsys):
    from optserve.client.health import health_main

    assert health_main([live_server.address, "--service", "optserve.v1.ParameterServer"]) == 0
    assert capsys.readouterr().out.strip() == "SERVING"


@pytest.fixture
def health_only_server():
    """A bare gRPC server with just the standard health service, on loopback."""
    grpc = pytest.importorskip("grpc")
    from grpc_health.v1 import health, health_pb2, health_pb2_grpc

    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    servicer = health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    servicer.set("", health_pb2.HealthCheckResponse.SERVING)
    servicer.set("draining", health_pb2.HealthCheckResponse.NOT_SERVING)
    try:
        yield f"127.0.0.1:{port}"
    finally:
        server.stop(None)


@pytest.mark.parametrize(
    "extra, status, printed",
    [
        ([], 0, "SERVING"),
        (["--service", "draining"], 1, "NOT_SERVING"),
        (["--service", "unknown"], 1, ""),
        (["--quiet"], 0, ""),
    ],
)
def test_health_main_exit_status(health_only_server, capsys, extra, status, printed):
    from optserve.client.health import health_main

    assert health_main([health_only_server, *extra]) == status
    captured = capsys.readouterr()
    assert captured.out.strip() == printed
    if extra[-1:] == ["unknown"]:
        assert "NOT_FOUND" in captured.err


@pytest.mark.parametrize("argv", [[], ["host:1", "--timeout", "0"], ["host:1", "--timeout", "x"]])
def test_health_main_usage_errors_exit_2(argv, capsys):
    from optserve.client.health import health_main

    with pytest.raises(SystemExit) as info:
        health_main(argv)
    assert info.value.code == 2


def test_the_runtime_image_has_a_compiler_for_the_native_kernels_unless_left_out():
    instructions = dockerfile_instructions()
    runtime = [index for index, (i, a) in enumerate(instructions) if i == "FROM" and a.endswith("AS runtime")][0]
    after = instructions[runtime:]
    assert ("ARG", "WITH_COMPILER=1") in after
    run_steps = " ".join(a for i, a in after if i == "RUN")
    assert 'if [ "$WITH_COMPILER" = "1" ]' in run_steps and "g++" in run_steps
