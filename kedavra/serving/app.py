"""The ASGI app: AUTOMATIC1111's /sdapi/v1 API (kedavra.serving.routes) over a `Worker`, and the web page at /.

    create_app(worker, ServerConfig(api_key=None, max_body_bytes=20 * 2**20, loopback_only=True)) -> FastAPI

Every request passes, in order: the Host check (while the server is local-only, a Host header that is not a
loopback name is refused 403, so a web page that rebinds its DNS name to 127.0.0.1 cannot drive the API), the
API key (when one is set, every path but the page and the API description needs "Authorization: Bearer KEY" or
HTTP basic auth with KEY as the password, else 401 before the body is read), the body limit (413 as soon as the
declared or received size passes it), then the route: its fields (422 naming the bad one), the queue (503 with
Retry-After when full) and the wait for the worker (see kedavra.serving.routes; kedavra.serving.errors says how
each error is answered). The routes reach the worker through app.state.worker.
"""

from __future__ import annotations

import base64
import binascii
import ipaddress
import secrets
from collections.abc import Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

from fastapi import FastAPI
from fastapi.responses import JSONResponse, Response
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import Headers

from kedavra import __version__
from kedavra.serving.connections import CONCURRENT_REQUESTS
from kedavra.serving.errors import EXCEPTION_HANDLERS
from kedavra.serving.extras import router as extras_router
from kedavra.serving.openai_images import router as openai_router
from kedavra.serving.routes import router
from kedavra.serving.tasks import Admission
from kedavra.serving.worker import Worker
from kedavra.validation import check_int

STATIC_DIR = Path(__file__).parent / "static"
# The page's files, read once at start: a request's path only ever selects one of these, never a file.
PAGE_FILES = {
    "/": ("index.html", "text/html; charset=utf-8"),
    "/app.js": ("app.js", "text/javascript; charset=utf-8"),
    "/style.css": ("style.css", "text/css; charset=utf-8"),
}
# Paths served without the API key: the page (it asks for the key itself) and the API's description.
PUBLIC_PATHS = frozenset([*PAGE_FILES, "/docs", "/docs/oauth2-redirect", "/openapi.json", "/redoc"])
PAGE_HEADERS = {
    "Content-Security-Policy": "default-src 'self'; img-src 'self' data: blob:; style-src 'self'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
}
LOOPBACK_NAMES = ("localhost",)


@dataclass(frozen=True)
class ServerConfig:
    """How the app guards itself. loopback_only: refuse Host headers that are not a loopback name (set it when
    the server listens on the loopback only, as by default)."""

    api_key: str | None
    max_body_bytes: int
    loopback_only: bool = True
    admission: Admission = Admission()

    def __post_init__(self):
        if self.api_key is not None and (not isinstance(self.api_key, str) or not self.api_key.strip()
                                         or self.api_key != self.api_key.strip()):
            raise ValueError("api_key must be a non-empty string without spaces at its ends, or None")
        check_int("max_body_bytes", self.max_body_bytes, low=1)
        if not isinstance(self.admission, Admission):
            raise ValueError(f"admission must be an Admission, got {type(self.admission).__name__}")


def is_loopback(host: str) -> bool:
    """True for "localhost" and loopback addresses (127.0.0.0/8, ::1), with or without a port."""
    if host.startswith("["):  # "[::1]:7860"
        host = host[1:].partition("]")[0]
    elif host.count(":") == 1:  # "127.0.0.1:7860", "localhost:7860"
        host = host.partition(":")[0]
    if host.lower() in LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def is_authorized(authorization: str | None, api_key: str) -> bool:
    """"Bearer KEY", or basic auth (A1111's --api-auth, webuiapi's username/password) with KEY as the password."""
    scheme, _, credentials = (authorization or "").partition(" ")
    if scheme.lower() == "bearer":
        offered = credentials.strip()
    elif scheme.lower() == "basic":
        try:
            offered = base64.b64decode(credentials.strip(), validate=True).decode("utf-8").partition(":")[2]
        except (binascii.Error, UnicodeDecodeError):
            return False
    else:
        return False
    return secrets.compare_digest(offered.encode("utf-8"), api_key.encode("utf-8"))


class RequestGuard:
    """ASGI middleware: the Host check and the API key, before anything reads the request's body."""

    def __init__(self, app, config: ServerConfig):
        self.app = app
        self.config = config
        self.active = 0  # requests being handled (the event loop's one thread counts them)

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http":
            headers = Headers(scope=scope)
            refusal = None
            if self.active >= CONCURRENT_REQUESTS:  # uvicorn's own limit is off (kedavra.serving.connections)
                refusal = JSONResponse({"detail": f"the server is handling {self.active} requests; try again"},
                                       status_code=503, headers={"Retry-After": "1"})
            elif self.config.loopback_only and not is_loopback(headers.get("host", "")):
                refusal = JSONResponse({"detail": f"Host {headers.get('host', '')!r} is not a loopback name; this "
                                                  "server is local-only"}, status_code=403)
            elif (self.config.api_key is not None and scope["path"] not in PUBLIC_PATHS
                  and not is_authorized(headers.get("authorization"), self.config.api_key)):
                refusal = JSONResponse({"detail": "missing or wrong API key: send 'Authorization: Bearer KEY' or "
                                                  "basic auth with KEY as the password"}, status_code=401,
                                       headers={"WWW-Authenticate": 'Bearer realm="kedavra"'})
            if refusal is not None:
                await refusal(scope, receive, send)
                return
            self.active += 1
            try:
                await self.app(scope, receive, send)
            finally:
                self.active -= 1
            return
        await self.app(scope, receive, send)


# ---- the app ------------------------------------------------------------------------------------------------------


def create_app(worker: Worker, config: ServerConfig) -> FastAPI:
    """The app serving `worker`; it starts the worker when it starts and stops it when it stops."""
    app = FastAPI(title="kedavra", version=__version__, lifespan=run_worker, max_body_size=config.max_body_bytes,
                  exception_handlers=EXCEPTION_HANDLERS,
                  description="Stable Diffusion from scratch, behind AUTOMATIC1111's /sdapi/v1 API. With an API key "
                              "set, send 'Authorization: Bearer KEY' (or basic auth with KEY as the password).")
    app.state.worker = worker
    app.state.settings = {}  # A1111 settings set by POST /options (kedavra.serving.routes)
    app.state.admission = config.admission  # per-model bounds on a request's work (kedavra.serving.tasks)
    app.add_middleware(RequestGuard, config=config)
    app.include_router(router)
    app.include_router(openai_router)  # OpenAI's /v1/images/generations
    app.include_router(extras_router)  # A1111's Extras tab: upscalers
    for path, (name, media_type) in PAGE_FILES.items():
        app.add_api_route(path, page_file((STATIC_DIR / name).read_bytes(), media_type), methods=["GET"],
                          include_in_schema=False)
    return app


@asynccontextmanager
async def run_worker(app: FastAPI):
    """The app's lifespan: its worker's thread runs while the app does."""
    app.state.worker.start()
    yield
    await run_in_threadpool(app.state.worker.stop)


def page_file(content: bytes, media_type: str) -> Callable[[], Awaitable[Response]]:
    """A route answering one of the page's files, read once at start."""

    async def serve_file() -> Response:
        return Response(content, media_type=media_type, headers=PAGE_HEADERS)

    return serve_file
