"""Session fixtures: the default engine artifact, one real Ray Serve application for the whole
integration suite, and a real Redis server."""

import os
import uuid

import pytest
import ray
import redis
from ray import serve

from engines.artifacts import DEFAULT_ARTIFACT_DIR
from serve_app.app import build_app
from serve_app.redis_client import DEFAULT_REDIS_URL

from .apps import (
    RUN_PREFIX,
    TEST_ARGS,
    answers_ping,
    create_database,
    drop_database,
    free_port,
    postgres_admin_url,
    redis_graph,
    start_redis_server,
)

GPU_SKIP_REASON = "needs an NVIDIA GPU (torch.cuda.is_available() is False)"


def pytest_collection_modifyitems(config, items):
    """``gpu``-marked tests run where torch sees a CUDA device and are skipped, with the reason, elsewhere."""
    gpu_items = [item for item in items if item.get_closest_marker("gpu") is not None]
    if not gpu_items:
        return
    import torch

    if not torch.cuda.is_available():
        for item in gpu_items:
            item.add_marker(pytest.mark.skip(reason=GPU_SKIP_REASON))


@pytest.fixture(scope="session")
def artifact_dir() -> str:
    if not (DEFAULT_ARTIFACT_DIR / "manifest.json").exists():
        pytest.fail("default artifact missing: run `make setup` (python -m engines.build)")
    return str(DEFAULT_ARTIFACT_DIR)


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


@pytest.fixture(scope="session")
def redis_url(tmp_path_factory):
    """REDIS_URL (or 127.0.0.1:6379) if it answers PING, else a private redis-server on a free port."""
    url = os.environ.get("REDIS_URL") or DEFAULT_REDIS_URL
    server = None
    if not answers_ping(url):
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


@pytest.fixture(scope="session")
def app_postgres_url() -> str:
    """The PostgreSQL database of the app on Redis + PostgreSQL (dropped after the run)."""
    url = create_database(postgres_admin_url())
    yield url
    drop_database(postgres_admin_url(), url)


@pytest.fixture(scope="session")
def redis_base_url(serve_app, redis_url, app_postgres_url):
    serve.run(redis_graph(redis_url, app_postgres_url), name="redis", route_prefix="/redis")
    yield serve_app + "/redis"
    serve.delete("redis")


@pytest.fixture(params=["memory", "redis"])
def any_store_url(request) -> str:
    """The app on the in-memory store, then the app on Redis + PostgreSQL with two ingress replicas."""
    return request.getfixturevalue("base_url" if request.param == "memory" else "redis_base_url")


@pytest.fixture
def postgres_db() -> str:
    """A new empty PostgreSQL database of this test's own (dropped after): its URL."""
    url = create_database(postgres_admin_url())
    yield url
    drop_database(postgres_admin_url(), url)
