"""Replies that outlive connections (resume over SSE and WebSocket), rooms, and the moderation stage."""

import json
import time

import httpx
import openai
import pytest

from ..helpers import as_user, openai_client, sse_events, turn, ws_connect, ws_until

pytestmark = pytest.mark.serve


def new_session(base_url: str, **body) -> str:
    return httpx.post(base_url + "/v1/sessions", json=body, headers=as_user()).json()["id"]


def start_and_drop(base_url: str, sid: str, keep: int, **fields) -> tuple[str, list[tuple[str, str, dict]]]:
    """Start a reply, read ``keep`` events, drop the connection. Returns (reply URL, [(id, event, data)])."""
    seen = []
    body = {"content": "Write a long story about a lighthouse.", "max_tokens": 48, "temperature": 0,
            "ignore_eos": True, **fields}
    with httpx.stream("POST", f"{base_url}/v1/sessions/{sid}/messages", json=body, timeout=60, headers=as_user()) as r:
        assert r.status_code == 200
        location = r.headers["content-location"]
        event_id = name = None
        for line in r.iter_lines():
            if line.startswith("id: "):
                event_id = line[4:]
            elif line.startswith("event: "):
                name = line[7:]
            elif line.startswith("data: "):
                seen.append((event_id, name, json.loads(line[6:])))
                if len(seen) == keep:
                    break
    return location, seen


def resume(base_url: str, location: str, last_event_id: str | None) -> list[tuple[str, dict]]:
    headers = {**as_user(), **({"Last-Event-ID": last_event_id} if last_event_id else {})}
    with httpx.stream("GET", base_url + location, headers=headers, timeout=60) as r:
        assert r.status_code == 200, r.read()
        return sse_events(r)


def text_of(events) -> str:
    return "".join(e["text"] for name, e in events if name == "delta")


def test_sse_reconnect_with_last_event_id_gets_the_rest_and_the_turn_is_saved(base_url):
    sid = new_session(base_url)
    location, seen = start_and_drop(base_url, sid, keep=4)
    assert [name for _, name, _ in seen][0] == "turn" and seen[0][0]
    rest = resume(base_url, location, seen[-1][0])
    assert rest[-1][0] == "done" and rest[-1][1]["usage"]["completion_tokens"] == 48
    partial = text_of([(name, data) for _, name, data in seen])
    history = httpx.get(f"{base_url}/v1/sessions/{sid}", headers=as_user()).json()
    # Nothing missed, nothing repeated: the two halves are the saved reply.
    assert partial + text_of(rest) == history["messages"][-1]["content"]
    # After the end, the reply is still there in full, and from any id on.
    whole = resume(base_url, location, None)
    assert text_of(whole) == history["messages"][-1]["content"] and whole[0][0] == "turn"


def test_unknown_and_expired_replies(base_url):
    sid = new_session(base_url)
    r = httpx.get(f"{base_url}/v1/sessions/{sid}/replies/r{int(time.time() * 1000):x}-0000", headers=as_user())
    assert r.status_code == 404
    old = int((time.time() - 7200) * 1000)
    r = httpx.get(f"{base_url}/v1/sessions/{sid}/replies/r{old:x}-0000", headers=as_user())
    assert r.status_code == 410 and r.json()["error"]["code"] == "reply_gone"


def test_one_reply_at_a_time_and_cancel_by_url(base_url):
    sid = new_session(base_url)
    location, _ = start_and_drop(base_url, sid, keep=2, max_tokens=400)
    r = httpx.post(f"{base_url}/v1/sessions/{sid}/messages", json={"content": "another"}, headers=as_user())
    assert r.status_code == 409 and r.json()["error"]["code"] == "busy"
    assert httpx.post(base_url + location + "/cancel", headers=as_user()).status_code == 202
    rest = resume(base_url, location, None)
    assert rest[-1][0] == "done" and rest[-1][1]["finish_reason"] == "cancelled"
    assert httpx.get(f"{base_url}/v1/sessions/{sid}", headers=as_user()).json()["turns"] == 0
    turn(base_url, sid, "Now a short one.", max_tokens=4)  # the session is free again


