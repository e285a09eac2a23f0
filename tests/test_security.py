"""TLS, mTLS, tokens with roles, and tenancy, against real servers on 127.0.0.1.

Certificates are made here (tests/tls_certs.py); tokens with ``optserve.server.auth``.
"""

from __future__ import annotations

import json
import logging
import os
import pathlib
import signal
import stat
import subprocess
import sys
import textwrap
import time

import grpc
import numpy as np
import pytest

pytest.importorskip("cryptography", reason="the `test` extra installs cryptography for the TLS tests")

import rpc_helpers
from tls_certs import CertificateAuthority

from optserve.client import Client, NotFoundError, OptserveError, UnauthenticatedError, UnavailableError, security
from optserve.protos import optserve_pb2 as pb
from optserve.protos import optserve_pb2_grpc as pb_grpc
from optserve.protos import tensors as codec
from optserve.server import auth, tls
from optserve.server.app import start_server
from optserve.server.errors import InvalidArgumentError

ROOT = pathlib.Path(__file__).resolve().parents[1]
RPCS = [method.name for method in pb.DESCRIPTOR.services_by_name["ParameterServer"].methods]
W = {"w": np.arange(4, dtype=np.float32)}
G = {"w": np.ones(4, dtype=np.float32)}

# name -> (role, models, rights)
PRINCIPALS = {
    "reader-a": ("reader", "team-a/*", ""),
    "worker-a": ("worker", "team-a/*", ""),
    "chief-a": ("worker", "team-a/*", "aggregate"),
    "admin-a": ("admin", "team-a/*", ""),
    "worker-b": ("worker", "team-b/*", ""),
    "root": ("admin", "*", ""),
}
CERT_PRINCIPAL = "name=cert-reader role=reader models=team-a/* cert_cn=worker-7"


# ---------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    directory = tmp_path_factory.mktemp("pki")
    ca = CertificateAuthority(directory, "optserve-test")
    rogue = CertificateAuthority(directory, "rogue")
    return {
        "ca": ca.bundle,
        "server": ca.issue("server", server=True),
        "client": ca.issue("worker-7"),  # listed in the token file (cert_cn)
        "unlisted_client": ca.issue("unlisted"),  # signed by the right CA, but no principal
        "rogue_ca": rogue.bundle,
        "rogue_client": rogue.issue("worker-7-rogue"),
    }


def write_tokens(path: pathlib.Path, names=PRINCIPALS, extra: str = "") -> dict[str, str]:
    secrets, lines = {}, []
    for name in names:
        role, models, rights = PRINCIPALS[name]
        secrets[name], line = auth.new_token_line(name, role, models, rights)
        lines.append(line)
    path.write_text("# test principals\n" + "\n".join(lines) + "\n" + extra)
    return secrets


@pytest.fixture(scope="module")
def secure(pki, tmp_path_factory):
    """A server with mTLS and tokens; yields (running server, {name: token}, TLS options of a client)."""
    directory = tmp_path_factory.mktemp("secure")
    tokens = write_tokens(directory / "tokens.txt", extra=CERT_PRINCIPAL + "\n")
    server = start_server(
        device="cpu",
        checkpoint_dir=directory / "checkpoints",
        checkpoint_every="off",
        tls_cert=pki["server"].cert,
        tls_key=pki["server"].key,
        tls_client_ca=pki["ca"],
        auth_tokens=directory / "tokens.txt",
    )
    client_tls = security.TLSOptions(ca=pki["ca"], cert=pki["client"].cert, key=pki["client"].key)
    try:
        yield server, tokens, client_tls
    finally:
        server.stop()


@pytest.fixture(scope="module")
def tls_only(pki):
    """A TLS server without client certificates or tokens."""
    server = start_server(device="cpu", tls_cert=pki["server"].cert, tls_key=pki["server"].key)
    try:
        yield server
    finally:
        server.stop()


def client_for(secure, name: str | None, **kwargs) -> Client:
    """A client with the listed certificate and the token of principal ``name`` (a raw token if not one)."""
    server, tokens, client_tls = secure
    token = tokens.get(name, name) if name is not None else False
    return Client(server.address, tls=client_tls, token=token, retries=0, timeout=20, **kwargs)


