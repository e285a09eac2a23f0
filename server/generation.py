"""Which run of the server is answering: a fresh id per process start, and the checkpoint it restored.

Replies carry it (``StepResult.generation``, ``OptimizerState.generation``), so
a client can tell "the server restarted from an older checkpoint" from a bug.
"""

from __future__ import annotations

import dataclasses
import secrets

__all__ = ["ServerGeneration"]


@dataclasses.dataclass(frozen=True)
class ServerGeneration:
    server_id: str
    restored_checkpoint: str = ""  # the checkpoint's name; "" when the start restored none

    @classmethod
    def new(cls) -> ServerGeneration:
        """A generation for a server process starting now (random, so restarts never repeat one)."""
        return cls(server_id=secrets.token_hex(8))

    def restored(self, checkpoint: str) -> ServerGeneration:
        return dataclasses.replace(self, restored_checkpoint=checkpoint)
