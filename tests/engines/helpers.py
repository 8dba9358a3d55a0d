import asyncio
import math

import torch

from engines.protocol import GenerationRequest, SamplingParams

NEAR_TIE_FP32 = 1e-3


def chat(text: str, **sampling) -> GenerationRequest:
    sampling.setdefault("temperature", 0.0)
    return GenerationRequest(messages=({"role": "user", "content": text},), sampling=SamplingParams(**sampling))


async def collect(engine, request):
    """Run a request to the end; return (text, token_ids, deltas)."""
    deltas = [d async for d in engine.generate(request)]
    return "".join(d.text for d in deltas), [t for d in deltas for t in d.token_ids], deltas


async def assert_stop_string_cuts_and_never_leaks(engine, stop: str):
    """A stop string the model says ends the output just before it, with no delta ever showing it."""
    full, _, _ = await collect(engine, chat("What is the capital of France?", max_tokens=60))
    assert stop in full, f"pick a stop string the model says: {full!r}"
    text, _, deltas = await collect(engine, chat("What is the capital of France?", max_tokens=60, stop=[stop]))
    assert deltas[-1].finish_reason == "stop"
    assert text == full[: full.index(stop)]
    assert all(stop not in d.text for d in deltas)


async def hang_up_after(engine, request, deltas: int = 3) -> None:
    """Read ``deltas`` deltas of the request's stream, then close it, as a client that went away."""
    stream = engine.generate(request)
    got = 0
    async for _ in stream:
        got += 1
        if got == deltas:
            break
    await stream.aclose()


async def assert_hang_up_frees_the_row(engine):
    """A client gone mid-stream: the request is aborted (counted once) and its row freed."""
    before = engine.stats().requests_aborted
    await hang_up_after(engine, chat("Tell me a very long story about a castle.", max_tokens=300))
    for _ in range(100):
        stats = engine.stats()
        if stats.running == 0 and stats.requests_aborted > before:
            break
        await asyncio.sleep(0.05)
    assert engine.stats().running == 0
    assert engine.stats().requests_aborted == before + 1


def hf_greedy(hf, prompt_ids: list[int], max_new_tokens: int) -> list[int]:
    model, tokenizer = hf
    with torch.inference_mode():
        out = model.generate(torch.tensor([prompt_ids], device=model.device), max_new_tokens=max_new_tokens, do_sample=False,
                             pad_token_id=tokenizer.eos_token_id)
    return out[0, len(prompt_ids):].tolist()


def near_tie_tolerance(model, top1: float) -> float:
    """fp32: 1e-3. bf16: two units in the last place of bf16 at the top logit's magnitude (bf16 keeps
    8 significant bits, so two logits 27.375 apart by less than 0.25 are indistinguishable)."""
    if model.dtype == torch.float32:
        return NEAR_TIE_FP32
    return 2 * 2.0 ** (math.floor(math.log2(max(abs(top1), 1e-6))) - 7)


def assert_same_or_near_tie(hf, prompt_ids, expected, got):
    """Token-identical, except where the reference itself had a near-tie at the first difference."""
    if got == expected:
        return
    pos = next((i for i, (a, b) in enumerate(zip(expected, got, strict=False)) if a != b), None)
    assert pos is not None, f"one output is a prefix of the other: {len(expected)} vs {len(got)} tokens"
    model, _ = hf
    with torch.inference_mode():
        logits = model(torch.tensor([prompt_ids + expected[:pos]], device=model.device)).logits[0, -1].float()
    top2 = torch.topk(logits, 2).values
    gap = float(top2[0] - top2[1])
    tolerance = near_tie_tolerance(model, float(top2[0]))
    assert gap <= tolerance, (f"outputs differ at token {pos} where the reference was not a near-tie "
                              f"(gap {gap:.4g} > {tolerance:.4g})")
    assert logits[got[pos]] >= top2[1] - 1e-6, "engine picked a token that was not in the reference's top 2"
