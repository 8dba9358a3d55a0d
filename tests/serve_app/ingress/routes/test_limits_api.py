"""One client's bad or greedy requests never hurt another's, through the real app: per-identity 429
with Retry-After, replies abandoned beyond a client's concurrency share refused at once while
another client is served, the poisoned batch (one bad request among ordinary ones fails alone and
nothing keeps running), bounded bodies and fields, client mistakes as 4xx."""

import asyncio
import time
from dataclasses import replace

import httpx
import pytest

from engines.protocol import GenerationRequest, SamplingParams

from ...helpers import as_user, bearer, make_key, send_message

pytestmark = pytest.mark.serve
MODEL = "smollm2-135m-instruct"


def chat(base_url, headers, content="Say hi.", **fields):
    return httpx.post(base_url + "/v1/chat/completions", headers=headers, timeout=120,
                      json={"model": MODEL, "messages": [{"role": "user", "content": content}], "max_tokens": 4,
                            "temperature": 0, **fields})


def test_requests_over_an_identitys_rate_get_429_with_retry_after_while_others_are_served(base_url):
    greedy = bearer(make_key(base_url, "greedy", requests_per_min=3))
    statuses = [httpx.get(base_url + "/v1/models", headers=greedy).status_code for _ in range(5)]
    assert statuses == [200, 200, 200, 429, 429]
    refused = httpx.get(base_url + "/v1/models", headers=greedy)
    assert int(refused.headers["retry-after"]) >= 1 and refused.json()["error"]["code"] == "rate_limit_exceeded"
    assert chat(base_url, as_user("bystander")).status_code == 200


def test_abandoned_replies_beyond_a_clients_share_are_refused_and_others_are_served(base_url, model_handle):
    abuser = bearer(make_key(base_url, "abuser", max_concurrent_replies=4))
    started = time.monotonic()
    statuses = []
    for _ in range(40):  # start a long reply in a fresh session and walk away from it
        sid = httpx.post(base_url + "/v1/sessions", json={}, headers=abuser).json()["id"]
        with httpx.stream("POST", f"{base_url}/v1/sessions/{sid}/messages", headers=abuser, timeout=60,
                          json={"content": "Write a very long story.", "max_tokens": 600, "ignore_eos": True}) as r:
            statuses.append(r.status_code)
    refusing_s = time.monotonic() - started
    assert statuses.count(200) == 4 and statuses.count(429) == 36, statuses
    assert refusing_s < 60  # refused at once, not queued
    # The abandoned replies still run (resume is a feature) and hold the abuser's share...
    active = httpx.get(base_url + "/v1/replies", headers=abuser).json()["data"]
    assert len(active) == 4
    # ...while another client is served in full.
    for i in range(4):
        r = chat(base_url, as_user("neighbour"), f"Name a fruit, number {i}.")
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] >= 1
    for reply in active:  # the owner can stop them
        assert httpx.post(base_url + reply["cancel_url"], headers=abuser).status_code == 202
    deadline = time.monotonic() + 30
    while httpx.get(base_url + "/v1/replies", headers=abuser).json()["data"] and time.monotonic() < deadline:
        time.sleep(0.2)
    assert httpx.get(base_url + "/v1/replies", headers=abuser).json()["data"] == []


