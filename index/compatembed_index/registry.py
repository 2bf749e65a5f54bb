"""Model versions and the routes between their embedding spaces.

A model version is read from the directory that training writes (``docs/model_version_format.md``):
``manifest.json`` plus the transform arrays it names, every file checked against its sha256. Only the
manifest and the transforms are read, never the weights, so this module needs numpy and nothing else.

Edges say how vectors of one version can be compared with another version's vectors:

* ``identity`` / ``prefix`` / ``affine`` point from a newer version to an older ``target``; they map a
  *query* of the newer version into the older space (query routes).
* ``forward`` points from an older ``source`` into this version; it maps *stored* vectors of the older
  version into the newer space (forward routes, used to materialise an upgraded copy of a segment).

Routes compose along chains (v3 → v2 → v1 applies v3's edge, then v2's edge). A vector never crosses
spaces without a registered route: :meth:`VersionRegistry.query_route` returns ``None`` when there is
none, and callers turn that into :class:`~compatembed_index.errors.NoRouteError`.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import re
import threading
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

import numpy as np

from compatembed_index.errors import (
    ConflictError,
    DimensionMismatchError,
    InvalidInputError,
    ManifestError,
    VersionNotFoundError,
)
from compatembed_index.validation import check_path

_logger = logging.getLogger(__name__)

FORMAT_PREFIX = "compatembed.model_version/"
VERSION_ID_RE = re.compile(r"[A-Za-z0-9._-]{1,64}")  # always used with fullmatch: `$` admits a final newline
QUERY_EDGE_KINDS = ("identity", "prefix", "affine")
EDGE_KINDS = (*QUERY_EDGE_KINDS, "forward")
ACTIVATIONS = ("relu", "gelu")


def l2_normalize(x: np.ndarray) -> np.ndarray:
    """Rows of ``x`` (N, D) scaled to unit L2 norm; all-zero rows stay zero."""
    x = np.asarray(x, dtype=np.float32)
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    return (x / np.where(norms > 0, norms, 1.0)).astype(np.float32, copy=False)


def sha256_bytes(data: bytes) -> str:
    """Hex sha256 of ``data``."""
    return hashlib.sha256(data).hexdigest()


def _erf(x: np.ndarray) -> np.ndarray:
    """Vectorised erf (Abramowitz & Stegun 7.1.26, |error| < 1.5e-7: below float32 resolution)."""
    sign = np.sign(x)
    a = np.abs(x).astype(np.float64)
    t = 1.0 / (1.0 + 0.3275911 * a)
    poly = t * (0.254829592 + t * (-0.284496736 + t * (1.421413741 + t * (-1.453152027 + t * 1.061405429))))
    return sign * (1.0 - poly * np.exp(-a * a))


def _gelu(x: np.ndarray) -> np.ndarray:
    """Exact (erf) GELU, as torch's ``nn.GELU()`` computes it by default."""
    return (0.5 * x * (1.0 + _erf(x / np.sqrt(2.0)))).astype(np.float32)


