"""Model version directories: the contract between training and serving.

A version directory holds the deployed embedding module's weights (safetensors), a ``manifest.json``
that says what the module is and how its space relates to other versions, and the compatibility
transforms as plain numpy arrays. The format is documented in ``docs/model_version_format.md``; the
index service reads the manifest and the arrays without torch.

Files are written one by one, each atomically, and the manifest last: a directory without a manifest
is not a version, and the manifest's sha256 sums catch a weights file that was changed afterwards.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import logging
import os
import re
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from torch import nn

from compatembed.errors import ManifestError

_logger = logging.getLogger(__name__)

FORMAT = "compatembed.model_version/1"
MANIFEST = "manifest.json"
WEIGHTS = "model.safetensors"
EDGE_KINDS = ("identity", "prefix", "affine", "forward")
_VERSION_ID = re.compile(r"[A-Za-z0-9._-]{1,64}")
_SHA256 = re.compile(r"[0-9a-f]{64}")
_WEIGHT_KEYS = ("weights",)  # config keys that point at local weight files, cleared on load

DEPLOYABLE: set[str] = {
    "compatembed.models.EmbeddingModel",
    "compatembed.models.heads.EmbeddingModel",
    "compatembed.models.create_backbone",
    "compatembed.models.registry.create_backbone",
}
"""``_target_`` values a manifest's model config may name: the project's own model and backbone factories.

A manifest is data read from disk; building its model must never call an arbitrary importable
(``os.makedirs``, ``subprocess.run``...). Method modules whose deployed module is a class of their own
add it with :func:`deployable`; backbones are chosen by registry name inside ``create_backbone``."""


def deployable(cls: type) -> type:
    """Class decorator: allow manifests to name ``cls`` as their model's ``_target_``."""
    DEPLOYABLE.add(f"{cls.__module__}.{cls.__qualname__}")
    return cls


def check_model_config(config: Any, where: str = "model") -> None:
    """Refuse a model config that would build anything but an allow-listed class (:data:`DEPLOYABLE`).

    Every ``_target_`` in the tree must be allow-listed, and Hydra's other instantiation keys
    (``_partial_``, ``_args_``, ``_recursive_``, ``_convert_``...) are refused: they are never written by
    :func:`save_model_version`, and positional arguments or partials would widen what a file can call.

    Raises:
        ManifestError: naming the offending key and value.
    """
    import compatembed.methods  # noqa: F401  (registers the methods' deployable classes)

    if isinstance(config, dict):
        for key, value in config.items():
            if not isinstance(key, str):
                raise ManifestError(f"{where}: non-string key {key!r}")
            if key == "_target_":
                if value not in DEPLOYABLE:
                    raise ManifestError(
                        f"{where}._target_={value!r} is not one of the project's model factories "
                        f"({', '.join(sorted(DEPLOYABLE))}): refusing to build it"
                    )
            elif key.startswith("_") and key.endswith("_"):
                raise ManifestError(f"{where}.{key}: instantiation keys other than _target_ are not allowed in a manifest")
            else:
                check_model_config(value, f"{where}.{key}")
    elif isinstance(config, list):
        for i, value in enumerate(config):
            check_model_config(value, f"{where}[{i}]")
    elif not (config is None or isinstance(config, (str, int, float, bool))):
        raise ManifestError(f"{where}: unexpected value of type {type(config).__name__}")


def _expect(condition: bool, where: str, what: str) -> None:
    if not condition:
        raise ManifestError(f"{where}: {what}")


