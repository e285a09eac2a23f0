"""deploy/docker-compose.secure.yml and the TLS and token recipes of deploy/README.md, checked without Docker.

The override's commands are parsed by the real CLI; the README's openssl and
`optserve token` blocks are run as written, and a real server is started with
what they make.
"""

from __future__ import annotations

import os
import pathlib
import re
import shutil
import subprocess
import sys

import numpy as np
import pytest

yaml = pytest.importorskip("yaml", reason="PyYAML (the `test` extra) parses the compose files")

ROOT = pathlib.Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"
SECURE = DEPLOY / "docker-compose.secure.yml"
SECRETS_MOUNT = "/run/secrets/"


def secure_services() -> dict:
    return yaml.safe_load(SECURE.read_text())["services"]


def base_services() -> dict:
    return yaml.safe_load((DEPLOY / "docker-compose.yml").read_text())["services"]


def test_the_override_covers_every_service_of_the_compose_file():
    assert set(secure_services()) == set(base_services())


def test_the_secure_server_command_is_the_base_one_plus_tls_and_tokens():
    from optserve.server import cli

    server = secure_services()["server"]
    base = base_services()["server"]["command"]
    assert server["command"][: len(base)] == base
    args = cli.build_parser().parse_args(server["command"])
    mounted = {SECRETS_MOUNT + name for name in server["secrets"]}
    assert {args.tls_cert, args.tls_key, args.auth_tokens} <= mounted
    # The health check (in the base file) connects from inside the container: it must trust the CA.
    assert server["environment"]["OPTSERVE_TLS_CA"] in mounted


def test_the_workers_get_the_ca_and_their_token_from_mounted_secrets():
    from optserve.client import security

    for name, service in secure_services().items():
        if name == "server":
            continue
        mounted = {SECRETS_MOUNT + secret for secret in service["secrets"]}
        assert service["environment"][security.ENV_TLS_CA] in mounted, name
        assert service["environment"][security.ENV_TOKEN_FILE] in mounted, name
        assert security.ENV_TOKEN not in service["environment"], f"{name}: a token in the compose file is baked in"


def test_secrets_are_mounted_from_the_host_never_built_into_the_image():
    secrets = yaml.safe_load(SECURE.read_text())["secrets"]
    for name, secret in secrets.items():
        assert (SECURE.parent / secret["file"]).parent.resolve() == DEPLOY / "secrets", name
    ignored = (DEPLOY / "Dockerfile.dockerignore").read_text().splitlines()
    assert "deploy/secrets" in ignored
    assert "/deploy/secrets/" in (ROOT / ".gitignore").read_text().splitlines()
    copied = [line for line in (DEPLOY / "Dockerfile").read_text().splitlines() if line.startswith(("COPY", "ADD"))]
    assert not any("deploy" in line or "secret" in line for line in copied)


def readme_block(label: str) -> str:
    text = (DEPLOY / "README.md").read_text()
    match = re.search(rf"<!-- tested: {label} -->\n```bash\n(.*?)```", text, re.S)
    assert match, f"deploy/README.md has no tested `{label}` block"
    return match.group(1)


@pytest.fixture(scope="module")
def recipe_secrets(tmp_path_factory):
    """deploy/secrets/ as the README's blocks make it, in a scratch directory."""
    if shutil.which("openssl") is None:
        pytest.skip("openssl is not installed")
    work = tmp_path_factory.mktemp("recipe")
    # `optserve` as installed, even when the venv's bin is not on PATH.
    prelude = f'set -euo pipefail\noptserve() {{ "{sys.executable}" -m optserve.server "$@"; }}\n'
    for label in ("certificates", "tokens"):
        run = subprocess.run(
            ["bash", "-c", prelude + f"cd {work}\n" + readme_block(label)], capture_output=True, text=True, timeout=120
        )
        assert run.returncode == 0, f"README block {label!r} failed:\n{run.stderr}"
    return work / "deploy" / "secrets"


def test_the_readme_recipes_make_what_the_override_mounts(recipe_secrets):
    secrets = yaml.safe_load(SECURE.read_text())["secrets"]
    for name, secret in secrets.items():
        assert (recipe_secrets / pathlib.PurePosixPath(secret["file"]).name).is_file(), name
    assert oct((recipe_secrets / "tokens.txt").stat().st_mode & 0o777) == "0o600"


def test_a_server_runs_with_the_recipes_files(recipe_secrets):
    from optserve.client import Client, UnauthenticatedError
    from optserve.server.app import start_server

    s = recipe_secrets
    with start_server(
        device="cpu",
        tls_cert=s / "server.pem",
        tls_key=s / "server.key",
        tls_client_ca=s / "ca.pem",
        auth_tokens=s / "tokens.txt",
    ) as server:
        tls = {"ca": s / "ca.pem", "cert": s / "worker-0.pem", "key": s / "worker-0.key"}
        worker_token = (s / "worker.token").read_text().strip()
        with Client(server.address, tls=tls, token=worker_token, retries=0) as worker:
            worker.create_model("compose-demo", "sgd", {"w": np.zeros(2, np.float32)})
            with pytest.raises(UnauthenticatedError, match="outside that scope"):
                worker.create_model("other-job", "sgd", {"w": np.zeros(2, np.float32)})
        # The compose health check, as the server container runs it (CA from the environment).
        env = {
            **os.environ,
            "OPTSERVE_TLS_CA": str(s / "ca.pem"),
            "OPTSERVE_TLS_CERT": str(s / "worker-0.pem"),
            "OPTSERVE_TLS_KEY": str(s / "worker-0.key"),
        }
        test = base_services()["server"]["healthcheck"]["test"]
        argv = [
            sys.executable if arg == "python" else arg.replace("127.0.0.1:50051", server.address) for arg in test[1:]
        ]
        assert subprocess.run(argv, env=env, timeout=60).returncode == 0
        # Inside compose the workers dial "server", which the certificate names too.
        admin_token = (s / "admin.token").read_text().strip()
        with Client(server.address, tls={**tls, "server_name": "server"}, token=admin_token, retries=0) as admin:
            assert [m.model_id for m in admin.list_models()] == ["compose-demo"]
