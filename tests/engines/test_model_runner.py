"""Our model runner against transformers: token for token in float32, under the near-tie rule in bf16,
alone, batched, with sequences joining mid-way and prompts read in chunks mixed with decodes."""

import asyncio

import pytest
import torch

from engines.attention import AttentionMetadata, PrefillChunk
from engines.attention.torch_sdpa import TorchAttention, plan_decode
from engines.config import EngineConfig
from engines.device import resolve_dtype
from engines.kv_cache import KVCache
from engines.models import UnsupportedModelError, model_spec
from engines.registry import create_engine

from .helpers import assert_same_or_near_tie, chat, collect, hf_greedy

PROMPT = "Write one sentence about the sea."
OTHERS = ["Count to {n} in words.", "Name {n} colours.", "Give {n} tips for sleeping well."]


async def run_with_joins(engine, target, others_max_tokens=(12, 20, 28, 16, 24, 9)):
    """Run ``target``; each time it has produced 4 more tokens another request joins the batch."""
    others, tokens, deltas = [], [], []
    async for delta in engine.generate(target):
        deltas.append(delta)
        tokens += delta.token_ids
        if len(others) < len(others_max_tokens) and len(tokens) >= 4 * (len(others) + 1):
            i = len(others)
            request = chat(OTHERS[i % len(OTHERS)].format(n=i + 3), max_tokens=others_max_tokens[i])
            others.append((request, asyncio.create_task(collect(engine, request))))
    done = [(request, (await task)[1]) for request, task in others]
    return tokens, done


async def test_fp32_batched_with_midway_joins_equals_transformers_for_every_sequence(engine, hf):
    target = chat(PROMPT, max_tokens=40)
    tokens, others = await run_with_joins(engine, target)
    assert len(others) == 6
    assert tokens == hf_greedy(hf, engine.prompt_ids_for(target), 40)
    for request, got in others:
        assert got == hf_greedy(hf, engine.prompt_ids_for(request), request.sampling.max_tokens)[: len(got)]


async def test_fp32_prompt_read_in_chunks_beside_decodes_equals_transformers(artifact_dir, hf):
    """A 16-token step budget: prompts are read in several chunks, in the same forwards as decodes."""
    eng = create_engine(EngineConfig(model=artifact_dir, dtype="float32", num_threads=2, max_batched_tokens=16))
    eng.start()
    try:
        long_prompt = chat("Summarize in one line: " + "the quick brown fox jumps over the lazy dog. " * 6,
                           max_tokens=12)
        short = chat(PROMPT, max_tokens=30)
        (_, short_tokens, _), (_, long_tokens, _) = await asyncio.gather(
            collect(eng, short), collect(eng, long_prompt))
        assert len(eng.prompt_ids_for(long_prompt)) > 4 * 16
        assert short_tokens == hf_greedy(hf, eng.prompt_ids_for(short), 30)
        assert long_tokens == hf_greedy(hf, eng.prompt_ids_for(long_prompt), 12)
    finally:
        eng.shutdown()


async def test_bf16_alone_agrees_with_transformers_bf16_under_the_near_tie_rule(engine_bf16, hf_bf16):
    for prompt in (PROMPT, "What is the capital of France?", "List three uses of copper."):
        request = chat(prompt, max_tokens=32)
        prompt_ids = engine_bf16.prompt_ids_for(request)
        _, tokens, _ = await collect(engine_bf16, request)
        assert_same_or_near_tie(hf_bf16, prompt_ids, hf_greedy(hf_bf16, prompt_ids, 32), tokens)


async def test_bf16_batched_with_midway_joins_agrees_under_the_near_tie_rule(engine_bf16, hf_bf16):
    target = chat("Describe a lighthouse at night.", max_tokens=32)
    tokens, others = await run_with_joins(engine_bf16, target)
    prompt_ids = engine_bf16.prompt_ids_for(target)
    assert_same_or_near_tie(hf_bf16, prompt_ids, hf_greedy(hf_bf16, prompt_ids, 32), tokens)
    for request, got in others:
        ids = engine_bf16.prompt_ids_for(request)
        assert_same_or_near_tie(hf_bf16, ids, hf_greedy(hf_bf16, ids, request.sampling.max_tokens)[: len(got)], got)


