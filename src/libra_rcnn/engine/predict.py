"""Run a detector on image files and write annotated images plus a predictions json.

An image that cannot be read (missing, not an image, truncated, empty, too many pixels) does
not stop the run: every other image is still processed and written, and the unreadable ones are
returned with the reason (:attr:`Predictions.failed`).
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from ..data.errors import BadImageError
from ..data.image_io import load_image
from ..errors import UserInputError
from ..models.mode import eval_mode
from .evaluate import write_results_file
from .visualize import draw_detections

__all__ = ["Predictions", "load_image_tensor", "predict_images"]


@dataclass
class Predictions:
    """What :func:`predict_images` wrote, and what it could not read."""

    #: the detections written to ``json_file``: ``{"file_name", "category_id", "category_name",
    #: "bbox": [x, y, w, h], "score"}`` per kept detection
    detections: list[dict] = field(default_factory=list)
    #: ``predictions.json`` in the output folder
    json_file: Path | None = None
    #: the annotated images written, one per readable input
    drawn: list[Path] = field(default_factory=list)
    #: ``(file, reason)`` for each input image that could not be read
    failed: list[tuple[str, str]] = field(default_factory=list)


def load_image_tensor(path: str | os.PathLike) -> torch.Tensor:
    """Load an image file as ``FloatTensor[3, H, W]`` in 0..1 (RGB, EXIF orientation applied),
    decoded exactly as the datasets decode (:func:`libra_rcnn.data.load_image`).

    Raises:
        BadImageError: naming the file when it is missing or cannot be decoded.
    """
    image = load_image(path)
    data = torch.frombuffer(bytearray(image.tobytes()), dtype=torch.uint8)
    return data.view(image.height, image.width, 3).permute(2, 0, 1).contiguous().float() / 255.0


def _output_stems(paths: Sequence[Path]) -> list[str]:
    """File stems for outputs, suffixed ``_1``, ``_2``... where two inputs share a stem."""
    used: set[str] = set()
    stems = []
    for path in paths:
        stem, k = path.stem, 0
        while stem in used:
            k += 1
            stem = f"{path.stem}_{k}"
        used.add(stem)
        stems.append(stem)
    return stems


def _category(label: int | None, class_names: Sequence[str],
              label_to_cat_id: Mapping[int, int] | None) -> tuple[int | None, str]:
    """``(category_id, category_name)`` written for a predicted label (``None``: an RPN box)."""
    if label is None:
        return None, "object"
    if label_to_cat_id is not None and label not in label_to_cat_id:
        raise ValueError(f"label_to_cat_id has no entry for predicted label {label} "
                         f"(known labels: {sorted(label_to_cat_id)})")
    category_id = int(label_to_cat_id[label]) if label_to_cat_id is not None else label
    name = str(class_names[label - 1]) if 1 <= label <= len(class_names) else str(label)
    return category_id, name


def predict_images(
    model: nn.Module,
    image_paths: Sequence[str | os.PathLike],
    *,
    class_names: Sequence[str],
    label_to_cat_id: Mapping[int, int] | None = None,
    score_thresh: float = 0.5,
    device: str | torch.device = "cpu",
    out_dir: str | os.PathLike,
) -> Predictions:
    """Detect objects in image files and save the visualisations and a json of predictions.

    Args:
        model: torchvision-style detector already on ``device``; eval-mode output per image is
            ``{"boxes" [K, 4] xyxy, "scores" [K], "labels" [K] (1..C)}`` (``"labels"`` may be
            absent for an RPN). Its training/eval mode is restored afterwards.
        image_paths: image files. One that cannot be read is listed in
            :attr:`Predictions.failed` and the others are still processed.
        class_names: names indexed by ``label - 1``.
        label_to_cat_id: maps labels to COCO category ids in the json; ``None`` writes labels.
        score_thresh: detections with ``score < score_thresh`` are dropped (json and drawings).
        device: where images are moved for the forward pass.
        out_dir: receives ``<stem>.jpg`` per readable image (``<stem>_1.jpg`` ... on stem
            clashes) and ``predictions.json`` (always, even when no image could be read).

    Raises:
        UserInputError: ``score_thresh`` outside ``[0, 1]`` or no image paths.
    """
    if not 0.0 <= float(score_thresh) <= 1.0:
        raise UserInputError(f"score_thresh must lie in [0, 1], got {score_thresh}")
    paths = [Path(p) for p in image_paths]
    if not paths:
        raise UserInputError("image_paths is empty")
    device = torch.device(device)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)

    written = Predictions()
    with eval_mode(model):
        for path, stem in zip(paths, _output_stems(paths)):
            try:
                image = load_image_tensor(path)
            except BadImageError as exc:
                written.failed.append((exc.path, exc.reason))
                continue
            with torch.inference_mode():
                output = model([image.to(device)])[0]
            boxes = output["boxes"].detach().float().cpu().reshape(-1, 4)
            scores = output["scores"].detach().float().cpu().reshape(-1)
            labels = output.get("labels")
            labels = None if labels is None else labels.detach().cpu().reshape(-1)
            keep = scores >= score_thresh
            boxes, scores = boxes[keep], scores[keep]
            labels = None if labels is None else labels[keep]

            drawn = out_dir / f"{stem}.jpg"
            draw_detections(image, boxes, labels, scores, class_names).save(drawn, quality=95)
            written.drawn.append(drawn)
            for k in range(boxes.shape[0]):
                x1, y1, x2, y2 = boxes[k].tolist()
                label = None if labels is None else int(labels[k])
                category_id, category_name = _category(label, class_names, label_to_cat_id)
                written.detections.append({
                    "file_name": str(path),
                    "category_id": category_id,
                    "category_name": category_name,
                    "bbox": [x1, y1, x2 - x1, y2 - y1],
                    "score": float(scores[k]),
                })

    written.json_file = write_results_file(written.detections, out_dir / "predictions.json")
    return written
