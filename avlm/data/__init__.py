"""CVS data: the Endoscapes2023 reader (with its segmentation masks, training subsets and per-annotator labels), the
built-in demo data, clip tensors, sampling and batch mixing.

Audio captioning data: the AudioCaps and Clotho readers, waveform loading, the caption Dataset and its demo data.

Video captioning data: the manifest reader, the caption Dataset and its demo data.

Probe data: a generic manifest of labelled multi-label clips with group keys and splits (CSV or JSON).
"""

from avlm.data.audio_captions import (
    AUDIOCAPS_SPLITS,
    CLOTHO_SPLITS,
    AudioCaptionDataset,
    AudioCaptionRecord,
    audio_manifest_hash,
    caption_reference_hash,
    collate_audio_captions,
    load_audio,
    load_audiocaps,
    load_clotho,
)
from avlm.data.caption_demo import DEMO_VERSION as CAPTION_DEMO_VERSION
from avlm.data.caption_demo import ensure_caption_demo
from avlm.data.clips import ClipDataset, label_checksum, load_frame, manifest_hash
from avlm.data.cvs_demo import DEMO_VERSION, ensure_cvs_demo
from avlm.data.endoscapes import (
    CVS_CRITERIA,
    LABEL_POLICIES,
    OFFICIAL_SPLIT_VIDEOS,
    ClipRecord,
    binarise_votes,
    load_endoscapes,
    read_annotator_votes,
)
from avlm.data.endoscapes_seg import SEG_CLASSES, FrameMask, attach_masks, load_segmentation_masks
from avlm.data.generated import COMPLETE_MARKER, default_cache_dir, generate_once
from avlm.data.manifest import (
    ClipManifest,
    ProbeClip,
    ProbeClipDataset,
    group_overlap,
    load_clip_manifest,
    write_cvs_demo_manifest,
)
from avlm.data.mixing import mix_clips
from avlm.data.samplers import EpochSampler, class_balanced_weights
from avlm.data.splits import check_training_splits
from avlm.data.video_captions import DEMO_VERSION as VIDEO_CAPTION_DEMO_VERSION
from avlm.data.video_captions import (
    VIDEO_CAPTION_SPLITS,
    VideoCaptionDataset,
    VideoCaptionRecord,
    collate_video_captions,
    ensure_video_caption_demo,
    evenly_spaced_indices,
    load_video_captions,
    video_manifest_hash,
)

__all__ = [
    "COMPLETE_MARKER",
    "default_cache_dir",
    "generate_once",
    "CVS_CRITERIA",
    "DEMO_VERSION",
    "LABEL_POLICIES",
    "OFFICIAL_SPLIT_VIDEOS",
    "SEG_CLASSES",
    "ClipDataset",
    "ClipRecord",
    "EpochSampler",
    "FrameMask",
    "attach_masks",
    "binarise_votes",
    "check_training_splits",
    "class_balanced_weights",
    "ensure_cvs_demo",
    "label_checksum",
    "load_endoscapes",
    "load_segmentation_masks",
    "read_annotator_votes",
    "load_frame",
    "manifest_hash",
    "mix_clips",
    # audio captioning
    "AUDIOCAPS_SPLITS",
    "CAPTION_DEMO_VERSION",
    "CLOTHO_SPLITS",
    "AudioCaptionDataset",
    "AudioCaptionRecord",
    "audio_manifest_hash",
    "caption_reference_hash",
    "collate_audio_captions",
    "ensure_caption_demo",
    "load_audio",
    "load_audiocaps",
    "load_clotho",
    # video captioning
    "VIDEO_CAPTION_DEMO_VERSION",
    "VIDEO_CAPTION_SPLITS",
    "VideoCaptionDataset",
    "VideoCaptionRecord",
    "collate_video_captions",
    "ensure_video_caption_demo",
    "evenly_spaced_indices",
    "load_video_captions",
    "video_manifest_hash",
    # generic clip manifest (frozen-representation probe)
    "ClipManifest",
    "ProbeClip",
    "ProbeClipDataset",
    "group_overlap",
    "load_clip_manifest",
    "write_cvs_demo_manifest",
]
