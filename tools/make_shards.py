"""Write an ImageFolder dataset (a directory or a tar archive) as WebDataset shards for streaming.

Each sample is ``<key>.<ext>``, the image's original encoded bytes (never re-encoded, so pixels are
exactly those of the source), and ``<key>.cls``, its label as text; ``classes.txt`` next to the shards
lists the class names in label order (the source's sorted class folders). Keys are
``<8-digit sample number>_<source file stem>``, so an error naming a key leads back to the file.

Samples are written in a shuffled order by default (``--seed``): a streaming reader only shuffles
within a buffer of about a thousand samples, and shards written class by class would give batches
of one or two classes. ``--no-shuffle`` keeps the source order (class by class).

    python -m tools.make_shards /data/imagenet/train /data/imagenet-wds --prefix train
    python -m tools.make_shards /data/cifar10-jpeg/test.tar /data/cifar10-wds --prefix test --maxcount 5000

Then point ``conf/data/webdataset.yaml`` at them:

    data=webdataset data.num_classes=1000 \\
      data.train.shards='/data/imagenet-wds/train-{000000..000127}.tar' \\
      data.train.classes=/data/imagenet-wds/classes.txt ...

The shard pattern to use is printed at the end, after the written shards were read back and counted.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
from pathlib import Path

import numpy as np
import webdataset as wds
from tqdm.auto import tqdm

from compatembed.data import ImageFolderDir, ImageFolderTar
from compatembed.data.shards import WebDatasetShards, read_classes
from compatembed.errors import CompatEmbedError, DataError

_UNSAFE = re.compile(r"[^A-Za-z0-9_-]+")


def _source(path: Path) -> ImageFolderDir | ImageFolderTar:
    """The ImageFolder dataset at ``path``: a directory, or a plain tar archive read in place."""
    if path.is_dir():
        return ImageFolderDir(path)
    if path.is_file():
        return ImageFolderTar(path)
    raise DataError(f"source not found: {path} (an ImageFolder directory or a .tar of one)")


def _item(source: ImageFolderDir | ImageFolderTar, index: int) -> tuple[str, bytes]:
    """``(file name, encoded bytes)`` of one source item, as stored."""
    if isinstance(source, ImageFolderTar):
        return source.members[index], source.read_bytes(index)
    path = source.samples[index][0]
    try:
        return path, Path(path).read_bytes()
    except OSError as e:
        raise DataError(f"cannot read {path}: {e}") from None


def _key(number: int, name: str) -> str:
    """A sample key webdataset splits correctly: no dots or slashes (its suffix starts at the first dot)."""
    stem = os.path.basename(name).split(".", 1)[0]
    return f"{number:08d}_{_UNSAFE.sub('_', stem)[:64]}"


def make_shards(
    source_path: Path,
    out_dir: Path,
    *,
    prefix: str = "train",
    maxcount: int = 10_000,
    maxsize: float = 1e9,
    shuffle: bool = True,
    seed: int = 0,
    progress: bool = True,
) -> tuple[str, int]:
    """Write ``source_path``'s images to ``out_dir/<prefix>-NNNNNN.tar`` and ``out_dir/classes.txt``.

    Returns:
        The brace pattern naming the written shards, and the number of samples written.

    Raises:
        DataError: The source cannot be read, ``out_dir`` already holds shards with this prefix, or
            the shards read back hold another number of samples or other labels than written.
    """
    if maxcount <= 0 or maxsize <= 0:
        raise DataError(f"--maxcount and --maxsize must be positive, got {maxcount} and {maxsize}")
    source = _source(source_path)
    out_dir.mkdir(parents=True, exist_ok=True)
    existing = sorted(out_dir.glob(f"{prefix}-*.tar"))
    if existing:
        raise DataError(f"{out_dir} already holds {len(existing)} {prefix}-*.tar shard(s); remove them or pick another --prefix")
    classes_file = out_dir / "classes.txt"
    if classes_file.is_file() and read_classes(classes_file) != list(source.classes):
        raise DataError(f"{classes_file} lists other classes than {source_path}; write these shards to another directory")
    order = np.arange(len(source))
    if shuffle:
        order = np.random.default_rng(seed).permutation(len(source))
    written: list[int] = []
    with wds.ShardWriter(str(out_dir / f"{prefix}-%06d.tar"), maxcount=maxcount, maxsize=maxsize, verbose=0) as sink:
        for number, index in enumerate(tqdm(order, desc=f"shards {prefix}", unit="img", disable=not progress)):
            name, data = _item(source, int(index))
            label = int(source.targets[index])
            ext = os.path.splitext(name)[1][1:].lower()
            sink.write({"__key__": _key(number, name), ext: data, "cls": label})
            written.append(label)
        shard_count = sink.shard
    classes_file.write_text("".join(f"{c}\n" for c in source.classes), encoding="utf-8")
    pattern = str(out_dir / f"{prefix}-{{{0:06d}..{shard_count - 1:06d}}}.tar")
    check = WebDatasetShards(pattern, classes_file)  # reads the headers and labels back
    if len(check) != len(source) or check.targets.tolist() != written:
        raise DataError(f"shards {pattern} read back {len(check)} samples, {len(source)} written (or labels differ)")
    return pattern, len(check)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m tools.make_shards", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("source", type=Path, help="an ImageFolder directory (<class>/<image>) or a plain .tar of one")
    parser.add_argument("out_dir", type=Path, help="where the shards and classes.txt are written (created if missing)")
    parser.add_argument("--prefix", default="train", help="shard file prefix: <prefix>-000000.tar, ... (default: train)")
    parser.add_argument("--maxcount", type=int, default=10_000, help="samples per shard at most (default: 10000)")
    parser.add_argument("--maxsize", type=float, default=1e9, help="bytes per shard at most (default: 1e9)")
    parser.add_argument("--seed", type=int, default=0, help="seeds the shuffled sample order (default: 0)")
    parser.add_argument("--no-shuffle", action="store_true", help="keep the source order (class by class) instead of shuffling")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)
    try:
        pattern, count = make_shards(
            args.source,
            args.out_dir,
            prefix=args.prefix,
            maxcount=args.maxcount,
            maxsize=args.maxsize,
            shuffle=not args.no_shuffle,
            seed=args.seed,
            progress=not args.quiet,
        )
    except CompatEmbedError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {count} samples: {pattern}")
    print(f"classes: {args.out_dir / 'classes.txt'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
