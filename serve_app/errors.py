"""One place that turns exceptions from any deployment into an HTTP status and an OpenAI-shaped
error body (``{"error": {"message", "type", "param", "code"}}``)."""

from __future__ import annotations

import logging
from dataclasses import dataclass

from ray.exceptions import RayTaskError
from ray.serve.exceptions import BackPressureError, DeploymentUnavailableError
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from engines.protocol import EngineDeadError, EngineOverloadedError, InvalidRequestError

from .dialogue import SessionNotFoundError
from .store import SessionStoreUnavailableError


@dataclass
class ApiError(Exception):
    status: int
    message: str
    type: str = "invalid_request_error"
    param: str | None = None
    code: str | None = None

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


logger = logging.getLogger("ray.serve")

# Raised by the dialogue store or the event log when Redis cannot be reached: answered with 503.
STORE_ERRORS = (SessionStoreUnavailableError, RedisConnectionError, RedisTimeoutError)


def root_cause(exc: BaseException) -> BaseException:
    while isinstance(exc, RayTaskError) and getattr(exc, "cause", None) is not None:
        exc = exc.cause
    return exc


def to_api_error(exc: BaseException) -> ApiError:
    exc = root_cause(exc)
    if isinstance(exc, ApiError):
        return exc
    if isinstance(exc, InvalidRequestError):
        return ApiError(400, str(exc), param=exc.field)
    if isinstance(exc, SessionNotFoundError):
        return ApiError(404, str(exc), code="session_not_found")
    if isinstance(exc, (BackPressureError, EngineOverloadedError)):
        return ApiError(503, f"server overloaded, retry later ({type(exc).__name__})", "server_error", code="overloaded")
    if isinstance(exc, (DeploymentUnavailableError, EngineDeadError)):
        return ApiError(503, f"model unavailable: {exc}", "server_error", code="unavailable")
    if isinstance(exc, STORE_ERRORS):
        # Nothing was written: the client may retry the same request once the store is back.
        logger.warning("dialogue store unavailable: %s", exc)  # the address stays in the log, not the answer
        return ApiError(503, "dialogue store unavailable, retry later", "server_error", code="store_unavailable")
    return ApiError(500, f"internal error: {type(exc).__name__}: {exc}", "server_error", code="internal_error")
