"""``/ops/state``: the operator's view as JSON (the ``/ops`` page reads it). Admin only."""

from fastapi import APIRouter

from ...errors import ApiError
from ..calls import call
from ..identity import Admin
from ..services import Svc

router = APIRouter()


@router.get("/ops/state")
async def ops_state(svc: Svc, admin: Admin) -> dict:
    """Serve status, every model replica's engine stats, rolling TTFT and tokens/s, events."""
    if svc.ops is None:
        raise ApiError(404, "no ops collector in this deployment graph", code="not_found")
    return await call(svc.ops.snapshot.remote())
