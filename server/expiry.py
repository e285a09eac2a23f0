"""``--model-ttl``: delete models that nobody has used for longer than a time-to-live.

A model is deleted once it has been idle for longer than the TTL and is not in use
(``optserve.server.usage``): no call on it in flight (a worker parked in a
synchronous step is one), no step holding pushes, and no push, pull, get or set of
weights, create or join within the TTL. Listing a model (``optserve inspect``) is
not activity. A model restored from a checkpoint starts a fresh TTL at the restore.

Each deletion is logged with the idle time and the last activity. With a checkpoint
directory a checkpoint is written right after, so the newest checkpoint no longer
holds the deleted models and a restart does not bring them back.
"""

from __future__ import annotations

import asyncio
import logging
import math

from optserve.server.errors import InvalidArgumentError, UnavailableError

log = logging.getLogger(__name__)

# Sweeps run a few times per TTL, so a model outlives it by at most a quarter of it
# (and by at most MAX_SWEEP_INTERVAL_S for long TTLs).
SWEEPS_PER_TTL = 4
MIN_SWEEP_INTERVAL_S = 0.05
MAX_SWEEP_INTERVAL_S = 30.0


def check_model_ttl(model_ttl_s: float | None) -> float | None:
    """None or 0: no TTL. Otherwise a finite number of seconds > 0."""
    if model_ttl_s is None or model_ttl_s == 0:
        return None
    if (
        isinstance(model_ttl_s, bool)
        or not isinstance(model_ttl_s, (int, float))
        or not math.isfinite(model_ttl_s)
        or model_ttl_s < 0
    ):
        raise InvalidArgumentError(
            f"`model_ttl_s` must be a finite number of seconds > 0 (0 or None: models never expire). "
            f"Received: model_ttl_s={model_ttl_s!r}"
        )
    return float(model_ttl_s)


def sweep_interval(model_ttl_s: float) -> float:
    return min(MAX_SWEEP_INTERVAL_S, max(MIN_SWEEP_INTERVAL_S, model_ttl_s / SWEEPS_PER_TTL))


class ModelExpiry:
    """Deletes the registry's idle models periodically; ``start()`` on the server's loop, ``stop()`` when it stops."""

    def __init__(self, registry, model_ttl_s: float, checkpointer=None):
        self.registry = registry
        self.model_ttl_s = float(model_ttl_s)
        self.checkpointer = checkpointer
        self._task: asyncio.Task | None = None

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.ensure_future(self._run())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None

    async def _run(self) -> None:
        interval = sweep_interval(self.model_ttl_s)
        while True:
            await asyncio.sleep(interval)
            await self.sweep()

    async def sweep(self) -> list[str]:
        """Delete the expired models now; returns their ids."""
        try:
            expired = self.registry.delete_idle(self.model_ttl_s)
        except UnavailableError:
            return []  # restoring or shutting down: the next sweep looks again
        if expired and self.checkpointer is not None:
            await self.checkpointer.save_logged(
                f"{len(expired)} idle model{'s' if len(expired) != 1 else ''} deleted (--model-ttl)"
            )
        return expired
