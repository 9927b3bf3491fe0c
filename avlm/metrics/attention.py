"""How focused attention maps are, and where they look: the CVS study's attention diagnostics.

Entropy as a percentage of its maximum: 100 % is uniform attention over the keys, 0 % attends to one key only. The
CVS study reports V-JEPA 2's internal attention at 95-99 % in every layer, and the attentive pooler's at about 76 %.
Besides entropy the study compared the std and max of the attention probabilities across label categories (Full CVS,
C1-only, ...: its "Attention Diagnostic" and "Criterion Comparison" analyses); :class:`AttentionDiagnostics`
collects those per clip and per source (``pooler``, ``backbone_layer_<i>``), with the attention mass inside the
anatomy masks where a clip has them.
"""

from __future__ import annotations

import csv
import dataclasses
import math
import re
from collections.abc import Sequence
from pathlib import Path

import torch


def attention_entropy_percent(attention: torch.Tensor) -> float:
    """Mean over all leading dims of H(p) / log(N) · 100 for probability rows p over the last dim (N keys).

    Zero probabilities contribute nothing (0 · log 0 = 0). With a single key there is no choice to make, so the
    entropy is defined as 0.0.

    Args:
        attention: (..., N) probabilities, each row summing to 1 (e.g. (B, heads, Nq, N)).

    Returns:
        The mean normalised entropy in percent; 100 = uniform.

    Raises:
        ValueError: an empty tensor or a scalar.
    """
    if attention.ndim == 0 or attention.numel() == 0:
        raise ValueError(f"attention must be a non-empty (..., N) tensor, got shape {tuple(attention.shape)}")
    return float(_row_entropy_percent(attention.detach().to(torch.float64)).mean())


def _row_entropy_percent(probabilities: torch.Tensor) -> torch.Tensor:
    """H(p) / log(N) · 100 of each row of (..., N) probabilities; 0 for a single key."""
    num_keys = probabilities.shape[-1]
    if num_keys == 1:
        return probabilities.new_zeros(probabilities.shape[:-1])
    return -torch.special.xlogy(probabilities, probabilities).sum(dim=-1) / math.log(num_keys) * 100.0


def layer_entropies_percent(attentions: Sequence[torch.Tensor]) -> list[float]:
    """:func:`attention_entropy_percent` of each layer's attention map.

    Args:
        attentions: one (..., N) tensor per layer, e.g. ``BackboneOutput.attentions``.

    Returns:
        One percentage per layer, in order.
    """
    return [attention_entropy_percent(a) for a in attentions]


ATTENTION_STATISTICS = ("entropy_percent", "std", "max", "mass_in_mask")
# Query rows per chunk: bounds the float64 copy to heads · 256 · N · 8 bytes (ViT-L, 2,048 tokens: 67 MB).
_QUERY_CHUNK = 256


