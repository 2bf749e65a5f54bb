"""λ-orthogonality: the two closed-form ends, the hinge, the exported affine edge, and short real runs."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from omegaconf import DictConfig
from safetensors.numpy import load_file
from scipy.linalg import orthogonal_procrustes
from sklearn.linear_model import LinearRegression

from compatembed.errors import ConfigError
from compatembed.methods.base import MethodContext
from compatembed.methods.lambda_orth import (
    LambdaOrth,
    LambdaOrthOptions,
    cross_supervised_contrastive,
    fit_lambda_orthogonal,
    lambda_orth_terms,
)
from compatembed.methods.maps import (
    DEVIATIONS,
    AffineMap,
    gram_deviation,
    least_squares_affine,
    orthogonality_deviation,
    orthogonality_penalty,
    procrustes,
    spectral_deviation,
)
from compatembed.models import EmbeddingModel, create_backbone
from compatembed.models.orthogonal import ORTHOGONAL_MAPS
from compatembed.models.version import load_model_version, module_sha256
from helpers.configs import compose_config

REPO = Path(__file__).resolve().parents[2]
TINY = ["data=synthetic", "model=cifar_resnet20", "trainer=smoke", "logger=none"]


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def paired_features(
    n: int = 200, d_new: int = 6, d_old: int = 5, *, offset: float = 0.3, seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Normalised (n, d_new) "new" and (n, d_old) "old" features related by a noisy affine map."""
    g = torch.Generator().manual_seed(seed)
    x = F.normalize(torch.randn(n, d_new, generator=g), dim=1)
    a = torch.randn(d_old, d_new, generator=g) * 0.5
    y = F.normalize(x @ a.T + 0.2 * torch.randn(n, d_old, generator=g) + offset, dim=1)
    return x, y


def random_semi_orthogonal(d_out: int, d_in: int, g: torch.Generator) -> torch.Tensor:
    q, _ = torch.linalg.qr(torch.randn(max(d_out, d_in), min(d_out, d_in), generator=g, dtype=torch.float64))
    return q if d_out >= d_in else q.T


