"""FCT (Ramanujan et al., CVPR 2022, "Forward Compatible Training"): upgrade the old gallery, not the query.

The new model is trained independently in the run (cross-entropy, like ``Independent``) or adopted from
``new_version``; afterwards an MLP ``h`` is fitted on cached training features to map an old embedding
into the new space: ``L = MSE(φ_new(x), h(φ_old(x), ψ(x)))`` (or ``1 − cos``). The index service then
upgrades a stored old gallery without the images by applying ``h`` to each stored vector (the
``forward`` edge of the new version's manifest), and new queries search the upgraded gallery.
An optional supervised contrastive term (``supcon_weight``, not in the paper) also pulls ``h(φ_old(x))``
toward the batch's new vectors of x's class; the ``fct_supcon`` sweep chose it for ``cifar10_fct``.

Side information ψ(x): features of another frozen model version (``side_info_version``), L2-normalised and
concatenated to the old embedding at the input of ``h``. The forward edge's input is then ``concat(old, ψ)``
(d_old + d_side dims; the edge's ``side_input`` names ψ's version and size): a gallery can only be upgraded
where the ψ vectors of its items are at hand too. ``compatembed-eval`` embeds the gallery with ψ's version as
well and applies the edge; the index service, which stores one vector per item, registers the version but
follows no route through it.

BatchNorm: in eval mode it is a fixed affine layer, so the exported arrays fold it into the linear layer
before it (``w0, b0, w1, b1, ...``). ``batchnorm_mode: batch`` trains with batch statistics (the paper's
MLP); ``fixed`` trains the MLP in eval mode as the public code does, where BatchNorm uses its initial
running statistics (mean 0, variance 1) and only its affine parameters learn.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from compatembed.errors import ConfigError
from compatembed.methods.base import MethodContext
from compatembed.methods.maps import cross_supervised_contrastive, first_last_means, mean_cosine, shuffled_batches
from compatembed.methods.post_hoc import PostHocMapMethod
from compatembed.models.version import CompatibilityEdge, LoadedVersion, load_model_version

_logger = logging.getLogger(__name__)

ACTIVATIONS = {"relu": nn.ReLU, "gelu": nn.GELU}
"""Activations the index service can apply (``relu``, exact-erf ``gelu``)."""
BATCHNORM_MODES = ("batch", "fixed")
LOSSES = ("mse", "cosine")


def fold_batchnorm(weight: torch.Tensor, bias: torch.Tensor, bn: nn.BatchNorm1d) -> tuple[torch.Tensor, torch.Tensor]:
    """Fold an eval-mode BatchNorm that follows ``x ↦ weight @ x + bias`` into one affine layer.

    ``BN(z) = γ (z − μ) / sqrt(σ² + ε) + β`` with the running μ, σ², so with ``s = γ / sqrt(σ² + ε)``:
    ``weight' = diag(s) · weight`` and ``bias' = s · (bias − μ) + β``.

    Args:
        weight: (out, in) linear weight.
        bias: (out,) linear bias.
        bn: the BatchNorm1d(out) after it (its running statistics are used).

    Returns:
        ``(weight', bias')`` of the same shapes.
    """
    if bn.running_mean is None or bn.running_var is None:
        raise ConfigError("cannot fold a BatchNorm without running statistics (track_running_stats=False)")
    scale = torch.rsqrt(bn.running_var + bn.eps)
    shift = -bn.running_mean * scale
    if bn.affine:
        scale, shift = scale * bn.weight, shift * bn.weight + bn.bias
    return weight * scale[:, None], bias * scale + shift


class ForwardMLP(nn.Module):
    """``h``: Linear → [BatchNorm] → activation, repeated, then a final Linear (no norm, no activation).

    Args:
        in_dim: input size (d_old, plus d_side with side information).
        out_dim: output size (d_new).
        hidden_dims: widths of the hidden layers; ``()`` is a linear (affine) forward map.
        activation: ``relu`` or ``gelu``.
        batch_norm: put a BatchNorm1d after every hidden linear layer.
    """

    def __init__(
        self, in_dim: int, out_dim: int, hidden_dims: Sequence[int] = (512,), *, activation: str = "relu", batch_norm: bool = True
    ) -> None:
        super().__init__()
        if activation not in ACTIVATIONS:
            raise ConfigError(f"unknown fct activation {activation!r}; known: {', '.join(ACTIVATIONS)}")
        dims = [int(in_dim), *(int(h) for h in hidden_dims), int(out_dim)]
        if min(dims) < 1:
            raise ConfigError(f"fct layer widths must be positive, got {dims}")
        self.activation = activation
        self.linears = nn.ModuleList(nn.Linear(a, b) for a, b in zip(dims[:-1], dims[1:]))
        self.norms = nn.ModuleList(
            nn.BatchNorm1d(b) if batch_norm else nn.Identity() for b in dims[1:-1]
        )
        self.act = ACTIVATIONS[activation]()

    @property
    def in_dim(self) -> int:
        return int(self.linears[0].in_features)

    @property
    def out_dim(self) -> int:
        return int(self.linears[-1].out_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(N, in_dim) → (N, out_dim), not normalised."""
        for linear, norm in zip(self.linears[:-1], self.norms):
            x = self.act(norm(linear(x)))
        return self.linears[-1](x)

    @torch.no_grad()
    def exported(self) -> dict[str, np.ndarray]:
        """The eval-mode map as arrays ``w0, b0, w1, b1, ...`` (``w_i`` (out, in)), BatchNorm folded in."""
        arrays: dict[str, np.ndarray] = {}
        for i, linear in enumerate(self.linears):
            w, b = linear.weight.detach().double(), linear.bias.detach().double()
            if i < len(self.norms) and isinstance(self.norms[i], nn.BatchNorm1d):
                w, b = fold_batchnorm(w, b, _bn64(self.norms[i]))
            arrays[f"w{i}"] = w.cpu().numpy().astype(np.float32)
            arrays[f"b{i}"] = b.cpu().numpy().astype(np.float32)
        return arrays


