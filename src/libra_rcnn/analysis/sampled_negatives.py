"""Negatives chosen by random and by IoU-balanced sampling on one image (Libra R-CNN, Figure 6).

Both samplers draw the same number of negatives from the same RoI candidates (the model's
proposals plus ground truth, matched as in training; negatives have IoU below the background
threshold). Drawn side by side, random picks scatter over the background, while IoU-balanced picks
gather around the objects, where the informative (harder) negatives are.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping, Optional

import torch
from torch import Tensor, nn

from libra_rcnn.checks import check_positive_int
from libra_rcnn.ops.iou_balanced_sampler import iou_balanced_negative_sample, random_choice

from ._common import (
    PathLike,
    roi_candidates,
    sampler_settings,
    save_figure,
)

__all__ = ["sample_visualization"]

_NEGATIVE_COLOUR = "#ff00ff"  # magenta: rare in natural images
_GT_COLOUR = "#34c759"


def sample_visualization(
    model: nn.Module,
    image: Tensor,
    target: Mapping[str, Any],
    *,
    num_neg: int = 64,
    seed: int = 0,
    num_bins: Optional[int] = None,
    out_png: Optional[PathLike] = None,
) -> dict:
    """Choose ``num_neg`` negatives of ``image`` at random and IoU-balanced, and draw both.

    Args:
        model: a two-stage detector (see :func:`libra_rcnn.analysis.iou_distribution.iou_histograms`).
        image: ``FloatTensor[3, H, W]`` in ``[0, 1]``.
        target: ``{"boxes": FloatTensor[G, 4] xyxy, "labels": Int64Tensor[G]}`` (original pixels).
        num_neg: negatives per sampler (each takes ``min(num_neg, M)`` of the ``M`` candidates).
        seed: seeds the ``torch.Generator`` both samplers draw from (random first).
        num_bins: ``K`` of the IoU-balanced sampler; default the model's.
        out_png: when given, the two panels (left random, right IoU-balanced; negatives magenta,
            ground truth green) are written there.

    Returns:
        ``{"random": {"boxes": FloatTensor[n, 4], "ious": FloatTensor[n]}, "iou_balanced":
        {...}, "gt_boxes": FloatTensor[G, 4], "num_candidates": M, "files": {...}}`` with boxes in
        the original image's pixels.
    """
    check_positive_int(num_neg, "num_neg")
    settings = sampler_settings(model)
    num_bins = settings["num_bins"] if num_bins is None else num_bins
    check_positive_int(num_bins, "num_bins")
    from torchvision.models.detection.transform import resize_boxes

    cand = roi_candidates(model, image, target)
    generator = torch.Generator().manual_seed(seed)
    neg = cand.neg_inds
    picks = {
        "random": random_choice(neg, num_neg, generator),
        "iou_balanced": iou_balanced_negative_sample(
            neg, cand.max_overlaps, num_neg, num_bins=num_bins, floor_thr=settings["floor_thr"],
            floor_fraction=settings["floor_fraction"], binning=settings["binning"],
            generator=generator),
    }

    def to_original(boxes: Tensor) -> Tensor:
        return resize_boxes(boxes, list(cand.image_size), list(cand.original_size)).cpu()

    result: dict = {
        name: {"boxes": to_original(cand.boxes[inds]), "ious": cand.max_overlaps[inds].cpu()}
        for name, inds in picks.items()
    }
    result["gt_boxes"] = to_original(cand.gt_boxes)
    result["num_candidates"] = int(neg.numel())
    result["files"] = {}
    if out_png is not None:
        result["files"]["png"] = str(_plot(image, result, out_png))
    return result


def _draw_boxes(image: Tensor, negatives: Tensor, gt_boxes: Tensor) -> Tensor:
    """``uint8[3, H, W]``: the negatives (thin, magenta) and the ground truth on top (green)."""
    from torchvision.transforms.v2.functional import to_dtype
    from torchvision.utils import draw_bounding_boxes

    pixels = to_dtype(image.detach().cpu().float().clamp(0, 1), torch.uint8, scale=True)
    for boxes, colour, width in ((negatives, _NEGATIVE_COLOUR, 1), (gt_boxes, _GT_COLOUR, 2)):
        if boxes.numel():
            pixels = draw_bounding_boxes(pixels, boxes.round(), colors=colour, width=width)
    return pixels


def _plot(image: Tensor, result: dict, out_png: PathLike) -> Path:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    height, width = image.shape[-2:]
    fig = Figure(figsize=(10.0, 5.0 * height / max(width, 1) + 0.6))
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, 2)
    titles = {"random": "random sampling", "iou_balanced": "IoU-balanced sampling"}
    for ax, name in zip(axes, ("random", "iou_balanced")):
        drawn = _draw_boxes(image, result[name]["boxes"], result["gt_boxes"])
        ax.imshow(drawn.permute(1, 2, 0).numpy(), interpolation="nearest")
        ious = result[name]["ious"]
        mean_iou = float(ious.mean()) if ious.numel() else 0.0
        ax.set_title(f"{titles[name]}\n{ious.numel()} negatives, mean IoU {mean_iou:.3f}")
        ax.axis("off")
    return save_figure(fig, out_png)
