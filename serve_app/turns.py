"""A chat turn as a chain of stages, and the task that produces its reply.

    validate/normalise → moderate → build context → generate → persist

:meth:`TurnRunner.start` runs the first four stages while the caller waits, so a bad, blocked or
unroutable message gets its 4xx/5xx before any stream starts. Then a producer task (in this ingress
replica) streams the model's deltas into the reply's event log (serve_app/replies.py), masks the
output if moderation asks for it, and persists the turn when the reply is complete. Clients only
read logs: the original request, a reconnect with ``Last-Event-ID``, a WebSocket ``resume``, every
member of a room. So a dropped connection loses nothing, and only an explicit cancel stops a reply.
One reply at a time per session: the producer holds the session's turn lock until it ends.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import logging
import time
import unicodedata
from collections.abc import AsyncIterator
from dataclasses import replace

from ray.serve.handle import DeploymentHandle

from engines.protocol import Delta, GenerationRequest, SamplingParams

from .errors import ApiError, to_api_error
from .metrics import ingress_metrics
from .replies import EventLog, LogNotFoundError, new_reply_id, reply_created_s
from .schemas import SessionMessageRequest, Turn, TurnPlan

logger = logging.getLogger("ray.serve")

CANCEL_POLL_S = 0.25


def room_log(session_id: str) -> str:
    return f"room:{session_id}"


def turn_lock(session_id: str) -> str:
    """The lock a session's reply holds while it is generated (one reply at a time per session)."""
    return f"turn:{session_id}"


def usage_of(delta: Delta) -> dict:
    u = delta.usage
    return {"prompt_tokens": u.prompt_tokens, "completion_tokens": u.completion_tokens,
            "total_tokens": u.total_tokens, "prompt_tokens_details": {"cached_tokens": u.cached_prompt_tokens}}


async def call(response):
    """Await a handle call, mapping any failure to an :class:`ApiError`."""
    try:
        return await response
    except Exception as exc:  # noqa: BLE001 - mapped to a status
        raise to_api_error(exc) from None


class ModelStream:
    """A model replica's delta stream, opened and peeked: errors before the first delta raise here."""

    def __init__(self, response):
        self._response = response
        self.first: Delta | None = None
        self.finished = False

    @classmethod
    async def open(cls, handle: DeploymentHandle, request: GenerationRequest, affinity_key: str | None) -> ModelStream:
        stream = cls(handle.options(stream=True).generate.remote(request, affinity_key=affinity_key))
        try:
            stream.first = await stream._response.__anext__()
        except BaseException as exc:
            stream.cancel()
            raise to_api_error(exc) from None
        return stream

    async def __aiter__(self) -> AsyncIterator[Delta]:
        try:
            delta = self.first
            while True:
                yield delta
                if delta.finish_reason is not None:
                    self.finished = True
                    return
                delta = await self._response.__anext__()
        finally:
            if not self.finished:
                self.cancel()

    def cancel(self) -> None:
        try:
            self._response.cancel()
        except Exception:  # noqa: BLE001 - already finished
            pass


def check_input(moderator, text: str, param: str = "content") -> None:
    """The moderation stage for input: a blocked message never reaches the model or the history."""
    if moderator is not None and (word := moderator.check_input(text)):
        raise ApiError(400, f"message blocked by the content policy (matched {word!r})", param=param,
                       code="content_blocked")


async def masked(stream: AsyncIterator[Delta], moderator) -> AsyncIterator[Delta]:
    """The moderation stage for output: blocked words in the reply are masked, even across deltas."""
    masker = moderator.output_masker() if moderator is not None and moderator.mask_output else None
    async for delta in stream:
        if masker is not None:
            text = masker.feed(delta.text) + (masker.finish() if delta.finish_reason is not None else "")
            delta = replace(delta, text=text)
        yield delta


def error_event(err: ApiError) -> dict:
    """A reply's in-band error, shaped like the WebSocket protocol's error frames."""
    return {"type": "error", "code": err.code or err.type, "message": err.message, "status": err.status}


