"""The Redis session store (``store: redis``): sessions outlive the app and are shared by replicas.

Layout, under ``key_prefix`` (default ``chatserve:``):
- ``{prefix}session:{id}``        hash: ``owner``, ``meta`` (the session's JSON without turns and
                                  ``updated_at``), ``updated_at`` (epoch seconds, as text);
- ``{prefix}session:{id}:turns``  list of Turn JSON, oldest first;
- ``{prefix}owner:{owner}``       sorted set of the owner's session ids, scored by ``updated_at``.

Reads and appends run as Lua scripts, so each is atomic on the server: an append pushes onto the
turns list only if the session hash exists (RPUSH keeps concurrent appends, in arrival order), then
stamps ``updated_at``, refreshes the expiry of all three keys and returns the session as it is right
after that append. Every key carries the session TTL; the owner index lives as long as the owner's
newest session, and listing drops the ids whose session has expired. The scripts derive the owner
index key from the stored owner, so this store wants a single Redis server (not Redis Cluster).
"""

from __future__ import annotations

import contextlib
import json
import time
from collections.abc import AsyncIterator

import redis.asyncio as aioredis
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from .schemas import Session, Turn
from .store import SessionStoreUnavailableError

DEFAULT_REDIS_URL = "redis://127.0.0.1:6379/0"

# KEYS: session hash, turns list. ARGV: now, ttl_ms, owner key prefix, session id, [turn JSON].
_TOUCH = """
local owner = redis.call('HGET', KEYS[1], 'owner')
if not owner then return false end
if ARGV[5] then redis.call('RPUSH', KEYS[2], ARGV[5]) end
redis.call('HSET', KEYS[1], 'updated_at', ARGV[1])
redis.call('PEXPIRE', KEYS[1], ARGV[2])
redis.call('PEXPIRE', KEYS[2], ARGV[2])
local owner_key = ARGV[3] .. owner
redis.call('ZADD', owner_key, ARGV[1], ARGV[4])
redis.call('PEXPIRE', owner_key, ARGV[2])
return {redis.call('HGET', KEYS[1], 'meta'), ARGV[1], redis.call('LRANGE', KEYS[2], 0, -1)}
"""

# KEYS: session hash, turns list. ARGV: owner key prefix, session id.
_DELETE = """
local owner = redis.call('HGET', KEYS[1], 'owner')
if not owner then return 0 end
redis.call('DEL', KEYS[1], KEYS[2])
redis.call('ZREM', ARGV[1] .. owner, ARGV[2])
return 1
"""

# KEYS: owner index. ARGV: session key prefix, owner, ids... Drops ids whose session is gone.
_PRUNE = """
for i = 3, #ARGV do
  if redis.call('HGET', ARGV[1] .. ARGV[i], 'owner') ~= ARGV[2] then redis.call('ZREM', KEYS[1], ARGV[i]) end
end
return 0
"""


