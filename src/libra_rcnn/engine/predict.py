"""Run a detector on image files and write annotated images plus a predictions json."""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch
from PIL import Image, ImageOps
from torch import nn

from ..models.mode import eval_mode
from .evaluate import write_results_file
from .visualize import draw_detections

__all__ = ["load_image_tensor", "predict_images"]


def _fallback_load(path: Path) -> Image.Image:
    with Image.open(path) as img:
        img = ImageOps.exif_transpose(img)  # respect camera orientation, as training data does
        return img.convert("RGB")


def load_image_tensor(path: str | os.PathLike) -> torch.Tensor:
    """Load an image file as ``FloatTensor[3, H, W]`` in 0..1 (RGB, EXIF orientation applied).

    Uses ``libra_rcnn.data.image_io.load_image`` when that module exists so prediction decodes
    images exactly like the datasets; otherwise PIL.

    Raises:
        ValueError: naming the file when it is missing or cannot be decoded.
    """
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"image file {str(path)!r} does not exist or is not a file")
    try:
        from libra_rcnn.data.image_io import load_image
    except ImportError:
        load_image = _fallback_load
    try:
        image = load_image(path)
    except Exception as err:  # decoders raise many types (OSError, SyntaxError, ValueError...)
        raise ValueError(f"image file {str(path)!r} could not be read: {err}") from err
    if isinstance(image, Image.Image):
        data = torch.frombuffer(bytearray(image.convert("RGB").tobytes()), dtype=torch.uint8)
        image = data.view(image.height, image.width, 3).permute(2, 0, 1)
    if not isinstance(image, torch.Tensor) or image.ndim != 3 or image.shape[0] != 3:
        raise ValueError(f"image file {str(path)!r} did not decode to a [3, H, W] RGB image")
    if not image.is_floating_point():
        image = image.float() / 255.0
    return image.contiguous()


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


def predict_images(
    model: nn.Module,
    image_paths: Sequence[str | os.PathLike],
    *,
    class_names: Sequence[str],
    label_to_cat_id: Mapping[int, int] | None = None,
    score_thresh: float = 0.5,
    device: str | torch.device = "cpu",
    out_dir: str | os.PathLike,
) -> list[dict]:
    """Detect objects in image files and save the visualisations and a json of predictions.

    Args:
        model: torchvision-style detector already on ``device``; eval-mode output per image is
            ``{"boxes" [K, 4] xyxy, "scores" [K], "labels" [K] (1..C)}`` (``"labels"`` may be
            absent for an RPN). Its training/eval mode is restored afterwards.
        image_paths: image files; all are checked to exist before any is processed.
        class_names: names indexed by ``label - 1``.
        label_to_cat_id: maps labels to COCO category ids in the json; ``None`` writes labels.
        score_thresh: detections with ``score < score_thresh`` are dropped (json and drawings).
        device: where images are moved for the forward pass.
        out_dir: receives ``<stem>.jpg`` per image (``<stem>_1.jpg`` ... on stem clashes) and
            ``predictions.json``.

    Returns:
        the predictions written to ``predictions.json``: one dict per kept detection,
        ``{"file_name", "category_id", "category_name", "bbox": [x, y, w, h], "score"}``.

    Raises:
        ValueError: naming the file for a missing or unreadable image; for bad arguments.
    """
    if not 0.0 <= float(score_thresh) <= 1.0:
        raise ValueError(f"score_thresh must lie in [0, 1], got {score_thresh}")
    paths = [Path(p) for p in image_paths]
    if not paths:
        raise ValueError("image_paths is empty")
    for path in paths:
        if not path.is_file():
            raise ValueError(f"image file {str(path)!r} does not exist or is not a file")
    device = torch.device(device)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)

    predictions: list[dict] = []
    with eval_mode(model):
        for path, stem in zip(paths, _output_stems(paths)):
            image = load_image_tensor(path)
            with torch.inference_mode():
                output = model([image.to(device)])[0]
            boxes = output["boxes"].detach().float().cpu().reshape(-1, 4)
            scores = output["scores"].detach().float().cpu().reshape(-1)
            labels = output.get("labels")
            labels = None if labels is None else labels.detach().cpu().reshape(-1)
            keep = scores >= score_thresh
            boxes, scores = boxes[keep], scores[keep]
            labels = None if labels is None else labels[keep]

            drawn = draw_detections(image, boxes, labels, scores, class_names)
            drawn.save(out_dir / f"{stem}.jpg", quality=95)

            for k in range(boxes.shape[0]):
                x1, y1, x2, y2 = boxes[k].tolist()
                label = None if labels is None else int(labels[k])
                if label is None:
                    category_id, category_name = None, "object"
                else:
                    if label_to_cat_id is not None and label not in label_to_cat_id:
                        raise ValueError(
                            f"label_to_cat_id has no entry for predicted label {label} "
                            f"(known labels: {sorted(label_to_cat_id)})"
                        )
                    category_id = int(label_to_cat_id[label]) if label_to_cat_id is not None else label
                    category_name = (
                        str(class_names[label - 1]) if 1 <= label <= len(class_names) else str(label)
                    )
                predictions.append(
                    {
                        "file_name": str(path),
                        "category_id": category_id,
                        "category_name": category_name,
                        "bbox": [x1, y1, x2 - x1, y2 - y1],
                        "score": float(scores[k]),
                    }
                )

    write_results_file(predictions, out_dir / "predictions.json")
    return predictions
