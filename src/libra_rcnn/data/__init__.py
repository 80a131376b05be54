"""Data layer: robust image loading, COCO/VOC datasets, transforms, samplers, synthetic data.

Conventions used throughout:

* images are ``FloatTensor[3, H, W]`` in ``[0, 1]``, RGB, EXIF orientation applied;
* boxes are ``FloatTensor[N, 4]`` absolute ``(x1, y1, x2, y2)`` pixels of the displayed image;
* labels are contiguous ``1..C`` (``0`` = background), ``class_names[label - 1]``;
* unusable files raise :class:`BadImageError` / :class:`BadAnnotationError`
  (:class:`~libra_rcnn.errors.UserInputError` s naming the file), or are skipped and counted
  where the API says so.
"""

from __future__ import annotations

from typing import Callable, Optional

from .coco import (
    CocoDetection,
    SkippedImage,
    WithSkipped,
    check_dataset,
    collate_fn,
    collate_with_skipped,
    ground_truth_coco,
    load_coco_json,
)
from .errors import BadAnnotationError, BadImageError, PathLike
from .image_io import DEFAULT_MAX_PIXELS, load_image, read_image_size, to_rgb
from .samplers import GroupedBatchSampler, aspect_ratio_group_ids
from .synthetic import SHAPE_CLASSES, make_shapes_dataset
from .transforms import DetectionTransforms, build_transforms, image_to_tensor
from .voc import voc_to_coco, write_coco_json

__all__ = [
    "BadAnnotationError",
    "BadImageError",
    "CocoDetection",
    "DEFAULT_MAX_PIXELS",
    "DetectionTransforms",
    "GroupedBatchSampler",
    "SHAPE_CLASSES",
    "SkippedImage",
    "WithSkipped",
    "aspect_ratio_group_ids",
    "build_dataset",
    "build_transforms",
    "check_dataset",
    "collate_fn",
    "collate_with_skipped",
    "ground_truth_coco",
    "image_to_tensor",
    "load_coco_json",
    "load_image",
    "make_shapes_dataset",
    "read_image_size",
    "to_rgb",
    "voc_to_coco",
    "write_coco_json",
]


def build_dataset(
    ann_file: PathLike,
    image_root: PathLike,
    *,
    train: bool,
    transforms: Optional[Callable] = None,
    flip_prob: float = 0.5,
    min_size=None,
    max_size: Optional[int] = 1333,
    proposals_file: Optional[PathLike] = None,
    strict: bool = False,
    skip_bad: bool = True,
    max_pixels: Optional[int] = DEFAULT_MAX_PIXELS,
    allow_outside_root: bool = False,
    remove_empty: bool = False,
) -> CocoDetection:
    """A :class:`CocoDetection` with the standard transforms (:func:`build_transforms`: flip in
    training, optional early :class:`Resize` when ``min_size`` is given) unless ``transforms``
    is passed explicitly."""
    if transforms is None:
        transforms = build_transforms(train=train, flip_prob=flip_prob, min_size=min_size,
                                      max_size=max_size)
    return CocoDetection(
        ann_file,
        image_root,
        transforms=transforms,
        train=train,
        proposals_file=proposals_file,
        allow_outside_root=allow_outside_root,
        max_pixels=max_pixels,
        skip_bad=skip_bad,
        strict=strict,
        remove_empty=remove_empty,
    )