def validate_manifest(manifest: Any, where: str) -> dict[str, Any]:
    """Check a manifest against the format's schema (docs/model_version_format.md) before anything in it is used.

    Raises:
        ManifestError: naming the first field that is missing or malformed.
    """
    _expect(isinstance(manifest, dict) and manifest.get("format") == FORMAT, where, f"not a {FORMAT} manifest")
    for key in ("version_id", "model", "embedding", "preprocessing", "files"):
        _expect(key in manifest, where, f"missing key {key!r}")
    vid = manifest["version_id"]
    _expect(isinstance(vid, str) and _VERSION_ID.fullmatch(vid) is not None, where,
            f"version_id {vid!r} is not 1-64 characters of A-Z a-z 0-9 . _ -")
    emb = manifest["embedding"]
    _expect(isinstance(emb, dict) and isinstance(emb.get("dim"), int) and not isinstance(emb.get("dim"), bool)
            and 0 < emb["dim"] <= 1 << 20, where, "embedding.dim must be a positive integer")
    _expect(isinstance(emb.get("normalized"), bool), where, "embedding.normalized must be true or false")
    _expect(isinstance(manifest["preprocessing"], dict), where, "preprocessing must be a mapping")
    _expect(isinstance(manifest["model"], dict) and "_target_" in manifest["model"], where,
            "model must be a config with a _target_")
    check_model_config(manifest["model"], f"{where}: model")
    files = manifest["files"]
    _expect(isinstance(files, dict) and WEIGHTS in files, where, f"files must list the sha256 of {WEIGHTS}")
    for name, digest in files.items():
        _expect(isinstance(name, str) and not name.startswith("/") and ".." not in Path(name).parts, where,
                f"file name {name!r} must be a relative path inside the version directory")
        _expect(isinstance(digest, str) and _SHA256.fullmatch(digest) is not None, where,
                f"files[{name!r}] is not a sha256 hex digest")
    parent = manifest.get("parent")
    _expect(parent is None or (isinstance(parent, str) and _VERSION_ID.fullmatch(parent) is not None), where,
            f"parent {parent!r} is not a version id")
    edges = manifest.get("compatibility", [])
    _expect(isinstance(edges, list), where, "compatibility must be a list")
    for i, edge in enumerate(edges):
        _expect(isinstance(edge, dict) and edge.get("kind") in EDGE_KINDS, where,
                f"compatibility[{i}].kind must be one of {EDGE_KINDS}")
        other = edge.get("source" if edge["kind"] == "forward" else "target")
        _expect(isinstance(other, str) and _VERSION_ID.fullmatch(other) is not None, where,
                f"compatibility[{i}] names no valid version")
        if edge["kind"] == "prefix":
            _expect(isinstance(edge.get("dim"), int) and 0 < edge["dim"] <= emb["dim"], where,
                    f"compatibility[{i}].dim must be in 1..{emb['dim']}")
        if edge["kind"] in ("affine", "forward"):
            _expect(edge.get("file") in files, where, f"compatibility[{i}].file must be listed in files")
    return manifest