@dataclass(frozen=True)
class Edge:
    """One compatibility edge read from a manifest.

    Attributes:
        kind: ``identity``, ``prefix``, ``affine`` or ``forward``.
        owner: the version whose manifest declares the edge.
        other: ``target`` for identity/prefix/affine, ``source`` for forward.
        dim: the prefix length (prefix edges only).
        weight: ``(d_target, d_owner)`` affine weight.
        bias: ``(d_target,)`` affine bias.
        layers: forward MLP as ``((w0, b0), (w1, b1), ...)`` with ``w_i`` of shape (out, in).
        activation: forward MLP activation between layers.
        normalize_output: L2-normalise the output (always true for prefix edges).
        side_version: forward edges with side information (FCT's ψ): the version whose vector of the same
            item, L2-normalised, is concatenated to the source vector at the MLP's input.
        side_dim: that vector's dimension (the MLP's input is the source dim plus this).
    """

    kind: str
    owner: str
    other: str
    dim: int | None = None
    weight: np.ndarray | None = field(default=None, repr=False, compare=False)
    bias: np.ndarray | None = field(default=None, repr=False, compare=False)
    layers: tuple[tuple[np.ndarray, np.ndarray], ...] = field(default=(), repr=False, compare=False)
    activation: str | None = None
    normalize_output: bool = False
    side_version: str | None = None
    side_dim: int = 0

    @property
    def in_dim(self) -> int | None:
        """Source dimension the transform expects (None when it is the source's full dimension).

        For a forward edge with side information this excludes the side vector: it is what the source
        version's own vectors must measure.
        """
        if self.kind == "affine":
            assert self.weight is not None
            return int(self.weight.shape[1])
        if self.kind == "forward":
            return int(self.layers[0][0].shape[1]) - self.side_dim
        return None

    @property
    def out_dim(self) -> int | None:
        """Output dimension of the transform (None for identity)."""
        if self.kind == "prefix":
            return self.dim
        if self.kind == "affine":
            assert self.weight is not None
            return int(self.weight.shape[0])
        if self.kind == "forward":
            return int(self.layers[-1][0].shape[0])
        return None

    def apply(self, x: np.ndarray, side: np.ndarray | None = None) -> np.ndarray:
        """Map ``x`` (N, d_in) through the edge; returns (N, d_out) float32 (normalised as declared).

        ``side`` (N, side_dim): the side-information vectors of the same items, in the same order, which an
        edge with ``side_version`` needs (they are L2-normalised here, as when the map was fitted); refused
        for any other edge.
        """
        if self.side_version is not None:
            if side is None:
                raise InvalidInputError(
                    f"the forward edge {self.other} -> {self.owner} needs the side-information vectors of version "
                    f"{self.side_version!r} ({self.side_dim}-d) of the same items"
                )
            side = np.asarray(side, dtype=np.float32)
            if side.ndim != 2 or side.shape != (len(x), self.side_dim):
                raise DimensionMismatchError(
                    f"side-information vectors of {self.side_version!r} must have shape ({len(x)}, {self.side_dim}), "
                    f"got {side.shape}"
                )
            x = np.concatenate([np.asarray(x, dtype=np.float32), l2_normalize(side)], axis=1)
        elif side is not None:
            raise InvalidInputError(f"the {self.kind} edge {self.owner} / {self.other} takes no side information")
        if self.kind == "identity":
            y = x
        elif self.kind == "prefix":
            assert self.dim is not None
            y = l2_normalize(x[:, : self.dim])
        elif self.kind == "affine":
            assert self.weight is not None and self.bias is not None
            y = x @ self.weight.T + self.bias
        else:
            h = x.astype(np.float32, copy=False)
            for i, (w, b) in enumerate(self.layers):
                h = h @ w.T + b
                if i < len(self.layers) - 1:
                    h = np.maximum(h, 0) if self.activation == "relu" else _gelu(h)
            y = h
        y = np.ascontiguousarray(y, dtype=np.float32)
        return l2_normalize(y) if self.normalize_output else y


@dataclass(frozen=True)
class ModelVersion:
    """A registered model version: its space (dim, normalisation) and its edges.

    Attributes:
        version_id: unique id (``[A-Za-z0-9._-]{1,64}``).
        dim: embedding dimension.
        normalized: whether embeddings are L2-normalised (cosine similarity).
        edges: compatibility edges from the manifest.
        manifest: the manifest as read (kept so the store can persist it).
        files: bytes of the transform files the edges use, by manifest-relative path.
    """

    version_id: str
    dim: int
    normalized: bool
    edges: tuple[Edge, ...]
    manifest: dict[str, Any] = field(repr=False, compare=False)
    files: dict[str, bytes] = field(repr=False, compare=False)

    @property
    def metric(self) -> str:
        """``ip`` (cosine on normalised vectors) or ``l2`` (score = −squared distance)."""
        return "ip" if self.normalized else "l2"

    def fingerprint(self) -> str:
        """sha256 of the canonical manifest: two registrations of one id must agree on it."""
        return sha256_bytes(json.dumps(self.manifest, sort_keys=True).encode())


