"""The FastAPI app: thin routes over :class:`~compatembed_index.api.IndexService`.

* Bodies are pydantic models with ``extra="forbid"`` and strict types; array content (shape, NaN,
  dimension) is checked by the core, which raises typed errors.
* Every :class:`~compatembed_index.errors.IndexServiceError` is mapped once to
  ``{"error": name, "message": ...}`` with its status; request validation errors become 422 with the
  same shape; anything else is logged and answered 500.
* FAISS and SQLite work runs in a worker thread (``anyio.to_thread``), reads and writes queueing for
  their threads apart (``read_threads``, ``write_threads``); the core's writer-preferring locks
  serialise mutations against searches, and concurrent searches are micro-batched.
* Vectors come as JSON rows or as base64 float32 (``vectors_b64``); search answers are encoded by orjson.
* Plain ASGI middlewares, outermost first: metrics; the API key of write routes, checked from the
  headers before anything reads the body (401); the body, received whole within
  ``body_timeout_seconds`` (else 408) and ``max_body_bytes`` (else 413, by Content-Length or while
  streaming) before the app parses it.
* With an API key configured, writes need ``X-API-Key: <key>`` or ``Authorization: Bearer <key>``.
* The OpenAPI document lists every answer of every route (``responses=``) and, with a key, the
  API-key security schemes; 405 answers carry ``Allow``.
"""

from __future__ import annotations

import base64
import binascii
import hmac
import json
import logging
import threading
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any, TypeVar

import anyio.to_thread
import numpy as np
import orjson
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.utils import get_openapi
from fastapi.responses import JSONResponse, PlainTextResponse, Response
from fastapi.routing import APIRoute
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from pydantic import BaseModel, ConfigDict, Field, model_validator
from starlette.datastructures import Headers
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import Match
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from compatembed_index.api import IndexService
from compatembed_index.errors import (
    IndexServiceError,
    InvalidInputError,
    LimitExceededError,
    NotReadyError,
    RequestTimeoutError,
    UnauthorizedError,
)
from compatembed_index.limits import Limits
from compatembed_index.settings import IndexSettings

_logger = logging.getLogger(__name__)
T = TypeVar("T")

Matrix = list[list[float]]


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


class Float32Matrix(_Body):
    """A matrix as base64 of little-endian float32 values, row-major, with its shape."""

    shape: list[int] = Field(min_length=2, max_length=2, description="[rows, columns]: columns is the version's dimension")
    data: str = Field(description="base64 of rows × columns little-endian float32 values, row-major")

    def array(self) -> np.ndarray:
        rows, cols = self.shape
        if rows < 1 or cols < 1:
            raise InvalidInputError(f"vectors_b64.shape must be positive, got {list(self.shape)}")
        try:
            raw = base64.b64decode(self.data, validate=True)
        except (binascii.Error, ValueError):
            raise InvalidInputError("vectors_b64.data is not valid base64") from None
        if len(raw) != 4 * rows * cols:
            raise InvalidInputError(f"vectors_b64.data holds {len(raw)} bytes where shape {list(self.shape)} needs "
                                    f"{4 * rows * cols} (float32)")
        return np.frombuffer(raw, dtype="<f4").reshape(rows, cols)


class _Vectors(_Body):
    """A matrix given either as JSON rows (``vectors``) or as base64 float32 (``vectors_b64``)."""

    vectors: Matrix | None = None
    vectors_b64: Float32Matrix | None = Field(
        None, description="The vectors as base64 float32 with their shape, instead of `vectors`: no float "
        "formatting or parsing on either side, for clients that send numpy arrays")

    @model_validator(mode="after")
    def _one_encoding(self) -> _Vectors:
        if (self.vectors is None) == (self.vectors_b64 is None):
            raise ValueError("give the vectors exactly once: as `vectors` (rows of numbers) or as `vectors_b64`")
        return self

    def matrix(self) -> Any:
        """The vectors: JSON rows as given, or the decoded float32 array (the core checks both alike)."""
        return self.vectors if self.vectors_b64 is None else self.vectors_b64.array()


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


class SearchBody(_Vectors):
    """A batch of queries of one model version."""

    version: str
    k: int = 10
    allow_partial: bool = False
    include_metadata: bool = True


