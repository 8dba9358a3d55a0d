"""HTTP request bodies of the ingress (pydantic): the OpenAI chat completion request, the sessions
API, and OpenAI's Responses and Conversations APIs. Unknown fields are ignored, as OpenAI-compatible
servers do; lengths and counts are bounded here."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, StringConstraints, field_validator, model_validator

from engines.protocol import MAX_SEED, InvalidRequestError, SamplingParams

from ..schemas import Message

MAX_MESSAGES = 512
MAX_STOP_STRINGS = 8
MAX_STOP_CHARS = 256
MAX_ID_CHARS = 256


class ContentPart(BaseModel):
    model_config = ConfigDict(extra="ignore")
    type: str
    text: str | None = None


class OpenAIMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")
    role: Literal["system", "user", "assistant", "developer", "tool"]
    content: str | list[ContentPart] | None = None

    def text(self, param: str) -> str:
        """The message's text; ``param`` names it in the error for a part that is not text."""
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        other = sorted({p.type for p in self.content if p.type != "text"})
        if other:
            raise InvalidRequestError(f"only text content parts are supported, not {', '.join(other)}", param)
        return "".join(p.text or "" for p in self.content)


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
    seed: int | None = Field(None, ge=0, le=MAX_SEED)
    stop: str | list[str] | None = None
    ignore_eos: bool = Field(False, description="vLLM/llama.cpp extension: never end early, text up to max_tokens "
                             "(EOS and special tokens are not picked; for benchmarks)")
    cache_prompt: bool = Field(True, description="llama.cpp extension: false bypasses the prefix KV cache")

    @field_validator("stop")
    @classmethod
    def _stop(cls, value):
        items = [value] if isinstance(value, str) else (value or [])
        if len(items) > MAX_STOP_STRINGS or any(not s or len(s) > MAX_STOP_CHARS for s in items):
            raise ValueError(f"stop must be up to {MAX_STOP_STRINGS} non-empty strings of at most "
                             f"{MAX_STOP_CHARS} characters")
        return value

    def sampling_params(self) -> SamplingParams:
        """The engine's parameters (raises :class:`~engines.protocol.InvalidRequestError` naming the field)."""
        stop = self.stop
        return SamplingParams(
            max_tokens=self.max_completion_tokens or self.max_tokens,
            temperature=1.0 if self.temperature is None else self.temperature,
            top_p=1.0 if self.top_p is None else self.top_p,
            seed=self.seed,
            stop=(stop,) if isinstance(stop, str) else tuple(stop or ()),
            ignore_eos=self.ignore_eos,
        )


class ChatCompletionRequest(SamplingFields):
    model: str = Field(max_length=MAX_ID_CHARS)
    messages: list[OpenAIMessage] = Field(min_length=1, max_length=MAX_MESSAGES)
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: int = 1
    user: str | None = Field(None, max_length=MAX_ID_CHARS)


class CreateSessionRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")
    system_prompt: str | None = None  # bounded by dialogue.max_message_chars
    title: str | None = Field(None, max_length=200)
    room: bool = Field(False, description="A group chat several WebSocket clients join (docs/websocket.md)")


class SessionMessageRequest(SamplingFields):
    content: str = Field(min_length=1)


# -- the Responses and Conversations APIs ------------------------------------------------------------------

MAX_INPUT_ITEMS = 1024  # per request: a stateless conversation resent whole fits
MAX_ITEMS_PER_CALL = 20  # conversations.create / items.create, as OpenAI
MAX_TEXT_CHARS = 1_000_000  # a hard cap per text field; the configured max_message_chars applies per message
TEXT_PARTS = ("input_text", "output_text", "text")
Text = Annotated[str, StringConstraints(max_length=MAX_TEXT_CHARS)]
Metadata = Annotated[dict[Annotated[str, StringConstraints(max_length=64)], Annotated[str, StringConstraints(
    max_length=512)]], Field(max_length=16, description="Up to 16 pairs; keys up to 64 characters, values 512")]


def input_message(item, where: str) -> Message:
    """One input item (OpenAI's message item, or the easy ``{"role", "content"}`` form) as a message;
    a ValueError naming the item and the part for anything but text messages."""
    if not isinstance(item, dict):
        raise ValueError(f"{where}: an input item must be an object")
    kind = item.get("type", "message")
    if kind != "message":
        raise ValueError(f"{where}.type: input items of type {kind!r} are not supported (only messages: no tools)")
    role = item.get("role")
    if role not in ("user", "assistant", "system", "developer"):
        raise ValueError(f"{where}.role: must be user, assistant, system or developer, got {role!r}")
    content = item.get("content")
    if isinstance(content, str):
        return Message(role=role, content=content)
    if not isinstance(content, list) or not content:
        raise ValueError(f"{where}.content: must be a string or a non-empty list of text parts")
    texts = []
    for j, part in enumerate(content):
        kind = part.get("type") if isinstance(part, dict) else None
        if kind not in TEXT_PARTS or not isinstance(part.get("text"), str):
            raise ValueError(f"{where}.content[{j}]: content of type {kind!r} is not supported (text only: no images, "
                             "files or audio)")
        texts.append(part["text"])
    return Message(role=role, content="".join(texts))


