"""Detector tests: training/inference contract for every architecture, fidelity to torchvision with
the Libra switches off, and the effect of each switch (sampler, box loss)."""

from __future__ import annotations

import dataclasses
import inspect
import math

import pytest
import torch
from torch import nn
import torchvision
from torchvision.models.detection import FasterRCNN, RetinaNet
from torchvision.models.detection._utils import BoxCoder
from torchvision.models.detection.backbone_utils import BackboneWithFPN
from torchvision.models.detection.faster_rcnn import FastRCNNPredictor, TwoMLPHead
from torchvision.models.detection.image_list import ImageList
from torchvision.models.detection.rpn import RPNHead
from torchvision.ops import FrozenBatchNorm2d, MultiScaleRoIAlign, box_iou
from torchvision.ops.feature_pyramid_network import LastLevelP6P7

from libra_rcnn.models import (
    ARCHS,
    AnchorSampling,
    BoxLossConfig,
    DetectionSettings,
    LibraCascadeRCNN,
    LibraFastRCNN,
    LibraFasterRCNN,
    LibraRegionProposalNetwork,
    LibraRetinaNet,
    LibraRoIHeads,
    LibraRPN,
    ModelConfig,
    ProposalSettings,
    SamplerConfig,
    TorchvisionConvention,
    baseline_model_config,
    build_model,
    libra_model_config,
)
from libra_rcnn.models.builders import used_settings
from libra_rcnn.models.anchors import torchvision_rpn_anchor_generator
from libra_rcnn.models.faster_rcnn import box_head_and_predictor
from libra_rcnn.ops.balanced_feature_pyramid import BalancedFeaturePyramid
from libra_rcnn.ops.balanced_l1_loss import balanced_l1_loss

NUM_CLASSES = 5
CHANNELS = 32
# CPU-sized settings; every other field keeps the paper's default.
SMALL = dict(
    num_classes=NUM_CLASSES,
    min_size=64,
    max_size=96,
    fpn_channels=CHANNELS,
    representation_size=64,
    rpn_pre_nms_top_n_train=100,
    rpn_post_nms_top_n_train=60,
    rpn_pre_nms_top_n_test=100,
    rpn_post_nms_top_n_test=60,
    roi_sampler={"num": 32},
)


def _small(arch):
    """SMALL without the settings ``arch`` does not use (the builders refuse those)."""
    return used_settings(arch, SMALL)
MODEL_CLASSES = {"faster_rcnn": LibraFasterRCNN, "retinanet": LibraRetinaNet, "rpn": LibraRPN,
                 "fast_rcnn": LibraFastRCNN, "cascade_rcnn": LibraCascadeRCNN}


def _images(seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.rand(3, 64, 80, generator=g), torch.rand(3, 72, 56, generator=g)]


def _targets():
    # image 1 has no boxes: background-only images must train too
    return [
        {"boxes": torch.tensor([[5.0, 6.0, 40.0, 50.0], [20.0, 10.0, 70.0, 40.0]]),
         "labels": torch.tensor([1, 3])},
        {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.int64)},
    ]


def _proposals():
    # original image coordinates, with a score column for image 0
    return [torch.tensor([[0.0, 0.0, 30.0, 30.0, 0.9], [10.0, 10.0, 50.0, 45.0, 0.5],
                          [4.0, 8.0, 42.0, 47.0, 0.4]]),
            torch.tensor([[1.0, 2.0, 20.0, 30.0], [5.0, 5.0, 50.0, 60.0]])]


# ---------------------------------------------------------------------------------------------
# contract: every architecture, baseline and Libra


