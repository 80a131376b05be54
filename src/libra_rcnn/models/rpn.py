"""Region proposal network with a configurable box loss, and the RPN-only detector.

:class:`LibraRegionProposalNetwork` is torchvision's ``RegionProposalNetwork`` with

* the anchor sampler of :func:`libra_rcnn.ops.sample_positives_negatives` (random, as
  torchvision's, plus mmdetection's ``neg_pos_ub``: at most ``neg_pos_ub`` negatives per sampled
  positive, 5 in mmdetection's Libra Faster R-CNN) drawing from a generator the module owns;
* mmdetection's ``allowed_border`` (``>= 0``): only anchors inside the image, up to that many
  pixels beyond it, are matched and sampled in training (``-1``: every anchor, as torchvision);
  both are fields of :class:`~.head_settings.AnchorSampling`;
* a configurable box loss (``smooth_l1`` with ``beta = 1/9`` as torchvision, ``l1`` as
  mmdetection, or the balanced L1 loss of Sec. 3.3), normalised as both do: the sum over the
  coordinates of the sampled positive anchors divided by the number of sampled anchors;
* the convention's parts handed in: the anchor generator, and the matcher, box coder,
  small-proposal rule and batched NMS as one :class:`~.box_coder.BoxParts` (:mod:`.conventions`
  builds both sets);
* :meth:`~LibraRegionProposalNetwork.propose`, which also returns the proposals' objectness
  scores (torchvision's ``forward`` drops them), for RPN-only models and proposal dumping.

:class:`LibraRPN` is the RPN as a detector of its own (Table 3): transform + backbone + RPN,
returning losses in training and per-image ``{"boxes", "scores"}`` at inference.
"""

from __future__ import annotations

from typing import Any, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.image_list import ImageList
from torchvision.models.detection.rpn import RegionProposalNetwork, concat_box_prediction_layers
from torchvision.models.detection.transform import GeneralizedRCNNTransform
from torchvision.ops import boxes as box_ops

from ..ops.iou_balanced_sampler import SamplingSettings, sample_positives_negatives
from .box_coder import BoxParts
from .box_losses import box_regression_loss_sum, check_box_loss_config
from .config import BoxLossConfig, default_rpn_box_loss
from .conventions import TorchvisionConvention
from .head_settings import AnchorSampling, ProposalSettings
from .validation import validate_inputs

__all__ = ["LibraRegionProposalNetwork", "LibraRPN"]


