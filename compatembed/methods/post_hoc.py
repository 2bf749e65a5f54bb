"""The base of the methods that fit a map after training: λ-orthogonality and FCT.

:class:`PostHocMapMethod` is what they share: a new model trained independently in the run
(cross-entropy, like ``Independent``) or loaded from ``new_version``, the frozen old model, and cached
un-augmented training features of both for the fit in ``finalize``.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from torch import nn

from compatembed.errors import ConfigError
from compatembed.methods.base import Method, MethodContext, freeze
from compatembed.methods.independent import check_classifier_input, classification_step
from compatembed.models.heads import Classifier
from compatembed.models.version import LoadedVersion, load_model_version

_logger = logging.getLogger(__name__)


class PostHocMapMethod(Method):
    """A new model trained independently (or loaded) plus a map to/from the old space fitted in ``finalize``.

    Without ``new_version`` the run trains the new model with cross-entropy through its own linear
    classifier, exactly like ``Independent`` (both call
    :func:`~compatembed.methods.independent.classification_step`); with ``new_version`` the new
    model's weights come from that version directory in :meth:`setup`, it is frozen (its hash is
    checked like the old model's), and the run trains nothing (``trainer.epochs=0``): only the map
    is fitted.

    Args:
        model: the new embedding model (its architecture must match ``new_version`` when given).
        num_classes: size of the label space.
        old_version: the deployed old model version directory (required).
        new_version: a trained new model version directory to adopt instead of training one.
        label_smoothing: label smoothing of the cross-entropy (in-run training).
        classifier_input: what the in-run classifier reads: ``raw`` or ``normalized`` (as ``Independent``).
        fit_views: augmented passes over the training items added to the map's training pairs, besides
            the un-augmented one (0: that one only). Pass ``v`` draws the training augmentation
            (``data.augment``) with seed ``v``, the same crops and flips for both models, so pairs stay
            paired: more pairs for a map that would otherwise fit N pairs of N images (the FCT paper
            trains its map on augmented images). Costs one feature pass per model and view (cached).
    """

    def __init__(
        self,
        model: nn.Module,
        num_classes: int,
        *,
        old_version: str | None = None,
        new_version: str | None = None,
        label_smoothing: float = 0.1,
        classifier_input: str = "raw",
        fit_views: int = 0,
    ) -> None:
        super().__init__(model, num_classes, old_version=old_version)
        if int(fit_views) < 0:
            raise ConfigError(f"method.fit_views must be >= 0 (augmented passes besides the plain one), got {fit_views}")
        self.fit_views = int(fit_views)
        self.label_smoothing = float(label_smoothing)
        self.classifier_input = check_classifier_input(classifier_input)
        self.new_version_path = new_version
        self.new: LoadedVersion | None = None
        if new_version is None:
            self.classifier = Classifier(model.embed_dim, num_classes)

    def _adopt(self, new_version: str) -> None:
        """Copy a trained new version's weights into ``self.model`` (same architecture) and freeze it."""
        loaded = load_model_version(new_version)
        mine, theirs = self.model.preprocessing.to_dict(), loaded.model.preprocessing.to_dict()
        if mine != theirs:
            raise ConfigError(
                f"method.new_version={new_version} was trained with preprocessing {theirs}, but the run's model "
                f"uses {mine}: set model=... to the new version's model"
            )
        try:
            self.model.load_state_dict(loaded.model.state_dict())
        except RuntimeError as exc:
            raise ConfigError(
                f"method.new_version={new_version} does not fit the run's model (set model=... to its architecture): "
                + str(exc).splitlines()[0]
            ) from exc
        self.new = loaded
        self._frozen["new_model"] = freeze(self.model)
        _logger.info("adopted new model version %s from %s (frozen)", loaded.version_id, new_version)

    def setup(self, ctx: MethodContext) -> None:
        """Load the frozen old model and, with ``new_version``, adopt and freeze the trained new model."""
        self.load_old(required=True)
        if self.new_version_path is not None and self.new is None:
            self._adopt(self.new_version_path)

    def training_forward(
        self, images: torch.Tensor, labels: torch.Tensor, indices: torch.Tensor
    ) -> tuple[dict[str, torch.Tensor], dict[str, float]]:
        if self.new_version_path is not None:
            raise ConfigError(
                f"method.new_version={self.new_version_path} is adopted, not trained: set trainer.epochs=0"
            )
        return classification_step(self.classifier, self.model(images), labels, self.label_smoothing, self.classifier_input)

    def train_features(self, ctx: MethodContext) -> tuple[torch.Tensor, torch.Tensor]:
        """((V·N, d_new) new-model, (V·N, d_old) old-model) L2-normalised features of the training items.

        V = 1 + ``fit_views``: the un-augmented pass first, then each augmented pass (row ``v·N + i`` is
        item i under view v in both), cached through :meth:`MethodContext.features`.

        Raises:
            ConfigError: augmented views with models of different input sizes (their crops would differ).
        """
        if self.old is None:
            self.load_old(required=True)
        self.check_views_pairable(self.old_model)
        return self.view_features(ctx, self.model, "new"), self.view_features(ctx, self.old_model, "old")

    def view_features(self, ctx: MethodContext, model: nn.Module, name: str) -> torch.Tensor:
        """``model``'s features of the training items under every view of the fit, stacked view after view."""
        return torch.cat([ctx.features(model, name=name, view=v) for v in range(1 + self.fit_views)])

    def train_labels(self, ctx: MethodContext) -> torch.Tensor:
        """Labels of the rows of :meth:`train_features` (the training labels once per view)."""
        return ctx.labels().repeat(1 + self.fit_views)

    def check_views_pairable(self, other: nn.Module) -> None:
        """Augmented views pair two models' features only when both read the same input size."""
        if self.fit_views == 0:
            return
        mine = tuple(self.model.preprocessing.input_size)
        theirs = tuple(other.preprocessing.input_size)
        if mine != theirs:
            raise ConfigError(
                f"method.fit_views={self.fit_views} needs models of one input size (the same crops for both), "
                f"got {mine} and {theirs}: set method.fit_views=0"
            )

    def source_facts(self) -> dict[str, Any]:
        """Where the new model came from, for the manifest."""
        if self.new is None:
            return {"new_model": "trained in this run"}
        return {"new_model": "adopted", "new_version_id": self.new.version_id, "new_version_dir": str(self.new_version_path)}
