"""Property-based tests (hypothesis) for the paper's three components.

Random shapes, sizes, dtypes, label mixes and IoU distributions; each test states the invariant it
checks. Complements the example-based tests in test_balanced_l1_loss.py,
test_iou_balanced_sampler.py, test_balanced_feature_pyramid.py and test_pafpn.py.

Reproducibility: every test uses ``derandomize=True`` and no example database, so CI draws the
same examples on every run. Tensors are drawn from ``torch.Generator`` objects seeded by a drawn
integer (never the global RNG); modules are built inside ``torch.random.fork_rng`` so their
random initialisation does not touch the caller's global RNG state.
"""

from __future__ import annotations

import math
from collections import OrderedDict

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from torch import nn
from torchvision.ops import FeaturePyramidNetwork
from torchvision.ops.feature_pyramid_network import LastLevelMaxPool, LastLevelP6P7

from libra_rcnn.ops.balanced_feature_pyramid import (
    BalancedFeaturePyramid,
    gather_balanced_semantic_feature,
    scatter_to_levels,
)
from libra_rcnn.ops.balanced_l1_loss import BalancedL1Loss, balanced_l1_loss
from libra_rcnn.ops.iou_balanced_sampler import (
    SamplingSettings,
    instance_balanced_positive_sample,
    iou_balanced_negative_sample,
    random_choice,
    sample_positives_negatives,
)
from libra_rcnn.ops.pafpn import PAFPN

# Reproducible, database-less, no per-example deadline (the machine is shared and slow).
BASE = settings(
    database=None,
    derandomize=True,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)

SEEDS = st.integers(min_value=0, max_value=2**31 - 1)


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# =============================================================================================
# Balanced L1 loss (Sec. 3.3, Eq. 7-9)
# =============================================================================================


@st.composite
def loss_hyperparameters(draw):
    """``(alpha, gamma, beta)``: the paper's defaults or random, with gamma / alpha <= 20."""
    if draw(st.booleans()):
        return 0.5, 1.5, draw(st.sampled_from([1.0, 1.0 / 9.0, 0.5, 2.0]))
    alpha = draw(st.floats(0.05, 2.0))
    gamma = alpha * draw(st.floats(0.05, 20.0))
    beta = draw(st.floats(0.01, 10.0))
    return alpha, gamma, beta


def _b_of(alpha: float, gamma: float) -> float:
    """Eq. 9: alpha * ln(b + 1) = gamma."""
    return math.exp(gamma / alpha) - 1.0


SHAPES = hnp.array_shapes(min_dims=0, max_dims=3, min_side=0, max_side=6)
ERRORS_F64 = st.floats(-1e6, 1e6, allow_nan=False)


@st.composite
def error_pairs_f64(draw):
    """Two float64 arrays of one random shape (possibly empty or 0-dim): pred and target."""
    shape = draw(SHAPES)
    pred = draw(hnp.arrays(np.float64, shape, elements=ERRORS_F64))
    target = draw(hnp.arrays(np.float64, shape, elements=ERRORS_F64))
    return torch.from_numpy(pred), torch.from_numpy(target)