class LibraRegionProposalNetwork(RegionProposalNetwork):
    """torchvision's RPN with a configurable anchor sampler, box loss and convention parts.

    Args:
        anchor_generator, head: as torchvision's ``RegionProposalNetwork``.
        proposals: :class:`ProposalSettings` (default: torchvision's 2000 / 1000 per level before
            NMS, 2000 / 1000 after, in training / at inference; NMS at 0.7).
        sampling: :class:`AnchorSampling` (default: 256 anchors per image, half positive, no
            negative cap, every anchor, as torchvision).
        box_loss: :class:`BoxLossConfig` of the anchor regression loss (default smooth L1, 1/9).
        box_parts: :class:`BoxParts`: anchor matcher, delta coder, the rule applied to clipped
            proposals before NMS, batched NMS (default torchvision's:
            ``TorchvisionConvention().rpn_box_parts()``).
        generator: optional ``torch.Generator`` for the anchor sampling (``None``: global RNG).
    """

    def __init__(
        self,
        anchor_generator: AnchorGenerator,
        head: nn.Module,
        *,
        proposals: Optional[ProposalSettings] = None,
        sampling: Optional[AnchorSampling] = None,
        box_loss: Optional[BoxLossConfig] = None,
        box_parts: Optional[BoxParts] = None,
        generator: Optional[torch.Generator] = None,
    ) -> None:
        proposals = ProposalSettings() if proposals is None else proposals
        sampling = AnchorSampling() if sampling is None else sampling
        box_parts = TorchvisionConvention().rpn_box_parts() if box_parts is None else box_parts
        super().__init__(anchor_generator, head, 0.7, 0.3, sampling.batch_size_per_image,
                         sampling.positive_fraction, proposals.pre_nms_top_n,
                         proposals.post_nms_top_n, proposals.nms_thresh,
                         score_thresh=proposals.score_thresh)
        self.proposal_matcher = box_parts.matcher
        self.box_coder = box_parts.box_coder
        self.box_filter = box_parts.box_filter
        self.batched_nms = box_parts.batched_nms
        self.box_loss = check_box_loss_config(
            default_rpn_box_loss() if box_loss is None else box_loss, "rpn_box_loss")
        # random anchors (the IoU-balanced parts are off), checked by AnchorSampling
        self.sampling = SamplingSettings(num=sampling.batch_size_per_image,
                                         pos_fraction=sampling.positive_fraction,
                                         neg_pos_ub=float(sampling.neg_pos_ub))
        self.allowed_border = float(sampling.allowed_border)
        self.generator = generator

    @property
    def batch_size_per_image(self) -> int:
        return self.sampling.num

    @property
    def positive_fraction(self) -> float:
        return self.sampling.pos_fraction

    @property
    def neg_pos_ub(self) -> float:
        return self.sampling.neg_pos_ub

    def assign_anchors_inside(
        self, anchors: list[Tensor], targets: list[dict[str, Tensor]],
        image_sizes: list[tuple[int, int]],
    ) -> tuple[list[Tensor], list[Tensor]]:
        """torchvision's ``assign_targets_to_anchors`` over the anchors inside each image (see
        ``allowed_border``); the others get label ``-1`` (ignored) and a zero box.

        Shapes: per image ``anchors [A, 4]``, ``image_sizes (h, w)``; returns per image labels
        ``[A]`` (1, 0, -1, float) and matched ground-truth boxes ``[A, 4]``.
        """
        if self.allowed_border < 0:
            return self.assign_targets_to_anchors(anchors, targets)
        border = self.allowed_border
        labels, matched_boxes = [], []
        for anchors_i, target, (height, width) in zip(anchors, targets, image_sizes):
            inside = ((anchors_i[:, 0] >= -border) & (anchors_i[:, 1] >= -border)
                      & (anchors_i[:, 2] < width + border) & (anchors_i[:, 3] < height + border))
            inside_labels, inside_boxes = self.assign_targets_to_anchors([anchors_i[inside]], [target])
            labels_i = anchors_i.new_full((anchors_i.shape[0],), -1.0)
            labels_i[inside] = inside_labels[0]
            boxes_i = anchors_i.new_zeros(anchors_i.shape)
            boxes_i[inside] = inside_boxes[0]
            labels.append(labels_i)
            matched_boxes.append(boxes_i)
        return labels, matched_boxes

    def subsample(self, labels: list[Tensor]) -> tuple[list[Tensor], list[Tensor]]:
        """Sample anchors per image.

        Args:
            labels: per image ``Tensor[A]`` with 1 (positive), 0 (negative), -1 (ignored), as
                ``assign_targets_to_anchors`` returns them (float).
        Returns:
            ``(pos_inds, neg_inds)``: per image LongTensors of anchor indices.
        """
        pos_per_image, neg_per_image = [], []
        for labels_per_image in labels:
            int_labels = labels_per_image.to(torch.int64)
            # IoU-balanced parts are off here, so the overlaps are never read
            unused = torch.zeros_like(int_labels)
            pos, neg = sample_positives_negatives(int_labels, unused.to(torch.float32), unused,
                                                  self.sampling, generator=self.generator)
            pos_per_image.append(pos)
            neg_per_image.append(neg)
        return pos_per_image, neg_per_image

    def compute_loss(
        self, objectness: Tensor, pred_bbox_deltas: Tensor, labels: list[Tensor],
        regression_targets: list[Tensor],
    ) -> tuple[Tensor, Tensor]:
        """Objectness BCE (mean over sampled anchors) and box loss (sum over sampled positives'
        coordinates / number of sampled anchors), as torchvision's ``compute_loss``.

        Shapes: ``objectness [sum_i A_i, 1]``, ``pred_bbox_deltas [sum_i A_i, 4]``,
        ``labels`` / ``regression_targets`` per image ``[A_i]`` / ``[A_i, 4]``.
        """
        pos_per_image, neg_per_image = self.subsample(labels)
        offsets = [0]
        for labels_per_image in labels[:-1]:
            offsets.append(offsets[-1] + labels_per_image.numel())
        sampled_pos = torch.cat([p + o for p, o in zip(pos_per_image, offsets)])
        sampled_neg = torch.cat([n + o for n, o in zip(neg_per_image, offsets)])
        sampled = torch.cat([sampled_pos, sampled_neg])

        objectness = objectness.flatten()
        all_labels = torch.cat(labels, dim=0)
        all_targets = torch.cat(regression_targets, dim=0)

        box_loss = box_regression_loss_sum(
            pred_bbox_deltas[sampled_pos], all_targets[sampled_pos], self.box_loss
        ) / max(sampled.numel(), 1)
        objectness_loss = F.binary_cross_entropy_with_logits(objectness[sampled], all_labels[sampled])
        return objectness_loss, box_loss

    def filter_proposals(
        self,
        proposals: Tensor,
        objectness: Tensor,
        image_shapes: list[tuple[int, int]],
        num_anchors_per_level: list[int],
    ) -> tuple[list[Tensor], list[Tensor]]:
        """torchvision's proposal selection with this module's ``box_filter`` and ``batched_nms``:
        the best ``pre_nms_top_n`` per level, clipped, filtered, NMS within each level, the best
        ``post_nms_top_n`` kept.

        Shapes: ``proposals [B, A, 4]``, ``objectness [B * A, 1]``; returns per image
        ``boxes [K, 4]`` and ``scores [K]`` (probabilities), by decreasing score.
        """
        num_images = proposals.shape[0]
        objectness = objectness.detach().reshape(num_images, -1)
        levels = torch.cat([torch.full((n,), index, dtype=torch.int64, device=proposals.device)
                            for index, n in enumerate(num_anchors_per_level)])
        levels = levels.reshape(1, -1).expand_as(objectness)
        top_n = self._get_top_n_idx(objectness, num_anchors_per_level)
        batch = torch.arange(num_images, device=proposals.device)[:, None]
        scores_all = torch.sigmoid(objectness[batch, top_n])
        final_boxes, final_scores = [], []
        for boxes, scores, level, shape in zip(proposals[batch, top_n], scores_all,
                                               levels[batch, top_n], image_shapes):
            boxes = box_ops.clip_boxes_to_image(boxes, shape)
            if self.box_filter is not None:
                keep = self.box_filter(boxes)
                boxes, scores, level = boxes[keep], scores[keep], level[keep]
            keep = torch.where(scores >= self.score_thresh)[0]  # >=, as torchvision
            boxes, scores, level = boxes[keep], scores[keep], level[keep]
            keep = self.batched_nms(boxes, scores, level, self.nms_thresh)[: self.post_nms_top_n()]
            final_boxes.append(boxes[keep])
            final_scores.append(scores[keep])
        return final_boxes, final_scores

    def propose(
        self,
        images: ImageList,
        features: dict[str, Tensor],
        targets: Optional[list[dict[str, Tensor]]] = None,
    ) -> tuple[list[Tensor], list[Tensor], dict[str, Tensor]]:
        """Proposals, their objectness probabilities and (in training) the losses.

        Returns:
            ``boxes``: per image ``Tensor[K, 4]`` in the transformed image's coordinates,
            sorted by decreasing score; ``scores``: per image ``Tensor[K]`` in ``[0, 1]``;
            ``losses``: ``{"loss_objectness", "loss_rpn_box_reg"}`` in training, else ``{}``.
        """
        feature_maps = list(features.values())
        objectness, pred_bbox_deltas = self.head(feature_maps)
        anchors = self.anchor_generator(images, feature_maps)

        num_images = len(anchors)
        # a product of sizes, not numel(): tracing (ONNX export) keeps it a run-time value
        num_anchors_per_level = [a * h * w for _, a, h, w in (o.shape for o in objectness)]
        objectness, pred_bbox_deltas = concat_box_prediction_layers(objectness, pred_bbox_deltas)
        # proposals do not back-propagate into the RPN (as in torchvision / Faster R-CNN)
        proposals = self.box_coder.decode(pred_bbox_deltas.detach(), anchors).view(num_images, -1, 4)
        boxes, scores = self.filter_proposals(proposals, objectness, images.image_sizes,
                                              num_anchors_per_level)

        losses: dict[str, Tensor] = {}
        if self.training:
            if targets is None:
                raise ValueError("targets are required in training mode")
            labels, matched_gt_boxes = self.assign_anchors_inside(anchors, targets, images.image_sizes)
            regression_targets = self.box_coder.encode(matched_gt_boxes, anchors)
            loss_objectness, loss_rpn_box_reg = self.compute_loss(
                objectness, pred_bbox_deltas, labels, regression_targets
            )
            losses = {"loss_objectness": loss_objectness, "loss_rpn_box_reg": loss_rpn_box_reg}
        return boxes, scores, losses

    def forward(
        self,
        images: ImageList,
        features: dict[str, Tensor],
        targets: Optional[list[dict[str, Tensor]]] = None,
    ) -> tuple[list[Tensor], dict[str, Tensor]]:
        """torchvision's contract: ``(boxes per image, losses)``."""
        boxes, _, losses = self.propose(images, features, targets)
        return boxes, losses


