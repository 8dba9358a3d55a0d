"""The context window of a session's next turn, built so the engine's prefix cache can hit.

Append-only prompts: turn N+1's prompt is turn N's prompt, then the token ids the model generated
for turn N's reply (kept with the turn), then the template text that closes the reply and opens the
new input, e.g. for ChatML ``<|im_end|>\\n<|im_start|>user\\n{content}<|im_end|>\\n<|im_start|>
assistant\\n``. So the engine finds turn N's whole KV (prompt + reply) in its prefix cache and
prefills only the new input. Each turn stores that separator (``context_ids``: what it added between
the previous reply and its own) and its reply's ids (``reply_ids``); the prompt is the first turn of
the window rendered, then every later turn's separator and reply ids, then the new separator: a
concatenation, not a re-rendering of the history. A turn's input may be several messages (the
Responses API, conversation items added since the last reply). The separator is taken from the
model's own chat template: render the previous turn with and without the next input and take the
difference; a turn whose ids are missing (its items were edited) gets them computed again the same
way. If the template does not render that way (it rewrites earlier turns, trims the reply, ...), the
prompt is re-rendered from the text, which is still a correct prompt, just one the cache may not match.

Client text never becomes control tokens: every rendering goes through ``engines/chat_template.py``,
which tokenizes message contents with special tokens split (a message saying ``<|im_end|>`` stays
those characters). Reply ids are the model's own and are kept as they are.

Sliding the window in steps: while the prompt fits ``context_budget_tokens`` the window start stays
put. When the next prompt would exceed the budget, the oldest whole turns are dropped until it fits
in ``context_trim_fraction`` of the budget. That turn pays a full prefill (the prefix changed), and
the turns after it append to the new start and hit the cache again until the budget is reached
again. Cutting a few turns at every step would instead change the prefix, and miss, on every turn.
With ``truncate=False`` (the Responses API's ``truncation: disabled``) nothing is dropped: a history
over the budget is an error.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass

from engines.chat_template import encode_chat, encode_marked, render_marked
from engines.protocol import InvalidRequestError

from ..schemas import Message, Turn


@dataclass(frozen=True)
class ContextWindow:
    prompt_ids: list[int]
    context_ids: list[int]  # the separator from the previous reply to this turn's reply (stored with the turn)
    window_start: int  # index of the oldest turn in the prompt
    append_only: bool  # extends the previous turn's prompt and reply (False: re-rendered or re-started)


def chat(messages: list[Message]) -> list[dict]:
    """Messages as the chat template reads them (``developer`` is the template's ``system``)."""
    return [{"role": "system" if m.role == "developer" else m.role, "content": m.content} for m in messages]


class _TextOnly(Exception):
    """The template does not render this history by appending."""


class PromptBuilder:
    def __init__(self, tokenizer, budget_tokens: int, trim_fraction: float):
        self.tokenizer = tokenizer
        self.budget_tokens = budget_tokens
        self.trim_tokens = max(1, int(budget_tokens * trim_fraction))

    # -- rendering ---------------------------------------------------------------------------------
    def render_text(self, messages: list[dict]) -> str:
        return self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)

    def encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=False)

    def render(self, messages: list[dict]) -> list[int]:
        return encode_chat(self.tokenizer, messages)

    def reply_ids(self, generated_ids: list[int], reply_text: str) -> list[int]:
        """The ids to keep for a reply: what the model generated (its own tokenization, and the
        end-of-turn token if it produced one) when they spell the saved text, else the text encoded
        (a stop string cut the reply, so the generated ids hold text the history does not)."""
        if generated_ids and self.tokenizer.decode(generated_ids, skip_special_tokens=True) == reply_text:
            return list(generated_ids)
        return self.encode(reply_text)

    def _reply(self, turn: Turn) -> list[int]:
        return turn.reply_ids or self.encode(turn.output.content)

    # -- the window --------------------------------------------------------------------------------
    def next_window(self, system: list[dict], turns: list[Turn], new: list[dict], truncate: bool = True,
                    param: str = "content") -> ContextWindow:
        """The prompt for ``new`` (chat messages) after ``turns``; ``system``: the system message, if any."""
        start = turns[-1].window_start if turns and truncate else 0
        separators: dict[int, list[int] | None] = {}

        def separator(i: int) -> list[int]:
            """Ids between turn i-1's reply and turn i's (i == len(turns): the new input's)."""
            if i not in separators:
                stored = turns[i].context_ids if i < len(turns) else None
                added = chat(turns[i].input) if i < len(turns) else new
                separators[i] = stored or self._separator(system, turns[i - 1], added)
            if separators[i] is None:
                raise _TextOnly
            return separators[i]

        def appended(w: int) -> list[int]:
            if w == len(turns):
                return self.render(system + new)
            ids = self.render(system + chat(turns[w].input)) + self._reply(turns[w])
            for i in range(w + 1, len(turns)):
                ids += separator(i) + self._reply(turns[i])
            return ids + separator(len(turns))

        def rendered(w: int) -> list[int]:
            return self.render(system + [m for t in turns[w:] for m in chat(t.items())] + new)

        try:
            context_ids = separator(len(turns)) if turns else []
            build, append_only = appended, True
            w, prompt = self._fit(start, len(turns), build, truncate, param)
        except _TextOnly:
            context_ids, build, append_only = [], rendered, False
            w, prompt = self._fit(start, len(turns), build, truncate, param)
        return ContextWindow(prompt, context_ids, w, append_only and w == start and w < len(turns))

    def _fit(self, start: int, end: int, build: Callable[[int], list[int]], truncate: bool, param: str
             ) -> tuple[int, list[int]]:
        built = build(start)
        if len(built) <= self.budget_tokens:
            return start, built
        if not truncate:
            raise InvalidRequestError(
                f"the conversation needs {len(built)} prompt tokens; the context budget is {self.budget_tokens} "
                "and truncation is 'disabled' (truncation 'auto' drops the oldest turns)", param)
        fallback = None
        for w in range(start + 1, end + 1):
            built = build(w)
            if len(built) <= self.trim_tokens:
                return w, built
            if fallback is None and len(built) <= self.budget_tokens:
                fallback = w, built
        if fallback is not None:
            return fallback
        raise InvalidRequestError(
            f"message needs {len(built)} prompt tokens; the context budget is {self.budget_tokens}", param)

    def stateless(self, system: list[dict], messages: list[dict], truncate: bool, param: str = "input") -> list[int]:
        """The prompt of a turn with no stored history: the messages given, rendered. ``truncate``
        drops the oldest non-system messages (never the last) until the prompt fits the budget."""
        messages = list(messages)
        prompt = self.render(system + messages)
        while truncate and len(prompt) > self.budget_tokens and len(messages) > 1:
            first = next((i for i, m in enumerate(messages[:-1]) if m["role"] != "system"), None)
            if first is None:
                break
            del messages[first]
            prompt = self.render(system + messages)
        if len(prompt) > self.budget_tokens:
            raise InvalidRequestError(f"input needs {len(prompt)} prompt tokens; the context budget is "
                                      f"{self.budget_tokens}", param)
        return prompt

    def _separator(self, system: list[dict], last: Turn, new: list[dict]) -> list[int] | None:
        """Ids between the last reply's ids and the new input's generation prompt, or None if the
        template does not render the conversation by appending."""
        asked = system + chat(last.input)
        before = self.render_text(asked)
        conversation = asked + chat([last.output]) + new
        after = self.render_text(conversation)
        reply = self.tokenizer.decode(self._reply(last), skip_special_tokens=False)
        if not after.startswith(before + reply):
            return None
        # The ids of after[len(before) + len(reply):], with the new messages' text tokenized with
        # control tokens split (engines/chat_template.py): the marked rendering of the same
        # conversation, past the reply's marker and the part of the reply that is template text
        # (its end-of-turn token), checked to spell the same text once the contents are put back.
        marked, nonce = render_marked(self.tokenizer, conversation)
        _, found, tail = marked.partition(f"\ue000{nonce}{len(asked)}\ue001")
        content = conversation[len(asked)]["content"]
        if not found or not reply.startswith(content) or "\ue000" in tail[: len(reply) - len(content)]:
            return None
        tail = tail[len(reply) - len(content):]
        spelled = re.sub(f"\ue000{nonce}(\\d+)\ue001", lambda m: conversation[int(m.group(1))]["content"], tail)
        if spelled != after[len(before) + len(reply):]:
            return None
        return encode_marked(self.tokenizer, tail, nonce, conversation)