class RedisSessionStore:
    """A :class:`~serve_app.store.SessionStore` on Redis (redis-py asyncio). Connects at first use;
    an unreachable server raises :class:`SessionStoreUnavailableError`."""

    def __init__(self, client: aioredis.Redis, ttl_s: float, key_prefix: str = "chatserve:"):
        self.client = client
        self.ttl_s = ttl_s
        self.key_prefix = key_prefix
        self._touch = client.register_script(_TOUCH)
        self._delete = client.register_script(_DELETE)
        self._prune = client.register_script(_PRUNE)

    @classmethod
    def from_url(cls, url: str, ttl_s: float, key_prefix: str = "chatserve:") -> RedisSessionStore:
        # Timeouts: a hung or unreachable Redis becomes a 503 within seconds instead of a stuck request.
        client = aioredis.Redis.from_url(url, decode_responses=True, socket_connect_timeout=5, socket_timeout=10)
        return cls(client, ttl_s, key_prefix)

    async def aclose(self) -> None:
        await self.client.aclose()

    # -- keys ------------------------------------------------------------------------------------------

    @property
    def _ttl_ms(self) -> int:
        return max(1, round(self.ttl_s * 1000))

    def _session_key(self, session_id: str) -> str:
        return f"{self.key_prefix}session:{session_id}"

    def _turns_key(self, session_id: str) -> str:
        return f"{self.key_prefix}session:{session_id}:turns"

    @property
    def _owner_prefix(self) -> str:
        return f"{self.key_prefix}owner:"

    def _owner_key(self, owner: str) -> str:
        return self._owner_prefix + owner

    @property
    def _where(self) -> str:
        kwargs = self.client.connection_pool.connection_kwargs
        if kwargs.get("path"):
            return f"unix://{kwargs['path']}"
        return f"redis://{kwargs.get('host')}:{kwargs.get('port')}/{kwargs.get('db', 0)}"

    @contextlib.asynccontextmanager
    async def _reachable(self) -> AsyncIterator[None]:
        try:
            yield
        except (RedisConnectionError, RedisTimeoutError) as e:
            raise SessionStoreUnavailableError(f"session store: cannot reach Redis at {self._where}: {e}") from e

    @staticmethod
    def _decode(meta: str, updated_at: str, turns: list[str]) -> Session:
        return Session.model_validate({**json.loads(meta), "updated_at": float(updated_at),
                                       "turns": [Turn.model_validate_json(t) for t in turns]})

    # -- SessionStore ------------------------------------------------------------------------------------

    async def create(self, session: Session) -> None:
        sid, ttl_ms, owner_key = session.id, self._ttl_ms, self._owner_key(session.owner)
        meta = session.model_dump_json(exclude={"turns", "updated_at"})
        async with self._reachable(), self.client.pipeline(transaction=True) as pipe:
            pipe.delete(self._session_key(sid), self._turns_key(sid))
            pipe.hset(self._session_key(sid),
                      mapping={"owner": session.owner, "meta": meta, "updated_at": repr(session.updated_at)})
            pipe.pexpire(self._session_key(sid), ttl_ms)
            if session.turns:
                pipe.rpush(self._turns_key(sid), *(t.model_dump_json() for t in session.turns))
                pipe.pexpire(self._turns_key(sid), ttl_ms)
            pipe.zadd(owner_key, {sid: session.updated_at})
            pipe.pexpire(owner_key, ttl_ms)
            await pipe.execute()

    async def _touch_session(self, session_id: str, turn: Turn | None) -> Session | None:
        args = [repr(time.time()), self._ttl_ms, self._owner_prefix, session_id]
        if turn is not None:
            args.append(turn.model_dump_json())
        async with self._reachable():
            found = await self._touch(keys=[self._session_key(session_id), self._turns_key(session_id)], args=args)
        return None if found is None else self._decode(*found)

    async def get(self, session_id: str) -> Session | None:
        """The session, or None; reading counts as activity (stamps ``updated_at``, refreshes the TTL)."""
        return await self._touch_session(session_id, None)

    async def append_turn(self, session_id: str, turn: Turn) -> Session | None:
        return await self._touch_session(session_id, turn)

    async def delete(self, session_id: str) -> bool:
        async with self._reachable():
            deleted = await self._delete(keys=[self._session_key(session_id), self._turns_key(session_id)],
                                         args=[self._owner_prefix, session_id])
        return bool(deleted)

    async def list_for_owner(self, owner: str) -> list[Session]:
        """The owner's live sessions, most recently active first (listing is not activity)."""
        owner_key = self._owner_key(owner)
        async with self._reachable():
            ids = await self.client.zrange(owner_key, 0, -1, desc=True)
            if not ids:
                return []
            async with self.client.pipeline(transaction=True) as pipe:
                for sid in ids:
                    pipe.hmget(self._session_key(sid), ["owner", "meta", "updated_at"])
                    pipe.lrange(self._turns_key(sid), 0, -1)
                replies = await pipe.execute()
            sessions, gone = [], []
            for sid, (found_owner, meta, updated_at), turns in zip(ids, replies[::2], replies[1::2], strict=True):
                if found_owner == owner:
                    sessions.append(self._decode(meta, updated_at, turns))
                else:
                    gone.append(sid)
            if gone:
                await self._prune(keys=[owner_key], args=[f"{self.key_prefix}session:", owner, *gone])
        return sorted(sessions, key=lambda s: s.updated_at, reverse=True)
