"""The browser pages: the chat page at ``/``, the ops page at ``/ops``, their files under ``/static``.

Plain HTML/JS/CSS from ``serve_app/static/`` (no build step); the markdown renderer and the HTML
sanitizer are vendored in ``static/vendor/``. The ingress includes this router. The routes are
module-level functions, so the static folder is found where the replica imports this package,
not where the application was built.
"""

import mimetypes
from pathlib import Path

from fastapi import APIRouter, HTTPException
from fastapi.responses import FileResponse

STATIC_DIR = Path(__file__).resolve().parent / "static"

router = APIRouter(include_in_schema=False)


def _page(name: str) -> FileResponse:
    return FileResponse(STATIC_DIR / name, media_type="text/html", headers={"Cache-Control": "no-cache"})


@router.get("/")
async def chat_page() -> FileResponse:
    return _page("index.html")


@router.get("/ops")
async def ops_page() -> FileResponse:
    return _page("ops.html")


@router.get("/static/{path:path}")
async def static_file(path: str) -> FileResponse:
    file = (STATIC_DIR / path).resolve()
    if not file.is_relative_to(STATIC_DIR) or not file.is_file():
        raise HTTPException(404, "not found")
    media_type = mimetypes.guess_type(file.name)[0] or "application/octet-stream"
    return FileResponse(file, media_type=media_type, headers={"Cache-Control": "no-cache"})