@dataclass
class CompatibilityEdge:
    """How this version's vectors compare with another version's (see the format doc).

    Attributes:
        kind: ``identity`` | ``prefix`` | ``affine`` | ``forward``.
        other: the target version (``source`` for ``forward`` edges).
        dim: for ``prefix``: the number of leading coordinates that live in the target space.
        arrays: for ``affine`` (``weight`` (d_target, d_self), ``bias`` (d_target,)) and ``forward``
            (``w0, b0, w1, b1, ...``, each ``w_i`` (out, in)).
        activation: for ``forward``: the nonlinearity between layers.
        normalize_output: L2-normalise the transformed vector.
        info: free-form facts written to the manifest (e.g. the λ used, singular values).
        side_input: for ``forward``: ``(version_id, dim)`` of a side-information version whose vector of the
            same item (L2-normalised) is concatenated to the source vector at the MLP's input (FCT's ψ).
    """

    kind: str
    other: str
    dim: int | None = None
    arrays: dict[str, np.ndarray] = field(default_factory=dict)
    activation: str | None = None
    normalize_output: bool = True
    info: dict[str, Any] = field(default_factory=dict)
    side_input: tuple[str, int] | None = None

    def __post_init__(self) -> None:
        if self.kind not in EDGE_KINDS:
            raise ManifestError(f"unknown compatibility edge kind {self.kind!r}; known: {', '.join(EDGE_KINDS)}")
        if self.kind == "prefix" and (self.dim is None or self.dim <= 0):
            raise ManifestError("a prefix edge needs a positive dim")
        if self.kind == "affine" and set(self.arrays) != {"weight", "bias"}:
            raise ManifestError("an affine edge needs exactly the arrays 'weight' and 'bias'")
        if self.kind == "forward" and not self.arrays:
            raise ManifestError("a forward edge needs its layer arrays w0, b0, ...")
        if self.side_input is not None and (self.kind != "forward" or int(self.side_input[1]) <= 0):
            raise ManifestError("side_input belongs to a forward edge and needs a positive dim")

    @property
    def file(self) -> str | None:
        if self.kind == "affine":
            return f"transforms/affine_to_{self.other}.npz"
        if self.kind == "forward":
            return f"transforms/forward_from_{self.other}.npz"
        return None

    def to_manifest(self) -> dict[str, Any]:
        entry: dict[str, Any] = {"kind": self.kind}
        entry["source" if self.kind == "forward" else "target"] = self.other
        if self.kind == "prefix":
            entry["dim"] = int(self.dim)  # type: ignore[arg-type]
        if self.file is not None:
            entry["file"] = self.file
            entry["normalize_output"] = self.normalize_output
        if self.kind == "forward":
            entry["activation"] = self.activation or "relu"
        if self.side_input is not None:
            entry["side_input"] = {"version": str(self.side_input[0]), "dim": int(self.side_input[1])}
        if self.info:
            entry["info"] = self.info
        return entry


@dataclass
class LoadedVersion:
    """A model version loaded for inference: the module in eval mode and its manifest."""

    path: Path
    manifest: dict[str, Any]
    model: nn.Module

    @property
    def version_id(self) -> str:
        return str(self.manifest["version_id"])

    @property
    def embed_dim(self) -> int:
        return int(self.manifest["embedding"]["dim"])

    @property
    def edges(self) -> list[dict[str, Any]]:
        return list(self.manifest.get("compatibility", []))

    def edge_arrays(self, edge: dict[str, Any]) -> dict[str, np.ndarray]:
        """Load the arrays of one of this version's edges (verified against the manifest)."""
        return load_edge_arrays(self.path, self.manifest, edge)


def sha256_file(path: str | os.PathLike[str]) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def module_sha256(module: nn.Module) -> str:
    """A hash of a module's parameters and buffers, to prove a frozen model was not changed."""
    digest = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


