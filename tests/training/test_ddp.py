"""Training on two CPU ranks (gloo): the ranks stay identical, rank 0 alone writes, and DDP equals one process.

What is compared with a single process, and why it can be: the model is timm's ``test_convnext``
(LayerNorm, no BatchNorm, whose statistics DDP keeps per rank) on the synthetic data without
augmentation. Two ranks of 16 items see, step by step, exactly the 32 items a single process with a
batch of 32 sees (the loaders split one seeded order), and DDP averages the two ranks' mean
gradients, which is the gradient of the mean over 32. Only the order of float sums differs, so the
weights agree to float32 rounding (atol 1e-5) and the epoch losses to 1e-6.
"""

from __future__ import annotations

import csv
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf
from safetensors.torch import load_file

from compatembed.cli import compose_config
from compatembed.errors import ConfigError
from compatembed.training.run import train
from helpers.ddp import launch, train_scenarios

REPO = Path(__file__).resolve().parents[2]
TINY = ["data=synthetic", "model=resnet18_cifar", "model.backbone.model_name=test_convnext", "model.embed_dim=16",
        "trainer.device=cpu", "trainer.num_threads=1", "trainer.progress=false", "trainer.epochs=2",
        "trainer.log_every_n_steps=1"]


def _torchrun(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    """``torchrun --standalone --nproc_per_node 2 -m compatembed.train ARGS`` with this checkout first on the path."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO), str(REPO / "index"), os.environ.get("PYTHONPATH", "")]))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "compatembed.train",
           *args]
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


def _epoch_losses(run: Path) -> list[float]:
    with open(run / "metrics.csv", newline="") as handle:
        return [float(row["train/loss_epoch"]) for row in csv.DictReader(handle) if row["train/loss_epoch"]]


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The same training under torchrun on 2 ranks of 16 and in one process with a batch of 32."""
    root = tmp_path_factory.mktemp("ddp")
    cache = f"paths.cache_dir={root / 'cache'}"
    done = _torchrun([*TINY, cache, "logger=csv", "data.loader.batch_size=16", f"output_dir={root / 'ddp'}"], cwd=root)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    train(compose_config("train", [*TINY, cache, "logger=csv", "data.loader.batch_size=32", f"output_dir={root / 'single'}"]))
    return {"ddp": root / "ddp", "single": root / "single", "root": root}


def test_rank_0_alone_writes_one_version_one_checkpoint_and_the_logs(runs: dict[str, Path]) -> None:
    ddp = runs["ddp"]
    assert sorted(p.relative_to(ddp).as_posix() for p in ddp.rglob("*")) == [
        "checkpoints", "checkpoints/last.ckpt", "config.yaml", "manifest.json", "metrics.csv", "model.safetensors", "train.log",
    ]
    with open(ddp / "metrics.csv", newline="") as handle:
        steps = [int(row["step"]) for row in csv.DictReader(handle) if row["train/loss"]]
    assert steps == list(range(1, 13))  # 2 epochs of 200 // 32 = 6 global steps, each logged once
    log = (ddp / "train.log").read_text()
    assert "rank 0 of 2 (gloo, cpu)" in log and "rank 1 of 2" not in log
    checkpoint = torch.load(ddp / "checkpoints" / "last.ckpt", weights_only=True)
    assert checkpoint["world_size"] == 2 and len(checkpoint["rng_ranks"]) == 2
    assert not torch.equal(checkpoint["rng_ranks"][0]["torch"], checkpoint["rng_ranks"][1]["torch"])  # each rank its own RNG
    manifest = OmegaConf.load(ddp / "manifest.json")
    assert manifest.training.distributed == {"world_size": 2, "batch_size_per_rank": 16, "global_batch_size": 32,
                                             "sync_batchnorm": False}


def test_two_ranks_train_what_one_process_trains_with_the_same_global_batch(runs: dict[str, Path]) -> None:
    ddp, single = load_file(runs["ddp"] / "model.safetensors"), load_file(runs["single"] / "model.safetensors")
    assert ddp.keys() == single.keys()
    for key in ddp:
        torch.testing.assert_close(ddp[key], single[key], rtol=0, atol=1e-5, msg=key)
    last = torch.load(runs["ddp"] / "checkpoints" / "last.ckpt", weights_only=True)["method"]
    assert all(torch.equal(last[f"model.{k}"], ddp[k]) for k in ddp)  # the checkpoint holds the exported weights
    losses = _epoch_losses(runs["ddp"])
    assert len(losses) == 2 and losses[1] < losses[0]
    assert losses == pytest.approx(_epoch_losses(runs["single"]), abs=1e-6)


def test_resuming_with_another_number_of_processes_is_refused(runs: dict[str, Path]) -> None:
    copy = runs["root"] / "resume-single"
    shutil.copytree(runs["ddp"], copy)
    with pytest.raises(ConfigError, match=r"written by a run of 2 process\(es\) and this run has 1"):
        train(compose_config("train", [*TINY, "trainer.epochs=3", "logger=none", f"output_dir={copy}",
                                       f"paths.cache_dir={runs['root'] / 'cache'}"]))


def test_sync_batchnorm_needs_cuda(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="trainer.sync_batchnorm=true needs CUDA"):
        train(compose_config("train", [*TINY, "trainer.sync_batchnorm=true", "logger=none", f"output_dir={tmp_path}"]))


def test_spawned_ranks_share_teachers_stay_identical_resume_and_stop_together_on_a_non_finite_loss(tmp_path: Path) -> None:
    base = [*TINY, "logger=none", "data.loader.batch_size=16", f"paths.cache_dir={tmp_path / 'cache'}"]
    old = train(compose_config("train", [*base, "trainer=smoke", "trainer.device=cpu", f"output_dir={tmp_path / 'old'}"]))
    cfg = compose_config("train", base)
    bct = compose_config("train", [*base, "method=bct", f"method.old_version={old}", "trainer.epochs=1"])
    launch(train_scenarios, 2, OmegaConf.to_yaml(cfg, resolve=True), OmegaConf.to_yaml(bct, resolve=True), str(tmp_path))

    frozen = [torch.load(tmp_path / f"bct-frozen-rank{r}.pt", weights_only=True) for r in range(2)]
    assert "old_classifier.weight" in frozen[0]
    assert all(torch.equal(frozen[0][k], frozen[1][k]) for k in frozen[0])  # rank 0's prototypes, broadcast
    assert len(list((tmp_path / "cache").glob("old-*.pt"))) == 1  # the teacher features, cached by rank 0 alone
    bct_states = [torch.load(tmp_path / f"bct-rank{r}.pt", weights_only=True) for r in range(2)]
    assert all(torch.equal(bct_states[0][k], bct_states[1][k]) for k in bct_states[0])

    straight = [torch.load(tmp_path / f"straight-rank{r}.pt", weights_only=True) for r in range(2)]
    assert straight[0].keys() == straight[1].keys()
    assert all(torch.equal(straight[0][k], straight[1][k]) for k in straight[0]), "the ranks' parameters differ"
    resumed = torch.load(tmp_path / "resumed-rank0.pt", weights_only=True)
    assert all(torch.equal(straight[0][k], resumed[k]) for k in resumed), "the resumed run differs from the straight one"
    assert torch.load(tmp_path / "resumed" / "checkpoints" / "last.ckpt", weights_only=True)["epoch"] == 1

    messages = [(tmp_path / f"nan-rank{r}.txt").read_text() for r in range(2)]
    for message in messages:  # both stopped, at the same step, knowing which rank went wrong
        assert message.startswith("non-finite loss at epoch 1 step 2 on rank(s) [1]"), message
    assert "nan" in messages[1] and "nan" not in messages[0]  # each names its own terms
    assert not (tmp_path / "nan" / "checkpoints" / "last.ckpt").exists()
