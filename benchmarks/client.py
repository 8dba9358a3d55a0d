"""How one request is sent and timed: an OpenAI streaming chat completion, one turn of the sessions
API, or one streamed response of OpenAI's Responses API (a ``previous_response_id`` chain). Each
reads the server-sent events as they arrive and stamps every content chunk on the run's clock.

A failure never raises out of here: the request is returned with an error kind (``http_503``,
``timeout``, ``connect_error``, ``connection_lost``, ``stream_error``, ``no_usage``,
``bad_response``), which the report counts by kind.
"""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator

import httpx

from .metrics import RequestRecord


class Clock:
    """Seconds since the run started (``time.perf_counter``), shared by requests and samplers."""

    def __init__(self) -> None:
        self.t0 = time.perf_counter()

    def now(self) -> float:
        return time.perf_counter() - self.t0


def make_http_client(base_url: str, api_key: str | None = None, user_id: str | None = None) -> httpx.AsyncClient:
    """No cap on connections: the load profile alone decides how many requests are in flight."""
    headers = {}
    if api_key:
        headers["Authorization"] = f"Bearer {api_key}"
    if user_id:
        headers["X-User-Id"] = user_id
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=256)
    return httpx.AsyncClient(base_url=base_url.rstrip("/"), headers=headers, limits=limits,
                             timeout=httpx.Timeout(600.0, connect=30.0))


def error_kind(exc: BaseException) -> str:
    if isinstance(exc, httpx.TimeoutException):
        return "timeout"
    if isinstance(exc, httpx.ConnectError):
        return "connect_error"
    if isinstance(exc, httpx.TransportError):
        return "connection_lost"
    if isinstance(exc, (json.JSONDecodeError, KeyError, TypeError, ValueError)):
        return "bad_response"
    return type(exc).__name__


async def sse_events(response: httpx.Response) -> AsyncIterator[tuple[str | None, str]]:
    """(event name, data) for each server-sent event; comments (pings) are skipped."""
    name, data = None, []
    async for line in response.aiter_lines():
        if not line:
            if data:
                yield name, "\n".join(data)
            name, data = None, []
        elif line.startswith("event:"):
            name = line[6:].strip()
        elif line.startswith("data:"):
            data.append(line[5:].lstrip())
    if data:
        yield name, "\n".join(data)


async def _timed_stream(http: httpx.AsyncClient, clock: Clock, path: str, body: dict, read_event) -> RequestRecord:
    """POST ``body``, stream the events through ``read_event(record, name, data)`` (returns True at the
    end of the reply) and time it all."""
    record = RequestRecord(start_s=clock.now(), end_s=0.0)
    try:
        async with http.stream("POST", path, json=body) as response:
            if response.status_code != 200:
                record.error = f"http_{response.status_code}"
                record.error_detail = (await response.aread()).decode(errors="replace")[:300]
            else:
                async for name, data in sse_events(response):
                    if read_event(record, name, data, clock):
                        break
                if record.error is None and record.output_tokens is None:
                    record.error = "no_usage"
    except Exception as exc:  # noqa: BLE001 - recorded by kind
        record.error, record.error_detail = error_kind(exc), repr(exc)[:300]
    record.end_s = clock.now()
    return record


def _read_usage(record: RequestRecord, usage: dict) -> None:
    record.prompt_tokens = usage["prompt_tokens"]
    record.output_tokens = usage["completion_tokens"]
    details = usage.get("prompt_tokens_details") or {}
    record.cached_tokens = details.get("cached_tokens")


def _read_openai_chunk(record: RequestRecord, _name, data: str, clock: Clock) -> bool:
    if data == "[DONE]":
        return True
    chunk = json.loads(data)
    if "error" in chunk:
        record.error, record.error_detail = "stream_error", data[:300]
        return True
    for choice in chunk.get("choices") or ():
        if (choice.get("delta") or {}).get("content"):
            record.chunk_times_s.append(clock.now())
    if chunk.get("usage"):
        _read_usage(record, chunk["usage"])
    return False


