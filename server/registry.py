"""The models a server holds, by model_id: create-or-join, lookup, delete."""
from __future__ import annotations

import asyncio
import logging
from concurrent.futures import Executor
from typing import Mapping

import numpy as np

from optserve.server.errors import (
    AlreadyExistsError,
    FailedPreconditionError,
    InvalidArgumentError,
    NotFoundError,
    OptserveError,
    UnavailableError,
)
from optserve.server.model import MAX_LISTED_NAMES, Model, ModelSpec, make_spec

log = logging.getLogger(__name__)


def _engine_module():
    # Imported on first use so that the server's modules load without the engine's dependencies.
    from optserve.server import optimizers

    return optimizers


class ModelRegistry:
    """Holds every model of one server. Use on the server's event loop."""

    def __init__(self, backend=None, executor: Executor | None = None, default_sync_timeout_s: float = 60.0):
        self.backend = backend
        self.executor = executor
        self.default_sync_timeout_s = float(default_sync_timeout_s)
        self._models: dict[str, Model] = {}
        self._creating: dict[str, asyncio.Task] = {}
        self._closed = False

    def new_engine(self, optimizer_config):
        """An unbuilt engine for a config; any complaint about the config is INVALID_ARGUMENT."""
        try:
            return _engine_module().deserialize(optimizer_config, backend=self.backend)
        except OptserveError:
            raise
        except (ValueError, TypeError, KeyError) as exc:
            raise InvalidArgumentError(f"Invalid optimizer config: {exc}") from None

    async def create_or_join(self, *, variables: Mapping[str, np.ndarray], optimizer_config, **spec_fields
                             ) -> tuple[Model, bool]:
        """Create the model, or join the existing one with an identical spec. Returns (model, created)."""
        engine = self.new_engine(optimizer_config)
        spec = make_spec(optimizer_config=engine.get_config(), variables=variables,
                         default_sync_timeout_s=self.default_sync_timeout_s, **spec_fields)
        while True:
            self._ensure_open()
            existing = self._models.get(spec.model_id)
            if existing is not None:
                self._check_joinable(existing.spec, spec)
                return existing, False
            in_flight = self._creating.get(spec.model_id)
            if in_flight is None:
                break
            # Another worker is creating this model right now: wait, then join it (or differ from it).
            await asyncio.wait([in_flight])
        task = asyncio.ensure_future(self._build(spec, engine, variables))
        self._creating[spec.model_id] = task
        task.add_done_callback(lambda _: self._creating.pop(spec.model_id, None))
        # Shielded: the model is still created (and joinable) if the creating client hangs up.
        return await asyncio.shield(task), True

    async def _build(self, spec: ModelSpec, engine, variables) -> Model:
        model = await Model.create(spec, engine, variables, self.executor)
        if self._closed:
            raise UnavailableError("The server is shutting down; create the model on a running server.")
        self._models[spec.model_id] = model
        log.info("created model %r: %s, %d variables, %d worker(s), %s", spec.model_id,
                 spec.optimizer_config.get("class_name", "?"), len(spec.variables), spec.num_workers, spec.mode)
        return model

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
            known = sorted(self._models)
            hint = f"models on this server: {', '.join(map(repr, known[:MAX_LISTED_NAMES]))}" if known else "this server holds no models"
            raise NotFoundError(f"No model {model_id!r} ({hint}); call CreateModel first.")
        return model

    def models(self, model_id: str = "") -> list[Model]:
        if model_id:
            return [self.get(model_id)]
        return list(self._models.values())

    def delete(self, model_id: str) -> bool:
        """Remove a model; workers waiting in one of its steps are refused. False if it did not exist."""
        model = self._models.pop(model_id, None)
        if model is None:
            return False
        model.close(FailedPreconditionError(
            f"Model {model_id!r} was deleted; create it again (CreateModel) before pushing to it."))
        log.info("deleted model %r", model_id)
        return True

    def close(self) -> None:
        """Server shutdown: every model refuses further calls, waiting workers are told to go elsewhere."""
        self._closed = True
        for model in self._models.values():
            model.close(UnavailableError("The server is shutting down; retry against a running server."))

    def _ensure_open(self) -> None:
        if self._closed:
            raise UnavailableError("The server is shutting down; retry against a running server.")
