"""API keys: made once, shown once, stored hashed.

A key reads ``cs-<id>-<secret>``: the 12-hex ``id`` finds its record without scanning, the secret
is 32 random bytes. Only ``sha256(key)`` is stored, compared in constant time. A record names the
user the key acts as, whether it has admin scope (``/ops``, key management), its own limits where
they differ from ``args.limits`` (a quota tier: a benchmark or a trusted service may need more
concurrent replies), and when it was revoked.

Where keys live: the keys file (``auth.keys_file``, JSON, written atomically with mode 0600 by
``python -m serve_app.admin keys ...`` and by the admin API on a single node; re-read when it
changes), and, with ``store: redis``, a Redis hash shared by every ingress replica. A key is valid if
either holds it unrevoked; new keys go to Redis when there is one, else to the file.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import os
import re
import secrets
import time
from pathlib import Path
from typing import Protocol

import redis.asyncio as aioredis
from pydantic import BaseModel, Field

KEY_RE = re.compile(r"cs-([0-9a-f]{12})-[A-Za-z0-9_-]{43}")


class ApiKeyRecord(BaseModel):
    id: str
    user: str = Field(min_length=1, max_length=128)
    admin: bool = False
    name: str | None = Field(None, max_length=200)
    requests_per_min: int | None = Field(None, ge=1)
    tokens_per_min: int | None = Field(None, ge=1)
    max_concurrent_replies: int | None = Field(None, ge=1)
    hash: str
    created_at: float = Field(default_factory=time.time)
    revoked_at: float | None = None

    def public(self) -> dict:
        """What listing shows (never the hash)."""
        return self.model_dump(exclude={"hash"})


def hash_key(key: str) -> str:
    return "sha256:" + hashlib.sha256(key.encode()).hexdigest()


def new_key(user: str, admin: bool = False, name: str | None = None, **limits) -> tuple[str, ApiKeyRecord]:
    """A fresh key and its record: give the key to its user, store the record. ``limits``: the
    key's own ``requests_per_min`` / ``tokens_per_min`` / ``max_concurrent_replies``."""
    key_id = secrets.token_hex(6)
    key = f"cs-{key_id}-{secrets.token_urlsafe(32)}"
    return key, ApiKeyRecord(id=key_id, user=user, admin=admin, name=name, hash=hash_key(key), **limits)


def key_id_of(key: str) -> str | None:
    match = KEY_RE.fullmatch(key)
    return match.group(1) if match else None


class KeyStore(Protocol):
    async def get(self, key_id: str) -> ApiKeyRecord | None: ...

    async def put(self, record: ApiKeyRecord) -> None: ...

    async def all(self) -> list[ApiKeyRecord]: ...


async def verify(key: str, stores: list[KeyStore]) -> ApiKeyRecord | None:
    """The record of a valid, unrevoked ``key`` in any of ``stores``; None otherwise."""
    key_id = key_id_of(key)
    if key_id is None:
        return None
    for store in stores:
        record = await store.get(key_id)
        if record is not None and record.revoked_at is None and hmac.compare_digest(record.hash, hash_key(key)):
            return record
    return None


async def revoke(key_id: str, stores: list[KeyStore]) -> bool:
    """Revoke ``key_id`` wherever it is; False if no store has it."""
    found = False
    for store in stores:
        record = await store.get(key_id)
        if record is not None:
            found = True
            if record.revoked_at is None:
                await store.put(record.model_copy(update={"revoked_at": time.time()}))
    return found


class FileKeyStore:
    """The keys file. Reads are cached and refreshed when the file changes (checked at most once a
    second); writes replace the file atomically."""

    def __init__(self, path: Path):
        self.path = path
        self._records: dict[str, ApiKeyRecord] = {}
        self._stamp: tuple[int, int] | None = None
        self._checked_s = 0.0

    def _load(self) -> None:
        now = time.monotonic()
        if now - self._checked_s < 1.0 and self._stamp is not None:
            return
        self._checked_s = now
        try:
            st = self.path.stat()
        except FileNotFoundError:
            self._records, self._stamp = {}, (0, 0)
            return
        if (st.st_mtime_ns, st.st_size) != self._stamp:
            data = json.loads(self.path.read_text() or "{}")
            self._records = {r["id"]: ApiKeyRecord.model_validate(r) for r in data.get("keys", [])}
            self._stamp = (st.st_mtime_ns, st.st_size)

    def load_now(self) -> dict[str, ApiKeyRecord]:
        self._stamp = None
        self._load()
        return dict(self._records)

    def write(self, record: ApiKeyRecord) -> None:
        """Add or replace ``record`` (synchronous: the CLI's way in)."""
        records = self.load_now()
        records[record.id] = record
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            json.dump({"keys": [r.model_dump() for r in records.values()]}, f, indent=2)
        os.replace(tmp, self.path)
        self.load_now()

    async def get(self, key_id: str) -> ApiKeyRecord | None:
        self._load()
        return self._records.get(key_id)

    async def put(self, record: ApiKeyRecord) -> None:
        await asyncio.to_thread(self.write, record)

    async def all(self) -> list[ApiKeyRecord]:
        self._load()
        return list(self._records.values())


class RedisKeyStore:
    """Key records in one Redis hash, ``{prefix}apikeys``: id -> record JSON."""

    def __init__(self, client: aioredis.Redis, key_prefix: str = "chatserve:"):
        self.redis = client
        self.key = f"{key_prefix}apikeys"

    async def get(self, key_id: str) -> ApiKeyRecord | None:
        raw = await self.redis.hget(self.key, key_id)
        return None if raw is None else ApiKeyRecord.model_validate_json(raw)

    async def put(self, record: ApiKeyRecord) -> None:
        await self.redis.hset(self.key, record.id, record.model_dump_json())

    async def all(self) -> list[ApiKeyRecord]:
        return [ApiKeyRecord.model_validate_json(v) for v in (await self.redis.hgetall(self.key)).values()]
