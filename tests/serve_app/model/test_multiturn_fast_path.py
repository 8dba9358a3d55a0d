"""The multi-turn fast path end to end: prefix-cache hits on every next turn, the same tokens with
and without reuse, session affinity across two model replicas, and failover when one goes away."""

import httpx
import pytest
import ray
from ray import serve

from serve_app.app import build_graph

from ...apps import TEST_ARGS
from ..helpers import as_user, openai_client, turn

pytestmark = pytest.mark.serve

QUESTIONS = ["Name a colour.", "Name a fruit of that colour.", "Why is it that colour?", "Say it in French."]


def new_session(base_url: str) -> str:
    return httpx.post(base_url + "/v1/sessions", json={"system_prompt": "You are terse."}, headers=as_user()).json()["id"]


def test_next_turn_reuses_the_whole_previous_turn_and_matches_no_reuse(base_url):
    warm, cold = new_session(base_url), new_session(base_url)
    previous = None
    for question in QUESTIONS:
        text, done = turn(base_url, warm, question, max_tokens=20)
        cold_text, cold_done = turn(base_url, cold, question, max_tokens=20, cache_prompt=False)
        assert text == cold_text  # greedy: reuse changes nothing in the output
        assert cold_done["usage"]["prompt_tokens_details"]["cached_tokens"] == 0
        usage = done["usage"]
        if previous is not None:
            # Everything the engine computed last turn (prompt + reply but its last token) was reused.
            assert usage["prompt_tokens_details"]["cached_tokens"] >= (
                previous["prompt_tokens"] + previous["completion_tokens"] - 1)
        previous = usage


def test_openai_clients_resending_history_hit_the_cache(base_url):
    client = openai_client(base_url, "resender")
    messages = [{"role": "system", "content": "You answer in one sentence."},
                {"role": "user", "content": "What is a lighthouse?"}]
    first = client.chat.completions.create(model="smollm2-135m-instruct", messages=messages, max_tokens=24,
                                           temperature=0)
    messages += [{"role": "assistant", "content": first.choices[0].message.content},
                 {"role": "user", "content": "Who works there?"}]
    second = client.chat.completions.create(model="smollm2-135m-instruct", messages=messages, max_tokens=8,
                                            temperature=0)
    assert second.usage.prompt_tokens_details.cached_tokens >= first.usage.prompt_tokens


@pytest.fixture(scope="module")
def pair_url(base_url):
    """A second app whose ModelServer has two fixed replicas (one torch thread each)."""
    args = {**TEST_ARGS, "model": {**TEST_ARGS["model"], "num_threads": 1}}
    serve.run(build_graph(args, options={"ModelServer": {"num_replicas": 2, "autoscaling_config": None,
                                                         "ray_actor_options": {"num_cpus": 0.2}}}),
              name="pair", route_prefix="/pair")
    yield base_url + "/pair"
    serve.delete("pair")


def test_session_turns_stay_on_one_replica_and_fail_over(pair_url):
    sessions = [new_session(pair_url) for _ in range(4)]
    replica_of = {}
    for question in QUESTIONS[:3]:
        for sid in sessions:
            _, done = turn(pair_url, sid, question, max_tokens=12)
            replica_of.setdefault(sid, set()).add(done["replica"])
            if len(replica_of[sid]) == 1 and question != QUESTIONS[0]:
                assert done["usage"]["prompt_tokens_details"]["cached_tokens"] > 0
    assert all(len(replicas) == 1 for replicas in replica_of.values()), replica_of

    # Remove the replica that holds the first session: its next turn is served elsewhere.
    victim = next(iter(replica_of[sessions[0]]))
    ray.kill(ray.get_actor(f"SERVE_REPLICA::pair#ModelServer#{victim}", namespace="serve"), no_restart=True)
    text, done = turn(pair_url, sessions[0], QUESTIONS[3], max_tokens=12)
    assert done["replica"] != victim and done["finish_reason"] in ("stop", "length")
    assert httpx.get(f"{pair_url}/v1/sessions/{sessions[0]}", headers=as_user()).json()["turns"] == 4
