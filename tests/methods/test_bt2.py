"""BT²: the basis transformation's invariants, the frozen teachers, the export, and short real runs."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from torch import nn

from compatembed.data import build_dataset, build_transform
from compatembed.errors import ConfigError
from compatembed.methods.base import MethodContext
from compatembed.methods.bt2 import BT2, BT2Embedder
from compatembed.models import EmbeddingModel, create_backbone
from compatembed.models.orthogonal import ORTHOGONAL_MAPS, orthogonality_error
from compatembed.models.version import load_model_version, module_sha256, save_model_version
from helpers.configs import compose_config
from helpers.models import TinyBackbone

D_OLD, D_NEW, K = 16, 24, 8  # the synthetic scenario: d_old != d_new, student f of 40 dims
TINY = ["data=synthetic", "model=cifar_resnet20", "trainer.progress=false", "logger=none", "trainer.checkpoint=false"]

pytestmark = pytest.mark.usefixtures("one_torch_thread")


# -- helpers ---------------------------------------------------------------------------------------
def tiny_student(embed_dim: int) -> EmbeddingModel:
    """A student on a 12-feature :class:`helpers.models.TinyBackbone`: exact and instant."""
    return EmbeddingModel(TinyBackbone(12), embed_dim=embed_dim)


def tiny_embedder(d_old: int, d_new: int, k: int, *, scale: float = 2.0, orthogonal_map: str = "matrix_exp") -> BT2Embedder:
    return BT2Embedder(tiny_student(d_old + d_new), d_old, d_new, k, scale, orthogonal_map)


def compose_train(overrides: list[str]) -> DictConfig:
    return compose_config("train", overrides)


def bt2_overrides(versions: dict[str, Path], *extra: str) -> list[str]:
    return TINY + [
        f"model.embed_dim={D_OLD + D_NEW}",
        "method=bt2",
        f"method.old_version={versions['old']}",
        f"method.new_reference_version={versions['new_ref']}",
        f"method.k={K}",
        f"paths.cache_dir={versions['cache']}",
        *extra,
    ]


def context(cfg: DictConfig, model: nn.Module) -> MethodContext:
    """The context ``train`` would give the method (same datasets, CPU)."""
    train_set = build_dataset(cfg.data, "train", transform=build_transform(model.preprocessing, train=True, augment="none"))
    return MethodContext(
        train_set=train_set,
        eval_view=lambda pre: build_dataset(cfg.data, "train", transform=build_transform(pre, train=False)),
        num_classes=int(cfg.data.num_classes),
        train_classes=list(range(int(cfg.data.num_classes))),
        device=torch.device("cpu"),
        batch_size=64,
        model_config=OmegaConf.to_container(cfg.model, resolve=True),  # type: ignore[arg-type]
        cache_dir=Path(cfg.paths.cache_dir),
    )


def build_method(versions: dict[str, Path], *extra: str, seed: int = 0) -> tuple[BT2, MethodContext, DictConfig]:
    """A BT² method on the synthetic versions, set up (teacher features cached on disk after the first call)."""
    cfg = compose_train(bt2_overrides(versions, *extra))
    torch.manual_seed(seed)
    model = instantiate(cfg.model)
    method = instantiate(cfg.method, model=model, num_classes=int(cfg.data.num_classes))
    ctx = context(cfg, model)
    method.setup(ctx)
    return method, ctx, cfg


def first_batch(ctx: MethodContext, size: int = 16) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A fixed mixed-class batch: (images, labels, positions in the training set)."""
    positions = torch.linspace(0, len(ctx.train_set) - 1, size).long()
    items = [ctx.train_set[int(i)] for i in positions]
    return torch.stack([x for x, _ in items]), torch.tensor([y for _, y in items]), positions