def turn_event(plan: TurnPlan, reply_id: str) -> dict:
    return {"type": "turn", "reply_id": reply_id, "session_id": plan.session_id, "turn_index": plan.turn_index,
            "history_turns_used": plan.history_turns_used, "history_turns_dropped": plan.history_turns_dropped,
            "prompt_tokens": len(plan.prompt_token_ids), "append_only": plan.append_only}


class TurnRunner:
    def __init__(self, model: DeploymentHandle, dialogue: DeploymentHandle, log: EventLog, moderator,
                 retention_s: float, max_reply_s: float):
        self.model = model
        self.dialogue = dialogue
        self.log = log
        self.moderator = moderator
        self.retention_s = retention_s
        self.max_reply_s = max_reply_s
        self._producers: dict[str, asyncio.Task] = {}

    # -- the stages that run while the caller waits ------------------------------------------------
    async def start(self, session_id: str, owner: str, fields: SessionMessageRequest, author: str | None = None) -> str:
        """Start a turn; returns the id of the reply (its events: :meth:`events`)."""
        content = unicodedata.normalize("NFC", fields.content).strip()  # validate / normalise
        if not content:
            raise ApiError(400, "message content must not be empty", param="content")
        try:
            sampling = SamplingParams(**fields.sampling_kwargs())
        except ValueError as exc:
            raise to_api_error(exc) from None
        check_input(self.moderator, content)  # moderate
        reply_id = new_reply_id()
        holder = await self.log.claim(turn_lock(session_id), reply_id, self.max_reply_s)
        if holder is not None:
            raise ApiError(409, f"a reply is already being generated in this session ({holder}); "
                           "wait for it, resume it, or cancel it", code="busy")
        # The reply must outlive this request: run it in a task with a fresh context, or Serve would
        # cancel its handle calls (children of this request) when the client disconnects.
        opened = asyncio.get_running_loop().create_future()
        task = asyncio.create_task(self._turn(reply_id, session_id, owner, content, fields, sampling, author, opened),
                                   context=contextvars.Context())
        self._producers[reply_id] = task
        task.add_done_callback(lambda _: self._producers.pop(reply_id, None))
        await opened
        return reply_id

    async def _turn(self, reply_id: str, session_id: str, owner: str, content: str, fields: SessionMessageRequest,
                    sampling: SamplingParams, author: str | None, opened: asyncio.Future) -> None:
        try:
            plan: TurnPlan = await call(self.dialogue.prepare_turn.remote(session_id, owner, content))  # context
            request = GenerationRequest(prompt_token_ids=tuple(plan.prompt_token_ids), sampling=sampling,
                                        use_prefix_cache=fields.cache_prompt)
            stream = await ModelStream.open(self.model, request, affinity_key=session_id)  # generate
            target = room_log(session_id) if plan.room else reply_id
            await self.log.create(reply_id, {"session_id": session_id, "owner": owner, "room": plan.room},
                                  self.max_reply_s + self.retention_s)
            if plan.room:
                await self.log.append(target, {"type": "message", "author": author or owner, "content": content,
                                               "reply_id": reply_id})
        except BaseException as exc:
            if not opened.done():
                opened.set_exception(exc)  # first: the caller must get its answer even if Redis is gone
            with contextlib.suppress(Exception):
                await self.log.release(turn_lock(session_id), reply_id)
            return
        opened.set_result(None)
        await self._produce(target, reply_id, plan, owner, content, stream)

    # -- generate and persist, in the background ---------------------------------------------------
    async def _produce(self, target: str, reply_id: str, plan: TurnPlan, owner: str, content: str,
                       stream: ModelStream) -> None:
        watcher = asyncio.create_task(self._watch_cancel(reply_id, asyncio.current_task()))
        try:
            await self.log.append(target, turn_event(plan, reply_id))
            async for event in self._run(plan, owner, content, stream):
                await self.log.append(target, {**event, "reply_id": reply_id})
        except asyncio.CancelledError:
            stream.cancel()
            await self.log.append(target, {"type": "done", "reply_id": reply_id, "finish_reason": "cancelled",
                                           "usage": None})
        except Exception:  # noqa: BLE001 - the log is gone (expired); nothing left to tell
            logger.exception("reply %s: could not write its events", reply_id)
            stream.cancel()
        finally:
            watcher.cancel()
            await self.log.finish(reply_id, self.retention_s)
            await self.log.release(turn_lock(plan.session_id), reply_id)

    async def _watch_cancel(self, reply_id: str, producer: asyncio.Task) -> None:
        """Cancellation may be asked on any ingress replica: it is a flag in the log, polled here."""
        while not await self.log.cancel_requested(reply_id):
            await asyncio.sleep(CANCEL_POLL_S)
        producer.cancel()

    async def _run(self, plan: TurnPlan, owner: str, content: str, stream: ModelStream):
        """Stream a turn's deltas as events; save the turn only once the reply is complete.
        A cancelled or failed reply saves nothing, so the history never holds half a turn."""
        parts: list[str] = []
        generated_ids: list[int] = []
        ingress_metrics().session_entered(plan.session_id)
        try:
            async for delta in masked(stream, self.moderator):
                generated_ids += delta.token_ids
                if delta.text:
                    parts.append(delta.text)
                    yield {"type": "delta", "text": delta.text}
                if delta.finish_reason is not None:
                    usage = usage_of(delta)
                    turn = Turn(user=content, assistant="".join(parts), finish_reason=delta.finish_reason,
                                prompt_tokens=usage["prompt_tokens"], completion_tokens=usage["completion_tokens"])
                    await call(self.dialogue.commit_turn.remote(plan.session_id, owner, plan, turn, generated_ids))
                    yield {"type": "done", "finish_reason": delta.finish_reason, "usage": usage,
                           "replica": delta.served_by}
        except Exception as exc:  # noqa: BLE001 - reported in-band
            err = to_api_error(exc)
            ingress_metrics().error(err.status, err.code or err.type)
            yield error_event(err)
        finally:
            ingress_metrics().session_left(plan.session_id)

    # -- readers -----------------------------------------------------------------------------------
    async def check_reply(self, reply_id: str, session_id: str, owner: str) -> dict:
        """The reply's metadata if ``owner`` may read it; 404 / 410 otherwise."""
        meta = await self.log.meta(reply_id)
        if meta is None:
            created = reply_created_s(reply_id)
            if created is not None and created < time.time() - self.retention_s:
                raise ApiError(410, f"reply {reply_id} is no longer kept (retention {self.retention_s:g} s)",
                               code="reply_gone")
            raise ApiError(404, f"reply {reply_id} not found", code="reply_not_found")
        if meta["session_id"] != session_id or (meta["owner"] != owner and not meta.get("room")):
            raise ApiError(404, f"reply {reply_id} not found", code="reply_not_found")
        return meta

    async def events(self, key: str, after: str | None, until_end: bool = True) -> AsyncIterator[tuple[str, dict]]:
        try:
            async for item in self.log.read(key, after, until_end):
                yield item
        except LogNotFoundError:
            raise ApiError(404, "no such event log", code="reply_not_found") from None

    async def cancel(self, reply_id: str) -> None:
        await self.log.request_cancel(reply_id)
        task = self._producers.get(reply_id)
        if task is not None:
            task.cancel()

    async def active_reply(self, session_id: str) -> str | None:
        """The id of the reply being generated in this session, if one is."""
        return await self.log.holder(turn_lock(session_id))

    async def shutdown(self, grace_s: float) -> None:
        """Graceful shutdown: let running replies finish for ``grace_s``, then cancel the rest, which
        ends their event logs (``done``, ``cancelled``) and frees their sessions' turn locks."""
        if self._producers:
            await asyncio.wait(list(self._producers.values()), timeout=grace_s)
        if self._producers:
            for task in list(self._producers.values()):
                task.cancel()
            await asyncio.wait(list(self._producers.values()), timeout=5)
