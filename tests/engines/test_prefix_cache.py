"""Prefix KV reuse: same tokens as without reuse, bounded by its budget."""

import pytest

from engines.config import EngineConfig
from engines.prefix_cache import PrefixCache
from engines.protocol import GenerationRequest, SamplingParams
from engines.registry import create_engine

from .helpers import collect


@pytest.fixture(scope="module")
def reuse_engine(artifact_dir):
    eng = create_engine(EngineConfig(model=artifact_dir, dtype="float32", num_threads=2, prefix_cache_tokens=4096))
    eng.start()
    yield eng
    eng.shutdown()


def turn(messages, max_tokens=24):
    return GenerationRequest(messages=tuple(messages), sampling=SamplingParams(temperature=0.0, max_tokens=max_tokens))


async def test_multiturn_reuse_is_token_identical(reuse_engine, engine):
    messages = [{"role": "user", "content": "Name three rivers in Europe."}]
    for i in range(3):
        with_reuse, tokens, deltas = await collect(reuse_engine, turn(messages))
        without, base_tokens, _ = await collect(engine, turn(messages))
        assert tokens == base_tokens
        if i > 0:
            assert deltas[-1].usage.cached_prompt_tokens > 20
        messages += [{"role": "assistant", "content": with_reuse}, {"role": "user", "content": f"And {i + 2} more?"}]
    stats = reuse_engine.stats()
    assert stats.prefix_cache_hits >= 2 and stats.prefix_cache_reused_tokens > 40
    assert 0 < stats.prefix_cache_tokens <= stats.prefix_cache_budget_tokens


def kv(n):
    import torch

    return [(torch.zeros(1, n, 2), torch.zeros(1, n, 2))]


def test_lru_eviction_keeps_within_budget():
    cache = PrefixCache(budget_tokens=100, min_reuse_tokens=4)
    cache.insert(list(range(0, 40)), kv(40))
    cache.insert(list(range(100, 140)), kv(40))
    assert cache.lookup(list(range(0, 30)) + [999]) is not None  # touch the first: now most recent
    cache.insert(list(range(200, 240)), kv(40))  # over budget: evicts the least recent (100..)
    assert cache.used_tokens == 80 <= cache.budget_tokens
    assert cache.lookup(list(range(100, 120)) + [999]) is None
    assert cache.lookup(list(range(0, 20)) + [999])[0] == 20


def test_longer_entry_supersedes_its_prefix_and_one_token_is_left_to_prefill():
    cache = PrefixCache(budget_tokens=1000, min_reuse_tokens=4)
    cache.insert(list(range(10)), kv(10))
    cache.insert(list(range(20)), kv(20))
    assert len(cache) == 1 and cache.used_tokens == 20
    length, _ = cache.lookup(list(range(20)))
    assert length == 19
