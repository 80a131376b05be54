"""mmdetection's ``MaxIoUAssigner`` rule as a torchvision ``Matcher``.

torchvision's ``Matcher`` and mmdetection's ``MaxIoUAssigner`` agree on the thresholds (positive
at IoU ``>= high``, negative below ``low``, ignored in between) but not on the low-quality step:

* torchvision: every prediction that is the best match of some ground truth (ties included) gets
  its *own* best ground truth, whatever that IoU is;
* mmdetection (``match_low_quality=True``, ``gt_max_assign_all=True``): for each ground truth
  ``i`` in order whose best IoU is ``>= min_pos_iou``, every prediction whose IoU with ``i``
  equals that best IoU is assigned *to ``i``* (so a later ground truth overwrites an earlier one,
  and a positive's step-3 match can change). With ``min_pos_iou = 0`` even a ground truth that
  overlaps nothing promotes every prediction at IoU 0 with it.

:class:`MaxIoUMatcher` implements mmdetection's rule with torchvision's encoding, so it drops
into torchvision's RPN, ``RoIHeads`` and RetinaNet.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torchvision.models.detection._utils import Matcher

__all__ = ["MaxIoUMatcher"]


class MaxIoUMatcher(Matcher):
    """Assign each prediction a ground truth by mmdetection's ``MaxIoUAssigner`` rule.

    Args:
        high_threshold: IoU ``>=`` it is positive (mmdetection's ``pos_iou_thr``).
        low_threshold: IoU ``<`` it is negative (``neg_iou_thr``); in between is ignored.
        allow_low_quality_matches: mmdetection's ``match_low_quality`` (with
            ``gt_max_assign_all=True``, its default).
        min_pos_iou: a ground truth promotes its best predictions only if their IoU is
            ``>=`` this.

    Settings of the reference configs: RPN ``(0.7, 0.3, True, 0.3)``, RetinaNet
    ``(0.5, 0.4, True, 0.0)``, R-CNN ``(0.5, 0.5, False, 0.5)``.
    """

    def __init__(self, high_threshold: float, low_threshold: float, *,
                 allow_low_quality_matches: bool, min_pos_iou: float) -> None:
        super().__init__(high_threshold, low_threshold, allow_low_quality_matches)
        self.min_pos_iou = min_pos_iou

    def __call__(self, match_quality_matrix: Tensor) -> Tensor:
        """Match ``M`` ground truths to ``N`` predictions.

        Args:
            match_quality_matrix: ``[M, N]`` IoUs in ``[0, 1]`` (``M = 0`` is allowed: all
                negative, as mmdetection; torchvision's ``Matcher`` raises).
        Returns:
            int64 ``[N]``: the matched ground truth in ``[0, M)``, ``BELOW_LOW_THRESHOLD`` (-1,
            negative) or ``BETWEEN_THRESHOLDS`` (-2, ignored).
        """
        iou = match_quality_matrix
        num_gts, num_preds = iou.shape
        if num_gts == 0 or num_preds == 0:
            return torch.full((num_preds,), self.BELOW_LOW_THRESHOLD, dtype=torch.int64,
                              device=iou.device)
        matched_vals, matches = iou.max(dim=0)
        matches = torch.where(matched_vals >= self.high_threshold, matches,
                              torch.full_like(matches, self.BETWEEN_THRESHOLDS))
        matches[matched_vals < self.low_threshold] = self.BELOW_LOW_THRESHOLD
        if self.allow_low_quality_matches:
            matches = self._promote_best_predictions(iou, matches)
        return matches

    def _promote_best_predictions(self, iou: Tensor, matches: Tensor) -> Tensor:
        """mmdetection's step 4, vectorised: each prediction goes to the LAST ground truth
        (largest index) that qualifies and has it among its best predictions."""
        best_per_gt = iou.max(dim=1).values  # [M]
        is_best = (iou == best_per_gt[:, None]) & (best_per_gt >= self.min_pos_iou)[:, None]
        gt_number = torch.arange(1, iou.shape[0] + 1, device=iou.device)[:, None]  # 1-based
        last = (is_best * gt_number).amax(dim=0)  # [N], 0 where no ground truth promotes
        return torch.where(last > 0, last - 1, matches)
