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
from .errors import STORE_ERRORS, ApiError, to_api_error
from .metrics import ingress_metrics
from .moderation import Moderator
from .pages import router as pages_router
from .replies import create_event_log
from .schemas import ChatCompletionRequest, CreateSessionRequest, SessionMessageRequest
from .turns import ModelStream, TurnRunner, call, check_input, error_event, masked, room_log, usage_of

logger = logging.getLogger("ray.serve")

app = FastAPI(title="chatserve", description="OpenAI-compatible chat serving on Ray Serve")


@app.exception_handler(ApiError)
async def _api_error(_: Request, exc: ApiError) -> JSONResponse:
    ingress_metrics().error(exc.status, exc.code or exc.type)
    return JSONResponse(exc.body(), status_code=exc.status)


async def _store_error(request: Request, exc: Exception) -> JSONResponse:
    return await _api_error(request, to_api_error(exc))


for _store_exc in STORE_ERRORS:  # the store or the event log cannot reach Redis: 503
    app.add_exception_handler(_store_exc, _store_error)


@app.exception_handler(RequestValidationError)
async def _validation_error(_: Request, exc: RequestValidationError) -> JSONResponse:
    first = exc.errors()[0] if exc.errors() else {}
    loc = [str(p) for p in first.get("loc", []) if p != "body"]
    message = f"{'.'.join(loc) or 'body'}: {first.get('msg', 'invalid request')}"
    ingress_metrics().error(400, "invalid_request_error")
    return JSONResponse(ApiError(400, message, param=".".join(loc) or None).body(), status_code=400)


app.include_router(pages_router)  # the chat page (/), the ops page (/ops), their static files


class ServedBy:
    """ASGI middleware: every HTTP response and WebSocket handshake names the ingress replica that
    served it (``X-Served-By: <replica id>``), for operators following one request through a
    multi-replica ingress, and for tests that resume a reply on another replica."""

    replica: bytes = b""  # set by the Ingress replica of this process

    def __init__(self, asgi_app):
        self.asgi_app = asgi_app

    async def __call__(self, scope, receive, send):
        if scope["type"] not in ("http", "websocket") or not ServedBy.replica:
            return await self.asgi_app(scope, receive, send)

        async def send_with_header(message):
            if message["type"] in ("http.response.start", "websocket.accept"):
                message = {**message, "headers": [*message.get("headers", []), (b"x-served-by", ServedBy.replica)]}
            await send(message)

        return await self.asgi_app(scope, receive, send_with_header)


app.add_middleware(ServedBy)


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


