"""The ingress replica's Prometheus metrics (names and how they are exported: ``serve_app/metrics.py``):
errors by status and code, rejections (503/429), open WebSocket connections and active sessions.
One :class:`IngressMetrics` per ingress replica, made by its constructor and passed to whatever
records (routes, the turn runner, the WebSocket protocol)."""

from __future__ import annotations

from collections import Counter as Tally

from ..metrics import REJECTION_STATUSES, metric


class IngressMetrics:
    """The ingress replica's metrics. Build it inside the replica."""

    def __init__(self) -> None:
        self.errors = metric("chatserve_errors", tag_keys=("status", "code"))
        self.rejections = metric("chatserve_rejections", tag_keys=("status", "code"))
        self.websockets = metric("chatserve_websocket_connections")
        self.active_sessions = metric("chatserve_active_sessions")
        self._sessions: Tally[str] = Tally()
        self._websockets = 0

    def error(self, status: int, code: str | None) -> None:
        tags = {"status": str(status), "code": code or "none"}
        self.errors.inc(tags=tags)
        if status in REJECTION_STATUSES:
            self.rejections.inc(tags=tags)

    def websocket_opened(self) -> None:
        self._websockets += 1
        self.websockets.set(self._websockets)

    def websocket_closed(self) -> None:
        self._websockets -= 1
        self.websockets.set(self._websockets)

    def session_entered(self, session_id: str | None) -> None:
        """A WebSocket bound to ``session_id`` or a reply started in it; pair with :meth:`session_left`."""
        if session_id is not None:
            self._sessions[session_id] += 1
            self.active_sessions.set(len(self._sessions))

    def session_left(self, session_id: str | None) -> None:
        if session_id is not None and self._sessions[session_id] > 0:
            self._sessions[session_id] -= 1
            if self._sessions[session_id] == 0:
                del self._sessions[session_id]
            self.active_sessions.set(len(self._sessions))

