"""The web page of the index service: look at a mixed-version gallery in a browser (``/ui``).

The page is static (``static/ui/``: HTML, one script, one style sheet; no build step) and talks to the
service's own HTTP API. It shows the collections with the items each version holds (the backfill
state), the version graph with its edges and the route every query version takes to every segment,
"more like this" searches from a stored item or from an uploaded vector, the same query side by side
in several (collection, query version) columns, and a compatibility report when one is configured.

Routes added to the app by :func:`mount_ui` (reads: no key needed):

* ``GET /ui/`` the page; ``GET /ui/static/{name}`` its script and style sheet (a fixed list of files);
* ``GET /ui/api/info`` what the page may show; ``GET /ui/api/routes`` the route of every pair of versions;
* ``GET /ui/image?path=...`` an image under ``image_root`` (an item's ``metadata["image"]``);
* ``GET /ui/report/report.md`` and ``GET /ui/report/file?path=...``: the report under ``report_dir``;
* ``POST /collections/{name}/points/get``: an API read (in the OpenAPI document) that returns stored
  items with their version, metadata and stored vector, which "more like this" searches with.

Safety: the page builds its DOM with ``textContent`` and never parses stored data as HTML, and every
UI answer carries a strict Content-Security-Policy (scripts only from the page's own file). Files are
served only from under their configured root: a path must be relative without ``..``, it is resolved
(symlinks followed) and must stay under the resolved root, the file must be a regular file within
``max_image_bytes``, and its first bytes must say PNG, JPEG, GIF, WebP or BMP (never SVG, which can
hold scripts); the answer's Content-Type comes from those bytes, with ``nosniff``.
"""

from __future__ import annotations

import base64
import os
import stat
from collections.abc import Awaitable, Callable
from pathlib import Path, PurePosixPath
from typing import Any

from fastapi import FastAPI
from fastapi.responses import RedirectResponse, Response
from pydantic import BaseModel, ConfigDict

from compatembed_index.api import IndexService
from compatembed_index.errors import (
    ForbiddenError,
    InvalidInputError,
    LimitExceededError,
    NotFoundError,
    UnsupportedMediaTypeError,
)
from compatembed_index.settings import IndexSettings
from compatembed_index.validation import check_path

STATIC = Path(__file__).parent / "static" / "ui"
ASSETS = {"app.js": "text/javascript; charset=utf-8", "style.css": "text/css; charset=utf-8"}

CSP = ("default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data: http: https:; "
       "connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'")
"""The page's Content-Security-Policy: scripts and styles from the service only (no inline script, no
eval), requests to the service only; images may also come from http(s) URLs named by item metadata."""
PAGE_HEADERS = {"Content-Security-Policy": CSP, "X-Content-Type-Options": "nosniff",
                "Referrer-Policy": "no-referrer", "X-Frame-Options": "DENY", "Cache-Control": "no-cache"}
FILE_HEADERS = {"Content-Security-Policy": "default-src 'none'; sandbox", "X-Content-Type-Options": "nosniff",
                "Referrer-Policy": "no-referrer", "Cache-Control": "private, max-age=300"}

_MAGIC = ((b"\x89PNG\r\n\x1a\n", "image/png"), (b"\xff\xd8\xff", "image/jpeg"), (b"GIF87a", "image/gif"),
          (b"GIF89a", "image/gif"), (b"BM", "image/bmp"))


def image_type(head: bytes) -> str | None:
    """The image content type that a file's first bytes announce (PNG, JPEG, GIF, WebP, BMP), else None."""
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return "image/webp"
    return next((kind for magic, kind in _MAGIC if head.startswith(magic)), None)


def read_under(root: Path, rel: Any, *, max_bytes: int, what: str) -> bytes:
    """The bytes of file ``rel`` under ``root``, refusing anything that would leave ``root``.

    Args:
        root: the directory files may come from.
        rel: a relative path under it (``/``-separated).
        max_bytes: largest file served.
        what: what the path names, for error messages (never the server's absolute paths).

    Raises:
        InvalidInputError: ``rel`` is not a usable relative path (empty, absolute, ``..``, a backslash).
        ForbiddenError: ``rel`` resolves (through a symlink) to a place outside ``root``.
        NotFoundError: no regular file there.
        LimitExceededError: the file is larger than ``max_bytes``.
    """
    rel = check_path(rel, what)
    parts = PurePosixPath(rel).parts
    if rel.startswith("/") or "\\" in rel or ".." in parts or not parts:
        raise InvalidInputError(f"{what} {rel!r} must be a relative path below its directory, without '..'")
    base = root.resolve(strict=True)
    try:
        real = base.joinpath(*parts).resolve(strict=True)
    except (FileNotFoundError, NotADirectoryError):
        raise NotFoundError(f"{what} {rel!r} does not exist") from None
    except (OSError, RuntimeError) as exc:  # a loop of links, a name the filesystem refuses
        raise NotFoundError(f"{what} {rel!r} cannot be opened ({type(exc).__name__})") from None
    if not real.is_relative_to(base):
        raise ForbiddenError(f"{what} {rel!r} leads outside its directory (a symlink out of it is not followed)")
    try:
        fd = os.open(real, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)  # the checked file, not a link swapped in
    except OSError:
        raise NotFoundError(f"{what} {rel!r} cannot be opened") from None
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode):
        os.close(fd)
        raise NotFoundError(f"{what} {rel!r} is not a regular file")
    with os.fdopen(fd, "rb") as fh:
        if st.st_size > max_bytes:
            raise LimitExceededError(f"{what} {rel!r} has {st.st_size} bytes, above the limit of {max_bytes} "
                                     "(max_image_bytes)")
        data = fh.read(max_bytes + 1)
    if len(data) > max_bytes:  # grew meanwhile
        raise LimitExceededError(f"{what} {rel!r} is larger than the limit of {max_bytes} bytes (max_image_bytes)")
    return data


