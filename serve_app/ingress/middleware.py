"""ASGI middleware of the ingress app."""

from __future__ import annotations

import json

from ray import serve
from ray.serve.exceptions import RayServeException

from ..errors import ApiError
from .services import current_services


class ServedBy:
    """Every HTTP response and WebSocket handshake names the ingress replica that served it
    (``X-Served-By: <replica id>``), for operators following one request through a multi-replica
    ingress, and for tests that resume a reply on another replica. Outside a replica: no header."""

    def __init__(self, asgi_app):
        self.asgi_app = asgi_app
        self.replica: bytes | None = None

    def _replica(self) -> bytes:
        if self.replica is None:
            try:
                self.replica = serve.get_replica_context().replica_id.unique_id.encode()
            except RayServeException:
                self.replica = b""
        return self.replica

    async def __call__(self, scope, receive, send):
        if scope["type"] not in ("http", "websocket") or not self._replica():
            return await self.asgi_app(scope, receive, send)

        async def send_with_header(message):
            if message["type"] in ("http.response.start", "websocket.accept"):
                message = {**message, "headers": [*message.get("headers", []), (b"x-served-by", self.replica)]}
            await send(message)

        return await self.asgi_app(scope, receive, send_with_header)


class BodyLimit:
    """Requests whose body is larger than ``limits.max_body_bytes`` get 413, whether they say so in
    ``Content-Length`` (refused before reading) or send more than announced or chunked: the body is
    read here, at most the limit, then handed on as it came."""

    def __init__(self, asgi_app):
        self.asgi_app = asgi_app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.asgi_app(scope, receive, send)
        limit = current_services().settings.limits.max_body_bytes
        length = dict(scope["headers"]).get(b"content-length")
        if length is not None and (not length.isdigit() or int(length) > limit):
            return await self._refuse(send, limit)
        messages, size = [], 0
        while True:
            message = await receive()
            messages.append(message)
            if message["type"] != "http.request":
                break  # the client went away
            size += len(message.get("body", b""))
            if size > limit:
                return await self._refuse(send, limit)
            if not message.get("more_body", False):
                break

        async def replay():
            return messages.pop(0) if messages else await receive()

        await self.asgi_app(scope, replay, send)

    @staticmethod
    async def _refuse(send, limit: int) -> None:
        body = ApiError(413, f"request body larger than {limit} bytes", code="request_too_large").body()
        payload = json.dumps(body).encode()
        await send({"type": "http.response.start", "status": 413,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(payload)).encode())]})
        await send({"type": "http.response.body", "body": payload})
