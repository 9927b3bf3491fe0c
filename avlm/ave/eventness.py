"""Stage 1 of anchored allocation: a cheap per-second "eventness" score for every clip.

Stage 2 (``avlm.ave.allocation``) spends its high-resolution tokens on the top-scored seconds, so a scorer only has
to rank a clip's event seconds above its background ones. Scorers are a registry of named methods over the cached
features (``avlm.ave.features.AveFeatures``):

- training-free: ``audio_energy`` (RMS of each second), ``av_cosine`` (audio–visual cosine in a shared embedding
  space), ``visual_change`` (distance of a second's embedding to the previous one's);
- ``oracle``: the labels themselves (event = 1, background = 0), the upper bound of any scorer;
- ``random``: uniform draws, the floor;
- ``learned``: a :class:`~avlm.models.temporal.TemporalHead` (mlp | tcn | bilstm) fitted on the train clips'
  cached features only, with a per-second (``bce``), clip-level (``mil``) or class (``multiclass``) objective.

Raw scores are then smoothed and normalised per clip (:func:`postprocess`) and cached as the study's
``eventness_scores.json`` (video id → 10 floats), which any later run can reuse (``eventness.scores_file``).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import torch

from avlm.data.ave import SECONDS
from avlm.errors import AvlmError, ConfigError, DataError, TrainingError
from avlm.features import cache_key
from avlm.models.temporal import TEMPORAL_HEADS, TemporalHead

if TYPE_CHECKING:
    from avlm.ave.features import AveFeatures

logger = logging.getLogger(__name__)

SCORES_FILE = "eventness_scores.json"
OBJECTIVES = ("bce", "mil", "multiclass")
NORMALIZATIONS = ("none", "minmax", "zscore")
# What a learned head may read: the cached embeddings, and each second's RMS as a 1-wide feature.
LEARNED_INPUTS = ("audio", "visual", "audio_rms")
# Which labels a scorer reads, so that the score cache's key covers them: none, the train clips', the scored clips'.
LabelUse = Literal["none", "train", "scored"]


@dataclasses.dataclass
class EventnessConfig:
    """Config section ``eventness``: which Stage-1 scorer, and how its scores are post-processed.

    Attributes:
        method: a scorer name in :data:`SCORERS`: audio_energy | av_cosine | visual_change | oracle | random | learned.
        head: learned only: the temporal head (mlp | tcn | bilstm).
        objective: learned only: bce (event vs background per second) | mil (clip-level "has an event of class c",
            top-k pooling of per-second class logits) | multiclass (C+1-way per second; score = max event logit −
            background logit).
        inputs: learned only: the features concatenated as the head's input (audio, visual, audio_rms).
        visual_resolution: the Stage-1 visual embedding's resolution (av_cosine, visual_change, learned with
            ``visual``); 0 = the lowest cached.
        hidden: learned only: the head's width.
        epochs / lr / batch_size: learned only: Adam over the train clips, shuffled each epoch.
        mil_top_k: mil only: how many of a clip's highest per-second logits (of each class) are pooled.
        seed: the learned head's initialisation and shuffling; the random scorer's draws.
        smoothing: centred moving-average window in seconds (odd; 1 = none); at a clip's edges the window is cut.
        normalize: per clip, after smoothing: none | minmax (to [0, 1]) | zscore (mean 0, std 1); a flat clip
            becomes all zeros.
        scores_file: an ``eventness_scores.json`` to reuse instead of running ``method``; its scores go through
            smoothing and normalize like a scorer's (a file a run wrote holds final scores: reuse it with smoothing
            1; both normalisations leave normalised scores unchanged).
    """

    method: str = "audio_energy"
    head: Literal["mlp", "tcn", "bilstm"] = "mlp"
    objective: Literal["bce", "mil", "multiclass"] = "bce"
    inputs: list[str] = dataclasses.field(default_factory=lambda: ["audio", "visual"])
    visual_resolution: int = 0
    hidden: int = 64
    epochs: int = 30
    lr: float = 3e-3
    batch_size: int = 32
    mil_top_k: int = 2
    seed: int = 0
    smoothing: int = 1
    normalize: Literal["none", "minmax", "zscore"] = "none"
    scores_file: str = ""

    def __post_init__(self) -> None:
        if self.method not in SCORERS:
            raise ConfigError(
                f"config key 'eventness.method': unknown scorer {self.method!r}: use one of {', '.join(SCORERS)}"
            )
        for key, allowed in (("head", TEMPORAL_HEADS), ("objective", OBJECTIVES), ("normalize", NORMALIZATIONS)):
            if getattr(self, key) not in allowed:
                raise ConfigError(
                    f"config key 'eventness.{key}': must be one of {', '.join(allowed)}, got {getattr(self, key)!r}"
                )
        unknown = [name for name in self.inputs if name not in LEARNED_INPUTS]
        if not self.inputs or unknown or len(set(self.inputs)) != len(self.inputs):
            raise ConfigError(
                f"config key 'eventness.inputs': name each of {', '.join(LEARNED_INPUTS)} at most once (at least "
                f"one), got {self.inputs}"
            )
        for key in ("hidden", "epochs", "batch_size"):
            if getattr(self, key) < 1:
                raise ConfigError(f"config key 'eventness.{key}': must be >= 1, got {getattr(self, key)}")
        if self.visual_resolution < 0:
            raise ConfigError(f"config key 'eventness.visual_resolution': must be >= 0, got {self.visual_resolution}")
        if not (math.isfinite(self.lr) and self.lr > 0):
            raise ConfigError(f"config key 'eventness.lr': must be a positive number, got {self.lr}")
        if not 1 <= self.mil_top_k <= SECONDS:
            raise ConfigError(f"config key 'eventness.mil_top_k': must be in 1..{SECONDS}, got {self.mil_top_k}")
        if self.seed < 0:
            raise ConfigError(f"config key 'eventness.seed': must be >= 0, got {self.seed}")
        _check_smoothing(self.smoothing)


@dataclasses.dataclass
class EventnessInputs:
    """What a scorer may read.

    Attributes:
        features: the cached features of (at least) every clip scored and every train clip.
        labels: video id → (10,) int64 per-second classes (0 = background). The oracle reads the clips it scores;
            a learned head reads only ``train_ids``' labels, never a val or test clip's.
        train_ids: the clips a learned head is fitted on.
    """

    features: AveFeatures
    labels: Mapping[str, np.ndarray]
    train_ids: list[str]


ScorerFn = Callable[[EventnessInputs, EventnessConfig, Sequence[str]], dict[str, np.ndarray]]
SCORERS: dict[str, ScorerFn] = {}
_LABELS_READ: dict[str, LabelUse] = {}


def register_scorer(name: str, *, labels: LabelUse = "none") -> Callable[[ScorerFn], ScorerFn]:
    """Register a scorer ``fn(inputs, cfg, video_ids) -> {video id: (10,) float64}`` under ``name``.

    Args:
        name: the value of ``eventness.method`` that selects it.
        labels: which labels it reads (none | train | scored), so that the score cache is keyed on them.
    """

    def register(fn: ScorerFn) -> ScorerFn:
        if name in SCORERS:
            raise ValueError(f"an eventness scorer named {name!r} is already registered")
        SCORERS[name] = fn
        _LABELS_READ[name] = labels
        return fn

    return register


# ----------------------------------------------------------------------------------------------------------------
# Training-free scorers, the oracle and the random floor


def _rows(values: Any, video_ids: Sequence[str], features: AveFeatures) -> np.ndarray:
    """The rows of a cached (N, 10, ...) tensor for ``video_ids``, as float64 numpy."""
    index = torch.as_tensor(features.index(list(video_ids)), dtype=torch.long)
    return torch.as_tensor(values)[index].double().numpy()


def _stage1_visual(features: AveFeatures, cfg: EventnessConfig) -> torch.Tensor:
    """The Stage-1 visual embeddings (N, 10, Dv) at ``cfg.visual_resolution`` (0 = the lowest cached)."""
    cached = sorted(features.stage1_visual)
    if not cached:
        raise DataError("the feature cache holds no Stage-1 visual embeddings")
    resolution = cfg.visual_resolution or cached[0]
    if resolution not in features.stage1_visual:
        raise ConfigError(
            f"config key 'eventness.visual_resolution': {resolution} is not a cached resolution (cached: {cached})"
        )
    return features.stage1_visual[resolution]


@register_scorer("audio_energy")
def audio_energy_scores(inputs: EventnessInputs, cfg: EventnessConfig, video_ids: Sequence[str]) -> dict:
    """Each second's RMS energy: an event is louder than its background (AVE's events are audible by definition)."""
    rms = _rows(inputs.features.audio_rms, video_ids, inputs.features)
    return dict(zip(video_ids, rms, strict=True))


@register_scorer("av_cosine")
def av_cosine_scores(inputs: EventnessInputs, cfg: EventnessConfig, video_ids: Sequence[str]) -> dict:
    """Cosine of each second's audio and visual embeddings: high where what is heard matches what is seen.

    Raises:
        ConfigError: the audio and Stage-1 visual embeddings have different widths, so they cannot share a space.
    """
    features = inputs.features
    audio = _rows(features.audio, video_ids, features)
    visual = _rows(_stage1_visual(features, cfg), video_ids, features)
    if audio.shape[-1] != visual.shape[-1]:
        raise ConfigError(
            f"config key 'eventness.method': av_cosine compares audio and visual embeddings in one space, but they "
            f"are {audio.shape[-1]} and {visual.shape[-1]} wide: a shared-space model pair is required (an audio "
            "encoder and a Stage-1 visual backbone trained together, e.g. ImageBind)"
        )
    norms = np.linalg.norm(audio, axis=-1) * np.linalg.norm(visual, axis=-1)
    cosine = (audio * visual).sum(-1) / np.maximum(norms, 1e-12)
    return dict(zip(video_ids, cosine, strict=True))


@register_scorer("visual_change")
def visual_change_scores(inputs: EventnessInputs, cfg: EventnessConfig, video_ids: Sequence[str]) -> dict:
    """L2 distance of each second's Stage-1 visual embedding to the previous second's (second 0: to second 1)."""
    features = inputs.features
    visual = _rows(_stage1_visual(features, cfg), video_ids, features)
    change = np.empty(visual.shape[:2])
    change[:, 1:] = np.linalg.norm(visual[:, 1:] - visual[:, :-1], axis=-1)
    change[:, 0] = np.linalg.norm(visual[:, 0] - visual[:, 1], axis=-1)
    return dict(zip(video_ids, change, strict=True))


@register_scorer("oracle", labels="scored")
def oracle_scores(inputs: EventnessInputs, cfg: EventnessConfig, video_ids: Sequence[str]) -> dict:
    """1 on event seconds, 0 on background ones, from the scored clips' own labels; ties stay ties."""
    labels = _labels_of(inputs.labels, video_ids, "the oracle scorer")
    return {video_id: (labels[video_id] != 0).astype(np.float64) for video_id in video_ids}


