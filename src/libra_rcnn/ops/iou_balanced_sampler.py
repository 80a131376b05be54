"""IoU-balanced sampling of RoI training samples (Libra R-CNN, Sec. 3.1, Fig. 3, Table 4).

Random sampling picks each of ``M`` negative candidates with the same probability (Eq. 1)::

    p = N / M

Most RPN proposals that are negatives barely touch a ground truth (IoU near 0), so random sampling
mostly returns easy negatives. IoU-balanced sampling splits the IoU range of the candidates into
``K`` equal-width bins, gives each bin ``N / K`` of the demanded samples and draws uniformly inside
each bin, so that a candidate of bin ``k`` (holding ``M_k`` candidates) is chosen with (Eq. 2)::

    p_k = (N / K) * (1 / M_k),   k in [0, K)

which favours the rarer, harder negatives of higher IoU. For positives the paper samples an equal
number per ground-truth instance instead ("Pos Balance" in Table 4).

Conventions shared by every function here (all inputs describe ONE image):

* ``labels: LongTensor[N]`` -- ``>= 1`` positive (foreground class), ``0`` negative (background),
  ``-1`` (any negative value) ignored, never sampled.
* ``max_overlaps: FloatTensor[N]`` -- each candidate's largest IoU with any ground truth (all 0
  when the image has no ground truth).
* ``matched_gt_inds: LongTensor[N]`` -- index of the matched ground truth; read for positives only.
* Returned indices are ``LongTensor`` indices into the ``N`` candidates, on the device of the
  candidate indices, never repeated, in no particular order.
* ``generator``: an optional ``torch.Generator``; the result is a deterministic function of the
  inputs and the generator's state. Random numbers are drawn on the generator's device and moved.

Choices (mmdetection's ``IoUBalancedNegSampler`` / ``InstanceBalancedPosSampler`` /
``CombinedSampler`` semantics unless stated):

* The bins span ``[floor, max IoU among the sampled-by-bins negatives]`` with
  ``floor = max(floor_thr, 0)``. mmdetection takes the maximum over *all* candidates (positives
  included), which leaves the top bins empty of negatives and hands their quota to random filling;
  using the negatives' own maximum makes every bin usable, as Eq. 2 intends. Bins are half-open
  ``[start, end)`` (up to float rounding exactly at an edge) except the last, which also holds
  the maximum itself (mmdetection's half-open last bin leaves it to the random fill).
* ``num // K`` samples per bin; the remainder ``num % K`` goes one each to the highest-IoU bins
  (the hard end, the point of the method). A bin with too few candidates gives all of them and the
  shortfall is filled at random from the not-yet-chosen negatives.
* Floor variant (``floor_thr >= 0``): negatives with IoU ``< floor_thr`` (exactly ``== 0`` when
  ``floor_thr == 0``) form a floor set; ``int(num * (1 - floor_fraction))`` samples come from the
  bins over the remaining negatives, the rest at random from the floor set, then any shortfall at
  random from all unchosen negatives. With ``floor_thr < 0`` the floor set is empty, so a nonzero
  ``floor_fraction`` becomes a share filled uniformly at random.
* Positive quota per instance is ``round(num / n_gt) + 1`` (Python's ``round``, as mmdetection).
* Ground-truth boxes added as proposals (``SamplerConfig.add_gt_as_proposals``) are handled by the
  detector, which concatenates them to the proposals before matching (as torchvision's
  ``RoIHeads.add_gt_proposals`` does); this module only sees the resulting candidates.
"""

from __future__ import annotations

import math
from typing import Optional, Tuple

import torch
from torch import Tensor

__all__ = [
    "random_choice",
    "iou_balanced_negative_sample",
    "instance_balanced_positive_sample",
    "sample_positives_negatives",
]


# --------------------------------------------------------------------------------------------
# helpers


def _randperm(n: int, generator: Optional[torch.Generator], device: torch.device) -> Tensor:
    """A random permutation of ``range(n)`` on ``device`` drawn from ``generator``."""
    if generator is None:
        return torch.randperm(n, device=device)
    perm = torch.randperm(n, generator=generator, device=generator.device)
    return perm.to(device)


def _check_num(num: int, name: str = "num") -> None:
    if isinstance(num, bool) or not isinstance(num, int):
        raise ValueError(f"{name} must be an int, got {type(num).__name__}")
    if num < 0:
        raise ValueError(f"{name} must be >= 0, got {num}")


def _check_negative_settings(num_bins: int, floor_thr: float, floor_fraction: float) -> None:
    if isinstance(num_bins, bool) or not isinstance(num_bins, int) or num_bins < 1:
        raise ValueError(f"num_bins must be an int >= 1, got {num_bins!r}")
    if not (0.0 <= floor_fraction <= 1.0):
        raise ValueError(f"floor_fraction must lie in [0, 1], got {floor_fraction!r}")
    if math.isnan(floor_thr):
        raise ValueError("floor_thr must not be NaN")


