"""Recovering a sharded model from what its shards list: plan, variable order, and the checks that they fit.

Any client given the same addresses finds the model this way (see
``optserve.client.sharded``): the part names and shapes give the variables, the
plan is recomputed and must have the fingerprint in the model's name.
"""

from __future__ import annotations

from typing import NoReturn

from optserve.client.shard_layout import (
    PART_NAME,
    SHARD_MODEL_ID,
    ShardedModel,
    needs_joint_norm,
    plan_for_optimizer,
)
from optserve.client.types import ModelInfo, VariableInfo
from optserve.protos.errors import FailedPreconditionError, NotFoundError

__all__ = ["discover"]


def discover(
    model_id: str, listings: list[list[ModelInfo]], addresses: list[str]
) -> tuple[ShardedModel, list[ModelInfo | None]]:
    """Recover a model's plan and order from every shard's ListModels answer; check that they fit.

    ``listings[i]`` is what shard ``i`` (at ``addresses[i]``) listed.
    """
    layouts = {}
    for info in listings[0]:
        match = SHARD_MODEL_ID.match(info.model_id)
        if match and match["model_id"] == model_id and match["layout"]:
            layouts[match["fingerprint"]] = info
    if not layouts:
        _raise_missing(model_id, listings, addresses)
    if len(layouts) > 1:
        raise FailedPreconditionError(
            f"Model {model_id!r} exists with {len(layouts)} placements on {','.join(addresses)} "
            f"(plan fingerprints {sorted(layouts)}); delete it and create it again."
        )
    fingerprint, layout = next(iter(layouts.items()))
    piece_id = f"{model_id}@{fingerprint}"
    infos = [next((info for info in listing if info.model_id == piece_id), None) for listing in listings]
    pieces = [variable for info in infos if info is not None for variable in info.variables]
    specs = _variables_from_parts(model_id, pieces, addresses)
    order = tuple(variable.name for variable in layout.variables)
    if sorted(order) != sorted(specs):
        raise _placement_error(
            model_id, fingerprint, "its layout lists other variables than the shards hold", addresses
        )
    config = next(info.optimizer_config for info in infos if info is not None)
    plan = plan_for_optimizer(specs, len(addresses), config)
    mode = next(info.mode for info in infos if info is not None)
    model = ShardedModel(model_id, plan, order, mode, needs_joint_norm(config))
    placed = [sorted(p.part_name for p in shard) for shard in plan.shards]
    held = [sorted(v.name for v in info.variables) if info is not None else [] for info in infos]
    if model.fingerprint != fingerprint or placed != held:
        raise _placement_error(model_id, fingerprint, "this client places its variables differently", addresses)
    return model, [info if plan.shards[i] else None for i, info in enumerate(infos)]


def _variables_from_parts(model_id: str, pieces: list[VariableInfo], addresses: list[str]) -> dict:
    """Whole variables (shape, dtype) from the shards' pieces; split ones from all their parts."""
    specs: dict[str, tuple[tuple[int, ...], str]] = {}
    parts: dict[str, dict[int, VariableInfo]] = {}
    counts: dict[str, int] = {}
    for variable in pieces:
        match = PART_NAME.match(variable.name)
        if match is None:
            specs[variable.name] = (variable.shape, variable.dtype)
            continue
        parts.setdefault(match["variable"], {})[int(match["index"])] = variable
        counts[match["variable"]] = int(match["count"])
    for name, by_index in parts.items():
        if sorted(by_index) != list(range(counts[name])):
            missing = sorted(set(range(counts[name])) - set(by_index))
            raise _placement_error(
                model_id,
                None,
                f"parts {missing} of {counts[name]} of variable {name!r} are on none of the shards given",
                addresses,
            )
        ordered = [by_index[i] for i in range(counts[name])]
        rows = sum(part.shape[0] for part in ordered)
        specs[name] = ((rows,) + tuple(ordered[0].shape[1:]), ordered[0].dtype)
    return specs


def _raise_missing(model_id: str, listings: list[list[ModelInfo]], addresses: list[str]) -> NoReturn:
    pieces = [
        index
        for index, listing in enumerate(listings)
        if any((m := SHARD_MODEL_ID.match(info.model_id)) and m["model_id"] == model_id for info in listing)
    ]
    if pieces:
        raise FailedPreconditionError(
            f"Model {model_id!r} is incomplete on {','.join(addresses)}: shards {pieces} hold pieces of it but "
            f"shard 0 ({addresses[0]}) has no layout for it. It is being created, or the addresses "
            "are not the ones (in the same order) it was created with."
        )
    raise NotFoundError(f"Model {model_id!r} not found on the shards {','.join(addresses)}.")


def _placement_error(model_id: str, fingerprint: str | None, why: str, addresses: list[str]) -> FailedPreconditionError:
    plan = f" (plan {fingerprint})" if fingerprint else ""
    return FailedPreconditionError(
        f"Model {model_id!r} on {','.join(addresses)}{plan} does not fit these {len(addresses)} shards: {why}. "
        "Give the addresses it was created with, in the same order."
    )
