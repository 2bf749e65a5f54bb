"""The torchrun plumbing in one process: the environment read, and every collective the identity without a group."""

from __future__ import annotations

import pytest
import torch

from compatembed import distributed
from compatembed.errors import ConfigError
from compatembed.hardware import available_cpus, resolve_num_threads, resolve_num_workers


def test_outside_torchrun_a_process_is_rank_0_of_1(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE"):
        monkeypatch.delenv(name, raising=False)
    assert distributed.launched_rank() == (0, 0, 1) and distributed.local_world_size() == 1
    with distributed.process_group(torch.device("cpu")) as joined:
        assert joined is False and not distributed.is_distributed()
    assert (distributed.rank(), distributed.world_size(), distributed.is_main()) == (0, 1, True)


def test_the_environment_torchrun_sets_is_read_and_checked(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RANK", "3")
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "4")
    assert distributed.launched_rank() == (3, 1, 4)
    monkeypatch.setenv("RANK", "4")
    with pytest.raises(ConfigError, match="inconsistent torchrun environment: RANK=4"):
        distributed.launched_rank()
    monkeypatch.setenv("RANK", "one")
    with pytest.raises(ConfigError, match="RANK='one' is not an integer"):
        distributed.launched_rank()


def test_processes_on_one_machine_share_its_cpus(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    assert resolve_num_threads("auto") == available_cpus()
    monkeypatch.setenv("LOCAL_WORLD_SIZE", str(available_cpus()))
    assert resolve_num_threads("auto") == 1 and resolve_num_workers("auto") == 0
    assert resolve_num_threads(3) == 3  # an explicit count is kept


def test_collectives_are_the_identity_in_one_process() -> None:
    assert distributed.sum_over_ranks({"train/loss": 1.5}) == {"train/loss": 1.5}
    assert distributed.min_over_ranks(7) == 7
    assert distributed.ranks_where(True) == [0] and distributed.ranks_where(False) == []
    t = torch.arange(3.0)
    assert distributed.broadcast_tensor(t) is t
    with pytest.raises(ValueError, match="rank 0 must pass the tensor"):
        distributed.broadcast_tensor(None)
    assert distributed.gather_objects({"a": 1}) == [{"a": 1}]
    with distributed.main_first():
        distributed.barrier()
