"""The frozen-prefix feature cache: value-exact, rebuilt when anything it depends on changes, and suffix-only training.

The backbone is timm's 99k-parameter ``test_efficientnet`` at 32 px (5 stages) and the data are the generated
images of ``data=synthetic``, so every cache builds in well under a second.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from PIL import Image
from safetensors.torch import load_file

from compatembed import feature_cache
from compatembed.cli import compose_config
from compatembed.data import SyntheticImages, build_dataset, build_transform
from compatembed.data.array_cache import ArrayImages
from compatembed.data.subset import ClassSubset
from compatembed.embeddings import embed_dataset
from compatembed.errors import ConfigError
from compatembed.feature_cache import CachedFeatureLoader, load_or_build_prefix_features
from compatembed.models import EmbeddingModel, create_backbone
from compatembed.models.frozen_prefix import FrozenPrefixBackbone
from compatembed.models.version import load_manifest
from compatembed.training.run import seed_everything, train

TINY_MODEL = [
    "model=efficientnet_lite2_last_stage", "model.backbone.backbone.name=timm",
    "+model.backbone.backbone.model_name=test_efficientnet", "model.backbone.backbone.weights=null",
    "model.backbone.backbone.input_size=[3,32,32]", "model.backbone.backbone.crop_pct=1.0",
]
"""The scenario's frozen-prefix model config with timm's tiny test EfficientNet inside instead of ImageNet Lite2."""
RUN = ["data=synthetic", "trainer.progress=false", "logger=csv", "trainer.num_threads=1", "data.loader.batch_size=32"]


def backbone(*, seed: int = 0, trainable_stages: int = 1, dtype: str = "float32", size: int = 32,
             model_name: str = "test_efficientnet") -> FrozenPrefixBackbone:
    torch.manual_seed(seed)
    inner = create_backbone("timm", model_name=model_name, input_size=[3, size, size], crop_pct=1.0)
    return FrozenPrefixBackbone(inner, trainable_stages=trainable_stages, cache_dtype=dtype).eval()


def images(fp: FrozenPrefixBackbone, *, seed: int = 0, per_class: int = 6) -> ArrayImages:
    """Generated images served from an in-memory array, under the backbone's eval transform."""
    source = SyntheticImages(num_classes=4, per_class=per_class, image_size=32, seed=seed, split="train")
    return ArrayImages(source.data, source.targets, source.ids, source.classes,
                       transform=build_transform(fp.preprocessing, train=False))


@torch.no_grad()
def recomputed(fp: FrozenPrefixBackbone, dataset: ArrayImages, batch_size: int) -> np.ndarray:
    """The prefix run afresh on the same eval batches the cache was built from."""
    rows = np.arange(len(dataset))
    batches = [fp.forward_prefix(dataset.transform.batch(torch.from_numpy(dataset.pixels[rows[i:i + batch_size]])))
               for i in range(0, len(rows), batch_size)]
    return torch.cat(batches).numpy()


@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_cached_values_equal_recomputing(tmp_path: Path, dtype: str) -> None:
    fp = backbone(dtype=dtype)
    data = images(fp)
    cached = load_or_build_prefix_features(fp, data, tmp_path, batch_size=8, progress=False)
    assert cached is not None and cached.features.dtype == np.dtype(dtype)
    assert isinstance(cached.features, np.memmap)  # memory-mapped, not loaded
    expected = recomputed(fp, data, 8)
    assert cached.features.shape == expected.shape == (len(data), fp.prefix_channels(), 2, 2)
    np.testing.assert_array_equal(np.asarray(cached.features), expected.astype(dtype))  # exact, after the storage cast
    np.testing.assert_array_equal(cached.ids, data.ids)
    np.testing.assert_array_equal(cached.targets, data.targets)


def _builds(monkeypatch: pytest.MonkeyPatch) -> list[Path]:
    built: list[Path] = []
    original = feature_cache._build

    def counting(bb, dataset, directory, meta, **kw):
        built.append(directory)
        return original(bb, dataset, directory, meta, **kw)

    monkeypatch.setattr(feature_cache, "_build", counting)
    return built


