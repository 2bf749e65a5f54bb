"""Training a model version: build the method, run the shared loop, write the version directory.

``train(cfg)`` takes a composed ``conf/train.yaml`` config (``compatembed-train`` is its command line;
tests and tools call it directly). :func:`validate` evaluates the trained version on the validation
split after training, and :func:`train_and_validate` returns the number a sweep maximises.

Started by torchrun (``WORLD_SIZE`` > 1), :func:`train` joins the process group for the run: every
rank builds the same method (rank 0 first decodes the dataset cache, and computes the frozen
teachers' features, which it broadcasts), trains its share of each global batch
(``data.loader.batch_size`` is per rank) and runs ``finalize``; rank 0 alone writes the config, the
metrics, the checkpoints and the model version, and validates.
"""

from __future__ import annotations

import contextlib
import logging
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from torch.utils.data import Dataset

from compatembed import distributed
from compatembed.data import build_dataset, build_transform
from compatembed.data.loaders import training_loader
from compatembed.errors import ConfigError, ManifestError
from compatembed.eval.pair_report import evaluate
from compatembed.feature_cache import CachedFeatureLoader, cached_prefix_loader
from compatembed.hardware import resolve_device, resolve_num_workers, set_torch_threads
from compatembed.methods.base import Method, MethodContext
from compatembed.models.frozen_prefix import FrozenPrefixBackbone, find_frozen_prefix
from compatembed.models.version import load_manifest, save_model_version
from compatembed.training.loggers import NullLogger
from compatembed.training.loop import TrainerConfig, fit

_logger = logging.getLogger(__name__)


