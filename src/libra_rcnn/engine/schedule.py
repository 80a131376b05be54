"""Learning-rate schedule: linear warm-up followed by step decay (mmdetection's ``step`` policy),
built from torch's ``LinearLR`` and ``MultiStepLR``.

The schedule is iteration-based. With ``iters_per_epoch`` batches per epoch the rate at iteration
``t`` (0-based, the ``t``-th optimizer step) is ``lr * factor(t)`` with

* step decay: ``gamma ** (number of milestones m with t >= m)``, milestones at
  ``step_epoch * iters_per_epoch`` (so the 1x schedule, steps ``(8, 11)`` of 12 epochs, trains at
  ``lr`` for epochs 1-8, ``0.1 lr`` for 9-11 and ``0.01 lr`` for 12; 2x: ``(16, 22)`` of 24);
* linear warm-up, multiplied in while ``t < warmup_iters``:
  ``1 - (1 - t / warmup_iters) * (1 - warmup_ratio)``, i.e. from ``warmup_ratio`` at ``t = 0``
  to 1 at ``t = warmup_iters`` (paper/mmdetection: 500 iterations, ratio 1/3).
"""

from __future__ import annotations

from typing import Sequence

from torch.optim import Optimizer
from torch.optim.lr_scheduler import ChainedScheduler, LinearLR, MultiStepLR

__all__ = ["WarmupMultiStepLR", "build_lr_scheduler", "SCHEDULES"]

#: Detectron's named schedules: (epochs, lr step epochs).
SCHEDULES = {"1x": (12, (8, 11)), "2x": (24, (16, 22))}


class WarmupMultiStepLR(ChainedScheduler):
    """torch's ``LinearLR`` warm-up and ``MultiStepLR`` decay, stepped together (their factors
    multiply where they overlap); ``last_epoch`` is the number of steps taken, as for a single
    torch scheduler."""

    @property
    def last_epoch(self) -> int:
        return self._schedulers[-1].last_epoch


def build_lr_scheduler(
    optimizer: Optimizer,
    *,
    iters_per_epoch: int,
    lr_steps: Sequence[int],
    gamma: float = 0.1,
    warmup_iters: int = 500,
    warmup_ratio: float = 1.0 / 3.0,
) -> WarmupMultiStepLR:
    """The schedule, to be stepped once per iteration, after ``optimizer.step()``.

    ``lr_steps`` are epochs; the group learning rates already set on ``optimizer`` are the base.
    """
    if iters_per_epoch <= 0:
        raise ValueError(f"iters_per_epoch must be > 0, got {iters_per_epoch}")
    schedulers = []
    if warmup_iters > 0:
        schedulers.append(LinearLR(optimizer, start_factor=warmup_ratio, end_factor=1.0,
                                   total_iters=warmup_iters))
    schedulers.append(MultiStepLR(optimizer, milestones=[int(s) * iters_per_epoch for s in lr_steps],
                                  gamma=gamma))
    return WarmupMultiStepLR(schedulers)
