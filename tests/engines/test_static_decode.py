"""The GPU replicas' code paths that run on CPU: static decode (preallocated KV cache, padded batch
buckets, device-side length mask) against transformers, bucket choice, KV sizing from free GPU memory
(``torch.cuda.mem_get_info`` monkeypatched), the GPU artifact check, ``engines.build --device cuda``
without a GPU, and the new settings' validation. CUDA graphs themselves need a GPU (test_cuda.py)."""

import asyncio

import pytest
import torch

from engines import build
from engines.artifacts import LoadTarget
from engines.attention import AttentionMetadata
from engines.attention.torch_sdpa import TorchAttention
from engines.config import DEFAULT_CUDA_GRAPH_BATCH_SIZES, EngineConfig
from engines.device import resolve_device
from engines.gpu import GpuArtifactMismatchError, NoGpuError, check_gpu_artifact
from engines.kv_cache import KVCache
from engines.protocol import InvalidRequestError
from engines.static_decode import (
    KVCacheTooSmallError,
    StaticDecodeAttention,
    batch_buckets,
    length_buckets,
    pick,
    plan_kv,
)

from .helpers import chat, collect, hf_greedy
from .test_model_runner import PROMPT, run_with_joins

# -- the engine in decode_mode static, on CPU ---------------------------------------------------------


async def test_static_batched_with_midway_joins_equals_transformers(engine_static, hf):
    """Up to 7 rows join one by one: steps run at padded buckets (3 rows at 4, 5-7 at 8), token for token
    equal to transformers in float32, with the cache allocated once."""
    kv = engine_static.kv
    pointer, shape = kv._k.data_ptr(), tuple(kv._k.shape)
    static = engine_static.runner.static
    static.steps.clear()
    target = chat(PROMPT, max_tokens=40)
    tokens, others = await run_with_joins(engine_static, target)
    assert tokens == hf_greedy(hf, engine_static.prompt_ids_for(target), 40)
    for request, got in others:
        assert got == hf_greedy(hf, engine_static.prompt_ids_for(request), request.sampling.max_tokens)[: len(got)]
    used = {batch for batch, _ in static.steps}
    assert {1, 2, 4, 8} <= used, static.steps  # 3, 5, 6 and 7 rows ran padded
    assert (kv._k.data_ptr(), tuple(kv._k.shape)) == (pointer, shape) == (pointer, (30, 8, 3, 512, 64))
    await asyncio.sleep(0.6)  # the loop goes idle: a fixed cache is kept, not released
    assert kv.rows == 8 and kv._k.data_ptr() == pointer


async def test_static_alone_equals_the_dynamic_engine(engine_static, engine):
    for prompt in ("What is the capital of France?", "List three uses of copper."):
        _, dynamic, _ = await collect(engine, chat(prompt, max_tokens=24))
        _, static, _ = await collect(engine_static, chat(prompt, max_tokens=24))
        assert static == dynamic


async def test_static_stop_string_and_abort(engine_static):
    full, _, _ = await collect(engine_static, chat("What is the capital of France?", max_tokens=30))
    text, _, deltas = await collect(engine_static, chat("What is the capital of France?", max_tokens=30, stop=["Paris"]))
    assert "Paris" in full and deltas[-1].finish_reason == "stop" and text == full[: full.index("Paris")]
    before = engine_static.stats().requests_aborted
    stream = engine_static.generate(chat("Tell me a very long story about a castle.", max_tokens=200))
    async for _ in stream:
        break
    await stream.aclose()
    for _ in range(100):
        if engine_static.stats().running == 0 and engine_static.stats().requests_aborted > before:
            break
        await asyncio.sleep(0.05)
    assert engine_static.stats().running == 0 and engine_static.stats().requests_aborted == before + 1


def test_static_admission_follows_the_preallocated_rows(engine_static):
    stats = engine_static.stats()
    assert stats.max_running == 8 and stats.kv_budget_tokens == 8 * 512 == stats.kv_allocated_tokens
    assert engine_static.scheduler.kv.capacity_for(3) == 512


