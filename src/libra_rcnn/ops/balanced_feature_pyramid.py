"""Balanced feature pyramid (Libra R-CNN, Sec. 3.2, Figure 4).

Feature-level balance: every pyramid level is strengthened with the *same* balanced
semantic feature, obtained in four steps -- rescale, integrate (Eq. 3), refine, strengthen.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Mapping, Sequence
from typing import Optional, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .non_local import NonLocal2d

__all__ = [
    "BalancedFeaturePyramid",
    "adaptive_max_pool2d_by_gather",
    "gather_balanced_semantic_feature",
    "nearest_resize_by_gather",
    "scatter_to_levels",
]

FeatureContainer = Union[Sequence[Tensor], Mapping[str, Tensor]]
IntLike = Union[int, Tensor]  # a size: an int (a SymInt in torch.export), or a traced size

_REFINE_TYPES = (None, "none", "conv", "non_local")


def _exporting() -> bool:
    """Whether the model is being traced (``torch.jit.trace``, ``torch.onnx.export(...,
    dynamo=False)``) or exported (``torch.export``, ``torch.onnx.export(..., dynamo=True)``)."""
    if torch.jit.is_tracing():
        return True
    is_exporting = getattr(torch.compiler, "is_exporting", None)  # torch >= 2.5
    return bool(is_exporting is not None and is_exporting())


def _resize_to(feature: Tensor, size: tuple[int, int], *, downsample: bool,
               max_ratio: int) -> Tensor:
    """Resize ``[B, C, h, w]`` to ``[B, C, *size]``: adaptive max pooling when going to a
    coarser level, nearest interpolation when going to a finer one (the paper's rescaling).

    While tracing or exporting, the gathers of :func:`adaptive_max_pool2d_by_gather` /
    :func:`nearest_resize_by_gather` are used instead: they give the same values for any size at
    most ``max_ratio`` times the target size, and follow the sizes at run time
    (``torch.onnx.export`` refuses ``F.adaptive_max_pool2d`` to a size known only at run time,
    ``torch.export`` fixes it to the example's).
    """
    if _exporting():
        if downsample:
            return adaptive_max_pool2d_by_gather(feature, size, max_ratio=max_ratio)
        return nearest_resize_by_gather(feature, size)
    if tuple(feature.shape[-2:]) == tuple(size):
        return feature
    if downsample:
        return F.adaptive_max_pool2d(feature, output_size=size)
    return F.interpolate(feature, size=size, mode="nearest")


def _pooling_windows(in_size: IntLike, out_size: IntLike, max_ratio: int,
                     device: torch.device) -> Tensor:
    """``[out_size, max_ratio + 1]`` int64 indices covering each adaptive pooling window.

    Window ``i`` is ``[floor(i * in / out), ceil((i + 1) * in / out))`` (PyTorch's bins). When
    ``in <= max_ratio * out`` no window is longer than ``max_ratio + 1``; shorter windows repeat
    their last index, which leaves a maximum unchanged.
    """
    index = torch.arange(out_size, device=device)
    start = index * in_size // out_size
    end = ((index + 1) * in_size + out_size - 1) // out_size
    offsets = torch.arange(max_ratio + 1, device=device)
    return torch.minimum(start[:, None] + offsets, end[:, None] - 1)


def adaptive_max_pool2d_by_gather(x: Tensor, size: tuple[IntLike, IntLike], *,
                                  max_ratio: int) -> Tensor:
    """``F.adaptive_max_pool2d(x, size)`` as gathers and element-wise maxima (exportable with
    sizes that change at run time).

    Args:
        x: ``[B, C, H, W]``.
        size: output ``(h, w)``, Python ints or traced sizes.
        max_ratio: an integer ``>= H / h`` and ``>= W / w``; larger inputs give wrong values.

    Returns:
        ``[B, C, h, w]``, equal to ``F.adaptive_max_pool2d(x, size)`` (the same maximum of the
        same elements).
    """
    for dim, out_size in ((2, size[0]), (3, size[1])):
        windows = _pooling_windows(x.shape[dim], out_size, max_ratio, x.device)
        pooled = x.index_select(dim, windows[:, 0])
        for k in range(1, max_ratio + 1):
            pooled = torch.maximum(pooled, x.index_select(dim, windows[:, k]))
        x = pooled
    return x


def _nearest_source_indices(in_size: IntLike, out_size: IntLike, device: torch.device) -> Tensor:
    """PyTorch's "nearest" source index ``min(floor(dst * s), in - 1)`` with the float32
    scale ``s = in / out``, computed in float32 as ATen does."""
    # sizes enter as tensor-times-size products: a tensor made from a size would freeze it
    one = torch.ones((), dtype=torch.float32, device=device)
    scale = (one * in_size) / (one * out_size)
    source = (torch.arange(out_size, device=device).to(torch.float32) * scale).floor()
    return torch.minimum(source, one * in_size - 1).to(torch.int64)


def nearest_resize_by_gather(x: Tensor, size: tuple[IntLike, IntLike]) -> Tensor:
    """``F.interpolate(x, size, mode="nearest")`` as two gathers (exportable with sizes that
    change at run time). ``x``: ``[B, C, H, W]``; returns ``[B, C, *size]``, the same values."""
    for dim, out_size in ((2, size[0]), (3, size[1])):
        x = x.index_select(dim, _nearest_source_indices(x.shape[dim], out_size, x.device))
    return x


def gather_balanced_semantic_feature(features: Sequence[Tensor], refine_level: int) -> Tensor:
    """Rescale every level to level ``refine_level``'s size and average them (Eq. 3).

    ``C = (1 / L) * sum_{l = l_min}^{l_max} C_l`` where finer levels (``l < refine_level``) are
    adaptive-max-pooled and coarser ones nearest-interpolated to the refine level's exact
    ``(H, W)``.

    Args:
        features: ``L`` tensors ``[B, C, H_l, W_l]``, level 0 the finest.
        refine_level: index of the level whose size the integration happens at.

    Returns:
        ``[B, C, H_r, W_r]`` balanced semantic feature, ``r = refine_level``.
    """
    size = tuple(features[refine_level].shape[-2:])
    total = None
    for level, feature in enumerate(features):
        rescaled = _resize_to(feature, size, downsample=level < refine_level,
                              max_ratio=2 ** abs(level - refine_level))
        total = rescaled if total is None else total + rescaled
    return total / len(features)


def scatter_to_levels(
    balanced: Tensor, sizes: Sequence[tuple[int, int]], refine_level: int
) -> list[Tensor]:
    """Reverse rescaling of the (refined) balanced feature to every level's exact size.

    Finer levels (``l < refine_level``) get nearest interpolation, coarser ones adaptive max
    pooling -- the inverse of :func:`gather_balanced_semantic_feature`.

    Args:
        balanced: ``[B, C, H_r, W_r]``.
        sizes: ``L`` target sizes ``(H_l, W_l)``.
        refine_level: index of the level ``balanced`` lives at.

    Returns:
        ``L`` tensors ``[B, C, H_l, W_l]``.
    """
    return [
        _resize_to(balanced, tuple(size), downsample=level > refine_level,
                   max_ratio=2 ** abs(level - refine_level))
        for level, size in enumerate(sizes)
    ]


class BalancedFeaturePyramid(nn.Module):
    """Strengthen each pyramid level with the same refined balanced semantic feature.

    Steps (Figure 4), for inputs ``{C_l}`` with ``L = num_levels`` levels:

    1. rescale every ``C_l`` to the refine level's size (max pooling for finer levels,
       nearest interpolation for coarser ones);
    2. integrate: ``C = (1 / L) * sum_l C_l`` (Eq. 3);
    3. refine ``C``: ``"non_local"`` -- embedded-Gaussian :class:`NonLocal2d` with
       ``reduction=1, use_scale=False`` (paper default); ``"conv"`` -- 3x3 conv + ReLU
       (mmdetection's ``ConvModule`` without norm, whose default activation is ReLU);
       ``None``/``"none"`` -- no refinement (parameter-free "integration" row of Table 5);
    4. strengthen: rescale ``C`` back to each level's size with the reverse operation and add
       it as a residual, ``P_l = C_l + rescale_l(C)``.

    Works for sizes that do not halve exactly (e.g. 25x38, 13x19, 7x10, 4x5): resizing always
    targets each level's exact spatial size.

    Export: while traced (``torch.onnx.export``, ``torch.jit.trace``) or exported
    (``torch.export``) the rescaling runs as gathers that follow the input sizes at run time and
    give the same values, provided each level is at most twice as large as the next coarser one
    in each dimension (true of FPN levels, which halve exactly or round up).

    Args:
        in_channels: channels ``C`` shared by all levels (>= 1).
        num_levels: number of input levels ``L`` (>= 2).
        refine_level: index in ``[0, num_levels)`` of the integration level (2 = C4 for
            inputs C2..C6, the paper's choice).
        refine_type: one of ``None``, ``"none"``, ``"conv"``, ``"non_local"``.

    Shapes:
        input: list/tuple of ``L`` tensors ``[B, C, H_l, W_l]`` (level 0 finest), or a
        dict/OrderedDict of them in that order. Output: the same container type with the same
        keys/order and the same shapes.
    """

    def __init__(
        self,
        in_channels: int,
        num_levels: int,
        refine_level: int = 2,
        refine_type: Optional[str] = "non_local",
    ) -> None:
        super().__init__()
        if isinstance(in_channels, bool) or not isinstance(in_channels, int) or in_channels < 1:
            raise ValueError(f"in_channels must be a positive int, got {in_channels!r}")
        if isinstance(num_levels, bool) or not isinstance(num_levels, int) or num_levels < 2:
            raise ValueError(f"num_levels must be an int >= 2, got {num_levels!r}")
        level_is_int = isinstance(refine_level, int) and not isinstance(refine_level, bool)
        if not level_is_int or not 0 <= refine_level < num_levels:
            raise ValueError(
                f"refine_level must be an int in [0, {num_levels}), got {refine_level!r}"
            )
        if refine_type not in _REFINE_TYPES:
            raise ValueError(f"refine_type must be one of {_REFINE_TYPES}, got {refine_type!r}")

        self.in_channels = in_channels
        self.num_levels = num_levels
        self.refine_level = refine_level
        self.refine_type = "none" if refine_type is None else refine_type

        self.refine: Optional[nn.Module]
        if self.refine_type == "non_local":
            self.refine = NonLocal2d(in_channels, reduction=1, use_scale=False)
        elif self.refine_type == "conv":
            conv = nn.Conv2d(in_channels, in_channels, kernel_size=3, padding=1)
            # mmdetection's ConvModule re-initialises its conv after the BFP's Xavier init:
            # Kaiming normal, fan-out, for ReLU
            nn.init.kaiming_normal_(conv.weight, mode="fan_out", nonlinearity="relu")
            nn.init.zeros_(conv.bias)
            self.refine = nn.Sequential(conv, nn.ReLU(inplace=True))
        else:
            self.refine = None

    def _check_levels(self, features: list[Tensor]) -> None:
        if len(features) != self.num_levels:
            raise ValueError(f"inputs must have {self.num_levels} levels, got {len(features)}")
        batch = None
        for level, feature in enumerate(features):
            if not isinstance(feature, Tensor) or feature.dim() != 4:
                is_tensor = isinstance(feature, Tensor)
                got = tuple(feature.shape) if is_tensor else type(feature).__name__
                raise ValueError(
                    f"inputs level {level} must be a 4-D tensor [B, C, H, W], got {got}"
                )
            if feature.shape[1] != self.in_channels:
                raise ValueError(
                    f"inputs level {level} must have {self.in_channels} channels, "
                    f"got {feature.shape[1]}"
                )
            if batch is None:
                batch = feature.shape[0]
            elif feature.shape[0] != batch:
                raise ValueError(
                    f"inputs level {level} has batch size {feature.shape[0]}, level 0 has {batch}"
                )

    def forward(self, inputs: FeatureContainer) -> FeatureContainer:
        """Args: inputs -- ``L`` levels ``[B, C, H_l, W_l]`` (list, tuple, dict or OrderedDict).

        Returns: the same container type holding ``C_l + rescale_l(refine(C))`` per level.
        """
        if isinstance(inputs, Mapping):
            keys: Optional[list] = list(inputs.keys())
            features = list(inputs.values())
        elif isinstance(inputs, (list, tuple)):
            keys = None
            features = list(inputs)
        else:
            raise TypeError(
                f"inputs must be a list, tuple or mapping of tensors, got {type(inputs).__name__}"
            )
        self._check_levels(features)

        balanced = gather_balanced_semantic_feature(features, self.refine_level)
        if self.refine is not None:
            balanced = self.refine(balanced)
        residuals = scatter_to_levels(balanced, [f.shape[-2:] for f in features], self.refine_level)
        outputs = [feature + residual for feature, residual in zip(features, residuals)]

        if keys is not None:
            pairs = zip(keys, outputs)
            return OrderedDict(pairs) if isinstance(inputs, OrderedDict) else dict(pairs)
        return tuple(outputs) if isinstance(inputs, tuple) else outputs

    def extra_repr(self) -> str:
        return (
            f"in_channels={self.in_channels}, num_levels={self.num_levels}, "
            f"refine_level={self.refine_level}, refine_type={self.refine_type!r}"
        )
