"""The reading side of replies and rooms, and the backends they share with the producer.

A reply's events live in its own log, or, for a reply in a room, in the room's timeline (every
member reads it). :meth:`Replies.reply_events` hides the difference: it yields one reply's events
after an id, stored then live, to its end. Who may read: the reply's owner, or anyone for a room
reply; everybody else gets 404, and an id older than the retention 410.

A reader never waits on a dead producer: while no event comes for ``LIVENESS_CHECK_S``, it checks
that the reply still holds its session's turn lock (the producer renews it as a lease). If the lock
is gone and no end event follows, the producer died (its ingress was killed, its store calls kept
failing): the reader gets an ``error`` event (503, ``reply_interrupted``) and the stream ends. If the
store itself fails while a reader waits, the reader gets an ``error`` event too (503,
``store_unavailable``), never a broken stream.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass

import redis.asyncio as aioredis

from ..config import DialogueSettings
from ..errors import STORE_ERRORS, ApiError, to_api_error
from ..events import ErrorEvent, LogEvent, MemberJoinedEvent, is_end
from ..redis_client import connect, redis_url
from ..schemas import ReplyMeta
from .event_log import EventLog, InMemoryEventLog, LogNotFoundError, RedisEventLog, reply_created_s
from .locks import (
    CancelFlags,
    InMemoryCancelFlags,
    InMemoryRoomMembers,
    InMemoryTurnLock,
    RedisCancelFlags,
    RedisRoomMembers,
    RedisTurnLock,
    RoomMembers,
    TurnLock,
    turn_lock_name,
)

XREAD_BLOCK_MS = 1000
LIVENESS_CHECK_S = 2.0
REPLY_ID_CHARS = 64


def room_log(session_id: str) -> str:
    return f"room:{session_id}"


@dataclass
class ReplyBackends:
    """The event log, the turn locks and the cancel flags: in this replica's memory (``store:
    memory``, one ingress replica), or in Redis (``store: redis``, one client for the three)."""

    log: EventLog
    locks: TurnLock
    cancels: CancelFlags
    members: RoomMembers
    client: aioredis.Redis | None = None

    @classmethod
    def create(cls, settings: DialogueSettings, max_log_bytes: int,
               client: aioredis.Redis | None = None) -> ReplyBackends:
        """In memory, or in Redis through ``client`` (see :func:`ingress_redis`)."""
        if client is not None:
            prefix = settings.redis_key_prefix
            return cls(RedisEventLog(client, prefix, max_log_bytes=max_log_bytes, block_ms=XREAD_BLOCK_MS),
                       RedisTurnLock(client, prefix), RedisCancelFlags(client, prefix), RedisRoomMembers(client, prefix),
                       client)
        return cls(InMemoryEventLog(max_log_bytes=max_log_bytes), InMemoryTurnLock(), InMemoryCancelFlags(),
                   InMemoryRoomMembers())


def ingress_redis(settings: DialogueSettings) -> aioredis.Redis | None:
    """The ingress replica's one Redis client with ``store: redis`` (its reads allow for XREAD's block)."""
    if settings.store != "redis":
        return None
    return connect(redis_url(settings), blocking_read_s=XREAD_BLOCK_MS / 1000)


class Replies:
    def __init__(self, backends: ReplyBackends, settings: DialogueSettings, max_room_members: int):
        self.log = backends.log
        self.locks = backends.locks
        self.members = backends.members
        self.settings = settings
        self.max_room_members = max_room_members

    async def check(self, reply_id: str, session_id: str, owner: str) -> ReplyMeta:
        """The reply's metadata if ``owner`` may read it; 404 / 410 otherwise."""
        if len(reply_id) > REPLY_ID_CHARS or reply_created_s(reply_id) is None:
            raise ApiError(404, f"reply {reply_id[:REPLY_ID_CHARS]} not found", code="reply_not_found")
        meta = await self.log.meta(reply_id)
        if meta is None:
            created = reply_created_s(reply_id)
            retention_s = self.settings.reply_retention_s
            if created is not None and created < time.time() - retention_s:
                raise ApiError(410, f"reply {reply_id} is no longer kept (retention {retention_s:g} s)",
                               code="reply_gone")
            raise ApiError(404, f"reply {reply_id} not found", code="reply_not_found")
        if meta.session_id != session_id or (meta.owner != owner and not meta.room):
            raise ApiError(404, f"reply {reply_id} not found", code="reply_not_found")
        return meta

    async def events(self, key: str, after: str | None, until_end: bool = True) -> AsyncIterator[tuple[str, LogEvent]]:
        """A log's events after id ``after``: stored, then live (until the end event when ``until_end``)."""
        try:
            async for item in self.log.read(key, after, until_end):
                yield item
        except LogNotFoundError:
            raise ApiError(404, "no such event log", code="reply_not_found") from None

    async def meta(self, reply_id: str) -> ReplyMeta | None:
        return await self.log.meta(reply_id)

    def check_event_id(self, after: str | None) -> None:
        """A client's Last-Event-ID must look like an id of ours (400 otherwise)."""
        if after is not None and not self.log.valid_id(after):
            raise ApiError(400, f"Last-Event-ID {after[:40]!r} is not an event id of this reply", param="last_event_id")

    def reply_events(self, reply_id: str, meta: ReplyMeta, after: str | None
                     ) -> AsyncIterator[tuple[str | None, LogEvent]]:
        """One reply's events after ``after``, from its own log or its room's timeline, to its end (or
        to an ``error`` event if its producer dies). ``after`` is checked here, before any streaming."""
        self.check_event_id(after)
        return self._reply_events(reply_id, meta, after)

    async def _reply_events(self, reply_id: str, meta: ReplyMeta, after: str | None):
        key = room_log(meta.session_id) if meta.room else reply_id
        events = self.events(key, after, until_end=not meta.room).__aiter__()
        pending: asyncio.Task | None = None
        try:
            while True:
                pending = pending or asyncio.ensure_future(events.__anext__())
                done, _ = await asyncio.wait({pending}, timeout=LIVENESS_CHECK_S)
                if not done:
                    try:
                        alive = await self.locks.holder(turn_lock_name(meta.session_id)) == reply_id
                    except STORE_ERRORS:
                        alive = True  # can't tell: the pending read will fail or go on
                    if alive:
                        continue  # the producer is alive; keep waiting
                    # The lock is gone: whatever the producer wrote is in the log; give it a moment.
                    done, _ = await asyncio.wait({pending}, timeout=LIVENESS_CHECK_S)
                    if not done:
                        now = await self.log.meta(reply_id)
                        if now is None or not now.finished:
                            yield None, ErrorEvent(
                                reply_id=reply_id, code="reply_interrupted", status=503, retry_after_s=1,
                                message="the reply stopped: the server producing it went away; send it again")
                        return  # else the reader was already past the reply's end
                try:
                    event_id, event = pending.result()
                except StopAsyncIteration:
                    return
                pending = None
                if meta.room and getattr(event, "reply_id", None) not in (None, reply_id):
                    continue  # a room's timeline holds other replies too
                yield event_id, event
                if is_end(event) and event.reply_id == reply_id:
                    return
        except STORE_ERRORS as exc:
            yield None, ErrorEvent.of(to_api_error(exc), reply_id)
        finally:
            if pending is not None:
                pending.cancel()
            with contextlib.suppress(Exception):
                await events.aclose()

    async def stored_events(self, reply_id: str, meta: ReplyMeta) -> list[LogEvent]:
        """One reply's events so far, without waiting for more."""
        try:
            if not meta.room:
                return [event for _, event in await self.log.stored(reply_id)]
            return [event for _, event in await self.log.stored(room_log(meta.session_id))
                    if getattr(event, "reply_id", None) == reply_id]
        except LogNotFoundError:
            raise ApiError(404, "no such event log", code="reply_not_found") from None

    async def active(self, session_id: str) -> str | None:
        """The id of the reply being generated in this session, if one is."""
        return await self.locks.holder(turn_lock_name(session_id))

    # -- rooms -------------------------------------------------------------------------------------
    async def open_room(self, session_id: str) -> None:
        """Make sure a room's timeline exists; it lives as long as the session."""
        ttl_s = self.settings.session_ttl_s
        if await self.log.meta(room_log(session_id)) is None:
            await self.log.create(room_log(session_id), ReplyMeta(session_id=session_id, room=True), ttl_s)
        else:
            await self.log.touch(room_log(session_id), ttl_s)

    async def join_room(self, session_id: str, member: str, after: str | None
                        ) -> AsyncIterator[tuple[str, LogEvent]]:
        """Announce ``member`` and return the room's timeline after ``after`` (what the member
        missed); a first join (no ``after``) gets only what happens from now on."""
        self.check_event_id(after)
        if not await self.members.join(room_log(session_id), member, self.max_room_members,
                                       self.settings.session_ttl_s):
            raise ApiError(409, f"the room is full ({self.max_room_members} members)", code="room_full")
        await self.open_room(session_id)
        if after is None:
            after = await self.log.last_id(room_log(session_id))
        await self.log.append(room_log(session_id), MemberJoinedEvent(member=member))
        return self.events(room_log(session_id), after, until_end=False)
