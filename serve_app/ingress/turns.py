"""A chat turn as a chain of stages, and the task that produces its reply.

    validate/normalise → limits → moderate → claim the turn lock → build context → generate → persist

The sessions API, the WebSocket and the Responses API all run their turns here (a turn's input is a
:class:`~serve_app.schemas.TurnInput`: one user message, or the messages of a response). A turn with
no session (a stateless response) or that saves nothing (``store: false``) takes no lock and
persists nothing.

:meth:`TurnRunner.start` runs the stages up to the first token while the caller waits, so a bad,
blocked, busy or unroutable message gets its 4xx/5xx before any stream starts. Then a producer task
(in this ingress replica) streams the model's deltas as events into the reply's event log
(``event_log.py``), masks the output if moderation asks for it, and persists the turn when the reply
is complete. Clients only read logs (``replies.py``): the original request, a reconnect with
``Last-Event-ID``, a WebSocket ``resume``, every member of a room. So a dropped connection loses
nothing, and only an explicit cancel stops a reply. One reply at a time per session: the producer
holds the session's turn lock (``locks.py``) as a lease it renews from the claim until the reply
ends, so a producer that dies frees its session within a lease. Each reply also holds one of its
caller's concurrent-reply slots (``limits.py``), and its tokens are charged to the caller when it
ends. Every way out of a reply (done, error, cancel, a failing store) ends its log and frees its
lock and slot.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import logging
import unicodedata

from ray.serve.handle import DeploymentHandle

from engines.protocol import GenerationRequest, SamplingParams

from ..config import DialogueSettings
from ..errors import ApiError, to_api_error
from ..events import DeltaEvent, DoneEvent, ErrorEvent, MessageEvent, TokenUsage, TurnEvent
from ..schemas import Message, ReplyMeta, Turn, TurnInput, TurnPlan
from .auth import Identity
from .bodies import SamplingFields
from .calls import ModelStream, call
from .event_log import new_reply_id
from .limits import Limits
from .locks import LOCK_LEASE_S, turn_lock_name
from .metrics import IngressMetrics
from .moderation import Moderator, check_input, masked
from .openai_format import conversation_key
from .replies import ReplyBackends, room_log

logger = logging.getLogger("ray.serve")

CANCEL_POLL_S = 0.25


def normalise_message(content: str, max_chars: int, param: str = "content") -> str:
    """The validate/normalise stage: NFC, trimmed, not empty, not too long."""
    content = unicodedata.normalize("NFC", content).strip()
    if not content:
        raise ApiError(400, f"{param}: message content must not be empty", param=param)
    if len(content) > max_chars:
        raise ApiError(400, f"{param}: message is longer than {max_chars} characters", param=param)
    return content


def admit_messages(messages: list[Message], moderator: Moderator | None, max_chars: int,
                   param: str = "content") -> list[Message]:
    """Validate/normalise every message, then moderate it whatever its role: the client wrote them all
    (``param``: the request field, with the message's index when there are several)."""
    admitted = []
    for i, message in enumerate(messages):
        where = param if len(messages) == 1 else f"{param}[{i}]"
        admitted.append(message.model_copy(update={"content": normalise_message(message.content, max_chars, where)}))
        check_input(moderator, admitted[-1].content, param=where)
    return admitted


def check_system_prompt(system_prompt: str | None, max_chars: int, moderator: Moderator | None) -> None:
    """A client's system prompt is bounded and moderated like its messages."""
    if system_prompt is None:
        return
    if len(system_prompt) > max_chars:
        raise ApiError(400, f"system_prompt is longer than {max_chars} characters", param="system_prompt")
    check_input(moderator, system_prompt, param="system_prompt")


class TurnRunner:
    def __init__(self, model: DeploymentHandle, dialogue: DeploymentHandle, backends: ReplyBackends,
                 moderator: Moderator | None, metrics: IngressMetrics, settings: DialogueSettings, limits: Limits):
        self.model = model
        self.dialogue = dialogue
        self.log = backends.log
        self.locks = backends.locks
        self.cancels = backends.cancels
        self.moderator = moderator
        self.metrics = metrics
        self.settings = settings
        self.limits = limits
        self._producers: dict[str, asyncio.Task] = {}

    # -- the stages that run while the caller waits ------------------------------------------------
    async def start(self, session_id: str | None, who: Identity, turn: TurnInput, fields: SamplingFields,
                    reply_id: str | None = None, param: str = "content") -> tuple[str, ReplyMeta]:
        """Start a turn; returns the reply's id and metadata (its events: ``Replies.reply_events``).
        ``reply_id``: the id to give the reply (a response's id), else a new one."""
        messages = admit_messages(turn.messages, self.moderator, self.settings.max_message_chars, param)
        response = turn.response and turn.response.model_copy(update={"input": messages})
        turn = turn.model_copy(update={"messages": messages, "response": response})
        try:
            sampling = fields.sampling_params()
        except ValueError as exc:
            raise to_api_error(exc) from None
        await self.limits.check_tokens(who)
        reply_id = reply_id or new_reply_id()
        locked = session_id is not None and turn.save
        if locked:
            holder = await self.locks.claim(turn_lock_name(session_id), reply_id, LOCK_LEASE_S)
            if holder is not None:
                raise ApiError(409, f"a reply is already being generated in this conversation ({holder}); "
                               "wait for it, resume it, or cancel it", code="busy")
        # The reply must outlive this request: run it in a task with a fresh context, or Serve would
        # cancel its handle calls (children of this request) when the client disconnects.
        opened = asyncio.get_running_loop().create_future()
        task = asyncio.create_task(self._turn(reply_id, session_id, who, turn, sampling, fields.cache_prompt,
                                              opened, locked), context=contextvars.Context())
        self._producers[reply_id] = task
        task.add_done_callback(lambda _: self._producers.pop(reply_id, None))
        return reply_id, await opened

    async def _turn(self, reply_id: str, session_id: str | None, who: Identity, turn: TurnInput,
                    sampling: SamplingParams, cache_prompt: bool, opened: asyncio.Future, locked: bool) -> None:
        # From the claim on, the lease is kept (the context and the first token may take a while).
        watcher = asyncio.create_task(self._watch(reply_id, session_id if locked else None, asyncio.current_task()))

        async def settle() -> None:
            """The turn is saved: free the session for its next turn before readers hear ``done``, so a
            client that answers ``done`` at once is never told the session is busy."""
            watcher.cancel()  # first: with the lock gone it would take the reply for lost
            if locked:
                with contextlib.suppress(Exception):
                    await self.locks.release(turn_lock_name(session_id), reply_id)

        try:
            async with self.limits.reply_slot(who, reply_id):
                await self._open(reply_id, session_id, who, turn, sampling, cache_prompt, opened, settle)
        except BaseException as exc:
            if not opened.done():  # the caller must get its answer, even if Redis is gone
                opened.set_exception(ApiError(409, "the reply was cancelled before it started", code="cancelled")
                                     if isinstance(exc, asyncio.CancelledError) else exc)
        finally:
            watcher.cancel()
            if locked:
                with contextlib.suppress(Exception):
                    await self.locks.release(turn_lock_name(session_id), reply_id)

    async def _open(self, reply_id: str, session_id: str | None, who: Identity, turn: TurnInput,
                    sampling: SamplingParams, cache_prompt: bool, opened: asyncio.Future, settle) -> None:
        """Build the context, open the model stream and the reply's log, then produce the reply."""
        stream = None
        try:
            plan: TurnPlan = await call(self.dialogue.prepare_turn.remote(session_id, who.owner, turn))
            request = GenerationRequest(prompt_token_ids=tuple(plan.prompt_token_ids), sampling=sampling,
                                        use_prefix_cache=cache_prompt)
            affinity = plan.affinity_key or conversation_key(tuple(m.chat() for m in plan.input))
            stream = await ModelStream.open(self.model, request, affinity_key=affinity)
            target = room_log(session_id) if plan.room else reply_id
            meta = ReplyMeta(session_id=session_id, owner=who.owner, room=plan.room, response=turn.response)
            await self.log.create(reply_id, meta, self.settings.max_reply_s + self.settings.reply_retention_s)
            if plan.room:
                content = "\n\n".join(m.content for m in turn.messages)
                await self.log.append(target, MessageEvent(reply_id=reply_id, author=who.user, content=content))
        except BaseException:
            if stream is not None:
                stream.cancel()
            raise
        opened.set_result(meta)
        await self._produce(target, reply_id, plan, who, stream, settle)

    # -- generate and persist, in the background ---------------------------------------------------
    async def _produce(self, target: str, reply_id: str, plan: TurnPlan, who: Identity, stream: ModelStream,
                       settle) -> None:
        try:
            await self.log.append(target, TurnEvent(
                reply_id=reply_id, session_id=plan.session_id, turn_index=plan.turn_index,
                history_turns_used=plan.history_turns_used, history_turns_dropped=plan.history_turns_dropped,
                prompt_tokens=len(plan.prompt_token_ids), append_only=plan.append_only, item_id=plan.reply_item_id))
            async for event in self._run(plan, who, stream, reply_id):
                if isinstance(event, DoneEvent):  # the turn is saved (``_run``)
                    await settle()
                await self.log.append(target, event)
        except asyncio.CancelledError:
            stream.cancel()
            with contextlib.suppress(Exception):
                await self.log.append(target, DoneEvent(reply_id=reply_id, finish_reason="cancelled"))
        except Exception:  # noqa: BLE001 - the log or its store is gone; readers see the lock go
            logger.exception("reply %s: could not write its events", reply_id)
            stream.cancel()
        finally:
            with contextlib.suppress(Exception):
                await self.log.finish(reply_id, self.settings.reply_retention_s)

    async def _watch(self, reply_id: str, session_id: str | None, producer: asyncio.Task) -> None:
        """Beside a running reply: renew its session's lock lease (when it holds one); stop it when a
        cancel is asked (on any ingress replica: it is a flag, polled here), when it outlives
        ``max_reply_s``, or when the lock was lost (the store failed long enough for the lease to run out)."""
        loop = asyncio.get_running_loop()
        started = renewed = loop.time()
        while True:
            await asyncio.sleep(CANCEL_POLL_S)
            now = loop.time()
            try:
                if await self.cancels.requested(reply_id) or now - started > self.settings.max_reply_s:
                    break
                if session_id is not None and now - renewed > LOCK_LEASE_S / 3:
                    if not await self.locks.renew(turn_lock_name(session_id), reply_id, LOCK_LEASE_S):
                        break
                    renewed = now
            except Exception:  # noqa: BLE001 - the store is failing: give up once the lease is over
                if now - renewed > LOCK_LEASE_S:
                    break
        producer.cancel()

    async def _run(self, plan: TurnPlan, who: Identity, stream: ModelStream, reply_id: str):
        """Stream a turn's deltas as events; save the turn only once the reply is complete.
        A cancelled or failed reply saves nothing, so the history never holds half a turn."""
        parts: list[str] = []
        generated_ids: list[int] = []
        self.metrics.session_entered(plan.session_id)
        try:
            async for delta in masked(stream, self.moderator):
                generated_ids += delta.token_ids
                if delta.text:
                    parts.append(delta.text)
                    yield DeltaEvent(reply_id=reply_id, text=delta.text)
                if delta.finish_reason is not None:
                    usage = TokenUsage.of(delta.usage)
                    await self.limits.charge_tokens(who, usage.total_tokens)
                    if plan.save:
                        reply = Message(id=plan.reply_item_id, role="assistant", content="".join(parts))
                        turn = Turn(input=plan.input, output=reply, finish_reason=delta.finish_reason,
                                    prompt_tokens=usage.prompt_tokens, completion_tokens=usage.completion_tokens,
                                    cached_tokens=usage.prompt_tokens_details.cached_tokens, response=plan.response)
                        await call(self.dialogue.commit_turn.remote(plan.session_id, who.owner, plan, turn,
                                                                    generated_ids))
                    yield DoneEvent(reply_id=reply_id, finish_reason=delta.finish_reason, usage=usage,
                                    replica=delta.served_by)
        except Exception as exc:  # noqa: BLE001 - reported in-band
            err = to_api_error(exc)
            self.metrics.error(err.status, err.code or err.type)
            yield ErrorEvent.of(err, reply_id)
        finally:
            self.metrics.session_left(plan.session_id)

    # -- control -----------------------------------------------------------------------------------
    async def cancel(self, reply_id: str) -> None:
        await self.cancels.request(reply_id)
        task = self._producers.get(reply_id)
        if task is not None:
            task.cancel()

    async def shutdown(self, grace_s: float) -> None:
        """Graceful shutdown: let running replies finish for ``grace_s``, then cancel the rest, which
        ends their event logs (``done``, ``cancelled``) and frees their sessions' turn locks."""
        if self._producers:
            await asyncio.wait(list(self._producers.values()), timeout=grace_s)
        if self._producers:
            for task in list(self._producers.values()):
                task.cancel()
            await asyncio.wait(list(self._producers.values()), timeout=5)
