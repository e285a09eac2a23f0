"""One model spread over several optserve servers, placed and joined on the client.

    with Client(["h1:50051", "h2:50051"]) as client:      # a ShardedClient
        client.create_model("mlp", "adam", variables, num_workers=2)
        result, values = client.push_pull("mlp", grads, worker_index=0)

``Client(...)`` with several addresses (a list, or ``"h1:50051,h2:50051"``)
returns a :class:`ShardedClient`: the same methods, the same results, with the
variables spread over the servers ("shards"). ``RemoteOptimizer(opt, [...])``
and ``optserve demo --address h1:50051,h2:50051`` get it that way.

**Placement.** At ``create_model`` the variables are placed by
``optserve.client.sharding.plan_placement``: size-balanced, deterministic (every
worker computes the same plan from the same variables), a variable much larger
than a shard's share cut along axis 0 into row ranges on different shards. The
order of the addresses is the order of the shards, so every worker must list
them in the same order.

**What the servers hold.** Shard ``i`` holds a model named
``"<model_id>@<fingerprint>"`` (the first 12 hex digits of the plan's
fingerprint) with its pieces: an unsplit variable under its own name, part ``j``
of ``k`` of a split one as ``"<name>#part<j>of<k>"``. Shard 0 also holds
``"<model_id>@<fingerprint>/layout"``: a model whose variables are empty
arrays named after the model's variables in their creation order. It is created
last, so its presence means every shard holds its part, and it keeps the
variable order (the tf.keras layout of ``get_weights().as_list()``) for clients
that never saw the variables. Any client given the same addresses recovers the
plan from the shards (the part names and shapes give the variables, the plan is
recomputed and must have the fingerprint in the name), so ``pull``,
``get_weights`` or ``optserve inspect`` need no ``create_model``.

Workers cannot mix two placements silently: a worker whose plan differs (other
variables, shapes or number of shards) computes another fingerprint and is
refused at ``create_model`` while the model exists with another one; shards
listed in another order hold other pieces than the plan puts there, which
``create_model`` (the server's spec check) and every attach refuse.

**Steps.** Each shard runs its own copy of the optimizer on its pieces. Every
push goes to every shard that holds pieces, concurrently and for the same step,
so each shard's ``iterations`` -- and with it the learning-rate schedule, bias
corrections and scalars such as Nadam's ``u_product`` -- advance exactly as on
one server. Every update of the supported optimizers is elementwise, so a
split variable's slots are exactly its parts' slots: 2 or 3 shards give the same
numbers as one. The shards must report the same step and iterations after a
push; a push that failed on some shards leaves the client's step where it was,
so pushing that step again completes it (shards that applied it answer it as a
repeat). ``resync`` adopts the lowest step of the shards for the same reason.

A shard whose pieces get no gradient in a push (all of them None) must still
count the step. The server refuses a push without gradients, so such a push is
refused before anything is sent (InvalidArgumentError) unless the shard's server
counts an empty push as a step; that is checked once per shard with a
throwaway probe model.

**What sharding changes.**

* ``global_clipnorm`` needs the norm over all variables, which no shard sees:
  with more than one shard ``create_model`` raises ValueError (use
  ``clipnorm``/``clipvalue``, or one shard).
* ``clipnorm`` clips each variable by its own norm: variables are then kept
  whole, never split. So are they when the config names weight-decay exclusion
  patterns (a pattern such as ``"kernel$"`` would not match a part name), and
  for optimizers whose update is not elementwise.
* Nadam keeps ``u_product`` in the dtype of the first variable; a model whose
  shards would start with variables of another dtype is refused (ValueError).
* ``set_weights`` is checked on the client (names, shapes, slots, scalars)
  before anything is sent, then written shard by shard: unlike on one server it
  is not atomic against a shard failing halfway.
* In async mode each shard applies pushes in the order they reach it, so two
  workers pushing at once may meet different iteration counts on different
  shards (on one server, too, async results depend on arrival order). Results
  then report the highest step of the shards.
* A model with fewer pieces than shards leaves the last shards empty: they hold
  no model and get no pushes.
"""
from __future__ import annotations

import concurrent.futures
import dataclasses
import json
import math
import re
import threading
import time
import uuid
from typing import Any, Callable, Mapping, Sequence

import numpy as np

from optserve.client.client import (
    _DEFAULT,
    AlreadyExistsError,
    Client,
    FailedPreconditionError,
    InvalidArgumentError,
    ModelInfo,
    NotFoundError,
    OptimizerState,
    OptimizerWeights,
    OptserveError,
    StepMismatchError,
    StepResult,
    VariableInfo,
    _as_tensors,
    _check_name,
    _check_worker_index,
    _model_spec,
    _names,
    optimizer_class_name,
    optimizer_config_json,
    parse_addresses,
)
from optserve.client.sharding import PART_SEPARATOR, ShardPlan, plan_placement

