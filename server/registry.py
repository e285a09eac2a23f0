"""The models a server holds, by model_id: create-or-join, lookup, delete; their checkpoint state.

``snapshot()`` collects every model's checkpoint state (each one consistent, taken
between two of its updates); ``restore()`` rebuilds the models from one, while the
registry refuses every call with UNAVAILABLE so that nothing sees half of them.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Mapping
from concurrent.futures import Executor
from typing import Any

import numpy as np

from optserve.server import auth
from optserve.server.errors import (
    AlreadyExistsError,
    FailedPreconditionError,
    InvalidArgumentError,
    NotFoundError,
    OptserveError,
    ResourceExhaustedError,
    UnavailableError,
)
from optserve.server.limits import Reservation, ServerLimits
from optserve.server.model import MAX_LISTED_NAMES, Model
from optserve.server.model_spec import ModelSpec, make_spec
from optserve.server.restore_budget import RestoreBudget
from optserve.server.usage import JOIN, Activity

log = logging.getLogger(__name__)

SERVER_STATE_FORMAT = "optserve.server_state/1"


def _engine_module():
    # Imported on first use so that the server's modules load without the engine's dependencies.
    from optserve.server import optimizers

    return optimizers


class ModelRegistry:
    """Holds every model of one server. Use on the server's event loop."""

    def __init__(
        self,
        backend=None,
        executor: Executor | None = None,
        default_sync_timeout_s: float = 60.0,
        on_change: Callable[[int], None] | None = None,
        limits: ServerLimits | None = None,
    ):
        self.backend = backend
        self.limits = limits or ServerLimits()
        self.executor = executor
        self.default_sync_timeout_s = float(default_sync_timeout_s)
        # Told of every change to the models (loop thread), with the number of updates applied.
        self.on_change = on_change
        # Told of models added and removed (``optserve.server.metrics.ServerMetrics``), when set.
        self.observer: Any = None  # optserve.server.metrics.ServerMetrics, with --metrics-port
        self._models: dict[str, Model] = {}
        self._creating: dict[str, asyncio.Task] = {}
        self._closed = False
        self._restoring = False

    def new_engine(self, optimizer_config):
        """An unbuilt engine for a config; any complaint about the config is INVALID_ARGUMENT."""
        try:
            return _engine_module().deserialize(optimizer_config, backend=self.backend)
        except OptserveError:
            raise
        except (ValueError, TypeError, KeyError) as exc:
            raise InvalidArgumentError(f"Invalid optimizer config: {exc}") from None

    def has(self, model_id: str) -> bool:
        """Whether ``model_id`` exists or is being created (a CreateModel for it would join)."""
        return model_id in self._models or model_id in self._creating

    def check_room_for_model(self, max_models: int) -> None:
        if len(self._models) + len(self._creating) >= max_models:
            raise ResourceExhaustedError(
                f"This server holds its limit of {max_models} models; delete one (DeleteModel), or start the "
                "server with a larger --max-models."
            )

    async def create_or_join(
        self,
        *,
        variables: Mapping[str, np.ndarray],
        optimizer_config,
        reservation: Reservation | None = None,
        worker: int | None = None,
        peer: str = "",
        **spec_fields,
    ) -> tuple[Model, bool]:
        """Create the model, or join the existing one with an identical spec. Returns (model, created).

        ``reservation``: the new model's state in the memory budget; it becomes the model's,
        or is released when the model is joined or not created. ``worker`` and ``peer`` name
        the caller: the creator of a new model, the last activity of a joined one.
        """
        reservation = reservation or Reservation(self.limits.memory)
        try:
            model, created = await self._create_or_join(
                variables, optimizer_config, reservation, worker, peer, **spec_fields
            )
        except BaseException:
            if not reservation.transferred:
                reservation.release()
            raise
        if not created:
            reservation.release()
        return model, created

    async def _create_or_join(self, variables, optimizer_config, reservation, worker, peer, **spec_fields):
        engine = self.new_engine(optimizer_config)
        spec = make_spec(
            optimizer_config=engine.get_config(),
            variables=variables,
            default_sync_timeout_s=self.default_sync_timeout_s,
            **spec_fields,
        )
        while True:
            self._ensure_open()
            existing = self._models.get(spec.model_id)
            if existing is not None:
                self._check_joinable(existing.spec, spec)
                existing.usage.note(JOIN, worker)
                return existing, False
            in_flight = self._creating.get(spec.model_id)
            if in_flight is None:
                break
            # Another worker is creating this model right now: wait, then join it (or differ from it).
            await asyncio.wait([in_flight])
        reservation.transferred = True  # the build task gives it to the model, or releases it
        task = asyncio.ensure_future(
            self._build(spec, engine, variables, reservation, Activity.created_by(worker, peer))
        )
        self._creating[spec.model_id] = task
        task.add_done_callback(lambda _: self._creating.pop(spec.model_id, None))
        # Shielded: the model is still created (and joinable) if the creating client hangs up.
        return await asyncio.shield(task), True

    async def _build(self, spec: ModelSpec, engine, variables, reservation: Reservation, activity: Activity) -> Model:
        try:
            model = await Model.create(spec, engine, variables, self.executor)
            model.usage = activity
            if self._closed:
                raise UnavailableError("The server is shutting down; create the model on a running server.")
        except BaseException:
            reservation.release()
            raise
        # Exact from here on, whatever was reserved while the variables arrived.
        shortfall = model.state_bytes() - reservation.nbytes
        if shortfall > 0:
            reservation.take(shortfall, force=True)
        model.memory = reservation
        self._add(model)
        log.info(
            "created model %r: %s, %d variables, %d worker(s), %s",
            spec.model_id,
            spec.optimizer_config.get("class_name", "?"),
            len(spec.variables),
            spec.num_workers,
            spec.mode,
        )
        return model

    def _add(self, model: Model) -> None:
        model.on_change = self._note_change
        self._models[model.model_id] = model
        self._observe("model_added", model)
        self._note_change(0)

    def _observe(self, event: str, model: Model) -> None:
        if self.observer is not None:
            getattr(self.observer, event)(model)

    def _note_change(self, applied: int) -> None:
        if self.on_change is not None:
            self.on_change(applied)

    @staticmethod
    def _check_joinable(existing: ModelSpec, requested: ModelSpec) -> None:
        differences = existing.differences(requested)
        if differences:
            shown = "; ".join(differences[:MAX_LISTED_NAMES])
            more = f" (and {len(differences) - MAX_LISTED_NAMES} more)" if len(differences) > MAX_LISTED_NAMES else ""
            raise AlreadyExistsError(
                f"Model {existing.model_id!r} already exists with a different spec: {shown}{more}. "
                "Call DeleteModel first to replace it, or use another model_id."
            )

    def get(self, model_id: str) -> Model:
        self._ensure_open()
        model = self._models.get(model_id)
        if model is None:
            known = sorted(filter(auth.visible, self._models))  # never name another tenant's models
            hint = (
                f"models on this server: {', '.join(map(repr, known[:MAX_LISTED_NAMES]))}"
                if known
                else "this server holds no models"
            )
            raise NotFoundError(f"No model {model_id!r} ({hint}); call CreateModel first.")
        return model

    def models(self, model_id: str = "") -> list[Model]:
        if model_id:
            return [self.get(model_id)]
        self._ensure_restored()
        return list(self._models.values())

    def delete(self, model_id: str, *, if_idle: bool = False) -> bool:
        """Remove a model; workers waiting in one of its steps are refused. False if it did not exist.

        With ``if_idle``, a model in use (``Model.in_use_reason``) is refused instead, unchanged.
        """
        self._ensure_restored()
        model = self._models.get(model_id)
        if model is None:
            return False
        reason = model.in_use_reason() if if_idle else None
        if reason is not None:
            raise FailedPreconditionError(
                f"Model {model_id!r} is in use ({reason}); deleting it would fail those calls and lose the "
                "step in progress. Stop its workers first, or delete it anyway (`optserve delete --force`, "
                "DeleteModel without if_idle)."
            )
        self._remove(model, "deleted")
        return True

    def delete_idle(self, ttl_s: float) -> list[str]:
        """Delete every model idle for longer than ``ttl_s`` and not in use; returns their ids."""
        self._ensure_open()
        expired = [
            model
            for model in self._models.values()
            if model.in_use_reason() is None and model.usage.idle_seconds() > ttl_s
        ]
        for model in expired:
            record = model.usage.record
            who = f" by worker {record.last_worker}" if record.last_worker is not None else ""
            self._remove(
                model,
                f"deleted after {model.usage.idle_seconds():.0f} s idle (--model-ttl "
                f"{ttl_s:g} s; last activity: {record.last_kind}{who})",
            )
        return [model.model_id for model in expired]

    def _remove(self, model: Model, why: str) -> None:
        model_id = model.model_id
        del self._models[model_id]
        model.close(
            FailedPreconditionError(
                f"Model {model_id!r} was {why}; create it again (CreateModel) before pushing to it."
            )
        )
        if model.memory is not None:
            model.memory.release()
        model.on_change = None
        self._observe("model_removed", model)
        self._note_change(0)
        log.info("model %r %s", model_id, why)

    # ------------------------------------------------------------ checkpoints

    async def snapshot(self) -> dict[str, Any]:
        """Every model's checkpoint state, as one tree for ``CheckpointStore.save``.

        Also works once the registry is closed: the final checkpoint of a shutdown is
        taken after the models stopped taking pushes.
        """
        self._ensure_restored()
        models = list(self._models.values())
        states = [await model.checkpoint_state() for model in models]
        # A model deleted while the others were being read is not part of the server any more.
        kept = [(model, state) for model, state in zip(models, states) if self._models.get(model.model_id) is model]
        # Who owns each model (its principal's quotas), so that a restart charges them again.
        owners = {model.model_id: model.memory.owner_name for model, _ in kept if model.memory and model.memory.owner}
        snapshot: dict[str, Any] = {"format": SERVER_STATE_FORMAT, "models": [state for _, state in kept]}
        if owners:
            snapshot["owners"] = owners
        return snapshot

    def begin_restore(self) -> None:
        """Refuse every call with UNAVAILABLE until ``end_restore``."""
        self._restoring = True

    def end_restore(self) -> None:
        self._restoring = False

    async def restore(
        self, state: Mapping[str, Any], principal_named: Callable[[str], Any] | None = None
    ) -> list[Model]:
        """Rebuild the models of a ``snapshot()``; the registry must hold none yet. Returns them.

        The models must fit the server's limits (``RestoreBudget``: checked from their specs,
        before their state is built; a checkpoint that does not fit refuses the start). Each
        is charged to its owner again (``principal_named(name)``: the principal of that name,
        when the token file still lists it), whose quotas it may exceed: that is logged, and
        the principal's new models are refused until it is back within them.
        """
        if not isinstance(state, Mapping) or state.get("format") != SERVER_STATE_FORMAT:
            found = state.get("format") if isinstance(state, Mapping) else type(state).__name__
            raise InvalidArgumentError(f"Unknown server state format {found!r}; expected {SERVER_STATE_FORMAT!r}.")
        if self._models:
            raise FailedPreconditionError(
                f"Cannot restore a checkpoint into a server that holds models ({_quoted(self._models)})."
            )
        budget = RestoreBudget(self.limits, self.new_engine)
        budget.check(state["models"])  # before any model's state is built
        models = [await Model.restore(model_state, self.new_engine, self.executor) for model_state in state["models"]]
        owners = state.get("owners") or {}
        for model in models:
            model.on_change = self._note_change
            model.memory = Reservation(
                self.limits.memory, budget.owner_account(owners.get(model.model_id), model, principal_named)
            )
            model.memory.take(model.state_bytes(), force=True)  # checked above; exact now
            self._models[model.model_id] = model
            self._observe("model_added", model)
        budget.warn_over_quota(principal_named)
        return models

    def close(self) -> None:
        """Server shutdown: every model refuses further calls, waiting workers are told to go elsewhere."""
        self._closed = True
        for model in self._models.values():
            model.close(UnavailableError("The server is shutting down; retry against a running server."))

    def _ensure_open(self) -> None:
        if self._closed:
            raise UnavailableError("The server is shutting down; retry against a running server.")
        self._ensure_restored()

    def _ensure_restored(self) -> None:
        if self._restoring:
            raise UnavailableError("The server is restoring its models from a checkpoint; retry in a moment.")


def _quoted(names) -> str:
    names = sorted(names)
    shown = ", ".join(map(repr, names[:MAX_LISTED_NAMES]))
    return shown + (f" and {len(names) - MAX_LISTED_NAMES} more" if len(names) > MAX_LISTED_NAMES else "")
