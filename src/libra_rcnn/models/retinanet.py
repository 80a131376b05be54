"""Libra RetinaNet: torchvision's RetinaNet with the balanced feature pyramid and a configurable
box loss (the paper's single-stage variant: no sampling, so no IoU-balanced sampling).

Only the regression head changes: :class:`LibraRetinaNetRegressionHead` computes the loss named
by a :class:`~libra_rcnn.models.config.BoxLossConfig` (``l1`` -- torchvision's and mmdetection's
RetinaNet default --, ``smooth_l1`` or ``balanced_l1``; mmdetection's Libra RetinaNet uses
balanced L1 with ``beta = 0.11``), normalised exactly as torchvision's: per image, the sum over the
foreground anchors' coordinates divided by the number of foreground anchors (at least 1), then
averaged over the images. Classification (sigmoid focal loss), anchors, matching and inference
are torchvision's.
"""

from __future__ import annotations

from typing import Any, Callable, Optional

import torch
from torch import Tensor, nn
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.retinanet import (
    RetinaNet,
    RetinaNetHead,
    RetinaNetRegressionHead,
)

from .box_losses import box_regression_loss_sum, check_box_loss_config
from .config import BoxLossConfig
from .validation import validate_inputs

__all__ = [
    "LibraRetinaNet",
    "LibraRetinaNetHead",
    "LibraRetinaNetRegressionHead",
    "default_retinanet_anchor_generator",
]


def default_retinanet_anchor_generator() -> AnchorGenerator:
    """3 scales x 3 aspect ratios per level P3-P7 (base sizes 32..512), torchvision's default
    and mmdetection's ``octave_base_scale=4, scales_per_octave=3``."""
    sizes = tuple((x, int(x * 2 ** (1.0 / 3)), int(x * 2 ** (2.0 / 3))) for x in (32, 64, 128, 256, 512))
    return AnchorGenerator(sizes, ((0.5, 1.0, 2.0),) * len(sizes))


class LibraRetinaNetRegressionHead(RetinaNetRegressionHead):
    """torchvision's RetinaNet regression head with a configurable box loss.

    Args:
        in_channels, num_anchors, norm_layer: as torchvision's.
        box_loss: :class:`BoxLossConfig` (default: L1, torchvision's).
    """

    def __init__(self, in_channels: int, num_anchors: int, *, box_loss: Optional[BoxLossConfig] = None,
                 norm_layer: Optional[Callable[..., nn.Module]] = None) -> None:
        super().__init__(in_channels, num_anchors, norm_layer=norm_layer)
        self.box_loss = check_box_loss_config(
            BoxLossConfig(kind="l1") if box_loss is None else box_loss, "retina_box_loss")

    def compute_loss(
        self,
        targets: list[dict[str, Tensor]],
        head_outputs: dict[str, Tensor],
        anchors: list[Tensor],
        matched_idxs: list[Tensor],
    ) -> Tensor:
        """Mean over images of ``sum_fg L_loc(deltas - targets) / max(1, num_fg)``.

        Shapes: ``head_outputs["bbox_regression"]`` ``[B, A, 4]``; ``anchors`` per image
        ``[A, 4]``; ``matched_idxs`` per image ``[A]`` (>= 0 foreground gt index).
        """
        bbox_regression = head_outputs["bbox_regression"]
        per_image = []
        for target, deltas, anchors_per_image, matched in zip(targets, bbox_regression, anchors,
                                                              matched_idxs):
            foreground = torch.where(matched >= 0)[0]
            matched_boxes = target["boxes"][matched[foreground]]
            encoded = self.box_coder.encode_single(matched_boxes, anchors_per_image[foreground])
            loss = box_regression_loss_sum(deltas[foreground], encoded, self.box_loss)
            per_image.append(loss / max(1, foreground.numel()))
        return torch.stack(per_image).sum() / max(1, len(targets))


class LibraRetinaNetHead(RetinaNetHead):
    """torchvision's ``RetinaNetHead`` whose regression branch is
    :class:`LibraRetinaNetRegressionHead` (same parameter names)."""

    def __init__(self, in_channels: int, num_anchors: int, num_classes: int, *,
                 box_loss: Optional[BoxLossConfig] = None,
                 norm_layer: Optional[Callable[..., nn.Module]] = None) -> None:
        super().__init__(in_channels, num_anchors, num_classes, norm_layer=norm_layer)
        self.regression_head = LibraRetinaNetRegressionHead(
            in_channels, num_anchors, box_loss=box_loss, norm_layer=norm_layer
        )


class LibraRetinaNet(RetinaNet):
    """RetinaNet with input validation and a configurable box loss.

    Args:
        backbone: module with ``out_channels`` returning 5 levels (P3-P7).
        num_classes: classification channels (labels in ``[1, num_classes)``; 0 is never a target).
        box_loss: :class:`BoxLossConfig` of the regression head (ignored when ``head`` is given).
        min_size, max_size, score_thresh, nms_thresh, detections_per_img, fg_iou_thresh,
        bg_iou_thresh, topk_candidates, anchor_generator, head, **kwargs: as torchvision's
            ``RetinaNet``.
    """

    def __init__(
        self,
        backbone: nn.Module,
        num_classes: int,
        *,
        box_loss: Optional[BoxLossConfig] = None,
        anchor_generator: Optional[AnchorGenerator] = None,
        head: Optional[nn.Module] = None,
        **kwargs: Any,
    ) -> None:
        if not hasattr(backbone, "out_channels"):
            raise ValueError("backbone must have an out_channels attribute")
        if anchor_generator is None:
            anchor_generator = default_retinanet_anchor_generator()
        if head is None:
            head = LibraRetinaNetHead(backbone.out_channels, anchor_generator.num_anchors_per_location()[0],
                                      num_classes, box_loss=box_loss)
        super().__init__(backbone, num_classes, anchor_generator=anchor_generator, head=head, **kwargs)
        self.num_classes = num_classes

    def forward(self, images: list[Tensor], targets: Optional[list[dict[str, Tensor]]] = None) -> Any:
        validate_inputs(images, targets, training=self.training, num_classes=self.num_classes)
        return super().forward(images, targets)