def test_static_decode_attention_equals_the_dynamic_one_with_padding_rows():
    """Rows of lengths 5, 40, 300 at bucket 4 x read length 512: the padded row does not disturb them."""
    torch.manual_seed(0)
    layers, kv_heads, heads, dim = 1, 2, 6, 16
    kv = KVCache(layers, kv_heads, dim, torch.float32, torch.device("cpu"), max_rows=4, max_capacity=512)
    kv.allocate_fixed(4, 512)
    kv._k.normal_()
    kv._v.normal_()
    lengths = [5, 40, 300]
    q, k, v = torch.randn(3, heads, dim), torch.randn(3, kv_heads, dim), torch.randn(3, kv_heads, dim)
    reference = TorchAttention(kv, heads, dim)
    reference.prepare(AttentionMetadata(tuple(lengths), (), torch.arange(3), torch.tensor(lengths) - 1))
    expected = reference.forward(0, q, k, v)
    static = StaticDecodeAttention(kv, heads, dim)
    static.bind(torch.arange(4), torch.tensor([4, 39, 299, 0]), torch.tensor(lengths + [1]), 512)
    pad = lambda t: torch.cat([t, torch.zeros_like(t[:1])])  # noqa: E731
    got = static.forward(0, pad(q), pad(k), pad(v))
    torch.testing.assert_close(got[:3], expected, atol=1e-5, rtol=1e-5)
    assert torch.isfinite(got).all()


# -- buckets and KV sizing -----------------------------------------------------------------------------

def test_bucket_choice():
    assert batch_buckets(DEFAULT_CUDA_GRAPH_BATCH_SIZES, 32) == (1, 2, 4, 8, 16, 32)
    assert batch_buckets(DEFAULT_CUDA_GRAPH_BATCH_SIZES, 40) == (1, 2, 4, 8, 16, 32, 40)  # capped at the rows
    assert batch_buckets((1, 2, 4, 8), 32) == (1, 2, 4, 8)  # 9+ rows: eager
    assert batch_buckets((), 32) == ()
    assert length_buckets(8192) == (256, 512, 1024, 2048, 4096, 8192)
    assert length_buckets(600) == (256, 512, 600) and length_buckets(100) == (100,)
    assert [pick((1, 2, 4, 8), n) for n in (1, 2, 3, 5, 8, 9)] == [1, 2, 4, 8, 8, None]


def test_kv_sizing_from_free_gpu_memory(monkeypatch):
    gib = 2**30
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (40 * gib, 80 * gib))
    cuda = torch.device("cuda")
    per_token = 2 * 30 * 3 * 64 * 2  # SmolLM2-135M in bf16
    plan = plan_kv(8192, per_token, 128, 1 << 30, cuda, 0.9)
    assert plan.memory_tokens == int(40 * gib * 0.9) // per_token and plan.free_bytes == 40 * gib
    assert plan.rows == 128 and plan.memory_tokens // 8192 == 204  # max_running_seqs bounds it
    assert plan_kv(8192, per_token, 128, 1 << 30, cuda, 0.05).rows == int(40 * gib * 0.05) // per_token // 8192 == 11
    assert plan_kv(8192, per_token, 128, 65536, cuda, 0.9).rows == 8  # kv_budget_tokens bounds it too
    with pytest.raises(KVCacheTooSmallError, match=r"cannot hold one sequence of max_seq_len=8192 tokens: 0\.001 of "
                                                   r"the 40\.00 GiB of GPU memory free"):
        plan_kv(8192, per_token, 128, 1 << 30, cuda, 0.001)
    cpu = plan_kv(512, per_token, 8, 4096, torch.device("cpu"), 0.9)
    assert (cpu.rows, cpu.free_bytes) == (8, None)


# -- GPU artifacts ------------------------------------------------------------------------------------

H100 = {"name": "NVIDIA H100 80GB HBM3", "compute_capability": "9.0", "driver": "550.54.15", "cuda_runtime": "12.4",
        "torch": "2.6.0+cu124"}


def test_gpu_artifact_for_another_gpu_is_refused_with_what_and_how():
    check_gpu_artifact({"fingerprint": H100}, dict(H100, total_memory_gb=79.1), "/a/art")  # same GPU: accepted
    other = dict(H100, name="NVIDIA A10G", compute_capability="8.6", driver="535.104.05")
    with pytest.raises(GpuArtifactMismatchError) as info:
        check_gpu_artifact({"fingerprint": H100}, other, "/a/art", "org/model")
    message = str(info.value)
    assert "prepared for NVIDIA H100 80GB HBM3 (compute capability 9.0, driver 550.54.15" in message
    assert "this replica has NVIDIA A10G (compute capability 8.6, driver 535.104.05" in message
    assert "differs in: name, compute_capability, driver" in message
    assert "python -m engines.build --device cuda --source org/model --out /a/art" in message


