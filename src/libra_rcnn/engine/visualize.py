"""Drawing detections on images (torchvision's ``draw_bounding_boxes``), used by prediction."""

from __future__ import annotations

import colorsys
from collections.abc import Sequence

import torch
from PIL import Image
from torchvision.transforms.functional import pil_to_tensor
from torchvision.utils import draw_bounding_boxes

__all__ = ["class_color", "draw_detections", "to_pil_image"]


def class_color(label: int) -> tuple[int, int, int]:
    """A saturated RGB colour per label; hues step by the golden ratio so neighbours differ."""
    hue = (int(label) * 0.618033988749895) % 1.0
    r, g, b = colorsys.hsv_to_rgb(hue, 0.85, 0.95)
    return int(r * 255), int(g * 255), int(b * 255)


def to_pil_image(image: Image.Image | torch.Tensor) -> Image.Image:
    """An RGB copy of ``image``: a PIL image, a ``uint8`` tensor ``[3, H, W]`` in 0..255 or a
    floating tensor ``[3, H, W]`` (or ``[1, H, W]``) in 0..1."""
    if isinstance(image, Image.Image):
        return image.convert("RGB")  # convert always returns a copy
    if not isinstance(image, torch.Tensor):
        raise ValueError(f"image must be a PIL image or a tensor, got {type(image).__name__}")
    if image.ndim != 3 or image.shape[0] not in (1, 3):
        raise ValueError(f"image tensor must have shape [3, H, W] or [1, H, W], got {tuple(image.shape)}")
    tensor = image.detach().cpu()
    if tensor.is_floating_point():
        tensor = (tensor.clamp(0.0, 1.0) * 255.0).round()
    tensor = tensor.to(torch.uint8)
    if tensor.shape[0] == 1:
        tensor = tensor.expand(3, -1, -1)
    return Image.fromarray(tensor.permute(1, 2, 0).contiguous().numpy())


def _label_text(label: int | None, score: float | None, class_names: Sequence[str] | None) -> str:
    if label is None:
        name = "object"
    elif class_names is not None and 1 <= label <= len(class_names):
        name = str(class_names[label - 1])
    else:
        name = str(label)
    return name if score is None else f"{name} {score:.2f}"


def draw_detections(
    image: Image.Image | torch.Tensor,
    boxes: torch.Tensor | Sequence[Sequence[float]],
    labels: torch.Tensor | Sequence[int] | None,
    scores: torch.Tensor | Sequence[float] | None,
    class_names: Sequence[str] | None,
    *,
    score_thresh: float = 0.0,
    line_width: int = 2,
) -> Image.Image:
    """Draw boxes with class name and score onto a copy of ``image``.

    Args:
        image: PIL image or tensor ``[3, H, W]`` (float in 0..1 or uint8).
        boxes: ``[K, 4]`` xyxy in image pixels.
        labels: ``[K]`` contiguous labels ``1..C`` (``class_names[label - 1]`` is the name), or
            ``None`` for class-agnostic boxes (drawn as "object").
        scores: ``[K]`` confidences or ``None``; boxes with ``score < score_thresh`` are skipped.
        class_names: names indexed by ``label - 1``; labels outside it are written as numbers.
        score_thresh: minimum score drawn.
        line_width: box outline width in pixels.

    Returns:
        a new RGB ``PIL.Image``; the input is not modified.
    """
    canvas = to_pil_image(image)
    boxes_t = torch.as_tensor(boxes, dtype=torch.float32).reshape(-1, 4).cpu()
    num = boxes_t.shape[0]
    labels_l = None if labels is None else [int(v) for v in torch.as_tensor(labels).reshape(-1).tolist()]
    scores_l = None if scores is None else [float(v) for v in torch.as_tensor(scores).reshape(-1).tolist()]
    for name, values in (("labels", labels_l), ("scores", scores_l)):
        if values is not None and len(values) != num:
            raise ValueError(f"{name} has {len(values)} entries but boxes has {num}")
    if line_width < 1:
        raise ValueError(f"line_width must be >= 1, got {line_width}")

    # low scores first so confident boxes end up on top
    order = range(num) if scores_l is None else sorted(range(num), key=lambda i: scores_l[i])
    keep = [i for i in order if scores_l is None or scores_l[i] >= score_thresh]
    if not keep:
        return canvas
    label_of = (lambda i: None) if labels_l is None else (lambda i: labels_l[i])
    drawn = boxes_t[keep]
    drawn[:, 2:] = torch.maximum(drawn[:, 2:], drawn[:, :2])  # an inverted box as a line
    pixels = draw_bounding_boxes(
        pil_to_tensor(canvas), drawn,
        labels=[_label_text(label_of(i), None if scores_l is None else scores_l[i], class_names)
                for i in keep],
        colors=[class_color(label_of(i) or 0) for i in keep], width=line_width, fill_labels=True)
    return Image.fromarray(pixels.permute(1, 2, 0).numpy())
