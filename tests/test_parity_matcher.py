"""``MaxIoUMatcher`` against mmdetection's ``MaxIoUAssigner`` on identical IoU matrices."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torchvision.models.detection._utils import Matcher
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.rpn import RegionProposalNetwork
from torchvision.ops import box_iou

from libra_rcnn.models.matcher import MaxIoUMatcher

# Every test here needs mmdetection as the oracle: without it the ``mmdet`` fixture skips them
# with mmdet_oracle.SKIP_REASON ("pip install -e .[parity]").
pytestmark = pytest.mark.usefixtures("mmdet")

# (pos_iou_thr, neg_iou_thr, min_pos_iou, match_low_quality) of mmdetection's Libra configs
SETTINGS = {"rpn": (0.7, 0.3, 0.3, True), "retinanet": (0.5, 0.4, 0.0, True),
            "rcnn": (0.5, 0.5, 0.5, False)}


def _boxes(g: torch.Generator, n: int, size: float = 200.0, extent: float = 600.0):
    xy = torch.rand(n, 2, generator=g) * extent
    return torch.cat([xy, xy + 4 + size * torch.rand(n, 2, generator=g)], dim=1)


def _random_iou(seed: int, num_gts: int = 7, num_preds: int = 400):
    """IoUs of predictions (half jittered around the ground truths, half anywhere)."""
    g = torch.Generator().manual_seed(seed)
    gts = _boxes(g, num_gts)
    owner = torch.randint(num_gts, (num_preds // 2,), generator=g)
    near = gts[owner] + 40 * torch.randn(num_preds // 2, 4, generator=g)
    near = torch.cat([near[:, :2].minimum(near[:, 2:]), near[:, :2].maximum(near[:, 2:]) + 1], 1)
    return box_iou(gts, torch.cat([near, _boxes(g, num_preds - num_preds // 2)]))


def _adversarial_ious():
    """Named matrices that stress the low-quality step."""
    cases = {}
    # ties: duplicated predictions and a ground truth duplicated twice
    g = torch.Generator().manual_seed(1)
    gts = _boxes(g, 4)
    gts = torch.cat([gts, gts[1:2], gts[1:2]])
    preds = _boxes(g, 60)
    preds = torch.cat([preds, preds[:20], gts[2:3] + 3.0, gts[2:3] + 3.0])
    cases["ties"] = box_iou(gts, preds)
    # ground truths whose best IoU is below 0.3 (and 0.4, 0.5): only low-quality matches
    small = torch.tensor([[100.0, 100, 110, 110], [300, 300, 306, 330]])
    cases["weak_gts"] = box_iou(small, _boxes(torch.Generator().manual_seed(2), 80, 60, 400))
    # a ground truth that overlaps nothing (best IoU 0) next to a normal one
    far = torch.tensor([[5000.0, 5000, 5050, 5050], [50, 50, 150, 150]])
    cases["disjoint_gt"] = box_iou(far, _boxes(torch.Generator().manual_seed(3), 50, 150, 300))
    # quantised IoUs: many exact ties between ground truths and within rows
    q = torch.randint(0, 11, (6, 200), generator=torch.Generator().manual_seed(4)) / 10.0
    cases["quantised"] = q
    # one prediction that is the best of two ground truths (a later one must win)
    cases["shared_best"] = torch.tensor([[0.6, 0.2, 0.1], [0.6, 0.1, 0.55], [0.2, 0.25, 0.1]])
    cases["empty_gt"] = torch.zeros(0, 30)
    cases["one_pred"] = torch.tensor([[0.1], [0.2], [0.2]])
    return cases


def _mmdet_matches(iou: torch.Tensor, setting: str) -> torch.Tensor:
    """mmdetection's ``gt_inds`` (0 negative, -1 ignored, k >= 1 gt k - 1) in torchvision's
    encoding (-1 negative, -2 ignored, k gt index)."""
    from mmdet.models.task_modules.assigners import MaxIoUAssigner

    pos, neg, min_pos, low_quality = SETTINGS[setting]
    assigner = MaxIoUAssigner(pos_iou_thr=pos, neg_iou_thr=neg, min_pos_iou=min_pos,
                              match_low_quality=low_quality)
    gt_labels = torch.zeros(iou.shape[0], dtype=torch.long)
    gt_inds = assigner.assign_wrt_overlaps(iou.clone(), gt_labels).gt_inds
    return torch.where(gt_inds > 0, gt_inds - 1, torch.where(gt_inds == 0, -1, -2))


def _ours(setting: str) -> MaxIoUMatcher:
    pos, neg, min_pos, low_quality = SETTINGS[setting]
    return MaxIoUMatcher(pos, neg, allow_low_quality_matches=low_quality, min_pos_iou=min_pos)


@pytest.mark.parametrize("setting", SETTINGS)
@pytest.mark.parametrize("seed", range(4))
def test_random_matches_equal_mmdetection(mmdet, setting, seed):
    iou = _random_iou(seed)
    assert torch.equal(_ours(setting)(iou), _mmdet_matches(iou, setting))


@pytest.mark.parametrize("setting", SETTINGS)
@pytest.mark.parametrize("case", list(_adversarial_ious()))
def test_adversarial_matches_equal_mmdetection(mmdet, setting, case):
    iou = _adversarial_ious()[case]
    ours = _ours(setting)(iou)
    assert ours.dtype == torch.int64 and ours.shape == (iou.shape[1],)
    assert torch.equal(ours, _mmdet_matches(iou, setting))


def test_cases_separate_mmdetection_from_torchvision(mmdet):
    """torchvision's low-quality rule gives other answers on these inputs (so the tests above
    check the part that differs)."""
    cases = _adversarial_ious()
    for setting, case in [("rpn", "shared_best"), ("rpn", "weak_gts"), ("retinanet", "disjoint_gt"),
                          ("rpn", "ties")]:
        pos, neg, _, _ = SETTINGS[setting]
        iou = cases[case]
        torchvision_matches = Matcher(pos, neg, allow_low_quality_matches=True)(iou.clone())
        assert not torch.equal(torchvision_matches, _mmdet_matches(iou, setting)), (setting, case)
    # a disjoint ground truth with min_pos_iou 0 makes every IoU-0 prediction its positive
    matches = _ours("retinanet")(cases["disjoint_gt"])
    assert (matches[cases["disjoint_gt"][1] == 0] == 0).all()


def test_drops_into_torchvision_rpn(mmdet):
    """torchvision's RPN assigns anchors with the matcher it holds; with ours the labels are
    mmdetection's."""
    rpn = RegionProposalNetwork(AnchorGenerator(), nn.Identity(), 0.7, 0.3, 256, 0.5,
                                dict(training=10, testing=10), dict(training=10, testing=10), 0.7)
    rpn.proposal_matcher = _ours("rpn")
    g = torch.Generator().manual_seed(5)
    gts = _boxes(g, 5)
    anchors = torch.cat([_boxes(g, 300), gts[:2] + 2.0])
    labels, matched_boxes = rpn.assign_targets_to_anchors([anchors], [{"boxes": gts}])
    expected = _mmdet_matches(box_iou(gts, anchors), "rpn")
    # torchvision's RPN labels: 1 foreground, 0 background, -1 ignored
    expected_labels = torch.where(expected >= 0, 1.0, torch.where(expected == -1, 0.0, -1.0))
    assert torch.equal(labels[0], expected_labels)
    assert torch.equal(matched_boxes[0][expected >= 0], gts[expected[expected >= 0]])
