"""Server-held dialogue: the sessions API over SSE and the WebSocket protocol."""

import asyncio
import json

import httpx
import pytest
import websockets

from .helpers import send_message

pytestmark = pytest.mark.serve


def test_multiturn_history_grows_the_prompt(base_url):
    created = httpx.post(base_url + "/v1/sessions", json={"system_prompt": "You are terse."}).json()
    sid = created["id"]
    status, first = send_message(base_url, sid, "My name is Ada. What is 2+2?")
    assert status == 200
    done1 = [e for name, e in first if name == "done"][0]
    reply1 = "".join(e["text"] for name, e in first if name == "delta")
    status, second = send_message(base_url, sid, "What is my name?")
    done2 = [e for name, e in second if name == "done"][0]
    assert done2["usage"]["prompt_tokens"] >= done1["usage"]["prompt_tokens"] + done1["usage"]["completion_tokens"]
    history = httpx.get(f"{base_url}/v1/sessions/{sid}").json()
    assert [m["role"] for m in history["messages"]] == ["system", "user", "assistant", "user", "assistant"]
    assert history["messages"][2]["content"] == reply1
    assert history["turns"] == 2


def test_session_listing_delete_and_owner_isolation(base_url):
    alice = {"Authorization": "Bearer alice-key"}
    sid = httpx.post(base_url + "/v1/sessions", json={"title": "mine"}, headers=alice).json()["id"]
    assert sid in [s["id"] for s in httpx.get(base_url + "/v1/sessions", headers=alice).json()["data"]]
    # Another identity sees nothing.
    bob = {"Authorization": "Bearer bob-key"}
    assert httpx.get(f"{base_url}/v1/sessions/{sid}", headers=bob).status_code == 404
    assert send_message(base_url, sid, "hi", headers=bob)[0] == 404
    assert sid not in [s["id"] for s in httpx.get(base_url + "/v1/sessions", headers=bob).json()["data"]]
    assert httpx.delete(f"{base_url}/v1/sessions/{sid}", headers=alice).status_code == 204
    assert httpx.get(f"{base_url}/v1/sessions/{sid}", headers=alice).status_code == 404


def test_bad_session_input(base_url):
    sid = httpx.post(base_url + "/v1/sessions", json={}).json()["id"]
    assert send_message(base_url, "no-such-session", "hi")[0] == 404
    status, body = send_message(base_url, sid, "")
    assert status == 400 and "content" in body["error"]["message"]
    status, body = send_message(base_url, sid, "word " * 2000)
    assert status == 400 and "context budget" in body["error"]["message"]
    r = httpx.post(f"{base_url}/v1/sessions/{sid}/messages", content=b"[1,2", headers={"content-type": "application/json"})
    assert r.status_code == 400
    # Nothing was stored by the failed turns, and the session still works.
    assert httpx.get(f"{base_url}/v1/sessions/{sid}").json()["turns"] == 0
    assert send_message(base_url, sid, "hello")[0] == 200


def test_history_is_cut_to_the_context_budget_by_whole_turns(base_url):
    sid = httpx.post(base_url + "/v1/sessions", json={}).json()["id"]
    dropped = []
    for i in range(8):
        status, events = send_message(base_url, sid, f"Tell me fact number {i} about whales, please.", max_tokens=48)
        assert status == 200
        turn = [e for name, e in events if name == "turn"][0]
        done = [e for name, e in events if name == "done"][0]
        assert done["usage"]["prompt_tokens"] <= 512
        dropped.append(turn["history_turns_dropped"])
    assert dropped[0] == 0 and dropped[-1] > 0  # older turns were dropped once the budget filled
    assert httpx.get(f"{base_url}/v1/sessions/{sid}").json()["turns"] == 8  # but all are kept in the store


async def ws_until(ws, kind, timeout=60):
    """Receive events until one of type ``kind``; return (that event, everything before it but the
    server's heartbeat pings, which arrive at any time: every second in the test config)."""
    seen = []
    while True:
        event = json.loads(await asyncio.wait_for(ws.recv(), timeout))
        if event["type"] == kind:
            return event, seen
        if event["type"] != "ping":  # heartbeats come at any time
            seen.append(event)