class LibraRPN(nn.Module):
    """RPN-only detector: ``transform -> backbone -> rpn`` (the paper's Table 3 models).

    Parameter names (``backbone.*``, ``rpn.*``) match torchvision's ``FasterRCNN``, so its
    weights load into a Faster R-CNN non-strictly and vice versa.

    Args:
        backbone: module with ``out_channels`` returning an ``OrderedDict`` of 5 levels.
        rpn: a :class:`LibraRegionProposalNetwork`.
        transform: resizes, normalises and batches the images (``GeneralizedRCNNTransform``).
        num_classes: only used to check target labels when given (the RPN is class-agnostic).

    ``forward(images, targets=None)``: training returns
    ``{"loss_objectness", "loss_rpn_box_reg"}``; inference returns per image
    ``{"boxes": Tensor[K, 4], "scores": Tensor[K]}`` in original image coordinates, sorted by
    decreasing objectness (``K <= post_nms_top_n["testing"]``).
    """

    def __init__(self, backbone: nn.Module, rpn: LibraRegionProposalNetwork,
                 transform: GeneralizedRCNNTransform, *, num_classes: Optional[int] = None) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.transform = transform
        self.backbone = backbone
        self.rpn = rpn

    def forward(
        self, images: list[Tensor], targets: Optional[list[dict[str, Tensor]]] = None
    ) -> Any:
        validate_inputs(images, targets, training=self.training, num_classes=self.num_classes,
                        require_labels=False)
        # no int(): tracing (ONNX export) keeps the sizes as run-time values
        original_sizes = [(img.shape[-2], img.shape[-1]) for img in images]
        image_list, targets = self.transform(images, targets)
        features = self.backbone(image_list.tensors)
        if isinstance(features, Tensor):
            features = {"0": features}
        boxes, scores, losses = self.rpn.propose(image_list, features, targets)
        if self.training:
            return losses
        results = [{"boxes": b, "scores": s} for b, s in zip(boxes, scores)]
        return self.transform.postprocess(results, image_list.image_sizes, original_sizes)
