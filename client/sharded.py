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
  pushes then go in two phases (``optserve.client.two_phase``): every shard holds
  its update and answers the sums of squares of its gradients, the client joins
  them in the model's variable order and commits them to every shard, which
  applies with the norm one server would take -- the same numbers, bit for bit,
  for one or several workers, sync or async, with gradient accumulation (the norm
  is taken when the accumulated gradient is applied) and ``loss_scale_factor``. A
  push that failed between the phases is completed by pushing the step again.
  Async mode with ``gradient_accumulation_steps`` is refused at ``create_model``
  (ValueError): which push ends a cycle would depend on each shard's arrival order.
* A LossScaleOptimizer is refused on several shards (ValueError): whether a step is
  skipped depends on the gradients of every variable.
* ``clipnorm`` and ``global_clipnorm`` take norms of whole variables: variables are
  then kept whole, never split. So are they when the config names weight-decay
  exclusion patterns (a pattern such as ``"kernel$"`` would not match a part name),
  and for optimizers whose update is not elementwise (Lamb's trust ratio,
  Adafactor's row and column statistics, Muon's Newton-Schulz iterations need the
  whole variable; each variable lives on one shard, so they are exact).
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
import threading
import uuid
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, TypeVar

import numpy as np

from optserve.client.arguments import Gradient, StateChange, check_name, optimizer_config_json, weight_tensors
from optserve.client.base import ClientBase, TransportFactory
from optserve.client.client import Client
from optserve.client.shard_discovery import discover
from optserve.client.shard_layout import (
    LAYOUT_SUFFIX,
    MAX_MODEL_ID_LENGTH,
    SHARD_MODEL_ID,
    ShardedModel,
    ShardedModelInfo,
    check_like_variables,
    check_scalar_dtypes,
    check_sharded_optimizer,
    consistent,
    known_names,
    merged_step_result,
    needs_joint_norm,
    plan_for_optimizer,
    shard_model_ids,
    state_key,
)
from optserve.client.transport import RetryPolicy, Transport
from optserve.client.two_phase import commit_step, join_terms, push_held
from optserve.client.types import (
    ModelInfo,
    ModelSpec,
    OptimizerState,
    OptimizerWeights,
    ServerGeneration,
    StepResult,
    VariableInfo,
)
from optserve.protos.errors import (
    AlreadyExistsError,
    FailedPreconditionError,
    InvalidArgumentError,
    NotFoundError,
    OptserveError,
)
from optserve.protos.tensors import SparseGradient

T = TypeVar("T")

__all__ = ["ShardedClient", "ShardedModel", "ShardedModelInfo", "plan_for_optimizer", "shard_model_ids"]

# Threads per shard for concurrent calls. A synchronous push blocks until the other
# workers pushed, so each caller thread needs its own pool thread per shard; threads
# are only started when needed.
THREADS_PER_SHARD = 32


# --------------------------------------------------------------------------- the client


