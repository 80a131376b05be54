"""Tests for IoU-balanced sampling (paper Sec. 3.1, Eq. 1-2, Fig. 3, Table 4)."""

from __future__ import annotations

import pytest
import torch

from libra_rcnn.ops.iou_balanced_sampler import (
    SamplingSettings,
    instance_balanced_positive_sample,
    iou_balanced_negative_sample,
    random_choice,
    sample_positives_negatives,
)


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _assert_distinct_subset(picked: torch.Tensor, candidates: torch.Tensor) -> None:
    assert picked.dtype == torch.int64
    assert picked.unique().numel() == picked.numel(), "an index was sampled twice"
    assert torch.isin(picked, candidates).all(), "an index outside the candidates was returned"


def _bin_of(ious: torch.Tensor, lo: float, hi: float, k: int) -> torch.Tensor:
    """Independent bin assignment by explicit edge comparisons (last bin closed)."""
    edges = [lo + (hi - lo) * j / k for j in range(k + 1)]
    bins = torch.full_like(ious, -1, dtype=torch.long)
    for j in range(k):
        upper = ious <= edges[j + 1] if j == k - 1 else ious < edges[j + 1]
        bins[(ious >= edges[j]) & upper] = j
    assert (bins >= 0).all()
    return bins


def _skewed_pool(num_neg: int, seed: int, num_pos: int = 0):
    """Negatives with IoU = 0.5 * u^3 (mostly near 0, like Fig. 3), positives at IoU 0.95."""
    g = _gen(seed)
    neg_iou = 0.5 * torch.rand(num_neg, generator=g) ** 3
    max_overlaps = torch.cat([neg_iou, torch.full((num_pos,), 0.95)])
    neg_inds = torch.arange(num_neg)
    return neg_inds, max_overlaps


# ---------------------------------------------------------------------------- random_choice


def test_random_choice_subset_and_all_when_fewer():
    cands = torch.tensor([4, 9, 2, 7, 11, 30])
    out = random_choice(cands, 4, generator=_gen(1))
    assert out.numel() == 4
    _assert_distinct_subset(out, cands)
    assert torch.equal(random_choice(cands, 6, generator=_gen(1)), cands)
    assert torch.equal(random_choice(cands, 100, generator=_gen(1)), cands)
    assert random_choice(cands, 0, generator=_gen(1)).numel() == 0
    assert random_choice(torch.zeros(0, dtype=torch.long), 3).numel() == 0


def test_random_choice_is_uniform():
    cands = torch.arange(10)
    counts = torch.zeros(10)
    g = _gen(3)
    for _ in range(2000):
        counts[random_choice(cands, 3, generator=g)] += 1
    freq = counts / 2000  # each should be 3 / 10
    assert torch.allclose(freq, torch.full((10,), 0.3), atol=0.05)


# ----------------------------------------------------------------- IoU-balanced negatives


