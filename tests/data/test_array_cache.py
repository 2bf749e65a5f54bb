"""The decoded-array cache: pixel-exact against the source, rebuilt when the source changes, safe to share."""

from __future__ import annotations

import io
import os
import tarfile
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from compatembed.data import ClassSubset, ImageFolderDir, ImageFolderTar, SyntheticImages
from compatembed.data.array_cache import ArrayImages, array_view, decode_to_array
from compatembed.errors import DataError


def _encode(arr: np.ndarray, fmt: str) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format=fmt, **({"quality": 75} if fmt == "JPEG" else {}))
    return buf.getvalue()


def _write_tar(path: Path, images: dict[str, bytes]) -> None:
    with tarfile.open(path, "w") as tar:
        for name, data in images.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def _images(seed: int, n_per_class: int = 4, size: tuple[int, int] = (12, 10)) -> dict[str, bytes]:
    rng = np.random.default_rng(seed)
    out = {}
    for cls in ("cat", "dog", "emu"):
        for i in range(n_per_class):
            fmt = "JPEG" if i % 2 else "PNG"  # lossy and lossless: both must come back as the decoder gives them
            arr = rng.integers(0, 256, size=(*size, 3), dtype=np.uint8)
            out[f"train/{cls}/{i:03d}.{'jpg' if fmt == 'JPEG' else 'png'}"] = _encode(arr, fmt)
    return out


def _decoded(dataset) -> np.ndarray:
    return np.stack([np.asarray(dataset[i][0]) for i in range(len(dataset))])


def test_tar_cache_is_pixel_exact_and_keeps_labels_and_ids(tmp_path: Path) -> None:
    _write_tar(tmp_path / "train.tar", _images(0))
    source = ImageFolderTar(tmp_path / "train.tar")
    arrays = decode_to_array(source, tmp_path / "cache", progress=False)
    assert isinstance(arrays, ArrayImages) and len(arrays) == len(source) == 12
    np.testing.assert_array_equal(np.asarray(arrays.pixels), _decoded(source))
    assert arrays.pixels.dtype == np.uint8 and arrays.pixels.shape == (12, 12, 10, 3)
    np.testing.assert_array_equal(arrays.targets, source.targets)
    np.testing.assert_array_equal(arrays.ids, source.ids)
    assert arrays.classes == source.classes
    # the per-image path of the cached dataset gives the same PIL image the source gives
    assert np.array_equal(np.asarray(arrays[5][0]), np.asarray(source[5][0])) and arrays[5][1] == source[5][1]


def test_folder_cache_is_pixel_exact(tmp_path: Path) -> None:
    for name, data in _images(1).items():
        path = tmp_path / "tree" / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
    source = ImageFolderDir(tmp_path / "tree" / "train")
    arrays = decode_to_array(source, tmp_path / "cache", progress=False)
    np.testing.assert_array_equal(np.asarray(arrays.pixels), _decoded(source))


def test_in_memory_sources_are_wrapped_without_a_copy(tmp_path: Path) -> None:
    source = SyntheticImages(num_classes=3, per_class=4, image_size=8)
    arrays = decode_to_array(source, None)
    assert arrays.pixels is source.data and not (tmp_path / "arrays").exists()


def test_second_call_reads_the_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _write_tar(tmp_path / "train.tar", _images(0))
    source = ImageFolderTar(tmp_path / "train.tar")
    first = decode_to_array(source, tmp_path / "cache", progress=False)
    monkeypatch.setattr(ImageFolderTar, "__getitem__", lambda *a: pytest.fail("decoded again"))
    second = decode_to_array(source, tmp_path / "cache", progress=False)
    assert isinstance(second.pixels, np.memmap) and second.source == first.source
    np.testing.assert_array_equal(np.asarray(second.pixels), np.asarray(first.pixels))


