"""mmdetection's test-time resize and normalisation as a torchvision ``GeneralizedRCNNTransform``.

mmdetection 3.3 (``Resize(scale=(1333, 800), keep_ratio=True)`` + ``DetDataPreprocessor``)
prepares an image differently from torchvision's transform:

* output size ``int(w * s + 0.5)`` x ``int(h * s + 0.5)`` with
  ``s = min(1333 / long side, 800 / short side)`` (torchvision floors);
* the **uint8** image is resized with OpenCV's ``INTER_LINEAR`` (fixed-point, see
  :func:`resize_uint8_bilinear`) *before* normalising with mean ``[123.675, 116.28, 103.53]`` and
  std ``[58.395, 57.12, 57.375]`` on 0-255 RGB values; the batch is padded with 0 after
  normalisation to a multiple of 32;
* ground-truth boxes are scaled by ``(new_w / w, new_h / h)`` and clipped to the new image,
  predictions are multiplied by ``1 / scale_factor``.

:class:`MMDetTransform` reproduces this bit for bit on torch tensors (no OpenCV at run time).
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch import Tensor
from torchvision.models.detection.transform import GeneralizedRCNNTransform

__all__ = [
    "MMDET_IMAGE_MEAN",
    "MMDET_IMAGE_STD",
    "MMDetTransform",
    "keep_ratio_scale",
    "mmdet_rescale_size",
    "mmdet_rescaled_size",
    "resize_uint8_bilinear",
]

#: mmdetection's ImageNet mean and std on 0-255 RGB values.
MMDET_IMAGE_MEAN = (123.675, 116.28, 103.53)
MMDET_IMAGE_STD = (58.395, 57.12, 57.375)

_COEF_SCALE = 2048  # OpenCV's INTER_RESIZE_COEF_SCALE: weights in 11-bit fixed point


def mmdet_rescale_size(height: int, width: int, short: int, long: int) -> tuple[int, int]:
    """``(new_h, new_w)`` of mmcv's ``rescale_size`` with ``scale=(long, short)``: the largest
    size within ``short`` x ``long`` keeping the aspect ratio, rounded half up."""
    s = min(long / max(height, width), short / min(height, width))
    return int(height * s + 0.5), int(width * s + 0.5)


def _float64(*values) -> Tensor:
    """Ints or 0-d size tensors as one float64 ``[len(values)]`` tensor."""
    return torch.stack([torch.as_tensor(v, dtype=torch.float64) for v in values])


def _as_size(value) -> Tensor:
    """An int, a 0-d tensor (a size while tracing) or a 1-element tensor as int64 ``[1]``."""
    return torch.as_tensor(value, dtype=torch.int64).reshape(1)


def _linear_taps(src, dst, *, clamp_weights: bool, device: torch.device):
    """OpenCV's ``INTER_LINEAR`` taps along one axis.

    Returns int64 ``[dst]`` source indices ``i0``, ``i1`` and int32 ``[dst]`` fixed-point weights
    ``w0``, ``w1``: output ``d`` reads ``src`` at ``x = (d + 0.5) * scale - 0.5`` in float32,
    ``w1 = round(frac(x) * 2048)``, ``w0 = round((1 - frac(x)) * 2048)`` (half to even, each
    rounded on its own). Out-of-range taps read the border pixel; along x (``clamp_weights``)
    OpenCV also sets the fraction to 0 there, along y it keeps the fraction and clamps rows.
    ``src`` and ``dst`` may be ints or size tensors (sizes stay run-time values when traced);
    the arithmetic is float64 on 1-element tensors, as OpenCV's on doubles.
    """
    src, dst = _as_size(src).to(device), _as_size(dst).to(device)
    one = torch.ones(1, dtype=torch.float64, device=device)
    scale = one / (dst.to(torch.float64) / src.to(torch.float64))  # OpenCV: inverse of dst / src
    steps = torch.arange(dst[0], dtype=torch.float64, device=device)
    x = ((steps + 0.5) * scale - 0.5).float()
    start = torch.floor(x)
    frac = x - start
    start = start.long()
    last = src - 1
    if clamp_weights:
        outside = (start < 0) | (start >= last)
        frac = torch.where(outside, torch.zeros_like(frac), frac)
    w1 = torch.round(frac * _COEF_SCALE).int()
    w0 = torch.round((1.0 - frac) * _COEF_SCALE).int()
    zero = torch.zeros_like(last)
    return (torch.minimum(torch.maximum(start, zero), last),
            torch.minimum(torch.maximum(start + 1, zero), last), w0, w1)


def resize_uint8_bilinear(image: Tensor, size) -> Tensor:
    """``cv2.resize(image, (w, h), interpolation=cv2.INTER_LINEAR)`` on uint8, bit for bit.

    OpenCV resizes 8-bit images in fixed point: a horizontal pass sums two pixels times 11-bit
    weights into int32, then the vertical pass (its vectorised kernel, whose rounding the
    opencv-python wheels apply to every pixel) computes
    ``((S0 >> 4) * b0 >> 16) + ((S1 >> 4) * b1 >> 16) + 2 >> 2`` for rows ``S0``, ``S1`` and
    weights ``b0``, ``b1``. tests/test_parity_transform.py compares it with the installed
    ``cv2.resize`` on random sizes.

    Args:
        image: uint8 ``[C, H, W]``.
        size: ``(h, w)`` of the output, both ``>= 1`` (ints, or an int64 ``[2]`` tensor).
    Returns:
        uint8 ``[C, h, w]``.
    """
    in_h, in_w = image.shape[-2:]
    device = image.device
    x0, x1, a0, a1 = _linear_taps(in_w, size[1], clamp_weights=True, device=device)
    y0, y1, b0, b1 = _linear_taps(in_h, size[0], clamp_weights=False, device=device)
    pixels = image.int()
    rows = pixels.index_select(2, x0) * a0 + pixels.index_select(2, x1) * a1  # [C, H, w]
    rows = rows >> 4  # the vertical kernel works on 16-bit (value * 2048) >> 4
    top = (rows.index_select(1, y0) * b0[:, None]) >> 16
    bottom = (rows.index_select(1, y1) * b1[:, None]) >> 16
    return ((top + bottom + 2) >> 2).clamp(0, 255).to(torch.uint8)


def keep_ratio_scale(image: Tensor, short: int, long: int) -> tuple[Tensor, Tensor]:
    """``image``'s ``(H, W)`` and the keep-ratio scale ``min(short / min(H, W), long / max(H,
    W))``, both float64 (``[2]`` and ``[1]``), computed with tensor operations so that a traced
    graph keeps the image size a run-time value. 1-d float64 tensors throughout: the exporter
    computes a division by a Python number or a 0-d tensor in float32."""
    sides = torch._shape_as_tensor(image)[-2:].to(torch.float64)  # [2]
    limits = torch.tensor([short, long], dtype=torch.float64, device=sides.device)
    scale = torch.minimum(limits[:1] / sides.amin(0, keepdim=True),
                          limits[1:] / sides.amax(0, keepdim=True))  # [1]
    return sides, scale


def mmdet_rescaled_size(image: Tensor, short: int, long: int) -> Tensor:
    """:func:`mmdet_rescale_size` of ``image``'s ``(H, W)`` as an int64 ``[2]`` tensor, computed
    with tensor operations (:func:`keep_ratio_scale`)."""
    sides, scale = keep_ratio_scale(image, short, long)
    return torch.floor(sides * scale + 0.5).to(torch.int64)


class MMDetTransform(GeneralizedRCNNTransform):
    """mmdetection's keep-ratio resize + normalisation + padding (see the module docstring).

    Takes torchvision's float ``[0, 1]`` RGB images whose values are ``k / 255`` (as decoded
    from 8-bit files); the 8-bit levels are recovered as ``round(x * 255)``.

    Args:
        min_size: short side(s) of mmdetection's ``scale`` (800); a tuple picks one at random in
            training, as torchvision.
        max_size: long side (1333).
        image_mean, image_std: on 0-255 values (mmdetection's ImageNet statistics by default).
        size_divisible: batch padding multiple (32).
    """

    def __init__(self, min_size: int | Sequence[int] = 800, max_size: int = 1333, *,
                 image_mean: Sequence[float] = MMDET_IMAGE_MEAN,
                 image_std: Sequence[float] = MMDET_IMAGE_STD, size_divisible: int = 32) -> None:
        super().__init__(min_size, max_size, list(image_mean), list(image_std),
                         size_divisible=size_divisible)

    def normalize(self, image: Tensor) -> Tensor:
        """Identity: mmdetection normalises after resizing, so :meth:`resize` does both."""
        if not image.is_floating_point():
            raise TypeError(f"expected float images in [0, 1], got dtype {image.dtype}")
        return image

    def resize(
        self, image: Tensor, target: Optional[dict[str, Tensor]] = None
    ) -> tuple[Tensor, Optional[dict[str, Tensor]]]:
        """Resize the 8-bit levels as OpenCV, then normalise; scale and clip target boxes.

        Args:
            image: float ``[3, H, W]`` in ``[0, 1]``.
            target: optional dict with ``"boxes"`` ``[G, 4]`` (x1, y1, x2, y2) in pixels.
        Returns:
            normalised ``[3, h, w]`` in ``image``'s dtype and the target with boxes scaled by
            ``(w_scale, h_scale) = (w / W, h / H)``, clipped to ``[0, w] x [0, h]``.
        """
        height, width = image.shape[-2:]
        short = self.torch_choice(self.min_size) if self.training else self.min_size[-1]
        size = mmdet_rescaled_size(image, short, self.max_size)
        levels = (image * 255).round().clamp(0, 255).to(torch.uint8)
        resized = resize_uint8_bilinear(levels, size).to(image.dtype)
        new_h, new_w = resized.shape[-2:]
        mean = torch.as_tensor(self.image_mean, dtype=image.dtype, device=image.device)
        std = torch.as_tensor(self.image_std, dtype=image.dtype, device=image.device)
        resized = (resized - mean[:, None, None]) / std[:, None, None]
        if target is None:
            return resized, target
        boxes = target["boxes"]
        scale = boxes.new_tensor([new_w / width, new_h / height]).repeat(2)
        boxes = boxes * scale
        limits = boxes.new_tensor([new_w, new_h]).repeat(2)
        target["boxes"] = torch.minimum(boxes.clamp(min=0), limits)
        return resized, target

    def postprocess(self, result: list[dict[str, Tensor]], image_shapes: list[tuple[int, int]],
                    original_image_sizes: list[tuple[int, int]]) -> list[dict[str, Tensor]]:
        """Map predicted boxes back to the original image: times ``1 / scale_factor``, as
        mmdetection's ``scale_boxes`` (unchanged in training)."""
        if self.training:
            return result
        for pred, (new_h, new_w), (height, width) in zip(result, image_shapes,
                                                         original_image_sizes):
            boxes = pred["boxes"]
            # float64 as mmdetection's Python floats; tensor operations, so that sizes stay
            # run-time values in a traced graph
            scale = _float64(new_w, new_h) / _float64(width, height)
            pred["boxes"] = boxes * (1 / scale).to(boxes.dtype).repeat(2)
        return result

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(min_size={self.min_size}, max_size={self.max_size}, "
                f"mean={self.image_mean}, std={self.image_std}, mode='opencv-bilinear-uint8')")