def _check_index_vector(t: Tensor, name: str) -> None:
    if not isinstance(t, Tensor) or t.dim() != 1:
        raise ValueError(f"{name} must be a 1-D tensor, got {getattr(t, 'shape', type(t))}")
    if t.dtype not in (torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8):
        raise ValueError(f"{name} must be an integer tensor, got dtype {t.dtype}")


def _uniform_keys(n: int, generator: Optional[torch.Generator], device: torch.device) -> Tensor:
    """``n`` i.i.d. U[0, 1) float32 keys on ``device``."""
    if generator is None:
        return torch.rand(n, device=device)
    return torch.rand(n, generator=generator, device=generator.device).to(device)


def _sample_with_group_quota(
    inds: Tensor,
    group: Tensor,
    quota: Tensor,
    num: int,
    generator: Optional[torch.Generator],
) -> Tensor:
    """Pick ``num`` of ``inds``: up to ``quota[g]`` uniformly from each group, then even out.

    Args:
        inds: LongTensor[M] distinct candidate indices, ``M >= num``.
        group: LongTensor[M], group id in ``[0, G)`` of each candidate.
        quota: LongTensor[G], how many to draw from each group.
        num: how many to return.
    Returns:
        LongTensor[num] of distinct entries of ``inds``. If the groups' picks fall short of
        ``num``, the shortfall is filled uniformly from the unpicked candidates; if they exceed it,
        a uniform subset of the picks is kept.

    Vectorised: a uniform random permutation followed by a *stable* sort on the group id puts
    every group's members in a contiguous run in uniformly random order, so the position inside
    the run is a uniform random rank and the first ``quota[g]`` ranks are picked. A second random
    key, shifted below zero for the picked candidates, then selects the ``num`` smallest in one
    ``topk``.
    """
    m = inds.numel()
    perm = _randperm(m, generator, inds.device)
    sorted_group, perm_order = torch.sort(group[perm], stable=True)
    order = perm[perm_order]
    # first slot of each group's run; (torch.searchsorted would do it in one op but goes
    # multi-threaded on ~1e3 elements and is then orders of magnitude slower on a busy CPU)
    counts = torch.bincount(group, minlength=quota.numel())
    run_starts = torch.cumsum(counts, 0) - counts
    rank_in_group = torch.arange(m, device=inds.device) - run_starts[sorted_group]
    picked = rank_in_group < quota[sorted_group]
    # picked keys lie in [-1, 0), the rest in [0, 1): the smallest num are all picks (or a
    # uniform subset of them) plus a uniform subset of the rest (float32 ties only fix an order)
    fill_keys = _uniform_keys(m, generator, inds.device) - picked.float()
    take = torch.topk(fill_keys, num, largest=False, sorted=False).indices
    return inds[order[take]]


# --------------------------------------------------------------------------------------------
# public API


def random_choice(
    candidate_inds: Tensor, num: int, generator: Optional[torch.Generator] = None
) -> Tensor:
    """Choose ``min(num, M)`` of the ``M`` candidates uniformly without replacement (Eq. 1).

    Args:
        candidate_inds: LongTensor[M] of distinct indices.
        num: how many to choose (``>= 0``).
        generator: optional ``torch.Generator``.
    Returns:
        LongTensor[min(num, M)]; all candidates (same order) when ``M <= num``.
    """
    _check_index_vector(candidate_inds, "candidate_inds")
    _check_num(num)
    candidate_inds = candidate_inds.long()
    m = candidate_inds.numel()
    if m <= num:
        return candidate_inds.clone()
    return candidate_inds[_randperm(m, generator, candidate_inds.device)[:num]]


def _sample_by_iou_bins(
    inds: Tensor,
    ious: Tensor,
    num_balanced: int,
    num: int,
    num_bins: int,
    floor: float,
    generator: Optional[torch.Generator],
) -> Tensor:
    """Eq. 2 proper: ``num_balanced`` split evenly over ``num_bins`` IoU bins, topped up to ``num``.

    Args:
        inds: LongTensor[M] distinct candidates, ``M >= num >= num_balanced``.
        ious: FloatTensor[M], their IoUs, all ``>= floor``.
    Returns:
        LongTensor[num]: ``num_balanced // K`` per bin (remainder to the top bins), a bin short
        of its quota gives all it has, then uniform picks from the rest up to ``num``.
    """
    max_iou = float(ious.max())
    if num_bins == 1 or not max_iou > floor:
        # one bin, or a degenerate (zero-width) range: Eq. 2 reduces to Eq. 1
        return random_choice(inds, num, generator)
    # bin k holds IoUs in [floor + k * w, floor + (k + 1) * w), w = (max - floor) / K; the max
    # itself joins bin K - 1. Plain arithmetic: torch.bucketize is much slower on ~1e3 elements
    # once it goes multi-threaded.
    scale = num_bins / (max_iou - floor)
    bin_ids = ((ious - floor) * scale).long().clamp_(0, num_bins - 1)
    base, remainder = divmod(num_balanced, num_bins)
    quota = torch.full((num_bins,), base, dtype=torch.long, device=ious.device)
    if remainder:
        quota[num_bins - remainder :] += 1
    return _sample_with_group_quota(inds, bin_ids, quota, num, generator)


