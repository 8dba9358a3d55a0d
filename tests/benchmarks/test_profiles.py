"""Load profiles: the schedules themselves, and the runners keeping to them against a fake server."""

import asyncio
import json

import httpx
import numpy as np
import pytest

from benchmarks.client import Clock
from benchmarks.profiles import ConcurrencySchedule, Stage, conversation_messages, poisson_arrivals
from benchmarks.runners import ChatWorkload, run_closed_loop, run_open_loop


def test_step_schedule_parses_and_answers_streams_over_time():
    schedule = ConcurrencySchedule.parse("1:30,32:90,1:60")
    assert schedule.stages == (Stage(1, 30), Stage(32, 90), Stage(1, 60))
    assert schedule.duration_s == 180 and schedule.max_streams == 32
    assert schedule.stage_starts_s() == [0, 30, 120]
    assert [schedule.streams_at(t) for t in (0, 29.9, 30, 119.9, 120, 179.9, 180)] == [1, 1, 32, 32, 1, 1, 0]
    assert schedule.stage_index_at(180) is None


@pytest.mark.parametrize("bad", ["32", "a:3", "4:0", "-1:5"])
def test_bad_stages_are_rejected(bad):
    with pytest.raises(ValueError):
        ConcurrencySchedule.parse(bad)


def test_poisson_arrivals_rate_spacing_and_seed():
    times = poisson_arrivals(rate_rps=20, duration_s=100, seed=1)
    assert all(0 < t < 100 for t in times) and times == sorted(times)
    assert len(times) == pytest.approx(2000, rel=0.1)
    gaps = np.diff(times)
    assert gaps.mean() == pytest.approx(1 / 20, rel=0.1)
    assert gaps.std() == pytest.approx(gaps.mean(), rel=0.15)  # exponential: std == mean
    assert poisson_arrivals(20, 100, seed=1) == times and poisson_arrivals(20, 100, seed=2) != times


def test_conversations_repeat_by_seed_and_differ_only_in_the_tag():
    a = conversation_messages(3, turns=4, user_tokens=50, seed=7, tag="x1")
    b = conversation_messages(3, turns=4, user_tokens=50, seed=7, tag="y2")
    assert len(a) == 4 and a[0].startswith("[x1] ") and b[0].startswith("[y2] ")
    assert a[1:] == b[1:] and a[0][5:] == b[0][5:]
    assert conversation_messages(4, turns=4, user_tokens=50, seed=7) != a
    assert len(a[2].split()) == 50 - 8 + 5  # words plus "Turn 3. Summarize these words:"


def fake_server(reply_s: float, log: list):
    """An OpenAI streaming endpoint that takes ``reply_s`` per reply and logs (start, end, in flight)."""
    state = {"in_flight": 0}

    async def handler(request: httpx.Request) -> httpx.Response:
        state["in_flight"] += 1
        log.append(("start", asyncio.get_running_loop().time(), state["in_flight"]))

        async def body():
            yield b'data: {"choices":[{"delta":{"content":"hi"}}]}\n\n'
            await asyncio.sleep(reply_s)
            state["in_flight"] -= 1  # the reply is complete; the client may stop reading after [DONE]
            yield b'data: {"choices":[{"delta":{"content":" there"}}]}\n\n'
            usage = {"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5}
            yield ("data: " + json.dumps({"choices": [], "usage": usage}) + "\n\n").encode()
            yield b"data: [DONE]\n\n"

        return httpx.Response(200, content=body(), headers={"content-type": "text/event-stream"})

    return httpx.AsyncClient(transport=httpx.MockTransport(handler), base_url="http://fake")


async def test_closed_loop_follows_the_step_schedule():
    log: list = []
    async with fake_server(0.05, log) as http:
        schedule = ConcurrencySchedule.parse("1:0.4,4:0.6,1:0.4")
        clock = Clock()
        records = await run_closed_loop(http, clock, ChatWorkload("m", 2), schedule, "step", lambda r: None)
    assert all(r.ok and r.output_tokens == 2 for r in records)
    by_stage = {s: [r for r in records if r.stage == s] for s in dict.fromkeys(r.stage for r in records)}
    assert list(by_stage) == ["stage 1: 1 stream", "stage 2: 4 streams", "stage 3: 1 stream"]
    # Concurrency seen by the server: never above 4, 4 reached in the high stage, 1 in the low ones.
    assert max(n for _, _, n in log) == 4
    t0 = log[0][1]
    low = [n for _, t, n in log if t - t0 < 0.35 or t - t0 > 1.15]
    assert low and max(low) == 1
    # Closed loop: ~0.4 s / ~0.055 s per request in a 1-stream stage, 4x that in the 4-stream stage.
    assert 2 <= len(by_stage["stage 1: 1 stream"]) <= 8
    assert len(by_stage["stage 2: 4 streams"]) >= 3 * len(by_stage["stage 1: 1 stream"])


async def test_open_loop_sends_at_the_arrival_times_whatever_the_server_speed():
    log: list = []
    arrivals = [0.0, 0.05, 0.1, 0.3]
    async with fake_server(0.5, log) as http:  # replies slower than arrivals: they must overlap
        records = await run_open_loop(http, Clock(), ChatWorkload("m", 2), arrivals, "poisson", lambda r: None)
    starts = sorted(r.start_s for r in records)
    assert np.allclose(np.asarray(starts) - starts[0], arrivals, atol=0.03)
    assert max(n for _, _, n in log) == 4
