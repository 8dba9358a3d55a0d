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

    def render(self, messages: list[dict]) -> list[int]:
        out = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
        return list(out["input_ids"] if hasattr(out, "keys") else out)

    async def prepare_turn(self, session_id: str, owner: str, content: str) -> TurnPlan:
        if not content.strip():
            raise InvalidRequestError("message content must not be empty", "content")
        if len(content) > self.settings.max_message_chars:
            raise InvalidRequestError(f"message is longer than {self.settings.max_message_chars} characters", "content")
        session = await self._owned(session_id, owner)
        system = [{"role": "system", "content": session.system_prompt}] if session.system_prompt else []
        new = [{"role": "user", "content": content}]
        budget = self.settings.context_budget_tokens
        turns = session.turns
        keep = len(turns)
        # Drop oldest whole turns until the rendering fits (binary search would save renders; the
        # histories that fit a small budget are short).
        while True:
            history = [m for t in turns[len(turns) - keep:]
                       for m in ({"role": "user", "content": t.user}, {"role": "assistant", "content": t.assistant})]
            ids = self.render(system + history + new)
            if len(ids) <= budget:
                break
            if keep == 0:
                raise InvalidRequestError(
                    f"message needs {len(ids)} prompt tokens; the context budget is {budget}", "content")
            keep -= 1
        return TurnPlan(session_id=session_id, prompt_token_ids=ids, history_turns_used=keep,
                        history_turns_dropped=len(turns) - keep)

    async def commit_turn(self, session_id: str, owner: str, turn: Turn) -> None:
        await self._owned(session_id, owner)
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