def stub_for(secure, pki, caller: str):
    """A raw stub for ``caller``: a principal, "bogus" (an unknown token) or "none" (no token, and a
    certificate the token file does not list)."""
    server, tokens, client_tls = secure
    if caller == "none":
        client_tls = security.TLSOptions(ca=pki["ca"], cert=pki["unlisted_client"].cert, key=pki["unlisted_client"].key)
    token = {"none": False, "bogus": "osk_bogus"}.get(caller) if caller in ("none", "bogus") else tokens[caller]
    channel = security.open_channel(server.address, codec.GRPC_OPTIONS, tls=client_tls, token=token)
    return channel, pb_grpc.ParameterServerStub(channel)


def code_of(call) -> str:
    try:
        call()
    except grpc.RpcError as error:
        return error.code().name
    except OptserveError as error:
        return error.code
    return "OK"


_counter = iter(range(1_000_000))


def fresh_model(secure, prefix: str = "team-a") -> str:
    model_id = f"{prefix}/m{next(_counter)}"
    with client_for(secure, "root") as root:
        root.create_model(model_id, "sgd", W)
    return model_id


# ---------------------------------------------------------------------------- TLS and mTLS


def test_a_tls_client_works_and_a_plaintext_one_fails(tls_only, pki):
    with Client(tls_only.address, tls={"ca": pki["ca"]}, retries=0, timeout=20) as client:
        client.create_model("tls-model", "sgd", W)
        assert client.push("tls-model", G).step == 1
        assert client.health() == "SERVING"
    with Client(tls_only.address, tls=False, retries=0, timeout=5) as plaintext:
        with pytest.raises(UnavailableError):
            plaintext.list_models()


def test_a_tls_client_that_does_not_trust_the_servers_ca_is_refused(tls_only, pki):
    with Client(tls_only.address, tls={"ca": pki["rogue_ca"]}, retries=0, timeout=5) as client:
        with pytest.raises(UnavailableError):
            client.list_models()


@pytest.mark.parametrize("certificate", [None, "rogue_client"])
def test_mtls_refuses_a_client_without_a_certificate_or_with_one_from_another_ca(secure, pki, certificate):
    server, tokens, _ = secure
    tls_options = {"ca": pki["ca"]}
    if certificate is not None:
        tls_options.update(cert=pki[certificate].cert, key=pki[certificate].key)
    with Client(server.address, tls=tls_options, token=tokens["root"], retries=0, timeout=5) as client:
        with pytest.raises(UnavailableError):
            client.list_models()


def test_a_listed_client_certificate_stands_for_a_token(secure):
    model_id = fresh_model(secure)
    with client_for(secure, None) as by_certificate:
        assert model_id in [m.model_id for m in by_certificate.list_models()]
        with pytest.raises(UnauthenticatedError) as refused:
            by_certificate.push(model_id, G)
        assert refused.value.code == "PERMISSION_DENIED" and "'cert-reader' (role reader)" in refused.value.message


# ---------------------------------------------------------------------------- roles x RPCs


def _unary_first(model_id: str) -> pb.ApplyGradientsRequest:
    return pb.ApplyGradientsRequest(header=pb.ApplyGradientsHeader(model_id=model_id, worker_index=0, step=0))


def _call_rpc(stub, rpc: str, model_id: str) -> None:
    calls = {
        "ListModels": lambda: stub.ListModels(pb.ListModelsRequest(), timeout=20),
        "Pull": lambda: rpc_helpers.pull(stub, model_id),
        "GetWeights": lambda: rpc_helpers.get_weights(stub, model_id),
        "CreateModel": lambda: rpc_helpers.create_model(stub, model_id + "-new", W),
        "ApplyGradients": lambda: rpc_helpers.push(stub, model_id, 0, 0, G),
        "ApplyGradientsUnary": lambda: stub.ApplyGradientsUnary(
            next(iter(codec.chunk_messages(_unary_first(model_id), "gradients", [(n, "", g) for n, g in G.items()]))),
            timeout=20,
        ),
        "OpenSharedMemory": lambda: stub.OpenSharedMemory(
            pb.OpenSharedMemoryRequest(model_id=model_id, worker_index=0), timeout=20
        ),
        "OpenDataPlane": lambda: stub.OpenDataPlane(
            pb.OpenDataPlaneRequest(model_id=model_id, worker_index=0), timeout=20
        ),
        "SetWeights": lambda: rpc_helpers.set_weights(stub, model_id, {("w", ""): np.zeros(4, np.float32)}),
        "DeleteModel": lambda: stub.DeleteModel(pb.DeleteModelRequest(model_id=model_id), timeout=20),
        "Checkpoint": lambda: stub.Checkpoint(pb.CheckpointRequest(), timeout=60),
        # Nothing is held for a global norm: let through, it is refused as a step not held.
        "CommitStep": lambda: list(stub.CommitStep(pb.CommitStepRequest(model_id=model_id), timeout=20)),
    }
    calls[rpc]()


