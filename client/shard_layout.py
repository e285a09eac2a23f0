"""A sharded model's placement and the rules that check and merge what its shards say.

See ``optserve.client.sharded`` for what the servers hold. This module holds the
pure parts: which optimizer configs may split variables, the ids of a model's
pieces, :class:`ShardedModel` (plan and variable order), the checks a request
must pass before anything is sent, and the merging of the shards' answers.
"""

from __future__ import annotations

import dataclasses
import json
import re
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from optserve.client.arguments import Gradient, optimizer_config_json
from optserve.client.messages import optimizer_class_name
from optserve.client.sharding import PART_SEPARATOR, ShardPlan, plan_placement
from optserve.client.types import ModelInfo, OptimizerState, ServerGeneration, StepResult
from optserve.protos.errors import FailedPreconditionError, InvalidArgumentError, NotFoundError
from optserve.protos.tensors import SparseGradient

__all__ = ["ShardedModel", "ShardedModelInfo", "plan_for_optimizer", "shard_model_ids"]

FINGERPRINT_DIGITS = 12
LAYOUT_SUFFIX = "/layout"
# The server takes model ids of up to 256 characters; the shards' ids add "@<fingerprint>/layout".
MAX_MODEL_ID_LENGTH = 256 - 1 - FINGERPRINT_DIGITS - len(LAYOUT_SUFFIX)
# A threshold no variable exceeds: the plan keeps every variable whole.
KEEP_WHOLE_THRESHOLD = 1 << 62
# Keras optimizers whose update of one element depends only on that element
# (and on per-step scalars): their slots split and join exactly.
ELEMENTWISE_OPTIMIZERS = frozenset(
    {"adadelta", "adagrad", "adam", "adamw", "adamax", "ftrl", "lion", "nadam", "rmsprop", "sgd"}
)
# Config keys that hold weight-decay exclusion patterns (matched against variable names).
EXCLUSION_KEYS = ("exclude_from_weight_decay", "weight_decay_exclusions")
# Reads that must see one step on every shard are repeated this often while a push
# is still landing on some shards.
CONSISTENT_READ_ATTEMPTS = 5
CONSISTENT_READ_PAUSE_S = 0.05

SHARD_MODEL_ID = re.compile(
    rf"^(?P<model_id>.+)@(?P<fingerprint>[0-9a-f]{{{FINGERPRINT_DIGITS}}})(?P<layout>{re.escape(LAYOUT_SUFFIX)})?$"
)
PART_NAME = re.compile(rf"^(?P<variable>.+){re.escape(PART_SEPARATOR)}(?P<index>\d+)of(?P<count>\d+)$")


# --------------------------------------------------------------------------- placement rules


def _optimizer_options(config: Any) -> dict:
    """The keyword arguments inside any accepted optimizer config form ({} for a bare name)."""
    if not isinstance(config, Mapping):
        return {}
    inner = config.get("config")
    if isinstance(inner, Mapping):
        return dict(inner)
    return {k: v for k, v in config.items() if k not in ("module", "class_name", "config", "registered_name")}


def _splits_exactly(config: Any) -> bool:
    """Whether a split variable's parts update exactly like the whole variable."""
    options = _optimizer_options(config)
    if optimizer_class_name(config).lower() not in ELEMENTWISE_OPTIMIZERS:
        return False
    if options.get("clipnorm") is not None or options.get("global_clipnorm") is not None:
        return False  # the norm of a part is not the norm of the variable, bit for bit
    return not any(options.get(key) for key in EXCLUSION_KEYS)


def needs_joint_norm(config: Any) -> bool:
    """Whether updates clip by a norm over all variables (a two-phase step on several shards)."""
    return _optimizer_options(config).get("global_clipnorm") is not None


def check_sharded_optimizer(config: Any, num_shards: int, mode: str) -> None:
    """Refuse, before anything is created, what several shards cannot compute as one server does."""
    if num_shards <= 1:
        return
    name = optimizer_class_name(config)
    if name.lower() in ("lossscaleoptimizer", "loss_scale_optimizer"):
        raise ValueError(
            "A LossScaleOptimizer skips a step when any gradient of the model is not finite and changes its scale "
            f"then, which no shard of {num_shards} can decide alone. Use one server, or a fixed "
            "`loss_scale_factor`. Received: optimizer LossScaleOptimizer"
        )
    options = _optimizer_options(config)
    if needs_joint_norm(config) and mode == "async" and options.get("gradient_accumulation_steps"):
        raise ValueError(
            "`global_clipnorm` with `gradient_accumulation_steps` needs mode 'sync' on several shards: in "
            "async mode which push ends an accumulation cycle depends on arrival order at each shard. "
            f"Received: mode='async', gradient_accumulation_steps={options['gradient_accumulation_steps']}"
        )


