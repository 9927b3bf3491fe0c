"""Self-critical sequence training (SCST) of a captioner: the sequence-level objective that follows XE.

Rennie et al. (2017) fine-tune a captioner on the metric itself: per clip, ``n`` captions are sampled from the
model; each gets a reward (CIDEr-D against the clip's references), a baseline is subtracted, and the loss is
``-(r - b) · Σ_t log p(w_t)`` over each sample's tokens up to and including its end token. The baseline is the
reward of the model's own greedy caption (``greedy``, Rennie et al.) or the mean reward of the clip's other
``n - 1`` samples (``mean_of_others``, Luo 2020), so a sample is pushed up only when it beats what the model
already does. Rewards use CIDEr-D's document frequencies from the *training* references, computed once
(:class:`avlm.metrics.cider.CiderD`), as self-critical.pytorch does; no Java runs in the loop.

The recipe (:mod:`avlm.recipes.caption`) calls :class:`ScstObjective` as its training step when the config's
``scst.parent`` names the XE checkpoint to start from; everything else (loop, validation, registry) is the XE run's.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any, Literal

import numpy as np
import torch

from avlm.errors import ConfigError
from avlm.metrics.captioning import SpiceConfig, normalize_caption
from avlm.metrics.cider import CiderD
from avlm.models.captioner import FusionCaptioner, caption_token_losses, start_token_id
from avlm.train.loop import StepOutput

BASELINES = ("greedy", "mean_of_others")
REWARDS = ("cider_d", "spider")


@dataclasses.dataclass
class ScstConfig:
    """The ``scst`` section of the caption recipe.

    Attributes:
        parent: the XE checkpoint this run fine-tunes with SCST: ``models:/<name>@<alias>``,
            ``models:/<name>/<version>`` or a run id; empty = an XE run (the ``scst`` entry point sets it).
        samples: n, captions sampled per clip.
        temperature: sampling temperature (multinomial over the full vocabulary).
        reward: cider_d, or spider ((CIDEr-D + SPICE) / 2; needs SPICE, refused before the run when it cannot run).
        baseline: greedy (the greedy caption's reward) or mean_of_others (the other samples' mean reward).
        xe_weight: weight of teacher-forced XE on the clip's first reference, added to the SCST loss (0 = none).
        max_sample_tokens: longest sampled caption (0 = ``decoding.max_new_tokens``).
        after_plateau: XE runs only: when XE early-stops, run SCST from its best checkpoint as a second run.
        epochs: epochs of that automatic SCST run.
        lr: learning rate of that automatic SCST run (projector and fusion alike).
    """

    parent: str = ""
    samples: int = 5
    temperature: float = 1.0
    reward: Literal["cider_d", "spider"] = "cider_d"
    baseline: Literal["greedy", "mean_of_others"] = "greedy"
    xe_weight: float = 0.0
    max_sample_tokens: int = 0
    after_plateau: bool = False
    epochs: int = 5
    lr: float = 1e-5

    def __post_init__(self) -> None:
        if self.samples < 1 or (self.baseline == "mean_of_others" and self.samples < 2):
            raise ConfigError(
                f"config key 'scst.samples' = {self.samples}: needs >= 1 (>= 2 for baseline mean_of_others)"
            )
        if self.temperature <= 0:
            raise ConfigError(f"config key 'scst.temperature' must be > 0, got {self.temperature}")
        for key in ("xe_weight", "max_sample_tokens"):
            if getattr(self, key) < 0:
                raise ConfigError(f"config key 'scst.{key}' must be >= 0, got {getattr(self, key)}")
        if self.epochs < 1 or self.lr <= 0:
            raise ConfigError(f"config keys 'scst.epochs' and 'scst.lr' must be positive, got {self.epochs}, {self.lr}")

    @property
    def enabled(self) -> bool:
        return bool(self.parent)


def baseline_rewards(rewards: np.ndarray, kind: str, greedy: np.ndarray | None = None) -> np.ndarray:
    """The baseline b of every sample, shape (B, n) like ``rewards``.

    Args:
        rewards: (B, n) rewards of n samples per clip.
        kind: greedy (``greedy`` (B,) broadcast over the clip's samples) or mean_of_others.
        greedy: (B,) reward of each clip's greedy caption (kind greedy only).
    """
    if kind == "greedy":
        if greedy is None:
            raise ValueError("baseline 'greedy' needs the greedy captions' rewards")
        return np.repeat(np.asarray(greedy, dtype=np.float64)[:, None], rewards.shape[1], axis=1)
    if kind == "mean_of_others":
        n = rewards.shape[1]
        return (rewards.sum(axis=1, keepdims=True) - rewards) / (n - 1)
    raise ConfigError(f"config key 'scst.baseline' = {kind!r}: use one of {BASELINES}")


def sample_labels(token_ids: torch.Tensor, tokenizer: Any) -> dict[str, torch.Tensor]:
    """Teacher-forcing inputs that score generated tokens: ``<bos>`` + tokens, masked after the first end token.

    The end token itself is kept (its probability is part of the sample's likelihood: stopping is a choice).
    """
    bos = torch.full((token_ids.shape[0], 1), start_token_id(tokenizer), dtype=token_ids.dtype, device=token_ids.device)
    input_ids = torch.cat([bos, token_ids], dim=1)
    is_end = input_ids == tokenizer.eos_token_id
    is_end[:, 0] = False
    # positions strictly after the first end token are padding
    after_end = (is_end.cumsum(1) - is_end.long()) > 0
    attention_mask = (~after_end).long()
    return {
        "input_ids": input_ids.masked_fill(after_end, tokenizer.pad_token_id),
        "attention_mask": attention_mask,
        "labels": input_ids.masked_fill(after_end, -100),
    }


class ScstObjective:
    """One SCST step: sample, reward, baseline, policy-gradient loss (plus the XE mix and the gate penalty).

    Args:
        cfg: the ``scst`` section.
        train_references: references of every training clip, by the clip's position in the train split.
        max_new_tokens: longest sampled caption.
        spice: SPICE settings for reward spider.
    """

    def __init__(
        self,
        cfg: ScstConfig,
        train_references: Sequence[Sequence[str]],
        *,
        max_new_tokens: int,
        spice: SpiceConfig | None = None,
    ) -> None:
        if cfg.reward not in REWARDS:
            raise ConfigError(f"config key 'scst.reward' = {cfg.reward!r}: use one of {REWARDS}")
        self.cfg = cfg
        self.references = [[normalize_caption(r) for r in refs] for refs in train_references]
        self.cider = CiderD(self.references)  # document frequencies of the training references, once
        self.max_new_tokens = cfg.max_sample_tokens or max_new_tokens
        self.spice = spice

    def rewards(self, captions: Sequence[str], clips: Sequence[int]) -> np.ndarray:
        """Reward of each caption against the references of its clip (a train-split position)."""
        texts = [normalize_caption(c) for c in captions]
        cider = self.cider.score(texts, list(clips))
        if self.cfg.reward == "cider_d":
            return cider
        from avlm.metrics.captioning import spice_item_scores

        spice = spice_item_scores(texts, [self.references[c] for c in clips], self.spice or SpiceConfig())
        return (cider + np.asarray(spice)) / 2

    def __call__(
        self, model: torch.nn.Module, net: FusionCaptioner, sources: dict[str, Any], batch: dict[str, Any]
    ) -> StepOutput:
        """The step's loss and its logged parts.

        Args:
            model: the (possibly DDP-wrapped) captioner the gradients flow through.
            net: the same model unwrapped (for ``generate``).
            sources: ``source`` or ``source_features`` of the batch's clips.
            batch: the batch (``clip`` positions, and the first references' ids for the XE mix).
        """
        cfg, n = self.cfg, self.cfg.samples
        clips = batch["clip"].tolist()
        sampled = net.generate(
            **sources,
            num_beams=1,
            do_sample=True,
            temperature=cfg.temperature,
            top_k=0,
            num_return_sequences=n,
            max_new_tokens=self.max_new_tokens,
        )
        sample_clips = [clip for clip in clips for _ in range(n)]  # generate repeats each clip n times in a row
        rewards = self.rewards(sampled.texts, sample_clips).reshape(len(clips), n)
        greedy = None
        if cfg.baseline == "greedy":
            greedy_texts = net.generate(**sources, num_beams=1, max_new_tokens=self.max_new_tokens).texts
            greedy = self.rewards(greedy_texts, clips)
        baseline = baseline_rewards(rewards, cfg.baseline, greedy)
        advantage = torch.as_tensor((rewards - baseline).reshape(-1), dtype=torch.float32, device=batch["clip"].device)

        repeated = {k: v.repeat_interleave(n, dim=0) if v is not None else None for k, v in sources.items()}
        inputs = sample_labels(sampled.token_ids, net.tokenizer)
        out = model(**repeated, **inputs)
        log_likelihood = -caption_token_losses(out.logits, inputs["labels"])  # (B·n,) Σ_t log p
        loss = -(advantage * log_likelihood).mean() + out.fusion_gate_penalty
        parts: dict[str, torch.Tensor] = {}
        if cfg.xe_weight > 0:
            teacher = model(
                **sources, input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"]
            )
            loss = loss + cfg.xe_weight * teacher.xe_loss
            parts["xe_loss"] = teacher.xe_loss
        lengths = (inputs["attention_mask"].sum(1) - 1).float()
        device = advantage.device
        parts.update(
            {
                "scst/reward_mean": torch.tensor(rewards.mean(), device=device),
                "scst/reward_std": torch.tensor(rewards.std(), device=device),
                "scst/baseline_mean": torch.tensor(baseline.mean(), device=device),
                "scst/advantage_mean": advantage.mean(),
                "scst/sample_length": lengths.mean(),
            }
        )
        return StepOutput(loss=loss, parts=parts)
