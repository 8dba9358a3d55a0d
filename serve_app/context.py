"""The context window of a session's next turn, built so the engine's prefix cache can hit.

Append-only prompts: turn N+1's prompt is turn N's prompt, then the token ids the model generated
for turn N's reply (kept with the turn), then the template text that closes the reply and opens
the new user message, e.g. for ChatML ``<|im_end|>\\n<|im_start|>user\\n{content}<|im_end|>\\n
<|im_start|>assistant\\n``. So the engine finds turn N's whole KV (prompt + reply) in its prefix
cache and prefills only the new message. Each turn stores the ids it added (``context_ids``) and the
reply's ids (``reply_ids``); the prompt is their concatenation, not a re-rendering of the history.
The separator is taken from the model's own chat template: render the last turn with and without
the new message and take the difference. If the template does not render that way (it rewrites
earlier turns, trims the reply, ...), the turn falls back to a full re-render, which is still a
correct prompt, just one the cache may not match.

Sliding the window in steps: while the prompt fits ``context_budget_tokens`` the window start stays
put. When the next prompt would exceed the budget, the oldest whole turns are dropped until it fits
in ``context_trim_fraction`` of the budget. That turn pays a full prefill (the prefix changed), and
the turns after it append to the new start and hit the cache again until the budget is reached
again. Cutting a few turns at every step would instead change the prefix, and miss, on every turn.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from engines.protocol import InvalidRequestError

from .schemas import Turn


@dataclass(frozen=True)
class ContextWindow:
    prompt_ids: list[int]
    context_ids: list[int]  # what this turn appends before its reply (stored with the turn)
    window_start: int  # index of the oldest turn in the prompt
    append_only: bool  # built by appending to the previous turn's prompt (False: re-rendered)


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
        return self.encode(self.render_text(messages))

    def reply_ids(self, generated_ids: list[int], reply_text: str) -> list[int]:
        """The ids to keep for a reply: what the model generated (its own tokenization, and the
        end-of-turn token if it produced one) when they spell the saved text, else the text encoded
        (a stop string cut the reply, so the generated ids hold text the history does not)."""
        if generated_ids and self.tokenizer.decode(generated_ids, skip_special_tokens=True) == reply_text:
            return list(generated_ids)
        return self.encode(reply_text)

    # -- the window --------------------------------------------------------------------------------
    def next_window(self, system: list[dict], turns: list[Turn], content: str) -> ContextWindow:
        new = {"role": "user", "content": content}
        start = turns[-1].window_start if turns else 0
        separator = self._separator(system, turns[-1], new) if turns else None
        if separator is not None and all(t.reply_ids and t.context_ids for t in turns[start:]):
            def build(w: int) -> tuple[list[int], list[int]]:
                if w == len(turns):
                    ids = self.render(system + [new])
                    return ids, ids
                ids = self.render(system + [{"role": "user", "content": turns[w].user}]) + turns[w].reply_ids
                for turn in turns[w + 1:]:
                    ids += turn.context_ids + turn.reply_ids
                return ids + separator, separator
            append_only = True
        else:
            def build(w: int) -> tuple[list[int], list[int]]:
                history = [m for t in turns[w:] for m in ({"role": "user", "content": t.user},
                                                          {"role": "assistant", "content": t.assistant})]
                ids = self.render(system + history + [new])
                return ids, ids
            append_only = False
        w, (prompt, added) = self._fit(start, len(turns), build)
        return ContextWindow(prompt, added, w, append_only and w == start and w < len(turns))

    def _fit(self, start: int, end: int, build: Callable[[int], tuple[list[int], list[int]]]):
        built = build(start)
        if len(built[0]) <= self.budget_tokens:
            return start, built
        fallback = None
        for w in range(start + 1, end + 1):
            built = build(w)
            if len(built[0]) <= self.trim_tokens:
                return w, built
            if fallback is None and len(built[0]) <= self.budget_tokens:
                fallback = w, built
        if fallback is not None:
            return fallback
        raise InvalidRequestError(
            f"message needs {len(built[0])} prompt tokens; the context budget is {self.budget_tokens}", "content")

    def _separator(self, system: list[dict], last: Turn, new: dict) -> list[int] | None:
        """Ids between the last reply's ids and the new message's generation prompt, or None if the
        template does not render the conversation by appending."""
        asked = system + [{"role": "user", "content": last.user}]
        before = self.render_text(asked)
        after = self.render_text(asked + [{"role": "assistant", "content": last.assistant}, new])
        reply = self.tokenizer.decode(last.reply_ids, skip_special_tokens=False) if last.reply_ids else None
        if reply is None or not after.startswith(before + reply):
            return None
        return self.encode(after[len(before) + len(reply):])
