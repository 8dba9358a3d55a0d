"""Redis hot, PostgreSQL cold, against a real Redis and a real PostgreSQL: archiving moves idle
sessions and nothing else, a Redis flush loses nothing archived, a session touched while it is being
copied stays hot, deleted sessions never come back, listings see both tiers. (The store contract,
run on this store too, is in ``test_store_contract.py``.)"""

import pytest
import redis.asyncio as aioredis

from serve_app.dialogue.postgres_store import PostgresSessionStore
from serve_app.dialogue.redis_store import RedisSessionStore
from serve_app.dialogue.tiered_store import TieredSessionStore
from serve_app.schemas import Message, ResponseRecord, Session, Turn

from ...apps import start_redis_server


def turn(text: str) -> Turn:
    return Turn.exchange(text, f"re: {text}", finish_reason="stop", context_ids=[1, 2], reply_ids=[3, 4])


@pytest.fixture
async def private_redis(tmp_path):
    """A redis-server of this test's own: flushing it touches nobody else's data."""
    server, url = start_redis_server(tmp_path)
    yield url
    server.kill()
    server.wait(10)


@pytest.fixture
async def tiered(redis_url, redis_prefix, postgres_db):
    """A tiered store whose sweeper never runs by itself (the tests call ``archive_idle``)."""
    store = TieredSessionStore(RedisSessionStore.from_url(redis_url, 3600, redis_prefix),
                               PostgresSessionStore.from_url(postgres_db, 3600), hot_ttl_s=3600,
                               archive_interval_s=3600)
    await store.open()
    yield store
    await store.close()


def conversation(owner: str = "alice") -> Session:
    record = ResponseRecord(id="resp_1-2.x", model="m", input=[Message(role="user", content="one")],
                            metadata={"k": "v"})
    first = turn("one").model_copy(update={"response": record})
    return Session(owner=owner, title="kept", metadata={"topic": "tiers"}, turns=[first, turn("two")],
                   pending=[Message(role="user", content="later")])


def same(a: Session, b: Session) -> bool:
    return a.model_dump(exclude={"updated_at"}) == b.model_dump(exclude={"updated_at"})


async def test_archive_then_redis_flush_then_read_gives_the_same_conversation(private_redis, postgres_db):
    store = TieredSessionStore(RedisSessionStore.from_url(private_redis, 3600, "t:"),
                               PostgresSessionStore.from_url(postgres_db, 3600), hot_ttl_s=3600,
                               archive_interval_s=3600)
    await store.open()
    try:
        idle, busy = conversation(), Session(owner="alice")
        for session in (idle, busy):
            await store.create(session)
        before = await store.hot.peek(idle.id)
        assert await store.archive_idle(idle_s=3600) == 0  # nothing idle that long: nothing moves
        assert await store.hot.peek(idle.id) is not None

        await store.append_turn(busy.id, turn("recent"))
        assert await store.archive_idle(idle_s=0) == 2
        assert await store.hot.peek(idle.id) is None and await store.hot.peek(busy.id) is None
        await aioredis.from_url(private_redis).flushall()  # Redis loses everything

        after = await store.get(idle.id)  # back from PostgreSQL, transparently
        assert same(after, before)
        assert await store.hot.peek(idle.id) is not None  # and hot again
        assert [t.user for t in (await store.get(busy.id)).turns] == ["recent"]
        assert await store.append_turn(idle.id, turn("three")) is not None
        assert [t.user for t in (await store.get(idle.id)).turns] == ["one", "two", "three"]
    finally:
        await store.close()


async def test_a_session_written_while_it_is_copied_stays_hot(tiered):
    session = conversation()
    await tiered.create(session)
    copied = await tiered.hot.peek(session.id)
    assert await tiered.cold.put(copied)
    await tiered.append_turn(session.id, turn("meanwhile"))  # after the copy, before Redis lets go
    assert not await tiered.hot.drop_if_unchanged(session.id, copied.revision)
    assert [t.user for t in (await tiered.get(session.id)).turns] == ["one", "two", "meanwhile"]
    assert await tiered.archive_idle(idle_s=0) == 1  # the next sweep copies the newer revision
    assert [t.user for t in (await tiered.cold.peek(session.id)).turns] == ["one", "two", "meanwhile"]
    assert not await tiered.cold.put(copied)  # an older copy never replaces a newer one


async def test_deleted_sessions_never_come_back(tiered):
    archived, hot = conversation(), conversation()
    for session in (archived, hot):
        await tiered.create(session)
    stale = await tiered.hot.peek(hot.id)
    assert await tiered.archive_idle(idle_s=0) == 2
    await tiered.get(hot.id)  # restored: in both tiers now
    assert await tiered.delete(archived.id) and await tiered.delete(hot.id)
    assert await tiered.get(archived.id) is None and await tiered.get(hot.id) is None
    assert not await tiered.cold.put(stale)  # an archive in flight cannot resurrect it
    assert await tiered.get(hot.id) is None
    assert not await tiered.delete(archived.id)


async def test_listing_sees_both_tiers_without_bringing_anything_back(tiered):
    first, second, other = conversation(), conversation(), conversation("bob")
    for session in (first, second, other):
        await tiered.create(session)
    assert await tiered.archive_idle(idle_s=0) == 3
    await tiered.get(second.id)  # hot again, and the most recently active
    listed = await tiered.list_for_owner("alice")
    assert [s.id for s in listed] == [second.id, first.id]
    assert await tiered.hot.peek(first.id) is None  # listing is not activity
    assert same(listed[1], first.model_copy(update={"revision": listed[1].revision}))
