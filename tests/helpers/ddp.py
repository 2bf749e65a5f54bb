"""Several ranks on the CPU for the tests: gloo process groups in spawned processes, and what they run.

A spawned process imports this module by name (``helpers.ddp``; the parent's ``sys.path`` travels
with it), so everything a rank runs is a plain function here. Each rank writes what the test checks
to files under ``out``; an exception in a rank fails ``launch``.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from compatembed import distributed
from compatembed.data.loaders import training_loader
from compatembed.methods.independent import Independent
from compatembed.training.loggers import NullLogger
from compatembed.training.loop import fit
from compatembed.training.run import prepare_method, seed_everything


def free_port() -> int:
    """A TCP port nothing listens on now (for MASTER_PORT)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def launch(fn: Callable[..., None], world: int, *args: Any) -> None:
    """Run ``fn(rank, world, port, *args)`` in ``world`` spawned processes and wait for them all."""
    torch.multiprocessing.spawn(fn, args=(world, free_port(), *args), nprocs=world, join=True)


def join_as(rank: int, world: int, port: int) -> None:
    """Set the environment torchrun would set for ``rank`` of ``world`` on this machine."""
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), LOCAL_WORLD_SIZE=str(world),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)


class Interrupted(Exception):
    """Raised by :class:`StopAtEpoch`, as a killed run would stop."""


class StopAtEpoch:
    """A training loader that stops the run when epoch ``stop`` begins (every rank at the same point)."""

    def __init__(self, loader: Any, stop: int) -> None:
        self.loader, self.stop = loader, stop

    def set_epoch(self, epoch: int) -> None:
        if epoch == self.stop:
            raise Interrupted(f"stopped at epoch {epoch}")
        self.loader.set_epoch(epoch)

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self) -> Iterator[Any]:
        return iter(self.loader)


class NanOnRank(Independent):
    """Independent training whose loss turns NaN on one rank at one step (a test double for a diverging batch)."""

    name = ""  # not registered as a method

    def __init__(self, model: torch.nn.Module, num_classes: int, *, bad_rank: int, bad_step: int) -> None:
        super().__init__(model, num_classes)
        self.bad_rank, self.bad_step, self.calls = bad_rank, bad_step, 0

    def training_forward(
        self, images: torch.Tensor, labels: torch.Tensor, indices: torch.Tensor
    ) -> tuple[dict[str, torch.Tensor], dict[str, float]]:
        terms, report = super().training_forward(images, labels, indices)
        self.calls += 1
        if distributed.rank() == self.bad_rank and self.calls == self.bad_step:
            terms = {k: v * float("nan") for k, v in terms.items()}
        return terms, report


def _fit(cfg: DictConfig, run_dir: Path, *, stop_at: int | None = None, nan_at: int | None = None,
         keep: dict[str, Any] | None = None) -> dict[str, torch.Tensor]:
    """The method, loader and loop ``train`` builds, on this rank; returns the trained state.

    ``keep`` receives the method after its setup, before training.
    """
    seed_everything(int(cfg.seed))
    method, train_set, ctx = prepare_method(cfg)
    if keep is not None:
        keep["frozen"] = {k: v.detach().clone() for k, v in method.state_dict().items() if k.startswith("old_")}
    if nan_at is not None:
        method = NanOnRank(instantiate(cfg.model), int(cfg.data.num_classes), bad_rank=1, bad_step=nan_at)
    loader: Any = training_loader(train_set, batch_size=int(cfg.data.loader.batch_size), seed=int(cfg.seed),
                                  device=ctx.device, rank=distributed.rank(), world_size=distributed.world_size())
    if stop_at is not None:
        loader = StopAtEpoch(loader, stop_at)
    fit(method, loader, optimizer_factory=instantiate(cfg.optim.optimizer),
        scheduler_factory=instantiate(cfg.optim.scheduler) if cfg.optim.scheduler is not None else None,
        config=instantiate(cfg.trainer), run_dir=run_dir, logger=NullLogger())
    return {k: v.detach().clone() for k, v in method.state_dict().items()}


def train_scenarios(rank: int, world: int, port: int, cfg_yaml: str, bct_yaml: str, out: str) -> None:
    """One rank of four runs in one gloo group; writes ``<run>-rank<r>.pt`` states and ``nan-rank<r>.txt``.

    ``straight``: ``cfg.trainer.epochs`` epochs. ``resumed``: stopped when epoch 1 begins, then run
    again (resuming from the epoch-0 checkpoint). ``nan``: rank 1's loss is NaN at its third step.
    ``bct``: a method with a frozen old model and its features' prototypes (``bct-frozen-rank<r>.pt``
    holds the frozen modules after setup).
    """
    join_as(rank, world, port)
    cfg = OmegaConf.create(cfg_yaml)
    root = Path(out)
    with distributed.process_group(torch.device("cpu")):
        kept: dict[str, Any] = {}
        torch.save(_fit(OmegaConf.create(bct_yaml), root / "bct", keep=kept), root / f"bct-rank{rank}.pt")
        torch.save(kept["frozen"], root / f"bct-frozen-rank{rank}.pt")
        torch.save(_fit(cfg, root / "straight"), root / f"straight-rank{rank}.pt")
        try:
            _fit(cfg, root / "resumed", stop_at=1)
        except Interrupted:
            pass
        torch.save(_fit(cfg, root / "resumed"), root / f"resumed-rank{rank}.pt")
        try:
            _fit(cfg, root / "nan", nan_at=3)
        except FloatingPointError as exc:
            (root / f"nan-rank{rank}.txt").write_text(str(exc))
