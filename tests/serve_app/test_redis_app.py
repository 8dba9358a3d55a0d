"""The app on a real Redis in front of a real PostgreSQL, with two ingress replicas: a reply resumed
on the other ingress replica (SSE and WebSocket), sessions that outlive a redeploy of the whole app,
a conversation that survives a Redis flush once archived, and a clear 503 when Redis is gone."""

import contextlib
import json
import time

import httpx
import pytest
import ray
import redis
from ray import serve

from serve_app.ingress.locks import LOCK_LEASE_S

from ..apps import RUN_PREFIX, redis_graph, start_redis_server
from .helpers import as_user, openai_client, parse_sse, send_message, turn, ws_connect, ws_until

pytestmark = pytest.mark.serve

LONG = {"content": "Write a long story about a lighthouse keeper.", "max_tokens": 96, "temperature": 0,
        "ignore_eos": True}


def start_reply(base_url: str, sid: str, keep: int, body: dict = LONG) -> tuple[str, str, str, str]:
    """Start a long reply, read ``keep`` events, drop the connection.
    Returns (reply URL, the ingress replica that produces it, last event id, text so far)."""
    text, event_id = "", None
    with httpx.stream("POST", f"{base_url}/v1/sessions/{sid}/messages", json=body, timeout=60, headers=as_user()) as r:
        assert r.status_code == 200, r.read()
        producer, location = r.headers["x-served-by"], r.headers["content-location"]
        seen = 0
        for line in r.iter_lines():
            if line.startswith("id: "):
                event_id = line[4:]
            elif line.startswith("data: "):
                text += json.loads(line[6:]).get("text", "")
                seen += 1
                if seen == keep:
                    break
    return location, producer, event_id, text


async def test_sse_resume_lands_on_the_other_ingress_replica(redis_base_url):
    sid = httpx.post(redis_base_url + "/v1/sessions", json={}, headers=as_user()).json()["id"]
    location, producer, last_id, head = start_reply(redis_base_url, sid, keep=4)
    assert location.startswith("/redis/v1/sessions/")  # the app's route prefix included
    assert httpx.get(f"{redis_base_url}/v1/sessions/{sid}", headers=as_user()).json()["active_reply_id"] in location
    origin = redis_base_url.removesuffix("/redis")

    # Resume until one lands on the other ingress replica; the ones that land on the producer stay
    # open (Serve's router then prefers the other replica) and must give the same remainder.
    async with httpx.AsyncClient(timeout=120, headers=as_user()) as client, contextlib.AsyncExitStack() as streams:
        opened = []
        for _ in range(20):
            r = await streams.enter_async_context(
                client.stream("GET", origin + location, headers={"Last-Event-ID": last_id}))
            assert r.status_code == 200
            opened.append(r)
            if r.headers["x-served-by"] != producer:
                break
        else:
            pytest.fail(f"20 resumes all landed on the producing replica {producer}")
        results = [parse_sse([line async for line in r.aiter_lines()]) for r in opened]
    saved = httpx.get(f"{redis_base_url}/v1/sessions/{sid}", headers=as_user()).json()
    assert saved["active_reply_id"] is None
    for events in results:
        assert events[-1][0] == "done" and events[-1][1]["usage"]["completion_tokens"] == 96
        assert head + "".join(e["text"] for name, e in events if name == "delta") == saved["messages"][-1]["content"]


async def test_websocket_resume_on_the_other_ingress_replica(redis_base_url):
    async with ws_connect(redis_base_url, "wanderer") as ws:
        producer = ws.response.headers["x-served-by"]
        await ws.send(json.dumps({"type": "start"}))
        session, _ = await ws_until(ws, "session")
        await ws.send(json.dumps({"type": "message", **LONG}))
        first, _ = await ws_until(ws, "delta")
    # Connect until the handshake comes from the other replica (keeping the misses open, which
    # also steers Serve's router away from the busy replica).
    misses = []
    try:
        for _ in range(20):
            ws = await ws_connect(redis_base_url, "wanderer")
            if ws.response.headers["x-served-by"] != producer:
                break
            misses.append(ws)
        else:
            pytest.fail(f"20 WebSocket connections all landed on {producer}")
        async with ws:
            await ws.send(json.dumps({"type": "resume", "reply_id": first["reply_id"], "last_event_id": first["id"],
                                      "session_id": session["id"]}))
            done, rest = await ws_until(ws, "done")
    finally:
        for miss in misses:
            await miss.close()
    saved = httpx.get(f"{redis_base_url}/v1/sessions/{session['id']}", headers=as_user("wanderer")).json()
    assert first["text"] + "".join(e["text"] for e in rest if e["type"] == "delta") == saved["messages"][-1]["content"]
    assert done["usage"]["completion_tokens"] == 96


def test_sessions_survive_a_redeploy_of_the_whole_app(redis_base_url, redis_url, app_postgres_url):
    headers = as_user("keeper")
    sid = httpx.post(redis_base_url + "/v1/sessions", json={"title": "kept"}, headers=headers).json()["id"]
    turn(redis_base_url, sid, "Name a colour.", headers=headers, max_tokens=8)
    turn(redis_base_url, sid, "And another one.", headers=headers, max_tokens=8)
    before = httpx.get(f"{redis_base_url}/v1/sessions/{sid}", headers=headers).json()

    serve.delete("redis")  # every replica of the app goes: ingress, dialogue state, model
    # Gone: the path now falls through to the main app at "/", which has no such route.
    assert httpx.get(f"{redis_base_url}/v1/sessions/{sid}", headers=headers).status_code == 404
    serve.run(redis_graph(redis_url, app_postgres_url), name="redis", route_prefix="/redis")

    after = httpx.get(f"{redis_base_url}/v1/sessions/{sid}", headers=headers).json()
    assert after["messages"] == before["messages"] and after["turns"] == 2
    listed = httpx.get(redis_base_url + "/v1/sessions", headers=headers).json()["data"]
    assert [s["id"] for s in listed] == [sid]
    turn(redis_base_url, sid, "One more.", headers=headers, max_tokens=8)  # the conversation goes on
    assert httpx.get(f"{redis_base_url}/v1/sessions/{sid}", headers=headers).json()["turns"] == 3