def test_cache_is_rebuilt_when_the_source_changes(tmp_path: Path) -> None:
    tar = tmp_path / "train.tar"
    _write_tar(tar, _images(0))
    before = decode_to_array(ImageFolderTar(tar), tmp_path / "cache", progress=False)
    _write_tar(tar, _images(7))  # same names, other pixels
    os.utime(tar, ns=(tar.stat().st_atime_ns, tar.stat().st_mtime_ns + 10**9))  # even within one mtime tick
    source = ImageFolderTar(tar)
    after = decode_to_array(source, tmp_path / "cache", progress=False)
    assert after.source != before.source
    np.testing.assert_array_equal(np.asarray(after.pixels), _decoded(source))
    assert not np.array_equal(np.asarray(after.pixels), np.asarray(before.pixels))
    # the stale cache of the same source is gone; a map opened on it stays readable (POSIX)
    assert [p.name for p in (tmp_path / "cache" / "arrays").iterdir()] == [Path(after.source).name]
    assert np.asarray(before.pixels).shape == (12, 12, 10, 3)


def test_corrupt_cache_is_rebuilt(tmp_path: Path) -> None:
    _write_tar(tmp_path / "train.tar", _images(0))
    source = ImageFolderTar(tmp_path / "train.tar")
    first = decode_to_array(source, tmp_path / "cache", progress=False)
    (Path(first.source) / "pixels.npy").write_bytes(b"not an array")
    again = decode_to_array(source, tmp_path / "cache", progress=False)
    np.testing.assert_array_equal(np.asarray(again.pixels), _decoded(source))


def _build_in_subprocess(args: tuple[str, str]) -> np.ndarray:
    tar, cache = args
    return np.asarray(decode_to_array(ImageFolderTar(tar), cache, progress=False).pixels).copy()


def test_concurrent_builders_and_readers_agree(tmp_path: Path) -> None:
    _write_tar(tmp_path / "train.tar", _images(3, n_per_class=40))
    args = (str(tmp_path / "train.tar"), str(tmp_path / "cache"))
    with ProcessPoolExecutor(max_workers=3) as pool:  # three processes race to build the same cache
        results = list(pool.map(_build_in_subprocess, [args] * 3))
    expected = _decoded(ImageFolderTar(tmp_path / "train.tar"))
    for pixels in results:
        np.testing.assert_array_equal(pixels, expected)
    entries = list((tmp_path / "cache" / "arrays").iterdir())
    assert len(entries) == 1 and not entries[0].name.startswith(".")  # one complete cache, no temp folder left


def test_truncated_image_names_its_file(tmp_path: Path) -> None:
    images = _images(0)
    name = "train/dog/001.jpg"
    images[name] = images[name][: len(images[name]) // 2]
    _write_tar(tmp_path / "train.tar", images)
    source = ImageFolderTar(tmp_path / "train.tar")
    bad = source.members.index(name)
    with pytest.raises(DataError, match="dog/001.jpg"):
        source[bad]  # the streaming path
    with pytest.raises(DataError, match="dog/001.jpg"):
        decode_to_array(source, tmp_path / "cache", progress=False)
    assert not any((tmp_path / "cache" / "arrays").iterdir())  # nothing half-written is left for later reads


def test_malformed_file_in_a_folder_names_it(tmp_path: Path) -> None:
    (tmp_path / "tree" / "cat").mkdir(parents=True)
    (tmp_path / "tree" / "cat" / "a.png").write_bytes(_encode(np.zeros((4, 4, 3), np.uint8), "PNG"))
    (tmp_path / "tree" / "cat" / "b.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    source = ImageFolderDir(tmp_path / "tree")
    with pytest.raises(DataError, match="b.png"):
        decode_to_array(source, tmp_path / "cache", progress=False)


def test_images_of_different_sizes_are_refused_with_the_file(tmp_path: Path) -> None:
    images = _images(0)
    images["train/emu/000.png"] = _encode(np.zeros((5, 5, 3), np.uint8), "PNG")
    _write_tar(tmp_path / "train.tar", images)
    with pytest.raises(DataError, match="emu/000.png.*data.pipeline=stream"):
        decode_to_array(ImageFolderTar(tmp_path / "train.tar"), tmp_path / "cache", progress=False)


def test_array_view_sees_through_class_subsets() -> None:
    arrays = decode_to_array(SyntheticImages(num_classes=4, per_class=5, image_size=8), None)
    subset = ClassSubset(arrays, [1, 3], per_class=2)
    view, positions = array_view(subset)
    assert view is arrays and positions.tolist() == [5, 6, 15, 16]
    assert array_view(ClassSubset(SyntheticImages(num_classes=2, per_class=2, image_size=8), None)) is None
