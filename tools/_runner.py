"""Shared by the evidence tools: run experiments as the CLIs do, evaluate them, describe the machine."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import time
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
        timing = version_dir / "wall_time.json"
        wall = json.loads(timing.read_text())["wall_s"] if timing.is_file() else None
        return {"experiment": experiment, "version_dir": str(version_dir), "wall_s": wall, "manifest": manifest}
    cmd = [sys.executable, "-m", "compatembed.train", f"experiment={experiment}", f"output_dir={version_dir}", *overrides]
    print("[train] " + " ".join(cmd[2:]), flush=True)
    started = time.perf_counter()
    subprocess.run(cmd, check=True, cwd=REPO)
    wall = time.perf_counter() - started
    manifest = json.loads(manifest_path.read_text())
    (version_dir / "wall_time.json").write_text(json.dumps({"wall_s": wall}) + "\n")
    return {"experiment": experiment, "version_dir": str(version_dir), "wall_s": wall, "manifest": manifest}


def evaluate(query_dir: str, gallery_dir: str, out: Path, *, overrides: list[str] = ()) -> dict[str, Any]:
    """Run ``compatembed-eval`` for one (new, old) pair and return its report."""
    cmd = [sys.executable, "-m", "compatembed.evaluate", f"query={query_dir}", f"gallery={gallery_dir}", f"out={out}", *overrides]
    print("[eval] " + " ".join(cmd[2:]), flush=True)
    subprocess.run(cmd, check=True, cwd=REPO, stdout=subprocess.DEVNULL)
    return json.loads((out / "report.json").read_text())


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
