"""Backbones, heads, the video classifier and how much of it trains."""

from avlm.models.adaptation import (
    ADAPTATION_MODES,
    apply_adaptation,
    count_parameters,
    load_trainable_state_dict,
    parameter_groups,
    save_lora_adapter,
    trainable_state_dict,
    unfreeze_last_blocks,
)
from avlm.models.backbones import BackboneOutput, VideoBackbone, build_backbone
from avlm.models.classifier import ClassifierOutput, VideoClassifier
from avlm.models.heads import AttentivePooler, ClassificationHead, MeanPooler

__all__ = [
    "ADAPTATION_MODES",
    "AttentivePooler",
    "BackboneOutput",
    "ClassificationHead",
    "ClassifierOutput",
    "MeanPooler",
    "VideoBackbone",
    "VideoClassifier",
    "apply_adaptation",
    "build_backbone",
    "count_parameters",
    "load_trainable_state_dict",
    "parameter_groups",
    "save_lora_adapter",
    "trainable_state_dict",
    "unfreeze_last_blocks",
]
