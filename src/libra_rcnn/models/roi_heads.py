"""Box RoI heads with IoU-balanced sampling (Sec. 3.1) and a configurable box loss (Sec. 3.3).

:class:`LibraRoIHeads` is torchvision's ``RoIHeads`` (box branch only) with two overrides:

* :meth:`~LibraRoIHeads.select_training_samples` matches proposals to ground truth with
  ``box_iou`` + ``Matcher`` as torchvision does, but samples the RoI minibatch with
  :func:`libra_rcnn.ops.sample_positives_negatives`: instance-balanced positives
  (``pos_balance``), IoU-balanced negatives (``neg_balance``, Eq. 2), or random sampling when both
  are off, from a ``torch.Generator`` owned by the module (``None``: the global RNG).
* :meth:`~LibraRoIHeads.forward` computes the classification loss as torchvision and the box loss
  named by a :class:`~libra_rcnn.models.config.BoxLossConfig` (smooth L1, L1 or balanced L1),
  normalised as torchvision's ``fastrcnn_loss``: the sum over the class-specific deltas of the
  sampled positives divided by the number of sampled RoIs.

Inference is torchvision's ``postprocess_detections`` with the convention's small-box rule and
batched NMS handed in (with its matcher and box coder, as one :class:`~.box_coder.BoxParts`) and
the thresholds of a :class:`~.head_settings.DetectionSettings`. Targets are checked once, by the
detector (:mod:`.validation`).
"""

from __future__ import annotations

from dataclasses import fields
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.models.detection import _utils as det_utils
from torchvision.models.detection.roi_heads import RoIHeads
from torchvision.ops import boxes as box_ops

from ..checks import check_positive_int
from ..ops.iou_balanced_sampler import SamplingSettings, sample_positives_negatives
from .box_coder import BoxParts
from .box_losses import box_regression_loss_sum, check_box_loss_config
from .config import BoxLossConfig, SamplerConfig
from .conventions import TorchvisionConvention
from .head_settings import DetectionSettings

__all__ = ["LibraRoIHeads", "check_sampler_config", "fastrcnn_loss", "match_proposals",
           "sampling_settings"]


def sampling_settings(cfg: SamplerConfig, name: str = "roi_sampler") -> SamplingSettings:
    """The sampler op's settings for ``cfg``, checked (``ValueError`` naming ``name`` and the
    field): a config samples at least one RoI per image."""
    if not isinstance(cfg, SamplerConfig):
        raise ValueError(f"{name} must be a SamplerConfig, got {type(cfg).__name__}")
    check_positive_int(cfg.num, f"{name}.num")
    try:
        return SamplingSettings(**{f.name: getattr(cfg, f.name) for f in fields(SamplingSettings)})
    except ValueError as err:
        raise ValueError(f"{name}.{err}") from None


def check_sampler_config(cfg: SamplerConfig, name: str = "roi_sampler") -> SamplerConfig:
    """Validate ``cfg`` (``ValueError`` naming ``name`` and the field) and return it."""
    sampling_settings(cfg, name)
    return cfg


def match_proposals(
    proposals: Tensor, gt_boxes: Tensor, gt_labels: Tensor, matcher: det_utils.Matcher
) -> tuple[Tensor, Tensor, Tensor]:
    """Assign each proposal of one image to a ground truth (torchvision's rule).

    Args:
        proposals: ``[N, 4]`` boxes; gt_boxes: ``[G, 4]``; gt_labels: int64 ``[G]``.
        matcher: IoU ``Matcher`` (foreground >= its high threshold, background below its low one).

    Returns:
        ``labels`` int64 ``[N]`` (class >= 1 foreground, 0 background, -1 ignored),
        ``max_overlaps`` ``[N]`` (largest IoU with any ground truth; 0 without ground truth),
        ``matched_gt_inds`` int64 ``[N]`` (index of the best ground truth, clamped to >= 0).
    """
    n = proposals.shape[0]
    if gt_boxes.numel() == 0:
        zeros = torch.zeros(n, dtype=torch.int64, device=proposals.device)
        return zeros, torch.zeros(n, dtype=proposals.dtype, device=proposals.device), zeros.clone()
    iou = box_ops.box_iou(gt_boxes, proposals)
    max_overlaps = iou.max(dim=0).values
    matched = matcher(iou)
    matched_gt_inds = matched.clamp(min=0)
    labels = gt_labels[matched_gt_inds].to(torch.int64)
    labels[matched == matcher.BELOW_LOW_THRESHOLD] = 0
    labels[matched == matcher.BETWEEN_THRESHOLDS] = -1
    return labels, max_overlaps, matched_gt_inds