def _safe_relpath(rel: Any, where: str) -> str:
    if not isinstance(rel, str) or not rel:
        raise ManifestError(f"{where}: file path must be a non-empty string, got {rel!r}")
    p = PurePosixPath(rel)
    if p.is_absolute() or ".." in p.parts or "\\" in rel:
        raise ManifestError(f"{where}: file path {rel!r} must be relative and stay inside the version directory")
    return str(p)


def _load_npz(data: bytes, rel: str, where: str) -> dict[str, np.ndarray]:
    try:
        with np.load(io.BytesIO(data), allow_pickle=False) as z:
            return {k: np.asarray(z[k]) for k in z.files}
    except Exception as exc:  # numpy raises several types for a bad archive
        raise ManifestError(f"{where}: cannot read {rel} as a numpy .npz archive: {exc}") from exc


def _float_array(arr: np.ndarray, rel: str, key: str, ndim: int) -> np.ndarray:
    if arr.ndim != ndim or not np.issubdtype(arr.dtype, np.number):
        raise ManifestError(f"{rel}: key {key!r} must be a numeric {ndim}-D array, got shape {arr.shape} {arr.dtype}")
    out = np.ascontiguousarray(arr, dtype=np.float32)
    if not np.isfinite(out).all():
        raise ManifestError(f"{rel}: key {key!r} contains NaN or Inf")
    return out


def _parse_edge(raw: Any, owner: str, dim: int, files: dict[str, bytes], idx: int) -> Edge:
    where = f"version {owner!r} compatibility[{idx}]"
    if not isinstance(raw, dict):
        raise ManifestError(f"{where}: an edge must be an object, got {type(raw).__name__}")
    kind = raw.get("kind")
    if kind not in EDGE_KINDS:
        raise ManifestError(f"{where}: unknown edge kind {kind!r} (known: {', '.join(EDGE_KINDS)})")
    key = "source" if kind == "forward" else "target"
    other = raw.get(key)
    if not isinstance(other, str) or not VERSION_ID_RE.fullmatch(other):
        raise ManifestError(f"{where}: {kind} edge needs a valid {key!r} version id, got {other!r}")
    if other == owner:
        raise ManifestError(f"{where}: edge points to its own version {owner!r}")
    if "side_input" in raw and kind != "forward":
        raise ManifestError(f"{where}: side_input belongs to forward edges only, not {kind}")
    if kind == "identity":
        return Edge(kind, owner, other)
    if kind == "prefix":
        d = raw.get("dim")
        if not isinstance(d, int) or isinstance(d, bool) or not 0 < d <= dim:
            raise ManifestError(f"{where}: prefix edge needs 0 < dim <= {dim}, got {d!r}")
        return Edge(kind, owner, other, dim=d, normalize_output=True)
    rel = _safe_relpath(raw.get("file"), where)
    if rel not in files:
        raise ManifestError(f"{where}: file {rel!r} is not listed (with its sha256) in the manifest's 'files'")
    norm = raw.get("normalize_output", False)
    if not isinstance(norm, bool):
        raise ManifestError(f"{where}: normalize_output must be true or false, got {norm!r}")
    arrays = _load_npz(files[rel], rel, where)
    if kind == "affine":
        for k in ("weight", "bias"):
            if k not in arrays:
                raise ManifestError(f"{rel}: affine transform needs key {k!r}, found {sorted(arrays)}")
        w = _float_array(arrays["weight"], rel, "weight", 2)
        b = _float_array(arrays["bias"], rel, "bias", 1)
        if w.shape[1] != dim or b.shape[0] != w.shape[0]:
            raise ManifestError(
                f"{rel}: affine weight {w.shape} / bias {b.shape} do not fit a version of dim {dim} "
                f"(expected weight (d_target, {dim}) and bias (d_target,))"
            )
        return Edge(kind, owner, other, weight=w, bias=b, normalize_output=norm)
    act = raw.get("activation", "relu")
    if act not in ACTIVATIONS:
        raise ManifestError(f"{where}: forward activation must be one of {ACTIVATIONS}, got {act!r}")
    layers: list[tuple[np.ndarray, np.ndarray]] = []
    i = 0
    while f"w{i}" in arrays:
        if f"b{i}" not in arrays:
            raise ManifestError(f"{rel}: forward transform has w{i} but no b{i}")
        w = _float_array(arrays[f"w{i}"], rel, f"w{i}", 2)
        b = _float_array(arrays[f"b{i}"], rel, f"b{i}", 1)
        if b.shape[0] != w.shape[0] or (layers and layers[-1][0].shape[0] != w.shape[1]):
            raise ManifestError(f"{rel}: layer {i} shapes w{i} {w.shape} / b{i} {b.shape} do not chain")
        layers.append((w, b))
        i += 1
    if not layers:
        raise ManifestError(f"{rel}: forward transform needs keys w0, b0, ... found {sorted(arrays)}")
    if layers[-1][0].shape[0] != dim:
        raise ManifestError(f"{rel}: forward output dim {layers[-1][0].shape[0]} != version dim {dim}")
    side_version, side_dim = _parse_side_input(raw.get("side_input"), where, owner, other)
    if side_dim >= layers[0][0].shape[1]:
        raise ManifestError(f"{where}: side_input dim {side_dim} leaves no room for the source vector in the "
                            f"forward map's input of {layers[0][0].shape[1]}")
    return Edge(kind, owner, other, layers=tuple(layers), activation=act, normalize_output=norm,
                side_version=side_version, side_dim=side_dim)