OK, DENIED, UNAUTHENTICATED = "OK", "PERMISSION_DENIED", "UNAUTHENTICATED"
HELD = "FAILED_PRECONDITION"  # allowed, but the model holds no step for its global norm
# The documented answer of every RPC for each caller, on a model of team-a.
# "none" (no token, an unlisted certificate) and "bogus" (an unknown token) are UNAUTHENTICATED everywhere.
EXPECTED = {
    "ListModels": {"reader-a": OK, "worker-a": OK, "admin-a": OK, "root": OK},
    "Pull": {"reader-a": OK, "worker-a": OK, "admin-a": OK, "root": OK},
    "GetWeights": {"reader-a": OK, "worker-a": OK, "admin-a": OK, "root": OK},
    "CreateModel": {"reader-a": DENIED, "worker-a": OK, "admin-a": OK, "root": OK},
    "ApplyGradients": {"reader-a": DENIED, "worker-a": OK, "admin-a": OK, "root": OK},
    "ApplyGradientsUnary": {"reader-a": DENIED, "worker-a": OK, "admin-a": OK, "root": OK},
    "OpenSharedMemory": {"reader-a": DENIED, "worker-a": OK, "admin-a": OK, "root": OK},
    # Allowed, but a server with TLS has no data plane: its bytes stay on gRPC.
    "OpenDataPlane": {"reader-a": DENIED, "worker-a": HELD, "admin-a": HELD, "root": HELD},
    "SetWeights": {"reader-a": DENIED, "worker-a": DENIED, "admin-a": OK, "root": OK},
    "DeleteModel": {"reader-a": DENIED, "worker-a": DENIED, "admin-a": OK, "root": OK},
    "Checkpoint": {"reader-a": DENIED, "worker-a": DENIED, "admin-a": DENIED, "root": OK},
    "CommitStep": {"reader-a": DENIED, "worker-a": HELD, "admin-a": HELD, "root": HELD},
}
CALLERS = ["reader-a", "worker-a", "admin-a", "root", "bogus", "none"]


def test_every_rpc_of_the_proto_has_an_access_rule_and_an_expected_answer():
    assert sorted(auth.RPC_RULES) == sorted(RPCS), "a new RPC needs an entry in optserve.server.auth.RPC_RULES"
    assert sorted(EXPECTED) == sorted(RPCS), "a new RPC needs its row in EXPECTED"


@pytest.mark.parametrize("caller", CALLERS)
@pytest.mark.parametrize("rpc", RPCS)
def test_each_role_gets_the_documented_answer_from_each_rpc(secure, pki, rpc, caller):
    expected = UNAUTHENTICATED if caller in ("bogus", "none") else EXPECTED[rpc][caller]
    model_id = fresh_model(secure)
    with client_for(secure, "root") as root:
        before = root.get_weights(model_id, include_variables=True)
    channel, stub = stub_for(secure, pki, caller)
    with channel:
        assert code_of(lambda: _call_rpc(stub, rpc, model_id)) == expected
    if expected != OK:
        with client_for(secure, "root") as root:
            after = root.get_weights(model_id, include_variables=True)
            assert (after.step, after.iterations) == (before.step, before.iterations)
            np.testing.assert_array_equal(after.variables["w"], before.variables["w"])
            if rpc == "CreateModel":
                with pytest.raises(NotFoundError):
                    root.list_models(model_id + "-new")


def test_an_rpc_without_a_rule_is_refused_for_everybody():
    root = auth.parse_token_file("name=root role=admin models=* token=sha256:" + "0" * 64)[0]
    with pytest.raises(auth.Refused) as refused:
        auth.authorize(root, "SomeNewRpc", None)
    assert refused.value.code == grpc.StatusCode.PERMISSION_DENIED and "no access rule" in refused.value.message


