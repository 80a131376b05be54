"""Libra RetinaNet: torchvision's RetinaNet with the balanced feature pyramid and a configurable
box loss (the paper's single-stage variant: no sampling, so no IoU-balanced sampling).

Two heads, one per convention:

* :class:`LibraRetinaNetHead` -- torchvision's head (one logit per class *including* the unused
  background label 0) whose regression loss is the one a
  :class:`~libra_rcnn.models.config.BoxLossConfig` names (``l1``, ``smooth_l1`` or
  ``balanced_l1``); both losses are normalised per image by that image's foreground anchors
  (at least 1), then averaged over the images, as torchvision does.
* :class:`MMDetRetinaNetHead` -- mmdetection's: one logit per foreground class (label ``l`` is
  channel ``l - 1``) and both losses summed over the batch and divided by the batch's number of
  foreground anchors (at least 1).

:class:`LibraRetinaNet` takes its parts built (backbone, head, anchor generator, transform, and
the matcher, box coder, small-box rule and batched NMS as one :class:`~.box_coder.BoxParts`) and
its post-processing thresholds as a :class:`~.head_settings.DetectionSettings`;
``build_model`` assembles them from a ``ModelConfig``.
"""

from __future__ import annotations

from typing import Any, Callable, Optional

import torch
from torch import Tensor, nn
from torchvision.models.detection import _utils as det_utils
from torchvision.models.detection._utils import BoxCoder, Matcher
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.retinanet import (
    RetinaNet,
    RetinaNetClassificationHead,
    RetinaNetHead,
    RetinaNetRegressionHead,
)
from torchvision.models.detection.transform import GeneralizedRCNNTransform
from torchvision.ops import boxes as box_ops
from torchvision.ops import sigmoid_focal_loss

from .box_coder import BoxParts
from .box_losses import box_regression_loss_sum, check_box_loss_config
from .config import BoxLossConfig, default_retina_box_loss
from .head_settings import DetectionSettings
from .validation import validate_inputs

__all__ = [
    "LibraRetinaNet",
    "LibraRetinaNetHead",
    "LibraRetinaNetRegressionHead",
    "MMDetRetinaNetHead",
]

NormLayer = Optional[Callable[..., nn.Module]]


def _regression_loss_sum(box_coder: BoxCoder, box_loss: BoxLossConfig, target: dict[str, Tensor],
                         deltas: Tensor, anchors: Tensor, matched: Tensor) -> tuple[Tensor, int]:
    """Box loss summed over one image's foreground anchors, and their number.

    Shapes: ``deltas [A, 4]``, ``anchors [A, 4]``, ``matched [A]`` (>= 0: ground-truth index).
    """
    foreground = torch.where(matched >= 0)[0]
    encoded = box_coder.encode_single(target["boxes"][matched[foreground]], anchors[foreground])
    return box_regression_loss_sum(deltas[foreground], encoded, box_loss), int(foreground.numel())


class LibraRetinaNetRegressionHead(RetinaNetRegressionHead):
    """torchvision's RetinaNet regression head with a configurable box loss.

    Args:
        in_channels, num_anchors, norm_layer: as torchvision's.
        box_loss: :class:`BoxLossConfig` (default: L1, torchvision's; ``ModelConfig``'s).
    """

    def __init__(self, in_channels: int, num_anchors: int, *, box_loss: Optional[BoxLossConfig] = None,
                 norm_layer: NormLayer = None) -> None:
        super().__init__(in_channels, num_anchors, norm_layer=norm_layer)
        self.box_loss = check_box_loss_config(
            default_retina_box_loss() if box_loss is None else box_loss, "retina_box_loss")

    def compute_loss(self, targets: list[dict[str, Tensor]], head_outputs: dict[str, Tensor],
                     anchors: list[Tensor], matched_idxs: list[Tensor]) -> Tensor:
        """Mean over images of ``sum_fg L_loc(deltas - targets) / max(1, num_fg)``.

        Shapes: ``head_outputs["bbox_regression"]`` ``[B, A, 4]``; ``anchors`` per image
        ``[A, 4]``; ``matched_idxs`` per image ``[A]`` (>= 0 foreground gt index).
        """
        per_image = []
        for target, deltas, anchors_per_image, matched in zip(
                targets, head_outputs["bbox_regression"], anchors, matched_idxs):
            loss, num_foreground = _regression_loss_sum(self.box_coder, self.box_loss, target, deltas,
                                                        anchors_per_image, matched)
            per_image.append(loss / max(1, num_foreground))
        return torch.stack(per_image).sum() / max(1, len(targets))


