"""The route dependencies that say who is calling (``auth.py`` verifies the credentials).

``Caller`` is the verified :class:`~serve_app.ingress.auth.Identity` (401 without one) and counts the
request against the caller's requests-per-minute (429 beyond); ``Owner`` is its owner id, what
sessions and replies are scoped to; ``Admin`` also requires admin scope (403 without).
"""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends
from starlette.requests import HTTPConnection

from ..errors import ApiError
from .auth import Identity
from .services import current_services


async def authenticated(conn: HTTPConnection) -> Identity:
    services = current_services()
    identity = await services.auth.identify(conn)
    await services.limits.check_request(identity)
    return identity


Caller = Annotated[Identity, Depends(authenticated)]


async def _owner(identity: Caller) -> str:
    return identity.owner


async def _admin(identity: Caller) -> Identity:
    if not identity.admin:
        raise ApiError(403, "this needs an admin key", type="permission_error", code="admin_only")
    return identity


Owner = Annotated[str, Depends(_owner)]
Admin = Annotated[Identity, Depends(_admin)]
