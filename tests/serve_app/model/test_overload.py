"""A full model tier answers fast: with every engine row busy and its waiting queue full, a new
request on any path (OpenAI, sessions SSE, WebSocket) gets 503 with Retry-After within about a
second instead of hanging; once the tier has room, requests are served again."""

import asyncio
import json
import time

import httpx
import pytest
from ray import serve

from serve_app.app import build_graph

from ...apps import TEST_ARGS
from ..helpers import as_user, ws_connect, ws_until

pytestmark = pytest.mark.serve
MODEL = "smollm2-135m-instruct"
LONG = {"model": MODEL, "messages": [{"role": "user", "content": "Write a very long story."}], "max_tokens": 900,
        "ignore_eos": True, "stream": True}


@pytest.fixture(scope="module")
def tiny_url(base_url):
    """An app whose model tier holds one running and one waiting sequence."""
    args = {**TEST_ARGS, "model": {**TEST_ARGS["model"], "num_threads": 1, "max_running_seqs": 1,
                                   "max_waiting_seqs": 1}}
    serve.run(build_graph(args, options={"ModelServer": {"num_replicas": 1, "autoscaling_config": None,
                                                         "max_ongoing_requests": 4, "max_queued_requests": 2,
                                                         "ray_actor_options": {"num_cpus": 0}}}),
              name="tiny", route_prefix="/tiny")
    yield base_url + "/tiny"
    serve.delete("tiny")


async def test_every_path_answers_503_with_retry_after_when_the_tier_is_full(tiny_url):
    model = serve.get_deployment_handle("ModelServer", app_name="tiny")
    async with httpx.AsyncClient(timeout=300, headers=as_user("filler")) as http:
        async def fill():
            async with http.stream("POST", tiny_url + "/v1/chat/completions", json=LONG) as r:
                async for _ in r.aiter_lines():
                    pass

        fillers = []
        for expected in [(1, 0), (1, 1)]:  # one sequence runs, then another waits for its row
            fillers.append(asyncio.create_task(fill()))
            for _ in range(100):
                stats = await model.stats.remote()
                if (stats["running"], stats["waiting"]) == expected:
                    break
                await asyncio.sleep(0.1)
            assert (stats["running"], stats["waiting"]) == expected, stats

        started = time.monotonic()
        r = await http.post(tiny_url + "/v1/chat/completions", json={**LONG, "stream": False}, headers=as_user("late"))
        assert r.status_code == 503 and int(r.headers["retry-after"]) >= 1, r.text
        assert r.json()["error"]["code"] == "overloaded"
        sid = (await http.post(tiny_url + "/v1/sessions", json={}, headers=as_user("late"))).json()["id"]
        r = await http.post(f"{tiny_url}/v1/sessions/{sid}/messages", json={"content": "hi"}, headers=as_user("late"))
        assert r.status_code == 503 and "retry-after" in r.headers, r.text
        async with ws_connect(tiny_url, "late") as ws:
            await ws.send(json.dumps({"type": "start"}))
            await ws_until(ws, "session")
            await ws.send(json.dumps({"type": "message", "content": "hi"}))
            error, _ = await ws_until(ws, "error")
            assert error["status"] == 503 and error["retry_after_s"] >= 1
        assert time.monotonic() - started < 6  # three refusals, each at once: no queueing behind the fillers

        for filler in fillers:
            filler.cancel()  # the fillers' clients leave: their sequences are aborted
        await asyncio.gather(*fillers, return_exceptions=True)
    async with httpx.AsyncClient(timeout=120, headers=as_user("late")) as http:
        for _ in range(40):
            r = await http.post(tiny_url + "/v1/chat/completions", json={**LONG, "stream": False, "max_tokens": 4})
            if r.status_code == 200:
                break
            await asyncio.sleep(0.5)
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 4