class _WsConnection:
    """One WebSocket client. Protocol: docs/websocket.md.

    The connection only reads event logs: the reply it asked for, a reply it resumes, or the
    timeline of the room it joined. Replies are produced by :class:`TurnRunner` and go on when the
    socket drops; only ``cancel`` stops one."""

    def __init__(self, ingress: "Ingress", ws: WebSocket, owner: str, name: str | None):
        self.ingress = ingress
        self.turns: TurnRunner = ingress.turns
        self.ws = ws
        self.owner = owner
        self.name = name or owner
        self.session_id: str | None = None
        self.room = False
        self.reply_id: str | None = None
        self.reader: asyncio.Task | None = None
        self.send_lock = asyncio.Lock()

    async def send(self, event: dict) -> None:
        async with self.send_lock:
            await self.ws.send_text(json.dumps(event))

    async def error(self, message: str, code: str = "bad_request", status: int = 400, ref=None) -> None:
        ingress_metrics().error(status, code)
        await self.send({**error_event(ApiError(status, message, code=code)), "ref": ref})

    async def report(self, exc: Exception, ref) -> None:
        """An error event for ``exc`` (an :class:`ApiError`, or the store being unreachable: 503)."""
        err = to_api_error(exc)
        await self.error(err.message, err.code or err.type, err.status, ref)

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
            if self.reader is not None:
                self.reader.cancel()
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
            elif kind == "join":
                await self.join(msg)
            elif kind == "message":
                await self.message(msg)
            elif kind == "resume":
                await self.resume(msg)
            elif kind == "cancel":
                if self.reply_id is None:
                    raise ApiError(409, "no reply is being generated", code="nothing_to_cancel")
                await self.turns.cancel(self.reply_id)
            else:
                await self.error(f"unknown message type {kind!r}", ref=ref)
        except (ApiError, *STORE_ERRORS) as exc:
            await self.report(exc, ref)

    @staticmethod
    def _str_field(msg: dict, name: str) -> str | None:
        value = msg.get(name)
        if value is not None and not isinstance(value, str):
            raise ApiError(400, f"{name} must be a string", param=name)
        return value

    async def start(self, msg: dict) -> None:
        session_id = self._str_field(msg, "session_id")
        dialogue = self.ingress.dialogue
        if session_id is None:
            view = await call(dialogue.create_session.remote(self.owner, self._str_field(msg, "system_prompt"),
                                                             self._str_field(msg, "title"), bool(msg.get("room"))))
        else:
            view = await call(dialogue.get_session.remote(session_id, self.owner))
        if view["room"]:
            await self._enter_room(view, msg)
            return
        self._follow(None)
        ingress_metrics().session_left(self.session_id)
        ingress_metrics().session_entered(view["id"])
        self.session_id, self.room = view["id"], False
        await self.send({"type": "session", "ref": msg.get("ref"), **await self.ingress.session_view(view)})

    async def join(self, msg: dict) -> None:
        session_id = self._str_field(msg, "session_id")
        if session_id is None:
            raise ApiError(400, "join needs the room's session_id", param="session_id")
        view = await call(self.ingress.dialogue.get_session.remote(session_id, self.owner))
        if not view["room"]:
            raise ApiError(400, f"session {session_id} is not a room", param="session_id", code="not_a_room")
        await self._enter_room(view, msg)

    async def _enter_room(self, view: dict, msg: dict) -> None:
        """Join a room: the history, then its timeline from ``last_event_id`` (missed events) on."""
        after = self._str_field(msg, "last_event_id")
        self.session_id, self.room = view["id"], True
        await self.ingress.open_room(view["id"])
        await self.send({"type": "session", "ref": msg.get("ref"), **await self.ingress.session_view(view)})
        if after is None:  # a first join: only what happens from now on (the history came above)
            after = await self.turns.log.last_id(room_log(view["id"]))
        await self.turns.log.append(room_log(view["id"]), {"type": "member_joined", "member": self.name})
        self._follow(self.turns.events(room_log(view["id"]), after, until_end=False))

    async def message(self, msg: dict) -> None:
        if self.session_id is None:
            raise ApiError(409, "send a 'start' or 'join' message first", code="no_session")
        try:
            fields = SessionMessageRequest.model_validate({k: v for k, v in msg.items() if k not in ("type", "ref")})
        except ValidationError as exc:
            first = exc.errors()[0]
            raise ApiError(400, f"{'.'.join(map(str, first['loc']))}: {first['msg']}") from None
        self.reply_id = await self.turns.start(self.session_id, self.owner, fields, author=self.name)
        if not self.room:  # in a room the timeline already carries the reply
            self._follow(self.turns.events(self.reply_id, None), msg.get("ref"))

    async def resume(self, msg: dict) -> None:
        reply_id = self._str_field(msg, "reply_id")
        if reply_id is None:
            raise ApiError(400, "resume needs reply_id", param="reply_id")
        meta = await self.turns.check_reply(reply_id, self._str_field(msg, "session_id") or self.session_id or "",
                                            self.owner)
        if meta["session_id"] != self.session_id:
            ingress_metrics().session_left(self.session_id)
            ingress_metrics().session_entered(meta["session_id"])
        self.session_id, self.reply_id = meta["session_id"], reply_id
        self._follow(self.turns.events(reply_id, self._str_field(msg, "last_event_id")), msg.get("ref"))

    def _follow(self, events, ref=None) -> None:
        """Forward one event log to the socket (replacing whatever was forwarded before)."""
        if self.reader is not None:
            self.reader.cancel()
        self.reader = asyncio.create_task(self._forward(events, ref)) if events is not None else None

    async def _forward(self, events, ref) -> None:
        try:
            async for event_id, event in events:
                await self.send({**event, "id": event_id, "ref": ref})
                if event["type"] in ("done", "error") and event.get("reply_id") == self.reply_id:
                    self.reply_id = None
        except (ApiError, *STORE_ERRORS) as exc:
            await self.report(exc, ref)


