"""Event logs that outlive a connection: resumable replies and room timelines.

An assistant reply is produced by a task in the ingress replica, not by the client's connection:
every event it makes (``turn``, ``delta``, ``done``/``error``; typed in ``serve_app/events.py``) is
appended to the reply's log with an id, and any number of readers (the original request, a
reconnect with ``Last-Event-ID``, a WebSocket ``resume``) read the log from an id on: first what is
stored, then live events, until the reply's end event. A client that drops and comes back misses
nothing, and the reply is saved even if nobody is listening. A room's timeline is the same kind of
log, read by every member, that never ends.

Two backends behind one interface: :class:`InMemoryEventLog` (the default; one ingress replica's
memory, so a reconnect must reach the same replica) and :class:`RedisEventLog` (Redis Streams; any
ingress replica can serve any reader). Event ids are opaque strings, increasing within a log.

Size: a log keeps at most ``max_log_bytes`` of events (their JSON); beyond, the oldest are dropped
(a reply is far smaller; a long-lived room timeline sheds its oldest events).

Retention: a reply's log is kept ``retention_s`` after it ends. Reply ids start with their creation
time, so an id that is no longer stored can be told apart: older than the retention → "gone" (410),
otherwise unknown (404).
"""

from __future__ import annotations

import asyncio
import re
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Protocol

import redis.asyncio as aioredis

from ..events import LOG_EVENT, LogEvent, is_end
from ..schemas import ReplyMeta

MAX_LOG_BYTES = 4 * 1024 * 1024


class LogNotFoundError(LookupError):
    pass


def new_reply_id() -> str:
    return f"r{int(time.time() * 1000):x}-{uuid.uuid4().hex[:16]}"


def reply_created_s(reply_id: str) -> float | None:
    """When a reply (``r<ms>-...``) or a response (``resp_<ms>-...``) was created; None if not one."""
    try:
        return int(reply_id.removeprefix("resp_").removeprefix("r").split("-", 1)[0], 16) / 1000
    except ValueError:
        return None


class EventLog(Protocol):
    async def create(self, key: str, meta: ReplyMeta, ttl_s: float) -> None:
        """Start a log with its metadata; it expires ``ttl_s`` from now unless :meth:`finish` or
        :meth:`touch` set another expiry."""

    async def meta(self, key: str) -> ReplyMeta | None: ...

    async def append(self, key: str, event: LogEvent) -> str:
        """Append one event; returns its id. Raises :class:`LogNotFoundError` if the log is gone."""

    async def last_id(self, key: str) -> str | None:
        """The id of the newest event (None if there is none): read after it for live events only."""

    async def finish(self, key: str, retention_s: float) -> None:
        """The producer is done (the meta says so from now on); keep the log ``retention_s`` more."""

    async def touch(self, key: str, ttl_s: float) -> None: ...

    def read(self, key: str, after: str | None, until_end: bool) -> AsyncIterator[tuple[str, LogEvent]]:
        """Events after id ``after`` (all if None): stored ones, then live ones. Stops after an end
        event when ``until_end``. Raises :class:`LogNotFoundError` if the log does not exist."""

    def valid_id(self, event_id: str) -> bool:
        """Whether ``event_id`` has the shape of this backend's ids (a client's Last-Event-ID)."""

    async def stored(self, key: str) -> list[tuple[str, LogEvent]]:
        """The events stored so far, without waiting for more (:class:`LogNotFoundError`: no log)."""


# -- in memory ----------------------------------------------------------------------------------------

@dataclass
class _Log:
    meta: ReplyMeta
    expires_at: float
    events: list[tuple[int, LogEvent, int]] = field(default_factory=list)  # (id, event, its JSON size)
    size_bytes: int = 0
    changed: asyncio.Event = field(default_factory=asyncio.Event)


class InMemoryEventLog:
    def __init__(self, max_log_bytes: int = MAX_LOG_BYTES):
        self.max_log_bytes = max_log_bytes
        self._logs: dict[str, _Log] = {}
        self._next_id = 0

    def _live(self, key: str) -> _Log | None:
        log = self._logs.get(key)
        if log is not None and time.time() > log.expires_at:
            del self._logs[key]
            return None
        return log

    def _purge(self) -> None:
        now = time.time()
        for key in [k for k, log in self._logs.items() if now > log.expires_at]:
            del self._logs[key]

    async def create(self, key: str, meta: ReplyMeta, ttl_s: float) -> None:
        self._purge()
        self._logs[key] = _Log(meta=meta, expires_at=time.time() + ttl_s)

    async def meta(self, key: str) -> ReplyMeta | None:
        log = self._live(key)
        return None if log is None else log.meta

    async def append(self, key: str, event: LogEvent) -> str:
        log = self._live(key)
        if log is None:
            raise LogNotFoundError(key)
        self._next_id += 1
        size = len(event.model_dump_json())
        log.events.append((self._next_id, event, size))
        log.size_bytes += size
        while log.size_bytes > self.max_log_bytes and len(log.events) > 1:
            log.size_bytes -= log.events.pop(0)[2]
        log.changed.set()
        log.changed = asyncio.Event()
        return str(self._next_id)

    async def last_id(self, key: str) -> str | None:
        log = self._live(key)
        return str(log.events[-1][0]) if log is not None and log.events else None

    async def finish(self, key: str, retention_s: float) -> None:
        log = self._live(key)
        if log is not None:
            log.meta = log.meta.model_copy(update={"finished": True})
        await self.touch(key, retention_s)

    async def touch(self, key: str, ttl_s: float) -> None:
        log = self._live(key)
        if log is not None:
            log.expires_at = time.time() + ttl_s

    async def read(self, key: str, after: str | None, until_end: bool) -> AsyncIterator[tuple[str, LogEvent]]:
        log = self._live(key)
        if log is None:
            raise LogNotFoundError(key)
        last = int(after) if after else 0
        while True:
            changed = log.changed
            for event_id, event, _ in [e for e in log.events if e[0] > last]:
                last = event_id
                yield str(event_id), event
                if until_end and is_end(event):
                    return
            await changed.wait()

    def valid_id(self, event_id: str) -> bool:
        return event_id.isdigit() and len(event_id) < 20

    async def stored(self, key: str) -> list[tuple[str, LogEvent]]:
        log = self._live(key)
        if log is None:
            raise LogNotFoundError(key)
        return [(str(event_id), event) for event_id, event, _ in log.events]


