"""A small synthetic detection set ("shapes") for demos, smoke tests and CI.

Each image is a noisy, textured background with clutter (thin lines, muted irregular blobs) and
0 to ``max_objects`` filled shapes. A class has both a shape and a base colour (circle: red,
square: green, triangle: blue, star: yellow), jittered per object, with a darker outline, so the
task is learnable from scratch in minutes while still needing localisation under occlusion.

Scales follow COCO's *absolute* area thresholds (small < 32^2 <= medium < 96^2 <= large, the
ranges ``COCOeval`` uses for APs/APm/APl), so all three are populated without changing the
evaluator: every box is square with side 10-28 px (small), 36-88 px (medium) or
100-min(124, image_size - 4) px (large; only when ``image_size >= 108``, at most one per image).
Larger shapes are drawn first; a placement is retried until every earlier shape keeps at least
60 % of its pixels visible. Boxes are the full (amodal) extent of each drawn shape, ``area`` is
the box area (there are no masks).

Everything derives from ``seed``: image ``i`` of a split uses the NumPy generator seeded with
``(seed, split, i)``, so the files are byte-identical across runs and the validation set does not
depend on ``num_train``.
"""

from __future__ import annotations

import math
import os
from typing import Dict, List, Sequence, Tuple

import numpy as np
from PIL import Image, ImageDraw

from .voc import write_coco_json

__all__ = ["SHAPE_CLASSES", "SCALE_RANGES", "make_shapes_dataset", "render_shapes_image"]

SHAPE_CLASSES: Tuple[str, ...] = ("circle", "square", "triangle", "star")
_BASE_COLOURS = {
    "circle": (215, 50, 45),
    "square": (45, 170, 65),
    "triangle": (50, 85, 215),
    "star": (235, 195, 35),
}
# Box side ranges in pixels (inclusive) -> COCO small / medium / large by box area.
SCALE_RANGES = {"small": (10, 28), "medium": (36, 88), "large": (100, 124)}
_SCALE_PROBS = {"small": 0.4, "medium": 0.45, "large": 0.15}
_MIN_VISIBLE = 0.6
_SPLIT_CODES = {"train": 0, "val": 1}


def _shape_polygon(kind: str, x0: int, y0: int, side: int, flip: bool) -> List[Tuple[float, float]]:
    x1, y1 = x0 + side - 1, y0 + side - 1
    if kind == "triangle":
        apex_y, base_y = (y1, y0) if flip else (y0, y1)
        return [(x0 + (side - 1) / 2, apex_y), (x1, base_y), (x0, base_y)]
    # star: five outer points (one pointing up), inner radius 0.45 of the outer one
    cx, cy, outer = x0 + (side - 1) / 2, y0 + (side - 1) / 2, (side - 1) / 2
    points = []
    for k in range(10):
        radius = outer if k % 2 == 0 else 0.45 * outer
        angle = -math.pi / 2 + k * math.pi / 5
        points.append((cx + radius * math.cos(angle), cy + radius * math.sin(angle)))
    return points


def _draw_shape(draw: ImageDraw.ImageDraw, kind: str, x0: int, y0: int, side: int, flip: bool,
                fill, outline=None, width: int = 0) -> None:
    box = [x0, y0, x0 + side - 1, y0 + side - 1]
    if kind == "circle":
        draw.ellipse(box, fill=fill, outline=outline, width=width)
    elif kind == "square":
        draw.rectangle(box, fill=fill, outline=outline, width=width)
    else:
        draw.polygon(_shape_polygon(kind, x0, y0, side, flip), fill=fill, outline=outline,
                     width=max(width, 1) if outline is not None else 1)


def _background(rng: np.random.Generator, size: int) -> np.ndarray:
    """Muted base colour + smooth low-frequency texture, float [size, size, 3]."""
    base = rng.uniform(85, 170) + rng.uniform(-18, 18, size=3)
    coarse = rng.uniform(-28, 28, size=(6, 6, 3)).astype(np.float32)
    texture = np.stack([
        np.asarray(Image.fromarray(coarse[..., c]).resize((size, size), Image.Resampling.BICUBIC))
        for c in range(3)
    ], axis=-1)
    return base + texture


