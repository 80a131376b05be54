"""PAFPN: FPN plus PANet's bottom-up path augmentation (Liu et al., CVPR 2018).

Used by the "PAFPN" and "Balanced PAFPN" rows of Libra R-CNN's Table 5; the balanced
variant is simply ``BalancedFeaturePyramid`` applied to this module's outputs.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Callable, Optional

import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.ops import FeaturePyramidNetwork
from torchvision.ops.feature_pyramid_network import ExtraFPNBlock
from torchvision.ops.misc import Conv2dNormActivation

__all__ = ["PAFPN"]


class PAFPN(FeaturePyramidNetwork):
    """Feature pyramid network with an extra bottom-up path (PANet path augmentation).

    With ``{P_i}`` the FPN outputs (top-down pathway + 3x3 output convs, level 0 finest)::

        N_0     = P_0
        N_{i+1} = pafpn_blocks[i]( P_{i+1} + downsample_blocks[i](N_i) )

    ``downsample_blocks[i]`` is a 3x3 stride-2 conv, ``pafpn_blocks[i]`` a 3x3 conv; both use
    ``norm_layer`` when given and, as torchvision's FPN convs and mmdetection's PAFPN default,
    no activation. When the strided conv's output size differs from ``P_{i+1}`` (odd sizes
    that do not halve exactly) it is nearest-resized to ``P_{i+1}``'s size before the sum.
    ``extra_blocks`` (e.g. ``LastLevelMaxPool``, ``LastLevelP6P7``) are applied to the final
    ``{N_i}``, so the output keys equal :class:`FeaturePyramidNetwork`'s.

    ``bottom_up="outputs"`` chains the path through the convolved ``N_i`` as the PANet paper
    draws it; ``"sums"`` chains through the pre-convolution sums ``S_{i+1} = P_{i+1} +
    downsample_blocks[i](S_i)`` (``S_0 = P_0``), as mmdetection's PAFPN does.

    Parameter names of the FPN part (``inner_blocks``, ``layer_blocks``, ``extra_blocks``) are
    unchanged, so an FPN state dict loads with ``strict=False`` and only ``downsample_blocks.*``
    and ``pafpn_blocks.*`` missing.

    Args:
        in_channels_list: channels of each input level (finest first).
        out_channels: channels of every output level.
        extra_blocks: optional :class:`torchvision.ops.feature_pyramid_network.ExtraFPNBlock`.
        norm_layer: optional normalisation layer constructor for all convs.
        bottom_up: ``"outputs"`` or ``"sums"`` (see above).

    Shapes:
        input: OrderedDict of ``L`` tensors ``[B, C_i, H_i, W_i]``, finest first.
        output: OrderedDict with FPN's keys, each ``[B, out_channels, H, W]``.
    """

    def __init__(
        self,
        in_channels_list: list[int],
        out_channels: int,
        extra_blocks: Optional[ExtraFPNBlock] = None,
        norm_layer: Optional[Callable[..., nn.Module]] = None,
        bottom_up: str = "outputs",
    ) -> None:
        if bottom_up not in ("outputs", "sums"):
            raise ValueError(f"bottom_up must be 'outputs' or 'sums', got {bottom_up!r}")
        if len(in_channels_list) < 1:
            raise ValueError("in_channels_list must name at least one level")
        if isinstance(out_channels, bool) or not isinstance(out_channels, int) or out_channels < 1:
            raise ValueError(f"out_channels must be a positive int, got {out_channels!r}")
        super().__init__(
            in_channels_list, out_channels, extra_blocks=extra_blocks, norm_layer=norm_layer
        )

        def conv3x3(stride: int) -> Conv2dNormActivation:
            return Conv2dNormActivation(
                out_channels,
                out_channels,
                kernel_size=3,
                stride=stride,
                norm_layer=norm_layer,
                activation_layer=None,
            )

        self.bottom_up = bottom_up
        num_links = len(in_channels_list) - 1
        self.downsample_blocks = nn.ModuleList(conv3x3(2) for _ in range(num_links))
        self.pafpn_blocks = nn.ModuleList(conv3x3(1) for _ in range(num_links))
        # Same initialisation as torchvision's FPN convs.
        for module in list(self.downsample_blocks.modules()) + list(self.pafpn_blocks.modules()):
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_uniform_(module.weight, a=1)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)

    def _top_down(self, features: list[Tensor]) -> list[Tensor]:
        """FPN laterals + top-down nearest upsampling + 3x3 output convs -> ``[P_0 .. P_{L-1}]``."""
        last_inner = self.get_result_from_inner_blocks(features[-1], -1)
        results = [self.get_result_from_layer_blocks(last_inner, -1)]
        for idx in range(len(features) - 2, -1, -1):
            lateral = self.get_result_from_inner_blocks(features[idx], idx)
            top_down = F.interpolate(last_inner, size=lateral.shape[-2:], mode="nearest")
            last_inner = lateral + top_down
            results.insert(0, self.get_result_from_layer_blocks(last_inner, idx))
        return results

    def _bottom_up(self, pyramid: list[Tensor]) -> list[Tensor]:
        """PANet path augmentation ``[P_0 .. P_{L-1}] -> [N_0 .. N_{L-1}]``."""
        outputs = [pyramid[0]]
        carried = pyramid[0]  # what the next level's downsampling reads
        for idx, (downsample, fuse) in enumerate(zip(self.downsample_blocks, self.pafpn_blocks)):
            lateral = pyramid[idx + 1]
            reduced = downsample(carried)
            if reduced.shape[-2:] != lateral.shape[-2:]:
                reduced = F.interpolate(reduced, size=lateral.shape[-2:], mode="nearest")
            summed = lateral + reduced
            outputs.append(fuse(summed))
            carried = outputs[-1] if self.bottom_up == "outputs" else summed
        return outputs

    def forward(self, x: dict[str, Tensor]) -> dict[str, Tensor]:
        """Args: x -- OrderedDict of ``[B, C_i, H_i, W_i]``, finest first.

        Returns: OrderedDict (FPN's keys, incl. extra-block ones) of ``[B, out_channels, H, W]``.
        """
        if len(x) != len(self.inner_blocks):
            raise ValueError(f"x must have {len(self.inner_blocks)} levels, got {len(x)}")
        names = list(x.keys())
        features = list(x.values())
        results = self._bottom_up(self._top_down(features))
        if self.extra_blocks is not None:
            results, names = self.extra_blocks(results, features, names)
        return OrderedDict(zip(names, results))