def test_dtype_auto_is_bf16_only_with_native_bf16(monkeypatch):
    import engines.device as device

    monkeypatch.setattr(device, "cpu_has_native_bf16", lambda: True)
    assert resolve_dtype("auto", torch.device("cpu")) == "bfloat16"
    monkeypatch.setattr(device, "cpu_has_native_bf16", lambda: False)
    assert resolve_dtype("auto", torch.device("cpu")) == "float32"
    assert resolve_dtype("float32", torch.device("cpu")) == "float32"
    assert EngineConfig(model="x").dtype == "auto"


@pytest.mark.parametrize("arch,extra,match", [
    ("GPT2LMHeadModel", {}, "not supported by the torch engine's runner"),
    ("LlamaForCausalLM", {"hidden_act": "gelu"}, "hidden_act"),
    ("Qwen2ForCausalLM", {"use_sliding_window": True}, "sliding-window"),
    ("LlamaForCausalLM", {"rope_parameters": {"rope_type": "longrope", "rope_theta": 1e4}}, "RoPE type"),
])
def test_unsupported_models_are_refused_with_the_reason(arch, extra, match):
    from transformers import LlamaConfig

    config = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=100)
    config.architectures = [arch]
    for key, value in extra.items():
        setattr(config, key, value)
    with pytest.raises(UnsupportedModelError, match=match):
        model_spec(config)


# -- decode attention ---------------------------------------------------------------------------------