def _bn64(bn: nn.BatchNorm1d) -> nn.BatchNorm1d:
    """A float64 copy of ``bn`` (folding in double precision keeps the exported arrays exact to float32)."""
    copy = nn.BatchNorm1d(bn.num_features, eps=bn.eps, affine=bn.affine, dtype=torch.float64).to(bn.running_mean.device)
    copy.load_state_dict({k: v.double() if v.is_floating_point() else v for k, v in bn.state_dict().items()})
    return copy.eval()


def forward_loss(mapped: torch.Tensor, target: torch.Tensor, loss: str = "mse") -> torch.Tensor:
    """``mse``: mean over elements of (h − φ_new)² (FCT's loss); ``cosine``: mean 1 − cos(h, φ_new)."""
    if loss == "mse":
        return F.mse_loss(mapped, target)
    if loss == "cosine":
        return (1 - F.cosine_similarity(mapped, target, dim=1)).mean()
    raise ConfigError(f"unknown fct loss {loss!r}; known: {', '.join(LOSSES)}")


@torch.no_grad()
def recalibrate_batchnorm(mlp: ForwardMLP, source: torch.Tensor, *, chunk: int = 65536) -> None:
    """Set each BatchNorm's running statistics to the exact statistics of its input over ``source``.

    The running averages of training trail the weights of the last steps; after recalibration the
    eval-mode map (the one exported) normalises with the statistics of the fitted network on the
    whole training set. Layers are calibrated in order, each with the already-calibrated ones before it.

    Args:
        mlp: the fitted MLP (left in eval mode).
        source: (N, in_dim) the fit's inputs.
    """
    mlp.eval()
    n = source.shape[0]
    for layer, norm in enumerate(mlp.norms):
        if not isinstance(norm, nn.BatchNorm1d):
            continue
        total = torch.zeros(norm.num_features, dtype=torch.float64, device=source.device)
        squares = torch.zeros_like(total)
        for start in range(0, n, chunk):
            h = source[start : start + chunk]
            for i in range(layer):
                h = mlp.act(mlp.norms[i](mlp.linears[i](h)))
            z = mlp.linears[layer](h).double()
            total += z.sum(0)
            squares += z.square().sum(0)
        mean = total / n
        var = (squares / n - mean.square()).clamp(min=0) * (n / max(1, n - 1))  # unbiased, as BatchNorm keeps it
        norm.running_mean.copy_(mean)
        norm.running_var.copy_(var)


