"""Balanced L1 loss, ``formula="beta_in_log"``, against mmdetection's own ``balanced_l1_loss`` and
``BalancedL1Loss`` (values and gradients), and the paper formula against both."""

from __future__ import annotations

import pytest
import torch

from libra_rcnn.models.box_losses import box_regression_loss_sum, check_box_loss_config
from libra_rcnn.models.config import BoxLossConfig
from libra_rcnn.ops.balanced_l1_loss import BalancedL1Loss, balanced_l1_loss

# Every test here needs mmdetection as the oracle: without it the ``mmdet`` fixture skips them
# with mmdet_oracle.SKIP_REASON ("pip install -e .[parity]").
pytestmark = pytest.mark.usefixtures("mmdet")

BETAS = [1.0, 0.11, 2.0]
ALPHA_GAMMA = [(0.5, 1.5), (0.25, 2.0)]


def _errors(beta: float, dtype=torch.float64):
    """pred, target ``[64, 4]`` whose errors cover inliers, outliers (up to 3 beta), both signs,
    exact zeros and errors exactly at +-beta."""
    g = torch.Generator().manual_seed(0)
    target = torch.randn(64, 4, generator=g, dtype=torch.float64)
    err = (torch.rand(64, 4, generator=g, dtype=torch.float64) * 6 - 3) * beta
    err[0] = torch.tensor([0.0, beta, -beta, 1e-7 * beta])
    pred = target + err
    pred[0, 1:3] = target[0, 1:3] + torch.tensor([beta, -beta], dtype=torch.float64)
    return pred.to(dtype), target.to(dtype)


def _value_and_grad(fn, pred, target, **kwargs):
    pred = pred.clone().requires_grad_(True)
    loss = fn(pred, target, **kwargs)
    (grad,) = torch.autograd.grad(loss.sum(), pred)
    return loss.detach(), grad


