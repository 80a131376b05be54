"""Training-time transforms: torchvision's ``transforms.v2`` on ``(image, target)`` pairs.

The datasets give ``image`` as a ``FloatTensor[3, H, W]`` in ``[0, 1]`` and ``target`` as a dict
of plain tensors. :class:`DetectionTransforms` runs any ``torchvision.transforms.v2``
transforms on such a pair: ``target["boxes"]`` and ``target["proposals"]`` (``[N, 4]`` absolute
``x1, y1, x2, y2`` pixels) go in as :class:`torchvision.tv_tensors.BoundingBoxes`, so every
geometric v2 transform moves them with the image, and come out as plain tensors again;
everything else passes through untouched, ``target["orig_size"]`` and ``target["area"]``
included: they describe the annotation, which evaluation refers to. The input target is never
modified.

Randomness comes from torch's global RNG (v2's random transforms draw with ``torch.rand`` /
``torch.randint``), so ``torch.manual_seed`` and the per-sample seeding of the training loop
make runs reproducible.

Resizing here is optional: the detector's own transform already resizes every image to its
``min_size`` / ``max_size`` (800 / 1333 by default; the mmdetection-exact resize lives in
``libra_rcnn.models.transform``). Resize here only to shrink images early (less host-to-device
traffic, cheaper collation) or for multi-scale training.

Example (a user's own pipeline)::

    from torchvision.transforms import v2
    transforms = DetectionTransforms([v2.RandomShortestSize([640, 800], max_size=1333),
                                      v2.RandomHorizontalFlip(0.5)])
    dataset = CocoDetection(ann_file, images, transforms=transforms)
"""

from __future__ import annotations

from typing import Any, Callable, Dict, Optional, Sequence, Tuple

import torch
from PIL import Image
from torchvision import tv_tensors
from torchvision.transforms import v2
from torchvision.transforms.v2.functional import pil_to_tensor

__all__ = ["DetectionTransforms", "build_transforms", "image_to_tensor"]

Target = Dict[str, Any]

_BOX_KEYS = ("boxes", "proposals")


def image_to_tensor(image: Image.Image) -> torch.Tensor:
    """A PIL image as an RGB ``FloatTensor[3, H, W]`` in ``[0, 1]`` (8-bit levels / 255)."""
    image = image.convert("RGB") if image.mode != "RGB" else image
    return pil_to_tensor(image).to(torch.float32).div_(255.0)


class DetectionTransforms:
    """``torchvision.transforms.v2`` transforms, in order, applied to a detection sample
    ``(image FloatTensor[3, H, W], target dict)``; see the module doc for what is moved."""

    def __init__(self, transforms: Sequence[Callable]) -> None:
        transforms = list(transforms)
        for t in transforms:
            if not callable(t):
                raise ValueError(f"transforms must be callables, got {t!r}")
        self.pipeline = v2.Compose(transforms) if transforms else v2.Identity()

    def __call__(self, image: torch.Tensor, target: Target) -> Tuple[torch.Tensor, Target]:
        height, width = image.shape[-2:]
        wrapped = {key: tv_tensors.BoundingBoxes(value, format="XYXY", canvas_size=(height, width))
                   if key in _BOX_KEYS else value for key, value in target.items()}
        out_image, out_target = self.pipeline(tv_tensors.Image(image), wrapped)
        out_target = {key: value.as_subclass(torch.Tensor) if isinstance(value, torch.Tensor)
                      else value for key, value in out_target.items()}
        return out_image.as_subclass(torch.Tensor), out_target

    def __repr__(self) -> str:
        inner = ", ".join(repr(t) for t in getattr(self.pipeline, "transforms", []))
        return f"{type(self).__name__}([{inner}])"


def _check_sizes(min_size: Any, max_size: Optional[int]) -> list[int]:
    sizes = list(min_size) if isinstance(min_size, (tuple, list)) else [min_size]
    if not sizes or any(isinstance(s, bool) or not isinstance(s, int) or s <= 0 for s in sizes):
        raise ValueError(f"min_size must be a positive int or a sequence of them, got {min_size!r}")
    if max_size is not None and (isinstance(max_size, bool) or not isinstance(max_size, int)
                                 or max_size < max(sizes)):
        raise ValueError(f"max_size must be None or an int >= min_size, got {max_size!r}")
    return sizes


def build_transforms(
    *,
    train: bool,
    flip_prob: float = 0.5,
    min_size: Any = None,
    max_size: Optional[int] = 1333,
) -> DetectionTransforms:
    """The standard pipeline: an optional aspect-preserving resize (``min_size`` not None: the
    shorter side to ``min_size``, or to one of them drawn per sample, the longer side at most
    ``max_size``; ``v2.RandomShortestSize``) and, in training, a horizontal flip with
    probability ``flip_prob`` (the paper's only augmentation; ``v2.RandomHorizontalFlip``)."""
    steps: list = []
    if min_size is not None:
        steps.append(v2.RandomShortestSize(_check_sizes(min_size, max_size), max_size=max_size))
    if train and flip_prob > 0:
        steps.append(v2.RandomHorizontalFlip(flip_prob))
    return DetectionTransforms(steps)
