"""Session affinity ranking (serve_app/routing.py): stable, balanced, and load-aware."""

from collections import Counter

from serve_app.model.routing import rank_by_affinity

REPLICAS = ["r-a", "r-b", "r-c"]
IDLE = {r: 0 for r in REPLICAS}


def preferred(key: str, replicas=REPLICAS, queue_lens=None) -> str:
    ranks = rank_by_affinity(key, replicas, queue_lens or {r: 0 for r in replicas}, imbalance_threshold=8)
    return ranks[0][0]


def test_a_key_always_prefers_the_same_replica_and_keys_spread_evenly():
    keys = [f"session-{i}" for i in range(3000)]
    assert [preferred(k) for k in keys] == [preferred(k) for k in keys]
    counts = Counter(preferred(k) for k in keys)
    assert set(counts) == set(REPLICAS) and min(counts.values()) > 850  # 1000 each ± sampling noise


def test_removing_a_replica_moves_only_its_own_sessions():
    keys = [f"session-{i}" for i in range(600)]
    before = {k: preferred(k) for k in keys}
    after = {k: preferred(k, ["r-a", "r-b"]) for k in keys}
    assert all(after[k] == before[k] for k in keys if before[k] != "r-c")
    assert {after[k] for k in keys if before[k] == "r-c"} == {"r-a", "r-b"}


def test_an_overloaded_preferred_replica_is_ranked_last():
    key = "session-7"
    home = preferred(key)
    others = [r for r in REPLICAS if r != home]
    busy = {**IDLE, home: 20}
    ranks = rank_by_affinity(key, REPLICAS, busy, imbalance_threshold=8)
    assert ranks == [others, [home]] or ranks == [others[::-1], [home]]
    # Within the threshold, or with unknown queue lengths, affinity wins.
    assert rank_by_affinity(key, REPLICAS, {**IDLE, home: 8}, imbalance_threshold=8)[0] == [home]
    assert rank_by_affinity(key, REPLICAS, {r: None for r in REPLICAS}, imbalance_threshold=8)[0] == [home]
