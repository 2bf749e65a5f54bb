"""Embedding sets in shard parts, read without torch: merged in order, every id once, broken sets named."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from compatembed_index.cli import main
from compatembed_index.embedding_sets import read_embedding_set, shard_dir_name
from compatembed_index.errors import InvalidInputError

from index_helpers import Chain

META = {"version_id": "v1", "dataset": "synthetic", "split": "test", "normalized": True}


def write_set(path: Path, x: np.ndarray, ids: np.ndarray, **meta) -> Path:
    """The files compatembed-extract writes, meta.json last."""
    path.mkdir(parents=True)
    np.save(path / "embeddings.npy", x.astype(np.float32))
    np.save(path / "labels.npy", (ids % 3).astype(np.int64))
    np.save(path / "ids.npy", ids.astype(np.int64))
    (path / "meta.json").write_text(json.dumps({**META, **meta, "count": len(ids), "dim": x.shape[1]}))
    return path


def write_parts(root: Path, x: np.ndarray, ids: np.ndarray, bounds: list[int]) -> list[Path]:
    """``x``/``ids`` cut at ``bounds`` into parts shard-i-of-n, as n extraction processes would write them."""
    n = len(bounds) - 1
    return [write_set(root / shard_dir_name(i, n), x[a:b], ids[a:b], shard=i, num_shards=n, start=a, stop=b, total=len(ids))
            for i, (a, b) in enumerate(zip(bounds, bounds[1:]))]


@pytest.fixture
def gallery() -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    return rng.normal(size=(30, Chain.D1)).astype(np.float32), rng.permutation(1000)[:30]


def test_parts_merge_in_order_into_the_whole_set(tmp_path: Path, gallery) -> None:
    x, ids = gallery
    write_parts(tmp_path / "parts", x, ids, [0, 12, 24, 30])
    merged = read_embedding_set(tmp_path / "parts")
    assert np.array_equal(merged.embeddings, x) and np.array_equal(merged.ids, ids)
    assert merged.meta == {**META, "count": 30, "dim": Chain.D1, "shards": 3}
    whole = read_embedding_set(write_set(tmp_path / "whole", x, ids))
    assert np.array_equal(whole.embeddings, x) and whole.meta["count"] == 30


def test_a_missing_part_is_named_with_the_items_it_held(tmp_path: Path, gallery) -> None:
    x, ids = gallery
    shutil.rmtree(write_parts(tmp_path, x, ids, [0, 12, 24, 30])[1])
    with pytest.raises(InvalidInputError, match=r"missing shard\(s\) shard-1-of-3 of 3: items 12-23 of 30 were not embedded"):
        read_embedding_set(tmp_path)


def test_an_id_in_two_parts_is_named_with_both(tmp_path: Path, gallery) -> None:
    x, ids = gallery
    ids = ids.copy()
    ids[20] = ids[3]
    write_parts(tmp_path, x, ids, [0, 12, 30])
    with pytest.raises(InvalidInputError, match=rf"1 id\(s\) appear more than once: id {ids[3]} in shard-0-of-2, shard-1-of-2"):
        read_embedding_set(tmp_path)


def test_unfinished_mixed_or_disagreeing_parts_are_refused(tmp_path: Path, gallery) -> None:
    x, ids = gallery
    parts = write_parts(tmp_path / "a", x, ids, [0, 15, 30])
    (parts[1] / "meta.json").unlink()
    with pytest.raises(InvalidInputError, match="shard-1-of-2 has no meta.json: its extraction has not finished"):
        read_embedding_set(tmp_path / "a")

    write_parts(tmp_path / "b", x, ids, [0, 15, 30])
    write_parts(tmp_path / "b" / "old", x, ids, [0, 10, 20, 30])
    for part in (tmp_path / "b" / "old").iterdir():
        part.rename(tmp_path / "b" / part.name)
    with pytest.raises(InvalidInputError, match="mixes parts of different shardings"):
        read_embedding_set(tmp_path / "b")

    parts = write_parts(tmp_path / "c", x, ids, [0, 15, 30])
    meta = json.loads((parts[1] / "meta.json").read_text())
    (parts[1] / "meta.json").write_text(json.dumps({**meta, "version_id": "v2"}))
    with pytest.raises(InvalidInputError, match="shard-1-of-2 has version_id='v2' but shard-0-of-2 has 'v1'"):
        read_embedding_set(tmp_path / "c")

    write_parts(tmp_path / "d", x, ids, [0, 15, 30])
    write_set(tmp_path / "d" / "whole", x, ids)
    for f in (tmp_path / "d" / "whole").iterdir():
        f.rename(tmp_path / "d" / f.name)
    with pytest.raises(InvalidInputError, match="both a whole embedding set and shard parts"):
        read_embedding_set(tmp_path / "d")
    with pytest.raises(InvalidInputError, match="holds no extracted embeddings"):
        read_embedding_set(tmp_path / "nothing")


def test_cli_adds_a_sharded_set_directly(tmp_path: Path, gallery, capsys) -> None:
    x, ids = gallery
    chain = Chain(tmp_path / "versions")
    write_parts(tmp_path / "parts", x, ids, [0, 12, 30])
    d = ["--data-dir", str(tmp_path / "data")]
    assert main([*d, "register", str(chain.dirs["v1"])]) == 0
    assert main([*d, "create", "g"]) == 0
    capsys.readouterr()
    assert main([*d, "add", "g", "--version", "v1", "--embeddings", str(tmp_path / "parts")]) == 0
    assert json.loads(capsys.readouterr().out)["add"] == 30
    np.save(tmp_path / "q.npy", x[[5, 20]])
    assert main([*d, "search", "g", "--version", "v1", "--queries", str(tmp_path / "q.npy"), "-k", "1"]) == 0
    assert [r[0]["id"] for r in json.loads(capsys.readouterr().out)["results"]] == [int(ids[5]), int(ids[20])]

    assert main([*d, "add", "g", "--version", "v2", "--embeddings", str(tmp_path / "parts")]) == 2
    assert "was embedded by version 'v1', not --version 'v2'" in capsys.readouterr().err
    assert main([*d, "add", "g", "--version", "v1"]) == 2
    assert "give --vectors and --ids" in capsys.readouterr().err
