"""Feature heatmaps before and after the balanced feature pyramid (Libra R-CNN, Figure 4).

The balanced feature pyramid (Sec. 3.2) adds the same refined, integrated feature to every level
of the neck's output. The heatmap of a level is the channel mean of the absolute activation,
``H_l(y, x) = mean_c |P_l[c, y, x]|``; comparing the neck's output with the strengthened levels
shows how each level receives information from the others.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Optional

import torch
from torch import Tensor, nn

from ..errors import UserInputError
from ..models.mode import eval_mode
from ._common import (
    PathLike,
    model_device,
    save_figure,
)

__all__ = ["activation_heatmap", "bfp_heatmaps"]


def activation_heatmap(feature: Tensor) -> Tensor:
    """Channel mean of the absolute activation: ``[C, h, w] -> [h, w]`` (float32)."""
    if feature.dim() != 3:
        raise ValueError(f"feature must be [C, h, w], got shape {tuple(feature.shape)}")
    return feature.detach().float().abs().mean(dim=0)


def _pyramid_parts(model: nn.Module) -> tuple[nn.Module, nn.Module, nn.Module]:
    backbone = getattr(model, "backbone", None)
    if backbone is None or not hasattr(model, "transform"):
        raise UserInputError(f"model: bfp-heatmaps needs a detector with transform and backbone, "
                         f"got {type(model).__name__}")
    bfp = getattr(backbone, "bfp", None)
    if bfp is None:
        raise UserInputError("model has no balanced feature pyramid (backbone.bfp is None): "
                         "bfp-heatmaps needs a model built with model.bfp.enabled=true")
    for name in ("body", "fpn"):
        if not hasattr(backbone, name):
            raise UserInputError(f"model.backbone has no {name!r}: expected a LibraBackboneWithFPN "
                             f"(body -> fpn -> bfp)")
    return backbone.body, backbone.fpn, bfp


@torch.no_grad()
def bfp_heatmaps(model: nn.Module, image: Tensor, out_png: Optional[PathLike] = None) -> dict:
    """Per-level heatmaps of the neck output and of the balanced feature pyramid's output.

    Runs ``transform -> backbone.body -> backbone.fpn`` (the neck: FPN or PAFPN) and then
    ``backbone.bfp`` in eval mode. Each map is cropped to the part of the padded batch that
    covers the image (``ceil(h_l * h_image / h_padded)`` rows, likewise columns).

    Args:
        model: a detector whose ``backbone`` has ``body``, ``fpn`` and ``bfp``
            (``ModelConfig.bfp.enabled``); ``ValueError`` otherwise.
        image: ``FloatTensor[3, H, W]`` in ``[0, 1]``.
        out_png: when given, a 2 x L grid (top: neck output, bottom: after BFP; each level
            column on one colour scale) is written there.

    Returns:
        ``{"levels": [names], "before": [FloatTensor[h_l, w_l]], "after": [...],
        "image_size": (h, w) of the transformed image, "files": {...}}``.
    """
    body, neck, bfp = _pyramid_parts(model)
    if not isinstance(image, Tensor) or image.dim() != 3:
        raise ValueError(f"image must be a FloatTensor[3, H, W], got {getattr(image, 'shape', image)!r}")
    with eval_mode(model):
        image_list, _ = model.transform([image.to(model_device(model))])
        before = neck(body(image_list.tensors))
        after = bfp(before)
    padded_h, padded_w = image_list.tensors.shape[-2:]
    image_h, image_w = (int(v) for v in image_list.image_sizes[0])

    def crop(feature: Tensor) -> Tensor:
        h, w = feature.shape[-2:]
        rows = max(1, math.ceil(h * image_h / padded_h))
        cols = max(1, math.ceil(w * image_w / padded_w))
        return activation_heatmap(feature[0, :, :rows, :cols]).cpu()

    levels = list(before.keys())
    result = {
        "levels": levels,
        "before": [crop(before[name]) for name in levels],
        "after": [crop(after[name]) for name in levels],
        "image_size": (image_h, image_w),
        "files": {},
    }
    if out_png is not None:
        result["files"]["png"] = str(_plot(result, out_png))
    return result


def _plot(result: dict, out_png: PathLike) -> Path:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    levels = result["levels"]
    num = len(levels)
    fig = Figure(figsize=(2.6 * num, 5.4))
    FigureCanvasAgg(fig)
    axes = fig.subplots(2, num, squeeze=False)
    for col, name in enumerate(levels):
        maps = (result["before"][col], result["after"][col])
        vmax = max(float(m.max()) for m in maps) or 1.0
        for row, (heat, label) in enumerate(zip(maps, ("neck output", "after BFP"))):
            ax = axes[row][col]
            image = ax.imshow(heat.numpy(), cmap="jet", vmin=0.0, vmax=vmax)
            ax.set_xticks([])
            ax.set_yticks([])
            if row == 0:
                ax.set_title(f"level {name} ({heat.shape[0]}x{heat.shape[1]})")
            if col == 0:
                ax.set_ylabel(label)
        fig.colorbar(image, ax=[axes[0][col], axes[1][col]], shrink=0.8)
    fig.suptitle("mean |activation| per pyramid level")
    return save_figure(fig, out_png)
