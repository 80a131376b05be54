"""Learning-rate schedule: linear warm-up followed by step decay (mmdetection's ``step`` policy).

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

from dataclasses import dataclass
from typing import Sequence

from torch.optim import Optimizer
from torch.optim.lr_scheduler import LambdaLR

__all__ = ["WarmupMultiStepFactor", "build_lr_scheduler", "SCHEDULES"]

#: Detectron's named schedules: (epochs, lr step epochs).
SCHEDULES = {"1x": (12, (8, 11)), "2x": (24, (16, 22))}


@dataclass
class WarmupMultiStepFactor:
    """``factor(t)``: the multiplier of the base learning rate at iteration ``t`` (see module doc).

    A callable dataclass (not a closure) so ``LambdaLR.state_dict`` stores its plain fields.
    """

    milestones: list[int]
    gamma: float = 0.1
    warmup_iters: int = 500
    warmup_ratio: float = 1.0 / 3.0

    def __post_init__(self) -> None:
        self.milestones = [int(m) for m in self.milestones]
        if any(b <= a for a, b in zip(self.milestones, self.milestones[1:])):
            raise ValueError(f"milestones must be strictly increasing, got {self.milestones}")
        if self.warmup_iters < 0:
            raise ValueError(f"warmup_iters must be >= 0, got {self.warmup_iters}")
        if not 0.0 < self.warmup_ratio <= 1.0:
            raise ValueError(f"warmup_ratio must be in (0, 1], got {self.warmup_ratio}")

    def __call__(self, iteration: int) -> float:
        factor = self.gamma ** sum(1 for m in self.milestones if iteration >= m)
        if iteration < self.warmup_iters:
            factor *= 1.0 - (1.0 - iteration / self.warmup_iters) * (1.0 - self.warmup_ratio)
        return factor


def build_lr_scheduler(
    optimizer: Optimizer,
    *,
    iters_per_epoch: int,
    lr_steps: Sequence[int],
    gamma: float = 0.1,
    warmup_iters: int = 500,
    warmup_ratio: float = 1.0 / 3.0,
) -> LambdaLR:
    """A ``LambdaLR`` to be stepped once per iteration, after ``optimizer.step()``.

    ``lr_steps`` are epochs; the group learning rates already set on ``optimizer`` are the base.
    """
    if iters_per_epoch <= 0:
        raise ValueError(f"iters_per_epoch must be > 0, got {iters_per_epoch}")
    factor = WarmupMultiStepFactor(
        milestones=[int(step) * iters_per_epoch for step in lr_steps],
        gamma=gamma,
        warmup_iters=warmup_iters,
        warmup_ratio=warmup_ratio,
    )
    return LambdaLR(optimizer, lr_lambda=factor)