def fastrcnn_loss(
    class_logits: Tensor,
    box_regression: Tensor,
    labels: list[Tensor],
    regression_targets: list[Tensor],
    box_loss: BoxLossConfig,
) -> tuple[Tensor, Tensor]:
    """Fast R-CNN losses (Eq. 4) with a configurable localisation loss.

    Args:
        class_logits: ``[R, num_classes]`` for the ``R`` sampled RoIs of the batch.
        box_regression: ``[R, num_classes * 4]`` class-specific deltas, or ``[R, 4]`` deltas
            shared by every class (class-agnostic regression, as Cascade R-CNN's stages).
        labels: per image int64 ``[R_i]`` (0 background).
        regression_targets: per image ``[R_i, 4]`` encoded targets.
        box_loss: the localisation loss.

    Returns:
        ``(loss_classifier, loss_box_reg)``: cross-entropy averaged over the ``R`` RoIs, and
        ``sum over positives' coordinates of L_loc(t^u - v) / R`` (torchvision's normaliser).
    """
    all_labels = torch.cat(labels, dim=0)
    all_targets = torch.cat(regression_targets, dim=0)
    num_rois = all_labels.numel()
    if num_rois == 0:  # nothing sampled anywhere: zero losses that still reach the parameters
        zero = class_logits.sum() * 0.0 + box_regression.sum() * 0.0
        return zero, zero.clone()
    loss_classifier = F.cross_entropy(class_logits, all_labels)
    pos = torch.where(all_labels > 0)[0]
    per_class = box_regression.reshape(num_rois, -1, 4)
    deltas = per_class[pos, all_labels[pos] if per_class.shape[1] > 1 else 0]
    loss_box_reg = box_regression_loss_sum(deltas, all_targets[pos], box_loss) / num_rois
    return loss_classifier, loss_box_reg


