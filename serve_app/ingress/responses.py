"""OpenAI's Responses API on the dialogue state.

A response is a turn. ``create`` picks the session the turn goes into (``conversation``: that
session; ``previous_response_id``: the session of the previous response, or a fork of it when the
chain goes on from an earlier response; neither: a new session, created by the turn's commit, or no
session at all with ``store: false``), gives the reply the response's id (which names that session:
``schemas.new_response_id``) and runs it through the :class:`~serve_app.ingress.turns.TurnRunner`
like every other turn: the append-only prompt, the session's model replica (affinity), the event log.
So a chain's turn N reuses the KV of turns 1..N-1, and the sessions API, the WebSocket and the chat
page see the same conversation.

Reading a response: while its reply runs (and ``reply_retention_s`` after), from the reply's event
log (:class:`~serve_app.ingress.responses_format.ResponseStream` turns log events into stream events
and objects); once done, from the turn stored in its session. Cancel and delete act on the running
reply (a cancelled reply saves nothing) or on the stored turn.
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from typing import Literal

from ray.serve.handle import DeploymentHandle

from ..config import AppSettings
from ..errors import ApiError
from ..events import is_end
from ..schemas import ItemPage, ReplyMeta, ResponseRecord, TurnInput, new_response_id
from .auth import Identity
from .bodies import ResponseCreateRequest
from .calls import call
from .replies import Replies
from .responses_format import ItemList, ResponseObject, ResponseStream, StreamError, StreamEvent
from .turns import TurnRunner, check_system_prompt


def deleted_flag(response_id: str) -> str:
    """The flag (beside the cancel flags) that hides a deleted response's log from readers."""
    return f"deleted:{response_id}"


def not_found(response_id: str) -> ApiError:
    return ApiError(404, f"response {response_id} not found", code="response_not_found")


