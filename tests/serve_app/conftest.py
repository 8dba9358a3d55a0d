"""One real Ray Serve application for the whole integration suite."""

import socket

import pytest
import ray
from ray import serve

from serve_app.app import build_app

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
