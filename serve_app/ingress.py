"""Ingress deployment: the HTTP and WebSocket edge, kept thin.

Each route parses its input, calls the dialogue and model deployments through their handles, and
maps the result to a response: an error to a status with an OpenAI-shaped body, a full reply to
JSON, a stream to SSE or WebSocket events. Streams are opened before the response starts (the first
delta is awaited), so a request that fails early still gets a proper 4xx/5xx status.

Identity: the caller's bearer token (hashed) or ``X-User-Id`` header; sessions are scoped to it.
"""


import asyncio
import hashlib
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator

from fastapi import FastAPI, Request, WebSocket, WebSocketDisconnect
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import ValidationError
from ray import serve
from ray.serve.handle import DeploymentHandle
from sse_starlette.sse import EventSourceResponse

from engines.protocol import Delta, GenerationRequest, SamplingParams

from .config import AppSettings
from .errors import ApiError, to_api_error
from .metrics import ingress_metrics
from .pages import router as pages_router
from .schemas import (
    ChatCompletionRequest,
    CreateSessionRequest,
    SessionMessageRequest,
    Turn,
    TurnPlan,
)

logger = logging.getLogger("ray.serve")

app = FastAPI(title="chatserve", description="OpenAI-compatible chat serving on Ray Serve")


@app.exception_handler(ApiError)
async def _api_error(_: Request, exc: ApiError) -> JSONResponse:
    ingress_metrics().error(exc.status, exc.code or exc.type)
    return JSONResponse(exc.body(), status_code=exc.status)


@app.exception_handler(RequestValidationError)
async def _validation_error(_: Request, exc: RequestValidationError) -> JSONResponse:
    first = exc.errors()[0] if exc.errors() else {}
    loc = [str(p) for p in first.get("loc", []) if p != "body"]
    message = f"{'.'.join(loc) or 'body'}: {first.get('msg', 'invalid request')}"
    ingress_metrics().error(400, "invalid_request_error")
    return JSONResponse(ApiError(400, message, param=".".join(loc) or None).body(), status_code=400)


app.include_router(pages_router)  # the chat page (/), the ops page (/ops), their static files


def owner_of(headers) -> str:
    auth = headers.get("authorization", "")
    if auth.lower().startswith("bearer ") and auth[7:].strip():
        return "key:" + hashlib.sha256(auth[7:].strip().encode()).hexdigest()[:24]
    user = headers.get("x-user-id")
    return f"user:{user}" if user else "anonymous"


def sampling_from(fields) -> SamplingParams:
    return SamplingParams(**fields.sampling_kwargs())


def conversation_key(messages: tuple[dict, ...]) -> str:
    """Affinity key of a client-held conversation: its messages up to the first user message, which
    every later request of the same conversation resends unchanged."""
    head = []
    for message in messages:
        head.append([message["role"], message["content"]])
        if message["role"] == "user":
            break
    return "conv:" + hashlib.sha256(json.dumps(head).encode()).hexdigest()[:24]


def turn_event(plan: TurnPlan) -> dict:
    return {"type": "turn", "session_id": plan.session_id, "turn_index": plan.turn_index,
            "history_turns_used": plan.history_turns_used, "history_turns_dropped": plan.history_turns_dropped,
            "prompt_tokens": len(plan.prompt_token_ids), "append_only": plan.append_only}


class ModelStream:
    """A model replica's delta stream, opened and peeked: errors before the first delta raise here."""

    def __init__(self, response):
        self._response = response
        self.first: Delta | None = None
        self.finished = False

    @classmethod
    async def open(cls, handle: DeploymentHandle, request: GenerationRequest, affinity_key: str | None) -> "ModelStream":
        stream = cls(handle.options(stream=True).generate.remote(request, affinity_key=affinity_key))
        try:
            stream.first = await stream._response.__anext__()
        except BaseException as exc:
            stream.cancel()
            raise to_api_error(exc) from None
        return stream

    async def __aiter__(self) -> AsyncIterator[Delta]:
        try:
            delta = self.first
            while True:
                yield delta
                if delta.finish_reason is not None:
                    self.finished = True
                    return
                delta = await self._response.__anext__()
        finally:
            if not self.finished:
                self.cancel()

    def cancel(self) -> None:
        try:
            self._response.cancel()
        except Exception:  # noqa: BLE001 - already finished
            pass


