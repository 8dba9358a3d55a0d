"""OpenAI's Responses API through the real graph and the real model, with the official SDK: create
(whole, streamed, in the background), a ``previous_response_id`` chain on the multi-turn fast path,
retrieve, replay, input items, cancel, delete, forks, ``store: false``, errors in OpenAI's shape."""

import httpx
import openai
import pytest

from ...helpers import as_user, openai_client

pytestmark = pytest.mark.serve
MODEL = "smollm2-135m-instruct"
STREAM_ORDER = ["response.created", "response.in_progress", "response.output_item.added",
                "response.content_part.added"]
STREAM_END = ["response.output_text.done", "response.content_part.done", "response.output_item.done"]


@pytest.fixture(scope="module")
def client(base_url):
    return openai_client(base_url, "responder")


def ask(client, text: str, **fields):
    fields.setdefault("max_output_tokens", 16)
    return client.responses.create(model=MODEL, input=text, temperature=0, **fields)


def test_create_then_retrieve_and_input_items(client):
    response = ask(client, "What is the capital of France?", instructions="Answer in one word.",
                   metadata={"test": "create"})
    assert response.id.startswith("resp_") and response.object == "response"
    assert response.status in ("completed", "incomplete") and "Paris" in response.output_text
    assert response.instructions == "Answer in one word." and response.metadata == {"test": "create"}
    (message,) = response.output
    assert message.type == "message" and message.role == "assistant" and message.id.startswith("msg_")
    usage = response.usage
    assert usage.input_tokens > 10 and 0 < usage.output_tokens <= 16
    assert usage.total_tokens == usage.input_tokens + usage.output_tokens

    again = client.responses.retrieve(response.id)
    assert again.output_text == response.output_text and again.status == response.status
    assert again.usage.input_tokens == usage.input_tokens and again.output[0].id == message.id
    items = client.responses.input_items.list(response.id)
    assert [(i.role, i.content[0].text) for i in items.data] == [("user", "What is the capital of France?")]


def test_streamed_events_come_in_the_spec_order_and_spell_the_response(client):
    events = list(client.responses.create(model=MODEL, input="Name three colours.", temperature=0,
                                          max_output_tokens=24, stream=True))
    kinds = [e.type for e in events]
    assert kinds[:4] == STREAM_ORDER and kinds[-4:-1] == STREAM_END
    assert kinds[-1] in ("response.completed", "response.incomplete")
    deltas = [e for e in events if e.type == "response.output_text.delta"]
    assert deltas and kinds[4:4 + len(deltas)] == ["response.output_text.delta"] * len(deltas)
    assert [e.sequence_number for e in events] == list(range(len(events)))
    final = events[-1].response
    text = "".join(d.delta for d in deltas)
    assert text == final.output_text == events[-4].text and final.usage.output_tokens <= 24
    assert {e.item_id for e in deltas} == {final.output[0].id}
    assert client.responses.retrieve(final.id).output_text == text


def test_a_chain_of_five_reuses_the_whole_history(client):
    previous, seen = None, []
    questions = ["Name a colour.", "Name a fruit of that colour.", "Why is it that colour?", "Say it in French.",
                 "Thank you."]
    for question in questions:
        response = ask(client, question, max_output_tokens=12, previous_response_id=previous and previous.id)
        usage = response.usage
        if previous is not None:
            assert response.previous_response_id == previous.id
            assert usage.input_tokens > previous.usage.input_tokens + previous.usage.output_tokens
            # Everything the engine computed last turn (prompt + reply but its last token) was reused.
            assert usage.input_tokens_details.cached_tokens >= (
                previous.usage.input_tokens + previous.usage.output_tokens - 1)
        seen.append(response)
        previous = response
    assert client.responses.retrieve(seen[2].id).previous_response_id == seen[1].id
    assert [i.content[0].text for i in client.responses.input_items.list(seen[3].id).data] == [questions[3]]


def test_a_chain_going_on_from_an_earlier_response_forks(client):
    first = ask(client, "Pick a number between one and ten.", max_output_tokens=8)
    second = ask(client, "Double it.", max_output_tokens=8, previous_response_id=first.id)
    branch = ask(client, "Halve it.", max_output_tokens=8, previous_response_id=first.id)
    # The branch saw the first turn, not the second, and reused the first turn's KV.
    assert branch.usage.input_tokens < second.usage.input_tokens + second.usage.output_tokens
    assert branch.usage.input_tokens_details.cached_tokens >= first.usage.input_tokens
    follow = ask(client, "And again.", max_output_tokens=8, previous_response_id=second.id)
    assert follow.usage.input_tokens_details.cached_tokens >= (
        second.usage.input_tokens + second.usage.output_tokens - 1)


def test_delete_then_everything_is_404_in_openai_shape(client):
    response = ask(client, "Say hello.")
    deleted = client.responses.delete(response.id)
    assert deleted is None  # the SDK returns nothing; the server answered 200
    for call in (lambda: client.responses.retrieve(response.id),
                 lambda: client.responses.input_items.list(response.id),
                 lambda: client.responses.delete(response.id),
                 lambda: ask(client, "Again?", previous_response_id=response.id)):
        with pytest.raises(openai.NotFoundError) as info:
            call()
        assert info.value.body["code"] == "response_not_found" and response.id in info.value.body["message"]