@pytest.mark.parametrize(
    "messages, says",
    [
        ([], "received no messages"),
        ([pb.CreateModelRequest()], "must carry `spec`"),
    ],
)
def test_a_stream_that_names_no_model_reaches_the_handlers_own_check(secure, pki, messages, says):
    channel, stub = stub_for(secure, pki, "worker-a")
    with channel:
        error = rpc_helpers.rpc_error(stub.CreateModel, iter(messages), timeout=10)
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT and says in error.details()


def test_health_and_reflection_need_no_token(secure):
    from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

    server, _, client_tls = secure
    channel = security.open_channel(server.address, tls=client_tls, token=False)
    with channel:
        from grpc_health.v1 import health_pb2, health_pb2_grpc

        status = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=10).status
        assert status == health_pb2.HealthCheckResponse.SERVING
        replies = reflection_pb2_grpc.ServerReflectionStub(channel).ServerReflectionInfo(
            iter([reflection_pb2.ServerReflectionRequest(list_services="")]), timeout=10
        )
        services = [s.name for reply in replies for s in reply.list_services_response.service]
        assert "optserve.v1.ParameterServer" in services


@pytest.mark.parametrize(
    "metadata, says",
    [
        (
            (),
            "requires a token: the call carries no `authorization: Bearer <token>` metadata and its client "
            "certificate (CN=unlisted) is not listed",
        ),
        ((("authorization", "Basic dXNlcjpwYXNz"),), "must read 'Bearer <token>'"),
        ((("authorization", "Bearer osk_not-a-known-token"),), "not known to this server"),
    ],
)
def test_unauthenticated_calls_say_what_is_missing_and_never_echo_the_token(secure, pki, metadata, says):
    channel, stub = stub_for(secure, pki, "none")
    with channel:
        error = rpc_helpers.rpc_error(stub.ListModels, pb.ListModelsRequest(), metadata=metadata, timeout=10)
    assert error.code() == grpc.StatusCode.UNAUTHENTICATED
    assert says in error.details()
    assert "dXNlcjpwYXNz" not in error.details() and "not-a-known-token" not in error.details()


# ---------------------------------------------------------------------------- tenancy


def test_team_a_cannot_see_read_push_set_or_delete_team_bs_model(secure):
    with client_for(secure, "worker-b") as team_b:
        team_b.create_model("team-b/secret", "sgd", W)
    with client_for(secure, "root") as root:
        before = root.get_weights("team-b/secret", include_variables=True)
    for name in ("worker-a", "admin-a"):
        with client_for(secure, name) as team_a:
            assert all(m.model_id.startswith("team-a/") for m in team_a.list_models())
            attempts = {
                "list": lambda: team_a.list_models("team-b/secret"),
                "pull": lambda: team_a.pull("team-b/secret"),
                "get_weights": lambda: team_a.get_weights("team-b/secret"),
                "push": lambda: team_a.push("team-b/secret", G, step=0),
                "set_weights": lambda: team_a.set_weights("team-b/secret", variables={"w": np.zeros(4, np.float32)}),
                "delete": lambda: team_a.delete_model("team-b/secret"),
                "create": lambda: team_a.create_model("team-b/secret", "sgd", W),
            }
            for what, attempt in attempts.items():
                with pytest.raises(UnauthenticatedError) as refused:
                    attempt()
                assert refused.value.code == "PERMISSION_DENIED", (name, what)
                assert "outside that scope" in refused.value.message or "needs role" in refused.value.message
                assert "shape" not in refused.value.message
            # Same answer for a team-b model that does not exist: the refusal reveals nothing.
            with pytest.raises(UnauthenticatedError, match="outside that scope"):
                team_a.pull("team-b/no-such-model")
            # A missing model of one's own team lists only one's own team's models.
            with pytest.raises(NotFoundError) as missing:
                team_a.pull("team-a/no-such-model")
            assert "team-b" not in missing.value.message
    with client_for(secure, "root") as root:
        after = root.get_weights("team-b/secret", include_variables=True)
        assert after.step == before.step == 0
        np.testing.assert_array_equal(after.variables["w"], W["w"])
        assert "team-b/secret" in [m.model_id for m in root.list_models()]


