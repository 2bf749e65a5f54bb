"""WebDataset shards: the source's pixels and labels, each sample once per epoch, seeded order, named errors."""

from __future__ import annotations

import io
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
import webdataset as wds
from PIL import Image
from torchvision.transforms.functional import pil_to_tensor

from compatembed.data import WebDatasetShards, build_dataset
from compatembed.data.loaders import training_loader
from compatembed.data.shards import ShardLoader, shard_loader
from compatembed.errors import ConfigError, DataError
from tools.make_shards import main as make_shards_main

CLASSES = ["cat", "dog", "fox"]
SHARD_SIZES = (10, 8, 12, 6)  # unequal, so a worker split by shard matters


def _png(rng: np.random.Generator) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, size=(6, 5, 3), dtype=np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def _decode(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))


def _write_shard(path: Path, samples: list[dict]) -> None:
    with wds.TarWriter(str(path)) as sink:
        for sample in samples:
            sink.write(sample)


@pytest.fixture
def shards(tmp_path: Path) -> tuple[str, Path, list[tuple[str, bytes, int]]]:
    """Four shards of 36 tiny PNGs in 3 classes: the brace pattern, classes.txt, and (key, bytes, label) in order."""
    rng = np.random.default_rng(0)
    written: list[tuple[str, bytes, int]] = []
    for s, size in enumerate(SHARD_SIZES):
        samples = []
        for _ in range(size):
            key, data, label = f"s{len(written):04d}", _png(rng), int(rng.integers(0, len(CLASSES)))
            samples.append({"__key__": key, "png": data, "cls": label})
            written.append((key, data, label))
        _write_shard(tmp_path / f"train-{s:06d}.tar", samples)
    classes = tmp_path / "classes.txt"
    classes.write_text("".join(f"{c}\n" for c in CLASSES))
    return str(tmp_path / f"train-{{000000..{len(SHARD_SIZES) - 1:06d}}}.tar"), classes, written


def _positions(loader: ShardLoader) -> list[int]:
    return torch.cat([batch[2] for batch in loader]).tolist()


def test_yields_the_source_pixels_and_labels_in_index_order(shards) -> None:
    pattern, classes, written = shards
    ds = WebDatasetShards(pattern, classes)
    assert ds.classes == CLASSES and len(ds) == len(written) == sum(SHARD_SIZES)
    assert ds.targets.dtype == np.int64 and ds.ids.dtype == np.int64
    assert ds.targets.tolist() == [label for _, _, label in written]
    assert np.array_equal(ds.ids, np.arange(len(ds)))
    assert ds.shard_counts.tolist() == list(SHARD_SIZES)
    items = list(ds)
    assert [position for _, _, position in items] == ds.ids.tolist()
    for (image, label, position), (_, data, source_label) in zip(items, written):
        assert isinstance(image, Image.Image) and image.mode == "RGB"
        assert label == source_label == ds.targets[position]
        assert np.array_equal(np.asarray(image), _decode(data))
    assert [y for _, y, _ in list(ds)] == ds.targets.tolist()  # a second pass, same order


def test_shards_by_glob_directory_or_list_and_classes_as_a_list(shards, tmp_path: Path) -> None:
    pattern, classes, _ = shards
    by_brace = WebDatasetShards(pattern, classes)
    for spec in (str(tmp_path / "train-*.tar"), str(tmp_path), [pattern]):
        ds = WebDatasetShards(spec, CLASSES)
        assert ds.shard_paths == by_brace.shard_paths and ds.targets.tolist() == by_brace.targets.tolist()
    with pytest.raises(DataError, match=r"6 shard file\(s\) not found: .*train-000004.tar"):
        WebDatasetShards(str(tmp_path / "train-{000000..000009}.tar"), classes)
    with pytest.raises(DataError, match="class list file not found"):
        WebDatasetShards(pattern, tmp_path / "nope.txt")
    with pytest.raises(DataError, match="out of range"):
        WebDatasetShards(pattern, CLASSES[:2])  # labels 2 exist
    with pytest.raises(ConfigError, match="no random access"):
        by_brace[0]


