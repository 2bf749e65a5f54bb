"""FCT: the forward map old → new, BatchNorm folding, the exported forward edge, and short real runs."""

from __future__ import annotations

import copy
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from omegaconf import DictConfig
from sklearn.linear_model import LinearRegression
from torch import nn

from compatembed.errors import ConfigError, EvalError, ManifestError
from compatembed.methods.base import MethodContext
from compatembed.methods.fct import FCT, ForwardMapOptions, ForwardMLP, fit_forward_map, fold_batchnorm, forward_loss
from compatembed.models import EmbeddingModel, create_backbone
from compatembed.models.version import load_model_version, module_sha256
from helpers.configs import compose_config

REPO = Path(__file__).resolve().parents[2]
TINY = ["data=synthetic", "model=cifar_resnet20", "trainer=smoke", "logger=none"]


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def paired_features(n: int = 200, d_old: int = 5, d_new: int = 6, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Normalised (n, d_old) "old" and (n, d_new) "new" features with a nonlinear relation."""
    g = torch.Generator().manual_seed(seed)
    x = F.normalize(torch.randn(n, d_old, generator=g), dim=1)
    y = F.normalize(torch.tanh(x @ torch.randn(d_old, d_new, generator=g) * 2) + 0.1 * torch.randn(n, d_new, generator=g), dim=1)
    return x, y


def with_random_running_stats(mlp: ForwardMLP, seed: int = 0) -> ForwardMLP:
    """Give every BatchNorm non-trivial running statistics and affine parameters (folding must use them)."""
    g = torch.Generator().manual_seed(seed)
    for norm in mlp.norms:
        if isinstance(norm, nn.BatchNorm1d):
            n = norm.num_features
            norm.running_mean.copy_(torch.randn(n, generator=g))
            norm.running_var.copy_(torch.rand(n, generator=g) + 0.5)
            with torch.no_grad():
                norm.weight.copy_(torch.randn(n, generator=g))
                norm.bias.copy_(torch.randn(n, generator=g))
    return mlp.eval()


def numpy_forward(arrays: dict[str, np.ndarray], x: np.ndarray, activation: str) -> np.ndarray:
    """The exported MLP applied by hand: w_i (out, in), activation between layers, L2-normalised output."""
    import math

    erf = np.vectorize(math.erf)
    n_layers = len(arrays) // 2
    h = x.astype(np.float64)
    for i in range(n_layers):
        h = h @ arrays[f"w{i}"].T.astype(np.float64) + arrays[f"b{i}"]
        if i < n_layers - 1:
            h = np.maximum(h, 0) if activation == "relu" else 0.5 * h * (1 + erf(h / np.sqrt(2)))
    return h / np.linalg.norm(h, axis=1, keepdims=True)


# -- BatchNorm folding and the export -----------------------------------------------------------------
def test_fold_batchnorm_equals_linear_then_eval_batchnorm():
    g = torch.Generator().manual_seed(1)
    linear = nn.Linear(4, 3)
    bn = nn.BatchNorm1d(3, eps=1e-3)
    bn.running_mean.copy_(torch.randn(3, generator=g))
    bn.running_var.copy_(torch.rand(3, generator=g) + 0.1)
    with torch.no_grad():
        bn.weight.copy_(torch.randn(3, generator=g))
        bn.bias.copy_(torch.randn(3, generator=g))
    bn.eval()
    x = torch.randn(10, 4, generator=g)
    w, b = fold_batchnorm(linear.weight.detach(), linear.bias.detach(), bn)
    torch.testing.assert_close(x @ w.T + b, bn(linear(x)).detach(), atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("hidden, activation, batch_norm", [((), "relu", True), ((8,), "relu", True), ((8, 7), "gelu", True),
                                                            ((8,), "relu", False)])
def test_exported_mlp_with_folded_batchnorm_equals_the_eval_module(hidden, activation, batch_norm):
    from compatembed_index.registry import Edge

    torch.manual_seed(0)
    mlp = with_random_running_stats(ForwardMLP(5, 6, hidden, activation=activation, batch_norm=batch_norm))
    arrays = mlp.exported()
    assert sorted(arrays) == sorted([f"w{i}" for i in range(len(hidden) + 1)] + [f"b{i}" for i in range(len(hidden) + 1)])
    assert arrays["w0"].shape == (hidden[0] if hidden else 6, 5)
    x = F.normalize(torch.randn(50, 5), dim=1)
    expected = F.normalize(mlp(x), dim=1).detach().numpy()
    np.testing.assert_allclose(numpy_forward(arrays, x.numpy(), activation), expected, atol=1e-5)
    layers = tuple((arrays[f"w{i}"], arrays[f"b{i}"]) for i in range(len(hidden) + 1))
    edge = Edge("forward", "new", "old", layers=layers, activation=activation, normalize_output=True)  # the index service
    np.testing.assert_allclose(edge.apply(x.numpy()), expected, atol=1e-5)


# -- the fit ----------------------------------------------------------------------------------------
def test_loss_functions_match_their_definitions():
    g = torch.Generator().manual_seed(2)
    a, b = torch.randn(7, 4, generator=g), torch.randn(7, 4, generator=g)
    assert float(forward_loss(a, b, "mse")) == pytest.approx(float(((a - b) ** 2).mean()), rel=1e-6)
    cos = (a * b).sum(1) / (a.norm(dim=1) * b.norm(dim=1))
    assert float(forward_loss(a, b, "cosine")) == pytest.approx(float((1 - cos).mean()), rel=1e-6)
    with pytest.raises(ConfigError, match="loss"):
        forward_loss(a, b, "l1")


def test_linear_forward_map_converges_to_least_squares():
    x, y = paired_features()
    oracle = LinearRegression().fit(x.double().numpy(), y.double().numpy())
    fit = fit_forward_map(x, y, ForwardMapOptions(hidden_dims=(), steps=600, batch_size=len(x), lr=3e-2))
    arrays = fit.mlp.exported()
    np.testing.assert_allclose(arrays["w0"], oracle.coef_, atol=1e-3)
    np.testing.assert_allclose(arrays["b0"], oracle.intercept_, atol=1e-3)


def test_loss_weight_scales_the_term():
    x, y = paired_features(n=64)
    one = fit_forward_map(x, y, ForwardMapOptions(hidden_dims=(8,), steps=1, batch_size=64))
    two = fit_forward_map(x, y, ForwardMapOptions(hidden_dims=(8,), steps=1, batch_size=64, loss_weight=2.0))
    assert two.history["transfer"][0] == pytest.approx(2 * one.history["transfer"][0], rel=1e-6)


def test_supervised_contrastive_term_is_its_definition_scaled_and_needs_labels():
    x, y = paired_features(n=64)
    labels = torch.arange(64) % 4
    options = dict(hidden_dims=(8,), steps=1, batch_size=64, temperature=0.2)
    one = fit_forward_map(x, y, ForwardMapOptions(**options, supcon_weight=1.0), labels=labels)
    two = fit_forward_map(x, y, ForwardMapOptions(**options, supcon_weight=2.0), labels=labels)
    assert two.history["supcon"][0] == pytest.approx(2 * one.history["supcon"][0], rel=1e-6)
    assert one.history["transfer"] == two.history["transfer"]  # the first step's transfer term is untouched
    # the first step's term, by hand: h at its seeded initialisation in batch mode, one full batch (a loop over anchors)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        h = ForwardMLP(5, 6, (8,)).train()
    with torch.no_grad():
        mapped = F.normalize(h(x), dim=1)
    target = F.normalize(y, dim=1)
    total = 0.0
    for i in range(64):
        log_p = (mapped[i] @ target.T / 0.2).log_softmax(0)
        total -= float(log_p[labels == labels[i]].mean())
    assert one.history["supcon"][0] == pytest.approx(total / 64, rel=1e-4)
    assert "supcon" not in fit_forward_map(x, y, ForwardMapOptions(hidden_dims=(8,), steps=1, batch_size=64)).history
    with pytest.raises(ConfigError, match="label"):
        fit_forward_map(x, y, ForwardMapOptions(**options, supcon_weight=1.0))
    with pytest.raises(ConfigError, match="temperature"):
        ForwardMapOptions(supcon_weight=1.0, temperature=0.0)


def test_supervised_contrastive_term_gathers_the_classes_of_the_mapped_gallery():
    """The property the term is for: mapped old vectors sit nearer the new vectors of their own class."""
    g = torch.Generator().manual_seed(1)
    n, classes = 400, 4
    labels = torch.arange(n) % classes
    centres = F.normalize(torch.randn(classes, 6, generator=g), dim=1)
    y = F.normalize(centres[labels] + 0.6 * torch.randn(n, 6, generator=g), dim=1)  # new space: classes, noisy
    x = F.normalize(torch.randn(n, 5, generator=g) + 0.3 * torch.randn(classes, 5, generator=g)[labels], dim=1)

    def class_margin(fit) -> float:
        mapped = F.normalize(fit.mlp(x), dim=1)
        means = F.normalize(torch.stack([y[labels == c].mean(0) for c in range(classes)]), dim=1)
        return float((mapped @ means.T).argmax(1).eq(labels).float().mean())

    options = dict(hidden_dims=(32,), steps=300, batch_size=100, lr=1e-2, loss="cosine", temperature=0.1)
    plain = fit_forward_map(x, y, ForwardMapOptions(**options))
    supervised = fit_forward_map(x, y, ForwardMapOptions(**options, supcon_weight=1.0), labels=labels)
    assert class_margin(supervised) > class_margin(plain)


def test_batch_mode_recalibrates_running_statistics_exactly():
    x, y = paired_features()
    fit = fit_forward_map(x, y, ForwardMapOptions(hidden_dims=(8,), steps=20, batch_size=32, lr=1e-2))
    mlp = fit.mlp
    z = mlp.linears[0](x).detach().double()
    torch.testing.assert_close(mlp.norms[0].running_mean.double(), z.mean(0), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(mlp.norms[0].running_var.double(), z.var(0, unbiased=True), atol=1e-5, rtol=1e-5)
    # so the eval-mode (exported) map is the network normalised with full-batch statistics of the training set
    full_batch = copy.deepcopy(mlp).train()
    torch.testing.assert_close(mlp(x), full_batch(x).detach(), atol=1e-2, rtol=1e-2)  # differ by var·n/(n−1) only


def test_fixed_mode_fits_in_eval_mode_like_the_public_code():
    x, y = paired_features()
    fit = fit_forward_map(x, y, ForwardMapOptions(hidden_dims=(8,), batchnorm_mode="fixed", steps=50, batch_size=32, lr=1e-2))
    norm = fit.mlp.norms[0]
    torch.testing.assert_close(norm.running_mean, torch.zeros(8))
    torch.testing.assert_close(norm.running_var, torch.ones(8))
    assert not torch.allclose(norm.weight, torch.ones(8))  # its affine part learned
    assert fit.history["transfer"][-1] < fit.history["transfer"][0]


def test_unknown_options_are_config_errors():
    model = EmbeddingModel(create_backbone("cifar_resnet", depth=8, num_classes=10), embed_dim=8)
    for kwargs, word in (({"activation": "tanh"}, "activation"), ({"batchnorm_mode": "sync"}, "batchnorm_mode"),
                         ({"loss": "l1"}, "loss")):
        with pytest.raises(ConfigError, match=word):
            FCT(model, 10, old_version="x", **kwargs)
    ctx = MethodContext(train_set=[], eval_view=lambda pre: [], num_classes=10, train_classes=list(range(10)),
                        device=torch.device("cpu"))
    with pytest.raises(ConfigError, match="old_version"):
        FCT(model, 10).setup(ctx)


# -- the method in the pipeline (synthetic versions) ---------------------------------------------------
def fct_cfg(versions: dict[str, Path], out: Path, *extra: str) -> DictConfig:
    return compose_config("train", TINY + [
        "method=fct", f"method.old_version={versions['old']}", "version_id=fct", f"output_dir={out}",
        f"paths.cache_dir={versions['cache']}", "method.fit_steps=40", "method.fit_batch_size=32", "method.hidden_dims=[16]",
        *extra,
    ])


def test_training_exports_a_forward_edge_that_upgrades_the_old_gallery(versions, tmp_path):
    from compatembed.embeddings import load_or_extract
    from compatembed.eval import retrieval_metrics
    from compatembed.eval.pair_report import evaluate
    from compatembed.training.run import train

    out = train(fct_cfg(versions, tmp_path / "fct"))
    manifest = json.loads((out / "manifest.json").read_text())
    (edge,) = manifest["compatibility"]
    assert edge["kind"] == "forward" and edge["source"] == "old" and edge["activation"] == "relu"
    arrays = load_model_version(out).edge_arrays(edge)
    d_old = json.loads((versions["old"] / "manifest.json").read_text())["embedding"]["dim"]
    d_new = manifest["embedding"]["dim"]
    assert arrays["w0"].shape == (16, d_old) and arrays["w1"].shape == (d_new, 16) and sorted(arrays) == ["b0", "b1", "w0", "w1"]
    facts = manifest["training"]["fct"]
    assert facts["layers"] == [d_old, 16, d_new] and facts["new_model"] == "trained in this run"
    assert manifest["training"]["frozen_model_sha256"] == {"old_model": module_sha256(load_model_version(versions["old"]).model)}

    report = evaluate(compose_config("eval", ["data=synthetic", f"query={out}", f"gallery={versions['old']}",
                                              f"out={tmp_path / 'report'}", "progress=false", "device=cpu"]))
    cross = next(r for r in report["pairs"] if (r["query"], r["gallery"]) == ("new", "old"))
    assert cross["route"] == "gallery: forward"
    with_side = evaluate(compose_config("eval", ["data=synthetic", f"query={out}", f"gallery={versions['old']}",
                                                 f"side={versions['new']}", f"out={tmp_path / 'report_side'}",
                                                 "progress=false", "device=cpu"]))
    assert "side_information" not in with_side  # no edge reads it: the report does not claim it
    assert with_side["pairs"] == report["pairs"]
    data = compose_config("eval", ["data=synthetic", "query=-", "gallery=-"]).data
    new, old = load_or_extract(out, data, "test", device="cpu"), load_or_extract(versions["old"], data, "test", device="cpu")
    upgraded = numpy_forward(arrays, old.embeddings, "relu")
    by_hand = retrieval_metrics(new.embeddings, new.labels, upgraded, old.labels, query_ids=new.ids, gallery_ids=old.ids,
                                leave_one_out=True, topk=(1, 5))
    assert cross["top1"] == pytest.approx(by_hand["top1"]) and cross["mAP"] == pytest.approx(by_hand["mAP"], abs=1e-6)


def test_adopted_new_model_with_side_information(versions, tmp_path):
    """ψ = features of another frozen version; h's input is concat(old, ψ), the edge says so, and the
    evaluation upgrades the old gallery from both vectors of each item (checked against the MLP by hand)."""
    from compatembed.embeddings import load_or_extract
    from compatembed.eval import retrieval_metrics
    from compatembed.eval.pair_report import evaluate
    from compatembed.training.run import train

    out = train(fct_cfg(versions, tmp_path / "side", f"method.new_version={versions['new']}", "trainer.epochs=0",
                        f"method.side_info_version={versions['new']}"))
    manifest = json.loads((out / "manifest.json").read_text())
    (edge,) = manifest["compatibility"]
    d_old = json.loads((versions["old"] / "manifest.json").read_text())["embedding"]["dim"]
    d_side = json.loads((versions["new"] / "manifest.json").read_text())["embedding"]["dim"]
    arrays = load_model_version(out).edge_arrays(edge)
    assert arrays["w0"].shape == (16, d_old + d_side)
    assert edge["side_input"] == {"version": "indep", "dim": d_side}
    facts = manifest["training"]["fct"]
    assert facts["side_info"]["version_id"] == "indep" and facts["new_model"] == "adopted"
    assert set(manifest["training"]["frozen_model_sha256"]) == {"old_model", "new_model", "side_model"}
    assert manifest["training"]["side_info_version_dir"] == str(versions["new"])

    eval_args = ["data=synthetic", f"query={out}", f"gallery={versions['old']}", "progress=false", "device=cpu"]
    report = evaluate(compose_config("eval", [*eval_args, f"out={tmp_path / 'report'}"]))  # ψ's directory as recorded
    cross = next(r for r in report["pairs"] if (r["query"], r["gallery"]) == ("new", "old"))
    assert cross["route"] == "gallery: forward+side" and report["side_information"] == "indep"
    data = compose_config("eval", ["data=synthetic", "query=-", "gallery=-"]).data
    new, old = load_or_extract(out, data, "test", device="cpu"), load_or_extract(versions["old"], data, "test", device="cpu")
    side = load_or_extract(versions["new"], data, "test", device="cpu")
    assert np.array_equal(side.ids, old.ids)
    side_unit = side.embeddings / np.linalg.norm(side.embeddings, axis=1, keepdims=True)
    upgraded = numpy_forward(arrays, np.concatenate([old.embeddings, side_unit], axis=1), "relu")
    by_hand = retrieval_metrics(new.embeddings, new.labels, upgraded, old.labels, query_ids=new.ids, gallery_ids=old.ids,
                                leave_one_out=True, topk=(1, 5))
    assert cross["top1"] == pytest.approx(by_hand["top1"]) and cross["mAP"] == pytest.approx(by_hand["mAP"], abs=1e-6)

    moved = tmp_path / "elsewhere" / "fct"  # ψ's directory gone (neither as recorded nor next to it): said so
    moved.parent.mkdir()
    shutil.copytree(out, moved)
    manifest["training"]["side_info_version_dir"] = str(tmp_path / "missing" / "indep")
    (moved / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ManifestError, match="side information from version 'indep'"):
        evaluate(compose_config("eval", ["data=synthetic", f"query={moved}", f"gallery={versions['old']}",
                                         "progress=false", "device=cpu", f"out={tmp_path / 'r2'}"]))
    with pytest.raises(EvalError, match="side information must come from version 'indep'"):
        evaluate(compose_config("eval", [*eval_args, f"side={versions['old']}", f"out={tmp_path / 'r3'}"]))


@pytest.mark.parametrize("experiment", ["cifar10_fct", "cifar10_external_fct", "cifar100_fct_paper", "imagenet_fct_paper"])
def test_experiments_compose_and_instantiate(experiment):
    from hydra.utils import instantiate

    cfg = compose_config("train", [f"experiment={experiment}"])
    assert cfg.method._target_ == "compatembed.methods.fct.FCT"
    assert cfg.method.old_version.startswith("runs/")
    embed_dim = cfg.model.embed_dim  # null (the external scenario): the backbone's pooled feature
    model = EmbeddingModel(create_backbone("cifar_resnet", depth=8, num_classes=10), embed_dim=embed_dim and int(embed_dim))
    assert isinstance(instantiate(cfg.method, model=model, num_classes=int(cfg.data.num_classes)), FCT)


# -- a short run on real data ------------------------------------------------------------------------
def test_a_short_run_on_real_data_lowers_every_loss_term(external_version, small_cifar_context, short_run, assert_losses_fall):
    """New = a fresh ResNet-8 (32-d) trained for a few steps on 200 CIFAR-10 images, old = the third-party
    ResNet-20 (64-d); then h is fitted on their features."""
    old = external_version("old", depth=20)
    torch.manual_seed(0)
    model = EmbeddingModel(create_backbone("cifar_resnet", depth=8, num_classes=10), embed_dim=32)
    method = FCT(model, 10, old_version=str(old), hidden_dims=[64], fit_steps=150, fit_batch_size=50, fit_lr=3e-3)
    ctx = small_cifar_context(model.preprocessing, per_class=20, batch_size=100)
    method.setup(ctx)
    history = short_run(method, ctx.train_set, steps=25, batch_size=40, lr=5e-3)  # 5 epochs of 5 batches of 40
    assert_losses_fall(history, ("ce",))

    facts = method.finalize(ctx)["fct"]
    assert_losses_fall(method.fit_result.history, ("transfer",), window=10)
    assert facts["train_alignment"]["fitted"] > facts["train_alignment"]["raw"]
    (edge,) = method.compatibility_edges()
    assert edge.kind == "forward" and edge.arrays["w0"].shape == (64, 64) and edge.arrays["w1"].shape == (32, 64)
