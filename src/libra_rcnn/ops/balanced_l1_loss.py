r"""Balanced L1 loss (Libra R-CNN, Sec. 3.3): objective-level balance for box regression.

With the regression error :math:`x = t^u_i - v_i` (prediction minus target), the paper designs the
gradient first (Eq. 7), promoting the small gradients of inliers (accurate samples) while clipping
the outliers' gradient at :math:`\gamma`:

.. math::

    \frac{\partial L_b}{\partial |x|} =
        \begin{cases} \alpha \ln(b|x| + 1) & |x| < 1 \\ \gamma & \text{otherwise,} \end{cases}
    \qquad (7)

and integrates it into the loss (Eq. 8)

.. math::

    L_b(x) = \begin{cases}
        \frac{\alpha}{b}(b|x| + 1)\ln(b|x| + 1) - \alpha|x| & |x| < 1 \\
        \gamma|x| + C & \text{otherwise,}
    \end{cases}
    \qquad (8)

with the parameters tied by (Eq. 9)

.. math::

    \alpha \ln(b + 1) = \gamma \quad\Longrightarrow\quad b = e^{\gamma/\alpha} - 1,
    \qquad (9)

so that the gradient is continuous at :math:`|x| = 1`. :math:`C` makes the loss continuous there:
:math:`\frac{\alpha}{b}(b+1)\ln(b+1) - \alpha = \gamma + C`, and with Eq. 9 the left side is
:math:`\gamma + \gamma/b - \alpha`, hence :math:`C = \gamma/b - \alpha`.
Paper defaults: :math:`\alpha = 0.5`, :math:`\gamma = 1.5` (so :math:`b = e^3 - 1`).

Inlier threshold ``beta``. The paper fixes the inlier/outlier boundary at :math:`|x| = 1`. We
generalise it by scaling: with :math:`u = |x| / \beta`,

.. math::

    L(x) = \beta\, L_b(u) = \begin{cases}
        \frac{\alpha}{b}(b|x| + \beta)\ln(b|x|/\beta + 1) - \alpha|x| & |x| < \beta \\
        \gamma|x| + \beta C & \text{otherwise,}
    \end{cases}

whose gradient is :math:`\alpha\ln(b|x|/\beta + 1)` for :math:`|x| < \beta` and :math:`\gamma`
beyond: Eq. 7 with the boundary moved to :math:`\beta`, exactly, for every ``beta``
(``beta = 1`` is Eq. 8 verbatim). The gradient is 0 at :math:`x = 0` and never exceeds
:math:`\gamma`.

Shapes: ``pred`` and ``target`` are any identical shape ``(*)``, typically ``(N, 4)`` encoded box
deltas of the positive samples; the elementwise loss has shape ``(*)``; ``"mean"``/``"sum"`` give a
0-dim tensor. Computation is in float32 (or float64 for float64 inputs) and the result is cast
back to ``pred``'s dtype, so float16/bfloat16 inputs stay finite.
"""

from __future__ import annotations

import math
import typing
from typing import Literal, Optional, Union

import torch
from torch import Tensor, nn

from ..checks import check_one_of

__all__ = ["BalancedL1Formula", "FORMULAS", "balanced_l1_loss", "BalancedL1Loss"]

_REDUCTIONS = ("none", "mean", "sum")
#: How ``beta`` enters the loss. ``"scaled"``: ``beta * L_b(|x| / beta)``, Eq. 7 with the
#: boundary moved to ``beta`` (above); ``"beta_in_log"``: mmdetection's expression, where ``beta``
#: divides ``|x|`` only inside the logarithm; the two agree at ``beta = 1`` (see
#: :func:`balanced_l1_loss`).
BalancedL1Formula = Literal["scaled", "beta_in_log"]
FORMULAS: tuple[str, ...] = typing.get_args(BalancedL1Formula)


def _check_hyperparameters(*, alpha: float, gamma: float, beta: float) -> float:
    """Validate ``alpha``, ``gamma``, ``beta`` and return ``b`` from Eq. 9."""
    # "not x > 0" also rejects NaN.
    if not alpha > 0:
        raise ValueError(f"alpha must be > 0, got {alpha}")
    if not gamma > 0:
        raise ValueError(f"gamma must be > 0, got {gamma}")
    if not beta > 0 or math.isinf(beta):
        raise ValueError(f"beta must be a finite number > 0, got {beta}")
    ratio = gamma / alpha
    if ratio > 80.0:  # b = e^ratio - 1 would be astronomically large; overflows float32
        raise ValueError(
            f"gamma / alpha must be <= 80 so that b = exp(gamma / alpha) - 1 is representable, "
            f"got gamma={gamma}, alpha={alpha}"
        )
    return math.expm1(ratio)


def _check_reduction(reduction: str, name: str = "reduction") -> None:
    if reduction not in _REDUCTIONS:
        raise ValueError(f"{name} must be one of {_REDUCTIONS}, got {reduction!r}")


def _check_shapes(pred: Tensor, target: Tensor) -> None:
    if pred.shape != target.shape:
        raise ValueError(
            f"target must have the same shape as pred, got pred {tuple(pred.shape)} and "
            f"target {tuple(target.shape)}"
        )


