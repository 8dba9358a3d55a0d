"""The browser pages: the chat page at ``/``, the ops page at ``/ops``, their files under ``/static``.

Plain HTML/JS/CSS from ``serve_app/ingress/static/`` (no build step); the markdown renderer and the HTML
sanitizer are vendored in ``static/vendor/``. The ingress includes this router. The routes are
module-level functions, so the static folder is found where the replica imports this package,
not where the application was built.

The pages are public (they hold no data; the API calls they make carry the user's key). Every
response sends a Content-Security-Policy that allows scripts, styles, fonts and connections to this
origin only and images from here or ``data:`` (so a reply's markdown cannot load remote content or
post a form), and forbids framing (clickjacking): ``frame-ancestors 'none'`` and ``X-Frame-Options``.
"""

import mimetypes
from pathlib import Path

from fastapi import APIRouter, HTTPException
from fastapi.responses import FileResponse

STATIC_DIR = Path(__file__).resolve().parent.parent / "static"
SECURITY_HEADERS = {
    "Content-Security-Policy": "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
                               "font-src 'self'; connect-src 'self'; frame-ancestors 'none'; form-action 'self'; "
                               "base-uri 'none'",
    "X-Frame-Options": "DENY",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-cache",
}

router = APIRouter(include_in_schema=False)


def _page(name: str) -> FileResponse:
    return FileResponse(STATIC_DIR / name, media_type="text/html", headers=SECURITY_HEADERS)


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
    return FileResponse(file, media_type=media_type, headers=SECURITY_HEADERS)
