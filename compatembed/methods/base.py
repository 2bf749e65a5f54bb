"""The one interface every training method implements.

A method composes a new model (trained), frozen models it needs (the deployed old model; for BT²
also an independently trained new model) and its loss terms. The shared trainer calls
:meth:`Method.setup` once, :meth:`Method.training_forward` per batch and :meth:`Method.finalize`
after the last epoch, then exports :meth:`Method.deployed_model` with the relations of
:meth:`Method.compatibility_edges`. Adding a method is one module here and one ``conf/method`` file.
"""

from __future__ import annotations

import hashlib
import importlib
import logging
import pkgutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, ClassVar

import numpy as np
import torch
from torch import nn
from torch.utils.data import Dataset

from compatembed import distributed
from compatembed.data.loaders import batch_source
from compatembed.embeddings import embed_dataset
from compatembed.errors import ConfigError, DataError
from compatembed.models.version import (
    CompatibilityEdge,
    LoadedVersion,
    load_manifest,
    load_model_version,
    module_sha256,
)

_logger = logging.getLogger(__name__)


@dataclass
class MethodContext:
    """What a method may use to prepare itself before training.

    Attributes:
        train_set: the training split (train transforms of the new model); yields ``(image, label)``.
        eval_view: returns the SAME items, in the same order, under a model's eval preprocessing
            (for teacher features; the old model's input size may differ from the new one's).
        augmented_view: returns the SAME items, in the same order, under a model's training
            preprocessing (``data.augment``), for augmented feature views (:meth:`features` with
            ``view >= 1``); None where the run offers none.
        num_classes: size of the label space (classes keep their ids).
        train_classes: the class ids present in ``train_set``.
        device: where training runs.
        batch_size / num_workers: for feature extraction passes.
        model_config: the new model's instantiable config (methods derive the deployed config from it).
        cache_dir: where teacher features may be cached (None: no cache); a frozen-prefix model's prefix
            output is cached there too (:mod:`compatembed.feature_cache`).
        progress: show progress bars for feature extraction passes (``trainer.progress``).
    """

    train_set: Dataset
    eval_view: Callable[[Any], Dataset]
    num_classes: int
    train_classes: list[int]
    device: torch.device
    batch_size: int = 256
    num_workers: int = 0
    model_config: dict[str, Any] = field(default_factory=dict)
    cache_dir: Path | None = None
    progress: bool = True
    augmented_view: Callable[[Any], Dataset] | None = None

    def labels(self) -> torch.Tensor:
        """Labels of ``train_set`` in item order, read from its ``targets`` (no image is decoded).

        Returns:
            (N,) int64 tensor on CPU.

        Raises:
            DataError: the training set exposes no ``targets`` (every project dataset does).
        """
        targets = getattr(self.train_set, "targets", None)
        if targets is None:
            raise DataError(f"training set {type(self.train_set).__name__} has no 'targets'; methods need per-item labels")
        return torch.as_tensor(np.asarray(targets, dtype=np.int64))

    def features(self, model: nn.Module, *, name: str, view: int = 0) -> torch.Tensor:
        """L2-normalised features of every training item under ``model`` (eval mode).

        Args:
            model: the model whose embeddings are wanted.
            name: names the cache file (``old``, ``new``, ...).
            view: 0 = the un-augmented eval view; ``v >= 1`` = the training augmentation drawn with
                seed ``v`` (``augment_seed`` of :func:`~compatembed.embeddings.embed_dataset`): every model asked
                for view ``v`` sees the same crops and flips of the same items, so the features of two
                models stay paired (models of the same input size; more pairs for a post-hoc map fit).

        Returns:
            (N, D) float32 tensor on CPU, row i = item i of ``train_set``. Cached on disk under
            ``cache_dir`` keyed by the model's weights hash, the item ids and the view. Under torchrun,
            rank 0 computes them (and alone reads and writes the cache) and broadcasts them: every rank
            gets the same tensor, and what is derived from it (prototypes, maps) is the same.

        Raises:
            ConfigError: ``view >= 1`` where the run offers no augmented view, or its items are not
                served from a decoded array (the only path with seeded, repeatable augmentation).
        """
        if view < 0:
            raise ConfigError(f"feature view must be >= 0 (0: un-augmented), got {view}")
        if distributed.is_distributed():
            return distributed.broadcast_tensor(self._features(model, name=name, view=view) if distributed.is_main() else None)
        return self._features(model, name=name, view=view)

    def _features(self, model: nn.Module, *, name: str, view: int = 0) -> torch.Tensor:
        if view == 0:
            dataset = self.eval_view(model.preprocessing)
        else:
            if self.augmented_view is None:
                raise ConfigError("augmented feature views need the run's augmented view of the training items")
            dataset = self.augmented_view(model.preprocessing)
            source = batch_source(dataset)
            if source is None:
                raise ConfigError(
                    "augmented feature views need the training items served from a decoded array "
                    "(data.pipeline=array, or auto when the split fits data.array_cache_max_gb): a streamed "
                    "split draws its augmentation per worker and cannot repeat it for a second model"
                )
            if not source[2].random:
                raise ConfigError(
                    "augmented feature views need a random training augmentation (data.augment=crop_flip); "
                    "with data.augment=none every view repeats the un-augmented pass"
                )
        ids = np.asarray(getattr(dataset, "ids", np.arange(len(dataset))), dtype=np.int64)
        view_tag = f"view{view}".encode() if view else b""  # the un-augmented pass keeps the key it always had
        key = hashlib.sha256(module_sha256(model).encode() + ids.tobytes() + view_tag).hexdigest()[:16]
        stem = name if view == 0 else f"{name}-view{view}"
        cache = self.cache_dir / f"{stem}-{key}.pt" if self.cache_dir else None
        if cache is not None and cache.is_file():
            _logger.info("teacher features %s from cache %s", stem, cache)
            return torch.load(cache, weights_only=True)
        model = model.to(self.device)
        feats = embed_dataset(
            model, dataset, batch_size=self.batch_size, device=self.device, num_workers=self.num_workers,
            desc=f"features:{stem}", progress=self.progress, prefix_cache_dir=self.cache_dir if view == 0 else None,
            augment_seed=view,
        ).embeddings
        out = nn.functional.normalize(torch.from_numpy(feats), dim=1)
        if cache is not None:
            cache.parent.mkdir(parents=True, exist_ok=True)
            tmp = cache.with_suffix(".tmp")
            torch.save(out, tmp)
            tmp.replace(cache)
        return out


