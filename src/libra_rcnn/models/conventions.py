"""The two conventions a detector can follow, as the parts that differ.

``ModelConfig.convention`` names one; :func:`convention_parts` returns the object that builds its
parts, and :func:`libra_rcnn.models.build_model` hands them to the detectors (each head's matcher,
box coder, small-box rule and batched NMS as one :class:`~.box_coder.BoxParts`; a head given
none takes torchvision's). Side by side:

======================  ==================================  ==================================
part                    ``"torchvision"``                   ``"mmdet"``
======================  ==================================  ==================================
transform               float bilinear resize, output size  uint8 OpenCV-exact bilinear resize
                        floored, normalise then resize      before normalising, size rounded
anchors                 rounded base anchors, strides       exact base anchors, fixed strides
                        ``padded size // grid size``        (4..64; RetinaNet 8..128)
RetinaNet P7            ``conv(relu(P6))``                  ``conv(P6)``
RoI features            RoIAlign, 2x2 samples, not aligned  RoIAlign, adaptive samples, aligned
box decoding            log-size deltas clamped above       clamped on both sides
RPN matching            low-quality matches: any IoU,       low-quality matches need IoU >= 0.3
                        the anchor's best ground truth      and go to that ground truth
RetinaNet matching      the same, any IoU                   the same, IoU >= 0
small boxes dropped     RPN < 1e-3 px, R-CNN < 1e-2 px      RPN and RetinaNet <= 0 px, R-CNN none
batched NMS             one NMS over offset boxes up to     the same up to 10000 boxes
                        1000 (CPU) / 5000 (CUDA) boxes
RetinaNet head          a logit per class and background,   a logit per foreground class,
                        losses normalised per image         normalised over the batch
PAFPN bottom-up path    through the convolved outputs       through the sums before the convs
initialisation          torchvision's                       mmdetection's (FPN Xavier, box head
                                                            Xavier / N(0, 0.01) / N(0, 0.001))
======================  ==================================  ==================================

The rest of a detector (sampling, losses, learning-rate schedule, backbone norm) is set by plain
``ModelConfig`` / ``TrainConfig`` values; the shipped ``*_coco`` and ``ablation/*`` configs set
mmdetection's, the torchvision-style builders torchvision's.
"""

from __future__ import annotations

from typing import Optional, Sequence

from torch import nn
from torchvision.models.detection._utils import BoxCoder, Matcher
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.transform import GeneralizedRCNNTransform
from torchvision.ops import MultiScaleRoIAlign
from torchvision.ops import boxes as box_ops

from .backbone import IMAGENET_MEAN, IMAGENET_STD
from .anchors import (
    mmdet_retinanet_anchor_generator,
    mmdet_rpn_anchor_generator,
    torchvision_retinanet_anchor_generator,
    torchvision_rpn_anchor_generator,
)
from .box_coder import (
    MIN_DETECTION_SIZE,
    MIN_PROPOSAL_SIZE,
    BatchedNMS,
    BoxFilter,
    BoxParts,
    MMDetBoxCoder,
    keep_all_boxes,
    keep_boxes_at_least,
    keep_nonempty_boxes,
    mmdet_batched_nms,
)
from .matcher import MaxIoUMatcher
from .retinanet import LibraRetinaNetHead, MMDetRetinaNetHead
from .roi_align import MMDetMultiScaleRoIAlign
from .transform import MMDetTransform

__all__ = ["CONVENTIONS", "MMDetConvention", "TorchvisionConvention", "convention_parts"]

CONVENTIONS = ("torchvision", "mmdet")
ROI_FEATURE_MAPS = ["0", "1", "2", "3"]  # P2-P5; the max-pooled P6 feeds the RPN only


class TorchvisionConvention:
    """torchvision's detection conventions (its weights give its detections)."""

    name = "torchvision"
    relu_before_p7 = True
    pafpn_bottom_up = "outputs"
    retinanet_head = LibraRetinaNetHead
    batched_nms: BatchedNMS = staticmethod(box_ops.batched_nms)

    def transform(self, min_size: int, max_size: int, mean: Sequence[float] = IMAGENET_MEAN,
                  std: Sequence[float] = IMAGENET_STD) -> GeneralizedRCNNTransform:
        """Resize and normalise: ``mean`` / ``std`` per RGB channel on 0-1 values."""
        return GeneralizedRCNNTransform(min_size, max_size, list(mean), list(std))

    def rpn_anchor_generator(self) -> AnchorGenerator:
        return torchvision_rpn_anchor_generator()

    def retinanet_anchor_generator(self) -> AnchorGenerator:
        return torchvision_retinanet_anchor_generator()

    def box_roi_pool(self) -> nn.Module:
        return MultiScaleRoIAlign(ROI_FEATURE_MAPS, output_size=7, sampling_ratio=2)

    def box_coder(self, weights: tuple[float, float, float, float]) -> BoxCoder:
        return BoxCoder(weights)

    def rpn_matcher(self) -> Matcher:
        return Matcher(0.7, 0.3, allow_low_quality_matches=True)

    def retinanet_matcher(self) -> Matcher:
        return Matcher(0.5, 0.4, allow_low_quality_matches=True)

    def rpn_box_filter(self) -> BoxFilter:
        return keep_boxes_at_least(MIN_PROPOSAL_SIZE)

    def roi_box_filter(self) -> BoxFilter:
        return keep_boxes_at_least(MIN_DETECTION_SIZE)

    def retinanet_box_filter(self) -> Optional[BoxFilter]:
        return None

    def rpn_box_parts(self) -> BoxParts:
        """The RPN's matcher, box coder (weights 1), small-proposal rule and batched NMS."""
        return BoxParts(matcher=self.rpn_matcher(), box_coder=self.box_coder((1.0, 1.0, 1.0, 1.0)),
                        box_filter=self.rpn_box_filter(), batched_nms=self.batched_nms)

    def roi_box_parts(self, iou_threshold: float = 0.5,
                      box_coder_weights: tuple[float, float, float, float] = (10.0, 10.0, 5.0, 5.0),
                      ) -> BoxParts:
        """The RoI heads' parts: RoIs of IoU ``>= iou_threshold`` with a ground truth are
        foreground, the others background (both conventions' R-CNN rule); deltas coded with
        ``box_coder_weights`` (torchvision's; mmdetection's ``target_stds`` are their
        reciprocals)."""
        matcher = Matcher(iou_threshold, iou_threshold, allow_low_quality_matches=False)
        return BoxParts(matcher=matcher, box_coder=self.box_coder(box_coder_weights),
                        box_filter=self.roi_box_filter(), batched_nms=self.batched_nms)

    def retinanet_box_parts(self) -> BoxParts:
        """RetinaNet's matcher, box coder (weights 1), small-box rule and batched NMS."""
        return BoxParts(matcher=self.retinanet_matcher(),
                        box_coder=self.box_coder((1.0, 1.0, 1.0, 1.0)),
                        box_filter=self.retinanet_box_filter(), batched_nms=self.batched_nms)

    def init_weights(self, model: nn.Module) -> None:
        """torchvision's modules initialise themselves."""