def test_plan_decode_reads_long_rows_alone_and_equal_rows_together():
    assert plan_decode((70,) * 32) == (70, [])
    dense, long_rows = plan_decode((60,) * 31 + (2000,))
    assert dense == 60 and long_rows == [31]
    assert plan_decode((100, 120, 110)) == (120, [])  # near-equal: one batched read beats extra calls


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_decode_and_prefill_attention_equal_per_sequence_sdpa(dtype):
    """Rows of very different lengths (one read alone), GQA, a prefill chunk after cached positions."""
    torch.manual_seed(0)
    layers, kv_heads, heads, dim = 2, 2, 6, 16
    kv = KVCache(layers, kv_heads, dim, dtype, torch.device("cpu"), max_rows=4, max_capacity=512)
    kv.reserve(4, 400, 0, 1 << 20)
    for store in (kv.keys, kv.values):
        for t in store:
            t.normal_()
    attention = TorchAttention(kv, heads, dim)
    lengths = (5, 7, 300)  # decode rows 0..2 (row 2 is read alone); row 3 prefills positions 10..17
    chunk = PrefillChunk(row=3, start=10, num_tokens=8, token_offset=3)
    rows = torch.tensor([0, 1, 2] + [3] * 8)
    positions = torch.tensor([n - 1 for n in lengths] + list(range(10, 18)))
    attention.prepare(AttentionMetadata(lengths, (chunk,), rows, positions))
    assert attention.long_rows == [2]
    q = torch.randn(11, heads, dim, dtype=dtype)
    k = torch.randn(11, kv_heads, dim, dtype=dtype)
    v = torch.randn(11, kv_heads, dim, dtype=dtype)
    out = attention.forward(1, q, k, v)

    def reference(row, queries, q_pos):
        keys = kv.keys[1][row, :, : q_pos[-1] + 1].float().repeat_interleave(heads // kv_heads, 0)
        values = kv.values[1][row, :, : q_pos[-1] + 1].float().repeat_interleave(heads // kv_heads, 0)
        scores = torch.einsum("thd,hkd->htk", queries.float(), keys) * dim ** -0.5
        mask = torch.arange(keys.shape[1])[None, :] <= torch.tensor(q_pos)[:, None]
        probs = scores.masked_fill(~mask, float("-inf")).softmax(-1)
        return torch.einsum("htk,hkd->thd", probs, values).reshape(len(q_pos), -1)

    tol = 1e-5 if dtype == torch.float32 else 3e-2
    for i, n in enumerate(lengths):
        torch.testing.assert_close(out[i].float(), reference(i, q[i: i + 1], [n - 1])[0], atol=tol, rtol=tol)
    torch.testing.assert_close(out[3:].float(), reference(3, q[3:], list(range(10, 18))), atol=tol, rtol=tol)
    assert torch.equal(kv.keys[1][3, :, 10:18], k[3:].transpose(0, 1))  # the chunk's keys were written


def test_kv_cache_growth_never_exposes_nan_from_recycled_memory():
    """Attention reads masked positions with weight 0; 0 * NaN is NaN, so fresh cache memory must be clean."""
    for _ in range(3):
        garbage = torch.full((2, 4, 2, 256, 16), float("nan"), dtype=torch.bfloat16)
        del garbage  # the allocator may hand this memory to the cache below
        kv = KVCache(2, 2, 16, torch.bfloat16, torch.device("cpu"), max_rows=8, max_capacity=512)
        kv.reserve(2, 100, 0, 1 << 20)
        kv.keys[0][0, :, :10] = 1.0
        kv.reserve(4, 300, 10, 1 << 20)  # grows rows and capacity, keeping what was written
        assert not torch.isnan(kv._k).any() and not torch.isnan(kv._v).any()
        assert torch.equal(kv.keys[0][0, :, :10], torch.ones(2, 10, 16, dtype=torch.bfloat16))


# -- other Llama-family architectures, on tiny random models (no download) ----------------------------

@pytest.mark.parametrize("arch", ["LlamaForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM"])
def test_tiny_random_model_logits_equal_transformers(arch, tmp_path):
    """Prefill then decode with our runner; the logits equal transformers' at every position (fp32)."""
    import transformers

    from engines.artifacts import LoadTarget
    from engines.model_runner import ModelRunner

    torch.manual_seed(0)
    kind = {"LlamaForCausalLM": "Llama", "Qwen2ForCausalLM": "Qwen2", "Qwen3ForCausalLM": "Qwen3"}[arch]
    config = getattr(transformers, f"{kind}Config")(
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        head_dim=16, vocab_size=128, max_position_embeddings=64, tie_word_embeddings=False)
    reference = getattr(transformers, arch)(config).eval()
    if arch == "Qwen2ForCausalLM":
        assert reference.model.layers[0].self_attn.q_proj.bias is not None  # the biases are exercised
    reference.save_pretrained(tmp_path)
    runner = ModelRunner(LoadTarget(str(tmp_path)), "float32", torch.device("cpu"), max_rows=1, max_seq_len=64)
    assert runner.spec.architecture == arch and runner.spec.qk_norm == (arch == "Qwen3ForCausalLM")
    ids = torch.randint(0, 128, (12,))
    runner.kv.reserve(1, 16, 0, 1024)
    with torch.inference_mode():
        expected = reference(ids[None]).logits[0]
        prompt = PrefillChunk(row=0, start=0, num_tokens=9, token_offset=0)
        runner.attention.prepare(AttentionMetadata((), (prompt,), torch.zeros(9, dtype=torch.long), torch.arange(9)))
        logits = runner.model.forward(ids[:9], torch.arange(9), runner.attention, torch.tensor([8]))
        torch.testing.assert_close(logits[0], expected[8], atol=1e-4, rtol=1e-4)
        for pos in range(9, 12):  # decode: one token at a time over the cache
            runner.attention.prepare(AttentionMetadata((pos + 1,), (), torch.zeros(1, dtype=torch.long),
                                                       torch.tensor([pos])))
            logits = runner.model.forward(ids[pos: pos + 1], torch.tensor([pos]), runner.attention, torch.tensor([0]))
            torch.testing.assert_close(logits[0], expected[pos], atol=1e-4, rtol=1e-4)
