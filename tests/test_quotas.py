"""Quotas per principal (token): models and bytes of state, refused before the variables are
received, released on delete, charged again after a restart; restores within the server's limits."""

from __future__ import annotations

import logging
import time

import grpc
import numpy as np
import pytest
import rpc_helpers as rpc
from grpc_health.v1 import health_pb2

from optserve.client.client import Client, ResourceExhaustedError
from optserve.protos import optserve_pb2 as pb
from optserve.server import auth
from optserve.server.app import ParameterServer, start_server
from optserve.server.errors import FailedPreconditionError, InvalidArgumentError
from optserve.server.limits import Limits

MiB = 1 << 20
ADAM = {"class_name": "Adam", "config": {"learning_rate": 0.01}}


def _floats(nbytes: int) -> np.ndarray:
    return np.ones(nbytes // 4, np.float32)


@pytest.fixture
def tokens(tmp_path):
    """A token file: team-a (2 MiB of state, its own line), team-b (the server's defaults), an admin."""
    path = tmp_path / "tokens.txt"
    issued, lines = {}, []
    for name, models, extra in (
        ("team-a", "team-a/*", " max_memory=2M"),
        ("team-b", "team-b/*", ""),
        ("platform", "*", " max_models=unlimited max_memory=unlimited"),
    ):
        token, line = auth.new_token_line(name, "admin" if name == "platform" else "worker", models)
        issued[name] = token
        lines.append(line + extra)
    path.write_text("\n".join(lines) + "\n")
    return path, issued


def _list(server, token: str) -> dict[str, pb.ModelInfo]:
    channel, stub = rpc.connect(server.address)
    with channel:
        response = stub.ListModels(pb.ListModelsRequest(), metadata=(("authorization", f"Bearer {token}"),), timeout=10)
    return {info.spec.model_id: info for info in response.models}


def _assert_health_answers(server, within_s: float = 1.0) -> None:
    started = time.monotonic()
    assert rpc.health_status(server.address) == health_pb2.HealthCheckResponse.SERVING
    assert time.monotonic() - started < within_s


def test_a_principal_over_its_model_quota_is_refused_and_the_others_keep_answering(tokens):
    path, issued = tokens
    limits = Limits(max_models_per_principal=2)
    with (
        start_server(device="cpu", auth_tokens=path, limits=limits) as server,
        Client(server.address, token=issued["team-a"]) as team_a,
        Client(server.address, token=issued["team-b"]) as team_b,
    ):
        team_a.create_model("team-a/one", "sgd", {"w": np.ones(4, np.float32)})
        team_a.create_model("team-a/two", "sgd", {"w": np.ones(4, np.float32)})
        with pytest.raises(ResourceExhaustedError) as refused:
            team_a.create_model("team-a/three", "sgd", {"w": np.ones(4, np.float32)})
        message = refused.value.message
        assert "'team-a'" in message and "--max-models-per-principal" in message and "DeleteModel" in message
        assert refused.value.details["principal"] == "team-a"
        assert refused.value.details["quota"] == "max_models"
        assert (refused.value.details["quota_used"], refused.value.details["quota_limit"]) == ("2", "2")
        # Joining one of its models is no new model; another principal and health are unaffected.
        assert not team_a.create_model("team-a/one", "sgd", {"w": np.ones(4, np.float32)}).created
        team_b.create_model("team-b/one", "sgd", {"w": np.ones(4, np.float32)})
        team_a.push("team-a/one", {"w": np.ones(4, np.float32)})
        _assert_health_answers(server)
        # Deleting one of its models gives the slot back.
        with Client(server.address, token=issued["platform"]) as admin:
            assert admin.delete_model("team-a/two")
        team_a.create_model("team-a/three", "sgd", {"w": np.ones(4, np.float32)})


def test_a_principal_over_its_memory_quota_is_refused_before_the_variables_are_received(tokens):
    path, issued = tokens
    with (
        start_server(device="cpu", auth_tokens=path, limits=Limits(max_memory=64 * MiB)) as server,
        Client(server.address, token=issued["team-a"]) as team_a,
        Client(server.address, token=issued["team-b"]) as team_b,
    ):
        team_a.create_model("team-a/small", "sgd", {"w": _floats(MiB)})
        with pytest.raises(ResourceExhaustedError) as refused:  # Adam: 3 MiB of state, 1 MiB left
            team_a.create_model("team-a/adam", ADAM, {"w": _floats(MiB)})
        message = refused.value.message
        assert "'team-a'" in message and "max_memory= on its line of the token file" in message
        assert refused.value.details["quota"] == "max_memory"
        assert refused.value.details["quota_used"] == str(MiB)
        # team-b has no quota: only --max-memory bounds it.
        team_b.create_model("team-b/adam", ADAM, {"w": _floats(4 * MiB)})
        _assert_health_answers(server)
        # The refusal left team-a's use where it was: what is left still fits.
        team_a.create_model("team-a/rest", "sgd", {"w": _floats(MiB)})
        listed = _list(server, issued["platform"])
        assert listed["team-a/small"].owner == "team-a" and listed["team-a/small"].state_bytes == MiB
        assert listed["team-b/adam"].owner == "team-b" and listed["team-b/adam"].state_bytes == 12 * MiB
        with Client(server.address, token=issued["platform"]) as admin:
            admin.delete_model("team-a/small")
        team_a.create_model("team-a/again", "sgd", {"w": _floats(MiB)})


def test_a_model_refused_midway_by_the_quota_gives_back_what_it_reserved(tokens):
    path, issued = tokens
    with (
        start_server(device="cpu", auth_tokens=path) as server,
        Client(server.address, token=issued["team-a"]) as team_a,
    ):
        with pytest.raises(ResourceExhaustedError):  # the first variable fits, the second does not
            team_a.create_model("team-a/two-parts", "sgd", {"a": _floats(MiB), "b": _floats(2 * MiB)})
        team_a.create_model("team-a/whole", "sgd", {"w": _floats(2 * MiB)})  # all 2 MiB are free again
        assert _list(server, issued["platform"])["team-a/whole"].state_bytes == 2 * MiB


def test_per_principal_quotas_need_a_token_file():
    with pytest.raises(InvalidArgumentError, match="need --auth-tokens"):
        ParameterServer("127.0.0.1", 0, "cpu", limits=Limits(max_memory_per_principal=MiB))


def test_without_a_token_file_models_have_no_owner_and_only_the_server_limits_apply():
    with start_server(device="cpu", limits=Limits(max_models=2)) as server, Client(server.address) as client:
        client.create_model("a", "sgd", {"w": np.ones(4, np.float32)})
        channel, stub = rpc.connect(server.address)
        with channel:
            (info,) = stub.ListModels(pb.ListModelsRequest(), timeout=10).models
        assert info.owner == "" and info.state_bytes == 16


@pytest.mark.parametrize(
    "field, says",
    [
        ("max_memory=0", "`max_memory` must be a size"),
        ("max_memory=lots", "`max_memory` must be a size"),
        ("max_models=-1", "`max_models` must be a number of models"),
    ],
)
def test_a_bad_quota_in_the_token_file_is_refused_with_the_line(field, says):
    line = f"name=a role=worker models=a/* token=sha256:{'0' * 64} {field}"
    with pytest.raises(auth.TokenFileError, match=says):
        auth.parse_token_file(line)


def test_quotas_in_the_token_file_parse():
    line = f"name=a role=worker models=a/* token=sha256:{'0' * 64} max_models=3 max_memory=1GiB"
    first, second = auth.parse_token_file(line + "\nname=b role=worker models=b/* cert_cn=b max_models=unlimited")
    assert (first.max_models, first.max_memory) == (3, 1 << 30)
    assert (second.max_models, second.max_memory) == (-1, None)


# ---------------------------------------------------------------- restores


def test_a_restart_charges_each_principal_for_its_restored_models(tokens, tmp_path, caplog):
    path, issued = tokens
    checkpoints = tmp_path / "checkpoints"
    options = dict(device="cpu", auth_tokens=path, checkpoint_dir=checkpoints, checkpoint_every="off")
    with start_server(**options) as server, Client(server.address, token=issued["team-a"]) as team_a:
        team_a.create_model("team-a/one", "sgd", {"w": _floats(MiB)})
        team_a.create_model("team-a/two", "sgd", {"w": _floats(MiB // 2)})
    with start_server(**options) as server, Client(server.address, token=issued["team-a"]) as team_a:
        listed = _list(server, issued["platform"])
        assert {model_id: info.owner for model_id, info in listed.items()} == {
            "team-a/one": "team-a",
            "team-a/two": "team-a",
        }
        with pytest.raises(ResourceExhaustedError, match="1572864 bytes of state"):
            team_a.create_model("team-a/three", "sgd", {"w": _floats(MiB)})
    # A lowered quota keeps the restored models (loudly) and refuses new ones.
    path.write_text(path.read_text().replace("max_memory=2M", "max_memory=1M"))
    with caplog.at_level(logging.WARNING, logger="optserve.server.restore_budget"):
        with start_server(**options) as server, Client(server.address, token=issued["team-a"]) as team_a:
            assert sorted(_list(server, issued["platform"])) == ["team-a/one", "team-a/two"]
            with pytest.raises(ResourceExhaustedError):
                team_a.create_model("team-a/three", "sgd", {"w": np.ones(4, np.float32)})
    assert any("'team-a' holds more than its quotas" in record.getMessage() for record in caplog.records)


@pytest.mark.parametrize(
    "limits, flag",
    [
        (Limits(max_memory=2 * MiB), "--max-memory 4M"),
        (Limits(max_memory=64 * MiB, max_model_bytes=2 * MiB), "--max-model-bytes 3M"),
        (Limits(max_models=1), "--max-models 2"),
    ],
)
def test_a_checkpoint_over_the_servers_limits_refuses_the_start_naming_the_flag(tmp_path, limits, flag):
    options = dict(device="cpu", checkpoint_dir=tmp_path, checkpoint_every="off")
    with start_server(**options) as server, Client(server.address) as client:
        client.create_model("adam", ADAM, {"w": _floats(MiB)})  # 3 MiB of state, 2 MiB of it in the checkpoint
        client.create_model("small", "sgd", {"w": _floats(MiB // 4)})
    with pytest.raises(FailedPreconditionError) as refused:
        start_server(limits=limits, **options)
    assert flag in refused.value.message and "Nothing was loaded" in refused.value.message
    # Nothing was dropped: with the limit raised, every model is back.
    with start_server(**options) as server, Client(server.address) as client:
        assert sorted(info.model_id for info in client.list_models()) == ["adam", "small"]


def test_a_checkpoint_larger_than_the_memory_budget_is_refused_before_it_is_read(tmp_path, monkeypatch):
    options = dict(device="cpu", checkpoint_dir=tmp_path, checkpoint_every="off")
    with start_server(**options) as server, Client(server.address) as client:
        client.create_model("big", "sgd", {"w": _floats(4 * MiB)})
    from optserve.server import checkpoint

    def never(*args, **kwargs):
        raise AssertionError("the checkpoint's arrays were read")

    monkeypatch.setattr(checkpoint, "_load_checkpoint", never)
    with pytest.raises(FailedPreconditionError, match="arrays alone are .*Start with --max-memory 5M"):
        start_server(limits=Limits(max_memory=MiB), **options)


def test_health_answers_while_a_quota_refuses_a_large_model(tokens):
    path, issued = tokens
    with (
        start_server(device="cpu", auth_tokens=path) as server,
        Client(server.address, token=issued["team-a"]) as team_a,
    ):
        channel, stub = rpc.connect(server.address)
        with channel:
            spec = pb.ModelSpec(model_id="team-a/huge", optimizer_config_json='{"class_name": "SGD", "config": {}}')
            declared = pb.TensorChunk(name="w", dtype=pb.FLOAT32, shape=[1 << 28], data=b"\0" * 1024)
            error = rpc.rpc_error(
                stub.CreateModel,
                iter([pb.CreateModelRequest(spec=spec, variables=[declared])]),
                metadata=(("authorization", f"Bearer {issued['team-a']}"),),
                timeout=20,
            )
        assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert rpc.trailing(error)["optserve-principal"] == "team-a"
        _assert_health_answers(server)
        team_a.create_model("team-a/ok", "sgd", {"w": np.ones(4, np.float32)})


def test_each_principals_use_is_a_metric(tokens):
    from test_metrics import scrape

    path, issued = tokens
    with (
        start_server(device="cpu", auth_tokens=path, metrics_port=0) as server,
        Client(server.address, token=issued["team-a"]) as team_a,
    ):
        team_a.create_model("team-a/one", "sgd", {"w": _floats(MiB)})
        team_a.create_model("team-a/two", ADAM, {"w": _floats(MiB // 4)})
        series = scrape(server.metrics_port)
    assert series[("optserve_principal_models", (("principal", "team-a"),))] == 2
    assert series[("optserve_principal_state_bytes", (("principal", "team-a"),))] == MiB + 3 * MiB // 4


def test_an_expired_model_gives_its_principals_quota_back(tokens):
    path, issued = tokens
    limits = Limits(max_models_per_principal=1)
    with (
        start_server(device="cpu", auth_tokens=path, limits=limits, model_ttl_s=0.5) as server,
        Client(server.address, token=issued["team-b"]) as team_b,
    ):
        team_b.create_model("team-b/first", "sgd", {"w": np.ones(4, np.float32)})
        with pytest.raises(ResourceExhaustedError):
            team_b.create_model("team-b/second", "sgd", {"w": np.ones(4, np.float32)})
        rpc.wait_until(lambda: "team-b/first" not in _list(server, issued["platform"]), timeout=20, interval=0.2)
        team_b.create_model("team-b/second", "sgd", {"w": np.ones(4, np.float32)})


def test_optserve_token_writes_the_quotas_on_the_line(tmp_path, capsys):
    from optserve.server.cli import main

    path = tmp_path / "tokens.txt"
    argv = ["token", "--name", "a", "--role", "worker", "--models", "a/*", "--max-models", "3", "--max-memory", "1G"]
    assert main([*argv, "--append", str(path)]) == 0
    (principal,) = auth.TokenTable(path)._principals
    assert (principal.max_models, principal.max_memory) == (3, 1 << 30)
    assert main([*argv[:-2], "--max-memory", "none"]) == 2
    assert "`max_memory` must be a size" in capsys.readouterr().err
