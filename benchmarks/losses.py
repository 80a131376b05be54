"""Balanced L1 loss against smooth L1 (and L1), per call.

Question: what does the balanced L1 loss (Sec. 3.3, Eq. 7-9) cost against the smooth L1 loss it
replaces, forward alone and forward + backward, as the number of regressed boxes grows?

Inputs: ``pred`` and ``target`` of shape ``[N, 4]`` (encoded deltas of N positive samples),
errors spread over both branches (half inliers ``|x| < 1``, half outliers), ``reduction="sum"``
(how the detectors call it). Cases, alternated in one process per (N, pass):

* ``smooth_l1``: ``torch.nn.functional.smooth_l1_loss`` (beta 1.0; beta does not change cost);
* ``l1``: ``torch.nn.functional.l1_loss``;
* ``balanced_l1``: ``libra_rcnn.ops.balanced_l1_loss`` (alpha 0.5, gamma 1.5, beta 1.0).

With ``--amp`` the inputs are in the autocast dtype (as a head's output would be) and the call
runs under autocast.

Run: ``python -m benchmarks.losses [--device cuda] [--amp] [--smoke] [--profile]``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any, Callable, Dict

if __package__ in (None, ""):  # run as a file: python benchmarks/losses.py
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch
import torch.nn.functional as F

from benchmarks import _common as common
from libra_rcnn.ops import balanced_l1_loss

NAME = "losses"
CASES = ("smooth_l1", "l1", "balanced_l1")
LOSSES: Dict[str, Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = {
    "smooth_l1": lambda p, t: F.smooth_l1_loss(p, t, beta=1.0, reduction="sum"),
    "l1": lambda p, t: F.l1_loss(p, t, reduction="sum"),
    "balanced_l1": lambda p, t: balanced_l1_loss(p, t, alpha=0.5, gamma=1.5, beta=1.0,
                                                 reduction="sum"),
}


def make_inputs(num_boxes: int, dtype: torch.dtype, device: torch.device,
                generator: torch.Generator):
    """``pred`` (requires grad) and ``target``, ``[num_boxes, 4]``; errors in (-3, 3)."""
    target = torch.randn(num_boxes, 4, generator=generator)
    error = (torch.rand(num_boxes, 4, generator=generator) * 2 - 1) * 3.0
    pred = (target + error).to(device=device, dtype=dtype).requires_grad_(True)
    return pred, target.to(device=device, dtype=dtype)


def make_cases(pred: torch.Tensor, target: torch.Tensor, backward: bool, device: torch.device,
               amp: bool) -> Dict[str, Callable[[], Any]]:
    def case(loss_fn):
        def call():
            with common.autocast(device, amp):
                loss = loss_fn(pred, target)
            if backward:
                loss.backward()
                pred.grad = None
            return loss
        return call

    return {name: case(LOSSES[name]) for name in CASES}


def main(argv=None) -> Dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    common.add_common_arguments(parser, name=NAME)
    parser.add_argument("--inner", type=int, default=None, help="calls per case per round")
    parser.add_argument("--sizes", type=int, nargs="+", default=None,
                        help="numbers of boxes N (default 128 512 2048 8192)")
    parser.add_argument("--profile", action="store_true",
                        help="also print torch.profiler's top ops of balanced_l1 fwd+bwd at N=512")
    args = parser.parse_args(argv)
    device = common.resolve_device(args)
    rounds = args.rounds or (2 if args.smoke else 40)
    warmup = args.warmup if args.warmup is not None else (1 if args.smoke else 5)
    inner = args.inner or (2 if args.smoke else 50)
    sizes = args.sizes or ([16, 64] if args.smoke else [128, 512, 2048, 8192])
    if inner < 1 or min(sizes) < 1:
        raise ValueError("--inner and --sizes must be >= 1")
    dtype = common.autocast_dtype(device) if args.amp else torch.float32
    generator = torch.Generator().manual_seed(args.seed)

    rows = []
    for num_boxes in sizes:
        pred, target = make_inputs(num_boxes, dtype, device, generator)
        for backward in (False, True):
            cases = make_cases(pred, target, backward, device, args.amp)
            times = common.alternating_timings(cases, rounds=rounds, warmup=warmup, inner=inner,
                                               device=device)
            for name in CASES:
                stats = common.summarize([t * 1e6 for t in times[name]])
                rows.append({
                    "boxes": num_boxes, "pass": "fwd+bwd" if backward else "fwd", "case": name,
                    "median_us": stats["median"], "p25_us": stats["p25"],
                    "p75_us": stats["p75"], "rounds": stats["n"],
                    "ratio_vs_smooth_l1": common.paired_ratio(times[name], times["smooth_l1"]),
                })

    columns = [("boxes", "boxes", "d"), ("pass", "pass", ""), ("case", "case", ""),
               ("median_us", "median us", ".1f"), ("p25_us", "p25", ".1f"),
               ("p75_us", "p75", ".1f"), ("ratio_vs_smooth_l1", "x smooth_l1", ".2f")]
    print(common.format_table(rows, columns))

    if args.profile:
        pred, target = make_inputs(512, dtype, device, generator)
        call = make_cases(pred, target, True, device, args.amp)["balanced_l1"]
        print(common.profile_summary(call, device, calls=200))

    payload = {
        "benchmark": NAME,
        "environment": common.environment_info(device, args),
        "settings": {"rounds": rounds, "warmup": warmup, "inner": inner, "sizes": sizes,
                     "dtype": str(dtype).replace("torch.", "")},
        "rows": rows,
    }
    return common.write_results(NAME, device, args, payload)


if __name__ == "__main__":
    main()
