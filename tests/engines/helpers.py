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