def test_replica_start_checks_the_artifact_and_takes_its_buckets(monkeypatch):
    import engines.gpu as gpu
    from engines.torch_engine import TorchEngine

    engine = TorchEngine(EngineConfig(model="m"))
    engine.device, engine.dtype = torch.device("cuda"), "bfloat16"
    engine.target = LoadTarget("/a/art", manifest={"source": "src.gguf", "gpu": {
        "fingerprint": H100, "dtype": "bfloat16", "cuda_graph_batch_sizes": [1, 2, 4, 8, 16, 32]}})
    monkeypatch.setattr(gpu, "gpu_fingerprint", lambda device=None: dict(H100))
    engine._check_gpu_artifact()
    assert engine._graph_batch_sizes() == (1, 2, 4, 8, 16, 32)
    monkeypatch.setattr(gpu, "gpu_fingerprint", lambda device=None: dict(H100, torch="2.7.0+cu126"))
    with pytest.raises(GpuArtifactMismatchError, match="differs in: torch"):
        engine._check_gpu_artifact()
    engine.device = torch.device("cpu")  # a GPU artifact on CPU: weights only, nothing checked
    engine._check_gpu_artifact()
    assert engine._graph_batch_sizes() == DEFAULT_CUDA_GRAPH_BATCH_SIZES


def test_recorded_buckets_are_capped_to_the_replicas_own_rows():
    from engines.static_decode import batch_buckets

    # An artifact prepared with 4 rows records what was asked (up to 128); a 128-row replica keeps them all.
    assert batch_buckets(DEFAULT_CUDA_GRAPH_BATCH_SIZES, 128) == DEFAULT_CUDA_GRAPH_BATCH_SIZES
    assert batch_buckets(DEFAULT_CUDA_GRAPH_BATCH_SIZES, 4) == (1, 2, 4)
    assert batch_buckets(DEFAULT_CUDA_GRAPH_BATCH_SIZES, 48) == (1, 2, 4, 8, 16, 32, 48)


def test_a_cuda_error_is_recognised_as_fatal_for_the_engine():
    from engines.torch_engine import is_cuda_context_error

    assert is_cuda_context_error(RuntimeError("CUDA error: an illegal memory access was encountered"))
    assert not is_cuda_context_error(RuntimeError("shape mismatch"))


def test_trtllm_and_cuda_preparation_are_separate_builds(capsys, tmp_path):
    assert build.main(["--engine", "trtllm", "--device", "cuda", "--out", str(tmp_path / "art")]) == 2
    assert "run --device cuda" in capsys.readouterr().err and not (tmp_path / "art").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal where there is no GPU")
def test_build_for_cuda_without_a_gpu_fails_clearly(capsys, tmp_path):
    assert build.main(["--device", "cuda", "--out", str(tmp_path / "art")]) == 2
    assert "--device cuda needs an NVIDIA GPU" in capsys.readouterr().err
    assert not (tmp_path / "art").exists()  # refused before any conversion
    with pytest.raises(NoGpuError, match="needs an NVIDIA GPU"):
        resolve_device("cuda")


# -- settings ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("field,value", [("gpu_memory_fraction", 0), ("gpu_memory_fraction", 1.5),
                                         ("cuda_graph_batch_sizes", (0, 2)), ("cuda_graph_batch_sizes", (2, 2)),
                                         ("cuda_graph_batch_sizes", "8"), ("decode_mode", "graphs")])
def test_gpu_settings_are_validated_naming_the_field(field, value):
    with pytest.raises(InvalidRequestError) as info:
        EngineConfig(model="m", **{field: value})
    assert info.value.field == field and field in str(info.value)


def test_gpu_settings_defaults_and_normalization():
    config = EngineConfig(model="m", cuda_graph_batch_sizes=[8, 1, 4])
    assert config.cuda_graph_batch_sizes == (1, 4, 8)
    assert (config.gpu_memory_fraction, config.decode_mode) == (0.9, "auto")
    assert EngineConfig(model="m").cuda_graph_batch_sizes == (1, 2, 4, 8, 16, 32, 64, 128)
    assert EngineConfig(model="m", cuda_graph_batch_sizes=()).cuda_graph_batch_sizes == ()


def test_fixed_kv_cache_is_never_reallocated_nor_released():
    kv = KVCache(2, 2, 16, torch.float32, torch.device("cpu"), max_rows=4, max_capacity=256)
    kv.allocate_fixed(4, 256)
    pointer = kv._k.data_ptr()
    kv.reserve(3, 100, 50, 1 << 20)
    kv.release()
    assert kv._k.data_ptr() == pointer and kv.allocated_tokens == 4 * 256
    with pytest.raises(RuntimeError, match="cannot hold"):
        kv.reserve(5, 100, 0, 1 << 20)
    kv.release(force=True)
    assert kv.rows == 0 and kv._k is None
