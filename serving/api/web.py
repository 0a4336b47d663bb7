"""The web pages: the chat page at `/` and the dashboard at `/dashboard`, plain HTML/CSS/JS from serving/web/.

No build step and nothing from a CDN: the pages and their scripts (ES modules) are files in serving/web/,
served as they are.
"""

from __future__ import annotations

from pathlib import Path

from litestar import Controller, MediaType, get
from litestar.datastructures import CacheControlHeader
from litestar.response import File
from litestar.static_files import create_static_files_router

WEB_DIR = Path(__file__).resolve().parent.parent / "web"

# Browsers revalidate on every load (a cheap 304), so an upgraded server never runs yesterday's scripts.
REVALIDATE = CacheControlHeader(no_cache=True)


class WebController(Controller):
    include_in_schema = False
    cache_control = REVALIDATE

    @get("/", media_type=MediaType.HTML)
    async def chat_page(self) -> File:
        return File(WEB_DIR / "index.html", content_disposition_type="inline")

    @get("/dashboard", media_type=MediaType.HTML)
    async def dashboard(self) -> File:
        return File(WEB_DIR / "dashboard.html", content_disposition_type="inline")


static_router = create_static_files_router(
    path="/static", directories=[WEB_DIR], cache_control=REVALIDATE, include_in_schema=False
)
