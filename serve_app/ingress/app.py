"""The ingress's FastAPI app: error handlers (every error is an OpenAI-shaped body with a status,
and ``Retry-After`` on 429/503), the middleware (request body size, ``X-Served-By``), and the
routers of ``routes/``. The ``Ingress`` deployment (``deployment.py``) serves it."""

from __future__ import annotations

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse

from ..errors import STORE_ERRORS, ApiError, to_api_error
from .middleware import BodyLimit, ServedBy
from .routes import admin, conversations, health, openai, ops, pages, responses, sessions, ws
from .services import current_services

app = FastAPI(title="chatserve", description="OpenAI-compatible chat serving on Ray Serve")


@app.exception_handler(ApiError)
async def _api_error(_: Request, exc: ApiError) -> JSONResponse:
    current_services().metrics.error(exc.status, exc.code or exc.type)
    return JSONResponse(exc.body(), status_code=exc.status, headers=exc.headers())


async def _mapped_error(request: Request, exc: Exception) -> JSONResponse:
    return await _api_error(request, to_api_error(exc))


for _store_exc in STORE_ERRORS:  # the store or the event log cannot reach Redis: 503
    app.add_exception_handler(_store_exc, _mapped_error)
app.add_exception_handler(Exception, _mapped_error)  # a bug: 500 with an error id, details in the log


@app.exception_handler(RequestValidationError)
async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
    first = exc.errors()[0] if exc.errors() else {}
    loc = [str(p) for p in first.get("loc", []) if p != "body"]
    message = f"{'.'.join(loc) or 'body'}: {first.get('msg', 'invalid request').removeprefix('Value error, ')}"
    return await _api_error(request, ApiError(400, message, param=".".join(loc) or None))


app.add_middleware(ServedBy)
app.add_middleware(BodyLimit)  # outermost: a large body is refused before anything reads it
for _routes in (health, openai, responses, conversations, sessions, ws, ops, admin, pages):
    app.include_router(_routes.router)
