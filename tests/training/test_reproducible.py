"""A seeded run on the decoded-array path is reproducible, and a resumed run equals an uninterrupted one."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from compatembed.cli import compose_config
from compatembed.data.loaders import ArrayBatchLoader
from compatembed.training.run import train

TINY = ["data=synthetic", "data.augment=crop_flip", "data.pipeline=array", "model=cifar_resnet20", "model.embed_dim=16",
        "trainer.progress=false", "logger=csv", "trainer.log_every_n_steps=1", "trainer.num_threads=1"]


def _train(out: Path, *extra: str) -> dict[str, torch.Tensor]:
    train(compose_config("train", TINY + [f"output_dir={out}", *extra]))
    return load_file(out / "model.safetensors")


def _same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_the_array_path_is_used_and_a_seeded_run_repeats(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    used = []
    original = ArrayBatchLoader.__iter__
    monkeypatch.setattr(ArrayBatchLoader, "__iter__", lambda self: (used.append(self), original(self))[1])
    first = _train(tmp_path / "a", "trainer.epochs=2")
    assert used, "training did not take the decoded-array path"
    second = _train(tmp_path / "b", "trainer.epochs=2")
    assert _same(first, second)
    other_seed = _train(tmp_path / "c", "trainer.epochs=2", "seed=1")
    assert not _same(first, other_seed)


def test_resume_gives_the_uninterrupted_run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    straight = _train(tmp_path / "straight", "trainer.epochs=3")

    def interrupt(self: ArrayBatchLoader, epoch: int) -> None:
        if epoch == 2:
            raise KeyboardInterrupt  # killed during the third epoch, after two checkpoints
        self.epoch = epoch

    with monkeypatch.context() as patch:
        patch.setattr(ArrayBatchLoader, "set_epoch", interrupt)
        with pytest.raises(KeyboardInterrupt):
            _train(tmp_path / "resumed", "trainer.epochs=3")
    assert not (tmp_path / "resumed" / "model.safetensors").exists()
    resumed = _train(tmp_path / "resumed", "trainer.epochs=3")  # continues from checkpoints/last.ckpt
    assert _same(straight, resumed)