def input_messages(items: list, name: str) -> list[Message]:
    return [input_message(item, f"{name}[{i}]") for i, item in enumerate(items)]


class ConversationParam(BaseModel):
    model_config = ConfigDict(extra="ignore")
    id: str = Field(max_length=200)


class ResponseCreateRequest(BaseModel):
    """``POST /v1/responses``. Text in, text out: the features this server does not have are refused
    with a 400 naming the field; fields with no effect here are ignored."""

    model_config = ConfigDict(extra="ignore")
    model: str
    input: Text | Annotated[list, Field(min_length=1, max_length=MAX_INPUT_ITEMS)]
    instructions: Text | None = None
    max_output_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    store: bool = True
    stream: bool = False
    background: bool = False
    previous_response_id: str | None = Field(None, max_length=300)
    conversation: Annotated[str, StringConstraints(max_length=200)] | ConversationParam | None = None
    truncation: Literal["auto", "disabled"] = "disabled"
    metadata: Metadata | None = None
    # Extensions (as in the chat completions endpoint): for benchmarks and reproducible tests.
    seed: int | None = Field(None, ge=0)
    ignore_eos: bool = False
    cache_prompt: bool = True
    # Not supported here: a 400 naming the field when used.
    tools: list | None = None
    tool_choice: str | dict | None = None
    reasoning: dict | None = None
    include: list | None = None
    prompt: dict | None = None
    text: dict | None = None
    top_logprobs: int | None = None

    @field_validator("input")
    @classmethod
    def _input(cls, value):
        return value if isinstance(value, str) else input_messages(value, "input")

    @field_validator("tools")
    @classmethod
    def _tools(cls, value):
        if value:
            raise ValueError("tools (function calling, built-in tools) are not supported by this server")
        return value

    @field_validator("tool_choice")
    @classmethod
    def _tool_choice(cls, value):
        if value not in (None, "none", "auto"):
            raise ValueError("tool_choice: this server has no tools; use none or auto")
        return value

    @field_validator("reasoning", "prompt")
    @classmethod
    def _unsupported(cls, value, info):
        if value:
            what = {"reasoning": "reasoning options (this model does not reason)",
                    "prompt": "stored prompt templates"}[info.field_name]
            raise ValueError(f"{what} are not supported by this server")
        return value

    @field_validator("include")
    @classmethod
    def _include(cls, value):
        if value:
            raise ValueError(f"{value[0]!r}: no additional output data (logprobs, tool results) is available")
        return value

    @field_validator("text")
    @classmethod
    def _text(cls, value):
        kind = ((value or {}).get("format") or {}).get("type", "text")
        if kind != "text":
            raise ValueError(f"format {kind!r} (structured outputs) is not supported; only text")
        return value

    @field_validator("top_logprobs")
    @classmethod
    def _top_logprobs(cls, value):
        if value:
            raise ValueError("logprobs are not supported by this server")
        return value

    @model_validator(mode="after")
    def _combinations(self):
        if self.conversation is not None and self.previous_response_id is not None:
            raise ValueError("give conversation or previous_response_id, not both")
        if self.background and not self.store:
            raise ValueError("background responses must be stored (store: true)")
        return self

    @property
    def conversation_id(self) -> str | None:
        return self.conversation.id if isinstance(self.conversation, ConversationParam) else self.conversation

    def messages(self) -> list[Message]:
        return [Message(role="user", content=self.input)] if isinstance(self.input, str) else list(self.input)

    def sampling(self) -> SamplingFields:
        return SamplingFields(max_tokens=self.max_output_tokens, temperature=self.temperature, top_p=self.top_p,
                              seed=self.seed, ignore_eos=self.ignore_eos, cache_prompt=self.cache_prompt)


class ConversationCreateRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")
    items: Annotated[list, Field(max_length=MAX_ITEMS_PER_CALL)] | None = None
    metadata: Metadata | None = None

    @field_validator("items")
    @classmethod
    def _items(cls, value):
        return None if value is None else input_messages(value, "items")


class ConversationUpdateRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")
    metadata: Metadata | None


class ItemsCreateRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")
    items: Annotated[list, Field(min_length=1, max_length=MAX_ITEMS_PER_CALL)]

    @field_validator("items")
    @classmethod
    def _items(cls, value):
        return input_messages(value, "items")