@pytest.mark.parametrize("libra", [False, True], ids=["baseline", "libra"])
@pytest.mark.parametrize("arch", ARCHS)
def test_train_backward_and_eval_contract(arch, libra):
    make_config = libra_model_config if libra else baseline_model_config
    model = build_model(make_config(arch, "resnet18", **_small(arch)), generator=torch.Generator().manual_seed(0))
    assert isinstance(model, MODEL_CLASSES[arch])
    assert (model.backbone.bfp is not None) == libra
    extra = {"proposals": _proposals()} if arch == "fast_rcnn" else {}

    model.train()
    losses = model(_images(), _targets(), **extra)
    expected_keys = {
        "faster_rcnn": {"loss_classifier", "loss_box_reg", "loss_objectness", "loss_rpn_box_reg"},
        "fast_rcnn": {"loss_classifier", "loss_box_reg"},
        "rpn": {"loss_objectness", "loss_rpn_box_reg"},
        "retinanet": {"classification", "bbox_regression"},
        "cascade_rcnn": {"loss_objectness", "loss_rpn_box_reg", "s0.loss_classifier",
                         "s0.loss_box_reg", "s1.loss_classifier", "s1.loss_box_reg",
                         "s2.loss_classifier", "s2.loss_box_reg"},
    }[arch]
    assert set(losses) == expected_keys
    for name, value in losses.items():
        assert value.dim() == 0 and torch.isfinite(value), name
    sum(losses.values()).backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert all(g is not None for g in grads[-4:])  # heads receive gradients
    assert any(g is not None and g.abs().sum() > 0 for g in grads)

    model.eval()
    with torch.no_grad():
        outputs = model(_images(), **extra)
    assert len(outputs) == 2
    keys = {"boxes", "scores"} if arch == "rpn" else {"boxes", "scores", "labels"}
    for out, image in zip(outputs, _images()):
        assert set(out) == keys
        boxes = out["boxes"]
        assert boxes.dim() == 2 and boxes.shape[1] == 4 and out["scores"].shape == boxes.shape[:1]
        if boxes.numel():  # in original image coordinates
            assert boxes[:, 2].max() <= image.shape[2] + 1e-3 and boxes[:, 3].max() <= image.shape[1] + 1e-3
        if "labels" in out:
            assert out["labels"].dtype == torch.int64
            assert ((out["labels"] >= 1) & (out["labels"] < NUM_CLASSES)).all()
    if arch == "rpn":
        assert all(o["boxes"].shape[0] > 0 for o in outputs)
        assert all((o["scores"][:-1] >= o["scores"][1:]).all() for o in outputs)


def test_libra_switches_reach_the_modules():
    frcnn = build_model(libra_model_config("faster_rcnn", "resnet18", **SMALL))
    assert isinstance(frcnn.backbone.bfp, BalancedFeaturePyramid)
    assert (frcnn.backbone.bfp.num_levels, frcnn.backbone.bfp.refine_level) == (5, 2)
    assert frcnn.backbone.bfp.refine_type == "non_local"
    assert frcnn.rpn.neg_pos_ub == 5.0
    assert frcnn.roi_heads.sampler.pos_balance and frcnn.roi_heads.sampler.neg_balance
    assert frcnn.roi_heads.sampler.num == 32  # the dict override kept the Libra sampler fields
    assert frcnn.roi_heads.box_loss == BoxLossConfig("balanced_l1", beta=1.0, alpha=0.5, gamma=1.5)

    retina = build_model(libra_model_config("retinanet", "resnet18", **_small("retinanet")))
    assert retina.backbone.bfp.refine_level == 1
    assert retina.head.regression_head.box_loss.kind == "balanced_l1"
    assert retina.head.regression_head.box_loss.beta == pytest.approx(0.11)


# ---------------------------------------------------------------------------------------------
# fidelity: switches off == torchvision