class _WsConnection:
    """One WebSocket client. Protocol: docs/websocket.md."""

    def __init__(self, ingress: "Ingress", ws: WebSocket, owner: str):
        self.ingress = ingress
        self.ws = ws
        self.owner = owner
        self.session_id: str | None = None
        self.turn_task: asyncio.Task | None = None
        self.send_lock = asyncio.Lock()

    async def send(self, event: dict) -> None:
        async with self.send_lock:
            await self.ws.send_text(json.dumps(event))

    async def error(self, message: str, code: str = "bad_request", status: int = 400, ref=None) -> None:
        ingress_metrics().error(status, code)
        await self.send({"type": "error", "code": code, "message": message, "status": status, "ref": ref})

    async def serve(self) -> None:
        ingress_metrics().websocket_opened()
        heartbeat = asyncio.create_task(self._heartbeat())
        try:
            while True:
                raw = await self.ws.receive_text()
                try:
                    msg = json.loads(raw)
                    if not isinstance(msg, dict) or not isinstance(msg.get("type"), str):
                        raise ValueError("a message must be a JSON object with a string 'type'")
                except ValueError as exc:
                    await self.error(f"invalid message: {exc}")
                    continue
                await self.handle(msg)
        except WebSocketDisconnect:
            pass
        finally:
            heartbeat.cancel()
            if self.turn_task is not None:
                self.turn_task.cancel()
            ingress_metrics().websocket_closed()
            ingress_metrics().session_left(self.session_id)

    async def _heartbeat(self) -> None:
        while True:
            await asyncio.sleep(self.ingress.settings.ws_heartbeat_s)
            await self.send({"type": "ping", "ts": time.time()})

    async def handle(self, msg: dict) -> None:
        kind, ref = msg["type"], msg.get("ref")
        try:
            if kind == "ping":
                await self.send({"type": "pong", "ref": ref})
            elif kind == "pong":
                pass
            elif kind == "start":
                await self.start(msg)
            elif kind == "message":
                await self.message(msg)
            elif kind == "cancel":
                if self.turn_task is None or self.turn_task.done():
                    await self.error("no reply is being generated", "nothing_to_cancel", 409, ref)
                else:
                    self.turn_task.cancel()
            else:
                await self.error(f"unknown message type {kind!r}", ref=ref)
        except ApiError as exc:
            await self.error(exc.message, exc.code or exc.type, exc.status, ref)

    async def start(self, msg: dict) -> None:
        session_id = msg.get("session_id")
        dialogue = self.ingress.dialogue
        if session_id is None:
            system_prompt = msg.get("system_prompt")
            if system_prompt is not None and not isinstance(system_prompt, str):
                raise ApiError(400, "system_prompt must be a string", param="system_prompt")
            view = await self.ingress._call(dialogue.create_session.remote(self.owner, system_prompt, msg.get("title")))
        elif isinstance(session_id, str):
            view = await self.ingress._call(dialogue.get_session.remote(session_id, self.owner))
        else:
            raise ApiError(400, "session_id must be a string", param="session_id")
        ingress_metrics().session_left(self.session_id)
        ingress_metrics().session_entered(view["id"])
        self.session_id = view["id"]
        await self.send({"type": "session", "ref": msg.get("ref"), **view})

    async def message(self, msg: dict) -> None:
        if self.session_id is None:
            raise ApiError(409, "send a 'start' message first", code="no_session")
        if self.turn_task is not None and not self.turn_task.done():
            raise ApiError(409, "a reply is still being generated; cancel it or wait", code="busy")
        try:
            fields = SessionMessageRequest.model_validate({k: v for k, v in msg.items() if k not in ("type", "ref")})
        except ValidationError as exc:
            first = exc.errors()[0]
            raise ApiError(400, f"{'.'.join(map(str, first['loc']))}: {first['msg']}") from None
        plan, stream = await self.ingress._start_turn(self.session_id, self.owner, fields)
        self.turn_task = asyncio.create_task(self._turn(plan, fields.content, stream, msg.get("ref")))

    async def _turn(self, plan: TurnPlan, content: str, stream: ModelStream, ref) -> None:
        await self.send({**turn_event(plan), "ref": ref})
        try:
            async for event in self.ingress._run_turn(plan, self.owner, content, stream):
                await self.send({**event, "ref": ref})
        except asyncio.CancelledError:
            stream.cancel()
            try:
                await self.send({"type": "done", "ref": ref, "finish_reason": "cancelled", "usage": None})
            except Exception:  # noqa: BLE001 - the socket may be gone
                pass
            raise


