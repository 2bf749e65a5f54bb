"""BT² (Zhou et al., ICCV 2023): backward-compatible training with basis transformation.

Three models take part: the frozen deployed old model φ_old, a frozen *independently trained* new
model φ_new' (the new space the student should keep), and the student. The student's backbone emits
``f`` of ``d_new + d_old`` dimensions; two learnable orthonormal bases mix a part that matches the old
space with a part that matches φ_new' and add only ``k`` dimensions to the new embedding:

```
f = relu(backbone(x))                    (N, d_new + d_old), non-negative (last_nonlin), not normalised
a = normalize(Linear_bias(relu(f)))      (N, d_old)   matches φ_old
b = normalize(f[:, :d_new])              (N, d_new)   matches φ_new'
z = concat(normalize(a[:, :k]), B_p(C·b))  (N, k + d_new), B_p orthogonal d_new × d_new
u = B_o(z[:, :d_old]);  v = z[:, d_old:]   B_o orthogonal d_old × d_old
φ_BT2 = concat(u, v)                      (N, k + d_new), the deployed embedding
logits = W_out · b
```

Loss (weights 1 / 10 / 5 / 1 of the notes, each from the config):
``CE(logits, y) + 10·CE(û·Pᵀ, y) + 5·(1 − cos(φ_old(x), û)) + 1·(1 − cos(φ_new'(x), b))`` with ``P`` the
pseudo classifier (class means of the old model's features on the new training set) and both
teachers' features cached once. The published code's backbone ends in a ReLU (its ``last_nonlin``), so
``f`` is non-negative there; the student here ends in a linear projection, so ``last_nonlin=True`` (the
method's default) applies that ReLU explicitly and ``last_nonlin=False`` keeps the signed projection.
An old gallery is searched with ``normalize(φ_BT2[:d_old]) = û``
(a ``prefix`` edge of dim ``d_old``); new-to-new search uses all of φ_BT2.
"""

from __future__ import annotations

import logging
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from compatembed.errors import ConfigError, DataError
from compatembed.methods.base import Method, MethodContext, class_prototypes
from compatembed.models.heads import Classifier
from compatembed.models.orthogonal import orthogonal_linear, orthogonality_error
from compatembed.models.version import CompatibilityEdge, LoadedVersion, deployable, load_manifest, load_model_version

_logger = logging.getLogger(__name__)


class BT2Parts(NamedTuple):
    """Every intermediate of the BT² student on one batch (shapes for a batch of N).

    Attributes:
        f: (N, d_new + d_old) student feature (after the ReLU when ``last_nonlin``).
        a: (N, d_old) normalised old-matching head.
        b: (N, d_new) normalised new-matching feature (the classifier's input).
        z: (N, k + d_new) concat(normalize(a[:k]), B_p(C·b)).
        u: (N, d_old) B_o(z[:d_old]), the part compatible with the old model.
        v: (N, k + d_new - d_old) z[d_old:].
        phi: (N, k + d_new) concat(u, v), unnormalised (its norm is sqrt(1 + C²)).
    """

    f: torch.Tensor
    a: torch.Tensor
    b: torch.Tensor
    z: torch.Tensor
    u: torch.Tensor
    v: torch.Tensor
    phi: torch.Tensor


