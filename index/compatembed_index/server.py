"""The FastAPI app: thin routes over :class:`~compatembed_index.api.IndexService`.

* Bodies are pydantic models with ``extra="forbid"`` and strict types; array content (shape, NaN,
  dimension) is checked by the core, which raises typed errors.
* Every :class:`~compatembed_index.errors.IndexServiceError` is mapped once to
  ``{"error": name, "message": ...}`` with its status; request validation errors become 422 with the
  same shape; anything else is logged and answered 500.
* FAISS and SQLite work runs in a worker thread (``anyio.to_thread``); the core's readers-writer locks
  serialise mutations against searches.
* Bodies above ``max_body_bytes`` get 413 (by Content-Length, or while streaming without one).
* With an API key configured, writes need ``X-API-Key: <key>`` or ``Authorization: Bearer <key>``.
"""

from __future__ import annotations

import hmac
import logging
import threading
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any, TypeVar

import anyio.to_thread
from fastapi import Depends, FastAPI, HTTPException, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from pydantic import BaseModel, ConfigDict, Field
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from compatembed_index.api import IndexService
from compatembed_index.errors import IndexServiceError, NotReadyError, UnauthorizedError
from compatembed_index.settings import IndexSettings

_logger = logging.getLogger(__name__)
T = TypeVar("T")

Matrix = list[list[float]]


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


class RegisterVersionBody(_Body):
    """Register a model version directory readable by the server."""

    path: str


class CreateCollectionBody(_Body):
    """Create a collection (see :class:`~compatembed_index.collection.CollectionConfig`)."""

    name: str
    factory: str = "Flat"
    factories: dict[str, str] = Field(default_factory=dict)
    search_params: str = ""
    train_size: int | None = None
    device: str = "cpu"


class SearchBody(_Body):
    """A batch of queries of one model version."""

    version: str
    vectors: Matrix
    k: int = 10
    allow_partial: bool = False
    include_metadata: bool = True


class AddBody(_Body):
    """Items embedded by one model version."""

    version: str
    ids: list[int]
    vectors: Matrix
    metadata: list[dict[str, Any] | None] | None = None
    upsert: bool = False


class UpgradeBody(_Body):
    """New vectors of existing items from another version (partial backfill)."""

    version: str
    ids: list[int]
    vectors: Matrix
    metadata: list[dict[str, Any] | None] | None = None


class IdsBody(_Body):
    """Ids of items (to delete, or to look up)."""

    ids: list[int]


class MaterialiseBody(_Body):
    """Forward-upgrade segment ``source`` into ``target``'s space."""

    source: str
    target: str


class CalibrateBody(_Body):
    """Fit the score calibration of one route from held-out queries."""

    query_version: str
    segment_version: str
    vectors: Matrix
    k: int = 10
    ids: list[int] | None = None  # ids of the queries when they are stored items (their own match is left out)


class CalibrationBody(_Body):
    """Set one route's score map explicitly."""

    query_version: str
    segment_version: str
    scale: float
    shift: float


class AliasBody(_Body):
    """Point an alias at a collection."""

    collection: str


class _TooLarge(HTTPException):  # FastAPI re-raises its own HTTPException from body parsing
    def __init__(self, limit: int) -> None:
        super().__init__(413, f"request body is larger than the limit of {limit} bytes")


class BodyLimitMiddleware:
    """Answer 413 to bodies above ``max_bytes``, by header or while they stream in."""

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = dict(scope.get("headers") or [])
        length = headers.get(b"content-length")
        if length is not None:
            try:
                too_big = int(length) > self.max_bytes
            except ValueError:
                await _plain_error(send, 400, "InvalidInputError", "invalid Content-Length header")
                return
            if too_big:
                await _plain_error(send, 413, "LimitExceededError",
                                   f"request body is larger than the limit of {self.max_bytes} bytes")
                return
        seen = 0

        async def limited() -> Message:
            nonlocal seen
            msg = await receive()
            if msg["type"] == "http.request":
                seen += len(msg.get("body", b""))
                if seen > self.max_bytes:
                    raise _TooLarge(self.max_bytes)
            return msg

        await self.app(scope, limited, send)


class MetricsMiddleware:
    """Count requests by method, route and status, and time them, for ``/metrics``.

    A plain ASGI middleware: Starlette's ``@app.middleware("http")`` runs every request in an extra task
    behind a memory stream, a cost that showed in the latency of every request, /health included.
    """

    def __init__(self, app: ASGIApp, requests: Counter, latency: Histogram) -> None:
        self.app, self.requests, self.latency = app, requests, latency

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        t0 = time.perf_counter()
        status = 500  # what the client sees if the app raises before it starts a response

        async def send_status(msg: Message) -> None:
            nonlocal status
            if msg["type"] == "http.response.start":
                status = msg["status"]
            await send(msg)

        try:
            await self.app(scope, receive, send_status)
        finally:
            path = getattr(scope.get("route"), "path", "unmatched")
            self.requests.labels(scope["method"], path, str(status)).inc()
            self.latency.labels(path).observe(time.perf_counter() - t0)


