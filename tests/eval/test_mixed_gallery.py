"""Mixed-version gallery evaluation through the index service, against a brute-force numpy oracle.

Three hand-written model versions (the contract's manifest + transforms, no weights): v2 prefixes into v1,
v3 maps into v2 with an affine edge (so v3 → v1 composes), and ``solo`` has no edge at all.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from sklearn.metrics import average_precision_score

from compatembed_index.registry import write_version_dir

from compatembed.embeddings import EmbeddingSet
from compatembed.errors import EvalError
from compatembed.eval.matrix import compute_matrix
from compatembed.eval.mixed_gallery import MixedGallery, split_gallery
from compatembed.models.version import ancestor_dirs

G, CLASSES = 48, 4


def write_version(
    root: Path, vid: str, dim: int, edges: list[dict], arrays: dict | None = None, parent: Path | None = None
) -> Path:
    """A model version directory as training writes it for the service (no weights), naming its parent."""
    return write_version_dir(root, vid, dim, edges, arrays, training={"old_version_dir": str(parent) if parent else None})


def _norm(x):
    return x / np.linalg.norm(x, axis=1, keepdims=True)


@pytest.fixture(scope="module")
def chain(tmp_path_factory):
    """Versions v1 (6-d), v2 (8-d, prefix → v1), v3 (10-d, affine → v2), solo (6-d, no edge); embeddings of G items."""
    root = tmp_path_factory.mktemp("versions")
    rng = np.random.default_rng(0)
    labels = np.repeat(np.arange(CLASSES), G // CLASSES)
    centres = rng.normal(size=(CLASSES, 10))
    base = centres[labels] + 0.9 * rng.normal(size=(G, 10))
    w = rng.normal(size=(8, 10)).astype(np.float32)
    b = rng.normal(size=8).astype(np.float32) * 0.1
    v1 = write_version(root, "v1", 6, [])
    v2 = write_version(root, "v2", 8, [{"kind": "prefix", "target": "v1", "dim": 6}], parent=v1)
    v3 = write_version(root, "v3", 10, [{"kind": "affine", "target": "v2", "file": "transforms/a.npz", "normalize_output": True}],
                       {"transforms/a.npz": {"weight": w, "bias": b}}, parent=v2)
    solo = write_version(root, "solo", 6, [])
    ids = np.arange(100, 100 + G)  # not positions: the service must match by id
    emb = {
        "v1": base[:, :6] + 0.3 * rng.normal(size=(G, 6)),
        "v2": np.hstack([base[:, :6], base[:, 6:8]]) + 0.2 * rng.normal(size=(G, 8)),
        "v3": base + 0.1 * rng.normal(size=(G, 10)),
        "solo": rng.normal(size=(G, 6)) + centres[labels][:, :6],
    }
    dirs = {"v1": v1, "v2": v2, "v3": v3, "solo": solo}
    sets = {v: EmbeddingSet(_norm(x).astype(np.float32), labels.copy(), ids.copy(),
                            {"version_id": v, "version_dir": str(dirs[v])}) for v, x in emb.items()}
    return {"dirs": dirs, "sets": sets, "labels": labels, "ids": ids, "affine": (w, b)}


def _to_space(chain, q_version, seg_version, x):
    """Oracle routes: the contract's transforms written out by hand."""
    w, b = chain["affine"]
    x = _norm(x)
    path = {"v3": ["v3", "v2", "v1"], "v2": ["v2", "v1"], "v1": ["v1"], "solo": ["solo"]}[q_version]
    if seg_version not in path:
        return None
    for src in path[: path.index(seg_version)]:
        x = _norm(x @ w.T + b) if src == "v3" else _norm(x[:, :6])
    return x


def oracle(chain, q_version, owner, rows=range(G), calibration=None):
    """Brute force: every query against every item (in its stored version), own item left out.

    ``calibration``: segment version → (scale, shift) applied to that segment's scores.
    """
    sets, labels = chain["sets"], chain["labels"]
    q = sets[q_version].embeddings
    scores = np.full((G, G), -1e9)
    for seg in set(owner):
        mask = np.array([o == seg for o in owner])
        mapped = _to_space(chain, q_version, seg, q)
        if mapped is not None:
            scale, shift = (calibration or {}).get(seg, (1.0, 0.0))
            scores[:, mask] = scale * (mapped @ sets[seg].embeddings[mask].T) + shift
    aps, top1, top5, map_r = [], [], [], []
    for i in rows:
        keep = np.arange(G) != i
        s, rel = scores[i, keep], labels[keep] == labels[i]
        aps.append(average_precision_score(rel, s))
        order = np.argsort(-s, kind="stable")
        top1.append(rel[order[0]])
        top5.append(rel[order[:5]].any())
        r = rel.sum()
        hits = rel[order[:r]]
        map_r.append(np.sum(np.cumsum(hits) * hits / np.arange(1, r + 1)) / r)
    return {"mAP": np.mean(aps), "top1": np.mean(top1), "top5": np.mean(top5), "mAP@R": np.mean(map_r)}