__all__ = ["ShardedClient", "ShardedModel", "ShardedModelInfo", "plan_for_optimizer", "shard_model_ids"]

FINGERPRINT_DIGITS = 12
LAYOUT_SUFFIX = "/layout"
# The server takes model ids of up to 256 characters; the shards' ids add "@<fingerprint>/layout".
MAX_MODEL_ID_LENGTH = 256 - 1 - FINGERPRINT_DIGITS - len(LAYOUT_SUFFIX)
# A threshold no variable exceeds: the plan keeps every variable whole.
KEEP_WHOLE_THRESHOLD = 1 << 62
# Keras optimizers whose update of one element depends only on that element
# (and on per-step scalars): their slots split and join exactly.
ELEMENTWISE_OPTIMIZERS = frozenset(
    {"adadelta", "adagrad", "adam", "adamw", "adamax", "ftrl", "lion", "nadam", "rmsprop", "sgd"})
# Config keys that hold weight-decay exclusion patterns (matched against variable names).
EXCLUSION_KEYS = ("exclude_from_weight_decay", "weight_decay_exclusions")
# Threads per shard for concurrent calls. A synchronous push blocks until the other
# workers pushed, so each caller thread needs its own pool thread per shard; threads
# are only started when needed.
THREADS_PER_SHARD = 32
# Reads that must see one step on every shard are repeated this often while a push
# is still landing on some shards.
CONSISTENT_READ_ATTEMPTS = 5
CONSISTENT_READ_PAUSE_S = 0.05

_SHARD_MODEL_ID = re.compile(
    rf"^(?P<model_id>.+)@(?P<fingerprint>[0-9a-f]{{{FINGERPRINT_DIGITS}}})(?P<layout>{re.escape(LAYOUT_SUFFIX)})?$")
_PART_NAME = re.compile(rf"^(?P<variable>.+){re.escape(PART_SEPARATOR)}(?P<index>\d+)of(?P<count>\d+)$")


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
    if options.get("clipnorm") is not None:
        return False  # the norm of a part is not the norm of the variable
    return not any(options.get(key) for key in EXCLUSION_KEYS)


def plan_for_optimizer(variables: Mapping[str, Any], num_shards: int, optimizer: Any) -> ShardPlan:
    """The placement of ``variables`` on ``num_shards`` shards for this optimizer config.

    Raises ValueError for ``global_clipnorm`` with more than one shard.
    """
    config = json.loads(optimizer_config_json(optimizer))
    if num_shards > 1 and _optimizer_options(config).get("global_clipnorm") is not None:
        raise ValueError(
            "`global_clipnorm` clips by the norm over all variables, but with "
            f"{num_shards} shards each server sees only its own variables. Use `clipnorm` or "
            f"`clipvalue`, or one shard. Received: global_clipnorm={_optimizer_options(config)['global_clipnorm']}")
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
    order: tuple[str, ...]   # variable names in creation order
    mode: str = "sync"       # "sync" | "async"

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
    plan: ShardPlan | None = dataclasses.field(default=None, repr=False)
    shards: list[ModelInfo | None] = dataclasses.field(default_factory=list, repr=False)  # None: holds no piece

    @property
    def fingerprint(self) -> str:
        return self.plan.fingerprint()[:FINGERPRINT_DIGITS] if self.plan is not None else ""


# --------------------------------------------------------------------------- the client