def attention_statistics(
    attention: torch.Tensor,
    token_mask: torch.Tensor | None = None,
    mask_applies: torch.Tensor | None = None,
    *,
    num_clips: int | None = None,
) -> dict[str, torch.Tensor]:
    """Per clip statistics of one layer's attention rows, averaged over heads and queries.

    For each row p (one head, one query) over the N keys: entropy % (as :func:`attention_entropy_percent`), the std
    of the probabilities (population std; uniform = 0), their max, and the mass on the keys of ``token_mask``. A
    head-averaged map (heads = 1) gives the study's "Avg Attention Std / Max". Rows are read clip by clip and 256
    queries at a time, so the extra memory beyond ``attention`` itself is ``heads · 256 · N · 8`` bytes, and the
    streaming probe (``avlm.models.attention_bias.attention_probe``) can feed it one layer at a time.

    Frames folded into the batch (timm ViTs: (B·F, heads, n, n) with ``token_mask`` (B, F·n)) are averaged per clip:
    item ``b·F + f`` is frame ``f`` of clip ``b`` and sees keys ``f·n .. (f+1)·n-1`` of the clip's mask.

    Args:
        attention: (B·F, heads, Nq, n) probabilities, F ≥ 1 frames per clip.
        token_mask: (B, F·n) bool, True = inside the anatomy (``anatomy_token_mask(...).allowed``); None = no mask.
        mask_applies: (B,) bool, True where the clip's mask says something (``anatomy_token_mask(...).applied``);
            None = every clip, when ``token_mask`` is given. Clips where it is False get mass NaN.
        num_clips: B; needed only when frames are folded and there is no ``token_mask``.

    Returns:
        ``{name: (B,) float64 tensor}`` for each name of :data:`ATTENTION_STATISTICS`; ``mass_in_mask`` is NaN for
        every clip when there is no ``token_mask``.

    Raises:
        ValueError: shapes that do not fit together.
    """
    if attention.ndim != 4 or attention.numel() == 0:
        raise ValueError(f"attention must be a non-empty (B, heads, Nq, N) tensor, got {tuple(attention.shape)}")
    items, num_keys = attention.shape[0], attention.shape[-1]
    clips = token_mask.shape[0] if token_mask is not None else (num_clips or items)
    if items % clips:
        raise ValueError(f"attention batch {items} is not a multiple of the {clips} clips")
    frames = items // clips
    if token_mask is not None:
        if token_mask.dtype != torch.bool or token_mask.shape != (clips, frames * num_keys):
            raise ValueError(
                f"token_mask must be bool of shape ({clips}, {frames * num_keys}) for attention "
                f"{tuple(attention.shape)}, got {token_mask.dtype} {tuple(token_mask.shape)}"
            )
        item_masks = token_mask.detach().reshape(items, num_keys).to(torch.float64).cpu()
        if mask_applies is None:
            mask_applies = torch.ones(clips, dtype=torch.bool)
        elif mask_applies.shape != (clips,):
            raise ValueError(f"mask_applies must have shape ({clips},), got {tuple(mask_applies.shape)}")
    sums = torch.zeros(len(ATTENTION_STATISTICS), items, dtype=torch.float64)
    for item in range(items):
        rows = attention[item].detach().flatten(0, -2)  # (heads·Nq, n)
        for start in range(0, rows.shape[0], _QUERY_CHUNK):
            chunk = rows[start : start + _QUERY_CHUNK].to(device="cpu", dtype=torch.float64)
            sums[0, item] += _row_entropy_percent(chunk).sum()
            sums[1, item] += chunk.std(dim=-1, correction=0).sum()
            sums[2, item] += chunk.amax(dim=-1).sum()
            if token_mask is not None:
                sums[3, item] += (chunk @ item_masks[item]).sum()
    rows_per_item = attention.shape[1] * attention.shape[2]
    means = (sums / rows_per_item).reshape(len(ATTENTION_STATISTICS), clips, frames).mean(dim=-1)
    if token_mask is None:
        means[3] = math.nan
    else:
        means[3] = torch.where(mask_applies.detach().cpu().to(torch.bool), means[3], math.nan)
    return dict(zip(ATTENTION_STATISTICS, means, strict=True))


@dataclasses.dataclass(frozen=True)
class DiagnosticRow:
    """The mean statistics of one source over one group of clips.

    Attributes:
        source: where the attention comes from (``pooler``, ``backbone_layer_<i>``).
        group: a label category (``Full CVS``, ``C1-only``, ..., ``mixed``, ``all-negative``) or a criterion's
            positive or negative clips (``C1 positive``, ``C1 negative``, ...).
        clips: clips in the group.
        entropy_percent: mean attention entropy % (NaN for an empty group; likewise the others).
        std: mean std of the attention probabilities.
        max: mean max attention probability.
        mass_in_mask: mean attention mass inside the anatomy mask, over the group's clips that have one.
        clips_with_mask: how many clips ``mass_in_mask`` averages.
        accuracy: categories: single criterion = fraction whose highest predicted criterion is the positive one,
            Full CVS = fraction with every probability > 0.5, all-negative = every probability < 0.5, mixed = NaN
            (the study defined none); criterion groups: positive = fraction predicted > 0.5, negative = < 0.5.
    """

    source: str
    group: str
    clips: int
    entropy_percent: float
    std: float
    max: float
    mass_in_mask: float
    clips_with_mask: int
    accuracy: float


