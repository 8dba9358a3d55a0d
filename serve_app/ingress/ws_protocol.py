"""The WebSocket chat protocol (``/v1/ws``; wire format: ``docs/websocket.md``).

A connection belongs to the identity its handshake proved (``routes/ws.py``). It only *reads* event logs: the reply it asked for, a reply it resumes, or the timeline of
the room it joined, forwarded by one reader task at a time. Replies are produced by the
:class:`~serve_app.ingress.turns.TurnRunner` and go on when the socket drops; only ``cancel`` stops
one. Each client frame is parsed into one of the types below; a frame that does not parse gets an
``error`` frame (400) naming the problem (413 if it is larger than a request body may be), and the
connection stays open. Each ``message`` counts as a request against the caller's rate limit.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
from typing import Annotated, Any, Literal

from fastapi import WebSocket, WebSocketDisconnect
from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError

from ..errors import STORE_ERRORS, ApiError, to_api_error
from ..events import ErrorEvent, Frame, LogEvent, PingFrame, PongFrame, SessionFrame, is_end
from ..schemas import SessionView, TurnInput
from .auth import Identity
from .bodies import SessionMessageRequest
from .calls import call
from .services import Services
from .turns import check_system_prompt

# -- client frames -------------------------------------------------------------------------------------


class _ClientFrame(BaseModel):
    model_config = ConfigDict(extra="ignore")
    ref: Any = None  # echoed on the frames that answer this one


class StartFrame(_ClientFrame):
    type: Literal["start"]
    session_id: str | None = Field(None, max_length=64)
    system_prompt: str | None = None
    title: str | None = Field(None, max_length=200)
    room: bool = False


class JoinFrame(_ClientFrame):
    type: Literal["join"]
    session_id: str = Field(max_length=64)
    last_event_id: str | None = Field(None, max_length=64)


class MessageFrame(_ClientFrame, SessionMessageRequest):
    type: Literal["message"]


class ResumeFrame(_ClientFrame):
    type: Literal["resume"]
    reply_id: str = Field(max_length=64)
    last_event_id: str | None = Field(None, max_length=64)
    session_id: str | None = Field(None, max_length=64)


class CancelFrame(_ClientFrame):
    type: Literal["cancel"]


class ClientPingFrame(_ClientFrame):
    type: Literal["ping"]


class ClientPongFrame(_ClientFrame):
    type: Literal["pong"]


ClientFrame = Annotated[StartFrame | JoinFrame | MessageFrame | ResumeFrame | CancelFrame | ClientPingFrame
                        | ClientPongFrame, Field(discriminator="type")]
CLIENT_FRAME = TypeAdapter(ClientFrame)
CLIENT_TYPES = ("start", "join", "message", "resume", "cancel", "ping", "pong")


def parse_client_frame(raw: str) -> ClientFrame:
    """One client frame, or an :class:`ApiError` (400) saying what is wrong with it."""
    try:
        data = json.loads(raw)
    except ValueError as exc:
        raise ApiError(400, f"invalid message: not JSON ({exc})") from None
    if not isinstance(data, dict) or not isinstance(data.get("type"), str):
        raise ApiError(400, "invalid message: a message must be a JSON object with a string 'type'")
    if data["type"] not in CLIENT_TYPES:
        raise ApiError(400, f"unknown message type {data['type']!r}; expected one of {', '.join(CLIENT_TYPES)}")
    try:
        return CLIENT_FRAME.validate_python(data)
    except ValidationError as exc:
        first = exc.errors()[0]
        field = ".".join(str(p) for p in first["loc"][1:])
        raise ApiError(400, f"{data['type']}: {field or 'message'}: {first['msg']}", param=field or None) from None


# -- one connection ------------------------------------------------------------------------------------

class WsConnection:
    def __init__(self, services: Services, ws: WebSocket, identity: Identity):
        self.svc = services
        self.ws = ws
        self.identity = identity
        self.owner = identity.owner
        self.name = identity.user
        self.session_id: str | None = None
        self.room = False
        self.reply_id: str | None = None
        self.reader: asyncio.Task | None = None
        self.send_lock = asyncio.Lock()

    async def send(self, frame: Frame, **envelope) -> None:
        async with self.send_lock:
            await self.ws.send_text(json.dumps(frame.wire(**envelope)))

    async def report(self, exc: Exception, ref) -> None:
        """An ``error`` frame for ``exc`` (an :class:`ApiError`, or the store being unreachable: 503)."""
        err = to_api_error(exc)
        self.svc.metrics.error(err.status, err.code or err.type)
        await self.send(ErrorEvent.of(err), ref=ref)

    async def serve(self) -> None:
        self.svc.metrics.websocket_opened()
        heartbeat = asyncio.create_task(self._heartbeat())
        try:
            while True:
                raw = await self.ws.receive_text()
                try:
                    if len(raw) > self.svc.settings.limits.max_body_bytes:
                        raise ApiError(413, f"a frame may be at most {self.svc.settings.limits.max_body_bytes} bytes",
                                       code="frame_too_large")
                    frame = parse_client_frame(raw)
                except ApiError as exc:
                    await self.report(exc, None)
                    continue
                try:
                    await self.handle(frame)
                except (ApiError, *STORE_ERRORS) as exc:
                    await self.report(exc, frame.ref)
        except WebSocketDisconnect:
            pass
        finally:
            heartbeat.cancel()
            if self.reader is not None:
                self.reader.cancel()
            self.svc.metrics.websocket_closed()
            self.svc.metrics.session_left(self.session_id)

    async def _heartbeat(self) -> None:
        while True:
            await asyncio.sleep(self.svc.settings.ws_heartbeat_s)
            await self.send(PingFrame(ts=time.time()))

    async def handle(self, frame: ClientFrame) -> None:
        match frame:
            case ClientPingFrame():
                await self.send(PongFrame(), ref=frame.ref)
            case ClientPongFrame():
                pass
            case StartFrame():
                await self.start(frame)
            case JoinFrame():
                view = await call(self.svc.dialogue.get_session.remote(frame.session_id, self.owner))
                if not view.room:
                    raise ApiError(400, f"session {frame.session_id} is not a room", param="session_id",
                                   code="not_a_room")
                await self.enter_room(view, frame.last_event_id, frame.ref)
            case MessageFrame():
                await self.message(frame)
            case ResumeFrame():
                await self.resume(frame)
            case CancelFrame():
                if self.reply_id is None:
                    raise ApiError(409, "no reply is being generated", code="nothing_to_cancel")
                await self.svc.turns.cancel(self.reply_id)

    async def start(self, frame: StartFrame) -> None:
        dialogue = self.svc.dialogue
        if frame.session_id is None:
            check_system_prompt(frame.system_prompt, self.svc.settings.dialogue.max_message_chars, self.svc.moderator)
            view = await call(dialogue.create_session.remote(self.owner, frame.system_prompt, frame.title, frame.room))
        else:
            view = await call(dialogue.get_session.remote(frame.session_id, self.owner))
        if view.room:
            await self.enter_room(view, None, frame.ref)
            return
        self._follow(None)
        self._enter_session(view.id)
        self.room = False
        await self.send(await self._session_frame(view), ref=frame.ref)

    async def enter_room(self, view: SessionView, after: str | None, ref) -> None:
        """The room's history, then its timeline after ``after`` (what was missed) on."""
        self._enter_session(view.id)
        self.room = True
        await self.svc.replies.open_room(view.id)
        await self.send(await self._session_frame(view), ref=ref)
        self._follow(await self.svc.replies.join_room(view.id, self.name, after))

    async def message(self, frame: MessageFrame) -> None:
        if self.session_id is None:
            raise ApiError(409, "send a 'start' or 'join' message first", code="no_session")
        await self.svc.limits.check_request(self.identity)
        turn = TurnInput.user_message(frame.content)
        self.reply_id, meta = await self.svc.turns.start(self.session_id, self.identity, turn, frame)
        if not self.room:  # in a room the timeline already carries the reply
            self._follow(self.svc.replies.reply_events(self.reply_id, meta, None), frame.ref)

    async def resume(self, frame: ResumeFrame) -> None:
        meta = await self.svc.replies.check(frame.reply_id, frame.session_id or self.session_id or "", self.owner)
        self._enter_session(meta.session_id)
        self.reply_id = frame.reply_id
        self._follow(self.svc.replies.reply_events(frame.reply_id, meta, frame.last_event_id), frame.ref)

    def _enter_session(self, session_id: str) -> None:
        if session_id != self.session_id:
            self.svc.metrics.session_left(self.session_id)
            self.svc.metrics.session_entered(session_id)
        self.session_id = session_id

    async def _session_frame(self, view: SessionView) -> SessionFrame:
        active = await self.svc.replies.active(view.id)
        return SessionFrame(session=view.model_copy(update={"active_reply_id": active}))

    def _follow(self, events: AsyncIterator[tuple[str, LogEvent]] | None, ref=None) -> None:
        """Forward one event log to the socket (replacing whatever was forwarded before)."""
        if self.reader is not None:
            self.reader.cancel()
        self.reader = asyncio.create_task(self._forward(events, ref)) if events is not None else None

    async def _forward(self, events: AsyncIterator[tuple[str, LogEvent]], ref) -> None:
        try:
            async for event_id, event in events:
                await self.send(event, id=event_id, ref=ref)
                if is_end(event) and event.reply_id == self.reply_id:
                    self.reply_id = None
        except (ApiError, *STORE_ERRORS) as exc:
            await self.report(exc, ref)