class AddBody(_Vectors):
    """Items embedded by one model version."""

    version: str
    ids: list[int]
    metadata: list[dict[str, Any] | None] | None = None
    upsert: bool = False


class UpgradeBody(_Vectors):
    """New vectors of existing items from another version (partial backfill)."""

    version: str
    ids: list[int]
    metadata: list[dict[str, Any] | None] | None = None


class IdsBody(_Body):
    """Ids of items (to delete, or to look up)."""

    ids: list[int]


class MaterialiseBody(_Body):
    """Forward-upgrade segment ``source`` into ``target``'s space."""

    source: str
    target: str


class CalibrateBody(_Vectors):
    """Fit the score calibration of one route from held-out queries."""

    query_version: str
    segment_version: str
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


class ErrorBody(BaseModel):
    """Every error answer: the error's stable name (a class of :mod:`compatembed_index.errors`, or
    ``ValidationError``, ``HTTPError``, ``InternalError``) and a one-line message."""

    error: str
    message: str


class ReadyBody(BaseModel):
    """The readiness probe's answer."""

    ready: bool
    error: str | None = None


_DESCRIPTIONS = {
    400: "Bad input: NaN/Inf, ragged or non-numeric arrays, a zero vector, k <= 0, duplicate ids in a batch, "
         "metadata that cannot be stored, an unusable factory string or path, an invalid Content-Length",
    401: "The API key is missing or wrong (X-API-Key or Authorization: Bearer); checked before the body is read",
    404: "Unknown collection, alias, version or item",
    408: "The request body did not arrive in full within body_timeout_seconds",
    409: "No route from the query's version to a segment, an id already present, a name already taken",
    413: "Above a limit: k, batch, queries x k (max_result_slots), body, response or metadata size",
    422: "Schema violation, or a version manifest that breaks the contract",
    500: "A bug",
    503: "The service is still loading its collections, or failed to start",
}


def _responses(*codes: int) -> dict[int | str, dict[str, Any]]:
    return {c: {"model": ErrorBody, "description": _DESCRIPTIONS[c]} for c in sorted(set(codes))}


async def _send_error(send: Send, exc: IndexServiceError, *, close: bool = False,
                      headers: list[tuple[bytes, bytes]] | None = None) -> None:
    """Answer ``exc`` from a plain ASGI middleware, in the shape the app's exception handlers use."""
    body = json.dumps({"error": exc.name(), "message": str(exc)}).encode()  # ensure_ascii: always encodable
    hdrs = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()), *(headers or [])]
    if close:  # the rest of the request will not be read: the connection cannot be reused
        hdrs.append((b"connection", b"close"))
    await send({"type": "http.response.start", "status": exc.status_code, "headers": hdrs})
    await send({"type": "http.response.body", "body": body})


class RequestBodyMiddleware:
    """Receive the whole request body within ``timeout_s`` and ``max_bytes``, then hand it to the app.

    A body declared larger than ``max_bytes`` (Content-Length) is refused with 413 before anything is
    read, and so is one that grows past it while it streams in. A body that has not arrived in full
    within ``timeout_s`` (a client that declares a Content-Length and sends nothing, or trickles) gets
    408 and the connection is closed. The app then reads the buffered body at once, so nothing it does
    waits on the client.
    """

    def __init__(self, app: ASGIApp, max_bytes: int, timeout_s: float) -> None:
        self.app, self.max_bytes, self.timeout_s = app, max_bytes, timeout_s

    def _too_large(self) -> LimitExceededError:
        return LimitExceededError(f"request body is larger than the limit of {self.max_bytes} bytes (max_body_bytes)")

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        length = dict(scope.get("headers") or []).get(b"content-length")
        if length is not None:
            try:
                declared = int(length)
            except ValueError:
                await _send_error(send, InvalidInputError("invalid Content-Length header"), close=True)
                return
            if declared > self.max_bytes:
                await _send_error(send, self._too_large(), close=True)
                return
        chunks: list[bytes] = []
        seen = 0
        too_large = disconnected = False
        with anyio.move_on_after(self.timeout_s) as deadline:
            while True:
                msg = await receive()
                if msg["type"] == "http.disconnect":
                    disconnected = True
                    break
                body = msg.get("body", b"")
                seen += len(body)
                if seen > self.max_bytes:
                    too_large = True
                    break
                if body:
                    chunks.append(body)
                if not msg.get("more_body", False):
                    break
        if disconnected:
            return  # nobody to answer
        if too_large:
            await _send_error(send, self._too_large(), close=True)
            return
        if deadline.cancelled_caught:
            expected = length.decode() if length is not None else "an undeclared number of"
            await _send_error(send, RequestTimeoutError(
                f"the request body did not arrive in full within {self.timeout_s:g} s (body_timeout_seconds): "
                f"{seen} of {expected} bytes received"), close=True)
            return
        buffered: Message | None = {"type": "http.request", "body": b"".join(chunks), "more_body": False}

        async def replay() -> Message:
            nonlocal buffered
            if buffered is not None:
                msg, buffered = buffered, None
                return msg
            return await receive()  # after the body only http.disconnect is left to wait for

        await self.app(scope, replay, send)


