"""compatembed-report end to end on hand-written model versions with cached embeddings (no training).

v1 (6-d) is the deployed model; v2 (8-d, prefix → v1) is built compatible (its first 6 dims are a cleaner
view of the same class structure); v3 (10-d, prefix → v2) is built incompatible (its prefix is noise).
Each version directory holds the embeddings cache that ``load_or_extract`` reads, so nothing is trained.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from compatembed.embeddings import EmbeddingSet
from compatembed.errors import ConfigError
from compatembed.eval.matrix import compute_matrix
from compatembed.eval.report import build_report
from compatembed.eval.report_render import SECTIONS, log_to_wandb, render_markdown

REPO = Path(__file__).resolve().parents[1]
N, CLASSES = 60, 4
FAKE_SHA = "0" * 64


def _write(root: Path, vid: str, x: np.ndarray, labels: np.ndarray, edges: list, parent: Path | None,
           method: str, classes: list[int]) -> Path:
    vdir = root / vid
    vdir.mkdir(parents=True)
    manifest = {
        "format": "compatembed.model_version/1", "version_id": vid, "preprocessing": {},
        "model": {"_target_": "compatembed.models.EmbeddingModel"},  # never built: the cached embeddings are used
        "embedding": {"dim": x.shape[1], "normalized": True, "dtype": "float32"},
        "training": {"method": method, "classes": classes, "old_version_dir": str(parent) if parent else None},
        "parent": parent.name if parent else None, "compatibility": edges,
        "files": {"model.safetensors": FAKE_SHA},  # weights absent: the cached embeddings are used
    }
    (vdir / "manifest.json").write_text(json.dumps(manifest))
    x = (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)
    meta = {"version_id": vid, "version_dir": str(vdir), "weights_sha256": FAKE_SHA, "dataset": "synthetic", "split": "test"}
    EmbeddingSet(x, labels, np.arange(N), meta).save(vdir / "embeddings" / "synthetic-test")
    return vdir


@pytest.fixture(scope="module")
def versions(tmp_path_factory):
    root = tmp_path_factory.mktemp("versions")
    rng = np.random.default_rng(0)
    labels = np.repeat(np.arange(CLASSES), N // CLASSES)
    centres = 1.5 * rng.normal(size=(CLASSES, 6))
    v1 = _write(root, "v1", centres[labels] + 1.2 * rng.normal(size=(N, 6)), labels, [], None, "independent", [0, 1])
    v2x = np.hstack([centres[labels] + 0.3 * rng.normal(size=(N, 6)), rng.normal(size=(N, 2))])
    v2 = _write(root, "v2", v2x, labels, [{"kind": "prefix", "target": "v1", "dim": 6}], v1, "oca", [0, 1, 2])
    v3x = np.hstack([rng.normal(size=(N, 8)), 3 * centres[labels][:, :2] + 0.3 * rng.normal(size=(N, 2))])
    v3 = _write(root, "v3", v3x, labels, [{"kind": "prefix", "target": "v2", "dim": 8}], v2, "bct", [0, 1, 2, 3])
    indep = _write(root, "i3", centres[labels] + 0.1 * rng.normal(size=(N, 6)), labels, [], v2, "independent", [0, 1, 2, 3])
    return {"v1": v1, "v2": v2, "v3": v3, "i3": indep}


def _overrides(versions, out, *extra):
    return ["data=synthetic", f"versions=[{versions['v1']},{versions['v2']},{versions['v3']}]", f"out={out}",
            "progress=false", "backfill.points=5", "backfill.seeds=[0,1]", "mixed.batch_size=16", *extra]


def test_report_has_every_section_and_consistent_numbers(versions, compose, tmp_path):
    out = tmp_path / "rep"
    cfg = compose("report", _overrides(versions, out, f"independent=[null,{versions['i3']}]",
                                       "backfill.orders=[random,neighbour_margin]", "backfill.old=v2", "gate.enabled=true"))
    report = build_report(cfg)
    md = (out / "report.md").read_text()
    for section in SECTIONS:
        assert f"## {section}\n" in md, section
    assert "**Deployment gate: FAIL.**" in md and "![backfill curves](backfill.png)" in md
    for name in ("report.json", "matrix.csv", "backfill.csv", "matrix_heatmap.png", "backfill.png"):
        assert (out / name).is_file(), name
    assert (out / "matrix_heatmap.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    saved = json.loads((out / "report.json").read_text())
    assert saved["matrix"]["versions"] == ["v1", "v2", "v3"]

    # the matrix is the eval CLI's computation, and v2 is compatible with v1 while v3 is not with v2
    sets = [EmbeddingSet.load(versions[v] / "embeddings" / "synthetic-test") for v in ("v1", "v2", "v3")]
    m = compute_matrix(sets)
    got = np.array([[np.nan if v is None else v for v in row] for row in report["matrix"]["values"]["mAP"]])
    np.testing.assert_allclose(got, m.values["mAP"])  # NaN above the diagonal in both
    holds = {(p["query"], p["gallery"]): p["holds"] for p in report["summary"]["mAP"]["criterion"]}
    assert holds[("v2", "v1")] and not holds[("v3", "v2")]
    assert report["gate"]["passed"] is False and report["gate"]["candidate"] == "v3"
    gain = report["summary"]["mAP"]["update_gain"]
    assert gain[0]["value"] is None and gain[1]["value"] is not None
    assert len((out / "matrix.csv").read_text().strip().splitlines()) == 1 + 4 * 6

    # mixed gallery: all-v1 through the service equals the matrix entry C[v3][v1]
    rows = {tuple(r["fractions"].values()): r for r in report["mixed"]["rows"]}
    assert rows[(1.0, 0.0, 0.0)]["mAP"] == pytest.approx(m.values["mAP"][2, 0], abs=1e-5)
    assert rows[(0.0, 0.0, 1.0)]["mAP"] == pytest.approx(m.values["mAP"][2, 2], abs=1e-5)
    # backfill v2 → v3: from C[v3][v2] at 0% to C[v3][v3] at 100%, for every order
    bf = report["backfill"]
    assert bf["old"] == "v2" and set(bf["curves"]) == {"random (mean of 2 seeds)", "neighbour_margin"}
    for points in bf["curves"].values():
        assert [p["fraction"] for p in points] == [0.0, 0.25, 0.5, 0.75, 1.0]
        assert points[0]["mAP"] == pytest.approx(m.values["mAP"][2, 1], abs=1e-5)
        assert points[-1]["mAP"] == pytest.approx(m.values["mAP"][2, 2], abs=1e-5)


def test_calibrated_merges_are_reported_next_to_the_raw_ones(versions, compose, tmp_path):
    out = tmp_path / "cal"
    report = build_report(compose("report", _overrides(versions, out, "backfill.orders=[random]", "backfill.seeds=[0]",
                                                       "backfill.calibrate=true", "plots=false",
                                                       "mixed.max_queries=20")))  # the other 40 items can calibrate
    rows = {tuple(r["fractions"].values()): r for r in report["mixed"]["rows"]}
    assert "calibrated" not in rows[(1.0, 0.0, 0.0)]  # v3 stores nothing: nothing to fit from
    mixed = rows[(1 / 3, 1 / 3, 1 / 3)]
    assert set(mixed["calibration"]) == {"v3|v1", "v3|v2"} and set(mixed["calibrated"]) >= {"mAP", "top1"}
    curves = report["backfill"]["curves"]
    assert set(curves) == {"random", "random, calibrated"}
    raw, cal = curves["random"], curves["random, calibrated"]
    # the ends hold one version only: calibration cannot change them; in between it was fitted
    for end in (0, -1):
        assert cal[end]["mAP"] == pytest.approx(raw[end]["mAP"], abs=1e-9)
    assert any(fit for p in cal[1:-1] for fit in p["calibration"])  # one fit per seed, averaged curves
    assert "mAP calibrated" in (out / "report.md").read_text()


def test_sections_that_did_not_run_say_so(versions, compose, tmp_path):
    cfg = compose("report", _overrides(versions, tmp_path / "r", "mixed.enabled=false", "backfill.enabled=false", "plots=false"))
    report = build_report(cfg)
    md = render_markdown(report)
    for section in SECTIONS:
        assert f"## {section}\n" in md
    assert "Not run (mixed.enabled=false)" in md and "Not run (backfill.enabled=false)" in md
    assert "No deployment gate was requested" in md and not (tmp_path / "r" / "backfill.csv").exists()


def test_bad_configs_are_one_line_errors(versions, compose, tmp_path):
    with pytest.raises(ConfigError, match="versions is empty"):
        build_report(compose("report", ["data=synthetic", "versions=[]", f"out={tmp_path}"]))
    with pytest.raises(ConfigError, match="one entry .* per upgrade step"):
        build_report(compose("report", _overrides(versions, tmp_path, f"independent=[{versions['i3']}]")))
    with pytest.raises(ConfigError, match="not one of the report's versions"):
        build_report(compose("report", _overrides(versions, tmp_path, "gate.deployed=v9", "mixed.enabled=false",
                                                  "backfill.enabled=false")))


def _run(module_call: str, args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    code = f"import sys; sys.argv[0] = 'compatembed'; from compatembed.report import {module_call}; {module_call}()"
    return subprocess.run([sys.executable, "-c", code, *args], cwd=cwd, capture_output=True, text=True, timeout=120)


def test_gate_exit_status(versions, tmp_path, monkeypatch, capsys):
    from compatembed.report import gate_main, main

    base = ["data=synthetic", "progress=false", "plots=false"]
    # in-process: a compatible candidate passes (exit status 0, nothing raised)
    monkeypatch.setattr(sys, "argv", ["compatembed-gate", *base, f"versions=[{versions['v1']},{versions['v2']}]",
                                      f"out={tmp_path / 'ok'}"])
    gate_main()
    assert "gate: PASS" in capsys.readouterr().out
    monkeypatch.setattr(sys, "argv", ["compatembed-report", "data=synthetic", "versions=[nowhere]", f"out={tmp_path / 'x'}"])
    with pytest.raises(SystemExit) as exit_info:
        main()
    assert exit_info.value.code == 2 and capsys.readouterr().err.strip().startswith("error: ")
    # a real process, as a pipeline runs it: an incompatible candidate exits 3 with a one-line reason
    bad = _run("gate_main", [*base, f"versions=[{versions['v2']},{versions['v3']}]", f"out={tmp_path / 'bad'}",
                             "gate.metric=top1"], tmp_path)
    assert bad.returncode == 3, bad.stderr
    last = bad.stderr.strip().splitlines()[-1]
    assert last.startswith("gate: FAIL: v3 FAILS the compatibility criterion against deployed v2 on top1")
    assert json.loads((tmp_path / "bad" / "report.json").read_text())["gate"]["passed"] is False


def test_wandb_gets_tables_and_images_offline(versions, compose, tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_SILENT", "true")
    out = tmp_path / "w"
    report = build_report(compose("report", _overrides(versions, out, "mixed.enabled=false", "backfill.points=3")))
    monkeypatch.delenv("WANDB_MODE", raising=False)
    log_to_wandb(report, out, mode="offline", name="test")
    runs = list((out / "wandb").glob("offline-run-*"))
    assert len(runs) == 1 and list(runs[0].glob("*.wandb"))
    assert list(runs[0].rglob("*.png")), "the plots were not logged as images"
    log_to_wandb(report, tmp_path / "d", mode="disabled")  # the disabled mode the test suite runs in is a no-op


@pytest.mark.slow
def test_chain_tool_on_synthetic_data(tmp_path):
    """tools/run_cifar10_chain.py end to end with tiny settings (five trainings of two steps each)."""
    cmd = [sys.executable, "-m", "tools.run_cifar10_chain", "--extra-dims", "4", "--runs", str(tmp_path / "runs"),
           "--out", str(tmp_path / "chain"), "--report-arg", "progress=false", "--report-arg", "backfill.points=3",
           "--", "data=synthetic", "model=cifar_resnet20", "model.embed_dim=16", "trainer=smoke", "logger=none"]
    result = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    compatible = json.loads((tmp_path / "chain" / "report.json").read_text())
    independent = json.loads((tmp_path / "chain" / "independent" / "report.json").read_text())
    assert compatible["matrix"]["routes"][2][0] == "query: prefix+prefix"  # v3 → v1 composes through v2
    assert independent["matrix"]["routes"][2][0] == "none (raw)"
    assert all(g["value"] is not None or "n/a" in g["note"] for g in compatible["summary"]["mAP"]["update_gain"])
    for name in ("report.md", "matrix.csv", "backfill.csv", "matrix_heatmap.png", "backfill.png", "run.json"):
        assert (tmp_path / "chain" / name).is_file(), name