class ShardedClient(Client):
    """A :class:`Client` whose models are spread over several servers (see the module docstring).

    Takes the addresses of the shards (a list, or one comma-separated string) and
    the keyword arguments of :class:`Client`, which apply to each shard's
    connection. Every call reaches the shards concurrently.
    """

    def __init__(
        self,
        address: str | Sequence[str],
        *,
        timeout: float | None = 60.0,
        retries: int = 5,
        backoff: float = 0.2,
        max_backoff: float = 5.0,
        options: Sequence[tuple[str, Any]] | None = None,
        push_timeout: float | None = None,
        attempt_timeout: float | None = None,
    ):
        self.addresses = parse_addresses(address)
        self.address = ",".join(self.addresses)
        settings = dict(timeout=timeout, retries=retries, backoff=backoff, max_backoff=max_backoff,
                        options=options, push_timeout=push_timeout, attempt_timeout=attempt_timeout)
        self.shards: list[Client] = []
        try:
            for one in self.addresses:
                self.shards.append(Client(one, **settings))
        except BaseException:
            for shard in self.shards:
                shard.close()
            raise
        first = self.shards[0]
        self.timeout, self.push_timeout, self.attempt_timeout = first.timeout, first.push_timeout, first.attempt_timeout
        self.retries, self.backoff, self.max_backoff = first.retries, first.backoff, first.max_backoff
        self._pool = concurrent.futures.ThreadPoolExecutor(
            THREADS_PER_SHARD * len(self.shards), thread_name_prefix="optserve-shard")
        self._lock = threading.Lock()
        self._model_steps: dict[str, int] = {}
        self._worker_steps: dict[tuple[str, int], int] = {}
        self._models: dict[str, ShardedModel] = {}
        self._empty_push_counts: dict[int, bool] = {}
        self._closed = False

    def __repr__(self) -> str:
        return f"ShardedClient({self.addresses!r})"

    @property
    def num_shards(self) -> int:
        return len(self.shards)

    # ------------------------------------------------------------------ lifecycle

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            for shard in self.shards:
                shard.close()
            self._pool.shutdown(wait=False)

    def _invoke(self, attempt, timeout):  # pragma: no cover - a guard, never reached
        raise AssertionError("A ShardedClient calls its shards through their own Clients.")

    # ------------------------------------------------------------------ fan-out

    def _on_shards(self, call: Callable[[int], Any], shards: Sequence[int], model_id: str | None = None) -> list:
        """``call(i)`` for every shard index in ``shards``, concurrently; results in that order.

        When some shards fail, the error of the first of them (in shard order) is
        raised, its message naming the shard; the calls on the other shards ran.
        A NotFoundError makes the client forget ``model_id``'s plan: the model was
        deleted, and may come back with another placement.
        """
        if self._closed:
            raise ValueError("This Client is closed.")
        shards = list(shards)
        if len(shards) == 1:
            outcomes = [_outcome(call, shards[0])]
        else:
            futures = [self._pool.submit(_outcome, call, index) for index in shards]
            outcomes = [future.result() for future in futures]
        for index, (ok, value) in zip(shards, outcomes):
            if not ok:
                if model_id is not None and isinstance(value, NotFoundError):
                    with self._lock:
                        self._models.pop(model_id, None)
                raise self._from_shard(index, value)
        return [value for _, value in outcomes]

    def _from_shard(self, index: int, error: BaseException) -> BaseException:
        if isinstance(error, OptserveError) and getattr(error, "shard_index", None) is None:
            error.shard_index = index
            error.message = f"shard {index} ({self.addresses[index]}): {error.message}"
        return error

    # ------------------------------------------------------------------ finding models on the shards

    def _listings(self, timeout, with_stats: bool = False) -> list[list[ModelInfo]]:
        return self._on_shards(lambda i: self.shards[i].list_models(with_stats=with_stats, timeout=timeout),
                               range(self.num_shards))

    def _resolve(self, model_id: str, timeout) -> ShardedModel:
        """The plan of ``model_id``: known already, or recovered from the shards."""
        _check_name(model_id, "model_id")
        with self._lock:
            model = self._models.get(model_id)
        if model is None:
            model, _ = self._discover(model_id, self._listings(timeout))
            self._remember(model)
        return model

    def _remember(self, model: ShardedModel) -> None:
        with self._lock:
            self._models[model.model_id] = model

    def _discover(self, model_id: str, listings: list[list[ModelInfo]]) -> tuple[ShardedModel, list[ModelInfo | None]]:
        """Recover a model's plan and order from every shard's ListModels answer; check that they fit."""
        layouts = {}
        for info in listings[0]:
            match = _SHARD_MODEL_ID.match(info.model_id)
            if match and match["model_id"] == model_id and match["layout"]:
                layouts[match["fingerprint"]] = info
        if not layouts:
            self._raise_missing(model_id, listings)
        if len(layouts) > 1:
            raise FailedPreconditionError(
                "FAILED_PRECONDITION",
                f"Model {model_id!r} exists with {len(layouts)} placements on {self.address} "
                f"(plan fingerprints {sorted(layouts)}); delete it and create it again.")
        fingerprint, layout = next(iter(layouts.items()))
        piece_id = f"{model_id}@{fingerprint}"
        infos = [next((info for info in listing if info.model_id == piece_id), None) for listing in listings]
        pieces = [variable for info in infos if info is not None for variable in info.variables]
        specs = self._variables_from_parts(model_id, pieces)
        order = tuple(variable.name for variable in layout.variables)
        if sorted(order) != sorted(specs):
            raise self._placement_error(model_id, fingerprint, "its layout lists other variables than the shards hold")
        config = next(info.optimizer_config for info in infos if info is not None)
        plan = plan_for_optimizer(specs, self.num_shards, config)
        model = ShardedModel(model_id, plan, order, next(info.mode for info in infos if info is not None))
        placed = [sorted(p.part_name for p in shard) for shard in plan.shards]
        held = [sorted(v.name for v in info.variables) if info is not None else [] for info in infos]
        if model.fingerprint != fingerprint or placed != held:
            raise self._placement_error(model_id, fingerprint, "this client places its variables differently")
        return model, [info if plan.shards[i] else None for i, info in enumerate(infos)]

    def _variables_from_parts(self, model_id: str, pieces: list[VariableInfo]) -> dict:
        """Whole variables (shape, dtype) from the shards' pieces; split ones from all their parts."""
        specs: dict[str, tuple[tuple[int, ...], str]] = {}
        parts: dict[str, dict[int, VariableInfo]] = {}
        counts: dict[str, int] = {}
        for variable in pieces:
            match = _PART_NAME.match(variable.name)
            if match is None:
                specs[variable.name] = (variable.shape, variable.dtype)
                continue
            parts.setdefault(match["variable"], {})[int(match["index"])] = variable
            counts[match["variable"]] = int(match["count"])
        for name, by_index in parts.items():
            if sorted(by_index) != list(range(counts[name])):
                missing = sorted(set(range(counts[name])) - set(by_index))
                raise self._placement_error(model_id, None, f"parts {missing} of {counts[name]} of variable "
                                                            f"{name!r} are on none of the shards given")
            ordered = [by_index[i] for i in range(counts[name])]
            rows = sum(part.shape[0] for part in ordered)
            specs[name] = ((rows,) + tuple(ordered[0].shape[1:]), ordered[0].dtype)
        return specs

    def _raise_missing(self, model_id: str, listings: list[list[ModelInfo]]):
        pieces = [index for index, listing in enumerate(listings)
                  if any((m := _SHARD_MODEL_ID.match(info.model_id)) and m["model_id"] == model_id
                         for info in listing)]
        if pieces:
            raise FailedPreconditionError(
                "FAILED_PRECONDITION",
                f"Model {model_id!r} is incomplete on {self.address}: shards {pieces} hold pieces of it but "
                f"shard 0 ({self.addresses[0]}) has no layout for it. It is being created, or the addresses "
                "are not the ones (in the same order) it was created with.")
        raise NotFoundError("NOT_FOUND", f"Model {model_id!r} not found on the shards {self.address}.")

    def _placement_error(self, model_id: str, fingerprint: str | None, why: str) -> FailedPreconditionError:
        plan = f" (plan {fingerprint})" if fingerprint else ""
        return FailedPreconditionError(
            "FAILED_PRECONDITION",
            f"Model {model_id!r} on {self.address}{plan} does not fit these {self.num_shards} shards: {why}. "
            "Give the addresses it was created with, in the same order.")

    # ------------------------------------------------------------------ models

    def create_model(
        self,
        model_id: str,
        optimizer,
        variables: Mapping[str, Any],
        *,
        num_workers: int = 1,
        mode: str = "sync",
        sync_timeout_s: float = 0.0,
        timeout_policy: str = "fail",
        non_finite_policy: str = "reject",
        timeout=_DEFAULT,
    ) -> ShardedModelInfo:
        """Create the model on every shard, or join it (``created`` is False) when it exists with this plan."""
        _check_name(model_id, "model_id")
        if len(model_id) > MAX_MODEL_ID_LENGTH:
            raise ValueError(f"`model_id` of a sharded model must be at most {MAX_MODEL_ID_LENGTH} characters "
                             f"(the shards add a suffix). Received: {len(model_id)} characters")
        arrays = _as_tensors(variables, "variables")
        if not arrays:
            raise ValueError("`variables` must hold at least one variable. Received: {}")
        spec = _model_spec(model_id, optimizer, num_workers, mode, sync_timeout_s, timeout_policy,
                           non_finite_policy)  # checks all
        config = json.loads(spec.optimizer_config_json)
        plan = plan_for_optimizer(arrays, self.num_shards, config)
        model = ShardedModel(model_id, plan, tuple(arrays), str(mode).lower())
        _check_scalar_dtypes(model, config)
        timeout = self._timeout(timeout, self.timeout)
        self._refuse_other_placements(model, self._listings(timeout))
        values = plan.split(arrays)
        parts = model.parts_by_shard()

        def create(index: int):
            shard_values = {part: values[index][part] for part in parts[index]}
            return self.shards[index].create_model(
                model.piece_model_id, config, shard_values, num_workers=num_workers, mode=mode,
                sync_timeout_s=sync_timeout_s, timeout_policy=timeout_policy,
                non_finite_policy=non_finite_policy, timeout=timeout)

        infos = self._on_shards(create, model.active_shards)
        # Last: the layout marks the model complete for clients that attach without creating it.
        layout = self.shards[0].create_model(
            model.layout_model_id, "sgd", {name: np.zeros((0,), np.float32) for name in model.order},
            timeout=timeout)
        self._remember(model)
        per_shard: list[ModelInfo | None] = [None] * self.num_shards
        for index, info in zip(model.active_shards, infos):
            per_shard[index] = info
        created = layout.created and all(info.created for info in infos)
        merged = self._merged_info(model, per_shard, created)
        self._record_model_step(model_id, merged.step)
        return merged

    def _refuse_other_placements(self, model: ShardedModel, listings: list[list[ModelInfo]]) -> None:
        for index, listing in enumerate(listings):
            for info in listing:
                match = _SHARD_MODEL_ID.match(info.model_id)
                if match and match["model_id"] == model.model_id and match["fingerprint"] != model.fingerprint:
                    raise AlreadyExistsError(
                        "ALREADY_EXISTS",
                        f"Model {model.model_id!r} already exists on shard {index} ({self.addresses[index]}) with "
                        f"another placement (plan {match['fingerprint']}; these variables on these "
                        f"{self.num_shards} shards give plan {model.fingerprint}). Every worker must pass the same "
                        "variables (names, shapes, dtypes) and the same shard addresses in the same order; "
                        "delete the model to start over.")

    def _merged_info(self, model: ShardedModel, infos: list[ModelInfo | None], created: bool | None,
                     with_stats: bool = False) -> ShardedModelInfo:
        present = [info for info in infos if info is not None]
        lead = min(present, key=lambda info: info.step)
        by_part = {variable.name: variable for info in present for variable in info.variables}
        variables = []
        for name in model.order:
            spec = model.plan.variables[name]
            located = [by_part[piece.part_name] for _, piece in model.plan.locate(name)]
            norm = math.sqrt(sum(v.norm ** 2 for v in located)) if with_stats else None
            variables.append(VariableInfo(name, spec.shape, spec.dtype.name, list(located[0].slots), norm))
        waiting = sorted({worker for info in present for worker in info.waiting_workers})
        return ShardedModelInfo(
            model_id=model.model_id, created=created, step=lead.step, iterations=lead.iterations,
            learning_rate=lead.learning_rate, num_workers=lead.num_workers, mode=lead.mode, variables=variables,
            optimizer=lead.optimizer, optimizer_config=lead.optimizer_config, raw_iterations=lead.raw_iterations,
            scalars=dict(lead.scalars), sync_timeout_s=lead.sync_timeout_s, timeout_policy=lead.timeout_policy,
            waiting_workers=waiting, addresses=list(self.addresses), plan=model.plan, shards=list(infos))

    def list_models(self, model_id: str | None = None, with_stats: bool = False, *,
                    timeout=_DEFAULT) -> list[ShardedModelInfo]:
        """Every sharded model on these shards, or just ``model_id`` (NotFoundError if it does not exist).

        Models on the servers that are not pieces of a sharded model are not listed.
        """
        listings = self._listings(self._timeout(timeout, self.timeout), with_stats)
        if model_id is not None:
            names = [_check_name(model_id, "model_id")]
        else:
            names = sorted({m["model_id"] for info in listings[0]
                            if (m := _SHARD_MODEL_ID.match(info.model_id)) and m["layout"]})
        found = []
        for name in names:
            try:
                model, infos = self._discover(name, listings)
            except FailedPreconditionError:
                if model_id is not None:
                    raise
                continue  # being created or deleted right now, or not ours to read
            self._remember(model)
            found.append(self._merged_info(model, infos, None, with_stats))
        return found

    def delete_model(self, model_id: str, *, timeout=_DEFAULT) -> bool:
        """Delete every piece of the model (any placement of it); False if there was none."""
        _check_name(model_id, "model_id")
        timeout = self._timeout(timeout, self.timeout)
        listings = self._listings(timeout)
        doomed = [[info.model_id for info in listing
                   if (m := _SHARD_MODEL_ID.match(info.model_id)) and m["model_id"] == model_id]
                  for listing in listings]
        # Layouts first: from then on the model reads as gone, not as half there.
        layouts = [name for name in doomed[0] if name.endswith(LAYOUT_SUFFIX)]
        doomed[0] = [name for name in doomed[0] if name not in layouts]
        deleted = [[self.shards[0].delete_model(name, timeout=timeout) for name in layouts]]
        deleted += self._on_shards(
            lambda i: [self.shards[i].delete_model(name, timeout=timeout) for name in doomed[i]],
            range(self.num_shards))
        with self._lock:
            self._models.pop(model_id, None)
        self._forget_model(model_id)
        return any(flag for flags in deleted for flag in flags)

    def checkpoint(self, *, timeout=_DEFAULT) -> tuple[str, int]:
        """Ask every shard to write a checkpoint; returns (the paths joined by commas, models in all)."""
        timeout = self._timeout(timeout, self.timeout)
        results = self._on_shards(lambda i: self.shards[i].checkpoint(timeout=timeout), range(self.num_shards))
        return ",".join(path for path, _ in results), sum(count for _, count in results)

    def health(self, service: str = "", *, timeout=_DEFAULT) -> str:
        """"SERVING" when every shard is; otherwise the first other status."""
        timeout = self._timeout(timeout, self.timeout)
        statuses = self._on_shards(lambda i: self.shards[i].health(service, timeout=timeout), range(self.num_shards))
        return next((status for status in statuses if status != "SERVING"), "SERVING")

    # ------------------------------------------------------------------ steps

    def _server_step(self, model_id: str, timeout) -> int:
        # The lowest step: after a push that reached only some shards, pushing that step
        # again completes it (the others answer it as a repeat).
        model = self._resolve(model_id, timeout)
        infos = self._on_shards(
            lambda i: self.shards[i].list_models(model.piece_model_id, timeout=timeout)[0], model.active_shards,
            model_id)
        return min(info.step for info in infos)

    # ------------------------------------------------------------------ gradients

    def _apply_gradients(self, model_id, grads, worker_index, step, aggregated, return_variables, timeout):
        _check_name(model_id, "model_id")
        _check_worker_index(worker_index)
        arrays = _as_tensors(grads, "grads", drop_none=True)
        timeout = self._timeout(timeout, self.push_timeout)
        model = self._resolve(model_id, self.timeout)
        _check_like_variables(model, arrays, "Gradient")
        if step is None:
            step = self.next_step(model_id, worker_index)
        elif not isinstance(step, (int, np.integer)) or step < 0:
            raise ValueError(f"`step` must be an integer >= 0 or None. Received: step={step!r}")
        per_shard = model.plan.split(arrays)
        self._check_every_shard_counts_the_step(model, per_shard)

        def push(index: int):
            shard = self.shards[index]
            method = shard.push_pull if return_variables else shard.push
            return method(model.piece_model_id, per_shard[index], worker_index=worker_index, step=int(step),
                          aggregated=aggregated, timeout=timeout)

        try:
            answers = self._on_shards(push, model.active_shards, model_id)
        except StepMismatchError as error:
            error.model_id, error.worker_index, error.step = model_id, worker_index, int(step)
            raise
        results = [answer[0] if return_variables else answer for answer in answers]
        result = _merged_step_result(model, results)
        self._record_worker_step(model_id, worker_index, result.step)
        if not return_variables:
            return result, {}
        parts: list[dict] = [{} for _ in self.shards]
        for index, (_, values) in zip(model.active_shards, answers):
            parts[index] = values
        return result, model.in_order(model.plan.join(parts))

    def _check_every_shard_counts_the_step(self, model: ShardedModel, per_shard: list[dict]) -> None:
        """Refuse, before sending anything, a push that would leave a shard's step behind."""
        empty = [index for index in model.active_shards if not per_shard[index]]
        if not empty:
            return
        if len(empty) == len(model.active_shards):
            raise InvalidArgumentError(
                "INVALID_ARGUMENT",
                f"The push to model {model.model_id!r} carried no gradients; send at least one variable's gradient.")
        refusing = [index for index in empty if not self._counts_empty_push(index)]
        if refusing:
            held = {index: [p.var_name for p in model.plan.shards[index]] for index in refusing}
            raise InvalidArgumentError(
                "INVALID_ARGUMENT",
                f"This push to model {model.model_id!r} has no gradient for any variable on shards {refusing} "
                f"({', '.join(self.addresses[i] for i in refusing)}), and those servers refuse a push without "
                "gradients, so their step would fall behind the others'. Nothing was sent. Push a gradient "
                f"for at least one variable of every shard (shard: variables {held}), or use one shard.")

    def _counts_empty_push(self, index: int) -> bool:
        """Whether shard ``index``'s server takes a push without gradients as a step (probed once)."""
        with self._lock:
            known = self._empty_push_counts.get(index)
        if known is not None:
            return known
        shard = self.shards[index]
        probe = f"optserve-empty-push-probe-{uuid.uuid4().hex[:12]}"
        shard.create_model(probe, "sgd", {"probe": np.zeros(1, np.float32)})
        try:
            counts = shard.push(probe, {}).iterations == 1
        except InvalidArgumentError:
            counts = False
        finally:
            shard.delete_model(probe)
        with self._lock:
            self._empty_push_counts[index] = counts
        return counts

    # ------------------------------------------------------------------ reads

    def pull(self, model_id: str, names=None, *, timeout=_DEFAULT) -> tuple[StepResult, dict[str, np.ndarray]]:
        """Current values (all variables, or ``names``); the step is the lowest of the shards read."""
        timeout = self._timeout(timeout, self.timeout)
        model = self._resolve(model_id, timeout)
        wanted = _known_names(model, _names(names))
        parts = model.parts_by_shard(wanted)
        shards = [index for index in model.active_shards if parts[index]]
        answers = self._on_shards(
            lambda i: self.shards[i].pull(model.piece_model_id, parts[i], timeout=timeout), shards, model_id)
        per_shard: list[dict] = [{} for _ in self.shards]
        for index, (_, values) in zip(shards, answers):
            per_shard[index] = values
        lead = min((result for result, _ in answers), key=lambda result: result.step)
        self._record_model_step(model_id, lead.step, forward_only=True)
        values = model.plan.join(per_shard)
        return StepResult(step=lead.step, iterations=lead.iterations, learning_rate=lead.learning_rate), \
            {name: values[name] for name in wanted}

    def get_weights(self, model_id: str, names=None, include_variables: bool = False, *,
                    timeout=_DEFAULT) -> OptimizerWeights:
        """Optimizer state of the whole model: split slots joined, Keras order, one step on every shard."""
        timeout = self._timeout(timeout, self.timeout)
        model = self._resolve(model_id, timeout)
        wanted = _known_names(model, _names(names))
        parts = model.parts_by_shard(wanted)
        shards = [index for index in model.active_shards if parts[index]]

        def fetch():
            return self._on_shards(lambda i: self.shards[i].get_weights(
                model.piece_model_id, parts[i], include_variables, timeout=timeout), shards, model_id)

        answers = _consistent(fetch, lambda weights: _state_key(weights), model.model_id, shards)
        per_shard_slots: dict[str, list[dict]] = {}
        per_shard_variables: list[dict] = [{} for _ in self.shards]
        slot_order: dict[str, list[str]] = {}
        for index, weights in zip(shards, answers):
            per_shard_variables[index] = weights.variables
            for part, slots in weights.slots.items():
                slot_order.setdefault(part, list(slots))
                for slot, array in slots.items():
                    per_shard_slots.setdefault(slot, [{} for _ in self.shards])[index][part] = array
        joined = {slot: model.plan.join(arrays) for slot, arrays in per_shard_slots.items()}
        slots = {}
        for name in wanted:
            first_part = model.plan.locate(name)[0][1].part_name
            slots[name] = {slot: joined[slot][name] for slot in slot_order.get(first_part, [])}
        variables = model.plan.join(per_shard_variables) if include_variables else {}
        state = answers[0]
        return OptimizerWeights(
            iterations=state.iterations, raw_iterations=state.raw_iterations, learning_rate=state.learning_rate,
            step=state.step, scalars=dict(state.scalars), slots=slots,
            variables={name: variables[name] for name in wanted if name in variables})

    # ------------------------------------------------------------------ writes

    def set_weights(self, model_id: str, *, slots: Mapping[str, Mapping[str, Any]] | None = None,
                    variables: Mapping[str, Any] | None = None, iterations: int | None = None,
                    scalars: Mapping[str, float] | None = None, timeout=_DEFAULT) -> OptimizerState:
        """Overwrite slots, variables, the iterations counter and/or scalars on every shard concerned.

        Everything is checked against the model first; a rejected request sends nothing.
        """
        _check_name(model_id, "model_id")
        timeout = self._timeout(timeout, self.timeout)
        model = self._resolve(model_id, timeout)
        if iterations is not None and (not isinstance(iterations, (int, np.integer)) or iterations < 0):
            raise ValueError(f"`iterations` must be an integer >= 0. Received: iterations={iterations!r}")
        scalars = {str(k): float(v) for k, v in (scalars or {}).items()}
        new_values = _as_tensors(variables, "variables")
        _check_like_variables(model, new_values, "New value")
        new_slots = {name: _as_tensors(per_var, f"slots[{name!r}]") for name, per_var in (slots or {}).items()}
        if new_slots or scalars:
            self._check_slots_and_scalars(model, new_slots, scalars, timeout)
        value_parts = model.plan.split(new_values)
        slot_parts: list[dict[str, dict[str, np.ndarray]]] = [{} for _ in self.shards]
        for slot in sorted({slot for per_var in new_slots.values() for slot in per_var}):
            split = model.plan.split({name: per_var[slot] for name, per_var in new_slots.items() if slot in per_var})
            for index, parts in enumerate(split):
                for part, array in parts.items():
                    slot_parts[index].setdefault(part, {})[slot] = array
        state_change = iterations is not None or bool(scalars)
        shards = [index for index in model.active_shards
                  if state_change or value_parts[index] or slot_parts[index]]
        if not shards:
            shards = model.active_shards[:1]  # nothing to write: answer with the state, like one server

        def write(index: int):
            return self.shards[index].set_weights(
                model.piece_model_id, slots=slot_parts[index] or None, variables=value_parts[index] or None,
                iterations=iterations, scalars=scalars or None, timeout=timeout)

        states = self._on_shards(write, shards, model_id)
        return min(states, key=lambda state: state.step)

    def _check_slots_and_scalars(self, model: ShardedModel, slots: Mapping[str, Mapping[str, np.ndarray]],
                                 scalars: Mapping[str, float], timeout) -> None:
        infos = self._on_shards(
            lambda i: self.shards[i].list_models(model.piece_model_id, timeout=timeout)[0], model.active_shards)
        slot_names = {variable.name: variable.slots for info in infos for variable in info.variables}
        for name, per_var in slots.items():
            if name not in model.plan.variables:
                raise NotFoundError("NOT_FOUND", f"Model {model.model_id!r} has no variable {name!r}; "
                                                 f"its variables are {list(model.order)}.")
            allowed = slot_names[model.plan.locate(name)[0][1].part_name]
            shape = model.plan.variables[name].shape
            for slot, array in per_var.items():
                if slot not in allowed:
                    raise NotFoundError(
                        "NOT_FOUND", f"Variable {name!r} of model {model.model_id!r} has no slot {slot!r}; "
                                     f"its slots are {allowed or 'none'}.")
                if array.shape != shape:
                    raise InvalidArgumentError(
                        "INVALID_ARGUMENT", f"Slot {slot!r} of variable {name!r} must have shape {shape}. "
                                            f"Received: shape {array.shape}")
        unknown = sorted(set(scalars) - set(infos[0].scalars))
        if unknown:
            raise NotFoundError("NOT_FOUND", f"The optimizer of model {model.model_id!r} has no scalar {unknown}; "
                                             f"it has {sorted(infos[0].scalars) or 'none'}.")