class AuthMiddleware:
    """With an API key configured, refuse write routes without it (401), from the headers alone.

    It runs before anything reads the body, so an unauthenticated client learns nothing from how its
    body is parsed (invalid JSON without a key gets 401, not 422) and cannot make the server buffer it.
    ``write_route(scope)`` returns the matched route when it is a write route, None otherwise.
    """

    def __init__(self, app: ASGIApp, key: str | None, write_route: Callable[[Scope], Any]) -> None:
        self.app, self.key, self.write_route = app, key, write_route

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or self.key is None:
            await self.app(scope, receive, send)
            return
        route = self.write_route(scope)
        if route is None or self._authorised(scope):
            await self.app(scope, receive, send)
            return
        scope["route"] = route  # counted under its route in /metrics
        await _send_error(send, UnauthorizedError(
            "this write needs the API key (X-API-Key header or Authorization: Bearer)"), close=True,
            headers=[(b"www-authenticate", b'Bearer realm="compatembed-index"')])

    def _authorised(self, scope: Scope) -> bool:
        headers = Headers(scope=scope)
        given = headers.get("x-api-key")
        auth = headers.get("authorization", "")
        if given is None and auth.lower().startswith("bearer "):
            given = auth[7:].strip()
        assert self.key is not None
        return given is not None and hmac.compare_digest(given.encode(), self.key.encode())


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
        status: int | None = None
        raised = False

        async def send_status(msg: Message) -> None:
            nonlocal status
            if msg["type"] == "http.response.start":
                status = msg["status"]
            await send(msg)

        try:
            await self.app(scope, receive, send_status)
        except BaseException:
            raised = True
            raise
        finally:
            # no response started: 500 if the app raised (the server answers that), else the client went
            # away before an answer (a disconnect mid-body): 499, "client closed request", not a server error
            code = status if status is not None else (500 if raised else 499)
            path = getattr(scope.get("route"), "path", "unmatched")
            self.requests.labels(scope["method"], path, str(code)).inc()
            self.latency.labels(path).observe(time.perf_counter() - t0)


def uvicorn_config(app: ASGIApp, settings: IndexSettings) -> Any:
    """The uvicorn configuration ``serve`` runs ``app`` with: bind address, logging, and the keep-alive
    timeout of idle connections (``keep_alive_seconds``). The time to receive a body is bounded by the
    app itself (:class:`RequestBodyMiddleware`, ``body_timeout_seconds``)."""
    import uvicorn

    return uvicorn.Config(app, host=settings.host, port=settings.port, log_level=settings.log_level,
                          access_log=settings.access_log, timeout_keep_alive=settings.keep_alive_seconds)


class FastJSONResponse(Response):
    """JSON encoded by orjson (several times faster than the standard library on floats and nested lists)."""

    media_type = "application/json"

    def render(self, content: Any) -> bytes:
        return orjson.dumps(content, option=orjson.OPT_SERIALIZE_NUMPY)


class _ErrorResponse(JSONResponse):
    """JSON with non-ASCII escaped: an error message that quotes a caller's odd input is always encodable."""

    def render(self, content: Any) -> bytes:
        return json.dumps(content, ensure_ascii=True, allow_nan=False, separators=(",", ":")).encode()