def _randomize_(model, seed):
    """Non-trivial FrozenBatchNorm statistics and affine terms, reproducibly (convolutions keep
    their random initialisation); scales stay moderate so activations stay in range."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, FrozenBatchNorm2d):
                n = module.weight.numel()
                module.weight.copy_(0.2 + 0.3 * torch.rand(n, generator=g))
                module.bias.copy_(0.1 * torch.randn(n, generator=g))
                module.running_mean.copy_(0.1 * torch.randn(n, generator=g))
                module.running_var.copy_(0.5 + torch.rand(n, generator=g))


def _torchvision_body():
    return torchvision.models.resnet18(norm_layer=FrozenBatchNorm2d)


def _torchvision_faster_rcnn():
    backbone = BackboneWithFPN(_torchvision_body(), {f"layer{k}": str(k - 1) for k in range(1, 5)},
                               [64, 128, 256, 512], CHANNELS)
    return FasterRCNN(
        backbone, num_classes=None, min_size=64, max_size=96,
        rpn_pre_nms_top_n_test=100, rpn_post_nms_top_n_test=60,
        box_head=TwoMLPHead(CHANNELS * 49, 64), box_predictor=FastRCNNPredictor(64, NUM_CLASSES),
        box_score_thresh=0.0,
    )


def _assert_same_detections(ours, theirs):
    assert len(ours) == len(theirs)
    for a, b in zip(ours, theirs):
        assert a["boxes"].shape[0] > 0
        for key in ("boxes", "scores", "labels"):
            torch.testing.assert_close(a[key], b[key], rtol=1e-5, atol=1e-4)


def test_faster_rcnn_matches_torchvision_and_loads_its_state_dict():
    reference = _torchvision_faster_rcnn()
    _randomize_(reference, seed=1)
    ours = build_model(baseline_model_config("faster_rcnn", "resnet18", box_score_thresh=0.0, **SMALL))
    ours.load_state_dict(reference.state_dict())  # strict: identical parameter names
    reference.eval()
    ours.eval()
    with torch.no_grad():
        _assert_same_detections(ours(_images()), reference(_images()))

    libra = build_model(libra_model_config("faster_rcnn", "resnet18", **SMALL))
    result = libra.load_state_dict(reference.state_dict(), strict=False)
    bfp_keys = sorted(k for k in libra.state_dict() if k.startswith("backbone.bfp."))
    assert bfp_keys and sorted(result.missing_keys) == bfp_keys
    assert result.unexpected_keys == []


def test_retinanet_matches_torchvision_in_eval_and_losses():
    backbone = BackboneWithFPN(_torchvision_body(), {"layer2": "0", "layer3": "1", "layer4": "2"},
                               [128, 256, 512], CHANNELS, extra_blocks=LastLevelP6P7(512, CHANNELS))
    reference = RetinaNet(backbone, NUM_CLASSES, min_size=64, max_size=96, score_thresh=0.0,
                          detections_per_img=100)
    _randomize_(reference, seed=2)
    ours = build_model(baseline_model_config("retinanet", "resnet18", box_score_thresh=0.0, **_small("retinanet")))
    ours.load_state_dict(reference.state_dict())
    reference.eval()
    ours.eval()
    with torch.no_grad():
        _assert_same_detections(ours(_images()), reference(_images()))

    # no sampling in RetinaNet: with the L1 box loss the training losses agree as well
    reference.train()
    ours.train()
    expected = reference(_images(), _targets())
    got = ours(_images(), _targets())
    assert set(got) == set(expected)
    for key in expected:
        torch.testing.assert_close(got[key], expected[key], rtol=1e-5, atol=1e-6)
    assert expected["bbox_regression"] > 0


@pytest.mark.parametrize("variant", ["v1", "v2"])
def test_torchvisions_own_retinanets_load_and_give_its_detections(variant):
    # torchvision's v1 model builds P6 from P5 (LastLevelP6P7(256, 256)); v2 from C5, with group
    # norm in the head. Each loads strictly into ours with the matching settings.
    from torchvision.models.detection import retinanet_resnet50_fpn, retinanet_resnet50_fpn_v2

    make = retinanet_resnet50_fpn if variant == "v1" else retinanet_resnet50_fpn_v2
    torch.manual_seed(5)
    reference = make(weights=None, weights_backbone=None, num_classes=NUM_CLASSES, min_size=64,
                     max_size=96, score_thresh=0.0, detections_per_img=100)
    with torch.no_grad():  # the BatchNorm statistics of a trained model, not the identity
        g = torch.Generator().manual_seed(6)
        for module in reference.modules():
            if isinstance(module, nn.BatchNorm2d):
                module.running_mean.copy_(0.1 * torch.randn(module.num_features, generator=g))
                module.running_var.copy_(0.5 + torch.rand(module.num_features, generator=g))
    extra = {"retina_p6_input": "p5"} if variant == "v1" else {"retina_head_norm": "gn"}
    # norm "bn": the same BatchNorm2d arithmetic (frozen_bn would differ by float rounding)
    ours = build_model(baseline_model_config("retinanet", "resnet50", num_classes=NUM_CLASSES,
                                             min_size=64, max_size=96, box_score_thresh=0.0,
                                             norm="bn", **extra))
    ours.load_state_dict(reference.state_dict())
    reference.eval()
    ours.eval()
    with torch.no_grad():
        _assert_same_detections(ours(_images()), reference(_images()))


def test_retinanet_balanced_l1_box_loss_is_recomputed_exactly():
    cfg = libra_model_config("retinanet", "resnet18", **_small("retinanet"))
    model = build_model(cfg).train()
    head = model.head.regression_head
    g = torch.Generator().manual_seed(3)
    num_anchors = 50
    anchors = [torch.tensor([[0.0, 0.0, 20.0, 20.0]]).repeat(num_anchors, 1) + torch.rand(num_anchors, 4, generator=g) * 10
               for _ in range(2)]
    deltas = torch.randn(2, num_anchors, 4, generator=g)
    matched = [torch.randint(-2, 2, (num_anchors,), generator=g) for _ in range(2)]
    targets = [{"boxes": torch.tensor([[2.0, 3.0, 25.0, 30.0], [8.0, 1.0, 33.0, 22.0]])} for _ in range(2)]
    loss = head.compute_loss(targets, {"bbox_regression": deltas}, anchors, matched)

    coder = BoxCoder((1.0, 1.0, 1.0, 1.0))
    per_image = []
    for i in range(2):
        fg = matched[i] >= 0
        encoded = coder.encode_single(targets[i]["boxes"][matched[i][fg]], anchors[i][fg])
        per_image.append(balanced_l1_loss(deltas[i][fg], encoded, beta=0.11, reduction="sum") / max(1, int(fg.sum())))
    torch.testing.assert_close(loss, sum(per_image) / 2)


# ---------------------------------------------------------------------------------------------
# RoI heads: sampler and box loss switches


IMAGE_SIZE = (200, 200)


def _roi_heads(sampler, box_loss=None, seed=0):
    torch.manual_seed(0)  # identical head weights for every variant
    head, predictor = box_head_and_predictor(CHANNELS, NUM_CLASSES, 64)
    pool = MultiScaleRoIAlign(["0", "1", "2", "3"], output_size=7, sampling_ratio=2)
    return LibraRoIHeads(pool, head, predictor, sampler=sampler, box_loss=box_loss,
                         generator=torch.Generator().manual_seed(seed))


def _roi_problem(seed=0):
    """One 200x200 image, 2 ground truths, many far-away proposals and a few near ones."""
    g = torch.Generator().manual_seed(seed)
    gt = torch.tensor([[20.0, 20.0, 80.0, 80.0], [110.0, 120.0, 170.0, 190.0]])
    xy = torch.rand(1500, 2, generator=g) * 170
    wh = 5 + torch.rand(1500, 2, generator=g) * 25
    far = torch.cat([xy, (xy + wh).clamp(max=200)], dim=1)
    near = gt[torch.randint(0, 2, (300,), generator=g)] + torch.randn(300, 4, generator=g) * 18
    near = torch.cat([near[:, :2], torch.maximum(near[:, 2:], near[:, :2] + 4)], dim=1)
    proposals = [torch.cat([far, near])]
    targets = [{"boxes": gt, "labels": torch.tensor([1, 2])}]
    features = {str(k): torch.randn(1, CHANNELS, 200 // 2 ** (k + 2), 200 // 2 ** (k + 2), generator=g)
                for k in range(4)}
    return features, proposals, targets


def _sampled_negative_ious(heads, proposals, targets):
    props, _, labels, _ = heads.select_training_samples(proposals, targets)
    negatives = props[0][labels[0] == 0]
    return box_iou(negatives, targets[0]["boxes"]).max(dim=1).values, labels[0]


def test_iou_balanced_negatives_are_harder_than_random():
    _, proposals, targets = _roi_problem()
    random_heads = _roi_heads(SamplerConfig(num=128))
    balanced_heads = _roi_heads(SamplerConfig(num=128, neg_balance=True))
    random_heads.train()
    balanced_heads.train()
    random_ious, random_labels = _sampled_negative_ious(random_heads, proposals, targets)
    balanced_ious, balanced_labels = _sampled_negative_ious(balanced_heads, proposals, targets)
    assert (random_labels == 0).sum() == (balanced_labels == 0).sum() > 90
    # Eq. 2 spreads the negatives over 3 IoU bins of [0, 0.5): far more of them overlap a gt
    assert balanced_ious.mean() > random_ious.mean() + 0.1
    assert (balanced_ious > 0.05).float().mean() > (random_ious > 0.05).float().mean() + 0.3


def test_instance_balanced_positives_even_out_ground_truths():
    g = torch.Generator().manual_seed(5)
    gt = torch.tensor([[20.0, 20.0, 80.0, 80.0], [110.0, 120.0, 170.0, 190.0]])
    # 200 good proposals for gt 0, only 12 for gt 1
    jitter = lambda n: torch.randn(n, 4, generator=g) * 2.0  # noqa: E731
    proposals = [torch.cat([gt[0] + jitter(200), gt[1] + jitter(12)])]
    targets = [{"boxes": gt, "labels": torch.tensor([1, 2])}]
    counts = {}
    for pos_balance in (False, True):
        heads = _roi_heads(SamplerConfig(num=64, pos_fraction=0.5, add_gt_as_proposals=False,
                                         pos_balance=pos_balance)).train()
        _, matched, labels, _ = heads.select_training_samples(proposals, targets)
        positives = matched[0][labels[0] > 0]
        assert positives.numel() == 32
        counts[pos_balance] = int((positives == 1).sum())
    assert counts[True] == 12  # every positive of the rare instance
    assert counts[False] < 8


def _encode(gt, boxes, weights=(10.0, 10.0, 5.0, 5.0)):
    """Faster R-CNN's box deltas of ``gt`` relative to ``boxes`` (centre offsets over width and
    height, log size ratios), each scaled by its weight."""
    wx, wy, ww, wh = weights
    pw, ph = boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]
    gw, gh = gt[:, 2] - gt[:, 0], gt[:, 3] - gt[:, 1]
    dx = wx * ((gt[:, 0] + 0.5 * gw) - (boxes[:, 0] + 0.5 * pw)) / pw
    dy = wy * ((gt[:, 1] + 0.5 * gh) - (boxes[:, 1] + 0.5 * ph)) / ph
    return torch.stack([dx, dy, ww * torch.log(gw / pw), wh * torch.log(gh / ph)], dim=1)


def _elementwise_box_loss(kind, x, *, alpha=0.5, gamma=1.5):
    """The loss of a regression error ``x`` at inlier threshold 1, written out: L1; smooth L1;
    balanced L1 (Eq. 8: alpha / b (b|x| + 1) ln(b|x| + 1) - alpha|x| below 1,
    gamma|x| + gamma / b - alpha above, with b = e^(gamma / alpha) - 1)."""
    x = x.abs()
    if kind == "l1":
        return x
    if kind == "smooth_l1":
        return torch.where(x < 1.0, 0.5 * x**2, x - 0.5)
    b = math.exp(gamma / alpha) - 1
    return torch.where(x < 1.0, alpha / b * (b * x + 1) * torch.log(b * x + 1) - alpha * x,
                       gamma * x + gamma / b - alpha)


@pytest.mark.parametrize("kind", ["balanced_l1", "smooth_l1", "l1"])
def test_roi_losses_from_first_principles(kind):
    """Few enough proposals that the sampler takes every one (6 positives, the two ground
    truths included, under the 16 allowed; 7 negatives under the 58 left), far from the 0.5 IoU
    threshold, so the sample and its labels are known by construction."""
    gt = torch.tensor([[20.0, 20.0, 80.0, 80.0], [110.0, 120.0, 170.0, 190.0]])
    positives = torch.tensor([[22.0, 17.0, 81.0, 82.0], [16.0, 22.0, 77.0, 84.0],
                              [113.0, 123.0, 168.0, 186.0], [105.0, 122.0, 174.0, 189.0]])
    negatives = torch.tensor([[0.0, 0.0, 30.0, 30.0], [50.0, 50.0, 110.0, 110.0],
                              [140.0, 10.0, 190.0, 60.0], [0.0, 150.0, 40.0, 199.0],
                              [100.0, 100.0, 200.0, 200.0], [20.0, 20.0, 45.0, 80.0],
                              [60.0, 60.0, 130.0, 140.0]])
    matched_gt = torch.tensor([0, 0, 1, 1])
    assert (box_iou(positives, gt)[range(4), matched_gt] > 0.75).all()
    assert (box_iou(negatives, gt) < 0.45).all()
    g = torch.Generator().manual_seed(1)
    features = {str(k): torch.randn(1, CHANNELS, 200 // 2 ** (k + 2), 200 // 2 ** (k + 2),
                                    generator=g) for k in range(4)}
    targets = [{"boxes": gt, "labels": torch.tensor([1, 2])}]
    box_loss = BoxLossConfig(kind=kind, beta=1.0, alpha=0.5, gamma=1.5, loss_weight=2.0)
    sampler = SamplerConfig(num=64, pos_balance=True, neg_balance=True)
    heads = _roi_heads(sampler, box_loss, seed=11).train()
    _, losses = heads(features, [torch.cat([negatives, positives])], [IMAGE_SIZE], targets)

    # every RoI: the positives, the ground truths (added as proposals), the negatives
    rois = torch.cat([positives, gt, negatives])
    labels = torch.tensor([1, 1, 2, 2, 1, 2] + [0] * 7)
    with torch.no_grad():
        pooled = heads.box_roi_pool(features, [rois], [IMAGE_SIZE])
        logits, deltas = heads.box_predictor(heads.box_head(pooled))
    num_pos = 6
    pred = deltas.reshape(len(rois), NUM_CLASSES, 4)[range(num_pos), labels[:num_pos]]
    reg_targets = _encode(gt[torch.cat([matched_gt, torch.tensor([0, 1])])], rois[:num_pos])
    expected_box = 2.0 * _elementwise_box_loss(kind, pred - reg_targets).sum() / len(rois)
    expected_cls = -torch.log_softmax(logits, dim=1)[range(len(rois)), labels].mean()
    torch.testing.assert_close(losses["loss_box_reg"].detach(), expected_box)
    torch.testing.assert_close(losses["loss_classifier"].detach(), expected_cls)


def test_balanced_l1_changes_the_roi_box_loss():
    features, proposals, targets = _roi_problem(seed=1)
    values = {}
    for kind in ("smooth_l1", "balanced_l1"):
        heads = _roi_heads(SamplerConfig(num=64), BoxLossConfig(kind=kind), seed=4).train()
        values[kind] = heads(features, proposals, [IMAGE_SIZE], targets)[1]["loss_box_reg"]
    assert not torch.isclose(values["smooth_l1"], values["balanced_l1"])


# ---------------------------------------------------------------------------------------------
# RPN: neg_pos_ub and the box loss


def _rpn(neg_pos_ub=-1.0, **kwargs):
    anchor_generator = torchvision_rpn_anchor_generator()
    return LibraRegionProposalNetwork(
        anchor_generator, RPNHead(CHANNELS, 3),
        proposals=ProposalSettings(pre_nms_top_n_train=100, pre_nms_top_n_test=100,
                                   post_nms_top_n_train=50, post_nms_top_n_test=50),
        sampling=AnchorSampling(neg_pos_ub=neg_pos_ub), **kwargs)


def test_rpn_neg_pos_ub_caps_negatives():
    labels = torch.zeros(2000)
    labels[:3] = 1.0
    labels[3:40] = -1.0
    for ub, expected_neg in ((-1.0, 256 - 3), (5.0, 15)):
        rpn = _rpn(neg_pos_ub=ub, generator=torch.Generator().manual_seed(0))
        pos, neg = rpn.subsample([labels, labels.clone()])
        assert [p.numel() for p in pos] == [3, 3]
        assert [n.numel() for n in neg] == [expected_neg, expected_neg]
        assert (labels[neg[0]] == 0).all() and (labels[pos[0]] == 1).all()


def test_rpn_losses_from_first_principles():
    """Labels chosen so that the sample is known without calling the sampler: image 0 has 20
    positives and 60 negatives, all within the budget (256 anchors, at most 128 positives and
    5 x 20 negatives), so every labelled anchor is sampled; image 1 has 3 positives and 40
    negatives, capped at 5 x 3 = 15, and its negatives share one logit, so the objectness loss
    does not depend on which 15 are drawn."""
    g = torch.Generator().manual_seed(6)
    sizes = [700, 500]
    counts = [(20, 60), (3, 40)]
    labels = []
    for size, (num_pos, num_neg) in zip(sizes, counts):
        order = torch.randperm(size, generator=g)
        image_labels = torch.full((size,), -1.0)
        image_labels[order[:num_pos]] = 1.0
        image_labels[order[num_pos:num_pos + num_neg]] = 0.0
        labels.append(image_labels)
    reg_targets = [torch.randn(n, 4, generator=g) * 0.3 for n in sizes]
    objectness = torch.randn(sum(sizes), 1, generator=g)
    shared_logit = 0.7
    objectness[sizes[0]:][labels[1] == 0] = shared_logit
    deltas = torch.randn(sum(sizes), 4, generator=g) * 0.3
    cfg = BoxLossConfig(kind="balanced_l1", alpha=0.5, gamma=1.5, beta=1.0)
    rpn = _rpn(box_loss=cfg, neg_pos_ub=5.0, generator=torch.Generator().manual_seed(9))
    loss_obj, loss_box = rpn.compute_loss(objectness, deltas, labels, reg_targets)

    all_labels, all_targets = torch.cat(labels), torch.cat(reg_targets)
    logits = objectness[:, 0]
    pos = all_labels == 1
    neg_0 = torch.zeros_like(pos)
    neg_0[:sizes[0]] = labels[0] == 0
    num_sampled = 20 + 60 + 3 + 15
    elementwise = _elementwise_box_loss("balanced_l1", deltas[pos] - all_targets[pos])
    torch.testing.assert_close(loss_box, elementwise.sum() / num_sampled)

    def bce(z, y):  # -[y log sigmoid(z) + (1 - y) log(1 - sigmoid(z))]
        return -(y * torch.log(torch.sigmoid(z)) + (1 - y) * torch.log(1 - torch.sigmoid(z)))

    expected_obj = (bce(logits[pos], 1.0).sum() + bce(logits[neg_0], 0.0).sum()
                    + 15 * bce(torch.tensor(shared_logit), 0.0)) / num_sampled
    torch.testing.assert_close(loss_obj, expected_obj)


def test_baseline_rpn_losses_are_torchvisions():
    """With every labelled anchor within the sampling budget (so both samplers take them all),
    the baseline RPN's losses are torchvision's RegionProposalNetwork's (smooth L1 at 1/9)."""
    from torchvision.models.detection.rpn import RegionProposalNetwork

    g = torch.Generator().manual_seed(4)
    labels = []
    for size in (300, 200):
        image_labels = torch.full((size,), -1.0)
        order = torch.randperm(size, generator=g)
        image_labels[order[:10]] = 1.0
        image_labels[order[10:90]] = 0.0
        labels.append(image_labels)
    reg_targets = [torch.randn(n, 4, generator=g) for n in (300, 200)]
    objectness = torch.randn(500, 1, generator=g)
    deltas = torch.randn(500, 4, generator=g)
    ours = build_model(baseline_model_config("faster_rcnn", "resnet18", **SMALL)).rpn
    reference = RegionProposalNetwork(ours.anchor_generator, ours.head, 0.7, 0.3, 256, 0.5,
                                      dict(training=100, testing=100),
                                      dict(training=50, testing=50), 0.7)
    for got, expected in zip(ours.compute_loss(objectness, deltas, labels, reg_targets),
                             reference.compute_loss(objectness, deltas, labels, reg_targets)):
        torch.testing.assert_close(got, expected)


