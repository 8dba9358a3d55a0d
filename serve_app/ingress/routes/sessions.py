"""The sessions API: the server keeps the conversation. A message starts a reply whose events
stream as SSE (each with an ``id:``); ``Content-Location`` names the reply, which can be read again
from any id (``Last-Event-ID``) and cancelled from anywhere. ``GET /v1/replies`` lists the caller's
replies being generated (they count against its concurrent-reply limit even when nobody reads them)."""

from collections.abc import AsyncIterator
from typing import Annotated

from fastapi import APIRouter, Header, Request
from sse_starlette.sse import EventSourceResponse

from ...events import LogEvent
from ...schemas import SessionView, TurnInput
from ..bodies import CreateSessionRequest, SessionMessageRequest
from ..calls import call
from ..identity import Caller, Owner
from ..services import Svc
from ..turns import check_system_prompt

router = APIRouter()


async def sse(events: AsyncIterator[tuple[str | None, LogEvent]]):
    async for event_id, event in events:
        yield {"id": event_id, "event": event.type, "data": event.model_dump_json()}


@router.post("/v1/sessions", status_code=201)
async def create_session(svc: Svc, owner: Owner, body: CreateSessionRequest | None = None) -> SessionView:
    body = body or CreateSessionRequest()
    check_system_prompt(body.system_prompt, svc.settings.dialogue.max_message_chars, svc.moderator)
    view = await call(svc.dialogue.create_session.remote(owner, body.system_prompt, body.title, body.room))
    if view.room:
        await svc.replies.open_room(view.id)
    return view


@router.get("/v1/sessions")
async def list_sessions(svc: Svc, owner: Owner) -> dict:
    return {"object": "list", "data": await call(svc.dialogue.list_sessions.remote(owner))}


@router.get("/v1/sessions/{session_id}")
async def get_session(session_id: str, svc: Svc, owner: Owner) -> SessionView:
    view = await call(svc.dialogue.get_session.remote(session_id, owner))
    return view.model_copy(update={"active_reply_id": await svc.replies.active(view.id)})


@router.delete("/v1/sessions/{session_id}", status_code=204)
async def delete_session(session_id: str, svc: Svc, owner: Owner) -> None:
    await call(svc.dialogue.delete_session.remote(session_id, owner))


@router.post("/v1/sessions/{session_id}/messages")
async def session_message(session_id: str, body: SessionMessageRequest, request: Request, svc: Svc, caller: Caller):
    """Start the next turn; the response streams the reply's events."""
    turn = TurnInput.user_message(body.content)
    reply_id, meta = await svc.turns.start(session_id, caller, turn, body)
    location = f"{request.scope.get('root_path', '')}/v1/sessions/{session_id}/replies/{reply_id}"
    return EventSourceResponse(sse(svc.replies.reply_events(reply_id, meta, None)), ping=15,
                               headers={"Content-Location": location})


@router.get("/v1/sessions/{session_id}/replies/{reply_id}")
async def reply_events(session_id: str, reply_id: str, svc: Svc, owner: Owner,
                       last_event_id: Annotated[str | None, Header(max_length=64)] = None):
    """A reply's events after ``Last-Event-ID`` (all without it): stored, then live, then the end."""
    meta = await svc.replies.check(reply_id, session_id, owner)
    return EventSourceResponse(sse(svc.replies.reply_events(reply_id, meta, last_event_id)), ping=15)


@router.post("/v1/sessions/{session_id}/replies/{reply_id}/cancel", status_code=202)
async def cancel_reply(session_id: str, reply_id: str, svc: Svc, owner: Owner) -> dict:
    await svc.replies.check(reply_id, session_id, owner)
    await svc.turns.cancel(reply_id)
    return {"reply_id": reply_id, "status": "cancelling"}


@router.get("/v1/replies")
async def active_replies(svc: Svc, owner: Owner) -> dict:
    """The caller's replies being generated now, with their sessions (cancel one by its URL)."""
    data = []
    for reply_id in await svc.limits.active_replies(owner):
        meta = await svc.replies.meta(reply_id)
        if meta is not None:  # else a stateless chat completion: it ends with its client
            data.append({"reply_id": reply_id, "session_id": meta.session_id,
                         "cancel_url": f"/v1/sessions/{meta.session_id}/replies/{reply_id}/cancel"})
    return {"object": "list", "data": data}
