"""One training loop on several processes: the torchrun process group, rank helpers and the few collectives.

``torchrun --nproc_per_node N`` starts N copies of an entry point and tells each who it is through
the environment (``RANK``, ``LOCAL_RANK``, ``WORLD_SIZE``, ``MASTER_ADDR``/``MASTER_PORT``). The loop
stays one loop: every rank runs it on its own share of the data, ``DistributedDataParallel``
averages the gradients, and rank 0 alone writes files. Everything the loop needs from the other
ranks is here, as plain functions that are the identity (or do nothing) in a single process, so a
single-process run takes no collective at all.

CUDA ranks talk over NCCL and use ``cuda:LOCAL_RANK``; CPU ranks talk over gloo.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

from compatembed.errors import ConfigError

_logger = logging.getLogger(__name__)


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    if value is None or value.strip() == "":
        return default
    try:
        return int(value)
    except ValueError:
        raise ConfigError(f"environment variable {name}={value!r} is not an integer (torchrun sets it)") from None


def launched_rank() -> tuple[int, int, int]:
    """``(rank, local_rank, world_size)`` that torchrun put in the environment; ``(0, 0, 1)`` outside torchrun.

    Read from the environment rather than the process group, so entry points can use them before
    (or without) joining it, e.g. to pick ``cuda:LOCAL_RANK`` or a shard of a gallery to embed.

    Raises:
        ConfigError: a variable is not an integer, or the rank is outside ``[0, world_size)``.
    """
    world = _env_int("WORLD_SIZE", 1)
    rank = _env_int("RANK", 0)
    local = _env_int("LOCAL_RANK", 0)
    if world < 1 or not 0 <= rank < world or local < 0:
        raise ConfigError(f"inconsistent torchrun environment: RANK={rank} LOCAL_RANK={local} WORLD_SIZE={world}")
    return rank, local, world


def local_world_size() -> int:
    """Processes torchrun started on this machine (1 outside torchrun): they share its CPUs."""
    return max(1, _env_int("LOCAL_WORLD_SIZE", 1))


def is_distributed() -> bool:
    """True inside a joined process group of more than one process."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    """This process's rank in the joined group (0 in a single process)."""
    return dist.get_rank() if is_distributed() else 0


def world_size() -> int:
    """Processes in the joined group (1 in a single process)."""
    return dist.get_world_size() if is_distributed() else 1


def is_main() -> bool:
    """Rank 0: the one process that writes configs, logs, checkpoints, caches and the model version."""
    return rank() == 0


@contextmanager
def process_group(device: torch.device, *, timeout_min: float = 60.0) -> Iterator[bool]:
    """Join the process group torchrun describes for the duration of the block, then leave it.

    Nothing happens outside torchrun (``WORLD_SIZE`` unset or 1) or when a group is already joined
    (the caller manages it). The backend follows the device: NCCL for CUDA, gloo for CPU.

    Args:
        device: This rank's device (``cuda:LOCAL_RANK`` or ``cpu``); a CUDA device becomes current.
        timeout_min: How long a collective waits for the slowest rank. Rank 0 computes the frozen
            teachers' features alone while the others wait in a broadcast, so this is generous.

    Yields:
        Whether this call joined a group of more than one process.
    """
    _, _, world = launched_rank()
    if world <= 1 or (dist.is_available() and dist.is_initialized()):
        yield is_distributed()
        return
    if not dist.is_available():
        raise ConfigError("WORLD_SIZE > 1 but this torch build has no torch.distributed")
    backend = "nccl" if device.type == "cuda" else "gloo"
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group(backend=backend, init_method="env://", timeout=timedelta(minutes=timeout_min))
    _logger.info("joined process group: rank %d of %d (%s, %s)", dist.get_rank(), dist.get_world_size(), backend, device)
    try:
        yield True
    finally:
        dist.destroy_process_group()


def _comm_device() -> torch.device:
    """Where tensors must live for the group's backend: the current CUDA device for NCCL, else the CPU."""
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def barrier() -> None:
    """Wait for every rank (a no-op in a single process): around what rank 0 alone writes."""
    if is_distributed():
        dist.barrier()


