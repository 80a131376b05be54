"""Tests for the balanced L1 loss (paper Sec. 3.3, Eq. 7-9).

Expected values are computed here from the paper's formulas with ``math`` (or by integrating
Eq. 7 numerically), never by calling the code under test.
"""

import math

import pytest
import torch

from libra_rcnn.ops.balanced_l1_loss import BalancedL1Loss, balanced_l1_loss

PAPER = dict(alpha=0.5, gamma=1.5)
PARAMS = [(0.5, 1.5), (1.0, 1.0), (0.25, 2.0)]  # (alpha, gamma)
BETAS = [1.0, 0.11, 2.0]


def _b(alpha, gamma):
    # Eq. 9: alpha * ln(b + 1) = gamma.
    return math.exp(gamma / alpha) - 1.0


def _golden_loss(x, *, alpha, gamma, beta):
    """Eq. 8 applied to u = |x| / beta and scaled by beta, written out with math.log."""
    b = _b(alpha, gamma)
    u = abs(x) / beta
    if u < 1.0:
        value = alpha / b * (b * u + 1.0) * math.log(b * u + 1.0) - alpha * u
    else:
        value = gamma * u + gamma / b - alpha
    return beta * value


def _eq7_grad(x, *, alpha, gamma, beta):
    """Eq. 7 with the inlier boundary at beta, times sign(x) (d/dx of a function of |x|)."""
    b = _b(alpha, gamma)
    sign = (x > 0) - (x < 0)
    magnitude = alpha * math.log(b * abs(x) / beta + 1.0) if abs(x) < beta else gamma
    return sign * magnitude


def _loss_and_grad(x, **kwargs):
    x = x.clone().requires_grad_(True)
    loss = balanced_l1_loss(x, torch.zeros_like(x), reduction="none", **kwargs)
    (grad,) = torch.autograd.grad(loss.sum(), x)
    return loss.detach(), grad


@pytest.mark.parametrize("beta", BETAS)
@pytest.mark.parametrize("alpha,gamma", PARAMS)
def test_gradient_is_eq7(alpha, gamma, beta):
    # Grid over inliers and outliers, both signs, including 0 and exactly +-beta.
    x = torch.linspace(-3.0 * beta, 3.0 * beta, 121, dtype=torch.float64)
    x = torch.cat([x, torch.tensor([beta, -beta, 0.5 * beta, 1e-4 * beta], dtype=torch.float64)])
    _, grad = _loss_and_grad(x, alpha=alpha, gamma=gamma, beta=beta)
    expected = torch.tensor([_eq7_grad(v, alpha=alpha, gamma=gamma, beta=beta) for v in x.tolist()],
                            dtype=torch.float64)
    torch.testing.assert_close(grad, expected, rtol=1e-10, atol=1e-12)
    # Outliers' gradient is clipped at gamma (Eq. 7) and inliers' stays below it.
    assert grad.abs().max().item() <= gamma + 1e-12


@pytest.mark.parametrize("beta", BETAS)
@pytest.mark.parametrize("alpha,gamma", PARAMS)
def test_golden_values(alpha, gamma, beta):
    points = [0.0, 0.01, 0.3, 0.5, 0.99, 1.0, 1.7, 4.0]
    x = torch.tensor([p * beta for p in points] + [-0.5 * beta, -4.0 * beta], dtype=torch.float64)
    loss = balanced_l1_loss(x, torch.zeros_like(x), reduction="none", alpha=alpha, gamma=gamma,
                            beta=beta)
    expected = torch.tensor([_golden_loss(v, alpha=alpha, gamma=gamma, beta=beta)
                             for v in x.tolist()], dtype=torch.float64)
    torch.testing.assert_close(loss, expected, rtol=1e-10, atol=1e-12)


def test_golden_values_paper_defaults_hand_computed():
    # alpha=0.5, gamma=1.5, beta=1: b = e^3 - 1, C = 1.5 / b - 0.5.
    b = math.exp(3.0) - 1.0
    pred = torch.tensor([0.5, 2.0, -0.1], dtype=torch.float64)
    target = torch.tensor([0.0, 0.5, 0.2], dtype=torch.float64)
    expected = [
        0.5 / b * (0.5 * b + 1.0) * math.log(0.5 * b + 1.0) - 0.25,
        1.5 * 1.5 + 1.5 / b - 0.5,
        0.5 / b * (0.3 * b + 1.0) * math.log(0.3 * b + 1.0) - 0.15,
    ]
    loss = balanced_l1_loss(pred, target, reduction="none")
    torch.testing.assert_close(loss, torch.tensor(expected, dtype=torch.float64))
    assert balanced_l1_loss(pred, target).item() == pytest.approx(sum(expected) / 3, rel=1e-12)


