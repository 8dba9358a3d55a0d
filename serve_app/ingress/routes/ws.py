"""``/v1/ws``: the WebSocket chat protocol (``ws_protocol.py``, ``docs/websocket.md``), and
``POST /v1/ws-ticket``, which trades a credential for a short-lived ticket a browser can put in the
socket's URL (``/v1/ws?ticket=...``: browsers cannot set headers on a WebSocket). A handshake
without valid credentials is refused (close code 1008, policy violation) before it is accepted."""

from fastapi import APIRouter, WebSocket

from ...errors import ApiError
from ..identity import Caller
from ..services import Svc
from ..ws_protocol import WsConnection

router = APIRouter()


@router.post("/v1/ws-ticket")
async def ws_ticket(svc: Svc, caller: Caller) -> dict:
    ttl_s = svc.settings.auth.ticket_ttl_s
    return {"ticket": await svc.auth.tickets.issue(caller, ttl_s), "expires_in_s": ttl_s}


@router.websocket("/v1/ws")
async def websocket(ws: WebSocket, svc: Svc):
    try:
        identity = await svc.auth.identify(ws)
    except ApiError as exc:
        svc.metrics.error(exc.status, exc.code)
        await ws.close(code=1008, reason=exc.message[:120])
        return
    await ws.accept()
    await WsConnection(svc, ws, identity).serve()
