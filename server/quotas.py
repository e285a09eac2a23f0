"""Quotas per principal: how many models, and how many bytes of state, each caller may hold.

With ``--auth-tokens`` every model is owned by the principal whose CreateModel
created it (joining an existing model takes nothing). A principal's models and
their state count against its quotas: ``max_models=`` / ``max_memory=`` on its
line of the token file, else ``--max-models-per-principal`` /
``--max-memory-per-principal`` (no flag: no quota beyond the server-wide limits).
They are taken with the same reserve-before-receive mechanism as ``--max-memory``
(``optserve.server.limits.Reservation``): a model slot when the spec arrives,
each variable's state when its first chunk (its shape) arrives, and refused
with RESOURCE_EXHAUSTED naming the principal, the quota, its use and what helps.
Both come back when the model is deleted or expires.

Without ``--auth-tokens`` there are no principals: only the server-wide limits apply.
"""

from __future__ import annotations

import dataclasses

from optserve.server.errors import ResourceExhaustedError

UNLIMITED = None


@dataclasses.dataclass
class PrincipalUse:
    """What one principal holds now: models (created or being created) and their reserved state."""

    models: int = 0
    state_bytes: int = 0


class PrincipalAccount:
    """One model's claim on its owner's quotas: a model slot and the state bytes reserved for it.

    Made by ``PrincipalQuotas.claim_model``; ``release()`` gives everything back (idempotent).
    """

    def __init__(self, quotas: PrincipalQuotas, name: str, max_memory: int | None, source: str):
        self._quotas = quotas
        self.name = name
        self.max_memory = max_memory
        self.memory_source = source
        self.nbytes = 0
        self._released = False

    @property
    def use(self) -> PrincipalUse:
        return self._quotas.use_of(self.name)

    def check_bytes(self, nbytes: int, what: str) -> None:
        use = self.use
        if self.max_memory is not None and use.state_bytes + nbytes > self.max_memory:
            raise ResourceExhaustedError(
                f"{what} would take principal {self.name!r} past its memory quota of {self.max_memory} bytes "
                f"({self.memory_source}): it holds {use.state_bytes} bytes of state (this model's so far included) "
                f"and {nbytes} more are needed. Delete one of its models (DeleteModel), or have the operator "
                f"raise {self.memory_source}.",
                details=_details(self.name, "max_memory", use.state_bytes, self.max_memory),
            )

    def add_bytes(self, nbytes: int) -> None:
        if self._released:
            return
        self.nbytes += nbytes
        self.use.state_bytes += nbytes

    def give_bytes(self, nbytes: int) -> None:
        nbytes = min(nbytes, self.nbytes)
        self.nbytes -= nbytes
        use = self.use
        use.state_bytes = max(0, use.state_bytes - nbytes)

    def release(self) -> None:
        if self._released:
            return
        self.give_bytes(self.nbytes)
        self._released = True
        self._quotas.model_released(self.name)


class PrincipalQuotas:
    """Every principal's use, and the quotas that bound it (event loop only)."""

    def __init__(self, max_models: int | None = None, max_memory: int | None = None):
        self.default_max_models = max_models
        self.default_max_memory = max_memory
        self._use: dict[str, PrincipalUse] = {}

    @property
    def configured(self) -> bool:
        return self.default_max_models is not None or self.default_max_memory is not None

    def use_of(self, name: str) -> PrincipalUse:
        use = self._use.get(name)
        if use is None:
            use = self._use[name] = PrincipalUse()
        return use

    def usage(self) -> dict[str, PrincipalUse]:
        """Principal name -> its use, for principals holding anything."""
        return {name: dataclasses.replace(use) for name, use in sorted(self._use.items()) if use.models}

    def quotas_of(self, principal) -> tuple[tuple[int | None, str], tuple[int | None, str]]:
        """((max models, where it is set), (max memory, where it is set)) of ``principal``."""
        models = _quota(principal.max_models, self.default_max_models, "max_models", "--max-models-per-principal")
        memory = _quota(principal.max_memory, self.default_max_memory, "max_memory", "--max-memory-per-principal")
        return models, memory

    def claim_model(self, principal, model_id: str, *, force: bool = False) -> PrincipalAccount:
        """A model slot of ``principal`` for ``model_id``, or RESOURCE_EXHAUSTED (``force``: regardless)."""
        (max_models, models_source), (max_memory, memory_source) = self.quotas_of(principal)
        use = self.use_of(principal.name)
        if not force and max_models is not None and use.models + 1 > max_models:
            raise ResourceExhaustedError(
                f"Principal {principal.name!r} holds {use.models} model(s), its quota is {max_models} "
                f"({models_source}): model {model_id!r} would be one more. Delete one of its models "
                f"(DeleteModel), or have the operator raise {models_source}.",
                details=_details(principal.name, "max_models", use.models, max_models),
            )
        use.models += 1
        return PrincipalAccount(self, principal.name, max_memory, memory_source)

    def model_released(self, name: str) -> None:
        use = self.use_of(name)
        use.models = max(0, use.models - 1)
        if not use.models and not use.state_bytes:
            self._use.pop(name, None)

    def over_quota(self, principal) -> list[str]:
        """What ``principal`` holds beyond its quotas (after a restore, or a lowered quota)."""
        (max_models, models_source), (max_memory, memory_source) = self.quotas_of(principal)
        use = self._use.get(principal.name, PrincipalUse())
        found = []
        if max_models is not None and use.models > max_models:
            found.append(f"{use.models} models, quota {max_models} ({models_source})")
        if max_memory is not None and use.state_bytes > max_memory:
            found.append(f"{use.state_bytes} bytes of state, quota {max_memory} ({memory_source})")
        return found


def _quota(own: int | None, default: int | None, field: str, flag: str) -> tuple[int | None, str]:
    if own is not None:
        return (None if own < 0 else own), f"{field}= on its line of the token file"
    return default, flag


def _details(principal: str, quota: str, used: int, limit: int) -> dict[str, str]:
    return {"principal": principal, "quota": quota, "quota-used": str(used), "quota-limit": str(limit)}
