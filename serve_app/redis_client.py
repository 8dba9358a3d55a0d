"""The one place a Redis client is made: the URL (``dialogue.redis_url``, else env ``REDIS_URL``,
else the local default) and the timeouts, so a hung or unreachable Redis becomes a 503 within
seconds instead of a stuck request. The dialogue deployment's session store and the ingress's event
logs, turn locks and cancel flags each make one client per process."""

from __future__ import annotations

import os

import redis.asyncio as aioredis

DEFAULT_REDIS_URL = "redis://127.0.0.1:6379/0"
CONNECT_TIMEOUT_S = 5.0
READ_TIMEOUT_S = 10.0


def redis_url(settings) -> str:
    """The Redis a :class:`~serve_app.config.DialogueSettings` points at."""
    return settings.redis_url or os.environ.get("REDIS_URL") or DEFAULT_REDIS_URL


def connect(url: str, blocking_read_s: float = 0.0) -> aioredis.Redis:
    """A client (its pool connects at first use). ``blocking_read_s``: the longest a command of the
    caller blocks on the server by design (``XREAD BLOCK``), added to the read timeout."""
    return aioredis.Redis.from_url(url, decode_responses=True, socket_connect_timeout=CONNECT_TIMEOUT_S,
                                   socket_timeout=READ_TIMEOUT_S + blocking_read_s)


def where(client: aioredis.Redis) -> str:
    """The server a client talks to, for error messages and logs."""
    kwargs = client.connection_pool.connection_kwargs
    if kwargs.get("path"):
        return f"unix://{kwargs['path']}"
    return f"redis://{kwargs.get('host')}:{kwargs.get('port')}/{kwargs.get('db', 0)}"
