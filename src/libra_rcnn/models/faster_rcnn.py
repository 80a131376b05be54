"""Libra Faster R-CNN and Libra Fast R-CNN (second stage on precomputed proposals).

:class:`LibraFasterRCNN` is torchvision's ``FasterRCNN`` whose RPN is
:class:`~libra_rcnn.models.rpn.LibraRegionProposalNetwork` and whose RoI heads are
:class:`~libra_rcnn.models.roi_heads.LibraRoIHeads`; all submodules keep torchvision's names, so a
torchvision Faster R-CNN state dict loads into it (only ``backbone.bfp.*`` / PAFPN parameters are
new). With every Libra switch off it computes what torchvision's model computes.

:class:`LibraFastRCNN` is the same detector without the RPN: it takes the proposals of a separate
RPN (e.g. :func:`~libra_rcnn.models.proposals.dump_proposals`), as the paper's ablations do
("the same precomputed proposals for fair comparisons", Sec. 4.4).
"""

from __future__ import annotations

from typing import Any, Optional

import torch
from torch import Tensor, nn
from torchvision.models.detection.faster_rcnn import FasterRCNN, FastRCNNPredictor, TwoMLPHead
from torchvision.models.detection.rpn import RPNHead
from torchvision.models.detection.transform import GeneralizedRCNNTransform, resize_boxes
from torchvision.ops import MultiScaleRoIAlign

from .config import BoxLossConfig, SamplerConfig
from .roi_heads import LibraRoIHeads
from .rpn import LibraRegionProposalNetwork, default_rpn_anchor_generator
from .validation import validate_inputs, validate_proposals

__all__ = ["LibraFasterRCNN", "LibraFastRCNN", "build_box_branch"]

_ROI_FEATURE_MAPS = ["0", "1", "2", "3"]  # P2-P5; the max-pooled P6 feeds the RPN only
_ROI_RESOLUTION = 7


def _check_num_classes(num_classes: Any) -> None:
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 2:
        raise ValueError(f"num_classes must be an int >= 2 (background included), got {num_classes!r}")


def build_box_branch(out_channels: int, num_classes: int, representation_size: int
                     ) -> tuple[MultiScaleRoIAlign, TwoMLPHead, FastRCNNPredictor]:
    """RoIAlign over P2-P5 (7x7, sampling ratio 2), two shared FC layers of
    ``representation_size`` (mmdetection's ``Shared2FCBBoxHead``), class-specific box deltas."""
    if isinstance(representation_size, bool) or not isinstance(representation_size, int) \
            or representation_size < 1:
        raise ValueError(f"representation_size must be a positive int, got {representation_size!r}")
    box_roi_pool = MultiScaleRoIAlign(featmap_names=list(_ROI_FEATURE_MAPS),
                                      output_size=_ROI_RESOLUTION, sampling_ratio=2)
    box_head = TwoMLPHead(out_channels * _ROI_RESOLUTION**2, representation_size)
    box_predictor = FastRCNNPredictor(representation_size, num_classes)
    return box_roi_pool, box_head, box_predictor


