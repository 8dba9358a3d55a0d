"""Sampling parameters at the edges of their ranges never fail a step (a failed step fails every
sequence in it): tiny top_p keeps the top token, tiny temperatures are greedy."""

from types import SimpleNamespace

import torch

from engines.protocol import SamplingParams
from engines.sampling import sample_next_tokens


def rows(*params: SamplingParams):
    return [SimpleNamespace(request=SimpleNamespace(sampling=p), generator=torch.Generator().manual_seed(p.seed or 0))
            for p in params]


def test_extreme_but_valid_values_pick_the_top_token():
    logits = torch.randn(4, 1000)
    logits[:, 7] = 50.0  # the top token of every row
    tokens = sample_next_tokens(logits.clone(), rows(SamplingParams(temperature=1.0, top_p=5e-324),
                                                     SamplingParams(temperature=5e-324),
                                                     SamplingParams(temperature=2.0, top_p=1e-45),
                                                     SamplingParams(temperature=0.0)))
    assert tokens == [7, 7, 7, 7]


def test_ordinary_sampling_still_samples():
    logits = torch.zeros(1, 50)  # uniform: a seeded draw, not always token 0
    picks = {sample_next_tokens(logits.clone(), rows(SamplingParams(temperature=1.0, top_p=0.9, seed=s)))[0]
             for s in range(20)}
    assert len(picks) > 5
