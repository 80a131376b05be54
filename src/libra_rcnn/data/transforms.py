"""Joint ``(image, target)`` transforms for detection.

Every transform is a callable ``t(image, target) -> (image, target)`` that returns a *new*
target dict (the input is never modified). ``image`` is a ``FloatTensor[3, H, W]`` in ``[0, 1]``
(``ToTensor`` also accepts a PIL image). Geometric transforms update, when present:

* ``target["boxes"]``: ``FloatTensor[N, 4]`` absolute ``(x1, y1, x2, y2)`` pixels,
* ``target["proposals"]``: ``FloatTensor[K, 4]`` same convention,
* ``target["area"]``: ``FloatTensor[N]`` (scaled with the image by :class:`Resize`).

``target["orig_size"]`` is left alone: it is the size annotations and evaluation refer to.

Randomness comes from torch's global RNG (``torch.rand``), so ``torch.manual_seed`` and the
per-worker seeding done by :class:`torch.utils.data.DataLoader` make runs reproducible.

Resizing here is optional: the detector's ``GeneralizedRCNNTransform`` already resizes every
image to its ``min_size``/``max_size`` (800/1333 by default). Use :class:`Resize` only to shrink
images early (less host-to-device traffic, cheaper collation) or for multi-scale training.
"""

from __future__ import annotations

from typing import Callable, Dict, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from PIL import Image

__all__ = ["Compose", "ToTensor", "RandomHorizontalFlip", "Resize", "build_transforms"]

Target = Dict[str, object]
Transform = Callable[[object, Target], Tuple[object, Target]]

_BOX_KEYS = ("boxes", "proposals")


def _image_size(image) -> Tuple[int, int]:
    """(height, width) of a tensor ``[..., H, W]`` or a PIL image."""
    if isinstance(image, torch.Tensor):
        return int(image.shape[-2]), int(image.shape[-1])
    width, height = image.size
    return height, width


class Compose:
    """Apply transforms in order."""

    def __init__(self, transforms: Sequence[Transform]) -> None:
        transforms = list(transforms)
        for t in transforms:
            if not callable(t):
                raise ValueError(f"transforms must be callables, got {t!r}")
        self.transforms = transforms

    def __call__(self, image, target: Target):
        for t in self.transforms:
            image, target = t(image, target)
        return image, target

    def __repr__(self) -> str:
        inner = ", ".join(repr(t) for t in self.transforms)
        return f"{type(self).__name__}([{inner}])"


class ToTensor:
    """PIL image -> ``FloatTensor[3, H, W]`` in ``[0, 1]``; tensors pass through unchanged."""

    def __call__(self, image, target: Target):
        if isinstance(image, torch.Tensor):
            return image, target
        if not isinstance(image, Image.Image):
            raise ValueError(f"image must be a PIL image or a tensor, got {type(image).__name__}")
        image = image.convert("RGB") if image.mode != "RGB" else image
        data = torch.frombuffer(bytearray(image.tobytes()), dtype=torch.uint8)
        data = data.view(image.size[1], image.size[0], 3).permute(2, 0, 1)
        return data.to(torch.float32).div_(255.0), target

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


def flip_boxes_horizontally(boxes: torch.Tensor, width: int) -> torch.Tensor:
    """Mirror ``[N, 4]`` xyxy boxes in an image of ``width`` pixels: ``x' = width - x``
    (continuous pixel coordinates, so a box touching the left edge touches the right edge)."""
    flipped = boxes.clone()
    flipped[:, 0] = width - boxes[:, 2]
    flipped[:, 2] = width - boxes[:, 0]
    return flipped