class LibraFasterRCNN(FasterRCNN):
    """Faster R-CNN with the Libra switches (all of them in the constructor's arguments).

    Args:
        backbone: module with ``out_channels`` returning levels ``"0".."3"`` (P2-P5) and
            ``"pool"`` (P6), e.g. :func:`libra_rcnn.models.backbone.resnet_fpn_backbone`.
        num_classes: classes including background (labels in ``[1, num_classes)``).
        rpn_box_loss, rpn_neg_pos_ub: see :class:`LibraRegionProposalNetwork`.
        roi_sampler, box_loss: see :class:`LibraRoIHeads`.
        representation_size: width of the two FC layers of the box head.
        generator: optional ``torch.Generator`` shared by the RPN and RoI samplers.
        min_size, max_size, image_mean, image_std, rpn_*, box_*, bbox_reg_weights, **kwargs:
            as torchvision's ``FasterRCNN`` (``box_batch_size_per_image`` and
            ``box_positive_fraction`` come from ``roi_sampler``).

    ``forward(images, targets=None)``: torchvision's contract (losses
    ``loss_classifier, loss_box_reg, loss_objectness, loss_rpn_box_reg`` in training,
    ``[{"boxes", "labels", "scores"}]`` at inference), after :mod:`.validation` checks.
    """

    def __init__(
        self,
        backbone: nn.Module,
        num_classes: int,
        *,
        min_size: int = 800,
        max_size: int = 1333,
        image_mean: Optional[list[float]] = None,
        image_std: Optional[list[float]] = None,
        rpn_pre_nms_top_n_train: int = 2000,
        rpn_pre_nms_top_n_test: int = 1000,
        rpn_post_nms_top_n_train: int = 2000,
        rpn_post_nms_top_n_test: int = 1000,
        rpn_nms_thresh: float = 0.7,
        rpn_fg_iou_thresh: float = 0.7,
        rpn_bg_iou_thresh: float = 0.3,
        rpn_batch_size_per_image: int = 256,
        rpn_positive_fraction: float = 0.5,
        rpn_score_thresh: float = 0.0,
        rpn_box_loss: Optional[BoxLossConfig] = None,
        rpn_neg_pos_ub: float = -1.0,
        roi_sampler: Optional[SamplerConfig] = None,
        box_loss: Optional[BoxLossConfig] = None,
        representation_size: int = 1024,
        box_score_thresh: float = 0.05,
        box_nms_thresh: float = 0.5,
        box_detections_per_img: int = 100,
        box_fg_iou_thresh: float = 0.5,
        box_bg_iou_thresh: float = 0.5,
        bbox_reg_weights: Optional[tuple[float, float, float, float]] = None,
        generator: Optional[torch.Generator] = None,
        **kwargs: Any,
    ) -> None:
        _check_num_classes(num_classes)
        if not hasattr(backbone, "out_channels"):
            raise ValueError("backbone must have an out_channels attribute")
        roi_sampler = SamplerConfig() if roi_sampler is None else roi_sampler
        box_roi_pool, box_head, box_predictor = build_box_branch(
            backbone.out_channels, num_classes, representation_size)
        anchor_generator = default_rpn_anchor_generator()
        rpn_head = RPNHead(backbone.out_channels, anchor_generator.num_anchors_per_location()[0])
        super().__init__(
            backbone,
            num_classes=None,
            min_size=min_size,
            max_size=max_size,
            image_mean=image_mean,
            image_std=image_std,
            rpn_anchor_generator=anchor_generator,
            rpn_head=rpn_head,
            box_roi_pool=box_roi_pool,
            box_head=box_head,
            box_predictor=box_predictor,
            **kwargs,
        )
        # Swap in the Libra RPN / RoI heads around the very same submodules (names unchanged).
        self.rpn = LibraRegionProposalNetwork(
            anchor_generator,
            rpn_head,
            fg_iou_thresh=rpn_fg_iou_thresh,
            bg_iou_thresh=rpn_bg_iou_thresh,
            batch_size_per_image=rpn_batch_size_per_image,
            positive_fraction=rpn_positive_fraction,
            pre_nms_top_n={"training": rpn_pre_nms_top_n_train, "testing": rpn_pre_nms_top_n_test},
            post_nms_top_n={"training": rpn_post_nms_top_n_train, "testing": rpn_post_nms_top_n_test},
            nms_thresh=rpn_nms_thresh,
            score_thresh=rpn_score_thresh,
            box_loss=rpn_box_loss,
            neg_pos_ub=rpn_neg_pos_ub,
            generator=generator,
        )
        self.roi_heads = LibraRoIHeads(
            box_roi_pool,
            box_head,
            box_predictor,
            fg_iou_thresh=box_fg_iou_thresh,
            bg_iou_thresh=box_bg_iou_thresh,
            sampler=roi_sampler,
            box_loss=box_loss,
            bbox_reg_weights=bbox_reg_weights,
            score_thresh=box_score_thresh,
            nms_thresh=box_nms_thresh,
            detections_per_img=box_detections_per_img,
            generator=generator,
        )
        self.num_classes = num_classes

    def forward(self, images: list[Tensor], targets: Optional[list[dict[str, Tensor]]] = None) -> Any:
        validate_inputs(images, targets, training=self.training, num_classes=self.num_classes)
        return super().forward(images, targets)


