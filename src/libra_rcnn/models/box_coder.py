"""Box delta coding and the post-processing rules that differ between the two conventions.

* :class:`MMDetBoxCoder` is torchvision's ``BoxCoder`` with mmdetection's
  ``DeltaXYWHBBoxCoder`` arithmetic: deltas are multiplied by ``stds = 1 / weights`` and the
  log-size deltas are clamped on both sides to ``|log(16 / 1000)|`` (torchvision clamps only from
  above, so a very negative delta can shrink a box to nothing).
* Small-box removal: torchvision's RPN drops proposals narrower than 1e-3 px and its RoI heads
  detections narrower than 1e-2 px; mmdetection's RPN and RetinaNet drop only boxes of zero (or
  negative) width or height, and its R-CNN head drops none. Each rule is a function
  ``boxes [N, 4] -> kept indices``.
* Batched NMS: mmdetection offsets the boxes of each class apart and runs one NMS when there are
  fewer than 10000 boxes, one NMS per class otherwise; torchvision switches at 1000 (CPU) or 5000
  (CUDA) boxes. The two give the same boxes except where float rounding of the offset coordinates
  decides an IoU at the threshold; :func:`mmdet_batched_nms` follows mmdetection exactly.

:class:`BoxParts` groups the four parts a detector head takes from its convention (matcher, box
coder, small-box rule, batched NMS); ``libra_rcnn.models.conventions`` builds one per head.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Optional

import torch
from torch import Tensor
from torchvision.models.detection._utils import BoxCoder, Matcher
from torchvision.ops import boxes as box_ops

__all__ = [
    "MIN_DETECTION_SIZE",
    "MIN_PROPOSAL_SIZE",
    "BoxFilter",
    "BoxParts",
    "MMDetBoxCoder",
    "BatchedNMS",
    "keep_all_boxes",
    "keep_boxes_at_least",
    "keep_nonempty_boxes",
    "mmdet_batched_nms",
]

BoxFilter = Callable[[Tensor], Tensor]
BatchedNMS = Callable[[Tensor, Tensor, Tensor, float], Tensor]

_MMDET_SPLIT_THRESHOLD = 10000

#: torchvision's small-box rules (pixels): its RPN drops narrower or lower proposals, its RoI
#: heads narrower or lower detections.
MIN_PROPOSAL_SIZE = 1e-3
MIN_DETECTION_SIZE = 1e-2


@dataclass(frozen=True)
class BoxParts:
    """The convention's parts of one detector head, handed in together.

    Attributes:
        matcher: anchor / RoI to ground-truth matcher (``Matcher`` or a subclass).
        box_coder: delta coder (``BoxCoder`` or :class:`MMDetBoxCoder`).
        box_filter: ``boxes [N, 4] -> kept indices``, applied to the clipped boxes before NMS;
            ``None`` keeps every box.
        batched_nms: ``(boxes, scores, groups, iou) -> kept indices`` by decreasing score.
    """

    matcher: Matcher
    box_coder: BoxCoder
    box_filter: Optional[BoxFilter]
    batched_nms: BatchedNMS


class MMDetBoxCoder(BoxCoder):
    """``BoxCoder`` with mmdetection's ``DeltaXYWHBBoxCoder`` encode / decode (see module doc).

    Args:
        weights: torchvision's weights ``(wx, wy, ww, wh)``; mmdetection's ``target_stds`` are
            their reciprocals (``(10, 10, 5, 5)`` <-> ``(0.1, 0.1, 0.2, 0.2)``).
    """

    def __init__(self, weights: tuple[float, float, float, float]) -> None:
        super().__init__(weights, bbox_xform_clip=abs(math.log(16 / 1000)))
        self.stds = tuple(1.0 / w for w in weights)

    def encode_single(self, reference_boxes: Tensor, proposals: Tensor) -> Tensor:
        """Deltas ``[N, 4]`` that move ``proposals [N, 4]`` onto ``reference_boxes [N, 4]``."""
        proposals = proposals.to(reference_boxes.dtype)
        pxy = (proposals[:, :2] + proposals[:, 2:]) * 0.5
        pwh = proposals[:, 2:] - proposals[:, :2]
        gxy = (reference_boxes[:, :2] + reference_boxes[:, 2:]) * 0.5
        gwh = reference_boxes[:, 2:] - reference_boxes[:, :2]
        deltas = torch.cat([(gxy - pxy) / pwh, torch.log(gwh / pwh)], dim=1)
        return deltas / deltas.new_tensor(self.stds)

    def decode_single(self, rel_codes: Tensor, boxes: Tensor) -> Tensor:
        """Boxes ``[N, K * 4]`` from deltas ``[N, K * 4]`` applied to ``boxes [N, 4]`` (unclipped)."""
        boxes = boxes.to(rel_codes.dtype)
        num_boxes = rel_codes.shape[0]
        deltas = rel_codes.reshape(-1, 4) * rel_codes.new_tensor(self.stds)
        rois = boxes.repeat(1, rel_codes.shape[1] // 4).reshape(-1, 4)
        pxy = (rois[:, :2] + rois[:, 2:]) * 0.5
        pwh = rois[:, 2:] - rois[:, :2]
        dwh = deltas[:, 2:].clamp(min=-self.bbox_xform_clip, max=self.bbox_xform_clip)
        gxy = pxy + pwh * deltas[:, :2]
        gwh = pwh * dwh.exp()
        decoded = torch.cat([gxy - gwh * 0.5, gxy + gwh * 0.5], dim=-1)
        return decoded.reshape(num_boxes, rel_codes.shape[1])


def keep_boxes_at_least(min_size: float) -> BoxFilter:
    """torchvision's rule: keep boxes whose width and height are ``>= min_size``."""
    def keep(boxes: Tensor) -> Tensor:
        return box_ops.remove_small_boxes(boxes, min_size)
    return keep


def keep_all_boxes(boxes: Tensor) -> Tensor:
    """mmdetection's R-CNN head rule: keep every box."""
    return torch.arange(boxes.shape[0], device=boxes.device)


def keep_nonempty_boxes(boxes: Tensor) -> Tensor:
    """mmdetection's ``min_bbox_size=0`` rule: keep boxes of positive width and height."""
    widths, heights = boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]
    return torch.where((widths > 0) & (heights > 0))[0]


def mmdet_batched_nms(boxes: Tensor, scores: Tensor, idxs: Tensor, iou_threshold: float) -> Tensor:
    """NMS within each ``idxs`` group, mmdetection's way; kept indices by decreasing score."""
    if boxes.numel() == 0:
        return torch.empty((0,), dtype=torch.int64, device=boxes.device)
    if boxes.shape[0] < _MMDET_SPLIT_THRESHOLD:
        offsets = idxs.to(boxes) * (boxes.max() + torch.tensor(1).to(boxes))
        return box_ops.nms(boxes + offsets[:, None], scores, iou_threshold)
    keep_mask = torch.zeros_like(scores, dtype=torch.bool)
    for group in torch.unique(idxs):
        members = torch.where(idxs == group)[0]
        keep_mask[members[box_ops.nms(boxes[members], scores[members], iou_threshold)]] = True
    kept = torch.where(keep_mask)[0]
    return kept[scores[kept].sort(descending=True)[1]]

