"""The ``DialogueState`` deployment: sessions (conversations), their history, and the prompt for
each next turn.

Sessions live in a :class:`~serve_app.dialogue.store.SessionStore` (memory by default, Redis with
``store: redis``, Redis in front of PostgreSQL with ``cold_store: postgres``) and belong to an owner:
another owner gets "not found", never someone else's session. A room is the exception: anyone with
its id may read it and talk in it; only its owner may delete or edit it. Each next prompt is built
by :class:`~serve_app.dialogue.context.PromptBuilder`, append-only from the previous turn's prompt
within the context budget (see ``context.py``); the budget follows the model's context length
unless ``context_budget_tokens`` sets it.

The Responses API lands here too: a response is a turn of the session its id names
(``schemas.new_response_id``), a ``previous_response_id`` chain continues that session (or a fork of
it, when the chain goes on from an earlier response), ``conversation`` names the session itself, and
a request with neither and ``store: false`` is a stateless turn (a prompt, nothing read or saved).
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable
from typing import Literal

from ray import serve

from engines.artifacts import load_tokenizer, resolve_model

from ..config import AppSettings, DialogueSettings
from ..errors import LimitReachedError, NotFoundError, SessionNotFoundError
from ..schemas import (
    ItemPage,
    Message,
    Session,
    SessionSummary,
    SessionView,
    StoredResponse,
    Turn,
    TurnInput,
    TurnPlan,
    response_session,
)
from .context import PromptBuilder, chat
from .conversations import find_item, fork, without_item
from .store import InMemorySessionStore, SessionStore

DEFAULT_POSTGRES_URL = "postgresql://postgres@127.0.0.1:5432/chatserve"
REPLACE_ATTEMPTS = 8
# Session ids are uuid4().hex, conversations' conv_ + uuid4().hex: nothing else reaches a store key.
SESSION_ID = re.compile(r"(conv_)?[0-9a-f]{32}")


def create_store(settings: DialogueSettings) -> SessionStore:
    """The store the settings name; its servers are contacted when it opens or at first use."""
    if settings.store == "redis":
        from ..redis_client import redis_url
        from .redis_store import RedisSessionStore

        hot = RedisSessionStore.from_url(redis_url(settings), settings.session_ttl_s, settings.redis_key_prefix)
        if settings.cold_store == "postgres":
            from .postgres_store import PostgresSessionStore
            from .tiered_store import TieredSessionStore

            url = settings.postgres_url or os.environ.get("POSTGRES_URL") or DEFAULT_POSTGRES_URL
            return TieredSessionStore(hot, PostgresSessionStore.from_url(url, settings.session_ttl_s),
                                      settings.hot_ttl_s, settings.archive_interval_s)
        return hot
    return InMemorySessionStore(settings.session_ttl_s)


def context_budget_tokens(settings: AppSettings) -> int:
    """``context_budget_tokens``, or what the engine serves per sequence (the model's context length
    unless ``max_seq_len`` says less, within the KV budget) less the default reply length."""
    if settings.dialogue.context_budget_tokens is not None:
        return settings.dialogue.context_budget_tokens
    from transformers import AutoConfig

    target = resolve_model(settings.model.model)
    model = AutoConfig.from_pretrained(target.path, gguf_file=target.gguf_file)
    engine = settings.model.engine_config()
    max_seq_len = engine.resolve_max_seq_len(getattr(model, "max_position_embeddings", None))
    return max(64, max_seq_len - engine.default_max_tokens)


class DialogueCore:
    """The dialogue logic, independent of Serve (the deployment below wraps it)."""

    def __init__(self, settings: AppSettings, store: SessionStore | None = None, tokenizer=None,
                 budget_tokens: int | None = None):
        self.settings = settings.dialogue
        self.limits = settings.limits
        self.tokenizer = tokenizer or load_tokenizer(settings.model.model)
        self.store = store or create_store(self.settings)
        self.prompts = PromptBuilder(self.tokenizer, budget_tokens or context_budget_tokens(settings),
                                     self.settings.context_trim_fraction)

    async def _owned(self, session_id: str, owner: str, allow_members: bool = True) -> Session:
        """The session if ``owner`` may use it: its owner, or anyone for a room."""
        if not SESSION_ID.fullmatch(session_id):
            raise SessionNotFoundError(f"session {session_id[:64]} not found")
        session = await self.store.get(session_id)
        if session is None or (session.owner != owner and not (session.room and allow_members)):
            raise SessionNotFoundError(f"conversation {session_id} not found")
        return session

    async def _edit(self, session_id: str, owner: str, change: Callable[[Session], Session]) -> Session:
        """Apply ``change`` to the session and write it, again from a fresh read if another write
        came in between (the store's replace is a compare and set)."""
        for _ in range(REPLACE_ATTEMPTS):
            session = await self._owned(session_id, owner, allow_members=False)
            updated = await self.store.replace(change(session))
            if updated is not None:
                return updated
        raise RuntimeError(f"conversation {session_id} kept changing; its edit was not applied")

    async def _check_room_for_a_session(self, owner: str) -> None:
        limit = self.limits.max_sessions_per_owner
        if await self.store.count_for_owner(owner) >= limit and len(await self.store.list_for_owner(owner)) >= limit:
            raise LimitReachedError(f"you have {limit} conversations, the most kept per identity; delete some first",
                                    "too_many_sessions")

    # -- sessions and conversations ----------------------------------------------------------------
    async def create_session(self, owner: str, system_prompt: str | None = None, title: str | None = None,
                             room: bool = False, metadata: dict[str, str] | None = None,
                             items: list[Message] | None = None, session_id: str | None = None) -> SessionView:
        await self._check_room_for_a_session(owner)
        session = Session(owner=owner, system_prompt=system_prompt or self.settings.default_system_prompt, title=title,
                          room=room, metadata=metadata or {}, pending=items or [])
        if session_id is not None:
            session.id = session_id
        await self.store.create(session)
        return session.view()

    async def get_session(self, session_id: str, owner: str) -> SessionView:
        return (await self._owned(session_id, owner)).view()

    async def update_metadata(self, session_id: str, owner: str, metadata: dict[str, str]) -> SessionView:
        return (await self._edit(session_id, owner, lambda s: s.model_copy(update={"metadata": metadata}))).view()

    async def delete_session(self, session_id: str, owner: str) -> None:
        await self._owned(session_id, owner, allow_members=False)
        await self.store.delete(session_id)

    async def list_sessions(self, owner: str) -> list[SessionSummary]:
        return [s.summary() for s in await self.store.list_for_owner(owner)]

    # -- conversation items ------------------------------------------------------------------------
    async def add_items(self, session_id: str, owner: str, items: list[Message]) -> list[Message]:
        """Add items after the conversation's last turn (the next turn's input begins with them)."""
        await self._owned(session_id, owner, allow_members=False)
        if await self.store.add_pending(session_id, items) is None:
            raise SessionNotFoundError(f"conversation {session_id} not found")
        return items

    async def list_items(self, session_id: str, owner: str, after: str | None, limit: int,
                         order: Literal["asc", "desc"]) -> ItemPage:
        return ItemPage.of((await self._owned(session_id, owner)).items(), after, limit, order)

    async def get_item(self, session_id: str, owner: str, item_id: str) -> Message:
        return find_item(await self._owned(session_id, owner), item_id)

    async def delete_item(self, session_id: str, owner: str, item_id: str) -> SessionView:
        return (await self._edit(session_id, owner, lambda s: without_item(s, item_id))).view()

    # -- responses -----------------------------------------------------------------------------------
    async def _response_turn(self, response_id: str, owner: str) -> tuple[Session, int]:
        missing = NotFoundError(f"response {response_id} not found", "response_not_found")
        session_id = response_session(response_id)
        if session_id is None:
            raise missing
        try:
            session = await self._owned(session_id, owner)
        except SessionNotFoundError:
            raise missing from None
        index = next((i for i, t in enumerate(session.turns) if t.response and t.response.id == response_id), None)
        if index is None:
            raise missing
        return session, index

    async def get_response(self, response_id: str, owner: str) -> StoredResponse:
        session, index = await self._response_turn(response_id, owner)
        turn = session.turns[index]
        return StoredResponse(record=turn.response, session_id=session.id,
                              turn=turn.model_copy(update={"context_ids": [], "reply_ids": []}))

    async def delete_response(self, response_id: str, owner: str) -> None:
        """The response object goes; the turn stays in its conversation's history."""
        session, _ = await self._response_turn(response_id, owner)

        def forget(s: Session) -> Session:
            turns = [t.model_copy(update={"response": None}) if t.response and t.response.id == response_id else t
                     for t in s.turns]
            return s.model_copy(update={"turns": turns})

        await self._edit(session.id, session.owner, forget)

    async def continue_from(self, response_id: str, owner: str, save: bool = True) -> tuple[str, int | None]:
        """Where the next response of a ``previous_response_id`` chain goes: (the session that holds
        the previous response, None) when it is that session's last turn; else a new fork of it, or,
        for a turn that saves nothing, (that session, how many of its turns the prompt may use)."""
        session, index = await self._response_turn(response_id, owner)
        if index == len(session.turns) - 1:
            return session.id, None
        if not save:
            return session.id, index + 1
        branch = fork(session, index, owner)
        await self.store.create(branch)
        return branch.id, None

    # -- turns -----------------------------------------------------------------------------------------
    async def prepare_turn(self, session_id: str | None, owner: str, turn: TurnInput) -> TurnPlan:
        """The prompt of the session's next turn (the input is already validated by the ingress)."""
        truncate = turn.truncation == "auto"
        param = "input" if turn.response is not None or not turn.save else "content"
        if session_id is None:
            system = [{"role": "system", "content": turn.instructions}] if turn.instructions else []
            prompt = self.prompts.stateless(system, chat(turn.messages), truncate)
            return TurnPlan(session_id=None, turn_index=0, room=False, prompt_token_ids=prompt, input=turn.messages,
                            context_ids=[], window_start=0, append_only=False, history_turns_used=0,
                            history_turns_dropped=0, response=turn.response, save=False)
        if turn.create:
            await self._check_room_for_a_session(owner)
            session = Session(id=session_id, owner=owner,
                              system_prompt=turn.instructions or self.settings.default_system_prompt)
        else:
            session = await self._owned(session_id, owner)
            if len(session.turns) >= self.limits.max_turns_per_session:
                raise LimitReachedError(f"this conversation holds {len(session.turns)} turns, the most it may; "
                                        "start a new one", "session_full")
        if turn.history_turns is not None:  # a chain going on from an earlier response, saving nothing
            session = session.model_copy(update={"turns": session.turns[: turn.history_turns], "pending": []})
        system_prompt = session.system_prompt if turn.instructions is None else turn.instructions
        system = [{"role": "system", "content": system_prompt}] if system_prompt else []
        inputs = session.pending + turn.messages
        window = self.prompts.next_window(system, session.turns, chat(inputs), truncate, param)
        return TurnPlan(session_id=session_id, turn_index=len(session.turns), room=session.room,
                        prompt_token_ids=window.prompt_ids, input=inputs, context_ids=window.context_ids,
                        window_start=window.window_start, append_only=window.append_only,
                        history_turns_used=len(session.turns) - window.window_start,
                        history_turns_dropped=window.window_start, affinity_key=session.affinity or session.id,
                        system_prompt=session.system_prompt, response=turn.response, create=turn.create,
                        save=turn.save)

    async def commit_turn(self, session_id: str, owner: str, plan: TurnPlan, turn: Turn,
                          generated_ids: list[int]) -> None:
        """Save a finished turn with the ids the next turn's prompt will be built from. If another
        turn was saved since this one's prompt was built, its ids no longer follow the stored
        history, so none are kept and the next prompt computes them from the text."""
        session = None if plan.create else await self._owned(session_id, owner)
        ids = {"context_ids": plan.context_ids, "window_start": plan.window_start,
               "reply_ids": self.prompts.reply_ids(generated_ids, turn.output.content)}
        if session is None:
            await self.store.create(Session(id=session_id, owner=owner, system_prompt=plan.system_prompt,
                                            turns=[turn.model_copy(update=ids)]))
            return
        if len(session.turns) != plan.turn_index:
            ids = {"window_start": plan.window_start}
        if await self.store.append_turn(session_id, turn.model_copy(update=ids)) is None:
            raise SessionNotFoundError(f"conversation {session_id} not found")


@serve.deployment(name="DialogueState")  # options: serve_config.yaml
class DialogueState(DialogueCore):
    """Serve wrapper: every public coroutine of :class:`DialogueCore` is callable through a handle."""

    async def __init__(self, settings: AppSettings):
        super().__init__(settings)
        await self.store.open()  # migrations and the archive sweeper of a cold tier

    async def ping(self) -> bool:
        return True

    async def __del__(self) -> None:
        """Serve calls this when the replica stops: close the store's connections."""
        await self.store.close()