@given(pair=error_pairs_f64(), params=loss_hyperparameters())
@settings(BASE, max_examples=60)
def test_loss_nonnegative_symmetric_shape_preserving(pair, params):
    """L >= 0, finite, shape (*) for 'none'; L(pred, target) == L(target, pred) (i.e. L(x) = L(-x))
    and L(-pred, -target) == L(pred, target); 'sum' == 'mean' * numel."""
    alpha, gamma, beta = params
    pred, target = pair
    kw = dict(alpha=alpha, gamma=gamma, beta=beta)
    loss = balanced_l1_loss(pred, target, reduction="none", **kw)
    assert loss.shape == pred.shape and loss.dtype == pred.dtype
    assert torch.isfinite(loss).all()
    assert (loss >= 0).all()
    assert torch.equal(loss, balanced_l1_loss(target, pred, reduction="none", **kw))
    assert torch.equal(loss, balanced_l1_loss(-pred, -target, reduction="none", **kw))

    total = balanced_l1_loss(pred, target, reduction="sum", **kw)
    mean = balanced_l1_loss(pred, target, reduction="mean", **kw)
    assert total.shape == () and mean.shape == ()
    torch.testing.assert_close(total, mean * pred.numel(), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(total, loss.sum(), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_loss_exactly_nonnegative_at_tiny_errors(dtype):
    """L(x) >= 0 exactly, also for |x| down to the smallest normal numbers."""
    tiny = torch.finfo(dtype).tiny
    x = torch.logspace(math.log10(tiny), 0, 20000, dtype=dtype)
    loss = balanced_l1_loss(x, torch.zeros_like(x), reduction="none")
    assert (loss >= 0).all()


@given(
    abs_err=hnp.arrays(np.float64, st.integers(1, 40), elements=st.floats(0.0, 1e6)),
    params=loss_hyperparameters(),
)
@settings(BASE, max_examples=60)
def test_loss_monotone_convex_and_bounded_by_gamma_abs(abs_err, params):
    """L is non-decreasing in |x|, convex (Eq. 7's gradient never decreases in |x|),
    L(0) = 0 and L(x) <= gamma * |x| (the gradient never exceeds gamma)."""
    alpha, gamma, beta = params
    x = torch.from_numpy(np.sort(abs_err))
    x = torch.cat([x.new_zeros(1), x, x.new_tensor([beta])])
    x = x.sort().values
    loss = balanced_l1_loss(x, torch.zeros_like(x), reduction="none",
                            alpha=alpha, gamma=gamma, beta=beta)
    tol = 1e-12 * (1.0 + loss.abs())
    assert loss[0] == 0
    assert (loss[1:] - loss[:-1] >= -tol[1:]).all(), "not monotone in |x|"
    assert (loss <= gamma * x + tol).all(), "exceeds gamma * |x|"
    # convexity: L((x_i + x_j) / 2) <= (L(x_i) + L(x_j)) / 2 on every pair of drawn points
    mid = (x[:, None] + x[None, :]) / 2
    mid_loss = balanced_l1_loss(mid, torch.zeros_like(mid), reduction="none",
                                alpha=alpha, gamma=gamma, beta=beta)
    chord = (loss[:, None] + loss[None, :]) / 2
    assert (mid_loss <= chord + 1e-12 * (1.0 + chord)).all(), "not convex"


@given(pair=error_pairs_f64(), params=loss_hyperparameters())
@settings(BASE, max_examples=60)
def test_loss_gradient_is_eq7(pair, params):
    """dL/dpred = sign(x) * alpha * ln(b|x|/beta + 1) for |x| < beta, sign(x) * gamma beyond,
    with b from Eq. 9; |dL/dpred| <= gamma; dL/dtarget = -dL/dpred."""
    alpha, gamma, beta = params
    pred, target = (t.clone().requires_grad_(True) for t in pair)
    balanced_l1_loss(pred, target, reduction="sum", alpha=alpha, gamma=gamma, beta=beta).backward()
    x = (pair[0] - pair[1]).abs()
    b = _b_of(alpha, gamma)
    magnitude = torch.where(x < beta, alpha * torch.log1p(b * x / beta), torch.full_like(x, gamma))
    expected = torch.sign(pair[0] - pair[1]) * magnitude
    torch.testing.assert_close(pred.grad, expected, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(target.grad, -expected, rtol=1e-9, atol=1e-9)
    assert (pred.grad.abs() <= gamma * (1 + 1e-12)).all()


@st.composite
def low_precision_pairs(draw):
    """pred/target of a random shape in float16 (|v| <= 1e4), bfloat16 (|v| <= 1e30) or float32."""
    dtype = draw(st.sampled_from([torch.float16, torch.bfloat16, torch.float32]))
    shape = draw(SHAPES)
    if dtype == torch.float16:
        # |x| <= 2e4 keeps every elementwise loss (<= 1.5 * 2e4) below float16's max, 65504
        elements = st.floats(-1e4, 1e4, width=16)
        arrays = [draw(hnp.arrays(np.float16, shape, elements=elements)) for _ in range(2)]
    else:
        bound = float(np.float32(1e30))  # bounds must be exactly representable at width 32
        elements = st.floats(-bound, bound, width=32)
        arrays = [draw(hnp.arrays(np.float32, shape, elements=elements)) for _ in range(2)]
    pred, target = (torch.from_numpy(a).to(dtype) for a in arrays)
    return pred, target


@given(pair=low_precision_pairs(), reduction=st.sampled_from(["none", "mean", "sum"]))
@settings(BASE, max_examples=60)
def test_loss_low_precision_finite_and_float32_exact(pair, reduction):
    """For float16/bfloat16/float32 inputs of any shape (empty included) the loss keeps the input
    dtype, equals the float32 computation rounded to that dtype, is finite wherever that value is
    representable, and its gradient is finite."""
    pred, target = pair
    pred.requires_grad_(True)
    loss = balanced_l1_loss(pred, target, reduction=reduction)
    assert loss.dtype == pred.dtype
    reference = balanced_l1_loss(pred.detach().float(), target.float(), reduction=reduction)
    assert torch.equal(loss, reference.to(pred.dtype))
    representable = reference.abs() <= torch.finfo(pred.dtype).max
    assert torch.isfinite(loss[representable]).all()
    if reduction != "sum":  # none / mean values never exceed the largest elementwise loss
        assert representable.all()
    (loss.float().sum() if reduction == "none" else loss).backward()
    assert pred.grad.dtype == pred.dtype and torch.isfinite(pred.grad).all()


@st.composite
def box_delta_batches(draw):
    """(N, 4) float64 pred/target, N in 0..12 (random deltas with occasional huge outliers)."""
    n = draw(st.integers(0, 12))
    g = _gen(draw(SEEDS))
    scale = draw(st.sampled_from([0.01, 1.0, 100.0]))
    pred = torch.randn(n, 4, generator=g, dtype=torch.float64) * scale
    target = torch.randn(n, 4, generator=g, dtype=torch.float64) * scale
    return pred, target, g


@given(batch=box_delta_batches(), params=loss_hyperparameters(),
       loss_weight=st.floats(-3.0, 3.0))
@settings(BASE, max_examples=50)
def test_module_weight_avg_factor_and_loss_weight_relations(batch, params, loss_weight):
    """weight=ones == no weight; avg_factor=numel == 'mean'; (N, 1) weight == its (N, 4)
    expansion; a 0/1 weight equals the sum over the kept elements; loss_weight scales linearly;
    reduction_override matches the function."""
    pred, target, g = batch
    alpha, gamma, beta = params
    kw = dict(alpha=alpha, gamma=gamma, beta=beta)
    module = BalancedL1Loss(**kw)
    plain = module(pred, target)
    assert torch.equal(module(pred, target, weight=torch.ones_like(pred)), plain)
    torch.testing.assert_close(module(pred, target, avg_factor=pred.numel()), plain,
                               rtol=1e-12, atol=1e-15)
    torch.testing.assert_close(plain, balanced_l1_loss(pred, target, **kw), rtol=0, atol=0)
    for reduction in ("none", "sum"):
        torch.testing.assert_close(
            module(pred, target, reduction_override=reduction),
            balanced_l1_loss(pred, target, reduction=reduction, **kw), rtol=0, atol=0,
        )

    row_weight = torch.rand(pred.shape[0], 1, generator=g, dtype=torch.float64)
    torch.testing.assert_close(
        module(pred, target, weight=row_weight, reduction_override="sum"),
        module(pred, target, weight=row_weight.expand_as(pred), reduction_override="sum"),
        rtol=1e-12, atol=1e-15,
    )
    keep = torch.rand(pred.shape, generator=g) < 0.5
    masked = module(pred, target, weight=keep.double(), reduction_override="sum")
    elementwise = balanced_l1_loss(pred, target, reduction="none", **kw)
    torch.testing.assert_close(masked, elementwise[keep].sum(), rtol=1e-12, atol=1e-15)

    scaled = BalancedL1Loss(loss_weight=loss_weight, **kw)
    torch.testing.assert_close(scaled(pred, target), loss_weight * plain, rtol=1e-12, atol=1e-15)
    torch.testing.assert_close(scaled(pred, target, avg_factor=3.0),
                               loss_weight * elementwise.sum() / 3.0, rtol=1e-12, atol=1e-15)


# =============================================================================================
# IoU-balanced sampling (Sec. 3.1, Eq. 1-2)
# =============================================================================================

IOU_KINDS = ["uniform", "skewed", "equal", "zero", "discrete", "realistic", "tiny"]


@st.composite
def candidate_pools(draw):
    """One image's candidates: ``(labels, max_overlaps, matched_gt_inds)``, N in 0..3000.

    Random mix of ignored (-1, sometimes -2) / negative (0) / positive (1..C) labels, and an IoU
    distribution among: uniform, heavily skewed towards 0, all equal, all zero, a few discrete
    values (ties on bin edges), realistic (negatives < 0.5 <= positives), tiny range (< 1e-6).
    matched_gt_inds are in [0, G) (sometimes sparse ids) at positives and may be -1 elsewhere.
    """
    size_class = draw(st.integers(0, 9))  # 10% empty, 30% small, 60% up to 3000
    n = 0 if size_class == 0 else draw(
        st.integers(1, 40) if size_class < 4 else st.integers(41, 3000)
    )
    g = _gen(draw(SEEDS))
    weights = torch.tensor(
        draw(st.tuples(*[st.integers(0, 10)] * 3).filter(lambda w: sum(w) > 0)), dtype=torch.float
    )
    if weights[1] > 0 and draw(st.integers(0, 3)) == 0:
        weights[2] = 0.0  # an image without positives: neg_pos_ub then caps at neg_pos_ub * 1
    edges = torch.cumsum(weights, 0)[:-1] / weights.sum()
    kind = (torch.rand(n, generator=g)[:, None] >= edges[None, :]).sum(1)  # 0 ign, 1 neg, 2 pos
    num_classes = draw(st.integers(1, 5))
    ignore_value = draw(st.sampled_from([-1, -2]))
    labels = torch.where(kind == 1, 0, ignore_value).long()
    labels[kind == 2] = torch.randint(1, num_classes + 1, (int((kind == 2).sum()),), generator=g)

    iou_kind = draw(st.sampled_from(IOU_KINDS))
    u = torch.rand(n, generator=g)
    if iou_kind == "uniform":
        ious = u
    elif iou_kind == "skewed":
        ious = u ** draw(st.floats(4.0, 30.0))
    elif iou_kind == "equal":
        ious = torch.full((n,), draw(st.sampled_from([0.0, 0.3, 0.5, 1.0])))
    elif iou_kind == "zero":
        ious = torch.zeros(n)
    elif iou_kind == "discrete":
        values = torch.tensor([0.0, 0.1, 0.2, 0.25, 0.3, 0.5, 0.7, 1.0])
        ious = values[torch.randint(0, len(values), (n,), generator=g)]
    elif iou_kind == "realistic":
        ious = torch.where(kind == 2, 0.5 + 0.5 * u, 0.5 * u**3)
    else:
        ious = u * 1e-7

    num_gt = draw(st.integers(1, 20))
    matched = torch.randint(0, num_gt, (n,), generator=g)
    if draw(st.booleans()):
        matched = matched * 7 + 3  # sparse ground-truth ids
    matched = torch.where(labels >= 1, matched, torch.full_like(matched, -1))
    return labels, ious.float(), matched


@st.composite
def sampler_settings(draw):
    return dict(
        num=draw(st.one_of(st.integers(0, 20), st.integers(0, 1024))),
        pos_fraction=draw(st.one_of(st.sampled_from([0.0, 0.25, 1.0]), st.floats(0.0, 1.0))),
        neg_pos_ub=draw(st.one_of(st.just(-1.0), st.sampled_from([0.0, 1.0, 3.0]),
                                  st.floats(0.0, 10.0), st.just(math.inf))),
        pos_balance=draw(st.booleans()),
        neg_balance=draw(st.booleans()),
        num_bins=draw(st.integers(1, 8)),
        floor_thr=draw(st.one_of(st.just(-1.0), st.just(0.0), st.floats(0.0, 0.6))),
        floor_fraction=draw(st.one_of(st.just(0.0), st.floats(0.0, 1.0))),
    )


def _assert_distinct_subset(picked, allowed_mask, n):
    """Long dtype, distinct, in [0, n), and every index allowed."""
    assert picked.dtype == torch.int64 and picked.dim() == 1
    assert picked.unique().numel() == picked.numel(), "an index was sampled twice"
    if picked.numel():
        assert int(picked.min()) >= 0 and int(picked.max()) < n, "index out of range"
        assert allowed_mask[picked].all(), "index outside the allowed candidates"


@given(pool=candidate_pools(), cfg=sampler_settings(), seed=SEEDS)
@settings(BASE, max_examples=80)
def test_combined_sampler_invariants(pool, cfg, seed):
    """Positives from labels >= 1, negatives from labels == 0 (never ignored), distinct, disjoint,
    counts = min(quota, available) with the documented quota rule, deterministic per seed."""
    labels, ious, matched = pool
    n = labels.numel()
    pos, neg = sample_positives_negatives(
        labels, ious, matched, SamplingSettings(**cfg), generator=_gen(seed)
    )
    _assert_distinct_subset(pos, labels >= 1, n)
    _assert_distinct_subset(neg, labels == 0, n)
    assert not torch.isin(pos, neg).any()

    num_pos_available = int((labels >= 1).sum())
    num_neg_available = int((labels == 0).sum())
    expected_pos = min(num_pos_available, int(cfg["num"] * cfg["pos_fraction"]))
    neg_quota = cfg["num"] - expected_pos
    if cfg["neg_pos_ub"] >= 0:
        neg_quota = min(neg_quota, cfg["neg_pos_ub"] * max(expected_pos, 1))
    assert pos.numel() == expected_pos
    assert neg.numel() == min(num_neg_available, int(neg_quota))

    again = sample_positives_negatives(
        labels, ious, matched, SamplingSettings(**cfg), generator=_gen(seed)
    )
    assert torch.equal(again[0], pos) and torch.equal(again[1], neg)


@given(pool=candidate_pools(), cfg=sampler_settings(), seed=SEEDS)
@settings(BASE, max_examples=40)
def test_combined_sampler_ignores_unread_fields(pool, cfg, seed):
    """Metamorphic: with the same generator seed, the result does not change when the IoUs of
    non-negatives (bins span the negatives' own IoUs) or the matched ids of non-positives
    (read for positives only) are replaced by other values."""
    labels, ious, matched = pool
    pos, neg = sample_positives_negatives(
        labels, ious, matched, SamplingSettings(**cfg), generator=_gen(seed)
    )
    g = _gen(seed + 1)
    other_ious = torch.where(labels == 0, ious, torch.rand(ious.shape, generator=g))
    other_matched = torch.where(
        labels >= 1, matched, torch.randint(-1, 50, matched.shape, generator=g)
    )
    pos2, neg2 = sample_positives_negatives(
        labels, other_ious, other_matched, SamplingSettings(**cfg), generator=_gen(seed)
    )
    assert torch.equal(pos, pos2) and torch.equal(neg, neg2)


@given(pool=candidate_pools(), cfg=sampler_settings(), seed=SEEDS)
@settings(BASE, max_examples=40)
def test_standalone_samplers_counts_and_subsets(pool, cfg, seed):
    """random_choice, iou_balanced_negative_sample and instance_balanced_positive_sample each
    return min(num, M) distinct candidates, all of them (as a set) when M <= num."""
    labels, ious, matched = pool
    n, num = labels.numel(), cfg["num"]
    pos_cands = torch.nonzero(labels >= 1).squeeze(1)
    neg_cands = torch.nonzero(labels == 0).squeeze(1)

    picked = random_choice(neg_cands, num, generator=_gen(seed))
    _assert_distinct_subset(picked, labels == 0, n)
    assert picked.numel() == min(num, neg_cands.numel())

    neg = iou_balanced_negative_sample(
        neg_cands, ious, num, num_bins=cfg["num_bins"], floor_thr=cfg["floor_thr"],
        floor_fraction=cfg["floor_fraction"], generator=_gen(seed),
    )
    _assert_distinct_subset(neg, labels == 0, n)
    assert neg.numel() == min(num, neg_cands.numel())
    if neg_cands.numel() <= num:
        assert torch.equal(neg.sort().values, neg_cands)

    pos = instance_balanced_positive_sample(pos_cands, matched, num, generator=_gen(seed))
    _assert_distinct_subset(pos, labels >= 1, n)
    assert pos.numel() == min(num, pos_cands.numel())
    if pos_cands.numel() <= num:
        assert torch.equal(pos.sort().values, pos_cands)


@st.composite
def binned_negative_pools(draw):
    """Negatives built bin by bin so that every IoU bin holds at least its quota.

    Returns a dict with ``neg_inds``, ``max_overlaps`` (also holding higher-IoU non-negatives),
    the construction's ``bin_of`` (bin id per position, -1 floor set, -2 not a negative),
    ``num``, ``num_bins``, ``floor_thr``, ``floor_fraction`` and the binned share ``num_balanced``.
    Bin k spans [lo + k w, lo + (k + 1) w), w = (max_neg_iou - lo) / K, lo = max(floor_thr, 0);
    values sit at least 1% of w away from every edge, and one negative sits exactly at the max
    (last bin), so membership is unambiguous.
    """
    g = _gen(draw(SEEDS))
    num_bins = draw(st.integers(1, 8))
    num = draw(st.integers(0, 400))
    floor_mode = draw(st.sampled_from(["none", "zero", "positive"]))
    if floor_mode == "none":
        floor_thr, floor_fraction, lo = -1.0, 0.0, 0.0
    else:
        floor_thr = 0.0 if floor_mode == "zero" else draw(st.floats(0.01, 0.5))
        floor_fraction, lo = draw(st.floats(0.0, 1.0)), floor_thr
    num_balanced = int(num * (1.0 - floor_fraction))
    top = lo + draw(st.floats(0.05, 0.49))
    width = (top - lo) / num_bins

    full = -(-num_balanced // num_bins)  # ceil(num_balanced / K): at least every bin's quota
    values, bins = [], []
    for k in range(num_bins):
        count = full + draw(st.integers(0, 30))
        count = max(count, 1) if k == num_bins - 1 else count  # the max lives in the last bin
        start = lo + (k + 0.01) * width
        v = start + 0.98 * width * torch.rand(count, generator=g, dtype=torch.float64)
        if k == num_bins - 1:
            v[0] = top
        values.append(v)
        bins.append(torch.full((count,), k))
    if floor_mode != "none":
        count = (num - num_balanced) + draw(st.integers(0, 30))
        v = torch.zeros(count, dtype=torch.float64)
        if floor_mode == "positive":
            v = 0.99 * floor_thr * torch.rand(count, generator=g, dtype=torch.float64)
        values.append(v)
        bins.append(torch.full((count,), -1))
    num_other = draw(st.integers(0, 50))  # positives / ignored, with IoUs above the negatives'
    values.append(top + (1.0 - top) * torch.rand(num_other, generator=g, dtype=torch.float64))
    bins.append(torch.full((num_other,), -2))

    perm = torch.randperm(sum(len(v) for v in values), generator=g)
    max_overlaps = torch.cat(values)[perm].float()
    bin_of = torch.cat(bins)[perm]
    neg_inds = torch.nonzero(bin_of != -2).squeeze(1)
    neg_inds = neg_inds[torch.randperm(neg_inds.numel(), generator=g)]
    return dict(neg_inds=neg_inds, max_overlaps=max_overlaps, bin_of=bin_of, num=num,
                num_bins=num_bins, floor_thr=floor_thr, floor_fraction=floor_fraction,
                num_balanced=num_balanced)


@given(pool=binned_negative_pools(), seed=SEEDS)
@settings(BASE, max_examples=80)
def test_iou_balanced_per_bin_counts_when_every_bin_is_full(pool, seed):
    """Eq. 2: when every bin holds >= its quota, each bin gives num_balanced / K samples up to
    +-1 (the remainder one each to the highest-IoU bins) and the floor set gives the rest."""
    num_bins, num_balanced = pool["num_bins"], pool["num_balanced"]
    picked = iou_balanced_negative_sample(
        pool["neg_inds"], pool["max_overlaps"], pool["num"], num_bins=num_bins,
        floor_thr=pool["floor_thr"], floor_fraction=pool["floor_fraction"], generator=_gen(seed),
    )
    bin_of = pool["bin_of"]
    _assert_distinct_subset(picked, bin_of != -2, bin_of.numel())
    assert picked.numel() == pool["num"]
    counts = torch.bincount(bin_of[picked] + 1, minlength=num_bins + 1)  # [floor, bin 0..K-1]
    per_bin = counts[1:].double()
    assert ((per_bin - num_balanced / num_bins).abs() < 1).all(), f"per-bin counts {per_bin}"
    assert int(per_bin.sum()) == num_balanced
    assert int(counts[0]) == pool["num"] - num_balanced
    base, remainder = divmod(num_balanced, num_bins)
    expected = [base + (k >= num_bins - remainder) for k in range(num_bins)]
    assert per_bin.long().tolist() == expected, "remainder not given to the top bins"


@st.composite
def instance_pools(draw):
    """Positives of G instances (sizes 1..60, sparse gt ids), shuffled among other candidates."""
    g = _gen(draw(SEEDS))
    sizes = draw(st.lists(st.integers(1, 60), min_size=1, max_size=10))
    gt_ids = [3 * i + draw(st.integers(0, 2)) for i in range(len(sizes))]
    num_other = draw(st.integers(0, 40))
    matched = torch.cat(
        [torch.full((s,), gid) for s, gid in zip(sizes, gt_ids)] + [torch.full((num_other,), -1)]
    )
    perm = torch.randperm(matched.numel(), generator=g)
    matched = matched[perm]
    pos_inds = torch.nonzero(matched >= 0).squeeze(1)
    pos_inds = pos_inds[torch.randperm(pos_inds.numel(), generator=g)]
    num = draw(st.integers(0, 300))
    return pos_inds, matched, num


@given(pool=instance_pools(), seed=SEEDS)
@settings(BASE, max_examples=60)
def test_instance_balanced_positive_quota(pool, seed):
    """Pos Balance: min(num, P) distinct positives; when the per-instance quota
    q = round(num / G) + 1 can cover num, no instance gives more than q."""
    pos_inds, matched, num = pool
    picked = instance_balanced_positive_sample(pos_inds, matched, num, generator=_gen(seed))
    _assert_distinct_subset(picked, matched >= 0, matched.numel())
    assert picked.numel() == min(num, pos_inds.numel())
    per_instance = torch.bincount(matched[picked], minlength=int(matched.max()) + 1)
    available = torch.bincount(matched[pos_inds], minlength=int(matched.max()) + 1)
    num_instances = int((available > 0).sum())
    quota = round(num / num_instances) + 1
    if pos_inds.numel() > num and int(available.clamp(max=quota).sum()) >= num:
        assert int(per_instance.max()) <= quota


# =============================================================================================
# Balanced feature pyramid (Sec. 3.2, Eq. 3) and PAFPN
# =============================================================================================


@st.composite
def pyramid_sizes(draw, min_levels=2, max_levels=6):
    """Level sizes, finest first: ceil- or floor-halving, halving with +-1 jitter, or arbitrary."""
    num_levels = draw(st.integers(min_levels, max_levels))
    mode = draw(st.sampled_from(["ceil", "floor", "jitter", "arbitrary"]))
    side = st.integers(1, 32)
    sizes = [(draw(side), draw(side))]
    for _ in range(num_levels - 1):
        if mode == "arbitrary":
            sizes.append((draw(side), draw(side)))
            continue
        nxt = []
        for s in sizes[-1]:
            if mode == "ceil":
                nxt.append(-(-s // 2))
            elif mode == "floor":
                nxt.append(max(1, s // 2))
            else:
                nxt.append(max(1, -(-s // 2) + draw(st.integers(-1, 1))))
        sizes.append(tuple(nxt))
    return sizes


def _random_levels(sizes, *, batch, channels, seed):
    g = _gen(seed)
    return [torch.randn(batch, channels, h, w, generator=g) for h, w in sizes]


def _build_bfp(channels, num_levels, refine_level, refine_type, seed=0):
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return BalancedFeaturePyramid(channels, num_levels, refine_level, refine_type)


@st.composite
def bfp_cases(draw):
    sizes = draw(pyramid_sizes())
    return dict(
        sizes=sizes,
        refine_level=draw(st.integers(0, len(sizes) - 1)),
        channels=draw(st.integers(4, 8)),
        batch=draw(st.integers(1, 2)),
        seed=draw(SEEDS),
    )


@given(case=bfp_cases(), refine_type=st.sampled_from([None, "none", "conv", "non_local"]),
       container=st.sampled_from(["list", "tuple", "dict", "ordered"]))
@settings(BASE, max_examples=20)
def test_bfp_preserves_container_and_shapes_finite(case, refine_type, container):
    """Any level count/sizes/refine level/type: same container type, keys and shapes, finite
    outputs and gradients. Conv refine adds a ReLU output, so every output >= its input;
    the non-local block starts as the identity, so at init it equals no refinement."""
    levels = _random_levels(case["sizes"], batch=case["batch"], channels=case["channels"],
                            seed=case["seed"])
    for t in levels:
        t.requires_grad_(True)
    names = [f"p{i}" for i in range(len(levels))][::-1]  # keys need not be sorted
    inputs = {
        "list": list(levels), "tuple": tuple(levels), "dict": dict(zip(names, levels)),
        "ordered": OrderedDict(zip(names, levels)),
    }[container]
    bfp = _build_bfp(case["channels"], len(levels), case["refine_level"], refine_type)
    out = bfp(inputs)
    assert type(out) is type(inputs)
    outs = list(out.values()) if isinstance(out, dict) else list(out)
    if isinstance(out, dict):
        assert list(out.keys()) == names
    assert [o.shape for o in outs] == [t.shape for t in levels]
    assert all(torch.isfinite(o).all() for o in outs)
    sum(o.sum() for o in outs).backward()
    assert all(t.grad is not None and torch.isfinite(t.grad).all() for t in levels)
    assert all(torch.isfinite(p.grad).all() for p in bfp.parameters() if p.grad is not None)

    with torch.no_grad():
        if refine_type == "conv":
            assert all((o >= t).all() for o, t in zip(outs, levels))
        if refine_type == "non_local":
            plain = _build_bfp(case["channels"], len(levels), case["refine_level"], None)(levels)
            for o, p in zip(outs, plain):
                torch.testing.assert_close(o, p, rtol=1e-5, atol=1e-5)


@given(case=bfp_cases(), refine_type=st.sampled_from(["none", "conv", "non_local"]))
@settings(BASE, max_examples=12)
def test_bfp_batch_items_are_independent(case, refine_type):
    """Each image's output depends only on that image: BFP(cat(a, b)) == cat(BFP(a), BFP(b))."""
    first = _random_levels(case["sizes"], batch=1, channels=case["channels"], seed=case["seed"])
    second = _random_levels(case["sizes"], batch=1, channels=case["channels"],
                            seed=case["seed"] + 1)
    bfp = _build_bfp(case["channels"], len(first), case["refine_level"], refine_type,
                     seed=case["seed"])
    # perturb the output conv so the non-local block is not the identity map
    if refine_type == "non_local":
        with torch.no_grad():
            bfp.refine.conv_out.weight.normal_(generator=_gen(case["seed"]))
    with torch.no_grad():
        joint = bfp([torch.cat([a, b]) for a, b in zip(first, second)])
        separate = [torch.cat([a, b]) for a, b in zip(bfp(first), bfp(second))]
    for j, s in zip(joint, separate):
        torch.testing.assert_close(j, s, rtol=1e-5, atol=1e-5)


@given(case=bfp_cases())
@settings(BASE, max_examples=25)
def test_bfp_refine_none_on_constant_levels_adds_mean(case):
    """Eq. 3 + strengthen, independent of the module's helpers: if level l is the constant map
    c_l (per image and channel), every rescaling of it is c_l, so P_l = c_l + mean_l(c_l)."""
    num_levels = len(case["sizes"])
    g = _gen(case["seed"])
    consts = torch.randn(num_levels, case["batch"], case["channels"], generator=g)
    levels = [c[:, :, None, None].expand(-1, -1, h, w).contiguous()
              for c, (h, w) in zip(consts, case["sizes"])]
    out = _build_bfp(case["channels"], num_levels, case["refine_level"], None)(levels)
    mean = consts.mean(0)
    for level, o in enumerate(out):
        expected = (consts[level] + mean)[:, :, None, None].expand_as(o)
        torch.testing.assert_close(o, expected, rtol=1e-5, atol=1e-6)


@given(case=bfp_cases(), shift=st.floats(-5.0, 5.0), scale=st.floats(0.1, 10.0))
@settings(BASE, max_examples=20)
def test_bfp_refine_none_monotone_shift_and_scale(case, shift, scale):
    """Without refinement the pyramid is built from max pooling, nearest resizing and a mean, so:
    x <= y elementwise implies BFP(x) <= BFP(y); BFP(x + k) = BFP(x) + 2k; BFP(s x) = s BFP(x)
    for s > 0. Also BFP(x) == x + scatter(gather(x)) via the module's exported helpers."""
    levels = _random_levels(case["sizes"], batch=case["batch"], channels=case["channels"],
                            seed=case["seed"])
    g = _gen(case["seed"] + 7)
    bigger = [t + torch.rand(t.shape, generator=g) for t in levels]
    bfp = _build_bfp(case["channels"], len(levels), case["refine_level"], "none")
    out = bfp(levels)
    for lo, hi in zip(out, bfp(bigger)):
        assert (hi - lo >= -1e-5).all(), "not monotone"
    for o, shifted in zip(out, bfp([t + shift for t in levels])):
        torch.testing.assert_close(shifted, o + 2 * shift, rtol=1e-5, atol=1e-4)
    for o, scaled in zip(out, bfp([t * scale for t in levels])):
        torch.testing.assert_close(scaled, o * scale, rtol=1e-5, atol=1e-4)

    balanced = gather_balanced_semantic_feature(levels, case["refine_level"])
    residuals = scatter_to_levels(balanced, case["sizes"], case["refine_level"])
    for o, t, r in zip(out, levels, residuals):
        torch.testing.assert_close(o, t + r, rtol=0, atol=0)


EXTRA_BLOCKS = ["none", "maxpool", "p6p7_from_p5", "p6p7_from_c5"]


@st.composite
def pafpn_cases(draw):
    sizes = draw(pyramid_sizes(min_levels=1, max_levels=5))
    return dict(
        sizes=sizes,
        in_channels=[draw(st.integers(1, 8)) for _ in sizes],
        out_channels=draw(st.integers(4, 8)),
        extra=draw(st.sampled_from(EXTRA_BLOCKS)),
        batch_norm=draw(st.booleans()),
        batch=draw(st.integers(1, 2)),
        seed=draw(SEEDS),
    )


def _extra_block(kind, in_channels, out_channels):
    if kind == "none":
        return None
    if kind == "maxpool":
        return LastLevelMaxPool()
    if kind == "p6p7_from_p5":
        return LastLevelP6P7(out_channels, out_channels)
    return LastLevelP6P7(in_channels[-1], out_channels)


@given(case=pafpn_cases())
@settings(BASE, max_examples=15)
def test_pafpn_keys_and_shapes_equal_fpn(case):
    """For random level counts, channels and (odd) sizes, PAFPN's output keys and shapes equal
    torchvision FPN's (extra blocks included), outputs are finite, and N_0 = P_0 when PAFPN
    carries the FPN's weights."""
    norm = nn.BatchNorm2d if case["batch_norm"] else None
    in_channels, out_channels = case["in_channels"], case["out_channels"]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(case["seed"])
        fpn = FeaturePyramidNetwork(
            in_channels, out_channels,
            extra_blocks=_extra_block(case["extra"], in_channels, out_channels), norm_layer=norm,
        )
        pafpn = PAFPN(
            in_channels, out_channels,
            extra_blocks=_extra_block(case["extra"], in_channels, out_channels), norm_layer=norm,
        )
    pafpn.load_state_dict(fpn.state_dict(), strict=False)
    fpn.eval()
    pafpn.eval()
    g = _gen(case["seed"])
    x = OrderedDict(
        (f"c{i + 2}", torch.randn(case["batch"], c, h, w, generator=g))
        for i, (c, (h, w)) in enumerate(zip(in_channels, case["sizes"]))
    )
    with torch.no_grad():
        expected = fpn(x)
        out = pafpn(x)
    assert isinstance(out, OrderedDict)
    assert list(out.keys()) == list(expected.keys())
    assert [v.shape for v in out.values()] == [v.shape for v in expected.values()]
    assert all(torch.isfinite(v).all() for v in out.values())
    first = next(iter(x))
    torch.testing.assert_close(out[first], expected[first], rtol=0, atol=0)


# Sanity for the strategies themselves: they must reach the cases the properties are about.
def test_strategies_cover_edge_cases():
    seen_empty_pool = seen_large_pool = False
    seen_kinds = set()

    @given(pool=candidate_pools())
    @settings(BASE, max_examples=60)
    def probe(pool):
        nonlocal seen_empty_pool, seen_large_pool
        n = pool[0].numel()
        seen_empty_pool |= n == 0
        seen_large_pool |= n > 1000
        seen_kinds.add(tuple(sorted(set(pool[0].clamp(-1, 1).tolist()))))

    probe()
    assert seen_empty_pool and seen_large_pool
    assert (-1, 0, 1) in seen_kinds  # a full mix of ignored, negative and positive was drawn


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(pytest.main([__file__, "-q"]))
