"""Attention entropy as a percentage of its maximum."""

import math

import pytest
import torch

from avlm.metrics import attention_entropy_percent, layer_entropies_percent
from avlm.metrics.attention import ATTENTION_STATISTICS, AttentionDiagnostics, attention_statistics
from avlm.models import build_backbone


def test_uniform_is_100_and_one_hot_is_0():
    assert attention_entropy_percent(torch.full((2, 3, 5, 7), 1 / 7)) == pytest.approx(100.0)
    one_hot = torch.zeros(2, 3, 5, 7)
    one_hot[..., 2] = 1.0
    assert attention_entropy_percent(one_hot) == 0.0


def test_hand_computed_rows_and_their_mean():
    # H(0.5, 0.25, 0.25, 0) = 0.5 ln 2 + 2 * 0.25 ln 4 = 1.5 ln 2 nats; / ln 4 = 75 %.
    row = torch.tensor([0.5, 0.25, 0.25, 0.0])
    assert attention_entropy_percent(row) == pytest.approx(75.0)
    # Rows (0.9, 0.1, 0, 0) and uniform: the mean of their two percentages.
    skewed = -(0.9 * math.log(0.9) + 0.1 * math.log(0.1)) / math.log(4) * 100
    rows = torch.tensor([[[0.9, 0.1, 0.0, 0.0], [0.25, 0.25, 0.25, 0.25]]])
    assert attention_entropy_percent(rows) == pytest.approx((skewed + 100.0) / 2)


def test_single_key_is_zero_and_empty_is_an_error():
    assert attention_entropy_percent(torch.ones(2, 4, 3, 1)) == 0.0
    with pytest.raises(ValueError, match="non-empty"):
        attention_entropy_percent(torch.zeros(0, 4))


