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


# Settings that change how a run executes or where it reads its files, not what it learns: a version trained
# with other values of these is still the version an invocation asks for.
_HOW_NOT_WHAT = ("output_dir", "paths", "trainer.progress", "trainer.device", "data.cache_dir", "data.loader.num_workers",
                 "logger")


def _leaves(node: Any, prefix: str = "") -> dict[str, Any]:
    """A nested config as ``{"a.b.c": value}`` (lists are leaves)."""
    if isinstance(node, dict):
        out: dict[str, Any] = {}
        for key, value in node.items():
            out.update(_leaves(value, f"{prefix}{key}."))
        return out
    return {prefix[:-1]: node}


def _ignored(key: str) -> bool:
    if any(key == k or key.startswith(k + ".") for k in _HOW_NOT_WHAT):
        return True
    # where the data files are (a copy of the same data elsewhere is the same data): data.train.path, data.test.root...
    return key.startswith("data.") and key.rsplit(".", 1)[-1] in ("path", "root", "data_root")


def config_mismatch(version_dir: Path, experiment: str, overrides: list[str] = ()) -> list[str]:
    """How the config ``version_dir`` was trained with (its ``config.yaml``) differs from what
    ``experiment=<experiment> <overrides>`` composes today, as ``key: trained X, asked Y`` lines.

    Only settings present in both are compared (a key added to the configs since keeps the earlier
    behaviour by default), minus where files live and how the run executed (:data:`_HOW_NOT_WHAT`).
    Reusing a version by its directory name alone would report a version trained with other settings under
    the name of the asked ones, as after an experiment's defaults change.
    """
    from omegaconf import OmegaConf

    from compatembed.cli import compose_config

    stored = OmegaConf.to_container(OmegaConf.load(version_dir / "config.yaml"), resolve=False)
    asked = OmegaConf.to_container(compose_config("train", [f"experiment={experiment}", f"output_dir={version_dir}",
                                                            *overrides]), resolve=True)
    trained, wanted = _leaves(stored), _leaves(asked)
    return [f"{key}: trained {trained[key]!r}, asked {wanted[key]!r}" for key in sorted(trained.keys() & wanted.keys())
            if not _ignored(key) and not _same(trained[key], wanted[key])]


def _same(trained: Any, asked: Any) -> bool:
    """Equal values, or two spellings of one existing path (a version linked into another runs folder)."""
    if trained == asked:
        return True
    if isinstance(trained, str) and isinstance(asked, str) and trained and asked:
        a, b = Path(trained), Path(asked)
        return a.exists() and b.exists() and a.resolve() == b.resolve()
    return False


def stale_settings(version_dir: Path, experiment: str, overrides: list[str] = ()) -> list[str]:
    """``<version_dir>: key: trained X, asked Y`` for each setting a complete version directory was trained with
    that differs from what is asked now (:func:`config_mismatch`); empty when there is no such directory."""
    if not (version_dir / "manifest.json").is_file() or not (version_dir / "config.yaml").is_file():
        return []
    return [f"{version_dir}: {d}" for d in config_mismatch(version_dir, experiment, list(overrides))]


class StaleVersionError(SystemExit):
    """Version directories trained with other settings than an invocation asks for: the tool stops with their
    differences (a SystemExit, so every evidence tool says so without a traceback), before any training."""

    def __init__(self, differences: list[str]) -> None:
        super().__init__("Versions were trained with other settings than asked now:\n  " + "\n  ".join(differences)
                         + "\nRetrain them (--no-reuse), give another --runs folder, or move them away.")


def train(experiment: str, *, runs: Path, overrides: list[str] = (), reuse: bool = True,
          name: str | None = None) -> dict[str, Any]:
    """Run ``compatembed-train experiment=<experiment>`` in a subprocess; returns wall time and the manifest.

    The version directory is ``runs/<name or experiment>``. With ``reuse`` an existing complete version
    directory (manifest present) is not trained again, provided it was trained with the settings asked now;
    otherwise :class:`StaleVersionError` names the differences.
    """
    version_dir = runs / (name or experiment)
    manifest_path = version_dir / "manifest.json"
    if reuse and manifest_path.is_file():
        if not (version_dir / "config.yaml").is_file():
            print(f"[reuse] {version_dir} has no config.yaml: its settings cannot be checked", flush=True)
        differences = stale_settings(version_dir, experiment, overrides)
        if differences:
            raise StaleVersionError(differences)
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
