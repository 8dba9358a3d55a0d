"""One real Ray Serve application for the whole integration suite, and a real Redis server."""

import os
import shutil
import socket
import subprocess
import time
import uuid

import pytest
import ray
import redis
from ray import serve

from serve_app.app import build_app, build_graph
from serve_app.redis_store import DEFAULT_REDIS_URL

TEST_ARGS = {
    "model": {"num_threads": 2, "max_seq_len": 1024, "kv_budget_tokens": 16384, "default_max_tokens": 64},
    "dialogue": {"context_budget_tokens": 512},
    "moderation": {"blocked_words": ["verboten", "forbidden phrase"], "mask_output": True},
    "ws_heartbeat_s": 1.0,
}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def metrics_port() -> int:
    return free_port()


@pytest.fixture(scope="session")
def serve_app(artifact_dir, metrics_port):
    # Ray's metrics endpoint on a free port, exporting every second (default 10 s) for the metrics tests.
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, _metrics_export_port=metrics_port,
             _system_config={"metrics_report_interval_ms": 1000})
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    serve.run(build_app(TEST_ARGS), name="chat", route_prefix="/")
    yield f"http://127.0.0.1:{port}"
    serve.shutdown()
    ray.shutdown()


@pytest.fixture(scope="session")
def metrics_url(serve_app, metrics_port) -> str:
    """Ray's Prometheus endpoint of this (single-node) cluster."""
    return f"http://127.0.0.1:{metrics_port}/metrics"


@pytest.fixture(scope="session")
def base_url(serve_app) -> str:
    return serve_app


@pytest.fixture(scope="session")
def model_handle(serve_app):
    return serve.get_deployment_handle("ModelServer", app_name="chat")


# Redis: REDIS_URL (or 127.0.0.1:6379) if it answers PING, else a private redis-server on a free port for
# this run. Tests write under RUN_PREFIX; the run's keys are deleted after.
RUN_PREFIX = f"chatserve-test:{uuid.uuid4().hex[:12]}:"


def _answers_ping(url: str) -> bool:
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
    while not _answers_ping(url):
        if server.poll() is not None or time.monotonic() > deadline:
            server.kill()
            pytest.fail(f"private redis-server on port {port} did not start: {server.communicate()[1]}")
        time.sleep(0.05)
    return server, url


@pytest.fixture(scope="session")
def redis_url(tmp_path_factory):
    url = os.environ.get("REDIS_URL") or DEFAULT_REDIS_URL
    server = None
    if not _answers_ping(url):
        server, url = start_redis_server(tmp_path_factory.mktemp("redis"))
    yield url
    client = redis.Redis.from_url(url)
    keys = list(client.scan_iter(match=f"{RUN_PREFIX}*"))
    if keys:
        client.delete(*keys)
    client.close()
    if server is not None:
        server.terminate()
        server.wait(10)


@pytest.fixture
def redis_prefix() -> str:
    """A key prefix of this test's own under the run's prefix."""
    return f"{RUN_PREFIX}{uuid.uuid4().hex[:8]}:"


def redis_graph(redis_url: str, ingress_replicas: int = 2):
    """The app on the Redis store with two ingress replicas (and a small model replica of its own)."""
    args = {**TEST_ARGS, "model": {**TEST_ARGS["model"], "num_threads": 1},
            "dialogue": {**TEST_ARGS["dialogue"], "store": "redis", "redis_url": redis_url,
                         "redis_key_prefix": f"{RUN_PREFIX}app:"}}
    # No CPU reservations: the test cluster's 2 CPUs are the main app's (whose model may scale to 2).
    return build_graph(args, model_options={"num_replicas": 1, "autoscaling_config": None,
                                            "ray_actor_options": {"num_cpus": 0}},
                       ingress_options={"num_replicas": ingress_replicas, "ray_actor_options": {"num_cpus": 0}})


@pytest.fixture(scope="session")
def redis_base_url(serve_app, redis_url):
    serve.run(redis_graph(redis_url), name="redis", route_prefix="/redis")
    yield serve_app + "/redis"
    serve.delete("redis")


@pytest.fixture(params=["memory", "redis"])
def any_store_url(request) -> str:
    """The app on the in-memory store, then the app on Redis with two ingress replicas."""
    return request.getfixturevalue("base_url" if request.param == "memory" else "redis_base_url")