async def test_websocket_resume_after_a_dropped_socket(base_url):
    async with ws_connect(base_url, "resumer") as ws:
        await ws.send(json.dumps({"type": "start"}))
        session, _ = await ws_until(ws, "session")
        await ws.send(json.dumps({"type": "message", "content": "Count slowly to thirty.", "max_tokens": 40,
                                  "temperature": 0, "ignore_eos": True}))
        first, _ = await ws_until(ws, "delta")
        reply_id, last = first["reply_id"], first["id"]
    async with ws_connect(base_url, "resumer") as ws:
        await ws.send(json.dumps({"type": "resume", "reply_id": reply_id, "last_event_id": last,
                                  "session_id": session["id"]}))
        done, rest = await ws_until(ws, "done")
    saved = httpx.get(f"{base_url}/v1/sessions/{session['id']}", headers=as_user("resumer")).json()
    assert first["text"] + "".join(e["text"] for e in rest if e["type"] == "delta") == saved["messages"][-1]["content"]
    assert done["usage"]["completion_tokens"] == 40


async def test_room_broadcast_and_offline_delivery(any_store_url):
    async with ws_connect(any_store_url, "ann") as ann, ws_connect(any_store_url, "bob") as bob:
        await ann.send(json.dumps({"type": "start", "room": True, "title": "team"}))
        room, _ = await ws_until(ann, "session")
        assert room["room"]
        carl = await ws_connect(any_store_url, "carl")
        for ws in (bob, carl):
            await ws.send(json.dumps({"type": "join", "session_id": room["id"]}))
            await ws_until(ws, "session")
        await ann.send(json.dumps({"type": "message", "content": "Hello room, name a planet.", "max_tokens": 12,
                                   "temperature": 0}))
        seen = {}
        for name, ws in (("ann", ann), ("bob", bob), ("carl", carl)):
            done, before = await ws_until(ws, "done")
            message = [e for e in before if e["type"] == "message"]
            assert message and message[0]["author"] == "ann" and message[0]["content"] == "Hello room, name a planet."
            seen[name] = "".join(e["text"] for e in before if e["type"] == "delta")
            if name == "carl":
                last_carl = done["id"]
        assert seen["ann"] == seen["bob"] == seen["carl"] and seen["ann"]
        await carl.close()  # carl goes offline; bob talks
        await bob.send(json.dumps({"type": "message", "content": "And a moon of it?", "max_tokens": 12,
                                   "temperature": 0}))
        done_bob, before_bob = await ws_until(bob, "done")
        async with ws_connect(any_store_url, "carl") as carl:
            await carl.send(json.dumps({"type": "join", "session_id": room["id"], "last_event_id": last_carl}))
            session, _ = await ws_until(carl, "session")
            done_carl, missed = await ws_until(carl, "done")
        assert [e["content"] for e in missed if e["type"] == "message"] == ["And a moon of it?"]
        assert "".join(e["text"] for e in missed if e["type"] == "delta") == \
            "".join(e["text"] for e in before_bob if e["type"] == "delta")
        history = httpx.get(f"{any_store_url}/v1/sessions/{room['id']}", headers=as_user("carl")).json()
        assert history["turns"] == 2
        # Rooms are joined by id, but only the owner may delete one.
        assert httpx.delete(f"{any_store_url}/v1/sessions/{room['id']}", headers=as_user("bob")).status_code == 404


async def test_blocked_input_is_refused_everywhere_and_nothing_is_stored(base_url):
    sid = new_session(base_url)
    r = httpx.post(f"{base_url}/v1/sessions/{sid}/messages", json={"content": "say the VERBOTEN word"}, headers=as_user())
    assert r.status_code == 400 and r.json()["error"]["code"] == "content_blocked"
    client = openai_client(base_url)
    with pytest.raises(openai.BadRequestError, match="content policy"):
        client.chat.completions.create(model="smollm2-135m-instruct",
                                       messages=[{"role": "user", "content": "a forbidden   phrase here"}])
    async with ws_connect(base_url, "mod") as ws:
        await ws.send(json.dumps({"type": "start", "session_id": None}))
        await ws_until(ws, "session")
        await ws.send(json.dumps({"type": "message", "content": "verboten!"}))
        error, _ = await ws_until(ws, "error")
        assert error["code"] == "content_blocked" and error["status"] == 400
    assert httpx.get(f"{base_url}/v1/sessions/{sid}", headers=as_user()).json()["turns"] == 0
