"""Server-held dialogue over HTTP: the sessions API, replies streamed as SSE."""

import httpx
import pytest

from ...helpers import as_user, send_message

pytestmark = pytest.mark.serve


def test_multiturn_history_grows_the_prompt(base_url):
    created = httpx.post(base_url + "/v1/sessions", json={"system_prompt": "You are terse."}, headers=as_user()).json()
    sid = created["id"]
    status, first = send_message(base_url, sid, "My name is Ada. What is 2+2?")
    assert status == 200
    done1 = [e for name, e in first if name == "done"][0]
    reply1 = "".join(e["text"] for name, e in first if name == "delta")
    status, second = send_message(base_url, sid, "What is my name?")
    done2 = [e for name, e in second if name == "done"][0]
    assert done2["usage"]["prompt_tokens"] >= done1["usage"]["prompt_tokens"] + done1["usage"]["completion_tokens"]
    history = httpx.get(f"{base_url}/v1/sessions/{sid}", headers=as_user()).json()
    assert [m["role"] for m in history["messages"]] == ["system", "user", "assistant", "user", "assistant"]
    assert history["messages"][2]["content"] == reply1
    assert history["turns"] == 2


def test_session_listing_delete_and_owner_isolation(base_url):
    alice = as_user("alice")
    sid = httpx.post(base_url + "/v1/sessions", json={"title": "mine"}, headers=alice).json()["id"]
    assert sid in [s["id"] for s in httpx.get(base_url + "/v1/sessions", headers=alice).json()["data"]]
    # Another identity sees nothing.
    bob = as_user("bob")
    assert httpx.get(f"{base_url}/v1/sessions/{sid}", headers=bob).status_code == 404
    assert send_message(base_url, sid, "hi", headers=bob)[0] == 404
    assert sid not in [s["id"] for s in httpx.get(base_url + "/v1/sessions", headers=bob).json()["data"]]
    assert httpx.delete(f"{base_url}/v1/sessions/{sid}", headers=alice).status_code == 204
    assert httpx.get(f"{base_url}/v1/sessions/{sid}", headers=alice).status_code == 404


def test_bad_session_input(base_url):
    sid = httpx.post(base_url + "/v1/sessions", json={}, headers=as_user()).json()["id"]
    assert send_message(base_url, "no-such-session", "hi")[0] == 404
    status, body = send_message(base_url, sid, "")
    assert status == 400 and "content" in body["error"]["message"]
    status, body = send_message(base_url, sid, "word " * 2000)
    assert status == 400 and "context budget" in body["error"]["message"]
    r = httpx.post(f"{base_url}/v1/sessions/{sid}/messages", content=b"[1,2", headers={**as_user(), "content-type": "application/json"})
    assert r.status_code == 400
    # Nothing was stored by the failed turns, and the session still works.
    assert httpx.get(f"{base_url}/v1/sessions/{sid}", headers=as_user()).json()["turns"] == 0
    assert send_message(base_url, sid, "hello")[0] == 200


def test_history_is_cut_to_the_context_budget_by_whole_turns(base_url):
    sid = httpx.post(base_url + "/v1/sessions", json={}, headers=as_user()).json()["id"]
    dropped = []
    for i in range(8):
        status, events = send_message(base_url, sid, f"Tell me fact number {i} about whales, please.", max_tokens=48)
        assert status == 200
        turn = [e for name, e in events if name == "turn"][0]
        done = [e for name, e in events if name == "done"][0]
        assert done["usage"]["prompt_tokens"] <= 512
        dropped.append(turn["history_turns_dropped"])
    assert dropped[0] == 0 and dropped[-1] > 0  # older turns were dropped once the budget filled
    assert httpx.get(f"{base_url}/v1/sessions/{sid}", headers=as_user()).json()["turns"] == 8  # but all are kept in the store
