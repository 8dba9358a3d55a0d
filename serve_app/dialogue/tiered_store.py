"""Redis hot, PostgreSQL cold (``store: redis`` + ``cold_store: postgres``).

Every read and write goes to Redis (``redis_store.py``). A sweeper in each dialogue replica, every
``archive_interval_s``, takes the sessions idle for more than ``hot_ttl_s`` (Redis's index of
sessions by last activity), writes each to PostgreSQL (``postgres_store.py``) and then drops it from
Redis. A read or write of a session that is not in Redis brings it back from PostgreSQL first, so
the move is invisible to callers, and a session survives a Redis flush once archived.

Nothing is lost on the way, whatever step a crash or a concurrent request interrupts:
- archive: PostgreSQL commits the copy before Redis lets go, and Redis lets go only if the session's
  ``revision`` is still the one copied (a turn appended meanwhile keeps it hot; the next sweep copies
  it again). A crash in between leaves it in both; Redis is read first and is never older.
- restore: Redis takes the copy only if it has none (two readers racing restore it once); the
  PostgreSQL row stays, so a Redis flush after a restore still finds it (as archived).
- delete: PostgreSQL first (a tombstone that no archive in flight can overwrite), then Redis; a
  restore racing the delete checks the tombstone after writing Redis and removes what it wrote.
Several sweepers (dialogue replicas) may run at once: copies never replace a newer revision.
Expiry is the same in both tiers: ``session_ttl_s`` after the last activity.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable

from ..schemas import Message, Session, Turn
from .postgres_store import PostgresSessionStore
from .redis_store import RedisSessionStore

logger = logging.getLogger("ray.serve")

ARCHIVE_BATCH = 200  # sessions archived per sweep at most
PURGE_EVERY_S = 600.0
CLOSE_WAIT_S = 30.0


class TieredSessionStore:
    def __init__(self, hot: RedisSessionStore, cold: PostgresSessionStore, hot_ttl_s: float,
                 archive_interval_s: float):
        self.hot = hot
        self.cold = cold
        self.hot_ttl_s = hot_ttl_s
        self.archive_interval_s = archive_interval_s
        self._sweeper: asyncio.Task | None = None
        self._stop = asyncio.Event()
        self._purged_at = 0.0

    async def open(self) -> None:
        await self.cold.open()  # migrations
        self._sweeper = asyncio.create_task(self._sweep_forever())

    async def close(self) -> None:
        """Stop the sweeper (a sweep under way finishes first: its steps are safe to interrupt, but
        the drivers' connections are not always safe to cancel mid-command), then disconnect."""
        if self._sweeper is not None:
            self._stop.set()
            with contextlib.suppress(asyncio.CancelledError, TimeoutError):
                await asyncio.wait_for(self._sweeper, CLOSE_WAIT_S)
        await self.hot.close()
        await self.cold.close()

    # -- archiving -----------------------------------------------------------------------------------
    async def archive_idle(self, idle_s: float | None = None) -> int:
        """Move the sessions idle for more than ``idle_s`` (default ``hot_ttl_s``) to PostgreSQL;
        returns how many left Redis."""
        idle_s = self.hot_ttl_s if idle_s is None else idle_s
        moved = 0
        for session_id in await self.hot.idle(time.time() - idle_s, ARCHIVE_BATCH):
            session = await self.hot.peek(session_id)
            if session is None:  # expired in Redis: only its index entry was left
                await self.hot.drop_if_unchanged(session_id, -1)
            elif await self.cold.put(session):
                moved += await self.hot.drop_if_unchanged(session_id, session.revision)
        if time.monotonic() - self._purged_at > PURGE_EVERY_S:
            await self.cold.purge()
            self._purged_at = time.monotonic()
        return moved

    async def _sweep_forever(self) -> None:
        while not self._stop.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stop.wait(), self.archive_interval_s)
                return
            try:
                moved = await self.archive_idle()
            except Exception as exc:  # noqa: BLE001 - a store away: sessions stay hot, try again later
                logger.warning("archiving idle sessions failed (they stay in Redis): %r", exc)
            else:
                if moved:
                    logger.info("archived %d idle sessions to PostgreSQL", moved)

    async def _restore(self, session_id: str) -> bool:
        """Bring an archived session back into Redis; False if there is none."""
        archived = await self.cold.peek(session_id)
        if archived is None:
            return False
        await self.hot.restore(archived.model_copy(update={"updated_at": time.time()}))
        if await self.cold.is_deleted(session_id):  # deleted while it was coming back
            await self.hot.delete(session_id)
            return False
        return True

    async def _hot(self, session_id: str, operation: Callable[[], Awaitable[Session | None]]) -> Session | None:
        found = await operation()
        if found is None and await self._restore(session_id):
            found = await operation()
        return found

    # -- SessionStore ----------------------------------------------------------------------------------
    async def create(self, session: Session) -> None:
        await self.hot.create(session)

    async def get(self, session_id: str) -> Session | None:
        return await self._hot(session_id, lambda: self.hot.get(session_id))

    async def append_turn(self, session_id: str, turn: Turn) -> Session | None:
        return await self._hot(session_id, lambda: self.hot.append_turn(session_id, turn))

    async def add_pending(self, session_id: str, items: list[Message]) -> Session | None:
        return await self._hot(session_id, lambda: self.hot.add_pending(session_id, items))

    async def replace(self, session: Session) -> Session | None:
        return await self._hot(session.id, lambda: self.hot.replace(session))

    async def delete(self, session_id: str) -> bool:
        archived = await self.cold.delete(session_id)
        return await self.hot.delete(session_id) or archived

    async def count_for_owner(self, owner: str) -> int:
        """Hot plus cold: a session in both (restored, not yet archived again) counts twice, which
        :meth:`list_for_owner` corrects when the count reaches a bound."""
        return await self.hot.count_for_owner(owner) + await self.cold.count_for_owner(owner)

    async def list_for_owner(self, owner: str) -> list[Session]:
        hot = await self.hot.list_for_owner(owner)
        seen = {s.id for s in hot}
        cold = [s for s in await self.cold.list_for_owner(owner) if s.id not in seen]
        return sorted(hot + cold, key=lambda s: s.updated_at, reverse=True)
