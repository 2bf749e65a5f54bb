"""Train → extract → eval on the generated dataset, through the Hydra configs the CLIs use."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

from compatembed.embeddings import EmbeddingSet
from compatembed.eval.pair_report import evaluate
from compatembed.extract import extract
from compatembed.training.run import train

TINY = ["data=synthetic", "model=cifar_resnet20", "model.embed_dim=16", "trainer.progress=false", "logger=csv"]


@pytest.fixture(scope="module")
def versions(tmp_path_factory):
    """An old model on classes 0-4 and an independent new model on 0-9 (a few steps each)."""
    from compatembed.cli import compose_config

    root = tmp_path_factory.mktemp("runs")
    out = {}
    for name, extra in (
        ("old", ["data.classes=0-4", "trainer.epochs=2"]),
        ("new", ["trainer.epochs=2", f"method.old_version={root / 'old'}"]),
    ):
        out[name] = train(compose_config("train", TINY + extra + [f"version_id={name}", f"output_dir={root / name}"]))
    return out


def test_training_writes_a_complete_version(versions):
    manifest = json.loads((versions["new"] / "manifest.json").read_text())
    assert manifest["version_id"] == "new" and manifest["parent"] == "old"
    assert manifest["compatibility"] == []  # independent: no relation to the parent
    assert manifest["embedding"] == {"dim": 16, "normalized": True, "dtype": "float32"}
    assert manifest["training"]["classes"] == list(range(10))
    assert json.loads((versions["old"] / "manifest.json").read_text())["training"]["classes"] == [0, 1, 2, 3, 4]
    rows = (versions["new"] / "metrics.csv").read_text().splitlines()
    assert rows[0].startswith("step,") and len(rows) > 2
    assert (versions["new"] / "checkpoints" / "last.ckpt").is_file()


def test_extract_and_eval(versions, compose, tmp_path):
    cfg = compose("extract", ["data=synthetic", f"version={versions['new']}", f"out={tmp_path / 'emb'}", "progress=false"])
    emb = EmbeddingSet.load(extract(cfg))
    assert emb.embeddings.shape == (100, 16) and emb.meta["version_id"] == "new"
    np.testing.assert_allclose(np.linalg.norm(emb.embeddings, axis=1), 1.0, atol=1e-5)
    assert sorted(emb.ids.tolist()) == list(range(100))

    cfg = compose("eval", ["data=synthetic", f"query={versions['new']}", f"gallery={versions['old']}",
                           f"out={tmp_path / 'rep'}", "progress=false"])
    report = evaluate(cfg)
    pairs = {(r["query"], r["gallery"]): r for r in report["pairs"]}
    assert set(pairs) == {("old", "old"), ("new", "new"), ("new", "old")}
    assert pairs[("new", "old")]["route"] == "none (raw)"
    for row in pairs.values():
        assert 0.0 <= row["top1"] <= row["top5"] <= 1.0 and 0.0 < row["mAP"] <= 1.0
    md = (tmp_path / "rep" / "report.md").read_text()
    assert "| old/old |" in md and "| new/old |" in md and "compatibility criterion" in md
    assert json.loads((tmp_path / "rep" / "report.json").read_text())["pairs"][2]["query"] == "new"


def test_resume_continues_from_the_checkpoint(versions, compose, tmp_path):
    from compatembed.training.run import train

    base = TINY + ["version_id=r", f"output_dir={tmp_path / 'r'}"]
    train(compose("train", base + ["trainer.epochs=1"]))
    first = (tmp_path / "r" / "metrics.csv").read_text().splitlines()
    train(compose("train", base + ["trainer.epochs=2"]))
    rows = (tmp_path / "r" / "metrics.csv").read_text().splitlines()
    epochs = [line.split(",")[-1] for line in rows[1:]]
    assert rows[: len(first)] == first  # earlier rows kept
    header = rows[0].split(",")
    epoch_col = header.index("epoch")
    logged = sorted({int(float(line.split(",")[epoch_col])) for line in rows[1:] if line.split(",")[epoch_col]})
    assert logged == [0, 1], epochs  # epoch 0 was not trained again


def test_resume_against_a_changed_old_model_is_refused(versions, compose, tmp_path):
    """A checkpoint records its frozen models' hashes: resuming after the old version changed would mix models."""
    import shutil

    from compatembed.errors import ConfigError
    from compatembed.training.run import train

    shutil.copytree(versions["old"], tmp_path / "old")
    base = TINY + ["method=bct", f"method.old_version={tmp_path / 'old'}", "version_id=n", f"output_dir={tmp_path / 'n'}",
                   f"paths.cache_dir={tmp_path / 'cache'}"]
    train(compose("train", base + ["trainer.epochs=1"]))
    shutil.rmtree(tmp_path / "old")
    shutil.copytree(versions["new"], tmp_path / "old")  # "the old version was retrained"
    with pytest.raises(ConfigError, match="trained against other frozen models .*old_model"):
        train(compose("train", base + ["trainer.epochs=2"]))
    train(compose("train", base + ["trainer.epochs=2", "trainer.resume=false"]))  # starting over is allowed


def _cli(args: list[str], cwd) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", *args], cwd=cwd, capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize(
    "args, message",
    [
        (["compatembed.train", "data=synthetic", "data.classes=[42]", "trainer=smoke"], "class id 42"),
        (["compatembed.train", "data=cifar10", "data.train.path=nowhere/train.tar", "trainer=smoke"], "dataset path not found"),
        (["compatembed.extract", "data=synthetic", "version=nowhere"], "model version directory not found"),
        (["compatembed.evaluate", "data=synthetic", "query=nowhere", "gallery=nowhere"], "not found"),
    ],
)
def test_bad_input_is_one_clear_line(args, message, tmp_path):
    result = _cli(args, tmp_path)
    assert result.returncode == 2, result.stderr
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("error: ") and message in last, result.stderr
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "runs" / "model" / "manifest.json").exists()  # nothing half-written


@pytest.mark.gpu
@pytest.mark.parametrize("method", ["independent", "oca"])
def test_cuda_training_step_with_bf16_writes_a_version_that_reloads_on_the_gpu(method, compose, tmp_path, request):
    """On a CUDA host (pytest -m gpu): the training loop runs under bf16 autocast and the version reloads there."""
    import torch

    from compatembed.models.version import load_model_version

    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device (this host has none)")
    versions = request.getfixturevalue("versions")
    extra = ["model.embed_dim=48", f"method.old_version={versions['new']}"] if method == "oca" else []
    out = train(compose("train", TINY + [f"method={method}", "trainer=gpu", "trainer.epochs=1",
                                         "trainer.max_steps_per_epoch=4", "trainer.checkpoint=false",
                                         f"version_id=gpu_{method}", f"output_dir={tmp_path / method}", *extra]))
    loaded = load_model_version(out, map_location="cuda")
    with torch.no_grad():
        emb = loaded.model.embed(torch.randn(4, 3, 32, 32, device="cuda"))
    assert emb.device.type == "cuda" and torch.isfinite(emb).all()
    summary = loaded.manifest["training"]["summary"]
    assert summary["train/step_time_s"] > 0 and np.isfinite(list(summary.values())).all()
