"""``serve run`` / ``serve deploy serve_config.yaml`` build the app through Serve's own builder check."""

import importlib
from pathlib import Path

import yaml
from ray.serve import Application
from ray.serve._private.api import call_user_app_builder_with_args_if_necessary

CONFIG = Path(__file__).resolve().parents[2] / "serve_config.yaml"


def test_the_config_files_builder_passes_serves_check():
    (app,) = yaml.safe_load(CONFIG.read_text())["applications"]
    module, _, attr = app["import_path"].partition(":")
    builder = getattr(importlib.import_module(module), attr)
    # What Serve does with import_path + args: a builder must take exactly one parameter.
    assert isinstance(call_user_app_builder_with_args_if_necessary(builder, app["args"]), Application)
