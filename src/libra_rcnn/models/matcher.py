"""TEMPORARY placeholder (the parity branch brings the real one)."""
import torch
from torchvision.models.detection._utils import Matcher


class MaxIoUMatcher(Matcher):
    def __init__(self, high_threshold, low_threshold, *, allow_low_quality_matches, min_pos_iou):
        super().__init__(high_threshold, low_threshold, allow_low_quality_matches=False)
        self.low_quality = allow_low_quality_matches
        self.min_pos_iou = min_pos_iou

    def __call__(self, match_quality_matrix):
        matches = super().__call__(match_quality_matrix)
        if self.low_quality and match_quality_matrix.numel():
            best = match_quality_matrix.max(dim=1).values
            for i in range(match_quality_matrix.shape[0]):
                if best[i] >= self.min_pos_iou:
                    matches[match_quality_matrix[i] == best[i]] = i
        return matches
