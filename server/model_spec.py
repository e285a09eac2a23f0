"""A model's spec: its id, optimizer config, workers, step protocol and variables.

What CreateModel asks for, validated before anything is allocated, compared when a
worker joins (``ModelSpec.differences`` names what differs) and written to and read
from checkpoints (``spec_state`` / ``spec_from_state``).
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np

from optserve.server import text
from optserve.server.errors import InvalidArgumentError

SYNC = "sync"
ASYNC = "async"
MODES = (SYNC, ASYNC)
FAIL = "fail"
APPLY_PARTIAL = "apply_partial"
TIMEOUT_POLICIES = (FAIL, APPLY_PARTIAL)
# What a push holding NaN or inf does; "reject" by default, since one worker's NaN
# would otherwise poison the synchronous sum of every worker, silently.
REJECT = "reject"
ALLOW = "allow"
SKIP_STEP = "skip_step"
NON_FINITE_POLICIES = (REJECT, ALLOW, SKIP_STEP)
MAX_MODEL_ID_LENGTH = 256


@dataclasses.dataclass(frozen=True)
class VariableMeta:
    name: str
    shape: tuple[int, ...]
    dtype: np.dtype

    def describe(self) -> str:
        return text.tensor(self.shape, self.dtype)


@dataclasses.dataclass(frozen=True)
class ModelSpec:
    """What defines a model; two CreateModel calls join the same model when these agree."""

    model_id: str
    optimizer_config: dict
    num_workers: int
    mode: str
    sync_timeout_s: float  # effective timeout (the server default already filled in)
    timeout_policy: str
    variables: tuple[VariableMeta, ...]
    non_finite_policy: str = REJECT

    @property
    def optimizer_config_json(self) -> str:
        return json.dumps(self.optimizer_config, sort_keys=True)

    def differences(self, other: ModelSpec) -> list[str]:
        """Human-readable list of what differs between an existing spec and a requested one."""
        found = []
        for path, mine, theirs in _dict_differences(self.optimizer_config, other.optimizer_config):
            found.append(f"optimizer config {path}: existing {_config_value(mine)}, requested {_config_value(theirs)}")
        for field in ("num_workers", "mode", "non_finite_policy"):
            mine, theirs = getattr(self, field), getattr(other, field)
            if mine != theirs:
                found.append(f"{field}: existing {text.value(mine)}, requested {text.value(theirs)}")
        found.extend(_variable_differences(self.variables, other.variables))
        return found


def _config_value(item: Any) -> str:
    return item if item == "<absent>" else text.value(item)


def _dict_differences(mine: Any, theirs: Any, path: str = "") -> Iterable[tuple[str, Any, Any]]:
    if isinstance(mine, dict) and isinstance(theirs, dict):
        for key in sorted(set(mine) | set(theirs), key=str):
            sub = f"{path}.{key}" if path else str(key)
            yield from _dict_differences(mine.get(key, "<absent>"), theirs.get(key, "<absent>"), sub)
    elif mine != theirs:
        yield path or "<whole>", mine, theirs


def _variable_differences(mine: tuple[VariableMeta, ...], theirs: tuple[VariableMeta, ...]) -> list[str]:
    by_name = {v.name: v for v in theirs}
    found = []
    for var in mine:
        other = by_name.get(var.name)
        if other is None:
            found.append(f"variable {var.name!r}: existing {var.describe()}, missing from the request")
        elif other != var:
            found.append(f"variable {var.name!r}: existing {var.describe()}, requested {other.describe()}")
    known = {v.name for v in mine}
    found.extend(f"variable {v.name!r}: not in the existing model" for v in theirs if v.name not in known)
    if not found and [v.name for v in mine] != [v.name for v in theirs]:
        found.append("variable order differs")
    return found


def parse_optimizer_config(config_json: str):
    """The JSON text of a ModelSpec's optimizer config -> what ``optimizers.deserialize`` takes."""
    if not config_json.strip():
        raise InvalidArgumentError(
            "`optimizer_config_json` is empty. Send keras.optimizers.serialize(optimizer) as JSON, "
            'or a name such as "\\"adam\\"".'
        )
    try:
        config = json.loads(config_json)
    except ValueError as exc:
        raise InvalidArgumentError(
            f"`optimizer_config_json` is not valid JSON ({exc}). Received: {text.name(config_json[:200])}"
        ) from None
    if not isinstance(config, (str, dict)):
        raise InvalidArgumentError(
            "`optimizer_config_json` must be a JSON object (a serialized optimizer) or a JSON string "
            f"(an optimizer name). Received: {config_json[:200]}"
        )
    return config