def test_unknown_ids_and_other_identities_get_404(client, base_url):
    response = ask(client, "Say hello.")
    stranger = openai_client(base_url, "stranger")
    for response_id in (response.id, "resp_nope", response.id.split(".")[0], response.id + "x"):
        with pytest.raises(openai.NotFoundError):
            stranger.responses.retrieve(response_id)
    with pytest.raises(openai.NotFoundError):
        stranger.responses.create(model=MODEL, input="hi", previous_response_id=response.id)
    with pytest.raises(openai.NotFoundError):
        stranger.responses.cancel(response.id)
    assert client.responses.retrieve(response.id).id == response.id  # still the owner's
    raw = httpx.get(f"{base_url}/v1/responses/resp_nope", headers=as_user("stranger"))
    assert raw.status_code == 404 and set(raw.json()["error"]) == {"message", "type", "param", "code"}


@pytest.mark.parametrize("extra,param", [
    ({"tools": [{"type": "function", "name": "f", "parameters": {}}]}, "tools"),
    ({"reasoning": {"effort": "low"}}, "reasoning"),
    ({"text": {"format": {"type": "json_object"}}}, "text"),
    ({"include": ["message.output_text.logprobs"]}, "include"),
    ({"input": [{"role": "user", "content": [{"type": "input_image", "image_url": "http://x/y.png"}]}]}, "input"),
    ({"input": [{"type": "function_call_output", "call_id": "c", "output": "{}"}]}, "input"),
    ({"conversation": "conv_x", "previous_response_id": "resp_y"}, "body"),
    ({"background": True, "store": False}, "body"),
    ({"input": ""}, "input"),
])
def test_unsupported_features_are_a_400_naming_the_field(base_url, extra, param):
    body = {"model": MODEL, "input": "hi", **extra}
    r = httpx.post(f"{base_url}/v1/responses", json=body, headers=as_user("responder"), timeout=60)
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["type"] == "invalid_request_error" and error["message"].startswith(f"{param}")
    assert (error["param"] or "body") == param


def test_store_false_is_served_and_not_kept(client):
    response = ask(client, "Say hi.", store=False)
    assert response.output_text and response.store is False
    with pytest.raises(openai.NotFoundError):
        client.responses.retrieve(response.id)
    history = [{"role": "user", "content": "My name is Ada."}, {"role": "assistant", "content": "Hello Ada!"}]
    stateless = client.responses.create(model=MODEL, temperature=0, max_output_tokens=8, store=False,
                                        input=[*history, {"role": "user", "content": "What is my name?"}])
    assert stateless.output_text and stateless.usage.input_tokens >= response.usage.input_tokens + 10


def test_background_cancel_replay_and_delete(client, base_url):
    long = {"max_output_tokens": 400, "extra_body": {"ignore_eos": True}}
    started = client.responses.create(model=MODEL, input="Tell a long story.", background=True, **long)
    assert started.status == "in_progress" and started.background
    cancelled = client.responses.cancel(started.id)
    assert cancelled.status == "cancelled" and cancelled.usage is None
    assert client.responses.retrieve(started.id).status == "cancelled"  # from its log: nothing was saved

    done = client.responses.create(model=MODEL, input="Say yes.", background=True, max_output_tokens=4)
    events = list(client.responses.retrieve(done.id, stream=True))  # the whole stream, from its log
    assert [e.type for e in events][:4] == STREAM_ORDER and events[-1].response.status in ("completed", "incomplete")
    tail = list(client.responses.retrieve(done.id, stream=True, starting_after=3))
    assert [e.model_dump() for e in tail] == [e.model_dump() for e in events[4:]]
    assert client.responses.cancel(done.id).status == events[-1].response.status  # finished: as it is

    running = client.responses.create(model=MODEL, input="Tell another long story.", background=True, **long)
    client.responses.delete(running.id)  # cancelled, so never saved
    with pytest.raises(openai.NotFoundError):
        client.responses.delete(running.id + "x")
    with pytest.raises(openai.NotFoundError):  # its log is still kept, but it is deleted
        client.responses.retrieve(running.id)


def test_truncation_disabled_refuses_a_history_past_the_budget_and_auto_drops_old_turns(client):
    """The test app's context budget is 512 tokens; two turns of ~300 tokens do not fit together."""
    long = "Summarize: " + " ".join(["river garden window light music"] * 60)
    first = ask(client, long, max_output_tokens=4)
    with pytest.raises(openai.BadRequestError) as info:
        ask(client, long, max_output_tokens=4, previous_response_id=first.id)
    assert info.value.body["param"] == "input" and "truncation is 'disabled'" in info.value.body["message"]
    auto = ask(client, long, max_output_tokens=4, previous_response_id=first.id, truncation="auto")
    assert auto.truncation == "auto" and auto.usage.input_tokens <= 512
    assert auto.usage.input_tokens < first.usage.input_tokens + 50  # turn 1 was left out


def test_blocked_input_and_per_turn_instructions(client):
    with pytest.raises(openai.BadRequestError) as info:
        ask(client, [{"role": "user", "content": "hello"}, {"role": "user", "content": "this is verboten"}])
    assert info.value.body["code"] == "content_blocked" and info.value.body["param"] == "input[1]"
    first = ask(client, "Name a planet.", instructions="You are terse.")
    same = ask(client, "Another one.", previous_response_id=first.id)  # the chain keeps its instructions
    assert same.usage.input_tokens_details.cached_tokens >= first.usage.input_tokens
    other = ask(client, "And a third.", previous_response_id=same.id, instructions="You are verbose and kind.")
    assert other.instructions == "You are verbose and kind."
    assert other.usage.input_tokens_details.cached_tokens < first.usage.input_tokens  # a new system prompt: no prefix
