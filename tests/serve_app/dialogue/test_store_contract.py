"""One contract for every session store, run against the in-memory store, a real Redis server, a
real PostgreSQL server, and Redis in front of PostgreSQL with a sweeper that archives every session
as soon as it can (so every operation meets sessions moving between the tiers).

Redis: ``REDIS_URL`` (or 127.0.0.1:6379) if it answers PING, else a private ``redis-server`` on a
free port for this run. Each test writes under its own key prefix; the run's keys are deleted after.
PostgreSQL: ``POSTGRES_URL`` (or 127.0.0.1:5432), a new database per test, dropped after.
"""

from __future__ import annotations

import asyncio

import pytest

from serve_app.config import AppSettings, DialogueSettings
from serve_app.dialogue.deployment import DialogueCore, create_store
from serve_app.dialogue.postgres_store import PostgresSessionStore
from serve_app.dialogue.redis_store import RedisSessionStore
from serve_app.dialogue.store import InMemorySessionStore, SessionStore
from serve_app.dialogue.tiered_store import TieredSessionStore
from serve_app.errors import SessionNotFoundError, StoreUnavailableError
from serve_app.schemas import Message, Session, Turn, TurnPlan

from ...apps import free_port

STORES = ["memory", "redis", "postgres", "redis+postgres"]
ARCHIVE_INTERVAL_S = 0.05  # redis+postgres: sweep this often, archiving every session idle for 0 s


@pytest.fixture(params=STORES)
async def make_store(request, redis_prefix):
    """``await make_store(ttl_s)``: a new, opened store of the parametrized kind (redis ones share one
    key prefix, postgres ones one database of this test's own)."""
    redis_url = request.getfixturevalue("redis_url") if "redis" in request.param else None
    postgres_url = request.getfixturevalue("postgres_db") if "postgres" in request.param else None
    opened: list[SessionStore] = []

    async def make(ttl_s: float = 60.0) -> SessionStore:
        hot = RedisSessionStore.from_url(redis_url, ttl_s, key_prefix=redis_prefix) if redis_url else None
        cold = PostgresSessionStore.from_url(postgres_url, ttl_s) if postgres_url else None
        if hot and cold:
            store = TieredSessionStore(hot, cold, hot_ttl_s=0.0, archive_interval_s=ARCHIVE_INTERVAL_S)
        else:
            store = hot or cold or InMemorySessionStore(ttl_s)
        await store.open()
        opened.append(store)
        return store

    yield make
    for store in opened:
        await store.close()


def turn(text: str, **fields) -> Turn:
    return Turn.exchange(text, f"re: {text}", finish_reason="stop", **fields)


# -- the contract -------------------------------------------------------------------------------------------

async def test_create_get_delete(make_store):
    store = await make_store()
    session = Session(owner="alice", system_prompt="be brief", title="t", turns=[turn("hi")])
    await store.create(session)
    got = await store.get(session.id)
    assert got is not None
    assert got.model_dump(exclude={"updated_at"}) == session.model_dump(exclude={"updated_at"})
    assert got.updated_at >= session.updated_at
    assert await store.get("no-such-session") is None
    assert await store.delete(session.id) is True
    assert await store.get(session.id) is None
    assert await store.delete(session.id) is False


async def test_append_returns_updated_session_in_order(make_store):
    store = await make_store()
    session = Session(owner="alice")
    await store.create(session)
    appended = [turn(f"m{i}", prompt_tokens=i, completion_tokens=2 * i, context_ids=[i, 7], reply_ids=[i] * i)
                for i in range(4)]
    for i, t in enumerate(appended):
        updated = await store.append_turn(session.id, t)
        assert updated is not None and updated.turns == appended[:i + 1]
        assert updated.owner == "alice" and updated.id == session.id
    assert (await store.get(session.id)).turns == appended
    assert await store.append_turn("no-such-session", turn("x")) is None
    assert await store.get("no-such-session") is None


