"""The ``Ingress`` deployment: OpenAI-compatible HTTP + SSE, the sessions API, the WebSocket chat
protocol, the pages. Routes: ``routes/``; a turn's stages: ``turns.py``; reading replies: ``replies.py``."""

from .deployment import Ingress

__all__ = ["Ingress"]