@dataclass
class ForwardFit:
    """A fitted forward map and what the fit measured.

    Attributes:
        mlp: the fitted :class:`ForwardMLP`, in eval mode.
        history: per-step values of each weighted loss term (``transfer``, ``supcon`` when on).
        facts: JSON-ready summary.
    """

    mlp: ForwardMLP
    history: dict[str, list[float]] = field(default_factory=dict)
    facts: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class ForwardMapOptions:
    """The options of the forward-map fit, checked once (``method=fct`` builds them from its keys).

    Attributes:
        hidden_dims / activation / batch_norm: the MLP (see :class:`ForwardMLP`).
        batchnorm_mode: ``batch`` (batch statistics while fitting) or ``fixed`` (fit in eval mode, as the
            public code does).
        loss: ``mse`` or ``cosine``.
        loss_weight: weight of the transfer term.
        supcon_weight: weight of a supervised contrastive term from the mapped old vectors to the batch's new
            vectors (:func:`~compatembed.methods.maps.cross_supervised_contrastive`; 0: off, FCT's fit):
            an upgraded gallery item is pulled toward the new vectors of its class, not only its own.
        temperature: τ of that term.
        steps / batch_size / lr / weight_decay: the optimiser.
        seed: seeds the initialisation and the batch order.

    Raises:
        ConfigError: an unknown activation, BatchNorm mode or loss.
    """

    hidden_dims: Sequence[int] = (512,)
    activation: str = "relu"
    batch_norm: bool = True
    batchnorm_mode: str = "batch"
    loss: str = "mse"
    loss_weight: float = 1.0
    supcon_weight: float = 0.0
    temperature: float = 0.1
    steps: int = 3000
    batch_size: int = 256
    lr: float = 1e-3
    weight_decay: float = 0.0
    seed: int = 0

    def __post_init__(self) -> None:
        for key, known in (("activation", tuple(ACTIVATIONS)), ("batchnorm_mode", BATCHNORM_MODES), ("loss", LOSSES)):
            if getattr(self, key) not in known:
                raise ConfigError(f"unknown fct {key} {getattr(self, key)!r}; known: {', '.join(known)}")
        typed = {"hidden_dims": tuple(int(h) for h in self.hidden_dims), "batch_norm": bool(self.batch_norm),
                 **{k: float(getattr(self, k)) for k in ("loss_weight", "supcon_weight", "temperature", "lr", "weight_decay")},
                 **{k: int(getattr(self, k)) for k in ("steps", "batch_size", "seed")}}
        for key, value in typed.items():
            object.__setattr__(self, key, value)
        if self.supcon_weight < 0 or self.temperature <= 0:
            raise ConfigError(f"fct supcon_weight must be >= 0 and temperature > 0, got {self.supcon_weight}, {self.temperature}")


