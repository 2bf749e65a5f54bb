"""Model version directories, checksums, edges and composed routes (against a numpy oracle)."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from compatembed_index.errors import (
    ConflictError,
    DimensionMismatchError,
    InvalidInputError,
    ManifestError,
    VersionNotFoundError,
)
from compatembed_index.registry import VersionRegistry, _gelu, read_version_dir

from index_helpers import Chain, mlp, normalize, write_version


@pytest.fixture
def chain(tmp_path):
    return Chain(tmp_path)


@pytest.fixture
def registry(chain):
    reg = VersionRegistry()
    for d in chain.dirs.values():
        reg.register(read_version_dir(d))
    return reg


def test_reads_the_contract(chain):
    v3 = read_version_dir(chain.dirs["v3"])
    assert (v3.version_id, v3.dim, v3.normalized, v3.metric) == ("v3", 32, True, "ip")
    assert [e.kind for e in v3.edges] == ["affine", "forward"]
    assert set(v3.files) == {"transforms/affine_to_v2.npz", "transforms/forward_from_v1.npz"}


def test_chain_routes_compose_and_match_oracle(chain, registry):
    route = registry.query_route("v3", "v1")
    assert route is not None and route.path == ["v3", "v2", "v1"]
    q = np.random.default_rng(0).normal(size=(7, 32)).astype(np.float32)
    q = normalize(q).astype(np.float32)
    np.testing.assert_allclose(route.apply(q), chain.q_to(q, "v1"), atol=1e-5)
    np.testing.assert_allclose(registry.query_route("v3", "v2").apply(q), chain.q_to(q, "v2"), atol=1e-5)
    assert registry.query_route("v3", "v3").steps == ()


def test_no_route_upwards_or_to_unrelated_versions(registry):
    assert registry.query_route("v1", "v3") is None  # queries only travel new → old
    assert registry.query_route("v3", "v0") is None
    assert registry.query_route("v0", "v1") is None


def test_forward_route_matches_oracle(chain, registry):
    route = registry.forward_route("v1", "v3")
    assert route is not None and route.path == ["v1", "v3"]
    x = normalize(np.random.default_rng(1).normal(size=(9, 16))).astype(np.float32)
    np.testing.assert_allclose(route.apply(x), chain.forward_v1(x), atol=1e-5)
    assert registry.forward_route("v3", "v1") is None


def test_identity_edge_is_usable_both_ways(tmp_path):
    reg = VersionRegistry()
    reg.register(read_version_dir(write_version(tmp_path, "a", 8)))
    reg.register(read_version_dir(write_version(tmp_path, "b", 8, identity="a")))
    assert reg.query_route("b", "a").path == ["b", "a"]
    assert reg.query_route("a", "b").path == ["a", "b"]


def test_gelu_is_exact_erf_form():
    x = np.linspace(-6, 6, 301).astype(np.float32)
    ref = np.array([0.5 * v * (1 + math.erf(v / math.sqrt(2))) for v in x.astype(np.float64)])
    np.testing.assert_allclose(_gelu(x), ref, atol=1e-6)


def test_gelu_forward_edge(tmp_path):
    rng = np.random.default_rng(0)
    layers = [(rng.normal(size=(6, 4)), rng.normal(size=6)), (rng.normal(size=(5, 6)), rng.normal(size=5))]
    write_version(tmp_path, "old", 4)
    d = write_version(tmp_path, "new", 5, forward=("old", layers, "gelu", False))
    reg = VersionRegistry()
    reg.register(read_version_dir(tmp_path / "old"))
    reg.register(read_version_dir(d))
    x = normalize(rng.normal(size=(3, 4))).astype(np.float32)
    h = x.astype(np.float64) @ layers[0][0].T + layers[0][1]
    h = 0.5 * h * (1 + np.vectorize(math.erf)(h / math.sqrt(2)))
    ref = normalize(h @ layers[1][0].T + layers[1][1])  # target normalised → output normalised
    np.testing.assert_allclose(reg.forward_route("old", "new").apply(x), ref, atol=1e-5)
    assert not np.allclose(ref, normalize(mlp(x, layers, "relu")))


def _side_version(tmp_path, side_input):
    """'new' (5-d) upgrades 'old' (4-d) from concat(old vector, 3-d side vector of 'psi'); returns its layers."""
    rng = np.random.default_rng(1)
    layers = [(rng.normal(size=(6, 4 + 3)), rng.normal(size=6)), (rng.normal(size=(5, 6)), rng.normal(size=5))]
    write_version(tmp_path, "old", 4)
    d = write_version(tmp_path, "new", 5, forward=("old", layers, "relu", True))
    m = json.loads((d / "manifest.json").read_text())
    m["compatibility"][0]["side_input"] = side_input
    (d / "manifest.json").write_text(json.dumps(m))
    return d, layers


def test_a_forward_edge_with_side_information_is_applied_to_both_vectors_and_is_no_stored_route(tmp_path):
    d, layers = _side_version(tmp_path, {"version": "psi", "dim": 3})
    reg = VersionRegistry()
    reg.register(read_version_dir(tmp_path / "old"))
    reg.register(read_version_dir(d))  # the MLP's 7 inputs are the old 4 plus the side 3: the dims check passes
    assert reg.forward_route("old", "new") is None  # stored old vectors alone cannot follow it
    route = reg.side_forward_route("old", "new")
    assert route is not None and route.path == ["old", "new"]
    edge = route.steps[0].edge
    assert (edge.side_version, edge.side_dim, edge.in_dim) == ("psi", 3, 4)
    rng = np.random.default_rng(2)
    x, psi = normalize(rng.normal(size=(8, 4))).astype(np.float32), rng.normal(size=(8, 3)).astype(np.float32)
    ref = normalize(mlp(np.hstack([x, normalize(psi)]), layers, "relu"))  # ψ enters L2-normalised, as fitted
    np.testing.assert_allclose(edge.apply(x, psi), ref, atol=1e-5)
    np.testing.assert_allclose(route.apply(x, psi), ref, atol=1e-5)
    with pytest.raises(InvalidInputError, match="needs the side-information vectors of version 'psi'"):
        edge.apply(x)
    with pytest.raises(DimensionMismatchError, match=r"shape \(8, 3\)"):
        edge.apply(x, psi[:, :2])
    assert reg.side_forward_route("new", "old") is None
    with pytest.raises(VersionNotFoundError):
        reg.side_forward_route("old", "nope")


@pytest.mark.parametrize(("side_input", "message"), [
    ({"version": "psi"}, "exactly 'version' and 'dim'"),
    ({"version": "psi", "dim": 0}, "positive integer"),
    ({"version": "psi", "dim": True}, "positive integer"),
    ({"version": "old", "dim": 3}, "a third version"),
    ({"version": "bad id!", "dim": 3}, "a third version"),
    ({"version": "psi", "dim": 7}, "leaves no room"),
])
def test_malformed_side_inputs_are_refused(tmp_path, side_input, message):
    d, _ = _side_version(tmp_path, side_input)
    with pytest.raises(ManifestError, match=message):
        read_version_dir(d)


def test_side_input_on_a_query_edge_is_refused(tmp_path):
    write_version(tmp_path, "old", 4)
    d = write_version(tmp_path, "new", 6, prefix=("old", 4))
    m = json.loads((d / "manifest.json").read_text())
    m["compatibility"][0]["side_input"] = {"version": "psi", "dim": 3}
    (d / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(ManifestError, match="forward edges only"):
        read_version_dir(d)


def test_checksum_mismatch_of_a_transform_is_refused(chain):
    f = chain.dirs["v3"] / "transforms" / "affine_to_v2.npz"
    data = bytearray(f.read_bytes())
    data[-5] ^= 0xFF
    f.write_bytes(bytes(data))
    with pytest.raises(ManifestError, match=r"checksum mismatch for transforms/affine_to_v2\.npz"):
        read_version_dir(chain.dirs["v3"])


def test_checksum_mismatch_of_weights_is_refused_when_present(chain):
    (chain.dirs["v1"] / "model.safetensors").write_bytes(b"tampered")
    with pytest.raises(ManifestError, match="checksum mismatch for model.safetensors"):
        read_version_dir(chain.dirs["v1"])
    (chain.dirs["v1"] / "model.safetensors").unlink()  # an index host need not have the weights
    assert read_version_dir(chain.dirs["v1"]).version_id == "v1"


def test_missing_transform_file_is_refused(chain):
    (chain.dirs["v3"] / "transforms" / "affine_to_v2.npz").unlink()
    with pytest.raises(ManifestError, match="affine_to_v2.npz"):
        read_version_dir(chain.dirs["v3"])


@pytest.mark.parametrize(
    ("patch", "message"),
    [
        ({"version_id": "bad id!"}, "version_id"),
        ({"format": "other/1"}, "format"),
        ({"embedding": {"dim": 0, "normalized": True}}, "embedding.dim"),
        ({"embedding": {"dim": 16, "normalized": "yes"}}, "normalized"),
        ({"compatibility": [{"kind": "teleport", "target": "v0"}]}, "unknown edge kind"),
        ({"compatibility": [{"kind": "prefix", "target": "v0", "dim": 99}]}, "prefix edge needs"),
        ({"compatibility": [{"kind": "affine", "target": "v0", "file": "../x.npz"}]}, "inside the version directory"),
        ({"compatibility": [{"kind": "affine", "target": "v0", "file": "t.npz"}]}, "not listed"),
    ],
)
def test_malformed_manifests_are_refused(tmp_path, patch, message):
    d = write_version(tmp_path, "v1", 16)
    m = json.loads((d / "manifest.json").read_text())
    m.update(patch)
    (d / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(ManifestError, match=message):
        read_version_dir(d)


def test_affine_shape_must_fit(tmp_path):
    write_version(tmp_path, "v1", 16)
    with pytest.raises(ManifestError, match="do not fit"):
        read_version_dir(write_version(tmp_path, "v2", 24, affine=("v1", np.ones((16, 20)), np.ones(16), True)))


def test_route_dimension_mismatch_is_reported(tmp_path):
    v1 = read_version_dir(write_version(tmp_path, "v1", 12))
    v2 = read_version_dir(write_version(tmp_path, "v2", 24, prefix=("v1", 16)))
    # refused at registration, in either order (tests/index/test_index_hardening.py has more)
    reg = VersionRegistry()
    reg.register(v1)
    with pytest.raises(ManifestError, match="dims 24 and 12"):
        reg.register(v2)
    reg = VersionRegistry()
    reg.register(v2)
    with pytest.raises(ManifestError, match="dims 24 and 12"):
        reg.register(v1)
    # a version stored before the check (registered without it) still fails the routes that use the edge
    reg.register(v1, check_edges=False)
    with pytest.raises(ManifestError, match="dims 24 and 12"):
        reg.query_route("v2", "v1")


def test_register_is_idempotent_and_conflicts_are_refused(tmp_path, chain, registry):
    assert registry.register(read_version_dir(chain.dirs["v1"])) is False
    other = write_version(tmp_path / "other", "v1", 8)
    with pytest.raises(ConflictError, match="different manifest"):
        registry.register(read_version_dir(other))
    with pytest.raises(VersionNotFoundError, match="unknown model version 'nope'"):
        registry.get("nope")