@serve.deployment(name="Ingress", ray_actor_options={"num_cpus": 0.1}, max_ongoing_requests=512)
@serve.ingress(app)
class Ingress:
    def __init__(self, model: DeploymentHandle, dialogue: DeploymentHandle, settings: AppSettings,
                 ops: DeploymentHandle | None = None):
        ServedBy.replica = serve.get_replica_context().replica_id.unique_id.encode()
        self.model = model
        self.dialogue = dialogue
        self.settings = settings
        self.model_name = settings.model.served_model_name
        moderator = Moderator.from_settings(settings.moderation)
        self.moderator = moderator if moderator.words else None
        self.turns = TurnRunner(model, dialogue, create_event_log(settings.dialogue), self.moderator,
                                retention_s=settings.dialogue.reply_retention_s,
                                max_reply_s=settings.dialogue.max_reply_s)
        self.ops = ops

    async def __del__(self) -> None:
        """Serve calls this on graceful shutdown (scale-down, redeploy): replies still running get
        10 s to finish, then end as cancelled, so their readers and session locks are not left
        waiting (``graceful_shutdown_timeout_s`` is 20 s)."""
        await self.turns.shutdown(grace_s=10)

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
        return await call(self.ops.snapshot.remote())

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
            for i, m in enumerate(messages):
                if m["role"] == "user":
                    check_input(self.moderator, m["content"], param=f"messages.{i}.content")
            request = GenerationRequest(messages=messages, sampling=sampling_from(body),
                                        use_prefix_cache=body.cache_prompt)
        except ValueError as exc:
            raise to_api_error(exc) from None
        stream = masked(await ModelStream.open(self.model, request, conversation_key(messages)), self.moderator)
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
            "usage": usage_of(last),
        }

    async def _openai_chunks(self, stream: AsyncIterator[Delta], completion_id: str, created: int, include_usage: bool):
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
                        yield chunk({}, usage=usage_of(delta), choices=False)
        except Exception as exc:  # noqa: BLE001 - reported in-band: the status line is already sent
            err = to_api_error(exc)
            ingress_metrics().error(err.status, err.code or err.type)
            yield {"data": json.dumps(err.body())}
        yield {"data": "[DONE]"}

    # -- sessions --------------------------------------------------------------------------------
    @app.post("/v1/sessions", status_code=201)
    async def create_session(self, request: Request, body: CreateSessionRequest | None = None):
        body = body or CreateSessionRequest()
        view = await call(self.dialogue.create_session.remote(owner_of(request.headers), body.system_prompt,
                                                               body.title, body.room))
        if view["room"]:
            await self.open_room(view["id"])
        return view

    @app.get("/v1/sessions")
    async def list_sessions(self, request: Request):
        return {"object": "list", "data": await call(self.dialogue.list_sessions.remote(owner_of(request.headers)))}

    @app.get("/v1/sessions/{session_id}")
    async def get_session(self, session_id: str, request: Request):
        return await self.session_view(await call(self.dialogue.get_session.remote(session_id,
                                                                                   owner_of(request.headers))))

    @app.delete("/v1/sessions/{session_id}", status_code=204)
    async def delete_session(self, session_id: str, request: Request):
        await call(self.dialogue.delete_session.remote(session_id, owner_of(request.headers)))

    @app.post("/v1/sessions/{session_id}/messages")
    async def session_message(self, session_id: str, body: SessionMessageRequest, request: Request):
        """Start the next turn; the response streams the reply's events (SSE, each with an ``id:``).
        ``Content-Location`` names the reply: GET it with ``Last-Event-ID`` to resume."""
        owner = owner_of(request.headers)
        reply_id = await self.turns.start(session_id, owner, body, author=request.headers.get("x-user-id"))
        meta = await self.turns.check_reply(reply_id, session_id, owner)
        location = f"{request.scope.get('root_path', '')}/v1/sessions/{session_id}/replies/{reply_id}"
        return EventSourceResponse(self._sse(reply_id, meta, None), ping=15, headers={"Content-Location": location})

    @app.get("/v1/sessions/{session_id}/replies/{reply_id}")
    async def reply_events(self, session_id: str, reply_id: str, request: Request):
        """A reply's events after ``Last-Event-ID`` (all without it): stored, then live, then the end."""
        meta = await self.turns.check_reply(reply_id, session_id, owner_of(request.headers))
        return EventSourceResponse(self._sse(reply_id, meta, request.headers.get("last-event-id")), ping=15)

    @app.post("/v1/sessions/{session_id}/replies/{reply_id}/cancel", status_code=202)
    async def cancel_reply(self, session_id: str, reply_id: str, request: Request):
        await self.turns.check_reply(reply_id, session_id, owner_of(request.headers))
        await self.turns.cancel(reply_id)
        return {"reply_id": reply_id, "status": "cancelling"}

    async def _sse(self, reply_id: str, meta: dict, after: str | None):
        key = room_log(meta["session_id"]) if meta.get("room") else reply_id
        async for event_id, event in self.turns.events(key, after):
            if event.get("reply_id") not in (None, reply_id):
                continue  # a room's timeline holds other replies too
            yield {"id": event_id, "event": event["type"], "data": json.dumps(event)}
            if key != reply_id and event["type"] in ("done", "error") and event.get("reply_id") == reply_id:
                return

    async def session_view(self, view: dict) -> dict:
        """A session as clients see it: with ``active_reply_id``, the reply being generated (None if
        none), so a client that lost track of it (a drop before its first event) can resume it."""
        return {**view, "active_reply_id": await self.turns.active_reply(view["id"])}

    async def open_room(self, session_id: str) -> None:
        """Make sure a room's timeline exists; it lives as long as the session."""
        ttl_s = self.settings.dialogue.session_ttl_s
        if await self.turns.log.meta(room_log(session_id)) is None:
            await self.turns.log.create(room_log(session_id), {"session_id": session_id, "room": True}, ttl_s)
        else:
            await self.turns.log.touch(room_log(session_id), ttl_s)

    # -- WebSocket -------------------------------------------------------------------------------
    @app.websocket("/v1/ws")
    async def websocket(self, ws: WebSocket):
        await ws.accept()
        owner = owner_of(ws.headers)
        if owner == "anonymous" and ws.query_params.get("user"):
            owner = f"user:{ws.query_params['user']}"  # browsers cannot set headers on a WebSocket
        await _WsConnection(self, ws, owner, ws.query_params.get("user") or ws.headers.get("x-user-id")).serve()
