"""Training then validating on the held-out split: the number a sweep compares, written next to the version."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from compatembed.cli import compose_config
from compatembed.errors import ConfigError
from compatembed.training.run import train_and_validate

TINY = ["data=synthetic", "model=cifar_resnet20", "model.embed_dim=16", "trainer.progress=false", "trainer.epochs=1",
        "trainer.num_threads=1", "data.validation.fraction=0.2", "validation.enabled=true"]


def test_validation_report_is_on_the_val_split_and_is_the_returned_metric(tmp_path: Path) -> None:
    old, metric_old = train_and_validate(compose_config("train", TINY + ["data.classes=0-4", f"output_dir={tmp_path / 'old'}",
                                                                          "version_id=old"]))
    report = json.loads((old / "validation" / "report.json").read_text())
    assert report["split"] == "val" and report["query_version"] == report["gallery_version"] == "old"
    assert metric_old == next(r["mAP"] for r in report["pairs"] if r["query"] == r["gallery"] == "new")

    new_overrides = [f"method.old_version={old}", "version_id=new", f"output_dir={tmp_path / 'new'}", "validation.metric=top1"]
    new, metric_new = train_and_validate(compose_config("train", TINY + new_overrides))
    report = json.loads((new / "validation" / "report.json").read_text())
    assert report["gallery_version"] == "old"
    assert metric_new == next(r["top1"] for r in report["pairs"] if (r["query"], r["gallery"]) == ("new", "old"))
    embeddings = json.loads(next((new / "embeddings").glob("synthetic-val-*/meta.json")).read_text())
    assert embeddings["split"] == "val" and embeddings["count"] == 40  # 20% of 10 classes x 20 items


def test_validation_without_a_held_out_split_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="data.validation.fraction"):
        train_and_validate(compose_config("train", TINY[:-2] + ["validation.enabled=true", f"output_dir={tmp_path}"]))
    assert not (tmp_path / "checkpoints").exists()  # refused before any training


def _report(query: str, gallery: str) -> dict:
    pairs = [{"query": q, "gallery": g, "top1": t, "mAP": m}
             for q, g, t, m in (("new", "new", 0.7, 0.6), ("new", "old", 0.4, 0.3), ("old", "old", 0.35, 0.25))]
    return {"query_version": query, "gallery_version": gallery, "pairs": pairs}


def test_the_sweep_metric_is_of_the_configured_pair() -> None:
    from compatembed.training.run import sweep_metric

    with_old, alone = _report("new", "old"), _report("new", "new")
    assert sweep_metric(with_old, "mAP") == 0.3 and sweep_metric(with_old, "top1", "new/old") == 0.4
    assert sweep_metric(with_old, "mAP", "new/new") == 0.6  # an independent model ranked by its own retrieval
    assert sweep_metric(alone, "mAP") == 0.6
    with pytest.raises(ConfigError, match="needs a version with an old one"):
        sweep_metric(alone, "mAP", "new/old")
    with pytest.raises(ConfigError, match="unknown validation.pair"):
        sweep_metric(with_old, "mAP", "old/new")


@pytest.mark.parametrize(("override", "message"), [("validation.pair=new-new", "unknown validation.pair"),
                                                    ("validation.pair=new/old", "needs method.old_version")])
def test_a_bad_validation_pair_is_refused_before_training(tmp_path: Path, override: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        train_and_validate(compose_config("train", TINY + [override, f"output_dir={tmp_path}"]))
    assert not (tmp_path / "checkpoints").exists()


def test_a_sweep_can_require_compatibility_and_rank_by_the_new_model() -> None:
    from compatembed.training.run import sweep_metric

    passing, failing = _report("new", "old"), _report("new", "old")
    passing["compatible"] = {"top1": True, "mAP": True}
    failing["compatible"] = {"top1": True, "mAP": False}  # one metric failing is failing
    failing["pairs"][0]["mAP"] = 0.9  # the better new model, but not compatible
    assert sweep_metric(passing, "mAP", "new/new", require_compatible=True) == 0.6
    assert sweep_metric(failing, "mAP", "new/new") == 0.9  # without the constraint it wins
    constrained = sweep_metric(failing, "mAP", "new/new", require_compatible=True)
    assert constrained < 0 < sweep_metric(passing, "mAP", "new/new", require_compatible=True)
    assert constrained == pytest.approx(0.9 - 1.0)  # failing runs keep their order among themselves
    with pytest.raises(ConfigError, match="against an old version"):
        sweep_metric(_report("new", "new"), "mAP", "new/new", require_compatible=True)


def test_require_compatible_without_an_old_version_is_refused_before_training(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="require_compatible=true needs method.old_version"):
        train_and_validate(compose_config("train", TINY + ["validation.require_compatible=true", f"output_dir={tmp_path}"]))
    assert not (tmp_path / "checkpoints").exists()
