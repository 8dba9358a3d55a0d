"""Server-held dialogue over the WebSocket protocol (docs/websocket.md)."""

import asyncio
import json

import pytest

from ...helpers import ws_connect, ws_until

pytestmark = pytest.mark.serve


async def test_websocket_conversation(base_url):
    async with ws_connect(base_url) as ws:
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
    async with ws_connect(base_url) as ws:
        await ws.send(json.dumps({"type": "start", "session_id": sid}))
        session, _ = await ws_until(ws, "session")
        assert session["messages"][2]["role"] == "assistant" and session["messages"][2]["content"] == text1
        assert session["messages"][2]["id"] == events[0]["item_id"]  # the reply, as a conversation item
        assert session["turns"] == 2


async def test_websocket_garbage_ping_and_heartbeat(base_url):
    async with ws_connect(base_url) as ws:
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
    async with ws_connect(base_url) as ws:
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
