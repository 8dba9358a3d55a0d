"""The ``OpsCollector`` deployment: the operator's view behind ``/ops``."""

from .deployment import OpsCollector

__all__ = ["OpsCollector"]