def plan_for_optimizer(variables: Mapping[str, Any], num_shards: int, optimizer: Any) -> ShardPlan:
    """The placement of ``variables`` on ``num_shards`` shards for this optimizer config.

    Variables are kept whole unless the optimizer's update splits exactly: ``clipnorm``,
    ``global_clipnorm`` (each variable's sum of squares must be the one server's, bit for bit),
    weight-decay exclusion patterns and the optimizers whose update is not elementwise.
    """
    config = json.loads(optimizer_config_json(optimizer))
    threshold = None if _splits_exactly(config) else KEEP_WHOLE_THRESHOLD
    return plan_placement(variables, num_shards, split_threshold_bytes=threshold)


def shard_model_ids(model_id: str, plan: ShardPlan) -> tuple[str, str]:
    """(the pieces' model id on every shard, the layout model id on shard 0)."""
    piece_id = f"{model_id}@{plan.fingerprint()[:FINGERPRINT_DIGITS]}"
    return piece_id, piece_id + LAYOUT_SUFFIX


@dataclasses.dataclass(frozen=True)
class ShardedModel:
    """A sharded model as this client knows it: the plan and the variables' order."""

    model_id: str
    plan: ShardPlan
    order: tuple[str, ...]  # variable names in creation order
    mode: str = "sync"  # "sync" | "async"
    joint_norm: bool = False  # updates clip by global_clipnorm: pushes go in two phases

    @property
    def piece_model_id(self) -> str:
        return shard_model_ids(self.model_id, self.plan)[0]

    @property
    def layout_model_id(self) -> str:
        return shard_model_ids(self.model_id, self.plan)[1]

    @property
    def fingerprint(self) -> str:
        return self.plan.fingerprint()[:FINGERPRINT_DIGITS]

    @property
    def active_shards(self) -> list[int]:
        """Shards holding at least one piece (the others hold no model)."""
        return [index for index, pieces in enumerate(self.plan.shards) if pieces]

    def parts_by_shard(self, names: Sequence[str] | None = None) -> list[list[str]]:
        """Part names on each shard, for ``names`` (None: every variable), in variable order."""
        wanted = self.order if names is None else names
        parts: list[list[str]] = [[] for _ in self.plan.shards]
        for name in wanted:
            for shard, piece in self.plan.locate(name):
                parts[shard].append(piece.part_name)
        return parts

    def in_order(self, values: Mapping[str, Any]) -> dict:
        return {name: values[name] for name in self.order if name in values}


@dataclasses.dataclass
class ShardedModelInfo(ModelInfo):
    """A ModelInfo of the whole model, plus where its pieces live.

    ``step``, ``iterations``, ``learning_rate`` and ``scalars`` are those of the
    shard with the lowest step (all shards agree between steps).
    """

    addresses: list[str] = dataclasses.field(default_factory=list)
    plan: ShardPlan = dataclasses.field(kw_only=True, repr=False)
    shards: list[ModelInfo | None] = dataclasses.field(default_factory=list, repr=False)  # None: holds no piece

    @property
    def fingerprint(self) -> str:
        return self.plan.fingerprint()[:FINGERPRINT_DIGITS]


# --------------------------------------------------------------------------- checks and merges


def known_names(model: ShardedModel, names: list[str]) -> list[str]:
    """Variable names of a read in model order (all when empty); unknown ones fail like on one server."""
    if not names:
        return list(model.order)
    unknown = [name for name in names if name not in model.plan.variables]
    if unknown:
        raise NotFoundError(
            f"Model {model.model_id!r} has no variable {unknown}; its variables are {list(model.order)}."
        )
    return list(dict.fromkeys(names))


