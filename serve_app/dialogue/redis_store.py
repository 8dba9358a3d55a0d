"""The Redis session store (``store: redis``): sessions outlive the app and are shared by replicas.

Layout, under ``key_prefix`` (default ``chatserve:``):
- ``{prefix}session:{id}``          hash: ``owner``, ``meta`` (the session's JSON without turns,
                                    pending items, ``updated_at`` and ``revision``), ``updated_at``
                                    (epoch seconds, as text), ``revision`` (writes so far);
- ``{prefix}session:{id}:turns``    list of Turn JSON, oldest first;
- ``{prefix}session:{id}:pending``  list of Message JSON: conversation items added since the last turn;
- ``{prefix}owner:{owner}``         sorted set of the owner's session ids, scored by ``updated_at``;
- ``{prefix}sessions``              sorted set of every session id, scored by ``updated_at`` (the
                                    tiered store finds idle sessions there).

Every operation is one Lua script, so each is atomic on the server: an append pushes onto the turns
list only if the session hash exists (RPUSH keeps concurrent appends, in arrival order), removes the
pending items it consumed, bumps ``revision``, stamps ``updated_at``, refreshes the expiry of every
key and returns the session as it is right after that append; a replacement is written only over
the revision it read. Every key carries the session TTL; the
indexes live as long as their newest session, and listing drops the ids whose session has expired.
The scripts derive the owner index key from the stored owner, so this store wants a single Redis
server (not Redis Cluster).
"""

from __future__ import annotations

import contextlib
import json
import time
from collections.abc import AsyncIterator

import redis.asyncio as aioredis
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from ..errors import StoreUnavailableError
from ..redis_client import connect, where
from ..schemas import Message, Session, Turn

# Refreshes the TTL of a session's keys and indexes and returns the session.
# KEYS: hash, turns, pending, all-sessions index. ARGV: now, ttl_ms, owner key prefix, session id.
_TOUCH_AND_READ = """
local function touch_and_read()
  for i = 1, 3 do redis.call('PEXPIRE', KEYS[i], ARGV[2]) end
  local owner_key = ARGV[3] .. redis.call('HGET', KEYS[1], 'owner')
  for _, key in ipairs({owner_key, KEYS[4]}) do
    redis.call('ZADD', key, ARGV[1], ARGV[4])
    redis.call('PEXPIRE', key, ARGV[2])
  end
  return {redis.call('HGET', KEYS[1], 'meta'), redis.call('HGET', KEYS[1], 'updated_at'),
          redis.call('HGET', KEYS[1], 'revision'), redis.call('LRANGE', KEYS[2], 0, -1),
          redis.call('LRANGE', KEYS[3], 0, -1)}
end
"""

# ARGV[5]: 'get' | 'turn' (ARGV[6]: turn JSON) | 'pending' (ARGV[6..]: message JSON).
_UPDATE = _TOUCH_AND_READ + """
if not redis.call('HGET', KEYS[1], 'owner') then return false end
if ARGV[5] == 'turn' then
  redis.call('RPUSH', KEYS[2], ARGV[6])
  local consumed = {}
  for _, item in ipairs(cjson.decode(ARGV[6])['input']) do consumed[item['id']] = true end
  local kept = {}
  for _, item in ipairs(redis.call('LRANGE', KEYS[3], 0, -1)) do
    if not consumed[cjson.decode(item)['id']] then table.insert(kept, item) end
  end
  redis.call('DEL', KEYS[3])
  for _, item in ipairs(kept) do redis.call('RPUSH', KEYS[3], item) end
elseif ARGV[5] == 'pending' then
  for i = 6, #ARGV do redis.call('RPUSH', KEYS[3], ARGV[i]) end
end
if ARGV[5] ~= 'get' then redis.call('HINCRBY', KEYS[1], 'revision', 1) end
redis.call('HSET', KEYS[1], 'updated_at', ARGV[1])
return touch_and_read()
"""

