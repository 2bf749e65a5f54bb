"""Orthogonal parametrisations: exactly orthogonal at creation and after optimiser steps, the identity
where they should be, the pair schedules they promise, and the parameter counts the docs give."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
from torch import nn

from compatembed.errors import ConfigError
from compatembed.models.orthogonal import (
    ORTHOGONAL_MAPS,
    ROTATION_MAPS,
    butterfly_pairs,
    check_orthogonal_map,
    make_orthogonal,
    orthogonal_linear,
    orthogonality_error,
    round_robin_pairs,
    trainable_parameters,
)

MAPS = [*ORTHOGONAL_MAPS, "givens:3", "butterfly:5", "householder_chain:4"]


def gram_error(w: torch.Tensor) -> float:
    """‖WWᵀ − I‖ or ‖WᵀW − I‖ for the smaller side of a (semi-)orthogonal W, in float64."""
    w = w.detach().double()
    g = w @ w.T if w.shape[0] <= w.shape[1] else w.T @ w
    return float(torch.linalg.matrix_norm(g - torch.eye(g.shape[0], dtype=torch.float64)))


@pytest.mark.parametrize("orthogonal_map", MAPS)
@pytest.mark.parametrize("shape", [(8, 8), (7, 7), (5, 9), (9, 5)])
def test_orthogonal_at_creation_and_after_optimiser_steps(orthogonal_map, shape):
    torch.manual_seed(0)
    layer = make_orthogonal(nn.Linear(shape[1], shape[0], bias=False), orthogonal_map)
    w0 = layer.weight.detach().clone()
    assert gram_error(w0) < 1e-5
    target = torch.randn(shape)
    opt = torch.optim.Adam([p for p in layer.parameters() if p.requires_grad], lr=0.05)
    for _ in range(25):
        loss = (layer.weight - target).pow(2).sum()
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert gram_error(layer.weight) < 1e-5
    assert (layer.weight.detach() - w0).abs().max() > 1e-3, "the weight did not learn"
    assert float((layer.weight.detach() - target).pow(2).sum()) < float((w0 - target).pow(2).sum())


@pytest.mark.parametrize("orthogonal_map", ROTATION_MAPS)
def test_rotation_maps_start_at_the_assigned_weight_and_only_the_rotation_learns(orthogonal_map):
    layer = make_orthogonal(nn.Linear(6, 6, bias=False, dtype=torch.float64), orthogonal_map)
    layer.weight = torch.eye(6, dtype=torch.float64)  # reduces to the identity: R(0) = I, Q₀ = I
    torch.testing.assert_close(layer.weight, torch.eye(6, dtype=torch.float64), atol=1e-12, rtol=0)
    q, _ = torch.linalg.qr(torch.randn(6, 6, dtype=torch.float64))
    layer.weight = q
    torch.testing.assert_close(layer.weight, q, atol=1e-12, rtol=0)
    layer.weight.sum().backward()
    base = layer.parametrizations.weight.original
    assert base.grad is None and not base.requires_grad  # Q₀ is fixed
    assert trainable_parameters(layer) == sum(p.numel() for p in layer.parametrizations.weight[0].parameters())


def test_assigning_a_non_orthogonal_weight_gives_its_nearest_orthogonal_matrix():
    layer = make_orthogonal(nn.Linear(4, 4, bias=False, dtype=torch.float64), "givens")
    a = torch.randn(4, 4, dtype=torch.float64)
    layer.weight = a
    u, _, vh = torch.linalg.svd(a)
    torch.testing.assert_close(layer.weight, u @ vh, atol=1e-10, rtol=0)


@pytest.mark.parametrize("n", [2, 5, 8, 9])
def test_round_robin_meets_every_pair_once_in_disjoint_layers(n):
    layers = round_robin_pairs(n)
    seen = []
    for a, b in layers:
        assert len(set(a) | set(b)) == 2 * len(a)  # disjoint within a layer
        seen += [tuple(sorted(p)) for p in zip(a, b)]
    assert sorted(seen) == list(itertools.combinations(range(n), 2))


@pytest.mark.parametrize("n", [4, 6, 8, 13])
def test_butterfly_layers_are_disjoint_xor_pairs(n):
    levels = math.ceil(math.log2(n))
    for k, (a, b) in enumerate(butterfly_pairs(n, levels + 1)):
        stride = 1 << (k % levels)
        assert len(set(a) | set(b)) == 2 * len(a)
        assert all(j == i ^ stride and j < n for i, j in zip(a, b))


@pytest.mark.parametrize("orthogonal_map, expected", [
    ("givens", 7 * 4),            # n − 1 layers of n/2 angles: n(n − 1)/2, the dimension of SO(n)
    ("givens:2", 2 * 4),
    ("butterfly", 3 * 4),         # log₂ n factors of n/2 angles
    ("householder_chain", 8 * 8), # 8 reflections of n numbers
    ("householder_chain:2", 2 * 8),
])
def test_parameter_counts_are_the_documented_ones(orthogonal_map, expected):
    assert trainable_parameters(orthogonal_linear(8, bias=False, orthogonal_map=orthogonal_map)) == expected


def test_full_givens_reaches_a_given_rotation():
    """n − 1 round-robin layers parametrise all of SO(n): fitting a random rotation gets it exactly."""
    torch.manual_seed(1)
    n = 4
    q, _ = torch.linalg.qr(torch.randn(n, n, dtype=torch.float64))
    if torch.det(q) < 0:
        q[:, 0] = -q[:, 0]
    layer = make_orthogonal(nn.Linear(n, n, bias=False, dtype=torch.float64), "givens")
    layer.weight = torch.eye(n, dtype=torch.float64)
    opt = torch.optim.LBFGS([layer.parametrizations.weight[0].rotation.angles], max_iter=200, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = (layer.weight - q).pow(2).sum()
        loss.backward()
        return loss

    for _ in range(5):
        opt.step(closure)
    assert float((layer.weight.detach() - q).abs().max()) < 1e-3  # from a start about 1 away


@pytest.mark.parametrize("bad", ["qr", "givens:0", "givens:x", "matrix_exp:4", "householder_chain:3", ""])
def test_bad_maps_are_refused_by_name(bad):
    with pytest.raises(ConfigError, match="orthogonal_map|even"):
        check_orthogonal_map(bad)


def test_orthogonality_error_is_zero_only_for_orthogonal_matrices():
    assert orthogonality_error(torch.eye(3)) == 0.0
    assert orthogonality_error(2 * torch.eye(3)) == pytest.approx(3 * 3 ** 0.5)


@pytest.mark.parametrize("orthogonal_map", MAPS)
def test_stays_orthogonal_under_the_training_loops_optimiser_with_weight_decay(orthogonal_map):
    """The loop's parameter groups (the code bases' Adam with L2 decay 3.05e-5) keep every map orthogonal: torch's
    ``householder`` keeps column signs on its free matrix's diagonal, which decay would shrink (Q then is 0)."""
    from compatembed.training.loop import _param_groups

    torch.manual_seed(0)
    model = nn.Sequential(orthogonal_linear(16, bias=True, orthogonal_map=orthogonal_map), nn.Linear(16, 4))
    params = [p for p in model.parameters() if p.requires_grad]
    groups = _param_groups(model, params)
    listed = [p for g in groups for p in (g["params"] if isinstance(g, dict) else [g])]
    assert sorted(map(id, listed)) == sorted(map(id, params))  # every trainable parameter, once
    assert any(isinstance(g, dict) and g.get("weight_decay") == 0.0 for g in groups) == (
        orthogonal_map.split(":")[0] in ("householder", "householder_chain"))
    opt = torch.optim.Adam(groups, lr=1e-2, weight_decay=3.05e-5)
    x, y = torch.randn(64, 16), torch.randint(0, 4, (64,))
    for _ in range(30):
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    assert orthogonality_error(model[0].weight) < 1e-4
