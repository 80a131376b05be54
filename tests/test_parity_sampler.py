"""IoU-balanced / instance-balanced sampling against mmdetection's own samplers.

``binning="all_candidates"`` must lay out the bins, the per-bin quota and the random fill as mmdetection
3.3's ``IoUBalancedNegSampler``; the instance-balanced positives must use the quota of its
``InstanceBalancedPosSampler`` (but not its duplicate-drawing fill). mmdetection draws with
``torch.randperm`` on the global RNG, we with a ``torch.Generator``, so the draws differ; what is
compared is the distribution: which candidates form each bin (read off the galleries mmdetection
hands to its ``random_choice``), how many are taken per bin, and which pool the fill draws from
(mean counts over repeated draws against the exact hypergeometric expectation).
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn
from torchvision.ops import box_iou

from libra_rcnn.models.config import SamplerConfig
from libra_rcnn.models.roi_heads import LibraRoIHeads, check_sampler_config
from libra_rcnn.ops.iou_balanced_sampler import (
    SamplingSettings,
    _mmdet_bin_ids,
    instance_balanced_positive_sample,
    iou_balanced_negative_sample,
    sample_positives_negatives,
)

# Every test here needs mmdetection as the oracle: without it the ``mmdet`` fixture skips them
# with mmdet_oracle.SKIP_REASON ("pip install -e .[parity]").
pytestmark = pytest.mark.usefixtures("mmdet")

NUM_BINS = 3
TRIALS = 300


# --------------------------------------------------------------------------------------------
# inputs


def _realistic_image(seed: int, *, num_gts: int = 6, num_near: int = 1500, num_far: int = 1500,
                     far_size: float = 200.0):
    """One image's R-CNN candidates as mmdetection sees them: ground truths added as proposals
    (IoU exactly 1), proposals jittered around them, and random ones (mostly IoU 0).

    Returns ``gt_inds`` (mmdetection's encoding: 0 negative, ``k >= 1`` positive of gt ``k``;
    0.5 / 0.5 thresholds) and float32 ``max_overlaps``, both ``[num_gts + num_near + num_far]``.
    """
    g = torch.Generator().manual_seed(seed)
    height, width = 800.0, 1216.0
    wh = 30 + 270 * torch.rand(num_gts, 2, generator=g)
    xy = torch.rand(num_gts, 2, generator=g) * (torch.tensor([width, height]) - wh)
    gts = torch.cat([xy, xy + wh], dim=1)
    owner = torch.randint(num_gts, (num_near,), generator=g)
    jitter = (torch.rand(num_near, 4, generator=g) - 0.5) * 1.2 * wh[owner].repeat(1, 2)
    near = gts[owner] + jitter
    far_xy = torch.rand(num_far, 2, generator=g) * torch.tensor([width, height])
    far_wh = 10 + far_size * torch.rand(num_far, 2, generator=g)
    far = torch.cat([far_xy, far_xy + far_wh], dim=1)
    proposals = torch.cat([near, far])
    proposals = torch.cat([proposals[:, :2].minimum(proposals[:, 2:]),
                           proposals[:, :2].maximum(proposals[:, 2:])], dim=1)
    candidates = torch.cat([gts, proposals])
    max_overlaps, argmax = box_iou(gts, candidates).max(dim=0)
    gt_inds = torch.where(max_overlaps >= 0.5, argmax + 1, torch.zeros_like(argmax))
    return gt_inds, max_overlaps


def _assign_result(mmdet, gt_inds: torch.Tensor, max_overlaps: torch.Tensor):
    from mmdet.models.task_modules.assigners import AssignResult

    labels = torch.where(gt_inds > 0, gt_inds - 1, torch.full_like(gt_inds, -1))
    return AssignResult(int(gt_inds.max()), gt_inds.clone(), max_overlaps.clone(), labels=labels)


def _neg_sampler(mmdet, *, floor_thr=-1, floor_fraction=0.0, num_bins=NUM_BINS):
    from mmdet.models.task_modules.samplers import IoUBalancedNegSampler

    return IoUBalancedNegSampler(num=512, pos_fraction=0.25, floor_thr=floor_thr,
                                 floor_fraction=floor_fraction, num_bins=num_bins)


def _record_random_choice(sampler) -> list:
    """Make ``sampler.random_choice`` record ``(gallery, num)`` of every call."""
    calls = []
    original = sampler.random_choice

    def recording(gallery, num):
        calls.append((sorted(int(i) for i in gallery), num))
        return original(gallery, num)

    sampler.random_choice = recording
    return calls


# --------------------------------------------------------------------------------------------
# bin layout: mmdetection's galleries are our bins


def _edge_case_overlaps() -> np.ndarray:
    """IoUs exactly on mmdetection's float32 bin edges, one float32 step below them, ties,
    zeros, and the maximum itself held by a negative (no positives)."""
    top = np.float32(0.7)
    interval = (top - 0) / NUM_BINS
    edges = [np.float32(0 + k * interval) for k in range(NUM_BINS + 1)]
    values = [0.0, 0.0, 0.05, 0.05]
    for edge in edges[1:NUM_BINS]:
        below = np.nextafter(edge, np.float32(-1))
        values += [edge, edge, below, below]
    values += [top, top, np.nextafter(top, np.float32(-1))] * 2
    return np.array(values, dtype=np.float32)


@pytest.mark.parametrize("case", ["edges", "realistic", "realistic_float64"])
def test_bins_are_mmdetections(mmdet, case):
    if case == "edges":
        max_overlaps = _edge_case_overlaps()
        full = np.arange(max_overlaps.size)
        num_expected = 3  # 1 per bin: every bin of >= 2 members shows up as a gallery
    else:
        gt_inds, overlaps = _realistic_image(seed=3)
        if case == "realistic_float64":
            overlaps = overlaps.double()
        max_overlaps = overlaps.numpy()
        full = np.flatnonzero(gt_inds.numpy() == 0)
        num_expected = 30
    sampler = _neg_sampler(mmdet)
    sampler.floor_thr = 0  # as _sample_neg sets it before binning
    calls = _record_random_choice(sampler)
    with torch.random.fork_rng():
        torch.manual_seed(0)
        sampler.sample_via_interval(max_overlaps, set(full.tolist()), num_expected)

    bins = _mmdet_bin_ids(max_overlaps[full], 0.0, max_overlaps.max(), NUM_BINS)
    quota = num_expected // NUM_BINS
    members = [sorted(full[bins == k].tolist()) for k in range(NUM_BINS)]
    expected_bin_calls = [(m, quota) for m in members if len(m) > quota]
    assert calls[: len(expected_bin_calls)] == expected_bin_calls
    if case == "edges":
        # each edge value opens the next bin; the four at the maximum are in no bin
        assert [len(m) for m in members] == [6, 4, 4] and full.size == 18


# --------------------------------------------------------------------------------------------
# quota and fill: mean counts per bin against the exact expectation


def _expected_counts(groups: np.ndarray, quota: np.ndarray, num: int):
    """Mean and variance of the per-group count: ``min(quota, size)`` taken per group, the rest
    of ``num`` drawn uniformly from the untaken (hypergeometric)."""
    sizes = np.bincount(groups, minlength=quota.size).astype(float)
    taken = np.minimum(quota, sizes)
    left, pool = num - taken.sum(), (sizes - taken).sum()
    share = (sizes - taken) / pool
    mean = taken + left * share
    var = left * share * (1 - share) * (pool - left) / max(pool - 1, 1)
    return mean, var


def _group_of(max_overlaps: np.ndarray, neg: np.ndarray, floor_thr: float) -> np.ndarray:
    """Group of each negative: mmdetection's bins 0..K-1, K outside every bin, K + 1 floor set."""
    ious = max_overlaps[neg]
    groups = _mmdet_bin_ids(ious, max(floor_thr, 0.0), max_overlaps.max(), NUM_BINS)
    if floor_thr == 0:
        groups[ious == 0] = NUM_BINS + 1
    return groups