async def chat_completion(http: httpx.AsyncClient, clock: Clock, model: str, messages: list[dict], max_tokens: int,
                          ignore_eos: bool = True, temperature: float = 0.0) -> RequestRecord:
    """One streaming ``/v1/chat/completions`` request with ``stream_options.include_usage``."""
    body = {"model": model, "messages": messages, "max_tokens": max_tokens, "temperature": temperature,
            "stream": True, "stream_options": {"include_usage": True}}
    if ignore_eos:
        body["ignore_eos"] = True  # vLLM's extension, also accepted by chatserve
    return await _timed_stream(http, clock, "/v1/chat/completions", body, _read_openai_chunk)


def _read_session_event(record: RequestRecord, name: str | None, data: str, clock: Clock) -> bool:
    if name == "delta":
        if json.loads(data).get("text"):
            record.chunk_times_s.append(clock.now())
    elif name == "turn":
        record.history_turns_dropped = json.loads(data).get("history_turns_dropped")
    elif name == "done":
        done = json.loads(data)
        _read_usage(record, done["usage"])
        record.replica = done.get("replica")
        return True
    elif name == "error":
        record.error, record.error_detail = "stream_error", data[:300]
        return True
    return False


async def create_session(http: httpx.AsyncClient, system_prompt: str | None = None, title: str | None = None) -> str:
    response = await http.post("/v1/sessions", json={"system_prompt": system_prompt, "title": title})
    response.raise_for_status()
    return response.json()["id"]


async def session_turn(http: httpx.AsyncClient, clock: Clock, session_id: str, content: str, max_tokens: int,
                       cache_prompt: bool = True, ignore_eos: bool = True, seed: int = 0) -> RequestRecord:
    """One turn of ``POST /v1/sessions/{id}/messages``: the server adds the conversation's history.
    ``cache_prompt: false`` (llama.cpp's name) asks the server not to reuse cached prefix KV."""
    body = {"content": content, "max_tokens": max_tokens, "temperature": 0.0, "ignore_eos": ignore_eos,
            "seed": seed, "cache_prompt": cache_prompt}
    return await _timed_stream(http, clock, f"/v1/sessions/{session_id}/messages", body, _read_session_event)


def _read_response_event(record: RequestRecord, name: str | None, data: str, clock: Clock) -> bool:
    """The Responses API's stream: text deltas, then ``response.completed`` (or ``.incomplete``)."""
    if name == "response.output_text.delta":
        if json.loads(data).get("delta"):
            record.chunk_times_s.append(clock.now())
    elif name == "response.created":
        record.response_id = json.loads(data)["response"]["id"]
    elif name in ("response.completed", "response.incomplete"):
        usage = json.loads(data)["response"]["usage"]
        record.prompt_tokens, record.output_tokens = usage["input_tokens"], usage["output_tokens"]
        record.cached_tokens = (usage.get("input_tokens_details") or {}).get("cached_tokens")
        return True
    elif name in ("response.failed", "error"):
        record.error, record.error_detail = "stream_error", data[:300]
        return True
    return False


async def response_turn(http: httpx.AsyncClient, clock: Clock, model: str, content: str, max_tokens: int,
                        previous_response_id: str | None, instructions: str | None = None,
                        cache_prompt: bool = True, ignore_eos: bool = True, seed: int = 0) -> RequestRecord:
    """One streamed ``POST /v1/responses`` continuing the chain of ``previous_response_id``: the server
    keeps the conversation. The new response's id is ``record.response_id``."""
    body = {"model": model, "input": content, "max_output_tokens": max_tokens, "temperature": 0.0, "stream": True,
            "previous_response_id": previous_response_id, "instructions": instructions, "seed": seed,
            "ignore_eos": ignore_eos, "cache_prompt": cache_prompt}
    return await _timed_stream(http, clock, "/v1/responses", body, _read_response_event)
