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

import math

import torch.nn.functional as F
from torch import Tensor

from ..ops.balanced_l1_loss import FORMULAS, BalancedL1Loss, balanced_l1_loss
from .config import BoxLossConfig

__all__ = ["BOX_LOSS_KINDS", "check_box_loss_config", "box_regression_loss_sum"]

BOX_LOSS_KINDS = ("smooth_l1", "l1", "balanced_l1")


def check_box_loss_config(cfg: BoxLossConfig, name: str = "box_loss") -> BoxLossConfig:
    """Validate ``cfg`` (raises ``ValueError`` naming ``name``) and return it unchanged."""
    if not isinstance(cfg, BoxLossConfig):
        raise ValueError(f"{name} must be a BoxLossConfig, got {type(cfg).__name__}")
    if cfg.kind not in BOX_LOSS_KINDS:
        raise ValueError(f"{name}.kind must be one of {BOX_LOSS_KINDS}, got {cfg.kind!r}")
    if not (isinstance(cfg.loss_weight, (int, float)) and math.isfinite(cfg.loss_weight)
            and cfg.loss_weight >= 0):
        raise ValueError(f"{name}.loss_weight must be a finite number >= 0, got {cfg.loss_weight!r}")
    if cfg.formula not in FORMULAS:
        raise ValueError(f"{name}.formula must be one of {FORMULAS}, got {cfg.formula!r}")
    if cfg.kind == "smooth_l1" and not (math.isfinite(cfg.beta) and cfg.beta >= 0):
        raise ValueError(f"{name}.beta must be a finite number >= 0 for smooth_l1, got {cfg.beta!r}")
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