def _parse_side_input(raw: Any, where: str, owner: str, source: str) -> tuple[str | None, int]:
    """``(side version id, dim)`` of a forward edge's optional ``side_input``; ``(None, 0)`` without one."""
    if raw is None:
        return None, 0
    if not isinstance(raw, dict) or set(raw) != {"version", "dim"}:
        raise ManifestError(f"{where}: side_input must be an object with exactly 'version' and 'dim', got {raw!r}")
    version, d = raw["version"], raw["dim"]
    if not isinstance(version, str) or not VERSION_ID_RE.fullmatch(version) or version in (owner, source):
        raise ManifestError(f"{where}: side_input.version must be the id of a third version, got {version!r}")
    if not isinstance(d, int) or isinstance(d, bool) or d <= 0:
        raise ManifestError(f"{where}: side_input.dim must be a positive integer, got {d!r}")
    return version, d


def parse_version(manifest: dict[str, Any], files: dict[str, bytes]) -> ModelVersion:
    """Build a :class:`ModelVersion` from a manifest and the bytes of the files it lists.

    Args:
        manifest: the parsed ``manifest.json``.
        files: manifest-relative path → bytes, for (at least) every transform file the edges use.

    Returns:
        The parsed version.

    Raises:
        ManifestError: a field is missing or wrong, a checksum does not match, a transform is malformed.
    """
    if not isinstance(manifest, dict):
        raise ManifestError("manifest.json must hold a JSON object")
    fmt = manifest.get("format")
    if not isinstance(fmt, str) or not fmt.startswith(FORMAT_PREFIX):
        raise ManifestError(f"manifest format must start with {FORMAT_PREFIX!r}, got {fmt!r}")
    vid = manifest.get("version_id")
    if not isinstance(vid, str) or not VERSION_ID_RE.fullmatch(vid):
        raise ManifestError(f"version_id must match [A-Za-z0-9._-]{{1,64}}, got {vid!r}")
    emb = manifest.get("embedding")
    if not isinstance(emb, dict):
        raise ManifestError(f"version {vid!r}: 'embedding' must be an object with dim and normalized")
    dim, normalized = emb.get("dim"), emb.get("normalized")
    if not isinstance(dim, int) or isinstance(dim, bool) or dim <= 0:
        raise ManifestError(f"version {vid!r}: embedding.dim must be a positive integer, got {dim!r}")
    if not isinstance(normalized, bool):
        raise ManifestError(f"version {vid!r}: embedding.normalized must be true or false, got {normalized!r}")
    dtype = emb.get("dtype", "float32")
    if dtype != "float32":
        raise ManifestError(f"version {vid!r}: embedding.dtype must be float32, got {dtype!r}")
    listed = manifest.get("files", {})
    if not isinstance(listed, dict):
        raise ManifestError(f"version {vid!r}: 'files' must map paths to sha256 hex digests")
    verified: dict[str, bytes] = {}
    for rel, digest in listed.items():
        rel = _safe_relpath(rel, f"version {vid!r} files")
        if rel in files:
            actual = sha256_bytes(files[rel])
            if not isinstance(digest, str) or actual != digest.lower():
                raise ManifestError(
                    f"version {vid!r}: checksum mismatch for {rel}: manifest says {digest!r}, file has {actual}"
                )
            verified[rel] = files[rel]
    edges_raw = manifest.get("compatibility", [])
    if not isinstance(edges_raw, list):
        raise ManifestError(f"version {vid!r}: 'compatibility' must be a list of edges")
    edges = tuple(_parse_edge(e, vid, dim, verified, i) for i, e in enumerate(edges_raw))
    used = {str(PurePosixPath(e["file"])) for e in edges_raw if isinstance(e, dict) and "file" in e}
    return ModelVersion(vid, dim, normalized, edges, manifest, {k: v for k, v in verified.items() if k in used})


