"""Next-token choice for a batch: greedy rows in one argmax, sampled rows one by one (each with its
own seeded generator, so a seeded request gives the same text whatever else is in the batch)."""

from __future__ import annotations

import torch


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
    for i, seq in enumerate(seqs):
        params = seq.request.sampling
        if params.greedy:
            continue
        probs = torch.softmax(logits[i] / params.temperature, dim=-1)
        if params.top_p < 1.0:
            sorted_probs, order = torch.sort(probs, descending=True)
            # Keep the smallest set of tokens whose mass reaches top_p (always at least one).
            outside = torch.cumsum(sorted_probs, dim=-1) - sorted_probs >= params.top_p
            sorted_probs[outside] = 0.0
            probs = torch.zeros_like(probs).scatter_(0, order, sorted_probs)
        tokens[i] = int(torch.multinomial(probs, 1, generator=seq.generator))
    return tokens
