"""Liveness and readiness: ``/healthz`` answers while the replica runs; ``/readyz`` once a model
replica has warmed up and the dialogue deployment answers."""

import asyncio

from fastapi import APIRouter
from fastapi.responses import JSONResponse

from ..services import Svc

router = APIRouter()


@router.get("/healthz")
async def healthz() -> dict:
    return {"status": "ok"}


@router.get("/readyz")
async def readyz(svc: Svc):
    try:
        model, _ = await asyncio.wait_for(asyncio.gather(svc.model.ready.remote(), svc.dialogue.ping.remote()), 10)
    except Exception as exc:  # noqa: BLE001 - any failure means not ready
        return JSONResponse({"status": "not ready", "reason": repr(exc)[:300]}, status_code=503)
    return {"status": "ready", "model": model}
