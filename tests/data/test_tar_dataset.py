"""ImageFolderTar: on the shared CIFAR-10 archives (skipped when absent) and on archives written here."""

from __future__ import annotations

import io
import os
import pickle
import tarfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader, Subset

from compatembed.data import ClassSubset, ImageFolderDir, ImageFolderTar, Preprocessing, build_transform
from compatembed.data.tar import _scan_tarfile, _scan_ustar
from compatembed.errors import DataError

CIFAR10_CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


# --- shared CIFAR-10 archives -------------------------------------------------------------------


def test_cifar_sizes_and_classes(cifar_train: ImageFolderTar, cifar_test: ImageFolderTar) -> None:
    assert len(cifar_train) == 50_000 and len(cifar_test) == 10_000
    assert cifar_train.classes == CIFAR10_CLASSES and cifar_test.classes == CIFAR10_CLASSES
    assert np.bincount(cifar_train.targets).tolist() == [5000] * 10
    assert np.bincount(cifar_test.targets).tolist() == [1000] * 10
    for ds in (cifar_train, cifar_test):
        assert ds.targets.dtype == np.int64 and ds.targets.shape == (len(ds),)
        assert ds.ids.dtype == np.int64 and np.array_equal(ds.ids, np.arange(len(ds)))


def test_cifar_indexing_is_fast(cifar_train_indexed: tuple[ImageFolderTar, float]) -> None:
    # A few seconds at most; the bound is loose because the test machine's CPUs are shared.
    assert cifar_train_indexed[1] < 10.0


def test_cifar_labels_match_member_paths(cifar_train: ImageFolderTar, cifar_test: ImageFolderTar) -> None:
    for ds, split in ((cifar_train, "train"), (cifar_test, "test")):
        parts = [m.split("/") for m in ds.members]
        assert all(p[0] == split and len(p) == 3 for p in parts)
        assert [CIFAR10_CLASSES.index(p[1]) for p in parts] == ds.targets.tolist()
        # Sorted split: class-major, then file name.
        assert ds.members == sorted(ds.members, key=lambda m: (CIFAR10_CLASSES.index(m.split("/")[1]), m))


def test_cifar_fast_index_matches_tarfile(cifar_tar_dir: Path) -> None:
    path = cifar_tar_dir / "test.tar"
    fast = _scan_ustar(path)
    assert fast is not None, "the shared archive should take the fast path"
    assert fast == _scan_tarfile(path)


def test_cifar_bytes_and_pixels_match_tarfile(cifar_test: ImageFolderTar) -> None:
    rng = np.random.default_rng(0)
    picks = rng.choice(len(cifar_test), size=12, replace=False)
    with tarfile.open(cifar_test.path) as tf:
        for i in picks:
            member = cifar_test.members[i]
            expected = tf.extractfile(member).read()
            assert cifar_test.read_bytes(int(i)) == expected
            img, label = cifar_test[int(i)]
            assert isinstance(img, Image.Image) and img.mode == "RGB" and img.size == (32, 32)
            assert label == CIFAR10_CLASSES.index(member.split("/")[1])
            ref = np.asarray(Image.open(io.BytesIO(expected)).convert("RGB"))
            assert np.array_equal(np.asarray(img), ref)


def test_cifar_transform_output(cifar_test: ImageFolderTar) -> None:
    pre = Preprocessing(input_size=(3, 32, 32), mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225))
    ds = ImageFolderTar(cifar_test.path, transform=build_transform(pre, train=False))
    x, y = ds[1234]
    assert x.shape == (3, 32, 32) and x.dtype == torch.float32 and y == int(cifar_test.targets[1234])


def test_cifar_subset_0_to_4_keeps_labels(cifar_train: ImageFolderTar) -> None:
    sub = ClassSubset(cifar_train, "0-4")
    assert len(sub) == 25_000
    assert sub.selected_classes == [0, 1, 2, 3, 4] and sub.classes == CIFAR10_CLASSES
    assert set(np.unique(sub.targets).tolist()) == {0, 1, 2, 3, 4}
    assert np.array_equal(sub.ids, np.flatnonzero(cifar_train.targets < 5))
    for i in (0, 9_999, 24_999):
        _, label = sub[i]
        assert label == sub.targets[i] == cifar_train.targets[sub.ids[i]]