@register_scorer("random")
def random_scores(inputs: EventnessInputs, cfg: EventnessConfig, video_ids: Sequence[str]) -> dict:
    """Uniform draws in [0, 1), seeded by ``cfg.seed`` and the clip's id: a clip's draw does not depend on which
    other clips are scored with it."""
    return {video_id: np.random.default_rng([cfg.seed, _id_number(video_id)]).random(SECONDS) for video_id in video_ids}


def _id_number(video_id: str) -> int:
    return int.from_bytes(hashlib.sha256(video_id.encode()).digest()[:8], "little")


def _labels_of(labels: Mapping[str, np.ndarray], video_ids: Sequence[str], reader: str) -> dict[str, np.ndarray]:
    """The (10,) labels of ``video_ids`` (and of no other clip), checked."""
    missing = [video_id for video_id in video_ids if video_id not in labels]
    if missing:
        raise DataError(f"{reader} needs labels of {len(missing)} clips that have none: {_some(missing)}")
    found = {video_id: np.asarray(labels[video_id]) for video_id in video_ids}
    bad = [video_id for video_id, value in found.items() if value.shape != (SECONDS,)]
    if bad:
        raise DataError(f"{reader}: the labels of {_some(bad)} are not {SECONDS} per-second classes")
    return found


def _some(ids: Sequence[str], shown: int = 5) -> str:
    return ", ".join(map(repr, ids[:shown])) + (f" and {len(ids) - shown} more" if len(ids) > shown else "")


