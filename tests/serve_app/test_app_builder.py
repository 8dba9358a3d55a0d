"""serve_config.yaml's import_path names a builder that Serve itself accepts (`serve run`/`serve deploy`)."""

from pathlib import Path

import yaml
from ray.serve import Application
from ray.serve._private.api import call_user_app_builder_with_args_if_necessary

from serve_app import app as app_module

from .conftest import TEST_ARGS


def test_config_builder_passes_serves_own_check():
    config = yaml.safe_load((Path(__file__).resolve().parents[2] / "serve_config.yaml").read_text())
    module, name = config["applications"][0]["import_path"].split(":")
    assert module == "serve_app.app"
    built = call_user_app_builder_with_args_if_necessary(getattr(app_module, name), TEST_ARGS)
    assert isinstance(built, Application)