def test_split_gallery_fractions():
    owner = split_gallery(np.arange(10), [0.25, 0.25, 0.5], seed=1)
    assert np.bincount(owner, minlength=3).tolist() == [3, 2, 5]  # largest remainder; ties go to the first
    assert not np.array_equal(owner, split_gallery(np.arange(10), [0.25, 0.25, 0.5], seed=2))
    with pytest.raises(EvalError, match="sum to 1"):
        split_gallery(np.arange(10), [0.5, 0.2])
    with pytest.raises(EvalError, match="non-negative"):
        split_gallery(np.arange(10), [1.5, -0.5])


def test_ancestors_are_found_from_the_newest_version(chain):
    found = {p.name for p in ancestor_dirs([chain["dirs"]["v3"]])}
    assert found == {"v1", "v2", "v3"}


@pytest.mark.parametrize("fractions", [(1 / 3, 1 / 3, 1 / 3), (0.5, 0.0, 0.5), (1.0, 0.0, 0.0)])
def test_mixed_gallery_equals_brute_force_oracle(chain, fractions):
    versions = ["v1", "v2", "v3"]
    owner_idx = split_gallery(chain["ids"], fractions, seed=0)
    owner = [versions[i] for i in owner_idx]
    with MixedGallery([chain["dirs"]["v3"]], {v: chain["sets"][v] for v in versions}, topk=(1, 5), batch_size=16) as g:
        g.load({v: chain["ids"][owner_idx == i] for i, v in enumerate(versions)})
        assert sum(g.composition().values()) == G
        assert g.stored_versions().tolist() == owner  # the index service's account of who holds what
        got = g.evaluate("v3")
    expect = oracle(chain, "v3", owner)
    for metric, value in expect.items():
        assert got[metric] == pytest.approx(value, abs=1e-6), metric
    assert got["num_queries"] == G and got["skipped"] == []
    if fractions[0] > 0:
        assert got["routes"]["v1"] == "query:v3>v2>v1"


def test_unreachable_segment_ranks_last(chain):
    owner_idx = split_gallery(chain["ids"], (0.5, 0.5), seed=3)
    owner = [("v1", "solo")[i] for i in owner_idx]
    sets = {v: chain["sets"][v] for v in ("v1", "solo")}
    with MixedGallery([chain["dirs"]["v1"], chain["dirs"]["solo"]], sets) as g:
        g.load({"v1": chain["ids"][owner_idx == 0], "solo": chain["ids"][owner_idx == 1]})
        got = g.evaluate("solo")
    assert got["skipped"] == ["v1"]
    expect = oracle(chain, "solo", owner)
    for metric, value in expect.items():
        assert got[metric] == pytest.approx(value, abs=1e-6), metric
    with MixedGallery([chain["dirs"]["v1"], chain["dirs"]["solo"]], sets, allow_partial=False) as g:
        g.load({"v1": chain["ids"][owner_idx == 0], "solo": chain["ids"][owner_idx == 1]})
        with pytest.raises(EvalError, match="NoRouteError: no route from version solo"):
            g.evaluate("solo")


def test_single_version_gallery_equals_the_matrix(chain):
    """A gallery all in v1, queried by v3 through the service = the matrix entry C[v3][v1] (eval CLI path)."""
    sets = [chain["sets"][v] for v in ("v1", "v2", "v3")]
    m = compute_matrix(sets, backend="numpy")
    assert m.routes[2][0] == "query: affine+prefix"
    with MixedGallery([chain["dirs"]["v3"]], {s.meta["version_id"]: s for s in sets}) as g:
        for t, q in enumerate(("v1", "v2", "v3")):
            for j, stored in enumerate(("v1", "v2", "v3")[: t + 1]):
                g.load({stored: chain["ids"]})
                got = g.evaluate(q)
                for metric in ("top1", "top5", "mAP", "mAP@R"):
                    assert got[metric] == pytest.approx(m.values[metric][t, j], abs=1e-5), (q, stored, metric)


