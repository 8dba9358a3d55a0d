"""TorchEngine against the real default model (short generations), float32 unless said otherwise."""

import asyncio

import pytest

from engines.config import EngineConfig
from engines.protocol import GenerationRequest, InvalidRequestError, SamplingParams

from .helpers import assert_hang_up_frees_the_row, assert_stop_string_cuts_and_never_leaks, chat, collect, hf_greedy

PROMPT = "Write one sentence about the sea."


async def test_greedy_alone_matches_transformers_generate(engine, hf):
    request = chat(PROMPT, max_tokens=40)
    prompt_ids = engine.prompt_ids_for(request)
    _, tokens, deltas = await collect(engine, request)
    assert deltas[-1].usage.prompt_tokens == len(prompt_ids)
    expected = hf_greedy(hf, prompt_ids, 40)
    assert tokens == expected[: len(tokens)]
    assert len(tokens) == len(expected)


async def test_max_tokens_finishes_with_length(engine):
    text, tokens, deltas = await collect(engine, chat("Tell me a long story about dragons.", max_tokens=7))
    assert deltas[-1].finish_reason == "length"
    assert deltas[-1].usage.completion_tokens == 7 == len(tokens)
    assert all(d.finish_reason is None for d in deltas[:-1])


async def test_eos_ends_sequence_without_special_text(engine):
    text, tokens, deltas = await collect(engine, chat("What is the capital of France?", max_tokens=100))
    assert deltas[-1].finish_reason == "stop"
    assert tokens[-1] in engine.eos_ids and len(tokens) < 100
    assert "<|im_end|>" not in text and "Paris" in text


async def test_ignore_eos_writes_text_to_max_tokens(engine):
    # The same question ends by itself after a few tokens (test above); with ignore_eos it goes on in text.
    text, tokens, deltas = await collect(engine, chat("What is the capital of France?", max_tokens=60,
                                                      ignore_eos=True))
    assert deltas[-1].finish_reason == "length" and len(tokens) == 60
    special = set(engine.tokenizer.all_special_ids) | engine.eos_ids
    assert not special & set(tokens)
    assert text.startswith("The capital of France is Paris") and len(text) > 150
    assert sum(1 for d in deltas if d.text) > 30  # streamed as text all along, not held back


@pytest.mark.parametrize("stop", ["Paris", "of France", "capital"])
async def test_stop_string_ends_output_and_never_leaks(engine, stop):
    await assert_stop_string_cuts_and_never_leaks(engine, stop)


async def test_abort_midstream_frees_the_row(engine):
    await assert_hang_up_frees_the_row(engine)


async def test_chinese_streaming_never_breaks_characters(engine):
    text, tokens, deltas = await collect(engine, chat("请用中文写一句关于春天的话。", max_tokens=60))
    assert all("\ufffd" not in d.text for d in deltas)
    # A sequence cut by max_tokens inside a character drops the incomplete bytes, never shows U+FFFD.
    assert text == engine.tokenizer.decode(tokens, skip_special_tokens=True).rstrip("\ufffd")
    assert any(ord(ch) > 0x2E80 for ch in text), f"expected CJK output, got {text!r}"


async def test_prompt_too_long_rejected_before_work(engine):
    steps = engine.stats().steps
    request = GenerationRequest(prompt_token_ids=tuple([42] * (engine.max_seq_len + 1)))
    with pytest.raises(InvalidRequestError, match="prompt is") as info:
        await collect(engine, request)
    assert info.value.field == "messages"
    assert engine.stats().steps == steps


async def test_prompt_plus_max_tokens_over_limit_rejected(engine):
    request = GenerationRequest(prompt_token_ids=(42,) * 100, sampling=SamplingParams(max_tokens=engine.max_seq_len))
    with pytest.raises(InvalidRequestError) as info:
        await collect(engine, request)
    assert info.value.field == "max_tokens"


@pytest.mark.parametrize("field,value", [("temperature", -0.5), ("temperature", 3), ("top_p", 0.0), ("top_p", 1.5),
                                         ("max_tokens", 0), ("seed", -1), ("stop", ["ok", ""])])
def test_invalid_sampling_params_name_the_field(field, value):
    with pytest.raises(InvalidRequestError) as info:
        SamplingParams(**{field: value})
    assert info.value.field == field
    assert field in str(info.value)


def test_empty_and_malformed_messages_rejected():
    with pytest.raises(InvalidRequestError):
        GenerationRequest(messages=())
    with pytest.raises(InvalidRequestError):
        GenerationRequest(messages=({"role": "user"},))
    with pytest.raises(InvalidRequestError):
        GenerationRequest()


async def test_seeded_sampling_is_reproducible_in_any_batch(engine):
    req = dict(temperature=0.9, top_p=0.9, seed=1234, max_tokens=24)
    alone, _, _ = await collect(engine, chat(PROMPT, **req))
    crowd = await asyncio.gather(collect(engine, chat(PROMPT, **req)),
                                 *[collect(engine, chat(f"Say {i}", max_tokens=10)) for i in range(4)])
    assert crowd[0][0] == alone


def test_max_seq_len_defaults_to_the_models_context_within_the_kv_budget(engine):
    assert engine.config.max_seq_len is None and engine.max_seq_len == 8192  # SmolLM2's max_position_embeddings
    config = EngineConfig(model="m", kv_budget_tokens=4096)
    assert config.resolve_max_seq_len(8192) == 4096  # one sequence must fit the KV budget
    assert EngineConfig(model="m", max_seq_len=2048).resolve_max_seq_len(8192) == 2048
    assert EngineConfig(model="m", max_seq_len=16384).resolve_max_seq_len(8192) == 8192  # never past the model
    assert EngineConfig(model="m").resolve_max_seq_len(None) == 32768
    with pytest.raises(InvalidRequestError, match="must hold at least one full sequence"):
        EngineConfig(model="m", max_seq_len=8192, kv_budget_tokens=4096)
