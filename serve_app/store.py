"""Session stores. The dialogue deployment talks to a :class:`SessionStore`; the in-memory store is
the default, the Redis store (``store: redis``) lets sessions outlive the app and be shared.

Contract (every implementation, checked by the same test suite):
- ``append_turn`` is atomic per session: concurrent appends are all kept, in call order.
- sessions expire ``ttl_s`` after their last activity; reading or appending refreshes the TTL.
- a session belongs to its ``owner``; the dialogue deployment checks ownership.
- ``list_for_owner`` returns the owner's live sessions only, most recently active first.
"""

from __future__ import annotations

import asyncio
import os
import time
from typing import Protocol

from .schemas import Session, Turn


class SessionStoreUnavailableError(RuntimeError):
    """The store's backend cannot be reached (e.g. Redis is down); the request may be retried later."""


class SessionStore(Protocol):
    async def create(self, session: Session) -> None:
        """Store ``session`` (replacing one with the same id); its TTL starts now."""

    async def get(self, session_id: str) -> Session | None:
        """The session, or None if unknown or expired; reading refreshes the TTL."""

    async def delete(self, session_id: str) -> bool:
        """Remove the session and its turns; False if there was none."""

    async def append_turn(self, session_id: str, turn: Turn) -> Session | None:
        """Append atomically; returns the updated session, or None if it does not exist."""

    async def list_for_owner(self, owner: str) -> list[Session]: ...


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

    async def create(self, session: Session) -> None:
        self._sessions[session.id] = session.model_copy(deep=True)

    async def get(self, session_id: str) -> Session | None:
        session = self._live(session_id)
        if session is None:
            return None
        session.updated_at = time.time()
        return session.model_copy(deep=True)

    async def delete(self, session_id: str) -> bool:
        return self._sessions.pop(session_id, None) is not None

    async def append_turn(self, session_id: str, turn: Turn) -> Session | None:
        async with self._lock:
            session = self._live(session_id)
            if session is None:
                return None
            session.turns.append(turn)
            session.updated_at = time.time()
            return session.model_copy(deep=True)

    async def list_for_owner(self, owner: str) -> list[Session]:
        for session_id in list(self._sessions):
            self._live(session_id)
        found = [s.model_copy(deep=True) for s in self._sessions.values() if s.owner == owner]
        return sorted(found, key=lambda s: s.updated_at, reverse=True)


def create_store(settings) -> SessionStore:
    """The store ``settings.store`` names (a :class:`~serve_app.config.DialogueSettings`). Redis is at
    ``settings.redis_url``, else env ``REDIS_URL``, else ``redis://127.0.0.1:6379/0``; it is
    contacted at first use."""
    if settings.store == "memory":
        return InMemorySessionStore(settings.session_ttl_s)
    if settings.store == "redis":
        from .redis_store import DEFAULT_REDIS_URL, RedisSessionStore

        url = settings.redis_url or os.environ.get("REDIS_URL") or DEFAULT_REDIS_URL
        return RedisSessionStore.from_url(url, settings.session_ttl_s, settings.redis_key_prefix)
    raise ValueError(f"unknown session store {settings.store!r}; use 'memory' or 'redis'")
