"""Configurable box-regression loss shared by the RPN, the RoI heads and RetinaNet.

Every detector head in this package regresses encoded box deltas (torchvision's ``BoxCoder``)
and sums an elementwise loss over the coordinates of its foreground samples; the heads differ
only in how they normalise that sum. This module provides the sum, for the three kinds a
:class:`~libra_rcnn.models.config.BoxLossConfig` can name:

* ``"smooth_l1"`` -- ``0.5 x^2 / beta`` for ``|x| < beta``, ``|x| - 0.5 beta`` beyond;
* ``"l1"`` -- ``|x|`` (``beta`` unused);
* ``"balanced_l1"`` -- Libra R-CNN's balanced L1 loss (Sec. 3.3, Eq. 7-9), with ``alpha``,
  ``gamma``, inlier threshold ``beta`` and ``formula`` (``"scaled"``, Eq. 7 moved to ``beta``, or
  mmdetection's ``"beta_in_log"``, which differ when ``beta != 1``); see :func:`libra_rcnn.ops.balanced_l1_loss`.

``loss_weight`` (the paper's lambda in Eq. 4) multiplies the result.
"""

from __future__ import annotations

import typing

import torch.nn.functional as F
from torch import Tensor

from ..checks import check_field_types, check_finite_non_negative
from ..ops.balanced_l1_loss import BalancedL1Loss, balanced_l1_loss
from .config import BoxLossConfig, BoxLossKind

__all__ = ["BOX_LOSS_KINDS", "box_regression_loss_sum", "check_box_loss_config",
           "check_box_loss_values"]

BOX_LOSS_KINDS: tuple[str, ...] = typing.get_args(BoxLossKind)


def check_box_loss_config(cfg: BoxLossConfig, name: str = "box_loss") -> BoxLossConfig:
    """Validate ``cfg``'s field types and choices, then its values (``ValueError`` naming
    ``name`` and the field); return it unchanged."""
    if not isinstance(cfg, BoxLossConfig):
        raise ValueError(f"{name} must be a BoxLossConfig, got {type(cfg).__name__}")
    check_field_types(cfg, f"{name}.")
    return check_box_loss_values(cfg, name)


def check_box_loss_values(cfg: BoxLossConfig, name: str = "box_loss") -> BoxLossConfig:
    """Validate the values of ``cfg``, whose field types are checked already."""
    check_finite_non_negative(cfg.loss_weight, f"{name}.loss_weight")
    if cfg.kind == "smooth_l1":
        check_finite_non_negative(cfg.beta, f"{name}.beta")
    if cfg.kind == "balanced_l1":
        try:  # the loss module owns the rules for alpha, gamma, beta and formula
            BalancedL1Loss(alpha=cfg.alpha, gamma=cfg.gamma, beta=cfg.beta, formula=cfg.formula)
        except ValueError as err:
            raise ValueError(f"{name}: {err}") from None
    return cfg


def box_regression_loss_sum(pred: Tensor, target: Tensor, cfg: BoxLossConfig) -> Tensor:
    """``loss_weight * sum`` of the elementwise box loss named by ``cfg``.

    Args:
        pred: predicted deltas of the foreground samples, ``[P, 4]``.
        target: encoded regression targets, ``[P, 4]``.
        cfg: which loss and its parameters.

    Returns:
        0-dim tensor; 0 (connected to ``pred``) when ``P == 0``.
    """
    if cfg.kind == "smooth_l1":
        loss = F.smooth_l1_loss(pred, target, beta=cfg.beta, reduction="sum")
    elif cfg.kind == "l1":
        loss = F.l1_loss(pred, target, reduction="sum")
    elif cfg.kind == "balanced_l1":
        loss = balanced_l1_loss(pred, target, beta=cfg.beta, alpha=cfg.alpha, gamma=cfg.gamma,
                                reduction="sum", formula=cfg.formula)
    else:
        raise ValueError(f"unknown box loss kind {cfg.kind!r}; expected one of {BOX_LOSS_KINDS}")
    return loss * cfg.loss_weight
