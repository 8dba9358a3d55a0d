"""Small clients for the sessions API used by several test modules, and the one place tests say
who is calling (:func:`as_user`, :func:`openai_client`)."""

import asyncio
import json

import httpx
import openai
import websockets

from ..apps import ADMIN_USER, token_for

TESTER = "tester"


def as_user(user: str = TESTER) -> dict:
    """Request headers that make the caller ``user`` (a JWT the test app trusts)."""
    return {"Authorization": f"Bearer {token_for(user)}"}


def as_admin() -> dict:
    return as_user(ADMIN_USER)


def openai_client(base_url: str, user: str = "openai-tester", asynchronous: bool = False, **options):
    """The official SDK, unchanged, pointed at the app and calling as ``user``."""
    cls = openai.AsyncOpenAI if asynchronous else openai.OpenAI
    return cls(base_url=base_url + "/v1", api_key=token_for(user), **options)


def ws_connect(base_url: str, user: str = "ws-tester", **options):
    """A WebSocket to the app as ``user`` (a non-browser client may send the Authorization header)."""
    return websockets.connect(base_url.replace("http://", "ws://") + "/v1/ws", additional_headers=as_user(user),
                              **options)


def sse_events(response) -> list[tuple[str, dict]]:
    return parse_sse(response.iter_lines())


def parse_sse(lines) -> list[tuple[str, dict]]:
    """[(event name, data)] of an SSE body given as lines."""
    events, name = [], None
    for line in lines:
        if line.startswith("event: "):
            name = line[7:]
        elif line.startswith("data: "):
            events.append((name, json.loads(line[6:])))
    return events


def send_message(base_url, session_id, content, headers=None, **fields):
    """POST a message (as :data:`TESTER` unless ``headers`` say otherwise); returns
    (200, [(event, data), ...]) or (status, error body)."""
    with httpx.stream("POST", f"{base_url}/v1/sessions/{session_id}/messages", headers=headers or as_user(),
                      timeout=120,
                      json={"content": content, "temperature": 0, "max_tokens": 24, **fields}) as r:
        if r.status_code != 200:
            r.read()
            return r.status_code, r.json()
        return 200, sse_events(r)


def turn(base_url, session_id, content, **fields) -> tuple[str, dict]:
    """One successful turn: (reply text, done event)."""
    status, events = send_message(base_url, session_id, content, **fields)
    assert status == 200, events
    done = [e for name, e in events if name == "done"]
    assert done, events
    return "".join(e["text"] for name, e in events if name == "delta"), done[0]


async def ws_until(ws, kind, timeout=60):
    """Receive events until one of type ``kind``; return (that event, everything before it but the
    server's heartbeat pings, which arrive at any time: every second in the test config). An error
    event while waiting for something else fails at once, and so does ``timeout`` seconds in all."""
    seen = []
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        left = deadline - asyncio.get_running_loop().time()
        event = json.loads(await asyncio.wait_for(ws.recv(), max(left, 0.001)))
        if event["type"] == kind:
            return event, seen
        assert event["type"] != "error", f"error event while waiting for {kind!r}: {event}"
        if event["type"] != "ping":  # heartbeats come at any time
            seen.append(event)


def make_key(base_url: str, user: str, **fields) -> str:
    """A new API key for ``user`` (with its own quota in ``fields``), made through the admin API."""
    r = httpx.post(f"{base_url}/v1/admin/keys", json={"user": user, **fields}, headers=as_admin(), timeout=30)
    assert r.status_code == 201, r.text
    return r.json()["key"]


def bearer(key: str) -> dict:
    return {"Authorization": f"Bearer {key}"}
