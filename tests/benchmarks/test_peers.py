"""The peers table from reports (installing and running the peers is not part of the test suite)."""

from benchmarks.peers import markdown, row_of


def report(tok_s: dict[int, float], ttft_s: float, ready_s: float) -> dict:
    phases = [{"label": f"{n} streams", "summary": {"output_throughput_tok_s": t, "ttft_s": {"p50": ttft_s},
                                                   "tpot_s": {"p50": 0.05}, "errors": {"timeout": 1} if n == 32 else {}}}
              for n, t in tok_s.items()]
    return {"phases": phases, "ready_s": ready_s, "load_average_after": [1.0, 1.5, 2.0]}


def test_rows_and_side_by_side_ratios():
    rows = [row_of("llama.cpp", report({1: 90.0, 32: 480.0}, 0.45, 5.0), [1, 32]),
            row_of("ours", report({1: 80.0, 32: 600.0}, 0.40, 4.0), [1, 32])]
    assert rows[1]["tok_s_32"] == 600.0 and rows[1]["ttft_p50_s_32"] == 0.40 and rows[1]["errors_32"] == 1
    table = markdown(rows, [1, 32], {"cpu": "test cpu", "cpu_count": 2, "torch": "x"})
    assert "| ours | 80 | 600 | 0.40 s | 50 ms | 4.0 s | 1 | 1.0/1.5/2.0 |" in table
    assert "ours / llama.cpp tok/s: 1: 0.89×, 32: 1.25×" in table


def test_a_level_a_system_did_not_run_shows_as_missing():
    rows = [row_of("vllm", report({1: 36.0}, 1.5, 120.0), [1, 32])]
    assert rows[0]["tok_s_32"] is None
    assert "| vllm | 36 | – |" in markdown(rows, [1, 32], {"cpu": "c", "cpu_count": 2, "torch": "x"})


def test_rounds_are_summarized_by_their_median():
    from benchmarks.peers import median_row

    rounds = [row_of("ours", report({1: t1, 32: t32}, ttft, 4.0), [1, 32])
              for t1, t32, ttft in [(50.0, 400.0, 0.3), (60.0, 500.0, 0.5), (55.0, 300.0, 0.4)]]
    row = median_row(rounds)
    assert (row["tok_s_1"], row["tok_s_32"], row["ttft_p50_s_32"], row["rounds"]) == (55.0, 400.0, 0.4, 3)
    assert row["load_average"] == [1.0, 1.5, 2.0]
