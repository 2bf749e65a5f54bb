"""The training loop every method shares: epochs, mixed precision, checkpoints, resume, logging.

Methods supply named loss terms through ``training_forward``; the total is summed here, in one place,
and each term is logged as ``train/<term>``.

Under torchrun (a joined process group, :mod:`compatembed.distributed`) the same loop runs on every
rank: the method's loss is computed inside the forward of a ``DistributedDataParallel`` module (so
every parameter the loss uses is seen by DDP), gradients are averaged over ranks, epoch metrics are
all-reduced, a non-finite loss on any rank stops them all, and rank 0 alone logs and writes the
checkpoint (which holds every rank's RNG state). A single process takes none of these paths.
"""

from __future__ import annotations

import logging
import os
import pickle
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from compatembed import distributed
from compatembed.errors import ConfigError
from compatembed.hardware import resolve_device, set_torch_threads
from compatembed.methods.base import Method
from compatembed.models.orthogonal import decay_free_parameters
from compatembed.training.loggers import MetricLogger

_logger = logging.getLogger(__name__)
CHECKPOINT = "last.ckpt"


@dataclass
class TrainerConfig:
    """Loop settings (Hydra group ``trainer``).

    Attributes:
        epochs: passes over the training set (0 exports the initial model, e.g. a pretrained one).
        device: ``auto`` (CUDA when available), ``cpu``, ``cuda``, ``cuda:1``...
        precision: ``auto`` (bf16 autocast on CUDA, fp32 on CPU), ``32``, ``bf16``, ``16`` (fp16 + grad scaler).
        grad_clip: max gradient norm (0 = off).
        log_every_n_steps: how often step metrics go to the logger.
        max_steps_per_epoch: cap on steps per epoch (0 = no cap), for smoke runs.
        checkpoint: save ``checkpoints/last.ckpt`` after each epoch.
        resume: continue from ``checkpoints/last.ckpt`` in the run directory when it exists.
        progress: show progress bars.
        num_threads: torch intra-op threads: ``auto`` = every CPU in this process's affinity mask.
        channels_last: run convolutions on ``channels_last`` tensors (NHWC in memory), which CPU and
            GPU kernels run faster; the decoded-array data path produces such batches directly.
        sync_batchnorm: under torchrun on CUDA, BatchNorm layers of the trained modules compute their
            statistics over the global batch (``SyncBatchNorm``) instead of each rank's part; CUDA only.
        find_unused_parameters: under torchrun, DDP searches every step's graph for trainable
            parameters without a gradient. By default DDP learns them in the first step
            (``static_graph``: a backbone's unused classifier, say), which assumes every step uses the
            same parameters; set this for a method whose loss uses different ones from step to step.
        dist_timeout_min: minutes a collective waits for the slowest rank (rank 0 extracts the frozen
            teachers' features while the others wait).
    """

    epochs: int = 10
    device: str = "auto"
    precision: str = "auto"
    grad_clip: float = 0.0
    log_every_n_steps: int = 20
    max_steps_per_epoch: int = 0
    checkpoint: bool = True
    resume: bool = True
    progress: bool = True
    num_threads: Any = "auto"
    channels_last: bool = True
    sync_batchnorm: bool = False
    find_unused_parameters: bool = False
    dist_timeout_min: float = 60.0


class TrainingStep(nn.Module):
    """The method's loss terms as a module ``forward``: what ``DistributedDataParallel`` wraps.

    DDP only follows parameters used inside the forward it wraps; the loss (classifier heads, maps)
    is computed here, so the method's whole graph is inside it.
    """

    def __init__(self, method: Method) -> None:
        super().__init__()
        self.method = method

    def forward(
        self, images: torch.Tensor, labels: torch.Tensor, indices: torch.Tensor
    ) -> tuple[dict[str, torch.Tensor], dict[str, float]]:
        return self.method.training_forward(images, labels, indices)