def test_mismatched_sets_are_refused(chain):
    other = EmbeddingSet(chain["sets"]["v2"].embeddings, chain["labels"], chain["ids"] + 1, {"version_id": "v2"})
    with pytest.raises(EvalError, match="other items"):
        MixedGallery([chain["dirs"]["v2"]], {"v1": chain["sets"]["v1"], "v2": other})
    with pytest.raises(EvalError, match="no model version directory given for version"):
        MixedGallery([chain["dirs"]["v1"]], {"v2": chain["sets"]["v2"]})
    with MixedGallery([chain["dirs"]["v2"]], {"v1": chain["sets"]["v1"]}) as g:
        with pytest.raises(EvalError, match="exactly one version"):
            g.load({"v1": chain["ids"][:-1]})


def test_query_subset_equals_oracle_on_those_queries(chain):
    versions = ["v1", "v3"]
    owner_idx = split_gallery(chain["ids"], (0.5, 0.5), seed=5)
    with MixedGallery([chain["dirs"]["v3"]], {v: chain["sets"][v] for v in versions}, max_queries=12, seed=3) as g:
        g.load({v: chain["ids"][owner_idx == i] for i, v in enumerate(versions)})
        got = g.evaluate("v3")
        rows = g.query_rows
    assert got["num_queries"] == 12 and len(set(rows.tolist())) == 12
    expect = oracle(chain, "v3", [versions[i] for i in owner_idx], rows=rows)
    for metric, value in expect.items():
        assert got[metric] == pytest.approx(value, abs=1e-6), metric
    with pytest.raises(EvalError, match="max_queries"):
        MixedGallery([chain["dirs"]["v3"]], {"v3": chain["sets"]["v3"]}, max_queries=0)


def test_calibrated_merge_equals_oracle_with_moments_fitted_on_held_out_stored_items(chain):
    versions, k = ["v1", "v3"], 3
    owner_idx = split_gallery(chain["ids"], (0.5, 0.5), seed=5)
    owner = np.array([versions[i] for i in owner_idx])
    with MixedGallery([chain["dirs"]["v3"]], {v: chain["sets"][v] for v in versions}, max_queries=12, seed=3) as g:
        g.load({v: chain["ids"][owner_idx == i] for i, v in enumerate(versions)})
        raw = g.evaluate("v3")
        fitted = g.calibrate("v3", k=k, min_items=5)
        got = g.evaluate("v3")
        rows = g.query_rows
        assert g.calibrate("v1", k=k, min_items=5) == {}  # v1 queries reach no other segment
    # oracle: held-out queries = items stored in v3 that are not evaluation queries, own match left out
    held = np.array([i for i in range(G) if owner[i] == "v3" and i not in set(rows.tolist())])
    q = chain["sets"]["v3"].embeddings[held]
    in_v3, in_v1 = np.flatnonzero(owner == "v3"), np.flatnonzero(owner == "v1")
    own = q @ chain["sets"]["v3"].embeddings[in_v3].T
    own[in_v3[None, :] == held[:, None]] = -np.inf
    ref = -np.sort(-own, axis=1)[:, :k]
    cross = -np.sort(-(_to_space(chain, "v3", "v1", q) @ chain["sets"]["v1"].embeddings[in_v1].T), axis=1)[:, :k]
    scale = ref.std() / cross.std()
    shift = ref.mean() - scale * cross.mean()
    assert fitted["v3|v1"] == pytest.approx([scale, shift], rel=1e-4, abs=1e-5)
    expect = oracle(chain, "v3", list(owner), rows=rows, calibration={"v1": (scale, shift)})
    for metric, value in expect.items():
        assert got[metric] == pytest.approx(value, abs=1e-6), metric
    # the calibration really moved the merge (else the oracle check above proves nothing new)
    assert any(got[m] != pytest.approx(raw[m], abs=1e-9) for m in ("mAP", "mAP@R", "top1", "top5"))


def test_stored_versions_follow_upgrades(chain):
    with MixedGallery([chain["dirs"]["v3"]], {v: chain["sets"][v] for v in ("v1", "v3")}) as g:
        with pytest.raises(EvalError, match="not loaded"):
            g.stored_versions()
        g.load({"v1": chain["ids"]})
        moved = chain["ids"][[0, 3, 7]]
        g.upgrade("v3", moved)
        expect = np.where(np.isin(g.ids, moved), "v3", "v1")
        assert g.stored_versions().tolist() == expect.tolist()
        assert g.composition() == {"v1": G - 3, "v3": 3}
