"""Cascade R-CNN (Cai & Vasconcelos, CVPR 2018) from Libra RoI heads, as mmdetection 3.3 runs it.

:class:`CascadeRoIHeads` chains stages, each a :class:`~libra_rcnn.models.roi_heads.LibraRoIHeads`
with its own box head, class-agnostic box predictor, box parts (a matcher at its IoU threshold,
a box coder) and loss settings (so IoU-balanced sampling and the balanced L1 loss work per
stage, each a switch as for Faster R-CNN):

* training: stage ``k`` matches and samples its RoIs among its input boxes (plus the ground
  truth, with ``add_gt_as_proposals``), computes Fast R-CNN's two losses, weighted by
  ``stage_loss_weights[k]``, then moves every sampled RoI but the added ground-truth boxes by
  its predicted deltas (no gradient), clipped to the image: the next stage's input boxes;
* inference: every stage scores and moves the boxes the previous one moved (stage 0: the RPN's
  proposals); the detections are the last stage's boxes with the softmax of the stages' mean
  class logits (mmdetection 3.3 averages the logits, then takes the softmax), post-processed as
  Faster R-CNN's (score threshold, class-wise NMS, the best ``detections_per_img``).

:class:`LibraCascadeRCNN` is :class:`~libra_rcnn.models.faster_rcnn.LibraFasterRCNN` with these
heads; its training losses are the RPN's and ``s{k}.loss_classifier`` / ``s{k}.loss_box_reg``
per stage (mmdetection's ``s{k}.loss_cls`` / ``s{k}.loss_bbox``).
"""

from __future__ import annotations

import math
from typing import Optional, Sequence

import torch
from torch import Tensor, nn
from torchvision.models.detection._utils import BoxCoder
from torchvision.models.detection.transform import GeneralizedRCNNTransform
from torchvision.ops import boxes as box_ops

from .faster_rcnn import LibraFasterRCNN
from .roi_heads import LibraRoIHeads, fastrcnn_loss
from .rpn import LibraRegionProposalNetwork

__all__ = ["CascadeRoIHeads", "LibraCascadeRCNN", "refine_boxes"]


def refine_boxes(box_coder: BoxCoder, box_regression: Tensor, boxes: list[Tensor],
                 image_shapes: list[tuple[int, int]]) -> list[Tensor]:
    """``boxes`` (per image ``[R_i, 4]``) moved by class-agnostic deltas ``[sum R_i, 4]``,
    clipped to their image's ``(height, width)``: per image ``[R_i, 4]``, in the boxes' dtype
    (under autocast the deltas may be half precision, too coarse for pixel coordinates)."""
    all_boxes = torch.cat(boxes, dim=0)
    decoded = box_coder.decode_single(box_regression.to(all_boxes.dtype), all_boxes)
    per_image = decoded.split([b.shape[0] for b in boxes])
    return [box_ops.clip_boxes_to_image(b, shape) for b, shape in zip(per_image, image_shapes)]


def _check_stage_loss_weights(weights: Sequence[float], num_stages: int) -> tuple[float, ...]:
    weights = tuple(weights)
    if len(weights) != num_stages:
        raise ValueError(f"stage_loss_weights has {len(weights)} entries for {num_stages} stages")
    for w in weights:
        if isinstance(w, bool) or not isinstance(w, (int, float)) or not math.isfinite(w) or w < 0:
            raise ValueError(f"stage_loss_weights must be finite numbers >= 0, got {weights!r}")
    return tuple(float(w) for w in weights)