class ShardedClient(ClientBase):
    """The :class:`Client` API over several servers, a model's variables spread over them.

    Takes the addresses of the shards (a list, or one comma-separated string) and
    the keyword arguments of :class:`Client`, which apply to each shard's
    transport. Every call reaches the shards concurrently. (See the module docstring.)
    """

    transports: list[Transport]

    def _connect(
        self,
        addresses: list[str],
        retry: RetryPolicy,
        options: Sequence[tuple[str, Any]] | None,
        factory: TransportFactory,
    ) -> None:
        self.addresses = addresses
        self.transports = []
        try:
            for one in addresses:
                self.transports.append(factory(one, retry, options))
        except BaseException:
            for transport in self.transports:
                transport.close()
            raise
        self._pool = concurrent.futures.ThreadPoolExecutor(
            THREADS_PER_SHARD * len(self.transports), thread_name_prefix="optserve-shard"
        )
        self._lock = threading.Lock()
        self._models: dict[str, ShardedModel] = {}
        self._empty_push_counts: dict[int, bool] = {}

    def _disconnect(self) -> None:
        for transport in self.transports:
            transport.close()
        self._pool.shutdown(wait=False)

    def __repr__(self) -> str:
        return f"ShardedClient({self.addresses!r})"

    @property
    def num_shards(self) -> int:
        return len(self.transports)

    # ------------------------------------------------------------------ fan-out

    def _on_shards(self, call: Callable[[int], T], shards: Iterable[int], model_id: str | None = None) -> list[T]:
        """``call(i)`` for every shard index in ``shards``, concurrently; results in that order.

        When some shards fail, the error of the first of them (in shard order) is
        raised, naming the shard (``shard_index``, ``address``, and in its message);
        the calls on the other shards ran. A NotFoundError makes the client forget
        ``model_id``'s plan: the model was deleted, and may come back with another placement.
        """
        self._check_open()
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
                if isinstance(value, OptserveError):
                    raise value.on_shard(index, self.addresses[index]) from None
                raise value
        return [value for _, value in outcomes]

    def _piece_info(self, index: int, model: ShardedModel, timeout: float | None) -> ModelInfo:
        return self.transports[index].list_models(model.piece_model_id, False, timeout=timeout)[0]

    # ------------------------------------------------------------------ finding models on the shards

    def _listings(self, timeout: float | None, with_stats: bool = False) -> list[list[ModelInfo]]:
        return self._on_shards(
            lambda i: self.transports[i].list_models(None, with_stats, timeout=timeout), range(self.num_shards)
        )

    def _resolve(self, model_id: str, timeout: float | None) -> ShardedModel:
        """The plan of ``model_id``: known already, or recovered from the shards."""
        check_name(model_id, "model_id")
        with self._lock:
            model = self._models.get(model_id)
        if model is None:
            model, _ = discover(model_id, self._listings(timeout), self.addresses)
            self._remember(model)
        return model

    def _remember(self, model: ShardedModel) -> None:
        with self._lock:
            self._models[model.model_id] = model

    # ------------------------------------------------------------------ models

    def _create_model(
        self, spec: ModelSpec, variables: dict[str, np.ndarray], timeout: float | None, worker_index: int | None
    ) -> ShardedModelInfo:
        """Create the model on every shard, or join it (``created`` is False) when it exists with this plan."""
        model_id = spec.model_id
        if len(model_id) > MAX_MODEL_ID_LENGTH:
            raise ValueError(
                f"`model_id` of a sharded model must be at most {MAX_MODEL_ID_LENGTH} characters "
                f"(the shards add a suffix). Received: {len(model_id)} characters"
            )
        config = json.loads(spec.optimizer_config_json)
        check_sharded_optimizer(config, self.num_shards, spec.mode)
        plan = plan_for_optimizer(variables, self.num_shards, config)
        model = ShardedModel(model_id, plan, tuple(variables), spec.mode, needs_joint_norm(config))
        check_scalar_dtypes(model, config)
        self._refuse_other_placements(model, self._listings(timeout))
        values = plan.split(variables)
        parts = model.parts_by_shard()
        piece_spec = dataclasses.replace(spec, model_id=model.piece_model_id)

        def create(index: int) -> ModelInfo:
            shard_values = {part: values[index][part] for part in parts[index]}
            return self.transports[index].create_model(
                piece_spec, shard_values, timeout=timeout, worker_index=worker_index
            )

        infos = self._on_shards(create, model.active_shards)
        # Last: the layout marks the model complete for clients that attach without creating it.
        layout_spec = ModelSpec(model.layout_model_id, optimizer_config_json("sgd"))
        layout = self._on_shards(
            lambda i: self.transports[i].create_model(
                layout_spec, {name: np.zeros((0,), np.float32) for name in model.order}, timeout=timeout
            ),
            [0],
        )[0]
        self._remember(model)
        per_shard: list[ModelInfo | None] = [None] * self.num_shards
        for index, info in zip(model.active_shards, infos):
            per_shard[index] = info
        created = bool(layout.created) and all(info.created for info in infos)
        return self._merged_info(model, per_shard, created)

    def _refuse_other_placements(self, model: ShardedModel, listings: list[list[ModelInfo]]) -> None:
        for index, listing in enumerate(listings):
            for info in listing:
                match = SHARD_MODEL_ID.match(info.model_id)
                if match and match["model_id"] == model.model_id and match["fingerprint"] != model.fingerprint:
                    raise AlreadyExistsError(
                        f"Model {model.model_id!r} already exists on shard {index} ({self.addresses[index]}) with "
                        f"another placement (plan {match['fingerprint']}; these variables on these "
                        f"{self.num_shards} shards give plan {model.fingerprint}). Every worker must pass the same "
                        "variables (names, shapes, dtypes) and the same shard addresses in the same order; "
                        "delete the model to start over."
                    )

    def _merged_info(
        self, model: ShardedModel, infos: list[ModelInfo | None], created: bool | None, with_stats: bool = False
    ) -> ShardedModelInfo:
        present = [info for info in infos if info is not None]
        lead = min(present, key=lambda info: info.step)
        by_part = {variable.name: variable for info in present for variable in info.variables}
        variables = []
        for name in model.order:
            spec = model.plan.variables[name]
            located = [by_part[piece.part_name] for _, piece in model.plan.locate(name)]
            norm = math.sqrt(sum((v.norm or 0.0) ** 2 for v in located)) if with_stats else None
            variables.append(VariableInfo(name, spec.shape, spec.dtype.name, list(located[0].slots), norm))
        waiting = sorted({worker for info in present for worker in info.waiting_workers})
        return ShardedModelInfo(
            model_id=model.model_id,
            created=created,
            step=lead.step,
            iterations=lead.iterations,
            learning_rate=lead.learning_rate,
            num_workers=lead.num_workers,
            mode=lead.mode,
            variables=variables,
            optimizer=lead.optimizer,
            optimizer_config=lead.optimizer_config,
            raw_iterations=lead.raw_iterations,
            scalars=dict(lead.scalars),
            sync_timeout_s=lead.sync_timeout_s,
            timeout_policy=lead.timeout_policy,
            waiting_workers=waiting,
            generation=ServerGeneration.combine([info.generation for info in present]),
            addresses=list(self.addresses),
            plan=model.plan,
            shards=list(infos),
        )

    def _list_models(self, model_id: str | None, with_stats: bool, timeout: float | None) -> list[ModelInfo]:
        """Every sharded model on these shards (ShardedModelInfo), or just ``model_id``.

        Models on the servers that are not pieces of a sharded model are not listed.
        """
        listings = self._listings(timeout, with_stats)
        if model_id is not None:
            names = [check_name(model_id, "model_id")]
        else:
            names = sorted(
                {m["model_id"] for info in listings[0] if (m := SHARD_MODEL_ID.match(info.model_id)) and m["layout"]}
            )
        found: list[ModelInfo] = []
        for name in names:
            try:
                model, infos = discover(name, listings, self.addresses)
            except FailedPreconditionError:
                if model_id is not None:
                    raise
                continue  # being created or deleted right now, or not ours to read
            self._remember(model)
            found.append(self._merged_info(model, infos, None, with_stats))
        return found

    def _delete_model(self, model_id: str, timeout: float | None, if_idle: bool) -> bool:
        """Delete every piece of the model (any placement of it); False if there was none.

        ``if_idle`` is decided from the listing (workers waiting in a step), so on
        shards it is not atomic with the deletes.
        """
        listings = self._listings(timeout)
        doomed = [
            [
                info.model_id
                for info in listing
                if (m := SHARD_MODEL_ID.match(info.model_id)) and m["model_id"] == model_id
            ]
            for listing in listings
        ]
        if if_idle:
            busy = sorted(
                {
                    w
                    for listing in listings
                    for info in listing
                    if info.model_id in {name for names in doomed for name in names}
                    for w in info.waiting_workers
                }
            )
            if busy:
                raise FailedPreconditionError(
                    f"Model {model_id!r} is in use: workers {busy} pushed a step and wait for the others. "
                    "Delete it when they are done, or force it (their step is lost)."
                )
        # Layouts first: from then on the model reads as gone, not as half there.
        layouts = [name for name in doomed[0] if name.endswith(LAYOUT_SUFFIX)]
        doomed[0] = [name for name in doomed[0] if name not in layouts]
        deleted = self._on_shards(
            lambda i: [self.transports[i].delete_model(name, timeout=timeout) for name in layouts], [0]
        )
        deleted += self._on_shards(
            lambda i: [self.transports[i].delete_model(name, timeout=timeout, if_idle=if_idle) for name in doomed[i]],
            range(self.num_shards),
        )
        with self._lock:
            self._models.pop(model_id, None)
        return any(flag for flags in deleted for flag in flags)

    def _checkpoint(self, timeout: float | None) -> tuple[str, int]:
        """Every shard writes a checkpoint; returns (the paths joined by commas, models in all)."""
        results = self._on_shards(lambda i: self.transports[i].checkpoint(timeout=timeout), range(self.num_shards))
        return ",".join(path for path, _ in results), sum(count for _, count in results)

    def _health(self, service: str, timeout: float | None) -> str:
        """ "SERVING" when every shard is; otherwise the first other status."""
        statuses = self._on_shards(
            lambda i: self.transports[i].health(service, timeout=timeout), range(self.num_shards)
        )
        return next((status for status in statuses if status != "SERVING"), "SERVING")

    # ------------------------------------------------------------------ steps

    def _server_step(self, model_id: str, timeout: float | None) -> int:
        # The lowest step: after a push that reached only some shards, pushing that step
        # again completes it (the others answer it as a repeat).
        model = self._resolve(model_id, timeout)
        infos = self._on_shards(lambda i: self._piece_info(i, model, timeout), model.active_shards, model_id)
        return min(info.step for info in infos)

    # ------------------------------------------------------------------ gradients

    def _prepare_push(
        self, model_id: str, gradients: dict[str, Gradient]
    ) -> tuple[ShardedModel, list[dict[str, Gradient]]]:
        model = self._resolve(model_id, self.timeout)
        dense = {name: g for name, g in gradients.items() if not isinstance(g, SparseGradient)}
        sparse = {name: g for name, g in gradients.items() if isinstance(g, SparseGradient)}
        check_like_variables(model, dense, "Gradient")
        check_like_variables(model, sparse, "Gradient")
        per_shard: list[dict[str, Gradient]] = [dict(part) for part in model.plan.split(dense)]
        for name, gradient in sparse.items():
            # Each part gets its rows, re-based; a part none of whose rows is touched still gets
            # its (empty) gradient, so that its slots decay as the whole variable's would.
            for index, piece in model.plan.locate(name):
                if piece.is_whole or piece.row_start is None or piece.row_stop is None:
                    part = gradient
                else:
                    part = gradient.rows(piece.row_start, piece.row_stop)
                per_shard[index][piece.part_name] = part
        self._check_every_shard_counts_the_step(model, per_shard)
        return model, per_shard

    def _apply_gradients(
        self,
        model_id: str,
        prepared: Any,
        worker_index: int,
        step: int,
        aggregated: bool,
        return_variables: bool,
        timeout: float | None,
    ) -> tuple[StepResult, dict[str, np.ndarray]]:
        model, per_shard = prepared
        if model.joint_norm and len(model.active_shards) > 1:
            answers = self._push_two_phase(model, per_shard, worker_index, step, aggregated, return_variables, timeout)
            return self._merged_push(model, answers, return_variables)

        def push(index: int) -> tuple[StepResult, dict[str, np.ndarray]]:
            return self.transports[index].apply_gradients(
                model.piece_model_id,
                per_shard[index],
                worker_index=worker_index,
                step=step,
                aggregated=aggregated,
                return_variables=return_variables,
                timeout=timeout,
            )

        return self._merged_push(model, self._on_shards(push, model.active_shards, model_id), return_variables)

    def _merged_push(
        self, model: ShardedModel, answers: list[tuple[StepResult, dict]], return_variables: bool
    ) -> tuple[StepResult, dict[str, np.ndarray]]:
        result = merged_step_result(model, [result for result, _ in answers])
        if not return_variables:
            return result, {}
        parts: list[dict] = [{} for _ in self.transports]
        for index, (_, values) in zip(model.active_shards, answers):
            parts[index] = values
        return result, model.in_order(model.plan.join(parts))

    def _push_two_phase(
        self,
        model: ShardedModel,
        per_shard: list[dict[str, Gradient]],
        worker_index: int,
        step: int,
        aggregated: bool,
        return_variables: bool,
        timeout: float | None,
    ) -> list[tuple[StepResult, dict[str, np.ndarray]]]:
        """Push held on every shard, then commit the joint norm terms where the step is held.

        (See optserve.client.two_phase.) A failure between the phases leaves the client's
        step where it was: pushing it again answers with the same terms on the shards that
        still hold it or applied it, and commits the rest.
        """
        shards = model.active_shards

        def push(index: int):
            return push_held(
                self.transports[index],
                model.piece_model_id,
                per_shard[index],
                worker_index=worker_index,
                step=step,
                aggregated=aggregated,
                return_variables=return_variables,
                timeout=timeout,
            )

        pushed = self._on_shards(push, shards, model.model_id)
        answers = {index: (result, values) for index, (result, _, values) in zip(shards, pushed)}
        joints = [joint for _, joint, _ in pushed]
        if any(joint is not None for joint in joints):
            terms = join_terms(model.model_id, model.order, joints, shards)
            holding = [index for index, joint in zip(shards, joints) if joint is not None and joint.held]

            def commit(index: int):
                return commit_step(
                    self.transports[index],
                    model.piece_model_id,
                    terms,
                    worker_index=worker_index,
                    step=step,
                    return_variables=return_variables,
                    timeout=timeout,
                )

            for index, (result, values) in zip(holding, self._on_shards(commit, holding, model.model_id)):
                # The push's own standing in the step (contributors, duplicate) is phase 1's.
                first = answers[index][0]
                result = dataclasses.replace(
                    result,
                    duplicate=first.duplicate,
                    contributors=first.contributors,
                    missing_workers=first.missing_workers,
                )
                answers[index] = (result, values)
        return [answers[index] for index in shards]

    def _check_every_shard_counts_the_step(self, model: ShardedModel, per_shard: list[dict]) -> None:
        """Refuse, before sending anything, a push that would leave a shard's step behind."""
        empty = [index for index in model.active_shards if not per_shard[index]]
        if not empty:
            return
        if len(empty) == len(model.active_shards):
            raise InvalidArgumentError(
                f"The push to model {model.model_id!r} carried no gradients; send at least one variable's gradient."
            )
        refusing = [index for index in empty if not self._counts_empty_push(index)]
        if refusing:
            held = {index: [p.var_name for p in model.plan.shards[index]] for index in refusing}
            raise InvalidArgumentError(
                f"This push to model {model.model_id!r} has no gradient for any variable on shards {refusing} "
                f"({', '.join(self.addresses[i] for i in refusing)}), and those servers refuse a push without "
                "gradients, so their step would fall behind the others'. Nothing was sent. Push a gradient "
                f"for at least one variable of every shard (shard: variables {held}), or use one shard."
            )

    def _counts_empty_push(self, index: int) -> bool:
        """Whether shard ``index``'s server takes a push without gradients as a step (probed once)."""
        with self._lock:
            known = self._empty_push_counts.get(index)
        if known is not None:
            return known
        transport = self.transports[index]
        probe = f"optserve-empty-push-probe-{uuid.uuid4().hex[:12]}"
        transport.create_model(
            ModelSpec(probe, optimizer_config_json("sgd")), {"probe": np.zeros(1, np.float32)}, timeout=self.timeout
        )
        try:
            result, _ = transport.apply_gradients(
                probe, {}, worker_index=0, step=0, aggregated=False, return_variables=False, timeout=self.timeout
            )
            counts = result.iterations == 1
        except InvalidArgumentError:
            counts = False
        finally:
            transport.delete_model(probe, timeout=self.timeout)
        with self._lock:
            self._empty_push_counts[index] = counts
        return counts

    # ------------------------------------------------------------------ reads

    def _pull(self, model_id: str, names: list[str], timeout: float | None) -> tuple[StepResult, dict[str, np.ndarray]]:
        """Current values (all variables, or ``names``); the step is the lowest of the shards read."""
        model = self._resolve(model_id, timeout)
        wanted = known_names(model, names)
        parts = model.parts_by_shard(wanted)
        shards = [index for index in model.active_shards if parts[index]]
        answers = self._on_shards(
            lambda i: self.transports[i].pull(model.piece_model_id, parts[i], timeout=timeout), shards, model_id
        )
        per_shard: list[dict] = [{} for _ in self.transports]
        for index, (_, values) in zip(shards, answers):
            per_shard[index] = values
        lead = min((result for result, _ in answers), key=lambda result: result.step)
        values = model.plan.join(per_shard)
        generation = ServerGeneration.combine([result.generation for result, _ in answers])
        return StepResult(
            step=lead.step, iterations=lead.iterations, learning_rate=lead.learning_rate, generation=generation
        ), {name: values[name] for name in wanted}

    def _get_weights(
        self, model_id: str, names: list[str], include_variables: bool, timeout: float | None
    ) -> OptimizerWeights:
        """Optimizer state of the whole model: split slots joined, Keras order, one step on every shard."""
        model = self._resolve(model_id, timeout)
        wanted = known_names(model, names)
        parts = model.parts_by_shard(wanted)
        shards = [index for index in model.active_shards if parts[index]]

        def fetch() -> list[OptimizerWeights]:
            return self._on_shards(
                lambda i: self.transports[i].get_weights(
                    model.piece_model_id, parts[i], include_variables, timeout=timeout
                ),
                shards,
                model_id,
            )

        answers = consistent(fetch, state_key, model.model_id, shards)
        per_shard_slots: dict[str, list[dict]] = {}
        per_shard_variables: list[dict] = [{} for _ in self.transports]
        slot_order: dict[str, list[str]] = {}
        for index, weights in zip(shards, answers):
            per_shard_variables[index] = weights.variables
            for part, slots in weights.slots.items():
                slot_order.setdefault(part, list(slots))
                for slot, array in slots.items():
                    per_shard_slots.setdefault(slot, [{} for _ in self.transports])[index][part] = array
        joined = {slot: model.plan.join(arrays) for slot, arrays in per_shard_slots.items()}
        slots = {}
        for name in wanted:
            first_part = model.plan.locate(name)[0][1].part_name
            slots[name] = {slot: joined[slot][name] for slot in slot_order.get(first_part, [])}
        variables = model.plan.join(per_shard_variables) if include_variables else {}
        state = answers[0]
        return OptimizerWeights(
            iterations=state.iterations,
            raw_iterations=state.raw_iterations,
            learning_rate=state.learning_rate,
            step=state.step,
            scalars=dict(state.scalars),
            generation=ServerGeneration.combine([answer.generation for answer in answers]),
            slots=slots,
            variables={name: variables[name] for name in wanted if name in variables},
        )

    # ------------------------------------------------------------------ writes

    def _set_weights(
        self,
        model_id: str,
        slots: dict[str, dict[str, np.ndarray]],
        variables: dict[str, np.ndarray],
        change: StateChange,
        timeout: float | None,
    ) -> OptimizerState:
        """Checked against the model first (a rejected request sends nothing), then written shard by shard."""
        model = self._resolve(model_id, timeout)
        check_like_variables(model, variables, "New value")
        if slots or change.scalars:
            self._check_slots_and_scalars(model, slots, change.scalars, timeout)
        value_parts = model.plan.split(variables)
        slot_parts: list[dict[str, dict[str, np.ndarray]]] = [{} for _ in self.transports]
        for slot in sorted({slot for per_var in slots.values() for slot in per_var}):
            split = model.plan.split({name: per_var[slot] for name, per_var in slots.items() if slot in per_var})
            for index, parts in enumerate(split):
                for part, array in parts.items():
                    slot_parts[index].setdefault(part, {})[slot] = array
        shards = [index for index in model.active_shards if change or value_parts[index] or slot_parts[index]]
        if not shards:
            shards = model.active_shards[:1]  # nothing to write: answer with the state, like one server

        def write(index: int) -> OptimizerState:
            # Every shard runs the optimizer of its part: a new learning rate goes to each.
            state, fields = change.state_for(self._piece_info(index, model, timeout)) if change else (None, [])
            result = self.transports[index].set_weights(
                model.piece_model_id,
                weight_tensors(slot_parts[index], value_parts[index]),
                state,
                timeout=timeout,
                fields=fields,
            )
            change.check_taken(result)
            return result

        states = self._on_shards(write, shards, model_id)
        lowest = min(states, key=lambda state: state.step)
        return dataclasses.replace(lowest, generation=ServerGeneration.combine([s.generation for s in states]))

    def _check_slots_and_scalars(
        self,
        model: ShardedModel,
        slots: Mapping[str, Mapping[str, np.ndarray]],
        scalars: Mapping[str, float],
        timeout: float | None,
    ) -> None:
        infos = self._on_shards(lambda i: self._piece_info(i, model, timeout), model.active_shards)
        slot_names = {variable.name: variable.slots for info in infos for variable in info.variables}
        for name, per_var in slots.items():
            if name not in model.plan.variables:
                raise NotFoundError(
                    f"Model {model.model_id!r} has no variable {name!r}; its variables are {list(model.order)}."
                )
            allowed = slot_names[model.plan.locate(name)[0][1].part_name]
            shape = model.plan.variables[name].shape
            for slot, array in per_var.items():
                if slot not in allowed:
                    raise NotFoundError(
                        f"Variable {name!r} of model {model.model_id!r} has no slot {slot!r}; "
                        f"its slots are {allowed or 'none'}."
                    )
                if array.shape != shape:
                    raise InvalidArgumentError(
                        f"Slot {slot!r} of variable {name!r} must have shape {shape}. Received: shape {array.shape}"
                    )
        unknown = sorted(set(scalars) - set(infos[0].scalars))
        if unknown:
            raise NotFoundError(
                f"The optimizer of model {model.model_id!r} has no scalar {unknown}; "
                f"it has {sorted(infos[0].scalars) or 'none'}."
            )


# A ShardedClient offers all of Client's API (tests compare the signatures), so it counts as one.
Client.register(ShardedClient)


# --------------------------------------------------------------------------- helpers


def _outcome(call: Callable[[int], Any], index: int) -> tuple[bool, Any]:
    try:
        return True, call(index)
    except Exception as error:  # noqa: BLE001 - handed to the caller's thread
        return False, error