# --------------------------------------------------------------------------- helpers


def _outcome(call: Callable[[int], Any], index: int) -> tuple[bool, Any]:
    try:
        return True, call(index)
    except Exception as error:  # noqa: BLE001 - handed to the caller's thread
        return False, error


def _known_names(model: ShardedModel, names: list[str]) -> list[str]:
    """Variable names of a read in model order (all when empty); unknown ones fail like on one server."""
    if not names:
        return list(model.order)
    unknown = [name for name in names if name not in model.plan.variables]
    if unknown:
        raise NotFoundError("NOT_FOUND", f"Model {model.model_id!r} has no variable {unknown}; "
                                         f"its variables are {list(model.order)}.")
    return list(dict.fromkeys(names))


def _check_like_variables(model: ShardedModel, arrays: Mapping[str, np.ndarray], what: str) -> None:
    """Names, shapes and dtypes checked before anything is split or sent."""
    unknown = [name for name in arrays if name not in model.plan.variables]
    if unknown:
        raise NotFoundError("NOT_FOUND", f"Model {model.model_id!r} has no variable {unknown}; "
                                         f"its variables are {list(model.order)}.")
    for name, array in arrays.items():
        spec = model.plan.variables[name]
        if array.shape != spec.shape or array.dtype != spec.dtype:
            raise InvalidArgumentError(
                "INVALID_ARGUMENT",
                f"{what} for {name!r} has shape {array.shape} {array.dtype.name}, but the variable has shape "
                f"{spec.shape} {spec.dtype.name}.")


