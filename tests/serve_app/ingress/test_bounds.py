"""Every size and count is bounded: request body fields, event logs by bytes, client ids."""

import pytest
from pydantic import ValidationError

from engines.protocol import MAX_SEED, InvalidRequestError, SamplingParams
from serve_app.events import MessageEvent
from serve_app.ingress.bodies import ChatCompletionRequest, OpenAIMessage, SessionMessageRequest
from serve_app.ingress.event_log import InMemoryEventLog, RedisEventLog
from serve_app.redis_client import connect
from serve_app.schemas import ReplyMeta


@pytest.mark.parametrize("fields, where", [
    ({"seed": MAX_SEED + 1}, "seed"),
    ({"stop": ["x"] * 9}, "stop"),
    ({"stop": ["y" * 257]}, "stop"),
    ({"stop": [""]}, "stop"),
])
def test_sampling_fields_out_of_bounds_name_the_field(fields, where):
    with pytest.raises(ValidationError) as bad:
        SessionMessageRequest(content="hi", **fields)
    assert bad.value.errors()[0]["loc"][0] == where


def test_the_engine_refuses_a_seed_it_cannot_use_by_name():
    with pytest.raises(InvalidRequestError) as bad:
        SamplingParams(seed=2**64)
    assert bad.value.field == "seed"


def test_chat_requests_are_bounded_and_non_text_parts_are_named():
    with pytest.raises(ValidationError):
        ChatCompletionRequest(model="m", messages=[{"role": "user", "content": "x"}] * 513)
    image = OpenAIMessage(role="user", content=[{"type": "text", "text": "see"}, {"type": "image_url"}])
    with pytest.raises(InvalidRequestError, match="not image_url") as bad:
        image.text("messages.0.content")
    assert bad.value.field == "messages.0.content"


@pytest.fixture(params=["memory", "redis"])
async def small_log(request, redis_prefix):
    if request.param == "memory":
        yield InMemoryEventLog(max_log_bytes=2000)
        return
    client = connect(request.getfixturevalue("redis_url"), blocking_read_s=0.1)
    yield RedisEventLog(client, redis_prefix, max_log_bytes=2000, block_ms=100)
    await client.aclose()


async def test_an_event_log_keeps_at_most_its_bytes_dropping_the_oldest(small_log):
    await small_log.create("room", ReplyMeta(session_id="s", room=True), ttl_s=60)
    ids = [await small_log.append("room", MessageEvent(reply_id="r", author="a", content=f"{i:03d}" + "x" * 300))
           for i in range(20)]
    kept = []
    async for event_id, event in small_log.read("room", None, until_end=False):
        kept.append((event_id, event))
        if event_id == ids[-1]:
            break
    sizes = [len(e.model_dump_json()) for _, e in kept]
    assert sum(sizes) <= 2000 and len(kept) >= 4
    assert [e.content[:3] for _, e in kept] == [f"{i:03d}" for i in range(20 - len(kept), 20)]  # the newest, in order
    assert small_log.valid_id(ids[0]) and not small_log.valid_id("../../etc") and not small_log.valid_id("1-x")
