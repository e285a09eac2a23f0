"""One training job: an optimizer engine, its variables and the step protocol.

SYNC mode keeps one merge buffer per step, as MXNet's ``dist_sync`` server does:
each worker's push for step k is validated on arrival and summed into the step's
accumulators (in arrival order); the push that completes the set of
``num_workers`` triggers exactly one optimizer update, and every waiting worker
is answered with the same result. A step that waits longer than its
``sync_timeout_s`` fails (FAIL) or applies what arrived (APPLY_PARTIAL).
ASYNC mode applies each push as it arrives; there ``step`` only names the push
(each worker numbers its own), while the model's step counts applied updates.
In both modes a push is identified by ``(worker, step)`` and a repeated push is
answered without being applied again, so clients can retry safely. A push without
any gradient is a step too (a shard of a sharded model whose variables got no
gradient): it counts as the worker's contribution and advances the counters.

``checkpoint_state`` / ``Model.restore`` carry everything across a restart: the
spec, the engine's state and the step bookkeeping (the current step and which
workers made up each recent step), so a push the checkpoint already counted is
answered as a duplicate after a restart, and a push for a step the restored model
has not reached yet is told the current step.

The engine is not thread-safe, and its updates run on an executor thread (NumPy
releases the GIL, so the event loop keeps answering other calls meanwhile). Every
change to a model happens while holding the model's asyncio lock, inside a task
that runs to completion even when the RPC that started it is cancelled: a client
hanging up can never leave a half-applied update or a lock held by nobody.
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import functools
import logging
import math
import time
from collections.abc import Callable, Mapping
from concurrent.futures import Executor
from typing import Any

import numpy as np

from optserve.protos.buffers import ArrayPool
from optserve.server import eager, text
from optserve.server.activity import ModelActivity, ModelEvents, update_norm
from optserve.server.activity import nbytes as _nbytes
from optserve.server.errors import (
    AbortedError,
    FailedPreconditionError,
    InvalidArgumentError,
    NotFoundError,
    OptserveError,
)
from optserve.server.finite import non_finite_names
from optserve.server.limits import (
    MAX_STEP,
    REASON_KEY,
    REASON_SYNC_TIMEOUT,
    REASON_WORKER_LOST,
    state_bytes,
    worker_list,
)
from optserve.server.model_access import MAX_LISTED_NAMES, ModelAccess, listed
from optserve.server.model_spec import (
    APPLY_PARTIAL,
    ASYNC,
    REJECT,
    SKIP_STEP,
    SYNC,
    ModelSpec,
    spec_from_state,
    spec_state,
)
from optserve.server.step_records import REMEMBERED_STEPS, PendingStep, RecentSteps, StepRecord, done_future
from optserve.server.two_phase import TwoPhaseSteps, apply_with_joint_norm, non_finite_terms
from optserve.server.usage import Activity

log = logging.getLogger(__name__)

INLINE_MODEL_BYTES = 64 * 1024

MODEL_STATE_FORMAT = "optserve.model_state/1"


# ------------------------------------------------------------------ results


@dataclasses.dataclass(frozen=True)
class StepOutcome:
    """What a push is answered with."""

    step: int  # the model's step after the update: the next step to push
    iterations: int
    learning_rate: float
    duplicate: bool
    contributors: tuple[int, ...]
    missing: tuple[int, ...] = ()  # workers left out of a step applied under APPLY_PARTIAL
    variables: dict | None = None  # {name: array} after the update, when asked for
    # A sync step's reply written into waiters' own shared-memory regions: {worker: {name: array}}.
    replies: Mapping[int, Mapping[str, np.ndarray]] = dataclasses.field(default_factory=dict, compare=False, repr=False)
    non_finite: tuple[str, ...] = ()  # skip_step: the step was skipped; these variables were not finite
    joint_norm: Any = None  # optserve.server.two_phase.JointNorm: a two-phase step's terms
    scalars: dict = dataclasses.field(default_factory=dict)  # the optimizer-wide scalars after the update
    # Shared by the outcomes of every waiter of one step (``replaced`` keeps it), so
    # work done once per step for the answer (encoding the variables) can be reused.
    memo: dict = dataclasses.field(default_factory=dict, compare=False, repr=False)

    def replaced(self, **changes: Any) -> StepOutcome:
        """``dataclasses.replace(self, **changes)`` at a fraction of its cost (it is on every push's
        path): the fields copied as they are, ``memo`` and ``replies`` shared, as replace shares them."""
        unknown = changes.keys() - self.__dict__.keys()
        if unknown:
            raise TypeError(f"StepOutcome has no field(s) {sorted(unknown)}")
        outcome = object.__new__(StepOutcome)
        outcome.__dict__.update(self.__dict__)
        outcome.__dict__.update(changes)
        return outcome


# -------------------------------------------------------------------- model


class Model(ModelAccess):
    """A training job: variables, optimizer state and the step protocol. Use on one event loop."""

    def __init__(self, spec: ModelSpec, engine, executor: Executor | None = None):
        self.spec = spec
        self._engine = engine
        self._executor = executor
        self._variables = {v.name: v for v in spec.variables}
        # The engine's work for a model this small runs on the event loop (microseconds); larger ones
        # go to the executor, so that the loop keeps serving other calls meanwhile.
        self._inline = sum(math.prod(v.shape) * v.dtype.itemsize for v in spec.variables) <= INLINE_MODEL_BYTES
        self._lock = asyncio.Lock()
        self._step = 0
        self._pending: PendingStep | None = None
        self._history: collections.OrderedDict[int, StepRecord] = collections.OrderedDict()
        self._recent_async: dict[int, RecentSteps] = {}
        self._closed: OptserveError | None = None
        # Who created the model, its last call, the calls in flight (optserve.server.usage).
        self.usage = Activity()
        # Told of every change of state (loop thread): the number of updates applied
        # (0 for other changes). The registry counts them for step-based checkpoints.
        self.on_change: Callable[[int], None] | None = None
        self.events = ModelEvents()
        self.activity = ModelActivity()
        # The registry's reservation of this model's state in the server's memory budget.
        self.memory: Any = None  # optserve.server.limits.Reservation, given by the registry
        self.two_phase = TwoPhaseSteps(self)  # updates held for a sharded model's global norm
        # Snapshots of the variables for step replies, reused once sent (no memory faulted in per step).
        self._snapshots = ArrayPool()

    @classmethod
    async def create(
        cls, spec: ModelSpec, engine, variables: Mapping[str, np.ndarray], executor: Executor | None = None
    ) -> Model:
        """Build the engine's slots and copy the initial variables, off the event loop."""
        loop = asyncio.get_running_loop()
        # The received arrays are fresh and owned: the engine keeps them instead of copying them.
        await loop.run_in_executor(executor, functools.partial(engine.build, dict(variables), adopt=True))
        return cls(spec, engine, executor)

    def state_bytes(self) -> int:
        """Bytes of this model's state: variables, slots and scratch, and a synchronous step's merge buffer."""
        workers = self.spec.num_workers if self.spec.mode == SYNC else 1
        return sum(
            state_bytes(
                math.prod(v.shape) * v.dtype.itemsize, self._engine.arrays_per_variable(v.name, v.shape), workers
            )
            for v in self.spec.variables
        )

    # ----------------------------------------------------------- properties

    @property
    def model_id(self) -> str:
        return self.spec.model_id

    @property
    def step(self) -> int:
        return self._step

    @property
    def closed(self) -> bool:
        return self._closed is not None

    def waiting_workers(self) -> tuple[int, ...]:
        return tuple(sorted(self._pending.contributors)) if self._pending else ()

    def gauges(self) -> dict[str, float]:
        """Current readings for monitoring; cheap, and safe to take from another thread."""
        pending = self._pending
        held = sum(
            math.prod(v.shape) * v.dtype.itemsize * (1 + len(self._engine.slot_names(v.name)))
            for v in self.spec.variables
        )
        return {
            "waiting": len(pending.contributors) if pending else 0,
            "lr": float(self._engine.current_learning_rate()),
            "iterations": int(self._engine.iterations),
            "step": self._step,
            "bytes": held,
        }

    def in_use_reason(self) -> str | None:
        """Why deleting the model now would fail work in progress; None when it is idle.

        A step holding pushes counts even when the workers that pushed it hung up:
        their gradients are in it, and they push the step again only to this model.
        """
        reasons = []
        if self._pending is not None:
            reasons.append(
                f"workers {sorted(self._pending.contributors)} pushed step {self._pending.step} and wait for the others"
            )
        held = self.two_phase.held_description()
        if held:
            reasons.append(held)
        calls = self.usage.calls_in_flight
        if calls:
            reasons.append(f"{calls} call{'s' if calls != 1 else ''} in flight")
        return "; ".join(reasons) or None

    # ------------------------------------------------------------- pushes

    def check_push_header(self, worker: int, step: int) -> None:
        """Cheap checks that need no gradients; lets a bad push fail before its payload is read."""
        self._ensure_open()
        if not 0 <= worker < self.spec.num_workers:
            raise InvalidArgumentError(
                f"`worker_index` must be in [0, {self.spec.num_workers}) for model {self.model_id!r} "
                f"(num_workers={self.spec.num_workers}). Received: worker_index={worker}"
            )
        if step < 0:
            raise InvalidArgumentError(f"`step` must be >= 0. Received: step={step}")
        if self.spec.mode == SYNC and step > self._step:
            raise self._future_step_error(worker, step)

    def check_gradient_chunk(self, name: str, slot: str, dtype: np.dtype, shape: tuple, nbytes: int) -> None:
        """A gradient's first chunk, checked before the gradient is received or allocated."""
        var = self._variables.get(name)
        if slot:
            raise InvalidArgumentError(
                f"Gradient tensors must have an empty slot; received slot tensor {name[:100] + '/' + slot[:100]!r}."
            )
        if var is None:
            raise NotFoundError(
                f"Model {self.model_id!r} has no variable {name[:200]!r}; its variables are {listed(self._variables)}."
            )
        if shape != var.shape or dtype != var.dtype:
            raise InvalidArgumentError(
                f"Gradient for {name!r} has {text.tensor(shape, dtype)}, but the variable has {var.describe()}; "
                "send gradients of the variable's shape and dtype."
            )

    def check_weight_chunk(self, name: str, slot: str, dtype: np.dtype, shape: tuple, nbytes: int) -> None:
        """A SetWeights tensor's first chunk, checked before it is received or allocated."""
        var = self._variables.get(name)
        if var is None:
            raise NotFoundError(
                f"Model {self.model_id!r} has no variable {name[:200]!r}; its variables are {listed(self._variables)}."
            )
        if slot and slot not in self._engine.slot_names(name):
            raise NotFoundError(
                f"Variable {name!r} of model {self.model_id!r} has no slot {slot[:100]!r}; its slots are "
                f"{list(self._engine.slot_names(name)) or 'none'} (slot '' is the variable itself)."
            )
        if not slot and (shape != var.shape or dtype != var.dtype):
            raise InvalidArgumentError(
                f"New value for {name!r} has {text.tensor(shape, dtype)}, but the variable has {var.describe()}."
            )

    def worker_lost(self, worker: int, step: int) -> None:
        """A worker's push stream broke off before its push was complete (loop thread).

        Nothing of the push was taken. When other workers already wait in that step, it
        cannot complete without this worker's push, so it ends now as its timeout policy
        says instead of after sync_timeout_s. A worker whose push was received and who hangs
        up afterwards is not lost: its contribution stands.
        """
        pending = self._pending
        log.warning(
            "model %r: worker %d's push for step %d broke off before it was complete; it was discarded",
            self.model_id,
            worker,
            step,
        )
        if self.spec.mode != SYNC or pending is None or pending.step != step or worker in pending.contributors:
            return
        task = asyncio.ensure_future(self._exclusive(lambda: self._expire(pending, lost_worker=worker)))
        task.add_done_callback(_log_failure)

    async def push(
        self,
        worker: int,
        step: int,
        gradients: Mapping[str, np.ndarray],
        *,
        aggregated: bool = False,
        return_variables: bool = False,
        hold_for_joint_norm: bool = False,
        reply_into: Mapping[str, np.ndarray] | None = None,
        non_finite: list[str] | None = None,
    ) -> StepOutcome:
        """Contribute one worker's gradients for ``step``; returns once the step is applied.

        Takes ownership of the gradient arrays (a sync step sums into them in place).
        ``hold_for_joint_norm``: see optserve.server.two_phase (answered held, applied by ``commit``).
        ``reply_into``: arrays (a worker's shared-memory value region) that a reply for this push
        alone is written into, in place of a snapshot; the outcome's variables are then those arrays.
        ``non_finite``: the names of the gradients holding NaN or infinity, when the transport
        already checked them as they arrived (the data plane); None: they are checked here.
        """
        self.check_push_header(worker, step)
        self.check_gradients(gradients)
        if self.spec.non_finite_policy == REJECT and gradients:
            if non_finite is None:
                # Off the event loop, and outside the lock: pushes of one step are checked in parallel.
                non_finite = await self._run(non_finite_names, gradients, self._executor)
            self._refuse_non_finite(worker, step, non_finite)
        started = time.perf_counter()
        try:
            return await self._push(
                worker, step, gradients, aggregated, return_variables, hold_for_joint_norm, reply_into
            )
        finally:
            self.activity.pushed(time.perf_counter() - started)

    async def _push(
        self, worker, step, gradients, aggregated, return_variables, hold=False, reply_into=None
    ) -> StepOutcome:
        payload = _nbytes(gradients.values())
        if self.spec.mode == ASYNC:
            outcome = await self._exclusive(
                lambda: self._push_async(worker, step, gradients, return_variables, hold, reply_into)
            )
            self.events.pushed(payload, outcome.duplicate)
            self.events.sent(_nbytes((outcome.variables or {}).values()))
            return outcome
        future, duplicate = await self._exclusive(
            lambda: self._push_sync(worker, step, gradients, aggregated, return_variables, hold, reply_into)
        )
        self.events.pushed(payload, duplicate)
        waiting_since = time.perf_counter()
        try:
            # Shielded: one waiter hanging up must not cancel the result the others wait for.
            outcome = await asyncio.shield(future)
        finally:
            if not duplicate:
                self.events.waited(time.perf_counter() - waiting_since)
        variables = None
        if return_variables:
            region = outcome.replies.get(worker)
            variables = region if region is not None and region is reply_into else outcome.variables
        self.events.sent(_nbytes((variables or {}).values()))
        return outcome.replaced(duplicate=duplicate, variables=variables)

    def _refuse_non_finite(self, worker: int, step: int, names: list[str]) -> None:
        if names:
            raise InvalidArgumentError(
                f"Worker {worker}'s push for step {step} of model {self.model_id!r} holds NaN or infinite values "
                f"in {listed(names)}; nothing of it was applied. Push finite gradients for step {step} (a lower "
                "learning rate or loss scaling may help), or create the model with non_finite_policy "
                "skip_step (skip such steps) or allow.",
                details={"worker": worker, "non_finite_variables": ",".join(names[:MAX_LISTED_NAMES])},
            )

    def check_gradients(self, gradients: Mapping[str, np.ndarray]) -> None:
        """Validate a whole push before any of it touches a buffer or the engine.

        No gradient at all is valid: a step in which no variable of this model got a
        gradient (a shard of a sharded model), so that its counters stay with the others'.
        """
        unknown = [name for name in gradients if name not in self._variables]
        if unknown:
            raise NotFoundError(
                f"Model {self.model_id!r} has no variable {listed(unknown)}; "
                f"its variables are {listed(self._variables)}."
            )
        for name, gradient in gradients.items():
            var = self._variables[name]
            if tuple(gradient.shape) != var.shape or gradient.dtype != var.dtype:
                raise InvalidArgumentError(
                    f"Gradient for {name!r} has {text.tensor(gradient.shape, gradient.dtype)}, "
                    f"but the variable has {var.describe()}; send gradients of the variable's shape and dtype."
                )

    async def _push_sync(self, worker, step, gradients, aggregated, return_variables, hold=False, reply_into=None):
        """Holding the lock: answer, merge or apply one push. Returns (future of the outcome, duplicate)."""
        self._ensure_open()
        if step < self._step:
            return await self._answer_completed_step(worker, step, return_variables, reply_into), True
        if step > self._step:
            raise self._future_step_error(worker, step)
        held = self.two_phase.answer_push(worker, step)
        if held is not None:
            return done_future(held), True
        pending = self._pending
        if pending is not None and pending.contributors and pending.hold != hold:
            raise FailedPreconditionError(
                f"Worker {worker}'s push for step {step} {'asks' if hold else 'does not ask'} to hold for the joint "
                "norm, unlike the pushes already in the step; every worker of a sharded model must push the same "
                "way (use the same client).",
                details={"current_step": self._step},
            )
        if pending is not None and worker in pending.contributors:
            pending.return_variables |= return_variables
            if return_variables:
                pending.add_reply_region(worker, reply_into)
            return pending.future, True
        if aggregated or (pending is None and self.spec.num_workers == 1):
            if pending is not None:
                raise FailedPreconditionError(
                    f"Worker {worker} pushed aggregated gradients for step {step}, but workers "
                    f"{sorted(pending.contributors)} already pushed per-worker gradients for it; every worker "
                    "of a model must push the same way (aggregated or not).",
                    details={"current_step": self._step},
                )
            outcome = await self._apply_step(
                step, gradients, (worker,), (), aggregated, return_variables, hold=hold, reply_into=reply_into
            )
            return done_future(outcome), False
        if pending is None:
            pending = self._open_step(step)
            pending.hold = hold
        addends = None
        if len(pending.contributors) == self.spec.num_workers - 1 and self._sums_in_update(hold):
            # The step's last push: the update adds its gradients to the others' sum as it reads
            # them, a pass over memory less than summing first (the same bits).
            addends = gradients
        else:
            try:
                await self._run(pending.accumulate, gradients, self._engine.add_host_arrays)
            except BaseException as exc:
                # A half-summed buffer is useless: end the step for everyone, apply nothing.
                self._pending = None
                pending.fail(exc)
                raise
            if pending is not self._pending:
                # The model was closed (shutdown, delete) while this push was being summed: the
                # step has failed for every waiter and nothing of it may be applied any more.
                return pending.future, False
        pending.contributors.append(worker)
        pending.return_variables |= return_variables
        if return_variables:
            pending.add_reply_region(worker, reply_into)
        if len(pending.contributors) == self.spec.num_workers:
            await self._complete(pending, missing=(), addends=addends)
        return pending.future, False

    def _sums_in_update(self, hold: bool) -> bool:
        """Whether a sync step's last push may be summed by the update itself: not when the sum is
        looked at first (for the joint norm of a held step, or for non-finite values to skip)."""
        return not hold and self.spec.non_finite_policy != SKIP_STEP

    async def _push_async(self, worker, step, gradients, return_variables, hold=False, reply_into=None) -> StepOutcome:
        self._ensure_open()
        recent = self._recent_async.setdefault(worker, RecentSteps())
        if step in recent:
            variables = await self._reply_variables(reply_into) if return_variables else None
            outcome = self._outcome((worker,), (), variables, duplicate=True)
            return outcome.replaced(joint_norm=self.two_phase.applied_norm(worker, step))
        held = self.two_phase.answer_push(worker, step)
        if held is not None:
            return held
        outcome = await self._apply_step(
            step, gradients, (worker,), (), False, return_variables, hold=hold, reply_into=reply_into
        )
        if outcome.joint_norm is None:
            recent.add(step)
        return outcome

    def _count_async_push(self, worker: int, step: int) -> None:
        """An ASYNC push applied by its commit (optserve.server.two_phase) counts as seen."""
        self._recent_async.setdefault(worker, RecentSteps()).add(step)

    async def commit(self, worker: int, step: int, joint, return_variables: bool = False) -> StepOutcome:
        """The second phase of a held step: apply it with ``joint``, every shard's norm terms."""
        self.check_push_header(worker, step)
        return await self._exclusive(lambda: self.two_phase.commit(worker, step, tuple(joint), return_variables))

    async def _apply_step(
        self,
        step,
        gradients,
        contributors,
        missing,
        aggregated,
        return_variables,
        hold=False,
        joint=None,
        reply_into=None,
        waiting: PendingStep | None = None,
        addends=None,
    ) -> StepOutcome:
        """``waiting``: a sync step's merge buffer, whose waiters' reply regions get the new values;
        ``addends``: its last push's gradients, which the update adds to ``gradients``."""
        allocators = self._reply_allocators(return_variables, reply_into, waiting)
        written = None
        if hold:
            held = await self.two_phase.hold(
                step, contributors[0], gradients, contributors, missing, aggregated, return_variables
            )
            if held is not None:
                return held
        skipped: tuple[str, ...] = ()
        if self.spec.non_finite_policy == SKIP_STEP and gradients:
            skipped = tuple(await self._run(non_finite_names, gradients))
        if self.spec.non_finite_policy == SKIP_STEP and joint and not skipped:
            skipped = non_finite_terms(joint)  # another shard's gradient was not finite: skip everywhere
        if skipped:
            log.warning("model %r step %d skipped: non-finite gradients in %s", self.model_id, step, listed(skipped))
        else:
            # Gradients for none of the variables (every push of the step was empty) still make a step.
            before = await self._read_all_variables() if self.activity.tracking else None
            started = time.perf_counter()
            if joint is None:
                apply = functools.partial(
                    self._engine.apply, count_empty_step=True, reply_into=allocators, addends=addends
                )
                written = await self._run(apply, dict(gradients))
            else:
                await self._run(apply_with_joint_norm, self._engine, dict(gradients), joint)
            self.events.applied(time.perf_counter() - started, partial=bool(missing))
            if before is not None:
                self.activity.update_norm = await self._run(update_norm, before, await self._read_all_variables())
        self._step += 1
        self._remember(step, StepRecord(tuple(sorted(contributors)), tuple(missing), aggregated))
        self._notify(applied=0 if skipped else 1)
        if allocators is not None and written is None:
            written = await self._run(self._engine.read_variables_into_each, allocators)
        variables, replies = _replies(written, waiting)
        outcome = self._outcome(contributors, missing, variables)
        return outcome.replaced(non_finite=skipped, replies=replies)

    def _reply_allocators(self, return_variables: bool, reply_into, waiting: PendingStep | None) -> list | None:
        """Where a step's new values go, if its reply carries them: each sync waiter's own region
        (and a snapshot for waiters without one), the push's region, or else a snapshot."""
        if not return_variables:
            return None
        if waiting is not None and waiting.reply_regions:
            allocators = [_into(region) for region in waiting.reply_regions.values()]
            return allocators + [self._allocate_snapshot] if waiting.needs_snapshot else allocators
        return [_into(reply_into) if reply_into is not None else self._allocate_snapshot]

    def _open_step(self, step: int) -> PendingStep:
        loop = asyncio.get_running_loop()
        pending = self._pending = PendingStep(step, loop)
        timeout = self.spec.sync_timeout_s
        if math.isfinite(timeout):
            pending.timer = loop.call_later(timeout, self._on_timeout, pending)
        return pending

    async def _complete(self, pending: PendingStep, missing: tuple[int, ...], addends=None) -> None:
        """Holding the lock: apply the merged step once (``addends``: the last push's gradients, not
        yet in the sum) and answer every waiter."""
        pending.cancel_timer()
        self._pending = None
        try:
            outcome = await self._apply_step(
                pending.step,
                pending.sums,
                pending.contributors,
                missing,
                False,
                pending.return_variables,
                pending.hold,
                waiting=pending,
                addends=addends,
            )
        except BaseException as exc:
            pending.fail(exc)
            return
        if not pending.future.done():
            pending.future.set_result(outcome)

    def _on_timeout(self, pending: PendingStep) -> None:
        pending.timer = None
        task = asyncio.ensure_future(self._exclusive(lambda: self._expire(pending)))
        task.add_done_callback(_log_failure)

    async def _expire(self, pending: PendingStep, lost_worker: int | None = None) -> None:
        """End a step that timed out, or lost ``lost_worker``, as the model's timeout policy says."""
        if self._pending is not pending:
            return  # the step completed (or the model closed) while the timer fired
        missing = pending.missing(self.spec.num_workers)
        arrived = worker_list(pending.contributors)
        timeout = self.spec.sync_timeout_s
        self.events.timed_out()
        why = f"after {timeout:.3g} s" if lost_worker is None else f"after worker {lost_worker}'s push broke off"
        if self.spec.timeout_policy == APPLY_PARTIAL:
            log.warning(
                "model %r step %d: applying the pushes of workers %s %s; missing workers %s",
                self.model_id,
                pending.step,
                arrived,
                why,
                worker_list(missing),
            )
            await self._complete(pending, missing)
            return
        log.warning(
            "model %r step %d ended %s; missing workers %s", self.model_id, pending.step, why, worker_list(missing)
        )
        self._pending = None
        if lost_worker is None:
            what = (
                f"Step {pending.step} of model {self.model_id!r} timed out after {timeout:g} s waiting for "
                f"workers [{worker_list(missing)}] (workers [{arrived}] pushed)"
            )
            hint = (
                "raise the model's sync_timeout_s (or the server's --sync-timeout), or create the model "
                "with timeout_policy APPLY_PARTIAL."
            )
            reason = REASON_SYNC_TIMEOUT
        else:
            what = (
                f"Step {pending.step} of model {self.model_id!r} ended because worker {lost_worker}'s push "
                f"broke off (its connection closed or stalled) while workers [{arrived}] waited"
            )
            hint = f"worker {lost_worker} (or its replacement) pushes step {pending.step} too."
            reason = REASON_WORKER_LOST
        pending.fail(
            AbortedError(
                f"{what}; nothing was applied. Push step {pending.step} again once every worker is running; {hint}",
                details={"current_step": self._step, "missing_workers": worker_list(missing), REASON_KEY: reason},
            )
        )

    async def _answer_completed_step(self, worker, step, return_variables, reply_into=None) -> asyncio.Future:
        record = self._history.get(step)
        if record is None or not record.covers(worker):
            why = (
                f"was completed without it (contributors {list(record.contributors)})"
                if record
                else "is already complete"
            )
            raise FailedPreconditionError(
                f"Worker {worker} pushed step {step} of model {self.model_id!r}, but step {step} {why}; "
                f"the current step is {self._step}. Pull the variables and push step {self._step}.",
                details={"current_step": self._step},
            )
        variables = await self._reply_variables(reply_into) if return_variables else None
        outcome = self._outcome(record.contributors, record.missing, variables)
        return done_future(outcome.replaced(joint_norm=self.two_phase.applied_norm(worker, step)))

    def _future_step_error(self, worker: int, step: int) -> FailedPreconditionError:
        return FailedPreconditionError(
            f"Worker {worker} pushed step {step} of model {self.model_id!r}, but the current step is "
            f"{self._step}; steps are pushed in order. Pull the variables and push step {self._step}.",
            details={"current_step": self._step},
        )

    def _remember(self, step: int, record: StepRecord) -> None:
        self._history[step] = record
        while len(self._history) > REMEMBERED_STEPS:
            self._history.popitem(last=False)

    def _outcome(self, contributors, missing, variables, duplicate=False) -> StepOutcome:
        return StepOutcome(
            step=self._step,
            iterations=int(self._engine.iterations),
            learning_rate=float(self._engine.current_learning_rate()),
            duplicate=duplicate,
            contributors=tuple(sorted(contributors)),
            missing=tuple(missing),
            variables=variables,
            scalars={k: float(v) for k, v in self._engine.get_scalars().items()},
        )

    # ------------------------------------------------------------ replies

    async def _read_all_variables(self) -> dict:
        return await self._run(self._engine.read_variables)

    async def _reply_variables(self, into: Mapping[str, np.ndarray] | None = None) -> dict:
        """A snapshot of every variable for a step's reply: into the arrays ``into`` names (a
        worker's shared memory), else into arrays reused from earlier replies."""
        allocate = _into(into) if into is not None else self._allocate_snapshot
        return await self._run(self._engine.read_variables, None, allocate)

    def _allocate_snapshot(self, name: str, shape: tuple, dtype: np.dtype) -> np.ndarray:
        return self._snapshots.empty(name, shape, dtype)

    # ---------------------------------------------------------- checkpoints

    async def checkpoint_state(self) -> dict:
        """Everything needed to resume this model, taken between two updates.

        Taken under the model's lock, so no update is half-applied in it. A step whose
        pushes are still being collected is not part of it: its workers push it again
        to a restored server. A closed model can still be saved (the final checkpoint
        of a shutdown is taken after the models stopped taking pushes).
        """

        async def read():
            engine_state = await self._run(self._engine.state_dict)
            return {
                "format": MODEL_STATE_FORMAT,
                "spec": spec_state(self.spec),
                "step": self._step,
                "history": [
                    [step, list(record.contributors), list(record.missing), record.aggregated]
                    for step, record in self._history.items()
                ],
                "recent_async": {worker: recent.steps() for worker, recent in self._recent_async.items()},
                "activity": self.usage.state(),
                "engine": engine_state,
            }

        return await self._exclusive(read)

    @classmethod
    async def restore(
        cls, state: Mapping[str, Any], new_engine: Callable[[dict], Any], executor: Executor | None = None
    ) -> Model:
        """The model ``checkpoint_state`` described; ``new_engine(config)`` gives an unbuilt engine."""
        if state.get("format") != MODEL_STATE_FORMAT:
            raise InvalidArgumentError(
                f"Unknown model state format {state.get('format')!r}; expected {MODEL_STATE_FORMAT!r}."
            )
        spec = spec_from_state(state["spec"])
        engine = new_engine(spec.optimizer_config)
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(executor, engine.load_state_dict, state["engine"])
        if list(engine.variable_names) != [v.name for v in spec.variables]:
            raise InvalidArgumentError(
                f"The checkpoint of model {spec.model_id!r} is inconsistent: its optimizer holds variables "
                f"{listed(engine.variable_names)}, its spec {listed(v.name for v in spec.variables)}."
            )
        model = cls(spec, engine, executor)
        model._step = int(state["step"])
        if not 0 <= model._step <= MAX_STEP:
            raise InvalidArgumentError(
                f"The checkpoint of model {spec.model_id!r} is at step {model._step}, beyond the bound of {MAX_STEP}."
            )
        for step, contributors, missing, aggregated in state["history"]:
            model._remember(int(step), StepRecord(tuple(contributors), tuple(missing), bool(aggregated)))
        model._recent_async = {int(worker): RecentSteps.of(steps) for worker, steps in state["recent_async"].items()}
        model.usage = Activity.restored(state.get("activity"))  # absent from older checkpoints
        return model

    def _notify(self, applied: int) -> None:
        self.two_phase.state_changed()
        if self.on_change is not None:
            self.on_change(applied)

    # ----------------------------------------------------------- lifecycle

    def close(self, error: OptserveError) -> None:
        """Refuse every later call with ``error``; workers waiting in a step get it now (loop thread)."""
        if self._closed is not None:
            return
        self._closed = error
        pending, self._pending = self._pending, None
        if pending is not None:
            pending.fail(error)
        self.two_phase.close()

    def _ensure_open(self) -> None:
        if self._closed is not None:
            raise type(self._closed)(self._closed.message, details=self._closed.details)

    async def _exclusive(self, body: Callable[[], Any]):
        """Run the coroutine ``body()`` holding the model lock, to completion even if the caller is cancelled."""
        if self._inline and not self._lock.locked():
            # A small model's work runs inline, so its body mostly ends without ever waiting, and
            # what cannot wait cannot be cancelled halfway: it runs here first, without the task
            # (and the event loop turns) that shields it. A body that does wait goes on shielded.
            await self._lock.acquire()
            coroutine = body()
            try:
                result, waiting_for = eager.start(coroutine)
            except BaseException:
                self._lock.release()
                raise
            if eager.finished(result):
                self._lock.release()
                return result
            task = asyncio.ensure_future(_holding(self._lock, eager.resume(coroutine, waiting_for)))
        else:

            async def locked():
                async with self._lock:
                    return await body()

            task = asyncio.ensure_future(locked())
        task.add_done_callback(_retrieve_task)
        return await asyncio.shield(task)

    async def _run(self, function, *args):
        if self._inline:
            return function(*args)  # a small model: the hop to the executor would cost more than the work
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, functools.partial(function, *args))


def _into(region: Mapping[str, np.ndarray]):
    """An allocator (as ``read_variables`` takes) handing out the arrays of ``region``."""
    return lambda name, shape, dtype: region[name]


def _replies(written: list | None, waiting: PendingStep | None) -> tuple[dict | None, dict]:
    """(the reply's variables, {worker: its region}) from what ``_reply_allocators`` had filled."""
    if written is None:
        return None, {}
    if waiting is not None and waiting.reply_regions:
        return (written[-1] if waiting.needs_snapshot else None), dict(waiting.reply_regions)
    return written[0], {}


async def _holding(lock: asyncio.Lock, rest):
    """Await ``rest`` (the remainder of a body started holding ``lock``), then release the lock."""
    try:
        return await rest
    finally:
        lock.release()


def _retrieve_task(task: asyncio.Task) -> None:
    if not task.cancelled():
        task.exception()


def _log_failure(task: asyncio.Task) -> None:
    if not task.cancelled() and task.exception() is not None:
        log.error("sync step timeout handling failed", exc_info=task.exception())
