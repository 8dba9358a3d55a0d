"""The deployment graph: Ingress -> (DialogueState, ModelServer, OpsCollector); ModelServer -> OpsCollector.

``serve run serve_config.yaml`` calls :func:`build_app` with the ``args:`` mapping of the file.
"""

from __future__ import annotations

from ray.serve import Application

from .config import AppSettings
from .dialogue import DialogueState
from .ingress import Ingress
from .model import ModelServer
from .ops import OpsCollector


def build_app(args: dict | None = None) -> Application:
    """The builder ``import_path`` names. Serve requires a builder to take exactly one parameter."""
    return build_graph(args)


def build_graph(args: dict | None = None, model_options: dict | None = None,
                ingress_options: dict | None = None) -> Application:
    """``model_options`` / ``ingress_options``: Serve deployment options for ModelServer / Ingress
    (Python callers; a config file sets them under ``deployments:``)."""
    settings = AppSettings.model_validate(args or {})
    ops = OpsCollector.bind()
    model = ModelServer.options(**(model_options or {})).bind(settings.model, ops)
    dialogue = DialogueState.bind(settings)
    return Ingress.options(**(ingress_options or {})).bind(model, dialogue, settings, ops)
