"""Independent training's classification step, raw and normalised (the like-for-like baseline of OCA/BT²)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from compatembed.errors import ConfigError
from compatembed.methods import Independent
from compatembed.methods.independent import classification_step
from compatembed.models import EmbeddingModel
from compatembed.models.heads import Classifier
from helpers.models import TinyBackbone


def _batch() -> tuple[torch.Tensor, torch.Tensor, Classifier]:
    torch.manual_seed(0)
    embeddings = 5.0 * torch.randn(8, 6)  # far from unit norm: raw and normalised logits differ
    return embeddings, torch.arange(8) % 3, Classifier(6, 3)


@pytest.mark.parametrize("classifier_input", ["raw", "normalized"])
def test_classification_step_against_hand_computed_cross_entropy(classifier_input: str) -> None:
    embeddings, labels, classifier = _batch()
    terms, report = classification_step(classifier, embeddings, labels, 0.1, classifier_input)
    x = F.normalize(embeddings, dim=1) if classifier_input == "normalized" else embeddings
    logits = x @ classifier.weight.T
    expected = -(F.log_softmax(logits, 1) * (0.9 * F.one_hot(labels, 3) + 0.1 / 3)).sum(1).mean()
    torch.testing.assert_close(terms["ce"], expected)
    assert report["acc"] == pytest.approx((logits.argmax(1) == labels).float().mean().item())


def test_normalized_input_ignores_the_embedding_norm() -> None:
    embeddings, labels, classifier = _batch()
    a, _ = classification_step(classifier, embeddings, labels, 0.0, "normalized")
    b, _ = classification_step(classifier, 7.0 * embeddings, labels, 0.0, "normalized")
    c, _ = classification_step(classifier, 7.0 * embeddings, labels, 0.0, "raw")
    torch.testing.assert_close(a["ce"], b["ce"])
    assert not torch.allclose(a["ce"], c["ce"])


def test_unknown_classifier_input_is_a_config_error() -> None:
    model = EmbeddingModel(TinyBackbone(), 4)
    with pytest.raises(ConfigError, match="classifier_input='cosine'.*raw, normalized"):
        Independent(model, 3, classifier_input="cosine")
    assert isinstance(Independent(model, 3, classifier_input="normalized").classifier, nn.Linear)
