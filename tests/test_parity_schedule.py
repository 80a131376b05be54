"""Warm-up + step schedule against mmengine's ``LinearLR`` + ``MultiStepLR`` (mmdetection 3.3's
Libra R-CNN ``param_scheduler``), stepped as mmengine's ``ParamSchedulerHook`` steps them.

Finding: mmengine's ``LinearLR(begin=0, end=500)`` divides by ``end - begin - 1 = 499``, so its
warm-up reaches the full rate at iteration 499, ours (mmcv 1.x / mmdetection 2.x's ``linear``
warm-up) at iteration 500. ``warmup_iters=499`` reproduces mmengine's curve exactly.
"""

from __future__ import annotations

import pytest
import torch

from libra_rcnn.engine.schedule import build_lr_scheduler
from mmdet_oracle import load_config

# Every test here needs mmdetection as the oracle: without it the ``mmdet`` fixture skips them
# with mmdet_oracle.SKIP_REASON ("pip install -e .[parity]").
pytestmark = pytest.mark.usefixtures("mmdet")

ITERS_PER_EPOCH = 100  # warm-up (500) spans five epochs; milestones at 800 and 1100
BASE_LR = 0.02


def _optimizer():
    return torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=BASE_LR, momentum=0.9)


def _mmengine_factors(convert_to_iter_based: bool) -> list[float]:
    """LR / base LR at every iteration of the Libra 1x config's schedule under mmengine."""
    from mmengine.registry import PARAM_SCHEDULERS

    cfg = load_config("libra-faster-rcnn_r50_fpn_1x_coco.py")
    epochs = cfg.train_cfg.max_epochs
    optimizer = _optimizer()
    schedulers = []
    for scheduler_cfg in cfg.param_scheduler:
        kwargs = dict(scheduler_cfg)
        cls = PARAM_SCHEDULERS.get(kwargs.pop("type"))
        if convert_to_iter_based and kwargs.get("by_epoch", True):
            schedulers.append(cls.build_iter_from_epoch(optimizer, epoch_length=ITERS_PER_EPOCH,
                                                        **kwargs))
        else:
            schedulers.append(cls(optimizer, **kwargs))
    factors = []
    for _ in range(epochs):
        for _ in range(ITERS_PER_EPOCH):
            factors.append(optimizer.param_groups[0]["lr"] / BASE_LR)
            optimizer.step()
            for s in schedulers:  # ParamSchedulerHook.after_train_iter
                if not s.by_epoch:
                    s.step()
        for s in schedulers:  # ParamSchedulerHook.after_train_epoch
            if s.by_epoch:
                s.step()
    return factors


def _our_factors(num_iters: int, warmup_iters: int) -> list[float]:
    optimizer = _optimizer()
    scheduler = build_lr_scheduler(optimizer, iters_per_epoch=ITERS_PER_EPOCH, lr_steps=[8, 11],
                                   warmup_iters=warmup_iters, warmup_ratio=0.001)
    factors = []
    for _ in range(num_iters):
        factors.append(optimizer.param_groups[0]["lr"] / BASE_LR)
        optimizer.step()
        scheduler.step()
    return factors


@pytest.fixture(scope="module")
def mmengine_factors(mmdet):
    by_epoch = _mmengine_factors(convert_to_iter_based=False)
    by_iter = _mmengine_factors(convert_to_iter_based=True)
    assert by_epoch == pytest.approx(by_iter, rel=1e-12)  # both ways mmengine can step it
    return by_epoch


def test_config_is_the_expected_schedule(mmdet):
    cfg = load_config("libra-faster-rcnn_r50_fpn_1x_coco.py")
    linear, multistep = cfg.param_scheduler
    assert (linear.type, linear.start_factor, linear.begin, linear.end, linear.by_epoch) == (
        "LinearLR", 0.001, 0, 500, False)
    assert (multistep.type, multistep.milestones, multistep.gamma, multistep.by_epoch) == (
        "MultiStepLR", [8, 11], 0.1, True)


def test_after_warmup_and_across_milestones_equal_mmengine(mmengine_factors):
    ours = _our_factors(len(mmengine_factors), warmup_iters=500)
    assert ours[500:] == pytest.approx(mmengine_factors[500:], rel=1e-12)
    # the step decay: 1 until iteration 800, 0.1 until 1100, 0.01 after
    for t, factor in [(799, 1.0), (800, 0.1), (1099, 0.1), (1100, 0.01)]:
        assert mmengine_factors[t] == pytest.approx(factor)


def test_warmup_differs_by_one_iteration(mmengine_factors):
    ours = _our_factors(600, warmup_iters=500)
    for t in range(600):
        assert mmengine_factors[t] == pytest.approx(0.001 + 0.999 * min(t / 499, 1.0), rel=1e-12)
        assert ours[t] == pytest.approx(0.001 + 0.999 * min(t / 500, 1.0), rel=1e-12)
    gap = max(abs(a - b) for a, b in zip(ours, mmengine_factors[:600]))
    assert 0.0015 < gap < 0.0021  # largest near the end of the warm-up (t = 499: 0.998 vs 1)
    # one iteration shorter, ours is mmengine's curve
    shorter = _our_factors(len(mmengine_factors), warmup_iters=499)
    assert shorter == pytest.approx(mmengine_factors, rel=1e-12)


def test_the_shipped_config_schedule_is_mmengines(mmengine_factors):
    from libra_rcnn.config import load_config as load_our_config

    train = load_our_config("libra_faster_rcnn_r50_fpn_1x_coco").train
    optimizer = _optimizer()
    scheduler = build_lr_scheduler(optimizer, iters_per_epoch=ITERS_PER_EPOCH,
                                   lr_steps=train.lr_steps, gamma=train.gamma,
                                   warmup_iters=train.warmup_iters, warmup_ratio=train.warmup_ratio)
    ours = []
    for _ in range(train.epochs * ITERS_PER_EPOCH):
        ours.append(optimizer.param_groups[0]["lr"] / BASE_LR)
        optimizer.step()
        scheduler.step()
    assert ours == pytest.approx(mmengine_factors, rel=1e-12)