def _error(status: int, name: str, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return _ErrorResponse({"error": name, "message": message}, status_code=status, headers=headers)


_HTTP_ERROR_NAMES = {408: "RequestTimeoutError", 413: "LimitExceededError"}
WRITE_SECURITY = [{"APIKeyHeader": []}, {"BearerAuth": []}]


def create_app(service: IndexService | None = None, settings: IndexSettings | None = None) -> FastAPI:
    """Build the app.

    Args:
        service: a loaded service to serve (the caller keeps ownership, and its own k, batch, factory,
            metadata, result and response limits); None: the app opens one from ``settings.data_dir``
            with the limits of ``settings`` at startup in a background thread (``/ready`` is 503 until
            it is loaded) and closes it, with a snapshot when ``snapshot_on_shutdown``, at shutdown.
        settings: body size and time limits, API key, data directory (and the service's limits, above).
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
                                            mmap=settings.mmap, keep_snapshots=settings.keep_snapshots,
                                            limits=Limits.from_settings(settings),
                                            batch_searches=settings.batch_searches, backend=settings.backend,
                                            milvus_uri=settings.milvus_uri, milvus_prefix=settings.milvus_prefix,
                                            move_grace_s=settings.move_grace_seconds,
                                            catalog_ttl_s=settings.catalog_ttl_seconds)
        except Exception as exc:  # reported by /ready and every route
            _logger.exception("failed to open the index service")
            state["error"] = exc

    def _startup_error() -> str:
        """Why the service failed to start, without the server's absolute paths."""
        msg = str(state.get("error", ""))
        if settings.data_dir is not None:
            for root in sorted({str(settings.data_dir), str(settings.data_dir.resolve())}, key=len, reverse=True):
                msg = msg.replace(root, "<data_dir>")
        return msg

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        owned = service is None
        if owned:
            threading.Thread(target=_open, name="index-load", daemon=True).start()
        yield
        svc = state.get("service")
        if owned and svc is not None:
            await anyio.to_thread.run_sync(lambda: svc.close(snapshot=settings.snapshot_on_shutdown))

    key = settings.api_key.get_secret_value() if settings.api_key else None
    writes: set[Callable[..., Any]] = set()  # endpoints that need the key

    def write_route(scope: Scope) -> Any:
        for route in app.router.routes:
            if isinstance(route, APIRoute) and route.endpoint in writes and route.matches(scope)[0] is Match.FULL:
                return route
        return None

    app = FastAPI(title="compatembed index", version="1", lifespan=lifespan,
                  description="A mixed-version FAISS gallery (docs/index_service.md). Errors are "
                  "`{\"error\": name, \"message\": ...}`.")
    # outermost last: metrics see every answer, the key is checked before the body is read, and the body
    # is received (bounded in size and time) before the app parses it
    app.add_middleware(RequestBodyMiddleware, max_bytes=settings.max_body_bytes,
                       timeout_s=settings.body_timeout_seconds)
    app.add_middleware(AuthMiddleware, key=key, write_route=write_route)
    app.add_middleware(MetricsMiddleware, requests=requests, latency=latency)

    def svc() -> IndexService:
        s = state.get("service")
        if s is None:
            if "error" in state:
                raise NotReadyError(f"the service failed to start: {_startup_error()}")
            raise NotReadyError("the service is still loading its collections")
        return s

    # Reads and writes wait for worker threads in separate queues: a crowd of searches cannot hold
    # every thread while a write waits for one (the core's writer-preferring lock then lets the write
    # in as soon as the searches in flight end). Limiters are made on first use, inside the event loop.
    limiters: dict[str, anyio.CapacityLimiter] = {}

    def limiter(kind: str) -> anyio.CapacityLimiter:
        if kind not in limiters:
            limiters[kind] = anyio.CapacityLimiter(settings.read_threads if kind == "read" else settings.write_threads)
        return limiters[kind]

    async def run(fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """A write (or other mutation) in a worker thread of the write queue."""
        return await anyio.to_thread.run_sync(lambda: fn(*args, **kwargs), limiter=limiter("write"))

    async def read(fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """A read in a worker thread of the read queue."""
        return await anyio.to_thread.run_sync(lambda: fn(*args, **kwargs), limiter=limiter("read"))


    # -- what each route can answer, for the OpenAPI document -------------------------------------------
    transport = (400, 408, 413, 500, 503)  # any request: bad Content-Length, slow or large body, bug, loading
    secured = {"openapi_extra": {"security": WRITE_SECURITY}} if key is not None else {}

    def read_doc(*codes: int) -> dict[str, Any]:
        return {"responses": _responses(*transport, 422, *codes)}

    def write_doc(*codes: int) -> dict[str, Any]:
        return {"responses": _responses(*transport, 422, *codes, *((401,) if key is not None else ())), **secured}

    def write(fn: Callable[..., T]) -> Callable[..., T]:
        writes.add(fn)
        return fn

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
        headers = dict(exc.headers or {})
        if exc.status_code == 405:
            # Starlette names the methods of the first route on the path only; name those of all of them
            path = request.scope.get("path", "")
            methods = {m for r in app.router.routes if isinstance(r, APIRoute) and r.path_regex.match(path)
                       for m in (r.methods or ())}
            headers["Allow"] = ", ".join(sorted(methods)) or headers.get("Allow", "")
        name = _HTTP_ERROR_NAMES.get(exc.status_code, "HTTPError")
        return _error(exc.status_code, name, str(exc.detail), headers=headers or None)

    @app.exception_handler(Exception)
    async def _bug(request: Request, exc: Exception) -> JSONResponse:
        _logger.exception("unhandled error on %s %s", request.method, request.url.path)
        return _error(500, "InternalError", f"internal error: {type(exc).__name__}")

    # -- probes and metrics --------------------------------------------------------------------------
    @app.get("/health", responses=_responses(500))
    async def health() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/ready", response_model=ReadyBody,
             responses={503: {"model": ReadyBody, "description": "Still loading, or failed to start"}})
    async def ready() -> JSONResponse:
        s = state.get("service")
        if s is None or not s.ready:
            return JSONResponse({"ready": False, "error": _startup_error() or None}, status_code=503)
        return JSONResponse({"ready": True})

    @app.get("/metrics", response_class=PlainTextResponse, responses=_responses(500))
    async def prometheus() -> PlainTextResponse:
        s = state.get("service")
        if s is not None:
            for name in s.list_collections():
                coll = s.collection(name)
                items.labels(name).set(len(coll))
                problems.labels(name).set(len(coll.load_report))
        return PlainTextResponse(generate_latest(metrics).decode(), media_type=CONTENT_TYPE_LATEST)

    # -- versions ---------------------------------------------------------------------------------
    @app.get("/versions", **read_doc())
    async def list_versions() -> list[dict[str, Any]]:
        return svc().versions()

    @app.post("/versions", status_code=201, **write_doc(409))
    @write
    async def register_version(body: RegisterVersionBody) -> dict[str, Any]:
        return await run(svc().register_version, body.path)

    # -- collections ------------------------------------------------------------------------------
    @app.get("/collections", **read_doc())
    async def list_collections() -> dict[str, Any]:
        s = svc()
        return {"collections": s.list_collections(), "aliases": s.aliases()}

    @app.post("/collections", status_code=201, **write_doc(404, 409))
    @write
    async def create_collection(body: CreateCollectionBody) -> dict[str, Any]:
        opts = body.model_dump(exclude={"name"})
        return await run(svc().create_collection, body.name, **opts)

    @app.get("/collections/{name}", **read_doc(404))
    async def collection_stats(name: str) -> dict[str, Any]:
        return await read(svc().stats, name)

    @app.delete("/collections/{name}", **write_doc(404))
    @write
    async def drop_collection(name: str) -> dict[str, Any]:
        await run(svc().drop_collection, name)
        return {"dropped": name}

    @app.post("/collections/{name}/search", **read_doc(404, 409))
    async def search(name: str, body: SearchBody) -> dict[str, Any]:
        res = await read(svc().search, name, body.version, body.matrix(), body.k,
                         allow_partial=body.allow_partial, include_metadata=body.include_metadata)
        # encoded by orjson straight from the hits (the float scores dominate the response)
        return FastJSONResponse({"results": [res.hits(i) for i in range(len(res.ids))], "routes": res.routes,
                                 "skipped": res.skipped})

    @app.post("/collections/{name}/points", **write_doc(404, 409))
    @write
    async def add_points(name: str, body: AddBody) -> dict[str, Any]:
        seq = await run(svc().add, name, body.version, body.ids, body.matrix(), body.metadata,
                        upsert=body.upsert)
        return {"added": len(body.ids), "seq": seq}

    @app.post("/collections/{name}/points/delete", **write_doc(404))
    @write
    async def delete_points(name: str, body: IdsBody) -> dict[str, Any]:
        return {"deleted": await run(svc().delete, name, body.ids)}

    @app.post("/collections/{name}/points/versions", **read_doc(404))
    async def point_versions(name: str, body: IdsBody) -> dict[str, Any]:
        return {"versions": await read(svc().versions_of, name, body.ids)}

    @app.post("/collections/{name}/points/upgrade", **write_doc(404))
    @write
    async def upgrade_points(name: str, body: UpgradeBody) -> dict[str, Any]:
        seq = await run(svc().upgrade, name, body.version, body.ids, body.matrix(), body.metadata)
        return {"upgraded": len(body.ids), "seq": seq}

    @app.post("/collections/{name}/materialise", **write_doc(404, 409))
    @write
    async def materialise(name: str, body: MaterialiseBody) -> dict[str, Any]:
        return await run(svc().materialise, name, body.source, body.target)

    @app.post("/collections/{name}/calibrate", **write_doc(404, 409))
    @write
    async def calibrate(name: str, body: CalibrateBody) -> dict[str, Any]:
        scale, shift = await run(svc().calibrate, name, body.query_version, body.segment_version,
                                 body.matrix(), body.k,
                                 query_ids=body.ids)
        return {"scale": scale, "shift": shift}

    @app.put("/collections/{name}/calibration", **write_doc(404))
    @write
    async def set_calibration(name: str, body: CalibrationBody) -> dict[str, Any]:
        coll = svc().collection(name)
        await run(coll.set_calibration, body.query_version, body.segment_version, body.scale, body.shift)
        return {"calibration": coll.stats()["calibration"]}

    @app.post("/collections/{name}/snapshot", **write_doc(404))
    @write
    async def snapshot(name: str) -> dict[str, Any]:
        # ids and names relative to the data directory: no absolute server path leaves the server
        return {"snapshots": await run(svc().snapshot, name)}

    # -- aliases ----------------------------------------------------------------------------------
    @app.get("/aliases", **read_doc())
    async def list_aliases() -> dict[str, str]:
        return svc().aliases()

    @app.put("/aliases/{alias}", **write_doc(404, 409))
    @write
    async def set_alias(alias: str, body: AliasBody) -> dict[str, str]:
        await run(svc().set_alias, alias, body.collection)
        return {"alias": alias, "collection": body.collection}

    @app.delete("/aliases/{alias}", **write_doc(404))
    @write
    async def remove_alias(alias: str) -> dict[str, str]:
        await run(svc().remove_alias, alias)
        return {"removed": alias}

    # the web page (/ui) and the item read it needs (POST /collections/{name}/points/get): ui.py
    from compatembed_index.ui import mount_ui
    mount_ui(app, service=svc, read=read, settings=settings, doc=read_doc)

    if key is not None:
        def openapi() -> dict[str, Any]:
            if app.openapi_schema is None:
                schema = get_openapi(title=app.title, version=app.version, description=app.description,
                                     routes=app.routes)
                schema.setdefault("components", {})["securitySchemes"] = {
                    "APIKeyHeader": {"type": "apiKey", "in": "header", "name": "X-API-Key",
                                     "description": "The service's API key (needed by every write)"},
                    "BearerAuth": {"type": "http", "scheme": "bearer",
                                   "description": "The same key as a Bearer token"},
                }
                app.openapi_schema = schema
            return app.openapi_schema

        app.openapi = openapi  # type: ignore[method-assign]

    return app
