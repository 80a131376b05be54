"""Reading a written figure back: its pixels, and how many of them have a given colour.

The figure tests check what a PNG shows (its size, that it is not blank, that every series is
drawn in its colour and how much of it), not only that a file exists.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from matplotlib.colors import to_rgb
from PIL import Image


def read_rgb(path) -> np.ndarray:
    """The image at ``path`` as ``uint8[H, W, 3]`` (a PNG's alpha is composed onto white)."""
    with Image.open(Path(path)) as image:
        assert image.format == "PNG", f"{path}: {image.format}, not a PNG"
        rgba = image.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return np.asarray(Image.alpha_composite(white, rgba).convert("RGB"))


def colour_pixels(pixels: np.ndarray, colour, *, tolerance: int = 6) -> int:
    """How many pixels lie within ``tolerance`` (per channel, 0-255) of a matplotlib colour."""
    target = np.round(np.asarray(to_rgb(colour)) * 255).astype(np.int16)
    close = np.abs(pixels.astype(np.int16) - target).max(axis=-1) <= tolerance
    return int(close.sum())


def assert_drawn(path, *, figsize: tuple[float, float], dpi: int = 120,
                 min_ink: float = 0.02) -> np.ndarray:
    """The PNG at ``path`` is about ``figsize`` inches at ``dpi`` (``bbox_inches="tight"``
    trims or grows the margins a little) and not blank: at least ``min_ink`` of its pixels are
    not white. Returns its pixels."""
    pixels = read_rgb(path)
    height, width = pixels.shape[:2]
    expected_w, expected_h = figsize[0] * dpi, figsize[1] * dpi
    assert 0.7 * expected_w <= width <= 1.2 * expected_w, (width, expected_w)
    assert 0.7 * expected_h <= height <= 1.2 * expected_h, (height, expected_h)
    ink = float((pixels.min(axis=-1) < 250).mean())
    assert ink >= min_ink, f"{path}: only {ink:.1%} of the pixels are not white"
    return pixels
