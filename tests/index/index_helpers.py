"""Test helpers for the index service: model version directories written to the contract, and an oracle.

``write_version`` writes what ``compatembed-train`` writes for the index service
(``docs/model_version_format.md``): ``manifest.json`` with ``files`` sha256 checksums, transform arrays
in ``transforms/*.npz`` and a stand-in ``model.safetensors`` (the service never reads weights but does
verify their checksum when they are present).

The oracle re-implements the contract's transforms and cosine scoring with plain numpy, independently of
``compatembed_index.registry``.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def write_version(
    root: Path,
    version_id: str,
    dim: int,
    *,
    normalized: bool = True,
    parent: str | None = None,
    prefix: tuple[str, int] | None = None,
    affine: tuple[str, np.ndarray, np.ndarray, bool] | None = None,
    forward: tuple[str, list[tuple[np.ndarray, np.ndarray]], str, bool] | None = None,
    identity: str | None = None,
) -> Path:
    """Write a model version directory and return it.

    Args:
        root: parent directory.
        version_id: the id (also the directory name).
        dim: embedding dimension.
        normalized: ``embedding.normalized``.
        parent: ``parent`` field.
        prefix: (target, dim) prefix edge.
        affine: (target, weight (d_t, dim), bias (d_t,), normalize_output) affine edge.
        forward: (source, [(w0, b0), ...], activation, normalize_output) forward edge.
        identity: target of an identity edge.
    """
    vdir = root / version_id
    (vdir / "transforms").mkdir(parents=True, exist_ok=True)
    (vdir / "model.safetensors").write_bytes(b"stand-in weights for " + version_id.encode())
    edges: list[dict[str, Any]] = []
    if identity:
        edges.append({"kind": "identity", "target": identity})
    if prefix:
        edges.append({"kind": "prefix", "target": prefix[0], "dim": prefix[1]})
    if affine:
        target, w, b, norm = affine
        rel = f"transforms/affine_to_{target}.npz"
        np.savez(vdir / rel, weight=w.astype(np.float32), bias=b.astype(np.float32))
        edges.append({"kind": "affine", "target": target, "file": rel, "normalize_output": norm})
    if forward:
        source, layers, act, norm = forward
        rel = f"transforms/forward_from_{source}.npz"
        arrays = {}
        for i, (w, b) in enumerate(layers):
            arrays[f"w{i}"], arrays[f"b{i}"] = w.astype(np.float32), b.astype(np.float32)
        np.savez(vdir / rel, **arrays)
        edges.append({"kind": "forward", "source": source, "file": rel, "activation": act, "normalize_output": norm})
    files = {"model.safetensors": _sha(vdir / "model.safetensors")}
    for e in edges:
        if "file" in e:
            files[e["file"]] = _sha(vdir / e["file"])
    manifest = {
        "format": "compatembed.model_version/1",
        "version_id": version_id,
        "created_utc": "2026-01-01T00:00:00Z",
        "model": {"_target_": "compatembed.models.EmbeddingModel"},
        "embedding": {"dim": dim, "normalized": normalized, "dtype": "float32"},
        "preprocessing": {"input_size": [3, 32, 32]},
        "training": {"dataset": "synthetic", "method": "test"},
        "parent": parent,
        "compatibility": edges,
        "files": files,
    }
    (vdir / "manifest.json").write_text(json.dumps(manifest, indent=1))
    return vdir


def normalize(x: np.ndarray) -> np.ndarray:
    """Rows scaled to unit norm (float64 for the oracle)."""
    x = np.asarray(x, dtype=np.float64)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def mlp(x: np.ndarray, layers: list[tuple[np.ndarray, np.ndarray]], act: str = "relu") -> np.ndarray:
    """Forward MLP of the contract, in float64."""
    h = np.asarray(x, dtype=np.float64)
    for i, (w, b) in enumerate(layers):
        h = h @ np.asarray(w, np.float64).T + b
        if i < len(layers) - 1:
            h = np.maximum(h, 0) if act == "relu" else h
    return h


class Chain:
    """A three-version chain v3 → v2 (affine) → v1 (prefix), plus a forward map v1 → v3 and an unrelated v0.

    Attributes hold the arrays so tests can compute the oracle themselves.
    """

    D1, D2, D3 = 16, 24, 32

    def __init__(self, root: Path, seed: int = 0) -> None:
        rng = np.random.default_rng(seed)
        self.root = root
        self.W32 = rng.normal(size=(self.D2, self.D3)) / np.sqrt(self.D3)
        self.b32 = rng.normal(size=self.D2) * 0.05
        self.fwd = [
            (rng.normal(size=(48, self.D1)) / 4, rng.normal(size=48) * 0.1),
            (rng.normal(size=(self.D3, 48)) / 7, rng.normal(size=self.D3) * 0.1),
        ]
        self.dirs = {
            "v1": write_version(root, "v1", self.D1),
            "v2": write_version(root, "v2", self.D2, parent="v1", prefix=("v1", self.D1)),
            "v3": write_version(root, "v3", self.D3, parent="v2", affine=("v2", self.W32, self.b32, True),
                                forward=("v1", self.fwd, "relu", True)),
            "v0": write_version(root, "v0", self.D1),
        }

    def q_to(self, q3: np.ndarray, target: str) -> np.ndarray:
        """Oracle: a v3 query mapped into ``target``'s space."""
        q3 = normalize(q3)
        if target == "v3":
            return q3
        t2 = normalize(q3 @ self.W32.T + self.b32)
        if target == "v2":
            return t2
        return normalize(t2[:, : self.D1])

    def forward_v1(self, x1: np.ndarray) -> np.ndarray:
        """Oracle: v1 vectors forward-upgraded into v3."""
        return normalize(mlp(normalize(x1), self.fwd))


