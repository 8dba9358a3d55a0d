"""Next-token choice for a batch: greedy rows in one argmax, sampled rows one by one (each with its
own seeded generator, so a seeded request gives the same text whatever else is in the batch).

A row whose scores are not numbers (NaN), or whose draw fails, gets :data:`SAMPLING_FAILED`: that
sequence fails alone (``scheduler.py``); the others in the step carry on.
"""

from __future__ import annotations

import logging

import torch

logger = logging.getLogger(__name__)

SAMPLING_FAILED = -1


def sample_next_tokens(logits: torch.Tensor, seqs, banned_if_ignore_eos: torch.Tensor | None = None) -> list[int]:
    """``logits`` is ``(batch, vocab)`` float32; ``seqs[i].request.sampling`` says how to pick row i.

    Rows with ``ignore_eos`` never pick ``banned_if_ignore_eos`` (EOS and the other special tokens),
    as llama.cpp's ``ignore_eos`` does: the reply goes on as text to ``max_tokens``, instead of
    running on past an end-of-turn into tokens that have no text (benchmarks need every token seen)."""
    if banned_if_ignore_eos is not None and banned_if_ignore_eos.numel():
        rows = [i for i, seq in enumerate(seqs) if seq.request.sampling.ignore_eos]
        if rows:
            index = torch.tensor(rows, device=logits.device)[:, None]
            logits[index, banned_if_ignore_eos[None, :]] = float("-inf")
    tokens = torch.argmax(logits, dim=-1).tolist()
    broken = torch.isnan(logits).any(dim=-1).tolist()
    for i, seq in enumerate(seqs):
        params = seq.request.sampling
        if broken[i]:
            tokens[i] = SAMPLING_FAILED
        elif not params.greedy:
            try:
                tokens[i] = _draw(logits[i], params, seq.generator)
            except RuntimeError:
                logger.exception("sampling failed for one sequence")
                tokens[i] = SAMPLING_FAILED
    return tokens


def _draw(logits: torch.Tensor, params, generator: torch.Generator | None) -> int:
    probs = torch.softmax(logits / params.temperature, dim=-1)
    if params.top_p < 1.0:
        sorted_probs, order = torch.sort(probs, descending=True)
        # Keep the smallest set of tokens whose mass reaches top_p, and always the top one (a top_p
        # too small for float32 would otherwise keep none).
        outside = torch.cumsum(sorted_probs, dim=-1) - sorted_probs >= params.top_p
        outside[0] = False
        sorted_probs[outside] = 0.0
        probs = torch.zeros_like(probs).scatter_(0, order, sorted_probs)
    return int(torch.multinomial(probs, 1, generator=generator))