class AttentionDiagnostics:
    """Attention statistics per clip and per source, with the clips' labels and predictions, split by category.

    Feed it batch by batch: :meth:`add_attention` once per source (each chosen backbone layer, e.g. from the
    streaming probe, and the pooler), then :meth:`add_predictions` with the batch's labels and probabilities. Only
    (B,) statistics are kept, never the maps.

    Args:
        criteria: the label columns' names, in order (the CVS criteria C1, C2, C3).
    """

    def __init__(self, criteria: Sequence[str] = ("C1", "C2", "C3")):
        self.criteria = tuple(criteria)
        self._statistics: dict[str, list[dict[str, torch.Tensor]]] = {}
        self._labels: list[torch.Tensor] = []
        self._probabilities: list[torch.Tensor] = []

    @property
    def sources(self) -> tuple[str, ...]:
        return tuple(self._statistics)

    def add_attention(
        self,
        source: str,
        attention: torch.Tensor,
        token_mask: torch.Tensor | None = None,
        mask_applies: torch.Tensor | None = None,
        *,
        num_clips: int | None = None,
    ) -> None:
        """Add one source's attention for a batch; the arguments are those of :func:`attention_statistics`."""
        statistics = attention_statistics(attention, token_mask, mask_applies, num_clips=num_clips)
        self._statistics.setdefault(source, []).append(statistics)

    def add_predictions(self, labels: torch.Tensor, probabilities: torch.Tensor) -> None:
        """Add a batch's labels (B, C) (binarised at 0.5) and predicted probabilities (B, C).

        Raises:
            ValueError: shapes other than (B, len(criteria)) each.
        """
        expected = (labels.shape[0], len(self.criteria))
        if labels.shape != expected or probabilities.shape != expected:
            raise ValueError(
                f"labels {tuple(labels.shape)} and probabilities {tuple(probabilities.shape)} must both be "
                f"(B, {len(self.criteria)}) for criteria {self.criteria}"
            )
        self._labels.append(labels.detach().cpu().to(torch.float64) >= 0.5)
        self._probabilities.append(probabilities.detach().cpu().to(torch.float64))

    def table(self) -> list[DiagnosticRow]:
        """Per source: one row per label category, then a positive and a negative row per criterion.

        Raises:
            ValueError: a source whose clip count differs from the predictions' (a batch fed twice or not at all).
        """
        if not self._labels:
            return []
        positive = torch.cat(self._labels)
        probabilities = torch.cat(self._probabilities)
        groups = self._groups(positive, probabilities)
        rows = []
        for source, batches in self._statistics.items():
            statistics = {name: torch.cat([batch[name] for batch in batches]) for name in ATTENTION_STATISTICS}
            if len(statistics["std"]) != len(positive):
                raise ValueError(
                    f"attention source '{source}' has {len(statistics['std'])} clips but the predictions "
                    f"{len(positive)}: call add_attention once per source and batch"
                )
            for group, (members, accuracy) in groups.items():
                masses = statistics["mass_in_mask"][members]
                masses = masses[~masses.isnan()]
                rows.append(
                    DiagnosticRow(
                        source=source,
                        group=group,
                        clips=int(members.sum()),
                        entropy_percent=_mean(statistics["entropy_percent"][members]),
                        std=_mean(statistics["std"][members]),
                        max=_mean(statistics["max"][members]),
                        mass_in_mask=_mean(masses),
                        clips_with_mask=len(masses),
                        accuracy=accuracy,
                    )
                )
        return rows

    def _groups(self, positive: torch.Tensor, probabilities: torch.Tensor) -> dict[str, tuple[torch.Tensor, float]]:
        """Group name → (member clips (B,) bool, accuracy), categories first."""
        positives = positive.sum(dim=1)
        top = probabilities.argmax(dim=1)
        full = positives == len(self.criteria)
        negative = positives == 0
        groups = {"Full CVS": (full, _mean((probabilities > 0.5).all(dim=1)[full]))}
        single = positives == 1
        for k, name in enumerate(self.criteria):
            members = single & positive[:, k]
            groups[f"{name}-only"] = (members, _mean(top[members] == k))
        groups["mixed"] = (~full & ~negative & ~single, math.nan)
        groups["all-negative"] = (negative, _mean((probabilities < 0.5).all(dim=1)[negative]))
        for k, name in enumerate(self.criteria):
            groups[f"{name} positive"] = (positive[:, k], _mean(probabilities[positive[:, k], k] > 0.5))
            groups[f"{name} negative"] = (~positive[:, k], _mean(probabilities[~positive[:, k], k] < 0.5))
        return groups

    def to_markdown(self) -> str:
        """The table as Markdown; NaN (empty group, no mask) shows as a dash."""
        lines = [
            "| source | group | clips | entropy % | std | max | mass in mask (clips) | accuracy |",
            "|---|---|---:|---:|---:|---:|---:|---:|",
        ]
        for row in self.table():
            lines.append(
                f"| {row.source} | {row.group} | {row.clips} | {_cell(row.entropy_percent)} | {_cell(row.std)} | "
                f"{_cell(row.max)} | {_cell(row.mass_in_mask)} ({row.clips_with_mask}) | {_cell(row.accuracy)} |"
            )
        return "\n".join(lines) + "\n"

    def to_csv(self, path: str | Path) -> Path:
        """Write the table to ``path``, one :class:`DiagnosticRow` a line (NaN as ``nan``)."""
        path = Path(path)
        with path.open("w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=[f.name for f in dataclasses.fields(DiagnosticRow)])
            writer.writeheader()
            writer.writerows(dataclasses.asdict(row) for row in self.table())
        return path

    def metrics(self, prefix: str = "attn/") -> dict[str, float]:
        """Flat metrics: ``<prefix><source>/<statistic>`` over all clips, ``<prefix><source>/<group>/std`` and
        ``/mass_in_mask`` per group, and ``<prefix>accuracy/<group>`` (groups as slugs: ``full_cvs``, ``c2_only``,
        ``c1_positive``, ...). NaN values (empty groups, no masks) are left out."""
        metrics: dict[str, float] = {}
        for source, batches in self._statistics.items():
            for name in ATTENTION_STATISTICS:
                values = torch.cat([batch[name] for batch in batches])
                metrics[f"{prefix}{source}/{name}"] = _mean(values[~values.isnan()])
        for row in self.table():
            slug = _slug(row.group)
            metrics[f"{prefix}{row.source}/{slug}/std"] = row.std
            metrics[f"{prefix}{row.source}/{slug}/mass_in_mask"] = row.mass_in_mask
            metrics[f"{prefix}accuracy/{slug}"] = row.accuracy
        return {key: value for key, value in metrics.items() if not math.isnan(value)}


def _mean(values: torch.Tensor) -> float:
    """The mean as a float; NaN for no values."""
    return float(values.to(torch.float64).mean()) if values.numel() else math.nan


def _cell(value: float) -> str:
    return "–" if math.isnan(value) else f"{value:.4g}"


def _slug(group: str) -> str:
    """``Full CVS`` → ``full_cvs``, ``C2-only`` → ``c2_only``."""
    return re.sub(r"[^a-z0-9]+", "_", group.lower()).strip("_")