def iou_balanced_negative_sample(
    neg_inds: Tensor,
    max_overlaps: Tensor,
    num: int,
    *,
    num_bins: int = 3,
    floor_thr: float = -1.0,
    floor_fraction: float = 0.0,
    generator: Optional[torch.Generator] = None,
) -> Tensor:
    """IoU-balanced sampling of negatives (Sec. 3.1, Eq. 2), with mmdetection's floor variant.

    Args:
        neg_inds: LongTensor[M], distinct indices of the candidate negatives into ``max_overlaps``.
        max_overlaps: FloatTensor[N], each candidate's largest IoU with any ground truth.
        num: negatives demanded (``N`` of Eq. 2), ``>= 0``.
        num_bins: ``K`` of Eq. 2, ``>= 1`` (``1`` is random sampling).
        floor_thr: ``< 0`` disables the floor set and bins span ``[0, max]``; ``>= 0`` puts
            negatives with IoU below it (``== 0`` exactly when it is 0) in a floor set sampled at
            random, and bins span ``[floor_thr, max]`` over the others.
        floor_fraction: share of ``num`` drawn from the floor set, in ``[0, 1]``.
        generator: optional ``torch.Generator``.
    Returns:
        LongTensor[min(num, M)] of distinct entries of ``neg_inds``; all of them when ``M <= num``.
    """
    _check_index_vector(neg_inds, "neg_inds")
    if not isinstance(max_overlaps, Tensor) or max_overlaps.dim() != 1:
        raise ValueError("max_overlaps must be a 1-D tensor")
    if not max_overlaps.is_floating_point():
        raise ValueError(f"max_overlaps must be a floating tensor, got dtype {max_overlaps.dtype}")
    _check_num(num)
    _check_negative_settings(num_bins, floor_thr, floor_fraction)

    neg_inds = neg_inds.long()
    if neg_inds.numel() <= num:
        return neg_inds.clone()

    ious = max_overlaps[neg_inds]
    num_balanced = int(num * (1.0 - floor_fraction))
    if floor_thr < 0:
        # no floor set: the floor_fraction share (if any) is uniform over all negatives, which
        # is the same as topping up the binned picks uniformly
        return _sample_by_iou_bins(neg_inds, ious, num_balanced, num, num_bins, 0.0, generator)

    in_floor = (ious == 0) if floor_thr == 0 else (ious < floor_thr)
    floor_inds = neg_inds[in_floor]
    binned_inds, binned_ious = neg_inds[~in_floor], ious[~in_floor]
    if binned_inds.numel() > num_balanced:
        # if the floor set cannot cover its share, the binned side gives the shortfall as
        # uniform picks from its unpicked negatives (mmdetection's random fill)
        num_binned = max(num_balanced, num - floor_inds.numel())
        binned_pick = _sample_by_iou_bins(
            binned_inds, binned_ious, num_balanced, num_binned, num_bins, float(floor_thr),
            generator,
        )
    else:
        binned_pick = binned_inds
    floor_pick = random_choice(floor_inds, num - binned_pick.numel(), generator)
    return torch.cat([binned_pick, floor_pick])


