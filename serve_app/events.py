"""The frames a reply, a room and the WebSocket protocol are made of: one type per frame.

Events of a reply or a room's timeline (:data:`LogEvent`: ``turn``, ``delta``, ``done``, ``error``,
``message``, ``member_joined``) are what the ingress appends to an event log and what every reader
gets back, over SSE (``event: <type>``, ``data: <json>``, ``id: <event id>``) or as WebSocket
frames (the same JSON plus ``id`` and the client's ``ref``). The WebSocket adds frames of its own
(:class:`SessionFrame`, :class:`PingFrame`, :class:`PongFrame`). Client frames are in
``serve_app/ingress/ws_protocol.py``. The wire format is documented in ``docs/websocket.md``.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter

from .errors import ApiError
from .schemas import SessionView


class Frame(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    def wire(self, **envelope) -> dict:
        """The JSON object sent to clients; ``envelope`` adds ``id`` / ``ref``."""
        return {**self.model_dump(mode="json"), **envelope}


class PromptTokensDetails(BaseModel):
    cached_tokens: int = 0


class TokenUsage(BaseModel):
    """Token counts in OpenAI's ``usage`` shape."""

    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    prompt_tokens_details: PromptTokensDetails = PromptTokensDetails()

    @classmethod
    def of(cls, usage) -> TokenUsage:
        """From an engine :class:`~engines.protocol.Usage`."""
        return cls(prompt_tokens=usage.prompt_tokens, completion_tokens=usage.completion_tokens,
                   total_tokens=usage.total_tokens,
                   prompt_tokens_details=PromptTokensDetails(cached_tokens=usage.cached_prompt_tokens))


# -- events of a reply or a room (stored in event logs) ----------------------------------------------

class TurnEvent(Frame):
    """A reply has started."""

    type: Literal["turn"] = "turn"
    reply_id: str
    session_id: str | None  # None: a stateless response
    turn_index: int
    history_turns_used: int
    history_turns_dropped: int
    prompt_tokens: int
    append_only: bool
    item_id: str | None = None  # the reply's id as a conversation item (``msg_...``)


class DeltaEvent(Frame):
    type: Literal["delta"] = "delta"
    reply_id: str | None = None
    text: str


class DoneEvent(Frame):
    """The reply ended: saved unless ``finish_reason`` is ``cancelled``."""

    type: Literal["done"] = "done"
    reply_id: str | None = None
    finish_reason: str
    usage: TokenUsage | None = None
    replica: str | None = None


class ErrorEvent(Frame):
    """A frame that could not be served, or a reply that failed (the stream's status was already sent)."""

    type: Literal["error"] = "error"
    reply_id: str | None = None
    code: str
    message: str
    status: int
    retry_after_s: int | None = None

    @classmethod
    def of(cls, err: ApiError, reply_id: str | None = None) -> ErrorEvent:
        return cls(reply_id=reply_id, code=err.code or err.type, message=err.message, status=err.status,
                   retry_after_s=err.retry_after_s)


class MessageEvent(Frame):
    """Rooms: a member's message; its reply follows."""

    type: Literal["message"] = "message"
    reply_id: str
    author: str
    content: str


class MemberJoinedEvent(Frame):
    type: Literal["member_joined"] = "member_joined"
    member: str


LogEvent = Annotated[TurnEvent | DeltaEvent | DoneEvent | ErrorEvent | MessageEvent | MemberJoinedEvent,
                     Field(discriminator="type")]
LOG_EVENT = TypeAdapter(LogEvent)


def is_end(event: Frame) -> bool:
    """A reply's last event."""
    return isinstance(event, (DoneEvent, ErrorEvent))


# -- WebSocket-only frames ----------------------------------------------------------------------------

class SessionFrame(Frame):
    """The answer to ``start`` / ``join``: the session and its whole history."""

    type: Literal["session"] = "session"
    session: SessionView

    def wire(self, **envelope) -> dict:
        return {"type": self.type, **self.session.model_dump(mode="json"), **envelope}


class PingFrame(Frame):
    type: Literal["ping"] = "ping"
    ts: float


class PongFrame(Frame):
    type: Literal["pong"] = "pong"