def check_like_variables(model: ShardedModel, arrays: Mapping[str, Gradient], what: str) -> None:
    """Names, shapes and dtypes checked before anything is split or sent."""
    unknown = [name for name in arrays if name not in model.plan.variables]
    if unknown:
        raise NotFoundError(
            f"Model {model.model_id!r} has no variable {unknown}; its variables are {list(model.order)}."
        )
    for name, array in arrays.items():
        spec = model.plan.variables[name]
        if isinstance(array, SparseGradient):
            array.check_against(name, spec.shape, spec.dtype)
        elif array.shape != spec.shape or array.dtype != spec.dtype:
            raise InvalidArgumentError(
                f"{what} for {name!r} has shape {array.shape} {array.dtype.name}, but the variable has shape "
                f"{spec.shape} {spec.dtype.name}."
            )


def check_scalar_dtypes(model: ShardedModel, config: Any) -> None:
    """Nadam's u_product takes the dtype of the first variable: every shard must start with that dtype."""
    if optimizer_class_name(config).lower() != "nadam":
        return
    first = model.plan.variables[model.order[0]].dtype
    variable_of = {piece.part_name: piece.var_name for pieces in model.plan.shards for piece in pieces}
    for index, parts in enumerate(model.parts_by_shard()):
        if not parts:
            continue
        dtype = model.plan.variables[variable_of[parts[0]]].dtype
        if dtype != first:
            raise ValueError(
                f"Nadam keeps `u_product` in the dtype of the model's first variable ({first.name}), but shard "
                f"{index} would start with {parts[0]!r} ({dtype.name}), so its updates would differ "
                "from one server's. Use one dtype for all variables, or one shard."
            )


def state_key(weights: OptimizerState) -> tuple:
    return (
        weights.step,
        weights.iterations,
        weights.raw_iterations,
        weights.learning_rate,
        tuple(sorted(weights.scalars.items())),
    )


def consistent(fetch: Callable[[], list], key: Callable[[Any], Any], model_id: str, shards: list[int]) -> list:
    """``fetch()`` again while the shards answer from different steps (a push still landing)."""
    for attempt in range(CONSISTENT_READ_ATTEMPTS):
        answers = fetch()
        keys = [key(answer) for answer in answers]
        if all(k == keys[0] for k in keys):
            return answers
        if attempt + 1 < CONSISTENT_READ_ATTEMPTS:
            time.sleep(CONSISTENT_READ_PAUSE_S)
    described = ", ".join(f"shard {index}: step {k[0]}, iterations {k[1]}" for index, k in zip(shards, keys))
    raise FailedPreconditionError(
        f"The shards of model {model_id!r} disagree ({described}). A push reached only some of them: push "
        "that step again from every worker (resync() adopts the lowest step), then read again."
    )


def merged_step_result(model: ShardedModel, results: list[StepResult]) -> StepResult:
    """One StepResult from every shard's; in sync mode they must agree on the step and the counters.

    In async mode two workers' pushes may reach the shards in different orders, so
    a push may be a shard's 5th and another's 6th: the highest counts are reported
    (the step a worker names next only has to be new for that worker).
    """
    if model.mode == "async":
        last = max(results, key=lambda r: (r.step, r.iterations))
        return StepResult(
            step=last.step,
            iterations=last.iterations,
            learning_rate=last.learning_rate,
            duplicate=all(r.duplicate for r in results),
            contributors=list(last.contributors),
            generation=ServerGeneration.combine([r.generation for r in results]),
        )
    keys = {(r.step, r.iterations) for r in results}
    if len(keys) != 1:
        described = ", ".join(
            f"shard {index}: step {r.step}, iterations {r.iterations}" for index, r in zip(model.active_shards, results)
        )
        raise FailedPreconditionError(
            f"After the push, the shards of model {model.model_id!r} disagree ({described}). Their optimizers "
            "are out of step; restore the model from a checkpoint or create it again."
        )
    first = results[0]
    return StepResult(
        step=first.step,
        iterations=first.iterations,
        learning_rate=first.learning_rate,
        duplicate=all(r.duplicate for r in results),
        contributors=sorted({w for r in results for w in r.contributors}),
        missing_workers=sorted({w for r in results for w in r.missing_workers}),
        generation=ServerGeneration.combine([r.generation for r in results]),
        skipped_non_finite=any(r.skipped_non_finite for r in results),
        non_finite_variables=sorted({name for r in results for name in r.non_finite_variables}),
    )