# ARGV[5]: 'create' (replace any) | 'replace' (only an existing one still at ARGV[8], then revision + 1)
# | 'restore' (only a missing one, revision kept); ARGV[6..9]: owner, meta, revision, number of turns;
# then turns, pending.
_WRITE = _TOUCH_AND_READ + """
local stored = redis.call('HGET', KEYS[1], 'revision')
if ARGV[5] == 'restore' and redis.call('EXISTS', KEYS[1]) == 1 then return false end
if ARGV[5] == 'replace' and (not stored or tonumber(stored) ~= tonumber(ARGV[8])) then return false end
local revision = tonumber(ARGV[8])
if ARGV[5] == 'replace' then revision = revision + 1 end
local old_owner = redis.call('HGET', KEYS[1], 'owner')
if old_owner and old_owner ~= ARGV[6] then redis.call('ZREM', ARGV[3] .. old_owner, ARGV[4]) end
redis.call('DEL', KEYS[1], KEYS[2], KEYS[3])
redis.call('HSET', KEYS[1], 'owner', ARGV[6], 'meta', ARGV[7], 'updated_at', ARGV[1], 'revision', revision)
local turns = tonumber(ARGV[9])
for i = 10, 9 + turns do redis.call('RPUSH', KEYS[2], ARGV[i]) end
for i = 10 + turns, #ARGV do redis.call('RPUSH', KEYS[3], ARGV[i]) end
return touch_and_read()
"""

