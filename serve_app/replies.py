"""Event logs that outlive a connection: resumable replies and room timelines.

An assistant reply is produced by a task in the ingress replica, not by the client's connection:
every event it makes (``turn``, ``delta``, ``done``/``error``) is appended to the reply's log with
an id, and any number of readers (the original request, a reconnect with ``Last-Event-ID``, a
WebSocket ``resume``) read the log from an id on: first what is stored, then live events, until the
reply's end event. A client that drops and comes back misses nothing, and the reply is saved even
if nobody is listening. A room's timeline is the same kind of log, read by every member, that never
ends.

Two backends behind one interface: :class:`InMemoryEventLog` (the default; one ingress replica's
memory, so a reconnect must reach the same replica) and :class:`RedisEventLog` (Redis Streams;
any ingress replica can serve any reader, and cancellation reaches the producing replica through a
key it polls). Event ids are opaque strings, increasing within a log.

Retention: a reply's log is kept ``retention_s`` after it ends. Reply ids start with their creation
time, so an id that is no longer stored can be told apart: older than the retention → "gone" (410),
otherwise unknown (404).
"""

from __future__ import annotations

import asyncio
import json
import os
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Protocol

END_EVENTS = frozenset({"done", "error"})


class LogNotFoundError(LookupError):
    pass


class LogGoneError(LookupError):
    pass


def new_reply_id() -> str:
    return f"r{int(time.time() * 1000):x}-{uuid.uuid4().hex[:16]}"


def reply_created_s(reply_id: str) -> float | None:
    try:
        return int(reply_id[1:].split("-", 1)[0], 16) / 1000
    except ValueError:
        return None


class EventLog(Protocol):
    async def create(self, key: str, meta: dict, ttl_s: float) -> None:
        """Start a log with its metadata (owner, session); it expires ``ttl_s`` from now unless
        :meth:`finish` or :meth:`touch` set another expiry."""

    async def meta(self, key: str) -> dict | None: ...

    async def append(self, key: str, event: dict) -> str:
        """Append one event; returns its id."""

    async def last_id(self, key: str) -> str | None:
        """The id of the newest event (None if there is none): read after it for live events only."""

    async def finish(self, key: str, retention_s: float) -> None:
        """The producer is done; keep the log ``retention_s`` more."""

    async def touch(self, key: str, ttl_s: float) -> None: ...

    def read(self, key: str, after: str | None, until_end: bool) -> AsyncIterator[tuple[str, dict]]:
        """Events after id ``after`` (all if None): stored ones, then live ones. Stops after an end
        event when ``until_end``. Raises :class:`LogNotFoundError` if the log does not exist."""

    async def claim(self, name: str, holder: str, ttl_s: float) -> str | None:
        """Take the lock ``name`` for ``holder``; returns the current holder if someone else has it."""

    async def release(self, name: str, holder: str) -> None: ...

    async def holder(self, name: str) -> str | None:
        """Who holds the lock ``name`` now (None: free)."""

    async def request_cancel(self, key: str) -> None: ...

    async def cancel_requested(self, key: str) -> bool: ...

    async def close(self) -> None: ...


# -- in memory ----------------------------------------------------------------------------------------

@dataclass
class _Log:
    meta: dict
    expires_at: float
    events: list[tuple[int, dict]] = field(default_factory=list)
    changed: asyncio.Event = field(default_factory=asyncio.Event)
    cancel: bool = False


class InMemoryEventLog:
    def __init__(self, max_events_per_log: int = 20_000):
        self.max_events_per_log = max_events_per_log
        self._logs: dict[str, _Log] = {}
        self._locks: dict[str, tuple[str, float]] = {}
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

    async def create(self, key: str, meta: dict, ttl_s: float) -> None:
        self._purge()
        self._logs[key] = _Log(meta=dict(meta), expires_at=time.time() + ttl_s)

    async def meta(self, key: str) -> dict | None:
        log = self._live(key)
        return None if log is None else dict(log.meta)

    async def append(self, key: str, event: dict) -> str:
        log = self._live(key)
        if log is None:
            raise LogNotFoundError(key)
        self._next_id += 1
        log.events.append((self._next_id, event))
        if len(log.events) > self.max_events_per_log:
            del log.events[: len(log.events) - self.max_events_per_log]
        log.changed.set()
        log.changed = asyncio.Event()
        return str(self._next_id)

    async def last_id(self, key: str) -> str | None:
        log = self._live(key)
        return str(log.events[-1][0]) if log is not None and log.events else None

    async def finish(self, key: str, retention_s: float) -> None:
        await self.touch(key, retention_s)

    async def touch(self, key: str, ttl_s: float) -> None:
        log = self._live(key)
        if log is not None:
            log.expires_at = time.time() + ttl_s

    async def read(self, key: str, after: str | None, until_end: bool) -> AsyncIterator[tuple[str, dict]]:
        log = self._live(key)
        if log is None:
            raise LogNotFoundError(key)
        last = int(after) if after else 0
        while True:
            changed = log.changed
            for event_id, event in [e for e in log.events if e[0] > last]:
                last = event_id
                yield str(event_id), event
                if until_end and event.get("type") in END_EVENTS:
                    return
            await changed.wait()

    async def claim(self, name: str, holder: str, ttl_s: float) -> str | None:
        current = self._locks.get(name)
        if current is not None and current[0] != holder and time.time() < current[1]:
            return current[0]
        self._locks[name] = (holder, time.time() + ttl_s)
        return None

    async def release(self, name: str, holder: str) -> None:
        if self._locks.get(name, (None,))[0] == holder:
            del self._locks[name]

    async def holder(self, name: str) -> str | None:
        current = self._locks.get(name)
        return current[0] if current is not None and time.time() < current[1] else None

    async def request_cancel(self, key: str) -> None:
        log = self._live(key)
        if log is not None:
            log.cancel = True

    async def cancel_requested(self, key: str) -> bool:
        log = self._live(key)
        return bool(log and log.cancel)

    async def close(self) -> None:
        pass


