"""A checkpoint restored at start-up counts against the server's limits like new models do.

The server-wide limits are the server's safety bounds: a checkpoint whose models
would exceed ``--max-memory``, ``--max-model-bytes`` or ``--max-models`` refuses
the start (FAILED_PRECONDITION from ``ParameterServer.start``, ``optserve serve``
exits 1) with a message naming each flag and the value that would fit. Loading
only what fits would drop models silently on the next checkpoint; the operator
decides instead (raise the flag, or start from another checkpoint directory).
This is checked from the models' specs (shapes, dtypes, optimizer slots), before
any model's state is built.

Per-principal quotas are policy, not safety: a principal over its quota after a
restore (its quota was lowered, or its models came from elsewhere) keeps its
models; a warning names it, and its new models are refused until it deletes some.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from optserve.server.auth import READER, Principal
from optserve.server.errors import FailedPreconditionError
from optserve.server.limits import ServerLimits, state_bytes
from optserve.server.model_spec import SYNC, spec_from_state
from optserve.server.quotas import PrincipalAccount

log = logging.getLogger(__name__)
MAX_SHOWN = 5


class RestoreBudgetError(FailedPreconditionError):
    """The checkpoint's models do not fit the server's limits."""


def _size(nbytes: int) -> str:
    return f"{nbytes} bytes" + (f" ({nbytes / (1 << 20):.1f} MiB)" if nbytes >= 1 << 20 else "")


def _suggested(nbytes: int) -> str:
    """A flag value at least ``nbytes``, in whole MiB."""
    return f"{max(1, math.ceil(nbytes / (1 << 20)))}M"


class RestoreBudget:
    """The state of a checkpoint's models, checked against one server's limits."""

    def __init__(self, limits: ServerLimits, new_engine: Callable[[dict], Any]):
        self.limits = limits
        self.new_engine = new_engine
        self._principals: dict[str, Any] = {}  # owner name -> principal charged

    def model_bytes(self, model_state: Mapping[str, Any]) -> tuple[str, int]:
        """(model_id, bytes of its state) from a model's checkpoint state, without building it."""
        spec = spec_from_state(model_state["spec"])
        engine = self.new_engine(spec.optimizer_config)
        workers = spec.num_workers if spec.mode == SYNC else 1
        total = sum(
            state_bytes(math.prod(v.shape) * v.dtype.itemsize, engine.arrays_per_variable(v.name, v.shape), workers)
            for v in spec.variables
        )
        return spec.model_id, total

    def check(self, model_states: Iterable[Mapping[str, Any]]) -> None:
        sizes = [self.model_bytes(state) for state in model_states]
        limits = self.limits.limits
        problems = []
        if len(sizes) > limits.max_models:
            problems.append(
                f"{len(sizes)} models, over --max-models {limits.max_models} (start with --max-models {len(sizes)})"
            )
        total = sum(nbytes for _, nbytes in sizes)
        if total > self.limits.memory.capacity:
            problems.append(
                f"{_size(total)} of state, over --max-memory {_size(self.limits.memory.capacity)} "
                f"(start with --max-memory {_suggested(total)} or more)"
            )
        cap = limits.max_model_bytes
        if cap is not None:
            over = sorted(((nbytes, model_id) for model_id, nbytes in sizes if nbytes > cap), reverse=True)
            if over:
                shown = ", ".join(f"{model_id!r} ({_size(nbytes)})" for nbytes, model_id in over[:MAX_SHOWN])
                more = f" and {len(over) - MAX_SHOWN} more" if len(over) > MAX_SHOWN else ""
                problems.append(
                    f"model(s) {shown}{more} over --max-model-bytes {_size(cap)} "
                    f"(start with --max-model-bytes {_suggested(over[0][0])} or more)"
                )
        if problems:
            raise RestoreBudgetError(
                "its models do not fit this server's limits: "
                + "; ".join(problems)
                + ". Nothing was loaded; the checkpoint is intact. Raise the limits named, or start from "
                "another checkpoint directory."
            )

    def owner_account(
        self, owner: str | None, model, principal_named: Callable[[str], Any] | None
    ) -> PrincipalAccount | None:
        """The restored model's claim on its owner's quotas (taken whatever they say), or None."""
        if not owner:
            return None
        principal = self._principals.get(owner)
        if principal is None:
            principal = principal_named(owner) if principal_named is not None else None
            if principal is None:  # no longer in the token file: charged under its name, default quotas
                principal = Principal(name=owner, role=READER, models=())
            self._principals[owner] = principal
        return self.limits.principals.claim_model(principal, model.model_id, force=True)

    def warn_over_quota(self, principal_named: Callable[[str], Any] | None = None) -> None:
        for name, principal in sorted(self._principals.items()):
            over = self.limits.principals.over_quota(principal)
            if over:
                log.warning(
                    "Principal %r holds more than its quotas after the restore: %s. Its models are kept; its new "
                    "models are refused until it deletes some (or its quotas are raised).",
                    name,
                    "; ".join(over),
                )


def check_checkpoint_fits(store, memory_capacity: int) -> None:
    """Refuse the newest checkpoint from its manifest alone when its arrays alone exceed ``--max-memory``
    (reading them would already take more than the server may hold)."""
    checkpoints = store.list()
    if not checkpoints:
        return
    path = checkpoints[-1].path
    try:
        data_bytes = int(store.describe(path)["data_bytes"])
    except FailedPreconditionError:
        return  # damaged: load_latest skips it, with a warning
    if data_bytes > memory_capacity:
        raise RestoreBudgetError(
            f"Cannot restore checkpoint {path}: its arrays alone are {_size(data_bytes)}, over --max-memory "
            f"{_size(memory_capacity)}. Nothing was loaded; the checkpoint is intact. Start with --max-memory "
            f"{_suggested(data_bytes)} or more, or from another checkpoint directory."
        )