@serve.deployment(name="Ingress", ray_actor_options={"num_cpus": 0.1}, max_ongoing_requests=512)
@serve.ingress(app)
class Ingress:
    def __init__(self, model: DeploymentHandle, dialogue: DeploymentHandle, settings: AppSettings,
                 ops: DeploymentHandle | None = None):
        self.model = model
        self.dialogue = dialogue
        self.settings = settings
        self.model_name = settings.model.served_model_name
        self.ops = ops

    # -- health ----------------------------------------------------------------------------------
    @app.get("/healthz")
    async def healthz(self) -> dict:
        return {"status": "ok"}

    @app.get("/readyz")
    async def readyz(self):
        try:
            model, _ = await asyncio.wait_for(asyncio.gather(self.model.ready.remote(), self.dialogue.ping.remote()), 10)
        except Exception as exc:  # noqa: BLE001 - any failure means not ready
            return JSONResponse({"status": "not ready", "reason": repr(exc)[:300]}, status_code=503)
        return {"status": "ready", "model": model}

    # -- ops -------------------------------------------------------------------------------------
    @app.get("/ops/state")
    async def ops_state(self) -> dict:
        """Serve status, every model replica's engine stats, rolling TTFT and tokens/s, events."""
        if self.ops is None:
            raise ApiError(404, "no ops collector in this deployment graph", code="not_found")
        return await self._call(self.ops.snapshot.remote())

    # -- OpenAI-compatible -----------------------------------------------------------------------
    @app.get("/v1/models")
    async def models(self) -> dict:
        return {"object": "list", "data": [{"id": self.model_name, "object": "model", "created": 0,
                                            "owned_by": "chatserve"}]}

    @app.post("/v1/chat/completions")
    async def chat_completions(self, body: ChatCompletionRequest):
        if body.n != 1:
            raise ApiError(400, "only n=1 is supported", param="n")
        if body.model != self.model_name:
            raise ApiError(404, f"model {body.model!r} not found; available: {self.model_name}", param="model",
                           code="model_not_found")
        try:
            messages = tuple({"role": "system" if m.role == "developer" else m.role, "content": m.text()}
                             for m in body.messages)
            request = GenerationRequest(messages=messages, sampling=sampling_from(body),
                                        use_prefix_cache=body.cache_prompt)
        except ValueError as exc:
            raise to_api_error(exc) from None
        stream = await ModelStream.open(self.model, request, conversation_key(messages))
        completion_id = "chatcmpl-" + uuid.uuid4().hex
        created = int(time.time())
        if body.stream:
            include_usage = bool(body.stream_options and body.stream_options.include_usage)
            return EventSourceResponse(self._openai_chunks(stream, completion_id, created, include_usage), ping=15)
        text, last = [], None
        async for delta in stream:
            text.append(delta.text)
            last = delta
        return {
            "id": completion_id, "object": "chat.completion", "created": created, "model": self.model_name,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": "".join(text)},
                         "finish_reason": last.finish_reason, "logprobs": None}],
            "usage": self._usage(last),
        }

    @staticmethod
    def _usage(delta: Delta) -> dict:
        u = delta.usage
        return {"prompt_tokens": u.prompt_tokens, "completion_tokens": u.completion_tokens,
                "total_tokens": u.total_tokens, "prompt_tokens_details": {"cached_tokens": u.cached_prompt_tokens}}

    async def _openai_chunks(self, stream: ModelStream, completion_id: str, created: int, include_usage: bool):
        def chunk(delta: dict, finish_reason=None, usage=None, choices=True) -> dict:
            body = {"id": completion_id, "object": "chat.completion.chunk", "created": created, "model": self.model_name,
                    "choices": [{"index": 0, "delta": delta, "finish_reason": finish_reason, "logprobs": None}]
                    if choices else []}
            if usage is not None:
                body["usage"] = usage
            return {"data": json.dumps(body)}

        yield chunk({"role": "assistant", "content": ""})
        try:
            async for delta in stream:
                if delta.text:
                    yield chunk({"content": delta.text})
                if delta.finish_reason is not None:
                    yield chunk({}, finish_reason=delta.finish_reason)
                    if include_usage:
                        yield chunk({}, usage=self._usage(delta), choices=False)
        except Exception as exc:  # noqa: BLE001 - reported in-band: the status line is already sent
            err = to_api_error(exc)
            ingress_metrics().error(err.status, err.code or err.type)
            yield {"data": json.dumps(err.body())}
        yield {"data": "[DONE]"}

    # -- sessions --------------------------------------------------------------------------------
    @app.post("/v1/sessions", status_code=201)
    async def create_session(self, request: Request, body: CreateSessionRequest | None = None):
        body = body or CreateSessionRequest()
        return await self._call(self.dialogue.create_session.remote(owner_of(request.headers), body.system_prompt,
                                                                     body.title))

    @app.get("/v1/sessions")
    async def list_sessions(self, request: Request):
        return {"object": "list", "data": await self._call(self.dialogue.list_sessions.remote(owner_of(request.headers)))}

    @app.get("/v1/sessions/{session_id}")
    async def get_session(self, session_id: str, request: Request):
        return await self._call(self.dialogue.get_session.remote(session_id, owner_of(request.headers)))

    @app.delete("/v1/sessions/{session_id}", status_code=204)
    async def delete_session(self, session_id: str, request: Request):
        await self._call(self.dialogue.delete_session.remote(session_id, owner_of(request.headers)))

    @app.post("/v1/sessions/{session_id}/messages")
    async def session_message(self, session_id: str, body: SessionMessageRequest, request: Request):
        owner = owner_of(request.headers)
        plan, stream = await self._start_turn(session_id, owner, body)

        async def events():
            yield {"event": "turn", "data": json.dumps(turn_event(plan))}
            async for event in self._run_turn(plan, owner, body.content, stream):
                yield {"event": event["type"], "data": json.dumps(event)}

        return EventSourceResponse(events(), ping=15)

    async def _call(self, response):
        try:
            return await response
        except Exception as exc:  # noqa: BLE001 - mapped to a status
            raise to_api_error(exc) from None

    async def _start_turn(self, session_id: str, owner: str, fields: SessionMessageRequest) -> tuple[TurnPlan, ModelStream]:
        try:
            sampling = sampling_from(fields)
        except ValueError as exc:
            raise to_api_error(exc) from None
        plan: TurnPlan = await self._call(self.dialogue.prepare_turn.remote(session_id, owner, fields.content))
        request = GenerationRequest(prompt_token_ids=tuple(plan.prompt_token_ids), sampling=sampling,
                                    use_prefix_cache=fields.cache_prompt)
        return plan, await ModelStream.open(self.model, request, affinity_key=session_id)

    async def _run_turn(self, plan: TurnPlan, owner: str, content: str, stream: ModelStream):
        """Stream a turn's deltas as events; save the turn only once the reply is complete.
        A cancelled or failed reply saves nothing, so the history never holds half a turn."""
        parts: list[str] = []
        generated_ids: list[int] = []
        ingress_metrics().session_entered(plan.session_id)
        try:
            async for delta in stream:
                generated_ids += delta.token_ids
                if delta.text:
                    parts.append(delta.text)
                    yield {"type": "delta", "text": delta.text}
                if delta.finish_reason is not None:
                    usage = self._usage(delta)
                    turn = Turn(user=content, assistant="".join(parts), finish_reason=delta.finish_reason,
                                prompt_tokens=usage["prompt_tokens"], completion_tokens=usage["completion_tokens"])
                    await self._call(self.dialogue.commit_turn.remote(plan.session_id, owner, plan, turn,
                                                                      generated_ids))
                    yield {"type": "done", "finish_reason": delta.finish_reason, "usage": usage,
                           "replica": delta.served_by}
        except ApiError as exc:
            ingress_metrics().error(exc.status, exc.code or exc.type)
            yield {"type": "error", **exc.body()["error"], "status": exc.status}
        except Exception as exc:  # noqa: BLE001 - reported in-band
            err = to_api_error(exc)
            ingress_metrics().error(err.status, err.code or err.type)
            yield {"type": "error", **err.body()["error"], "status": err.status}
        finally:
            ingress_metrics().session_left(plan.session_id)

    # -- WebSocket -------------------------------------------------------------------------------
    @app.websocket("/v1/ws")
    async def websocket(self, ws: WebSocket):
        await ws.accept()
        owner = owner_of(ws.headers)
        if owner == "anonymous" and ws.query_params.get("user"):
            owner = f"user:{ws.query_params['user']}"  # browsers cannot set headers on a WebSocket
        await _WsConnection(self, ws, owner).serve()
