"""Session stores. The dialogue deployment talks to a :class:`SessionStore`: in memory by default,
Redis with ``store: redis`` (``redis_store.py``), and with ``cold_store: postgres`` Redis in front of
PostgreSQL (``tiered_store.py``: idle sessions are archived to ``postgres_store.py`` and come back
on their next read). A store whose backend cannot be reached raises
:class:`~serve_app.errors.StoreUnavailableError`.

Contract (every implementation, checked by the same test suite):
- ``append_turn`` is atomic per session: concurrent appends are all kept, in call order; the pending
  items it consumed (those whose ids are in the turn's input) leave the pending list in the same step.
- every write bumps the session's ``revision``; ``replace`` writes only over the revision it read
  (compare and set), so it never loses a write that came in between.
- sessions expire ``ttl_s`` after their last activity; reading or writing refreshes the TTL.
- a session belongs to its ``owner``; the dialogue deployment checks ownership.
- ``list_for_owner`` returns the owner's live sessions only, most recently active first.
"""

from __future__ import annotations

import asyncio
import time
from typing import Protocol

from ..schemas import Message, Session, Turn


class SessionStore(Protocol):
    async def open(self) -> None:
        """Connect and prepare (migrations, background work); called once before use."""

    async def create(self, session: Session) -> None:
        """Store ``session`` (replacing one with the same id); its TTL starts now."""

    async def get(self, session_id: str) -> Session | None:
        """The session, or None if unknown or expired; reading refreshes the TTL."""

    async def delete(self, session_id: str) -> bool:
        """Remove the session and its turns; False if there was none."""

    async def append_turn(self, session_id: str, turn: Turn) -> Session | None:
        """Append atomically, removing the pending items the turn consumed; the updated session, or
        None if it does not exist."""

    async def add_pending(self, session_id: str, items: list[Message]) -> Session | None:
        """Add conversation items after the last turn; the updated session, or None if it does not exist."""

    async def replace(self, session: Session) -> Session | None:
        """Rewrite a session (its metadata, turns and pending items, e.g. after an item was deleted)
        if it is still at ``session.revision``; None if it does not exist or changed since (read it
        again and retry)."""

    async def list_for_owner(self, owner: str) -> list[Session]: ...

    async def count_for_owner(self, owner: str) -> int:
        """How many sessions ``owner`` has: at least the live ones (a quick count may include expired
        ones that :meth:`list_for_owner` would prune)."""

    async def close(self) -> None:
        """Release connections and stop background work (the deployment is stopping)."""


class InMemorySessionStore:
    """Sessions in a dict, expired lazily on access. Lost when the dialogue replica restarts."""

    def __init__(self, ttl_s: float):
        self.ttl_s = ttl_s
        self._sessions: dict[str, Session] = {}
        self._lock = asyncio.Lock()

    def _live(self, session_id: str) -> Session | None:
        session = self._sessions.get(session_id)
        if session is not None and time.time() - session.updated_at > self.ttl_s:
            del self._sessions[session_id]
            return None
        return session

    def _touched(self, session: Session, write: bool) -> Session:
        session.updated_at = time.time()
        session.revision += write
        return session.model_copy(deep=True)

    async def open(self) -> None:
        pass

    async def create(self, session: Session) -> None:
        self._sessions[session.id] = session.model_copy(deep=True)

    async def get(self, session_id: str) -> Session | None:
        session = self._live(session_id)
        return None if session is None else self._touched(session, write=False)

    async def delete(self, session_id: str) -> bool:
        return self._sessions.pop(session_id, None) is not None

    async def append_turn(self, session_id: str, turn: Turn) -> Session | None:
        async with self._lock:
            session = self._live(session_id)
            if session is None:
                return None
            session.turns.append(turn)
            consumed = {m.id for m in turn.input}
            session.pending = [m for m in session.pending if m.id not in consumed]
            return self._touched(session, write=True)

    async def add_pending(self, session_id: str, items: list[Message]) -> Session | None:
        async with self._lock:
            session = self._live(session_id)
            if session is None:
                return None
            session.pending += items
            return self._touched(session, write=True)

    async def replace(self, session: Session) -> Session | None:
        async with self._lock:
            stored = self._live(session.id)
            if stored is None or stored.revision != session.revision:
                return None
            replacement = session.model_copy(deep=True, update={"revision": stored.revision})
            self._sessions[session.id] = replacement
            return self._touched(replacement, write=True)

    async def list_for_owner(self, owner: str) -> list[Session]:
        for session_id in list(self._sessions):
            self._live(session_id)
        found = [s.model_copy(deep=True) for s in self._sessions.values() if s.owner == owner]
        return sorted(found, key=lambda s: s.updated_at, reverse=True)

    async def count_for_owner(self, owner: str) -> int:
        for session_id in list(self._sessions):
            self._live(session_id)
        return sum(1 for s in self._sessions.values() if s.owner == owner)

    async def close(self) -> None:
        pass