# -- deviation measures and the hinge --------------------------------------------------------------
@pytest.mark.parametrize("shape", [(5, 5), (3, 6), (6, 3)])
def test_deviation_measures_match_numpy(shape):
    w = torch.randn(*shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    a = w.numpy()
    small = a.T @ a if shape[1] <= shape[0] else a @ a.T
    assert float(gram_deviation(w)) == pytest.approx(np.linalg.norm(small - np.eye(min(shape))), rel=1e-10)
    assert float(spectral_deviation(w)) == pytest.approx(np.abs(np.linalg.svd(a, compute_uv=False) - 1).max(), rel=1e-10)
    assert float(orthogonality_deviation(w, "gram")) == float(gram_deviation(w))
    q = random_semi_orthogonal(*shape, torch.Generator().manual_seed(2))
    for measure in DEVIATIONS:
        assert float(orthogonality_deviation(q, measure)) < 1e-12


@pytest.mark.parametrize("measure", DEVIATIONS)
def test_hinge_is_flat_zero_inside_the_tolerance_and_positive_outside(measure):
    # W = diag(1.0, 1.1, 0.8): Gram deviation ‖diag(0, 0.21, -0.36)‖_F, spectral deviation 0.2
    w = torch.diag(torch.tensor([1.0, 1.1, 0.8], dtype=torch.float64)).requires_grad_()
    deviation = math.hypot(0.21, 0.36) if measure == "gram" else 0.2
    inside = orthogonality_penalty(w, deviation + 0.01, measure)
    inside.backward()
    assert float(inside.detach()) == 0.0
    assert torch.count_nonzero(w.grad) == 0
    w.grad = None
    tol = 0.05
    outside = orthogonality_penalty(w, tol, measure)
    outside.backward()
    expected = (deviation - tol) ** 2 if measure == "gram" else (0.1 - tol) ** 2 + (0.2 - tol) ** 2  # σ = 1.1, 0.8
    assert float(outside.detach()) == pytest.approx(expected, rel=1e-9)
    assert float(w.grad.abs().sum()) > 0


def test_negative_tolerance_and_unknown_options_are_config_errors():
    x, y = paired_features()
    with pytest.raises(ConfigError, match="tolerance"):
        fit_lambda_orthogonal(x, y, options=LambdaOrthOptions(tolerance=-0.5))
    with pytest.raises(ConfigError, match="deviation"):
        fit_lambda_orthogonal(x, y, options=LambdaOrthOptions(deviation="frobenius"))
    with pytest.raises(ConfigError, match="objective"):
        fit_lambda_orthogonal(x, y, options=LambdaOrthOptions(objective="l1"))
    with pytest.raises(ConfigError, match="orthogonal_map"):
        AffineMap(4, 4, orthogonal_weight=True, orthogonal_map="qr")
    with pytest.raises(ConfigError, match="labels"):
        fit_lambda_orthogonal(x, y, options=LambdaOrthOptions(supcon_weight=1.0))


# -- the two closed-form ends ----------------------------------------------------------------------
def test_procrustes_matches_scipy_and_beats_random_orthogonal_maps():
    x, y = paired_features(d_new=5, d_old=5)
    w, b = procrustes(x, y)
    r, _ = orthogonal_procrustes(x.double().numpy(), y.double().numpy())  # argmin ‖x R − y‖: W = Rᵀ
    np.testing.assert_allclose(w.numpy(), r.T, atol=1e-10)
    assert torch.count_nonzero(b) == 0
    # non-square: no scipy oracle; the residual is no worse than any of 200 random semi-orthogonal maps
    x, y = paired_features(d_new=7, d_old=4)
    w, _ = procrustes(x, y)
    assert float(gram_deviation(w)) < 1e-12
    best = float(((x.double() @ w.T - y.double()) ** 2).sum())
    g = torch.Generator().manual_seed(3)
    for _ in range(200):
        q = random_semi_orthogonal(4, 7, g)
        assert best <= float(((x.double() @ q.T - y.double()) ** 2).sum()) + 1e-9


@pytest.mark.parametrize("bias", [False, True])
def test_infinite_lambda_is_the_least_squares_map_of_sklearn(bias):
    x, y = paired_features()
    oracle = LinearRegression(fit_intercept=bias).fit(x.double().numpy(), y.double().numpy())
    w, b = least_squares_affine(x, y, bias=bias)
    np.testing.assert_allclose(w.numpy(), oracle.coef_, atol=1e-8)
    np.testing.assert_allclose(b.numpy(), oracle.intercept_ if bias else 0.0, atol=1e-8)
    fit = fit_lambda_orthogonal(x, y, options=LambdaOrthOptions(tolerance=None, bias=bias))
    weight, bias_out = fit.map.exported()
    np.testing.assert_allclose(weight, oracle.coef_, atol=1e-6)
    np.testing.assert_allclose(bias_out, oracle.intercept_ if bias else 0.0, atol=1e-6)
    assert fit.facts["tolerance"] is None and fit.facts["fit"] == "least_squares"


@pytest.mark.parametrize("bias", [False, True])
def test_large_lambda_fit_converges_to_the_closed_form_least_squares_map(bias):
    """With λ far beyond the least-squares map's own deviation the hinge never acts: Adam from
    Procrustes on the same (mse) objective must land on the closed form."""
    x, y = paired_features()
    oracle = LinearRegression(fit_intercept=bias).fit(x.double().numpy(), y.double().numpy())
    assert float(gram_deviation(torch.from_numpy(oracle.coef_))) > 1.0  # far from orthogonal: a real test
    options = LambdaOrthOptions(tolerance=1e3, objective="mse", bias=bias, steps=500, batch_size=len(x), lr=3e-2)
    fit = fit_lambda_orthogonal(x, y, options=options)
    weight, bias_out = fit.map.exported()
    np.testing.assert_allclose(weight, oracle.coef_, atol=1e-4)
    np.testing.assert_allclose(bias_out, oracle.intercept_ if bias else 0.0, atol=1e-4)


def test_centering_without_bias_is_least_squares_with_an_intercept():
    x, y = paired_features()
    oracle = LinearRegression(fit_intercept=True).fit(x.double().numpy(), y.double().numpy())
    weight, bias = fit_lambda_orthogonal(x, y, options=LambdaOrthOptions(tolerance=None, center=True)).map.exported()
    np.testing.assert_allclose(weight, oracle.coef_, atol=1e-6)
    np.testing.assert_allclose(bias, oracle.intercept_, atol=1e-6)


# -- λ = 0 and intermediate λ ------------------------------------------------------------------------
@pytest.mark.parametrize("orthogonal_map", ORTHOGONAL_MAPS)
@pytest.mark.parametrize("d_new, d_old", [(6, 6), (7, 4), (4, 7)])
def test_zero_lambda_keeps_w_orthogonal_through_optimiser_steps(orthogonal_map, d_new, d_old):
    x, y = paired_features(d_new=d_new, d_old=d_old)
    options = LambdaOrthOptions(tolerance=0, bias=True, orthogonal_map=orthogonal_map, steps=60, batch_size=64, lr=2e-2)
    fit = fit_lambda_orthogonal(x, y, options=options)
    start, _ = procrustes(x, y)
    w = fit.map.weight.detach()
    assert float(gram_deviation(w)) < 1e-5
    assert float(gram_deviation(torch.from_numpy(fit.map.exported()[0]).double())) < 1e-5  # the float32 export too
    assert not torch.allclose(w, start, atol=1e-4), "the optimiser did not move W"
    align = fit.facts["train_alignment"]
    assert align["fitted"] >= align["procrustes"] - 1e-6
    assert fit.facts["orthogonal_map"] == orthogonal_map


def test_zero_lambda_without_steps_is_exactly_procrustes():
    x, y = paired_features(d_new=6, d_old=4)
    fit = fit_lambda_orthogonal(x, y, options=LambdaOrthOptions(tolerance=0, steps=0))
    np.testing.assert_allclose(fit.map.exported()[0], procrustes(x, y)[0].numpy(), atol=1e-6)


@pytest.mark.parametrize("measure", DEVIATIONS)
@pytest.mark.parametrize("tolerance", [0.1, 0.4])
def test_intermediate_lambda_stays_within_tolerance_and_uses_it(measure, tolerance):
    x, y = paired_features()
    free, _ = least_squares_affine(x, y, bias=False)
    assert float(orthogonality_deviation(free, measure)) > tolerance  # the constraint is active
    options = LambdaOrthOptions(tolerance=tolerance, deviation=measure, steps=400, batch_size=len(x), lr=1e-2)
    fit = fit_lambda_orthogonal(x, y, options=options)
    w = fit.map.weight.detach()
    assert float(orthogonality_deviation(w, measure)) <= tolerance + 0.02
    assert float(orthogonality_deviation(w, measure)) >= 0.5 * tolerance  # the tolerance is spent, not ignored
    align = fit.facts["train_alignment"]
    assert align["fitted"] > align["procrustes"]  # beyond the orthogonal end on the training features
    assert len(fit.facts["singular_values"]["values"]) == 5
    assert fit.facts["singular_values"]["min"] == pytest.approx(float(torch.linalg.svdvals(w).min()))


def test_bias_off_means_exactly_zero_bias_and_on_means_a_learned_one():
    x, y = paired_features(offset=0.6)
    off = fit_lambda_orthogonal(x, y, options=LambdaOrthOptions(tolerance=1.0, steps=50, batch_size=64, lr=1e-2))
    assert off.map.bias is None
    assert np.all(off.map.exported()[1] == 0.0)
    on = fit_lambda_orthogonal(x, y, options=LambdaOrthOptions(tolerance=1.0, bias=True, steps=50, batch_size=64, lr=1e-2))
    assert np.abs(on.map.exported()[1]).max() > 1e-3
    centred = fit_lambda_orthogonal(x, y, options=LambdaOrthOptions(tolerance=1.0, center=True, steps=50, batch_size=64, lr=1e-2))
    w, b = centred.map.exported()
    mean_new, mean_old = x.double().mean(0).numpy(), y.double().mean(0).numpy()
    np.testing.assert_allclose(b, mean_old - w.astype(np.float64) @ mean_new, atol=1e-6)


def test_exported_arrays_applied_in_numpy_reproduce_the_torch_map():
    from compatembed_index.registry import Edge

    x, y = paired_features(d_new=6, d_old=4, offset=0.5)
    options = LambdaOrthOptions(tolerance=0.5, bias=True, center=True, steps=30, batch_size=64, lr=1e-2)
    fit = fit_lambda_orthogonal(x, y, options=options)
    weight, bias = fit.map.exported()
    expected = F.normalize(fit.map(x), dim=1).numpy()
    by_hand = x.numpy() @ weight.T + bias
    np.testing.assert_allclose(by_hand / np.linalg.norm(by_hand, axis=1, keepdims=True), expected, atol=1e-5)
    edge = Edge("affine", "new", "old", weight=weight, bias=bias, normalize_output=True)  # what the index service applies
    np.testing.assert_allclose(edge.apply(x.numpy()), expected, atol=1e-5)


# -- the loss terms ----------------------------------------------------------------------------------
def test_supervised_contrastive_matches_a_loop():
    g = torch.Generator().manual_seed(4)
    z, t = torch.randn(6, 3, generator=g), torch.randn(6, 3, generator=g)
    labels = torch.tensor([0, 1, 0, 2, 1, 0])
    tau = 0.5
    total = 0.0
    for i in range(6):
        s = [float(F.cosine_similarity(z[i], t[j], dim=0)) / tau for j in range(6)]
        log_z = math.log(sum(math.exp(v) for v in s))
        pos = [j for j in range(6) if labels[j] == labels[i]]
        total += -sum(s[j] - log_z for j in pos) / len(pos)
    assert float(cross_supervised_contrastive(z, t, labels, tau)) == pytest.approx(total / 6, rel=1e-5)


def test_supervised_contrastive_term_moves_mapped_queries_toward_their_class():
    """The term trains the map (it has gradients) and does what it is for: mapped new vectors rank the old
    vectors of their own class higher (precision of the 20 nearest old vectors)."""
    g = torch.Generator().manual_seed(0)
    n, classes = 400, 4
    labels = torch.arange(n) % classes
    y = F.normalize(torch.randn(classes, 5, generator=g)[labels] + 0.8 * torch.randn(n, 5, generator=g), dim=1)  # old
    x = F.normalize(torch.randn(classes, 6, generator=g)[labels] + 0.8 * torch.randn(n, 6, generator=g), dim=1)  # new

    def precision(fit) -> float:
        with torch.no_grad():
            top = (F.normalize(fit.map(x.double()), dim=1) @ y.double().T).topk(20, dim=1).indices
        return float((labels[top] == labels[:, None]).double().mean())

    base = dict(tolerance=1.0, steps=200, batch_size=100, lr=1e-2, temperature=0.1)
    plain = fit_lambda_orthogonal(x, y, None, LambdaOrthOptions(**base))
    supervised = fit_lambda_orthogonal(x, y, labels, LambdaOrthOptions(**base, supcon_weight=1.0))
    assert supervised.history["supcon"][-1] < supervised.history["supcon"][0]
    assert precision(supervised) > precision(plain)  # equal if the term had no gradient


@pytest.mark.parametrize("key, term", [("alignment_weight", "align"), ("penalty_weight", "orth"), ("supcon_weight", "supcon")])
def test_each_weight_scales_its_own_term(key, term):
    x, y = paired_features(n=32)
    labels = torch.arange(32) % 4
    fitted = AffineMap(6, 5)
    fitted.set_weight(1.5 * torch.eye(5, 6, dtype=torch.float64))  # off-orthogonal: the hinge is active
    base = dict(tolerance=0.1, penalty_weight=1.0, alignment_weight=1.0, supcon_weight=1.0, temperature=0.2)
    one = lambda_orth_terms(fitted, x, y, labels, LambdaOrthOptions(**base))
    two = lambda_orth_terms(fitted, x, y, labels, LambdaOrthOptions(**{**base, key: 2.0}))
    one, two = ({k: float(v.detach()) for k, v in terms.items()} for terms in (one, two))
    assert one[term] > 0
    assert two[term] == pytest.approx(2 * one[term], rel=1e-9)
    for other in set(one) - {term}:
        assert two[other] == pytest.approx(one[other], rel=1e-12)


def test_label_smoothing_changes_the_new_models_cross_entropy():
    images, labels = torch.randn(8, 3, 32, 32, generator=torch.Generator().manual_seed(5)), torch.arange(8) % 4
    ce = {}
    for smoothing in (0.0, 0.3):
        torch.manual_seed(0)
        model = EmbeddingModel(create_backbone("cifar_resnet", depth=8, num_classes=10), embed_dim=8)
        method = LambdaOrth(model, 10, old_version="unused", label_smoothing=smoothing).eval()
        terms, _ = method.training_forward(images, labels, torch.arange(8))
        ce[smoothing] = float(terms["ce"].detach())
    assert ce[0.0] != pytest.approx(ce[0.3], rel=1e-4)


# -- the method in the pipeline (synthetic versions) ---------------------------------------------------
def lambda_orth_cfg(versions: dict[str, Path], out: Path, *extra: str) -> DictConfig:
    return compose_config("train", TINY + [
        "method=lambda_orth", f"method.old_version={versions['old']}", "version_id=lo", f"output_dir={out}",
        f"paths.cache_dir={versions['cache']}", "method.fit_steps=30", "method.fit_batch_size=64", *extra,
    ])


def test_training_exports_an_affine_edge_that_eval_follows(versions, tmp_path):
    from compatembed.embeddings import load_or_extract
    from compatembed.eval import retrieval_metrics
    from compatembed.eval.pair_report import evaluate
    from compatembed.training.run import train

    out = train(lambda_orth_cfg(versions, tmp_path / "lo", "method.tolerance=0.5"))
    manifest = json.loads((out / "manifest.json").read_text())
    (edge,) = manifest["compatibility"]
    assert edge["kind"] == "affine" and edge["target"] == "old" and edge["normalize_output"] is True
    arrays = load_model_version(out).edge_arrays(edge)
    d_old = json.loads((versions["old"] / "manifest.json").read_text())["embedding"]["dim"]
    assert arrays["weight"].shape == (d_old, manifest["embedding"]["dim"]) and arrays["bias"].shape == (d_old,)
    assert np.all(arrays["bias"] == 0.0)  # bias: false is the default
    facts = manifest["training"]["lambda_orth"]
    assert facts["tolerance"] == 0.5 and facts["gram_deviation"] <= 0.5 + 0.02
    assert facts["new_model"] == "trained in this run"
    old_hash = module_sha256(load_model_version(versions["old"]).model)
    assert manifest["training"]["frozen_model_sha256"] == {"old_model": old_hash}

    report = evaluate(compose_config("eval", ["data=synthetic", f"query={out}", f"gallery={versions['old']}",
                                              f"out={tmp_path / 'report'}", "progress=false", "device=cpu"]))
    cross = next(r for r in report["pairs"] if (r["query"], r["gallery"]) == ("new", "old"))
    assert cross["route"] == "query: affine"
    # the same number by hand: the exported arrays applied to the new test embeddings
    data = compose_config("eval", ["data=synthetic", "query=-", "gallery=-"]).data
    new, old = load_or_extract(out, data, "test", device="cpu"), load_or_extract(versions["old"], data, "test", device="cpu")
    mapped = new.embeddings @ arrays["weight"].T + arrays["bias"]
    by_hand = retrieval_metrics(mapped, new.labels, old.embeddings, old.labels, query_ids=new.ids, gallery_ids=old.ids,
                                leave_one_out=True, topk=(1, 5))
    assert cross["top1"] == pytest.approx(by_hand["top1"]) and cross["mAP"] == pytest.approx(by_hand["mAP"], abs=1e-9)


def test_adopting_a_trained_new_version_keeps_its_weights(versions, tmp_path):
    from compatembed.training.run import train

    out = train(lambda_orth_cfg(versions, tmp_path / "adopt", f"method.new_version={versions['new']}", "trainer.epochs=0",
                                "method.tolerance=0"))
    assert load_file(str(out / "model.safetensors")).keys() == load_file(str(versions["new"] / "model.safetensors")).keys()
    for key, value in load_file(str(versions["new"] / "model.safetensors")).items():
        np.testing.assert_array_equal(load_file(str(out / "model.safetensors"))[key], value)
    manifest = json.loads((out / "manifest.json").read_text())
    facts = manifest["training"]["lambda_orth"]
    assert facts["new_model"] == "adopted" and facts["new_version_id"] == "indep"
    assert facts["gram_deviation"] < 1e-5 and facts["fit"] == "orthogonal"
    assert set(manifest["training"]["frozen_model_sha256"]) == {"old_model", "new_model"}


def test_adopting_needs_zero_epochs_and_the_same_architecture(versions, tmp_path):
    from compatembed.training.run import train

    with pytest.raises(ConfigError):
        train(lambda_orth_cfg(versions, tmp_path / "a", f"method.new_version={versions['new']}"))  # trainer=smoke: 1 epoch
    with pytest.raises(ConfigError, match="new_version"):
        train(lambda_orth_cfg(versions, tmp_path / "b", f"method.new_version={versions['new']}", "trainer.epochs=0",
                              "model=cifar_resnet32"))


def test_missing_old_version_is_a_config_error(tmp_path):
    model = EmbeddingModel(create_backbone("cifar_resnet", depth=8, num_classes=10), embed_dim=8)
    method = LambdaOrth(model, 10)
    ctx = MethodContext(train_set=[], eval_view=lambda pre: [], num_classes=10, train_classes=list(range(10)),
                        device=torch.device("cpu"))
    with pytest.raises(ConfigError, match="old_version"):
        method.setup(ctx)
    with pytest.raises(ConfigError, match="deviation"):
        LambdaOrth(model, 10, deviation="nuclear")


def test_compare_maps_tool_on_synthetic_versions(versions, tmp_path, monkeypatch, capsys):
    from compatembed.embeddings import load_or_extract
    from compatembed.eval import retrieval_metrics

    monkeypatch.syspath_prepend(str(REPO))
    from tools.compare_maps import main

    with pytest.raises(SystemExit) as exc:
        main(["--help"])
    assert exc.value.code == 0 and "--lambdas" in capsys.readouterr().out
    out = tmp_path / "maps"
    assert main(["--old", str(versions["old"]), "--new", str(versions["new"]), "--data", "synthetic",
                 "--lambdas", "0", "1", "inf",
                 "--steps", "20", "--batch-size", "64", "--device", "cpu", "--no-progress", "--out", str(out)]) == 0
    payload = json.loads(out.with_suffix(".json").read_text())
    rows = {(r["map"], r["pair"]): r for r in payload["rows"]}
    assert len(rows) == len(payload["rows"]) == 3 + 2 * (2 + 3 + 1)  # baselines + per bias: 2 ends, 3 λ, forward
    data = compose_config("eval", ["data=synthetic", "query=-", "gallery=-"]).data
    new = load_or_extract(versions["new"], data, "test", device="cpu")
    old = load_or_extract(versions["old"], data, "test", device="cpu")
    raw = retrieval_metrics(new.embeddings, new.labels, old.embeddings, old.labels, query_ids=new.ids, gallery_ids=old.ids,
                            leave_one_out=True)
    assert rows["none (raw)", "new/old"]["top1"] == pytest.approx(raw["top1"])
    assert rows["none (raw)", "new/old"]["mAP"] == pytest.approx(raw["mAP"])
    for tag in ("", " + bias"):
        assert rows[f"procrustes (λ=0 closed form){tag}", "new/old"]["gram_deviation"] < 1e-6
        assert rows[f"λ-orthogonal λ=0{tag}", "new/old"]["gram_deviation"] < 1e-5
        ls, inf = rows[f"least squares (λ=∞ closed form){tag}", "new/old"], rows[f"λ-orthogonal λ=∞{tag}", "new/old"]
        assert (ls["top1"], ls["mAP"]) == pytest.approx((inf["top1"], inf["mAP"]), abs=1e-6)  # the same closed form
        assert rows[f"linear forward map old→new{tag}", "new/upgraded old"]["direction"] == "old→new"
    assert set(payload["verdict"]) == {"no_bias", "with_bias"}
    assert payload["verdict"]["no_bias"]["lambda"] == 1.0  # the only relaxed λ in the list
    text = out.with_suffix(".md").read_text()
    assert "| map | query/gallery | λ |" in text and "λ-orthogonal λ=1 + bias" in text


@pytest.mark.parametrize("experiment", ["cifar10_lambda_orth", "cifar10_external_lambda_orth", "cifar100_lambda_orth_paper",
                                        "imagenet_lambda_orth_paper"])
def test_experiments_compose_and_instantiate(experiment):
    from hydra.utils import instantiate

    cfg = compose_config("train", [f"experiment={experiment}"])
    assert cfg.method._target_ == "compatembed.methods.lambda_orth.LambdaOrth"
    assert cfg.method.old_version.startswith("runs/")
    embed_dim = cfg.model.embed_dim  # null (the external scenario): the backbone's pooled feature
    model = EmbeddingModel(create_backbone("cifar_resnet", depth=8, num_classes=10), embed_dim=embed_dim and int(embed_dim))
    method = instantiate(cfg.method, model=model, num_classes=int(cfg.data.num_classes))
    assert isinstance(method, LambdaOrth) and method.tolerance == 1.0


# -- a short run on real data ------------------------------------------------------------------------
def test_a_short_run_on_real_data_lowers_every_loss_term(external_version, small_cifar_context, short_run, assert_losses_fall):
    """New = a fresh ResNet-8 (32-d) trained for a few steps on 200 CIFAR-10 images, old = the third-party
    ResNet-20 (64-d); then the map fit. The hinge starts at 0 (Procrustes is orthogonal) and can only
    grow, so for it the invariant is the tolerance instead."""
    old = external_version("old", depth=20)
    torch.manual_seed(0)
    model = EmbeddingModel(create_backbone("cifar_resnet", depth=8, num_classes=10), embed_dim=32)
    method = LambdaOrth(model, 10, old_version=str(old), tolerance=0.5, supcon_weight=0.5, fit_steps=150,
                        fit_batch_size=100, fit_lr=5e-3)
    ctx = small_cifar_context(model.preprocessing, per_class=20, batch_size=100)
    method.setup(ctx)
    history = short_run(method, ctx.train_set, steps=25, batch_size=40, lr=5e-3)  # 5 epochs of 5 batches of 40
    assert_losses_fall(history, ("ce",))

    facts = method.finalize(ctx)["lambda_orth"]
    assert_losses_fall(method.fit_result.history, ("align", "supcon"), window=10)
    assert facts["gram_deviation"] <= 0.5 + 0.02
    assert facts["train_alignment"]["fitted"] > facts["train_alignment"]["procrustes"]
    (edge,) = method.compatibility_edges()
    assert edge.arrays["weight"].shape == (64, 32)