class RandomHorizontalFlip:
    """Mirror image, boxes and proposals left-right with probability ``p``."""

    def __init__(self, p: float = 0.5) -> None:
        if isinstance(p, bool) or not isinstance(p, (int, float)) or not 0.0 <= p <= 1.0:
            raise ValueError(f"p must be in [0, 1], got {p!r}")
        self.p = float(p)

    def __call__(self, image, target: Target):
        if torch.rand(()) >= self.p:
            return image, target
        _, width = _image_size(image)
        if isinstance(image, torch.Tensor):
            image = image.flip(-1)
        else:
            image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        target = dict(target)
        for key in _BOX_KEYS:
            if key in target:
                target[key] = flip_boxes_horizontally(target[key], width)
        return image, target

    def __repr__(self) -> str:
        return f"{type(self).__name__}(p={self.p})"


def resized_shape(height: int, width: int, min_size: int, max_size: Optional[int]) -> Tuple[int, int]:
    """Shape after scaling so the shorter side is ``min_size`` unless that makes the longer side
    exceed ``max_size`` (then the longer side is ``max_size``); aspect ratio kept."""
    scale = min_size / min(height, width)
    if max_size is not None:
        scale = min(scale, max_size / max(height, width))
    return max(1, int(round(height * scale))), max(1, int(round(width * scale)))


class Resize:
    """Aspect-preserving resize: shorter side ``min_size``, longer side at most ``max_size``.

    ``min_size`` may be a sequence, in which case one value is drawn uniformly per call
    (multi-scale training). Boxes and proposals are scaled by the exact per-axis ratio;
    ``area`` by the product. Works on tensors (bilinear, antialiased when shrinking) and PIL images.
    """

    def __init__(self, min_size, max_size: Optional[int] = 1333) -> None:
        sizes = tuple(min_size) if isinstance(min_size, (tuple, list)) else (min_size,)
        if not sizes or any(isinstance(s, bool) or not isinstance(s, int) or s <= 0 for s in sizes):
            raise ValueError(f"min_size must be a positive int or a sequence of them, got {min_size!r}")
        if max_size is not None and (isinstance(max_size, bool) or not isinstance(max_size, int)
                                     or max_size < max(sizes)):
            raise ValueError(f"max_size must be None or an int >= min_size, got {max_size!r}")
        self.min_sizes = sizes
        self.max_size = max_size

    def __call__(self, image, target: Target):
        if len(self.min_sizes) == 1:
            min_size = self.min_sizes[0]
        else:
            min_size = self.min_sizes[int(torch.randint(len(self.min_sizes), ()))]
        height, width = _image_size(image)
        new_h, new_w = resized_shape(height, width, min_size, self.max_size)
        if (new_h, new_w) == (height, width):
            return image, target
        if isinstance(image, torch.Tensor):
            shrinking = new_h < height or new_w < width
            image = F.interpolate(image[None], size=(new_h, new_w), mode="bilinear",
                                  align_corners=False, antialias=shrinking)[0]
            image = image.clamp_(0.0, 1.0)
        else:
            image = image.resize((new_w, new_h), Image.Resampling.BILINEAR)
        ratio_w, ratio_h = new_w / width, new_h / height
        scale = torch.tensor([ratio_w, ratio_h, ratio_w, ratio_h])
        target = dict(target)
        for key in _BOX_KEYS:
            if key in target:
                boxes = target[key]
                target[key] = boxes * scale.to(boxes.dtype)
        if "area" in target:
            target["area"] = target["area"] * (ratio_w * ratio_h)
        return image, target

    def __repr__(self) -> str:
        size = self.min_sizes[0] if len(self.min_sizes) == 1 else self.min_sizes
        return f"{type(self).__name__}(min_size={size}, max_size={self.max_size})"


def build_transforms(
    *,
    train: bool,
    flip_prob: float = 0.5,
    min_size=None,
    max_size: Optional[int] = 1333,
) -> Compose:
    """Standard pipeline: ``ToTensor``, optional :class:`Resize` (``min_size`` not None), and
    in training a horizontal flip with probability ``flip_prob`` (the paper's only augmentation)."""
    steps: list = [ToTensor()]
    if min_size is not None:
        steps.append(Resize(min_size, max_size))
    if train and flip_prob > 0:
        steps.append(RandomHorizontalFlip(flip_prob))
    return Compose(steps)
