"""Reading a server's streams into RequestRecords, and Serve's status into samples."""

import json

import httpx
import pytest

from benchmarks.client import Clock, chat_completion, session_turn
from benchmarks.serve_status import parse_replicas, parse_serve_gauges


def client_for(status: int, body: bytes) -> httpx.AsyncClient:
    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(status, content=body, headers={"content-type": "text/event-stream"})

    return httpx.AsyncClient(transport=httpx.MockTransport(handler), base_url="http://fake")


def sse(*events: tuple[str | None, dict | str]) -> bytes:
    out = [": ping\r\n\r\n"]
    for name, data in events:
        text = data if isinstance(data, str) else json.dumps(data)
        out.append((f"event: {name}\r\n" if name else "") + f"data: {text}\r\n\r\n")
    return "".join(out).encode()


def chunk(text: str) -> dict:
    return {"choices": [{"index": 0, "delta": {"content": text}}]}


USAGE = {"prompt_tokens": 12, "completion_tokens": 3, "total_tokens": 15, "prompt_tokens_details": {"cached_tokens": 8}}


async def test_openai_stream_counts_content_chunks_and_takes_tokens_from_usage():
    body = sse((None, {"choices": [{"delta": {"role": "assistant", "content": ""}}]}), (None, chunk("a")),
               (None, chunk("bc")), (None, {"choices": [{"delta": {}, "finish_reason": "length"}]}),
               (None, {"choices": [], "usage": USAGE}), (None, "[DONE]"))
    async with client_for(200, body) as http:
        r = await chat_completion(http, Clock(), "m", [{"role": "user", "content": "x"}], 3)
    assert r.ok and len(r.chunk_times_s) == 2  # the empty role chunk is not a token
    assert (r.prompt_tokens, r.output_tokens, r.cached_tokens) == (12, 3, 8)
    assert r.start_s <= r.chunk_times_s[0] <= r.chunk_times_s[1] <= r.end_s


@pytest.mark.parametrize("status, body, kind", [
    (503, b'{"error": {"message": "overloaded"}}', "http_503"),
    (200, sse((None, chunk("a")), (None, {"error": {"message": "boom"}})), "stream_error"),
    (200, sse((None, chunk("a")), (None, "[DONE]")), "no_usage"),
    (200, sse((None, "{not json")), "bad_response"),
])
async def test_failures_are_recorded_by_kind(status, body, kind):
    async with client_for(status, body) as http:
        r = await chat_completion(http, Clock(), "m", [{"role": "user", "content": "x"}], 3)
    assert r.error == kind and not r.ok
    if kind in ("http_503", "stream_error"):
        assert r.error_detail and ("overloaded" in r.error_detail or "boom" in r.error_detail)


async def test_connection_failure_is_recorded_not_raised():
    def refuse(request):
        raise httpx.ConnectError("refused")

    async with httpx.AsyncClient(transport=httpx.MockTransport(refuse), base_url="http://fake") as http:
        r = await chat_completion(http, Clock(), "m", [{"role": "user", "content": "x"}], 3)
    assert r.error == "connect_error"


async def test_session_turn_reads_named_events():
    body = sse(("turn", {"session_id": "s", "history_turns_used": 1, "history_turns_dropped": 2}),
               ("delta", {"type": "delta", "text": "Hel"}), ("delta", {"type": "delta", "text": "lo"}),
               ("done", {"type": "done", "finish_reason": "length", "usage": USAGE, "replica": "r1"}))
    async with client_for(200, body) as http:
        r = await session_turn(http, Clock(), "s", "hi", 3, cache_prompt=False)
    assert r.ok and len(r.chunk_times_s) == 2 and (r.prompt_tokens, r.cached_tokens) == (12, 8)
    assert (r.history_turns_dropped, r.replica) == (2, "r1")
    error = sse(("turn", {}), ("error", {"message": "too long", "status": 400}))
    async with client_for(200, error) as http:
        assert (await session_turn(http, Clock(), "s", "hi", 3)).error == "stream_error"


def test_replicas_by_state_from_the_serve_rest_api():
    apps = {"applications": {"chat": {"deployments": {
        "ModelServer": {"target_num_replicas": 2, "replicas": [{"state": "RUNNING"}, {"state": "STARTING"}]},
        "Ingress": {"target_num_replicas": 1, "replicas": [{"state": "RUNNING"}]}}}}}
    replicas, targets = parse_replicas(apps, "chat")
    assert replicas == {"ModelServer": {"RUNNING": 1, "STARTING": 1}, "Ingress": {"RUNNING": 1}}
    assert targets == {"ModelServer": 2, "Ingress": 1}
    with pytest.raises(LookupError):
        parse_replicas(apps, "other")


def test_queue_gauges_are_summed_over_handles_for_our_app_only():
    text = "\n".join([
        "# HELP ray_serve_deployment_queued_queries queued",
        "# TYPE ray_serve_deployment_queued_queries gauge",
        'ray_serve_deployment_queued_queries{application="chat",deployment="ModelServer",handle="a"} 3.0',
        'ray_serve_deployment_queued_queries{application="chat",deployment="ModelServer",handle="b"} 2.0',
        'ray_serve_deployment_queued_queries{application="other",deployment="ModelServer",handle="c"} 7.0',
        "# TYPE ray_serve_num_ongoing_requests_at_replicas gauge",
        'ray_serve_num_ongoing_requests_at_replicas{application="chat",deployment="ModelServer",handle="a"} 24.0',
        "# TYPE ray_serve_autoscaling_target_replicas gauge",
        'ray_serve_autoscaling_target_replicas{application="chat",deployment="ModelServer"} 2.0',
        "# TYPE ray_unrelated gauge",
        'ray_unrelated{application="chat",deployment="ModelServer"} 1.0',
    ]) + "\n"
    gauges = parse_serve_gauges(text, "chat")
    assert gauges == {"queued": {"ModelServer": 5.0}, "ongoing": {"ModelServer": 24.0},
                      "autoscaler_target_replicas": {"ModelServer": 2.0}}
