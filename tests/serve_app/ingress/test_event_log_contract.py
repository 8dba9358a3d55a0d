"""The event logs behind resumable replies and rooms, and the turn lock and cancel flags beside them:
one contract each, in memory and on a real Redis."""

import asyncio

import pytest

from serve_app.events import DeltaEvent, DoneEvent, MemberJoinedEvent
from serve_app.ingress.event_log import InMemoryEventLog, LogNotFoundError, RedisEventLog
from serve_app.ingress.locks import (
    InMemoryCancelFlags,
    InMemoryRoomMembers,
    InMemoryTurnLock,
    RedisCancelFlags,
    RedisRoomMembers,
    RedisTurnLock,
)
from serve_app.redis_client import connect
from serve_app.schemas import ReplyMeta


@pytest.fixture(params=["memory", "redis"])
async def backends(request, redis_prefix):
    """(event log, turn lock, cancel flags, room members) of one kind."""
    if request.param == "memory":
        yield InMemoryEventLog(), InMemoryTurnLock(), InMemoryCancelFlags(), InMemoryRoomMembers()
        return
    client = connect(request.getfixturevalue("redis_url"), blocking_read_s=0.1)
    yield (RedisEventLog(client, key_prefix=redis_prefix, block_ms=100), RedisTurnLock(client, redis_prefix),
           RedisCancelFlags(client, redis_prefix), RedisRoomMembers(client, redis_prefix))
    await client.aclose()


async def collect(log, key, after, until_end=True):
    return [item async for item in log.read(key, after, until_end)]


async def test_read_after_an_id_gets_the_rest_then_live_events_until_the_end(backends):
    log, *_ = backends
    await log.create("r1", ReplyMeta(session_id="s", owner="a"), ttl_s=60)
    ids = [await log.append("r1", DeltaEvent(text=t)) for t in "abc"]
    assert await log.last_id("r1") == ids[-1] and (await log.meta("r1")) == ReplyMeta(session_id="s", owner="a")
    reader = asyncio.create_task(collect(log, "r1", ids[0]))
    await asyncio.sleep(0.3)
    await log.append("r1", DeltaEvent(text="d"))
    await log.append("r1", DoneEvent(finish_reason="stop"))
    await log.append("r1", DeltaEvent(text="after the end"))
    events = await asyncio.wait_for(reader, 10)
    assert [getattr(e, "text", None) for _, e in events] == ["b", "c", "d", None]
    assert [type(e) for _, e in await collect(log, "r1", None)][-1] is DoneEvent
    stored = await log.stored("r1")  # everything so far, without waiting for more
    assert [getattr(e, "text", None) for _, e in stored] == ["a", "b", "c", "d", None, "after the end"]
    assert [event_id for event_id, _ in stored][:3] == ids


async def test_a_timeline_is_not_cut_by_end_events_unless_asked(backends):
    log, *_ = backends
    await log.create("room", ReplyMeta(session_id="s", room=True), ttl_s=60)
    await log.append("room", DoneEvent(reply_id="r1", finish_reason="stop"))
    await log.append("room", MemberJoinedEvent(member="bob"))
    reader = asyncio.create_task(collect(log, "room", None, until_end=False))
    await asyncio.sleep(0.3)
    assert not reader.done()
    reader.cancel()
    assert [type(e) for _, e in await collect(log, "room", None)] == [DoneEvent]


async def test_a_missing_log_cannot_be_read_or_written(backends):
    log, *_ = backends
    with pytest.raises(LogNotFoundError):
        await collect(log, "nope", None)
    with pytest.raises(LogNotFoundError):
        await log.append("nope", DeltaEvent(text="x"))
    with pytest.raises(LogNotFoundError):
        await log.stored("nope")
    assert await log.meta("nope") is None


async def test_turn_lock_has_one_holder_and_only_it_releases(backends):
    _, locks, *_ = backends
    assert await locks.claim("turn:s1", "r1", 30) is None
    assert await locks.claim("turn:s1", "r2", 30) == "r1"
    await locks.release("turn:s1", "r2")  # not the holder: no effect
    assert await locks.claim("turn:s1", "r2", 30) == "r1"
    assert await locks.holder("turn:s1") == "r1"
    await locks.release("turn:s1", "r1")
    assert await locks.holder("turn:s1") is None
    assert await locks.claim("turn:s1", "r2", 30) is None
    assert await locks.holder("turn:s1") == "r2"


async def test_a_turn_lock_expires_after_its_ttl(backends):
    _, locks, *_ = backends
    assert await locks.claim("turn:s2", "r1", 0.3) is None
    await asyncio.sleep(0.5)
    assert await locks.holder("turn:s2") is None
    assert await locks.claim("turn:s2", "r2", 30) is None


async def test_cancel_flags(backends):
    _, _, cancels, _ = backends
    assert not await cancels.requested("r9")
    await cancels.request("r9")
    assert await cancels.requested("r9")
    assert not await cancels.requested("r10")


async def test_a_finished_log_expires_after_its_retention(backends):
    log, *_ = backends
    await log.create("r5", ReplyMeta(session_id="s"), ttl_s=60)
    await log.append("r5", DoneEvent(finish_reason="stop"))
    await log.finish("r5", retention_s=0.5)
    await asyncio.sleep(1.0)
    assert await log.meta("r5") is None


async def test_a_lease_is_renewed_only_by_its_holder(backends):
    _, locks, *_ = backends
    assert await locks.claim("turn:s3", "r1", 0.4) is None
    assert not await locks.renew("turn:s3", "r2", 10)
    for _ in range(3):  # renewed past its first expiry
        await asyncio.sleep(0.25)
        assert await locks.renew("turn:s3", "r1", 0.4)
    assert await locks.holder("turn:s3") == "r1"
    await asyncio.sleep(0.6)
    assert await locks.holder("turn:s3") is None and not await locks.renew("turn:s3", "r1", 10)


async def test_a_room_holds_a_bounded_number_of_members(backends):
    *_, members = backends
    assert await members.join("room:a", "ann", limit=2, ttl_s=60)
    assert await members.join("room:a", "bob", limit=2, ttl_s=60)
    assert await members.join("room:a", "ann", limit=2, ttl_s=60)  # rejoining is not a new member
    assert not await members.join("room:a", "carl", limit=2, ttl_s=60)
    assert await members.join("room:b", "carl", limit=2, ttl_s=60)
