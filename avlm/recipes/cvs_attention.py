"""The CVS recipe's attention: on the anatomy in training, its entropy every epoch, its diagnostics after training.

:class:`AnatomyAttention` is what the Endoscapes-Seg50 masks do to the classifier's attention: the hard mask of
model.attention_mask (Exp12) and the supervision term of loss.attention_supervision (Exp11).
:class:`AttentionEntropies` measures how spread the attention is on fixed val clips each epoch, and
:func:`log_attention_diagnostics` the best checkpoint's attention against the anatomy masks.

They read CVSConfig and the CVS clips, so they live beside the recipe, while the generic pieces they compose stay
shared: ``anatomy_token_mask`` and ``attention_probe`` (avlm.models.attention_bias), ``AttentionDiagnostics`` and
the entropies (avlm.metrics.attention), the heatmaps (avlm.tracking.plots), ``attention_supervision_loss``
(avlm.losses).
"""

from __future__ import annotations

import dataclasses
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from tqdm.auto import tqdm

from avlm.data import CVS_CRITERIA, ClipDataset
from avlm.losses import attention_supervision_loss
from avlm.metrics import AttentionDiagnostics, attention_entropy_percent, layer_entropies_percent
from avlm.models import VideoClassifier, anatomy_token_mask, attention_probe
from avlm.tracking import plots

if TYPE_CHECKING:
    from avlm.models import TokenLayout, VideoBackbone
    from avlm.models.attention_bias import TokenMask
    from avlm.recipes.cvs import CVSConfig


@dataclasses.dataclass(frozen=True)
class AnatomyAttention:
    """The anatomy masks as the classifier's attention mask and as an attention supervision target.

    Attributes:
        layout: where the backbone's tokens sit; None for one pooled token per frame (no masks then).
        attention_mask: model.attention_mask: none, pooler or backbone.
        dilation: model.attention_mask_dilation, in patches.
        supervised: loss.attention_supervision is on.
        supervision_kind: loss.attention_supervision_kind.
        supervise_backbone: the supervised attention is the backbone's (else the pooler's).
        supervised_layers: the backbone layers supervised, 0-based.
    """

    layout: TokenLayout | None
    attention_mask: str
    dilation: int
    supervised: bool
    supervision_kind: str
    supervise_backbone: bool
    supervised_layers: list[int]

    @classmethod
    def from_config(cls, cfg: CVSConfig, backbone: VideoBackbone) -> AnatomyAttention:
        num_layers = len(backbone.blocks()) if backbone.has_attention_layers() else 0
        supervised_layers = sorted({i % num_layers for i in cfg.loss.attention_supervision_layers}) or list(
            range(num_layers)
        )
        supervised = cfg.loss.attention_supervision > 0
        return cls(
            layout=backbone.token_layout(),
            attention_mask=cfg.model.attention_mask,
            dilation=cfg.model.attention_mask_dilation,
            supervised=supervised,
            supervision_kind=cfg.loss.attention_supervision_kind,
            supervise_backbone=supervised and cfg.loss.attention_supervision_source == "backbone",
            supervised_layers=supervised_layers,
        )

    def anatomy_tokens(self, seg_mask: torch.Tensor | None, has_mask: torch.Tensor | None) -> TokenMask | None:
        """The tokens overlapping the anatomy, whenever the clips have masks and the backbone patch tokens."""
        if seg_mask is None or self.layout is None:
            return None
        return anatomy_token_mask(seg_mask, has_mask, self.layout, self.dilation)

    def token_mask(self, seg_mask: torch.Tensor | None, has_mask: torch.Tensor | None) -> TokenMask | None:
        """:meth:`anatomy_tokens`, or None when neither the attention mask nor the supervision uses them."""
        if not (self.attention_mask != "none" or self.supervised):
            return None
        return self.anatomy_tokens(seg_mask, has_mask)

    def model_inputs(self, anatomy: TokenMask | None) -> dict[str, torch.Tensor]:
        """model.attention_mask as the classifier's pooler_mask or backbone_mask argument."""
        if anatomy is None or self.attention_mask == "none":
            return {}
        return {f"{self.attention_mask}_mask": anatomy.allowed}

    def supervision_loss(self, out: Any, anatomy: TokenMask) -> torch.Tensor:
        """loss.attention_supervision's term: the pooler's, or the mean over the supervised backbone layers."""
        kind = self.supervision_kind
        if not self.supervise_backbone:
            return attention_supervision_loss(out.pooler_attention, anatomy.allowed, anatomy.applied, kind)
        clips = anatomy.allowed.shape[0]
        frames = out.backbone_attentions[0].shape[0] // clips  # timm folds frames into the batch
        allowed = anatomy.allowed.view(clips * frames, -1)
        applied = anatomy.applied.repeat_interleave(frames)
        terms = [
            attention_supervision_loss(out.backbone_attentions[i], allowed, applied, kind)
            for i in self.supervised_layers
        ]
        return torch.stack(terms).mean()


