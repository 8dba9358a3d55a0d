"""Who is calling, from verified credentials only.

Every request but the health checks and the static pages is authenticated by
:meth:`Authenticator.identify`, in this order:

1. ``Authorization: Bearer <credential>``: an API key (``cs-...``, ``keys.py``), or, when
   ``auth.jwt`` is set, a JWT verified against the provider's JWKS (from its URL, or a file):
   signature, expiry, and the configured issuer and audience; the user is its ``user_claim``.
2. On a WebSocket, ``?ticket=...``: a short-lived ticket the caller got from ``POST /v1/ws-ticket``
   with its credential (browsers cannot send headers on a WebSocket). A ticket is an HMAC-signed
   identity with an expiry; the secret is random per process, or shared through Redis with
   ``store: redis`` so any ingress replica accepts any ticket.
3. With ``auth.trusted_proxy`` set, the proxy's user header. Only then is a header believed.

``auth.mode: none`` turns all of this off: the caller names itself with ``X-User-Id`` (or ``?user=``
on a WebSocket) and is an admin. That is for a trial on loopback; the ingress logs a warning at start.
Owners: ``user:<name>`` for API keys, the proxy and mode none; ``oidc:<claim>`` for JWTs.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import json
import logging
import secrets
import time
from dataclasses import dataclass
from pathlib import Path

import jwt
import redis.asyncio as aioredis
from starlette.requests import HTTPConnection

from ..config import AuthSettings
from ..errors import ApiError
from .keys import KeyStore, verify

logger = logging.getLogger("ray.serve")


@dataclass(frozen=True)
class Identity:
    owner: str  # what sessions, replies and limits are scoped to
    user: str  # the name shown to others (rooms)
    admin: bool
    via: str  # key | jwt | ticket | proxy | none
    # An API key's own limits (None: ``args.limits``).
    requests_per_min: int | None = None
    tokens_per_min: int | None = None
    max_concurrent_replies: int | None = None


def unauthorized(message: str) -> ApiError:
    return ApiError(401, message, type="authentication_error", code="invalid_api_key")


class TicketSigner:
    """``base64url(json) + "." + hmac``; the JSON holds the identity and its expiry. The secret is
    random per process, or, given a Redis client, one random secret shared by every replica (made
    by the first that needs it)."""

    def __init__(self, client: aioredis.Redis | None = None, key_prefix: str = "chatserve:"):
        self.client = client
        self.key = f"{key_prefix}ticket-secret"
        self._secret: bytes | None = None if client is not None else secrets.token_bytes(32)

    async def _mac(self, payload: bytes) -> str:
        if self._secret is None:
            await self.client.set(self.key, secrets.token_hex(32), nx=True)
            self._secret = bytes.fromhex(await self.client.get(self.key))
        digest = hmac.new(self._secret, payload, hashlib.sha256).digest()
        return base64.urlsafe_b64encode(digest).decode().rstrip("=")

    async def issue(self, identity: Identity, ttl_s: float) -> str:
        payload = base64.urlsafe_b64encode(json.dumps(
            {"o": identity.owner, "u": identity.user, "a": identity.admin, "e": time.time() + ttl_s,
             "l": [identity.requests_per_min, identity.tokens_per_min, identity.max_concurrent_replies]}).encode())
        payload = payload.rstrip(b"=")
        return payload.decode() + "." + await self._mac(payload)

    async def verify(self, ticket: str) -> Identity | None:
        payload, _, mac = ticket.partition(".")
        if not payload or not hmac.compare_digest(mac, await self._mac(payload.encode())):
            return None
        try:
            data = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
        except ValueError:
            return None
        if data["e"] < time.time():
            return None
        return Identity(data["o"], data["u"], data["a"], "ticket", *data["l"])


class JwksFile:
    """A JWKS kept in a file, read again when it changes; the same lookup as PyJWT's URL client."""

    def __init__(self, path: str):
        self.path = Path(path)
        self._stamp: tuple[int, int] | None = None
        self._keys: jwt.PyJWKSet | None = None

    def get_signing_key_from_jwt(self, token: str) -> jwt.PyJWK:
        st = self.path.stat()
        if (st.st_mtime_ns, st.st_size) != self._stamp:
            self._keys, self._stamp = jwt.PyJWKSet.from_json(self.path.read_text()), (st.st_mtime_ns, st.st_size)
        kid = jwt.get_unverified_header(token).get("kid")
        for key in self._keys.keys:
            if key.key_id == kid or (kid is None and len(self._keys.keys) == 1):
                return key
        raise jwt.PyJWKClientError(f"no key {kid!r} in {self.path}")