def _batches(loader: DataLoader) -> tuple[torch.Tensor, torch.Tensor]:
    xs, ys = zip(*loader, strict=True)
    return torch.cat(xs), torch.cat(ys)


def test_cifar_dataloader_fork_workers(cifar_test: ImageFolderTar) -> None:
    pre = Preprocessing(input_size=(3, 32, 32), mean=(0.5,) * 3, std=(0.5,) * 3)
    ds = ImageFolderTar(cifar_test.path, transform=build_transform(pre, train=False))
    sub = Subset(ClassSubset(ds, [3, 7]), list(range(0, 2000, 25)))  # 80 items of two classes
    expected = torch.stack([sub[i][0] for i in range(len(sub))])  # opens the handle in this process
    assert ds._pid == os.getpid()
    ctx = "fork" if "fork" in torch.multiprocessing.get_all_start_methods() else None
    loader = DataLoader(sub, batch_size=16, num_workers=2, multiprocessing_context=ctx)
    x, y = _batches(loader)
    assert torch.equal(x, expected)
    assert set(y.tolist()) == {3, 7}


@pytest.mark.slow  # ~10 s: the spawned worker imports torch afresh
def test_cifar_dataloader_spawn_worker(cifar_test: ImageFolderTar) -> None:
    sub = Subset(ImageFolderTar(cifar_test.path, transform=np.asarray), list(range(0, 10_000, 500)))
    expected = np.stack([sub[i][0] for i in range(len(sub))])
    loader = DataLoader(sub, batch_size=5, num_workers=1, multiprocessing_context="spawn")
    x, _ = _batches(loader)
    assert np.array_equal(x.numpy(), expected)


def test_cifar_pickles(cifar_test: ImageFolderTar) -> None:
    ds = ImageFolderTar(cifar_test.path)
    first = ds.read_bytes(17)  # handle open
    state = ds.__getstate__()
    assert state["_fh"] is None and state["_lock"] is None
    clone = pickle.loads(pickle.dumps(ds))
    assert clone.read_bytes(17) == first
    assert clone.classes == ds.classes and np.array_equal(clone.targets, ds.targets)
    ds.close()
    clone.close()


# --- archives written here ----------------------------------------------------------------------


