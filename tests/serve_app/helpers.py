"""Small clients for the sessions API used by several test modules."""

import json

import httpx


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
    """POST a message; returns (200, [(event, data), ...]) or (status, error body)."""
    with httpx.stream("POST", f"{base_url}/v1/sessions/{session_id}/messages", headers=headers, timeout=120,
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