def _sync_batchnorm(method: Method, device: torch.device) -> None:
    """Turn the BatchNorm layers of ``method``'s trained modules into ``SyncBatchNorm`` (frozen teachers keep theirs).

    Raises:
        ConfigError: the device is not CUDA (SyncBatchNorm runs over NCCL).
    """
    if device.type != "cuda":
        raise ConfigError(
            "trainer.sync_batchnorm=true needs CUDA devices (SyncBatchNorm runs over NCCL); on CPU each rank's "
            "BatchNorm uses its own part of the batch: set trainer.sync_batchnorm=false"
        )
    if not distributed.is_distributed():
        return  # one process already sees the whole batch
    frozen = {id(m) for m in method.frozen_modules().values()}
    for name, child in list(method.named_children()):
        if id(child) not in frozen:
            setattr(method, name, nn.SyncBatchNorm.convert_sync_batchnorm(child))


def _autocast(device: torch.device, precision: str) -> tuple[torch.dtype | None, bool]:
    """(autocast dtype or None, use a grad scaler)."""
    if precision == "auto":
        precision = "bf16" if device.type == "cuda" and torch.cuda.is_bf16_supported() else "32"
    if precision == "32":
        return None, False
    if precision == "bf16":
        return torch.bfloat16, False
    if precision == "16":
        if device.type != "cuda":
            raise ConfigError("trainer.precision=16 needs CUDA; use 32 or bf16 on CPU")
        return torch.float16, True
    raise ConfigError(f"unknown trainer.precision={precision!r}; use auto, 32, bf16 or 16")


