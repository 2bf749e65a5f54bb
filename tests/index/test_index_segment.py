"""FAISS segments: factory strings, 64-bit ids, training on arrival, removal, persistence."""

from __future__ import annotations

import numpy as np
import pytest

from compatembed_index.errors import ConfigError
from compatembed_index.segment import Segment

from index_helpers import normalize


def _data(n=600, d=16, seed=0):
    rng = np.random.default_rng(seed)
    return (rng.integers(0, 2**62, size=n, dtype=np.int64), normalize(rng.normal(size=(n, d))).astype(np.float32))


def _exact(q, x, ids, k):
    s = q @ x.T
    o = np.argsort(-s, axis=1)[:, :k]
    return ids[o], np.take_along_axis(s, o, 1)


@pytest.mark.parametrize("factory", ["Flat", "IDMap2,Flat", "HNSW16", "IVF8,Flat", "SQ8"])
def test_self_search_returns_64bit_ids(factory):
    ids, x = _data()
    seg = Segment(16, factory, "ip", train_size=300, search_params="nprobe=8" if "IVF" in factory else "")
    seg.add(ids, x)
    assert seg.ntotal == len(ids) and seg.trained
    _, got = seg.search(x[:50], 1)
    assert (got[:, 0] == ids[:50]).mean() >= 0.95
    assert sorted(seg.ids().tolist()) == sorted(ids.tolist())


def test_untrained_index_is_exact_until_trained():
    ids, x = _data(n=400)
    seg = Segment(16, "IVF16,Flat", "ip", train_size=300)
    seg.add(ids[:200], x[:200])
    assert not seg.trained
    q = x[200:210]
    s, i = seg.search(q, 5)
    ri, rs = _exact(q, x[:200], ids[:200], 5)
    np.testing.assert_array_equal(i, ri)
    np.testing.assert_allclose(s, rs, atol=1e-5)
    seg.add(ids[200:], x[200:])
    assert seg.trained and seg.ntotal == 400


def test_ivf_with_full_probe_equals_exact():
    ids, x = _data(n=800)
    seg = Segment(16, "IVF8,Flat", "ip", train_size=400, search_params="nprobe=8")
    seg.add(ids, x)
    q = normalize(np.random.default_rng(5).normal(size=(20, 16))).astype(np.float32)
    s, i = seg.search(q, 10)
    ri, rs = _exact(q, x, ids, 10)
    np.testing.assert_allclose(s, rs, atol=1e-5)


def test_l2_scores_are_negative_squared_distances():
    ids, x = _data(n=50)
    x = x * 3
    seg = Segment(16, "Flat", "l2")
    seg.add(ids, x)
    q = x[:3] + 0.1
    s, i = seg.search(q, 4)
    d2 = ((q[:, None, :] - x[None]) ** 2).sum(-1)
    o = np.argsort(d2, axis=1)[:, :4]
    np.testing.assert_array_equal(i, ids[o])
    np.testing.assert_allclose(s, -np.take_along_axis(d2, o, 1), rtol=1e-4)


def test_k_larger_than_segment_pads_with_minus_one():
    ids, x = _data(n=3)
    seg = Segment(16, "Flat", "ip")
    seg.add(ids, x)
    s, i = seg.search(x[:1], 5)
    assert (i[0, 3:] == -1).all() and np.isneginf(s[0, 3:]).all()


def test_remove_and_hnsw_refuses_removal():
    ids, x = _data(n=100)
    flat = Segment(16, "Flat", "ip")
    flat.add(ids, x)
    assert flat.remove(ids[:10]) == 10 and flat.ntotal == 90
    hnsw = Segment(16, "HNSW8", "ip")
    hnsw.add(ids, x)
    assert not hnsw.supports_remove
    with pytest.raises(RuntimeError, match="rebuild"):
        hnsw.remove(ids[:1])
    hnsw.rebuild(ids[10:], x[10:])
    assert hnsw.ntotal == 90 and ids[0] not in hnsw.ids()


@pytest.mark.parametrize(("factory", "trained_at"), [("Flat", 0), ("IVF4,Flat", 200), ("HNSW8", 0), ("IVF4,Flat", 10**6)])
@pytest.mark.parametrize("mmap", [False, True])
def test_write_read_roundtrip(tmp_path, factory, trained_at, mmap):
    ids, x = _data(n=300)
    seg = Segment(16, factory, "ip", train_size=trained_at or None, search_params="nprobe=4" if "IVF" in factory else "")
    seg.add(ids, x)
    seg.write(tmp_path / "s.faiss")
    back = Segment.read(tmp_path / "s.faiss", dim=16, factory=factory, metric="ip", trained=seg.trained,
                        train_size=trained_at or None, search_params=seg.search_params, mmap=mmap)
    q = x[:20]
    np.testing.assert_array_equal(back.search(q, 5)[1], seg.search(q, 5)[1])
    more_ids, more = _data(n=5, seed=9)
    back.add(more_ids, more)  # a loaded (possibly memory-mapped) segment still takes writes
    assert back.ntotal == 305


@pytest.mark.parametrize("factory", ["", "NotAnIndex", "IVF,Flat"])
def test_invalid_factory_is_a_config_error(factory):
    with pytest.raises(ConfigError, match="factory"):
        Segment(16, factory, "ip")


def test_search_params_must_apply():
    with pytest.raises(ConfigError, match="do not apply"):
        Segment(16, "HNSW8", "ip", search_params="nprobe=4")


