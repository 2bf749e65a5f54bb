"""Recovery at load: the newest snapshot of a collection that verifies, with every bad one quarantined.

A snapshot is used only if its checksums verify, each index file reads back with the vector count
its manifest gives, and its factory strings still match the collection's config (a changed factory
means: rebuild that segment from the store). Anything else quarantines the snapshot and tries the
next older one; the caller replays the store's rows written after the snapshot it got, or rebuilds
every segment from the store when none is usable.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from compatembed_index import snapshot as snap
from compatembed_index.segment import Segment

if TYPE_CHECKING:
    from compatembed_index.collection import CollectionConfig

Loaded = tuple[int, dict[str, Segment], dict[tuple[str, str], Segment]]
"""A usable snapshot: its sequence number, the segments by version, the copies by (source, target)."""


def _relative(root: Path, exc: BaseException) -> str:
    """``exc``'s message with the snapshot root cut from the paths in it (no absolute server paths)."""
    msg = str(exc)
    for r in {str(root), str(root.resolve())}:
        msg = msg.replace(r + "/", "")
    return msg


def load_newest_snapshot(root: Path, name: str, config: CollectionConfig, *, mmap: bool,
                         report: Callable[[str], None]) -> Loaded | None:
    """The newest snapshot of collection ``name`` under ``root`` that verifies (None: none usable).

    Each unusable snapshot is reported (``report``, with names relative to ``root``: reports are served
    in the collection's stats) and moved aside.
    """
    for path in reversed(snap.list_snapshots(root, name)):
        try:
            loaded = snap.verify_snapshot(path)
            segments: dict[str, Segment] = {}
            copies: dict[tuple[str, str], Segment] = {}
            wanted = {tuple(p) for p in config.materialised}
            for e in loaded.entries:
                info = e.info
                space = info["version"] if info["kind"] == "segment" else info["target"]
                if info["factory"] != config.factory_for(space):
                    continue  # config changed since: rebuilt from the store by the caller
                if info["kind"] == "copy" and (info["source"], info["target"]) not in wanted:
                    continue
                seg = Segment.read(
                    path / e.file, dim=info["dim"], factory=info["factory"], metric=info["metric"],
                    trained=info["trained"], train_size=config.train_size,
                    search_params=config.search_params, device=config.device, mmap=mmap,
                )
                if seg.ntotal != info["ntotal"]:
                    raise ValueError(f"{path / e.file}: holds {seg.ntotal} vectors, manifest says {info['ntotal']}")
                if info["kind"] == "segment":
                    segments[info["version"]] = seg
                else:
                    copies[(info["source"], info["target"])] = seg
        except Exception as exc:  # any failure means: not this snapshot
            rel = f"{name}/{path.name}"
            report(f"snapshot {rel} is unusable and was quarantined: {_relative(root, exc)}")
            try:
                snap.quarantine(path)
            except OSError as qexc:
                report(f"could not quarantine {rel}: {qexc.strerror or type(qexc).__name__}")
            continue
        return loaded.seq, segments, copies
    return None
