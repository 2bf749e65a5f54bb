"""route_pair with a forward edge that reads side information (FCT's ψ): the oracle, and its refusals."""

from __future__ import annotations

import numpy as np
import pytest

from compatembed_index.registry import write_version_dir

from compatembed.embeddings import EmbeddingSet
from compatembed.errors import EvalError
from compatembed.eval.pairs import route_pair

N = 12


def _unit(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=1, keepdims=True)


@pytest.fixture
def versions(tmp_path):
    """old (4-d); new (5-d) whose forward map reads concat(old, ψ) with ψ of version psi (3-d); their sets."""
    rng = np.random.default_rng(0)
    w0, b0 = rng.normal(size=(6, 7)), rng.normal(size=6)
    w1, b1 = rng.normal(size=(5, 6)), rng.normal(size=5)
    old = write_version_dir(tmp_path, "old", 4, [])
    edge = {"kind": "forward", "source": "old", "file": "transforms/f.npz", "activation": "relu", "normalize_output": True,
            "side_input": {"version": "psi", "dim": 3}}
    new = write_version_dir(tmp_path, "new", 5, [edge], {"transforms/f.npz": {"w0": w0, "b0": b0, "w1": w1, "b1": b1}},
                            training={"old_version_dir": str(old)})
    ids = np.arange(100, 100 + N)
    labels = np.arange(N) % 3

    def embedding_set(version: str, dim: int, order: np.ndarray, directory=None) -> EmbeddingSet:
        meta = {"version_id": version, **({"version_dir": str(directory)} if directory else {})}
        return EmbeddingSet(_unit(rng.normal(size=(N, dim))).astype(np.float32), labels[order], ids[order], meta)

    sets = {"new": embedding_set("new", 5, np.arange(N), new), "old": embedding_set("old", 4, np.arange(N), old),
            "psi": embedding_set("psi", 3, np.arange(N)[::-1])}  # ψ in another item order: matched by id
    return sets, (w0, b0, w1, b1)


def test_the_gallery_is_upgraded_from_both_vectors_of_each_item(versions):
    sets, (w0, b0, w1, b1) = versions
    queries, upgraded, taken = route_pair(sets["new"], sets["old"], side=sets["psi"])
    assert taken == "gallery: forward+side"
    psi_by_id = dict(zip(sets["psi"].ids.tolist(), sets["psi"].embeddings))
    psi = np.stack([psi_by_id[i] for i in sets["old"].ids.tolist()])
    h = np.maximum(np.hstack([sets["old"].embeddings, psi]) @ w0.T + b0, 0) @ w1.T + b1
    np.testing.assert_allclose(upgraded, _unit(h), atol=1e-5)
    np.testing.assert_array_equal(queries, sets["new"].embeddings)
    assert route_pair(sets["new"], sets["old"], route="raw")[2] == "none (raw)"  # raw never routes


def test_side_information_that_is_missing_foreign_or_incomplete_is_refused(versions):
    sets, _ = versions
    with pytest.raises(EvalError, match="side information from version 'psi'"):
        route_pair(sets["new"], sets["old"])
    with pytest.raises(EvalError, match="must come from version 'psi', got 'old'"):
        route_pair(sets["new"], sets["old"], side=sets["old"])
    psi = sets["psi"]
    partial = EmbeddingSet(psi.embeddings[:-2], psi.labels[:-2], psi.ids[:-2], psi.meta)
    with pytest.raises(EvalError, match="lacks 2 gallery items"):
        route_pair(sets["new"], sets["old"], side=partial)
