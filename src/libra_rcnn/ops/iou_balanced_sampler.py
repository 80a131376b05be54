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
  inputs and the generator's state (without one, torch's default generator of the candidates'
  device is used). Random numbers are drawn on the generator's device and moved.

Implementation note: the balanced samplers work on at most a few thousand candidates per image,
where the cost of ~40 small torch calls is all dispatcher overhead. So the random numbers come
from one torch call per sampler (for reproducibility with torch generators) and the grouping,
ranking and selection run in NumPy on the host; results are the same on every device.

Choices (mmdetection's ``IoUBalancedNegSampler`` / ``InstanceBalancedPosSampler`` /
``CombinedSampler`` semantics unless stated):

* ``binning="negatives"`` (default; the paper's Eq. 2): the bins span ``[floor, max IoU among
  the negatives being binned]`` with ``floor = max(floor_thr, 0)``, so every bin is usable, as
  Eq. 2 intends. Bins are half-open ``[start, end)`` (up to float rounding exactly at an edge)
  except the last, which also holds the maximum itself. ``num // K`` samples per bin; the
  remainder ``num % K`` goes one each to the highest-IoU bins (the hard end, the point of the
  method).
* ``binning="all_candidates"``: as mmdetection 3.3. The bins span ``[floor, max IoU over ALL
  candidates)`` (positives and ground truths added as proposals included, so usually 1.0, which
  leaves the top bins nearly empty of negatives), every bin half-open with edges computed in the
  IoUs' precision (the maximum itself is in no bin), ``int(num / K)`` per bin, and the remainder
  filled uniformly from all not-yet-chosen binned negatives (those outside every bin included).
* Either way a bin with too few candidates gives all of them and the shortfall is filled at
  random from the not-yet-chosen negatives.
* Floor variant (``floor_thr >= 0``): negatives with IoU ``< floor_thr`` (exactly ``== 0`` when
  ``floor_thr == 0``) form a floor set; ``int(num * (1 - floor_fraction))`` samples come from the
  bins over the remaining negatives, the rest at random from the floor set, then any shortfall at
  random from all unchosen negatives. With ``floor_thr < 0`` the floor set is empty, so a nonzero
  ``floor_fraction`` becomes a share filled uniformly at random.
* mmdetection quirk, not copied: with ``floor_thr=-1`` (its Libra configs) its ``_sample_neg``
  sets ``self.floor_thr = 0`` on its first call, so only the first image of a run is sampled with
  an empty floor set; every later image uses ``floor_thr = 0``, i.e. negatives with IoU exactly 0
  are only drawn when fewer than ``num`` negatives overlap a ground truth. Here ``floor_thr`` is
  what the caller passes: ``-1`` reproduces mmdetection's first image, ``0`` its steady state.
