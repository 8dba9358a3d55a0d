"""Per-identity limits, so one client's greed never hurts another's.

Each figure is ``args.limits``'s unless the caller's API key carries its own (a quota tier).

- **Requests per minute** and **tokens per minute**: token buckets per owner, refilled continuously
  (capacity = the per-minute figure). A request takes one request token; tokens are charged after a
  reply with its real usage (prompt + completion), so the bucket may go below zero and the next
  request waits until it is positive again. Over a limit: 429 with ``Retry-After``.
- **Concurrent replies**: at most ``max_concurrent_replies`` replies of an owner generate at once,
  including replies whose client left (they still finish; the owner sees them in ``GET /v1/replies``
  and may cancel them). A slot is a lease, renewed while its reply runs, so a crashed ingress frees
  its slots within ``SLOT_LEASE_S``.

In memory by default (one ingress replica); in Redis with ``store: redis`` (Lua scripts keep each
check atomic), so every ingress replica shares the same buckets and slots.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import time
from collections.abc import AsyncIterator
from typing import Protocol

import redis.asyncio as aioredis

from ..config import LimitSettings
from ..errors import ApiError
from .auth import Identity

SLOT_LEASE_S = 15.0


def too_many(message: str, retry_after_s: float, code: str) -> ApiError:
    return ApiError(429, message, type="rate_limit_exceeded", code=code, retry_after_s=max(1, math.ceil(retry_after_s)))


class LimitBackend(Protocol):
    async def bucket(self, key: str, capacity: float, rate_per_s: float, cost: float, mode: str) -> tuple[bool, float]:
        """Refill then: ``take`` (``cost`` if there is as much), ``charge`` (always, may go negative) or
        ``peek`` (ok while positive). Returns (ok, tokens left)."""

    async def acquire(self, key: str, member: str, limit: int, lease_s: float) -> bool: ...

    async def renew(self, key: str, member: str, lease_s: float) -> None: ...

    async def release(self, key: str, member: str) -> None: ...

    async def members(self, key: str) -> list[str]: ...


def _refill(tokens: float, last_s: float, now_s: float, capacity: float, rate_per_s: float) -> float:
    return min(capacity, tokens + (now_s - last_s) * rate_per_s)


def _apply(tokens: float, cost: float, mode: str) -> tuple[bool, float]:
    if mode == "charge":
        return True, tokens - cost
    if mode == "peek":
        return tokens > 0, tokens
    return (True, tokens - cost) if tokens >= cost else (False, tokens)


class InMemoryLimits:
    def __init__(self):
        self._buckets: dict[str, tuple[float, float]] = {}
        self._slots: dict[str, dict[str, float]] = {}

    async def bucket(self, key, capacity, rate_per_s, cost, mode):
        now = time.monotonic()
        tokens, last = self._buckets.get(key, (capacity, now))
        ok, tokens = _apply(_refill(tokens, last, now, capacity, rate_per_s), cost, mode)
        self._buckets[key] = (tokens, now)
        return ok, tokens

    def _live(self, key: str) -> dict[str, float]:
        now = time.monotonic()
        slots = {m: t for m, t in self._slots.get(key, {}).items() if t > now}
        self._slots[key] = slots
        return slots

    async def acquire(self, key, member, limit, lease_s):
        slots = self._live(key)
        if member not in slots and len(slots) >= limit:
            return False
        slots[member] = time.monotonic() + lease_s
        return True

    async def renew(self, key, member, lease_s):
        slots = self._live(key)
        if member in slots:
            slots[member] = time.monotonic() + lease_s

    async def release(self, key, member):
        self._live(key).pop(member, None)

    async def members(self, key):
        return list(self._live(key))


_BUCKET = """
local capacity, rate, now, cost, mode = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3]), tonumber(ARGV[4]), ARGV[5]
local state = redis.call('HMGET', KEYS[1], 'tokens', 'ts')
local tokens = tonumber(state[1]) or capacity
local last = tonumber(state[2]) or now
tokens = math.min(capacity, tokens + math.max(0, now - last) * rate)
local ok = 1
if mode == 'charge' then tokens = tokens - cost
elseif mode == 'peek' then if tokens <= 0 then ok = 0 end
elseif tokens >= cost then tokens = tokens - cost else ok = 0 end
redis.call('HSET', KEYS[1], 'tokens', tostring(tokens), 'ts', tostring(now))
redis.call('PEXPIRE', KEYS[1], math.ceil((capacity - math.min(tokens, 0)) / rate * 1000) + 1000)
return {ok, tostring(tokens)}
"""

_ACQUIRE = """
local now, limit, lease = tonumber(ARGV[2]), tonumber(ARGV[3]), tonumber(ARGV[4])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
if not redis.call('ZSCORE', KEYS[1], ARGV[1]) and redis.call('ZCARD', KEYS[1]) >= limit then return 0 end
redis.call('ZADD', KEYS[1], now + lease, ARGV[1])
redis.call('PEXPIRE', KEYS[1], math.ceil(lease * 1000))
return 1
"""


class RedisLimits:
    def __init__(self, client: aioredis.Redis, key_prefix: str = "chatserve:"):
        self.redis = client
        self.prefix = f"{key_prefix}limits:"
        self._bucket = client.register_script(_BUCKET)
        self._acquire = client.register_script(_ACQUIRE)

    async def bucket(self, key, capacity, rate_per_s, cost, mode):
        ok, tokens = await self._bucket(keys=[self.prefix + key], args=[capacity, rate_per_s, time.time(), cost, mode])
        return bool(ok), float(tokens)

    async def acquire(self, key, member, limit, lease_s):
        return bool(await self._acquire(keys=[self.prefix + key], args=[member, time.time(), limit, lease_s]))

    async def renew(self, key, member, lease_s):
        await self.redis.zadd(self.prefix + key, {member: time.time() + lease_s}, xx=True)
        await self.redis.pexpire(self.prefix + key, math.ceil(lease_s * 1000))

    async def release(self, key, member):
        await self.redis.zrem(self.prefix + key, member)

    async def members(self, key):
        return await self.redis.zrangebyscore(self.prefix + key, time.time(), "+inf")


class Limits:
    def __init__(self, settings: LimitSettings, backend: LimitBackend):
        self.settings = settings
        self.backend = backend

    async def check_request(self, who: Identity) -> None:
        per_min = who.requests_per_min or self.settings.requests_per_min
        ok, tokens = await self.backend.bucket(f"req:{who.owner}", per_min, per_min / 60, 1, "take")
        if not ok:
            raise too_many(f"rate limit: {per_min} requests per minute", (1 - tokens) / (per_min / 60),
                           "rate_limit_exceeded")

    async def check_tokens(self, who: Identity) -> None:
        per_min = who.tokens_per_min or self.settings.tokens_per_min
        ok, tokens = await self.backend.bucket(f"tok:{who.owner}", per_min, per_min / 60, 0, "peek")
        if not ok:
            raise too_many(f"token limit: {per_min} tokens per minute", (1 - tokens) / (per_min / 60),
                           "tokens_limit_exceeded")

    async def charge_tokens(self, who: Identity, tokens: int) -> None:
        per_min = who.tokens_per_min or self.settings.tokens_per_min
        await self.backend.bucket(f"tok:{who.owner}", per_min, per_min / 60, tokens, "charge")

    @contextlib.asynccontextmanager
    async def reply_slot(self, who: Identity, reply_id: str) -> AsyncIterator[None]:
        """Hold one of the caller's concurrent-reply slots while the block runs (429 if none is free)."""
        limit = who.max_concurrent_replies or self.settings.max_concurrent_replies
        owner = who.owner
        if not await self.backend.acquire(f"replies:{owner}", reply_id, limit, SLOT_LEASE_S):
            raise too_many(f"{limit} replies are already being generated for you; wait for one to end or "
                           "cancel one (GET /v1/replies lists them)", 1, "too_many_concurrent_replies")
        renewer = asyncio.create_task(self._renew(owner, reply_id))
        try:
            yield
        finally:
            renewer.cancel()
            with contextlib.suppress(Exception):  # the lease runs out by itself if the store is gone
                await self.backend.release(f"replies:{owner}", reply_id)

    async def _renew(self, owner: str, reply_id: str) -> None:
        while True:
            await asyncio.sleep(SLOT_LEASE_S / 3)
            with contextlib.suppress(Exception):
                await self.backend.renew(f"replies:{owner}", reply_id, SLOT_LEASE_S)

    async def active_replies(self, owner: str) -> list[str]:
        return await self.backend.members(f"replies:{owner}")
