"""The web page at ``GET /``: one HTML file, one JavaScript module and one stylesheet from ``service/static``.

The page calls the same ``POST /segment`` as any client and decodes the COCO RLE masks itself; it needs
nothing from outside the service (no CDN, works offline).
"""

from __future__ import annotations

from pathlib import Path

from fastapi import FastAPI
from fastapi.responses import FileResponse
from fastapi.staticfiles import StaticFiles

STATIC = Path(__file__).resolve().parent / "static"


def mount_page(app: FastAPI) -> None:
    """Serve the page at ``/`` and its script and stylesheet under ``/static``."""

    @app.get("/", include_in_schema=False)
    async def page() -> FileResponse:
        return FileResponse(STATIC / "index.html", media_type="text/html")

    app.mount("/static", StaticFiles(directory=STATIC), name="static")
