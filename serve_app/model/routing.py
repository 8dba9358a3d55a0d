"""Session affinity: a conversation's turns go to the model replica that holds its KV cache.

``SessionAffinityRouter`` is a Ray Serve request router (``request_router_config`` of the
ModelServer deployment). A request carries an affinity key (``ModelServer.generate(request,
affinity_key=...)``): the session id for the sessions API and WebSocket, a hash of the first
messages for OpenAI clients that resend the history. The replica is picked by rendezvous hashing
(highest ``hash(key, replica)``): every ingress replica computes the same choice with no shared
state, sessions spread evenly, and when a replica is added or removed only the sessions it gains
or loses move. The preferred replica is skipped when it is overloaded: its queue (from Serve's
queue-length cache) is more than ``imbalance_threshold`` requests longer than the shortest, or it
refuses the request because it is at ``max_ongoing_requests``. A request with no key goes to the
less loaded of two random replicas, as with Serve's default router. A replica that dies drops out
of the candidates, so its sessions go elsewhere and simply prefill again.
"""

from __future__ import annotations

import hashlib
import random

from ray.serve.request_router import PendingRequest, RequestRouter, RunningReplica

DEFAULT_IMBALANCE_THRESHOLD = 12


def affinity_key_of(request: PendingRequest | None) -> str | None:
    if request is None:
        return None
    key = request.kwargs.get("affinity_key")
    return key if isinstance(key, str) and key else None


def rendezvous_score(key: str, replica_id: str) -> int:
    digest = hashlib.blake2b(f"{key}\0{replica_id}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big")


def rank_by_affinity(key: str, replica_ids: list[str], queue_lens: dict[str, int | None],
                     imbalance_threshold: int) -> list[list[str]]:
    """Ranks of replica ids for ``key``: ``[[preferred], [the rest]]``, or the rest first when the
    preferred replica's known queue is ``imbalance_threshold`` longer than the shortest known one."""
    ordered = sorted(replica_ids, key=lambda r: rendezvous_score(key, r), reverse=True)
    preferred, rest = ordered[0], ordered[1:]
    known = [q for r, q in queue_lens.items() if q is not None and r in rest]
    mine = queue_lens.get(preferred)
    if rest and known and mine is not None and mine - min(known) > imbalance_threshold:
        return [rest, [preferred]]
    return [[preferred], rest] if rest else [[preferred]]


class SessionAffinityRouter(RequestRouter):
    def initialize_state(self, imbalance_threshold: int = DEFAULT_IMBALANCE_THRESHOLD, **kwargs) -> None:
        self.imbalance_threshold = imbalance_threshold

    async def choose_replicas(self, candidate_replicas: list[RunningReplica],
                              pending_request: PendingRequest | None = None) -> list[list[RunningReplica]]:
        if not candidate_replicas:
            return []
        key = affinity_key_of(pending_request)
        if key is None or len(candidate_replicas) == 1:
            return [random.sample(candidate_replicas, min(2, len(candidate_replicas)))]
        by_id = {r.replica_id.unique_id: r for r in candidate_replicas}
        queue_lens = {rid: self.replica_queue_len_cache.get(r.replica_id) for rid, r in by_id.items()}
        ranks = rank_by_affinity(key, list(by_id), queue_lens, getattr(self, "imbalance_threshold",
                                                                        DEFAULT_IMBALANCE_THRESHOLD))
        return [[by_id[rid] for rid in rank] for rank in ranks if rank]
