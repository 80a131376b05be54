"""Gradient and loss curves of the balanced L1 loss beside smooth L1 (Libra R-CNN, Figure 5).

For regression errors ``x`` in ``[0, max_error]`` the curves are the elementwise loss
``L(x)`` with target 0 and its derivative ``dL/dx``, both taken from the implementation itself:
the loss from :func:`libra_rcnn.ops.balanced_l1_loss` (``reduction="none"``) and the gradient by
autograd through it. Figure 5 (a) shows the gradients: balanced L1 raises the inliers' gradient
(``alpha ln(b|x| + 1)`` for ``|x| < 1``, Eq. 7) and bounds the outliers' at ``gamma``; smooth L1's
(dashed) is ``x / beta`` up to ``beta`` and 1 beyond. Figure 5 (b) shows the losses (Eq. 8).
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from libra_rcnn.ops.balanced_l1_loss import balanced_l1_loss

from ..errors import UserInputError
from ._common import PathLike, save_figure, write_csv

__all__ = ["DEFAULT_SETTINGS", "loss_curves", "curve_column_name"]

#: ``(alpha, gamma)`` pairs drawn by default: Figure 5's ``gamma = 1`` family and the paper's
#: chosen setting ``alpha = 0.5, gamma = 1.5``.
DEFAULT_SETTINGS: tuple[tuple[float, float], ...] = ((0.5, 1.0), (0.3, 1.0), (0.2, 1.0), (0.5, 1.5))


def curve_column_name(kind: str, alpha: float, gamma: float) -> str:
    """CSV column of a balanced-L1 curve: ``loss_a0.5_g1.5`` / ``grad_a0.5_g1.5``."""
    return f"{kind}_a{alpha:g}_g{gamma:g}"


def _loss_and_grad(x: np.ndarray, loss_fn) -> tuple[np.ndarray, np.ndarray]:
    """Elementwise ``loss_fn(x, 0)`` and its derivative by autograd (float64)."""
    pred = torch.tensor(x, dtype=torch.float64, requires_grad=True)
    loss = loss_fn(pred, torch.zeros_like(pred))
    (grad,) = torch.autograd.grad(loss.sum(), pred)
    return loss.detach().numpy(), grad.numpy()


def loss_curves(
    out_png: Optional[PathLike] = None,
    *,
    settings: Sequence[tuple[float, float]] = DEFAULT_SETTINGS,
    beta: float = 1.0,
    max_error: float = 3.0,
    num_points: int = 301,
    out_csv: Optional[PathLike] = None,
) -> dict:
    """Loss and gradient of balanced L1 for each ``(alpha, gamma)`` and of smooth L1 (Figure 5).

    Args:
        out_png: when given, the two-panel figure ((a) gradient, (b) loss) is written there and
            the CSV next to it (same name, ``.csv``) unless ``out_csv`` names another file.
        settings: ``(alpha, gamma)`` pairs, each valid for :func:`balanced_l1_loss`.
        beta: inlier threshold of both losses (paper: 1).
        max_error: the curves span ``x`` in ``[0, max_error]``.
        num_points: samples of ``x`` (``>= 2``).
        out_csv: CSV path (columns ``x, smooth_l1_loss, smooth_l1_grad`` then ``loss_a*_g*``,
            ``grad_a*_g*`` per setting).

    Returns:
        ``{"x": ndarray[P], "smooth_l1": {"loss", "grad"}, "balanced_l1": {(alpha, gamma):
        {"loss", "grad"}}, "beta": beta, "files": {...}}`` with float64 arrays ``[P]``.
    """
    if not settings:
        raise UserInputError("settings must name at least one (alpha, gamma) pair")
    pairs = []
    for pair in settings:
        if len(pair) != 2:
            raise UserInputError(f"settings: each entry must be an (alpha, gamma) pair, got {pair!r}")
        alpha, gamma = float(pair[0]), float(pair[1])
        # let the loss validate alpha/gamma/beta now, with its own messages
        try:
            balanced_l1_loss(torch.zeros(1), torch.zeros(1), alpha=alpha, gamma=gamma, beta=beta)
        except ValueError as exc:
            raise UserInputError(str(exc)) from None
        pairs.append((alpha, gamma))
    if len(set(pairs)) != len(pairs):
        raise UserInputError(f"settings: duplicate (alpha, gamma) pairs in {list(settings)}")
    if not max_error > 0:
        raise UserInputError(f"max_error must be > 0, got {max_error!r}")
    if isinstance(num_points, bool) or not isinstance(num_points, int) or num_points < 2:
        raise UserInputError(f"num_points must be an int >= 2, got {num_points!r}")

    x = np.linspace(0.0, float(max_error), num_points)
    smooth_loss, smooth_grad = _loss_and_grad(
        x, lambda p, t: F.smooth_l1_loss(p, t, beta=beta, reduction="none"))
    curves = {}
    for alpha, gamma in pairs:
        loss, grad = _loss_and_grad(x, lambda p, t, a=alpha, g=gamma: balanced_l1_loss(
            p, t, alpha=a, gamma=g, beta=beta, reduction="none"))
        curves[(alpha, gamma)] = {"loss": loss, "grad": grad}
    result = {"x": x, "smooth_l1": {"loss": smooth_loss, "grad": smooth_grad},
              "balanced_l1": curves, "beta": float(beta), "files": {}}

    if out_png is not None and out_csv is None:
        out_csv = Path(out_png).with_suffix(".csv")
    if out_csv is not None:
        header = ["x", "smooth_l1_loss", "smooth_l1_grad"]
        columns = [x, smooth_loss, smooth_grad]
        for (alpha, gamma), curve in curves.items():
            header += [curve_column_name("loss", alpha, gamma), curve_column_name("grad", alpha, gamma)]
            columns += [curve["loss"], curve["grad"]]
        rows = [[repr(float(v)) for v in row] for row in zip(*columns)]
        result["files"]["csv"] = str(write_csv(out_csv, header, rows))
    if out_png is not None:
        result["files"]["png"] = str(_plot(result, out_png))
    return result


def _plot(result: dict, out_png: PathLike) -> Path:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(10.0, 4.0))
    FigureCanvasAgg(fig)
    ax_grad, ax_loss = fig.subplots(1, 2)
    x = result["x"]
    beta = result["beta"]
    for ax, key, title in ((ax_grad, "grad", "(a) gradient"), (ax_loss, "loss", "(b) loss")):
        for (alpha, gamma), curve in result["balanced_l1"].items():
            ax.plot(x, curve[key], label=f"balanced L1, α={alpha:g}, γ={gamma:g}")
        ax.plot(x, result["smooth_l1"][key], "k--", label=f"smooth L1 (β={beta:g})")
        ax.set_xlabel("regression error |x|")
        ax.set_title(title)
        ax.set_xlim(x[0], x[-1])
        ax.grid(alpha=0.3)
    ax_grad.set_ylabel("∂L/∂x")
    ax_loss.set_ylabel("L(x)")
    ax_grad.legend(frameon=False, fontsize="small")
    return save_figure(fig, out_png)
