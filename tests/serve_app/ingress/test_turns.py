"""The turn pipeline's stages in isolation: a reply that fails mid-stream ends with an ``error``
event shaped like the WebSocket protocol's error frames (type ``error``, ``code``, ``message``,
``status``) and nothing of the turn is saved; message validation names the problem."""

import pytest

from engines.protocol import Delta, EngineDeadError, Usage
from serve_app.config import DialogueSettings, LimitSettings
from serve_app.errors import ApiError
from serve_app.events import DeltaEvent, ErrorEvent
from serve_app.ingress.auth import Identity
from serve_app.ingress.calls import ModelStream
from serve_app.ingress.limits import InMemoryLimits, Limits
from serve_app.ingress.locks import turn_lock_name
from serve_app.ingress.metrics import IngressMetrics
from serve_app.ingress.replies import ReplyBackends
from serve_app.ingress.turns import TurnRunner, admit_messages, normalise_message
from serve_app.schemas import Message, ReplyMeta, TurnPlan


class _NoDialogue:
    """Fails the test if the runner tries to save a turn that did not finish."""

    @property
    def commit_turn(self):
        raise AssertionError("a failed reply must not be saved")


class _NoMetrics(IngressMetrics):
    def __init__(self):  # no Ray metrics outside a replica
        self.recorded = []

    def error(self, status, code):
        self.recorded.append((status, code))

    def session_entered(self, session_id):
        pass

    def session_left(self, session_id):
        pass


async def _dies_after_one_delta():
    yield Delta(request_id="x", text="Hel", token_ids=(1,))
    raise EngineDeadError("the engine loop stopped")


async def test_a_reply_failing_mid_stream_ends_with_an_error_event():
    response = _dies_after_one_delta()
    stream = ModelStream(response)
    stream.first = await response.__anext__()
    metrics = _NoMetrics()
    runner = TurnRunner(model=None, dialogue=_NoDialogue(), backends=ReplyBackends.create(DialogueSettings(), 4096),
                        moderator=None, metrics=metrics, settings=DialogueSettings(),
                        limits=Limits(LimitSettings(), InMemoryLimits()))
    plan = TurnPlan(session_id="s", turn_index=0, room=False, prompt_token_ids=[1], input=[Message(role="user", content="hi")],
                    context_ids=[1], window_start=0, append_only=True, history_turns_used=0, history_turns_dropped=0)
    who = Identity(owner="user:owner", user="owner", admin=False, via="key")
    events = [event async for event in runner._run(plan, who, stream, "r1")]
    assert events[0] == DeltaEvent(reply_id="r1", text="Hel")
    assert isinstance(events[1], ErrorEvent)
    assert events[1].wire()["type"] == "error" and events[1].reply_id == "r1"
    assert events[1].status == 503 and events[1].code == "unavailable"
    assert "unavailable" in events[1].message and "loop" not in events[1].message  # no internals
    assert len(events) == 2
    assert metrics.recorded == [(503, "unavailable")]


async def _finishes():
    yield Delta(request_id="x", text="Hi", token_ids=(1,))
    yield Delta(request_id="x", text="!", token_ids=(2,), finish_reason="stop", usage=Usage(1, 2))


async def test_the_session_is_free_before_readers_hear_done():
    """A client that sends its next turn the moment it reads ``done`` must not be told ``busy``: the
    lock goes (and its lease watcher stops) after the turn is saved, before ``done`` is written."""
    response = _finishes()
    stream = ModelStream(response)
    stream.first = await response.__anext__()
    backends = ReplyBackends.create(DialogueSettings(), 4096)
    runner = TurnRunner(model=None, dialogue=_NoDialogue(), backends=backends, moderator=None, metrics=_NoMetrics(),
                        settings=DialogueSettings(), limits=Limits(LimitSettings(), InMemoryLimits()))
    plan = TurnPlan(session_id="s", turn_index=0, room=False, prompt_token_ids=[1], input=[Message(role="user", content="hi")],
                    context_ids=[1], window_start=0, append_only=True, history_turns_used=0, history_turns_dropped=0,
                    save=False)
    who = Identity(owner="user:owner", user="owner", admin=False, via="key")
    assert await backends.locks.claim(turn_lock_name("s"), "r1", 15) is None
    await backends.log.create("r1", ReplyMeta(session_id="s", owner=who.owner), 60)
    holders = []
    append = backends.log.append

    async def watching_append(target, event):
        holders.append((event.wire()["type"], await backends.locks.holder(turn_lock_name("s"))))
        await append(target, event)

    backends.log.append = watching_append

    async def settle():
        await backends.locks.release(turn_lock_name("s"), "r1")

    await runner._produce("r1", "r1", plan, who, stream, settle)
    assert holders == [("turn", "r1"), ("delta", "r1"), ("delta", "r1"), ("done", None)]


def test_messages_are_normalised_and_bounded():
    assert normalise_message("  Cafe\u0301 \n", 100) == "Caf\u00e9"
    with pytest.raises(ApiError, match="must not be empty") as empty:
        normalise_message(" \t\n", 100)
    assert empty.value.status == 400 and empty.value.param == "content"
    with pytest.raises(ApiError, match="longer than 5 characters"):
        normalise_message("abcdef", 5)


def test_every_message_of_a_turn_is_normalised_and_the_users_moderated():
    from serve_app.config import ModerationSettings
    from serve_app.ingress.moderation import Moderator

    moderator = Moderator.from_settings(ModerationSettings(blocked_words=["verboten"]))
    messages = [Message(role="system", content=" be brief "), Message(role="user", content="Cafe\u0301")]
    admitted = admit_messages(messages, moderator, 100, param="input")
    assert [m.content for m in admitted] == ["be brief", "Caf\u00e9"] and admitted[1].id == messages[1].id
    with pytest.raises(ApiError, match="blocked") as blocked:
        admit_messages([*messages, Message(role="user", content="that is verboten")], moderator, 100, param="input")
    assert blocked.value.param == "input[2]"
    with pytest.raises(ApiError, match="must not be empty") as empty:
        admit_messages([Message(role="assistant", content=" ")], moderator, 100, param="input")
    assert empty.value.param == "input"
