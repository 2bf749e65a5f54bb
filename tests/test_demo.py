"""The README demo's whole story on generated images: deploy, index, train compatible, query, upgrade, report."""

from __future__ import annotations

import json

from compatembed.demo import main


def test_demo_tells_the_whole_story(tmp_path, capsys):
    out = tmp_path / "demo"
    assert main(["--synthetic", "--out", str(out), "--per-class", "10", "--epochs", "1", "--no-progress",
                 "--upgrade", "0.5", "--queries", "40"]) == 0
    printed = capsys.readouterr().out
    for step in ("[1/5]", "[2/5]", "[3/5]", "[4/5]", "[5/5]"):
        assert step in printed
    assert "route to the old gallery: demo_new > demo_old" in printed  # the compatible model got a prefix edge
    assert f"report: {out / 'report' / 'report.md'}" in printed.splitlines()[-1]
    assert "deployment gate: " in printed
    report = json.loads((out / "report" / "report.json").read_text())
    assert report["matrix"]["versions"] == ["demo_old", "demo_new"]
    assert report["gate"]["deployed"] == "demo_old" and report["gate"]["candidate"] == "demo_new"
    assert report["backfill"]["curves"] and report["mixed"]["rows"]
    for name in ("report.md", "matrix.csv", "backfill.csv", "matrix_heatmap.png", "backfill.png", "neighbours.png"):
        assert (out / "report" / name).is_file(), name
    md = (out / "report" / "report.md").read_text()
    assert "## What compatibility looks like" in md and "![query neighbours](neighbours.png)" in md
    from PIL import Image

    with Image.open(out / "report" / "neighbours.png") as picture:  # 4 queries x 3 searches, 1 + 5 images each
        assert picture.size[0] > 600 and picture.size[1] > 1000

    # the deployed index survives the demo: the alias points at a gallery of both versions (half upgraded)
    from compatembed_index.api import IndexService

    with IndexService(out / "index") as service:
        assert service.aliases() == {"photos": "gallery"}
        segments = service.stats("photos")["segments"]
        assert segments["demo_old"]["ntotal"] == segments["demo_new"]["ntotal"] == 50


def test_demo_runs_again_over_its_own_output(tmp_path, capsys):
    """A second `make demo` in the same folder: the retrained versions get new manifests, the deployment starts afresh."""
    argv = ["--synthetic", "--out", str(tmp_path / "demo"), "--per-class", "10", "--epochs", "1", "--no-progress",
            "--upgrade", "0.5", "--queries", "20"]
    assert main(argv) == 0
    assert main([*argv, "--epochs", "2"]) == 0  # more epochs: training continues, and the manifests change
    assert "report: " in capsys.readouterr().out.splitlines()[-1]