# ----------------------------------------------------------------------------------------------------------------
# The learned scorer: a temporal head fitted on the train clips' cached features


@register_scorer("learned", labels="train")
def learned_scores(inputs: EventnessInputs, cfg: EventnessConfig, video_ids: Sequence[str]) -> dict:
    """Per-second logits of a :class:`TemporalHead` fitted on ``inputs.train_ids`` only.

    The inputs (``cfg.inputs`` concatenated) are standardised with the train clips' per-dimension mean and std.
    Objectives:

    - ``bce``: per second, event vs background; the score is the logit.
    - ``mil``: clip-level labels only: one logit per event class per second; a clip's bag logit for class c is the
      mean of its top-``mil_top_k`` per-second c logits, trained (BCE) to say whether the clip has an event of class
      c; the score is a second's highest class logit. With a single event class this is "the clip has an event";
      per class, it also learns from data where every clip has an event (AVE), as clips of the other classes are
      the negatives.
    - ``multiclass``: C+1-way cross-entropy per second; the score is the highest event logit minus the background
      logit.

    Raises:
        DataError: no train clips, a train clip without labels, train labels without both event and background
            seconds, or (mil) no event class both present in some train clips and absent from others.
        TrainingError: the loss became non-finite.
    """
    train_ids = list(dict.fromkeys(inputs.train_ids))
    if not train_ids:
        raise DataError("the learned eventness scorer has no train clips to fit on")
    # The only labels read: the train clips'. Val and test labels never reach the fit.
    train_labels = _labels_of(inputs.labels, train_ids, "the learned eventness scorer")
    targets = torch.as_tensor(np.stack([train_labels[video_id] for video_id in train_ids]), dtype=torch.long)
    events = targets != 0
    if not events.any() or events.all():
        raise DataError(
            f"the learned eventness scorer needs train seconds of both kinds, got {int(events.sum())} event and "
            f"{int((~events).sum())} background seconds over {len(train_ids)} train clips"
        )
    train_x = _learned_features(inputs.features, cfg, train_ids)
    mean = train_x.mean(dim=(0, 1))
    std = train_x.std(dim=(0, 1))
    std = torch.where(std > 0, std, torch.ones_like(std))  # a constant input says nothing; keep it at 0
    if cfg.objective == "mil":
        present = _classes_present(targets)
        if not ((present.sum(0) > 0) & (present.sum(0) < len(present))).any():
            raise DataError(
                "the mil objective learns from clips whose clip-level labels differ, but every train clip has the "
                f"same event classes ({sorted(set(targets[0].tolist()) - {0})}): use bce or multiclass"
            )
    out_dim = {"bce": 1, "mil": int(targets.max()), "multiclass": int(targets.max()) + 1}[cfg.objective]
    head = _fit_head((train_x - mean) / std, targets, cfg, out_dim)
    with torch.no_grad():
        logits = head((_learned_features(inputs.features, cfg, video_ids) - mean) / std)
    if cfg.objective == "multiclass":
        scores = logits[..., 1:].max(dim=-1).values - logits[..., 0]
    else:
        scores = logits.max(dim=-1).values  # bce: its one logit; mil: the highest class logit
    return dict(zip(video_ids, scores.double().numpy(), strict=True))


