"""Retrieval and compatibility metrics, and the tables that report them.

The eval CLI, the validation after training and the reports all compute from here, so every number the
project prints comes from one implementation. Pure numpy + FAISS: importing this package needs no torch.
Two modules are not imported with it because they extract embeddings (torch): :mod:`.pair_report` (the
``compatembed-eval`` report) and :mod:`.report` (``build_report``, the ``compatembed-report`` report).
"""

from compatembed.eval.backfill import backfill_curve, neighbour_margin_order, prototype_margin_order, random_order
from compatembed.eval.compatibility import (
    average_compatibility,
    average_multimodel_accuracy,
    check_compatibility_matrix,
    compatibility_criterion_matrix,
    empirical_compatibility,
    update_gain,
)
from compatembed.eval.matrix import CompatibilityMatrix, GateResult, compute_matrix, gate, summarise_matrix
from compatembed.eval.mixed_gallery import MixedGallery, split_gallery
from compatembed.eval.retrieval import RetrievalEvaluator, RetrievalOptions, list_metrics, per_query_metrics, retrieval_metrics
from compatembed.eval.tables import matrix_markdown, pair_table_markdown

__all__ = [
    "RetrievalEvaluator",
    "RetrievalOptions",
    "average_compatibility",
    "average_multimodel_accuracy",
    "check_compatibility_matrix",
    "compatibility_criterion_matrix",
    "empirical_compatibility",
    "list_metrics",
    "matrix_markdown",
    "pair_table_markdown",
    "per_query_metrics",
    "retrieval_metrics",
    "update_gain",
    # compatibility reports
    "CompatibilityMatrix",
    "GateResult",
    "MixedGallery",
    "backfill_curve",
    "compute_matrix",
    "gate",
    "neighbour_margin_order",
    "prototype_margin_order",
    "random_order",
    "split_gallery",
    "summarise_matrix",
]
