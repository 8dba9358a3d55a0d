"""A reply that fails mid-stream ends with an ``error`` event shaped like the WebSocket protocol's
error frames (type ``error``, ``code``, ``message``, ``status``), and nothing of the turn is saved."""

from engines.protocol import Delta, EngineDeadError
from serve_app.schemas import TurnPlan
from serve_app.turns import ModelStream, TurnRunner


class _NoDialogue:
    """Fails the test if the runner tries to save a turn that did not finish."""

    @property
    def commit_turn(self):
        raise AssertionError("a failed reply must not be saved")


async def _dies_after_one_delta():
    yield Delta(request_id="x", text="Hel", token_ids=(1,))
    raise EngineDeadError("the engine loop stopped")


async def test_a_reply_failing_mid_stream_ends_with_an_error_event():
    response = _dies_after_one_delta()
    stream = ModelStream(response)
    stream.first = await response.__anext__()
    runner = TurnRunner(model=None, dialogue=_NoDialogue(), log=None, moderator=None, retention_s=60, max_reply_s=60)
    plan = TurnPlan(session_id="s", turn_index=0, room=False, prompt_token_ids=[1], context_ids=[1], window_start=0,
                    append_only=True, history_turns_used=0, history_turns_dropped=0)
    events = [event async for event in runner._run(plan, "owner", "hi", stream)]
    assert events[0] == {"type": "delta", "text": "Hel"}
    assert events[1]["type"] == "error"
    assert events[1]["status"] == 503 and events[1]["code"] == "unavailable"
    assert "engine loop stopped" in events[1]["message"]
    assert len(events) == 2