def _random_muted(rng: np.random.Generator) -> Tuple[int, int, int]:
    gray = rng.uniform(60, 190)
    return tuple(int(np.clip(gray + d, 0, 255)) for d in rng.uniform(-22, 22, size=3))


def _draw_clutter(draw: ImageDraw.ImageDraw, rng: np.random.Generator, size: int,
                  num_lines: int, num_blobs: int) -> None:
    for _ in range(num_blobs):
        cx, cy = rng.uniform(0, size, size=2)
        radius = rng.uniform(5, 16)
        n = int(rng.integers(7, 12))
        angles = np.sort(rng.uniform(0, 2 * math.pi, size=n))
        radii = radius * rng.uniform(0.55, 1.0, size=n)
        draw.polygon([(cx + r * math.cos(a), cy + r * math.sin(a)) for r, a in zip(radii, angles)],
                     fill=_random_muted(rng))
    for _ in range(num_lines):
        (xa, ya), (xb, yb) = rng.uniform(0, size, size=(2, 2))
        colour = tuple(int(v) for v in rng.integers(0, 256, size=3))
        draw.line([(xa, ya), (xb, yb)], fill=colour, width=int(rng.integers(1, 3)))


def _pick_scale(rng: np.random.Generator, allowed: Sequence[str]) -> str:
    probs = np.array([_SCALE_PROBS[s] for s in allowed])
    return allowed[int(rng.choice(len(allowed), p=probs / probs.sum()))]