def _check_scalar_dtypes(model: ShardedModel, config: Any) -> None:
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
                "from one server's. Use one dtype for all variables, or one shard.")


def _state_key(weights: OptimizerState) -> tuple:
    return (weights.step, weights.iterations, weights.raw_iterations, weights.learning_rate,
            tuple(sorted(weights.scalars.items())))


def _consistent(fetch: Callable[[], list], key: Callable[[Any], Any], model_id: str, shards: list[int]) -> list:
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
        "FAILED_PRECONDITION",
        f"The shards of model {model_id!r} disagree ({described}). A push reached only some of them: push "
        "that step again from every worker (resync() adopts the lowest step), then read again.")


def _merged_step_result(model: ShardedModel, results: list[StepResult]) -> StepResult:
    """One StepResult from every shard's; in sync mode they must agree on the step and the counters.

    In async mode two workers' pushes may reach the shards in different orders, so
    a push may be a shard's 5th and another's 6th: the highest counts are reported
    (the step a worker names next only has to be new for that worker).
    """
    if model.mode == "async":
        last = max(results, key=lambda r: (r.step, r.iterations))
        return StepResult(step=last.step, iterations=last.iterations, learning_rate=last.learning_rate,
                          duplicate=all(r.duplicate for r in results), contributors=list(last.contributors))
    keys = {(r.step, r.iterations) for r in results}
    if len(keys) != 1:
        described = ", ".join(f"shard {index}: step {r.step}, iterations {r.iterations}"
                              for index, r in zip(model.active_shards, results))
        raise FailedPreconditionError(
            "FAILED_PRECONDITION",
            f"After the push, the shards of model {model.model_id!r} disagree ({described}). Their optimizers "
            "are out of step; restore the model from a checkpoint or create it again.")
    first = results[0]
    return StepResult(
        step=first.step, iterations=first.iterations, learning_rate=first.learning_rate,
        duplicate=all(r.duplicate for r in results),
        contributors=sorted({w for r in results for w in r.contributors}),
        missing_workers=sorted({w for r in results for w in r.missing_workers}))