async def test_redis_going_away_is_a_503_not_a_hang(tmp_path, base_url, app_postgres_url):
    server, url = start_redis_server(tmp_path)
    down_url = base_url + "/redisdown"
    try:
        serve.run(redis_graph(url, app_postgres_url, ingress_replicas=1), name="redisdown",
                  route_prefix="/redisdown")
        sid = httpx.post(down_url + "/v1/sessions", json={}, headers=as_user()).json()["id"]
        server.kill()
        server.wait(10)
        for method, path, body in (("GET", f"/v1/sessions/{sid}", None), ("POST", "/v1/sessions", {}),
                                   ("POST", f"/v1/sessions/{sid}/messages", {"content": "hi"})):
            r = httpx.request(method, down_url + path, json=body, timeout=30, headers=as_user())
            assert r.status_code == 503, (path, r.text)
            assert r.json()["error"]["code"] == "store_unavailable"
        async with ws_connect(down_url) as ws:
            await ws.send(json.dumps({"type": "start", "session_id": sid}))
            error, _ = await ws_until(ws, "error")
            assert error["status"] == 503 and error["code"] == "store_unavailable"
            await ws.send(json.dumps({"type": "ping"}))  # the socket is still served
            await ws_until(ws, "pong")
    finally:
        server.kill()
        serve.delete("redisdown")


async def test_an_ingress_killed_mid_reply_ends_its_readers_and_frees_the_session(redis_base_url):
    sid = httpx.post(redis_base_url + "/v1/sessions", json={}, headers=as_user()).json()["id"]
    location, producer, last_id, _ = start_reply(redis_base_url, sid, keep=3, body={**LONG, "max_tokens": 600})
    origin = redis_base_url.removesuffix("/redis")
    async with httpx.AsyncClient(timeout=120, headers=as_user()) as client, contextlib.AsyncExitStack() as streams:
        for _ in range(20):  # a reader on the replica that does not produce the reply
            r = await streams.enter_async_context(client.stream("GET", origin + location,
                                                                headers={"Last-Event-ID": last_id}))
            if r.headers["x-served-by"] != producer:
                break
        else:
            pytest.fail(f"20 readers all landed on the producing replica {producer}")
        (actor,) = [a for a in ray.util.list_named_actors(all_namespaces=True) if a["name"].endswith(producer)]
        ray.kill(ray.get_actor(actor["name"], namespace=actor["namespace"]), no_restart=True)
        killed = time.monotonic()
        events = parse_sse([line async for line in r.aiter_lines()])  # ends by itself
        ended_s = time.monotonic() - killed
    assert events[-1][0] == "error" and events[-1][1]["code"] == "reply_interrupted", events[-3:]
    assert ended_s < LOCK_LEASE_S + 10
    # The session takes a new turn within a lease, not after max_reply_s.
    while True:
        status, body = send_message(redis_base_url, sid, "Are you there?", max_tokens=4)
        if status != 409:
            break
        assert time.monotonic() - killed < LOCK_LEASE_S + 10, body
        time.sleep(1)
    assert status == 200


def test_a_conversation_survives_a_redis_flush_once_archived(redis_base_url, redis_url):
    client = openai_client(redis_base_url, "archivist")
    model = "smollm2-135m-instruct"
    conversation = client.conversations.create(metadata={"kept": "yes"},
                                               items=[{"role": "user", "content": "Remember the word lantern."}])
    first = client.responses.create(model=model, conversation=conversation.id, input="Which word?", temperature=0,
                                    max_output_tokens=8)
    chained = client.responses.create(model=model, previous_response_id=first.id, input="Spell it.", temperature=0,
                                      max_output_tokens=8)
    before_items = [i.model_dump() for i in client.conversations.items.list(conversation.id, order="asc")]
    before = [client.responses.retrieve(r.id).model_dump() for r in (first, chained)]
    assert len(before_items) == 5

    # Idle for hot_ttl_s (2 s): the sweeper moves it to PostgreSQL and Redis lets go of it.
    app_redis = redis.Redis.from_url(redis_url)
    deadline = time.monotonic() + 60
    while app_redis.exists(f"{RUN_PREFIX}app:session:{conversation.id}"):
        assert time.monotonic() < deadline, "the idle conversation was never archived"
        time.sleep(0.2)
    # A flush of this app's Redis data (its key prefix: the Redis server is shared with other runs).
    flushed = list(app_redis.scan_iter(match=f"{RUN_PREFIX}app:*"))
    assert flushed and app_redis.delete(*flushed) == len(flushed)

    assert client.conversations.retrieve(conversation.id).metadata == {"kept": "yes"}
    assert [i.model_dump() for i in client.conversations.items.list(conversation.id, order="asc")] == before_items
    assert [client.responses.retrieve(r.id).model_dump() for r in (first, chained)] == before
    assert app_redis.exists(f"{RUN_PREFIX}app:session:{conversation.id}")  # read back into Redis
    # ... and it goes on, by either door.
    more = client.responses.create(model=model, previous_response_id=chained.id, input="Thanks.", temperature=0,
                                   max_output_tokens=4)
    assert more.usage.input_tokens > chained.usage.input_tokens
    assert len(list(client.conversations.items.list(conversation.id))) == 7
    app_redis.close()
