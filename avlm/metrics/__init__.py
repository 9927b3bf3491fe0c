"""Metrics: classification AP / mAP and attention entropy."""

from avlm.metrics.attention import attention_entropy_percent, layer_entropies_percent
from avlm.metrics.classification import average_precision_per_class, mean_average_precision

__all__ = [
    "attention_entropy_percent",
    "average_precision_per_class",
    "layer_entropies_percent",
    "mean_average_precision",
]