def image_response(data: bytes, what: str) -> Response:
    """``data`` served as the image type its first bytes announce; anything else is refused (415)."""
    kind = image_type(data[:16])
    if kind is None:
        raise UnsupportedMediaTypeError(f"{what} is not a PNG, JPEG, GIF, WebP or BMP image")
    return Response(data, media_type=kind, headers=FILE_HEADERS)


class GetPointsBody(BaseModel):
    """Stored items to return, by id."""

    model_config = ConfigDict(extra="forbid", strict=True)

    ids: list[int]
    include_vectors: bool = True
    include_metadata: bool = True
    binary: bool = False  # each vector as `vector_b64` (base64 little-endian float32) instead of `vector`


def mount_ui(app: FastAPI, *, service: Callable[[], IndexService], read: Callable[..., Awaitable[Any]],
             settings: IndexSettings, doc: Callable[..., dict[str, Any]]) -> None:
    """Add the web page's routes, and the item read it needs, to ``app``.

    Args:
        app: the service's app (:func:`compatembed_index.server.create_app`).
        service: returns the loaded service (raises ``NotReadyError`` while it loads).
        read: runs a blocking read in the app's read thread queue.
        settings: ``image_root``, ``report_dir``, ``max_image_bytes``, and whether writes need a key.
        doc: the OpenAPI ``responses=`` of a read route, given its extra status codes.
    """
    from compatembed_index.server import FastJSONResponse

    page = (STATIC / "index.html").read_bytes()
    assets = {name: (STATIC / name).read_bytes() for name in ASSETS}

    @app.post("/collections/{name}/points/get", tags=["items"], **doc(404))
    async def get_points(name: str, body: GetPointsBody) -> Any:
        """Stored items by id, in order, with null where an id is absent: each item's version (the
        segment holding it), metadata and stored vector (float32, in that version's space). Send the
        vector back as a query of that version for "more like this"."""
        points = await read(service().get_points, name, body.ids, include_vectors=body.include_vectors,
                            include_metadata=body.include_metadata)
        if body.binary:
            for p in points:
                if p is not None and "vector" in p:
                    p["vector_b64"] = base64.b64encode(p.pop("vector").astype("<f4").tobytes()).decode("ascii")
        return FastJSONResponse({"points": points})

    @app.get("/ui", include_in_schema=False)
    async def ui_root() -> RedirectResponse:
        return RedirectResponse("/ui/", status_code=307)

    @app.get("/ui/", include_in_schema=False)
    async def ui_page() -> Response:
        return Response(page, media_type="text/html; charset=utf-8", headers=PAGE_HEADERS)

    @app.get("/ui/static/{asset}", include_in_schema=False)
    async def ui_asset(asset: str) -> Response:
        if asset not in assets:
            raise NotFoundError(f"no file {asset!r} in the page's files")
        return Response(assets[asset], media_type=ASSETS[asset], headers=PAGE_HEADERS)

    @app.get("/ui/api/info", include_in_schema=False)
    async def ui_info() -> dict[str, Any]:
        report = settings.report_dir is not None and (settings.report_dir / "report.md").is_file()
        return {"write_key": settings.api_key is not None, "images": settings.image_root is not None,
                "report": report, "max_k": settings.max_k}

    def routes() -> dict[str, Any]:
        svc = service()
        ids = [v["version_id"] for v in svc.versions()]
        forward = {}
        for s in ids:
            forward[s] = {}
            for t in ids:
                r = svc.registry.forward_route(s, t) if s != t else None
                forward[s][t] = None if r is None else r.path
        return {"query": {q: {s: svc.route(q, s) if q != s else [q] for s in ids} for q in ids}, "forward": forward}

    @app.get("/ui/api/routes", include_in_schema=False)
    async def ui_routes() -> dict[str, Any]:
        return await read(routes)

    @app.get("/ui/image", include_in_schema=False)
    async def ui_image(path: str) -> Response:
        if settings.image_root is None:
            raise NotFoundError("no image directory is configured (serve --image-root)")
        data = await read(read_under, settings.image_root, path, max_bytes=settings.max_image_bytes, what="image")
        return image_response(data, f"image {path!r}")

    @app.get("/ui/report/report.md", include_in_schema=False)
    async def ui_report() -> Response:
        if settings.report_dir is None:
            raise NotFoundError("no report directory is configured (serve --report-dir)")
        data = await read(read_under, settings.report_dir, "report.md", max_bytes=settings.max_image_bytes,
                          what="report")
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError:
            raise InvalidInputError("report.md is not UTF-8 text") from None
        return Response(text, media_type="text/plain; charset=utf-8", headers=FILE_HEADERS)

    @app.get("/ui/report/file", include_in_schema=False)
    async def ui_report_file(path: str) -> Response:
        if settings.report_dir is None:
            raise NotFoundError("no report directory is configured (serve --report-dir)")
        data = await read(read_under, settings.report_dir, path, max_bytes=settings.max_image_bytes,
                          what="report file")
        return image_response(data, f"report file {path!r}")