def test_two_workers_yield_every_sample_once_per_epoch(shards) -> None:
    pattern, classes, _ = shards
    ds = WebDatasetShards(pattern, classes, transform=pil_to_tensor)
    loader = shard_loader(ds, batch_size=5, num_workers=2, seed=7, device="cpu", drop_last=False)
    for epoch in (0, 1):
        loader.set_epoch(epoch)
        batches = list(loader)
        assert len(batches) == len(loader)
        positions = torch.cat([b[2] for b in batches])
        labels = torch.cat([b[1] for b in batches])
        assert sorted(positions.tolist()) == list(range(len(ds)))
        assert labels.tolist() == ds.targets[positions.numpy()].tolist()
        assert all(b[0].shape[1:] == (3, 6, 5) and b[0].dtype == torch.uint8 for b in batches)
    dropping = shard_loader(ds, batch_size=5, num_workers=2, seed=7, device="cpu", drop_last=True)
    assert len(list(dropping)) == len(dropping)  # each worker drops its own short last batch


def test_order_depends_on_seed_and_epoch_only(shards) -> None:
    pattern, classes, _ = shards
    ds = WebDatasetShards(pattern, classes, transform=pil_to_tensor)
    a = shard_loader(ds, batch_size=4, num_workers=0, seed=1, device="cpu", drop_last=False)
    b = shard_loader(ds, batch_size=4, num_workers=0, seed=1, device="cpu", drop_last=False)
    first = _positions(a)
    assert sorted(first) == list(range(len(ds))) and first != list(range(len(ds)))  # shuffled
    assert _positions(b) == first
    a.set_epoch(1)
    second = _positions(a)
    assert second != first and sorted(second) == sorted(first)
    b.set_epoch(1)
    assert _positions(b) == second
    c = shard_loader(ds, batch_size=4, num_workers=0, seed=2, device="cpu", drop_last=False)
    assert _positions(c) != first
    assert not ds.shuffle and ds.epoch == 0 and [p for _, _, p in ds] == list(range(len(ds)))  # the caller's dataset is untouched
    plain = shard_loader(ds, batch_size=4, num_workers=0, seed=1, device="cpu", shuffle=False, drop_last=False)
    assert _positions(plain) == list(range(len(ds)))


def test_corrupt_image_raises_data_error_naming_shard_and_key(shards, tmp_path: Path) -> None:
    pattern, classes, written = shards
    key, data, label = written[0]
    bad = tmp_path / "bad-000000.tar"
    _write_shard(bad, [{"__key__": "good", "png": written[1][1], "cls": 0},
                       {"__key__": "broken", "png": data[:40], "cls": label}])
    ds = WebDatasetShards(str(bad), classes)  # indexing reads headers and labels only
    assert len(ds) == 2
    with pytest.raises(DataError, match=r"bad-000000\.tar:broken\.png"):
        list(ds)
    loader = shard_loader(ds, batch_size=1, num_workers=1, seed=0, device="cpu", drop_last=False)
    ds.transform = pil_to_tensor
    with pytest.raises(DataError, match=r"bad-000000\.tar:broken"):  # re-raised from the worker as a DataError
        list(loader)


@pytest.mark.parametrize(
    ("sample", "message"),
    [({"__key__": "lonely", "png": b"x"}, r"'lonely'.*no label"),
     ({"__key__": "blind", "cls": 1, "txt": "x"}, r"'blind'.*no image")],
)
def test_sample_without_label_or_image_is_named(tmp_path: Path, sample: dict, message: str) -> None:
    shard = tmp_path / "odd-000000.tar"
    _write_shard(shard, [sample])
    with pytest.raises(DataError, match=message) as info:
        WebDatasetShards(str(shard), CLASSES)
    assert str(shard) in str(info.value)


def test_a_shard_changed_after_indexing_is_reported(shards, tmp_path: Path) -> None:
    pattern, classes, written = shards
    ds = WebDatasetShards(pattern, classes)
    _write_shard(tmp_path / "train-000001.tar", [{"__key__": k, "png": d, "cls": y} for k, d, y in written[10:13]])
    with pytest.raises(DataError, match=r"train-000001\.tar yielded 3 samples but held 8"):
        list(ds)


def test_training_loader_streams_shards(shards) -> None:
    pattern, classes, _ = shards
    ds = WebDatasetShards(pattern, classes, transform=pil_to_tensor)
    loader = training_loader(ds, batch_size=4, seed=0, device=torch.device("cpu"), num_workers=2)
    assert isinstance(loader, ShardLoader)
    loader.set_epoch(0)
    batches = list(loader)
    assert len(batches) == len(loader) > 0
    for images, labels, positions in batches:
        assert images.shape == (4, 3, 6, 5)  # drop_last: full batches only
        assert np.array_equal(ds.targets[positions.numpy()], labels.numpy())
    positions = torch.cat([b[2] for b in batches]).tolist()
    assert len(set(positions)) == len(positions)


