"""The mmdetection convention's parts against mmdetection's own on identical inputs: anchors,
RoI levels and features, box coding, batched NMS, PAFPN, initialisation, backbone batch norm."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from libra_rcnn.engine.convert_mmdet import mmdet_to_ours
from libra_rcnn.models import build_model, libra_model_config
from libra_rcnn.models.anchors import mmdet_retinanet_anchor_generator, mmdet_rpn_anchor_generator
from libra_rcnn.models.backbone import build_resnet
from libra_rcnn.models.box_coder import MMDetBoxCoder, mmdet_batched_nms
from libra_rcnn.models.roi_align import MMDetMultiScaleRoIAlign, mmdet_roi_levels
from libra_rcnn.ops import PAFPN, BalancedFeaturePyramid
from mmdet_oracle import build_model as build_mmdet_model, load_config

# Every test here needs mmdetection as the oracle: without it the ``mmdet`` fixture skips them
# with mmdet_oracle.SKIP_REASON ("pip install -e .[parity]").
pytestmark = pytest.mark.usefixtures("mmdet")

# feature sizes of an 800 x 1216 input (P2-P7) and of odd sizes that do not halve exactly
FEATURE_SIZES = [(200, 304), (100, 152), (50, 76), (25, 38), (13, 19), (7, 10)]
ODD_SIZES = [(37, 51), (19, 26), (10, 13), (5, 7), (3, 4), (2, 2)]


def _image_list(height: int, width: int):
    from torchvision.models.detection.image_list import ImageList

    return ImageList(torch.zeros(1, 3, height, width), [(height, width)])


@pytest.mark.parametrize("family", ["rpn", "retinanet"])
@pytest.mark.parametrize("sizes", [FEATURE_SIZES, ODD_SIZES])
def test_anchors_are_mmdetections(mmdet, family, sizes):
    if family == "rpn":
        cfg, ours, levels = (load_config("libra-faster-rcnn_r50_fpn_1x_coco.py").model.rpn_head,
                             mmdet_rpn_anchor_generator(), sizes[:5])
    else:
        cfg, ours, levels = (load_config("libra-retinanet_r50_fpn_1x_coco.py").model.bbox_head,
                             mmdet_retinanet_anchor_generator(), sizes[1:])
    reference = mmdet.TASK_UTILS.build(cfg.anchor_generator)
    expected = torch.cat(reference.grid_priors(levels, device="cpu"))
    features = [torch.zeros(1, 1, h, w) for h, w in levels]
    got = ours(_image_list(levels[0][0] * ours.strides[0], levels[0][1] * ours.strides[0]),
               features)[0]
    assert torch.equal(got, expected)


def _rois(seed: int, count: int = 500) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    xy = torch.rand(count, 2, generator=g) * 700
    wh = torch.exp(torch.rand(count, 2, generator=g) * 6)  # 1 .. 400 px
    # sizes right at the level edges: sqrt(area) of 112, 224 and 448 (= 56 * 2^k)
    edges = torch.tensor([[112.0, 112.0], [224.0, 224.0], [448.0, 448.0], [111.99, 112.0]])
    boxes = torch.cat([torch.cat([xy, xy + wh], dim=1),
                       torch.cat([torch.full((4, 2), 5.0), 5.0 + edges], dim=1)])
    image_index = torch.randint(2, (len(boxes), 1), generator=g).float()
    return torch.cat([image_index, boxes], dim=1)


def test_roi_levels_and_features_are_mmdetections(mmdet):
    cfg = load_config("libra-faster-rcnn_r50_fpn_1x_coco.py").model.roi_head.bbox_roi_extractor
    reference = mmdet.MODELS.build(cfg)
    rois = _rois(seed=0)
    assert torch.equal(mmdet_roi_levels(rois, 4), reference.map_roi_levels(rois, 4))
    g = torch.Generator().manual_seed(1)
    feats = [torch.randn(2, 256, 800 // s, 1216 // s, generator=g) for s in (4, 8, 16, 32)]
    ours = MMDetMultiScaleRoIAlign(["0", "1", "2", "3"])
    boxes = [rois[rois[:, 0] == i, 1:] for i in range(2)]
    got = ours(dict(zip("0123", feats)), boxes, [(800, 1216)] * 2)
    ordered = torch.cat([rois[rois[:, 0] == i] for i in range(2)])  # ours: image by image
    torch.testing.assert_close(got, reference(feats, ordered), rtol=0, atol=0)


def test_box_coding_is_mmdetections(mmdet):
    coder_cfg = load_config("libra-faster-rcnn_r50_fpn_1x_coco.py").model.roi_head.bbox_head.bbox_coder
    reference = mmdet.TASK_UTILS.build(coder_cfg)
    ours = MMDetBoxCoder((10.0, 10.0, 5.0, 5.0))
    g = torch.Generator().manual_seed(2)
    proposals = _rois(seed=3)[:, 1:]
    gts = proposals + 20 * torch.randn(proposals.shape, generator=g)
    gts = torch.cat([gts[:, :2].minimum(gts[:, 2:]), gts[:, :2].maximum(gts[:, 2:]) + 1], dim=1)
    torch.testing.assert_close(ours.encode_single(gts, proposals),
                               reference.encode(proposals, gts), rtol=0, atol=0)
    # deltas far beyond the clamp on both sides, for 80 classes at once
    deltas = 3 * torch.randn(len(proposals), 320, generator=g)
    deltas[:7, 2::4] = torch.tensor([-50.0, -10.0, -4.2, 0.0, 4.2, 10.0, 50.0])[:, None]
    decoded = ours.decode_single(deltas, proposals)
    decoded[:, 0::2] = decoded[:, 0::2].clamp(0, 1216)
    decoded[:, 1::2] = decoded[:, 1::2].clamp(0, 800)
    torch.testing.assert_close(decoded, reference.decode(proposals, deltas, max_shape=(800, 1216)),
                               rtol=0, atol=0)


@pytest.mark.parametrize("count", [3000, 12000])  # mmdetection splits by class from 10000 boxes
def test_batched_nms_is_mmdetections(count):
    from mmcv.ops import batched_nms

    g = torch.Generator().manual_seed(count)
    xy = torch.rand(count, 2, generator=g) * 600
    boxes = torch.cat([xy, xy + 10 + 90 * torch.rand(count, 2, generator=g)], dim=1)
    scores = torch.rand(count, generator=g)
    labels = torch.randint(20, (count,), generator=g)
    _, expected = batched_nms(boxes, scores, labels, {"type": "nms", "iou_threshold": 0.5})
    assert torch.equal(mmdet_batched_nms(boxes, scores, labels, 0.5), expected)


def test_pafpn_chains_through_the_sums_as_mmdetection(mmdet):
    reference = mmdet.MODELS.build(dict(type="PAFPN", in_channels=[16, 32, 64, 128],
                                        out_channels=8, num_outs=5)).eval()
    ours = PAFPN([16, 32, 64, 128], 8, bottom_up="sums",
                 extra_blocks=__import__("torchvision").ops.feature_pyramid_network.LastLevelMaxPool())
    cfg = libra_model_config("faster_rcnn", "resnet18", neck="pafpn", convention="mmdet")
    converted, unknown = mmdet_to_ours({f"neck.{k}": v for k, v in reference.state_dict().items()},
                                       cfg)
    assert not unknown
    ours.load_state_dict({k[len("backbone.fpn."):]: v for k, v in converted.items()})
    g = torch.Generator().manual_seed(4)
    inputs = [torch.randn(1, c, 64 // 2**i, 96 // 2**i, generator=g) for i, c in enumerate([16, 32, 64, 128])]
    got = list(ours(dict(zip("0123", inputs))).values())
    for a, b in zip(got, reference(tuple(inputs))):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    # the paper's chain (through the convolved outputs) is a different network function
    ours.bottom_up = "outputs"
    assert not torch.allclose(list(ours(dict(zip("0123", inputs))).values())[2], got[2])


def _std_ratio(ours: torch.Tensor, reference: torch.Tensor) -> float:
    return float(ours.std() / reference.std())


def test_initialisation_draws_from_mmdetections_distributions(mmdet):
    reference = build_mmdet_model("libra-faster-rcnn_r50_fpn_1x_coco.py").state_dict()
    torch.manual_seed(0)
    ours = build_model(libra_model_config("faster_rcnn", settings="mmdet")).state_dict()
    pairs = {  # FPN: Xavier; box head: Xavier, N(0, 0.01), N(0, 0.001)
        "backbone.fpn.inner_blocks.1.0.weight": "neck.0.lateral_convs.1.conv.weight",
        "backbone.fpn.inner_blocks.3.0.weight": "neck.0.lateral_convs.3.conv.weight",
        "backbone.fpn.layer_blocks.0.0.weight": "neck.0.fpn_convs.0.conv.weight",
        "roi_heads.box_head.fc6.weight": "roi_head.bbox_head.shared_fcs.0.weight",
        "roi_heads.box_head.fc7.weight": "roi_head.bbox_head.shared_fcs.1.weight",
        "roi_heads.box_predictor.cls_score.weight": "roi_head.bbox_head.fc_cls.weight",
        "roi_heads.box_predictor.bbox_pred.weight": "roi_head.bbox_head.fc_reg.weight",
        "rpn.head.conv.0.0.weight": "rpn_head.rpn_conv.weight",
        "backbone.bfp.refine.g.weight": "neck.1.refine.g.conv.weight",
    }
    for ours_key, reference_key in pairs.items():
        assert abs(_std_ratio(ours[ours_key], reference[reference_key]) - 1) < 0.05, ours_key
        assert ours[ours_key].abs().max() <= 1.5 * reference[reference_key].abs().max(), ours_key
    assert not ours["backbone.bfp.refine.conv_out.weight"].any()  # the block starts as identity
    # the conv refinement of the pyramid: Kaiming normal, fan-out
    reference_bfp = mmdet.MODELS.build(dict(type="BFP", in_channels=256, num_levels=5,
                                            refine_level=2, refine_type="conv"))
    reference_bfp.init_weights()
    ours_bfp = BalancedFeaturePyramid(256, 5, refine_level=2, refine_type="conv")
    assert abs(_std_ratio(ours_bfp.refine[0].weight, reference_bfp.refine.conv.weight) - 1) < 0.05


def test_backbone_norm_and_freezing_are_mmdetections(mmdet):
    cfg = load_config("libra-faster-rcnn_r50_fpn_1x_coco.py").model.backbone
    cfg.init_cfg = None
    reference = mmdet.MODELS.build(cfg)
    reference.init_weights()
    ours = build_resnet("resnet50", norm="frozen_stats_bn", trainable_layers=3)
    ours.load_state_dict({k: v for k, v in reference.state_dict().items()}, strict=False)
    trainable = {name for name, p in ours.named_parameters() if p.requires_grad}
    expected = {name for name, p in reference.named_parameters() if p.requires_grad}
    assert trainable == expected  # stem and stage 1 frozen, BN affine trained elsewhere
    assert any(".bn1.weight" in name for name in trainable)
    # training mode never touches the statistics, in either
    reference.train()
    ours.train()
    before = {k: v.clone() for k, v in ours.state_dict().items() if "running" in k}
    x = torch.randn(2, 3, 64, 64)
    out = ours.layer2(ours.layer1(ours.maxpool(ours.relu(ours.bn1(ours.conv1(x))))))
    out.mean().backward()
    assert all(torch.equal(before[k], v) for k, v in ours.state_dict().items() if "running" in k)
    assert ours.layer2[0].bn3.weight.grad.abs().sum() > 0  # (mmdetection zero-inits bn3)
    torch.testing.assert_close(out, reference(x)[1], rtol=1e-5, atol=1e-5)
    assert not any(isinstance(m, nn.BatchNorm2d) and m.training for m in ours.modules())
