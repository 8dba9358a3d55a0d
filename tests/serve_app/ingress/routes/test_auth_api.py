"""Authentication through the real app: no credential or a bad one is 401 on every API route and on
the WebSocket; a header never switches identity; another identity's sessions and replies are 404;
admin routes refuse user credentials; API keys made by the admin API work with the official SDK
and stop working when revoked; a WebSocket ticket works once fetched with a key."""

import json

import httpx
import openai
import pytest
import websockets

from ...helpers import as_admin, as_user, bearer, make_key, openai_client, send_message, ws_connect, ws_until

pytestmark = pytest.mark.serve
MODEL = "smollm2-135m-instruct"

API_ROUTES = [("GET", "/v1/models"), ("POST", "/v1/chat/completions"), ("GET", "/v1/sessions"),
              ("POST", "/v1/sessions"), ("GET", "/v1/sessions/0123456789abcdef0123456789abcdef"),
              ("GET", "/v1/replies"), ("POST", "/v1/ws-ticket"), ("GET", "/ops/state"), ("GET", "/v1/admin/keys")]


@pytest.mark.parametrize("headers", [{}, {"Authorization": "Bearer nonsense"}, {"X-User-Id": "alice"},
                                     {"Authorization": "Bearer cs-000000000000-" + "A" * 43}])
def test_every_api_route_needs_a_verified_credential(base_url, headers):
    for method, path in API_ROUTES:
        r = httpx.request(method, base_url + path, headers=headers, json={}, timeout=30)
        assert r.status_code == 401, (method, path, r.text)
        assert r.json()["error"]["code"] == "invalid_api_key"
    assert httpx.get(base_url + "/healthz").status_code == 200  # probes and pages stay open
    assert httpx.get(base_url + "/").status_code == 200


def test_a_header_never_switches_identity(base_url):
    sid = httpx.post(base_url + "/v1/sessions", json={"system_prompt": "alice's secret"},
                     headers=as_user("alice")).json()["id"]
    as_bob_claiming_alice = {**as_user("bob"), "X-User-Id": "alice", "X-Forwarded-User": "alice"}
    assert httpx.get(f"{base_url}/v1/sessions/{sid}", headers=as_bob_claiming_alice).status_code == 404
    assert send_message(base_url, sid, "hi", headers=as_bob_claiming_alice)[0] == 404
    assert httpx.get(f"{base_url}/v1/sessions/{sid}", headers=as_user("alice")).json()["system_prompt"] == \
        "alice's secret"


def test_admin_routes_refuse_user_credentials(base_url):
    user_key = make_key(base_url, "plain-user")
    for headers in (as_user("plain-user"), bearer(user_key)):
        for method, path in [("GET", "/ops/state"), ("GET", "/v1/admin/keys"), ("POST", "/v1/admin/keys")]:
            r = httpx.request(method, base_url + path, headers=headers, json={"user": "x"}, timeout=30)
            assert r.status_code == 403 and r.json()["error"]["code"] == "admin_only", (path, r.text)
    assert httpx.get(base_url + "/ops/state", headers=as_admin(), timeout=30).status_code == 200


def test_api_keys_work_with_the_sdk_are_listed_without_secrets_and_revoked(base_url):
    key = make_key(base_url, "sdk-user", name="ci")
    client = openai.OpenAI(base_url=base_url + "/v1", api_key=key)
    reply = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Hi"}], max_tokens=3)
    assert reply.usage.completion_tokens == 3
    listed = httpx.get(base_url + "/v1/admin/keys", headers=as_admin()).json()["data"]
    mine = [k for k in listed if k["user"] == "sdk-user"]
    assert mine and all("hash" not in k and "key" not in k for k in listed)
    assert httpx.delete(f"{base_url}/v1/admin/keys/{mine[0]['id']}", headers=as_admin()).status_code == 204
    with pytest.raises(openai.AuthenticationError):
        client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Hi"}], max_tokens=3)
    assert httpx.delete(f"{base_url}/v1/admin/keys/ffffffffffff", headers=as_admin()).status_code == 404


def test_sessions_of_api_key_users_belong_to_the_user_not_the_key(base_url):
    first, second = make_key(base_url, "two-keys"), make_key(base_url, "two-keys")
    sid = httpx.post(base_url + "/v1/sessions", json={}, headers=bearer(first)).json()["id"]
    assert httpx.get(f"{base_url}/v1/sessions/{sid}", headers=bearer(second)).status_code == 200
    assert httpx.get(f"{base_url}/v1/sessions/{sid}", headers=bearer(make_key(base_url, "other"))).status_code == 404


async def test_websocket_needs_a_credential_or_a_ticket(base_url):
    ws_base = base_url.replace("http://", "ws://") + "/v1/ws"
    for url, headers in [(ws_base, {}), (ws_base + "?user=alice", {}), (ws_base, {"X-User-Id": "alice"}),
                         (ws_base + "?ticket=forged.ticket", {})]:
        with pytest.raises(websockets.InvalidStatus) as refused:
            async with websockets.connect(url, additional_headers=headers):
                pass
        assert refused.value.response.status_code == 403, url
    key = make_key(base_url, "browser-like")
    ticket = httpx.post(base_url + "/v1/ws-ticket", headers=bearer(key)).json()["ticket"]
    async with websockets.connect(f"{ws_base}?ticket={ticket}") as ws:
        await ws.send(json.dumps({"type": "start", "title": "via ticket"}))
        session, _ = await ws_until(ws, "session")
    listed = httpx.get(base_url + "/v1/sessions", headers=bearer(key)).json()["data"]
    assert session["id"] in [s["id"] for s in listed]  # the ticket carried the key's identity
    async with ws_connect(base_url, "someone-else") as ws:
        await ws.send(json.dumps({"type": "start", "session_id": session["id"]}))
        error, _ = await ws_until(ws, "error")
        assert error["status"] == 404


def test_the_sdk_with_a_bad_key_gets_an_authentication_error(base_url):
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=base_url + "/v1", api_key="sk-not-ours").models.list()
    assert [m.id for m in openai_client(base_url).models.list()] == [MODEL]