def _elementwise_balanced_l1(pred: Tensor, target: Tensor, *, b: float, alpha: float,
                             gamma: float, beta: float, formula: BalancedL1Formula = "scaled") -> Tensor:
    """Elementwise balanced L1 loss in float32 (float64 if ``pred`` is float64), shape ``(*)``."""
    compute_dtype = torch.float64 if pred.dtype == torch.float64 else torch.float32
    abs_err = (pred.to(compute_dtype) - target.to(compute_dtype)).abs()
    if formula == "beta_in_log":
        return _beta_in_log_elementwise(abs_err, b=b, alpha=alpha, gamma=gamma, beta=beta)
    u = abs_err / beta
    # Evaluate the inlier branch on min(u, 1) so its (discarded) value and gradient stay finite
    # for huge errors; torch.where would otherwise propagate 0 * inf = NaN into the gradient.
    u_in = u.clamp(max=1.0)
    inlier = alpha / b * (b * u_in + 1.0) * torch.log1p(b * u_in) - alpha * u_in
    # (1+z)ln(1+z) - z cancels for tiny z = b*u and can round below 0; the true value is >= 0.
    inlier = inlier.clamp_min(0.0)
    outlier = gamma * u + (gamma / b - alpha)
    return beta * torch.where(u < 1.0, inlier, outlier)


def _beta_in_log_elementwise(abs_err: Tensor, *, b: float, alpha: float, gamma: float,
                       beta: float) -> Tensor:
    """mmdetection's expression of the loss, on ``|x|`` of shape ``(*)``::

        alpha / b * (b|x| + 1) * ln(b|x| / beta + 1) - alpha|x|   if |x| < beta
        gamma|x| + gamma / b - alpha * beta                        otherwise
    """
    # inlier branch on min(|x|, beta): finite value and gradient where it is discarded
    x_in = abs_err.clamp(max=beta)
    inlier = alpha / b * (b * x_in + 1.0) * torch.log1p(b * x_in / beta) - alpha * x_in
    outlier = gamma * abs_err + (gamma / b - alpha * beta)
    return torch.where(abs_err < beta, inlier, outlier)


def _reduce(loss: Tensor, reduction: str) -> Tensor:
    if reduction == "none":
        return loss
    if reduction == "sum" or loss.numel() == 0:
        # The mean of nothing is NaN; the sum of nothing is a 0 that stays connected to pred.
        return loss.sum()
    return loss.mean()


def balanced_l1_loss(pred: Tensor, target: Tensor, *, beta: float = 1.0, alpha: float = 0.5,
                     gamma: float = 1.5, reduction: str = "mean",
                     formula: BalancedL1Formula = "scaled") -> Tensor:
    r"""Balanced L1 loss (Eq. 7-9), generalised to inlier threshold ``beta``.

    Args:
        pred: predicted regression values, shape ``(*)`` (e.g. ``(N, 4)`` box deltas).
        target: regression targets, same shape as ``pred`` (gradients flow into it too, if any).
        beta: inlier/outlier threshold on ``|pred - target|`` (paper: 1). Must be > 0.
        alpha: inlier gradient promotion factor of Eq. 7 (paper: 0.5). Must be > 0.
        gamma: outlier gradient bound of Eq. 7 (paper: 1.5). Must be > 0.
        reduction: ``"none"`` (shape ``(*)``), ``"mean"`` or ``"sum"`` (0-dim).
        formula: ``"scaled"`` (below) or ``"beta_in_log"`` (mmdetection's expression, see the
            note).

    Returns:
        The loss in ``pred``'s dtype. An empty input gives 0 for ``"mean"``/``"sum"``, connected
        to ``pred`` so backward works.

    With :math:`b = e^{\gamma/\alpha} - 1` (Eq. 9) and :math:`x = pred - target`, the gradient
    with respect to ``pred`` is :math:`\mathrm{sign}(x)\,\alpha\ln(b|x|/\beta + 1)` for
    :math:`|x| < \beta` and :math:`\mathrm{sign}(x)\,\gamma` otherwise, i.e. Eq. 7 with the
    boundary at ``beta``. The loss is :math:`\beta L_b(|x| / \beta)` with :math:`L_b` of Eq. 8
    and :math:`C = \gamma/b - \alpha`.

    Note:
        mmdetection's ``balanced_l1_loss`` agrees with the paper formula for ``beta = 1`` (the
        paper's setting) but not otherwise: it writes the inlier branch as
        :math:`\frac{\alpha}{b}(b|x| + 1)\ln(b|x|/\beta + 1) - \alpha|x|` and the outlier one
        as :math:`\gamma|x| + \gamma/b - \alpha\beta`, whose gradient at zero error is
        :math:`\alpha(1/\beta - 1)` instead of 0 (and whose inlier gradient is not
        :math:`\alpha\ln(b|x|/\beta + 1)`; for ``beta > 1`` the loss is negative near 0).
        ``formula="scaled"`` keeps Eq. 7 exact for every ``beta``; ``formula="beta_in_log"``
        computes mmdetection's expression (e.g. Libra RetinaNet's ``beta = 0.11``), as is.

    Raises:
        ValueError: if ``alpha``, ``gamma`` or ``beta`` is not > 0, ``reduction`` is unknown, or
            ``target``'s shape differs from ``pred``'s.
    """
    b = _check_hyperparameters(alpha=alpha, gamma=gamma, beta=beta)
    _check_reduction(reduction)
    check_one_of(formula, FORMULAS, "formula")
    _check_shapes(pred, target)
    loss = _elementwise_balanced_l1(pred, target, b=b, alpha=alpha, gamma=gamma, beta=beta,
                                    formula=formula)
    return _reduce(loss, reduction).to(pred.dtype)