# -- the embedder: composition, orthogonality, prefix ----------------------------------------------
@pytest.mark.parametrize("d_old, d_new, k", [(8, 8, 4), (4, 8, 2), (8, 4, 6)])
def test_phi_is_u_then_v_recomputed_by_hand(d_old, d_new, k):
    torch.manual_seed(0)
    emb = tiny_embedder(d_old, d_new, k, scale=2.0)
    x = torch.randn(5, 3, 4, 4)
    with torch.no_grad():
        parts = emb.parts(x)
        f = emb.model(x)
        a = F.normalize(F.relu(f) @ emb.old_head.weight.T + emb.old_head.bias, dim=1)
        b = F.normalize(f[:, :d_new], dim=1)
        z = torch.cat([F.normalize(a[:, :k], dim=1), (2.0 * b) @ emb.basis_p.weight.T], dim=1)
        u = z[:, :d_old] @ emb.basis_o.weight.T
        v = z[:, d_old:]
        phi = emb(x)
    torch.testing.assert_close(parts.a, a)
    torch.testing.assert_close(parts.b, b)
    torch.testing.assert_close(parts.u, u)
    torch.testing.assert_close(parts.v, v)
    torch.testing.assert_close(phi, torch.cat([u, v], dim=1))
    assert phi.shape == (5, k + d_new) == (5, emb.embed_dim)
    assert u.shape == (5, d_old) and v.shape == (5, k + d_new - d_old)
    # orthonormal bases: |phi| = |z| = sqrt(1 + C^2) for every input
    torch.testing.assert_close(phi.norm(dim=1), torch.full((5,), math.sqrt(5.0)), atol=1e-5, rtol=0)
    torch.testing.assert_close(emb.embed(x), phi / math.sqrt(5.0), atol=1e-6, rtol=0)


def test_last_nonlin_makes_the_feature_non_negative_before_both_heads():
    torch.manual_seed(0)
    signed = tiny_embedder(4, 8, 2, scale=2.0)
    relu = tiny_embedder(4, 8, 2, scale=2.0)
    relu.load_state_dict(signed.state_dict())
    relu.last_nonlin = True
    x = torch.randn(6, 3, 4, 4)
    with torch.no_grad():
        f = signed.model(x)
        parts = relu.parts(x)
    assert (f < 0).any(), "the test needs a signed feature to be meaningful"
    torch.testing.assert_close(parts.f, F.relu(f))
    torch.testing.assert_close(parts.b, F.normalize(F.relu(f)[:, :8], dim=1))
    assert (parts.b >= 0).all() and not torch.allclose(parts.b, signed.parts(x).b)
    # the method exports the flag, so the deployed module is rebuilt the way it was trained
    assert BT2Embedder(signed.model, 4, 8, 2).last_nonlin is False  # versions written before the option


def test_old_gallery_prefix_is_u():
    torch.manual_seed(1)
    emb = tiny_embedder(D_OLD, D_NEW, K)
    x = torch.randn(7, 3, 4, 4)
    with torch.no_grad():
        deployed = emb.embed(x)
        u = emb.parts(x).u
    torch.testing.assert_close(F.normalize(deployed[:, :D_OLD], dim=1), F.normalize(u, dim=1), atol=1e-6, rtol=0)


@pytest.mark.parametrize("orthogonal_map", ORTHOGONAL_MAPS)
def test_bases_stay_orthogonal_through_optimizer_steps(orthogonal_map):
    torch.manual_seed(2)
    emb = tiny_embedder(6, 10, 4, orthogonal_map=orthogonal_map)
    start = {name: layer.weight.detach().clone() for name, layer in (("p", emb.basis_p), ("o", emb.basis_o))}
    opt = torch.optim.Adam(emb.parameters(), lr=0.05)
    x, target = torch.randn(32, 3, 4, 4), torch.randn(32, 14)
    for _ in range(30):
        loss = (emb(x) - target).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    for name, layer in (("p", emb.basis_p), ("o", emb.basis_o)):
        assert (layer.weight.detach() - start[name]).abs().max() > 1e-2  # the basis did move
        eye = torch.eye(layer.weight.shape[0])
        assert torch.linalg.matrix_norm(layer.weight.T @ layer.weight - eye) < 1e-5
        assert orthogonality_error(layer.weight) < 1e-5
    assert set(emb.orthogonality_errors()) == {"basis_p", "basis_o"}