def _mean_counts(samples, neg: np.ndarray, groups: np.ndarray) -> np.ndarray:
    group_of = dict(zip(neg.tolist(), groups.tolist()))
    counts = np.zeros((len(samples), NUM_BINS + 2))
    for t, picked in enumerate(samples):
        picked = picked.tolist()
        assert len(set(picked)) == len(picked)
        for i in picked:
            counts[t, group_of[i]] += 1
    return counts.mean(axis=0)


def _negatives_only(seed: int, size: int = 2000):
    """No positive: IoUs 0.5 * u^2 (a fifth of them 0), so every bin holds negatives."""
    g = torch.Generator().manual_seed(seed)
    max_overlaps = 0.5 * torch.rand(size, generator=g) ** 2
    max_overlaps[torch.rand(size, generator=g) < 0.2] = 0.0
    return torch.zeros(size, dtype=torch.long), max_overlaps


@pytest.mark.parametrize("floor_thr", [-1, 0], ids=["first_call", "steady_state"])
@pytest.mark.parametrize("case,seed,num", [("realistic", 0, 384), ("realistic", 1, 380),
                                           ("negatives_only", 0, 380)])
def test_bin_quota_and_fill_match_mmdetection(mmdet, floor_thr, case, seed, num):
    make = _realistic_image if case == "realistic" else _negatives_only
    gt_inds, max_overlaps = make(seed)
    host = max_overlaps.numpy()
    neg = np.flatnonzero(gt_inds.numpy() == 0)
    groups = _group_of(host, neg, floor_thr)
    binned = groups <= NUM_BINS
    assert binned.sum() > num, "the case must need the bins, not only the floor set"

    quota = np.zeros(NUM_BINS + 2, dtype=np.int64)
    quota[:NUM_BINS] = num // NUM_BINS
    mean, var = _expected_counts(groups[binned], quota[: NUM_BINS + 1], num)
    mean = np.append(mean, 0.0)  # the floor set is not reached
    var = np.append(var, 0.0)

    assign_result = _assign_result(mmdet, gt_inds, max_overlaps)
    theirs, ours, ours_combined = [], [], []
    gen = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        for _ in range(TRIALS):
            sampler = _neg_sampler(mmdet)
            if floor_thr == 0:
                sampler._sample_neg(assign_result, num)  # mmdetection's first call sets 0
                assert sampler.floor_thr == 0
            theirs.append(sampler._sample_neg(assign_result, num).numpy())
            ours.append(iou_balanced_negative_sample(
                torch.from_numpy(neg), max_overlaps, num, num_bins=NUM_BINS,
                floor_thr=floor_thr, binning="all_candidates", generator=gen).numpy())
            labels = (gt_inds > 0).long()
            _, neg_pick = sample_positives_negatives(
                labels, max_overlaps, (gt_inds - 1).clamp(min=0),
                SamplingSettings(num=num, pos_fraction=0.0, neg_balance=True, num_bins=NUM_BINS,
                                 floor_thr=floor_thr, binning="all_candidates"),
                generator=gen
            )
            ours_combined.append(neg_pick.numpy())

    tolerance = 5 * np.sqrt(var / TRIALS) + 1e-9
    runs = [("mmdetection", theirs), ("ours", ours), ("ours, combined", ours_combined)]
    for name, samples in runs:
        assert all(s.size == num for s in samples), name
        got = _mean_counts(samples, neg, groups)
        assert np.all(np.abs(got - mean) <= tolerance), (name, got, mean, tolerance)


