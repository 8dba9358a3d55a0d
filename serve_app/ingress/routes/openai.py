"""OpenAI-compatible routes: ``/v1/models`` and ``/v1/chat/completions`` (stateless: the client
sends the whole conversation; streamed as SSE or answered whole). Shaping: ``openai_format.py``.
A completion holds one of its caller's concurrent-reply slots until it ends, and its tokens are
charged to the caller."""

import contextlib
from functools import partial

from fastapi import APIRouter
from sse_starlette.sse import EventSourceResponse

from ..bodies import ChatCompletionRequest
from ..calls import ModelStream
from ..identity import Caller, Owner
from ..moderation import masked
from ..openai_format import Completion, generation_request
from ..services import Svc

router = APIRouter()


@router.get("/v1/models")
async def models(svc: Svc, owner: Owner) -> dict:
    return {"object": "list", "data": [{"id": svc.model_name, "object": "model", "created": 0,
                                        "owned_by": "chatserve"}]}


@router.post("/v1/chat/completions")
async def chat_completions(body: ChatCompletionRequest, svc: Svc, caller: Caller):
    request, conversation = generation_request(body, svc.model_name, svc.moderator,
                                               svc.settings.dialogue.max_message_chars)
    await svc.limits.check_tokens(caller)
    async with contextlib.AsyncExitStack() as held:
        await held.enter_async_context(svc.limits.reply_slot(caller, request.request_id))
        stream = masked(await ModelStream.open(svc.model, request, conversation), svc.moderator)
        completion = Completion(svc.model_name, on_usage=partial(svc.limits.charge_tokens, caller),
                                on_end=held.pop_all().aclose)  # from here on the completion frees the slot
    if body.stream:
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        return EventSourceResponse(completion.chunks(stream, include_usage, svc.metrics), ping=15)
    return await completion.body(stream)
