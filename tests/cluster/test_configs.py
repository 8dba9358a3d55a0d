"""The files under cluster/ agree with the code: Ray's launcher schema, serve_config.yaml, metric names."""

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from ray._private.ray_constants import PROMETHEUS_SERVICE_DISCOVERY_FILE
from ray.autoscaler._private.util import prepare_config, validate_config
from ray.serve.schema import ServeDeploySchema

from serve_app.config import AppSettings
from serve_app.metrics import METRIC_NAMES

ROOT = Path(__file__).resolve().parents[2]
CLUSTER = ROOT / "cluster"
SUFFIXES = {"counter": ("_total",), "gauge": ("",), "histogram": ("_bucket", "_sum", "_count")}


def dashboard_metric_names() -> set[str]:
    """Every ``ray_*`` metric the Grafana dashboard queries."""
    dashboard = json.loads((CLUSTER / "grafana" / "chatserve-dashboard.json").read_text())
    exprs = [t["expr"] for p in dashboard["panels"] for t in p.get("targets", [])]
    return {name for expr in exprs for name in re.findall(r"\b(ray_[a-z0-9_]+)\b", expr)}


def test_launcher_config_passes_rays_schema_and_has_the_three_node_types():
    config = yaml.safe_load((CLUSTER / "ray-cluster.yaml").read_text())
    validate_config(prepare_config(config))
    types = config["available_node_types"]
    assert set(types) == {"head", "cpu_worker", "gpu_worker"}
    assert types["gpu_worker"]["resources"]["GPU"] == 1 and types["gpu_worker"]["resources"]["model_node"] == 1
    start = " ".join(config["head_start_ray_commands"] + config["worker_start_ray_commands"])
    assert "--port=6379" not in start and "--port=" in start and start.count("--metrics-export-port=8080") == 2


@pytest.mark.parametrize("serve_config,manifest_name", [("serve_config.yaml", "rayservice.yaml"),
                                                         ("serve_config.gpu.yaml", "rayservice.gpu.yaml")])
def test_rayservice_embeds_its_serve_config(serve_config, manifest_name):
    manifest = yaml.safe_load((CLUSTER / "kuberay" / manifest_name).read_text())
    assert manifest["kind"] == "RayService"
    embedded = yaml.safe_load(manifest["spec"]["serveConfigV2"])
    assert embedded == yaml.safe_load((ROOT / serve_config).read_text())
    check = subprocess.run([sys.executable, str(CLUSTER / "embed_serve_config.py"), "--check"], capture_output=True)
    assert check.returncode == 0, check.stderr.decode()
    cluster = manifest["spec"]["rayClusterConfig"]
    groups = {g["groupName"]: g for g in cluster["workerGroupSpecs"]}
    gpu = groups["gpu-workers"]
    assert "model_node" in gpu["rayStartParams"]["resources"]
    assert gpu["template"]["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == "1"
    for spec in [cluster["headGroupSpec"], *groups.values()]:
        assert spec["rayStartParams"]["metrics-export-port"] == "8080"


def test_gpu_config_is_one_model_replica_per_gpu_within_the_gpu_group():
    config = yaml.safe_load((ROOT / "serve_config.gpu.yaml").read_text())
    ServeDeploySchema.model_validate(config)  # Serve's own schema, as `serve deploy` checks it
    (app,) = config["applications"]
    settings = AppSettings.model_validate(app["args"])
    assert settings.model.device == "cuda" and settings.model.engine_config().device == "cuda"
    model = next(d for d in app["deployments"] if d["name"] == "ModelServer")
    assert model["ray_actor_options"]["num_gpus"] == 1
    assert model["user_config"]["max_batch_size"] <= settings.model.max_running_seqs
    manifest = yaml.safe_load((CLUSTER / "kuberay" / "rayservice.gpu.yaml").read_text())
    gpu = {g["groupName"]: g for g in manifest["spec"]["rayClusterConfig"]["workerGroupSpecs"]}["gpu-workers"]
    scaling = model["autoscaling_config"]
    assert (gpu["minReplicas"], gpu["maxReplicas"]) == (scaling["min_replicas"], scaling["max_replicas"])
    # Everything but the model replicas fits the head: no CPU worker group in the GPU manifest.
    assert set({g["groupName"] for g in manifest["spec"]["rayClusterConfig"]["workerGroupSpecs"]}) == {"gpu-workers"}


def test_prometheus_follows_rays_service_discovery_file():
    config = yaml.safe_load((CLUSTER / "prometheus" / "prometheus.yml").read_text())
    files = [f for job in config["scrape_configs"] for sd in job.get("file_sd_configs", []) for f in sd["files"]]
    assert files and all(Path(f).name == PROMETHEUS_SERVICE_DISCOVERY_FILE for f in files)


def test_dashboard_queries_only_metrics_that_exist():
    names = dashboard_metric_names()
    ours = {n for n in names if n.startswith("ray_chatserve_")}
    exported = {f"ray_{name}{suffix}" for name, (kind, _) in METRIC_NAMES.items() for suffix in SUFFIXES[kind]}
    assert ours and ours <= exported, ours - exported
    defined = {n[len("ray_"):] for n in ours}
    covered = {name for name in METRIC_NAMES if any(d.startswith(name) for d in defined)}
    assert covered == set(METRIC_NAMES), f"metrics with no panel: {set(METRIC_NAMES) - covered}"
    assert any(n.startswith("ray_serve_") for n in names)  # Serve's own: replicas, queue, latency