def test_student_embed_dim_must_be_d_new_plus_d_old():
    student = tiny_student(30)
    with pytest.raises(ConfigError, match=r"model\.embed_dim=30") as info:
        BT2Embedder(student, D_OLD, D_NEW, K)
    assert "40" in str(info.value)


@pytest.mark.parametrize(
    "d_old, d_new, k, scale, orthogonal_map, message",
    [
        (8, 8, 0, 2.0, "matrix_exp", "1 <= k <= d_old"),
        (8, 8, 9, 2.0, "matrix_exp", "1 <= k <= d_old"),
        (12, 4, 6, 2.0, "matrix_exp", "d_old <= k \\+ d_new"),
        (8, 8, 4, 0.0, "matrix_exp", "scale > 0"),
        (8, 8, 4, 2.0, "qr", "unknown orthogonal_map='qr'"),
    ],
)
def test_inconsistent_sizes_are_config_errors(d_old, d_new, k, scale, orthogonal_map, message):
    student = tiny_student(d_old + d_new)
    with pytest.raises(ConfigError, match=message):
        BT2Embedder(student, d_old, d_new, k, scale, orthogonal_map)


# -- the method on synthetic model versions ---------------------------------------------------------
@pytest.fixture(scope="module")
def versions(tmp_path_factory) -> dict[str, Path]:
    """Old model (classes 0-4, 16-d) and an independent new model (0-9, 24-d), a few steps each."""
    from compatembed.training.run import train

    root = tmp_path_factory.mktemp("bt2_runs")
    out: dict[str, Path] = {"cache": root / "cache"}
    for name, extra in (
        ("old", ["data.classes=0-4", f"model.embed_dim={D_OLD}"]),
        ("new_ref", [f"model.embed_dim={D_NEW}", f"method.old_version={root / 'old'}"]),
    ):
        cfg = compose_train(
            TINY + extra + ["trainer.epochs=1", "trainer.max_steps_per_epoch=3", f"version_id={name}",
                            f"output_dir={root / name}", f"paths.cache_dir={out['cache']}"]
        )
        out[name] = train(cfg)
    return out


def test_missing_versions_and_negative_weights_are_config_errors(versions):
    student = tiny_student(D_OLD + D_NEW)
    with pytest.raises(ConfigError, match="method.old_version"):
        BT2(student, 10, new_reference_version=str(versions["new_ref"]))
    with pytest.raises(ConfigError, match="method.new_reference_version"):
        BT2(student, 10, old_version=str(versions["old"]))
    with pytest.raises(ConfigError, match="method.influence_weight must be >= 0"):
        BT2(student, 10, old_version=str(versions["old"]), new_reference_version=str(versions["new_ref"]), influence_weight=-1)
    # sizes read from the manifests: 16 + 24 = 40, so a 30-d student is refused by name
    with pytest.raises(ConfigError, match=r"model\.embed_dim=30"):
        BT2(tiny_student(30), 10, old_version=str(versions["old"]),
            new_reference_version=str(versions["new_ref"]))


def test_declared_sizes_are_checked_against_the_loaded_versions(versions):
    cfg = compose_train(bt2_overrides(versions, "method.d_old=20", "method.d_new=20"))
    model = instantiate(cfg.model)
    method = instantiate(cfg.method, model=model, num_classes=10)
    with pytest.raises(ConfigError, match="method.d_old=20 but the old version"):
        method.setup(context(cfg, model))


