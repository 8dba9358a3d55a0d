"""The torch engine on an NVIDIA GPU (``gpu`` marker: skipped, with the reason, where torch sees none):
bf16 with the KV cache sized from free GPU memory and decode steps replayed as CUDA graphs, against
transformers on the same GPU under the near-tie rule (alone and batched with mid-way joins), stop
strings, abort; the GPU artifact prepared by ``engines.build --device cuda`` and its refusal on a
fingerprint mismatch. None of these has run on the machine this was written on (no GPU there)."""

import json
import shutil

import pytest

from engines.artifacts import load_model
from engines.config import EngineConfig
from engines.registry import create_engine

from .helpers import (
    assert_hang_up_frees_the_row,
    assert_same_or_near_tie,
    assert_stop_string_cuts_and_never_leaks,
    chat,
    collect,
    hf_greedy,
)
from .test_model_runner import PROMPT, run_with_joins

pytestmark = pytest.mark.gpu

CUDA_CONFIG = dict(device="cuda", dtype="auto", prefix_cache_tokens=0, max_seq_len=2048, max_running_seqs=16,
                   kv_budget_tokens=1 << 20)


@pytest.fixture(scope="module")
def engine_cuda(artifact_dir):
    eng = create_engine(EngineConfig(model=artifact_dir, **CUDA_CONFIG))
    eng.start()
    yield eng
    eng.shutdown()


@pytest.fixture(scope="module")
def hf_cuda(artifact_dir, engine_cuda):
    model, tokenizer, _ = load_model(artifact_dir, dtype=engine_cuda.dtype, device="cuda")
    return model, tokenizer


def test_cuda_engine_runs_static_with_graphs(engine_cuda):
    runner = engine_cuda.runner
    assert engine_cuda.device.type == "cuda" and engine_cuda.dtype in ("bfloat16", "float16")
    assert engine_cuda.static_decode and runner.kv.fixed and runner.kv.rows == 16 and runner.kv.capacity == 2048
    assert runner.static.batch_sizes == (1, 2, 4, 8, 16)
    assert len(runner.static.graphs) == 5 * len(runner.static.length_sizes)
    assert runner.kv_plan.free_bytes is not None


async def test_cuda_greedy_alone_agrees_with_transformers(engine_cuda, hf_cuda):
    engine_cuda.runner.static.steps.clear()
    for prompt in (PROMPT, "What is the capital of France?", "List three uses of copper."):
        request = chat(prompt, max_tokens=32)
        ids = engine_cuda.prompt_ids_for(request)
        _, tokens, _ = await collect(engine_cuda, request)
        assert_same_or_near_tie(hf_cuda, ids, hf_greedy(hf_cuda, ids, 32), tokens)
    assert sum(engine_cuda.runner.static.steps.values()) > 0  # decode steps went through the graphs


async def test_cuda_batched_with_midway_joins_agrees_with_transformers(engine_cuda, hf_cuda):
    kv = engine_cuda.kv
    pointer = kv._k.data_ptr()
    target = chat("Describe a lighthouse at night.", max_tokens=32)
    tokens, others = await run_with_joins(engine_cuda, target)
    ids = engine_cuda.prompt_ids_for(target)
    assert_same_or_near_tie(hf_cuda, ids, hf_greedy(hf_cuda, ids, 32), tokens)
    for request, got in others:
        ids = engine_cuda.prompt_ids_for(request)
        assert_same_or_near_tie(hf_cuda, ids, hf_greedy(hf_cuda, ids, request.sampling.max_tokens)[: len(got)], got)
    assert {b for b, _ in engine_cuda.runner.static.steps} >= {1, 2, 4, 8}
    assert kv._k.data_ptr() == pointer  # never reallocated: the graphs' addresses hold


@pytest.mark.parametrize("stop", ["Paris", "capital"])
async def test_cuda_stop_string_ends_output_and_never_leaks(engine_cuda, stop):
    await assert_stop_string_cuts_and_never_leaks(engine_cuda, stop)


async def test_cuda_abort_midstream_frees_the_row(engine_cuda):
    await assert_hang_up_frees_the_row(engine_cuda)


async def test_cuda_float32_equals_transformers_token_for_token(artifact_dir):
    eng = create_engine(EngineConfig(model=artifact_dir, **{**CUDA_CONFIG, "dtype": "float32", "max_running_seqs": 4}))
    eng.start()
    try:
        model, tokenizer, _ = load_model(artifact_dir, dtype="float32", device="cuda")
        request = chat(PROMPT, max_tokens=40)
        ids = eng.prompt_ids_for(request)
        _, tokens, _ = await collect(eng, request)
        # TF32 matmuls and other kernels than on CPU: the near-tie rule at float32's tolerance.
        assert_same_or_near_tie((model, tokenizer), ids, hf_greedy((model, tokenizer), ids, 40), tokens)
    finally:
        eng.shutdown()


async def test_gpu_artifact_is_used_and_a_mismatch_refused(artifact_dir, tmp_path):
    from engines import build
    from engines.gpu import GpuArtifactMismatchError

    art = tmp_path / "art"
    shutil.copytree(artifact_dir, art)
    assert build.main(["--source", artifact_dir, "--out", str(art), "--device", "cuda", "--max-seq-len", "1024",
                       "--max-running-seqs", "8", "--kv-budget-tokens", "1048576",
                       "--cuda-graph-batch-sizes", "1,2,4,8"]) == 0
    manifest = json.loads((art / "manifest.json").read_text())
    section = manifest["gpu"]
    assert section["cuda_graph_batch_sizes"] == [1, 2, 4, 8] and section["capture"]["graphs"] > 0
    assert all(v["same_argmax"] and v["max_abs_diff"] <= 2 ** -6 * max(1.0, v["max_abs_logit"])
               for v in section["validation"].values())
    eng = create_engine(EngineConfig(model=str(art), device="cuda", max_seq_len=1024, max_running_seqs=8,
                                     kv_budget_tokens=1 << 20))
    eng.start()
    try:
        assert eng.runner.static.batch_sizes == (1, 2, 4, 8)
        _, tokens, _ = await collect(eng, chat(PROMPT, max_tokens=8))
        assert len(tokens) == 8
    finally:
        eng.shutdown()
    section["fingerprint"]["driver"] = "0.0.0-elsewhere"
    (art / "manifest.json").write_text(json.dumps(manifest))
    eng = create_engine(EngineConfig(model=str(art), device="cuda", max_seq_len=1024, max_running_seqs=8,
                                     kv_budget_tokens=1 << 20))
    with pytest.raises(GpuArtifactMismatchError, match="driver 0.0.0-elsewhere.*differs in: driver.*engines.build"):
        eng.start()
