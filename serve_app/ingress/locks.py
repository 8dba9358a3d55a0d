"""Small coordination primitives of replies and rooms, each in memory (one ingress replica) and on
Redis (any number of ingress replicas):

- :class:`TurnLock`: one reply at a time per session. The producer of a reply claims its session's
  lock (named :func:`turn_lock_name`) as a short lease (``LOCK_LEASE_S``) and renews it while the
  reply runs, so a producer that dies (its ingress killed, its Redis calls failing) frees the session
  within one lease, not at the end of ``max_reply_s``. A second turn meanwhile sees the holder and
  gets 409. The holder is the reply id, so "which reply is running in this session" is one read, and
  "is this reply's producer alive" too.
- :class:`CancelFlags`: a cancel may be asked on any ingress replica; the producing replica polls
  its reply's flag and aborts the reply.
- :class:`RoomMembers`: who has joined a room, bounded.
"""

from __future__ import annotations

import time
from typing import Protocol

import redis.asyncio as aioredis

CANCEL_FLAG_TTL_S = 3600
LOCK_LEASE_S = 15.0


def turn_lock_name(session_id: str) -> str:
    return f"turn:{session_id}"


class TurnLock(Protocol):
    async def claim(self, name: str, holder: str, ttl_s: float) -> str | None:
        """Take the lock ``name`` for ``holder`` for at most ``ttl_s``; returns the current holder
        if someone else has it (None: taken)."""

    async def renew(self, name: str, holder: str, ttl_s: float) -> bool:
        """Extend ``holder``'s lease by ``ttl_s`` from now; False if it no longer holds the lock."""

    async def release(self, name: str, holder: str) -> None:
        """Free the lock if ``holder`` holds it (anyone else's release is ignored)."""

    async def holder(self, name: str) -> str | None:
        """Who holds the lock ``name`` now (None: free)."""


class CancelFlags(Protocol):
    async def request(self, key: str) -> None: ...

    async def requested(self, key: str) -> bool: ...


class RoomMembers(Protocol):
    async def join(self, room: str, member: str, limit: int, ttl_s: float) -> bool:
        """Add ``member``; False if the room already has ``limit`` other members."""


class InMemoryTurnLock:
    def __init__(self):
        self._locks: dict[str, tuple[str, float]] = {}

    async def claim(self, name: str, holder: str, ttl_s: float) -> str | None:
        current = await self.holder(name)
        if current is not None and current != holder:
            return current
        self._locks[name] = (holder, time.time() + ttl_s)
        return None

    async def renew(self, name: str, holder: str, ttl_s: float) -> bool:
        if await self.holder(name) != holder:
            return False
        self._locks[name] = (holder, time.time() + ttl_s)
        return True

    async def release(self, name: str, holder: str) -> None:
        if self._locks.get(name, (None,))[0] == holder:
            del self._locks[name]

    async def holder(self, name: str) -> str | None:
        current = self._locks.get(name)
        if current is not None and time.time() >= current[1]:
            del self._locks[name]
            return None
        return None if current is None else current[0]


class InMemoryCancelFlags:
    def __init__(self):
        self._flags: dict[str, float] = {}

    async def request(self, key: str) -> None:
        now = time.time()
        self._flags = {k: t for k, t in self._flags.items() if t > now}
        self._flags[key] = now + CANCEL_FLAG_TTL_S

    async def requested(self, key: str) -> bool:
        return self._flags.get(key, 0.0) > time.time()


class InMemoryRoomMembers:
    def __init__(self):
        self._rooms: dict[str, tuple[set[str], float]] = {}

    async def join(self, room: str, member: str, limit: int, ttl_s: float) -> bool:
        now = time.time()
        self._rooms = {r: v for r, v in self._rooms.items() if v[1] > now}
        members = self._rooms.get(room, (set(), 0.0))[0]
        if member not in members and len(members) >= limit:
            return False
        self._rooms[room] = (members | {member}, now + ttl_s)
        return True


class RedisTurnLock:
    """Locks as ``SET NX PX`` keys; release is a compare-and-delete script."""

    _RELEASE = "if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end return 0"
    _RENEW = "if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('PEXPIRE', KEYS[1], ARGV[2]) end return 0"

    def __init__(self, client: aioredis.Redis, key_prefix: str = "chatserve:"):
        self.redis = client
        self.prefix = key_prefix
        self._release = client.register_script(self._RELEASE)
        self._renew = client.register_script(self._RENEW)

    def _key(self, name: str) -> str:
        return f"{self.prefix}lock:{name}"

    async def claim(self, name: str, holder: str, ttl_s: float) -> str | None:
        while True:
            if await self.redis.set(self._key(name), holder, nx=True, px=int(ttl_s * 1000)):
                return None
            current = await self.redis.get(self._key(name))
            if current is not None:  # else it expired between the two calls: try again
                return None if current == holder else current

    async def renew(self, name: str, holder: str, ttl_s: float) -> bool:
        return bool(await self._renew(keys=[self._key(name)], args=[holder, int(ttl_s * 1000)]))

    async def release(self, name: str, holder: str) -> None:
        await self._release(keys=[self._key(name)], args=[holder])

    async def holder(self, name: str) -> str | None:
        return await self.redis.get(self._key(name))


class RedisCancelFlags:
    def __init__(self, client: aioredis.Redis, key_prefix: str = "chatserve:"):
        self.redis = client
        self.prefix = key_prefix

    def _key(self, key: str) -> str:
        return f"{self.prefix}cancel:{key}"

    async def request(self, key: str) -> None:
        await self.redis.set(self._key(key), "1", ex=CANCEL_FLAG_TTL_S)

    async def requested(self, key: str) -> bool:
        return bool(await self.redis.exists(self._key(key)))


class RedisRoomMembers:
    _JOIN = """
if redis.call('SISMEMBER', KEYS[1], ARGV[1]) == 0 and redis.call('SCARD', KEYS[1]) >= tonumber(ARGV[2]) then
  return 0
end
redis.call('SADD', KEYS[1], ARGV[1])
redis.call('PEXPIRE', KEYS[1], ARGV[3])
return 1
"""

    def __init__(self, client: aioredis.Redis, key_prefix: str = "chatserve:"):
        self.prefix = key_prefix
        self._join = client.register_script(self._JOIN)

    async def join(self, room: str, member: str, limit: int, ttl_s: float) -> bool:
        return bool(await self._join(keys=[f"{self.prefix}members:{room}"], args=[member, limit, int(ttl_s * 1000)]))
