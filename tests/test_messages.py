"""The conversions between optserve.v1 messages and the server's objects (server/messages.py)."""

from __future__ import annotations

import json

import pytest

from optserve.protos import optserve_pb2 as pb
from optserve.server import messages
from optserve.server.errors import InvalidArgumentError


def test_spec_choices_take_unspecified_as_the_defaults():
    assert messages.spec_choices(pb.ModelSpec()) == {
        "mode": "sync",
        "timeout_policy": "fail",
        "non_finite_policy": None,
    }


def test_spec_choices_name_each_choice():
    spec = pb.ModelSpec(mode=pb.ASYNC, timeout_policy=pb.APPLY_PARTIAL, non_finite_policy=pb.NON_FINITE_SKIP_STEP)
    assert messages.spec_choices(spec) == {
        "mode": "async",
        "timeout_policy": "apply_partial",
        "non_finite_policy": "skip_step",
    }


@pytest.mark.parametrize("field", ["mode", "timeout_policy", "non_finite_policy"])
def test_an_unknown_enum_value_names_its_field(field):
    spec = pb.ModelSpec(**{field: 97})
    with pytest.raises(InvalidArgumentError, match=rf"Unknown `{field}` value 97\."):
        messages.spec_choices(spec)


def test_every_proto_choice_is_mapped_both_ways():
    for enum, table in [
        (pb.SyncMode, messages.MODE_FROM_PROTO),
        (pb.TimeoutPolicy, messages.POLICY_FROM_PROTO),
        (pb.NonFinitePolicy, messages.NON_FINITE_FROM_PROTO),
    ]:
        assert set(table) == set(enum.values())


def test_state_update_without_fields_keeps_an_absent_rate_and_schedule():
    update = messages.state_update(pb.OptimizerState(iterations=3, step=4), [])
    assert (update.iterations, update.step, update.learning_rate, update.schedule) == (3, 4, None, None)


def test_state_update_writes_only_the_named_fields():
    schedule = {"class_name": "ExponentialDecay", "config": {"initial_learning_rate": 0.1}}
    state = pb.OptimizerState(iterations=3, learning_rate_schedule_json=json.dumps(schedule))
    update = messages.state_update(state, ["learning_rate_schedule_json"])
    assert update.schedule == schedule and update.iterations is None and update.learning_rate is None


def test_state_update_refuses_unknown_field_names():
    with pytest.raises(InvalidArgumentError, match=r"unknown OptimizerState fields \['itterations'\]"):
        messages.state_update(pb.OptimizerState(), ["itterations"])


@pytest.mark.parametrize(
    ("text", "message"),
    [("not json", "is not valid JSON"), ("[1, 2]", "must be a JSON object")],
)
def test_a_bad_schedule_says_what_to_send(text, message):
    state = pb.OptimizerState(learning_rate_schedule_json=text)
    with pytest.raises(InvalidArgumentError, match=message):
        messages.state_update(state, ["learning_rate_schedule_json"])


def test_a_named_but_empty_schedule_is_refused():
    with pytest.raises(InvalidArgumentError, match="is empty; send keras.optimizers.schedules.serialize"):
        messages.state_update(pb.OptimizerState(), ["learning_rate_schedule_json"])
