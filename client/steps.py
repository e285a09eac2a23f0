"""The one owner of a client's step state: which step each worker pushes next.

``Client``, ``ShardedClient`` and ``RemoteOptimizer`` keep their steps,
iterations and learning rates in a :class:`StepTracker`, so there is one place
that decides what a reply means for the next push.
"""

from __future__ import annotations

import dataclasses
import threading
from typing import Any

from optserve.client.types import ServerGeneration

__all__ = ["ModelProgress", "StepTracker"]


@dataclasses.dataclass(frozen=True)
class ModelProgress:
    """What the last reply said about a model (None: no reply yet)."""

    step: int | None = None
    iterations: int | None = None
    learning_rate: float | None = None
    generation: ServerGeneration | None = None  # the server run that answered last
    restarts: int = 0  # how often the generation changed: the server restarted (and maybe restored)


class StepTracker:
    """Thread-safe steps per (model, worker), and each model's last known counters."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._model_steps: dict[str, int] = {}
        self._worker_steps: dict[tuple[str, int], int] = {}
        # model -> [step, iterations, learning_rate, generation, restarts]: mutable, since
        # every reply updates it; progress() hands out frozen copies.
        self._progress: dict[str, list[Any]] = {}

    def step_for(self, model_id: str, worker_index: int) -> int | None:
        """The step ``worker_index`` pushes next, if known: its own, else the model's."""
        with self._lock:
            return self._worker_steps.get((model_id, worker_index), self._model_steps.get(model_id))

    def record_model_step(self, model_id: str, step: int, *, forward_only: bool = False) -> None:
        """Adopt the model's step for every worker of this client.

        ``forward_only`` (reads such as pull): a read that started before another
        thread's push finished may carry an older step, and moving that worker back
        would make its next push look like a repeat of the step it already pushed.
        """
        with self._lock:

            def keep(old: int) -> int:
                return max(old, step) if forward_only else step

            self._model_steps[model_id] = keep(self._model_steps.get(model_id, step))
            for key, old in self._worker_steps.items():
                if key[0] == model_id:
                    self._worker_steps[key] = keep(old)

    def record_worker_step(self, model_id: str, worker_index: int, step: int) -> None:
        with self._lock:
            self._worker_steps[(model_id, worker_index)] = step

    def record_progress(
        self,
        model_id: str,
        *,
        step: int | None = None,
        iterations: int | None = None,
        learning_rate: float | None = None,
        generation: ServerGeneration | None = None,
    ) -> bool:
        """Remember what a reply said (fields left None keep their last value).

        Returns True when ``generation`` differs from the last one seen: the server
        restarted since, and the model may be back at an older checkpoint's step.
        """
        with self._lock:
            record = self._progress.get(model_id)
            if record is None:
                record = self._progress[model_id] = [None, None, None, None, 0]
            if step is not None:
                record[0] = int(step)
            if iterations is not None:
                record[1] = int(iterations)
            if learning_rate is not None:
                record[2] = float(learning_rate)
            restarted = False
            if generation is not None:
                restarted = record[3] is not None and generation != record[3]
                record[3] = generation
                record[4] += restarted
            return restarted

    def progress(self, model_id: str) -> ModelProgress:
        with self._lock:
            record = self._progress.get(model_id)
            return ModelProgress(*record) if record is not None else ModelProgress()

    # A tracker travels with objects that are copied or pickled (a Keras optimizer): not its lock.
    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        del state["_lock"]
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._lock = threading.Lock()

    def forget(self, model_id: str) -> None:
        with self._lock:
            self._model_steps.pop(model_id, None)
            self._progress.pop(model_id, None)
            for key in [k for k in self._worker_steps if k[0] == model_id]:
                del self._worker_steps[key]
