"""Dialogue-state deployment: sessions, their history, and the prompt for each next turn.

How the context window works: the next prompt is the chat-template rendering of the system prompt,
as many of the newest *whole* turns as fit, and the new user message, counted with the model's own
tokenizer and template against ``context_budget_tokens``. Older turns are dropped first; a turn is
never cut in half. A new message that does not fit even with no history is rejected.
"""

from __future__ import annotations

import logging

from ray import serve

from engines.artifacts import load_tokenizer
from engines.protocol import InvalidRequestError

from .config import AppSettings
from .context import PromptBuilder
from .schemas import Session, Turn, TurnPlan
from .store import SessionStore, create_store

logger = logging.getLogger("ray.serve")


class SessionNotFoundError(LookupError):
    pass


class DialogueCore:
    """The dialogue logic, independent of Serve (the deployment below wraps it)."""

    def __init__(self, settings: AppSettings, store: SessionStore | None = None, tokenizer=None):
        self.settings = settings.dialogue
        self.tokenizer = tokenizer or load_tokenizer(settings.model.model)
        self.store = store or create_store(self.settings)
        self.prompts = PromptBuilder(self.tokenizer, self.settings.context_budget_tokens,
                                     self.settings.context_trim_fraction)

    async def _owned(self, session_id: str, owner: str) -> Session:
        session = await self.store.get(session_id)
        if session is None or session.owner != owner:
            raise SessionNotFoundError(f"session {session_id} not found")
        return session

    async def create_session(self, owner: str, system_prompt: str | None = None, title: str | None = None) -> dict:
        session = Session(owner=owner, system_prompt=system_prompt or self.settings.default_system_prompt, title=title)
        await self.store.create(session)
        return session.view()

    async def get_session(self, session_id: str, owner: str) -> dict:
        return (await self._owned(session_id, owner)).view()

    async def delete_session(self, session_id: str, owner: str) -> None:
        await self._owned(session_id, owner)
        await self.store.delete(session_id)

    async def list_sessions(self, owner: str) -> list[dict]:
        return [s.summary() for s in await self.store.list_for_owner(owner)]

    async def prepare_turn(self, session_id: str, owner: str, content: str) -> TurnPlan:
        if not content.strip():
            raise InvalidRequestError("message content must not be empty", "content")
        if len(content) > self.settings.max_message_chars:
            raise InvalidRequestError(f"message is longer than {self.settings.max_message_chars} characters", "content")
        session = await self._owned(session_id, owner)
        system = [{"role": "system", "content": session.system_prompt}] if session.system_prompt else []
        window = self.prompts.next_window(system, session.turns, content)
        return TurnPlan(session_id=session_id, turn_index=len(session.turns), prompt_token_ids=window.prompt_ids, context_ids=window.context_ids,
                        window_start=window.window_start, append_only=window.append_only,
                        history_turns_used=len(session.turns) - window.window_start,
                        history_turns_dropped=window.window_start)

    async def commit_turn(self, session_id: str, owner: str, plan: TurnPlan, turn: Turn,
                          generated_ids: list[int]) -> None:
        """Save a finished turn with the ids the next turn's prompt will be built from. If another
        turn was saved since this one's prompt was built, its ids no longer follow the stored
        history, so none are kept and the next prompt is re-rendered from the text."""
        session = await self._owned(session_id, owner)
        if len(session.turns) == plan.turn_index:
            turn = turn.model_copy(update={"context_ids": plan.context_ids, "window_start": plan.window_start,
                                           "reply_ids": self.prompts.reply_ids(generated_ids, turn.assistant)})
        else:
            turn = turn.model_copy(update={"window_start": plan.window_start})
        updated = await self.store.append_turn(session_id, turn)
        if updated is None:
            raise SessionNotFoundError(f"session {session_id} not found")


@serve.deployment(name="DialogueState", ray_actor_options={"num_cpus": 0.1}, max_ongoing_requests=256)
class DialogueState(DialogueCore):
    """Serve wrapper: every public coroutine of :class:`DialogueCore` is callable through a handle."""

    def __init__(self, settings: AppSettings):
        super().__init__(settings)

    async def ping(self) -> bool:
        return True