def test_first_call_quirk_steady_state_skips_zero_iou(mmdet):
    gt_inds, max_overlaps = _realistic_image(seed=5)
    host = max_overlaps.numpy()
    neg = np.flatnonzero(gt_inds.numpy() == 0)
    num = 384
    assert np.count_nonzero(host[neg] > 0) > num and np.count_nonzero(host[neg] == 0) > 0
    assign_result = _assign_result(mmdet, gt_inds, max_overlaps)
    sampler = _neg_sampler(mmdet, floor_thr=-1)
    with torch.random.fork_rng():
        torch.manual_seed(0)
        first = sampler._sample_neg(assign_result, num).numpy()
        assert sampler.floor_thr == 0  # the quirk: the sampler rewrote its own setting
        second = sampler._sample_neg(assign_result, num).numpy()
    gen = torch.Generator().manual_seed(0)
    ours_first = iou_balanced_negative_sample(torch.from_numpy(neg), max_overlaps, num,
                                              floor_thr=-1, binning="all_candidates", generator=gen)
    ours_steady = iou_balanced_negative_sample(torch.from_numpy(neg), max_overlaps, num,
                                               floor_thr=0, binning="all_candidates", generator=gen)
    assert (host[first] == 0).any() and (host[ours_first.numpy()] == 0).any()
    assert (host[second] > 0).all() and (host[ours_steady.numpy()] > 0).all()


