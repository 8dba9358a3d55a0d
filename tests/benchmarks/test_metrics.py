"""Metric definitions on synthetic timestamps whose answers are known by hand."""

import math

import pytest

from benchmarks.metrics import RequestRecord, Slo, multiturn_summary, summarize, time_series


def request(start: float, first: float, tokens: int, gap: float, tail: float = 0.01, **kw) -> RequestRecord:
    """A reply of ``tokens`` tokens, one per chunk: first chunk at ``first``, then one every ``gap``."""
    chunks = [first + i * gap for i in range(tokens)]
    return RequestRecord(start_s=start, end_s=chunks[-1] + tail, chunk_times_s=chunks, prompt_tokens=10,
                         output_tokens=tokens, **kw)


def test_per_request_ttft_tpot_itl_e2e():
    r = request(start=1.0, first=1.5, tokens=5, gap=0.1)
    assert r.ttft_s == pytest.approx(0.5)
    assert r.tpot_s == pytest.approx(0.1)  # (last - first) / (tokens - 1)
    assert r.itl_s == pytest.approx([0.1] * 4)
    assert r.e2e_s == pytest.approx(0.5 + 0.4 + 0.01)


def test_tpot_uses_usage_tokens_when_a_chunk_carries_several():
    # 3 chunks carrying 7 tokens (server held text back): TPOT spreads over tokens, ITL stays per chunk.
    r = RequestRecord(start_s=0.0, end_s=1.3, chunk_times_s=[0.2, 0.8, 1.4], output_tokens=7)
    assert r.tpot_s == pytest.approx(1.2 / 6)
    assert r.itl_s == pytest.approx([0.6, 0.6])


def test_one_token_reply_has_no_tpot_and_failed_request_has_no_metrics():
    assert request(0, 0.2, tokens=1, gap=0).tpot_s is None
    failed = RequestRecord(start_s=0, end_s=1, error="http_503")
    assert failed.ttft_s is None and failed.tpot_s is None and not failed.ok


def test_summary_percentiles_throughput_and_errors():
    ttfts = [0.1, 0.2, 0.3, 0.4, 1.0]
    records = [request(start=i, first=i + t, tokens=11, gap=0.05) for i, t in enumerate(ttfts)]
    records += [RequestRecord(start_s=0, end_s=0.1, error="http_503", error_detail="overloaded"),
                RequestRecord(start_s=0, end_s=0.1, error="http_503"),
                RequestRecord(start_s=0, end_s=9, error="timeout")]
    s = summarize(records, duration_s=10.0)
    assert (s["requests"], s["completed"], s["failed"]) == (8, 5, 3)
    assert s["errors"] == {"http_503": 2, "timeout": 1}
    assert s["error_examples"]["http_503"] == "overloaded"
    assert s["request_throughput_rps"] == pytest.approx(0.5)
    assert s["output_throughput_tok_s"] == pytest.approx(5 * 11 / 10)
    assert s["total_prompt_tokens"] == 50
    assert s["ttft_s"]["p50"] == pytest.approx(0.3)
    assert s["ttft_s"]["mean"] == pytest.approx(0.4)
    assert s["ttft_s"]["p90"] == pytest.approx(0.4 + 0.6 * 0.6)  # linear interpolation between 0.4 and 1.0
    assert s["tpot_s"]["p99"] == pytest.approx(0.05)
    assert s["itl_s"]["p50"] == pytest.approx(0.05)
    assert "goodput_rps" not in s


def test_goodput_counts_requests_meeting_every_slo():
    fast = request(0, 0.1, tokens=5, gap=0.05)
    slow_first_token = request(0, 2.0, tokens=5, gap=0.05)
    slow_decode = request(0, 0.1, tokens=5, gap=0.5)
    failed = RequestRecord(start_s=0, end_s=0.1, error="http_503")
    slo = Slo.parse("ttft_ms=500,tpot_ms=100")
    assert slo == Slo(ttft_s=0.5, tpot_s=0.1)
    assert [slo.met_by(r) for r in (fast, slow_first_token, slow_decode, failed)] == [True, False, False, False]
    s = summarize([fast, slow_first_token, slow_decode, failed], duration_s=2.0, slo=slo)
    assert s["goodput_rps"] == pytest.approx(0.5)
    assert s["slo_attainment"] == pytest.approx(0.25)
    assert Slo.parse("e2e_ms=400").met_by(fast) is True and Slo.parse("e2e_ms=300").met_by(fast) is False