def read_version_dir(path: str | Path) -> ModelVersion:
    """Read and verify a model version directory (manifest + transforms; never the weights).

    Every file listed in ``files`` that is present is checked against its sha256; a listed file that
    is absent is an error only if an edge needs it (an index host need not receive the weights).

    Raises:
        InvalidInputError: ``path`` is not a usable path string (empty, too long, a NUL or a lone surrogate).
        ManifestError: missing manifest, bad JSON, a checksum mismatch, a missing transform file, a file
            the server cannot read.
    """
    root = Path(check_path(path, "version path"))
    try:
        return _read_version_dir(root)
    except OSError as exc:  # permissions, a name too long for the filesystem, a loop of links, ...
        raise ManifestError(f"{root}: cannot read the version directory: {exc.strerror or type(exc).__name__}") from None


def _read_version_dir(root: Path) -> ModelVersion:
    mpath = root / "manifest.json"
    if not mpath.is_file():
        raise ManifestError(f"{root}: not a model version directory (no manifest.json)")
    try:
        manifest = json.loads(mpath.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as exc:
        raise ManifestError(f"{mpath}: invalid JSON: {exc}") from None
    if not isinstance(manifest, dict):
        raise ManifestError(f"{mpath}: must hold a JSON object")
    listed = manifest.get("files", {})
    files: dict[str, bytes] = {}
    if isinstance(listed, dict):
        for rel in listed:
            rel_s = _safe_relpath(rel, f"{mpath} files")
            fpath = root / rel_s
            if fpath.is_file():
                files[rel_s] = fpath.read_bytes()
            else:
                _logger.info("%s: listed file %s is absent (not needed unless an edge uses it)", root, rel_s)
    for i, e in enumerate(manifest.get("compatibility", []) or []):
        if isinstance(e, dict) and isinstance(e.get("file"), str):
            rel_s = _safe_relpath(e["file"], f"{mpath} compatibility[{i}]")
            if rel_s in (listed if isinstance(listed, dict) else {}) and rel_s not in files:
                raise ManifestError(f"{root}: transform file {rel_s} named by compatibility[{i}] is missing")
    return parse_version(manifest, files)


def write_version_dir(root: str | Path, version_id: str, dim: int, edges: list[dict[str, Any]],
                      arrays: dict[str, dict[str, np.ndarray]] | None = None, **manifest: Any) -> Path:
    """Write ``root/version_id`` as a model version directory without weights, the inverse of :func:`read_version_dir`.

    What a benchmark or a test registers without training a model (compatembed cannot load a model from it):
    the manifest names the embedding (``dim``, L2-normalised float32), the compatibility ``edges`` and the
    sha256 of every transform file in ``arrays`` (relative path → the keys of its ``.npz``, stored as float32
    as the format says); ``manifest`` adds top-level keys such as ``training`` or ``parent``.
    """
    vdir = Path(root) / version_id
    (vdir / "transforms").mkdir(parents=True, exist_ok=True)
    files = {}
    for rel, content in (arrays or {}).items():
        np.savez(vdir / rel, **{key: np.asarray(value, dtype=np.float32) for key, value in content.items()})
        files[rel] = sha256_bytes((vdir / rel).read_bytes())
    document = {"format": f"{FORMAT_PREFIX}1", "version_id": version_id,
                "embedding": {"dim": dim, "normalized": True, "dtype": "float32"},
                "compatibility": edges, "files": files, **manifest}
    (vdir / "manifest.json").write_text(json.dumps(document))
    return vdir


@dataclass(frozen=True)
class Step:
    """One hop of a route: apply ``edge`` to go from ``src`` to ``dst``; normalise after when ``normalize``."""

    edge: Edge
    src: str
    dst: str
    normalize: bool


@dataclass(frozen=True)
class Route:
    """A composed chain of edges from version ``src`` to version ``dst`` (empty for ``src == dst``)."""

    src: str
    dst: str
    steps: tuple[Step, ...]

    @property
    def path(self) -> list[str]:
        """Versions visited, from ``src`` to ``dst``."""
        return [self.src, *[s.dst for s in self.steps]]

    def apply(self, x: np.ndarray, side: np.ndarray | None = None) -> np.ndarray:
        """Map ``x`` (N, d_src) into ``dst``'s space: (N, d_dst) float32.

        ``side``: the items' side-information vectors, for a route whose first edge reads them
        (:meth:`VersionRegistry.side_forward_route`).
        """
        y = np.ascontiguousarray(x, dtype=np.float32)
        for i, s in enumerate(self.steps):
            y = s.edge.apply(y, side if i == 0 else None)
            if s.normalize and not s.edge.normalize_output:
                y = l2_normalize(y)
        return y


class VersionRegistry:
    """Registered model versions and the routes between them (thread-safe, routes cached)."""

    def __init__(self) -> None:
        self._versions: dict[str, ModelVersion] = {}
        self._routes: dict[tuple[str, str, str], Route | None] = {}
        self._lock = threading.Lock()

    def register(self, version: ModelVersion, *, check_edges: bool = True) -> bool:
        """Add ``version``; returns False when the identical version is already registered.

        Every edge between ``version`` and a registered version (declared by either of them) must fit
        their dimensions; an edge to a version registered later is checked when that one arrives.

        Args:
            version: the version to add.
            check_edges: False skips the dimension check (versions already in the store, registered
                before the check existed: a misfit edge then fails the searches that would use it).

        Raises:
            ConflictError: another manifest is registered under the same id.
            ManifestError: an edge does not fit the dimensions of the versions it joins.
        """
        with self._lock:
            old = self._versions.get(version.version_id)
            if old is not None:
                if old.fingerprint() == version.fingerprint():
                    return False
                raise ConflictError(
                    f"version {version.version_id!r} is already registered with a different manifest"
                )
            if check_edges:
                for e in version.edges:
                    if e.other in self._versions:
                        self._check_edge(version, e, self._versions[e.other])
                for other in self._versions.values():
                    for e in other.edges:
                        if e.other == version.version_id:
                            self._check_edge(other, e, version)
            self._versions[version.version_id] = version
            self._routes.clear()
        _logger.info("registered version %s (dim %d)", version.version_id, version.dim)
        return True

    def get(self, version_id: str) -> ModelVersion:
        """The registered version ``version_id``; raises :class:`VersionNotFoundError` otherwise."""
        try:
            return self._versions[version_id]
        except KeyError:
            known = ", ".join(sorted(self._versions)) or "none"
            raise VersionNotFoundError(f"unknown model version {version_id!r} (registered: {known})") from None

    def __contains__(self, version_id: object) -> bool:
        return version_id in self._versions

    def list(self) -> list[ModelVersion]:
        """All registered versions, sorted by id."""
        return [self._versions[k] for k in sorted(self._versions)]

    def _arcs(self, kind: str) -> dict[str, list[tuple[str, Edge]]]:
        """Adjacency for ``query`` routes (new → old) or ``forward`` routes (old → new)."""
        arcs: dict[str, list[tuple[str, Edge]]] = {v: [] for v in self._versions}
        for v in self._versions.values():
            for e in v.edges:
                if e.other not in self._versions:
                    continue
                if e.kind == "identity":
                    arcs[v.version_id].append((e.other, e))
                    arcs[e.other].append((v.version_id, Edge("identity", e.other, v.version_id)))
                elif kind == "query" and e.kind in ("prefix", "affine"):
                    arcs[v.version_id].append((e.other, e))
                elif kind == "forward" and e.kind == "forward" and e.side_version is None:
                    # a map that needs side information is no route for stored vectors alone: see side_forward_route
                    arcs[e.other].append((v.version_id, e))
        return arcs

    def _route(self, kind: str, src: str, dst: str) -> Route | None:
        key = (kind, src, dst)
        with self._lock:
            if key in self._routes:
                return self._routes[key]
            self.get(src), self.get(dst)
            arcs = self._arcs(kind)
            prev: dict[str, tuple[str, Edge] | None] = {src: None}
            queue = deque([src])
            while queue and dst not in prev:
                cur = queue.popleft()
                for nxt, edge in sorted(arcs[cur], key=lambda a: a[0]):
                    if nxt not in prev:
                        prev[nxt] = (cur, edge)
                        queue.append(nxt)
            route: Route | None = None
            if dst in prev:
                steps: list[Step] = []
                node = dst
                while prev[node] is not None:
                    p, edge = prev[node]  # type: ignore[misc]
                    steps.append(Step(edge, p, node, self._versions[node].normalized))
                    node = p
                steps.reverse()
                self._check_dims(steps)
                route = Route(src, dst, tuple(steps))
            self._routes[key] = route
            return route

    @staticmethod
    def _check_edge(owner: ModelVersion, e: Edge, other: ModelVersion) -> None:
        """Refuse edge ``e`` of ``owner`` when it does not map ``other``'s dimension to ``owner``'s or back."""
        src, dst = (other, owner) if e.kind == "forward" else (owner, other)
        d_in, d_out = e.in_dim or src.dim, e.out_dim or src.dim
        if d_in != src.dim or d_out != dst.dim:
            raise ManifestError(
                f"version {owner.version_id!r}: {e.kind} edge {src.version_id} -> {dst.version_id} maps dim "
                f"{d_in} -> {d_out}, but the versions have dims {src.dim} and {dst.dim}"
            )

    def _check_dims(self, steps: list[Step]) -> None:
        for s in steps:
            d_in, d_out = self._versions[s.src].dim, self._versions[s.dst].dim
            e = s.edge
            if (e.in_dim is not None and e.in_dim != d_in) or (e.out_dim is not None and e.out_dim != d_out) or (
                e.kind == "identity" and d_in != d_out
            ):
                raise ManifestError(
                    f"{e.kind} edge {s.src} -> {s.dst} maps dim {e.in_dim or d_in} -> {e.out_dim or d_in}, "
                    f"but the versions have dims {d_in} and {d_out}"
                )

    def query_route(self, src: str, dst: str) -> Route | None:
        """Route mapping a *query* of version ``src`` into ``dst``'s space, or None when there is none."""
        return self._route("query", src, dst)

    def forward_route(self, src: str, dst: str) -> Route | None:
        """Route mapping *stored* vectors of ``src`` into ``dst``'s space via forward edges, or None."""
        return self._route("forward", src, dst)

    def side_forward_route(self, src: str, dst: str) -> Route | None:
        """The one-step route through ``dst``'s forward edge from ``src`` that needs side information (FCT's ψ).

        Such an edge is no :meth:`forward_route` (stored vectors alone cannot follow it): a caller that holds
        the items' vectors of ``route.steps[0].edge.side_version`` too applies it with ``route.apply(x, side)``.
        """
        target = self.get(dst)
        self.get(src)
        found = [e for e in target.edges if e.kind == "forward" and e.other == src and e.side_version is not None]
        return Route(src, dst, (Step(found[0], src, dst, target.normalized),)) if found else None
