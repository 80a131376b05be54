"""Input checks shared by every detector in this package.

torchvision's detectors check a few things with ``torch._assert`` (an ``AssertionError``, and
only after resizing). These checks run first and raise ``ValueError`` messages that name the
image index and the problem, so a bad sample in a data set is found at once.

The contract (torchvision's, unchanged):

* ``images``: a list/tuple of ``Tensor[3, H, W]`` float images (any ``H, W >= 1``).
* ``targets`` (training; optional at inference): one dict per image with
  ``"boxes"``: float ``Tensor[N, 4]`` in ``(x1, y1, x2, y2)`` pixels, finite, ``x2 > x1`` and
  ``y2 > y1``; ``"labels"``: int64 ``Tensor[N]`` in ``[1, num_classes)`` (0 is background).
  Other keys (``"image_id"``, ``"proposals"``, ...) are passed through unchecked.
"""

from __future__ import annotations

from typing import Any, Optional

import torch
from torch import Tensor

__all__ = ["validate_images", "validate_targets", "validate_proposals", "validate_inputs"]


def validate_images(images: Any) -> None:
    """Raise ``ValueError`` unless ``images`` is a non-empty list of float ``[3, H, W]`` tensors."""
    if not isinstance(images, (list, tuple)):
        raise ValueError(f"images must be a list of Tensor[3, H, W], got {type(images).__name__}")
    if len(images) == 0:
        raise ValueError("images must hold at least one image, got an empty list")
    for index, image in enumerate(images):
        if not isinstance(image, Tensor):
            raise ValueError(f"image {index}: expected a Tensor[3, H, W], got {type(image).__name__}")
        if image.dim() != 3 or image.shape[0] != 3:
            raise ValueError(f"image {index}: expected shape [3, H, W], got {tuple(image.shape)}")
        if image.shape[1] < 1 or image.shape[2] < 1:
            raise ValueError(f"image {index}: empty image of shape {tuple(image.shape)}")
        if not image.is_floating_point():
            raise ValueError(f"image {index}: expected a floating-point tensor, got dtype {image.dtype}")


def _check_box_tensor(boxes: Any, index: int, what: str, *, allow_score: bool = False) -> None:
    """Type, shape and dtype of one image's boxes (no value is read)."""
    widths = (4, 5) if allow_score else (4,)
    shape_text = "[N, 4] or [N, 5]" if allow_score else "[N, 4]"
    if not isinstance(boxes, Tensor):
        raise ValueError(f"image {index}: {what} must be a Tensor{shape_text}, got {type(boxes).__name__}")
    if boxes.dim() != 2 or boxes.shape[1] not in widths:
        raise ValueError(f"image {index}: {what} must have shape {shape_text}, got {tuple(boxes.shape)}")
    if not boxes.is_floating_point():
        raise ValueError(f"image {index}: {what} must be a floating-point tensor, got dtype {boxes.dtype}")


def _box_faults(boxes: Tensor) -> tuple[Tensor, Tensor]:
    """bool ``[N]`` each: rows with a NaN or infinite value; rows of zero or negative size."""
    coords = boxes[:, :4]
    return (~torch.isfinite(boxes).all(dim=1),
            (coords[:, 2] <= coords[:, 0]) | (coords[:, 3] <= coords[:, 1]))


def _bad_boxes(boxes: Tensor) -> Tensor:
    nonfinite, empty = _box_faults(boxes)
    return nonfinite | empty


def _bad_labels(labels: Tensor, num_classes: Optional[int]) -> Tensor:
    """bool ``[N]``: the labels outside ``[1, num_classes)`` (none when ``num_classes`` is None)."""
    if num_classes is None:
        return torch.zeros_like(labels, dtype=torch.bool)
    return (labels < 1) | (labels >= num_classes)


def _any(flags: list[Tensor]) -> bool:
    """Whether any of the bool tensors holds a True: one reduction (one host sync) per device."""
    by_device: dict[torch.device, list[Tensor]] = {}
    for f in flags:
        by_device.setdefault(f.device, []).append(f.reshape(-1))
    return any(bool(torch.cat(fs).any()) for fs in by_device.values())


def _raise_box_problem(boxes: Tensor, index: int, what: str) -> None:
    """The ``ValueError`` for the first bad row of ``boxes``, if any."""
    nonfinite, empty = _box_faults(boxes)
    if nonfinite.any():
        row = int(torch.nonzero(nonfinite)[0])
        raise ValueError(f"image {index}: {what} {row} has a NaN or infinite value: {boxes[row].tolist()}")
    if empty.any():
        row = int(torch.nonzero(empty)[0])
        raise ValueError(f"image {index}: {what} {row} has zero or negative width/height "
                         f"(need x2 > x1 and y2 > y1): {boxes[row, :4].tolist()}")