def _simpson(f, start, end, n=2000):
    t = torch.linspace(start, end, n + 1, dtype=torch.float64)
    y = f(t)
    return ((end - start) / n / 3) * (y[0] + y[-1] + 4 * y[1:-1:2].sum() + 2 * y[2:-1:2].sum())


@pytest.mark.parametrize("beta", BETAS)
def test_loss_is_integral_of_eq7(beta):
    # Independent of Eq. 8: L(x) = integral from 0 to |x| of Eq. 7 (Simpson's rule).
    alpha, gamma = 0.5, 1.5
    b = _b(alpha, gamma)

    def inlier_grad(t):
        return alpha * torch.log1p(b * t / beta)

    for end in (0.4 * beta, 0.999 * beta, 2.5 * beta):
        # Integrate the two pieces separately so Simpson's rule never straddles the kink.
        integral = _simpson(inlier_grad, 0.0, min(end, beta)).item() + gamma * max(end - beta, 0)
        loss = balanced_l1_loss(torch.tensor([end], dtype=torch.float64),
                                torch.zeros(1, dtype=torch.float64), beta=beta, reduction="sum")
        assert loss.item() == pytest.approx(integral, rel=1e-7, abs=1e-10)


@pytest.mark.parametrize("beta", BETAS)
@pytest.mark.parametrize("alpha,gamma", PARAMS)
def test_continuous_at_beta(alpha, gamma, beta):
    eps = 1e-9 * beta
    x = torch.tensor([beta - eps, beta + eps, -beta + eps, -beta - eps], dtype=torch.float64)
    loss, grad = _loss_and_grad(x, alpha=alpha, gamma=gamma, beta=beta)
    assert loss[0].item() == pytest.approx(loss[1].item(), rel=1e-7, abs=1e-9)
    assert loss[2].item() == pytest.approx(loss[3].item(), rel=1e-7, abs=1e-9)
    assert grad[0].item() == pytest.approx(grad[1].item(), rel=1e-6)
    assert grad[2].item() == pytest.approx(grad[3].item(), rel=1e-6)
    assert grad[1].item() == pytest.approx(gamma)


@pytest.mark.parametrize("beta", BETAS)
def test_zero_at_zero_and_symmetric(beta):
    zero, grad_zero = _loss_and_grad(torch.zeros(3, dtype=torch.float64), beta=beta)
    assert torch.equal(zero, torch.zeros(3, dtype=torch.float64))
    assert torch.equal(grad_zero, torch.zeros(3, dtype=torch.float64))
    # Near zero the gradient vanishes too (Eq. 7 is continuous at 0), unlike mmdetection's
    # beta != 1 variant whose gradient there is alpha * (1 / beta - 1).
    _, grad_small = _loss_and_grad(torch.tensor([1e-9 * beta], dtype=torch.float64), beta=beta)
    assert abs(grad_small.item()) < 1e-6

    gen = torch.Generator().manual_seed(0)
    x = (torch.rand(50, generator=gen, dtype=torch.float64) - 0.5) * 6 * beta
    loss_pos, grad_pos = _loss_and_grad(x, beta=beta)
    loss_neg, grad_neg = _loss_and_grad(-x, beta=beta)
    torch.testing.assert_close(loss_pos, loss_neg, rtol=0, atol=0)
    torch.testing.assert_close(grad_pos, -grad_neg, rtol=0, atol=0)
    assert (loss_pos[x != 0] > 0).all()


def test_depends_only_on_difference():
    gen = torch.Generator().manual_seed(1)
    pred = torch.randn(6, 4, generator=gen)
    target = torch.randn(6, 4, generator=gen)
    shift = torch.randn(6, 4, generator=gen)
    torch.testing.assert_close(balanced_l1_loss(pred, target, reduction="none"),
                               balanced_l1_loss(pred + shift, target + shift, reduction="none"),
                               rtol=1e-5, atol=1e-5)


def test_reductions():
    gen = torch.Generator().manual_seed(2)
    pred = torch.randn(3, 5, 4, generator=gen)
    target = torch.randn(3, 5, 4, generator=gen)
    none = balanced_l1_loss(pred, target, reduction="none")
    assert none.shape == pred.shape and none.dtype == pred.dtype
    expected = torch.tensor([_golden_loss(p - t, **PAPER, beta=1.0)
                             for p, t in zip(pred.flatten().tolist(), target.flatten().tolist())])
    torch.testing.assert_close(none.flatten(), expected, rtol=1e-5, atol=1e-6)
    mean = balanced_l1_loss(pred, target, reduction="mean")
    total = balanced_l1_loss(pred, target, reduction="sum")
    assert mean.dim() == 0 and total.dim() == 0
    assert mean.item() == pytest.approx(expected.mean().item(), rel=1e-5)
    assert total.item() == pytest.approx(expected.sum().item(), rel=1e-5)
    # Default reduction is "mean".
    assert balanced_l1_loss(pred, target).item() == mean.item()


