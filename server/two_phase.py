"""Two-phase steps: a shard of a sharded model holds an update until it knows the global norm.

Keras's ``global_clipnorm`` scales every gradient by ``clip / max(norm, clip)`` where
``norm`` is taken over the gradients of *all* variables, after the loss-scale division
and, under gradient accumulation, of the accumulated mean. A server holding only some
of a model's variables cannot take it alone, so a push that asks for it
(``hold_for_joint_norm``) goes in two phases:

1. The push (in SYNC mode: the summed pushes of every worker) is validated and kept,
   not applied. The server answers with its *terms*: one sum of squares per variable
   with a gradient, in that variable's dtype, of the gradient exactly as the clip stage
   would see it (computed with the same kernels, into scratch buffers: no state changes).
2. ``CommitStep`` brings the terms of every shard joined in the whole model's variable
   order. The server checks that its own terms are among them, bit for bit, and applies
   the held update with the norm taken as one server takes it (the terms stacked in
   their common dtype and summed), so sharded results equal one server's.

An update that needs no norm (no ``global_clipnorm``, or a gradient accumulation step
that only accumulates) is applied at once, as without the flag. A held step that gets
no commit within ``sync_timeout_s`` is dropped (nothing of it was applied; pushing the
step again holds it again with the same terms), as it is when ``SetWeights`` changes the
state in between. Applied steps remember their terms, so a repeated push or commit is
answered the same way, which lets a client finish a step that reached only some shards.
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import logging
import math
import struct
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from optserve.server.errors import FailedPreconditionError, InvalidArgumentError
from optserve.server.optimizers.gradient_stages import (
    ACCUMULATED_MEAN,
    ACCUMULATED_MEAN_UNSCALED,
    ACCUMULATOR_SLOT,
    UNSCALE,
)

log = logging.getLogger(__name__)

SUPPORTED_TERM_DTYPES = (np.dtype(np.float32), np.dtype(np.float64))
# Applied steps whose terms are remembered, for repeated pushes and commits.
REMEMBERED_TERMS = 256


@dataclasses.dataclass(frozen=True)
class NormTerm:
    """The sum of squares of one variable's gradient, in the variable's dtype (carried as a double)."""

    name: str
    dtype: np.dtype
    sum_squares: float

    def same_as(self, other: NormTerm) -> bool:
        # Bit for bit: a NaN term equals itself, 0.0 and -0.0 differ.
        return (
            self.name == other.name
            and self.dtype == other.dtype
            and struct.pack("<d", self.sum_squares) == struct.pack("<d", other.sum_squares)
        )


@dataclasses.dataclass(frozen=True)
class JointNorm:
    """What a push asking for a joint norm is answered with: this server's terms."""

    terms: tuple[NormTerm, ...]
    held: bool  # True: waiting for CommitStep; False: applied already (a repeat)


# --------------------------------------------------------------------------- engine side


def clips_by_global_norm(engine) -> bool:
    config = getattr(engine, "_config", None)
    return isinstance(config, dict) and config.get("global_clipnorm") is not None


def norm_terms(engine, gradients: Mapping[str, Any]) -> tuple[NormTerm, ...] | None:
    """The terms the next ``engine.apply(gradients)`` would sum; None when it clips by no norm.

    Runs the same kernels as the apply on scratch buffers (copies of the accumulators
    under gradient accumulation), so the terms are bit for bit those of the apply and
    nothing of the engine changes.
    """
    config = engine._config
    if config.get("global_clipnorm") is None:
        return None
    steps = config["gradient_accumulation_steps"]
    if steps and (engine._raw_iterations + 1) % steps != 0:
        return None  # this apply only accumulates: it clips nothing
    backend = engine._backend
    scale = engine._loss_scale()
    terms = []
    for variable, grad in engine._validated_gradients(gradients, allow_empty=True):
        if steps:
            prepared = backend.full(variable.shape, 0, variable.dtype)
            backend.copy_into(prepared, variable.slots[ACCUMULATOR_SLOT])
            arrays = {"grad": grad, "accumulator": prepared}
            if scale is None:
                backend.run(ACCUMULATED_MEAN, arrays, {"steps": steps})
            else:
                backend.run(ACCUMULATED_MEAN_UNSCALED, arrays, {"steps": steps, "loss_scale": scale})
        elif scale is not None:
            prepared = variable.scratch  # overwritten by the apply's own unscaling before it is read
            backend.run(UNSCALE, {"grad": grad, "out": prepared}, {"loss_scale": scale})
        else:
            prepared = grad
        with np.errstate(all="ignore"):
            value = float(variable.dtype.type(backend.sum_squares(prepared)))
        terms.append(NormTerm(variable.name, variable.dtype, value))
    return tuple(terms)


