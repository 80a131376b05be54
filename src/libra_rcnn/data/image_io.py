"""Robust image loading: any common file -> an 8-bit RGB :class:`PIL.Image.Image`.

Conventions (shared by the whole data layer):

* **Orientation.** The EXIF ``Orientation`` tag is applied (:func:`PIL.ImageOps.exif_transpose`),
  so the returned image is the image *as displayed*. Box annotations (COCO json, VOC xml) are
  taken to refer to this displayed image, which is what COCO's own tools and annotation UIs
  show; a json ``width``/``height`` likewise means the displayed size.
* **Format.** The decoder is chosen from the file's content, not its extension, so a ``.jpg``
  holding PNG bytes loads fine.
* **Modes.** ``1``/``L``/``P``/``CMYK``/``YCbCr``/... are converted by Pillow. Alpha (``RGBA``,
  ``LA``, ``PA``, palette transparency) is *composited* onto ``alpha_background`` (white by
  default, as a browser shows a transparent web image) rather than dropped: the colour stored
  under fully transparent pixels is arbitrary (black, white or leftovers in real data) and
  must not leak into training. 16-bit modes (``I;16*``) are scaled by their full range,
  ``v * 255 / 65535``, never clipped; 32-bit ``I`` and float ``F`` have no natural full scale
  and are stretched from the image's own ``[min, max]`` to ``[0, 255]`` (a constant image
  maps to 0; NaN maps to 0).
* **Limits.** The pixel count is checked from the header *before* decoding, so a huge file
  costs nothing. Pillow's own decompression-bomb limit (2 * ``PIL.Image.MAX_IMAGE_PIXELS``)
  still applies on top of ``max_pixels``; it is not changed here (no global state is set).

Every failure (missing file, unknown format, truncated or corrupt data, too many pixels) raises
:class:`~libra_rcnn.data.errors.BadImageError` naming the file.
"""

from __future__ import annotations

import os
import warnings
from typing import Tuple

import numpy as np
from PIL import Image, ImageOps

from .errors import BadImageError, PathLike

__all__ = ["DEFAULT_MAX_PIXELS", "load_image", "read_image_size", "to_rgb"]

DEFAULT_MAX_PIXELS = 64_000_000

# EXIF orientations 5..8 are a transpose/rotation by 90 degrees: displayed width/height swap.
_EXIF_ORIENTATION_TAG = 0x0112
_SWAPPING_ORIENTATIONS = frozenset({5, 6, 7, 8})

_SIXTEEN_BIT_MODES = frozenset({"I;16", "I;16L", "I;16B", "I;16N"})

RGB = Tuple[int, int, int]


def _check_max_pixels(max_pixels) -> None:
    if max_pixels is not None and (isinstance(max_pixels, bool) or not max_pixels > 0):
        raise ValueError(f"max_pixels must be a positive number or None, got {max_pixels!r}")


def _open(path: PathLike) -> Image.Image:
    """Open lazily (header only); map every failure to :class:`BadImageError`."""
    if not os.path.exists(path):
        raise BadImageError(path, "file not found")
    if not os.path.isfile(path):
        raise BadImageError(path, "not a regular file")
    try:
        with warnings.catch_warnings():
            # Our own max_pixels check replaces Pillow's soft warning.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            return Image.open(path)
    except Image.DecompressionBombError as exc:
        raise BadImageError(path, f"too many pixels for Pillow ({exc})") from exc
    except Image.UnidentifiedImageError as exc:
        raise BadImageError(path, "not a recognised image format") from exc
    except (OSError, SyntaxError, ValueError, EOFError) as exc:
        raise BadImageError(path, f"cannot open: {exc}") from exc


def _exif_orientation(image: Image.Image) -> int:
    try:
        return int(image.getexif().get(_EXIF_ORIENTATION_TAG, 1) or 1)
    except Exception:  # malformed EXIF block: treat as "no orientation"
        return 1


def _displayed_size(image: Image.Image) -> Tuple[int, int]:
    width, height = image.size
    if _exif_orientation(image) in _SWAPPING_ORIENTATIONS:
        width, height = height, width
    return width, height


def read_image_size(path: PathLike) -> Tuple[int, int]:
    """``(width, height)`` of the image *as displayed* (EXIF orientation applied), read from the
    file header without decoding pixels. Raises :class:`BadImageError` if unreadable."""
    image = _open(path)
    try:
        return _displayed_size(image)
    finally:
        image.close()


