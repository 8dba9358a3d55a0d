"""Typed messages that cross a deployment handle: what the dialogue deployment stores and returns,
what the ingress keeps about a reply, and what a model replica reports to the ops collector.
(HTTP request bodies are the ingress's own: ``serve_app/ingress/bodies.py``; event frames:
``serve_app/events.py``; OpenAI's wire objects: ``serve_app/ingress/responses_format.py``.)

One state, many doors: a session is a conversation. Its history is a list of :class:`Turn` (the
messages that came in, then the assistant's reply), then the ``pending`` messages added to the
conversation since its last reply (they open the next turn). Every message has an id (``msg_...``):
the conversation items of OpenAI's Conversations API. A turn made through the Responses API also
keeps its :class:`ResponseRecord`, so a stored response is found in the session its id names.
"""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from engines.protocol import EngineStats

from .errors import NotFoundError

Role = Literal["system", "developer", "user", "assistant"]


def new_item_id() -> str:
    return "msg_" + uuid.uuid4().hex


def new_conversation_id() -> str:
    return "conv_" + uuid.uuid4().hex


def new_response_id(session_id: str | None) -> str:
    """``resp_<ms>-<random>[.<session id>]``: the creation time (so an expired stream can be told
    from an unknown one) and the session that stores the response (none for ``store: false``)."""
    head = f"resp_{int(time.time() * 1000):x}-{uuid.uuid4().hex[:16]}"
    return f"{head}.{session_id}" if session_id else head


def response_session(response_id: str) -> str | None:
    """The session a response id names (None: not a stored response's id)."""
    if not response_id.startswith("resp_") or "." not in response_id:
        return None
    return response_id.split(".", 1)[1] or None


class Message(BaseModel):
    """A message of a conversation (one OpenAI conversation item)."""

    id: str = Field(default_factory=new_item_id)
    role: Role
    content: str

    def chat(self) -> dict:
        """As a chat template reads it."""
        return {"role": self.role, "content": self.content}


class ResponseRecord(BaseModel):
    """What the Responses API keeps of a request; the response object is built from it and from the
    turn it made (or, while it runs, from its reply's events)."""

    id: str
    created_at: float = Field(default_factory=time.time)
    model: str
    input: list[Message]  # this response's own input items (a turn's input also holds earlier pending items)
    instructions: str | None = None
    metadata: dict[str, str] | None = None
    temperature: float | None = None
    top_p: float | None = None
    max_output_tokens: int | None = None
    previous_response_id: str | None = None
    conversation_id: str | None = None
    truncation: Literal["auto", "disabled"] = "disabled"
    background: bool = False
    store: bool = True


class Turn(BaseModel):
    """One completed exchange: the messages that came in (one user message in the sessions API) and
    the assistant's full reply."""

    input: list[Message]
    output: Message
    finish_reason: str
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0
    created_at: float = Field(default_factory=time.time)
    response: ResponseRecord | None = None  # set when the Responses API made (and stores) this turn
    # The token ids this turn added to the prompt between the previous reply and its own, the reply's
    # ids, and the oldest turn its prompt included: the next prompt is built by appending
    # (dialogue/context.py). Empty ids are recomputed from the text.
    context_ids: list[int] = Field(default_factory=list)
    reply_ids: list[int] = Field(default_factory=list)
    window_start: int = 0

    @model_validator(mode="before")
    @classmethod
    def _legacy(cls, data):
        """Turns stored before conversation items (``user`` / ``assistant`` text) still load."""
        if isinstance(data, dict) and "user" in data and "input" not in data:
            data = dict(data)
            data["input"] = [{"role": "user", "content": data.pop("user")}]
            data["output"] = {"role": "assistant", "content": data.pop("assistant", "")}
        return data

    @classmethod
    def exchange(cls, user: str, assistant: str, **fields) -> Turn:
        """A turn of one user message and its reply."""
        return cls(input=[Message(role="user", content=user)], output=Message(role="assistant", content=assistant),
                   **fields)

    @property
    def user(self) -> str:
        """The text of the turn's last user message ('' if none)."""
        return next((m.content for m in reversed(self.input) if m.role == "user"), "")

    def items(self) -> list[Message]:
        return [*self.input, self.output]


class ChatMessage(BaseModel):
    """One message of a session's history as clients see it."""

    role: Role
    content: str
    id: str | None = None


class SessionSummary(BaseModel):
    """A session in a listing."""

    id: str
    title: str | None
    room: bool
    created_at: float
    updated_at: float
    turns: int
    metadata: dict[str, str] = Field(default_factory=dict)


class SessionView(SessionSummary):
    """A session with its history. ``active_reply_id``: the reply being generated now, if any (the
    ingress fills it in from the turn lock)."""

    system_prompt: str | None
    messages: list[ChatMessage]
    active_reply_id: str | None = None