def test_an_exact_scope_covers_the_shard_pieces_of_its_model():
    principal = auth.parse_token_file("name=x role=worker models=job,team-c/* token=sha256:" + "0" * 64)[0]
    assert principal.may_touch("job") and principal.may_touch("job@0123456789ab")
    assert principal.may_touch("job@0123456789ab/layout") and principal.may_touch("team-c/anything")
    assert (
        not principal.may_touch("job2") and not principal.may_touch("job@xyz") and not principal.may_touch("team-d/x")
    )


def test_a_worker_without_the_aggregate_right_cannot_complete_a_step_alone(secure):
    model_id = f"team-a/sync{next(_counter)}"
    with client_for(secure, "worker-a") as worker, client_for(secure, "worker-a") as other:
        worker.create_model(model_id, "sgd", W, num_workers=2)
        with pytest.raises(UnauthenticatedError, match="aggregate right") as refused:
            worker.push(model_id, {"w": np.full(4, 100.0, np.float32)}, worker_index=0, step=0, aggregated=True)
        assert refused.value.code == "PERMISSION_DENIED"
        assert worker.list_models(model_id)[0].step == 0
        # The real workers' step goes through: neither of them is answered as a duplicate.
        import concurrent.futures

        with concurrent.futures.ThreadPoolExecutor(2) as pool:
            results = list(
                pool.map(
                    lambda args: args[0].push(model_id, G, worker_index=args[1], step=0), [(worker, 0), (other, 1)]
                )
            )
        assert [r.duplicate for r in results] == [False, False]
        assert sorted(results[0].contributors) == [0, 1]
    with client_for(secure, "chief-a") as chief:
        assert chief.push(model_id, G, worker_index=0, step=1, aggregated=True).step == 2


# ---------------------------------------------------------------------------- the token file


@pytest.mark.parametrize(
    "line, message",
    [
        ("name=a role=writer models=* token=sha256:" + "0" * 64, "`role` must be one of reader, worker, admin"),
        ("name=a role=worker models=* token=osk_plainsecret", "not the token itself"),
        ("name=a role=worker token=sha256:" + "0" * 64, "missing models"),
        ("name=a role=worker models=a*b token=sha256:" + "0" * 64, "prefixes ending in '*'"),
        ("name=a role=worker models=* rights=root token=sha256:" + "0" * 64, "`rights` may hold"),
        ("name=a role=worker models=*", "token=sha256:<hex>"),
        ("name=a role=worker models=* secret=x token=sha256:" + "0" * 64, "expected key=value"),
        (
            "name=a role=worker models=* token=sha256:" + "0" * 64 + "\nname=a role=reader models=* cert_cn=x",
            "each name may appear once",
        ),
    ],
)
def test_a_bad_token_file_is_refused_with_the_line_and_the_fix(line, message):
    with pytest.raises(auth.TokenFileError) as refused:
        auth.parse_token_file(line, "tokens.txt")
    assert "tokens.txt" in refused.value.message and message in refused.value.message
    assert "plainsecret" not in refused.value.message


def test_the_file_holds_only_the_hash_and_lookups_find_the_token(tmp_path):
    tokens = write_tokens(tmp_path / "tokens.txt", ["worker-a", "root"])
    text = (tmp_path / "tokens.txt").read_text()
    assert not any(secret in text for secret in tokens.values())
    table = auth.TokenTable(tmp_path / "tokens.txt")
    assert table.by_token(tokens["root"]).name == "root"
    assert table.by_token(tokens["root"] + "x") is None and table.by_token("") is None