def _composite(rgba: Image.Image, background: RGB) -> Image.Image:
    base = Image.new("RGB", rgba.size, background)
    base.paste(rgba.convert("RGB"), mask=rgba.getchannel("A"))
    return base


def _scale_to_uint8(values: np.ndarray, low: float, high: float) -> np.ndarray:
    values = np.nan_to_num(values.astype(np.float64), nan=low, posinf=high, neginf=low)
    if high <= low:
        return np.zeros(values.shape, dtype=np.uint8)
    scaled = (values - low) * (255.0 / (high - low))
    return np.clip(np.rint(scaled), 0, 255).astype(np.uint8)


def to_rgb(image: Image.Image, *, alpha_background: RGB = (255, 255, 255)) -> Image.Image:
    """Convert any Pillow mode to 8-bit ``RGB`` (rules in the module docstring)."""
    mode = image.mode
    if mode == "RGB":
        return image
    if mode in _SIXTEEN_BIT_MODES:
        # Full-scale mapping 0..65535 -> 0..255 (Pillow's own convert would clip at 255).
        gray = _scale_to_uint8(np.asarray(image), 0.0, 65535.0)
        return Image.fromarray(gray).convert("RGB")
    if mode in ("I", "F"):
        values = np.asarray(image, dtype=np.float64)
        finite = values[np.isfinite(values)]
        low, high = (float(finite.min()), float(finite.max())) if finite.size else (0.0, 0.0)
        return Image.fromarray(_scale_to_uint8(values, low, high)).convert("RGB")
    if mode == "P":
        # A palette may carry transparency (tRNS); route through RGBA so it is composited.
        has_alpha = "transparency" in image.info or image.palette.mode == "RGBA"
        image = image.convert("RGBA" if has_alpha else "RGB")
        return _composite(image, alpha_background) if has_alpha else image
    if mode == "La":  # premultiplied; Pillow converts it to RGBA only via LA
        image, mode = image.convert("LA"), "LA"
    if mode in ("RGBA", "RGBa", "LA", "PA"):
        return _composite(image.convert("RGBA"), alpha_background)
    # 1, L, CMYK, YCbCr, RGBX, LAB, HSV ...: Pillow knows the colour conversion.
    return image.convert("RGB")


def load_image(
    path: PathLike,
    *,
    max_pixels: int | None = DEFAULT_MAX_PIXELS,
    alpha_background: RGB = (255, 255, 255),
) -> Image.Image:
    """Decode ``path`` into an 8-bit RGB image as displayed (EXIF orientation applied).

    Args:
        path: image file; its format is sniffed from the content.
        max_pixels: refuse images with more than this many pixels (checked from the header,
            before decoding); ``None`` disables the check.
        alpha_background: RGB colour transparent pixels are composited onto.

    Returns:
        A fully loaded ``PIL.Image.Image`` in mode ``"RGB"``, independent of the file.

    Raises:
        BadImageError: missing, unreadable, truncated or corrupt file, or too many pixels.
        ValueError: ``max_pixels`` is not positive.
    """
    _check_max_pixels(max_pixels)
    image = _open(path)
    try:
        width, height = image.size
        if width <= 0 or height <= 0:
            raise BadImageError(path, f"empty image ({width}x{height})")
        if max_pixels is not None and width * height > max_pixels:
            raise BadImageError(
                path, f"{width}x{height} = {width * height} pixels exceeds max_pixels={max_pixels}"
            )
        try:
            image.load()
        except MemoryError:
            raise
        except Exception as exc:  # any decoder failure: truncated, corrupt, unsupported
            raise BadImageError(path, f"cannot decode: {exc}") from exc
        try:
            oriented = ImageOps.exif_transpose(image)
        except Exception:  # malformed EXIF: keep the stored orientation
            oriented = image
        try:
            rgb = to_rgb(oriented if oriented is not None else image,
                         alpha_background=alpha_background)
        except (ValueError, OSError) as exc:
            raise BadImageError(path, f"cannot convert mode {image.mode!r} to RGB: {exc}") from exc
        if rgb is image:  # make sure the result does not keep the file handle alive
            rgb = rgb.copy()
        return rgb
    finally:
        image.close()
