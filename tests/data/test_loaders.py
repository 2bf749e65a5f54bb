"""Training batches from a decoded array: every item once per epoch, seeded by (seed, epoch), right labels."""

from __future__ import annotations

import pytest
import torch
from torch.utils.data import DataLoader, DistributedSampler

from compatembed.data import ClassSubset, Preprocessing, SyntheticImages, build_transform
from compatembed.data.array_cache import decode_to_array
from compatembed.data.loaders import ArrayBatchLoader, batch_source, training_loader
from compatembed.errors import ConfigError

PRE = Preprocessing(input_size=(3, 8, 8), mean=(0.5,) * 3, std=(0.5,) * 3)


def _subset(train: bool = True) -> ClassSubset:
    arrays = decode_to_array(SyntheticImages(num_classes=5, per_class=9, image_size=8), None)
    arrays.transform = build_transform(PRE, train=train)
    return ClassSubset(arrays, [0, 2, 4])


def _epoch(loader: ArrayBatchLoader, epoch: int) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    loader.set_epoch(epoch)
    return list(loader)


def test_each_item_once_per_epoch_with_its_label() -> None:
    subset = _subset()
    loader = ArrayBatchLoader(subset, batch_size=4, shuffle=True, drop_last=False, seed=3)
    batches = _epoch(loader, 0)
    assert len(batches) == len(loader) == 7  # 27 items
    positions = torch.cat([b[2] for b in batches])
    assert sorted(positions.tolist()) == list(range(len(subset)))
    labels = torch.cat([b[1] for b in batches])
    assert labels.tolist() == subset.targets[positions.numpy()].tolist()


def test_unshuffled_eval_batches_equal_the_per_image_items() -> None:
    subset = _subset(train=False)
    loader = ArrayBatchLoader(subset, batch_size=10, shuffle=False, drop_last=False)
    images = torch.cat([b[0] for b in loader])
    assert torch.equal(images, torch.stack([subset[i][0] for i in range(len(subset))]))


def test_order_and_augmentation_depend_on_seed_and_epoch_only() -> None:
    subset = _subset()
    a = ArrayBatchLoader(subset, batch_size=8, shuffle=True, drop_last=True, seed=1)
    b = ArrayBatchLoader(subset, batch_size=8, shuffle=True, drop_last=True, seed=1)
    _epoch(a, 0)  # a has already run an epoch: its epoch 1 must not depend on that (resume)
    for (xa, ya, pa), (xb, yb, pb) in zip(_epoch(a, 1), _epoch(b, 1), strict=True):
        assert torch.equal(xa, xb) and torch.equal(pa, pb) and torch.equal(ya, yb)
    assert not torch.equal(torch.cat([p for _, _, p in _epoch(a, 0)]), torch.cat([p for _, _, p in _epoch(a, 1)]))
    assert len(a) == 27 // 8


def test_training_loader_picks_the_array_path_only_when_it_can() -> None:
    assert isinstance(training_loader(_subset(), batch_size=4, seed=0, device=torch.device("cpu")), ArrayBatchLoader)
    streamed = SyntheticImages(num_classes=2, per_class=3, image_size=8, transform=build_transform(PRE, train=True))
    assert batch_source(streamed) is None
    loader = training_loader(streamed, batch_size=4, seed=0, device=torch.device("cpu"))
    assert isinstance(loader, DataLoader)
    images, labels, positions = next(iter(loader))
    assert images.shape == (4, 3, 8, 8) and positions.dtype == torch.int64


def test_refuses_what_it_cannot_serve() -> None:
    with pytest.raises(ConfigError, match="decoded array"):
        ArrayBatchLoader(SyntheticImages(num_classes=2, per_class=2, image_size=8), batch_size=2, shuffle=False,
                         drop_last=False)
    with pytest.raises(ConfigError, match="batch size"):
        ArrayBatchLoader(_subset(), batch_size=0, shuffle=False, drop_last=False)


def _positions(loader) -> list[int]:
    return torch.cat([batch[2] for batch in loader]).tolist()


@pytest.mark.parametrize("world", [2, 4])
def test_ranks_take_what_a_distributed_sampler_gives_them(world: int) -> None:
    subset = _subset()  # 27 items: padded to a multiple of the world size
    for rank in range(world):
        loader = ArrayBatchLoader(subset, batch_size=3, shuffle=False, drop_last=False, rank=rank, world_size=world)
        sampler = DistributedSampler(range(len(subset)), num_replicas=world, rank=rank, shuffle=False)
        assert _positions(loader) == list(sampler)
        assert len(loader) == -(-len(sampler) // 3)


def test_ranks_share_one_seeded_order_and_together_make_the_single_process_batches() -> None:
    subset = _subset()
    whole = ArrayBatchLoader(subset, batch_size=9, shuffle=True, drop_last=True, seed=5)
    parts = [ArrayBatchLoader(subset, batch_size=3, shuffle=True, drop_last=True, seed=5, rank=r, world_size=3) for r in range(3)]
    for epoch in (0, 1):
        whole.set_epoch(epoch)
        for part in parts:
            part.set_epoch(epoch)
        per_rank = [list(part) for part in parts]
        assert {len(batches) for batches in per_rank} == {len(whole)} == {3}
        covered = sorted(p for batches in per_rank for batch in batches for p in batch[2].tolist())
        assert covered == list(range(27))  # 27 = 3 x 9: disjoint, nothing padded, nothing left out
        for i, batch in enumerate(whole):  # a global batch is the single process's batch of world x the size
            assert sorted(batch[2].tolist()) == sorted(p for batches in per_rank for p in batches[i][2].tolist())


def test_a_rank_outside_the_world_is_refused() -> None:
    with pytest.raises(ConfigError, match=r"rank 2 is not in \[0, world_size=2\)"):
        ArrayBatchLoader(_subset(), batch_size=2, shuffle=True, drop_last=False, rank=2, world_size=2)
    with pytest.raises(ConfigError, match="rank"):
        training_loader(_subset(), batch_size=2, seed=0, device=torch.device("cpu"), rank=0, world_size=0)


def test_per_image_datasets_are_split_by_a_distributed_sampler_with_set_epoch() -> None:
    streamed = SyntheticImages(num_classes=2, per_class=5, image_size=8, transform=build_transform(PRE, train=False))
    cpu = torch.device("cpu")
    loaders = [training_loader(streamed, batch_size=2, seed=0, device=cpu, rank=r, world_size=2) for r in range(2)]
    orders = []
    for epoch in (0, 1):
        for loader in loaders:
            loader.set_epoch(epoch)
        positions = [_positions(loader) for loader in loaders]
        assert len(positions[0]) == len(positions[1]) == 4  # 5 items each, the last, smaller batch dropped
        assert not set(positions[0]) & set(positions[1])
        orders.append(positions[0])
    assert orders[0] != orders[1]
