"""RoI feature extraction of the two conventions.

torchvision's ``MultiScaleRoIAlign`` samples 2 x 2 points per bin with ``aligned=False`` (no
half-pixel shift) and picks the level by ``floor(4 + log2(sqrt(area) / 224) + 1e-6)``.
mmdetection's ``SingleRoIExtractor`` with ``RoIAlign(sampling_ratio=0, aligned=True)`` samples
``ceil(roi_size / output_size)`` points per bin, shifts by half a pixel and picks the level by
``floor(log2(sqrt(area) / 56 + 1e-6))``. :class:`MMDetMultiScaleRoIAlign` is the latter with
torchvision's interface, so it drops into ``RoIHeads`` as ``box_roi_pool``.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor
from torchvision.ops import MultiScaleRoIAlign, roi_align

__all__ = ["MMDetMultiScaleRoIAlign", "mmdet_roi_levels"]


def mmdet_roi_levels(rois: Tensor, num_levels: int, finest_scale: float = 56.0) -> Tensor:
    """Pyramid level of each RoI: ``floor(log2(sqrt(w * h) / finest_scale + 1e-6))``, clamped to
    ``[0, num_levels)``.

    Args:
        rois: ``[K, 5]`` rows ``(batch_index, x1, y1, x2, y2)``.

    Returns:
        int64 ``[K]``.
    """
    scale = torch.sqrt((rois[:, 3] - rois[:, 1]) * (rois[:, 4] - rois[:, 2]))
    levels = torch.floor(torch.log2(scale / finest_scale + 1e-6))
    return levels.clamp(min=0, max=num_levels - 1).long()


class MMDetMultiScaleRoIAlign(MultiScaleRoIAlign):
    """RoIAlign over fixed-stride pyramid levels, mmdetection's way (see the module docstring).

    Args:
        featmap_names: the feature maps to pool from, finest first (``["0", "1", "2", "3"]``).
        output_size: pooled size (7).
        strides: each map's stride (``(4, 8, 16, 32)``); spatial scale ``1 / stride``.
        sampling_ratio: points per bin side (0: adaptive, mmdetection's).
        finest_scale: RoIs up to this size (sqrt of area) go to level 0 (56).

    ``forward(x, boxes, image_shapes)``: ``x`` a dict of ``[B, C, H_l, W_l]`` maps, ``boxes`` one
    ``[K_i, 4]`` tensor per image in input-image coordinates; returns ``[sum K_i, C, out, out]``.
    """

    def __init__(self, featmap_names: Sequence[str], output_size: int = 7, *,
                 strides: Sequence[int] = (4, 8, 16, 32), sampling_ratio: int = 0,
                 finest_scale: float = 56.0) -> None:
        if len(strides) != len(featmap_names):
            raise ValueError(f"one stride per feature map: {len(featmap_names)} maps, "
                             f"{len(strides)} strides")
        super().__init__(list(featmap_names), output_size, sampling_ratio)
        self.strides = tuple(int(s) for s in strides)
        self.finest_scale = float(finest_scale)

    def forward(self, x: dict[str, Tensor], boxes: list[Tensor],
                image_shapes: list[tuple[int, int]]) -> Tensor:
        features = [x[name] for name in self.featmap_names]
        rois = torch.cat([torch.cat([torch.full_like(b[:, :1], i), b], dim=1)
                          for i, b in enumerate(boxes)])
        levels = mmdet_roi_levels(rois, len(features), self.finest_scale)
        result = features[0].new_zeros((rois.shape[0], features[0].shape[1], *self.output_size))
        for level, (feature, stride) in enumerate(zip(features, self.strides)):
            index = torch.where(levels == level)[0]
            pooled = roi_align(feature, rois[index], self.output_size, spatial_scale=1.0 / stride,
                               sampling_ratio=self.sampling_ratio, aligned=True)
            if torch.jit.is_tracing():  # out of place: the exported graph keeps the writes
                result = result.index_put((index,), pooled.to(result.dtype))
            else:  # in place: no copy of all RoIs' features per level
                result[index] = pooled.to(result.dtype)
        return result
