"""Errors as a contract: the domain errors every deployment raises, and the one mapper that turns any
exception (raised here or in another deployment, behind a ``RayTaskError``) into an HTTP status and
an OpenAI-shaped body (``{"error": {"message", "type", "param", "code"}}``)."""

from __future__ import annotations

import logging
import uuid
from dataclasses import dataclass

from ray.exceptions import RayTaskError
from ray.serve.exceptions import BackPressureError, DeploymentUnavailableError
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from engines.protocol import EngineDeadError, EngineOverloadedError, InvalidRequestError

logger = logging.getLogger("ray.serve")


@dataclass
class ApiError(Exception):
    status: int
    message: str
    type: str = "invalid_request_error"
    param: str | None = None
    code: str | None = None
    retry_after_s: int | None = None  # 429 / 503: when to try again (the Retry-After header)

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def headers(self) -> dict[str, str]:
        return {"Retry-After": str(self.retry_after_s)} if self.retry_after_s is not None else {}


class NotFoundError(LookupError):
    """No such thing, or not the caller's (the two are not told apart): a 404 with ``code``."""

    code = "not_found"

    def __init__(self, message: str, code: str | None = None):
        super().__init__(message)
        self.code = code or self.code

    def __reduce__(self):  # crosses deployment handles with its code
        return type(self), (self.args[0], self.code)


class SessionNotFoundError(NotFoundError):
    """No such session (conversation), or not the caller's."""

    code = "session_not_found"


class StoreUnavailableError(RuntimeError):
    """A backend (Redis) cannot be reached; nothing was written and the request may be retried later."""


class LimitReachedError(Exception):
    """A count bound of the caller's data is reached (sessions per owner, turns per session)."""

    def __init__(self, message: str, code: str):
        super().__init__(message)
        self.code = code


# Raised by the session store, the event log or the locks when Redis cannot be reached: answered with 503.
STORE_ERRORS = (StoreUnavailableError, RedisConnectionError, RedisTimeoutError)


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
    if isinstance(exc, NotFoundError):
        return ApiError(404, str(exc.args[0]) if exc.args else exc.code, code=exc.code)
    if isinstance(exc, LimitReachedError):
        return ApiError(409, str(exc), code=exc.code)
    if isinstance(exc, (BackPressureError, EngineOverloadedError)):
        return ApiError(503, "the model is at capacity, retry shortly", "server_error", code="overloaded",
                        retry_after_s=1)
    if isinstance(exc, (DeploymentUnavailableError, EngineDeadError)):
        logger.warning("model unavailable: %r", exc)
        return ApiError(503, "the model is unavailable, retry shortly", "server_error", code="unavailable",
                        retry_after_s=5)
    if isinstance(exc, STORE_ERRORS):
        # Nothing was written: the client may retry the same request once the store is back.
        logger.warning("dialogue store unavailable: %s", exc)  # the address stays in the log, not the answer
        return ApiError(503, "dialogue store unavailable, retry later", "server_error", code="store_unavailable",
                        retry_after_s=5)
    # A bug: the details go to the log under an id, never into the answer.
    error_id = uuid.uuid4().hex[:12]
    logger.error("internal error %s", error_id, exc_info=exc)
    return ApiError(500, f"internal error (id {error_id})", "server_error", code="internal_error")
