"""Atomic, checksummed FAISS snapshots of a collection's segments.

Layout: ``<root>/<collection>/<seq as 20 digits>/`` holds one ``seg-<n>.faiss`` per segment and a
``manifest.json`` with, per file, its sha256 and what it is, plus the last sequence number the
snapshot includes. A snapshot is written into a temporary directory (each file fsynced), which is
then renamed into place and its parent fsynced: a snapshot directory either exists complete or not at
all. Restart loads the newest snapshot whose files all verify, then replays the store's rows with a
larger sequence number. A snapshot that fails verification is reported, renamed ``<seq>.corrupt`` and
never served.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

_logger = logging.getLogger(__name__)

SNAPSHOT_FORMAT = "compatembed_index.snapshot/1"


def file_sha256(path: Path) -> str:
    """Streamed sha256 of a file."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def fsync_file(path: Path) -> None:
    """Flush a file's data to disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_dir(path: Path) -> None:
    """Flush a directory entry table to disk (makes renames and creations durable)."""
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` via a temporary file, fsync, rename, fsync of the directory."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_dir(path.parent)


@dataclass
class SnapshotEntry:
    """One segment file in a snapshot: ``info`` is what the collection needs to rebuild the object."""

    file: str
    sha256: str
    info: dict[str, Any]


@dataclass
class LoadedSnapshot:
    """A verified snapshot: its directory, sequence number and entries."""

    path: Path
    seq: int
    entries: list[SnapshotEntry]
    extra: dict[str, Any] = field(default_factory=dict)


def write_snapshot(
    root: Path,
    collection: str,
    seq: int,
    segments: list[tuple[dict[str, Any], Callable[[Path], None]]],
    *,
    keep: int = 2,
    extra: dict[str, Any] | None = None,
) -> Path:
    """Write a snapshot atomically and prune older ones.

    Args:
        root: snapshot root directory.
        collection: collection name (a directory name).
        seq: last sequence number whose effects the segments include.
        segments: (info, writer) pairs; ``writer(path)`` writes one segment file.
        keep: how many snapshots to keep (at least 1).
        extra: additional fields for the manifest.

    Returns:
        The snapshot directory.
    """
    cdir = root / collection
    cdir.mkdir(parents=True, exist_ok=True)
    final = cdir / f"{seq:020d}"
    # Leftovers of a crashed snapshot are garbage: one process owns the data directory and its
    # collection writes one snapshot at a time (Collection.snapshot holds a lock for it).
    for stale in cdir.glob(".*.tmp-*"):
        shutil.rmtree(stale, ignore_errors=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{seq:020d}.tmp-", dir=cdir))
    entries = []
    for n, (info, writer) in enumerate(segments):
        fname = f"seg-{n}.faiss"
        writer(tmp / fname)
        fsync_file(tmp / fname)
        entries.append({"file": fname, "sha256": file_sha256(tmp / fname), "info": info})
    manifest = {"format": SNAPSHOT_FORMAT, "collection": collection, "seq": seq, "segments": entries,
                "extra": extra or {}}
    with open(tmp / "manifest.json", "w", encoding="utf-8") as f:
        json.dump(manifest, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    fsync_dir(tmp)
    if final.exists():  # same seq snapshotted twice: the new one replaces it
        shutil.rmtree(final)
    os.replace(tmp, final)
    fsync_dir(cdir)
    for old in list_snapshots(root, collection)[: -max(1, keep)]:
        shutil.rmtree(old, ignore_errors=True)
    _logger.info("snapshot %s: %d segments at seq %d", final, len(entries), seq)
    return final


def list_snapshots(root: Path, collection: str) -> list[Path]:
    """Complete snapshot directories of ``collection``, oldest first."""
    cdir = root / collection
    if not cdir.is_dir():
        return []
    return sorted(p for p in cdir.iterdir() if p.is_dir() and p.name.isdigit())


def verify_snapshot(path: Path) -> LoadedSnapshot:
    """Read a snapshot manifest and check every file's sha256.

    Raises:
        ValueError: the manifest is missing or malformed, or a file is missing or fails its checksum.
    """
    mpath = path / "manifest.json"
    try:
        manifest = json.loads(mpath.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ValueError(f"{path}: no manifest.json") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ValueError(f"{mpath}: unreadable manifest ({exc})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != SNAPSHOT_FORMAT:
        raise ValueError(f"{mpath}: not a {SNAPSHOT_FORMAT} manifest")
    entries = []
    for e in manifest.get("segments", []):
        fpath = path / e["file"]
        if not fpath.is_file():
            raise ValueError(f"{fpath}: missing")
        actual = file_sha256(fpath)
        if actual != e["sha256"]:
            raise ValueError(f"{fpath}: checksum mismatch (manifest {e['sha256'][:12]}…, file {actual[:12]}…)")
        entries.append(SnapshotEntry(e["file"], e["sha256"], e["info"]))
    return LoadedSnapshot(path, int(manifest["seq"]), entries, manifest.get("extra", {}))


def quarantine(path: Path) -> Path:
    """Rename a bad snapshot directory to ``<name>.corrupt`` so it is kept for inspection but never loaded."""
    dest = path.with_name(path.name + ".corrupt")
    if dest.exists():
        shutil.rmtree(dest, ignore_errors=True)
    os.replace(path, dest)
    fsync_dir(path.parent)
    return dest