@contextmanager
def main_first() -> Iterator[None]:
    """Run the block on rank 0 first and on the other ranks after it: rank 0 builds a shared cache
    (the decoded-array cache of a dataset), the others then read the finished one."""
    if not is_distributed():
        yield
        return
    if not is_main():
        dist.barrier()
    try:
        yield
    finally:
        if is_main():
            dist.barrier()


def sum_over_ranks(values: Mapping[str, float]) -> dict[str, float]:
    """Every rank's ``values`` summed key by key (the identity in a single process).

    Every rank must pass the same keys: epoch sums of the same method's loss terms.
    """
    if not is_distributed():
        return dict(values)
    keys = sorted(values)
    summed = torch.tensor([float(values[k]) for k in keys], dtype=torch.float64, device=_comm_device())
    dist.all_reduce(summed, op=dist.ReduceOp.SUM)
    return dict(zip(keys, summed.cpu().tolist()))


def min_over_ranks(value: int) -> int:
    """The smallest ``value`` of any rank: the number of steps every rank can take this epoch."""
    if not is_distributed():
        return int(value)
    t = torch.tensor([int(value)], dtype=torch.int64, device=_comm_device())
    dist.all_reduce(t, op=dist.ReduceOp.MIN)
    return int(t.item())


def ranks_where(flag: bool) -> list[int]:
    """The ranks whose ``flag`` is true (``[0]`` or ``[]`` in a single process).

    One all-reduce of the flag each call, and an all-gather to name the ranks only when some rank
    raised it: every rank learns that a rank hit a non-finite loss and stops with it, rather
    than waiting forever in the next gradient all-reduce.
    """
    if not is_distributed():
        return [0] if flag else []
    device = _comm_device()
    any_flag = torch.tensor([1 if flag else 0], dtype=torch.int32, device=device)
    dist.all_reduce(any_flag, op=dist.ReduceOp.MAX)
    if not int(any_flag.item()):
        return []
    flags = [torch.zeros(1, dtype=torch.int32, device=device) for _ in range(world_size())]
    dist.all_gather(flags, torch.tensor([1 if flag else 0], dtype=torch.int32, device=device))
    return [r for r, f in enumerate(flags) if int(f.item())]


def broadcast_tensor(tensor: torch.Tensor | None, *, src: int = 0) -> torch.Tensor:
    """Rank ``src``'s ``tensor`` on every rank, on the CPU (the other ranks pass ``None``).

    How frozen teachers' features and prototypes are shared: computed once on rank 0 (which also
    owns their disk cache) and sent, so every rank trains against bit-identical targets.

    Raises:
        ValueError: the sending rank passed ``None``.
    """
    if rank() == src and tensor is None:
        raise ValueError(f"rank {src} must pass the tensor it broadcasts")
    if not is_distributed():
        assert tensor is not None  # checked above: in a single process rank 0 is the sender
        return tensor
    device = _comm_device()
    header: list[Any] = [(tuple(tensor.shape), tensor.dtype) if tensor is not None and rank() == src else None]
    dist.broadcast_object_list(header, src=src, device=device)
    shape, dtype = header[0]
    if tensor is not None and rank() == src:
        buffer = tensor.contiguous().to(device)
    else:
        buffer = torch.empty(shape, dtype=dtype, device=device)
    dist.broadcast(buffer, src=src)
    return buffer.cpu()


def gather_objects(obj: Any) -> list[Any]:
    """Every rank's picklable ``obj``, in rank order (``[obj]`` in a single process): per-rank RNG states."""
    if not is_distributed():
        return [obj]
    out: list[Any] = [None] * world_size()
    dist.all_gather_object(out, obj)
    return out


def quiet_other_ranks() -> None:
    """For entry points under torchrun: ranks other than 0 log warnings and errors only, to the console.

    Hydra has given every rank the same log file handler; only rank 0 keeps it, so one process
    writes the run's log and progress lines are not repeated N times.
    """
    process_rank, _, world = launched_rank()
    if world <= 1 or process_rank == 0:
        return
    root = logging.getLogger()
    for handler in list(root.handlers):
        if isinstance(handler, logging.FileHandler):
            root.removeHandler(handler)
            handler.close()
    logging.getLogger("compatembed").setLevel(logging.WARNING)