def test_layer_entropies_of_a_backbone():
    backbone = build_backbone("vjepa2-tiny", init_seed=0)
    clip = torch.randn(1, 4, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        attentions = backbone(clip, output_attentions=True).attentions
    entropies = layer_entropies_percent(attentions)
    assert len(entropies) == 2
    # A random init with small weights attends almost uniformly, like the pretrained V-JEPA 2 in the study.
    assert all(90.0 < e <= 100.0 for e in entropies)
    assert entropies == [attention_entropy_percent(a) for a in attentions]


# --- per clip statistics and the diagnostics table ---------------------------------------------------------------

# One head, one query, four keys per clip: the hand-made case of the tests below.
HAND_ROWS = torch.tensor([[0.5, 0.25, 0.25, 0.0], [0.25] * 4, [1.0, 0.0, 0.0, 0.0], [0.7, 0.1, 0.1, 0.1]])
HAND_MASK = torch.tensor([[1, 1, 0, 0], [1, 0, 0, 0], [1, 1, 1, 1], [0, 0, 0, 1]], dtype=torch.bool)
HAND_APPLIES = torch.tensor([True, True, False, True])  # clip 2 has no anatomy mask
# Labels [1,1,1], [1,0,0], [0,1,0], [0,0,0]; predictions: right, C3 on top (wrong), C2 on top (right), right.
HAND_LABELS = torch.tensor([[1.0, 1.0, 1.0], [1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 0.0]])
HAND_PROBABILITIES = torch.tensor([[0.9, 0.8, 0.7], [0.2, 0.1, 0.6], [0.3, 0.6, 0.1], [0.1, 0.2, 0.4]])
# Population std around the uniform mean 0.25: sqrt(2 · 0.25² / 4), 0, sqrt((0.75² + 3 · 0.25²) / 4), ...
HAND_STD = [math.sqrt(0.03125), 0.0, math.sqrt(0.1875), math.sqrt(0.0675)]
HAND_MAX = [0.5, 0.25, 1.0, 0.7]
HAND_ENTROPY = [75.0, 100.0, 0.0, -(0.7 * math.log(0.7) + 0.3 * math.log(0.1)) / math.log(4) * 100]
HAND_MASS = [0.75, 0.25, math.nan, 0.1]


def _hand_diagnostics() -> AttentionDiagnostics:
    diagnostics = AttentionDiagnostics()
    # Fed in two batches, as an evaluation loop does.
    for batch in (slice(0, 2), slice(2, 4)):
        diagnostics.add_attention("pooler", HAND_ROWS[batch, None, None, :], HAND_MASK[batch], HAND_APPLIES[batch])
        diagnostics.add_predictions(HAND_LABELS[batch], HAND_PROBABILITIES[batch])
    return diagnostics


def test_statistics_of_hand_made_rows():
    statistics = attention_statistics(HAND_ROWS[:, None, None, :], HAND_MASK, HAND_APPLIES)
    assert list(statistics) == list(ATTENTION_STATISTICS)
    assert statistics["entropy_percent"].tolist() == pytest.approx(HAND_ENTROPY)
    assert statistics["std"].tolist() == pytest.approx(HAND_STD)
    assert statistics["max"].tolist() == pytest.approx(HAND_MAX)
    assert statistics["mass_in_mask"].tolist() == pytest.approx(HAND_MASS, nan_ok=True)
    assert attention_statistics(HAND_ROWS[:, None, None, :])["mass_in_mask"].isnan().all()


def test_statistics_average_heads_and_queries_and_folded_frames():
    # Clip 0: a one-hot head and a uniform head -> entropy (0 + 100) / 2, max (1 + 0.25) / 2.
    two_heads = torch.stack([HAND_ROWS[2], HAND_ROWS[1]])[None, :, None, :]
    statistics = attention_statistics(two_heads)
    assert statistics["entropy_percent"].tolist() == pytest.approx([50.0])
    assert statistics["max"].tolist() == pytest.approx([0.625])
    # timm: 2 clips × 2 frames folded into the batch, each frame 4 keys; the mask covers both frames' keys.
    folded = HAND_ROWS[:, None, None, :]  # items: clip 0 frames 0, 1; clip 1 frames 0, 1
    mask = HAND_MASK.reshape(2, 8)
    statistics = attention_statistics(folded, mask)
    assert statistics["max"].tolist() == pytest.approx([(0.5 + 0.25) / 2, (1.0 + 0.7) / 2])
    assert statistics["mass_in_mask"].tolist() == pytest.approx([(0.75 + 0.25) / 2, (1.0 + 0.1) / 2])
    assert attention_statistics(folded, num_clips=2)["std"].tolist() == pytest.approx(
        [(HAND_STD[0] + HAND_STD[1]) / 2, (HAND_STD[2] + HAND_STD[3]) / 2]
    )
    with pytest.raises(ValueError, match="token_mask must be bool of shape"):
        attention_statistics(folded, HAND_MASK[:, :3])


def test_diagnostics_table_by_category_and_criterion():
    rows = {(row.source, row.group): row for row in _hand_diagnostics().table()}
    groups = ["Full CVS", "C1-only", "C2-only", "C3-only", "mixed", "all-negative"]
    groups += [f"C{k} {side}" for k in (1, 2, 3) for side in ("positive", "negative")]
    assert list(rows) == [("pooler", g) for g in groups]
    full, c1_only, c2_only = rows["pooler", "Full CVS"], rows["pooler", "C1-only"], rows["pooler", "C2-only"]
    assert (full.clips, full.std, full.max, full.mass_in_mask, full.accuracy) == pytest.approx(
        (1, HAND_STD[0], 0.5, 0.75, 1.0)
    )
    assert (c1_only.clips, c1_only.entropy_percent, c1_only.accuracy) == (1, pytest.approx(100.0), 0.0)
    assert c2_only.accuracy == 1.0 and math.isnan(c2_only.mass_in_mask) and c2_only.clips_with_mask == 0
    empty = rows["pooler", "C3-only"]
    assert empty.clips == 0 and math.isnan(empty.std) and math.isnan(empty.accuracy)
    assert rows["pooler", "mixed"].clips == 0
    assert rows["pooler", "all-negative"].accuracy == 1.0
    c1_positive, c1_negative = rows["pooler", "C1 positive"], rows["pooler", "C1 negative"]
    assert c1_positive.clips == 2 and c1_positive.std == pytest.approx((HAND_STD[0] + HAND_STD[1]) / 2)
    assert c1_positive.mass_in_mask == pytest.approx(0.5) and c1_positive.accuracy == 0.5  # 0.9 > 0.5, 0.2 not
    assert c1_negative.mass_in_mask == pytest.approx(0.1) and c1_negative.clips_with_mask == 1
    assert c1_negative.accuracy == 1.0
    # C3: positive only clip 0 (0.7 > 0.5); negatives 0.6, 0.1, 0.4 -> 2 of 3 below 0.5.
    assert rows["pooler", "C3 positive"].accuracy == 1.0
    assert rows["pooler", "C3 negative"].accuracy == pytest.approx(2 / 3)


def test_diagnostics_metrics_markdown_and_csv(tmp_path):
    diagnostics = _hand_diagnostics()
    metrics = diagnostics.metrics()
    assert metrics["attn/pooler/std"] == pytest.approx(sum(HAND_STD) / 4)
    assert metrics["attn/pooler/mass_in_mask"] == pytest.approx((0.75 + 0.25 + 0.1) / 3)
    assert metrics["attn/pooler/c2_only/std"] == pytest.approx(HAND_STD[2])
    assert metrics["attn/pooler/full_cvs/mass_in_mask"] == pytest.approx(0.75)
    assert metrics["attn/accuracy/c1_only"] == 0.0
    assert "attn/pooler/c2_only/mass_in_mask" not in metrics  # NaN: left out
    assert "attn/pooler/c3_only/std" not in metrics
    markdown = diagnostics.to_markdown().splitlines()
    assert len(markdown) == 2 + 12
    assert markdown[2] == "| pooler | Full CVS | 1 | 75 | 0.1768 | 0.5 | 0.75 (1) | 1 |"
    assert markdown[5] == "| pooler | C3-only | 0 | – | – | – | – (0) | – |"
    path = diagnostics.to_csv(tmp_path / "attention.csv")
    lines = path.read_text().splitlines()
    assert lines[0] == "source,group,clips,entropy_percent,std,max,mass_in_mask,clips_with_mask,accuracy"
    assert len(lines) == 13 and lines[4].startswith("pooler,C3-only,0,nan,nan")


def test_diagnostics_refuse_a_source_fed_twice():
    diagnostics = _hand_diagnostics()
    diagnostics.add_attention("pooler", HAND_ROWS[:1, None, None, :])
    with pytest.raises(ValueError, match="'pooler' has 5 clips but the predictions 4"):
        diagnostics.table()
    with pytest.raises(ValueError, match=r"\(B, 3\)"):
        diagnostics.add_predictions(HAND_LABELS[:, :2], HAND_PROBABILITIES[:, :2])


def test_streamed_backbone_statistics_equal_those_of_output_attentions():
    from avlm.models.attention_bias import attention_probe

    backbone = build_backbone("vjepa2-tiny", num_frames=4, init_seed=0)
    clip = torch.randn(2, 4, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    mask = torch.rand(2, backbone.token_layout().num_tokens, generator=torch.Generator().manual_seed(1)) > 0.5
    streamed = AttentionDiagnostics()
    with torch.no_grad():
        attentions = backbone(clip, output_attentions=True).attentions
        with attention_probe(backbone, lambda i, probs: streamed.add_attention(f"backbone_layer_{i}", probs, mask)):
            backbone(clip)
    streamed.add_predictions(HAND_LABELS[:2], HAND_PROBABILITIES[:2])
    held = AttentionDiagnostics()
    for i, attention in enumerate(attentions):
        held.add_attention(f"backbone_layer_{i}", attention, mask)
    held.add_predictions(HAND_LABELS[:2], HAND_PROBABILITIES[:2])
    assert streamed.sources == ("backbone_layer_0", "backbone_layer_1")
    assert streamed.metrics() == pytest.approx(held.metrics(), rel=1e-5)
    assert held.metrics()["attn/backbone_layer_0/entropy_percent"] == pytest.approx(
        attention_entropy_percent(attentions[0])
    )


def test_streamed_timm_frames_are_averaged_per_clip():
    from avlm.models.attention_bias import attention_probe

    backbone = build_backbone("timm-tiny", num_frames=4, init_seed=0, frame_tokens="all")
    layout = backbone.token_layout()
    clip = torch.randn(2, 4, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    mask = torch.rand(2, layout.num_tokens, generator=torch.Generator().manual_seed(1)) > 0.5
    layer_0 = []
    with torch.no_grad(), attention_probe(backbone, lambda i, probs: layer_0.append(probs), layers=[0]):
        backbone(clip)
    (probs,) = layer_0  # (B·T, heads, n, n): the frames folded into the batch
    assert probs.shape[0] == 2 * 4 and probs.shape[-1] == layout.tokens_per_step
    statistics = attention_statistics(probs, mask)
    frame_masks = mask.reshape(8, 1, 1, layout.tokens_per_step).to(probs.dtype)
    per_frame_mass = (probs * frame_masks).sum(-1).mean(dim=(1, 2)).reshape(2, 4).mean(1)
    assert statistics["mass_in_mask"].tolist() == pytest.approx(per_frame_mass.tolist(), rel=1e-6)
    per_frame_max = probs.amax(-1).mean(dim=(1, 2)).reshape(2, 4).mean(1)
    assert statistics["max"].tolist() == pytest.approx(per_frame_max.tolist(), rel=1e-6)