@pytest.mark.parametrize("beta", BETAS)
@pytest.mark.parametrize("alpha,gamma", ALPHA_GAMMA)
def test_elementwise_values_and_gradients_match_mmdetection(mmdet, alpha, gamma, beta):
    from mmdet.models.losses import balanced_l1_loss as mmdet_balanced_l1_loss

    pred, target = _errors(beta)
    kwargs = dict(alpha=alpha, gamma=gamma, beta=beta, reduction="none")
    theirs = _value_and_grad(mmdet_balanced_l1_loss, pred, target, **kwargs)
    ours = _value_and_grad(balanced_l1_loss, pred, target, formula="beta_in_log", **kwargs)
    torch.testing.assert_close(ours[0], theirs[0], rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(ours[1], theirs[1], rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("beta", [1.0, 0.11])
def test_float32_matches_mmdetection(mmdet, beta):
    from mmdet.models.losses import balanced_l1_loss as mmdet_balanced_l1_loss

    pred, target = _errors(beta, torch.float32)
    theirs = _value_and_grad(mmdet_balanced_l1_loss, pred, target, beta=beta, reduction="none")
    ours = _value_and_grad(balanced_l1_loss, pred, target, beta=beta, reduction="none",
                           formula="beta_in_log")
    torch.testing.assert_close(ours[0], theirs[0], rtol=2e-5, atol=1e-6)
    torch.testing.assert_close(ours[1], theirs[1], rtol=2e-5, atol=1e-5)


@pytest.mark.parametrize("beta", [1.0, 0.11])
@pytest.mark.parametrize("reduction,avg_factor", [("mean", None), ("sum", None), ("none", None),
                                                  ("mean", 37.0), ("mean", 0.0), ("none", 5.0)])
def test_module_weight_avg_factor_reduction_match_mmdetection(mmdet, beta, reduction, avg_factor):
    from mmdet.models.losses import BalancedL1Loss as MMDetBalancedL1Loss

    pred, target = _errors(beta)
    weight = (torch.rand(64, 4, generator=torch.Generator().manual_seed(1)) > 0.3).double()
    theirs_module = MMDetBalancedL1Loss(alpha=0.5, gamma=1.5, beta=beta, loss_weight=2.0)
    ours_module = BalancedL1Loss(alpha=0.5, gamma=1.5, beta=beta, loss_weight=2.0,
                                 formula="beta_in_log")
    kwargs = dict(weight=weight, avg_factor=avg_factor, reduction_override=reduction)
    theirs = _value_and_grad(theirs_module, pred, target, **kwargs)
    ours = _value_and_grad(ours_module, pred, target, **kwargs)
    # mmdetection divides by avg_factor + float32 eps, we by max(avg_factor, eps): 1e-7 relative
    rtol = 1e-10 if avg_factor is None else 1e-6
    torch.testing.assert_close(ours[0], theirs[0], rtol=rtol, atol=1e-12)
    torch.testing.assert_close(ours[1], theirs[1], rtol=rtol, atol=1e-12)


def test_empty_input_matches_mmdetection(mmdet):
    from mmdet.models.losses import BalancedL1Loss as MMDetBalancedL1Loss

    pred, target = torch.zeros(0, 4, requires_grad=True), torch.zeros(0, 4)
    for avg_factor in (None, 3.0):
        theirs = MMDetBalancedL1Loss(beta=0.11)(pred, target, avg_factor=avg_factor)
        ours = BalancedL1Loss(beta=0.11, formula="beta_in_log")(pred, target, avg_factor=avg_factor)
        assert theirs.item() == ours.item() == 0.0
        ours.backward()


def test_box_loss_config_formula_reaches_the_loss(mmdet):
    from mmdet.models.losses import balanced_l1_loss as mmdet_balanced_l1_loss

    pred, target = _errors(0.11)
    cfg = BoxLossConfig(kind="balanced_l1", beta=0.11, loss_weight=1.5, formula="beta_in_log")
    expected = 1.5 * mmdet_balanced_l1_loss(pred, target, beta=0.11, reduction="sum")
    torch.testing.assert_close(box_regression_loss_sum(pred, target, check_box_loss_config(cfg)),
                               expected, rtol=1e-10, atol=0)
    paper = box_regression_loss_sum(pred, target, BoxLossConfig(kind="balanced_l1", beta=0.11))
    assert not torch.isclose(paper, expected)
    with pytest.raises(ValueError, match="box_loss.formula"):
        check_box_loss_config(BoxLossConfig(kind="balanced_l1", formula="mmdet"))
    with pytest.raises(ValueError, match="formula"):
        balanced_l1_loss(pred, target, formula="paper")


def test_paper_equals_mmdetection_at_beta_1_and_differs_at_0_11(mmdet):
    from mmdet.models.losses import balanced_l1_loss as mmdet_balanced_l1_loss

    pred, target = _errors(1.0)
    theirs = _value_and_grad(mmdet_balanced_l1_loss, pred, target, beta=1.0, reduction="none")
    paper = _value_and_grad(balanced_l1_loss, pred, target, beta=1.0, reduction="none")
    torch.testing.assert_close(paper[0], theirs[0], rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(paper[1], theirs[1], rtol=1e-10, atol=1e-12)

    # the gradient next to zero error: Eq. 7 gives 0, mmdetection alpha * (1 / beta - 1)
    beta, alpha = 0.11, 0.5
    pred = torch.tensor([1e-9], dtype=torch.float64)
    target = torch.zeros(1, dtype=torch.float64)
    _, grad_theirs = _value_and_grad(mmdet_balanced_l1_loss, pred, target, beta=beta,
                                     reduction="none")
    _, grad_paper = _value_and_grad(balanced_l1_loss, pred, target, beta=beta, reduction="none")
    _, grad_ours = _value_and_grad(balanced_l1_loss, pred, target, beta=beta, reduction="none",
                                   formula="beta_in_log")
    assert abs(float(grad_paper)) < 1e-6
    assert float(grad_theirs) == pytest.approx(alpha * (1 / beta - 1), rel=1e-6)
    assert float(grad_ours) == pytest.approx(float(grad_theirs), rel=1e-12)