def test_optserve_token_appends_a_line_that_the_server_accepts(tmp_path):
    path = tmp_path / "tokens.txt"
    run = subprocess.run(
        [
            sys.executable,
            "-m",
            "optserve.server",
            "token",
            "--name",
            "ci",
            "--role",
            "worker",
            "--models",
            "team-a/*",
            "--rights",
            "aggregate",
            "--append",
            str(path),
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert run.returncode == 0, run.stderr
    secret = run.stdout.strip()
    assert secret.startswith(auth.TOKEN_PREFIX) and secret not in path.read_text()
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    principal = auth.TokenTable(path).by_token(secret)
    assert (principal.name, principal.role, principal.models, principal.rights) == (
        "ci",
        "worker",
        ("team-a/*",),
        frozenset({"aggregate"}),
    )


def test_tokens_are_never_logged(secure, caplog):
    server, tokens, _ = secure
    caplog.set_level(logging.DEBUG)
    model_id = fresh_model(secure)
    with client_for(secure, "worker-a") as worker:
        worker.push(model_id, G)
        with pytest.raises(UnauthenticatedError):
            worker.delete_model(model_id)
    with client_for(secure, "osk_wrong-secret-value") as stranger:
        with pytest.raises(UnauthenticatedError):
            stranger.list_models()
    with client_for(secure, "root") as root:
        root.delete_model(model_id)
    assert all(secret not in caplog.text for secret in tokens.values())
    assert "wrong-secret-value" not in caplog.text
    audit = [r.getMessage() for r in caplog.records if r.name == "optserve.audit"]
    assert any(f"DeleteModel by 'root' (role admin) on model '{model_id}'" in m and m.endswith(": OK") for m in audit)
    assert any("refused DeleteModel by 'worker-a' (role worker)" in m for m in audit)


def test_a_reload_with_a_broken_file_keeps_the_tokens_in_force(pki, tmp_path):
    path = tmp_path / "tokens.txt"
    tokens = write_tokens(path, ["root"])
    with start_server(device="cpu", auth_tokens=path) as server:
        path.write_text("name=root role=superuser models=* token=sha256:" + "0" * 64 + "\n")
        assert server.reload_auth() is False
        with Client(server.address, token=tokens["root"], retries=0) as client:
            assert client.list_models() == []


def test_sighup_reloads_the_token_file_of_optserve_serve_and_revokes_a_token(tmp_path):
    path = tmp_path / "tokens.txt"
    tokens = write_tokens(path, ["worker-a", "root"])
    process = subprocess.Popen(
        [
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
            "--auth-tokens",
            str(path),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        line = process.stdout.readline()
        assert line.startswith("optserve listening on "), line + process.stderr.read()
        address = line.split()[-1]
        with (
            Client(address, token=tokens["worker-a"], retries=0) as revoked,
            Client(address, token=tokens["root"], retries=0) as kept,
        ):
            revoked.create_model("team-a/job", "sgd", W)
            path.write_text(
                "\n".join(line for line in path.read_text().splitlines() if "name=worker-a" not in line) + "\n"
            )
            process.send_signal(signal.SIGHUP)
            deadline = time.monotonic() + 20
            while True:
                try:
                    revoked.list_models()
                except UnauthenticatedError as error:
                    assert error.code == "UNAUTHENTICATED"
                    break
                assert time.monotonic() < deadline, "the token still works 20 s after SIGHUP"
                time.sleep(0.05)
            assert [m.model_id for m in kept.list_models()] == ["team-a/job"]
    finally:
        process.send_signal(signal.SIGTERM)
        _, stderr = process.communicate(timeout=60)
    assert process.returncode == 0, stderr
    assert "reloaded: 1 principal(s)" in stderr
    assert all(secret not in stderr for secret in tokens.values())


# ---------------------------------------------------------------------------- options and warnings


@pytest.mark.parametrize(
    "options, message",
    [
        ({"tls_cert": "server"}, "`tls_cert` needs `tls_key`"),
        ({"tls_key": "server"}, "`tls_key` needs `tls_cert`"),
        ({"tls_client_ca": "ca"}, "needs `tls_cert` and `tls_key`"),
        ({"tls_cert": "notpem", "tls_key": "server"}, "is not PEM"),
        ({"tls_cert": "missing", "tls_key": "server"}, "Cannot read --tls-cert"),
    ],
)
def test_incomplete_or_unreadable_tls_options_are_startup_errors(pki, tmp_path, options, message):
    (tmp_path / "notpem").write_text("not a certificate")
    files = {
        "server": str(pki["server"].cert),
        "ca": str(pki["ca"]),
        "notpem": str(tmp_path / "notpem"),
        "missing": str(tmp_path / "missing.pem"),
    }
    arguments = {key: files[value] for key, value in options.items()}
    if "tls_key" in arguments and options.get("tls_key") == "server":
        arguments["tls_key"] = str(pki["server"].key)
    with pytest.raises(InvalidArgumentError, match=message.replace("`", ".").replace("(", ".")):
        start_server(device="cpu", **arguments)


def test_a_missing_token_file_is_a_startup_error(tmp_path):
    with pytest.raises(InvalidArgumentError, match="Cannot read the token file"):
        start_server(device="cpu", auth_tokens=tmp_path / "none.txt")


def test_exposure_warnings():
    server_tls = tls.ServerTLS("c", "k")
    assert tls.exposure_warnings("127.0.0.1", None, False) == []
    assert tls.exposure_warnings("::1", None, False) == []
    assert "neither TLS nor tokens" in tls.exposure_warnings("0.0.0.0", None, False)[0]
    assert "clear text" in tls.exposure_warnings("10.0.0.5", None, True)[0]
    assert "no client authentication" in tls.exposure_warnings("0.0.0.0", server_tls, False)[0]
    assert tls.exposure_warnings("0.0.0.0", server_tls, True) == []
    assert tls.exposure_warnings("0.0.0.0", tls.ServerTLS("c", "k", "ca"), False) == []


# ---------------------------------------------------------------------------- client options


def test_the_environment_points_unchanged_code_at_a_secure_server(secure, pki, monkeypatch):
    server, tokens, _ = secure
    monkeypatch.setenv(security.ENV_TLS_CA, str(pki["ca"]))
    monkeypatch.setenv(security.ENV_TLS_CERT, str(pki["client"].cert))
    monkeypatch.setenv(security.ENV_TLS_KEY, str(pki["client"].key))
    monkeypatch.setenv(security.ENV_TOKEN, tokens["worker-a"])
    model_id = fresh_model(secure)
    with Client(server.address, retries=0) as client:
        assert client.push(model_id, G).step == 1


@pytest.mark.parametrize(
    "tls_argument, message",
    [
        ({"cert": "a.pem"}, "`cert` needs `key`"),
        ({"ca": "a.pem", "password": "x"}, "unknown keys: \\['password'\\]"),
        (3, "`tls` must be None"),
    ],
)
def test_bad_tls_arguments_are_refused_eagerly(tls_argument, message):
    with pytest.raises((ValueError, TypeError), match=message):
        Client("127.0.0.1:1", tls=tls_argument)


def test_a_malformed_token_is_refused_without_echoing_it():
    with pytest.raises(ValueError) as refused:
        Client("127.0.0.1:1", tls=False, token="osk_abc def")
    assert "abc" not in str(refused.value)


def test_a_token_sent_in_clear_text_off_loopback_warns():
    with pytest.warns(UserWarning, match="without TLS"):
        security.open_channel("192.0.2.1:50051", tls=False, token="osk_x").close()


def test_optserve_checkpoint_has_the_same_connection_options_as_the_client_commands():
    import argparse

    from optserve.server import cli

    def flags(parser):
        return sorted((a.dest, tuple(a.option_strings), a.nargs, a.const) for a in parser._actions if a.dest != "help")

    checkpoint = next(
        action for action in cli.build_parser()._actions if isinstance(action, argparse._SubParsersAction)
    ).choices["checkpoint"]
    reference = argparse.ArgumentParser()
    security.add_connection_arguments(reference)
    assert set(flags(reference)) <= set(flags(checkpoint))


def test_cli_subcommands_take_the_tls_and_token_options(secure, pki, tmp_path):
    server, tokens, _ = secure
    fresh_model(secure)
    (tmp_path / "root.token").write_text(tokens["root"] + "\n")
    (tmp_path / "reader.token").write_text(tokens["reader-a"] + "\n")
    tls_args = ["--tls-ca", str(pki["ca"]), "--tls-cert", str(pki["client"].cert), "--tls-key", str(pki["client"].key)]

    def optserve(*argv):
        return subprocess.run(
            [sys.executable, "-m", "optserve.server", *argv], capture_output=True, text=True, timeout=120
        )

    health = optserve("health", server.address, *tls_args)
    assert health.returncode == 0 and health.stdout.strip() == "SERVING", health.stderr
    assert optserve("health", server.address, "--timeout", "3").returncode == 1  # plaintext to a TLS port
    inspect = optserve("inspect", server.address, "--json", *tls_args, "--token-file", str(tmp_path / "reader.token"))
    assert inspect.returncode == 0, inspect.stderr
    assert all(m["model_id"].startswith("team-a/") for m in json.loads(inspect.stdout)["models"])
    denied = optserve("checkpoint", server.address, *tls_args, "--token-file", str(tmp_path / "reader.token"))
    assert denied.returncode == 1 and "PERMISSION_DENIED" in denied.stderr and "needs role admin" in denied.stderr
    saved = optserve("checkpoint", server.address, *tls_args, "--token-file", str(tmp_path / "root.token"))
    assert saved.returncode == 0, saved.stderr
    assert pathlib.Path(saved.stdout.strip()).is_dir()


# ---------------------------------------------------------------------------- Keras on torch


KERAS_SCRIPT = textwrap.dedent("""
    import json, os, sys
    import numpy as np
    import keras
    from optserve.client import Client, RemoteOptimizer

    address, ca, token = sys.argv[1], sys.argv[2], sys.argv[3]
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(1, name="dense")])
    optimizer = RemoteOptimizer("sgd", address, model_id="team-a/keras", tls={"ca": ca}, token=token,
                                learning_rate=0.1)
    model.compile(optimizer=optimizer, loss="mse")
    x = np.random.default_rng(0).normal(size=(32, 3)).astype("float32")
    y = x @ np.array([[1.0], [-2.0], [0.5]], "float32")
    losses = model.fit(x, y, epochs=3, batch_size=8, verbose=0).history["loss"]
    config = optimizer.get_config()
    with Client(address, tls={"ca": ca}, token=token) as client:
        _, values = client.pull("team-a/keras")
    kernel = model.get_layer("dense").kernel
    print(json.dumps({
        "backend": keras.backend.backend(), "losses": losses, "iterations": int(optimizer.iterations.numpy()),
        "server_matches": bool(np.allclose(values[kernel.path], keras.ops.convert_to_numpy(kernel))),
        "config_tls": config["tls"], "token_in_config": token in json.dumps(config),
        "revived_tls": RemoteOptimizer.from_config(config).get_config()["tls"],
    }))
""")


def test_remote_optimizer_trains_through_tls_and_a_token_on_torch(pki, tmp_path):
    pytest.importorskip("torch")
    path = tmp_path / "tokens.txt"
    tokens = write_tokens(path, ["worker-a"])
    with start_server(device="cpu", tls_cert=pki["server"].cert, tls_key=pki["server"].key, auth_tokens=path) as server:
        env = {**os.environ, "KERAS_BACKEND": "torch"}
        for name in (security.ENV_TOKEN, security.ENV_TOKEN_FILE, security.ENV_TLS_CA):
            env.pop(name, None)
        run = subprocess.run(
            [sys.executable, "-c", KERAS_SCRIPT, server.address, str(pki["ca"]), tokens["worker-a"]],
            capture_output=True,
            text=True,
            timeout=300,
            env=env,
            cwd=ROOT,
        )
    assert run.returncode == 0, run.stderr[-4000:]
    report = json.loads(run.stdout.strip().splitlines()[-1])
    assert report["backend"] == "torch"
    assert report["iterations"] == 12 and report["losses"][-1] < report["losses"][0]
    assert report["server_matches"]
    assert report["config_tls"] == {"ca": str(pki["ca"])} == report["revived_tls"]
    assert report["token_in_config"] is False


def test_a_sharded_client_reaches_its_shards_through_tls_with_an_exact_scope(pki, tmp_path):
    path = tmp_path / "tokens.txt"
    secret, line = auth.new_token_line("job-worker", "worker", "sharded-job")
    path.write_text(line + "\n")
    options = dict(device="cpu", tls_cert=pki["server"].cert, tls_key=pki["server"].key, auth_tokens=path)
    with start_server(**options) as first, start_server(**options) as second:
        variables = {f"v{i}": np.full(64, i, np.float32) for i in range(4)}
        with Client([first.address, second.address], tls={"ca": pki["ca"]}, token=secret, retries=0) as client:
            client.create_model("sharded-job", "sgd", variables)
            result = client.push("sharded-job", {name: np.ones(64, np.float32) for name in variables})
            assert result.step == 1
            assert [m.model_id for m in client.list_models()] == ["sharded-job"]
            with pytest.raises(UnauthenticatedError, match="outside that scope"):
                client.create_model("sharded-job-2", "sgd", variables)