def check_model_id(model_id: str) -> str:
    if not model_id:
        raise InvalidArgumentError("`model_id` must be a non-empty string naming the training job.")
    if len(model_id) > MAX_MODEL_ID_LENGTH or not model_id.isprintable():
        raise InvalidArgumentError(
            f"`model_id` must be at most {MAX_MODEL_ID_LENGTH} printable characters. "
            f"Received: model_id={model_id[:300]!r}"
        )
    return model_id


def make_spec(
    *,
    model_id: str,
    optimizer_config: dict,
    variables: Mapping[str, np.ndarray],
    num_workers: int = 1,
    mode: str = SYNC,
    sync_timeout_s: float = 0.0,
    timeout_policy: str = FAIL,
    non_finite_policy: str | None = None,
    default_sync_timeout_s: float = 60.0,
) -> ModelSpec:
    """Check a requested spec eagerly and fill in defaults; nothing is created here."""
    check_model_id(model_id)
    if num_workers < 1:
        raise InvalidArgumentError(f"`num_workers` must be >= 1. Received: num_workers={num_workers}")
    if mode not in MODES:
        raise InvalidArgumentError(f"`mode` must be one of {MODES}. Received: mode={mode!r}")
    if timeout_policy not in TIMEOUT_POLICIES:
        raise InvalidArgumentError(
            f"`timeout_policy` must be one of {TIMEOUT_POLICIES}. Received: timeout_policy={timeout_policy!r}"
        )
    scales_loss = optimizer_config.get("class_name") == "LossScaleOptimizer"
    if non_finite_policy is None:
        # A LossScaleOptimizer exists to see non-finite gradients: it skips their step and shrinks its scale.
        non_finite_policy = ALLOW if scales_loss else REJECT
    elif non_finite_policy == REJECT and scales_loss:
        raise InvalidArgumentError(
            "`non_finite_policy` reject would refuse the non-finite steps a LossScaleOptimizer skips to lower its "
            "scale; leave it unset (allow) or choose allow. Received: non_finite_policy='reject'"
        )
    if non_finite_policy not in NON_FINITE_POLICIES:
        raise InvalidArgumentError(
            f"`non_finite_policy` must be one of {NON_FINITE_POLICIES}. "
            f"Received: non_finite_policy={non_finite_policy!r}"
        )
    if not math.isfinite(sync_timeout_s) or sync_timeout_s < 0:
        raise InvalidArgumentError(
            "`sync_timeout_s` must be finite and >= 0 (0: the server default). "
            f"Received: sync_timeout_s={sync_timeout_s}"
        )
    if not variables:
        raise InvalidArgumentError(
            f"CreateModel for {model_id!r} carried no variables; send the initial value of every variable."
        )
    metas = tuple(VariableMeta(name, tuple(a.shape), np.dtype(a.dtype)) for name, a in variables.items())
    return ModelSpec(
        model_id=model_id,
        optimizer_config=optimizer_config,
        num_workers=int(num_workers),
        mode=mode,
        sync_timeout_s=float(sync_timeout_s or default_sync_timeout_s),
        timeout_policy=timeout_policy,
        variables=metas,
        non_finite_policy=non_finite_policy,
    )


def spec_state(spec: ModelSpec) -> dict:
    """A spec as plain values, for a checkpoint."""
    return {
        "model_id": spec.model_id,
        "optimizer_config": spec.optimizer_config,
        "num_workers": spec.num_workers,
        "mode": spec.mode,
        "sync_timeout_s": spec.sync_timeout_s,
        "timeout_policy": spec.timeout_policy,
        "variables": [[v.name, list(v.shape), v.dtype.str] for v in spec.variables],
        "non_finite_policy": spec.non_finite_policy,
    }


def spec_from_state(state: Mapping[str, Any]) -> ModelSpec:
    return ModelSpec(
        model_id=check_model_id(state["model_id"]),
        optimizer_config=state["optimizer_config"],
        num_workers=int(state["num_workers"]),
        mode=state["mode"],
        sync_timeout_s=float(state["sync_timeout_s"]),
        timeout_policy=state["timeout_policy"],
        variables=tuple(
            VariableMeta(name, tuple(int(d) for d in shape), np.dtype(dtype))
            for name, shape, dtype in state["variables"]
        ),
        # Checkpoints from before the policy existed applied whatever arrived.
        non_finite_policy=state.get("non_finite_policy", ALLOW),
    )
