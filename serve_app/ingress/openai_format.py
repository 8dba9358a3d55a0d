"""OpenAI's chat completion protocol: a request becomes a :class:`GenerationRequest` (and the
affinity key of its conversation), a delta stream becomes a ``chat.completion`` body or a stream of
``chat.completion.chunk`` SSE events ending with ``[DONE]``."""

from __future__ import annotations

import hashlib
import json
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field

from engines.protocol import Delta, GenerationRequest

from ..errors import ApiError, to_api_error
from ..events import TokenUsage
from .bodies import ChatCompletionRequest
from .metrics import IngressMetrics
from .moderation import Moderator, check_input


def generation_request(body: ChatCompletionRequest, model_name: str, moderator: Moderator | None,
                       max_message_chars: int) -> tuple[GenerationRequest, str]:
    """The engine request for ``body`` and its conversation's affinity key; 4xx for what we do not
    serve. Every message is bounded and moderated, whatever its role: the client wrote them all."""
    if body.n != 1:
        raise ApiError(400, "only n=1 is supported", param="n")
    if body.model != model_name:
        raise ApiError(404, f"model {body.model!r} not found; available: {model_name}", param="model",
                       code="model_not_found")
    try:
        messages = []
        for i, m in enumerate(body.messages):
            param = f"messages.{i}.content"
            text = m.text(param)
            if len(text) > max_message_chars:
                raise ApiError(400, f"{param} is longer than {max_message_chars} characters", param=param)
            check_input(moderator, text, param=param)
            messages.append({"role": "system" if m.role == "developer" else m.role, "content": text})
        request = GenerationRequest(messages=tuple(messages), sampling=body.sampling_params(),
                                    use_prefix_cache=body.cache_prompt)
    except ValueError as exc:
        raise to_api_error(exc) from None
    return request, conversation_key(request.messages)


def conversation_key(messages: tuple[dict, ...]) -> str:
    """Affinity key of a client-held conversation: its messages up to the first user message, which
    every later request of the same conversation resends unchanged."""
    head = []
    for message in messages:
        head.append([message["role"], message["content"]])
        if message["role"] == "user":
            break
    return "conv:" + hashlib.sha256(json.dumps(head).encode()).hexdigest()[:24]


@dataclass
class Completion:
    """One response's identity (the same in every chunk of a stream) and what happens at its end:
    ``on_usage`` gets the total tokens, ``on_end`` runs however the stream ends."""

    model: str
    on_usage: Callable[[int], Awaitable[None]] | None = None
    on_end: Callable[[], Awaitable[None]] | None = None
    id: str = field(default_factory=lambda: "chatcmpl-" + uuid.uuid4().hex)
    created: int = field(default_factory=lambda: int(time.time()))

    async def _ended(self, delta: Delta) -> None:
        if self.on_usage is not None:
            await self.on_usage(delta.usage.total_tokens)

    async def body(self, stream: AsyncIterator[Delta]) -> dict:
        """The whole ``chat.completion`` (waits for the last delta)."""
        text, last = [], None
        try:
            async for delta in stream:
                text.append(delta.text)
                last = delta
            await self._ended(last)
        finally:
            if self.on_end is not None:
                await self.on_end()
        return {
            "id": self.id, "object": "chat.completion", "created": self.created, "model": self.model,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": "".join(text)},
                         "finish_reason": last.finish_reason, "logprobs": None}],
            "usage": TokenUsage.of(last.usage).model_dump(),
        }

    def _chunk(self, delta: dict, finish_reason=None, usage: TokenUsage | None = None, choices=True) -> dict:
        body = {"id": self.id, "object": "chat.completion.chunk", "created": self.created, "model": self.model,
                "choices": [{"index": 0, "delta": delta, "finish_reason": finish_reason, "logprobs": None}]
                if choices else []}
        if usage is not None:
            body["usage"] = usage.model_dump()
        return {"data": json.dumps(body)}

    async def chunks(self, stream: AsyncIterator[Delta], include_usage: bool, metrics: IngressMetrics):
        """SSE events (sse-starlette dicts): role, content pieces, finish, usage if asked, ``[DONE]``.
        An error once the stream has started is reported in-band, as OpenAI does."""
        try:
            yield self._chunk({"role": "assistant", "content": ""})
            async for delta in stream:
                if delta.text:
                    yield self._chunk({"content": delta.text})
                if delta.finish_reason is not None:
                    await self._ended(delta)
                    yield self._chunk({}, finish_reason=delta.finish_reason)
                    if include_usage:
                        yield self._chunk({}, usage=TokenUsage.of(delta.usage), choices=False)
        except Exception as exc:  # noqa: BLE001 - reported in-band: the status line is already sent
            err = to_api_error(exc)
            metrics.error(err.status, err.code or err.type)
            yield {"data": json.dumps(err.body())}
        finally:
            if self.on_end is not None:
                await self.on_end()
        yield {"data": "[DONE]"}