async def test_a_poisoned_request_fails_alone_and_nothing_keeps_running(base_url, model_handle):
    async def ordinary(i):
        async with httpx.AsyncClient(timeout=120, headers=as_user("batch")) as http:
            r = await http.post(base_url + "/v1/chat/completions", json={
                "model": MODEL, "messages": [{"role": "user", "content": f"Count to {i}."}], "max_tokens": 8,
                "temperature": 1, "seed": i})
            return r.status_code, r.json()

    async def poisoned():
        async with httpx.AsyncClient(timeout=120, headers=as_user("batch")) as http:
            r = await http.post(base_url + "/v1/chat/completions", json={
                "model": MODEL, "messages": [{"role": "user", "content": "x"}], "temperature": 1,
                "seed": 18446744073709551616})
            return r.status_code, r.json()

    results = await asyncio.gather(poisoned(), *[ordinary(i) for i in range(8)])
    (bad_status, bad_body), good = results[0], results[1:]
    assert bad_status == 400 and bad_body["error"]["param"] == "seed", bad_body
    assert [status for status, _ in good] == [200] * 8

    # Past the HTTP edge, straight into the model replica's batch: a request the engine fails to set
    # up (an out-of-range seed smuggled past validation) fails alone.
    sampling = SamplingParams(temperature=1.0, max_tokens=6, seed=1)
    object.__setattr__(sampling, "seed", 2**64)

    async def through_the_handle(request):
        try:
            return [d async for d in model_handle.options(stream=True).generate.remote(request)][-1].finish_reason
        except Exception as exc:  # noqa: BLE001 - the poisoned one
            return type(exc).__name__

    good_request = GenerationRequest(messages=({"role": "user", "content": "Hello"},),
                                     sampling=SamplingParams(temperature=0, max_tokens=6))
    outcomes = await asyncio.gather(through_the_handle(replace(good_request, sampling=sampling)),
                                    *[through_the_handle(replace(good_request)) for _ in range(8)])
    assert outcomes[0] not in ("stop", "length") and outcomes[1:] == ["length"] * 8, outcomes
    for _ in range(50):
        stats = await model_handle.stats.remote()
        if stats["running"] == 0 and stats["waiting"] == 0:
            break
        await asyncio.sleep(0.1)
    assert stats["running"] == 0 and stats["waiting"] == 0


def test_large_bodies_get_413_before_anything_reads_them(base_url):
    big = b'{"content": "' + b"x" * (3 * 1024 * 1024) + b'"}'
    r = httpx.post(base_url + "/v1/sessions", content=big, headers={**as_user(), "content-type": "application/json"})
    assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large"

    def chunks():
        for _ in range(40):
            yield b"x" * 100_000

    r = httpx.post(base_url + "/v1/sessions", content=chunks(), headers={**as_user(), "content-type": "application/json"})
    assert r.status_code == 413  # no Content-Length: counted as it arrives


@pytest.mark.parametrize("body, param", [
    ({"system_prompt": "s" * 40_000}, "system_prompt"),
    ({"title": "t" * 201}, "title"),
])
def test_session_fields_are_bounded(base_url, body, param):
    r = httpx.post(base_url + "/v1/sessions", json=body, headers=as_user())
    assert r.status_code == 400 and param in r.json()["error"]["message"], r.text


def test_client_mistakes_are_4xx_naming_the_problem(base_url):
    r = httpx.post(base_url + "/v1/chat/completions", headers=as_user(), json={"model": MODEL, "messages": [
        {"role": "user", "content": [{"type": "image_url", "image_url": {"url": "http://x/y.png"}}]}]})
    assert r.status_code == 400 and r.json()["error"]["param"] == "messages.0.content", r.text
    sid = httpx.post(base_url + "/v1/sessions", json={}, headers=as_user()).json()["id"]
    status, events = send_message(base_url, sid, "Hi", max_tokens=2)
    location = f"/v1/sessions/{sid}/replies/{events[0][1]['reply_id']}"
    r = httpx.get(base_url + location, headers={**as_user(), "Last-Event-ID": "not-a-number"})
    assert r.status_code == 400 and "Last-Event-ID" in r.json()["error"]["message"]
    for path in ["/v1/sessions/..%2F..%2Fowner", "/v1/sessions/x:turns", f"/v1/sessions/{sid}/replies/zzz",
                 f"/v1/sessions/{sid}/replies/" + "r" * 300]:
        assert httpx.get(base_url + path, headers=as_user()).status_code == 404, path
    r = chat(base_url, as_user(), stop=["s"] * 9)
    assert r.status_code == 400 and r.json()["error"]["param"] == "stop"
