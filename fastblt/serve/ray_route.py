"""Session affinity for `fastblt serve --ray`: the requests of one conversation go to one replica.

A replica keeps snapshots of the prompts it committed (runtime/prompt_cache.py), so a
conversation's next turn, whose prompt starts with the last one, skips most of its prefill, but
only on the replica that answered the last turn. Ray Serve's default router picks the less loaded
of two random replicas, which sends a conversation's turns all over a deployment. Requests that
carry the header `x-session-id: KEY` (Ray Serve's session header) go instead to the replica that
KEY hashes to (rendezvous hashing over the running replicas: a replica that comes or goes moves
only the sessions that hashed to it), unless it has `imbalance` more requests than the least
loaded replica, where the default rule takes over for that request. Requests without the header are
routed by that rule. The router runs in Ray Serve's proxies, which read the header into the
request's metadata; the body is not read there.

Docs: docs/scale-out.md.
"""

from __future__ import annotations

import hashlib
import random

from ray.serve.request_router import (
    FIFOMixin,
    LocalityMixin,
    MultiplexMixin,
    PendingRequest,
    RequestRouter,
    RunningReplica,
)

# Ray Serve's proxy reads it into the request's metadata (RAY_SERVE_SESSION_ID_HEADER_KEY on the
# proxies' nodes names another)
SESSION_HEADER = "x-session-id"
ROUTER_PATH = "fastblt.serve.ray_route.SessionAffinityRouter"  # a Serve config's request_router_class
IMBALANCE = 8  # requests more than the least loaded replica before a session's replica is passed over


class SessionAffinityRouter(FIFOMixin, LocalityMixin, MultiplexMixin, RequestRouter):
    """Ray Serve's request router for fastblt's deployment: a session's replica by its header's
    hash, else the less loaded of two random replicas (Ray's default rule)."""

    def initialize_state(self, imbalance: int = IMBALANCE) -> None:
        self.imbalance = imbalance

    async def choose_replicas(self, candidate_replicas: list[RunningReplica],
                              pending_request: PendingRequest | None = None) -> list[list[RunningReplica]]:  # fmt: skip
        if not candidate_replicas:
            return []
        key = session_key(pending_request)
        if key is not None and len(candidate_replicas) > 1:
            ranked = sorted(candidate_replicas, key=lambda r: weight(key, r.replica_id.unique_id), reverse=True)
            if not self.overloaded(ranked[0], candidate_replicas):
                return [ranked[:1], ranked[1:]]  # then any other, should it refuse (its queue full)
        return [random.sample(candidate_replicas, min(2, len(candidate_replicas)))]

    def overloaded(self, replica: RunningReplica, replicas: list[RunningReplica]) -> bool:
        """Whether `replica` holds `imbalance` requests more than the least loaded (as last known)."""
        cache = self.replica_queue_len_cache
        mine, lengths = cache.get(replica.replica_id), [cache.get(r.replica_id) for r in replicas]
        known = [n for n in lengths if n is not None]
        return mine is not None and mine - min(known) >= self.imbalance


def session_key(pending_request: PendingRequest | None) -> str | None:
    """The request's session header, which Serve's proxy reads into the request's metadata (the
    request itself reaches the router serialized), if any."""
    session = getattr(getattr(pending_request, "metadata", None), "session_id", "")
    return session if isinstance(session, str) and session else None


def weight(key: str, replica: str) -> int:
    """Rendezvous hashing: a session goes to the replica of the highest weight for it."""
    return int.from_bytes(hashlib.blake2b(f"{key}\0{replica}".encode(), digest_size=8).digest(), "big")