def test_teachers_stay_frozen_unchanged_and_without_gradients(versions):
    method, ctx, _ = build_method(versions)
    teachers = method.frozen_modules()
    assert set(teachers) == {"old_model", "new_reference_model"}
    before = method.frozen_hashes()
    assert before["old_model"] == module_sha256(load_model_version(versions["old"]).model)
    teacher_params = {id(p) for t in teachers.values() for p in t.parameters()}
    trainable = method.trainable_parameters()
    assert teacher_params and not teacher_params & {id(p) for p in trainable}
    student_before = method.model.projection.weight.detach().clone()

    opt = torch.optim.Adam(trainable, lr=1e-2)
    images, labels, indices = first_batch(ctx)
    method.train()
    for _ in range(3):
        terms, _ = method.training_forward(images, labels, indices)
        loss = torch.stack(list(terms.values())).sum()
        opt.zero_grad()
        loss.backward()
        opt.step()

    assert method.frozen_hashes() == before
    assert (method.model.projection.weight - student_before).abs().max() > 1e-6  # the student did train
    for teacher in teachers.values():
        assert not teacher.training
        assert all(not p.requires_grad and p.grad is None for p in teacher.parameters())


@pytest.mark.parametrize(
    "key, term",
    [("ce_weight", "ce"), ("influence_weight", "influence"), ("old_alignment_weight", "old_align"),
     ("new_alignment_weight", "new_align")],
)
def test_each_weight_scales_its_own_term(versions, key, term):
    base, ctx, cfg = build_method(versions)
    changed, _, _ = build_method(versions, f"method.{key}={3 * float(cfg.method[key])}")
    batch = first_batch(ctx)
    with torch.no_grad():
        base_terms, _ = base.training_forward(*batch)
        new_terms, _ = changed.training_forward(*batch)
    assert base_terms[term] > 0
    for name in base_terms:
        expected = 3 * base_terms[name] if name == term else base_terms[name]
        torch.testing.assert_close(new_terms[name], expected)
    assert sum(new_terms.values()) != sum(base_terms.values())


def test_label_smoothing_changes_the_classification_term(versions):
    base, ctx, _ = build_method(versions)
    smoothed, _, _ = build_method(versions, "method.label_smoothing=0.3")
    batch = first_batch(ctx)
    with torch.no_grad():
        a, _ = base.training_forward(*batch)
        b, _ = smoothed.training_forward(*batch)
    assert not torch.isclose(a["ce"], b["ce"])
    torch.testing.assert_close(a["influence"], b["influence"])


@pytest.mark.parametrize("orthogonal_map", ORTHOGONAL_MAPS)
def test_export_and_load_give_identical_embeddings(versions, orthogonal_map, tmp_path):
    method, ctx, cfg = build_method(versions, f"method.orthogonal_map={orthogonal_map}")
    opt = torch.optim.Adam(method.trainable_parameters(), lr=1e-2)
    batch = first_batch(ctx)
    for _ in range(2):  # move the bases away from their initial value
        loss = torch.stack(list(method.training_forward(*batch)[0].values())).sum()
        opt.zero_grad()
        loss.backward()
        opt.step()
    deployed = method.deployed_model().eval()
    model_cfg = OmegaConf.to_container(cfg.model, resolve=True)
    out = save_model_version(
        tmp_path / "v", version_id="bt2", model=deployed, model_config=method.deployed_config(model_cfg),
        embed_dim=deployed.embed_dim, normalized=True, preprocessing=deployed.preprocessing.to_dict(),
        training={}, parent=method.parent_version_id, edges=method.compatibility_edges(),
    )
    loaded = load_model_version(out)
    assert isinstance(loaded.model, BT2Embedder) and loaded.embed_dim == K + D_NEW
    assert loaded.model.orthogonal_map == orthogonal_map
    with torch.no_grad():
        torch.testing.assert_close(loaded.model.embed(batch[0]), deployed.embed(batch[0]), atol=0, rtol=0)
    assert loaded.manifest["compatibility"] == [{"kind": "prefix", "target": "old", "dim": D_OLD}]