def ws_url(base_url):
    return base_url.replace("http://", "ws://") + "/v1/ws?user=ws-tester"


async def test_websocket_conversation(base_url):
    async with websockets.connect(ws_url(base_url)) as ws:
        await ws.send(json.dumps({"type": "start", "system_prompt": "Be brief."}))
        session, _ = await ws_until(ws, "session")
        sid = session["id"]
        await ws.send(json.dumps({"type": "message", "content": "My name is Ada. Hello!", "temperature": 0,
                                  "max_tokens": 16, "ref": "m1"}))
        done1, before = await ws_until(ws, "done")
        events = [e for e in before if e["type"] != "ping"]  # heartbeats (1 s in tests) may come first
        assert done1["ref"] == "m1" and events[0]["type"] == "turn"
        text1 = "".join(e["text"] for e in before if e["type"] == "delta")
        await ws.send(json.dumps({"type": "message", "content": "What is my name?", "temperature": 0,
                                  "max_tokens": 16}))
        done2, _ = await ws_until(ws, "done")
        assert done2["usage"]["prompt_tokens"] >= done1["usage"]["prompt_tokens"] + done1["usage"]["completion_tokens"]
    # Resume the same session on a new connection: the history is there.
    async with websockets.connect(ws_url(base_url)) as ws:
        await ws.send(json.dumps({"type": "start", "session_id": sid}))
        session, _ = await ws_until(ws, "session")
        assert session["messages"][2] == {"role": "assistant", "content": text1}
        assert session["turns"] == 2


async def test_websocket_garbage_ping_and_heartbeat(base_url):
    async with websockets.connect(ws_url(base_url)) as ws:
        for frame in ["not json", "[1,2]", json.dumps({"type": 5}), json.dumps({"type": "fly"}),
                      json.dumps({"type": "message", "content": "hi"})]:
            await ws.send(frame)
            error, _ = await ws_until(ws, "error")
            assert error["message"] and error["status"] in (400, 409)
        await ws.send(json.dumps({"type": "start", "session_id": "missing"}))
        error, _ = await ws_until(ws, "error")
        assert error["status"] == 404
        await ws.send(json.dumps({"type": "ping", "ref": 7}))
        pong, _ = await ws_until(ws, "pong")
        assert pong["ref"] == 7
        ping, _ = await ws_until(ws, "ping", timeout=5)  # heartbeat (1 s in the test config)
        await ws.send(json.dumps({"type": "start"}))
        await ws_until(ws, "session")
        await ws.send(json.dumps({"type": "message", "content": "Still there?", "max_tokens": 4}))
        done, _ = await ws_until(ws, "done")
        assert done["usage"]["completion_tokens"] <= 4


async def test_websocket_cancel_saves_nothing_and_frees_the_replica(base_url, model_handle):
    async with websockets.connect(ws_url(base_url)) as ws:
        await ws.send(json.dumps({"type": "start"}))
        session, _ = await ws_until(ws, "session")
        await ws.send(json.dumps({"type": "message", "content": "Write a very long poem.", "max_tokens": 400}))
        await ws_until(ws, "delta")
        await ws.send(json.dumps({"type": "message", "content": "again"}))
        busy, _ = await ws_until(ws, "error")
        assert busy["code"] == "busy"
        await ws.send(json.dumps({"type": "cancel"}))
        done, _ = await ws_until(ws, "done")
        assert done["finish_reason"] == "cancelled"
        await ws.send(json.dumps({"type": "start", "session_id": session["id"]}))
        again, _ = await ws_until(ws, "session")
        assert again["turns"] == 0
    for _ in range(50):
        if (await model_handle.stats.remote())["running"] == 0:
            break
        await asyncio.sleep(0.1)
    assert (await model_handle.stats.remote())["running"] == 0