* Positive quota per instance is ``round(num / n_gt) + 1`` (Python's ``round``, as mmdetection).
  mmdetection's shortfall fill takes ``set(pos_inds) - set(sampled)`` over 0-d tensors, which
  hash by identity, so it removes nothing and may re-draw chosen positives (the duplicates are
  then dropped by its ``unique()``, leaving fewer positives). Here the fill draws from the
  unchosen positives only, so exactly ``min(num, #pos)`` distinct positives are returned.
* Ground-truth boxes added as proposals (``SamplerConfig.add_gt_as_proposals``) are handled by the
  detector, which concatenates them to the proposals before matching (as torchvision's
  ``RoIHeads.add_gt_proposals`` does); this module only sees the resulting candidates.
"""

from __future__ import annotations

import typing
from dataclasses import dataclass
from typing import Literal, Optional, Tuple

import numpy as np
import torch
from torch import Tensor

from ..checks import (check_minus_one_or_non_negative, check_non_negative_int, check_one_of,
                      check_positive_int, check_unit_interval)

__all__ = [
    "BINNINGS",
    "Binning",
    "SamplingSettings",
    "random_choice",
    "iou_balanced_negative_sample",
    "instance_balanced_positive_sample",
    "sample_positives_negatives",
]

#: How the IoU bins of Eq. 2 are laid out (see the module docstring): over the IoU range of the
#: negatives being binned, or up to the highest IoU of all candidates (mmdetection's rule).
Binning = Literal["negatives", "all_candidates"]
BINNINGS: tuple[str, ...] = typing.get_args(Binning)


# --------------------------------------------------------------------------------------------
# settings and checks


@dataclass(frozen=True)
class SamplingSettings:
    """How the RoI minibatch of one image is sampled (see :func:`sample_positives_negatives`).

    Checked once, when made (``ValueError`` naming the field); the samplers trust it afterwards.
    ``libra_rcnn.models.config.SamplerConfig`` holds the same fields for a config file.

    Attributes:
        num: RoIs per image, ``>= 0``.
        pos_fraction: share of ``num`` demanded as positives, in ``[0, 1]``.
        neg_pos_ub: at most ``neg_pos_ub * max(num_pos, 1)`` negatives; ``-1``: no cap.
        pos_balance: instance-balanced positives, else random.
        neg_balance: IoU-balanced negatives, else random.
        num_bins: ``K`` of Eq. 2, ``>= 1`` (``1`` is random sampling).
        floor_thr: ``< 0`` disables the floor set; ``[0, 1)``: negatives with IoU below it
            (``== 0`` exactly when it is 0) form a floor set sampled at random.
        floor_fraction: share of the negatives drawn from the floor set, in ``[0, 1]``.
        binning: the bins' layout, ``"negatives"`` or ``"all_candidates"`` (module docstring).
    """

    num: int = 512
    pos_fraction: float = 0.25
    neg_pos_ub: float = -1.0
    pos_balance: bool = False
    neg_balance: bool = False
    num_bins: int = 3
    floor_thr: float = -1.0
    floor_fraction: float = 0.0
    binning: Binning = "negatives"

    def __post_init__(self) -> None:
        check_non_negative_int(self.num, "num")
        check_unit_interval(self.pos_fraction, "pos_fraction")
        check_minus_one_or_non_negative(self.neg_pos_ub, "neg_pos_ub", "no cap")
        check_positive_int(self.num_bins, "num_bins")
        if not self.floor_thr < 1.0:  # NaN too
            raise ValueError(f"floor_thr must be < 1 (negative disables the floor set), "
                             f"got {self.floor_thr!r}")
        check_unit_interval(self.floor_fraction, "floor_fraction")
        check_one_of(self.binning, BINNINGS, "binning")


def _check_num(num: int, name: str = "num") -> None:
    check_non_negative_int(num, name)


def _check_index_vector(t: Tensor, name: str) -> None:
    if not isinstance(t, Tensor) or t.dim() != 1:
        raise ValueError(f"{name} must be a 1-D tensor, got {getattr(t, 'shape', type(t))}")
    if t.dtype not in (torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8):
        raise ValueError(f"{name} must be an integer tensor, got dtype {t.dtype}")


def _check_overlaps(max_overlaps: Tensor) -> None:
    if not isinstance(max_overlaps, Tensor) or max_overlaps.dim() != 1:
        raise ValueError("max_overlaps must be a 1-D tensor")
    if not max_overlaps.is_floating_point():
        raise ValueError(f"max_overlaps must be a floating tensor, got dtype {max_overlaps.dtype}")


# --------------------------------------------------------------------------------------------
# random numbers (torch, for reproducibility) and host arrays


def _randperm(n: int, generator: Optional[torch.Generator], device: torch.device) -> Tensor:
    """A random permutation of ``range(n)`` drawn on the generator's device (else ``device``)."""
    if generator is None:
        return torch.randperm(n, device=device)
    return torch.randperm(n, generator=generator, device=generator.device)


def _uniform_keys(n: int, generator: Optional[torch.Generator], device: torch.device) -> np.ndarray:
    """``n`` i.i.d. U[0, 1) float64 keys as a host array, drawn in one torch call."""
    if generator is None:
        keys = torch.rand(n, dtype=torch.float64, device=device)
    else:
        keys = torch.rand(n, dtype=torch.float64, generator=generator, device=generator.device)
    return keys.cpu().numpy()


def _host(t: Tensor) -> np.ndarray:
    """A host NumPy view (or copy) of a 1-D tensor; bfloat16 has no NumPy type, so float32."""
    t = t.detach()
    if t.dtype == torch.bfloat16:
        t = t.float()
    return t.cpu().numpy()


def _device_tensor(a: np.ndarray, device: torch.device) -> Tensor:
    """LongTensor on ``device`` holding the host index array ``a`` (always a fresh tensor)."""
    t = torch.from_numpy(np.array(a, dtype=np.int64))
    return t if device.type == "cpu" else t.to(device)


# --------------------------------------------------------------------------------------------
# host implementations; every ``inds`` is an int64 array of distinct candidate indices and
# ``device`` is where random numbers are drawn when no generator is given


def _np_random_choice(
    inds: np.ndarray, num: int, generator: Optional[torch.Generator], device: torch.device
) -> np.ndarray:
    """Host twin of :func:`random_choice` (same draws, same result)."""
    if inds.size <= num:
        return inds
    return inds[_randperm(inds.size, generator, device).cpu().numpy()[:num]]


def _np_sample_with_group_quota(
    inds: np.ndarray,
    group: np.ndarray,
    quota: np.ndarray,
    num: int,
    generator: Optional[torch.Generator],
    device: torch.device,
) -> np.ndarray:
    """Pick ``num`` of ``inds``: up to ``quota[g]`` uniformly from each group, then even out.

    Args:
        inds: int64[M] distinct candidate indices, ``M >= num``.
        group: int[M], group id in ``[0, G)`` of each candidate (``G < 2**40``).
        quota: int64[G], how many to draw from each group.
        num: how many to return.
    Returns:
        int64[num] distinct entries of ``inds``. If the groups' picks fall short of ``num``, the
        shortfall is filled uniformly from the unpicked candidates; if they exceed it, a uniform
        subset of the picks is kept.

    One draw of ``2 M`` uniform keys. Sorting on ``group + key / 2`` puts every group's members
    in a contiguous run in uniformly random order, so the position inside the run is a uniform
    random rank and the first ``quota[g]`` ranks are picked (a float64 tie, of probability
    ~1e-8 per call, only falls back to index order). The second half of the keys, shifted below
    zero for the picked candidates, then selects the ``num`` smallest in one partition.
    """
    m = inds.size
    if num >= m:
        return inds
    if num == 0:
        return inds[:0]
    keys = _uniform_keys(2 * m, generator, device)
    order = (group + 0.5 * keys[:m]).argsort()
    sorted_group = group[order]
    counts = np.bincount(group, minlength=quota.size)
    run_starts = np.cumsum(counts) - counts
    rank_in_group = np.arange(m) - run_starts[sorted_group]
    picked = rank_in_group < quota[sorted_group]
    # picked keys lie in [-1, 0), the rest in [0, 1): the smallest num are all picks (or a
    # uniform subset of them) plus a uniform subset of the rest
    fill_keys = keys[m:] - picked
    take = fill_keys.argpartition(num - 1)[:num]
    return inds[order[take]]


def _mmdet_bin_ids(
    ious: np.ndarray, floor: float, range_max: np.generic, num_bins: int
) -> np.ndarray:
    """mmdetection's IoU bins: ``int64[M]`` bin of each IoU, ``num_bins`` for none.

    Bin ``k`` is ``[floor + k * w, floor + (k + 1) * w)`` with ``w = (range_max - floor) / K``,
    the edges computed as mmdetection does, in the IoUs' own precision; IoUs at or above the
    last edge (usually ``range_max`` itself) belong to no bin.
    """
    interval = (range_max - floor) / num_bins
    edges = np.array([floor + k * interval for k in range(num_bins + 1)], dtype=ious.dtype)
    bin_ids = np.searchsorted(edges, ious, side="right") - 1  # edges[k] <= iou < edges[k + 1]
    bin_ids[(bin_ids < 0) | (bin_ids >= num_bins)] = num_bins
    return bin_ids


def _np_sample_by_iou_bins(
    inds: np.ndarray,
    ious: np.ndarray,
    num_balanced: int,
    num: int,
    num_bins: int,
    floor: float,
    generator: Optional[torch.Generator],
    device: torch.device,
    range_max: Optional[np.generic] = None,
) -> np.ndarray:
    """Eq. 2 proper: ``num_balanced`` split evenly over ``num_bins`` IoU bins, topped up to ``num``.

    Args:
        inds: int64[M] distinct candidates, ``M >= num >= num_balanced``, ``M >= 1``.
        ious: float[M], their IoUs, all ``>= floor``.
        range_max: ``None`` for the paper's bins over ``[floor, ious.max()]``; else
            mmdetection's half-open bins over ``[floor, range_max)`` (see :func:`_mmdet_bin_ids`).
    Returns:
        int64[num]. Paper: ``num_balanced // K`` per bin (remainder to the top bins), a bin short
        of its quota gives all it has, then uniform picks from the rest up to ``num``.
        mmdetection: ``num_balanced // K`` per bin, then uniform picks from the rest (IoUs outside
        every bin included) up to ``num``.
    """
    if range_max is not None:
        if num_bins == 1:  # mmdetection samples at random, the maximum included
            return _np_random_choice(inds, num, generator, device)
        bin_ids = _mmdet_bin_ids(ious, floor, range_max, num_bins)
        quota = np.full(num_bins + 1, num_balanced // num_bins, dtype=np.int64)
        quota[num_bins] = 0  # outside every bin: reached by the uniform fill only
        return _np_sample_with_group_quota(inds, bin_ids, quota, num, generator, device)
    max_iou = float(ious.max())
    if num_bins == 1 or not max_iou > floor:
        # one bin, or a degenerate (zero-width) range: Eq. 2 reduces to Eq. 1
        return _np_random_choice(inds, num, generator, device)
    # bin k holds IoUs in [floor + k * w, floor + (k + 1) * w), w = (max - floor) / K; the max
    # itself joins bin K - 1 (arithmetic in the IoUs' own precision)
    scale = num_bins / (max_iou - floor)
    bin_ids = ((ious - floor) * scale).astype(np.int64)
    np.minimum(bin_ids, num_bins - 1, out=bin_ids)
    np.maximum(bin_ids, 0, out=bin_ids)
    base, remainder = divmod(num_balanced, num_bins)
    quota = np.full(num_bins, base, dtype=np.int64)
    if remainder:
        quota[num_bins - remainder :] += 1
    return _np_sample_with_group_quota(inds, bin_ids, quota, num, generator, device)


def _np_iou_balanced_negative(
    neg_inds: np.ndarray,
    ious: np.ndarray,
    num: int,
    settings: SamplingSettings,
    generator: Optional[torch.Generator],
    device: torch.device,
    range_max: Optional[np.generic] = None,
) -> np.ndarray:
    """Host :func:`iou_balanced_negative_sample`; ``ious[i]`` is the IoU of ``neg_inds[i]``;
    ``settings`` gives ``num_bins``, ``floor_thr`` and ``floor_fraction``; ``range_max``:
    ``None`` for bins over the negatives' own range, else mmdetection's bins up to it."""
    if neg_inds.size <= num:
        return neg_inds
    num_bins, floor_thr = settings.num_bins, settings.floor_thr
    num_balanced = int(num * (1.0 - settings.floor_fraction))
    if floor_thr < 0:
        # no floor set: the floor_fraction share (if any) is uniform over all negatives, which
        # is the same as topping up the binned picks uniformly
        return _np_sample_by_iou_bins(
            neg_inds, ious, num_balanced, num, num_bins, 0.0, generator, device, range_max
        )

    in_floor = (ious == 0) if floor_thr == 0 else (ious < floor_thr)
    floor_inds = neg_inds[in_floor]
    binned_inds, binned_ious = neg_inds[~in_floor], ious[~in_floor]
    if binned_inds.size > num_balanced:
        # if the floor set cannot cover its share, the binned side gives the shortfall as
        # uniform picks from its unpicked negatives (mmdetection's random fill)
        num_binned = max(num_balanced, num - floor_inds.size)
        binned_pick = _np_sample_by_iou_bins(
            binned_inds, binned_ious, num_balanced, num_binned, num_bins, float(floor_thr),
            generator, device, range_max,
        )
    else:
        binned_pick = binned_inds
    floor_pick = _np_random_choice(floor_inds, num - binned_pick.size, generator, device)
    return np.concatenate([binned_pick, floor_pick])


def _np_instance_balanced_positive(
    pos_inds: np.ndarray,
    matched_gt_inds: np.ndarray,
    num: int,
    generator: Optional[torch.Generator],
    device: torch.device,
) -> np.ndarray:
    """Host :func:`instance_balanced_positive_sample`; ``matched_gt_inds`` is indexed by
    ``pos_inds`` (only those entries are read)."""
    if pos_inds.size <= num:
        return pos_inds
    if num == 0:
        return pos_inds[:0]
    gt_of_pos = matched_gt_inds[pos_inds].astype(np.int64, copy=False)
    if int(gt_of_pos.min()) < 0:
        raise ValueError("matched_gt_inds must be >= 0 at every positive")
    # the ground-truth index itself is the group id (bincount is cheaper than unique)
    num_instances = int(np.count_nonzero(np.bincount(gt_of_pos)))
    per_instance = int(round(num / num_instances)) + 1
    quota = np.full(int(gt_of_pos.max()) + 1, per_instance, dtype=np.int64)
    return _np_sample_with_group_quota(pos_inds, gt_of_pos, quota, num, generator, device)


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
    perm = _randperm(m, generator, candidate_inds.device)[:num]
    return candidate_inds[perm.to(candidate_inds.device)]


def iou_balanced_negative_sample(
    neg_inds: Tensor,
    max_overlaps: Tensor,
    num: int,
    *,
    num_bins: int = SamplingSettings.num_bins,
    floor_thr: float = SamplingSettings.floor_thr,
    floor_fraction: float = SamplingSettings.floor_fraction,
    binning: Binning = SamplingSettings.binning,
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
        binning: the bins' layout (see the module docstring): ``"negatives"`` spans them over
            the binned negatives' own IoU range; ``"all_candidates"`` up to the largest of *all*
            ``max_overlaps``.
        generator: optional ``torch.Generator``.
    Returns:
        LongTensor[min(num, M)] of distinct entries of ``neg_inds``; all of them when ``M <= num``.
    """
    _check_index_vector(neg_inds, "neg_inds")
    _check_overlaps(max_overlaps)
    _check_num(num)
    settings = SamplingSettings(num_bins=num_bins, floor_thr=floor_thr,
                                floor_fraction=floor_fraction, binning=binning)

    neg_inds = neg_inds.long()
    if neg_inds.numel() <= num:
        return neg_inds.clone()
    range_max = _host(max_overlaps).max() if binning == "all_candidates" else None
    picked = _np_iou_balanced_negative(_host(neg_inds), _host(max_overlaps[neg_inds]), num,
                                       settings, generator, neg_inds.device, range_max)
    return _device_tensor(picked, neg_inds.device)


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
    host_pos = _host(pos_inds)
    # gather on the tensors' side so that only the P read entries travel to the host
    picked = _np_instance_balanced_positive(
        np.arange(host_pos.size), _host(matched_gt_inds[pos_inds]), num, generator,
        pos_inds.device,
    )
    return _device_tensor(host_pos[picked], pos_inds.device)


def sample_positives_negatives(
    labels: Tensor,
    max_overlaps: Tensor,
    matched_gt_inds: Tensor,
    settings: SamplingSettings = SamplingSettings(),
    *,
    generator: Optional[torch.Generator] = None,
) -> Tuple[Tensor, Tensor]:
    """Sample the RoI minibatch of one image (Libra R-CNN's combined sampler).

    With ``s = settings``: ``num_pos = min(#pos, int(s.num * s.pos_fraction))`` positives
    (instance-balanced when ``s.pos_balance``, else random); ``num_neg = s.num - num_pos``,
    capped at ``int(s.neg_pos_ub * max(num_pos, 1))`` when ``s.neg_pos_ub >= 0``, then at
    ``#neg`` (IoU-balanced when ``s.neg_balance``, else random; ``s.binning`` as in
    :func:`iou_balanced_negative_sample`). Ground truths added as proposals are the detector's job.

    Args:
        labels: LongTensor[N]; ``>= 1`` positive, ``0`` negative, ``-1`` ignored.
        max_overlaps: FloatTensor[N], largest IoU with any ground truth (0 without ground truth).
        matched_gt_inds: LongTensor[N], matched ground-truth index (read for positives only).
        settings: :class:`SamplingSettings` (checked when it was made).
    Returns:
        ``(pos_inds, neg_inds)``: disjoint LongTensors of indices into the N candidates, on the
        device of ``labels``.
    """
    _check_candidates(labels, max_overlaps, matched_gt_inds, settings.neg_balance)
    device = labels.device
    num_pos = int(settings.num * settings.pos_fraction)
    if device.type != "cpu" and not (settings.pos_balance or settings.neg_balance):
        # accelerator and random only (e.g. RPN anchors, 1e5 per image): stay on the device
        pos_inds = random_choice(torch.nonzero(labels >= 1).squeeze(1), num_pos, generator)
        num_neg = _negative_count(settings.num, pos_inds.numel(), settings.neg_pos_ub)
        neg_inds = random_choice(torch.nonzero(labels == 0).squeeze(1), num_neg, generator)
        return pos_inds, neg_inds

    # the same host code on every device, so that a seed gives the same samples everywhere
    host_labels = _host(labels)
    pos_candidates = np.flatnonzero(host_labels >= 1)
    if settings.pos_balance:
        pos_pick = _np_instance_balanced_positive(
            pos_candidates, _host(matched_gt_inds), num_pos, generator, device)
    else:
        pos_pick = _np_random_choice(pos_candidates, num_pos, generator, device)
    num_neg = _negative_count(settings.num, pos_pick.size, settings.neg_pos_ub)
    neg_pick = _np_sample_negatives(np.flatnonzero(host_labels == 0), max_overlaps, num_neg,
                                    settings, generator, device)
    return _device_tensor(pos_pick, device), _device_tensor(neg_pick, device)


def _check_candidates(labels: Tensor, max_overlaps: Tensor, matched_gt_inds: Tensor,
                      overlaps_read: bool) -> None:
    """One image's candidates: 1-D integer labels and matches and 1-D overlaps of one length
    (floating when ``overlaps_read``, i.e. the IoU bins read them)."""
    _check_index_vector(labels, "labels")
    _check_index_vector(matched_gt_inds, "matched_gt_inds")
    if overlaps_read:
        _check_overlaps(max_overlaps)
    elif not isinstance(max_overlaps, Tensor) or max_overlaps.dim() != 1:
        raise ValueError("max_overlaps must be a 1-D tensor")
    n = labels.numel()
    if max_overlaps.numel() != n or matched_gt_inds.numel() != n:
        raise ValueError(
            "labels, max_overlaps and matched_gt_inds must have the same length, got "
            f"{n}, {max_overlaps.numel()} and {matched_gt_inds.numel()}"
        )


def _np_sample_negatives(neg_candidates: np.ndarray, max_overlaps: Tensor, num: int,
                         settings: SamplingSettings, generator: Optional[torch.Generator],
                         device: torch.device) -> np.ndarray:
    """``num`` of the host candidate negatives, IoU-balanced when ``settings.neg_balance``."""
    if not settings.neg_balance or neg_candidates.size <= num:
        return _np_random_choice(neg_candidates, num, generator, device)
    host_overlaps = _host(max_overlaps)
    range_max = host_overlaps.max() if settings.binning == "all_candidates" else None
    return _np_iou_balanced_negative(neg_candidates, host_overlaps[neg_candidates], num,
                                     settings, generator, device, range_max)


def _negative_count(num: int, num_pos: int, neg_pos_ub: float) -> int:
    """``num - num_pos``, capped at ``int(neg_pos_ub * max(num_pos, 1))`` if ``neg_pos_ub >= 0``."""
    num_neg = num - num_pos
    if neg_pos_ub >= 0:
        neg_upper_bound = neg_pos_ub * max(num_pos, 1)  # may be inf
        if neg_upper_bound < num_neg:
            num_neg = int(neg_upper_bound)
    return num_neg