def test_training_exports_a_bt2_version_that_eval_routes_by_prefix(versions, tmp_path, monkeypatch):
    from compatembed.embeddings import load_or_extract
    from compatembed.eval.pair_report import evaluate
    from compatembed.eval.pairs import route_pair
    from compatembed.training.run import train

    monkeypatch.chdir(tmp_path)
    cfg = compose_train(bt2_overrides(versions, "trainer.epochs=1", "trainer.max_steps_per_epoch=3",
                                      "version_id=bt2", f"output_dir={tmp_path / 'bt2'}"))
    out = train(cfg)
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["model"]["_target_"] == "compatembed.methods.bt2.BT2Embedder"
    assert manifest["embedding"]["dim"] == K + D_NEW and manifest["parent"] == "old"
    assert manifest["compatibility"] == [{"kind": "prefix", "target": "old", "dim": D_OLD}]
    training = manifest["training"]
    assert set(training["frozen_model_sha256"]) == {"old_model", "new_reference_model"}
    assert training["bt2"]["new_reference_version"] == "new_ref"
    assert max(training["bt2"]["orthogonality_error"].values()) < 1e-5
    epoch_terms = {"train/ce_epoch", "train/influence_epoch", "train/old_align_epoch", "train/new_align_epoch"}
    assert epoch_terms <= set(training["summary"])

    eval_cfg = _compose_eval([f"query={out}", f"gallery={versions['old']}", f"out={tmp_path / 'rep'}"])
    report = evaluate(eval_cfg)
    pairs = {(r["query"], r["gallery"]): r for r in report["pairs"]}
    assert pairs[("new", "old")]["route"] == "query: prefix"
    assert 0.0 < pairs[("new", "old")]["mAP"] <= 1.0

    # the routed query vectors are û of the loaded module
    new = load_or_extract(out, eval_cfg.data, "test", device="cpu", progress=False)
    old = load_or_extract(versions["old"], eval_cfg.data, "test", device="cpu", progress=False)
    routed, _, _ = route_pair(new, old)
    loaded = load_model_version(out).model
    test_set = build_dataset(eval_cfg.data, "test", transform=build_transform(loaded.preprocessing, train=False))
    images = torch.stack([test_set[i][0] for i in range(8)])
    with torch.no_grad():
        u_hat = F.normalize(loaded.parts(images).u, dim=1).numpy()
    np.testing.assert_allclose(routed[:8], u_hat, atol=1e-5)


def _compose_eval(overrides: list[str]) -> DictConfig:
    return compose_config("eval", ["data=synthetic", "progress=false", "device=cpu", *overrides])


@pytest.mark.parametrize("experiment", ["cifar10_bt2", "cifar10_external_bt2", "cifar100_bt2_paper", "imagenet_bt2_paper"])
def test_experiments_compose_with_consistent_sizes(experiment):
    cfg = compose_train([f"experiment={experiment}"])
    method = cfg.method
    assert method._target_ == "compatembed.methods.bt2.BT2"
    assert cfg.model.embed_dim == method.d_old + method.d_new
    assert "independent_new" in method.new_reference_version and "independent" not in cfg.version_id
    if experiment.startswith("cifar10_"):  # cheap to build: the method's own size checks pass
        student = instantiate(cfg.model)
        bt2 = instantiate(method, model=student, num_classes=int(cfg.data.num_classes))
        assert bt2.deployed_model().embed_dim == method.k + method.d_new


# -- a short run on real data ------------------------------------------------------------------------
def test_a_short_run_on_real_data_lowers_every_loss_term(external_version, small_cifar_context, short_run, assert_losses_fall):
    """Old = third-party ResNet-20 (64-d), new reference = third-party ResNet-32 (64-d), student = a fresh ResNet-8."""
    old = external_version("old", depth=20)
    new_ref = external_version("new_ref", depth=32)
    torch.manual_seed(0)
    student = EmbeddingModel(create_backbone("cifar_resnet", depth=8, num_classes=10), embed_dim=128)
    method = BT2(student, 10, old_version=str(old), new_reference_version=str(new_ref), k=16)
    ctx = small_cifar_context(student.preprocessing, per_class=20, batch_size=100)
    method.setup(ctx)
    history = short_run(method, ctx.train_set, steps=25, batch_size=40, lr=5e-3)  # 5 epochs of 5 batches of 40
    assert_losses_fall(history, ("ce", "influence", "old_align", "new_align"))
