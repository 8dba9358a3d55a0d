"""Typed messages between the ingress, the dialogue deployment and the model replicas, and the
HTTP request bodies."""

from __future__ import annotations

import time
import uuid
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator


class Turn(BaseModel):
    """One completed exchange: the user's message and the assistant's full reply."""

    user: str
    assistant: str
    finish_reason: str
    prompt_tokens: int = 0
    completion_tokens: int = 0
    created_at: float = Field(default_factory=time.time)
    # The token ids this turn added to the prompt before the reply, the reply's ids, and the oldest
    # turn its prompt included: the next turn's prompt is built by appending (serve_app/context.py).
    context_ids: list[int] = Field(default_factory=list)
    reply_ids: list[int] = Field(default_factory=list)
    window_start: int = 0


class Session(BaseModel):
    id: str = Field(default_factory=lambda: uuid.uuid4().hex)
    owner: str
    system_prompt: str | None = None
    title: str | None = None
    room: bool = False  # a group chat: anyone with the id may join and talk (the id is the invitation)
    turns: list[Turn] = Field(default_factory=list)
    created_at: float = Field(default_factory=time.time)
    updated_at: float = Field(default_factory=time.time)

    def messages(self) -> list[dict]:
        out = [{"role": "system", "content": self.system_prompt}] if self.system_prompt else []
        for turn in self.turns:
            out += [{"role": "user", "content": turn.user}, {"role": "assistant", "content": turn.assistant}]
        return out

    def summary(self) -> dict:
        return {"id": self.id, "title": self.title, "room": self.room, "created_at": self.created_at, "updated_at": self.updated_at,
                "turns": len(self.turns)}

    def view(self) -> dict:
        return {**self.summary(), "system_prompt": self.system_prompt, "messages": self.messages()}


class TurnPlan(BaseModel):
    """What the dialogue deployment hands the ingress for the next turn."""

    session_id: str
    turn_index: int  # how many turns the session had when the prompt was built
    room: bool
    prompt_token_ids: list[int]
    context_ids: list[int]
    window_start: int
    append_only: bool
    history_turns_used: int
    history_turns_dropped: int


# -- HTTP bodies ------------------------------------------------------------------------------------

class ContentPart(BaseModel):
    model_config = ConfigDict(extra="ignore")
    type: str
    text: str | None = None


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")
    role: Literal["system", "user", "assistant", "developer", "tool"]
    content: str | list[ContentPart] | None = None

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        parts = [p.text or "" for p in self.content if p.type == "text"]
        if len(parts) != len(self.content):
            raise ValueError("only text content parts are supported")
        return "".join(parts)


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="ignore")
    include_usage: bool = False


class SamplingFields(BaseModel):
    """Sampling fields shared by the OpenAI endpoint, the sessions API and WebSocket messages."""

    model_config = ConfigDict(extra="ignore")
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    seed: int | None = Field(None, ge=0)
    stop: str | list[str] | None = None
    ignore_eos: bool = Field(False, description="vLLM/llama.cpp extension: never end early, text up to max_tokens "
                             "(EOS and special tokens are not picked; for benchmarks)")
    cache_prompt: bool = Field(True, description="llama.cpp extension: false bypasses the prefix KV cache")

    @field_validator("stop")
    @classmethod
    def _stop(cls, value):
        items = [value] if isinstance(value, str) else (value or [])
        if len(items) > 8 or any(not s for s in items):
            raise ValueError("stop must be up to 8 non-empty strings")
        return value

    def sampling_kwargs(self) -> dict:
        stop = self.stop
        return {
            "max_tokens": self.max_completion_tokens or self.max_tokens,
            "temperature": 1.0 if self.temperature is None else self.temperature,
            "top_p": 1.0 if self.top_p is None else self.top_p,
            "seed": self.seed,
            "stop": (stop,) if isinstance(stop, str) else tuple(stop or ()),
            "ignore_eos": self.ignore_eos,
        }


class ChatCompletionRequest(SamplingFields):
    model: str
    messages: list[ChatMessage] = Field(min_length=1)
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: int = 1
    user: str | None = None


class CreateSessionRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")
    system_prompt: str | None = None
    title: str | None = Field(None, max_length=200)
    room: bool = Field(False, description="A group chat several WebSocket clients join (docs/websocket.md)")


class SessionMessageRequest(SamplingFields):
    content: str = Field(min_length=1)