def seed_everything(seed: int) -> torch.Generator:
    """Seed python, numpy and torch; returns a generator for the data loader's shuffling."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    generator = torch.Generator()
    generator.manual_seed(seed)
    return generator


def _train_classes(dataset: Dataset, num_classes: int) -> list[int]:
    selected = getattr(dataset, "selected_classes", None)
    return list(selected) if selected is not None else list(range(num_classes))


def prepare_method(cfg: DictConfig) -> tuple[Method, Dataset, MethodContext]:
    """Build ``cfg.model`` and ``cfg.method`` and run the method's setup (frozen models, teacher features).

    Shared by :func:`train` and the throughput benchmark (``tools/bench_throughput.py``), so both time
    exactly the method that training runs.

    Returns:
        The method after ``setup``, the training set (augmented view) and the method context.
    """
    model = instantiate(cfg.model)
    transform = build_transform(model.preprocessing, train=True, augment=cfg.data.augment)
    with distributed.main_first():  # under torchrun rank 0 decodes the array cache, the others then read it
        train_set = build_dataset(cfg.data, "train", transform=transform)
    if len(train_set) == 0:
        raise ConfigError("the training split is empty after class selection")
    method: Method = instantiate(cfg.method, model=model, num_classes=int(cfg.data.num_classes))
    loader_cfg = cfg.data.loader
    ctx = MethodContext(
        train_set=train_set,
        eval_view=lambda pre: build_dataset(cfg.data, "train", transform=build_transform(pre, train=False)),
        augmented_view=lambda pre: build_dataset(
            cfg.data, "train", transform=build_transform(pre, train=True, augment=cfg.data.augment)
        ),
        num_classes=int(cfg.data.num_classes),
        train_classes=_train_classes(train_set, int(cfg.data.num_classes)),
        device=resolve_device(cfg.trainer.device),
        batch_size=int(loader_cfg.eval_batch_size),
        num_workers=resolve_num_workers(loader_cfg.num_workers),
        model_config=OmegaConf.to_container(cfg.model, resolve=True),  # type: ignore[arg-type]
        cache_dir=Path(cfg.paths.cache_dir) if cfg.paths.cache_dir else None,
        progress=bool(cfg.trainer.progress),
    )
    method.setup(ctx)
    return method, train_set, ctx


def check_references(cfg: DictConfig) -> None:
    """Every model version the method names (``method.*_version``) is a valid version directory.

    Runs before any data is read or model built, so a mistyped path fails in a second, not after the
    training it would otherwise end.

    Raises:
        ConfigError: naming the key, its value and what is wrong with it.
    """
    for key in cfg.method:
        if not str(key).endswith("_version"):
            continue
        if OmegaConf.is_missing(cfg.method, key):
            raise ConfigError(f"method.{key} is required (a model version directory written by compatembed-train)")
        value = cfg.method[key]
        if value is None:
            continue
        try:
            load_manifest(str(value))
        except ManifestError as exc:
            raise ConfigError(f"method.{key}={value}: {exc}") from None


def train(cfg: DictConfig) -> Path:
    """Train ``cfg.method`` on ``cfg.data`` and write the model version to ``cfg.output_dir``.

    Under torchrun every rank calls this; it joins the process group for the run (see the module doc).

    Returns:
        The model version directory (on every rank; rank 0 wrote it).
    """
    check_references(cfg)
    device = resolve_device(cfg.trainer.device)
    with distributed.process_group(device, timeout_min=float(cfg.trainer.dist_timeout_min)):
        return _train(cfg)


def _train(cfg: DictConfig) -> Path:
    seed_everything(int(cfg.seed))  # the same on every rank: every rank builds the same method
    set_torch_threads(cfg.trainer.num_threads)
    run_dir = Path(cfg.output_dir)
    main, world = distributed.is_main(), distributed.world_size()
    if main:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "config.yaml").write_text(OmegaConf.to_yaml(cfg, resolve=True))
    distributed.barrier()

    method, train_set, ctx = prepare_method(cfg)
    model_cfg: dict[str, Any] = ctx.model_config
    preprocessing = method.model.preprocessing
    device = ctx.device
    loader_cfg = cfg.data.loader
    frozen_before = method.frozen_hashes()

    trainer_cfg: TrainerConfig = instantiate(cfg.trainer)
    prefix = find_frozen_prefix(method.model)
    prefix_before = prefix.prefix_state_sha256() if prefix is not None else None
    loader, prefix_facts = _prefix_feature_loader(cfg, method, train_set, ctx, trainer_cfg, prefix)
    if loader is not None and world > 1:
        raise ConfigError("training on cached frozen-prefix features runs in one process; drop torchrun, or turn "
                          "the prefix cache off (model.backbone.cache=false) to train the whole model under DDP")
    if loader is None:
        loader = training_loader(
            train_set,
            batch_size=int(loader_cfg.batch_size),
            seed=int(cfg.seed),
            device=device,
            num_workers=resolve_num_workers(loader_cfg.num_workers),
            rank=distributed.rank(),
            world_size=world,
        )
    if world > 1:  # each rank its own dropout and augmentation draws from here on
        seed_everything(int(cfg.seed) + 1_000_033 * distributed.rank())
    logger = instantiate(cfg.logger) if main else NullLogger()
    logger.start(run_dir, OmegaConf.to_container(cfg, resolve=True))  # type: ignore[arg-type]
    try:
        feeds_features = isinstance(loader, CachedFeatureLoader)
        assert prefix is not None or not feeds_features
        with prefix.prefix_features_input() if feeds_features else contextlib.nullcontext():  # type: ignore[union-attr]
            summary = fit(
                method,
                loader,
                optimizer_factory=instantiate(cfg.optim.optimizer),
                scheduler_factory=instantiate(cfg.optim.scheduler) if cfg.optim.scheduler is not None else None,
                config=trainer_cfg,
                run_dir=run_dir,
                logger=logger,
            )
        method.to("cpu")
        facts = method.finalize(ctx)
        logger.log_summary(summary)
    finally:
        logger.finish()

    frozen_after = method.frozen_hashes()
    if frozen_after != frozen_before:  # a bug, never a user error: keep the traceback
        raise RuntimeError(f"frozen models changed during training: {sorted(frozen_before)}")
    if prefix is not None and prefix.prefix_state_sha256() != prefix_before:
        raise RuntimeError(f"the frozen prefix of {prefix.model_name} changed during training")

    if not main:
        distributed.barrier()  # rank 0 writes the model version
        return run_dir
    deployed = method.deployed_model().cpu().eval()
    training = {
        "dataset": str(cfg.data.name),
        "classes": ctx.train_classes,
        "num_classes": int(cfg.data.num_classes),
        "method": method.name,
        "seed": int(cfg.seed),
        "epochs": int(trainer_cfg.epochs),
        "frozen_model_sha256": frozen_after,
        "old_version_dir": OmegaConf.select(cfg, "method.old_version"),
        **({"side_info_version_dir": str(side)} if (side := OmegaConf.select(cfg, "method.side_info_version")) else {}),
        "summary": summary,
        **prefix_facts,
        **facts,
    }
    if world > 1:
        training["distributed"] = {"world_size": world, "batch_size_per_rank": int(loader_cfg.batch_size),
                                   "global_batch_size": int(loader_cfg.batch_size) * world,
                                   "sync_batchnorm": bool(trainer_cfg.sync_batchnorm)}
    out = save_model_version(
        run_dir,
        version_id=str(cfg.version_id),
        model=deployed,
        model_config=method.deployed_config(model_cfg),
        embed_dim=int(deployed.embed_dim),
        normalized=bool(getattr(deployed, "normalize", True)),
        preprocessing=preprocessing.to_dict(),
        training=training,
        parent=method.parent_version_id,
        edges=method.compatibility_edges(),
    )
    _logger.info("model version %s written to %s", cfg.version_id, out)
    distributed.barrier()
    return out


def _prefix_feature_loader(
    cfg: DictConfig, method: Method, train_set: Dataset, ctx: MethodContext, trainer_cfg: TrainerConfig,
    prefix: FrozenPrefixBackbone | None,
) -> tuple[CachedFeatureLoader | None, dict[str, Any]]:
    """Batches of the frozen prefix's cached output when the new model has a caching frozen prefix, and the facts.

    Returns:
        ``(loader or None, {"frozen_prefix": ...})``; the loader is None (train on images, with the
        configured augmentation) when there is no frozen prefix, caching is off, nothing trains
        (``trainer.epochs=0``), there is no cache directory, or the data cannot be fingerprinted.
    """
    if prefix is None:
        return None, {}
    trainable = sum(p.numel() for p in method.trainable_parameters())
    facts: dict[str, Any] = {
        "architecture": prefix.model_name, "first_trainable_stage": prefix.split,
        "stages": prefix.split + prefix.trainable_stages, "trainable_parameters": int(trainable),
        "cached_features": None, "augmentation": str(cfg.data.augment),
    }
    loader = None
    if prefix.cache and trainer_cfg.epochs > 0:
        if ctx.cache_dir is None:
            _logger.warning("paths.cache_dir is not set: the %s prefix runs on every training step", prefix.model_name)
        else:
            prefix.to(ctx.device)  # build the cache where training runs
            loader = cached_prefix_loader(
                prefix, ctx.eval_view(prefix.preprocessing), train_set, ctx.cache_dir,
                batch_size=int(cfg.data.loader.batch_size), seed=int(cfg.seed), device=ctx.device,
                eval_batch_size=int(cfg.data.loader.eval_batch_size), num_workers=ctx.num_workers,
                progress=bool(cfg.trainer.progress),
            )
    if loader is not None:
        facts["cached_features"] = str(loader.cached.directory)
        facts["augmentation"] = "none (cached prefix features of the un-augmented eval view)"
        _logger.info(
            "training the last %d stage(s) of %s and the head (%d parameters) on cached prefix features: "
            "no data augmentation (data.augment=%s does not apply)",
            prefix.trainable_stages, prefix.model_name, trainable, cfg.data.augment,
        )
    return loader, {"frozen_prefix": facts}


def validate(cfg: DictConfig, version_dir: Path) -> dict[str, Any]:
    """Evaluate a trained version on the validation split; writes ``<version_dir>/validation/report.{json,md}``.

    The query is the new version and the gallery its old version (``method.old_version``), or the
    version itself when it has none; new/old follows the version's compatibility route. This is the
    number sweeps compare (``conf/hparams_search``): settings are chosen on ``val``, never on ``test``.

    Raises:
        ConfigError: ``data.validation.fraction`` is not positive (there is no validation split).
    """
    _check_validation(cfg)
    old = OmegaConf.select(cfg, "method.old_version", default=None)
    eval_cfg = OmegaConf.create({
        "query": str(version_dir), "gallery": str(old or version_dir), "split": "val", "leave_one_out": True,
        "topk": [1, 5], "route": "auto", "backend": str(cfg.validation.backend), "out": str(version_dir / "validation"),
        "device": str(cfg.trainer.device), "batch_size": int(cfg.data.loader.eval_batch_size),
        "num_workers": cfg.data.loader.num_workers, "progress": bool(cfg.trainer.progress), "prefix_cache": True,
        "data": OmegaConf.to_container(cfg.data, resolve=True),
    })
    return evaluate(eval_cfg)


VALIDATION_PAIRS = ("auto", "new/new", "new/old")


def _check_validation(cfg: DictConfig) -> None:
    if float(OmegaConf.select(cfg, "data.validation.fraction", default=0.0) or 0.0) <= 0:
        raise ConfigError("validation.enabled=true needs data.validation.fraction > 0 (a split held out of training)")
    pair = str(OmegaConf.select(cfg, "validation.pair", default="auto"))
    if pair not in VALIDATION_PAIRS:
        raise ConfigError(f"unknown validation.pair={pair!r}; known: {', '.join(VALIDATION_PAIRS)}")
    if pair == "new/old" and not OmegaConf.select(cfg, "method.old_version", default=None):
        raise ConfigError("validation.pair=new/old needs method.old_version (a version to cross-test against)")
    if bool(OmegaConf.select(cfg, "validation.require_compatible", default=False)) and not OmegaConf.select(
            cfg, "method.old_version", default=None):
        raise ConfigError("validation.require_compatible=true needs method.old_version (the criterion is against it)")


def sweep_pair(report: dict[str, Any], pair: str = "auto") -> tuple[str, str]:
    """The (query, gallery) pair a sweep ranks by: ``auto`` is new/old when the version has an old one, else new/new.

    ``new/new`` ranks a version with an old one by its own retrieval (a sweep over an independent model's
    training settings, where new/old is chance by design).
    """
    if pair not in VALIDATION_PAIRS:
        raise ConfigError(f"unknown validation.pair={pair!r}; known: {', '.join(VALIDATION_PAIRS)}")
    has_old = report["query_version"] != report["gallery_version"]
    if pair == "new/old" and not has_old:
        raise ConfigError("validation.pair=new/old needs a version with an old one (method.old_version)")
    if pair == "auto":
        return ("new", "old") if has_old else ("new", "new")
    query, gallery = pair.split("/")
    return query, gallery


def passes_criterion(report: dict[str, Any]) -> bool:
    """Whether a validation report's version meets the empirical compatibility criterion on top-1 and on mAP."""
    compatible = report.get("compatible")
    if not isinstance(compatible, dict):
        raise ConfigError("validation.require_compatible=true needs a report against an old version (no criterion in it)")
    return bool(compatible.get("top1")) and bool(compatible.get("mAP"))