# -- Redis Streams ------------------------------------------------------------------------------------

class RedisEventLog:
    """One stream per log (``XADD``, capped with ``MAXLEN ~``), its metadata in a string key, locks
    as ``SET NX PX`` keys, cancellation as a flag key. Readers block in ``XREAD``."""

    _RELEASE = "if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end return 0"

    def __init__(self, url: str, key_prefix: str = "chatserve:", max_events_per_log: int = 20_000,
                 block_ms: int = 1000):
        import redis.asyncio as redis

        # Timeouts: an unreachable or hung Redis fails the call (503) instead of hanging it; reads
        # block in XREAD for block_ms, so the socket timeout is longer than that.
        self.redis = redis.Redis.from_url(url, decode_responses=True, socket_connect_timeout=5,
                                          socket_timeout=block_ms / 1000 + 10)
        self.prefix = key_prefix
        self.max_events_per_log = max_events_per_log
        self.block_ms = block_ms
        self._release = self.redis.register_script(self._RELEASE)

    def _k(self, key: str, part: str) -> str:
        return f"{self.prefix}log:{key}:{part}"

    async def create(self, key: str, meta: dict, ttl_s: float) -> None:
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.delete(self._k(key, "events"), self._k(key, "cancel"))
            pipe.set(self._k(key, "meta"), json.dumps(meta), px=int(ttl_s * 1000))
            await pipe.execute()

    async def meta(self, key: str) -> dict | None:
        raw = await self.redis.get(self._k(key, "meta"))
        return None if raw is None else json.loads(raw)

    async def append(self, key: str, event: dict) -> str:
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.xadd(self._k(key, "events"), {"e": json.dumps(event)}, maxlen=self.max_events_per_log,
                      approximate=True)
            pipe.pttl(self._k(key, "meta"))
            event_id, ttl_ms = await pipe.execute()
        if ttl_ms > 0:
            await self.redis.pexpire(self._k(key, "events"), ttl_ms)
        return event_id

    async def last_id(self, key: str) -> str | None:
        newest = await self.redis.xrevrange(self._k(key, "events"), count=1)
        return newest[0][0] if newest else None

    async def finish(self, key: str, retention_s: float) -> None:
        await self.touch(key, retention_s)

    async def touch(self, key: str, ttl_s: float) -> None:
        ms = int(ttl_s * 1000)
        async with self.redis.pipeline(transaction=True) as pipe:
            for part in ("meta", "events"):
                pipe.pexpire(self._k(key, part), ms)
            await pipe.execute()

    async def read(self, key: str, after: str | None, until_end: bool) -> AsyncIterator[tuple[str, dict]]:
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
                event = json.loads(fields["e"])
                yield event_id, event
                if until_end and event.get("type") in END_EVENTS:
                    return

    async def claim(self, name: str, holder: str, ttl_s: float) -> str | None:
        lock = f"{self.prefix}lock:{name}"
        if await self.redis.set(lock, holder, nx=True, px=int(ttl_s * 1000)):
            return None
        current = await self.redis.get(lock)
        if current is None or current == holder:
            return await self.claim(name, holder, ttl_s) if current is None else None
        return current

    async def release(self, name: str, holder: str) -> None:
        await self._release(keys=[f"{self.prefix}lock:{name}"], args=[holder])

    async def holder(self, name: str) -> str | None:
        return await self.redis.get(f"{self.prefix}lock:{name}")

    async def request_cancel(self, key: str) -> None:
        await self.redis.set(self._k(key, "cancel"), "1", ex=3600)

    async def cancel_requested(self, key: str) -> bool:
        return bool(await self.redis.exists(self._k(key, "cancel")))

    async def close(self) -> None:
        await self.redis.aclose()


def create_event_log(settings) -> EventLog:
    """The event log that goes with the session store: Redis Streams with ``store: redis``."""
    if settings.store == "redis":
        return RedisEventLog(redis_url(settings), key_prefix=settings.redis_key_prefix)
    return InMemoryEventLog()


def redis_url(settings) -> str:
    return settings.redis_url or os.environ.get("REDIS_URL") or "redis://127.0.0.1:6379/0"
