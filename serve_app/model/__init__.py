"""The ``ModelServer`` deployment: one engine per replica, and the request router that picks a
replica for each conversation (``routing.py``, run by whoever holds the handle)."""

from .deployment import ModelServer

__all__ = ["ModelServer"]