def test_gpu_without_gpu_is_a_config_error():
    import faiss

    if hasattr(faiss, "StandardGpuResources") and faiss.get_num_gpus() > 0:
        pytest.skip("a GPU is present")
    with pytest.raises(ConfigError, match="gpu"):
        Segment(16, "Flat", "ip", device="gpu")


def test_auto_device_resolves_to_what_faiss_sees_and_searches_like_cpu():
    from compatembed_index.segment import _gpu_available

    ids, x = _data(n=300)
    auto, cpu = Segment(16, "IVF4,Flat", "ip", train_size=200, search_params="nprobe=4", device="auto"), \
        Segment(16, "IVF4,Flat", "ip", train_size=200, search_params="nprobe=4", device="cpu")
    assert auto.device == ("gpu" if _gpu_available() else "cpu") and cpu.device == "cpu"
    for seg in (auto, cpu):
        seg.add(ids, x)
    d_auto, i_auto = auto.search(x[:20], 5)
    d_cpu, i_cpu = cpu.search(x[:20], 5)
    np.testing.assert_array_equal(i_auto, i_cpu)
    np.testing.assert_allclose(d_auto, d_cpu, rtol=1e-4, atol=1e-5)
    with pytest.raises(ConfigError, match="device must be one of cpu, gpu, auto"):
        Segment(16, "Flat", "ip", device="tpu")


@pytest.mark.gpu
@pytest.mark.parametrize("factory", ["Flat", "IVF4,Flat"])
def test_gpu_segment_matches_the_cpu_one(factory):
    """On a host with faiss-gpu and a GPU (pytest -m gpu): the same results from GPU 0, and deletes apply."""
    from compatembed_index.segment import _gpu_available

    if not _gpu_available():
        pytest.skip("needs faiss-gpu and a visible GPU (this faiss build or host has none)")
    ids, x = _data(n=400)
    kw = {"train_size": 200, "search_params": "nprobe=4" if "IVF" in factory else ""}
    gpu, cpu = Segment(16, factory, "ip", device="gpu", **kw), Segment(16, factory, "ip", device="cpu", **kw)
    for seg in (gpu, cpu):
        seg.add(ids, x)
    assert gpu.device == "gpu"
    d_gpu, i_gpu = gpu.search(x[:50], 5)
    d_cpu, i_cpu = cpu.search(x[:50], 5)
    np.testing.assert_array_equal(i_gpu, i_cpu)
    np.testing.assert_allclose(d_gpu, d_cpu, rtol=1e-4, atol=1e-5)
    gone = ids[:10]
    assert gpu.remove(gone) == 10
    assert not np.isin(gpu.search(x[:50], 5)[1], gone).any()


@pytest.mark.parametrize("factory", ["Flat", "IVF4,Flat", "IVF4,SQ8", "PQ4x4"])
def test_removal_keeps_the_remaining_ids_right(factory):
    ids, x = _data(n=400)
    seg = Segment(16, factory, "ip", train_size=200, search_params="nprobe=4" if "IVF" in factory else "")
    seg.add(ids, x)
    gone = ids[::3]
    assert seg.remove(gone) == len(gone)
    keep = np.setdiff1d(np.arange(400), np.arange(400)[::3])
    _, got = seg.search(x[keep], 1)
    assert not np.isin(got, gone).any()
    assert (got[:, 0] == ids[keep]).mean() > 0.9  # each survivor still finds itself under its own id
    assert sorted(seg.ids().tolist()) == sorted(ids[keep].tolist())


def test_idmap_around_ivf_is_refused():
    with pytest.raises(ConfigError, match="drop the IDMap prefix"):
        Segment(16, "IDMap2,IVF4,Flat", "ip")


@pytest.mark.parametrize(("factory", "train_size", "minimum"), [("IVF16,Flat", 8, 16), ("PQ4", 100, 256),
                                                                 ("IVF4,PQ4", 200, 256)])
def test_train_size_below_what_training_needs_is_a_config_error(factory, train_size, minimum):
    with pytest.raises(ConfigError, match=f"train_size {train_size} is too small .* at least {minimum}"):
        Segment(16, factory, "ip", train_size=train_size)
    Segment(16, factory, "ip", train_size=minimum)  # the minimum itself is fine


@pytest.mark.parametrize("params", ["nprobe=0", "nprobe=-3", "nprobe", "nprobe=abc", "nprobe=4,efSearch=0"])
def test_search_params_need_positive_values(params):
    with pytest.raises(ConfigError, match="positive number"):
        Segment(16, "IVF4,Flat", "ip", train_size=100, search_params=params)


def test_failed_training_keeps_the_exact_staging_index_and_retries_later(monkeypatch):
    ids, x = _data(n=700)
    seg = Segment(16, "IVF8,Flat", "ip", train_size=200, search_params="nprobe=8")
    calls = []

    def broken_train(_x):
        calls.append(len(_x))
        raise RuntimeError("simulated FAISS training failure")

    monkeypatch.setattr(seg._target, "train", broken_train)
    seg.add(ids[:250], x[:250])  # reaches train_size: training fails, the add does not
    assert not seg.trained and seg.train_error == "simulated FAISS training failure" and calls == [250]
    q = x[600:610]
    s, i = seg.search(q, 5)
    ri, rs = _exact(q, x[:250], ids[:250], 5)
    np.testing.assert_array_equal(i, ri)  # still exact over every staged vector
    seg.add(ids[250:400], x[250:400])
    assert calls == [250]  # no retry on every add: the next try waits until the staging index doubles
    monkeypatch.undo()
    seg.add(ids[400:500], x[400:500])
    assert seg.trained and seg.train_error is None and seg.ntotal == 500
    assert sorted(seg.ids().tolist()) == sorted(ids[:500].tolist())