def sweep_metric(report: dict[str, Any], metric: str, pair: str = "auto", require_compatible: bool = False) -> float:
    """The number a sweep maximises: ``metric`` of the pair :func:`sweep_pair` names.

    With ``require_compatible`` compatibility is a constraint, as when a deployment gates an upgrade on it: a
    run that fails the criterion scores ``metric - 1``, below every run that passes (metrics lie in [0, 1]), so
    a sweep over ``pair=new/new`` picks the best new model among the compatible ones.
    """
    pairs = {(r["query"], r["gallery"]): r for r in report["pairs"]}
    value = float(pairs[sweep_pair(report, pair)][metric])
    return value if not require_compatible or passes_criterion(report) else value - 1.0


def train_and_validate(cfg: DictConfig) -> tuple[Path, float | None]:
    """:func:`train`, then :func:`validate` when ``validation.enabled``; returns the version and the sweep metric."""
    if bool(cfg.validation.enabled):
        _check_validation(cfg)  # before the training, not after it
    out = train(cfg)
    if not bool(cfg.validation.enabled) or distributed.launched_rank()[0] != 0:  # under torchrun rank 0 validates
        return out, None
    report = validate(cfg, out)
    return out, sweep_metric(report, str(cfg.validation.metric), str(OmegaConf.select(cfg, "validation.pair", default="auto")),
                             bool(OmegaConf.select(cfg, "validation.require_compatible", default=False)))