class AttentionEntropies:
    """The per-epoch ``entropy/*`` metrics on the first ``count`` val clips: the pooler's attention entropy and each
    backbone layer's (and their mean), as a percentage of the uniform distribution's.

    Args:
        clips: the val clips (pixels).
        count: data.entropy_clips.
        anatomy_attention: the masks the classifier attends through.
        backbone_fixed: the backbone's attention never changes (frozen, unmasked): its layers are measured once.
    """

    def __init__(self, clips: ClipDataset, count: int, anatomy_attention: AnatomyAttention, *, backbone_fixed: bool):
        self.batch = torch.utils.data.default_collate([clips[i] for i in range(min(count, len(clips)))])
        self.anatomy_attention = anatomy_attention
        self.backbone_fixed = backbone_fixed
        self.fixed_backbone_entropy: dict[str, float] = {}

    @torch.no_grad()
    def __call__(self, net: VideoClassifier, device: torch.device) -> dict[str, float]:
        batch = {k: v.to(device) for k, v in self.batch.items() if torch.is_tensor(v)}
        anatomy = self.anatomy_attention.token_mask(batch.get("seg_mask"), batch.get("has_mask"))
        out = net(
            pixel_values=batch["pixel_values"], output_attentions=True, **self.anatomy_attention.model_inputs(anatomy)
        )
        result = {}
        if out.pooler_attention is not None:
            result["entropy/pooler"] = attention_entropy_percent(out.pooler_attention)
        if self.fixed_backbone_entropy:  # a frozen backbone's attention never changes: measured once
            return {**result, **self.fixed_backbone_entropy}
        layers = layer_entropies_percent(out.backbone_attentions) if out.backbone_attentions else []
        backbone_entropy = {f"entropy/backbone_layer_{i}": v for i, v in enumerate(layers)}
        if layers:
            backbone_entropy["entropy/backbone_mean"] = float(np.mean(layers))
        if self.backbone_fixed:
            self.fixed_backbone_entropy.update(backbone_entropy)
        return {**result, **backbone_entropy}


@torch.no_grad()
def log_attention_diagnostics(
    run_logger: Any,
    net: VideoClassifier,
    dataset: ClipDataset,
    cfg: CVSConfig,
    device: torch.device,
    anatomy_attention: AnatomyAttention,
) -> dict[str, float]:
    """The research log's attention analyses on the best checkpoint, as artifacts; returns the ``attn/*`` metrics.

    Per backbone layer and for the pooler, and per label category (the "Criterion Comparison Analysis"): entropy,
    std and max of the attention and its mass inside the anatomy masks (``tables/attention_diagnostics.md|csv``);
    and the first ``eval.heatmap_clips`` val clips' attention over their frames (``plots/attention_heatmaps.png``).
    The backbone's maps are reduced one layer of one batch at a time (``attention_probe``), so memory stays at one
    layer's map of a batch whatever the depth.
    """
    backbone, layout = net.backbone, net.backbone.token_layout()
    count = min(cfg.eval.diagnostics_clips or len(dataset), len(dataset))
    loader = torch.utils.data.DataLoader(
        torch.utils.data.Subset(dataset, range(count)), batch_size=cfg.train.batch_size, shuffle=False
    )
    diagnostics = AttentionDiagnostics(CVS_CRITERIA)
    num_layers = len(backbone.blocks()) if backbone.has_attention_layers() else 0
    drawn_layers = sorted({i % num_layers for i in cfg.eval.heatmap_layers}) if num_layers and layout else []
    heat: dict[str, list[torch.Tensor]] = {}
    seen = 0
    for batch in tqdm(loader, desc="attention diagnostics", leave=False):
        batch = {k: v.to(device) for k, v in batch.items() if torch.is_tensor(v)}
        clips = len(batch["labels"])
        # measured inside the anatomy even where training did not use the masks
        anatomy = anatomy_attention.anatomy_tokens(batch.get("seg_mask"), batch.get("has_mask"))
        allowed, applied = (anatomy.allowed, anatomy.applied) if anatomy is not None else (None, None)
        wanted = max(0, cfg.eval.heatmap_clips - seen)
        seen += clips

        def reduce(
            layer: int, probs: torch.Tensor, allowed=allowed, applied=applied, clips=clips, wanted=wanted
        ) -> None:
            diagnostics.add_attention(f"backbone_layer_{layer}", probs, allowed, applied, num_clips=clips)
            if wanted and layer in drawn_layers:  # the mean over heads and queries, per key token
                heat.setdefault(f"backbone_layer_{layer}", []).append(
                    probs.mean(dim=(1, 2)).reshape(clips, -1)[:wanted].cpu()
                )

        with attention_probe(backbone, reduce):
            out = net(pixel_values=batch["pixel_values"], **anatomy_attention.model_inputs(anatomy))
        if out.pooler_attention is not None:
            diagnostics.add_attention("pooler", out.pooler_attention, allowed, applied)
            if wanted and layout is not None:
                heat.setdefault("pooler", []).append(out.pooler_attention.mean(dim=(1, 2))[:wanted].cpu())
        diagnostics.add_predictions(batch["labels"], torch.sigmoid(out.logits))
    run_logger.log_text(diagnostics.to_markdown(), "tables/attention_diagnostics.md")
    with tempfile.TemporaryDirectory() as tmp:
        diagnostics.to_csv(Path(tmp) / "attention_diagnostics.csv")
        run_logger.log_artifact(Path(tmp) / "attention_diagnostics.csv", "tables")
    if heat and layout is not None:
        shown = min(cfg.eval.heatmap_clips, count)
        mean, std = torch.tensor(backbone.mean).view(3, 1, 1), torch.tensor(backbone.std).view(3, 1, 1)
        frames = torch.stack([dataset[i]["pixel_values"] for i in range(shown)]) * std + mean
        frames = (frames.clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 1, 3, 4, 2).numpy()
        for source, maps in heat.items():
            token_maps = torch.cat(maps)[:shown]
            per_frame = np.stack([plots.token_map_per_frame(m, layout) for m in token_maps])
            titles = [f"{dataset.records[i].clip_id} {source}" for i in range(shown)]
            run_logger.log_figure(
                plots.attention_heatmaps(frames, per_frame, titles), f"plots/attention_heatmaps_{source}.png"
            )
    return diagnostics.metrics(prefix="attn/")
