"""Shared by the evidence tools: run experiments as the CLIs do, evaluate them, describe the machine."""

from __future__ import annotations

import json
import os
import platform
import re
import subprocess
import sys
import time
from datetime import datetime
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]


def machine() -> dict[str, Any]:
    """What the numbers were measured on (recorded next to every number)."""
    import torch

    info: dict[str, Any] = {
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "platform": platform.platform(),
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    }
    try:
        import faiss

        info["faiss"] = faiss.__version__
    except ImportError:
        info["faiss"] = None
    return info


def describe_machine(m: dict[str, Any]) -> str:
    """:func:`machine`'s record in words, as the results' markdown gives it."""
    return f"{m['cpu_count']} CPUs, torch {m['torch']}, CUDA device: {m['cuda'] or 'none'}"


def train(experiment: str, *, runs: Path, overrides: list[str] = (), reuse: bool = True, log_dir: Path | None = None,
          name: str | None = None) -> dict[str, Any]:
    """Run ``compatembed-train experiment=<experiment>`` in a subprocess; returns wall time and the manifest.

    The version directory is ``runs/<name or experiment>``. With ``reuse`` an existing complete version
    directory (manifest present) is not trained again.
    """
    version_dir = runs / (name or experiment)
    manifest_path = version_dir / "manifest.json"
    if reuse and manifest_path.is_file():
        print(f"[reuse] {experiment}: {version_dir}", flush=True)
        manifest = json.loads(manifest_path.read_text())
        return {"experiment": experiment, "version_dir": str(version_dir), "wall_s": recorded_wall_s(version_dir),
                "manifest": manifest}
    cmd = [sys.executable, "-m", "compatembed.train", f"experiment={experiment}", f"output_dir={version_dir}", *overrides]
    print("[train] " + " ".join(cmd[2:]), flush=True)
    started = time.perf_counter()
    subprocess.run(cmd, check=True, cwd=REPO)
    wall = time.perf_counter() - started
    manifest = json.loads(manifest_path.read_text())
    (version_dir / "wall_time.json").write_text(json.dumps({"wall_s": wall}) + "\n")
    return {"experiment": experiment, "version_dir": str(version_dir), "wall_s": wall, "manifest": manifest}


_LOG_TIME = re.compile(r"^\[(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d),(\d{3})\]", re.MULTILINE)


def recorded_wall_s(version_dir: Path) -> float | None:
    """How long an existing version took to train: ``wall_time.json`` (written by :func:`train`), else the span
    of its ``train.log`` timestamps when the log shows one uninterrupted run (no resume), else None."""
    timing = version_dir / "wall_time.json"
    if timing.is_file():
        return float(json.loads(timing.read_text())["wall_s"])
    log = version_dir / "train.log"
    if not log.is_file():
        return None
    text = log.read_text(errors="replace")
    stamps = _LOG_TIME.findall(text)
    if len(stamps) < 2 or "resumed from" in text:
        return None
    first, last = (datetime.strptime(f"{t}.{ms}", "%Y-%m-%d %H:%M:%S.%f") for t, ms in (stamps[0], stamps[-1]))
    return (last - first).total_seconds()


def evaluate(query_dir: str, gallery_dir: str, out: Path, *, overrides: list[str] = ()) -> dict[str, Any]:
    """Run ``compatembed-eval`` for one (new, old) pair and return its report."""
    cmd = [sys.executable, "-m", "compatembed.evaluate", f"query={query_dir}", f"gallery={gallery_dir}", f"out={out}", *overrides]
    print("[eval] " + " ".join(cmd[2:]), flush=True)
    subprocess.run(cmd, check=True, cwd=REPO, stdout=subprocess.DEVNULL)
    return json.loads((out / "report.json").read_text())


METRICS = ("top1", "top5", "mAP", "mAP@R")
"""The retrieval metrics the evidence tools keep of every pair."""


def pair(report: dict[str, Any], query: str, gallery: str) -> dict[str, Any]:
    """The ``(query, gallery)`` entry of a ``compatembed-eval`` report ("old"/"new" name the two versions)."""
    found = [p for p in report["pairs"] if p["query"] == query and p["gallery"] == gallery]
    if not found:
        raise KeyError(f"the report has no {query}/{gallery} pair")
    return found[0]


def compatibility_pairs(report: dict[str, Any], metrics: tuple[str, ...] = METRICS) -> dict[str, Any]:
    """The three pairs a compatibility row shows (old/old, new/new, new/old, with ``metrics``), the route new
    queries took to the old gallery and the criterion per metric, as the report gives them."""
    out: dict[str, Any] = {name: {m: pair(report, *name.split("/"))[m] for m in metrics}
                           for name in ("old/old", "new/new", "new/old")}
    return {**out, "route": pair(report, "new", "old")["route"], "compatible": report["compatible"]}


def defined_gain(cross: float, old_self: float, independent_self: float) -> float | None:
    """:func:`compatembed.eval.compatibility.update_gain`, None unless the independent new model beats the old one
    (otherwise there is no gain to share, and no method can satisfy the criterion either)."""
    from compatembed.eval.compatibility import update_gain

    return update_gain(cross, old_self, independent_self) if independent_self > old_self else None


def pct(value: float | None) -> str:
    return "—" if value is None else f"{100 * value:.1f}"


def write_json(path: Path, payload: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=2) + "\n")