def test_data_config_builds_the_shard_dataset(shards, compose) -> None:
    pattern, classes, _ = shards
    cfg = compose(
        "train",
        ["data=webdataset", "data.num_classes=3", f"data.train.shards='{pattern}'", f"data.train.classes={classes}",
         f"data.test.shards='{pattern}'", f"data.test.classes={classes}"],
    )
    ds = build_dataset(cfg.data, "train")
    assert isinstance(ds, WebDatasetShards) and len(ds) == sum(SHARD_SIZES) and ds.classes == CLASSES


def _imagefolder_tar(path: Path) -> dict[str, tuple[bytes, int]]:
    """A tar of ``train/<class>/<name>.png``; returns ``{stem: (bytes, label)}``."""
    rng = np.random.default_rng(1)
    source: dict[str, tuple[bytes, int]] = {}
    with tarfile.open(path, "w") as tf:
        for label, cls in enumerate(CLASSES):
            for i in range(7 + label):
                data, stem = _png(rng), f"{cls}{i}"
                info = tarfile.TarInfo(f"train/{cls}/{stem}.png")
                info.size = len(data)
                tf.addfile(info, io.BytesIO(data))
                source[stem] = (data, label)
    return source


def test_make_shards_round_trips_an_imagefolder_tar(tmp_path: Path, capsys) -> None:
    source = _imagefolder_tar(tmp_path / "train.tar")
    out = tmp_path / "wds"
    assert make_shards_main([str(tmp_path / "train.tar"), str(out), "--maxcount", "7", "--quiet"]) == 0
    assert "wrote 24 samples" in capsys.readouterr().out
    assert (out / "classes.txt").read_text().splitlines() == CLASSES
    shard_files = sorted(out.glob("train-*.tar"))
    assert len(shard_files) == 4  # 24 samples, 7 per shard
    ds = WebDatasetShards(str(out), out / "classes.txt")
    seen: dict[str, tuple[bytes, int]] = {}
    for shard in shard_files:  # the original encoded bytes, never re-encoded
        with tarfile.open(shard) as tf:
            members = {m.name: tf.extractfile(m).read() for m in tf}
        for name, data in members.items():
            if name.endswith(".png"):
                key = name[: -len(".png")]
                seen[key.split("_", 1)[1]] = (data, int(members[f"{key}.cls"]))
    assert seen == source
    stems = []
    for image, label, _ in ds:
        stem = next(s for s, (data, y) in source.items() if y == label and np.array_equal(_decode(data), np.asarray(image)))
        stems.append(stem)
    assert sorted(stems) == sorted(source)
    assert stems != sorted(source, key=lambda s: (source[s][1], s))  # written shuffled by default

    ordered = tmp_path / "ordered"
    assert make_shards_main([str(tmp_path / "train.tar"), str(ordered), "--no-shuffle", "--quiet"]) == 0
    in_order = WebDatasetShards(str(ordered), ordered / "classes.txt")
    expected = sorted(source, key=lambda s: (source[s][1], s))
    assert in_order.targets.tolist() == [source[s][1] for s in expected]
    assert all(np.array_equal(np.asarray(img), _decode(source[s][0])) for (img, _, _), s in zip(in_order, expected))

    assert make_shards_main([str(tmp_path / "train.tar"), str(out), "--quiet"]) == 2  # shards exist: refused
    assert "already holds" in capsys.readouterr().err


def test_make_shards_reads_an_imagefolder_directory(tmp_path: Path, write_image_tree) -> None:
    pixels = write_image_tree(tmp_path / "tree", {"a": ["x.png", "y.png"], "b": ["z.png"]})
    out = tmp_path / "wds"
    assert make_shards_main([str(tmp_path / "tree"), str(out), "--prefix", "val", "--quiet"]) == 0
    ds = WebDatasetShards(str(out / "val-*.tar"), out / "classes.txt")
    assert ds.classes == ["a", "b"] and sorted(ds.targets.tolist()) == [0, 0, 1]
    got = sorted(np.asarray(img).tobytes() for img, _, _ in ds)
    assert got == sorted(p.tobytes() for p in pixels.values())