class MMDetConvention(TorchvisionConvention):
    """mmdetection's conventions (its checkpoints give its detections); see the module table."""

    name = "mmdet"
    relu_before_p7 = False
    pafpn_bottom_up = "sums"
    retinanet_head = MMDetRetinaNetHead
    batched_nms: BatchedNMS = staticmethod(mmdet_batched_nms)

    def transform(self, min_size: int, max_size: int, mean: Sequence[float] = IMAGENET_MEAN,
                  std: Sequence[float] = IMAGENET_STD) -> GeneralizedRCNNTransform:
        # on 0-255 values, rounded off float noise: ImageNet's give mmdetection's exact numbers
        return MMDetTransform(min_size, max_size, image_mean=[round(255.0 * m, 6) for m in mean],
                              image_std=[round(255.0 * s, 6) for s in std])

    def rpn_anchor_generator(self) -> AnchorGenerator:
        return mmdet_rpn_anchor_generator()

    def retinanet_anchor_generator(self) -> AnchorGenerator:
        return mmdet_retinanet_anchor_generator()

    def box_roi_pool(self) -> nn.Module:
        return MMDetMultiScaleRoIAlign(ROI_FEATURE_MAPS, output_size=7, strides=(4, 8, 16, 32))

    def box_coder(self, weights: tuple[float, float, float, float]) -> BoxCoder:
        return MMDetBoxCoder(weights)

    def rpn_matcher(self) -> Matcher:
        return MaxIoUMatcher(0.7, 0.3, allow_low_quality_matches=True, min_pos_iou=0.3)

    def retinanet_matcher(self) -> Matcher:
        return MaxIoUMatcher(0.5, 0.4, allow_low_quality_matches=True, min_pos_iou=0.0)

    def rpn_box_filter(self) -> BoxFilter:
        return keep_nonempty_boxes

    def roi_box_filter(self) -> BoxFilter:
        return keep_all_boxes

    def retinanet_box_filter(self) -> Optional[BoxFilter]:
        return keep_nonempty_boxes

    def init_weights(self, model: nn.Module) -> None:
        """mmdetection's initialisation of what is not pretrained and differs from torchvision's:
        FPN / PAFPN / P6-P7 convolutions Xavier-uniform; box head FCs Xavier-uniform, class scores
        N(0, 0.01^2), box deltas N(0, 0.001^2) (every stage of a cascade); biases 0. (RPN, RetinaNet head and balanced
        feature pyramid initialise as mmdetection's already.)"""
        fpn = getattr(getattr(model, "backbone", None), "fpn", None)
        for module in [] if fpn is None else fpn.modules():
            if isinstance(module, nn.Conv2d):
                _init(module, nn.init.xavier_uniform_)
        roi_heads = getattr(model, "roi_heads", None)
        # a cascade's stages initialise as Faster R-CNN's box head
        for heads in [] if roi_heads is None else getattr(roi_heads, "stages", [roi_heads]):
            for fc in heads.box_head.children():
                _init(fc, nn.init.xavier_uniform_)
            _init(heads.box_predictor.cls_score, lambda w: nn.init.normal_(w, std=0.01))
            _init(heads.box_predictor.bbox_pred, lambda w: nn.init.normal_(w, std=0.001))


def _init(module: nn.Module, init_weight) -> None:
    init_weight(module.weight)
    if module.bias is not None:
        nn.init.zeros_(module.bias)


def convention_parts(name: str) -> TorchvisionConvention:
    """The part builder of convention ``name`` (one of :data:`CONVENTIONS`)."""
    if name == "torchvision":
        return TorchvisionConvention()
    if name == "mmdet":
        return MMDetConvention()
    raise ValueError(f"convention must be one of {CONVENTIONS}, got {name!r}")