def _png(seed: int) -> tuple[bytes, np.ndarray]:
    arr = np.random.default_rng(seed).integers(0, 256, size=(5, 7, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue(), arr


def _write_tar(path: Path, members: dict[str, bytes], fmt: int = tarfile.USTAR_FORMAT, mode: str = "w") -> Path:
    with tarfile.open(path, mode, format=fmt) as tf:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    return path


@pytest.mark.parametrize("fmt", [tarfile.USTAR_FORMAT, tarfile.GNU_FORMAT, tarfile.PAX_FORMAT])
def test_tar_matches_directory_reader(tmp_path: Path, write_image_tree: Callable, fmt: int) -> None:
    layout = {"dog": ["b.png", "a.png", "c.jpg"], "cat": ["z.png"], "emu": ["e.png"]}
    pixels = write_image_tree(tmp_path / "tree", layout)
    with tarfile.open(tmp_path / "t.tar", "w", format=fmt) as tf:
        tf.add(tmp_path / "tree", arcname="train")
    ds_tar, ds_dir = ImageFolderTar(tmp_path / "t.tar"), ImageFolderDir(tmp_path / "tree")
    fast = _scan_ustar(ds_tar.path)
    assert fast is not None and fast == _scan_tarfile(ds_tar.path)
    assert ds_tar.classes == ds_dir.classes == ["cat", "dog", "emu"]
    assert ds_tar.targets.tolist() == ds_dir.targets.tolist() == [0, 1, 1, 1, 2]
    assert ds_tar.members == [
        "train/cat/z.png",
        "train/dog/a.png",
        "train/dog/b.png",
        "train/dog/c.jpg",
        "train/emu/e.png",
    ]
    for i, member in enumerate(ds_tar.members):
        (img_t, y_t), (img_d, y_d) = ds_tar[i], ds_dir[i]
        assert y_t == y_d
        assert np.array_equal(np.asarray(img_t), np.asarray(img_d))
        if member.endswith(".png"):  # lossless: the very pixels written
            assert np.array_equal(np.asarray(img_t), pixels[member.split("/", 1)[1]])


def test_tar_class_is_last_directory_and_non_images_are_skipped(tmp_path: Path) -> None:
    (a, pa), (b, pb), (c, pc) = _png(1), _png(2), _png(3)
    tar = _write_tar(
        tmp_path / "t.tar",
        {
            "deep/er/split/emu/x.png": a,
            "deep/er/split/cat/y.png": b,
            "other/cat/w.png": c,  # same class from another prefix
            "README.png": a,  # no class folder
            "deep/er/split/cat/notes.txt": b"text",
            "deep/er/split/cat/._y.png": b"resource fork",
            "deep/.cache/dog/q.png": a,  # inside a hidden folder
        },
    )
    ds = ImageFolderTar(tar)
    assert ds.classes == ["cat", "emu"]
    assert ds.members == ["deep/er/split/cat/y.png", "other/cat/w.png", "deep/er/split/emu/x.png"]
    assert ds.targets.tolist() == [0, 0, 1]
    assert [np.asarray(ds[i][0]).tolist() for i in range(3)] == [pb.tolist(), pc.tolist(), pa.tolist()]


def test_tar_long_names(tmp_path: Path) -> None:
    data, arr = _png(0)
    long_class = "c" * 120
    members = {f"train/{long_class}/img.png": data, "train/short/" + "i" * 150 + ".png": data}
    # ustar splits names into prefix + name, pax and GNU add extension headers: all read by the fast scan.
    for fmt in (tarfile.USTAR_FORMAT, tarfile.PAX_FORMAT, tarfile.GNU_FORMAT):
        if fmt == tarfile.USTAR_FORMAT:
            members_fmt = {f"train/{long_class}/img.png": data, "train/short/img.png": data}
        else:
            members_fmt = members
        path = _write_tar(tmp_path / f"{fmt}.tar", members_fmt, fmt)
        fast = _scan_ustar(path)
        assert fast is not None and fast == _scan_tarfile(path)
        ds = ImageFolderTar(path)
        assert ds.classes == [long_class, "short"]
        assert np.array_equal(np.asarray(ds[0][0]), arr) and np.array_equal(np.asarray(ds[1][0]), arr)


def _to_v7(path: Path) -> None:
    """Rewrite a one-member ustar archive's header as a pre-POSIX (V7) one: no magic, checksum fixed."""
    raw = bytearray(path.read_bytes())
    raw[257:265] = bytes(8)
    raw[148:156] = b" " * 8
    raw[148:156] = b"%06o\x00 " % sum(raw[:512])
    path.write_bytes(bytes(raw))


def test_tar_falls_back_to_tarfile(tmp_path: Path) -> None:
    data, arr = _png(0)
    path = _write_tar(tmp_path / "v7.tar", {"train/cat/a.png": data})
    _to_v7(path)
    assert _scan_ustar(path) is None  # a header the fast scan does not parse
    ds = ImageFolderTar(path)
    assert ds.classes == ["cat"] and ds.members == ["train/cat/a.png"]
    assert np.array_equal(np.asarray(ds[0][0]), arr)


def test_tar_errors(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"dataset path not found: .*missing\.tar"):
        ImageFolderTar(tmp_path / "missing.tar")
    gz = _write_tar(tmp_path / "t.tar.gz", {"train/cat/a.png": _png(0)[0]}, mode="w:gz")
    with pytest.raises(DataError, match=r"not a plain .*t\.tar\.gz"):
        ImageFolderTar(gz)
    junk = tmp_path / "junk.tar"
    junk.write_bytes(b"this is not a tar archive at all" * 40)
    with pytest.raises(DataError, match=r"junk\.tar"):
        ImageFolderTar(junk)
    empty = _write_tar(tmp_path / "empty.tar", {"train/cat/a.txt": b"x", "b.png": b"y"})
    with pytest.raises(DataError, match=r"no images in class folders inside .*empty\.tar"):
        ImageFolderTar(empty)


def test_tar_reopens_handle_in_another_process(tmp_path: Path) -> None:
    data, _ = _png(0)
    ds = ImageFolderTar(_write_tar(tmp_path / "t.tar", {"train/cat/a.png": data}))
    assert ds.read_bytes(0) == data
    inherited = ds._fh
    ds._pid = -1  # what a forked worker sees: a handle opened by another pid
    assert ds.read_bytes(0) == data
    assert ds._fh is not inherited and ds._pid == os.getpid()
    inherited.close()
    ds.close()
