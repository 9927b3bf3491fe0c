"""EpochSampler, class_balanced_weights and mix_clips."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from avlm.data import EpochSampler, class_balanced_weights, mix_clips


def epoch_order(sampler: EpochSampler, epoch: int) -> list[int]:
    sampler.set_epoch(epoch)
    return list(sampler)


def test_order_depends_only_on_seed_and_epoch() -> None:
    sampler = EpochSampler(50, seed=7)
    assert len(sampler) == 50
    orders = [epoch_order(sampler, e) for e in range(4)]
    assert all(sorted(order) == list(range(50)) for order in orders)
    assert len({tuple(order) for order in orders}) == 4
    assert list(sampler) == orders[3]  # iterating again replays the epoch
    # A resumed run builds a new sampler and jumps to the epoch it missed.
    resumed = EpochSampler(50, seed=7)
    assert epoch_order(resumed, 2) == orders[2]
    assert epoch_order(EpochSampler(50, seed=8), 2) != orders[2]
    assert list(EpochSampler(50, seed=7)) == orders[0]  # epoch 0 until set_epoch is called


def test_weighted_sampling_favours_positives() -> None:
    labels = np.zeros((1000, 3), dtype=int)
    labels[:30, 0] = 1
    labels[30:50, 1] = 1
    labels[50:100, 2] = 1
    sampler = EpochSampler(1000, seed=0, weights=class_balanced_weights(labels))
    drawn = np.array(epoch_order(sampler, 0))
    assert len(drawn) == 1000 and len(set(drawn.tolist())) < 1000  # with replacement
    assert drawn.min() >= 0 and drawn.max() < 1000
    positive_share = (drawn < 100).mean()
    assert positive_share > 0.6  # 0.75 expected, against 0.10 for uniform sampling
    assert np.array_equal(drawn, epoch_order(EpochSampler(1000, seed=0, weights=class_balanced_weights(labels)), 0))
    assert not np.array_equal(drawn, epoch_order(sampler, 1))


@pytest.mark.parametrize("weights", [[1.0, 2.0], [1.0, -1.0, 1.0], [0.0, 0.0, 0.0], [1.0, float("nan"), 1.0]])
def test_bad_weights_are_refused(weights: list[float]) -> None:
    with pytest.raises(ValueError, match="weights"):
        EpochSampler(3, seed=0, weights=weights)


def test_class_balanced_weights_formula() -> None:
    # Groups: all-negative {0, 1, 2, 3}, C1 {4, 5}, C2 {5}, C3 {6}.
    labels = np.array([[0, 0, 0]] * 4 + [[1, 0, 0], [1, 1, 0], [0, 0, 1]])
    weights = class_balanced_weights(labels)
    raw = np.array([1 / 4] * 4 + [1 / 2, 1 / 2 + 1, 1.0])
    np.testing.assert_allclose(weights, raw * 7 / raw.sum())
    assert weights.mean() == pytest.approx(1.0)


def test_class_balanced_weights_equalise_groups() -> None:
    rng = np.random.default_rng(0)
    labels = (rng.random((2000, 3)) < [0.146, 0.105, 0.168]).astype(int)
    weights = class_balanced_weights(labels)
    groups = np.column_stack([labels.sum(axis=1) == 0, labels == 1])
    mass = groups.T @ weights / weights.sum()
    # Each group holds about a quarter of the draws (overlaps add a little to the positive groups).
    assert mass.min() > 0.18 and mass.max() < 0.4
    assert mass[0] < 0.3  # against 0.63 all-negative under uniform sampling
    # A criterion with no positives is skipped, not divided by zero.
    assert np.isfinite(class_balanced_weights(np.zeros((5, 3)))).all()
    with pytest.raises(ValueError):
        class_balanced_weights(np.zeros(5))


def constant_clips(batch: int = 6) -> tuple[torch.Tensor, torch.Tensor]:
    """Clip i is the constant i and its first label i / (B - 1), so a mixed label can be checked against pixels."""
    pixels = torch.arange(batch, dtype=torch.float32).view(batch, 1, 1, 1, 1).expand(batch, 3, 2, 8, 10).clone()
    labels = torch.stack(
        [torch.arange(batch) / (batch - 1), (torch.arange(batch) % 2).float(), torch.zeros(batch)], dim=1
    )
    return pixels, labels


def test_zero_alphas_return_inputs_unchanged() -> None:
    pixels, labels = constant_clips()
    out = mix_clips(pixels, labels, mixup_alpha=0.0, cutmix_alpha=0.0, generator=torch.Generator().manual_seed(0))
    assert out[0] is pixels and out[1] is labels


@pytest.mark.parametrize(("mixup_alpha", "cutmix_alpha"), [(0.8, 0.0), (0.0, 1.0), (0.8, 1.0)])
def test_mixing_is_deterministic_given_the_generator(mixup_alpha: float, cutmix_alpha: float) -> None:
    pixels, labels = constant_clips()

    def run(seed: int) -> tuple[torch.Tensor, torch.Tensor]:
        return mix_clips(
            pixels,
            labels,
            mixup_alpha=mixup_alpha,
            cutmix_alpha=cutmix_alpha,
            generator=torch.Generator().manual_seed(seed),
        )

    first, again, other = run(3), run(3), run(4)
    assert torch.equal(first[0], again[0]) and torch.equal(first[1], again[1])
    assert not torch.equal(first[1], other[1])


def test_mixup_labels_are_the_same_convex_combination_as_pixels() -> None:
    pixels, labels = constant_clips()
    generator = torch.Generator().manual_seed(0)
    for _ in range(5):
        mixed, soft = mix_clips(pixels, labels, mixup_alpha=0.4, cutmix_alpha=0.0, generator=generator)
        # MixUp keeps each clip constant: the blend of two constants.
        values = mixed.flatten(1)
        assert torch.allclose(values, values[:, :1].expand_as(values))
        torch.testing.assert_close(soft[:, 0], values[:, 0] / 5)
        assert ((soft >= 0) & (soft <= 1)).all()
        assert soft[:, 2].eq(0).all()
    assert pixels.eq(torch.arange(6.0).view(6, 1, 1, 1, 1)).all()  # inputs are not modified


def test_cutmix_pastes_one_box_on_all_frames_and_lam_is_its_area() -> None:
    pixels, labels = constant_clips()
    generator = torch.Generator().manual_seed(1)
    seen_box = False
    for _ in range(10):
        mixed, soft = mix_clips(pixels, labels, mixup_alpha=0.0, cutmix_alpha=1.0, generator=generator)
        for i in range(6):
            pasted = mixed[i] != i  # (T, C, H, W)
            assert (pasted == pasted[:1, :1]).all()  # the same box on every frame and channel
            box = pasted[0, 0]
            kept = 1.0 - box.float().mean()
            if box.any():
                seen_box = True
                rows, cols = box.any(dim=1).nonzero(), box.any(dim=0).nonzero()
                assert box.sum() == len(rows) * len(cols)  # a rectangle
                source = mixed[i][pasted].unique()
                assert len(source) == 1
                expected = kept * labels[i] + (1 - kept) * labels[int(source)]
                torch.testing.assert_close(soft[i], expected)
            # Whatever the partner, the label's first column tracks the mean pixel.
            torch.testing.assert_close(soft[i, 0], mixed[i].mean() / 5)
    assert seen_box


def test_switch_prob_chooses_between_mixup_and_cutmix() -> None:
    pixels, labels = constant_clips()

    def is_cutmix(switch_prob: float, seed: int) -> bool:
        mixed, _ = mix_clips(
            pixels,
            labels,
            mixup_alpha=1.0,
            cutmix_alpha=1.0,
            switch_prob=switch_prob,
            generator=torch.Generator().manual_seed(seed),
        )
        # CutMix only copies values; MixUp with lam in (0, 1) blends into non-integers.
        return bool((mixed == mixed.round()).all())

    assert all(is_cutmix(1.0, seed) for seed in range(5))
    assert not any(is_cutmix(0.0, seed) for seed in range(5))
    assert len({is_cutmix(0.5, seed) for seed in range(20)}) == 2


def test_integer_labels_become_soft_floats() -> None:
    pixels, _ = constant_clips()
    labels = torch.tensor([[1, 0, 0], [0, 1, 0], [0, 0, 1], [1, 1, 0], [0, 0, 0], [1, 1, 1]])
    _, soft = mix_clips(pixels, labels, mixup_alpha=1.0, cutmix_alpha=0.0, generator=torch.Generator().manual_seed(0))
    assert soft.dtype == torch.float32
    assert ((soft >= 0) & (soft <= 1)).all() and not torch.equal(soft, labels.float())


def test_invalid_arguments() -> None:
    pixels, labels = constant_clips()
    generator = torch.Generator().manual_seed(0)
    with pytest.raises(ValueError, match="alpha"):
        mix_clips(pixels, labels, mixup_alpha=-1.0, cutmix_alpha=0.0, generator=generator)
    with pytest.raises(ValueError, match="switch_prob"):
        mix_clips(pixels, labels, mixup_alpha=1.0, cutmix_alpha=1.0, switch_prob=2.0, generator=generator)
    with pytest.raises(ValueError, match="B, T, C, H, W"):
        mix_clips(pixels[0], labels, mixup_alpha=1.0, cutmix_alpha=0.0, generator=generator)


def test_cutmix_pastes_the_partners_mask_box_like_its_pixels() -> None:
    from avlm.data.mixing import MixPlan

    seg = torch.zeros(2, 1, 4, 4, dtype=torch.int64)
    seg[1] = 3
    plan = MixPlan(perm=torch.tensor([1, 0]), lam=0.75, box=(0, 2, 0, 2))
    pixels = plan.pixels(seg.unsqueeze(2).float())
    mixed, has = plan.masks(seg, torch.tensor([True, True]))
    assert torch.equal(mixed, pixels.squeeze(2).long())
    assert mixed[0, 0, :2, :2].eq(3).all() and mixed[0, 0, 2:, :].eq(0).all()
    _, has = plan.masks(seg, torch.tensor([True, False]))
    assert has.tolist() == [False, False]


def test_mixup_mask_is_the_union_of_both_clips_anatomy() -> None:
    from avlm.data.mixing import MixPlan

    own = torch.tensor([[[[1, 0, 0, -1]]], [[[2, 2, 0, 0]]]])  # (B=2, T=1, 1, 4)
    plan = MixPlan(perm=torch.tensor([1, 0]), lam=0.7, box=None)
    mixed, has = plan.masks(own, torch.tensor([True, True]))
    # clip 0 (heavier: itself): anatomy 1 wins over 2, then 2 where only the partner has anatomy, -1 stays unknown
    assert mixed[0].flatten().tolist() == [1, 2, 0, -1]
    # clip 1 (weight 0.7 on clip 1): its own 2 wins where both are anatomy
    assert mixed[1].flatten().tolist() == [2, 2, 0, -1]
    assert has.tolist() == [True, True]
