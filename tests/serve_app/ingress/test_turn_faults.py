"""Faults in the middle of a turn free everything: the turn lock, the owner's reply slot, the event
log (readers get an end or error event within a bounded time), and the session takes a new turn in
seconds. The turn runner is driven with fake model and dialogue handles; the Redis cases use a
private redis-server, paused or not."""

import asyncio
import time

import pytest
import redis.asyncio as aioredis

from engines.protocol import Delta, Usage
from serve_app.config import DialogueSettings, LimitSettings
from serve_app.events import DoneEvent, ErrorEvent
from serve_app.ingress.auth import Identity
from serve_app.ingress.bodies import SessionMessageRequest
from serve_app.ingress.limits import InMemoryLimits, Limits
from serve_app.ingress.locks import LOCK_LEASE_S, turn_lock_name
from serve_app.ingress.metrics import IngressMetrics
from serve_app.ingress.replies import Replies, ReplyBackends
from serve_app.ingress.turns import TurnRunner
from serve_app.redis_client import connect
from serve_app.schemas import TurnInput, TurnPlan

from ...apps import start_redis_server

SID = "0123456789abcdef0123456789abcdef"
WHO = Identity("user:faulty", "faulty", False, "key")


class FakeStream:
    """What a streaming handle call returns: deltas at a pace, then the last one."""

    def __init__(self, tokens: int, pace_s: float):
        self.tokens, self.pace_s, self.sent, self.cancelled = tokens, pace_s, 0, False

    def __aiter__(self):
        return self

    async def __anext__(self) -> Delta:
        if self.cancelled or self.sent == self.tokens:
            raise StopAsyncIteration
        await asyncio.sleep(self.pace_s)
        self.sent += 1
        if self.sent == self.tokens:
            return Delta("x", "end.", (self.sent,), finish_reason="length", usage=Usage(3, self.tokens))
        return Delta("x", f"w{self.sent} ", (self.sent,))

    def cancel(self):
        self.cancelled = True


class Handle:
    """A deployment handle whose methods are these coroutines."""

    def __init__(self, **methods):
        self.methods = methods

    def options(self, **_):
        return self

    def __getattr__(self, name):
        method = self.methods[name]
        return type("Method", (), {"remote": staticmethod(method)})


def model(tokens=20, pace_s=0.05):
    return Handle(generate=lambda request, affinity_key=None: FakeStream(tokens, pace_s))


async def prepare_turn(session_id, owner, turn):
    return TurnPlan(session_id=session_id, turn_index=0, room=False, prompt_token_ids=[1, 2, 3], context_ids=[1, 2, 3],
                    input=turn.messages, window_start=0, append_only=False, history_turns_used=0,
                    history_turns_dropped=0)


class QuietMetrics(IngressMetrics):
    def __init__(self):  # no Ray metrics outside a replica
        pass

    def error(self, *_):
        pass

    def session_entered(self, *_):
        pass

    def session_left(self, *_):
        pass


def runner(backends, dialogue, tokens=20, pace_s=0.05):
    settings = DialogueSettings(reply_retention_s=60)
    limits = Limits(LimitSettings(max_concurrent_replies=1), InMemoryLimits())
    return (TurnRunner(model(tokens, pace_s), dialogue, backends, None, QuietMetrics(), settings, limits),
            Replies(backends, settings, 8), limits)


async def read_all(replies, reply_id, meta, timeout_s):
    return [e async for _, e in asyncio_timeout(replies.reply_events(reply_id, meta, None), timeout_s)]


async def asyncio_timeout(events, timeout_s):
    deadline = time.monotonic() + timeout_s
    async for item in events:
        yield item
        assert time.monotonic() < deadline, "the reader was not ended in time"


async def test_a_failure_while_saving_ends_the_reply_and_frees_lock_and_slot():
    async def commit_turn(*_):
        raise RuntimeError("the dialogue store broke while saving")

    backends = ReplyBackends.create(DialogueSettings(), 1 << 20)
    turns, replies, limits = runner(backends, Handle(prepare_turn=prepare_turn, commit_turn=commit_turn))
    reply_id, meta = await turns.start(SID, WHO, TurnInput.user_message("hi"), SessionMessageRequest(content="hi"))
    events = await read_all(replies, reply_id, meta, 10)
    assert isinstance(events[-1], ErrorEvent) and events[-1].status == 500 and "broke" not in events[-1].message
    await asyncio.sleep(0.1)
    assert await backends.locks.holder(turn_lock_name(SID)) is None
    assert await limits.active_replies(WHO.owner) == []
    assert (await backends.log.meta(reply_id)).finished


@pytest.fixture
async def private_redis(tmp_path):
    server, url = start_redis_server(tmp_path)
    yield url
    server.kill()
    server.wait(10)


async def test_a_redis_pause_mid_reply_frees_the_session_within_a_lease(private_redis):
    async def commit_turn(*_):
        return None

    client = connect(private_redis, blocking_read_s=1.0)
    settings = DialogueSettings(store="redis", redis_url=private_redis)
    backends = ReplyBackends.create(settings, 1 << 20, client)
    turns, replies, _ = runner(backends, Handle(prepare_turn=prepare_turn, commit_turn=commit_turn), tokens=200,
                               pace_s=0.05)
    reply_id, meta = await turns.start(SID, WHO, TurnInput.user_message("hi"), SessionMessageRequest(content="hi"))
    reader = asyncio.create_task(read_all(replies, reply_id, meta, 60))
    await asyncio.sleep(1.0)
    admin = aioredis.Redis.from_url(private_redis)
    await admin.execute_command("CLIENT", "PAUSE", 20_000, "ALL")  # longer than a lease, short of max_reply_s
    paused_at = time.monotonic()
    await asyncio.sleep(21)
    # Once Redis answers again, the session is free within one lease, not after max_reply_s (900 s).
    while await backends.locks.holder(turn_lock_name(SID)) == reply_id:
        assert time.monotonic() - paused_at < 20 + LOCK_LEASE_S + 5, "the lock outlived its lease"
        await asyncio.sleep(0.5)
    assert await backends.locks.claim(turn_lock_name(SID), "next-reply", LOCK_LEASE_S) is None
    events = await asyncio.wait_for(reader, 30)  # and the reader got an end or an error, not silence
    assert isinstance(events[-1], (DoneEvent, ErrorEvent))
    await admin.aclose()
    await client.aclose()
