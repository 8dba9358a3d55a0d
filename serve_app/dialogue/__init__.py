"""The ``DialogueState`` deployment: sessions, history, and each next prompt within a token budget."""

from .deployment import DialogueState

__all__ = ["DialogueState"]
