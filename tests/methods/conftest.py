"""Fixtures of the method tests: one torch thread, the shared CIFAR-10 data (skipped with the reason
when absent), a small per-class subset of its test split, third-party CIFAR ResNets written as
model versions, versions trained here on the synthetic data, small synthetic contexts and batches,
and short training runs whose loss terms must fall.

The shared data folder is the ``shared_data`` fixture of ``tests/conftest.py``
(``$COMPATEMBED_DATA_ROOT`` or ``<repo>/../shared/data``), which skips when the CIFAR-10 test tar is
absent. There is no ``__init__.py`` here, so the helpers are fixtures, not importable functions
(plain helpers shared with other test packages live in ``tests/helpers``).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader, Dataset

from compatembed.data import ClassSubset, ImageFolderTar, Preprocessing, SyntheticImages, build_transform
from compatembed.methods.base import Method, MethodContext
from compatembed.models import EmbeddingModel, create_backbone
from compatembed.models.version import save_model_version
from helpers.configs import compose_config

RESNET_WEIGHTS = {20: "resnet20-12fca82f.th", 32: "resnet32-d509ac18.th"}  # under <data>/cifar10-resnet
SMOKE = ["data=synthetic", "trainer=smoke", "logger=none"]  # what every version trained here shares

History = list[dict[str, float]]
Batch = tuple[torch.Tensor, torch.Tensor, torch.Tensor]


@pytest.fixture(scope="module")
def one_torch_thread():
    """One intra-op thread: on a shared, busy 2-core machine two threads oversubscribe (10x slower).

    A module opts in with ``pytestmark = pytest.mark.usefixtures("one_torch_thread")``.
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _need(path: Path) -> Path:
    if not path.is_file():
        pytest.skip(f"shared CIFAR-10 data not found: {path} (set COMPATEMBED_DATA_ROOT)")
    return path


@pytest.fixture
def shared_cifar(shared_data: Path) -> Path:
    """The shared data folder with the CIFAR-10 test tar and the third-party ResNet-20 weights, or skip."""
    _need(shared_data / "cifar10-resnet" / RESNET_WEIGHTS[20])
    return shared_data


@pytest.fixture
def small_cifar(shared_cifar: Path) -> Callable[[Preprocessing, int], ClassSubset]:
    """small_cifar(preprocessing, per_class) → the first ``per_class`` images of every class of the
    CIFAR-10 test split (labels, ids and classes kept), with the eval transform of ``preprocessing``."""
    tar = shared_cifar / "cifar10-jpeg" / "test.tar"

    def subset(preprocessing: Preprocessing, per_class: int) -> ClassSubset:
        return ClassSubset(ImageFolderTar(tar, transform=build_transform(preprocessing, train=False)), None, per_class=per_class)

    return subset


@pytest.fixture
def small_cifar_context(small_cifar: Callable[[Preprocessing, int], ClassSubset]) -> Callable[..., MethodContext]:
    """small_cifar_context(preprocessing, per_class, batch_size) → the context ``train`` would give a method
    trained on ``small_cifar(preprocessing, per_class)`` (all 10 classes, CPU); its eval views are the same items."""

    def context(preprocessing: Preprocessing, per_class: int, batch_size: int) -> MethodContext:
        def eval_view(pre: Preprocessing) -> Dataset:
            return small_cifar(pre, per_class)

        return MethodContext(
            train_set=eval_view(preprocessing), eval_view=eval_view, num_classes=10, train_classes=list(range(10)),
            device=torch.device("cpu"), batch_size=batch_size,
        )

    return context


@pytest.fixture
def external_version(shared_cifar: Path, tmp_path: Path) -> Callable[..., Path]:
    """external_version(version_id="old", depth=20) → the third-party CIFAR-10 ResNet-``depth`` (its 64-d
    pooled feature, no projection, its 10-way classifier on the backbone) written as a model version
    ``tmp_path / version_id``, as an external old model is deployed; skips when its weights are absent."""

    def write(version_id: str = "old", depth: int = 20) -> Path:
        weights = _need(shared_cifar / "cifar10-resnet" / RESNET_WEIGHTS[depth])
        model = EmbeddingModel(create_backbone("cifar_resnet", depth=depth, num_classes=10, weights=str(weights)))
        config = {
            "_target_": "compatembed.models.EmbeddingModel",
            "backbone": {"_target_": "compatembed.models.create_backbone", "name": "cifar_resnet", "depth": depth,
                         "num_classes": 10, "weights": None},
            "embed_dim": None,
            "normalize": True,
        }
        return save_model_version(tmp_path / version_id, version_id=version_id, model=model, model_config=config, embed_dim=64,
                                  normalized=True, preprocessing=model.preprocessing.to_dict(), training={})

    return write