def _learned_features(features: AveFeatures, cfg: EventnessConfig, video_ids: Sequence[str]) -> torch.Tensor:
    """The head's input (N, 10, D): ``cfg.inputs`` concatenated in their order, as float32."""
    index = torch.as_tensor(features.index(list(video_ids)), dtype=torch.long)
    parts = []
    for name in cfg.inputs:
        if name == "audio":
            parts.append(torch.as_tensor(features.audio)[index].float())
        elif name == "visual":
            parts.append(torch.as_tensor(_stage1_visual(features, cfg))[index].float())
        else:
            parts.append(torch.as_tensor(features.audio_rms)[index].float().unsqueeze(-1))
    return torch.cat(parts, dim=-1)


def _fit_head(x: torch.Tensor, targets: torch.Tensor, cfg: EventnessConfig, out_dim: int) -> TemporalHead:
    """Adam on (x, targets) for ``cfg.epochs`` epochs; deterministic given ``cfg.seed`` (the global RNG is left as
    it was)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        head = TemporalHead(cfg.head, x.shape[-1], out_dim, hidden=cfg.hidden, config_section="eventness")
        optimizer = torch.optim.Adam(head.parameters(), lr=cfg.lr)
        order = torch.Generator().manual_seed(cfg.seed)
        head.train()
        for epoch in range(cfg.epochs):
            for batch in torch.randperm(len(x), generator=order).split(cfg.batch_size):
                loss = _objective_loss(head(x[batch]), targets[batch], cfg)
                if not torch.isfinite(loss):
                    raise TrainingError(
                        f"the learned eventness head's {cfg.objective} loss is {loss.item()} at "
                        f"epoch {epoch}: lower eventness.lr"
                    )
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
        head.eval()
    return head


def _objective_loss(logits: torch.Tensor, targets: torch.Tensor, cfg: EventnessConfig) -> torch.Tensor:
    """The loss of (B, T, out) logits against (B, T) per-second classes under ``cfg.objective``."""
    bce = torch.nn.functional.binary_cross_entropy_with_logits
    if cfg.objective == "multiclass":
        return torch.nn.functional.cross_entropy(logits.flatten(0, 1), targets.flatten())
    if cfg.objective == "bce":
        return bce(logits[..., 0], (targets != 0).float())
    # mil: (B, T, C) → each class's top-k mean over the clip's seconds (B, C), against the classes the clip has.
    bags = logits.topk(min(cfg.mil_top_k, logits.shape[1]), dim=1).values.mean(dim=1)
    return bce(bags, _classes_present(targets, bags.shape[1]))


def _classes_present(targets: torch.Tensor, num_classes: int = 0) -> torch.Tensor:
    """(B, num_classes) float: whether clip b has a second of event class c + 1 (num_classes 0 = the highest)."""
    classes = torch.arange(1, (num_classes or int(targets.max())) + 1)
    return (targets.unsqueeze(-1) == classes).any(dim=1).float()


# ----------------------------------------------------------------------------------------------------------------
# Post-processing and the scores of a config


def _check_smoothing(smoothing: int) -> None:
    if smoothing < 1 or smoothing % 2 == 0:
        raise ConfigError(f"config key 'eventness.smoothing': must be an odd window >= 1 (1 = none), got {smoothing}")


def postprocess(scores: np.ndarray, smoothing: int = 1, normalize: str = "none") -> np.ndarray:
    """Smooth, then normalise, each clip's scores.

    Args:
        scores: (N, T) raw scores.
        smoothing: centred moving-average window (odd); near the clip's edges the mean is over the seconds the
            window covers (second 0 with window 3: the mean of seconds 0 and 1).
        normalize: none | minmax ((s − min) / (max − min)) | zscore ((s − mean) / std, population std); a clip whose
            scores are all equal becomes all zeros.

    Returns:
        (N, T) float64.
    """
    _check_smoothing(smoothing)
    if normalize not in NORMALIZATIONS:
        raise ConfigError(
            f"config key 'eventness.normalize': must be one of {', '.join(NORMALIZATIONS)}, got {normalize!r}"
        )
    out = np.asarray(scores, dtype=np.float64)
    if out.ndim != 2:
        raise ValueError(f"postprocess expects (clips, seconds) scores, got shape {out.shape}")
    if smoothing > 1:
        half, seconds = smoothing // 2, out.shape[1]
        out = np.stack(
            [out[:, max(0, t - half) : min(seconds, t + half + 1)].mean(axis=1) for t in range(seconds)], axis=1
        )
    if normalize == "minmax":
        low, span = out.min(axis=1, keepdims=True), np.ptp(out, axis=1, keepdims=True)
        out = np.divide(out - low, span, out=np.zeros_like(out), where=span > 0)
    elif normalize == "zscore":
        mean, std = out.mean(axis=1, keepdims=True), out.std(axis=1, keepdims=True)
        out = np.divide(out - mean, std, out=np.zeros_like(out), where=std > 0)
    return out


def eventness_scores(inputs: EventnessInputs, cfg: EventnessConfig, video_ids: Sequence[str]) -> dict[str, np.ndarray]:
    """The scores of ``video_ids`` under ``cfg``: the scorer's (or ``cfg.scores_file``'s), smoothed, normalised.

    Returns:
        video id → (10,) float64, in the order of ``video_ids``.

    Raises:
        AvlmError: a registered scorer returned something other than 10 finite scores for each clip.
    """
    video_ids = list(dict.fromkeys(video_ids))
    source = cfg.scores_file or f"scorer {cfg.method!r}"
    raw = read_scores(cfg.scores_file, video_ids) if cfg.scores_file else SCORERS[cfg.method](inputs, cfg, video_ids)
    missing = [video_id for video_id in video_ids if video_id not in raw]
    if missing:
        raise AvlmError(f"eventness {source} returned no scores for {_some(missing)}")
    rows = {video_id: np.asarray(raw[video_id], dtype=np.float64) for video_id in video_ids}
    bad = [video_id for video_id, row in rows.items() if row.shape != (SECONDS,) or not np.isfinite(row).all()]
    if bad:
        raise AvlmError(f"eventness {source} must give {SECONDS} finite scores per clip; it did not for {_some(bad)}")
    matrix = np.stack(list(rows.values())) if rows else np.zeros((0, SECONDS))
    final = postprocess(matrix, cfg.smoothing, cfg.normalize)
    return dict(zip(video_ids, final, strict=True))


# ----------------------------------------------------------------------------------------------------------------
# The score file (the study's eventness_scores.json) and its cache


def write_scores(path: str | os.PathLike, scores: Mapping[str, np.ndarray]) -> None:
    """Write ``{"<video id>": [10 floats], ...}``, one clip per line, atomically (a reader never sees half a file).

    Raises:
        DataError: a clip's scores are not 10 finite numbers.
    """
    path = Path(path)
    lines = []
    for video_id, values in scores.items():
        row = np.asarray(values, dtype=np.float64)
        if row.shape != (SECONDS,) or not np.isfinite(row).all():
            raise DataError(f"{path}: the scores of {video_id!r} must be {SECONDS} finite numbers, got {row.tolist()}")
        lines.append(f"  {json.dumps(str(video_id))}: {json.dumps(row.tolist())}")
    _write_text_atomically(path, "{\n" + ",\n".join(lines) + "\n}\n")


def _write_text_atomically(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def read_scores(path: str | os.PathLike, video_ids: Sequence[str]) -> dict[str, np.ndarray]:
    """The scores of ``video_ids`` from an ``eventness_scores.json`` (other clips in the file are ignored).

    Returns:
        video id → (10,) float64, in the order of ``video_ids``.

    Raises:
        DataError: naming the file (and line): unreadable, not JSON, not an object, a video id listed twice, ids
            without scores, or scores that are not 10 finite numbers.
    """
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(f"{path}: cannot read the eventness score file: {exc}") from exc

    def unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
        seen: dict[str, Any] = {}
        for key, value in pairs:
            if key in seen:
                raise DataError(f"{path}:{_line_of(text, key, 2)}: video id {key!r} is listed twice")
            seen[key] = value
        return seen

    try:
        data = json.loads(text, object_pairs_hook=unique_keys)
    except json.JSONDecodeError as exc:
        raise DataError(f"{path}:{exc.lineno}: not JSON ({exc.msg})") from exc
    if not isinstance(data, dict):
        raise DataError(f"{path}: must map video ids to {SECONDS} scores, got a JSON {type(data).__name__}")
    video_ids = list(dict.fromkeys(video_ids))
    problems, scores = [], {}
    missing = [video_id for video_id in video_ids if video_id not in data]
    if missing:
        problems.append(f"no scores for {len(missing)} of {len(video_ids)} clips: {_some(missing)}")
    for video_id in video_ids:
        if video_id not in data:
            continue
        value = data[video_id]
        numeric = isinstance(value, list) and all(
            isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in value
        )
        if not numeric or len(value) != SECONDS:
            problems.append(
                f"line {_line_of(text, video_id)}: {video_id!r} must have {SECONDS} finite numbers, "
                f"got {json.dumps(value)[:80]}"
            )
            continue
        scores[video_id] = np.asarray(value, dtype=np.float64)
    if problems:
        raise DataError(f"{path}: " + "; ".join(problems))
    return scores


def _line_of(text: str, video_id: str, occurrence: int = 1) -> int | str:
    """1-based line of the ``occurrence``-th key ``"<video_id>"`` in a JSON text ('?' if not found verbatim)."""
    quoted, start = json.dumps(video_id), -1
    for _ in range(occurrence):
        start = text.find(quoted, start + 1)
        if start < 0:
            return "?"
    return text.count("\n", 0, start) + 1


def cached_eventness_scores(
    inputs: EventnessInputs, cfg: EventnessConfig, video_ids: Sequence[str], cache_dir: str | os.PathLike
) -> tuple[dict[str, np.ndarray], Path]:
    """:func:`eventness_scores`, computed once and then read from ``<cache_dir>/eventness/<key>/``.

    The key covers the config (but the score file's path: its content is hashed instead), the features' cache key,
    the train and scored clip ids and the labels the scorer reads, so a sweep over Stage-2 cells never refits a
    learned head; ``key.json`` next to the scores records the parts.

    Returns:
        (scores, the eventness_scores.json that holds them): the recipe logs the file.
    """
    video_ids = list(dict.fromkeys(video_ids))
    parts = _cache_key_parts(inputs, cfg, video_ids)
    folder = Path(cache_dir) / "eventness" / cache_key(parts)
    path, key_path = folder / SCORES_FILE, folder / "key.json"
    key_text = json.dumps(parts, indent=2, sort_keys=True) + "\n"
    if path.is_file():
        try:
            if key_path.read_text(encoding="utf-8") != key_text:
                raise DataError(f"{key_path} records another key")
            scores = read_scores(path, video_ids)
            logger.info("eventness scores of %d clips reused from %s", len(scores), path)
            return scores, path
        except (OSError, DataError) as exc:
            logger.warning("eventness score cache %s is unusable (%s); recomputing it", path, exc)
    scores = eventness_scores(inputs, cfg, video_ids)
    write_scores(path, scores)
    _write_text_atomically(key_path, key_text)
    logger.info("eventness scores of %d clips (%s) cached in %s", len(scores), cfg.scores_file or cfg.method, path)
    return scores, path


def _cache_key_parts(inputs: EventnessInputs, cfg: EventnessConfig, video_ids: Sequence[str]) -> dict[str, Any]:
    config = dataclasses.asdict(cfg)
    config.pop("scores_file")
    parts: dict[str, Any] = {"eventness": config, "video_ids": _ids_digest(video_ids), "clips": len(video_ids)}
    if cfg.scores_file:
        try:
            parts["scores_file_sha256"] = hashlib.sha256(Path(cfg.scores_file).read_bytes()).hexdigest()
        except OSError as exc:
            raise DataError(f"{cfg.scores_file}: cannot read the eventness score file: {exc}") from exc
        return parts
    parts["features"] = dict(inputs.features.key)
    parts["train_ids"] = _ids_digest(inputs.train_ids)
    reads = {"none": [], "train": list(inputs.train_ids), "scored": list(video_ids)}[_LABELS_READ[cfg.method]]
    parts["labels"] = cache_key(
        {video_id: np.asarray(inputs.labels[video_id]).tolist() for video_id in reads if video_id in inputs.labels}
    )
    return parts


def _ids_digest(video_ids: Sequence[str]) -> str:
    return hashlib.sha256("\n".join(sorted(set(video_ids))).encode()).hexdigest()
