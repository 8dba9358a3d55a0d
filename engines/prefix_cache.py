"""Prefix KV cache: the KV of finished sequences, kept for the next request that starts the same way.

How this works: when a sequence finishes, the KV of all its computed positions (prompt + reply) is
copied out of its row into an entry keyed by those token ids. A new request looks for the entry
sharing the longest common prefix with its prompt and copies that much KV into its row, so only the
rest of the prompt is prefilled. In a conversation, turn N+1's prompt starts with turn N's prompt and
reply, so the whole history is a hit. At least one prompt token is always left to prefill (its
logits give the first output token). Entries are evicted least-recently-used first when the token
budget is exceeded; an entry that is a prefix of a newly inserted one is dropped as superseded.
"""

from __future__ import annotations

from collections import OrderedDict

import torch

KV = list[tuple[torch.Tensor, torch.Tensor]]


def common_prefix_len(a: torch.Tensor, b: torch.Tensor) -> int:
    n = min(a.numel(), b.numel())
    if n == 0:
        return 0
    diff = torch.nonzero(a[:n] != b[:n])
    return int(diff[0]) if diff.numel() else n


class PrefixCache:
    def __init__(self, budget_tokens: int, min_reuse_tokens: int = 16):
        self.budget_tokens = budget_tokens
        self.min_reuse_tokens = min_reuse_tokens
        self._entries: OrderedDict[int, tuple[torch.Tensor, KV]] = OrderedDict()
        self._next_key = 0
        self.used_tokens = 0
        self.hits = 0
        self.misses = 0
        self.reused_tokens = 0

    def __len__(self) -> int:
        return len(self._entries)

    def lookup(self, prompt_ids: list[int]) -> tuple[int, KV] | None:
        """Return ``(length, kv)`` for the longest cached prefix of ``prompt_ids``, or None."""
        if not self.budget_tokens:
            return None
        prompt = torch.tensor(prompt_ids)
        best_key, best_len = None, 0
        for key, (ids, _) in self._entries.items():
            n = common_prefix_len(ids, prompt)
            if n > best_len:
                best_key, best_len = key, n
        best_len = min(best_len, len(prompt_ids) - 1)
        if best_key is None or best_len < self.min_reuse_tokens:
            self.misses += 1
            return None
        self._entries.move_to_end(best_key)
        self.hits += 1
        self.reused_tokens += best_len
        return best_len, self._entries[best_key][1]

    def insert(self, token_ids: list[int], kv: KV) -> None:
        n = len(token_ids)
        if not self.budget_tokens or n > self.budget_tokens or n < self.min_reuse_tokens:
            return
        ids = torch.tensor(token_ids)
        for key, (old, _) in list(self._entries.items()):
            shared = common_prefix_len(old, ids)
            if shared == n:  # already covered by a longer (or equal) entry
                self._entries.move_to_end(key)
                return
            if shared == old.numel():
                self._drop(key)
        while self._entries and self.used_tokens + n > self.budget_tokens:
            self._drop(next(iter(self._entries)))
        self._entries[self._next_key] = (ids, kv)
        self._next_key += 1
        self.used_tokens += n

    def _drop(self, key: int) -> None:
        ids, _ = self._entries.pop(key)
        self.used_tokens -= ids.numel()

    def clear(self) -> None:
        self._entries.clear()
        self.used_tokens = 0
