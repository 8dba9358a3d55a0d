"""Load profiles: *when* requests are sent, separate from *how* (``client.py``) and *what is measured*
(``metrics.py``).

- **Closed loop** (``ConcurrencySchedule``): N streams, each sends its next request as soon as its
  previous one ends. Steady load is one stage; the **step** profile is several (``1:30,32:90,1:90`` =
  1 stream for 30 s, 32 for 90 s, 1 for 90 s). When a stage lowers the count, the streams above it
  finish the request they are in and stop; none is cut off.
- **Open loop** (``poisson_arrivals``): requests arrive at exponentially distributed intervals at a
  mean rate, whatever the server's speed, so queueing shows up as latency (seeded, reproducible).
- **Multi-turn** (``conversation_messages``): each conversation is a sequence of user messages of a
  fixed token length, sent through the sessions API one after another with a think time between.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Stage:
    streams: int
    duration_s: float

    @property
    def label(self) -> str:
        return f"{self.streams} streams"


@dataclass(frozen=True)
class ConcurrencySchedule:
    """Closed-loop streams over time: a sequence of stages run back to back."""

    stages: tuple[Stage, ...]

    @classmethod
    def steady(cls, streams: int, duration_s: float) -> ConcurrencySchedule:
        return cls((Stage(streams, duration_s),))

    @classmethod
    def parse(cls, text: str) -> ConcurrencySchedule:
        """``1:30,32:90,1:90`` -> stages of (streams, seconds)."""
        stages = []
        for item in text.split(","):
            streams, _, seconds = item.partition(":")
            try:
                stage = Stage(int(streams), float(seconds))
            except ValueError:
                raise ValueError(f"bad stage {item!r}: use STREAMS:SECONDS, e.g. 1:30,32:90,1:90") from None
            if stage.streams < 0 or stage.duration_s <= 0:
                raise ValueError(f"bad stage {item!r}: streams >= 0 and seconds > 0")
            stages.append(stage)
        return cls(tuple(stages))

    @property
    def duration_s(self) -> float:
        return sum(s.duration_s for s in self.stages)

    @property
    def max_streams(self) -> int:
        return max(s.streams for s in self.stages)

    def stage_index_at(self, t_s: float) -> int | None:
        """The stage running ``t_s`` seconds after the start (None once the schedule is over)."""
        end = 0.0
        for i, stage in enumerate(self.stages):
            end += stage.duration_s
            if t_s < end:
                return i
        return None

    def streams_at(self, t_s: float) -> int:
        i = self.stage_index_at(t_s)
        return 0 if i is None else self.stages[i].streams

    def stage_starts_s(self) -> list[float]:
        return np.concatenate([[0.0], np.cumsum([s.duration_s for s in self.stages])[:-1]]).tolist()


def poisson_arrivals(rate_rps: float, duration_s: float, seed: int = 0) -> list[float]:
    """Send times (seconds from the start, all < ``duration_s``) of a Poisson process at ``rate_rps``."""
    if rate_rps <= 0 or duration_s <= 0:
        raise ValueError("rate_rps and duration_s must be > 0")
    rng = np.random.default_rng(seed)
    expected = rate_rps * duration_s
    gaps = rng.exponential(1.0 / rate_rps, size=int(expected + 10 * np.sqrt(expected) + 10))
    times = np.cumsum(gaps)
    while times[-1] < duration_s:  # practically never: extend rather than truncate the process
        times = np.concatenate([times, times[-1] + np.cumsum(rng.exponential(1.0 / rate_rps, size=len(times)))])
    return times[times < duration_s].tolist()


# Words that are one token each for SmolLM2's tokenizer (and common BPE vocabularies), so a message of
# N words is about N tokens. The server's usage reports the real count.
WORDS = (
    "time year people way day man thing woman life child world school state family student group country "
    "problem hand part place case week company system program question work government number night point "
    "home water room mother area money story fact month lot right study book eye job word business issue "
    "side kind head house service friend father power hour game line end member law car city community name "
    "team minute idea body information back parent face level office door health person art war history "
    "party result change morning reason research girl moment air teacher force education river garden window "
    "light music market table paper road tree bird summer winter field letter voice color"
).split()


def conversation_messages(conversation: int, turns: int, user_tokens: int, seed: int = 0,
                          tag: str = "") -> list[str]:
    """The user messages of one conversation: ``turns`` messages of about ``user_tokens`` tokens.

    The words depend on (seed, conversation) only, so the same conversation replayed with prefix reuse
    on and off has the same history length; ``tag`` opens the first message so that two replays never
    share a cached prefix beyond the system prompt."""
    rng = random.Random(f"{seed}:{conversation}")
    messages = []
    for turn in range(turns):
        # The fixed words around them take about 8 tokens.
        words = " ".join(rng.choice(WORDS) for _ in range(max(1, user_tokens - 8)))
        opening = f"[{tag}] " if tag and turn == 0 else ""
        messages.append(f"{opening}Turn {turn + 1}. Summarize these words: {words}")
    return messages