def render_shapes_image(
    rng: np.random.Generator,
    *,
    image_size: int = 128,
    classes: Sequence[str] = ("circle", "square", "triangle"),
    max_objects: int = 6,
    empty_fraction: float = 0.05,
) -> Tuple[Image.Image, List[Tuple[int, List[float]]]]:
    """Render one image. Returns the RGB image and ``[(label, [x, y, w, h]), ...]`` with
    labels ``1..len(classes)`` and boxes in COCO xywh pixels."""
    size = image_size
    large_max = min(SCALE_RANGES["large"][1], size - 4)
    large_possible = large_max >= SCALE_RANGES["large"][0]

    canvas = Image.fromarray(np.clip(_background(rng, size), 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(canvas)
    _draw_clutter(draw, rng, size, num_lines=int(rng.integers(2, 5)), num_blobs=int(rng.integers(0, 3)))

    num_objects = 0 if rng.random() < empty_fraction else int(rng.integers(1, max_objects + 1))
    plans = []  # (side, kind_index, scale)
    has_large = False
    for _ in range(num_objects):
        allowed = ["small", "medium"] + (["large"] if large_possible and not has_large else [])
        scale = _pick_scale(rng, allowed)
        has_large |= scale == "large"
        low, high = SCALE_RANGES[scale]
        high = large_max if scale == "large" else min(high, size - 2)
        plans.append((int(rng.integers(low, high + 1)), int(rng.integers(len(classes)))))
    plans.sort(key=lambda p: -p[0])  # big first, so small shapes sit on top

    owner = np.full((size, size), -1, dtype=np.int16)
    full_areas: List[int] = []
    placed = []  # (label, kind, x0, y0, side, flip, colour, mask)
    for side, kind_index in plans:
        kind = classes[kind_index]
        flip = bool(rng.random() < 0.5)
        for _attempt in range(25):
            x0, y0 = (int(v) for v in rng.integers(0, size - side + 1, size=2))
            mask_img = Image.new("L", (size, size), 0)
            _draw_shape(ImageDraw.Draw(mask_img), kind, x0, y0, side, flip, fill=255)
            mask = np.asarray(mask_img) > 0
            trial = np.where(mask, len(placed), owner)
            visible = np.bincount(trial[trial >= 0].ravel(), minlength=len(placed) + 1)
            if all(visible[i] >= _MIN_VISIBLE * full_areas[i] for i in range(len(placed))):
                break
        else:
            continue  # could not place without hiding another shape; leave it out
        owner = trial
        full_areas.append(int(mask.sum()))
        jitter = rng.integers(-35, 36, size=3)
        colour = tuple(int(c) for c in np.clip(np.array(_BASE_COLOURS[kind]) + jitter, 0, 255))
        placed.append((kind_index + 1, kind, x0, y0, side, flip, colour, mask))

    annotations = []
    for label, kind, x0, y0, side, flip, colour, mask in placed:
        outline = tuple(int(c * 0.55) for c in colour)
        _draw_shape(draw, kind, x0, y0, side, flip, fill=colour, outline=outline, width=1)
        ys, xs = np.nonzero(mask)
        x_min, y_min = int(xs.min()), int(ys.min())
        annotations.append((label, [float(x_min), float(y_min),
                                    float(xs.max() + 1 - x_min), float(ys.max() + 1 - y_min)]))
    # A couple of lines over the objects: clutter that partly crosses them.
    _draw_clutter(draw, rng, size, num_lines=int(rng.integers(0, 3)), num_blobs=0)

    pixels = np.asarray(canvas, dtype=np.float32) + rng.normal(0.0, 6.0, size=(size, size, 3))
    image = Image.fromarray(np.clip(np.rint(pixels), 0, 255).astype(np.uint8))
    return image, annotations


def _check_args(num_train, num_val, image_size, classes, max_objects, empty_fraction) -> None:
    for name, value in (("num_train", num_train), ("num_val", num_val)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise ValueError(f"{name} must be a non-negative int, got {value!r}")
    if num_train + num_val == 0:
        raise ValueError("num_train + num_val must be positive")
    if isinstance(image_size, bool) or not isinstance(image_size, int) or image_size < 48:
        raise ValueError(f"image_size must be an int >= 48, got {image_size!r}")
    if not classes or len(set(classes)) != len(classes) or any(c not in SHAPE_CLASSES for c in classes):
        raise ValueError(f"classes must be distinct names from {SHAPE_CLASSES}, got {classes!r}")
    if isinstance(max_objects, bool) or not isinstance(max_objects, int) or max_objects < 1:
        raise ValueError(f"max_objects must be a positive int, got {max_objects!r}")
    if not 0.0 <= empty_fraction <= 1.0:
        raise ValueError(f"empty_fraction must be in [0, 1], got {empty_fraction!r}")


def make_shapes_dataset(
    out_dir,
    *,
    num_train: int = 200,
    num_val: int = 50,
    image_size: int = 128,
    seed: int = 0,
    classes: Sequence[str] = ("circle", "square", "triangle"),
    max_objects: int = 6,
    empty_fraction: float = 0.05,
) -> Dict[str, str]:
    """Write the shapes dataset under ``out_dir`` and return its paths.

    Layout: ``out_dir/train/000000.png ...``, ``out_dir/train.json``, and the same for ``val``
    (COCO instances format, category ids ``1..len(classes)`` in ``classes`` order).

    Returns:
        ``{"train_json", "train_images", "val_json", "val_images"}`` -> paths (str). A split
        with zero images is still written (an empty ``images`` list).
    """
    classes = tuple(classes)
    _check_args(num_train, num_val, image_size, classes, max_objects, empty_fraction)
    out_dir = os.fspath(out_dir)
    categories = [{"id": i + 1, "name": name, "supercategory": "shape"} for i, name in enumerate(classes)]
    paths: Dict[str, str] = {}
    for split, count in (("train", num_train), ("val", num_val)):
        image_dir = os.path.join(out_dir, split)
        os.makedirs(image_dir, exist_ok=True)
        images, annotations = [], []
        for index in range(count):
            rng = np.random.default_rng([seed, _SPLIT_CODES[split], index])
            image, objects = render_shapes_image(rng, image_size=image_size, classes=classes,
                                                 max_objects=max_objects, empty_fraction=empty_fraction)
            file_name = f"{index:06d}.png"
            image.save(os.path.join(image_dir, file_name), format="PNG", compress_level=1)
            image_id = index + 1
            images.append({"id": image_id, "file_name": file_name,
                           "width": image_size, "height": image_size})
            for label, bbox in objects:
                annotations.append({"id": len(annotations) + 1, "image_id": image_id,
                                    "category_id": label, "bbox": bbox,
                                    "area": bbox[2] * bbox[3], "iscrowd": 0})
        data = {"info": {"description": f"synthetic shapes, seed={seed}, image_size={image_size}"},
                "images": images, "annotations": annotations, "categories": categories}
        paths[f"{split}_json"] = write_coco_json(data, os.path.join(out_dir, f"{split}.json"))
        paths[f"{split}_images"] = image_dir
    return paths