async def _plain_error(send: Send, status: int, name: str, message: str) -> None:
    import json

    body = json.dumps({"error": name, "message": message}).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})


def _error(status: int, name: str, message: str) -> JSONResponse:
    return JSONResponse({"error": name, "message": message}, status_code=status)


def create_app(service: IndexService | None = None, settings: IndexSettings | None = None) -> FastAPI:
    """Build the app.

    Args:
        service: a loaded service to serve (the caller keeps ownership); None: the app opens one from
            ``settings.data_dir`` at startup in a background thread (``/ready`` is 503 until it is
            loaded) and closes it, with a snapshot when ``snapshot_on_shutdown``, at shutdown.
        settings: limits, API key, data directory.
    """
    settings = settings or IndexSettings()
    state: dict[str, Any] = {"service": service}
    metrics = CollectorRegistry()
    requests = Counter("compatembed_index_requests", "HTTP requests", ["method", "route", "status"], registry=metrics)
    latency = Histogram("compatembed_index_request_seconds", "HTTP request latency", ["route"], registry=metrics)
    items = Gauge("compatembed_index_items", "Items per collection", ["collection"], registry=metrics)
    problems = Gauge("compatembed_index_load_problems", "Snapshot problems found at load", ["collection"],
                     registry=metrics)

    def _open() -> None:
        try:
            state["service"] = IndexService(settings.data_dir, max_k=settings.max_k, max_batch=settings.max_batch,
                                            mmap=settings.mmap, keep_snapshots=settings.keep_snapshots)
        except Exception as exc:  # reported by /ready and every route
            _logger.exception("failed to open the index service")
            state["error"] = exc

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        owned = service is None
        if owned:
            threading.Thread(target=_open, name="index-load", daemon=True).start()
        yield
        svc = state.get("service")
        if owned and svc is not None:
            await anyio.to_thread.run_sync(lambda: svc.close(snapshot=settings.snapshot_on_shutdown))

    app = FastAPI(title="compatembed index", version="1", lifespan=lifespan)
    app.add_middleware(BodyLimitMiddleware, max_bytes=settings.max_body_bytes)
    app.add_middleware(MetricsMiddleware, requests=requests, latency=latency)

    def svc() -> IndexService:
        s = state.get("service")
        if s is None:
            if "error" in state:
                raise NotReadyError(f"the service failed to start: {state['error']}")
            raise NotReadyError("the service is still loading its collections")
        return s

    async def run(fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        return await anyio.to_thread.run_sync(lambda: fn(*args, **kwargs))

    key = settings.api_key.get_secret_value() if settings.api_key else None

    def require_key(request: Request) -> None:
        if key is None:
            return
        given = request.headers.get("x-api-key")
        auth = request.headers.get("authorization", "")
        if given is None and auth.lower().startswith("bearer "):
            given = auth[7:].strip()
        if given is None or not hmac.compare_digest(given.encode(), key.encode()):
            raise UnauthorizedError("this write needs the API key (X-API-Key header or Authorization: Bearer)")

    write = [Depends(require_key)]

    @app.exception_handler(IndexServiceError)
    async def _service_error(request: Request, exc: IndexServiceError) -> JSONResponse:
        return _error(exc.status_code, exc.name(), str(exc))

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        parts = []
        for e in exc.errors()[:5]:
            loc = ".".join(str(p) for p in e.get("loc", ()) if p != "body")
            parts.append(f"{loc or 'body'}: {e.get('msg')}")
        return _error(422, "ValidationError", "; ".join(parts) or "invalid request")

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        name = "LimitExceededError" if exc.status_code == 413 else "HTTPError"
        return _error(exc.status_code, name, str(exc.detail))

    @app.exception_handler(Exception)
    async def _bug(request: Request, exc: Exception) -> JSONResponse:
        _logger.exception("unhandled error on %s %s", request.method, request.url.path)
        return _error(500, "InternalError", f"internal error: {type(exc).__name__}")

    # -- probes and metrics --------------------------------------------------------------------------
    @app.get("/health")
    async def health() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/ready")
    async def ready() -> JSONResponse:
        s = state.get("service")
        if s is None or not s.ready:
            return JSONResponse({"ready": False, "error": str(state.get("error", "")) or None}, status_code=503)
        return JSONResponse({"ready": True})

    @app.get("/metrics")
    async def prometheus() -> PlainTextResponse:
        s = state.get("service")
        if s is not None:
            for name in s.list_collections():
                coll = s.collection(name)
                items.labels(name).set(len(coll))
                problems.labels(name).set(len(coll.load_report))
        return PlainTextResponse(generate_latest(metrics).decode(), media_type=CONTENT_TYPE_LATEST)

    # -- versions ---------------------------------------------------------------------------------
    @app.get("/versions")
    async def list_versions() -> list[dict[str, Any]]:
        return svc().versions()

    @app.post("/versions", dependencies=write, status_code=201)
    async def register_version(body: RegisterVersionBody) -> dict[str, Any]:
        v = await run(svc().register_version, body.path)
        return {"version_id": v.version_id, "dim": v.dim, "normalized": v.normalized}

    # -- collections ------------------------------------------------------------------------------
    @app.get("/collections")
    async def list_collections() -> dict[str, Any]:
        s = svc()
        return {"collections": s.list_collections(), "aliases": s.aliases()}

    @app.post("/collections", dependencies=write, status_code=201)
    async def create_collection(body: CreateCollectionBody) -> dict[str, Any]:
        opts = body.model_dump(exclude={"name"})
        return await run(svc().create_collection, body.name, **opts)

    @app.get("/collections/{name}")
    async def collection_stats(name: str) -> dict[str, Any]:
        return await run(svc().stats, name)

    @app.delete("/collections/{name}", dependencies=write)
    async def drop_collection(name: str) -> dict[str, Any]:
        await run(svc().drop_collection, name)
        return {"dropped": name}

    @app.post("/collections/{name}/search")
    async def search(name: str, body: SearchBody) -> dict[str, Any]:
        res = await run(svc().search, name, body.version, body.vectors, body.k,
                        allow_partial=body.allow_partial, include_metadata=body.include_metadata)
        return {"results": [res.hits(i) for i in range(len(res.ids))], "routes": res.routes, "skipped": res.skipped}

    @app.post("/collections/{name}/points", dependencies=write)
    async def add_points(name: str, body: AddBody) -> dict[str, Any]:
        seq = await run(svc().add, name, body.version, body.ids, body.vectors, body.metadata, upsert=body.upsert)
        return {"added": len(body.ids), "seq": seq}

    @app.post("/collections/{name}/points/delete", dependencies=write)
    async def delete_points(name: str, body: IdsBody) -> dict[str, Any]:
        return {"deleted": await run(svc().delete, name, body.ids)}

    @app.post("/collections/{name}/points/versions")
    async def point_versions(name: str, body: IdsBody) -> dict[str, Any]:
        return {"versions": await run(svc().versions_of, name, body.ids)}

    @app.post("/collections/{name}/points/upgrade", dependencies=write)
    async def upgrade_points(name: str, body: UpgradeBody) -> dict[str, Any]:
        seq = await run(svc().upgrade, name, body.version, body.ids, body.vectors, body.metadata)
        return {"upgraded": len(body.ids), "seq": seq}

    @app.post("/collections/{name}/materialise", dependencies=write)
    async def materialise(name: str, body: MaterialiseBody) -> dict[str, Any]:
        return await run(svc().materialise, name, body.source, body.target)

    @app.post("/collections/{name}/calibrate", dependencies=write)
    async def calibrate(name: str, body: CalibrateBody) -> dict[str, Any]:
        scale, shift = await run(svc().calibrate, name, body.query_version, body.segment_version, body.vectors, body.k,
                                 query_ids=body.ids)
        return {"scale": scale, "shift": shift}

    @app.put("/collections/{name}/calibration", dependencies=write)
    async def set_calibration(name: str, body: CalibrationBody) -> dict[str, Any]:
        coll = svc().collection(name)
        await run(coll.set_calibration, body.query_version, body.segment_version, body.scale, body.shift)
        return {"calibration": coll.stats()["calibration"]}

    @app.post("/collections/{name}/snapshot", dependencies=write)
    async def snapshot(name: str) -> dict[str, Any]:
        return {"snapshots": await run(svc().snapshot, name)}

    # -- aliases ----------------------------------------------------------------------------------
    @app.get("/aliases")
    async def list_aliases() -> dict[str, str]:
        return svc().aliases()

    @app.put("/aliases/{alias}", dependencies=write)
    async def set_alias(alias: str, body: AliasBody) -> dict[str, str]:
        await run(svc().set_alias, alias, body.collection)
        return {"alias": alias, "collection": body.collection}

    @app.delete("/aliases/{alias}", dependencies=write)
    async def remove_alias(alias: str) -> dict[str, str]:
        await run(svc().remove_alias, alias)
        return {"removed": alias}

    return app
