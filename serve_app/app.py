"""The deployment graph: Ingress -> (DialogueState, ModelServer, OpsCollector); ModelServer -> OpsCollector.

``serve run serve_config.yaml`` calls :func:`build_app` with the ``args:`` mapping of the file.

Where each setting is written, once:
- application settings (``args:``): defaults in ``serve_app/config.py`` (engine ones in
  ``engines/config.py``); ``serve_config.yaml`` sets only what this deployment chooses;
- Serve's per-deployment options (replicas, autoscaling, queues, CPUs, the request router, batching):
  the ``deployments:`` list of ``serve_config.yaml``. The decorators carry only names; the builder
  applies that list, so a Python caller (the tests, the benchmarks) gets the same graph as
  ``serve run``, and a config file's own ``deployments:`` entries override it field by field, as
  Serve does.
"""

from __future__ import annotations

from pathlib import Path

import yaml
from ray.serve import Application

from .config import AppSettings
from .dialogue import DialogueState
from .ingress import Ingress
from .model import ModelServer
from .ops import OpsCollector

CONFIG_FILE = Path(__file__).resolve().parent.parent / "serve_config.yaml"
DEPLOYMENTS = ("Ingress", "DialogueState", "ModelServer", "OpsCollector")


def deployment_options(config_file: Path = CONFIG_FILE) -> dict[str, dict]:
    """The ``deployments:`` of the config's first application, by deployment name."""
    if not config_file.is_file():
        raise FileNotFoundError(f"{config_file} not found: it holds the deployments' options (install the project "
                                "from its checkout, e.g. `make setup`)")
    (app, *_) = yaml.safe_load(config_file.read_text())["applications"]
    options = {d["name"]: {k: v for k, v in d.items() if k != "name"} for d in app.get("deployments", [])}
    unknown = set(options) - set(DEPLOYMENTS)
    if unknown:
        raise ValueError(f"{config_file}: unknown deployments {sorted(unknown)}; this graph has {list(DEPLOYMENTS)}")
    return options


def build_app(args: dict | None = None) -> Application:
    """The builder ``import_path`` names. Serve requires a builder to take exactly one parameter."""
    return build_graph(args)


def build_graph(args: dict | None = None, options: dict[str, dict] | None = None) -> Application:
    """``options``: per deployment name, Serve options laid over those of ``serve_config.yaml``."""
    settings = AppSettings.model_validate(args or {})
    merged = deployment_options()
    for name, extra in (options or {}).items():
        merged[name] = {**merged.get(name, {}), **extra}
    ops = OpsCollector.options(**merged.get("OpsCollector", {})).bind()
    model = ModelServer.options(**merged.get("ModelServer", {})).bind(settings.model, ops)
    dialogue = DialogueState.options(**merged.get("DialogueState", {})).bind(settings)
    return Ingress.options(**merged.get("Ingress", {})).bind(model, dialogue, settings, ops)