class LibraRetinaNetHead(RetinaNetHead):
    """torchvision's ``RetinaNetHead`` whose regression branch is
    :class:`LibraRetinaNetRegressionHead` (same parameter names). ``num_classes`` logits per
    anchor, label 0 (background) included and never a target."""

    first_label = 0  # logit k is label k

    def __init__(self, in_channels: int, num_anchors: int, num_classes: int, *,
                 box_loss: Optional[BoxLossConfig] = None, norm_layer: NormLayer = None) -> None:
        super().__init__(in_channels, num_anchors, num_classes, norm_layer=norm_layer)
        self.regression_head = LibraRetinaNetRegressionHead(
            in_channels, num_anchors, box_loss=box_loss, norm_layer=norm_layer
        )


class MMDetRetinaNetHead(LibraRetinaNetHead):
    """mmdetection's RetinaNet head: ``num_classes - 1`` logits per anchor (foreground classes:
    label ``l`` is logit ``l - 1``) and losses normalised by the batch's foreground anchors.

    Args: as :class:`LibraRetinaNetHead`; ``num_classes`` counts the background, as everywhere in
    this package. Parameter names and shapes are mmdetection's ``RetinaHead``'s after renaming
    (``cls_convs`` -> ``classification_head.conv``, ``retina_cls`` -> ``cls_logits``, ...).
    """

    first_label = 1  # logit k is label k + 1

    def __init__(self, in_channels: int, num_anchors: int, num_classes: int, *,
                 box_loss: Optional[BoxLossConfig] = None, norm_layer: NormLayer = None) -> None:
        super().__init__(in_channels, num_anchors, num_classes, box_loss=box_loss,
                         norm_layer=norm_layer)
        self.classification_head = RetinaNetClassificationHead(
            in_channels, num_anchors, num_classes - 1, norm_layer=norm_layer)

    def compute_loss(self, targets: list[dict[str, Tensor]], head_outputs: dict[str, Tensor],
                     anchors: list[Tensor], matched_idxs: list[Tensor]) -> dict[str, Tensor]:
        """Sigmoid focal loss (alpha 0.25, gamma 2) over the anchors that are not ignored and box
        loss over the foreground anchors, each summed over the batch and divided by the batch's
        number of foreground anchors (at least 1; mmdetection's ``avg_factor``).

        Shapes: ``cls_logits [B, A, K]``, ``bbox_regression [B, A, 4]``; per image
        ``anchors [A, 4]`` and ``matched_idxs [A]`` (-1 background, -2 ignored, else gt index).
        """
        regression = self.regression_head
        cls_sum = reg_sum = head_outputs["cls_logits"].sum() * 0.0
        num_foreground = 0
        for target, logits, deltas, anchors_per_image, matched in zip(
                targets, head_outputs["cls_logits"], head_outputs["bbox_regression"], anchors,
                matched_idxs):
            foreground = torch.where(matched >= 0)[0]
            labels = target["labels"][matched[foreground]] - self.first_label
            onehot = torch.zeros_like(logits)
            onehot[foreground, labels] = 1.0
            valid = matched != Matcher.BETWEEN_THRESHOLDS
            cls_sum = cls_sum + sigmoid_focal_loss(logits[valid], onehot[valid], reduction="sum")
            loss, count = _regression_loss_sum(regression.box_coder, regression.box_loss, target,
                                               deltas, anchors_per_image, matched)
            reg_sum = reg_sum + loss
            num_foreground += count
        normaliser = max(1, num_foreground)
        return {"classification": cls_sum / normaliser, "bbox_regression": reg_sum / normaliser}


