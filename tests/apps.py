"""What the integration tests run: the app's test settings, who the tests call as, the Redis-backed
graph, a private redis-server when none answers, throwaway PostgreSQL databases, free ports.
Fixtures built on these: ``tests/conftest.py``.

Identity: the test app trusts JWTs signed by a key made for this run (its JWKS is a file), so a test
calls as any user with :func:`token_for` (``tests/serve_app/helpers.py``: ``as_user``), with no
server-side set-up; ``ops-admin`` has admin scope. API keys have tests of their own.
"""

import asyncio
import concurrent.futures
import json
import os
import shutil
import socket
import subprocess
import tempfile
import time
import uuid
from pathlib import Path

import asyncpg
import jwt
import pytest
import redis
import sqlalchemy as sa
from cryptography.hazmat.primitives.asymmetric import rsa

from serve_app.app import build_graph

_SIGNING_KEY = rsa.generate_private_key(public_exponent=65537, key_size=2048)
_KID = uuid.uuid4().hex[:8]
JWKS_FILE = Path(tempfile.mkdtemp(prefix="chatserve-jwks-")) / "jwks.json"
JWKS_FILE.write_text(json.dumps({"keys": [{**json.loads(jwt.algorithms.RSAAlgorithm.to_jwk(
    _SIGNING_KEY.public_key())), "kid": _KID, "use": "sig", "alg": "RS256"}]}))
ISSUER, AUDIENCE, ADMIN_USER = "chatserve-tests", "chatserve", "ops-admin"
KEYS_FILE = JWKS_FILE.parent / "keys.json"  # API keys of the test app (the key tests write it)


def token_for(user: str, ttl_s: float = 3600, **claims) -> str:
    """A JWT the test app accepts as ``user``."""
    now = int(time.time())
    payload = {"sub": user, "iss": ISSUER, "aud": AUDIENCE, "iat": now, "exp": now + int(ttl_s), **claims}
    return jwt.encode(payload, _SIGNING_KEY, algorithm="RS256", headers={"kid": _KID})


TEST_ARGS = {
    # float32: these tests compare texts exactly (stream vs non-stream, batched vs alone, a known answer cut
    # at a stop string); bf16 (dtype auto's choice here) agrees only under the near-tie rule (tests/engines).
    "model": {"num_threads": 2, "kv_budget_tokens": 16384, "default_max_tokens": 64, "dtype": "float32"},
    "dialogue": {"context_budget_tokens": 512},
    "moderation": {"blocked_words": ["verboten", "forbidden phrase"], "mask_output": True},
    "auth": {"keys_file": str(KEYS_FILE),
             "jwt": {"jwks_file": str(JWKS_FILE), "issuer": ISSUER, "audience": AUDIENCE,
                     "admin_users": [ADMIN_USER]}},
    "limits": {"requests_per_min": 100_000, "tokens_per_min": 10_000_000, "max_concurrent_replies": 64},
    "ws_heartbeat_s": 1.0,
}

# Tests write Redis keys under RUN_PREFIX; the run's keys are deleted after.
RUN_PREFIX = f"chatserve-test:{uuid.uuid4().hex[:12]}:"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def answers_ping(url: str) -> bool:
    client = redis.Redis.from_url(url, socket_connect_timeout=1, socket_timeout=1)
    try:
        return bool(client.ping())
    except redis.RedisError:
        return False
    finally:
        client.close()


def start_redis_server(workdir) -> tuple[subprocess.Popen, str]:
    """A private ``redis-server`` (no persistence) on a free port: (process, url)."""
    binary = shutil.which("redis-server")
    if binary is None:
        pytest.fail("there is no redis-server binary to start: install redis-server (.ci/run does) or set REDIS_URL")
    port = free_port()
    url = f"redis://127.0.0.1:{port}/0"
    server = subprocess.Popen(
        [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no", "--dir", str(workdir)],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 10
    while not answers_ping(url):
        if server.poll() is not None or time.monotonic() > deadline:
            server.kill()
            pytest.fail(f"private redis-server on port {port} did not start: {server.communicate()[1]}")
        time.sleep(0.05)
    return server, url


def redis_graph(redis_url: str, postgres_url: str, ingress_replicas: int = 2):
    """The app on Redis in front of PostgreSQL, with two ingress replicas (and a small model replica of
    its own). Sessions idle for 2 s are archived (a sweep every 0.5 s), so its tests meet sessions in
    both tiers."""
    args = {**TEST_ARGS, "model": {**TEST_ARGS["model"], "num_threads": 1},
            "dialogue": {**TEST_ARGS["dialogue"], "store": "redis", "redis_url": redis_url,
                         "redis_key_prefix": f"{RUN_PREFIX}app:", "cold_store": "postgres",
                         "postgres_url": postgres_url, "hot_ttl_s": 2, "archive_interval_s": 0.5}}
    # No CPU reservations: the test cluster's 2 CPUs are the main app's (whose model may scale to 2).
    return build_graph(args, options={
        "ModelServer": {"num_replicas": 1, "autoscaling_config": None, "ray_actor_options": {"num_cpus": 0}},
        "Ingress": {"num_replicas": ingress_replicas, "ray_actor_options": {"num_cpus": 0}}})


# PostgreSQL: POSTGRES_URL (a database the tests may create databases from), else the local server
# with trust auth that .ci/run makes sure of.
DEFAULT_POSTGRES_URL = "postgresql://postgres@127.0.0.1:5432/postgres"


def postgres_admin_url() -> str:
    return os.environ.get("POSTGRES_URL") or DEFAULT_POSTGRES_URL


def _admin(url: str, statement: str) -> None:
    """Run one statement on its own connection (on a thread of its own: fixtures may run in an event loop)."""
    async def run() -> None:
        conn = await asyncpg.connect(sa.make_url(url).render_as_string(hide_password=False), timeout=5)
        try:
            await conn.execute(statement)
        finally:
            await conn.close()

    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        pool.submit(asyncio.run, run()).result()


def create_database(admin_url: str) -> str:
    """A new empty database ``chatserve_test_<random>``; returns its URL."""
    name = f"chatserve_test_{uuid.uuid4().hex[:12]}"
    try:
        _admin(admin_url, f'CREATE DATABASE "{name}"')
    except (OSError, asyncpg.PostgresError) as exc:
        pytest.fail(f"PostgreSQL at {admin_url} cannot create a test database ({exc!r}): start a server "
                    "(.ci/run installs and starts Debian's postgresql) or set POSTGRES_URL")
    return sa.make_url(admin_url).set(database=name).render_as_string(hide_password=False)


def drop_database(admin_url: str, url: str) -> None:
    _admin(admin_url, f'DROP DATABASE IF EXISTS "{sa.make_url(url).database}" WITH (FORCE)')