@pytest.mark.parametrize("num_bins", [2, 3, 5])
def test_per_bin_counts_equal_with_many_candidates(num_bins):
    neg_inds, max_overlaps = _skewed_pool(3000, seed=num_bins, num_pos=50)
    num = 301  # not divisible by 2, 3 or 5: the remainder must be spread
    picked = iou_balanced_negative_sample(
        neg_inds, max_overlaps, num, num_bins=num_bins, generator=_gen(0)
    )
    assert picked.numel() == num
    _assert_distinct_subset(picked, neg_inds)
    neg_iou = max_overlaps[neg_inds]
    # bins span [0, max IoU among negatives], not the positives' 0.95
    hi = float(neg_iou.max())
    candidate_counts = torch.bincount(_bin_of(neg_iou, 0.0, hi, num_bins), minlength=num_bins)
    assert (candidate_counts >= num // num_bins + 1).all(), "pool too small for this test"
    counts = torch.bincount(_bin_of(max_overlaps[picked], 0.0, hi, num_bins), minlength=num_bins)
    assert counts.sum() == num
    assert counts.min() >= num // num_bins and counts.max() <= num // num_bins + 1
    # Random sampling of this pool would put most picks in bin 0.
    assert counts[0] < 0.5 * num


def test_selection_probability_follows_eq2():
    # bins of sizes 300 / 60 / 30 over [0, 0.6]; N = 60, K = 3 -> p_k = 20 / M_k (Eq. 2)
    g = _gen(5)
    ious = torch.cat(
        [
            0.19 * torch.rand(300, generator=g),
            0.21 + 0.18 * torch.rand(60, generator=g),
            0.41 + 0.18 * torch.rand(29, generator=g),
            torch.tensor([0.6]),
        ]
    )
    neg_inds = torch.arange(ious.numel())
    draws = 400
    counts = torch.zeros(ious.numel())
    for _ in range(draws):
        counts[iou_balanced_negative_sample(neg_inds, ious, 60, num_bins=3, generator=g)] += 1
    freq = counts / draws
    for sl, expected in [(slice(0, 300), 20 / 300), (slice(300, 360), 20 / 60),
                         (slice(360, 390), 20 / 30)]:
        assert abs(freq[sl].mean().item() - expected) < 1e-6  # exactly N / K per bin
        # uniform inside the bin: every candidate within 5 binomial sigmas of p_k
        sigma = (expected * (1 - expected) / draws) ** 0.5
        assert (freq[sl] - expected).abs().max().item() < 5 * sigma


def test_short_bin_gives_all_and_fill_is_random():
    g = _gen(2)
    ious = torch.cat(
        [
            0.09 * torch.rand(1000, generator=g),  # bin 0 of [0, 0.3]
            torch.tensor([0.12, 0.13, 0.15, 0.17, 0.19]),  # bin 1: only 5
            0.2 + 0.1 * torch.rand(199, generator=g),  # bin 2
            torch.tensor([0.3]),
        ]
    )
    neg_inds = torch.arange(ious.numel())
    picked = iou_balanced_negative_sample(neg_inds, ious, 150, num_bins=3, generator=_gen(9))
    assert picked.numel() == 150
    _assert_distinct_subset(picked, neg_inds)
    bins = _bin_of(ious[picked], 0.0, 0.3, 3)
    counts = torch.bincount(bins, minlength=3)
    assert counts[1] == 5  # the short bin gives everything it has
    assert counts[0] >= 50 and counts[2] >= 50
    assert counts[0] + counts[2] == 145


def test_few_negatives_all_taken_once():
    ious = torch.tensor([0.0, 0.1, 0.3, 0.45, 0.2, 0.9])
    neg_inds = torch.tensor([0, 1, 2, 3, 4])
    for kwargs in [{}, {"floor_thr": 0.0, "floor_fraction": 0.5}, {"floor_thr": 0.2}]:
        picked = iou_balanced_negative_sample(neg_inds, ious, 5, generator=_gen(0), **kwargs)
        assert sorted(picked.tolist()) == [0, 1, 2, 3, 4]
        picked = iou_balanced_negative_sample(neg_inds, ious, 50, generator=_gen(0), **kwargs)
        assert sorted(picked.tolist()) == [0, 1, 2, 3, 4]


def test_all_zero_iou_degenerates_to_random():
    ious = torch.zeros(500)
    neg_inds = torch.arange(500)
    for kwargs in [{}, {"floor_thr": 0.0, "floor_fraction": 0.25}, {"floor_thr": 0.1}]:
        picked = iou_balanced_negative_sample(neg_inds, ious, 64, generator=_gen(0), **kwargs)
        assert picked.numel() == 64
        _assert_distinct_subset(picked, neg_inds)


def test_num_bins_one_is_random_choice():
    neg_inds, max_overlaps = _skewed_pool(400, seed=1)
    a = iou_balanced_negative_sample(neg_inds, max_overlaps, 50, num_bins=1, generator=_gen(4))
    b = random_choice(neg_inds, 50, generator=_gen(4))
    assert torch.equal(a, b)


def test_floor_variant_positive_threshold():
    g = _gen(11)
    ious = torch.cat(
        [0.1 * torch.rand(1000, generator=g), 0.1 + 0.4 * torch.rand(500, generator=g)]
    )
    neg_inds = torch.arange(ious.numel())
    picked = iou_balanced_negative_sample(
        neg_inds, ious, 200, floor_thr=0.1, floor_fraction=0.3, generator=_gen(0)
    )
    assert picked.numel() == 200
    _assert_distinct_subset(picked, neg_inds)
    in_floor = ious[picked] < 0.1
    assert in_floor.sum() == 200 - int(200 * 0.7)  # 60
    # the other 140 are balanced over 3 bins of [0.1, max]
    hi = float(ious.max())
    counts = torch.bincount(_bin_of(ious[picked][~in_floor], 0.1, hi, 3), minlength=3)
    assert counts.min() >= 46 and counts.max() <= 47


def test_floor_variant_zero_threshold_means_exact_zero():
    g = _gen(12)
    ious = torch.cat(
        [
            torch.zeros(500),
            0.05 * torch.rand(500, generator=g) + 1e-4,  # tiny but nonzero: not floor
            0.05 + 0.45 * torch.rand(100, generator=g),
        ]
    )
    neg_inds = torch.arange(ious.numel())
    picked = iou_balanced_negative_sample(
        neg_inds, ious, 200, floor_thr=0.0, floor_fraction=0.25, generator=_gen(0)
    )
    assert picked.numel() == 200
    _assert_distinct_subset(picked, neg_inds)
    assert (ious[picked] == 0).sum() == 50
    assert (ious[picked] > 0).sum() == 150


def test_floor_variant_shortfalls():
    g = _gen(13)
    # floor set (IoU < 0.1) too small: all of it, the rest from the binned side
    ious = torch.cat([0.09 * torch.rand(10, generator=g), 0.1 + 0.4 * torch.rand(300, generator=g)])
    neg_inds = torch.arange(ious.numel())
    picked = iou_balanced_negative_sample(
        neg_inds, ious, 100, floor_thr=0.1, floor_fraction=0.5, generator=_gen(0)
    )
    assert picked.numel() == 100
    _assert_distinct_subset(picked, neg_inds)
    assert (ious[picked] < 0.1).sum() == 10
    # binned side (IoU >= 0.1) too small: all of it, the rest from the floor set
    ious = torch.cat([0.09 * torch.rand(300, generator=g), 0.1 + 0.4 * torch.rand(20, generator=g)])
    neg_inds = torch.arange(ious.numel())
    picked = iou_balanced_negative_sample(
        neg_inds, ious, 100, floor_thr=0.1, floor_fraction=0.5, generator=_gen(0)
    )
    assert picked.numel() == 100
    _assert_distinct_subset(picked, neg_inds)
    assert (ious[picked] >= 0.1).sum() == 20


def test_floor_fraction_without_floor_set_still_fills():
    neg_inds, max_overlaps = _skewed_pool(1000, seed=3)
    picked = iou_balanced_negative_sample(
        neg_inds, max_overlaps, 90, floor_fraction=0.5, generator=_gen(0)
    )
    assert picked.numel() == 90
    _assert_distinct_subset(picked, neg_inds)
    # 45 balanced (15 per bin) plus 45 uniform: every bin has at least its 15
    counts = torch.bincount(
        _bin_of(max_overlaps[picked], 0.0, float(max_overlaps.max()), 3), minlength=3
    )
    assert counts.min() >= 15


def test_iou_balanced_puts_more_mass_on_hard_negatives_than_random():
    """Fig. 3: most negatives have IoU < 0.05; IoU-balanced sampling favours the rest."""
    g = _gen(42)
    num_neg = 2000
    easy = 0.05 * torch.rand(1800, generator=g)
    hard = 0.05 + 0.45 * torch.rand(200, generator=g)
    ious = torch.cat([easy, hard])[torch.randperm(num_neg, generator=g)]
    neg_inds = torch.arange(num_neg)
    num = 150
    balanced_share, random_share = 0.0, 0.0
    draws = 20
    for _ in range(draws):
        b = iou_balanced_negative_sample(neg_inds, ious, num, num_bins=3, generator=g)
        r = random_choice(neg_inds, num, generator=g)
        balanced_share += (ious[b] >= 0.05).float().mean().item() / draws
        random_share += (ious[r] >= 0.05).float().mean().item() / draws
    assert abs(random_share - 0.1) < 0.03
    assert balanced_share > 0.5
    assert balanced_share > 2 * random_share


# --------------------------------------------------------- instance-balanced positives


def _positives(counts_per_gt):
    gt = torch.cat([torch.full((c,), i) for i, c in enumerate(counts_per_gt)])
    perm = torch.randperm(gt.numel(), generator=_gen(7))
    matched = gt[perm]
    return torch.arange(matched.numel()), matched


def test_instance_quota_with_fill():
    pos_inds, matched = _positives([100, 50, 5, 3, 1])
    picked = instance_balanced_positive_sample(pos_inds, matched, 64, generator=_gen(0))
    assert picked.numel() == 64
    _assert_distinct_subset(picked, pos_inds)
    per_gt = torch.bincount(matched[picked], minlength=5)
    # quota = round(64 / 5) + 1 = 14; small instances give everything, the big ones >= 14
    assert per_gt[2:].tolist() == [5, 3, 1]
    assert per_gt[0] >= 14 and per_gt[1] >= 14


def test_instance_quota_with_cut():
    pos_inds, matched = _positives([50] * 10)
    picked = instance_balanced_positive_sample(pos_inds, matched, 32, generator=_gen(0))
    assert picked.numel() == 32
    _assert_distinct_subset(picked, pos_inds)
    per_gt = torch.bincount(matched[picked], minlength=10)
    assert per_gt.max() <= 4  # quota = round(3.2) + 1 = 4; the 40 picks are cut to 32


def test_instance_quota_is_round_plus_one():
    # 10 instances, num = 30: quota round(3) + 1 = 4 -> 40 picks cut to 30 at random, so some
    # instance keeps 4 (a quota of exactly 3 would give every instance 3)
    pos_inds, matched = _positives([50] * 10)
    picked = instance_balanced_positive_sample(pos_inds, matched, 30, generator=_gen(0))
    per_gt = torch.bincount(matched[picked], minlength=10)
    assert per_gt.sum() == 30 and per_gt.max() == 4


def test_instance_quota_balances_versus_random():
    pos_inds, matched = _positives([400, 10, 10, 10])
    picked = instance_balanced_positive_sample(pos_inds, matched, 40, generator=_gen(0))
    per_gt = torch.bincount(matched[picked], minlength=4)
    # quota round(40 / 4) + 1 = 11: picks 11 + 10 + 10 + 10 = 41, one dropped at random
    assert per_gt.sum() == 40
    assert per_gt[0] in (10, 11) and all(c in (9, 10) for c in per_gt[1:].tolist())
    rand = random_choice(pos_inds, 40, generator=_gen(0))
    assert torch.bincount(matched[rand], minlength=4)[0] > 25


def test_instance_quota_with_sparse_gt_ids_and_few_positives():
    pos_inds = torch.tensor([3, 8, 9])
    matched = torch.zeros(10, dtype=torch.long)
    matched[pos_inds] = torch.tensor([17, 17, 2])
    assert sorted(instance_balanced_positive_sample(pos_inds, matched, 5).tolist()) == [3, 8, 9]
    picked = instance_balanced_positive_sample(pos_inds, matched, 2, generator=_gen(0))
    assert picked.numel() == 2
    _assert_distinct_subset(picked, pos_inds)
    assert instance_balanced_positive_sample(pos_inds, matched, 0).numel() == 0


# ------------------------------------------------------------------- combined sampler


def _image(num_pos=100, num_neg=1500, num_ign=200, num_gt=8, seed=0):
    g = _gen(seed)
    n = num_pos + num_neg + num_ign
    labels = torch.cat(
        [
            torch.randint(1, 81, (num_pos,), generator=g),
            torch.zeros(num_neg, dtype=torch.long),
            torch.full((num_ign,), -1),
        ]
    )
    max_overlaps = torch.cat(
        [
            0.5 + 0.5 * torch.rand(num_pos, generator=g),
            0.5 * torch.rand(num_neg, generator=g) ** 3,
            0.4 + 0.1 * torch.rand(num_ign, generator=g),
        ]
    )
    matched = torch.randint(0, max(num_gt, 1), (n,), generator=g)
    perm = torch.randperm(n, generator=g)
    return labels[perm], max_overlaps[perm], matched[perm]


BALANCE_MODES = [
    {},
    {"pos_balance": True},
    {"neg_balance": True},
    {"pos_balance": True, "neg_balance": True},
    {"pos_balance": True, "neg_balance": True, "floor_thr": 0.0, "floor_fraction": 0.5},
]


@pytest.mark.parametrize("mode", BALANCE_MODES)
def test_combined_counts_disjoint_and_no_ignored(mode):
    labels, max_overlaps, matched = _image()
    pos, neg = sample_positives_negatives(
        labels, max_overlaps, matched, SamplingSettings(num=512, pos_fraction=0.25, **mode),
        generator=_gen(0)
    )
    assert pos.numel() == 100  # fewer than 128 positives: all of them
    assert neg.numel() == 412
    assert (labels[pos] >= 1).all() and (labels[neg] == 0).all()
    assert not torch.isin(pos, neg).any()
    assert pos.unique().numel() == pos.numel() and neg.unique().numel() == neg.numel()


@pytest.mark.parametrize("mode", BALANCE_MODES)
def test_combined_positive_cap(mode):
    labels, max_overlaps, matched = _image(num_pos=400)
    pos, neg = sample_positives_negatives(
        labels, max_overlaps, matched, SamplingSettings(num=256, pos_fraction=0.25, **mode),
        generator=_gen(0)
    )
    assert pos.numel() == 64 and neg.numel() == 192


def test_combined_neg_pos_upper_bound():
    labels, max_overlaps, matched = _image(num_pos=5)
    pos, neg = sample_positives_negatives(
        labels, max_overlaps, matched,
        SamplingSettings(num=512, neg_pos_ub=3.0, neg_balance=True), generator=_gen(0)
    )
    assert pos.numel() == 5 and neg.numel() == 15
    labels, max_overlaps, matched = _image(num_pos=0)
    pos, neg = sample_positives_negatives(
        labels, max_overlaps, matched, SamplingSettings(num=512, neg_pos_ub=3.0),
        generator=_gen(0)
    )
    assert pos.numel() == 0 and neg.numel() == 3  # max(num_pos, 1) * 3
    pos, neg = sample_positives_negatives(
        labels, max_overlaps, matched, SamplingSettings(num=512, neg_pos_ub=float("inf")),
        generator=_gen(0)
    )
    assert neg.numel() == 512


def test_combined_no_ground_truth():
    n = 1000
    labels = torch.zeros(n, dtype=torch.long)
    max_overlaps = torch.zeros(n)
    matched = torch.zeros(n, dtype=torch.long)
    for mode in BALANCE_MODES:
        pos, neg = sample_positives_negatives(
            labels, max_overlaps, matched, SamplingSettings(num=256, **mode), generator=_gen(0)
        )
        assert pos.numel() == 0 and neg.numel() == 256
        assert neg.unique().numel() == 256


def test_combined_no_negatives_no_positives_and_empty():
    labels, max_overlaps, matched = _image(num_pos=30, num_neg=0, num_ign=10)
    for mode in BALANCE_MODES:
        pos, neg = sample_positives_negatives(
            labels, max_overlaps, matched, SamplingSettings(num=64, **mode)
        )
        assert pos.numel() == 16 and neg.numel() == 0
        assert (labels[pos] >= 1).all()
    labels, max_overlaps, matched = _image(num_pos=0, num_neg=40, num_ign=10)
    for mode in BALANCE_MODES:
        pos, neg = sample_positives_negatives(
            labels, max_overlaps, matched, SamplingSettings(num=64, **mode)
        )
        assert pos.numel() == 0 and neg.numel() == 40
        assert sorted(neg.tolist()) == torch.nonzero(labels == 0).squeeze(1).tolist()
    empty_l = torch.zeros(0, dtype=torch.long)
    for mode in BALANCE_MODES:
        pos, neg = sample_positives_negatives(
            empty_l, torch.zeros(0), empty_l, SamplingSettings(**mode)
        )
        assert pos.numel() == 0 and neg.numel() == 0
        assert pos.dtype == torch.int64 and neg.dtype == torch.int64


def test_combined_few_candidates_take_all():
    labels, max_overlaps, matched = _image(num_pos=10, num_neg=30, num_ign=5)
    pos, neg = sample_positives_negatives(
        labels, max_overlaps, matched,
        SamplingSettings(num=512, pos_balance=True, neg_balance=True), generator=_gen(0)
    )
    assert sorted(pos.tolist()) == torch.nonzero(labels >= 1).squeeze(1).tolist()
    assert sorted(neg.tolist()) == torch.nonzero(labels == 0).squeeze(1).tolist()


def test_int32_inputs_accepted():
    labels, max_overlaps, matched = _image(seed=3)
    pos, neg = sample_positives_negatives(
        labels.int(), max_overlaps, matched.int(),
        SamplingSettings(num=128, pos_balance=True, neg_balance=True), generator=_gen(0)
    )
    assert pos.dtype == torch.int64 and neg.dtype == torch.int64
    assert pos.numel() + neg.numel() == 128


@pytest.mark.parametrize("mode", BALANCE_MODES)
def test_reproducible_with_generator(mode):
    labels, max_overlaps, matched = _image(num_pos=300, seed=4)
    kwargs = dict(num=256, **mode)
    a = sample_positives_negatives(
        labels, max_overlaps, matched, SamplingSettings(**kwargs), generator=_gen(123)
    )
    b = sample_positives_negatives(
        labels, max_overlaps, matched, SamplingSettings(**kwargs), generator=_gen(123)
    )
    c = sample_positives_negatives(
        labels, max_overlaps, matched, SamplingSettings(**kwargs), generator=_gen(124)
    )
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert not (torch.equal(a[0], c[0]) and torch.equal(a[1], c[1]))
    assert not torch.equal(a[1].sort().values, c[1].sort().values)


# ---------------------------------------------------------------------- bad arguments


def test_value_errors_name_the_argument():
    labels, max_overlaps, matched = _image(num_pos=10, num_neg=20, num_ign=0)
    neg_inds = torch.nonzero(labels == 0).squeeze(1)
    with pytest.raises(ValueError, match="num_bins"):
        iou_balanced_negative_sample(neg_inds, max_overlaps, 5, num_bins=0)
    with pytest.raises(ValueError, match="num_bins"):
        iou_balanced_negative_sample(neg_inds, max_overlaps, 5, num_bins=2.5)
    with pytest.raises(ValueError, match="floor_fraction"):
        iou_balanced_negative_sample(neg_inds, max_overlaps, 5, floor_fraction=1.5)
    with pytest.raises(ValueError, match="floor_fraction"):
        iou_balanced_negative_sample(neg_inds, max_overlaps, 5, floor_fraction=-0.1)
    with pytest.raises(ValueError, match="num"):
        iou_balanced_negative_sample(neg_inds, max_overlaps, -1)
    with pytest.raises(ValueError, match="max_overlaps"):
        iou_balanced_negative_sample(neg_inds, labels, 5)
    with pytest.raises(ValueError, match="num"):
        random_choice(neg_inds, -3)
    with pytest.raises(ValueError, match="candidate_inds"):
        random_choice(neg_inds.float(), 3)
    with pytest.raises(ValueError, match="num"):
        instance_balanced_positive_sample(neg_inds, matched, -1)
    with pytest.raises(ValueError, match="pos_fraction"):
        sample_positives_negatives(
            labels, max_overlaps, matched, SamplingSettings(pos_fraction=1.5)
        )
    with pytest.raises(ValueError, match="num_bins"):
        sample_positives_negatives(labels, max_overlaps, matched, SamplingSettings(num_bins=0))
    with pytest.raises(ValueError, match="floor_fraction"):
        sample_positives_negatives(
            labels, max_overlaps, matched, SamplingSettings(floor_fraction=2.0)
        )
    with pytest.raises(ValueError, match="num"):
        sample_positives_negatives(labels, max_overlaps, matched, SamplingSettings(num=-1))
    with pytest.raises(ValueError, match="same length"):
        sample_positives_negatives(labels, max_overlaps[:-1], matched)
    with pytest.raises(ValueError, match="labels"):
        sample_positives_negatives(labels.float(), max_overlaps, matched)


def test_half_precision_overlaps_match_float32():
    # bfloat16 has no NumPy type: it must be accepted and bin exactly like its float32 values
    labels, max_overlaps, matched = _image(seed=6)
    neg_inds = torch.nonzero(labels == 0).squeeze(1)
    for dtype in (torch.bfloat16, torch.float16):
        low = max_overlaps.to(dtype)
        a = iou_balanced_negative_sample(neg_inds, low, 100, generator=_gen(8))
        b = iou_balanced_negative_sample(neg_inds, low.float(), 100, generator=_gen(8))
        assert torch.equal(a, b)
        _assert_distinct_subset(a, neg_inds)


def test_combined_integer_overlaps_rejected_when_binning():
    labels, max_overlaps, matched = _image(num_pos=10, num_neg=20, num_ign=0)
    with pytest.raises(ValueError, match="max_overlaps"):
        sample_positives_negatives(
            labels, matched, matched, SamplingSettings(num=8, neg_balance=True)
        )


def test_all_taken_result_does_not_alias_input():
    cands = torch.tensor([5, 1, 3])
    for out in (
        random_choice(cands, 5),
        iou_balanced_negative_sample(cands, torch.rand(6), 5),
        instance_balanced_positive_sample(cands, torch.zeros(6, dtype=torch.long), 5),
    ):
        out[0] = -7
        assert cands.tolist() == [5, 1, 3]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_inputs_with_cpu_generator():
    labels, max_overlaps, matched = _image(num_pos=300, seed=5)
    kwargs = dict(num=256, pos_balance=True, neg_balance=True)
    cpu = sample_positives_negatives(
        labels, max_overlaps, matched, SamplingSettings(**kwargs), generator=_gen(1)
    )
    cuda = sample_positives_negatives(
        labels.cuda(), max_overlaps.cuda(), matched.cuda(), SamplingSettings(**kwargs),
        generator=_gen(1)
    )
    assert cuda[0].is_cuda and cuda[1].is_cuda
    assert cuda[0].numel() == 64 and cuda[1].numel() == 192
    assert torch.equal(cuda[0].cpu().sort().values, cpu[0].sort().values)
    assert torch.equal(cuda[1].cpu().sort().values, cpu[1].sort().values)


def test_settings_are_checked_once_when_made_and_match_the_config_defaults():
    from dataclasses import FrozenInstanceError, fields

    from libra_rcnn.models.config import SamplerConfig
    from libra_rcnn.models.roi_heads import sampling_settings

    assert sampling_settings(SamplerConfig()) == SamplingSettings()
    assert {f.name for f in fields(SamplingSettings)} < {f.name for f in fields(SamplerConfig)}
    with pytest.raises(FrozenInstanceError):
        SamplingSettings().num_bins = 0
    with pytest.raises(ValueError, match=r"^roi_sampler.num_bins must be a positive int, got 0$"):
        sampling_settings(SamplerConfig(num_bins=0))
    with pytest.raises(ValueError, match=r"^binning must be one of \('negatives', 'all_candidates'\)"):
        SamplingSettings(binning="paper")
    with pytest.raises(ValueError, match=r"^neg_pos_ub must be -1 \(no cap\) or a number >= 0"):
        SamplingSettings(neg_pos_ub=-2.0)
