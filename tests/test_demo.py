"""The README demo's whole story on generated images: deploy, index, train compatible, query, upgrade, report."""

from __future__ import annotations

import io
import json
import shlex

from compatembed.demo import _write_thumbnails, main, serve_command


def test_demo_tells_the_whole_story(tmp_path, capsys):
    out = tmp_path / "demo"
    assert main(["--synthetic", "--out", str(out), "--per-class", "10", "--epochs", "1", "--no-progress",
                 "--upgrade", "0.5", "--queries", "40"]) == 0
    printed = capsys.readouterr().out
    for step in ("[1/5]", "[2/5]", "[3/5]", "[4/5]", "[5/5]"):
        assert step in printed
    assert "route to the old gallery: demo_new > demo_old" in printed  # the compatible model got a prefix edge
    assert f"report: {out / 'report' / 'report.md'}" in printed
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
        # for the web page: the gallery as deployed and fully backfilled, items naming their thumbnails
        assert {v: s["ntotal"] for v, s in service.stats("gallery_old")["segments"].items()} == {"demo_old": 100}
        assert {v: s["ntotal"] for v, s in service.stats("gallery_new")["segments"].items()} == {"demo_new": 100}
        item = service.get_points("gallery", [0], include_vectors=False)[0]
        assert set(item["metadata"]) == {"label", "class", "image"} and (out / "images" / item["metadata"]["image"]).is_file()
    assert f"look at it in a browser: {serve_command(out)}" in printed


def test_the_printed_command_serves_the_demo_thumbnails_and_report(tmp_path):
    """The part of the demo that feeds the web page, on the synthetic test split (no training)."""
    from fastapi.testclient import TestClient
    from PIL import Image

    from compatembed_index.api import IndexService
    from compatembed_index.cli import _settings, build_parser
    from compatembed_index.server import create_app

    from compatembed.cli import compose_config

    data_cfg = compose_config("eval", ["data=synthetic", "query=unused", "gallery=unused"]).data
    meta = _write_thumbnails(data_cfg, tmp_path / "images")
    assert len(meta) == 100 and {(m["label"], m["class"]) for m in meta.values()} == {(c, f"class{c}") for c in range(10)}
    assert all((tmp_path / "images" / m["image"]).is_file() for m in meta.values())
    (tmp_path / "report").mkdir()
    (tmp_path / "report" / "report.md").write_text("# report\n")
    argv = shlex.split(serve_command(tmp_path))
    assert argv[0] == "compatembed-index"
    settings = _settings(build_parser().parse_args(argv[1:]))
    with IndexService(None) as service:
        client = TestClient(create_app(service, settings))
        assert client.get("/ui/api/info").json()["images"] and client.get("/ui/api/info").json()["report"]
        for m in list(meta.values())[:3]:
            r = client.get("/ui/image", params={"path": m["image"]})
            assert r.status_code == 200 and r.headers["content-type"] == "image/png"
            with Image.open(io.BytesIO(r.content)) as picture:
                assert picture.size == (32, 32)


def test_demo_runs_again_over_its_own_output(tmp_path, capsys):
    """A second `make demo` in the same folder: the retrained versions get new manifests, the deployment starts afresh."""
    argv = ["--synthetic", "--out", str(tmp_path / "demo"), "--per-class", "10", "--epochs", "1", "--no-progress",
            "--upgrade", "0.5", "--queries", "20"]
    assert main(argv) == 0
    assert main([*argv, "--epochs", "2"]) == 0  # more epochs: training continues, and the manifests change
    assert "report: " in capsys.readouterr().out