async def test_concurrent_appends_on_one_session(make_store):
    store = await make_store()
    session = Session(owner="alice")
    await store.create(session)
    writers, turns_each = 50, 3

    async def writer(w: int) -> list[Session | None]:
        return [await store.append_turn(session.id, turn(f"w{w}-{k}")) for k in range(turns_each)]

    results = [s for per_writer in await asyncio.gather(*(writer(w) for w in range(writers))) for s in per_writer]
    final = (await store.get(session.id)).turns
    users = [t.user for t in final]
    assert sorted(users) == sorted(f"w{w}-{k}" for w in range(writers) for k in range(turns_each))  # each once
    for w in range(writers):
        assert [u for u in users if u.startswith(f"w{w}-")] == [f"w{w}-{k}" for k in range(turns_each)]
    # Each append saw the session right after itself: its own turn last, and a length no other append saw.
    assert sorted(len(s.turns) for s in results) == list(range(1, writers * turns_each + 1))
    assert all(s.turns == final[:len(s.turns)] for s in results)


async def test_ttl_is_refreshed_by_activity(make_store):
    store = await make_store(ttl_s=2.0)
    active, idle = Session(owner="alice"), Session(owner="alice")
    await store.create(active)
    await store.create(idle)
    for second in range(1, 5):  # touch `active` every second, alternating reads and appends
        await asyncio.sleep(1.0)
        if second % 2:
            assert await store.get(active.id) is not None, f"expired after {second} s despite activity"
        else:
            assert await store.append_turn(active.id, turn(f"t{second}")) is not None
        if second == 3:
            assert await store.get(idle.id) is None, "an untouched session outlived its TTL"
            assert await store.append_turn(idle.id, turn("late")) is None
    assert [s.id for s in await store.list_for_owner("alice")] == [active.id]
    assert [t.user for t in (await store.get(active.id)).turns] == ["t2", "t4"]


async def test_listing_is_per_owner_newest_first(make_store):
    store = await make_store()
    alice = [Session(owner="alice", title=f"a{i}") for i in range(3)]
    bob = Session(owner="bob")
    for s in [*alice, bob]:
        await store.create(s)
        await asyncio.sleep(0.01)
    await store.append_turn(alice[0].id, turn("bump"))
    listed = await store.list_for_owner("alice")
    assert [s.id for s in listed] == [alice[0].id, alice[2].id, alice[1].id]
    assert all(s.owner == "alice" for s in listed)
    assert [t.user for t in listed[0].turns] == ["bump"]
    assert [s.id for s in await store.list_for_owner("bob")] == [bob.id]
    assert await store.list_for_owner("carol") == []
    assert await store.delete(alice[2].id)
    assert [s.id for s in await store.list_for_owner("alice")] == [alice[0].id, alice[1].id]


async def test_pending_items_open_the_next_turn(make_store):
    store = await make_store()
    session = Session(owner="alice")
    await store.create(session)
    items = [Message(role="user", content="a"), Message(role="assistant", content="b")]
    updated = await store.add_pending(session.id, items)
    assert updated.pending == items and updated.turns == []
    answered = Turn(input=[*items, Message(role="user", content="c")], output=Message(role="assistant", content="d"),
                    finish_reason="stop")
    after = await store.append_turn(session.id, answered)
    assert after.pending == [] and after.turns == [answered]
    assert [m.content for m in (await store.get(session.id)).items()] == ["a", "b", "c", "d"]
    assert await store.add_pending("no-such-session", items) is None


async def test_replace_rewrites_the_session_and_writes_bump_the_revision(make_store):
    store = await make_store()
    first, second = turn("one"), turn("two")
    session = Session(owner="alice", title="old", turns=[first], pending=[Message(role="user", content="p")])
    await store.create(session)
    created = (await store.get(session.id)).revision
    appended = await store.append_turn(session.id, second)
    assert appended.revision == created + 1 and appended.pending == session.pending  # not in its input
    replaced = await store.replace(appended.model_copy(update={"turns": [second], "title": "new",
                                                                "metadata": {"topic": "tests"}}))
    assert replaced.turns == [second] and replaced.title == "new" and replaced.metadata == {"topic": "tests"}
    assert replaced.revision == appended.revision + 1
    got = await store.get(session.id)
    assert got.model_dump(exclude={"updated_at"}) == replaced.model_dump(exclude={"updated_at"})  # reads do not bump
    assert await store.replace(appended.model_copy(update={"title": "stale"})) is None  # read before a write
    assert (await store.get(session.id)).title == "new"
    assert await store.replace(Session(owner="alice")) is None  # only an existing session