class Session(BaseModel):
    """A session as stored. ``revision`` counts its writes (the tiered store archives a session only
    if it did not change meanwhile)."""

    id: str = Field(default_factory=lambda: uuid.uuid4().hex)
    owner: str
    system_prompt: str | None = None
    title: str | None = None
    room: bool = False  # a group chat: anyone with the id may join and talk (the id is the invitation)
    metadata: dict[str, str] = Field(default_factory=dict)
    affinity: str | None = None  # the model replica key of a session forked from another (its root's id)
    turns: list[Turn] = Field(default_factory=list)
    pending: list[Message] = Field(default_factory=list)  # added since the last reply; they open the next turn
    created_at: float = Field(default_factory=time.time)
    updated_at: float = Field(default_factory=time.time)
    revision: int = 0

    def items(self) -> list[Message]:
        """The conversation items, oldest first."""
        return [m for turn in self.turns for m in turn.items()] + self.pending

    def messages(self) -> list[ChatMessage]:
        out = [ChatMessage(role="system", content=self.system_prompt)] if self.system_prompt else []
        return out + [ChatMessage(role=m.role, content=m.content, id=m.id) for m in self.items()]

    def summary(self) -> SessionSummary:
        return SessionSummary(id=self.id, title=self.title, room=self.room, created_at=self.created_at,
                              updated_at=self.updated_at, turns=len(self.turns), metadata=self.metadata)

    def view(self) -> SessionView:
        return SessionView(**self.summary().model_dump(), system_prompt=self.system_prompt, messages=self.messages())


class ItemPage(BaseModel):
    """A page of conversation items (OpenAI's cursor pagination)."""

    data: list[Message]
    first_id: str | None
    last_id: str | None
    has_more: bool

    @classmethod
    def of(cls, items: list[Message], after: str | None, limit: int, order: Literal["asc", "desc"]) -> ItemPage:
        """``limit`` items after the item ``after`` in ``order`` (``items`` are oldest first)."""
        ordered = items if order == "asc" else items[::-1]
        if after is not None:
            at = next((i for i, item in enumerate(ordered) if item.id == after), None)
            if at is None:
                raise NotFoundError(f"item {after} not found", "item_not_found")
            ordered = ordered[at + 1:]
        data = ordered[:limit]
        return cls(data=data, first_id=data[0].id if data else None, last_id=data[-1].id if data else None,
                   has_more=len(ordered) > limit)


class StoredResponse(BaseModel):
    """A completed, stored response: its record and the turn it made (without token ids)."""

    record: ResponseRecord
    turn: Turn
    session_id: str


class TurnInput(BaseModel):
    """What a turn brings, from the sessions API, the WebSocket or the Responses API."""

    messages: list[Message] = Field(min_length=1)  # after the session's pending items
    instructions: str | None = None  # a new session's system prompt; else this turn's, when it differs
    truncation: Literal["auto", "disabled"] = "auto"  # auto: drop the oldest turns to fit the budget
    response: ResponseRecord | None = None  # kept with the turn (the Responses API with store=true)
    create: bool = False  # the session does not exist yet: the first commit creates it with this turn
    save: bool = True  # False: the reply is not saved (store=false); with no session, a stateless turn
    history_turns: int | None = None  # the prompt uses only the session's first turns (save=False only)

    @classmethod
    def user_message(cls, content: str) -> TurnInput:
        return cls(messages=[Message(role="user", content=content)])


class TurnPlan(BaseModel):
    """What the dialogue deployment hands the ingress for the next turn."""

    session_id: str | None  # None: a stateless turn (nothing is read or saved)
    turn_index: int  # how many turns the session had when the prompt was built
    room: bool
    prompt_token_ids: list[int]
    input: list[Message]  # the turn's input: the pending items, then the new messages
    reply_item_id: str = Field(default_factory=new_item_id)
    context_ids: list[int]
    window_start: int
    append_only: bool
    history_turns_used: int
    history_turns_dropped: int
    affinity_key: str | None = None  # the model replica key (the session's); None: the ingress derives one
    system_prompt: str | None = None  # the session's (a session the commit creates gets it)
    response: ResponseRecord | None = None
    create: bool = False
    save: bool = True


class ReplyMeta(BaseModel):
    """What the ingress keeps about a reply beside its events: whose it is and where it belongs."""

    model_config = ConfigDict(frozen=True)

    session_id: str | None
    owner: str | None = None
    room: bool = False
    finished: bool = False  # the producer is done (its end event, if any, is in the log)
    response: ResponseRecord | None = None  # a stored response: retrievable while it runs


@dataclass(frozen=True)
class ReplicaReport:
    """One model replica's state, pushed to the ops collector every second."""

    replica: str
    deployment: str
    node_id: str
    pid: int
    stats: EngineStats
    ttft_samples_s: tuple[float, ...] = ()
