"""The web pages: the chat page at `/` and the dashboard at `/dashboard`, plain HTML/CSS/JS from serving/web/."""

from __future__ import annotations

from pathlib import Path

from litestar import Controller, MediaType, get
from litestar.response import File
from litestar.static_files import create_static_files_router

WEB_DIR = Path(__file__).resolve().parent.parent / "web"


class WebController(Controller):
    include_in_schema = False

    @get("/", media_type=MediaType.HTML)
    async def chat_page(self) -> File:
        return File(WEB_DIR / "index.html", content_disposition_type="inline")

    @get("/dashboard", media_type=MediaType.HTML)
    async def dashboard(self) -> File:
        return File(WEB_DIR / "dashboard.html", content_disposition_type="inline")


static_router = create_static_files_router(path="/static", directories=[WEB_DIR], include_in_schema=False)