def freeze(module: nn.Module) -> nn.Module:
    """Put a teacher in eval mode without gradients (it stays so: :meth:`Method.train` keeps it)."""
    module.eval()
    for param in module.parameters():
        param.requires_grad_(False)
    return module


def class_prototypes(features: torch.Tensor, labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """P[c] = mean of the (normalised) features of class c; zeros for absent classes (not renormalised).

    This is the pseudo classifier of the OCA/BT² code bases, built from the old model's features.
    """
    protos = torch.zeros(num_classes, features.shape[1], dtype=features.dtype)
    protos.index_add_(0, labels, features)
    counts = torch.bincount(labels, minlength=num_classes).clamp(min=1).to(features.dtype)
    return protos / counts[:, None]


METHODS: dict[str, type["Method"]] = {}
"""Method name → class. A :class:`Method` subclass with a ``name`` registers itself when its module is
imported; :func:`list_methods` imports every module of this package first, so none is missed."""


def _import_method_modules() -> None:
    """Import every module of this package (each registers the methods it defines); cheap after the first call."""
    package = importlib.import_module(__name__.rpartition(".")[0])
    for module in pkgutil.iter_modules(package.__path__):
        importlib.import_module(f"{package.__name__}.{module.name}")


def list_methods() -> list[str]:
    """Names of every method defined in this package, sorted: the names ``method=<name>`` and the tools accept."""
    _import_method_modules()
    return sorted(METHODS)


def method_class(name: str) -> type["Method"]:
    """The method registered as ``name``.

    Raises:
        ConfigError: no module of this package defines a method of that name.
    """
    _import_method_modules()
    if name not in METHODS:
        raise ConfigError(f"unknown method {name!r}; known: {', '.join(sorted(METHODS))}")
    return METHODS[name]


class Method(nn.Module):
    """Base class: a new model plus what a method needs to train it compatibly.

    Subclasses set ``name`` and implement :meth:`training_forward`; they override :meth:`setup`,
    :meth:`finalize`, :meth:`deployed_model`, :meth:`deployed_config` and
    :meth:`compatibility_edges` where their deployed embedding differs from ``self.model``.
    """

    name: ClassVar[str] = ""

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if cls.name:
            if cls.name in METHODS and METHODS[cls.name] is not cls:
                raise ValueError(f"duplicate method name {cls.name!r}")
            METHODS[cls.name] = cls

    def __init__(self, model: nn.Module, num_classes: int, old_version: str | None = None) -> None:
        super().__init__()
        self.model = model
        self.num_classes = int(num_classes)
        self.old_version_path = old_version
        self.old: LoadedVersion | None = None
        self._frozen: dict[str, nn.Module] = {}

    # -- frozen teachers -------------------------------------------------------------------------
    def load_old(self, *, required: bool) -> LoadedVersion | None:
        """Load the deployed old model version named by ``old_version`` and freeze it."""
        if self.old_version_path is None:
            if required:
                raise ConfigError(f"method {self.name!r} needs method.old_version=<old model version dir>")
            return None
        self.old = load_model_version(self.old_version_path)
        self.old_model = freeze(self.old.model)
        self._frozen["old_model"] = self.old_model
        return self.old

    def add_frozen(self, name: str, module: nn.Module) -> nn.Module:
        setattr(self, name, freeze(module))
        self._frozen[name] = module
        return module

    def frozen_modules(self) -> dict[str, nn.Module]:
        return dict(self._frozen)

    def frozen_hashes(self) -> dict[str, str]:
        return {name: module_sha256(module) for name, module in self._frozen.items()}

    def train(self, mode: bool = True) -> "Method":
        super().train(mode)
        for module in self._frozen.values():
            module.eval()
        return self

    def trainable_parameters(self) -> list[nn.Parameter]:
        frozen = {id(p) for module in self._frozen.values() for p in module.parameters()}
        return [p for p in self.parameters() if p.requires_grad and id(p) not in frozen]

    # -- the interface ---------------------------------------------------------------------------
    def setup(self, ctx: MethodContext) -> None:
        """Prepare before training (load teachers, cache their features). Default: nothing."""

    def training_forward(
        self, images: torch.Tensor, labels: torch.Tensor, indices: torch.Tensor
    ) -> tuple[dict[str, torch.Tensor], dict[str, float]]:
        """One batch → (named, already weighted loss terms to be summed; extra scalars to log).

        Args:
            images: (B, C, H, W) training images.
            labels: (B,) class ids.
            indices: (B,) positions of the items in ``ctx.train_set`` (to look up cached features).
        """
        raise NotImplementedError

    def finalize(self, ctx: MethodContext) -> dict[str, Any]:
        """After the last epoch (post-hoc fitting). Returns facts for the manifest. Default: nothing."""
        return {}

    def deployed_model(self) -> nn.Module:
        """The module whose ``embed`` is the deployed embedding (saved in the version directory)."""
        return self.model

    def deployed_config(self, model_config: dict[str, Any]) -> dict[str, Any]:
        """Instantiable config of :meth:`deployed_model`, derived from the new model's config."""
        return model_config

    def compatibility_edges(self) -> list[CompatibilityEdge]:
        """Relations of the deployed embedding to other versions. Default: none."""
        return []

    @property
    def parent_version_id(self) -> str | None:
        """The version this model is trained against (named in the manifest even without a relation)."""
        if self.old is not None:
            return self.old.version_id
        if self.old_version_path is not None:
            return str(load_manifest(self.old_version_path)["version_id"])
        return None
