"""Per-identity limits, one contract in memory and on a real Redis: request and token buckets, the
concurrent-reply slots (leases that a dead holder loses), an API key's own quota."""

import asyncio

import pytest

from serve_app.config import LimitSettings
from serve_app.errors import ApiError
from serve_app.ingress.auth import Identity
from serve_app.ingress.limits import InMemoryLimits, Limits, RedisLimits
from serve_app.redis_client import connect


@pytest.fixture(params=["memory", "redis"])
async def backend(request, redis_prefix):
    if request.param == "memory":
        yield InMemoryLimits()
        return
    client = connect(request.getfixturevalue("redis_url"))
    yield RedisLimits(client, redis_prefix)
    await client.aclose()


def who(name: str, **quota) -> Identity:
    return Identity(f"user:{name}", name, False, "key", **quota)


async def test_requests_per_minute_then_429_with_retry_after_and_others_unaffected(backend):
    limits = Limits(LimitSettings(requests_per_min=3), backend)
    for _ in range(3):
        await limits.check_request(who("greedy"))
    with pytest.raises(ApiError) as refused:
        await limits.check_request(who("greedy"))
    err = refused.value
    assert err.status == 429 and err.code == "rate_limit_exceeded" and err.headers() == {"Retry-After": "20"}
    assert err.body()["error"]["type"] == "rate_limit_exceeded"
    await limits.check_request(who("polite"))  # another identity has its own bucket


async def test_tokens_are_charged_after_use_and_the_debt_is_waited_out(backend):
    limits = Limits(LimitSettings(tokens_per_min=600), backend)  # 10 tokens a second
    await limits.check_tokens(who("big"))
    await limits.charge_tokens(who("big"), 620)  # a long reply: the bucket goes below zero
    with pytest.raises(ApiError) as refused:
        await limits.check_tokens(who("big"))
    assert refused.value.code == "tokens_limit_exceeded" and 2 <= refused.value.retry_after_s <= 3
    await asyncio.sleep(2.5)  # refilled past zero
    await limits.check_tokens(who("big"))


async def test_concurrent_replies_are_slots_freed_at_the_end(backend):
    limits = Limits(LimitSettings(max_concurrent_replies=2), backend)
    alice = who("alice")
    async with limits.reply_slot(alice, "r1"), limits.reply_slot(alice, "r2"):
        assert sorted(await limits.active_replies(alice.owner)) == ["r1", "r2"]
        with pytest.raises(ApiError) as refused:
            async with limits.reply_slot(alice, "r3"):
                pass
        assert refused.value.code == "too_many_concurrent_replies" and refused.value.status == 429
        async with limits.reply_slot(who("bob"), "r4"):
            pass
    assert await limits.active_replies(alice.owner) == []
    async with limits.reply_slot(alice, "r5"):
        pass


async def test_a_slot_whose_holder_died_is_freed_when_its_lease_runs_out(backend):
    assert await backend.acquire("replies:user:x", "dead", 1, lease_s=0.3)
    assert not await backend.acquire("replies:user:x", "next", 1, lease_s=0.3)
    await asyncio.sleep(0.5)  # nobody renewed it
    assert await backend.acquire("replies:user:x", "next", 1, lease_s=10)


async def test_a_keys_own_quota_overrides_the_defaults(backend):
    limits = Limits(LimitSettings(max_concurrent_replies=1, requests_per_min=1), backend)
    tier = who("service", max_concurrent_replies=3, requests_per_min=5)
    async with limits.reply_slot(tier, "a"), limits.reply_slot(tier, "b"), limits.reply_slot(tier, "c"):
        pass
    for _ in range(5):
        await limits.check_request(tier)
    with pytest.raises(ApiError):
        await limits.check_request(tier)