# -- Redis Streams ------------------------------------------------------------------------------------

# KEYS: events stream, meta, bytes counter. ARGV: event JSON, max bytes. Appends unless the log is
# gone, then drops the oldest events while the log is over its byte budget; carries the meta's expiry.
_APPEND = """
local ttl = redis.call('PTTL', KEYS[2])
if ttl == -2 then return false end
local id = redis.call('XADD', KEYS[1], '*', 'e', ARGV[1])
local total = redis.call('INCRBY', KEYS[3], string.len(ARGV[1]))
while total > tonumber(ARGV[2]) do
  local oldest = redis.call('XRANGE', KEYS[1], '-', '+', 'COUNT', 1)
  if #oldest == 0 or oldest[1][1] == id then break end
  total = redis.call('DECRBY', KEYS[3], string.len(oldest[1][2][2]))
  redis.call('XDEL', KEYS[1], oldest[1][1])
end
if ttl > 0 then
  redis.call('PEXPIRE', KEYS[1], ttl)
  redis.call('PEXPIRE', KEYS[3], ttl)
end
return id
"""
_STREAM_ID = re.compile(r"\d{1,20}(-\d{1,20})?")


class RedisEventLog:
    """One stream per log, its metadata in a string key, its size in a counter; appends are one Lua
    script. Readers block in ``XREAD`` for ``block_ms`` at a time (the client's read timeout allows
    for it: ``serve_app/redis_client.py``)."""

    def __init__(self, client: aioredis.Redis, key_prefix: str = "chatserve:", max_log_bytes: int = MAX_LOG_BYTES,
                 block_ms: int = 1000):
        self.redis = client
        self.prefix = key_prefix
        self.max_log_bytes = max_log_bytes
        self.block_ms = block_ms
        self._append = client.register_script(_APPEND)

    def _k(self, key: str, part: str) -> str:
        return f"{self.prefix}log:{key}:{part}"

    async def create(self, key: str, meta: ReplyMeta, ttl_s: float) -> None:
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.delete(self._k(key, "events"), self._k(key, "bytes"))
            pipe.set(self._k(key, "meta"), meta.model_dump_json(), px=int(ttl_s * 1000))
            await pipe.execute()

    async def meta(self, key: str) -> ReplyMeta | None:
        raw = await self.redis.get(self._k(key, "meta"))
        return None if raw is None else ReplyMeta.model_validate_json(raw)

    async def append(self, key: str, event: LogEvent) -> str:
        event_id = await self._append(keys=[self._k(key, "events"), self._k(key, "meta"), self._k(key, "bytes")],
                                      args=[event.model_dump_json(), self.max_log_bytes])
        if event_id is None:
            raise LogNotFoundError(key)
        return event_id

    async def last_id(self, key: str) -> str | None:
        newest = await self.redis.xrevrange(self._k(key, "events"), count=1)
        return newest[0][0] if newest else None

    async def finish(self, key: str, retention_s: float) -> None:
        meta = await self.meta(key)
        if meta is not None:
            await self.redis.set(self._k(key, "meta"), meta.model_copy(update={"finished": True}).model_dump_json(),
                                 keepttl=True)
        await self.touch(key, retention_s)

    async def touch(self, key: str, ttl_s: float) -> None:
        ms = int(ttl_s * 1000)
        async with self.redis.pipeline(transaction=True) as pipe:
            for part in ("meta", "events", "bytes"):
                pipe.pexpire(self._k(key, part), ms)
            await pipe.execute()

    async def read(self, key: str, after: str | None, until_end: bool) -> AsyncIterator[tuple[str, LogEvent]]:
        if not await self.redis.exists(self._k(key, "meta")):
            raise LogNotFoundError(key)
        stream = self._k(key, "events")
        last = after or "0-0"
        while True:
            batch = await self.redis.xread({stream: last}, block=self.block_ms, count=512)
            if not batch:
                if not await self.redis.exists(self._k(key, "meta")):
                    return  # expired while we waited
                continue
            for event_id, fields in batch[0][1]:
                last = event_id
                event = LOG_EVENT.validate_json(fields["e"])
                yield event_id, event
                if until_end and is_end(event):
                    return

    def valid_id(self, event_id: str) -> bool:
        return _STREAM_ID.fullmatch(event_id) is not None

    async def stored(self, key: str) -> list[tuple[str, LogEvent]]:
        if not await self.redis.exists(self._k(key, "meta")):
            raise LogNotFoundError(key)
        entries = await self.redis.xrange(self._k(key, "events"), "-", "+")
        return [(event_id, LOG_EVENT.validate_json(fields["e"])) for event_id, fields in entries]
