"""Metrics: classification AP / mAP, attention entropy, caption metrics (pycocoevalcap)."""

from avlm.metrics.attention import attention_entropy_percent, layer_entropies_percent
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

__all__ = [
    "attention_entropy_percent",
    "average_precision_per_class",
    "layer_entropies_percent",
    "mean_average_precision",
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