# KEYS: hash, turns, pending, all-sessions index. ARGV: owner key prefix, session id, [revision]:
# delete (only if the revision is still ARGV[3], when given).
_DELETE = """
local owner = redis.call('HGET', KEYS[1], 'owner')
if not owner then redis.call('ZREM', KEYS[4], ARGV[2]) return 0 end
if ARGV[3] and redis.call('HGET', KEYS[1], 'revision') ~= ARGV[3] then return 0 end
redis.call('DEL', KEYS[1], KEYS[2], KEYS[3])
redis.call('ZREM', ARGV[1] .. owner, ARGV[2])
redis.call('ZREM', KEYS[4], ARGV[2])
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
    """A :class:`~serve_app.dialogue.store.SessionStore` on Redis (redis-py asyncio). Connects at
    first use; an unreachable server raises :class:`~serve_app.errors.StoreUnavailableError`."""

    def __init__(self, client: aioredis.Redis, ttl_s: float, key_prefix: str = "chatserve:"):
        self.client = client
        self.ttl_s = ttl_s
        self.key_prefix = key_prefix
        self._update = client.register_script(_UPDATE)
        self._write = client.register_script(_WRITE)
        self._delete = client.register_script(_DELETE)
        self._prune = client.register_script(_PRUNE)

    @classmethod
    def from_url(cls, url: str, ttl_s: float, key_prefix: str = "chatserve:") -> RedisSessionStore:
        return cls(connect(url), ttl_s, key_prefix)

    async def open(self) -> None:
        pass

    async def close(self) -> None:
        await self.client.aclose()

    # -- keys ------------------------------------------------------------------------------------------

    @property
    def _ttl_ms(self) -> int:
        return max(1, round(self.ttl_s * 1000))

    def _keys(self, session_id: str) -> list[str]:
        base = f"{self.key_prefix}session:{session_id}"
        return [base, f"{base}:turns", f"{base}:pending", f"{self.key_prefix}sessions"]

    @property
    def _owner_prefix(self) -> str:
        return f"{self.key_prefix}owner:"

    def _head(self, session_id: str, now: float | None = None) -> list:
        return [repr(time.time() if now is None else now), self._ttl_ms, self._owner_prefix, session_id]

    @contextlib.asynccontextmanager
    async def _reachable(self) -> AsyncIterator[None]:
        try:
            yield
        except (RedisConnectionError, RedisTimeoutError) as e:
            raise StoreUnavailableError(f"session store: cannot reach Redis at {where(self.client)}: {e}") from e

    @staticmethod
    def _decode(found) -> Session | None:
        if not found:
            return None
        meta, updated_at, revision, turns, pending = found
        return Session.model_validate({**json.loads(meta), "updated_at": float(updated_at),
                                       "revision": int(revision or 0),
                                       "turns": [Turn.model_validate_json(t) for t in turns],
                                       "pending": [Message.model_validate_json(m) for m in pending]})

    async def _run_update(self, session_id: str, op: str, *payload: str) -> Session | None:
        async with self._reachable():
            return self._decode(await self._update(keys=self._keys(session_id),
                                                   args=[*self._head(session_id), op, *payload]))

    async def _run_write(self, session: Session, mode: str) -> Session | None:
        meta = session.model_dump_json(exclude={"turns", "pending", "updated_at", "revision"})
        now = None if mode == "replace" else session.updated_at  # created or restored as it says
        args = [*self._head(session.id, now), mode, session.owner, meta, session.revision, len(session.turns),
                *(t.model_dump_json() for t in session.turns), *(m.model_dump_json() for m in session.pending)]
        async with self._reachable():
            return self._decode(await self._write(keys=self._keys(session.id), args=args))

    # -- SessionStore ------------------------------------------------------------------------------------

    async def create(self, session: Session) -> None:
        await self._run_write(session, "create")

    async def get(self, session_id: str) -> Session | None:
        """The session, or None; reading counts as activity (stamps ``updated_at``, refreshes the TTL)."""
        return await self._run_update(session_id, "get")

    async def append_turn(self, session_id: str, turn: Turn) -> Session | None:
        return await self._run_update(session_id, "turn", turn.model_dump_json())

    async def add_pending(self, session_id: str, items: list[Message]) -> Session | None:
        return await self._run_update(session_id, "pending", *(m.model_dump_json() for m in items))

    async def replace(self, session: Session) -> Session | None:
        return await self._run_write(session, "replace")

    async def delete(self, session_id: str) -> bool:
        async with self._reachable():
            return bool(await self._delete(keys=self._keys(session_id), args=[self._owner_prefix, session_id]))

    async def count_for_owner(self, owner: str) -> int:
        """ZCARD of the owner index: may still count sessions that expired until listing prunes them."""
        async with self._reachable():
            return await self.client.zcard(self._owner_prefix + owner)

    async def list_for_owner(self, owner: str) -> list[Session]:
        """The owner's live sessions, most recently active first (listing is not activity)."""
        owner_key = self._owner_prefix + owner
        async with self._reachable():
            ids = await self.client.zrange(owner_key, 0, -1, desc=True)
            sessions, gone = [], []
            for sid, found in zip(ids, await self._peek_many(ids), strict=True):
                if found is not None and found.owner == owner:
                    sessions.append(found)
                else:
                    gone.append(sid)
            if gone:
                await self._prune(keys=[owner_key], args=[f"{self.key_prefix}session:", owner, *gone])
        return sorted(sessions, key=lambda s: s.updated_at, reverse=True)

    # -- for the tiered store: reading without activity, archiving, restoring -----------------------------

    async def _peek_many(self, session_ids: list[str]) -> list[Session | None]:
        if not session_ids:
            return []
        async with self.client.pipeline(transaction=True) as pipe:
            for sid in session_ids:
                hash_key, turns_key, pending_key, _ = self._keys(sid)
                pipe.hmget(hash_key, ["meta", "updated_at", "revision", "owner"])
                pipe.lrange(turns_key, 0, -1)
                pipe.lrange(pending_key, 0, -1)
            replies = await pipe.execute()
        out = []
        for (meta, updated_at, revision, owner), turns, pending in zip(replies[::3], replies[1::3], replies[2::3],
                                                                       strict=True):
            out.append(None if owner is None else self._decode([meta, updated_at, revision, turns, pending]))
        return out

    async def peek(self, session_id: str) -> Session | None:
        """The session as stored, without counting as activity."""
        async with self._reachable():
            return (await self._peek_many([session_id]))[0]

    async def idle(self, before_s: float, limit: int) -> list[str]:
        """Ids of sessions last active before ``before_s`` (epoch seconds), oldest first."""
        async with self._reachable():
            return await self.client.zrangebyscore(self._keys("")[3], "-inf", before_s, start=0, num=limit)

    async def drop_if_unchanged(self, session_id: str, revision: int) -> bool:
        """Delete the session if it is still at ``revision`` (it was archived and not touched since)."""
        async with self._reachable():
            return bool(await self._delete(keys=self._keys(session_id),
                                           args=[self._owner_prefix, session_id, str(revision)]))

    async def restore(self, session: Session) -> Session | None:
        """Bring an archived session back, unless it is here already (then None); counts as activity."""
        return await self._run_write(session, "restore")
