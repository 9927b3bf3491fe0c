"""CVS data: the Endoscapes2023 reader, the built-in demo data, clip tensors, sampling and batch mixing."""

from avlm.data.clips import ClipDataset, label_checksum, load_frame, manifest_hash
from avlm.data.cvs_demo import DEMO_VERSION, ensure_cvs_demo
from avlm.data.endoscapes import CVS_CRITERIA, OFFICIAL_SPLIT_VIDEOS, ClipRecord, load_endoscapes
from avlm.data.mixing import mix_clips
from avlm.data.samplers import EpochSampler, class_balanced_weights

__all__ = [
    "CVS_CRITERIA",
    "DEMO_VERSION",
    "OFFICIAL_SPLIT_VIDEOS",
    "ClipDataset",
    "ClipRecord",
    "EpochSampler",
    "class_balanced_weights",
    "ensure_cvs_demo",
    "label_checksum",
    "load_endoscapes",
    "load_frame",
    "manifest_hash",
    "mix_clips",
]