def _run(method: Method, train_set: Dataset, *, steps: int, batch_size: int, lr: float, data_loader: bool = False) -> History:
    """Adam (``lr``) on the method's trainable parameters over whole shuffled epochs (generator seed 0)
    until at least ``steps`` steps ran; returns every step's loss terms.

    ``data_loader``: batches from a shuffling ``DataLoader`` (images decoded per batch, the last short
    batch dropped), as ``train`` feeds a method; otherwise the images are decoded once and each epoch is
    ``randperm(n).split(batch_size)`` of them. The two draw differently from the generator.
    """
    from compatembed.data.loaders import IndexedDataset

    optimizer = torch.optim.Adam(method.trainable_parameters(), lr=lr)
    gen = torch.Generator().manual_seed(0)
    if data_loader:
        loader = DataLoader(IndexedDataset(train_set), batch_size=batch_size, shuffle=True, drop_last=True, generator=gen)

        def epoch() -> Iterable[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
            return loader
    else:
        images = torch.stack([train_set[i][0] for i in range(len(train_set))])
        labels = torch.as_tensor(train_set.targets)

        def epoch() -> Iterable[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
            return ((images[idx], labels[idx], idx) for idx in torch.randperm(len(train_set), generator=gen).split(batch_size))

    history: History = []
    method.train()
    while len(history) < steps:
        for images_b, labels_b, indices in epoch():
            terms, _ = method.training_forward(images_b, labels_b, indices)
            optimizer.zero_grad()
            torch.stack(list(terms.values())).sum().backward()
            optimizer.step()
            history.append({k: float(v.detach()) for k, v in terms.items()})  # weighted by positive constants
    return history


@pytest.fixture
def short_run() -> Callable[..., History]:
    """short_run(method, train_set, *, steps, batch_size, lr, data_loader=False) → every step's loss terms."""
    return _run


def _assert_fall(history: History | dict[str, list[float]], terms: Sequence[str], window: int = 5) -> None:
    """Each term's mean over the last ``window`` steps is below its mean over the first ``window``.

    ``history``: per-step dicts of terms (``short_run``) or per-term lists (a fit's history).
    """
    for term in terms:
        series = history[term] if isinstance(history, dict) else [h[term] for h in history]
        first, last = np.mean(series[:window]), np.mean(series[-window:])
        assert last < first, f"{term}: {first:.4f} -> {last:.4f}"


@pytest.fixture
def assert_losses_fall() -> Callable[..., None]:
    """assert_losses_fall(history, terms, window=5): first-vs-last steps, per term."""
    return _assert_fall


# -- versions trained here, synthetic contexts and batches ---------------------------------------------
def _train_version(
    out: Path, overrides: Sequence[str] = (), *, model: str = "cifar_resnet20", cache_dir: Path | None = None
) -> Path:
    """Train (or import, with ``trainer.epochs=0``) a version on the synthetic data with ``trainer=smoke``;
    its id is the folder name. ``cache_dir``: the feature cache (none by default)."""
    from compatembed.training.run import train

    cache = "null" if cache_dir is None else str(cache_dir)
    return train(compose_config("train", SMOKE + [
        f"paths.cache_dir={cache}", f"model={model}", f"version_id={out.name}", f"output_dir={out}", *overrides,
    ]))


@pytest.fixture(scope="session")
def train_version() -> Callable[..., Path]:
    """train_version(out, overrides=(), *, model="cifar_resnet20", cache_dir=None) → the version folder
    ``out`` (id ``out.name``), trained with ``trainer=smoke`` on the synthetic data (or imported: 0 epochs)."""
    return _train_version


@pytest.fixture(scope="module")
def versions(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """An old version (synthetic classes 0-4) and an independent new one (id ``indep``, all classes,
    parent ``old``), a few steps each, sharing a feature cache: ``{"old", "new", "cache", "root"}``.

    Built once per test module. ``test_bt2.py`` overrides it with versions of its own sizes."""
    root = tmp_path_factory.mktemp("versions")
    cache = root / "cache"
    old = _train_version(root / "old", ["data.classes=0-4"], cache_dir=cache)
    new = _train_version(root / "indep", [f"method.old_version={old}"], cache_dir=cache)
    return {"old": old, "new": new, "cache": cache, "root": root}


def _new_model(embed_dim: int, seed: int = 0) -> EmbeddingModel:
    torch.manual_seed(seed)
    return EmbeddingModel(create_backbone("cifar_resnet", depth=8), embed_dim=embed_dim)


@pytest.fixture(scope="session")
def new_model() -> Callable[..., EmbeddingModel]:
    """new_model(embed_dim, seed=0) → a fresh ResNet-8 embedding model, built right after ``torch.manual_seed(seed)``."""
    return _new_model


@pytest.fixture(scope="session")
def synthetic_context() -> Callable[..., MethodContext]:
    """synthetic_context(model, batch_size=32) → a CPU context on 6 synthetic training images of each of
    the 10 classes, un-augmented under ``model``'s preprocessing; its eval views are the same items.
    ``batch_size``: of the feature extraction passes."""

    def context(model: EmbeddingModel, batch_size: int = 32) -> MethodContext:
        def view(pre: Preprocessing) -> Dataset:
            return SyntheticImages(num_classes=10, per_class=6, split="train", transform=build_transform(pre, train=False))

        return MethodContext(
            train_set=view(model.preprocessing), eval_view=view, num_classes=10, train_classes=list(range(10)),
            device=torch.device("cpu"), batch_size=batch_size,
        )

    return context


def _fixed_batch(ctx: MethodContext, n: int = 12) -> Batch:
    idx = torch.linspace(0, len(ctx.train_set) - 1, n).long()
    images = torch.stack([ctx.train_set[int(i)][0] for i in idx])
    labels = torch.as_tensor([int(ctx.train_set[int(i)][1]) for i in idx])
    return images, labels, idx


@pytest.fixture(scope="session")
def fixed_batch() -> Callable[..., Batch]:
    """fixed_batch(ctx, n=12) → (images, labels, positions) of ``n`` items spread evenly over ``ctx.train_set``."""
    return _fixed_batch


def _terms_without_and_with(
    build: Callable[..., Method], ctx: MethodContext, batch: Batch, settings: dict[str, Any]
) -> tuple[dict[str, float], dict[str, float]]:
    results = []
    for kwargs in ({}, settings):
        method = build(**kwargs)
        method.setup(ctx)
        with torch.no_grad():
            terms, _ = method.training_forward(*batch)
        results.append({k: float(v) for k, v in terms.items()})
    return results[0], results[1]


@pytest.fixture(scope="session")
def terms_without_and_with() -> Callable[..., tuple[dict[str, float], dict[str, float]]]:
    """terms_without_and_with(build, ctx, batch, settings) → (base, other): the loss terms on ``batch``
    (floats, no gradients) of ``build()`` and of ``build(**settings)``, each built in turn and set up on ``ctx``."""
    return _terms_without_and_with


@pytest.fixture
def short_run_on_imported_resnet20(
    shared_cifar: Path, small_cifar_context: Callable[..., MethodContext], tmp_path: Path
) -> Callable[..., tuple[Method, MethodContext, History]]:
    """run(build, embed_dim) → (method, ctx, history): the third-party ResNet-20 imported through ``train``
    (0 epochs: its 64-d feature and its REAL classifier) as the old version, a fresh ResNet-8 new model of
    ``embed_dim`` (seed 0), the method ``build(model, old_version_dir)`` set up on 16 CIFAR-10 images per
    class and trained 20 steps (Adam, lr 3e-3, batches of 32 from a data loader)."""

    def run(build: Callable[[EmbeddingModel, str], Method], embed_dim: int) -> tuple[Method, MethodContext, History]:
        old = _train_version(
            tmp_path / "external_old", [f"paths.data_root={shared_cifar}", "trainer.epochs=0"], model="cifar_resnet20_shared"
        )
        model = _new_model(embed_dim)
        ctx = small_cifar_context(model.preprocessing, per_class=16, batch_size=80)
        method = build(model, str(old))
        method.setup(ctx)
        return method, ctx, _run(method, ctx.train_set, steps=20, batch_size=32, lr=3e-3, data_loader=True)

    return run
