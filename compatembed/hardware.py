"""What the machine offers a run: CPUs this process may use, the thread and worker counts derived from them, the device."""

from __future__ import annotations

import logging
import os
from typing import Any

import torch

from compatembed.distributed import launched_rank, local_world_size
from compatembed.errors import ConfigError

_logger = logging.getLogger(__name__)


def available_cpus() -> int:
    """CPUs this process may run on (its affinity mask, which containers and ``taskset`` narrow)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not on Linux
        return max(1, os.cpu_count() or 1)


def _count(value: Any, key: str, auto: int) -> int:
    if value is None or (isinstance(value, str) and value.strip().lower() == "auto"):
        return auto
    try:
        count = int(value)
    except (TypeError, ValueError):
        raise ConfigError(f"{key} must be 'auto' or a non-negative integer, got {value!r}") from None
    if count < 0:
        raise ConfigError(f"{key} must be 'auto' or a non-negative integer, got {value!r}")
    return count


def resolve_num_workers(value: Any, key: str = "data.loader.num_workers") -> int:
    """DataLoader workers for streamed data: ``auto`` = half the available CPUs (at most 8), the rest train.

    Data served from a decoded array needs none: its batches are produced in the training process.
    Under torchrun the processes on one machine share its CPUs: ``auto`` halves each one's part.
    """
    return _count(value, key, min(8, available_cpus() // (2 * local_world_size())))


def resolve_num_threads(value: Any, key: str = "trainer.num_threads") -> int:
    """Intra-op threads for torch: ``auto`` = every available CPU (0 also means auto).

    Under torchrun the processes on one machine share its CPUs: ``auto`` gives each its part.
    """
    auto = max(1, available_cpus() // local_world_size())
    return _count(value, key, auto) or auto


def set_torch_threads(value: Any, key: str = "trainer.num_threads") -> int:
    """Set torch's intra-op thread count from a config value; returns the count used."""
    threads = resolve_num_threads(value, key)
    if torch.get_num_threads() != threads:
        torch.set_num_threads(threads)
        _logger.info("torch uses %d threads", threads)
    return threads


def resolve_device(name: str) -> torch.device:
    """``auto`` → CUDA when available else CPU; a CUDA device on a host without one is an error.

    Under torchrun (``WORLD_SIZE`` > 1) a CUDA device is ``cuda:LOCAL_RANK``: one device per process.

    Raises:
        ConfigError: CUDA asked for but absent; under torchrun, a CUDA device with an explicit index
            (every process would share it) or fewer devices than processes on this machine.
    """
    if name == "auto":
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    else:
        device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"trainer.device={name} but no CUDA device is available; use trainer.device=cpu or auto")
    _, local_rank, world = launched_rank()
    if device.type != "cuda" or world <= 1:
        return device
    if device.index is not None:
        raise ConfigError(
            f"device {name} under torchrun: every process would use that one device; set device=cuda (or auto) "
            "and each process takes cuda:LOCAL_RANK (choose the devices with CUDA_VISIBLE_DEVICES)"
        )
    if local_rank >= torch.cuda.device_count():
        raise ConfigError(
            f"LOCAL_RANK={local_rank} but this machine shows {torch.cuda.device_count()} CUDA device(s): start at most "
            "that many processes per machine (torchrun --nproc_per_node)"
        )
    return torch.device("cuda", local_rank)
