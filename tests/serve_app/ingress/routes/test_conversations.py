"""OpenAI's Conversations API through the real graph, with the official SDK: a conversation with
items and metadata, responses in it, its items paginated as the spec does, item create / retrieve /
delete, and the same history through the sessions API (a conversation is a session)."""

import httpx
import openai
import pytest

from ...helpers import as_user, openai_client

pytestmark = pytest.mark.serve
MODEL = "smollm2-135m-instruct"


@pytest.fixture(scope="module")
def client(base_url):
    return openai_client(base_url, "conversationalist")


def texts(items) -> list[tuple[str, str]]:
    return [(i.role, i.content[0].text) for i in items]


def test_a_conversation_with_items_and_two_responses(client):
    conversation = client.conversations.create(
        metadata={"topic": "fruit"},
        items=[{"type": "message", "role": "system", "content": "You answer in a few words."},
               {"role": "user", "content": [{"type": "input_text", "text": "I like apples."}]}])
    assert conversation.id.startswith("conv_") and conversation.metadata == {"topic": "fruit"}
    first = client.responses.create(model=MODEL, conversation=conversation.id, input="What do I like?",
                                    temperature=0, max_output_tokens=12)
    second = client.responses.create(model=MODEL, conversation={"id": conversation.id}, input="Why?",
                                     temperature=0, max_output_tokens=12)
    assert first.conversation.id == second.conversation.id == conversation.id
    # The second response's prompt extends the first's (items, question, reply): all of it cached.
    assert second.usage.input_tokens_details.cached_tokens >= first.usage.input_tokens + first.usage.output_tokens - 1

    items = list(client.conversations.items.list(conversation.id, order="asc"))
    assert texts(items) == [("system", "You answer in a few words."), ("user", "I like apples."),
                            ("user", "What do I like?"), ("assistant", first.output_text),
                            ("user", "Why?"), ("assistant", second.output_text)]
    assert [i.id for i in items if i.role == "assistant"] == [first.output[0].id, second.output[0].id]
    # The input items of a response are its own, not the conversation's earlier items.
    assert texts(client.responses.input_items.list(first.id).data) == [("user", "What do I like?")]

    newest = client.conversations.items.list(conversation.id, limit=2)  # default order: newest first
    assert texts(newest.data) == texts(items[::-1][:2]) and newest.has_more
    assert newest.first_id == items[-1].id and newest.last_id == items[-2].id
    rest = client.conversations.items.list(conversation.id, limit=10, after=newest.last_id)
    assert [i.id for i in rest.data] == [i.id for i in items[::-1][2:]] and not rest.has_more
    assert [i.id for i in client.conversations.items.list(conversation.id, limit=2)] == [i.id for i in items[::-1]]


def test_items_create_retrieve_delete_and_metadata(client):
    conversation = client.conversations.create()
    assert conversation.metadata == {}
    added = client.conversations.items.create(conversation.id, items=[
        {"role": "user", "content": "My name is Ada."}, {"role": "assistant", "content": "Hello Ada."}])
    assert texts(added.data) == [("user", "My name is Ada."), ("assistant", "Hello Ada.")]
    assert added.first_id == added.data[0].id and added.last_id == added.data[1].id and not added.has_more
    got = client.conversations.items.retrieve(added.data[1].id, conversation_id=conversation.id)
    assert got.id == added.data[1].id and got.content[0].text == "Hello Ada." and got.type == "message"

    answer = client.responses.create(model=MODEL, conversation=conversation.id, input="What is my name?",
                                     temperature=0, max_output_tokens=8)
    bare = client.responses.create(model=MODEL, input="What is my name?", max_output_tokens=1, store=False)
    assert answer.usage.input_tokens >= bare.usage.input_tokens + 10  # the items added before are in its prompt
    after = client.conversations.items.delete(added.data[0].id, conversation_id=conversation.id)
    assert after.id == conversation.id
    remaining = list(client.conversations.items.list(conversation.id, order="asc"))
    assert texts(remaining)[:2] == [("assistant", "Hello Ada."), ("user", "What is my name?")]
    with pytest.raises(openai.NotFoundError):
        client.conversations.items.retrieve(added.data[0].id, conversation_id=conversation.id)
    # The conversation goes on over the edited history.
    more = client.responses.create(model=MODEL, conversation=conversation.id, input="Thanks.", temperature=0,
                                   max_output_tokens=4)
    assert more.usage.input_tokens > answer.usage.input_tokens

    updated = client.conversations.update(conversation.id, metadata={"stage": "done"})
    assert updated.metadata == {"stage": "done"} == client.conversations.retrieve(conversation.id).metadata
    deleted = client.conversations.delete(conversation.id)
    assert deleted.deleted and deleted.id == conversation.id and deleted.object == "conversation.deleted"
    with pytest.raises(openai.NotFoundError) as info:
        client.conversations.retrieve(conversation.id)
    assert info.value.body["code"] == "session_not_found"