def test_extraction_with_workers_pairs_each_embedding_with_its_item(shards) -> None:
    from compatembed.data import Preprocessing, build_transform
    from compatembed.embeddings import embed_dataset

    pattern, classes, written = shards
    pre = Preprocessing(input_size=(3, 8, 8), mean=(0.5,) * 3, std=(0.5,) * 3)
    ds = WebDatasetShards(pattern, classes, transform=build_transform(pre, train=False))

    class MeanColour(torch.nn.Module):  # an "embedding" computed from the pixels alone: checkable per item
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x.mean(dim=(2, 3))

    result = embed_dataset(MeanColour(), ds, batch_size=5, num_workers=2, progress=False)
    assert sorted(result.ids.tolist()) == ds.ids.tolist()
    for row, item_id in enumerate(result.ids):
        expected = ds.transform(Image.fromarray(_decode(written[item_id][1]))).mean(dim=(1, 2))
        assert np.allclose(result.embeddings[row], expected.numpy(), atol=1e-5)
        assert result.labels[row] == written[item_id][2]


def test_streamed_shards_refuse_item_selection_when_built(shards, compose) -> None:
    from compatembed.errors import ConfigError

    pattern, classes, _ = shards
    base = ["data=webdataset", "data.num_classes=3", f"data.train.shards='{pattern}'", f"data.train.classes={classes}",
            f"data.test.shards='{pattern}'", f"data.test.classes={classes}"]
    for extra in ("data.classes=0-1", "data.train_per_class=2", "data.validation.fraction=0.1"):
        with pytest.raises(ConfigError, match="cannot select items"):
            build_dataset(compose("train", base + [extra]).data, "train")


def test_ranks_read_disjoint_shards_that_cover_the_epoch(shards) -> None:
    pattern, classes, _ = shards
    ds = WebDatasetShards(pattern, classes, transform=pil_to_tensor)
    for epoch in (0, 1):
        loaders = [shard_loader(ds, batch_size=2, num_workers=0, seed=3, device="cpu", drop_last=False, rank=r, world_size=2)
                   for r in range(2)]
        for loader in loaders:
            loader.set_epoch(epoch)
        read = [_positions(loader) for loader in loaders]
        assert sorted(read[0] + read[1]) == list(range(len(ds)))  # every sample once, by one rank
        shards_of = [loader.dataset.rank_shards() for loader in loaders]
        assert sorted(shards_of[0] + shards_of[1]) == [0, 1, 2, 3]
        assert [len(loader) for loader in loaders] == [-(-len(r) // 2) for r in read]


def test_fewer_shards_than_ranks_is_refused(shards) -> None:
    pattern, classes, _ = shards
    with pytest.raises(ConfigError, match="4 shard\\(s\\) for 5 processes"):
        shard_loader(WebDatasetShards(pattern, classes), batch_size=2, num_workers=0, seed=0, device="cpu", rank=0,
                     world_size=5)


def test_a_part_of_the_shards_keeps_the_ids_of_its_samples(shards) -> None:
    pattern, classes, written = shards
    ds = WebDatasetShards(pattern, classes)
    part = ds.select_shards(1, 3)  # the shards of 8 and 12 samples: items 10-29
    assert len(part) == 20 and part.ids.tolist() == list(range(10, 30)) and part.shard_starts.tolist() == [0, 8]
    items = list(part)
    assert [int(part.ids[p]) for _, _, p in items] == list(range(10, 30))
    for image, label, position in items:
        _, data, source_label = written[int(part.ids[position])]
        assert label == source_label and np.array_equal(np.asarray(image), _decode(data))
    assert len(ds) == 36 and ds.shard_starts.tolist() == [0, 10, 18, 30]  # the whole set is untouched
    with pytest.raises(ConfigError, match="not a non-empty range"):
        ds.select_shards(2, 2)


def test_extraction_parts_of_streamed_shards_are_whole_tar_files(shards) -> None:
    from compatembed.embeddings import shard_of

    pattern, classes, _ = shards
    ds = WebDatasetShards(pattern, classes)
    assert [shard_of(ds, i, 2, batch_size=4)[1:] for i in range(2)] == [(0, 18), (18, 36)]
    with pytest.raises(ConfigError, match="only 4 tar files"):
        shard_of(ds, 0, 5, batch_size=4)