def apply_with_joint_norm(engine, gradients: Mapping[str, Any], joint: Sequence[NormTerm]) -> None:
    """``engine.apply(gradients)`` with the global norm taken over ``joint`` instead of the local gradients."""
    dtype = np.result_type(*(term.dtype for term in joint)).type if joint else np.float32
    engine.joint_norm_terms = (dtype, [term.sum_squares for term in joint])
    try:
        engine.apply(gradients, count_empty_step=True)
    finally:
        engine.joint_norm_terms = None


def non_finite_terms(joint: Sequence[NormTerm]) -> tuple[str, ...]:
    """Variables whose gradient was not finite (somewhere on the model's shards), as its term shows."""
    return tuple(term.name for term in joint if not math.isfinite(term.sum_squares))


def check_joint_terms(model_id: str, step: int, own: Sequence[NormTerm], joint: Sequence[NormTerm]) -> None:
    """The joint terms are well-formed and hold this server's own terms exactly."""
    if not joint:
        raise InvalidArgumentError(
            f"CommitStep for step {step} of model {model_id!r} carries no terms; send the terms of every "
            "shard, joined in the model's variable order."
        )
    names = [term.name for term in joint]
    repeated = sorted({name for name in names if names.count(name) > 1})
    if repeated:
        raise InvalidArgumentError(
            f"CommitStep for step {step} of model {model_id!r} names variables {repeated} more than once."
        )
    by_name = {term.name: term for term in joint}
    for term in own:
        sent = by_name.get(term.name)
        if sent is None or not sent.same_as(term):
            got = "none" if sent is None else f"{sent.sum_squares!r} ({sent.dtype.name})"
            raise InvalidArgumentError(
                f"CommitStep for step {step} of model {model_id!r} does not carry this server's term for "
                f"{term.name!r}: it computed {term.sum_squares!r} ({term.dtype.name}), the commit has {got}. "
                "Send the terms the servers answered this step's push with; nothing was applied."
            )


def terms_from_messages(messages, dtype_of) -> tuple[NormTerm, ...]:
    """Decoded request terms (``dtype_of`` maps a wire dtype to a NumPy dtype, or raises)."""
    terms = []
    for message in messages:
        if not message.name:
            raise InvalidArgumentError("Every NormTerm needs the `name` of its variable.")
        dtype = np.dtype(dtype_of(message.dtype))
        if dtype not in SUPPORTED_TERM_DTYPES:
            raise InvalidArgumentError(
                f"NormTerm {message.name!r} has dtype {dtype.name}; the terms are float32 or float64."
            )
        terms.append(NormTerm(message.name, dtype, float(message.sum_squares)))
    return tuple(terms)


# --------------------------------------------------------------------------- model side


@dataclasses.dataclass
class _Held:
    step: int
    worker: int | None  # None in SYNC mode: the step of every worker
    gradients: Mapping[str, Any]
    contributors: tuple[int, ...]
    missing: tuple[int, ...]
    aggregated: bool
    return_variables: bool
    terms: tuple[NormTerm, ...]
    version: int
    timer: asyncio.TimerHandle | None = None


