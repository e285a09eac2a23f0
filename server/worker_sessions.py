"""The bookkeeping that shared memory and the data plane share: one session per (model, worker).

A session has ``id``, ``model`` (with ``closed``), ``model_id``, ``worker`` and
``close()``. A worker's new session replaces its old one; sessions of closed
models go when the next one opens.
"""

from __future__ import annotations

from typing import Any

from optserve.server.errors import InvalidArgumentError


class WorkerSessions:
    """Sessions by id and by (model, worker)."""

    what = "Session"  # how errors name a session: "Shared memory session", "Data plane session"

    def __init__(self) -> None:
        self._sessions: dict[str, Any] = {}
        self._by_worker: dict[tuple[str, int], Any] = {}

    def _make_room(self, model, worker: int) -> None:
        """Before opening a session of (model, worker): drop its previous one and closed models'."""
        for session in [s for s in self._sessions.values() if s.model.closed]:
            self._forget(session)
        previous = self._by_worker.get((model.model_id, worker))
        if previous is not None:
            self._forget(previous)

    def _add(self, session) -> None:
        self._sessions[session.id] = session
        self._by_worker[(session.model_id, session.worker)] = session

    def _known(self, session_id: str, model_id: str, worker: int):
        """The open session ``session_id`` of (model, worker); None if this server does not know it."""
        session = self._sessions.get(session_id)
        if session is None or session.model.closed or getattr(session, "closed", False):
            return None
        if session.model_id != model_id or session.worker != worker:
            raise InvalidArgumentError(
                f"{self.what} {session_id[:8]}... belongs to model {session.model_id!r}, worker "
                f"{session.worker}; the push is for model {model_id!r}, worker {worker}. Push through your "
                "own session.",
            )
        return session

    def _forget(self, session) -> None:
        """Drop ``session`` (it may be gone already)."""
        key = (session.model_id, session.worker)
        if self._by_worker.get(key) is session:
            del self._by_worker[key]
        self._drop(session)

    def _drop(self, session) -> None:
        self._sessions.pop(session.id, None)
        session.close()

    def close(self) -> None:
        for session in list(self._sessions.values()):
            self._forget(session)

    def __len__(self) -> int:
        return len(self._sessions)