def test_module_weight_avg_factor_and_loss_weight():
    gen = torch.Generator().manual_seed(3)
    pred = torch.randn(5, 4, generator=gen, dtype=torch.float64) * 2
    target = torch.randn(5, 4, generator=gen, dtype=torch.float64)
    weight = torch.rand(5, 4, generator=gen, dtype=torch.float64)
    elementwise = torch.tensor([[_golden_loss(p - t, **PAPER, beta=1.0) for p, t in zip(pr, tr)]
                                for pr, tr in zip(pred.tolist(), target.tolist())],
                               dtype=torch.float64)

    module = BalancedL1Loss()
    assert module(pred, target).item() == pytest.approx(elementwise.mean().item(), rel=1e-10)
    assert module(pred, target, weight).item() == pytest.approx(
        (weight * elementwise).mean().item(), rel=1e-10)
    assert module(pred, target, weight, avg_factor=7).item() == pytest.approx(
        (weight * elementwise).sum().item() / 7, rel=1e-10)
    assert module(pred, target, weight, avg_factor=torch.tensor(7.0)).item() == pytest.approx(
        (weight * elementwise).sum().item() / 7, rel=1e-10)
    assert module(pred, target, weight, reduction_override="sum").item() == pytest.approx(
        (weight * elementwise).sum().item(), rel=1e-10)
    torch.testing.assert_close(module(pred, target, weight, reduction_override="none"),
                               weight * elementwise)
    # avg_factor does not touch an elementwise result.
    torch.testing.assert_close(module(pred, target, avg_factor=3.0, reduction_override="none"),
                               elementwise)

    # A per-row weight of shape (N, 1) broadcasts over the 4 coordinates.
    row_weight = torch.tensor([[1.0], [0.0], [2.0], [0.5], [0.0]], dtype=torch.float64)
    assert module(pred, target, row_weight, reduction_override="sum").item() == pytest.approx(
        (row_weight * elementwise).sum().item(), rel=1e-10)

    scaled = BalancedL1Loss(loss_weight=2.5)
    assert scaled(pred, target, weight, avg_factor=7).item() == pytest.approx(
        2.5 * (weight * elementwise).sum().item() / 7, rel=1e-10)

    # Hyperparameters are forwarded.
    custom = BalancedL1Loss(alpha=1.0, gamma=1.0, beta=0.11, reduction="sum")
    expected = sum(_golden_loss(p - t, alpha=1.0, gamma=1.0, beta=0.11)
                   for p, t in zip(pred.flatten().tolist(), target.flatten().tolist()))
    assert custom(pred, target).item() == pytest.approx(expected, rel=1e-10)

    text = repr(custom)
    for fragment in ("alpha=1.0", "gamma=1.0", "beta=0.11", "reduction='sum'", "loss_weight=1.0"):
        assert fragment in text


def test_module_avg_factor_zero_gives_zero_not_nan():
    pred = torch.zeros(0, 4, requires_grad=True)
    loss = BalancedL1Loss()(pred, torch.zeros(0, 4), avg_factor=0)
    assert loss.item() == 0.0
    loss.backward()
    assert pred.grad.shape == (0, 4)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_empty_input(reduction):
    pred = torch.zeros(0, 4, requires_grad=True)
    loss = balanced_l1_loss(pred, torch.zeros(0, 4), reduction=reduction)
    if reduction == "none":
        assert loss.shape == (0, 4)
        loss = loss.sum()
    assert loss.dim() == 0 and loss.item() == 0.0 and not torch.isnan(loss)
    assert loss.requires_grad
    loss.backward()
    assert pred.grad is not None and pred.grad.shape == (0, 4)

    module_pred = torch.zeros(0, 4, requires_grad=True)
    module_loss = BalancedL1Loss(reduction=reduction)(module_pred, torch.zeros(0, 4))
    module_loss.sum().backward()
    assert module_loss.sum().item() == 0.0
    assert module_pred.grad.shape == (0, 4)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_stays_finite(dtype):
    # Errors spanning tiny inliers to large outliers; b * |x| would overflow float16 at ~3500.
    values = [0.0, 1e-3, 0.05, 0.5, 0.99, 1.0, 3.0, 100.0, 1000.0, -1000.0, -0.2]
    pred = torch.tensor(values, dtype=dtype, requires_grad=True)
    target = torch.zeros(len(values), dtype=dtype)
    for reduction in ("none", "mean", "sum"):
        loss = balanced_l1_loss(pred, target, reduction=reduction)
        assert loss.dtype == dtype
        assert torch.isfinite(loss).all()
    loss = balanced_l1_loss(pred, target, reduction="none")
    expected = torch.tensor([_golden_loss(v, **PAPER, beta=1.0) for v in pred.tolist()])
    torch.testing.assert_close(loss.float(), expected, rtol=1e-2, atol=1e-3)
    loss.sum().backward()
    assert pred.grad.dtype == dtype and torch.isfinite(pred.grad).all()

    module_loss = BalancedL1Loss()(pred.detach(), target, torch.ones_like(target), avg_factor=2)
    assert module_loss.dtype == dtype and torch.isfinite(module_loss)