async def test_an_append_removes_only_the_pending_items_it_consumed(make_store):
    store = await make_store()
    session = Session(owner="alice")
    await store.create(session)
    early = Message(role="user", content="early")
    await store.add_pending(session.id, [early])
    late = Message(role="user", content="added while the reply was generated")
    await store.add_pending(session.id, [late])
    answered = Turn(input=[early, Message(role="user", content="q")], output=Message(role="assistant", content="a"),
                    finish_reason="stop")
    after = await store.append_turn(session.id, answered)
    assert after.pending == [late] and (await store.get(session.id)).pending == [late]


async def test_another_identity_gets_not_found(make_store):
    core = DialogueCore(AppSettings(), store=await make_store(), tokenizer=object(), budget_tokens=512)
    created = await core.create_session("alice", title="mine")
    assert (await core.get_session(created.id, "alice")).title == "mine"
    with pytest.raises(SessionNotFoundError):
        await core.get_session(created.id, "mallory")
    with pytest.raises(SessionNotFoundError):
        await core.delete_session(created.id, "mallory")
    plan = TurnPlan(session_id=created.id, turn_index=0, room=False, prompt_token_ids=[1], input=[], context_ids=[1],
                    window_start=0, append_only=True, history_turns_used=0, history_turns_dropped=0)
    with pytest.raises(SessionNotFoundError):
        await core.commit_turn(created.id, "mallory", plan, turn("sneaky"), generated_ids=[2])
    assert await core.list_sessions("mallory") == []
    assert [s.id for s in await core.list_sessions("alice")] == [created.id]
    assert (await core.get_session(created.id, "alice")).turns == 0


# -- Redis only ---------------------------------------------------------------------------------------------

async def test_redis_keys_all_expire_and_delete_leaves_nothing(redis_url, redis_prefix):
    store = RedisSessionStore.from_url(redis_url, ttl_s=30, key_prefix=redis_prefix)
    try:
        session = Session(owner="alice")
        await store.create(session)
        await store.append_turn(session.id, turn("hi"))
        keys = sorted(await store.client.keys(f"{redis_prefix}*"))
        assert keys == sorted([f"{redis_prefix}session:{session.id}", f"{redis_prefix}session:{session.id}:turns",
                               f"{redis_prefix}owner:alice", f"{redis_prefix}sessions"])
        for key in keys:
            assert 0 < await store.client.pttl(key) <= 30_000, key
        assert await store.delete(session.id)
        assert await store.client.keys(f"{redis_prefix}*") == []
    finally:
        await store.close()


async def test_redis_replicas_share_sessions(redis_url, redis_prefix):
    """Writers on two stores (two replicas' clients) appending to one session lose and reorder nothing."""
    stores = [RedisSessionStore.from_url(redis_url, ttl_s=30, key_prefix=redis_prefix) for _ in range(2)]
    try:
        session = Session(owner="alice")
        await stores[0].create(session)

        async def writer(name: str, store: RedisSessionStore) -> None:
            for k in range(5):
                await store.append_turn(session.id, turn(f"{name}-{k}"))

        names = [f"r{r}w{w}" for r in range(2) for w in range(10)]
        await asyncio.gather(*(writer(name, stores[int(name[1])]) for name in names))
        users = [t.user for t in (await stores[1].get(session.id)).turns]
        assert len(users) == 100
        for name in names:
            assert [u for u in users if u.startswith(f"{name}-")] == [f"{name}-{k}" for k in range(5)]
    finally:
        for store in stores:
            await store.close()


async def test_create_store_picks_redis_from_settings_or_env(redis_url, redis_prefix, monkeypatch):
    monkeypatch.setenv("REDIS_URL", redis_url)
    store = create_store(DialogueSettings(store="redis", session_ttl_s=30, redis_key_prefix=redis_prefix))
    assert isinstance(store, RedisSessionStore) and store.key_prefix == redis_prefix and store.ttl_s == 30
    try:
        session = Session(owner="alice")
        await store.create(session)
        assert await store.client.exists(f"{redis_prefix}session:{session.id}") == 1
    finally:
        await store.close()
    assert isinstance(create_store(DialogueSettings()), InMemorySessionStore)


async def test_unreachable_redis_is_a_clear_error():
    url = f"redis://127.0.0.1:{free_port()}/0"  # nothing listens there
    store = create_store(DialogueSettings(store="redis", redis_url=url))
    try:
        with pytest.raises(StoreUnavailableError, match=f"cannot reach Redis at {url}"):
            await store.get("any")
    finally:
        await store.close()