def test_few_overlapping_negatives_take_all_then_floor(mmdet):
    gt_inds, max_overlaps = _realistic_image(seed=2, num_gts=3, num_near=150, far_size=20.0)
    host = max_overlaps.numpy()
    neg = np.flatnonzero(gt_inds.numpy() == 0)
    num = 384
    overlapping = set(neg[host[neg] > 0].tolist())
    assert 0 < len(overlapping) < num
    sampler = _neg_sampler(mmdet, floor_thr=0)
    with torch.random.fork_rng():
        torch.manual_seed(0)
        assign_result = _assign_result(mmdet, gt_inds, max_overlaps)
        theirs = set(sampler._sample_neg(assign_result, num).tolist())
    ours = set(iou_balanced_negative_sample(torch.from_numpy(neg), max_overlaps, num, floor_thr=0,
                                            binning="all_candidates", generator=torch.Generator()).tolist())
    for picked in (theirs, ours):
        assert len(picked) == num and overlapping <= picked


@pytest.mark.parametrize("num", [384, 7])
def test_floor_variant_split_matches_mmdetection(mmdet, num):
    """floor_thr 0.1, floor_fraction 0.5: int(num / 2) from the bins over IoU >= 0.1, the rest
    from IoU < 0.1, when both sets are large."""
    gt_inds, max_overlaps = _realistic_image(seed=4)
    neg = np.flatnonzero(gt_inds.numpy() == 0)
    sampler = _neg_sampler(mmdet, floor_thr=0.1, floor_fraction=0.5)
    with torch.random.fork_rng():
        torch.manual_seed(0)
        theirs = sampler._sample_neg(_assign_result(mmdet, gt_inds, max_overlaps), num)
    ours = iou_balanced_negative_sample(torch.from_numpy(neg), max_overlaps, num, floor_thr=0.1,
                                        floor_fraction=0.5, binning="all_candidates",
                                        generator=torch.Generator())
    for picked in (theirs, ours):
        assert picked.numel() == num == picked.unique().numel()
        assert int((max_overlaps[picked] >= 0.1).sum()) == int(num * 0.5)


def test_one_bin_is_random_sampling_as_mmdetection(mmdet):
    """With one bin mmdetection samples at random, negatives at the maximum IoU included."""
    max_overlaps = torch.tensor([0.1] * 10 + [0.3] * 10)
    gt_inds = torch.zeros(20, dtype=torch.long)
    sampler = _neg_sampler(mmdet, num_bins=1)
    with torch.random.fork_rng():
        torch.manual_seed(0)
        theirs = sampler._sample_neg(_assign_result(mmdet, gt_inds, max_overlaps), 10)
    ours = iou_balanced_negative_sample(torch.arange(20), max_overlaps, 10, num_bins=1,
                                        binning="all_candidates", generator=torch.Generator())
    for picked in (theirs, ours):
        assert picked.numel() == 10 and (max_overlaps[picked] == 0.3).any()


def test_paper_and_mmdet_binnings_differ():
    gt_inds, max_overlaps = _realistic_image(seed=0)
    neg = torch.from_numpy(np.flatnonzero(gt_inds.numpy() == 0))
    top = max_overlaps[neg].max()
    middle = []
    for binning in ("negatives", "all_candidates"):
        counts = 0
        for seed in range(20):
            picked = iou_balanced_negative_sample(neg, max_overlaps, 384, binning=binning,
                                                  generator=torch.Generator().manual_seed(seed))
            iou = max_overlaps[picked]
            counts += int(((iou >= top / 3) & (iou < 2 * top / 3)).sum())
        middle.append(counts / 20)
    # paper: the negatives' own middle third is a bin with a third of the quota (it has more
    # members than that); mmdetection: it is the upper half of its bin [0, 1/3), which shares
    # that bin's quota with the many IoU-0 negatives
    assert middle[0] == 128 and middle[1] < 100, middle


# --------------------------------------------------------------------------------------------
# instance-balanced positives