def test_rpn_propose_keeps_scores_of_forward_boxes():
    rpn = _rpn().eval()
    g = torch.Generator().manual_seed(8)
    images = ImageList(torch.rand(1, 3, 64, 64, generator=g), [(64, 64)])
    features = {str(k): torch.randn(1, CHANNELS, 16 // 2**k, 16 // 2**k, generator=g) for k in range(5)}
    boxes, scores, losses = rpn.propose(images, features)
    forward_boxes, _ = rpn(images, features)
    assert losses == {}
    torch.testing.assert_close(boxes[0], forward_boxes[0])
    assert scores[0].shape == boxes[0].shape[:1] and ((scores[0] >= 0) & (scores[0] <= 1)).all()


# ---------------------------------------------------------------------------------------------
# Fast R-CNN proposal handling


def test_fast_rcnn_rescales_proposals_and_requires_them():
    model = build_model(baseline_model_config("fast_rcnn", "resnet18", **_small("fast_rcnn"))).eval()
    seen = {}

    def record_proposals(module, args):
        seen["proposals"] = args[1]  # roi_heads(features, proposals, image_shapes, targets)

    hook = model.roi_heads.register_forward_pre_hook(record_proposals)
    image = [torch.rand(3, 32, 40)]  # min_size 64 doubles it
    proposals = [torch.tensor([[2.0, 4.0, 20.0, 30.0, 0.7]])]
    with torch.no_grad():
        model(image, proposals=proposals)
    hook.remove()
    torch.testing.assert_close(seen["proposals"][0], torch.tensor([[4.0, 8.0, 40.0, 60.0]]))

    with pytest.raises(ValueError, match="precomputed proposals"):
        model(image)
    with pytest.raises(ValueError, match="image 0: proposal"):
        model(image, proposals=[torch.tensor([[2.0, 4.0, 1.0, 30.0]])])
    with pytest.raises(ValueError, match="one tensor per image"):
        model(image, proposals=proposals * 2)
    # proposals may also ride along in the targets
    model.train()
    target = [{"boxes": torch.tensor([[2.0, 3.0, 20.0, 25.0]]), "labels": torch.tensor([2]),
               "proposals": proposals[0]}]
    losses = model(image, target)
    assert set(losses) == {"loss_classifier", "loss_box_reg"}


def test_box_loss_config_errors_at_construction():
    with pytest.raises(ValueError, match="box_loss.kind"):
        _roi_heads(SamplerConfig(), BoxLossConfig(kind="giou"))
    with pytest.raises(ValueError, match="alpha"):
        _roi_heads(SamplerConfig(), BoxLossConfig(kind="balanced_l1", alpha=0.0))
    with pytest.raises(ValueError, match="roi_sampler.num_bins"):
        _roi_heads(dataclasses.replace(SamplerConfig(), num_bins=0))
    with pytest.raises(ValueError, match="rpn_neg_pos_ub"):
        _rpn(neg_pos_ub=-3.0)


def _signature_defaults(cls) -> dict:
    return {name: p.default for name, p in inspect.signature(cls).parameters.items()
            if p.default is not inspect.Parameter.empty}


def test_head_settings_defaults_are_model_configs_and_torchvisions():
    cfg = ModelConfig()
    proposals, sampling, detection = ProposalSettings(), AnchorSampling(), DetectionSettings()
    assert (proposals.pre_nms_top_n_train, proposals.pre_nms_top_n_test,
            proposals.post_nms_top_n_train, proposals.post_nms_top_n_test) == (
        cfg.rpn_pre_nms_top_n_train, cfg.rpn_pre_nms_top_n_test, cfg.rpn_post_nms_top_n_train,
        cfg.rpn_post_nms_top_n_test)
    assert (sampling.batch_size_per_image, sampling.positive_fraction, sampling.neg_pos_ub,
            sampling.allowed_border) == (cfg.rpn_batch_size_per_image, cfg.rpn_positive_fraction,
                                         cfg.rpn_neg_pos_ub, cfg.rpn_allowed_border)
    assert (detection.score_thresh, detection.nms_thresh, detection.detections_per_img) == (
        cfg.box_score_thresh, cfg.box_nms_thresh, cfg.box_detections_per_img)
    faster = _signature_defaults(FasterRCNN)
    assert (proposals.nms_thresh, proposals.score_thresh) == (faster["rpn_nms_thresh"],
                                                              faster["rpn_score_thresh"])
    assert (detection.score_thresh, detection.nms_thresh, detection.detections_per_img) == (
        faster["box_score_thresh"], faster["box_nms_thresh"], faster["box_detections_per_img"])
    retina = _signature_defaults(RetinaNet)  # its 300 detections per image are not the default
    assert (detection.score_thresh, detection.nms_thresh) == (retina["score_thresh"],
                                                              retina["nms_thresh"])
    assert _signature_defaults(LibraRetinaNet)["topk_candidates"] == retina["topk_candidates"]


def test_heads_without_box_parts_take_torchvisions():
    rpn = _rpn()
    pool = MultiScaleRoIAlign(["0"], output_size=7, sampling_ratio=2)
    roi_heads = LibraRoIHeads(pool, nn.Identity(), nn.Identity())
    expected = {"rpn": TorchvisionConvention().rpn_box_parts(),
                "roi": TorchvisionConvention().roi_box_parts()}
    for name, head in (("rpn", rpn), ("roi", roi_heads)):
        parts = expected[name]
        matcher = head.proposal_matcher
        assert (type(matcher), matcher.high_threshold, matcher.low_threshold,
                matcher.allow_low_quality_matches) == (
            type(parts.matcher), parts.matcher.high_threshold, parts.matcher.low_threshold,
            parts.matcher.allow_low_quality_matches)
        assert (type(head.box_coder), head.box_coder.weights) == (type(parts.box_coder),
                                                                  parts.box_coder.weights)
        assert head.batched_nms is parts.batched_nms
    assert rpn.proposal_matcher.high_threshold == 0.7
    assert roi_heads.box_coder.weights == (10, 10, 5, 5)
    boxes = torch.tensor([[0.0, 0.0, 5e-3, 5e-3], [0.0, 0.0, 2e-2, 2e-2], [0.0, 0.0, 1.0, 1.0]])
    assert rpn.box_filter(boxes).tolist() == [0, 1, 2]  # >= 1e-3 px
    assert roi_heads.box_filter(boxes).tolist() == [1, 2]  # >= 1e-2 px


@pytest.mark.parametrize("make, message", [
    (lambda: AnchorSampling(batch_size_per_image=0),
     r"^rpn_batch_size_per_image must be a positive int, got 0$"),
    (lambda: AnchorSampling(positive_fraction=1.5), r"^rpn_positive_fraction must lie in \[0, 1\]"),
    (lambda: AnchorSampling(allowed_border=-2.0),
     r"^rpn_allowed_border must be -1 \(every anchor\) or a number >= 0, got -2.0$"),
    (lambda: ProposalSettings(post_nms_top_n_test=0),
     r"^rpn_post_nms_top_n_test must be a positive int, got 0$"),
    (lambda: DetectionSettings(score_thresh=1.5),
     r"^box_score_thresh must lie in \[0, 1\], got 1.5$"),
    (lambda: DetectionSettings(detections_per_img=0),
     r"^box_detections_per_img must be a positive int, got 0$"),
])
def test_head_settings_are_checked_when_made(make, message):
    with pytest.raises(ValueError, match=message):
        make()
