"""tools/run_pretrained_upgrade: argument checks, the row summary and the rendered results (its full run is the evidence)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tools.run_pretrained_upgrade import ROWS, main, prefix_caches, render, summarise


def _report(old_top1: float, new_top1: float, cross_top1: float, route: str = "query: prefix") -> dict:
    def pair(query: str, gallery: str, top1: float, route_taken: str) -> dict:
        return {"query": query, "gallery": gallery, "top1": top1, "top5": top1 + 0.1, "mAP": top1 - 0.1,
                "mAP@R": top1 - 0.2, "route": route_taken}

    return {"query_version": "pretrained_upgrade_x", "pairs": [
        pair("old", "old", old_top1, "same version"), pair("new", "new", new_top1, "same version"),
        pair("new", "old", cross_top1, route)],
        "compatible": {"top1": cross_top1 > old_top1, "mAP": cross_top1 > old_top1}}


def _trained(epochs: int) -> dict:
    training = {"epochs": epochs, "summary": {"train/images_per_s": 120.0},
                "frozen_prefix": {"trainable_parameters": 2_820_000, "augmentation": "none (cached prefix features)"}}
    return {"version_dir": "runs/pretrained_upgrade_x", "wall_s": 90.0,
            "manifest": {"training": training, "embedding": {"dim": 1280}}}


@pytest.mark.parametrize("argv", [["--rows", "nope"], ["--throughput-images", "0"]])
def test_bad_arguments_are_refused_before_any_training(argv: list[str], tmp_path: Path, capsys) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["--runs", str(tmp_path / "runs"), "--out", str(tmp_path / "out"), *argv])
    assert exc.value.code == 2 and capsys.readouterr().err
    assert not any(tmp_path.iterdir())


def test_summary_measures_against_the_old_model_and_both_independent_references() -> None:
    references = {"as_is": {"top1": 0.70, "mAP": 0.50}, "finetuned": {"top1": 0.80, "mAP": 0.75}}
    bct = summarise(ROWS["bct"], _trained(6), _report(0.60, 0.68, 0.65), references, eval_wall_s=30.0)
    assert bct["compatible"] == {"top1": True, "mAP": True}
    assert bct["update_gain"]["as_is"]["top1"] == pytest.approx((0.65 - 0.60) / (0.70 - 0.60))
    assert bct["update_gain"]["as_is"]["mAP"] is None  # old/old mAP 0.50 = the reference's: no gain to share
    assert bct["update_gain"]["finetuned"]["mAP"] == pytest.approx((0.55 - 0.50) / (0.75 - 0.50))
    assert bct["new_new_minus_independent"]["finetuned"]["top1"] == pytest.approx(-0.12)
    assert bct["trainable_parameters"] == 2_820_000 and bct["augmentation"].startswith("none")
    independent = summarise(ROWS["independent"], _trained(0), _report(0.60, 0.70, 0.05, "none (raw)"), references, 10.0)
    assert independent["update_gain"] == {} and independent["new_new_minus_independent"] == {}  # references have no gain
    assert independent["trainable_parameters"] == 0 and independent["route"] == "none (raw)"
    early = summarise(ROWS["oca"], _trained(6), _report(0.60, 0.68, 0.65), {"as_is": references["as_is"]}, 1.0)
    assert set(early["update_gain"]) == {"as_is"}  # a reference that failed or was not run is left out


def test_render_names_every_row_and_the_cost_of_re_embedding(tmp_path: Path) -> None:
    references = {"as_is": {"top1": 0.70, "mAP": 0.55}, "finetuned": {"top1": 0.72, "mAP": 0.60}}
    rows = [summarise(ROWS["independent"], _trained(0), _report(0.60, 0.70, 0.05, "none (raw)"), references, 10.0),
            summarise(ROWS["oca"], _trained(6), _report(0.60, 0.69, 0.62), references, 30.0)]
    rows[1]["report"] = "pretrained_upgrade/oca/report.md"
    cache = tmp_path / "prefix_features" / "tf_efficientnet_lite2-abc"
    cache.mkdir(parents=True)
    (cache / "features.npy").write_bytes(b"\0" * 2_000_000)
    (cache / "meta.json").write_text(json.dumps({"shape": [5000, 208, 9, 9], "build_s": 600.0, "images_per_s": 8.3, "parts": {
        "architecture": "tf_efficientnet_lite2", "dtype": "float16", "data": {"count": 5000}}}))
    caches = prefix_caches(tmp_path)
    assert caches[0]["items"] == 5000 and caches[0]["size_mb"] == 2.0
    extraction = {"images": 512, "seconds": 40.0, "images_per_s": 12.8, "input_size": [3, 260, 260], "split_size": 10000,
                  "torch_threads": 2}
    payload = {"scenario": "S", "protocol": "P", "command": "python -m tools.run_pretrained_upgrade", "rows": rows,
               "failed": {"BT²": "exit status 2 of: x"}, "old": {"version_id": "old", "wall_s": 60.0},
               "machine": {"cpu_count": 2, "torch": "2", "cuda": None},
               "costs": {"extraction": {"new": extraction,
                                        "old": {**extraction, "images_per_s": 25.0, "input_size": [3, 224, 224]}},
                         "gallery_size": 10000, "reembed_gallery_s": 10000 / 12.8, "reembed_per_million_h": 1e6 / 12.8 / 3600,
                         "fct_upgrade": {"vectors": 10000, "seconds": 0.05, "vectors_per_s": 2e5}, "prefix_caches": caches,
                         "prefix_cache_fidelity": {"version_id": "pretrained_upgrade_bct", "images": 512,
                                                   "cosine_min": 0.99912, "cosine_mean": 0.999987,
                                                   "same_nearest_neighbour": 0.9805, "same_top10_neighbours": 0.9712}}}
    md = render(payload)
    assert "Old/old (Lite0 searching its own gallery): top-1 60.0" in md
    assert ("| OCA (last stage + head) | compatible training | 69.0 / 59.0 | 62.0 / 52.0 | yes / yes | 0.20 / 0.40 "
            "| 0.17 / 0.20 | -1.0 / +4.0 | -3.0 / -1.0 | query: prefix |") in md
    assert "[report](pretrained_upgrade/oca/report.md)" in md and "| BT² | failed: exit status 2 of: x |" in md
    assert "**13.0 min**" in md and "21.7 h per million images" in md  # 10,000 images at 12.8 images/s
    assert "10.0 |" in md and "8.3 |" in md  # the prefix cache's build minutes and rate
    assert "mean 0.999987, min 0.999120" in md and "unchanged for 98.0% of the images" in md


@pytest.mark.parametrize("dtype,floor", [("float32", 1 - 1e-6), ("float16", 0.99)])
def test_cache_fidelity_compares_cached_embeddings_with_embedding_the_images(tmp_path: Path, dtype: str,
                                                                               floor: float) -> None:
    """A tiny frozen-prefix version (timm's test EfficientNet, generated images): float32 caching changes nothing,
    float16 a little; the fields the results quote are filled."""
    from compatembed.cli import compose_config
    from compatembed.training.run import train
    from tools.run_pretrained_upgrade import measure_cache_fidelity

    cfg = compose_config("train", [
        "data=synthetic", "trainer.progress=false", "logger=csv", "trainer.num_threads=1", "data.loader.batch_size=16",
        "model=efficientnet_lite2_last_stage", "model.backbone.backbone.name=timm",
        "+model.backbone.backbone.model_name=test_efficientnet", "model.backbone.backbone.weights=null",
        "model.backbone.backbone.input_size=[3,32,32]", "model.backbone.backbone.crop_pct=1.0",
        f"model.backbone.cache_dtype={dtype}", "model.embed_dim=16", "trainer.epochs=1",
        f"output_dir={tmp_path / 'run'}", f"paths.cache_dir={tmp_path / 'cache'}"])
    out = train(cfg)
    fid = measure_cache_fidelity(str(out), cfg.data, images=12, batch_size=8, device="cpu")
    assert fid["images"] == 12 and fid["version_id"] == cfg.version_id
    assert floor <= fid["cosine_min"] <= fid["cosine_mean"] <= 1 + 1e-6
    assert 0.0 <= fid["same_nearest_neighbour"] <= 1.0 and 0.0 <= fid["same_top10_neighbours"] <= 1.0
    if dtype == "float32":
        assert fid["same_nearest_neighbour"] == 1.0