class LibraRetinaNet(RetinaNet):
    """RetinaNet from its parts, with input checks.

    Args:
        backbone: returns the 5 levels P3-P7.
        head: :class:`LibraRetinaNetHead` or :class:`MMDetRetinaNetHead`.
        anchor_generator: anchors on P3-P7.
        transform: resizes, normalises and batches the images and maps the detections back.
        num_classes: classes including background (labels in ``[1, num_classes)``).
        box_parts: :class:`BoxParts`: anchor matcher, delta coder (also the head's), the rule
            applied to the decoded boxes before NMS, batched NMS (default torchvision's,
            ``TorchvisionConvention().retinanet_box_parts()``: ``Matcher(0.5, 0.4, True)``,
            ``BoxCoder((1, 1, 1, 1))``, every box kept, torchvision's batched NMS).
        detection: :class:`DetectionSettings` (default: score above 0.05 and NMS at 0.5, as
            torchvision's; 100 detections per image, as mmdetection's and ``ModelConfig``'s,
            where torchvision's RetinaNet keeps 300).
        topk_candidates: the best (anchor, class) scores kept per level before NMS, as
            torchvision's.
    """

    def __init__(
        self,
        backbone: nn.Module,
        head: LibraRetinaNetHead,
        anchor_generator: AnchorGenerator,
        transform: GeneralizedRCNNTransform,
        *,
        num_classes: int,
        box_parts: Optional[BoxParts] = None,
        detection: Optional[DetectionSettings] = None,
        topk_candidates: int = 1000,
    ) -> None:
        if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 2:
            raise ValueError(f"num_classes must be an int >= 2 (background included), got {num_classes!r}")
        if box_parts is None:
            from .conventions import TorchvisionConvention  # it imports this module's heads

            box_parts = TorchvisionConvention().retinanet_box_parts()
        detection = DetectionSettings() if detection is None else detection
        super().__init__(backbone, num_classes, anchor_generator=anchor_generator, head=head,
                         proposal_matcher=box_parts.matcher, score_thresh=detection.score_thresh,
                         nms_thresh=detection.nms_thresh,
                         detections_per_img=detection.detections_per_img,
                         topk_candidates=topk_candidates)
        self.transform = transform
        self.box_coder = head.regression_head.box_coder = box_parts.box_coder
        self.box_filter = box_parts.box_filter
        self.batched_nms = box_parts.batched_nms
        self.num_classes = num_classes

    def forward(self, images: list[Tensor], targets: Optional[list[dict[str, Tensor]]] = None) -> Any:
        validate_inputs(images, targets, training=self.training, num_classes=self.num_classes)
        return super().forward(images, targets)

    def postprocess_detections(self, head_outputs: dict[str, list[Tensor]],
                               anchors: list[list[Tensor]],
                               image_shapes: list[tuple[int, int]]) -> list[dict[str, Tensor]]:
        """torchvision's selection: per level the ``topk_candidates`` best (anchor, class) scores
        above ``score_thresh``, decoded and clipped; then ``box_filter`` and class-wise NMS, the
        best ``detections_per_img`` kept. Labels count from the head's ``first_label``."""
        first_label = self.head.first_label
        detections = []
        for index, shape in enumerate(image_shapes):
            boxes, scores, labels = [], [], []
            for deltas, logits, level_anchors in zip(head_outputs["bbox_regression"],
                                                     head_outputs["cls_logits"], anchors[index]):
                num_classes = logits.shape[-1]
                level_scores = torch.sigmoid(logits[index]).flatten()
                candidates = torch.where(level_scores > self.score_thresh)[0]
                # torchvision's helper: a run-time minimum when the model is exported
                level_scores, order = level_scores[candidates].topk(
                    det_utils._topk_min(candidates, self.topk_candidates, 0))
                candidates = candidates[order]
                anchor_idxs = torch.div(candidates, num_classes, rounding_mode="floor")
                decoded = self.box_coder.decode_single(deltas[index][anchor_idxs],
                                                       level_anchors[anchor_idxs])
                boxes.append(box_ops.clip_boxes_to_image(decoded, shape))
                scores.append(level_scores)
                labels.append(candidates % num_classes + first_label)
            boxes, scores, labels = torch.cat(boxes), torch.cat(scores), torch.cat(labels)
            if self.box_filter is not None:
                keep = self.box_filter(boxes)
                boxes, scores, labels = boxes[keep], scores[keep], labels[keep]
            keep = self.batched_nms(boxes, scores, labels, self.nms_thresh)[: self.detections_per_img]
            detections.append({"boxes": boxes[keep], "scores": scores[keep], "labels": labels[keep]})
        return detections
