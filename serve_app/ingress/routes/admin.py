"""Key management for admins: ``/v1/admin/keys`` creates (the key is shown once), lists (never the
key or its hash) and revokes API keys. The same from a shell: ``python -m serve_app.admin keys``."""

from fastapi import APIRouter
from pydantic import BaseModel, ConfigDict, Field

from ...errors import ApiError
from ..identity import Admin
from ..keys import new_key, revoke
from ..services import Svc

router = APIRouter()


class CreateKeyRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    user: str = Field(min_length=1, max_length=128, pattern=r"^[\w.@+-]+$")
    admin: bool = False
    name: str | None = Field(None, max_length=200)
    requests_per_min: int | None = Field(None, ge=1)
    tokens_per_min: int | None = Field(None, ge=1)
    max_concurrent_replies: int | None = Field(None, ge=1)


@router.post("/v1/admin/keys", status_code=201)
async def create_key(body: CreateKeyRequest, svc: Svc, admin: Admin) -> dict:
    key, record = new_key(**body.model_dump())
    await svc.key_stores[0].put(record)
    return {**record.public(), "key": key}


@router.get("/v1/admin/keys")
async def list_keys(svc: Svc, admin: Admin) -> dict:
    records = {r.id: r for store in reversed(svc.key_stores) for r in await store.all()}
    return {"object": "list", "data": [r.public() for r in sorted(records.values(), key=lambda r: r.created_at)]}


@router.delete("/v1/admin/keys/{key_id}", status_code=204)
async def revoke_key(key_id: str, svc: Svc, admin: Admin) -> None:
    if not await revoke(key_id, svc.key_stores):
        raise ApiError(404, f"key {key_id[:32]} not found", code="key_not_found")