def fit_forward_map(
    source: torch.Tensor,
    target: torch.Tensor,
    options: ForwardMapOptions | None = None,
    *,
    labels: torch.Tensor | None = None,
    device: str | torch.device = "cpu",
) -> ForwardFit:
    """Fit ``h`` with ``target ≈ h(source)`` on paired training features (Adam, cosine-annealed lr).

    Args:
        source: (N, d_in) old-model features (concatenated with side information when used).
        target: (N, d_new) new-model features of the same items.
        options: the MLP and its optimiser (default: :class:`ForwardMapOptions` ``()``).
        labels: (N,) class ids; needed only when ``supcon_weight > 0``.
        device: where the fit runs.

    Returns:
        A :class:`ForwardFit` whose MLP is in eval mode.
    """
    o = options if options is not None else ForwardMapOptions()
    if source.ndim != 2 or target.ndim != 2 or source.shape[0] != target.shape[0] or source.shape[0] < 2:
        raise ConfigError(
            f"forward map fit needs paired (N, d) features, N >= 2; got {tuple(source.shape)}, {tuple(target.shape)}"
        )
    if o.supcon_weight > 0 and (labels is None or labels.shape != (source.shape[0],)):
        raise ConfigError("fct supcon_weight > 0 needs one training label per pair")
    device = torch.device(device)
    started = time.perf_counter()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(o.seed)
        mlp = ForwardMLP(source.shape[1], target.shape[1], o.hidden_dims, activation=o.activation, batch_norm=o.batch_norm)
    mlp.to(device)
    source, target = source.to(device).float(), target.to(device).float()
    history: dict[str, list[float]] = {"transfer": [], **({"supcon": []} if o.supcon_weight > 0 else {})}
    if labels is not None:
        labels = labels.to(device)
    if o.steps > 0:
        optimizer = torch.optim.Adam(mlp.parameters(), lr=o.lr, weight_decay=o.weight_decay)
        scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=o.steps)
        generator = torch.Generator().manual_seed(o.seed)
        mlp.train(o.batchnorm_mode == "batch")
        for index in shuffled_batches(source.shape[0], o.batch_size, o.steps, generator):
            index = index.to(device)
            mapped = mlp(source[index])
            terms = {"transfer": o.loss_weight * forward_loss(mapped, target[index], o.loss)}
            if o.supcon_weight > 0:
                terms["supcon"] = o.supcon_weight * cross_supervised_contrastive(
                    mapped, target[index], labels[index], o.temperature  # type: ignore[index]
                )
            optimizer.zero_grad(set_to_none=True)
            sum(terms.values()).backward()  # type: ignore[union-attr]
            optimizer.step()
            scheduler.step()
            for key, term in terms.items():
                history[key].append(float(term.detach()))
    mlp.eval().requires_grad_(False)
    if o.batchnorm_mode == "batch" and o.steps > 0:
        recalibrate_batchnorm(mlp, source)
    facts: dict[str, Any] = {
        "layers": [mlp.in_dim, *o.hidden_dims, mlp.out_dim],
        "activation": o.activation,
        "batch_norm": o.batch_norm,
        "batchnorm_mode": o.batchnorm_mode,
        "loss": o.loss,
        "supcon_weight": o.supcon_weight,
        "temperature": o.temperature if o.supcon_weight > 0 else None,
        "steps": o.steps,
        "train_alignment": {"raw": mean_cosine(source, target), "fitted": mean_cosine(source, target, mlp)},
        "fit_seconds": round(time.perf_counter() - started, 3),
    }
    if history["transfer"]:
        first, last = first_last_means(history, max(1, min(50, len(history["transfer"]) // 10)))
        facts["loss_first"], facts["loss_last"] = first, last
    else:
        history = {}
    _logger.info("forward map %s: train cos %.4f", facts["layers"], facts["train_alignment"]["fitted"])
    return ForwardFit(mlp=mlp, history=history, facts=facts)


class FCT(PostHocMapMethod):
    """An independently trained (or adopted) new model plus a forward map old → new for gallery upgrades.

    Args:
        model: the new embedding model.
        num_classes: size of the label space.
        side_info_version: a frozen model version whose features ψ(x) are concatenated to the old ones.
        hidden_dims: hidden widths of h (``[]``: a linear forward map).
        activation: ``relu`` | ``gelu``.
        batch_norm: BatchNorm after each hidden layer.
        batchnorm_mode: ``batch`` (paper) | ``fixed`` (public code: h is trained in eval mode).
        loss: ``mse`` (FCT) | ``cosine``.
        loss_weight: weight of the transfer loss.
        supcon_weight: weight of the supervised contrastive term (0: off, the paper's fit; see
            :class:`ForwardMapOptions`).
        temperature: τ of that term.
        fit_steps / fit_batch_size / fit_lr / fit_weight_decay: the optimiser of h.
        seed: seeds h's initialisation and batch order.
        **post_hoc: where the new model comes from: ``old_version`` (required), ``new_version``,
            ``label_smoothing``, ``classifier_input``, and ``fit_views`` (augmented pairs for the fit; see
            :class:`PostHocMapMethod`).
    """

    name = "fct"

    def __init__(
        self,
        model: nn.Module,
        num_classes: int,
        *,
        side_info_version: str | None = None,
        hidden_dims: Sequence[int] = (512,),
        activation: str = "relu",
        batch_norm: bool = True,
        batchnorm_mode: str = "batch",
        loss: str = "mse",
        loss_weight: float = 1.0,
        supcon_weight: float = 0.0,
        temperature: float = 0.1,
        fit_steps: int = 3000,
        fit_batch_size: int = 256,
        fit_lr: float = 1e-3,
        fit_weight_decay: float = 0.0,
        seed: int = 0,
        **post_hoc: Any,
    ) -> None:
        super().__init__(model, num_classes, **post_hoc)
        self.side_info_version = side_info_version
        self.side: LoadedVersion | None = None
        self.options = ForwardMapOptions(
            hidden_dims=hidden_dims, activation=activation, batch_norm=batch_norm, batchnorm_mode=batchnorm_mode, loss=loss,
            loss_weight=loss_weight, supcon_weight=supcon_weight, temperature=temperature, steps=fit_steps,
            batch_size=fit_batch_size, lr=fit_lr, weight_decay=fit_weight_decay,
            seed=seed,
        )
        self.fit_result: ForwardFit | None = None

    def setup(self, ctx: MethodContext) -> None:
        super().setup(ctx)
        if self.side_info_version is not None:
            self.side = load_model_version(self.side_info_version)
            self.add_frozen("side_model", self.side.model)

    def map_inputs(self, ctx: MethodContext) -> tuple[torch.Tensor, torch.Tensor]:
        """(N, d_old [+ d_side]) inputs of h and (N, d_new) targets on the training items."""
        x_new, x_old = self.train_features(ctx)
        if self.side is not None:
            self.check_views_pairable(self.side_model)
            x_old = torch.cat([x_old, self.view_features(ctx, self.side_model, "side")], dim=1)
        return x_old, x_new

    def finalize(self, ctx: MethodContext) -> dict[str, Any]:
        """Fit h on the cached training features; returns the facts for the manifest."""
        source, target = self.map_inputs(ctx)
        labels = self.train_labels(ctx) if self.options.supcon_weight > 0 else None
        self.fit_result = fit_forward_map(source, target, self.options, labels=labels, device=ctx.device)
        facts = {**self.fit_result.facts, "fit_views": self.fit_views, "fit_pairs": int(source.shape[0]), **self.source_facts()}
        if self.side is not None:
            # (its directory is recorded once, as training.side_info_version_dir)
            facts["side_info"] = {"version_id": self.side.version_id, "dim": self.side.embed_dim}
        return {"fct": facts}

    def compatibility_edges(self) -> list[CompatibilityEdge]:
        """One ``forward`` edge from the old version: h's arrays (BatchNorm folded), output normalised."""
        if self.fit_result is None or self.old is None:
            raise RuntimeError("FCT.compatibility_edges() before finalize(): the forward map is not fitted")
        info: dict[str, Any] = {"method": "fct", "layers": self.fit_result.facts["layers"]}
        side = None if self.side is None else (self.side.version_id, self.side.embed_dim)
        return [
            CompatibilityEdge(
                "forward",
                self.old.version_id,
                arrays=self.fit_result.mlp.exported(),
                activation=self.fit_result.mlp.activation,
                normalize_output=True,
                info=info,
                side_input=side,
            )
        ]