def oracle_topk(q_by_segment: dict[str, np.ndarray], x_by_segment: dict[str, tuple[np.ndarray, np.ndarray]],
                k: int) -> tuple[np.ndarray, np.ndarray]:
    """Brute-force merged top-k: for each segment, cosine of its (already mapped) queries with its items."""
    scores, ids = [], []
    for v, (seg_ids, x) in x_by_segment.items():
        scores.append(q_by_segment[v] @ normalize(x).T)
        ids.append(np.broadcast_to(seg_ids, (len(q_by_segment[v]), len(seg_ids))))
    s, i = np.hstack(scores), np.hstack(ids)
    order = np.argsort(-s, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(i, order, 1), np.take_along_axis(s, order, 1)


def assert_same_topk(ids: np.ndarray, scores: np.ndarray, ref_ids: np.ndarray, ref_scores: np.ndarray,
                     all_scores: dict[int, np.ndarray] | None = None, atol: float = 1e-4) -> None:
    """Results equal the oracle's up to ties: same sorted scores, and the same ids where scores are not tied."""
    assert ids.shape == ref_ids.shape, (ids.shape, ref_ids.shape)
    np.testing.assert_allclose(scores, ref_scores, atol=atol)
    for r in range(len(ids)):
        gaps = np.abs(np.diff(ref_scores[r]))
        tied = np.zeros(len(ref_ids[r]), dtype=bool)
        tied[:-1] |= gaps < atol
        tied[1:] |= gaps < atol
        tied[-1] = True  # the boundary item may tie with the (k+1)-th
        assert set(ids[r][~tied].tolist()) <= set(ref_ids[r].tolist())
        np.testing.assert_array_equal(ids[r][~tied], ref_ids[r][~tied])


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServedApp:
    """Serve an ASGI app with uvicorn on 127.0.0.1 in a thread, with the configuration ``serve`` uses
    (:func:`compatembed_index.server.uvicorn_config`); the context gives the base URL."""

    def __init__(self, app: Any, settings: Any) -> None:
        import threading

        import uvicorn

        from compatembed_index.server import uvicorn_config

        self.port = free_port()
        settings = settings.model_copy(update={"host": "127.0.0.1", "port": self.port, "log_level": "warning"})
        self.server = uvicorn.Server(uvicorn_config(app, settings))
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self) -> str:
        import time

        self.thread.start()
        deadline = time.monotonic() + 20
        while not self.server.started:
            assert time.monotonic() < deadline, "uvicorn did not start"
            time.sleep(0.02)
        return f"http://127.0.0.1:{self.port}"

    def __exit__(self, *exc: object) -> None:
        self.server.should_exit = True
        self.thread.join(10)


def milvus_service(tmp_path: Path, uri: str | None = None, **opts: Any) -> Any:
    """An ``IndexService`` on the Milvus backend (skips when the extra is not installed).

    Without ``uri``: milvus-lite in ``tmp_path``. With the URI of a Milvus server: collections named
    after ``tmp_path``, so each test has its own namespace on the shared server and two services made
    with the same ``tmp_path`` share one gallery.
    """
    import pytest

    pytest.importorskip("pymilvus", reason="the Milvus backend is optional: pip install 'compatembed[milvus]'")
    from compatembed_index.api import IndexService

    opts.setdefault("move_grace_s", 0.5)  # a search pass over three segments takes ~0.1 s on lite and on a server here
    if uri is not None:
        opts.setdefault("milvus_prefix", "t" + hashlib.sha1(str(tmp_path).encode()).hexdigest()[:12] + "_")
        return IndexService(None, backend="milvus", milvus_uri=uri, **opts)
    pytest.importorskip("milvus_lite", reason="milvus-lite is optional: pip install 'compatembed[milvus]'")
    return IndexService(None, backend="milvus", milvus_uri=str(tmp_path / "gallery.db"), **opts)


def milvus_server(root: Path) -> Iterator[str]:
    """For a fixture: yield the URI of a Milvus server process on 127.0.0.1 (:mod:`tools.milvus_server`), or skip
    with the reasons none started."""
    import pytest

    pytest.importorskip("pymilvus", reason="the Milvus backend is optional: pip install 'compatembed[milvus]'")
    from tools.milvus_server import NoMilvusServer, running_milvus_server

    server = running_milvus_server(root)
    try:
        uri = server.__enter__()
    except NoMilvusServer as exc:
        pytest.skip(str(exc))
    try:
        yield uri
    finally:
        server.__exit__(None, None, None)