class LibraRoIHeads(RoIHeads):
    """Box RoI heads with a configurable RoI sampler, box loss and convention parts.

    Args:
        box_roi_pool, box_head, box_predictor: as torchvision's ``RoIHeads``.
        sampler: :class:`SamplerConfig` (``num`` RoIs per image, ``pos_fraction``, balancing).
        box_loss: :class:`BoxLossConfig` of the localisation loss.
        detection: :class:`DetectionSettings` of the inference post-processing (default: score
            above 0.05, NMS at 0.5, 100 detections per image).
        box_parts: :class:`BoxParts`: RoI matcher, delta coder, the rule applied to the scored
            detections before NMS, batched NMS (default torchvision's,
            ``TorchvisionConvention().roi_box_parts()``: ``Matcher(0.5, 0.5)``, the same rule as
            mmdetection's R-CNN assigner; ``BoxCoder((10, 10, 5, 5))``; width and height
            ``>= MIN_DETECTION_SIZE``, 1e-2 px; torchvision's batched NMS).
        generator: optional ``torch.Generator`` for the RoI sampling.
    """

    def __init__(
        self,
        box_roi_pool: nn.Module,
        box_head: nn.Module,
        box_predictor: nn.Module,
        *,
        sampler: Optional[SamplerConfig] = None,
        box_loss: Optional[BoxLossConfig] = None,
        detection: Optional[DetectionSettings] = None,
        box_parts: Optional[BoxParts] = None,
        generator: Optional[torch.Generator] = None,
    ) -> None:
        sampler = SamplerConfig() if sampler is None else sampler
        sampling = sampling_settings(sampler)
        detection = DetectionSettings() if detection is None else detection
        box_parts = TorchvisionConvention().roi_box_parts() if box_parts is None else box_parts
        super().__init__(box_roi_pool, box_head, box_predictor, 0.5, 0.5, sampler.num,
                         sampler.pos_fraction, None, detection.score_thresh, detection.nms_thresh,
                         detection.detections_per_img)
        self.proposal_matcher = box_parts.matcher
        self.box_coder = box_parts.box_coder
        self.box_filter = box_parts.box_filter
        self.batched_nms = box_parts.batched_nms
        self.sampler = sampler
        self.sampling = sampling
        self.box_loss = check_box_loss_config(BoxLossConfig() if box_loss is None else box_loss, "box_loss")
        self.generator = generator

    def sample_image(self, labels: Tensor, max_overlaps: Tensor, matched_gt_inds: Tensor) -> Tensor:
        """Indices of the RoIs sampled in one image: positives first, then negatives."""
        pos, neg = sample_positives_negatives(labels, max_overlaps, matched_gt_inds, self.sampling,
                                              generator=self.generator)
        return torch.cat([pos, neg])

    def select_training_samples(
        self, proposals: list[Tensor], targets: Optional[list[dict[str, Tensor]]]
    ) -> tuple[list[Tensor], list[Tensor], list[Tensor], list[Tensor]]:
        """Match, sample and encode the training RoIs of every image.

        Args:
            proposals: per image ``[N_i, 4]`` boxes in the transformed image's coordinates.
            targets: per image ``{"boxes": [G_i, 4], "labels": int64 [G_i]}``.

        Returns:
            torchvision's tuple ``(proposals, matched_idxs, labels, regression_targets)`` of the
            sampled RoIs: ``[R_i, 4]``, int64 ``[R_i]``, int64 ``[R_i]``, ``[R_i, 4]``.
        """
        return self.sample_training_rois(proposals, targets)[:4]

    def sample_training_rois(
        self, proposals: list[Tensor], targets: Optional[list[dict[str, Tensor]]]
    ) -> tuple[list[Tensor], list[Tensor], list[Tensor], list[Tensor], list[Tensor]]:
        """:meth:`select_training_samples` plus, per image, bool ``[R_i]``: which sampled RoIs
        are ground-truth boxes added as proposals (a cascade's next stage leaves them out)."""
        self.check_targets(targets)
        assert targets is not None  # for type checkers; check_targets raised otherwise
        dtype, device = proposals[0].dtype, proposals[0].device
        gt_boxes = [t["boxes"].to(dtype) for t in targets]
        gt_labels = [t["labels"] for t in targets]
        num_proposals = [p.shape[0] for p in proposals]
        if self.sampler.add_gt_as_proposals:
            proposals = self.add_gt_proposals(proposals, gt_boxes)  # appended after the proposals

        sampled_proposals, sampled_matched, sampled_labels, matched_gt_boxes = [], [], [], []
        from_gt = []
        for props, boxes, classes, n in zip(proposals, gt_boxes, gt_labels, num_proposals):
            labels, max_overlaps, matched = match_proposals(props, boxes, classes, self.proposal_matcher)
            keep = self.sample_image(labels, max_overlaps, matched)
            sampled_proposals.append(props[keep])
            sampled_labels.append(labels[keep])
            sampled_matched.append(matched[keep])
            from_gt.append(keep >= n)
            if boxes.numel() == 0:  # background-only image: targets of negatives are never read
                boxes = torch.zeros((1, 4), dtype=dtype, device=device)
            matched_gt_boxes.append(boxes[matched[keep]])
        regression_targets = self.box_coder.encode(matched_gt_boxes, sampled_proposals)
        return sampled_proposals, sampled_matched, sampled_labels, list(regression_targets), from_gt

    def box_outputs(self, features: dict[str, Tensor], proposals: list[Tensor],
                    image_shapes: list[tuple[int, int]]) -> tuple[Tensor, Tensor]:
        """RoI features -> box head -> predictor: ``class_logits [R, C]`` and
        ``box_regression [R, C * 4]`` (``[R, 4]`` for a class-agnostic predictor) for the
        ``R`` boxes of ``proposals`` (per image ``[R_i, 4]``)."""
        box_features = self.box_head(self.box_roi_pool(features, proposals, image_shapes))
        return self.box_predictor(box_features)

    def postprocess_detections(
        self, class_logits: Tensor, box_regression: Tensor, proposals: list[Tensor],
        image_shapes: list[tuple[int, int]],
    ) -> tuple[list[Tensor], list[Tensor], list[Tensor]]:
        """torchvision's detection post-processing with this module's ``box_filter`` and
        ``batched_nms``: per image, every (RoI, foreground class) pair scoring above
        ``score_thresh``, clipped, filtered, class-wise NMS, the best ``detections_per_img``.

        Shapes: ``class_logits [R, C]``, ``box_regression [R, C * 4]``; returns per image
        ``boxes [D, 4]``, ``scores [D]``, ``labels [D]``.
        """
        num_classes = class_logits.shape[-1]
        per_image = [p.shape[0] for p in proposals]
        pred_boxes = self.box_coder.decode(box_regression, proposals).split(per_image)
        pred_scores = F.softmax(class_logits, -1).split(per_image)
        all_boxes, all_scores, all_labels = [], [], []
        for boxes, scores, shape in zip(pred_boxes, pred_scores, image_shapes):
            boxes = box_ops.clip_boxes_to_image(boxes, shape)[:, 1:].reshape(-1, 4)
            labels = torch.arange(num_classes, device=scores.device).expand_as(scores)
            labels, scores = labels[:, 1:].reshape(-1), scores[:, 1:].reshape(-1)
            keep = torch.where(scores > self.score_thresh)[0]
            boxes, scores, labels = boxes[keep], scores[keep], labels[keep]
            if self.box_filter is not None:
                keep = self.box_filter(boxes)
                boxes, scores, labels = boxes[keep], scores[keep], labels[keep]
            keep = self.batched_nms(boxes, scores, labels, self.nms_thresh)[: self.detections_per_img]
            all_boxes.append(boxes[keep])
            all_scores.append(scores[keep])
            all_labels.append(labels[keep])
        return all_boxes, all_scores, all_labels

    def forward(
        self,
        features: dict[str, Tensor],
        proposals: list[Tensor],
        image_shapes: list[tuple[int, int]],
        targets: Optional[list[dict[str, Tensor]]] = None,
    ) -> tuple[list[dict[str, Tensor]], dict[str, Tensor]]:
        """Box branch of torchvision's ``RoIHeads.forward`` with :func:`fastrcnn_loss`.

        Returns ``([], {"loss_classifier", "loss_box_reg"})`` in training and
        ``([{"boxes", "labels", "scores"}, ...], {})`` at inference.
        """
        labels: list[Tensor] = []
        regression_targets: list[Tensor] = []
        if self.training:
            proposals, _, labels, regression_targets = self.select_training_samples(proposals, targets)

        class_logits, box_regression = self.box_outputs(features, proposals, image_shapes)

        if self.training:
            loss_classifier, loss_box_reg = fastrcnn_loss(
                class_logits, box_regression, labels, regression_targets, self.box_loss
            )
            return [], {"loss_classifier": loss_classifier, "loss_box_reg": loss_box_reg}

        boxes, scores, classes = self.postprocess_detections(class_logits, box_regression, proposals,
                                                             image_shapes)
        detections = [{"boxes": b, "labels": c, "scores": s} for b, c, s in zip(boxes, classes, scores)]
        return detections, {}