def _raise_label_problem(labels: Tensor, index: int, num_classes: Optional[int]) -> None:
    """The ``ValueError`` for the first label outside ``[1, num_classes)``, if any."""
    out_of_range = _bad_labels(labels, num_classes)
    if out_of_range.any():
        row = int(torch.nonzero(out_of_range)[0])
        raise ValueError(
            f"image {index}: label {int(labels[row])} of box {row} is outside "
            f"[1, {num_classes}) (0 is background; num_classes={num_classes})"
        )


def _check_target_tensors(target: Any, index: int, require_labels: bool) -> None:
    """Keys, types, shapes and dtypes of one image's target (no value is read)."""
    if not isinstance(target, dict):
        raise ValueError(f"image {index}: target must be a dict, got {type(target).__name__}")
    if "boxes" not in target:
        raise ValueError(f"image {index}: target has no 'boxes'")
    boxes = target["boxes"]
    _check_box_tensor(boxes, index, "box")
    if "labels" not in target:
        if require_labels:
            raise ValueError(f"image {index}: target has no 'labels'")
        return
    labels = target["labels"]
    if not isinstance(labels, Tensor) or labels.dim() != 1:
        shape = tuple(labels.shape) if isinstance(labels, Tensor) else type(labels).__name__
        raise ValueError(f"image {index}: labels must be a Tensor[N], got {shape}")
    if labels.dtype != torch.int64:
        raise ValueError(f"image {index}: labels must be int64, got dtype {labels.dtype}")
    if labels.shape[0] != boxes.shape[0]:
        raise ValueError(f"image {index}: {boxes.shape[0]} boxes but {labels.shape[0]} labels")


def validate_targets(targets: Any, *, num_images: int, num_classes: Optional[int],
                     require_labels: bool = True) -> None:
    """Raise ``ValueError`` (naming the image index) unless ``targets`` follows the contract.

    The values of every image's boxes and labels are checked together, in one reduction per
    device (one host synchronisation on an accelerator); only a bad batch is searched for the
    first problem, image by image.

    Args:
        targets: list of per-image dicts.
        num_images: how many images they belong to.
        num_classes: labels must lie in ``[1, num_classes)``; ``None`` skips the range check.
        require_labels: ``False`` for class-agnostic models (RPN): ``"labels"`` may be absent,
            and is still checked when present.
    """
    if not isinstance(targets, (list, tuple)):
        raise ValueError(f"targets must be a list of dicts, got {type(targets).__name__}")
    if len(targets) != num_images:
        raise ValueError(f"targets must hold one dict per image: got {len(targets)} for {num_images} images")
    flags = []
    for index, target in enumerate(targets):
        _check_target_tensors(target, index, require_labels)
        flags.append(_bad_boxes(target["boxes"]))
        if "labels" in target:
            flags.append(_bad_labels(target["labels"], num_classes))
    if not _any(flags):
        return
    for index, target in enumerate(targets):
        _raise_box_problem(target["boxes"], index, "box")
        if "labels" in target:
            _raise_label_problem(target["labels"], index, num_classes)


def validate_proposals(proposals: Any, *, num_images: int) -> None:
    """Raise ``ValueError`` unless ``proposals`` is one float ``[K, 4]`` / ``[K, 5]`` per image.

    Columns are ``(x1, y1, x2, y2[, score])``; boxes must be finite with positive size (checked
    in one reduction per device, as :func:`validate_targets`).
    """
    if not isinstance(proposals, (list, tuple)):
        raise ValueError(f"proposals must be a list of Tensor[K, 4], got {type(proposals).__name__}")
    if len(proposals) != num_images:
        raise ValueError(
            f"proposals must hold one tensor per image: got {len(proposals)} for {num_images} images"
        )
    for index, boxes in enumerate(proposals):
        _check_box_tensor(boxes, index, "proposal", allow_score=True)
    if _any([_bad_boxes(boxes) for boxes in proposals]):
        for index, boxes in enumerate(proposals):
            _raise_box_problem(boxes, index, "proposal")


def validate_inputs(images: Any, targets: Any, *, training: bool, num_classes: Optional[int],
                    require_labels: bool = True) -> None:
    """Check images always, and targets when training (required) or when given."""
    validate_images(images)
    if targets is None:
        if training:
            raise ValueError("targets are required in training mode")
        return
    validate_targets(targets, num_images=len(images), num_classes=num_classes,
                     require_labels=require_labels)