class ResponsesApi:
    def __init__(self, turns: TurnRunner, replies: Replies, dialogue: DeploymentHandle, settings: AppSettings):
        self.turns = turns
        self.replies = replies
        self.dialogue = dialogue
        self.settings = settings

    # -- create ------------------------------------------------------------------------------------
    async def create(self, body: ResponseCreateRequest, who: Identity) -> tuple[ResponseRecord, ReplyMeta]:
        """Start the response's turn (its first token is on the way when this returns)."""
        model = self.settings.model.served_model_name
        if body.model != model:
            raise ApiError(404, f"model {body.model!r} not found; available: {model}", param="model",
                           code="model_not_found")
        check_system_prompt(body.instructions, self.settings.dialogue.max_message_chars, self.turns.moderator)
        conversation = body.conversation_id
        save = body.store or conversation is not None
        create, history_turns = False, None
        if conversation is not None:
            session_id = conversation
        elif body.previous_response_id is not None:
            session_id, history_turns = await call(self.dialogue.continue_from.remote(body.previous_response_id,
                                                                                        who.owner, save))
        elif save:
            session_id, create = uuid.uuid4().hex, True  # the turn's commit creates it
        else:
            session_id = None
        record = ResponseRecord(
            id=new_response_id(session_id if body.store else None), model=model, input=body.messages(),
            instructions=body.instructions, metadata=body.metadata, temperature=body.temperature, top_p=body.top_p,
            max_output_tokens=body.max_output_tokens, previous_response_id=body.previous_response_id,
            conversation_id=conversation, truncation=body.truncation, background=body.background, store=body.store)
        turn = TurnInput(messages=record.input, instructions=body.instructions, truncation=body.truncation,
                         response=record if body.store else None, create=create, save=save,
                         history_turns=history_turns)
        _, meta = await self.turns.start(session_id, who, turn, body.sampling(), reply_id=record.id, param="input")
        return meta.response or record, meta

    # -- reading -----------------------------------------------------------------------------------
    async def events(self, record: ResponseRecord, meta: ReplyMeta, after: int | None = None
                     ) -> AsyncIterator[StreamEvent]:
        """The response's stream events after sequence number ``after``: stored, then live, to the end."""
        stream = ResponseStream(record)
        try:
            for event in stream.opening():
                if after is None or event.sequence_number > after:
                    yield event
            async for _, logged in self.replies.reply_events(record.id, meta, None):
                for event in stream.feed(logged):
                    if after is None or event.sequence_number > after:
                        yield event
        except ApiError as exc:  # the log is gone (retention): the response may still be retrieved
            yield StreamError(sequence_number=stream.sequence + 1, code=exc.code, message=exc.message)

    async def final(self, record: ResponseRecord, meta: ReplyMeta) -> ResponseObject:
        """The response once its reply has ended."""
        stream = ResponseStream(record)
        async for _, logged in self.replies.reply_events(record.id, meta, None):
            stream.feed(logged)
        return stream.snapshot()

    async def _running(self, response_id: str, owner: str) -> tuple[ResponseRecord, ReplyMeta, bool] | None:
        """(record, log metadata, ended) of a stored response whose reply log is still kept (and
        that was not deleted meanwhile)."""
        meta = await self.replies.log.meta(response_id)
        if meta is None or meta.response is None or (meta.owner != owner and not meta.room):
            return None
        if await self.turns.cancels.requested(deleted_flag(response_id)):
            return None
        logged = await self.replies.stored_events(response_id, meta)
        return meta.response, meta, any(is_end(e) and getattr(e, "reply_id", None) == response_id for e in logged)

    async def _stored(self, response_id: str, owner: str):
        try:
            return await call(self.dialogue.get_response.remote(response_id, owner))
        except ApiError as exc:
            if exc.status == 404:
                return None
            raise

    async def retrieve(self, response_id: str, owner: str) -> ResponseObject:
        stored = await self._stored(response_id, owner)
        if stored is not None:
            return ResponseObject.stored(stored)
        running = await self._running(response_id, owner)
        if running is None:
            raise not_found(response_id)
        record, meta, _ = running
        stream = ResponseStream(record)
        for logged in await self.replies.stored_events(response_id, meta):
            stream.feed(logged)
        return stream.snapshot()

    async def replay(self, response_id: str, owner: str, after: int | None) -> AsyncIterator[StreamEvent]:
        """``GET /v1/responses/{id}?stream=true``: the stream again, from its log while it is kept."""
        running = await self._running(response_id, owner)
        if running is None:
            if await self._stored(response_id, owner) is not None:
                raise ApiError(410, f"the stream of response {response_id} is no longer kept (retention "
                               f"{self.settings.dialogue.reply_retention_s:g} s); retrieve it without stream",
                               code="stream_gone")
            raise not_found(response_id)
        record, meta, _ = running
        return self.events(record, meta, after)

    async def input_items(self, response_id: str, owner: str, after: str | None, limit: int,
                          order: Literal["asc", "desc"]) -> ItemList:
        stored = await self._stored(response_id, owner)
        running = None if stored is not None else await self._running(response_id, owner)
        if stored is None and running is None:
            raise not_found(response_id)
        record = stored.record if stored is not None else running[0]
        return ItemList.of(ItemPage.of(record.input, after, limit, order))

    # -- cancel, delete ------------------------------------------------------------------------------
    async def cancel(self, response_id: str, owner: str) -> ResponseObject:
        """Stop a running response (nothing of it is saved); a finished one is returned as it is."""
        running = await self._running(response_id, owner)
        if running is not None and not running[2]:
            record, meta, _ = running
            await self.turns.cancel(response_id)
            return await self.final(record, meta)
        return await self.retrieve(response_id, owner)

    async def delete(self, response_id: str, owner: str) -> None:
        """A running response is cancelled (so never saved); a stored one leaves its session (the
        turn stays in the conversation's history)."""
        running = await self._running(response_id, owner)
        if running is not None:
            if not running[2]:
                await self.cancel(response_id, owner)
            await self.turns.cancels.request(deleted_flag(response_id))  # its log is kept a while longer
        try:
            await call(self.dialogue.delete_response.remote(response_id, owner))
        except ApiError as exc:
            if exc.status != 404 or running is None:  # cancelled before it was saved: gone all the same
                raise


__all__ = ["ResponsesApi"]