class CascadeRoIHeads(nn.Module):
    """The stages of a Cascade R-CNN (see the module docstring).

    Args:
        stages: one :class:`LibraRoIHeads` per stage, each with a class-agnostic box predictor
            (``bbox_pred`` of 4 outputs, e.g. ``box_head_and_predictor(..., class_agnostic=True)``)
            and its own box parts (matcher at its IoU threshold, box coder: e.g.
            ``convention.roi_box_parts(iou_threshold, box_coder_weights)``), sampler and box
            loss. The last stage's detection settings (``score_thresh``, ``nms_thresh``,
            ``detections_per_img``) and box parts (``box_filter``, ``batched_nms``)
            post-process the detections.
        stage_loss_weights: one weight per stage for both of its losses.

    ``forward(features, proposals, image_shapes, targets=None)``: torchvision's ``RoIHeads``
    contract: ``([], {"s0.loss_classifier", "s0.loss_box_reg", ...})`` in
    training, ``([{"boxes", "labels", "scores"}, ...], {})`` at inference.
    """

    def __init__(self, stages: Sequence[LibraRoIHeads], stage_loss_weights: Sequence[float]) -> None:
        super().__init__()
        stages = list(stages)
        if not stages:
            raise ValueError("a cascade needs at least one stage")
        for index, stage in enumerate(stages):
            if not isinstance(stage, LibraRoIHeads):
                raise ValueError(f"stage {index} must be a LibraRoIHeads, got {type(stage).__name__}")
            outputs = getattr(getattr(stage.box_predictor, "bbox_pred", None), "out_features", None)
            if outputs != 4:
                raise ValueError(f"stage {index}: a cascade stage regresses one class-agnostic box "
                                 f"(4 deltas), its predictor gives {outputs}")
        self.stages = nn.ModuleList(stages)
        self.stage_loss_weights = _check_stage_loss_weights(stage_loss_weights, len(stages))

    def forward(
        self,
        features: dict[str, Tensor],
        proposals: list[Tensor],
        image_shapes: list[tuple[int, int]],
        targets: Optional[list[dict[str, Tensor]]] = None,
    ) -> tuple[list[dict[str, Tensor]], dict[str, Tensor]]:
        if self.training:
            return [], self.losses(features, proposals, image_shapes, targets)
        return self.detect(features, proposals, image_shapes), {}

    def losses(self, features: dict[str, Tensor], proposals: list[Tensor],
               image_shapes: list[tuple[int, int]],
               targets: Optional[list[dict[str, Tensor]]]) -> dict[str, Tensor]:
        """Every stage's weighted losses; ``proposals``: per image ``[N_i, 4]`` RPN boxes."""
        losses: dict[str, Tensor] = {}
        last = len(self.stages) - 1
        for k, (stage, weight) in enumerate(zip(self.stages, self.stage_loss_weights)):
            rois, _, labels, regression_targets, from_gt = stage.sample_training_rois(proposals, targets)
            class_logits, box_regression = stage.box_outputs(features, rois, image_shapes)
            loss_classifier, loss_box_reg = fastrcnn_loss(class_logits, box_regression, labels,
                                                          regression_targets, stage.box_loss)
            losses[f"s{k}.loss_classifier"] = loss_classifier * weight
            losses[f"s{k}.loss_box_reg"] = loss_box_reg * weight
            if k < last:  # the next stage's boxes: moved RoIs, the added ground truth left out
                moved = refine_boxes(stage.box_coder, box_regression.detach(), rois, image_shapes)
                proposals = [boxes[~gt] for boxes, gt in zip(moved, from_gt)]
        return losses

    def detect(self, features: dict[str, Tensor], proposals: list[Tensor],
               image_shapes: list[tuple[int, int]]) -> list[dict[str, Tensor]]:
        """Per image ``{"boxes" [D, 4], "labels" [D], "scores" [D]}`` in the transformed image's
        coordinates."""
        boxes = proposals
        logits_sum: Optional[Tensor] = None
        last = len(self.stages) - 1
        for k, stage in enumerate(self.stages):
            class_logits, box_regression = stage.box_outputs(features, boxes, image_shapes)
            logits_sum = class_logits if logits_sum is None else logits_sum + class_logits
            if k < last:
                boxes = refine_boxes(stage.box_coder, box_regression, boxes, image_shapes)
        assert logits_sum is not None  # at least one stage (checked at construction)
        mean_logits = logits_sum / len(self.stages)
        num_classes = mean_logits.shape[-1]
        final = self.stages[last]
        # the one box of each RoI stands for every class in Faster R-CNN's post-processing
        found = final.postprocess_detections(mean_logits, box_regression.repeat(1, num_classes),
                                             boxes, image_shapes)
        return [{"boxes": b, "labels": c, "scores": s} for b, s, c in zip(*found)]


class LibraCascadeRCNN(LibraFasterRCNN):
    """Cascade R-CNN from its parts: backbone, RPN, :class:`CascadeRoIHeads` and transform.

    ``forward(images, targets=None)``: torchvision's contract, with the losses
    ``loss_objectness, loss_rpn_box_reg`` and ``s{k}.loss_classifier, s{k}.loss_box_reg`` for
    every stage ``k`` in training; ``[{"boxes", "labels", "scores"}]`` at inference.
    """

    def __init__(self, backbone: nn.Module, rpn: LibraRegionProposalNetwork,
                 roi_heads: CascadeRoIHeads, transform: GeneralizedRCNNTransform) -> None:
        if not isinstance(roi_heads, CascadeRoIHeads):
            raise ValueError(f"roi_heads must be a CascadeRoIHeads, got {type(roi_heads).__name__}")
        super().__init__(backbone, rpn, roi_heads, transform)