class LibraFastRCNN(nn.Module):
    """Fast R-CNN: ``transform -> backbone -> roi_heads`` on precomputed proposals.

    Args: as :class:`LibraFasterRCNN` without the ``rpn_*`` ones.

    ``forward(images, targets=None, proposals=None)``:

    * ``proposals``: one ``Tensor[K, 4]`` (or ``[K, 5]`` with a score column, ignored) per
      image in *original* image coordinates; they are rescaled with the transform's resize
      ratios. When ``None``, each target's ``"proposals"`` entry is used if every target has one;
      otherwise a ``ValueError`` explains what is missing.
    * training: ``{"loss_classifier", "loss_box_reg"}`` (ground truth boxes join the proposals
      when ``roi_sampler.add_gt_as_proposals``); inference: ``[{"boxes", "labels", "scores"}]``
      in original image coordinates.
    """

    def __init__(
        self,
        backbone: nn.Module,
        num_classes: int,
        *,
        min_size: int = 800,
        max_size: int = 1333,
        image_mean: Optional[list[float]] = None,
        image_std: Optional[list[float]] = None,
        roi_sampler: Optional[SamplerConfig] = None,
        box_loss: Optional[BoxLossConfig] = None,
        representation_size: int = 1024,
        box_score_thresh: float = 0.05,
        box_nms_thresh: float = 0.5,
        box_detections_per_img: int = 100,
        box_fg_iou_thresh: float = 0.5,
        box_bg_iou_thresh: float = 0.5,
        bbox_reg_weights: Optional[tuple[float, float, float, float]] = None,
        generator: Optional[torch.Generator] = None,
        **transform_kwargs: Any,
    ) -> None:
        super().__init__()
        _check_num_classes(num_classes)
        if not hasattr(backbone, "out_channels"):
            raise ValueError("backbone must have an out_channels attribute")
        box_roi_pool, box_head, box_predictor = build_box_branch(
            backbone.out_channels, num_classes, representation_size)
        self.transform = GeneralizedRCNNTransform(
            min_size, max_size,
            image_mean if image_mean is not None else [0.485, 0.456, 0.406],
            image_std if image_std is not None else [0.229, 0.224, 0.225],
            **transform_kwargs,
        )
        self.backbone = backbone
        self.roi_heads = LibraRoIHeads(
            box_roi_pool,
            box_head,
            box_predictor,
            fg_iou_thresh=box_fg_iou_thresh,
            bg_iou_thresh=box_bg_iou_thresh,
            sampler=roi_sampler,
            box_loss=box_loss,
            bbox_reg_weights=bbox_reg_weights,
            score_thresh=box_score_thresh,
            nms_thresh=box_nms_thresh,
            detections_per_img=box_detections_per_img,
            generator=generator,
        )
        self.num_classes = num_classes

    def forward(
        self,
        images: list[Tensor],
        targets: Optional[list[dict[str, Tensor]]] = None,
        proposals: Optional[list[Tensor]] = None,
    ) -> Any:
        validate_inputs(images, targets, training=self.training, num_classes=self.num_classes)
        if proposals is None:
            if targets is not None and all("proposals" in t for t in targets):
                proposals = [t["proposals"] for t in targets]
            else:
                raise ValueError(
                    "LibraFastRCNN needs precomputed proposals: pass proposals=[Tensor[K, 4] or "
                    "Tensor[K, 5] per image, in original image coordinates] (e.g. from "
                    "load_proposals), or put them in every target's 'proposals' entry"
                )
        validate_proposals(proposals, num_images=len(images))

        original_sizes = [(int(img.shape[-2]), int(img.shape[-1])) for img in images]
        image_list, targets = self.transform(images, targets)
        device, dtype = image_list.tensors.device, image_list.tensors.dtype
        boxes = [
            resize_boxes(p[:, :4].to(device=device, dtype=dtype), list(orig), list(new))
            for p, orig, new in zip(proposals, original_sizes, image_list.image_sizes)
        ]
        features = self.backbone(image_list.tensors)
        if isinstance(features, Tensor):
            features = {"0": features}
        detections, losses = self.roi_heads(features, boxes, image_list.image_sizes, targets)
        if self.training:
            return losses
        return self.transform.postprocess(detections, image_list.image_sizes, original_sizes)
