"""Metrics: classification AP / mAP, attention entropy and diagnostics, segmentation IoU, caption metrics
(pycocoevalcap)."""

from avlm.metrics.attention import (
    ATTENTION_STATISTICS,
    AttentionDiagnostics,
    DiagnosticRow,
    attention_entropy_percent,
    attention_statistics,
    layer_entropies_percent,
)
from avlm.metrics.captioning import (
    BLEU_NAMES,
    CAPTION_METRIC_NAMES,
    COCO_CAPTION_NAMES,
    ITEM_AVERAGED_METRICS,
    CaptionScorer,
    CaptionScores,
    SpiceConfig,
    caption_metrics_for_logging,
    normalize_caption,
    score_captions,
    spice_unavailable_reason,
)
from avlm.metrics.classification import average_precision_per_class, mean_average_precision
from avlm.metrics.segmentation import ConfusionMatrix, segmentation_metrics

__all__ = [
    "ATTENTION_STATISTICS",
    "AttentionDiagnostics",
    "ConfusionMatrix",
    "DiagnosticRow",
    "attention_entropy_percent",
    "attention_statistics",
    "average_precision_per_class",
    "layer_entropies_percent",
    "mean_average_precision",
    "segmentation_metrics",
    "BLEU_NAMES",
    "CAPTION_METRIC_NAMES",
    "COCO_CAPTION_NAMES",
    "ITEM_AVERAGED_METRICS",
    "CaptionScorer",
    "CaptionScores",
    "SpiceConfig",
    "caption_metrics_for_logging",
    "normalize_caption",
    "score_captions",
    "spice_unavailable_reason",
]