def _rng_state() -> dict[str, Any]:
    """Every generator's state, as tensors and plain values only (so checkpoints load with ``weights_only``)."""
    name, keys, pos, has_gauss, cached = np.random.get_state()
    numpy_state = {"name": str(name), "keys": torch.from_numpy(np.asarray(keys, dtype=np.int64)), "pos": int(pos),
                   "has_gauss": int(has_gauss), "cached_gaussian": float(cached)}
    state = {"python": random.getstate(), "numpy": numpy_state, "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    n = state["numpy"]
    np.random.set_state((n["name"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached_gaussian"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _save_checkpoint(path: Path, payload: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    torch.save(payload, tmp)
    with open(tmp, "rb") as handle:
        os.fsync(handle.fileno())
    os.replace(tmp, path)


def _param_groups(method: Method, params: list[nn.Parameter]) -> list[Any]:
    """``params`` as the optimiser takes them: the orthogonal layers' parameters that decay would break
    (:func:`~compatembed.models.orthogonal.decay_free_parameters`) in a group without weight decay."""
    exempt = {id(p) for p in decay_free_parameters(method)}
    if not exempt.intersection(map(id, params)):
        return params
    groups: list[dict[str, Any]] = [{"params": [p for p in params if id(p) not in exempt]},
                                    {"params": [p for p in params if id(p) in exempt], "weight_decay": 0.0}]
    return [g for g in groups if g["params"]]


def fit(
    method: Method,
    loader: DataLoader,
    *,
    optimizer_factory: Callable[..., torch.optim.Optimizer],
    scheduler_factory: Callable[..., Any] | None,
    config: TrainerConfig,
    run_dir: Path,
    logger: MetricLogger,
) -> dict[str, float]:
    """Train ``method`` on ``loader`` (which yields ``(images, labels, indices)``).

    Returns:
        The last epoch's mean of every logged term, plus ``train/step_time_s`` (mean seconds per step,
        data loading excluded) and ``train/epochs``.
    """
    device = resolve_device(config.device)
    set_torch_threads(config.num_threads)
    world, rank, main = distributed.world_size(), distributed.rank(), distributed.is_main()
    if config.sync_batchnorm:
        _sync_batchnorm(method, device)
    method.to(device)
    if config.channels_last:
        method.to(memory_format=torch.channels_last)  # 4-D weights only; other tensors are unchanged
    params = method.trainable_parameters()
    if not params and config.epochs > 0:
        raise ConfigError(f"method {method.name!r} has no trainable parameters")
    optimizer = optimizer_factory(_param_groups(method, params)) if params else None
    batches = distributed.min_over_ranks(len(loader))  # every rank takes the same number of steps
    steps_per_epoch = batches if not config.max_steps_per_epoch else min(batches, config.max_steps_per_epoch)
    scheduler = (
        scheduler_factory(optimizer, steps_per_epoch=steps_per_epoch, epochs=max(1, config.epochs))
        if scheduler_factory is not None and optimizer is not None
        else None
    )
    amp_dtype, use_scaler = _autocast(device, config.precision)
    scaler = torch.amp.GradScaler("cuda") if use_scaler else None

    ckpt_path = run_dir / "checkpoints" / CHECKPOINT
    start_epoch, step = 0, 0
    if config.resume and ckpt_path.is_file():
        try:  # tensors and plain values only: a checkpoint is a file, never code to run
            state = torch.load(ckpt_path, map_location=device, weights_only=True)
        except pickle.UnpicklingError as exc:
            raise ConfigError(
                f"{ckpt_path} holds objects other than tensors and plain values (written by an older version, or "
                f"not by this project), so it is not loaded: remove {ckpt_path.parent} or set trainer.resume=false "
                f"({str(exc).splitlines()[0]})"
            ) from None
        recorded_world = int(state.get("world_size", 1))
        if recorded_world != world:
            raise ConfigError(
                f"{ckpt_path} was written by a run of {recorded_world} process(es) and this run has {world}: the data "
                f"order, per-rank batches and RNG states would not continue it. Resume with {recorded_world} "
                f"process(es) (torchrun --nproc_per_node), or remove {ckpt_path.parent} or set trainer.resume=false"
            )
        recorded, current = state.get("frozen"), method.frozen_hashes()
        if recorded is not None and recorded != current:
            changed = sorted(k for k in set(recorded) | set(current) if recorded.get(k) != current.get(k))
            raise ConfigError(
                f"{ckpt_path} was trained against other frozen models ({', '.join(changed)} changed since, e.g. the old "
                f"version was retrained): remove {ckpt_path.parent} or set trainer.resume=false to start over"
            )
        method.load_state_dict(state["method"])
        if optimizer is not None:
            optimizer.load_state_dict(state["optimizer"])
        if scheduler is not None and state.get("scheduler") is not None:
            scheduler.load_state_dict(state["scheduler"])
        if scaler is not None and state.get("scaler") is not None:
            scaler.load_state_dict(state["scaler"])
        _set_rng_state(state["rng_ranks"][rank] if world > 1 else state["rng"])
        start_epoch, step = int(state["epoch"]) + 1, int(state["step"])
        _logger.info("resumed from %s at epoch %d", ckpt_path, start_epoch)

    forward: Any = method.training_forward
    if world > 1 and params and start_epoch < config.epochs:
        forward = DistributedDataParallel(
            TrainingStep(method),
            device_ids=[device.index] if device.type == "cuda" else None,
            find_unused_parameters=config.find_unused_parameters,
            static_graph=not config.find_unused_parameters,
        )
    summary: dict[str, float] = {}
    step_times: list[float] = []
    images_seen, loop_seconds = 0, 0.0
    for epoch in range(start_epoch, config.epochs):
        method.train()
        if hasattr(loader, "set_epoch"):  # an epoch draws the same batches after a resume
            loader.set_epoch(epoch)
        epoch_steps = steps_per_epoch
        if world > 1:  # streamed shards give ranks different counts, which change with the epoch's shard order
            epoch_steps = min(steps_per_epoch, distributed.min_over_ranks(len(loader)))
        epoch_started = time.perf_counter()
        sums: dict[str, float] = {}
        count = 0
        bar = tqdm(total=epoch_steps, desc=f"epoch {epoch + 1}/{config.epochs}", disable=not (config.progress and main),
                   leave=False)
        for batch_index, (images, labels, indices) in enumerate(loader):
            if batch_index >= epoch_steps:
                break
            images = images.to(device, non_blocking=True)
            if config.channels_last and images.dim() == 4:
                images = images.contiguous(memory_format=torch.channels_last)  # a no-op for array batches
            labels = labels.to(device, non_blocking=True)
            indices = indices.to(device, non_blocking=True)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            started = time.perf_counter()
            with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
                terms, report = forward(images, labels, indices)
            loss = torch.stack([t.float() for t in terms.values()]).sum()
            if world > 1:  # before backward: a rank that stopped alone would leave the others in its all-reduce
                bad = distributed.ranks_where(not bool(torch.isfinite(loss)))
                if bad:
                    raise FloatingPointError(
                        f"non-finite loss at epoch {epoch + 1} step {step} on rank(s) {bad}; rank {rank}'s terms: {terms}"
                    )
            elif not torch.isfinite(loss):
                raise FloatingPointError(f"non-finite loss at epoch {epoch + 1} step {step}: {terms}")
            assert optimizer is not None
            optimizer.zero_grad(set_to_none=True)
            if scaler is not None:
                scaler.scale(loss).backward()
                scaler.unscale_(optimizer)
            else:
                loss.backward()
            if config.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(params, config.grad_clip)
            if scaler is not None:
                scaler.step(optimizer)
                scaler.update()
            else:
                optimizer.step()
            if scheduler is not None:
                scheduler.step()
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            step_times.append(time.perf_counter() - started)
            step += 1
            count += 1
            images_seen += int(labels.shape[0])
            values = {f"train/{k}": float(v.detach()) for k, v in terms.items()}
            values["train/loss"] = float(loss.detach())
            values.update({f"train/{k}": float(v) for k, v in report.items()})
            for key, value in values.items():
                sums[key] = sums.get(key, 0.0) + value
            if main and step % config.log_every_n_steps == 0:  # rank 0's batch; the epoch means cover every rank
                logger.log({**values, "train/lr": optimizer.param_groups[0]["lr"], "epoch": epoch}, step)
            bar.set_postfix(loss=f"{values['train/loss']:.3f}")
            bar.update(1)
        bar.close()
        loop_seconds += time.perf_counter() - epoch_started
        if world > 1:  # every rank ran the same number of equal batches: the mean of the sums is the global mean
            totals = distributed.sum_over_ranks({**sums, "count": float(count)})  # the sums' keys are train/<name>
            count = int(totals.pop("count"))
            sums = totals
        summary = {f"{k}_epoch": v / max(1, count) for k, v in sums.items()}
        if main:
            logger.log({**summary, "epoch": epoch}, step)
            _logger.info("epoch %d/%d: %s", epoch + 1, config.epochs, {k: round(v, 4) for k, v in summary.items()})
        if config.checkpoint:
            rng_states = distributed.gather_objects(_rng_state()) if world > 1 else None
            if main:
                payload = {
                    "method": method.state_dict(),
                    "optimizer": optimizer.state_dict() if optimizer is not None else None,
                    "scheduler": scheduler.state_dict() if scheduler is not None else None,
                    "scaler": scaler.state_dict() if scaler is not None else None,
                    "rng": rng_states[0] if rng_states is not None else _rng_state(),
                    "frozen": method.frozen_hashes(),  # resuming against other frozen models is refused
                    "epoch": epoch,
                    "step": step,
                    "world_size": world,  # resuming with another number of processes is refused
                }
                if rng_states is not None:
                    payload["rng_ranks"] = rng_states  # each rank continues its own generators
                _save_checkpoint(ckpt_path, payload)
            distributed.barrier()
    if config.channels_last:
        method.to(memory_format=torch.contiguous_format)  # exported weights (safetensors) must be contiguous
    # the first steps pay one-off costs (allocation, kernel selection): time the steady state
    steady = step_times[min(len(step_times) // 10, 10):] or step_times
    if steady:
        summary["train/step_time_s"] = float(np.median(steady))
    if world > 1:  # images of every rank
        images_seen = int(distributed.sum_over_ranks({"images": float(images_seen)})["images"])
    if loop_seconds > 0:  # data included: what the run actually sustained
        summary["train/images_per_s"] = images_seen / loop_seconds
    summary["train/epochs"] = float(config.epochs)
    return summary
