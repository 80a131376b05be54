"""Embedded-Gaussian non-local block (Wang et al., "Non-local Neural Networks", CVPR 2018).

Libra R-CNN (Sec. 3.2) refines the balanced semantic features with this block; the
balanced feature pyramid builds it with ``reduction=1, use_scale=False`` (mmdetection's
setting for the paper's models).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["NonLocal2d"]


class NonLocal2d(nn.Module):
    """Embedded-Gaussian non-local block over the spatial positions of a 2-D feature map.

    For an input ``x`` of shape ``[B, C, H, W]`` with ``N = H * W`` positions and
    ``C' = max(C // reduction, 1)`` embedding channels::

        theta = W_theta x,  phi = W_phi x,  g = W_g x          (1x1 convs, [B, C', N])
        A     = softmax_j( theta_i . phi_j / s )                 ([B, N, N], rows sum to 1)
        y     = A g                                             ([B, C', N] -> [B, C', H, W])
        out   = x + W_out y                                     (1x1 conv back to C channels)

    with ``s = sqrt(C')`` when ``use_scale`` else ``s = 1``.

    Initialisation: ``theta``, ``phi`` and ``g`` weights ~ N(0, 0.01^2), biases 0; ``W_out``
    weight and bias are zero, so the block is the identity map at initialisation.

    Args:
        in_channels: channels ``C`` of the input feature map (>= 1).
        reduction: channel reduction ratio, ``C' = max(C // reduction, 1)`` (>= 1).
        use_scale: divide the pairwise dot products by ``sqrt(C')``.
    """

    def __init__(self, in_channels: int, *, reduction: int = 2, use_scale: bool = True) -> None:
        super().__init__()
        if isinstance(in_channels, bool) or not isinstance(in_channels, int) or in_channels < 1:
            raise ValueError(f"in_channels must be a positive int, got {in_channels!r}")
        if isinstance(reduction, bool) or not isinstance(reduction, int) or reduction < 1:
            raise ValueError(f"reduction must be a positive int, got {reduction!r}")
        self.in_channels = in_channels
        self.reduction = reduction
        self.use_scale = bool(use_scale)
        self.inter_channels = max(in_channels // reduction, 1)

        self.theta = nn.Conv2d(in_channels, self.inter_channels, kernel_size=1)
        self.phi = nn.Conv2d(in_channels, self.inter_channels, kernel_size=1)
        self.g = nn.Conv2d(in_channels, self.inter_channels, kernel_size=1)
        self.conv_out = nn.Conv2d(self.inter_channels, in_channels, kernel_size=1)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Embeddings ~ N(0, 0.01^2); output conv zero so the residual block starts as identity."""
        for conv in (self.theta, self.phi, self.g):
            nn.init.normal_(conv.weight, mean=0.0, std=0.01)
            nn.init.zeros_(conv.bias)
        nn.init.zeros_(self.conv_out.weight)
        nn.init.zeros_(self.conv_out.bias)

    def _check_input(self, x: Tensor) -> None:
        if x.dim() != 4:
            raise ValueError(f"x must be a 4-D tensor [B, C, H, W], got shape {tuple(x.shape)}")
        if x.shape[1] != self.in_channels:
            raise ValueError(f"x must have {self.in_channels} channels, got {x.shape[1]}")

    def attention_map(self, x: Tensor) -> Tensor:
        """Pairwise attention weights.

        Args:
            x: ``[B, C, H, W]`` feature map.

        Returns:
            ``[B, N, N]`` with ``N = H * W`` (row-major positions); entry ``[b, i, j]`` is
            the weight position ``i`` gives position ``j``; every row sums to 1.
        """
        self._check_input(x)
        theta = self.theta(x).flatten(2).transpose(1, 2)  # [B, N, C']
        phi = self.phi(x).flatten(2)  # [B, C', N]
        logits = torch.bmm(theta, phi)  # [B, N, N]
        if self.use_scale:
            logits = logits / math.sqrt(self.inter_channels)
        return logits.softmax(dim=-1)

    def forward(self, x: Tensor) -> Tensor:
        """Args: x ``[B, C, H, W]``. Returns ``x + W_out(A g)`` of the same shape.

        ``A g`` is computed by ``scaled_dot_product_attention`` (the same softmax attention as
        :meth:`attention_map`, one query per position, one head): its fused kernels never hold
        the ``[B, N, N]`` map, which on the 2-core CPU cut Libra Faster R-CNN's inference
        overhead at 800x1333 (N = 4200) from +510 ms to +327 ms (docs/benchmarks.md). Under
        ``torch.use_deterministic_algorithms`` the explicit map is used instead, because the
        fused kernels' CUDA backward may use a non-deterministic algorithm.
        """
        self._check_input(x)
        batch, _, height, width = x.shape
        g = self.g(x).flatten(2).transpose(1, 2)  # [B, N, C']
        if torch.are_deterministic_algorithms_enabled():
            y = torch.bmm(self.attention_map(x), g)  # [B, N, C']
        else:
            # contiguous: with transposed strides the CPU dispatch falls back to the unfused path
            theta = self.theta(x).flatten(2).transpose(1, 2).contiguous()  # [B, N, C']
            phi = self.phi(x).flatten(2).transpose(1, 2).contiguous()  # [B, N, C']
            g = g.contiguous()
            scale = 1.0 / math.sqrt(self.inter_channels) if self.use_scale else 1.0
            y = F.scaled_dot_product_attention(theta[:, None], phi[:, None], g[:, None],
                                               scale=scale)[:, 0]  # [B, N, C']
        y = y.transpose(1, 2).reshape(batch, self.inter_channels, height, width)
        return x + self.conv_out(y)

    def extra_repr(self) -> str:
        return (
            f"in_channels={self.in_channels}, inter_channels={self.inter_channels}, "
            f"use_scale={self.use_scale}"
        )