@deployable
class BT2Embedder(nn.Module):
    """The deployed BT² module: a student embedding model plus its head and orthonormal bases.

    Args:
        model: The student (e.g. :class:`~compatembed.models.EmbeddingModel`) whose unnormalised
            ``forward`` gives ``f`` with ``embed_dim == d_new + d_old``; needs ``preprocessing``.
        d_old: Dimension of the old model's embedding.
        d_new: Dimension of the independently trained new model's embedding.
        k: Extra dimensions added on top of ``d_new`` (``1 <= k <= d_old``; 32 in the paper).
        scale: The constant ``C`` that weighs the new part against the unit-norm added part (2).
        orthogonal_map: How ``B_p`` and ``B_o`` are parametrised (see :data:`compatembed.models.orthogonal.ORTHOGONAL_MAPS`).
        normalize: Whether :meth:`embed` L2-normalises φ_BT2 (retrieval by cosine similarity).
        last_nonlin: ReLU on the student's feature ``f`` (the published code's non-negative feature);
            ``False`` (what versions written before the option was added hold) keeps it signed.

    Attributes:
        embed_dim: ``k + d_new``, the width of the deployed embedding.
        preprocessing: The student's preprocessing.
        old_head: ``Linear_bias(d_new + d_old → d_old)``, producing ``a`` from ``relu(f)``.
        basis_p: ``B_p``, orthogonal ``d_new × d_new``.
        basis_o: ``B_o``, orthogonal ``d_old × d_old``.

    Raises:
        ConfigError: A size is inconsistent: the student's ``embed_dim`` is not ``d_new + d_old``,
            ``k`` is outside ``[1, d_old]``, ``d_old > k + d_new`` (then ``u`` would not fit in
            ``z``), ``scale <= 0``, or the orthogonal map is unknown.
    """

    def __init__(
        self,
        model: nn.Module,
        d_old: int,
        d_new: int,
        k: int = 32,
        scale: float = 2.0,
        orthogonal_map: str = "matrix_exp",
        *,
        normalize: bool = True,
        last_nonlin: bool = False,
    ) -> None:
        super().__init__()
        d_old, d_new, k = int(d_old), int(d_new), int(k)
        for attr in ("embed_dim", "preprocessing"):
            if not hasattr(model, attr):
                raise ConfigError(f"BT² student {type(model).__name__} has no attribute {attr!r}")
        if d_old < 1 or d_new < 1:
            raise ConfigError(f"BT² needs positive d_old and d_new, got d_old={d_old}, d_new={d_new}")
        if int(model.embed_dim) != d_new + d_old:
            raise ConfigError(
                f"BT² needs the student's model.embed_dim = d_new + d_old = {d_new} + {d_old} = {d_new + d_old}, "
                f"got model.embed_dim={int(model.embed_dim)}"
            )
        if not 1 <= k <= d_old:
            raise ConfigError(f"BT² needs 1 <= k <= d_old = {d_old}, got k={k}")
        if d_old > k + d_new:
            raise ConfigError(f"BT² needs d_old <= k + d_new, got d_old={d_old} > k + d_new = {k} + {d_new}")
        if not scale > 0:
            raise ConfigError(f"BT² needs scale > 0, got scale={scale}")
        self.model = model
        self.d_old, self.d_new, self.k = d_old, d_new, k
        self.scale = float(scale)
        self.orthogonal_map = orthogonal_map
        self.old_head = nn.Linear(d_new + d_old, d_old, bias=True)
        self.basis_p = orthogonal_linear(d_new, bias=False, orthogonal_map=orthogonal_map)
        self.basis_o = orthogonal_linear(d_old, bias=False, orthogonal_map=orthogonal_map)
        self.embed_dim = k + d_new
        self.normalize = bool(normalize)
        self.last_nonlin = bool(last_nonlin)
        self.preprocessing = model.preprocessing

    def compose(self, a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """The basis transformation from the two matched parts.

        Args:
            a: (N, d_old) normalised old-matching head.
            b: (N, d_new) normalised new-matching feature.

        Returns:
            ``(z, u, v, phi)`` with shapes (N, k + d_new), (N, d_old), (N, k + d_new - d_old), (N, k + d_new).
        """
        z = torch.cat([F.normalize(a[:, : self.k], dim=1), self.basis_p(self.scale * b)], dim=1)
        u = self.basis_o(z[:, : self.d_old])
        v = z[:, self.d_old :]
        return z, u, v, torch.cat([u, v], dim=1)

    def parts(self, x: torch.Tensor) -> BT2Parts:
        """All intermediates for a batch of images ``(N, C, H, W)`` (training uses ``a``, ``b``, ``u``)."""
        f = self.model(x)
        if self.last_nonlin:
            f = F.relu(f)
        a = F.normalize(self.old_head(F.relu(f)), dim=1)
        b = F.normalize(f[:, : self.d_new], dim=1)
        z, u, v, phi = self.compose(a, b)
        return BT2Parts(f=f, a=a, b=b, z=z, u=u, v=v, phi=phi)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """φ_BT2, unnormalised: ``(N, C, H, W)`` -> ``(N, k + d_new)``."""
        return self.parts(x).phi

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """The deployed embedding ``(N, k + d_new)``; L2-normalised when ``normalize`` is set.

        ``‖φ_BT2‖ = sqrt(1 + C²)`` for every input (orthonormal bases), so normalising divides by a
        constant and the old-space prefix ``normalize(φ[:d_old])`` is exactly ``û``.
        """
        phi = self.forward(x)
        return F.normalize(phi, dim=1) if self.normalize else phi

    def orthogonality_errors(self) -> dict[str, float]:
        """``‖QᵀQ − I‖_F`` of ``B_p`` and ``B_o``."""
        return {"basis_p": orthogonality_error(self.basis_p.weight), "basis_o": orthogonality_error(self.basis_o.weight)}

    def extra_repr(self) -> str:
        return (
            f"d_old={self.d_old}, d_new={self.d_new}, k={self.k}, scale={self.scale}, "
            f"orthogonal_map={self.orthogonal_map!r}, embed_dim={self.embed_dim}, normalize={self.normalize}"
        )


def _version_dim(version_dir: str, key: str) -> int:
    """The embedding dimension a version's manifest declares (no weights loaded)."""
    manifest = load_manifest(version_dir)
    try:
        return int(manifest["embedding"]["dim"])
    except (KeyError, TypeError, ValueError) as exc:
        raise ConfigError(f"{key}={version_dir}: its manifest declares no embedding dim") from exc


class BT2(Method):
    """BT²: distil the old model and an independent new model into one student through orthonormal bases.

    Args:
        model: The student; its config must set ``embed_dim = d_new + d_old`` (unnormalised ``f``).
        num_classes: Size of the label space.
        old_version: The deployed old model's version directory (required).
        new_reference_version: The independently trained new model's version directory (required).
        d_old: The old embedding size; ``None`` reads it from ``old_version``'s manifest. Checked
            against the loaded model in :meth:`setup`.
        d_new: The independent new model's embedding size; ``None`` reads it from
            ``new_reference_version``'s manifest. Checked in :meth:`setup`.
        k: Added dimensions (32).
        scale: The constant ``C`` (2).
        orthogonal_map: Parametrisation of ``B_p`` and ``B_o`` (``matrix_exp`` as in the code).
        ce_weight: Weight of the classification ``CE(W_out·b, y)`` (1).
        influence_weight: Weight of the pseudo-classifier influence ``CE(û·Pᵀ, y)`` (10).
        old_alignment_weight: Weight of ``1 − cos(φ_old(x), û)`` (5).
        new_alignment_weight: Weight of ``1 − cos(φ_new'(x), b)`` (1).
        label_smoothing: Label smoothing of the classification CE (0: the public trainer's plain CE).
        last_nonlin: ReLU on the student's feature before the heads, as the published backbone's
            last block (see :class:`BT2Embedder`).

    Raises:
        ConfigError: A version is missing from the config, a weight is negative, or a size is
            inconsistent (see :class:`BT2Embedder`).
    """

    name = "bt2"

    def __init__(
        self,
        model: nn.Module,
        num_classes: int,
        *,
        old_version: str | None = None,
        new_reference_version: str | None = None,
        d_old: int | None = None,
        d_new: int | None = None,
        k: int = 32,
        scale: float = 2.0,
        orthogonal_map: str = "matrix_exp",
        ce_weight: float = 1.0,
        influence_weight: float = 10.0,
        old_alignment_weight: float = 5.0,
        new_alignment_weight: float = 1.0,
        label_smoothing: float = 0.0,
        last_nonlin: bool = True,
    ) -> None:
        super().__init__(model, num_classes, old_version=old_version)
        if old_version is None:
            raise ConfigError("method 'bt2' needs method.old_version=<old model version dir>")
        if new_reference_version is None:
            raise ConfigError("method 'bt2' needs method.new_reference_version=<independently trained new model version dir>")
        weights = {
            "ce_weight": ce_weight,
            "influence_weight": influence_weight,
            "old_alignment_weight": old_alignment_weight,
            "new_alignment_weight": new_alignment_weight,
        }
        for key, value in weights.items():
            if value < 0:
                raise ConfigError(f"method.{key} must be >= 0, got {value}")
        if not 0.0 <= label_smoothing < 1.0:
            raise ConfigError(f"method.label_smoothing must be in [0, 1), got {label_smoothing}")
        self.new_reference_path = str(new_reference_version)
        d_old = _version_dim(old_version, "method.old_version") if d_old is None else int(d_old)
        d_new = _version_dim(self.new_reference_path, "method.new_reference_version") if d_new is None else int(d_new)
        self.embedder = BT2Embedder(model, d_old, d_new, k, scale, orthogonal_map, last_nonlin=last_nonlin)
        self.classifier = Classifier(d_new, self.num_classes)
        self.ce_weight = float(ce_weight)
        self.influence_weight = float(influence_weight)
        self.old_alignment_weight = float(old_alignment_weight)
        self.new_alignment_weight = float(new_alignment_weight)
        self.label_smoothing = float(label_smoothing)
        self.new_reference: LoadedVersion | None = None
        # teachers' per-item features and the pseudo classifier: filled by setup, moved by .to()
        self.register_buffer("old_features", None, persistent=False)
        self.register_buffer("new_features", None, persistent=False)
        self.register_buffer("prototypes", None, persistent=False)

    @property
    def d_old(self) -> int:
        return self.embedder.d_old

    @property
    def d_new(self) -> int:
        return self.embedder.d_new

    def setup(self, ctx: MethodContext) -> None:
        """Load and freeze both teachers, cache their features and build the pseudo classifier P."""
        old = self.load_old(required=True)
        assert old is not None
        if old.embed_dim != self.d_old:
            raise ConfigError(f"method.d_old={self.d_old} but the old version {old.path} has embedding dim {old.embed_dim}")
        self.new_reference = load_model_version(self.new_reference_path)
        if self.new_reference.embed_dim != self.d_new:
            raise ConfigError(
                f"method.d_new={self.d_new} but the new reference version {self.new_reference.path} "
                f"has embedding dim {self.new_reference.embed_dim}"
            )
        self.add_frozen("new_reference_model", self.new_reference.model)

        labels = ctx.labels()
        old_features = ctx.features(self.old_model, name="old")
        new_features = ctx.features(self.new_reference_model, name="new_reference")
        for name, feats, dim in (("old", old_features, self.d_old), ("new_reference", new_features, self.d_new)):
            if tuple(feats.shape) != (len(labels), dim):
                raise DataError(f"{name} teacher features have shape {tuple(feats.shape)}, expected ({len(labels)}, {dim})")
        self.old_features = old_features.to(ctx.device)
        self.new_features = new_features.to(ctx.device)
        self.prototypes = class_prototypes(old_features, labels, self.num_classes).to(ctx.device)
        _logger.info(
            "BT²: d_old=%d d_new=%d k=%d, deployed dim %d; teachers %s and %s, %d cached items",
            self.d_old, self.d_new, self.embedder.k, self.embedder.embed_dim, old.version_id,
            self.new_reference.version_id, len(labels),
        )

    def loss_terms(
        self, images: torch.Tensor, labels: torch.Tensor, indices: torch.Tensor
    ) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        """Unweighted loss terms and diagnostics of one batch.

        Returns:
            ``({"ce", "influence", "old_align", "new_align"}`` → scalar tensors, diagnostics).
        """
        if self.old_features is None or self.new_features is None or self.prototypes is None:
            raise RuntimeError("BT2.setup(ctx) must run before training")  # a bug of the caller
        parts = self.embedder.parts(images)
        b = parts.b.float()
        u_hat = F.normalize(parts.u.float(), dim=1)
        logits = self.classifier(parts.b).float()
        old_cos = (self.old_features[indices] * u_hat).sum(dim=1).mean()
        new_cos = (self.new_features[indices] * b).sum(dim=1).mean()
        terms = {
            "ce": F.cross_entropy(logits, labels, label_smoothing=self.label_smoothing),
            "influence": F.cross_entropy(u_hat @ self.prototypes.T, labels),
            "old_align": 1.0 - old_cos,
            "new_align": 1.0 - new_cos,
        }
        diagnostics = {"acc": (logits.argmax(dim=1) == labels).float().mean(), "old_cos": old_cos, "new_cos": new_cos}
        return terms, diagnostics

    def training_forward(
        self, images: torch.Tensor, labels: torch.Tensor, indices: torch.Tensor
    ) -> tuple[dict[str, torch.Tensor], dict[str, float]]:
        terms, diagnostics = self.loss_terms(images, labels, indices)
        weights = {
            "ce": self.ce_weight,
            "influence": self.influence_weight,
            "old_align": self.old_alignment_weight,
            "new_align": self.new_alignment_weight,
        }
        weighted = {name: weights[name] * value for name, value in terms.items()}
        return weighted, {name: float(value.detach()) for name, value in diagnostics.items()}

    def finalize(self, ctx: MethodContext) -> dict[str, Any]:
        """Record the BT² sizes, the reference model and how orthogonal the bases ended up."""
        errors = self.embedder.orthogonality_errors()
        _logger.info("BT² bases: ‖QᵀQ − I‖_F = %s", errors)
        return {
            "bt2": {
                "d_old": self.d_old,
                "d_new": self.d_new,
                "k": self.embedder.k,
                "scale": self.embedder.scale,
                "orthogonal_map": self.embedder.orthogonal_map,
                "new_reference_version": self.new_reference.version_id if self.new_reference is not None else None,
                "new_reference_version_dir": self.new_reference_path,
                "orthogonality_error": errors,
            }
        }

    def deployed_model(self) -> nn.Module:
        return self.embedder

    def deployed_config(self, model_config: dict[str, Any]) -> dict[str, Any]:
        """A config that rebuilds :class:`BT2Embedder` around the student's config."""
        return {
            "_target_": f"{BT2Embedder.__module__}.{BT2Embedder.__qualname__}",
            "model": model_config,
            "d_old": self.d_old,
            "d_new": self.d_new,
            "k": self.embedder.k,
            "scale": self.embedder.scale,
            "orthogonal_map": self.embedder.orthogonal_map,
            "normalize": self.embedder.normalize,
            "last_nonlin": self.embedder.last_nonlin,
        }

    def compatibility_edges(self) -> list[CompatibilityEdge]:
        """φ_BT2[:d_old] = u, renormalised, lives in the old space."""
        parent = self.parent_version_id
        assert parent is not None  # old_version is required
        return [CompatibilityEdge(kind="prefix", other=parent, dim=self.d_old)]
