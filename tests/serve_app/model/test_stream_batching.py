"""A busy model replica sends a stream's tokens in groups at most every interval; the first token and
the last delta are never held, and nothing is lost or reordered."""

from engines.protocol import Delta, Usage
from serve_app.model.deployment import coalesced


class Clock:
    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now


async def steps(clock: Clock, step_s: float, n: int):
    """A stream of ``n`` one-token deltas, one per engine step of ``step_s``; the last one finishes."""
    for i in range(n):
        clock.now += step_s
        last = i == n - 1
        yield Delta("r", f"t{i} ", (i,), finish_reason="length" if last else None, usage=Usage(3, n) if last else None)


async def test_a_busy_replica_groups_tokens_and_loses_none():
    clock = Clock()
    out = [d async for d in coalesced(steps(clock, 0.02, 12), interval_s=0.05, busy=lambda: True, clock=clock)]
    assert out[0].token_ids == (0,)  # the first token at once
    assert out[-1].finish_reason == "length" and out[-1].usage.completion_tokens == 12
    assert [t for d in out for t in d.token_ids] == list(range(12))
    assert "".join(d.text for d in out) == "".join(f"t{i} " for i in range(12))
    assert len(out) <= 6  # 12 tokens every 20 ms, sent at most every 50 ms


async def test_a_quiet_replica_sends_every_token():
    clock = Clock()
    out = [d async for d in coalesced(steps(clock, 0.02, 12), interval_s=0.05, busy=lambda: False, clock=clock)]
    assert [d.token_ids for d in out] == [(i,) for i in range(12)]
