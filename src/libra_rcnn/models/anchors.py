"""Anchor generators of the two conventions.

torchvision's ``AnchorGenerator`` rounds its base anchors to whole pixels and derives each level's
stride from the padded image and the feature map (``padded_size // grid_size``), so a level whose
size does not divide the image (P6 of an 800-high input: 13 cells, stride 61 instead of 64) gets
anchors that drift away from their cells. mmdetection's ``AnchorGenerator`` keeps the exact
(unrounded) base anchors and the fixed strides of the pyramid. :class:`FixedStrideAnchorGenerator`
is the latter, as a torchvision ``AnchorGenerator`` that drops into torchvision's RPN and RetinaNet.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.image_list import ImageList

__all__ = [
    "FixedStrideAnchorGenerator",
    "exact_base_anchors",
    "torchvision_rpn_anchor_generator",
    "torchvision_retinanet_anchor_generator",
    "mmdet_rpn_anchor_generator",
    "mmdet_retinanet_anchor_generator",
]

ASPECT_RATIOS = (0.5, 1.0, 2.0)
RPN_STRIDES = (4, 8, 16, 32, 64)  # P2-P6
RETINANET_STRIDES = (8, 16, 32, 64, 128)  # P3-P7


def exact_base_anchors(stride: float, scales: Sequence[float], aspect_ratios: Sequence[float]
                       ) -> Tensor:
    """Base anchors centred on ``(0, 0)`` without rounding (mmdetection's arithmetic).

    Width ``stride * scale / sqrt(ratio)`` and height ``stride * scale * sqrt(ratio)`` for every
    ratio (outer) and scale (inner), in float32.

    Returns:
        ``[len(aspect_ratios) * len(scales), 4]`` boxes ``(x1, y1, x2, y2)``.
    """
    scales_t = torch.tensor(scales, dtype=torch.float32)
    h_ratios = torch.sqrt(torch.tensor(aspect_ratios, dtype=torch.float32))
    w_ratios = 1 / h_ratios
    size = float(stride)
    ws = (size * w_ratios[:, None] * scales_t[None, :]).view(-1)
    hs = (size * h_ratios[:, None] * scales_t[None, :]).view(-1)
    return torch.stack([-0.5 * ws, -0.5 * hs, 0.5 * ws, 0.5 * hs], dim=-1)


class FixedStrideAnchorGenerator(AnchorGenerator):
    """Anchors at fixed strides with exact base anchors (mmdetection's ``AnchorGenerator``).

    Args:
        strides: stride of each feature level, finest first (e.g. ``(4, 8, 16, 32, 64)``).
        scales: per level, the anchor scales in units of the stride (e.g. ``(8,)``).
        aspect_ratios: per level, the height / width ratios.

    ``forward(image_list, feature_maps)`` returns one ``[sum_l H_l * W_l * A, 4]`` tensor per
    image, ordered level, row, column, anchor (torchvision's and mmdetection's order); the anchor of
    cell ``(i, j)`` of level ``l`` is centred on ``(j * stride_l, i * stride_l)``.
    """

    def __init__(self, strides: Sequence[int], scales: Sequence[Sequence[float]],
                 aspect_ratios: Sequence[Sequence[float]]) -> None:
        if not len(strides) == len(scales) == len(aspect_ratios):
            raise ValueError(f"strides, scales and aspect_ratios need one entry per level, got "
                             f"{len(strides)}, {len(scales)} and {len(aspect_ratios)}")
        sizes = tuple(tuple(s * x for x in level) for s, level in zip(strides, scales))
        super().__init__(sizes, tuple(tuple(r) for r in aspect_ratios))
        self.strides = tuple(int(s) for s in strides)
        self.cell_anchors = [exact_base_anchors(s, sc, r)
                             for s, sc, r in zip(self.strides, scales, aspect_ratios)]

    def forward(self, image_list: ImageList, feature_maps: list[Tensor]) -> list[Tensor]:
        if len(feature_maps) != len(self.strides):
            raise ValueError(f"expected {len(self.strides)} feature maps, got {len(feature_maps)}")
        grid_sizes = [f.shape[-2:] for f in feature_maps]
        device = feature_maps[0].device
        strides = [[torch.tensor(s, dtype=torch.int64, device=device)] * 2 for s in self.strides]
        self.set_cell_anchors(feature_maps[0].dtype, device)
        anchors = torch.cat(self.grid_anchors(grid_sizes, strides))
        return [anchors for _ in image_list.image_sizes]


def torchvision_rpn_anchor_generator() -> AnchorGenerator:
    """torchvision's Faster R-CNN anchors: sizes 32..512 on P2-P6, 3 aspect ratios."""
    sizes = tuple((8 * s,) for s in RPN_STRIDES)
    return AnchorGenerator(sizes, (ASPECT_RATIOS,) * len(sizes))


def torchvision_retinanet_anchor_generator() -> AnchorGenerator:
    """torchvision's RetinaNet anchors: 3 octave sizes (truncated to integers) x 3 ratios on P3-P7."""
    sizes = tuple((x, int(x * 2 ** (1.0 / 3)), int(x * 2 ** (2.0 / 3)))
                  for x in (4 * s for s in RETINANET_STRIDES))
    return AnchorGenerator(sizes, (ASPECT_RATIOS,) * len(sizes))


def mmdet_rpn_anchor_generator() -> FixedStrideAnchorGenerator:
    """mmdetection's RPN anchors: scale 8, strides 4..64, 3 ratios."""
    return FixedStrideAnchorGenerator(RPN_STRIDES, ((8.0,),) * 5, (ASPECT_RATIOS,) * 5)


def mmdet_retinanet_anchor_generator() -> FixedStrideAnchorGenerator:
    """mmdetection's RetinaNet anchors: octave base scale 4, 3 scales per octave, strides 8..128."""
    scales = tuple(4.0 * 2 ** (k / 3) for k in range(3))
    return FixedStrideAnchorGenerator(RETINANET_STRIDES, (scales,) * 5, (ASPECT_RATIOS,) * 5)