def instance_balanced_positive_sample(
    pos_inds: Tensor,
    matched_gt_inds: Tensor,
    num: int,
    generator: Optional[torch.Generator] = None,
) -> Tensor:
    """Equal number of positives per ground-truth instance ("Pos Balance", Sec. 3.1, Table 4).

    Each of the ``G`` distinct instances among the positives gets a quota of
    ``round(num / G) + 1`` (mmdetection's rule; the ``+ 1`` lets the quota overshoot slightly so
    the final random cut, not rounding, decides the last few). Up to the quota is drawn at random
    per instance; a shortfall is filled at random from the remaining positives, an excess is cut
    to ``num`` at random.

    Args:
        pos_inds: LongTensor[P], distinct indices of the candidate positives.
        matched_gt_inds: LongTensor[N], matched ground-truth index per candidate.
        num: positives demanded, ``>= 0``.
        generator: optional ``torch.Generator``.
    Returns:
        LongTensor[min(num, P)] of distinct entries of ``pos_inds``; all of them when ``P <= num``.
    """
    _check_index_vector(pos_inds, "pos_inds")
    _check_index_vector(matched_gt_inds, "matched_gt_inds")
    _check_num(num)
    pos_inds = pos_inds.long()
    if pos_inds.numel() <= num:
        return pos_inds.clone()
    if num == 0:
        return pos_inds[:0].clone()

    gt_of_pos = matched_gt_inds[pos_inds].long()
    if int(gt_of_pos.min()) < 0:
        raise ValueError("matched_gt_inds must be >= 0 at every positive")
    # the ground-truth index itself is the group id (bincount is cheaper than unique)
    num_instances = int(torch.count_nonzero(torch.bincount(gt_of_pos)))
    per_instance = int(round(num / num_instances)) + 1
    quota = torch.full(
        (int(gt_of_pos.max()) + 1,), per_instance, dtype=torch.long, device=pos_inds.device
    )
    return _sample_with_group_quota(pos_inds, gt_of_pos, quota, num, generator)


def sample_positives_negatives(
    labels: Tensor,
    max_overlaps: Tensor,
    matched_gt_inds: Tensor,
    *,
    num: int = 512,
    pos_fraction: float = 0.25,
    neg_pos_ub: float = -1.0,
    pos_balance: bool = False,
    neg_balance: bool = False,
    num_bins: int = 3,
    floor_thr: float = -1.0,
    floor_fraction: float = 0.0,
    generator: Optional[torch.Generator] = None,
) -> Tuple[Tensor, Tensor]:
    """Sample the RoI minibatch of one image (Libra R-CNN's combined sampler).

    ``num_pos = min(#pos, int(num * pos_fraction))`` positives (instance-balanced when
    ``pos_balance``, else random); ``num_neg = num - num_pos``, capped at
    ``int(neg_pos_ub * max(num_pos, 1))`` when ``neg_pos_ub >= 0``, then at ``#neg``
    (IoU-balanced when ``neg_balance``, else random). Keyword names match
    ``libra_rcnn.models.config.SamplerConfig``; ``add_gt_as_proposals`` is the detector's job.

    Args:
        labels: LongTensor[N]; ``>= 1`` positive, ``0`` negative, ``-1`` ignored.
        max_overlaps: FloatTensor[N], largest IoU with any ground truth (0 without ground truth).
        matched_gt_inds: LongTensor[N], matched ground-truth index (read for positives only).
    Returns:
        ``(pos_inds, neg_inds)``: disjoint LongTensors of indices into the N candidates.
    """
    _check_index_vector(labels, "labels")
    _check_index_vector(matched_gt_inds, "matched_gt_inds")
    if not isinstance(max_overlaps, Tensor) or max_overlaps.dim() != 1:
        raise ValueError("max_overlaps must be a 1-D tensor")
    n = labels.numel()
    if max_overlaps.numel() != n or matched_gt_inds.numel() != n:
        raise ValueError(
            "labels, max_overlaps and matched_gt_inds must have the same length, got "
            f"{n}, {max_overlaps.numel()} and {matched_gt_inds.numel()}"
        )
    _check_num(num)
    if not (0.0 <= pos_fraction <= 1.0):
        raise ValueError(f"pos_fraction must lie in [0, 1], got {pos_fraction!r}")
    if math.isnan(neg_pos_ub):
        raise ValueError("neg_pos_ub must not be NaN")
    # checked even when neg_balance is off, so a bad config fails on every path
    _check_negative_settings(num_bins, floor_thr, floor_fraction)

    pos_candidates = torch.nonzero(labels >= 1).squeeze(1)
    neg_candidates = torch.nonzero(labels == 0).squeeze(1)

    num_pos_expected = int(num * pos_fraction)
    if pos_balance:
        pos_inds = instance_balanced_positive_sample(
            pos_candidates, matched_gt_inds, num_pos_expected, generator
        )
    else:
        pos_inds = random_choice(pos_candidates, num_pos_expected, generator)

    num_neg_expected = num - pos_inds.numel()
    if neg_pos_ub >= 0:
        neg_upper_bound = neg_pos_ub * max(pos_inds.numel(), 1)  # may be inf
        if neg_upper_bound < num_neg_expected:
            num_neg_expected = int(neg_upper_bound)
    if neg_balance:
        neg_inds = iou_balanced_negative_sample(
            neg_candidates,
            max_overlaps,
            num_neg_expected,
            num_bins=num_bins,
            floor_thr=floor_thr,
            floor_fraction=floor_fraction,
            generator=generator,
        )
    else:
        neg_inds = random_choice(neg_candidates, num_neg_expected, generator)
    return pos_inds, neg_inds