def _atomic_write(path: Path, write: Any) -> None:
    """Write through a temporary file in the same folder, fsync, then rename over ``path``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as handle:
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def _clear_weight_paths(config: Any) -> Any:
    """Copy of a model config with every local-weights path set to None (weights come from the version)."""
    if isinstance(config, dict):
        return {k: (None if k in _WEIGHT_KEYS else _clear_weight_paths(v)) for k, v in config.items()}
    if isinstance(config, list):
        return [_clear_weight_paths(v) for v in config]
    return config


def save_model_version(
    out_dir: str | os.PathLike[str],
    *,
    version_id: str,
    model: nn.Module,
    model_config: dict[str, Any],
    embed_dim: int,
    normalized: bool,
    preprocessing: dict[str, Any],
    training: dict[str, Any],
    parent: str | None = None,
    edges: list[CompatibilityEdge] | None = None,
) -> Path:
    """Write a model version directory (weights, transforms, then the manifest, each atomically).

    Args:
        out_dir: the version directory (created if needed; other files in it are left alone).
        version_id: unique id, ``[A-Za-z0-9._-]{1,64}``.
        model: the deployed embedding module; its ``state_dict`` is saved.
        model_config: a Hydra-instantiable config that rebuilds ``model`` (``_target_`` ...).
        embed_dim: dimension of the deployed embedding.
        normalized: whether the deployed embedding is L2-normalised.
        preprocessing: ``Preprocessing.to_dict()`` of the model's input pipeline.
        training: facts about training (dataset, classes, method, seed, epochs, ...).
        parent: the version this one is compatible with, if any.
        edges: compatibility relations (see :class:`CompatibilityEdge`).

    Returns:
        The version directory path.
    """
    from safetensors.torch import save as safetensors_bytes

    if not _VERSION_ID.fullmatch(version_id):
        raise ManifestError(f"invalid version id {version_id!r}: use 1-64 characters of A-Z a-z 0-9 . _ -")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    edges = edges or []
    files: dict[str, str] = {}

    state = {k: v.detach().cpu().contiguous().clone() for k, v in model.state_dict().items()}
    weights_path = out / WEIGHTS
    _atomic_write(weights_path, lambda h: h.write(safetensors_bytes(state)))
    files[WEIGHTS] = sha256_file(weights_path)

    for edge in edges:
        if edge.file is None:
            continue
        arrays = {k: np.ascontiguousarray(v, dtype=np.float32) for k, v in edge.arrays.items()}
        _atomic_write(out / edge.file, lambda h, a=arrays: np.savez(h, **a))
        files[edge.file] = sha256_file(out / edge.file)

    manifest = {
        "format": FORMAT,
        "version_id": version_id,
        "created_utc": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "model": _clear_weight_paths(model_config),
        "embedding": {"dim": int(embed_dim), "normalized": bool(normalized), "dtype": "float32"},
        "preprocessing": preprocessing,
        "training": training,
        "parent": parent,
        "compatibility": [edge.to_manifest() for edge in edges],
        "files": files,
    }
    text = json.dumps(manifest, indent=2, sort_keys=False) + "\n"
    _atomic_write(out / MANIFEST, lambda h: h.write(text.encode()))
    _logger.info("wrote model version %s to %s", version_id, out)
    return out


def load_manifest(version_dir: str | os.PathLike[str]) -> dict[str, Any]:
    """Read a version directory's manifest and validate it against the schema (no torch work, no checksum of weights)."""
    path = Path(version_dir)
    manifest_path = path / MANIFEST
    if not path.is_dir():
        raise ManifestError(f"model version directory not found: {path}")
    if not manifest_path.is_file():
        raise ManifestError(f"{path} is not a model version directory: no {MANIFEST}")
    try:
        manifest = json.loads(manifest_path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ManifestError(f"unreadable manifest {manifest_path}: {exc}") from exc
    return validate_manifest(manifest, str(manifest_path))


def ancestor_dirs(version_dirs: Sequence[str | os.PathLike[str]]) -> list[Path]:
    """The given version directories plus every ancestor training recorded (routes compose through them)."""
    seen: dict[str, Path] = {}
    pending = [Path(d) for d in version_dirs]
    while pending:
        directory = pending.pop(0)
        manifest_path = directory / MANIFEST
        if not manifest_path.is_file():
            raise ManifestError(f"{directory}: not a model version directory (no {MANIFEST})")
        manifest = json.loads(manifest_path.read_text())
        vid = str(manifest.get("version_id"))
        if vid in seen:
            continue
        seen[vid] = directory
        found = _recorded_version_dir(directory, manifest.get("training", {}).get("old_version_dir"))
        if found is not None:
            pending.append(found)
    return list(seen.values())


def _recorded_version_dir(directory: Path, recorded: str | None) -> Path | None:
    """A version directory training recorded, as written or next to ``directory`` (a runs folder moved whole)."""
    for candidate in ([Path(recorded), directory.parent / Path(recorded).name] if recorded else []):
        if (candidate / MANIFEST).is_file():
            return candidate
    return None


def side_info_dir(version_dir: str | os.PathLike[str]) -> Path | None:
    """The side-information version a forward edge of this version reads (FCT's ψ), as training recorded it.

    None when no edge of the version takes side information. The recorded directory is tried as written,
    then next to ``version_dir`` under the same name (a runs folder moved as a whole).

    Raises:
        ManifestError: an edge takes side information but its version directory is not found.
    """
    directory = Path(version_dir)
    manifest_path = directory / MANIFEST
    if not manifest_path.is_file():
        return None  # extracted embeddings, not a version: no edges
    manifest = json.loads(manifest_path.read_text())
    edges = [e for e in manifest.get("compatibility", []) if isinstance(e, dict)]
    needed = [e["side_input"]["version"] for e in edges if isinstance(e.get("side_input"), dict)]
    if not needed:
        return None
    recorded = manifest.get("training", {}).get("side_info_version_dir")
    found = _recorded_version_dir(directory, recorded)
    if found is not None:
        return found
    raise ManifestError(
        f"{directory}: its forward edge takes side information from version {needed[0]!r}, whose directory "
        f"({recorded or 'not recorded'}) is not found; give it explicitly (compatembed-eval side=<directory>)"
    )


def _verify_file(version_dir: Path, manifest: dict[str, Any], name: str) -> Path:
    path = version_dir / name
    expected = manifest["files"].get(name)
    if expected is None:
        raise ManifestError(f"{version_dir}: manifest lists no checksum for {name}")
    if not path.is_file():
        raise ManifestError(f"{version_dir}: {name} is missing")
    actual = sha256_file(path)
    if actual != expected:
        raise ManifestError(
            f"{path} does not match its manifest (sha256 {actual[:12]}… != {expected[:12]}…): "
            "the file was changed or belongs to another version"
        )
    return path


def load_edge_arrays(
    version_dir: str | os.PathLike[str], manifest: dict[str, Any], edge: dict[str, Any]
) -> dict[str, np.ndarray]:
    """Load and verify the ``.npz`` arrays of an ``affine`` or ``forward`` edge."""
    if "file" not in edge:
        return {}
    path = _verify_file(Path(version_dir), manifest, edge["file"])
    with np.load(path, allow_pickle=False) as data:
        return {k: data[k] for k in data.files}


def load_model_version(
    version_dir: str | os.PathLike[str], *, map_location: str | torch.device = "cpu"
) -> LoadedVersion:
    """Rebuild the deployed embedding module of a version and load its verified weights.

    Nothing from the manifest is used before it passed :func:`validate_manifest` (which also limits the
    model config to the project's own factories, :data:`DEPLOYABLE`) and the weights matched its sha256.

    Raises:
        ManifestError: missing/corrupt manifest, weights that do not match the manifest's checksum,
            or weights that do not fit the architecture the manifest names.
    """
    from hydra.utils import instantiate
    from safetensors.torch import load_file

    path = Path(version_dir)
    manifest = load_manifest(path)
    weights = _verify_file(path, manifest, WEIGHTS)
    try:
        model = instantiate(_clear_weight_paths(manifest["model"]), _convert_="all")
    except Exception as exc:  # hydra wraps the cause; report it on one line
        raise ManifestError(f"{path}: cannot build the model the manifest names: {exc}".splitlines()[0]) from exc
    state = load_file(str(weights), device=str(map_location))
    try:
        result = model.load_state_dict(state, strict=False)
    except RuntimeError as exc:  # shape mismatches
        raise ManifestError(f"{weights} does not fit the manifest's architecture: {exc}".replace("\n", " ")) from exc
    if result.missing_keys or result.unexpected_keys:
        raise ManifestError(
            f"{weights} does not fit the manifest's architecture: missing {list(result.missing_keys)[:3]}, "
            f"unexpected {list(result.unexpected_keys)[:3]}"
        )
    dim = int(manifest["embedding"]["dim"])
    model_dim = getattr(model, "embed_dim", dim)
    if int(model_dim) != dim:
        raise ManifestError(f"{path}: manifest says embedding dim {dim}, the model produces {model_dim}")
    model.to(map_location).eval()
    return LoadedVersion(path=path, manifest=manifest, model=model)