def test_one_state_many_doors(client):
    """The sessions API sees a conversation's history, and a session is a conversation."""
    conversation = client.conversations.create(items=[{"role": "user", "content": "Remember: blue."}])
    client.responses.create(model=MODEL, conversation=conversation.id, input="Which colour?", temperature=0,
                            max_output_tokens=8)
    items = texts(client.conversations.items.list(conversation.id, order="asc"))
    session = client.get(f"/sessions/{conversation.id}", cast_to=object)  # as the same caller
    assert [(m["role"], m["content"]) for m in session["messages"]] == items and session["turns"] == 1
    sessions = client.get("/sessions", cast_to=object)["data"]
    assert conversation.id in [s["id"] for s in sessions]


def test_unknown_and_foreign_conversations_are_404(client, base_url):
    mine = client.conversations.create(items=[{"role": "user", "content": "secret"}])
    stranger = openai_client(base_url, "stranger")
    calls = [lambda c, cid: c.conversations.retrieve(cid),
             lambda c, cid: c.conversations.update(cid, metadata={"x": "y"}),
             lambda c, cid: c.conversations.items.list(cid),
             lambda c, cid: c.conversations.items.create(cid, items=[{"role": "user", "content": "hi"}]),
             lambda c, cid: c.conversations.delete(cid),
             lambda c, cid: c.responses.create(model=MODEL, conversation=cid, input="hi", max_output_tokens=2)]
    for call in calls:
        for c, cid in ((stranger, mine.id), (client, "conv_nope")):
            with pytest.raises(openai.NotFoundError) as info:
                call(c, cid)
            assert info.value.body["message"] and info.value.body["type"] == "invalid_request_error"
    with pytest.raises(openai.NotFoundError):
        client.conversations.items.retrieve("msg_nope", conversation_id=mine.id)
    with pytest.raises(openai.NotFoundError):
        client.conversations.items.list(mine.id, after="msg_nope")
    assert texts(client.conversations.items.list(mine.id)) == [("user", "secret")]  # untouched


@pytest.mark.parametrize("body,param", [
    ({"items": [{"role": "user", "content": [{"type": "input_file", "file_id": "f"}]}]}, "items"),
    ({"items": [{"role": "wizard", "content": "x"}]}, "items"),
    ({"items": [{"role": "user", "content": "x"}] * 21}, "items"),
    ({"metadata": {f"k{i}": "v" for i in range(17)}}, "metadata"),
    ({"metadata": {"k": "v" * 513}}, "metadata.k"),
    ({"items": [{"role": "user", "content": "this is verboten"}]}, "items"),
])
def test_bad_conversations_are_a_400_naming_the_field(base_url, body, param):
    r = httpx.post(f"{base_url}/v1/conversations", json=body, headers=as_user("conversationalist"), timeout=30)
    assert r.status_code == 400, r.text
    assert (r.json()["error"]["param"] or "").startswith(param)
