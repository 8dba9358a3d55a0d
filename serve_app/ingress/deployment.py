"""The ``Ingress`` deployment: the HTTP and WebSocket edge (routes: ``routes/``; app: ``app.py``).

Its constructor makes the replica's collaborators once (:class:`~serve_app.ingress.services.Services`):
the handles of the other deployments, the authenticator and the key stores, the per-identity
limits, the moderator, the metrics, the reply backends (event log, turn locks, cancel flags, room
members), the turn runner, the reply reader and the Responses API: all in memory, or all sharing one
Redis client with ``store: redis``. Routes receive them through a dependency; nothing is kept at
module level.
"""

from __future__ import annotations

import logging

from ray import serve
from ray.serve.handle import DeploymentHandle

from engines.artifacts import PROJECT_ROOT

from ..config import AppSettings
from .app import app
from .auth import Authenticator, TicketSigner
from .keys import FileKeyStore, KeyStore, RedisKeyStore
from .limits import InMemoryLimits, Limits, RedisLimits
from .metrics import IngressMetrics
from .moderation import Moderator
from .replies import Replies, ReplyBackends, ingress_redis
from .responses import ResponsesApi
from .services import Services
from .turns import TurnRunner

logger = logging.getLogger("ray.serve")

SHUTDOWN_GRACE_S = 10


@serve.deployment(name="Ingress")  # options: serve_config.yaml
@serve.ingress(app)
class Ingress:
    def __init__(self, model: DeploymentHandle, dialogue: DeploymentHandle, settings: AppSettings,
                 ops: DeploymentHandle | None = None):
        moderator = Moderator.from_settings(settings.moderation)
        moderator = moderator if moderator.words else None
        metrics = IngressMetrics()
        redis = ingress_redis(settings.dialogue)
        prefix = settings.dialogue.redis_key_prefix
        self.backends = ReplyBackends.create(settings.dialogue, settings.limits.max_event_log_bytes, redis)
        limits = Limits(settings.limits, RedisLimits(redis, prefix) if redis is not None else InMemoryLimits())
        keys_file = PROJECT_ROOT / settings.auth.keys_file  # an absolute keys_file stays as it is
        key_stores: list[KeyStore] = [FileKeyStore(keys_file)]
        if redis is not None:
            key_stores.insert(0, RedisKeyStore(redis, prefix))
        if settings.auth.mode == "none":
            logger.warning("AUTHENTICATION IS OFF (auth.mode: none): anyone who reaches this service may act as "
                           "any user and read /ops. Keep it on loopback.")
        turns = TurnRunner(model, dialogue, self.backends, moderator, metrics, settings.dialogue, limits)
        replies = Replies(self.backends, settings.dialogue, settings.limits.max_room_members)
        self.services = Services(
            settings=settings, model=model, dialogue=dialogue, ops=ops, moderator=moderator, metrics=metrics,
            turns=turns, replies=replies, responses=ResponsesApi(turns, replies, dialogue, settings),
            auth=Authenticator(settings.auth, key_stores, TicketSigner(redis, prefix)), limits=limits,
            key_stores=key_stores)

    async def __del__(self) -> None:
        """Serve calls this on graceful shutdown (scale-down, redeploy): replies still running get
        ``SHUTDOWN_GRACE_S`` to finish, then end as cancelled, so their readers and session locks are
        not left waiting (the deployment's ``graceful_shutdown_timeout_s`` is longer); then the
        Redis connections close."""
        await self.services.turns.shutdown(grace_s=SHUTDOWN_GRACE_S)
        await self.backends.close()