def _positive_case(counts):
    gt_inds = torch.cat([torch.full((n,), k + 1) for k, n in enumerate(counts)]
                        + [torch.zeros(50, dtype=torch.long)])
    return gt_inds, torch.rand(gt_inds.numel(), generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("counts,num", [([50, 50, 50, 50], 128), ([100, 2, 2], 64),
                                        ([40, 7, 30, 1, 90], 100)])
def test_positive_quota_is_mmdetections(mmdet, counts, num):
    from mmdet.models.task_modules.samplers import InstanceBalancedPosSampler

    gt_inds, max_overlaps = _positive_case(counts)
    quota = int(round(num / len(counts))) + 1
    sampler = InstanceBalancedPosSampler(num=512, pos_fraction=0.25)
    calls = _record_random_choice(sampler)
    with torch.random.fork_rng():
        torch.manual_seed(0)
        sampler._sample_pos(_assign_result(mmdet, gt_inds, max_overlaps), num)
    per_gt = [(g, n) for g, n in calls if n == quota]
    assert [len(g) for g, _ in per_gt] == [n for n in counts if n > quota]

    pos = torch.nonzero(gt_inds > 0).squeeze(1)
    matched = (gt_inds - 1).clamp(min=0)
    for seed in range(10):
        gen = torch.Generator().manual_seed(seed)
        ours = instance_balanced_positive_sample(pos, matched, num, gen)
        assert ours.numel() == num == ours.unique().numel()
        per_gt_count = torch.bincount(gt_inds[ours] - 1, minlength=len(counts)).tolist()
        taken = [min(quota, n) for n in counts]
        if sum(taken) <= num:  # everything within quota is taken, the fill adds to the rest
            assert all(c >= t for c, t in zip(per_gt_count, taken))
        else:  # the quota caps every instance before the cut to num
            assert all(c <= t for c, t in zip(per_gt_count, taken))


def test_positive_fill_mmdetection_repeats_ours_does_not(mmdet):
    """mmdetection's fill removes nothing from its pool (0-d tensors hash by identity), so it
    re-draws chosen positives; its ``sample()`` then keeps fewer than asked. Ours fills from the
    unchosen positives only."""
    from mmdet.models.task_modules.samplers import InstanceBalancedPosSampler

    gt_inds, max_overlaps = _positive_case([100, 2, 2])
    num = 64
    sampler = InstanceBalancedPosSampler(num=512, pos_fraction=0.25)
    with torch.random.fork_rng():
        torch.manual_seed(0)
        theirs = sampler._sample_pos(_assign_result(mmdet, gt_inds, max_overlaps), num)
    assert theirs.numel() == num and theirs.unique().numel() < num
    pos = torch.nonzero(gt_inds > 0).squeeze(1)
    ours = instance_balanced_positive_sample(pos, (gt_inds - 1).clamp(min=0), num,
                                             torch.Generator().manual_seed(0))
    assert ours.unique().numel() == num
    assert torch.bincount(gt_inds[ours]).tolist() == [0, 60, 2, 2]


# --------------------------------------------------------------------------------------------
# wiring


def test_sampler_config_binning_reaches_the_sampler():
    cfg = SamplerConfig(neg_balance=True, pos_balance=True, binning="all_candidates")
    heads = LibraRoIHeads(nn.Identity(), nn.Identity(), nn.Identity(), sampler=cfg,
                          generator=torch.Generator().manual_seed(7))
    gt_inds, max_overlaps = _realistic_image(seed=1)
    labels, matched = (gt_inds > 0).long(), (gt_inds - 1).clamp(min=0)
    pos, neg = sample_positives_negatives(
        labels, max_overlaps, matched,
        SamplingSettings(num=512, pos_balance=True, neg_balance=True, binning="all_candidates"),
        generator=torch.Generator().manual_seed(7)
    )
    assert torch.equal(heads.sample_image(labels, max_overlaps, matched), torch.cat([pos, neg]))
    with pytest.raises(ValueError, match="roi_sampler.binning"):
        check_sampler_config(SamplerConfig(binning="mmdet"))
    with pytest.raises(ValueError, match="binning"):
        iou_balanced_negative_sample(torch.arange(3), torch.zeros(3), 1, binning="paper")


def test_tolerance_is_meaningful():
    """The statistical test above would notice a bin off by 1.5 samples on average."""
    gt_inds, max_overlaps = _realistic_image(0)
    host = max_overlaps.numpy()
    neg = np.flatnonzero(gt_inds.numpy() == 0)
    groups = _group_of(host, neg, -1)
    quota = np.array([128, 128, 128, 0])
    _, var = _expected_counts(groups, quota, 384)
    assert np.all(5 * np.sqrt(var / TRIALS) < 1.5)
    assert math.isclose(_expected_counts(groups, quota, 384)[0].sum(), 384)