class TwoPhaseSteps:
    """The held updates of one model and the terms of its recent two-phase steps.

    A collaborator of ``optserve.server.model.Model``: every method runs on the model's
    event loop, those that change state while the caller holds the model lock.
    """

    def __init__(self, model):
        self._model = model
        self._held: dict[int | None, _Held] = {}  # key: None (SYNC) or the worker (ASYNC)
        self._applied: collections.OrderedDict[tuple, tuple[tuple[NormTerm, ...], tuple[NormTerm, ...]]] = (
            collections.OrderedDict()
        )
        self._version = 0  # counts changes of state: a held SYNC step is void after one

    @property
    def _sync(self) -> bool:
        return self._model.spec.mode != "async"

    def _key(self, worker: int) -> int | None:
        return None if self._sync else worker

    def state_changed(self) -> None:
        self._version += 1

    def held_description(self) -> str | None:
        if not self._held:
            return None
        steps = sorted(held.step for held in self._held.values())
        return f"step(s) {steps} wait for their global norm (CommitStep)"

    async def hold(self, step, worker, gradients, contributors, missing, aggregated, return_variables):
        """Hold this update when it clips by a global norm: the answer to the push, or None to apply now."""
        model = self._model
        engine = model._engine
        if clips_by_global_norm(getattr(engine, "inner_optimizer", None)):
            raise FailedPreconditionError(
                f"Model {model.model_id!r} is a LossScaleOptimizer whose optimizer clips by global_clipnorm: its "
                "skipped steps and the norm would both need every shard. Run it on one server."
            )
        if not clips_by_global_norm(engine):
            return None
        if not self._sync and engine._config["gradient_accumulation_steps"]:
            raise FailedPreconditionError(
                f"Model {model.model_id!r} is ASYNC with gradient_accumulation_steps: which push ends an "
                "accumulation cycle depends on arrival order, so a joint global norm cannot be taken across "
                "shards. Use mode SYNC, or one server."
            )
        terms = await model._run(norm_terms, engine, gradients)
        if terms is None:
            return None
        key = None if self._sync else worker
        self._drop(key, "the worker pushed again")
        held = _Held(step, key, gradients, tuple(contributors), tuple(missing), aggregated, return_variables, terms, 0)
        held.version = self._version
        timeout = model.spec.sync_timeout_s
        if math.isfinite(timeout):
            held.timer = asyncio.get_running_loop().call_later(timeout, self._on_timeout, held)
        self._held[key] = held
        return self._answer(held, duplicate=False)

    def answer_push(self, worker: int, step: int):
        """A push for a held step is answered with its terms again (nothing more is taken)."""
        held = self._held.get(self._key(worker))
        if held is None or held.step != step:
            return None
        return self._answer(held, duplicate=True)

    def applied_norm(self, worker: int, step: int) -> JointNorm | None:
        """The terms an applied two-phase step had (for a repeated push of it)."""
        remembered = self._applied.get((self._key(worker), step))
        return None if remembered is None else JointNorm(remembered[0], held=False)

    def _answer(self, held: _Held, duplicate: bool):
        outcome = self._model._outcome(held.contributors, held.missing, None, duplicate=duplicate)
        return outcome.replaced(joint_norm=JointNorm(held.terms, held=True))

    async def commit(self, worker: int, step: int, joint: tuple[NormTerm, ...], return_variables: bool):
        """Holding the model lock: apply the held step with the joint terms (or answer a repeat)."""
        model = self._model
        model._ensure_open()
        key = self._key(worker)
        if self._sync and step > model.step:
            raise model._future_step_error(worker, step)
        held = self._held.get(key)
        if held is None or held.step != step:
            return await self._answer_applied(worker, step, joint, return_variables)
        if self._sync and held.version != self._version:
            self._drop(key, "the model's state changed")
            raise FailedPreconditionError(
                f"Step {step} of model {model.model_id!r} was held for its global norm, but the model's state "
                f"changed since (SetWeights); nothing was applied. Push step {step} again.",
                details={"current_step": model.step},
            )
        check_joint_terms(model.model_id, step, held.terms, joint)
        self._drop(key, None)
        outcome = await model._apply_step(
            step,
            held.gradients,
            held.contributors,
            held.missing,
            held.aggregated,
            return_variables or held.return_variables,
            joint=joint,
        )
        if not self._sync:
            model._count_async_push(worker, step)
        self._applied[(key, step)] = (held.terms, joint)
        while len(self._applied) > REMEMBERED_TERMS:
            self._applied.popitem(last=False)
        return outcome.replaced(joint_norm=JointNorm(held.terms, held=False))

    async def _answer_applied(self, worker, step, joint, return_variables):
        model = self._model
        remembered = self._applied.get((self._key(worker), step))
        if remembered is None:
            raise FailedPreconditionError(
                f"Worker {worker}'s CommitStep names step {step} of model {model.model_id!r}, which is not held for "
                "its global norm: it was not pushed with hold_for_joint_norm, or it was dropped (no commit within "
                f"sync_timeout_s, or SetWeights changed the state). Nothing was applied; push step {step} again.",
                details={"current_step": model.step},
            )
        own, applied_joint = remembered
        if len(applied_joint) != len(joint) or not all(a.same_as(b) for a, b in zip(applied_joint, joint)):
            raise FailedPreconditionError(
                f"Step {step} of model {model.model_id!r} was applied with other global norm terms than this "
                "CommitStep carries; every worker must commit the terms the servers answered with.",
                details={"current_step": model.step},
            )
        variables = await model._reply_variables() if return_variables else None
        outcome = model._outcome((worker,), (), variables, duplicate=True)
        return outcome.replaced(joint_norm=JointNorm(own, held=False))

    def _on_timeout(self, held: _Held) -> None:
        held.timer = None

        async def expire():
            if self._held.get(held.worker) is held:
                self._drop(held.worker, f"no CommitStep within {self._model.spec.sync_timeout_s:g} s")

        task = asyncio.ensure_future(self._model._exclusive(expire))
        task.add_done_callback(lambda t: t.cancelled() or t.exception())

    def _drop(self, key, why: str | None) -> None:
        held = self._held.pop(key, None)
        if held is None:
            return
        if held.timer is not None:
            held.timer.cancel()
        if why is not None:
            log.warning(
                "model %r: held step %d dropped (%s); nothing of it was applied",
                self._model.model_id,
                held.step,
                why,
            )

    def close(self) -> None:
        for key in list(self._held):
            self._drop(key, None)