@pytest.mark.parametrize("bad", ["ttft=5", "ttft_ms", "latency_ms=3", "ttft_ms=abc"])
def test_bad_slo_is_rejected(bad):
    with pytest.raises(ValueError):
        Slo.parse(bad)


def test_time_series_spreads_usage_tokens_over_chunks_and_counts_in_flight():
    # Request A: 0-4 s, 4 chunks at 1.5, 2.5, 3.5, 3.9 carrying 8 tokens; request B: 2-3 s, 1 chunk, 2 tokens.
    a = RequestRecord(start_s=0.0, end_s=4.0, chunk_times_s=[1.5, 2.5, 3.5, 3.9], output_tokens=8)
    b = RequestRecord(start_s=2.0, end_s=3.0, chunk_times_s=[2.2], output_tokens=2)
    ts = time_series([a, b], end_s=4.0, bucket_s=2.0)
    assert ts["t_s"] == [1.0, 3.0]
    assert ts["output_tok_s"] == pytest.approx([2 / 2, (6 + 2) / 2])  # bucket 0: one chunk of A (2 tokens)
    assert sum(ts["output_tok_s"]) * 2.0 == pytest.approx(10)  # totals are usage's
    assert ts["in_flight"] == [1, 1]  # at t=1: A; at t=3: A only (B ended at 3.0)
    assert ts["ttft_p50_s"] == pytest.approx([1.5, 0.2])  # by first-token time
    assert ts["completed_rps"] == pytest.approx([0.0, 1.0])


def test_multiturn_summary_by_turn_and_hit_rate():
    records = []
    for mode, cached in (("reuse_on", [0, 90, 190]), ("reuse_off", [0, 0, 0])):
        for conv in range(2):
            for turn in range(3):
                ttft = 0.1 + (0.0 if mode == "reuse_on" else 0.2 * turn) + 0.01 * conv
                r = request(0, ttft, tokens=4, gap=0.1, phase=mode, conversation=conv, turn=turn,
                            replica=f"r{conv}" if mode == "reuse_on" else f"r{turn}", history_turns_dropped=turn // 2)
                r.prompt_tokens, r.cached_tokens = 100 * (turn + 1), cached[turn]
                records.append(r)
    mt = multiturn_summary(records, turns=3, modes=["reuse_on", "reuse_off"])
    assert mt["history_tokens_by_turn"] == [100, 200, 300]
    assert mt["ttft_by_turn_s"]["reuse_on"] == pytest.approx([0.105] * 3)
    assert mt["ttft_by_turn_s"]["reuse_off"] == pytest.approx([0.105, 0.305, 0.505])
    on = mt["hit_rate"]["reuse_on"]
    assert on["cached_token_share"] == pytest.approx((90 + 190) * 2 / (600 * 2))
    assert on["turns_with_hit_share"] == pytest.approx(2 / 3)
    assert on["cached_share_by_turn"] == pytest.approx([0, 0.45, 190 / 300])
    assert mt["hit_rate"]["reuse_off"]["turns_with_hit_share"] == 0
    assert mt["history_turns_dropped_by_turn"] == [0, 0, 1]
    assert mt["replicas_per_conversation"] == {"reuse_on": 1.0, "reuse_off": 3.0}


def test_multiturn_hit_rate_is_none_when_the_server_reports_no_cache():
    r = request(0, 0.1, tokens=2, gap=0.1, phase="reuse_on", turn=0)
    mt = multiturn_summary([r], turns=2, modes=["reuse_on"])
    assert mt["hit_rate"]["reuse_on"]["cached_token_share"] is None
    assert mt["ttft_by_turn_s"]["reuse_on"][1] is None and math.isclose(mt["ttft_by_turn_s"]["reuse_on"][0], 0.1)
