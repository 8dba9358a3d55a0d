"""The event logs behind resumable replies and rooms: one contract, in memory and on a real Redis."""

import asyncio

import pytest

from serve_app.replies import InMemoryEventLog, LogNotFoundError, RedisEventLog


@pytest.fixture(params=["memory", "redis"])
async def log(request, redis_prefix):
    if request.param == "memory":
        yield InMemoryEventLog()
        return
    backend = RedisEventLog(request.getfixturevalue("redis_url"), key_prefix=redis_prefix, block_ms=100)
    yield backend
    await backend.close()


async def collect(log, key, after, until_end=True):
    return [item async for item in log.read(key, after, until_end)]


async def test_read_after_an_id_gets_the_rest_then_live_events_until_the_end(log):
    await log.create("r1", {"owner": "a"}, ttl_s=60)
    ids = [await log.append("r1", {"type": "delta", "text": t}) for t in "abc"]
    assert await log.last_id("r1") == ids[-1] and (await log.meta("r1")) == {"owner": "a"}
    reader = asyncio.create_task(collect(log, "r1", ids[0]))
    await asyncio.sleep(0.3)
    await log.append("r1", {"type": "delta", "text": "d"})
    await log.append("r1", {"type": "done"})
    await log.append("r1", {"type": "delta", "text": "after the end"})
    events = await asyncio.wait_for(reader, 10)
    assert [e.get("text") for _, e in events] == ["b", "c", "d", None]
    assert [e["type"] for _, e in await collect(log, "r1", None)][-1] == "done"


async def test_missing_log_claims_and_cancel(log):
    with pytest.raises(LogNotFoundError):
        await collect(log, "nope", None)
    assert await log.claim("turn:s1", "r1", 30) is None
    assert await log.claim("turn:s1", "r2", 30) == "r1"
    await log.release("turn:s1", "r2")  # not the holder: no effect
    assert await log.claim("turn:s1", "r2", 30) == "r1"
    assert await log.holder("turn:s1") == "r1"
    await log.release("turn:s1", "r1")
    assert await log.holder("turn:s1") is None
    assert await log.claim("turn:s1", "r2", 30) is None
    assert await log.holder("turn:s1") == "r2"
    await log.create("r9", {}, ttl_s=60)
    assert not await log.cancel_requested("r9")
    await log.request_cancel("r9")
    assert await log.cancel_requested("r9")


async def test_a_finished_log_expires_after_its_retention(log):
    await log.create("r5", {}, ttl_s=60)
    await log.append("r5", {"type": "done"})
    await log.finish("r5", retention_s=0.5)
    await asyncio.sleep(1.0)
    assert await log.meta("r5") is None
