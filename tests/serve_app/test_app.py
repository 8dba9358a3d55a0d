"""The graph and where its settings come from: ``serve run`` / ``serve deploy serve_config.yaml``
build the app through Serve's own builder check; deployment options come from the config file
alone; engine defaults from ``EngineConfig`` alone; ``python -m serve_app.config`` lists them all."""

import dataclasses
import importlib
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from ray.serve import Application
from ray.serve._private.api import call_user_app_builder_with_args_if_necessary

from engines.config import EngineConfig
from serve_app.app import CONFIG_FILE, build_graph, deployment_options
from serve_app.config import AppSettings, ModelSettings

CONFIG = Path(__file__).resolve().parents[2] / "serve_config.yaml"


def test_the_config_files_builder_passes_serves_check():
    (app,) = yaml.safe_load(CONFIG.read_text())["applications"]
    module, _, attr = app["import_path"].partition(":")
    builder = getattr(importlib.import_module(module), attr)
    # What Serve does with import_path + args: a builder must take exactly one parameter.
    assert isinstance(call_user_app_builder_with_args_if_necessary(builder, app["args"]), Application)


def _deployments(application: Application) -> dict:
    """name -> Deployment of a built graph (the ingress and, recursively, what it binds)."""
    found, todo = {}, [application]
    while todo:
        deployment = todo.pop()._bound_deployment
        found[deployment.name] = deployment
        todo += [a for a in (*deployment.init_args, *deployment.init_kwargs.values()) if isinstance(a, Application)]
    return found


def test_python_callers_get_the_config_files_deployment_options_with_overrides():
    assert CONFIG_FILE == CONFIG
    written = deployment_options()
    graph = _deployments(build_graph({}, options={"Ingress": {"num_replicas": 3}}))
    assert set(graph) == set(written) == {"Ingress", "DialogueState", "ModelServer", "OpsCollector"}
    model = graph["ModelServer"]
    assert model.max_ongoing_requests == written["ModelServer"]["max_ongoing_requests"]
    assert model._deployment_config.autoscaling_config.max_replicas == \
        written["ModelServer"]["autoscaling_config"]["max_replicas"]
    assert model._deployment_config.request_router_config.request_router_class == \
        written["ModelServer"]["request_router_config"]["request_router_class"]
    assert graph["DialogueState"].max_ongoing_requests == written["DialogueState"]["max_ongoing_requests"]
    assert graph["Ingress"].num_replicas == 3  # the override, laid over the file's 1


def test_an_unknown_deployment_in_the_config_is_refused(tmp_path):
    config = tmp_path / "serve_config.yaml"
    config.write_text("applications:\n  - name: chat\n    deployments:\n      - name: Typo\n        num_replicas: 1\n")
    with pytest.raises(ValueError, match="unknown deployments \\['Typo'\\]"):
        deployment_options(config)


def test_engine_settings_take_their_defaults_from_engine_config():
    engine_fields = {f.name: f.default for f in dataclasses.fields(EngineConfig)}
    settings_fields = set(ModelSettings.model_fields) - {"served_model_name"}
    assert settings_fields == set(engine_fields), "ModelSettings and EngineConfig must have the same fields"
    for name in settings_fields - {"model"}:
        assert ModelSettings.model_fields[name].default == engine_fields[name], name
    assert dataclasses.asdict(ModelSettings(model="m").engine_config()) == {**engine_fields, "model": "m"}


def test_the_settings_listing_is_yaml_of_every_default():
    listing = subprocess.run([sys.executable, "-m", "serve_app.config"], capture_output=True, text=True, check=True)
    assert AppSettings.model_validate(yaml.safe_load(listing.stdout)) == AppSettings()
    assert "context_budget_tokens: null  # Prompt tokens a session's next turn may use" in listing.stdout