def test_reused_as_long_as_nothing_changes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    built = _builds(monkeypatch)
    fp = backbone()
    first = load_or_build_prefix_features(fp, images(fp), tmp_path, progress=False)
    again = load_or_build_prefix_features(backbone(), images(backbone()), tmp_path, progress=False)  # rebuilt objects
    with torch.no_grad():
        fp.backbone.model.conv_head.weight.add_(1.0)  # the trained suffix changes: the cache stays valid
    after_training = load_or_build_prefix_features(fp, images(fp), tmp_path, progress=False)
    assert len(built) == 1
    assert first.directory == again.directory == after_training.directory  # type: ignore[union-attr]


def test_rebuilt_when_backbone_weights_preprocessing_or_data_change(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    built = _builds(monkeypatch)
    fp = backbone()
    base = load_or_build_prefix_features(fp, images(fp), tmp_path, progress=False)
    assert base is not None

    other_weights = backbone(seed=1)  # same architecture, other prefix weights
    new = load_or_build_prefix_features(other_weights, images(other_weights), tmp_path, progress=False)
    assert new is not None and new.directory != base.directory
    assert not base.directory.exists(), "the replaced cache (same model and data, other weights) is deleted"
    assert not np.array_equal(np.asarray(new.features), np.asarray(base.features))

    base = load_or_build_prefix_features(fp, images(fp), tmp_path, progress=False)
    variants = {
        "split point": backbone(trainable_stages=2),
        "preprocessing": backbone(size=40),
        "storage dtype": backbone(dtype="float16"),
    }
    directories = {base.directory}
    for what, changed in variants.items():
        cached = load_or_build_prefix_features(changed, images(changed), tmp_path, progress=False)
        assert cached is not None and cached.directory not in directories, what
        directories.add(cached.directory)
    other_arch = backbone(model_name="test_efficientnet_ln")
    cached = load_or_build_prefix_features(other_arch, images(other_arch), tmp_path, progress=False)
    assert cached is not None and cached.directory.name.startswith("test_efficientnet_ln-")

    other_pixels = images(fp, seed=1)  # same items and labels, other images
    subset = ClassSubset(images(fp), [0, 1])  # a selection of the items
    for what, data in (("pixels", other_pixels), ("items", subset)):
        cached = load_or_build_prefix_features(fp, data, tmp_path, progress=False)
        assert cached is not None and cached.directory not in directories, what
        directories.add(cached.directory)
    assert len(subset) == 12 and len(cached) == 12  # type: ignore[arg-type]
    assert len(built) == 1 + 1 + 1 + 3 + 1 + 2  # base, other weights, base again, three variants, other arch, two data


def test_streamed_files_are_fingerprinted_by_their_stat(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import os

    built = _builds(monkeypatch)
    root = tmp_path / "folder"
    rng = np.random.default_rng(0)
    for split in ("train", "test"):
        for cls in ("a", "b"):
            (root / split / cls).mkdir(parents=True)
            for i in range(3):
                Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(root / split / cls / f"{i}.png")
    cfg = OmegaConf.create({"name": "imagefolder", "num_classes": 2, "pipeline": "stream",
                            "train": {"_target_": "compatembed.data.ImageFolderDir", "root": str(root / "train")},
                            "test": {"_target_": "compatembed.data.ImageFolderDir", "root": str(root / "test")}})
    fp = backbone()
    view = build_dataset(cfg, "train", transform=build_transform(fp.preprocessing, train=False))
    first = load_or_build_prefix_features(fp, view, tmp_path / "cache", progress=False)
    assert first is not None and first.meta["parts"]["data"]["source"]["kind"] == "folder"
    assert load_or_build_prefix_features(fp, view, tmp_path / "cache", progress=False).directory == first.directory
    image = root / "train" / "a" / "0.png"
    Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(image)
    os.utime(image, ns=(1, 1))
    view = build_dataset(cfg, "train", transform=build_transform(fp.preprocessing, train=False))
    second = load_or_build_prefix_features(fp, view, tmp_path / "cache", progress=False)
    assert second is not None and second.directory != first.directory and len(built) == 2


def test_an_augmented_or_foreign_view_is_refused(tmp_path: Path) -> None:
    fp = backbone()
    data = images(fp)
    data.transform = build_transform(fp.preprocessing, train=True, augment="crop_flip")
    with pytest.raises(ConfigError, match="un-augmented eval view"):
        load_or_build_prefix_features(fp, data, tmp_path)
    data.transform = build_transform(dataclasses.replace(fp.preprocessing, mean=(0.4, 0.4, 0.4)), train=False)
    with pytest.raises(ConfigError, match="un-augmented eval view"):
        load_or_build_prefix_features(fp, data, tmp_path)


def test_loader_serves_every_item_once_per_epoch_with_its_position(tmp_path: Path) -> None:
    fp = backbone()
    cached = load_or_build_prefix_features(fp, images(fp), tmp_path, progress=False)
    assert cached is not None
    loader = CachedFeatureLoader(cached, batch_size=5, shuffle=True, seed=3)
    assert len(loader) == 5  # 24 items: four batches of 5 and one of 4
    seen = []
    for features, labels, positions in loader:
        assert features.dtype == torch.float32
        np.testing.assert_array_equal(features.numpy(), np.asarray(cached.features[positions.numpy()]))
        np.testing.assert_array_equal(labels.numpy(), cached.targets[positions.numpy()])
        seen += positions.tolist()
    assert sorted(seen) == list(range(24)) and seen != list(range(24))
    again = [p.tolist() for _, _, p in loader]
    loader.set_epoch(1)
    other = [p.tolist() for _, _, p in loader]
    assert sum(again, []) == seen and sum(other, []) != seen  # (seed, epoch) decides the order
    assert len(CachedFeatureLoader(cached, batch_size=5, drop_last=True)) == 4
    with pytest.raises(ConfigError, match="batch size must be positive"):
        CachedFeatureLoader(cached, batch_size=0)


@pytest.mark.parametrize("dtype,atol", [("float32", 1e-5), ("float16", 2e-2)])
def test_embedding_from_the_cache_matches_embedding_images(tmp_path: Path, dtype: str, atol: float) -> None:
    torch.manual_seed(0)
    model = EmbeddingModel(backbone(dtype=dtype), embed_dim=8).eval()
    data = images(model.backbone)
    direct = embed_dataset(model, data, batch_size=8, progress=False)
    cached = embed_dataset(model, data, batch_size=8, progress=False, prefix_cache_dir=tmp_path)
    assert (tmp_path / "prefix_features").is_dir()
    np.testing.assert_array_equal(cached.ids, direct.ids)
    np.testing.assert_array_equal(cached.labels, direct.labels)
    np.testing.assert_allclose(cached.embeddings, direct.embeddings, atol=atol, rtol=0)
    assert model.backbone.input_mode == "images"


# -- training ---------------------------------------------------------------------------------------------------------

def _initial_state(cfg) -> dict[str, torch.Tensor]:
    """The model the run starts from: the same seed, then the same instantiation (as ``prepare_method`` does)."""
    from hydra.utils import instantiate

    seed_everything(int(cfg.seed))
    return {k: v.clone() for k, v in instantiate(cfg.model).state_dict().items()}


@pytest.mark.parametrize("cached", [True, False], ids=["cached-features", "augmented-images"])
def test_suffix_only_training_changes_only_the_suffix_and_the_head(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, cached: bool
) -> None:
    """From the cache, and from augmented images (``cache: false``) where the prefix runs in every step."""
    used: list[CachedFeatureLoader] = []
    original = CachedFeatureLoader.__iter__
    monkeypatch.setattr(CachedFeatureLoader, "__iter__", lambda self: (used.append(self), original(self))[1])
    cfg = compose_config("train", RUN + TINY_MODEL + [
        "model.embed_dim=16", "trainer.epochs=2", f"output_dir={tmp_path / 'run'}", f"paths.cache_dir={tmp_path / 'cache'}",
        f"model.backbone.cache={cached}", "data.augment=crop_flip",
    ])
    before = _initial_state(cfg)
    out = train(cfg)
    assert bool(used) == cached, "training read the cached prefix features" if used else "it did not"
    after = load_file(out / "model.safetensors")
    assert after.keys() == before.keys()
    stem = "backbone.backbone.model."
    prefix_keys = [k for k in after if k.startswith((stem + "conv_stem", stem + "bn1")) or
                   any(k.startswith(f"{stem}blocks.{i}.") for i in range(4))]
    suffix_keys = [k for k in after if k.startswith((stem + "blocks.4.", stem + "conv_head", stem + "bn2"))]
    head_keys = [k for k in after if k.startswith("projection.")]
    assert len(prefix_keys) + len(suffix_keys) + len(head_keys) == len(after)
    for key in prefix_keys:  # weights AND BatchNorm statistics of the prefix, bit for bit
        assert torch.equal(after[key], before[key]), key
    changed = [k for k in suffix_keys + head_keys if not torch.equal(after[k], before[k])]
    trainable = [k for k in suffix_keys + head_keys if not k.endswith("num_batches_tracked")]
    assert set(trainable) <= set(changed)
    facts = load_manifest(out)["training"]["frozen_prefix"]
    assert facts["first_trainable_stage"] == 4 and facts["stages"] == 5
    if not cached:
        assert facts["augmentation"] == "crop_flip" and facts["cached_features"] is None
        return
    assert facts["augmentation"].startswith("none") and Path(facts["cached_features"]).is_dir()
    meta = json.loads((Path(facts["cached_features"]) / "meta.json").read_text())
    assert meta["parts"]["architecture"] == "test_efficientnet" and meta["shape"][0] == 200


def test_nothing_is_cached_when_nothing_trains(tmp_path: Path) -> None:
    cfg = compose_config("train", RUN + TINY_MODEL + [
        "model.embed_dim=null", "trainer.epochs=0", f"output_dir={tmp_path / 'run'}", f"paths.cache_dir={tmp_path / 'cache'}",
    ])
    out = train(cfg)
    assert not (tmp_path / "cache" / "prefix_features").exists()
    assert load_manifest(out)["training"]["frozen_prefix"]["cached_features"] is None


@pytest.mark.parametrize("method", ["bct", "oca", "bt2"])
def test_compatible_methods_train_the_suffix_on_cached_features_unchanged(tmp_path: Path, method: str) -> None:
    """BCT, OCA and BT² run on a frozen-prefix model as they are: the old model, a reference model, the cache."""
    cache = f"paths.cache_dir={tmp_path / 'cache'}"
    old = train(compose_config("train", RUN + ["model=cifar_resnet20", "model.embed_dim=16", "trainer.epochs=0",
                                               "trainer.checkpoint=false", f"output_dir={tmp_path / 'old'}", cache]))
    reference = train(compose_config("train", RUN + TINY_MODEL + [
        "model.embed_dim=16", "trainer.epochs=0", f"output_dir={tmp_path / 'reference'}", cache]))
    overrides = {"bct": ["model.embed_dim=16"], "oca": ["model.embed_dim=24", "method.extra_dims=8"],
                 "bt2": ["model.embed_dim=32", f"method.new_reference_version={reference}", "method.k=8"]}[method]
    out = train(compose_config("train", RUN + TINY_MODEL + [
        f"method={method}", f"method.old_version={old}", "trainer.epochs=1", f"output_dir={tmp_path / method}", cache,
        *overrides]))
    manifest = load_manifest(out)
    assert manifest["training"]["frozen_prefix"]["cached_features"] is not None
    assert manifest["compatibility"] and manifest["compatibility"][0]["target"] == load_manifest(old)["version_id"]
    caches = list((tmp_path / "cache" / "prefix_features").iterdir())
    assert len(caches) == 1, "the new model and (for BT²) the reference share one prefix cache"