class Authenticator:
    def __init__(self, settings: AuthSettings, key_stores: list[KeyStore], tickets: TicketSigner):
        self.settings = settings
        self.key_stores = key_stores
        self.tickets = tickets
        jwt_settings = settings.jwt
        self._jwks = None if jwt_settings is None else (
            JwksFile(jwt_settings.jwks_file) if jwt_settings.jwks_file else jwt.PyJWKClient(jwt_settings.jwks_url))

    async def identify(self, conn: HTTPConnection) -> Identity:
        """The caller, or a 401 saying what is missing or wrong."""
        if self.settings.mode == "none":
            name = conn.headers.get("x-user-id") or (conn.query_params.get("user")
                                                     if conn.scope["type"] == "websocket" else None)
            return Identity(owner=f"user:{name or 'anonymous'}", user=name or "anonymous", admin=True, via="none")
        auth = conn.headers.get("authorization", "")
        if auth:
            scheme, _, credential = auth.partition(" ")
            if scheme.lower() != "bearer" or not credential.strip():
                raise unauthorized("the Authorization header must be 'Bearer <API key or token>'")
            return await self._bearer(credential.strip())
        if conn.scope["type"] == "websocket" and "ticket" in conn.query_params:
            identity = await self.tickets.verify(conn.query_params["ticket"])
            if identity is None:
                raise unauthorized("the WebSocket ticket is invalid or expired; get a new one from POST /v1/ws-ticket")
            return identity
        proxy = self.settings.trusted_proxy
        if proxy is not None and conn.headers.get(proxy.user_header):
            user = conn.headers[proxy.user_header]
            return Identity(owner=f"user:{user}", user=user, admin=user in proxy.admin_users, via="proxy")
        raise unauthorized("missing credentials: send 'Authorization: Bearer <API key>' "
                           "(a key is made with `python -m serve_app.admin keys create`)")

    async def _bearer(self, credential: str) -> Identity:
        if credential.startswith("cs-"):
            record = await verify(credential, self.key_stores)
            if record is None:
                raise unauthorized("invalid or revoked API key")
            return Identity(owner=f"user:{record.user}", user=record.user, admin=record.admin, via="key",
                            requests_per_min=record.requests_per_min, tokens_per_min=record.tokens_per_min,
                            max_concurrent_replies=record.max_concurrent_replies)
        if self._jwks is None or credential.count(".") != 2:
            raise unauthorized("invalid API key")
        settings = self.settings.jwt
        try:
            signing_key = await asyncio.to_thread(self._jwks.get_signing_key_from_jwt, credential)  # may fetch
            claims = jwt.decode(credential, signing_key.key, algorithms=settings.algorithms,
                                audience=settings.audience, issuer=settings.issuer,
                                options={"require": ["exp"], "verify_aud": settings.audience is not None})
        except (jwt.PyJWTError, ValueError) as exc:
            raise unauthorized(f"invalid token: {exc}") from None
        user = claims.get(settings.user_claim)
        if not isinstance(user, str) or not user:
            raise unauthorized(f"the token has no '{settings.user_claim}' claim naming the user")
        return Identity(owner=f"oidc:{user}", user=user, admin=user in settings.admin_users, via="jwt")
