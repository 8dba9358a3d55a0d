"""Conversation items on a session, as pure functions: one item, a session without one item, a fork
of a response chain. (A page of items: ``schemas.ItemPage.of``.)

Deleting an item keeps the history a list of answered turns: an input message leaves its turn; a
reply takes its turn with it, and that turn's remaining input opens the next turn (or becomes
pending again). The token ids of the turns around the change are dropped, so the next prompt
computes them again from the text (``context.py``).
"""

from __future__ import annotations

from ..errors import NotFoundError
from ..schemas import Message, Session, Turn


def find_item(session: Session, item_id: str) -> Message:
    item = next((m for m in session.items() if m.id == item_id), None)
    if item is None:
        raise NotFoundError(f"item {item_id} not found in conversation {session.id}", "item_not_found")
    return item


def without_item(session: Session, item_id: str) -> Session:
    """The session with item ``item_id`` removed (404 if it has none)."""
    find_item(session, item_id)
    turns = [t.model_copy(deep=True) for t in session.turns]
    pending = [m for m in session.pending if m.id != item_id]
    for i, turn in enumerate(turns):
        if turn.output.id == item_id:  # the reply goes, and its turn with it
            del turns[i]
            carried = list(turn.input)
            if i < len(turns):
                turns[i].input = carried + turns[i].input
            else:
                pending = carried + pending
            for later in turns[i:]:
                later.window_start = max(0, later.window_start - (later.window_start > i))
            _forget_ids(turns, i)
            break
        if any(m.id == item_id for m in turn.input):
            turn.input = [m for m in turn.input if m.id != item_id]
            _forget_ids(turns, i)
            _forget_ids(turns, i + 1)
            break
    return session.model_copy(update={"turns": turns, "pending": pending})


def _forget_ids(turns: list[Turn], i: int) -> None:
    if i < len(turns):
        turns[i].context_ids = []


def fork(session: Session, through: int, owner: str) -> Session:
    """A new session holding ``session``'s turns up to and including turn ``through`` (a response
    chain continued from an earlier response). Its model replica key stays the original's, so the
    fork's first turn finds the shared prefix in the same replica's cache."""
    turns = [t.model_copy(update={"response": None}) for t in session.turns[: through + 1]]
    return Session(owner=owner, system_prompt=session.system_prompt, title=session.title, room=False,
                   affinity=session.affinity or session.id, turns=turns)
