"""Drive a load profile against the target: each runner sends requests on the profile's schedule
(``profiles.py``) through the request functions of ``client.py`` and returns every RequestRecord,
tagged with its phase (and stage, or conversation and turn). ``on_done`` sees each finished request
(the progress bar counts them)."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Callable
from dataclasses import dataclass

import httpx

from .client import Clock, chat_completion, create_session, error_kind, response_turn, session_turn
from .metrics import RequestRecord
from .profiles import ConcurrencySchedule, conversation_messages

PROMPTS = [
    "Write a short story about a lighthouse keeper.",
    "Explain how a bicycle works.",
    "Describe the water cycle to a child.",
    "List some facts about the moon.",
]

OnDone = Callable[[RequestRecord], None]


@dataclass(frozen=True)
class ChatWorkload:
    """What each stateless request asks for (``/v1/chat/completions``)."""

    model: str
    max_tokens: int
    ignore_eos: bool = True
    prompts: tuple[str, ...] = tuple(PROMPTS)

    def messages(self, i: int) -> list[dict]:
        return [{"role": "user", "content": self.prompts[i % len(self.prompts)]}]


def stage_label(schedule: ConcurrencySchedule, index: int) -> str:
    stage = schedule.stages[index]
    return f"stage {index + 1}: {stage.streams} stream{'s' if stage.streams != 1 else ''}"


async def run_closed_loop(http: httpx.AsyncClient, clock: Clock, work: ChatWorkload, schedule: ConcurrencySchedule,
                          phase: str, on_done: OnDone) -> list[RequestRecord]:
    """Stream ``i`` sends back-to-back requests while the current stage has more than ``i`` streams,
    and waits for the next stage otherwise; it stops once the schedule is over."""
    start = clock.now()
    boundaries = [start + s for s in schedule.stage_starts_s()[1:]] + [start + schedule.duration_s]
    records: list[RequestRecord] = []

    async def stream(i: int) -> None:
        sent = 0
        while True:
            index = schedule.stage_index_at(clock.now() - start)
            if index is None:
                return
            if i >= schedule.stages[index].streams:
                await asyncio.sleep(max(0.0, boundaries[index] - clock.now()) + 1e-3)
                continue
            record = await chat_completion(http, clock, work.model, work.messages(i + sent), work.max_tokens,
                                           work.ignore_eos)
            record.phase, record.stage = phase, stage_label(schedule, index)
            records.append(record)
            on_done(record)
            sent += 1

    await asyncio.gather(*[stream(i) for i in range(schedule.max_streams)])
    return records


async def run_open_loop(http: httpx.AsyncClient, clock: Clock, work: ChatWorkload, arrivals_s: list[float],
                        phase: str, on_done: OnDone) -> list[RequestRecord]:
    """Send request ``i`` at ``arrivals_s[i]`` seconds from now, whether or not earlier ones are done."""
    start = clock.now()
    records: list[RequestRecord] = []

    async def one(i: int) -> None:
        record = await chat_completion(http, clock, work.model, work.messages(i), work.max_tokens, work.ignore_eos)
        record.phase = phase
        records.append(record)
        on_done(record)

    tasks = []
    for i, at_s in enumerate(arrivals_s):
        delay = start + at_s - clock.now()
        if delay > 0:
            await asyncio.sleep(delay)
        tasks.append(asyncio.create_task(one(i)))
    await asyncio.gather(*tasks)
    return records


@dataclass(frozen=True)
class ConversationPlan:
    """Multi-turn load: ``conversations`` conversations in parallel, ``turns`` turns each, through the
    sessions API (``api="sessions"``) or a ``previous_response_id`` chain of the Responses API
    (``api="responses"``, which needs the ``model``)."""

    conversations: int
    turns: int
    user_tokens: int
    reply_tokens: int
    think_time_s: float
    seed: int = 0
    system_prompt: str | None = None
    api: str = "sessions"
    model: str | None = None


async def run_conversations(http: httpx.AsyncClient, clock: Clock, plan: ConversationPlan, reuse: bool, phase: str,
                            tag: str, on_done: OnDone) -> list[RequestRecord]:
    """Each conversation: create a session (sessions API), then send its turns one after another,
    pausing ``think_time_s`` between a reply's end and the next message; with the Responses API each
    turn names the previous response instead. Conversations start staggered over one think time. A
    failed turn ends its conversation (the server saved nothing for it, so later turns would not have
    the history this benchmark means to measure)."""
    records: list[RequestRecord] = []

    async def conversation(c: int) -> None:
        await asyncio.sleep(plan.think_time_s * c / plan.conversations)
        session_id = None
        if plan.api == "sessions":
            try:
                session_id = await create_session(http, plan.system_prompt, title=f"benchmark {tag} {c}")
            except Exception as exc:  # noqa: BLE001 - counted like a failed request
                failed = RequestRecord(start_s=clock.now(), end_s=clock.now(), error=f"session_{error_kind(exc)}",
                                       phase=phase, conversation=c, turn=0)
                records.append(failed)
                on_done(failed)
                return
        # A random opening keeps this conversation's cache entries its own (none shared with the other
        # mode's replay or an earlier run) beyond the system prompt.
        opening = f"{uuid.uuid4().hex[:8]} {tag} {c}"
        messages = conversation_messages(c, plan.turns, plan.user_tokens, plan.seed, tag=opening)
        previous = None
        for turn, content in enumerate(messages):
            if plan.api == "responses":
                record = await response_turn(http, clock, plan.model, content, plan.reply_tokens, previous,
                                             instructions=plan.system_prompt, cache_prompt=reuse, seed=plan.seed)
                previous = record.response_id
            else:
                record = await session_turn(http, clock, session_id, content, plan.reply_tokens, cache_prompt=reuse,
                                            seed=plan.seed)
            record.phase, record.conversation, record.turn = phase, c, turn
            records.append(record)
            on_done(record)
            if not record.ok:
                break
            if turn + 1 < plan.turns:
                await asyncio.sleep(plan.think_time_s)
        try:
            if session_id is not None:
                await http.delete(f"/v1/sessions/{session_id}")
        except httpx.HTTPError:
            pass

    await asyncio.gather(*[conversation(c) for c in range(plan.conversations)])
    return records