def test_huge_error_gradient_stays_finite():
    # b * |x| overflows float32 here; the unused inlier branch must not leak NaN into the grad.
    x = torch.tensor([1e38, -1e38], requires_grad=True)
    balanced_l1_loss(x, torch.zeros(2), reduction="none").sum().backward()
    torch.testing.assert_close(x.grad, torch.tensor([1.5, -1.5]))


@pytest.mark.parametrize("beta", BETAS)
def test_gradcheck_away_from_kinks(beta):
    gen = torch.Generator().manual_seed(4)
    # |x| / beta in (0.05, 0.9) or (1.1, 3), random signs: away from 0 and from +-beta.
    inlier = 0.05 + 0.85 * torch.rand(6, generator=gen, dtype=torch.float64)
    outlier = 1.1 + 1.9 * torch.rand(6, generator=gen, dtype=torch.float64)
    signs = torch.where(torch.rand(12, generator=gen) < 0.5, -1.0, 1.0).to(torch.float64)
    target = torch.randn(12, generator=gen, dtype=torch.float64)
    pred = (target + signs * torch.cat([inlier, outlier]) * beta).requires_grad_(True)
    target = target.requires_grad_(True)
    for reduction in ("none", "mean", "sum"):
        assert torch.autograd.gradcheck(
            lambda p, t: balanced_l1_loss(p, t, beta=beta, alpha=0.25, gamma=2.0,
                                          reduction=reduction),
            (pred, target))
    weight = torch.rand(12, generator=gen, dtype=torch.float64)
    module = BalancedL1Loss(beta=beta, loss_weight=1.7)
    assert torch.autograd.gradcheck(lambda p: module(p, target.detach(), weight, avg_factor=5.0),
                                    (pred,))


@pytest.mark.parametrize(
    "kwargs,name",
    [
        (dict(alpha=0.0), "alpha"),
        (dict(alpha=-1.0), "alpha"),
        (dict(alpha=float("nan")), "alpha"),
        (dict(gamma=0.0), "gamma"),
        (dict(gamma=-0.5), "gamma"),
        (dict(beta=0.0), "beta"),
        (dict(beta=-0.11), "beta"),
        (dict(reduction="avg"), "reduction"),
    ],
)
def test_function_value_errors(kwargs, name):
    with pytest.raises(ValueError, match=name):
        balanced_l1_loss(torch.zeros(2, 4), torch.zeros(2, 4), **kwargs)


def test_shape_mismatch_raises():
    with pytest.raises(ValueError, match="target"):
        balanced_l1_loss(torch.zeros(2, 4), torch.zeros(4, 2))
    with pytest.raises(ValueError, match="target"):
        BalancedL1Loss()(torch.zeros(2, 4), torch.zeros(2))


@pytest.mark.parametrize(
    "kwargs,name",
    [
        (dict(alpha=0.0), "alpha"),
        (dict(gamma=-1.0), "gamma"),
        (dict(beta=0.0), "beta"),
        (dict(reduction="elementwise"), "reduction"),
        (dict(loss_weight=float("inf")), "loss_weight"),
    ],
)
def test_module_construction_errors(kwargs, name):
    with pytest.raises(ValueError, match=name):
        BalancedL1Loss(**kwargs)


def test_module_forward_errors():
    module = BalancedL1Loss()
    pred, target = torch.zeros(2, 4), torch.zeros(2, 4)
    with pytest.raises(ValueError, match="avg_factor"):
        module(pred, target, avg_factor=2.0, reduction_override="sum")
    with pytest.raises(ValueError, match="avg_factor"):
        module(pred, target, avg_factor=-1.0)
    with pytest.raises(ValueError, match="reduction_override"):
        module(pred, target, reduction_override="max")
    with pytest.raises(ValueError, match="weight"):
        module(pred, target, torch.ones(3, 4))
    with pytest.raises(ValueError, match="weight"):
        module(pred, target, torch.ones(2, 2, 4))  # would broadcast pred up, not down