def _broadcasts_to(shape: torch.Size, target_shape: torch.Size) -> bool:
    try:
        return torch.broadcast_shapes(shape, target_shape) == target_shape
    except RuntimeError:
        return False


class BalancedL1Loss(nn.Module):
    r"""Balanced L1 loss module with mmdetection-style ``weight`` / ``avg_factor``.

    Args (keyword-only):
        alpha, gamma, beta: see :func:`balanced_l1_loss` (paper: 0.5, 1.5, 1.0).
        reduction: default reduction, ``"none"``, ``"mean"`` or ``"sum"``.
        loss_weight: scalar multiplier of the final loss (:math:`\lambda` of Eq. 4).
        formula: ``"scaled"`` or ``"beta_in_log"``, see :func:`balanced_l1_loss`.

    ``forward(pred, target, weight=None, avg_factor=None, reduction_override=None)``:

    * ``pred``, ``target``: shape ``(*)``, identical.
    * ``weight``: optional elementwise weights broadcastable to ``pred``'s shape (e.g. ``(N, 4)``
      or ``(N, 1)``); it multiplies the elementwise loss before reduction.
    * ``avg_factor``: optional normaliser; with reduction ``"mean"`` the weighted sum is divided
      by ``avg_factor`` instead of the element count (e.g. the number of positive samples).
      An ``avg_factor`` of 0 (nothing to average; the sum is then 0) is clamped to float32 eps so
      the result is 0, not NaN. Ignored for ``"none"``; a ValueError for ``"sum"``.
    * ``reduction_override``: replaces the default reduction for this call.

    Returns ``loss_weight`` times the reduced loss, in ``pred``'s dtype.
    """

    def __init__(self, *, alpha: float = 0.5, gamma: float = 1.5, beta: float = 1.0,
                 reduction: str = "mean", loss_weight: float = 1.0,
                 formula: BalancedL1Formula = "scaled") -> None:
        super().__init__()
        self._b = _check_hyperparameters(alpha=alpha, gamma=gamma, beta=beta)
        _check_reduction(reduction)
        check_one_of(formula, FORMULAS, "formula")
        if not math.isfinite(loss_weight):
            raise ValueError(f"loss_weight must be finite, got {loss_weight}")
        self.alpha = float(alpha)
        self.gamma = float(gamma)
        self.beta = float(beta)
        self.reduction = reduction
        self.loss_weight = float(loss_weight)
        self.formula = formula

    def forward(self, pred: Tensor, target: Tensor, weight: Optional[Tensor] = None,
                avg_factor: Optional[Union[float, Tensor]] = None,
                reduction_override: Optional[str] = None) -> Tensor:
        reduction = self.reduction if reduction_override is None else reduction_override
        _check_reduction(reduction, "reduction_override")
        if avg_factor is not None:
            if reduction == "sum":
                raise ValueError('avg_factor can only be used with reduction "mean" or "none", '
                                 'got reduction "sum"')
            if not isinstance(avg_factor, Tensor) and not avg_factor >= 0:
                raise ValueError(f"avg_factor must be >= 0, got {avg_factor}")
        _check_shapes(pred, target)
        if weight is not None and not _broadcasts_to(weight.shape, pred.shape):
            raise ValueError(f"weight must be broadcastable to pred's shape {tuple(pred.shape)}, "
                             f"got {tuple(weight.shape)}")
        # Stay in float32 until the end even for half inputs: a float16 sum overflows at 65504.
        loss = _elementwise_balanced_l1(pred, target, b=self._b, alpha=self.alpha,
                                        gamma=self.gamma, beta=self.beta, formula=self.formula)
        if weight is not None:
            loss = loss * weight.to(loss.dtype)
        if avg_factor is None or reduction == "none":
            loss = _reduce(loss, reduction)
        else:
            eps = torch.finfo(torch.float32).eps
            if isinstance(avg_factor, Tensor):
                denom = avg_factor.to(loss.dtype).clamp(min=eps)
            else:
                denom = max(float(avg_factor), eps)
            loss = loss.sum() / denom
        return (self.loss_weight * loss).to(pred.dtype)

    def extra_repr(self) -> str:
        return (f"alpha={self.alpha}, gamma={self.gamma}, beta={self.beta}, "
                f"reduction={self.reduction!r}, loss_weight={self.loss_weight}, "
                f"formula={self.formula!r}")
