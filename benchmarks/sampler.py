"""IoU-balanced sampling against random sampling, per image.

Question: what does the RoI sampler of Libra R-CNN (Sec. 3.1: instance-balanced positives +
IoU-balanced negatives, K = 3 bins) cost per image against random sampling, and how does that
scale with the number of proposals and of ground-truth boxes? Target: <= 1 ms per image for
2000 proposals and 20 boxes.

Inputs per image are synthetic but shaped like a detector's: ``G`` ground-truth boxes in an
800x1333 image, ``P`` proposals (half jittered copies of the boxes, as RPN proposals cluster on
objects, half uniform boxes), the boxes appended as proposals (``add_gt_as_proposals``), matched
with IoU 0.5 (positives ``>= 0.5``, the rest negatives). Timing covers the sampler call only
(labels, max IoU and matched index are its inputs), 512 samples with 25% positives.

Cases, all alternated in one process per (P, G) point:

* ``torchvision``: torchvision's ``BalancedPositiveNegativeSampler`` (what its Faster R-CNN
  uses), plus the ``torch.where`` torchvision then calls to turn the masks into indices;
* ``random``: ``sample_positives_negatives`` with both balances off (our random path);
* ``pos_balance``, ``neg_balance``: one Libra half each;
* ``libra``: both, the paper's sampler.

Run: ``python -m benchmarks.sampler [--device cuda] [--smoke] [--profile]``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any, Callable, Dict, List, Tuple

if __package__ in (None, ""):  # run as a file: python benchmarks/sampler.py
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch
from torchvision.models.detection._utils import BalancedPositiveNegativeSampler
from torchvision.ops import box_iou

from benchmarks import _common as common
from libra_rcnn.ops import SamplingSettings, sample_positives_negatives

NAME = "sampler"
IMAGE_HW = (800, 1333)
NUM_SAMPLES = 512
POS_FRACTION = 0.25
IOU_THRESHOLD = 0.5
TARGET_POINT = (2000, 20)
TARGET_US = 1000.0
CASES = ("torchvision", "random", "pos_balance", "neg_balance", "libra")


def synthetic_image(num_proposals: int, num_gt: int, generator: torch.Generator,
                    device: torch.device) -> Dict[str, torch.Tensor]:
    """Matching results of one synthetic image.

    Returns dict with ``labels`` LongTensor[P + G] (class ``>= 1`` positive, 0 negative),
    ``max_overlaps`` FloatTensor[P + G] and ``matched_gt_inds`` LongTensor[P + G], on ``device``.
    """
    h, w = IMAGE_HW

    def random_boxes(n: int, min_side: float, max_side: float) -> torch.Tensor:
        side = torch.rand(n, 2, generator=generator) * (max_side - min_side) + min_side
        centre = torch.rand(n, 2, generator=generator) * torch.tensor([w, h])
        boxes = torch.cat([centre - side / 2, centre + side / 2], dim=1)
        return boxes.clamp(min=0).minimum(torch.tensor([w, h, w, h], dtype=torch.float32))

    gt = random_boxes(num_gt, 24.0, 400.0)
    num_jittered = num_proposals // 2
    source = gt[torch.randint(num_gt, (num_jittered,), generator=generator)]
    wh = (source[:, 2:] - source[:, :2]).repeat(1, 2)
    jittered = source + (torch.rand(num_jittered, 4, generator=generator) - 0.5) * 0.6 * wh
    jittered = torch.cat([jittered[:, :2].minimum(jittered[:, 2:]),
                          jittered[:, :2].maximum(jittered[:, 2:]) + 1.0], dim=1)
    uniform = random_boxes(num_proposals - num_jittered, 8.0, 600.0)
    proposals = torch.cat([jittered, uniform, gt])  # gt appended, as the detector does

    max_overlaps, matched = box_iou(gt, proposals).max(dim=0)
    gt_classes = torch.randint(1, 81, (num_gt,), generator=generator)
    labels = torch.where(max_overlaps >= IOU_THRESHOLD, gt_classes[matched], 0)
    return {
        "labels": labels.to(device),
        "max_overlaps": max_overlaps.to(device),
        "matched_gt_inds": matched.to(device),
    }


def make_cases(image: Dict[str, torch.Tensor], generator: torch.Generator
               ) -> Dict[str, Callable[[], Any]]:
    tv_sampler = BalancedPositiveNegativeSampler(NUM_SAMPLES, POS_FRACTION)

    def torchvision_case():
        pos_masks, neg_masks = tv_sampler([image["labels"]])
        return torch.where(pos_masks[0] | neg_masks[0])[0]

    def ours(pos_balance: bool, neg_balance: bool) -> Callable[[], Any]:
        def call():
            return sample_positives_negatives(
                image["labels"], image["max_overlaps"], image["matched_gt_inds"],
                SamplingSettings(num=NUM_SAMPLES, pos_fraction=POS_FRACTION,
                                 pos_balance=pos_balance, neg_balance=neg_balance, num_bins=3,
                                 floor_thr=-1.0, floor_fraction=0.0),
                generator=generator
            )
        return call

    return {
        "torchvision": torchvision_case,
        "random": ours(False, False),
        "pos_balance": ours(True, False),
        "neg_balance": ours(False, True),
        "libra": ours(True, True),
    }


def grid(smoke: bool) -> List[Tuple[int, int]]:
    if smoke:
        return [(200, 1), (200, 5)]
    proposals_sweep = [(p, 20) for p in (500, 1000, 2000, 4000)]
    gt_sweep = [(2000, g) for g in (1, 5, 10, 50)]  # (2000, 20) is in the first sweep
    return proposals_sweep + gt_sweep


def _parse_point(text: str) -> Tuple[int, int]:
    try:
        proposals, gt = (int(part) for part in text.lower().split("x"))
    except ValueError:
        raise ValueError(f"--points entries must look like 2000x20, got {text!r}") from None
    if proposals < 1 or gt < 1:
        raise ValueError(f"--points needs >= 1 proposals and gt boxes, got {text!r}")
    return proposals, gt


def main(argv=None) -> Dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    common.add_common_arguments(parser, name=NAME)
    parser.add_argument("--inner", type=int, default=None, help="calls per case per round")
    parser.add_argument("--points", nargs="+", default=None, metavar="PxG",
                        help="(proposals, gt) points to run, e.g. 2000x20 (default: both sweeps)")
    parser.add_argument("--profile", action="store_true",
                        help="also print torch.profiler's top ops for the libra case at 2000/20")
    args = parser.parse_args(argv)
    device = common.resolve_device(args)
    rounds = args.rounds or (2 if args.smoke else 40)
    warmup = args.warmup if args.warmup is not None else (1 if args.smoke else 5)
    inner = args.inner or (2 if args.smoke else 10)
    if inner < 1:
        raise ValueError(f"--inner must be >= 1, got {inner}")
    data_gen = torch.Generator().manual_seed(args.seed)
    sample_gen = torch.Generator(device=device).manual_seed(args.seed)

    points = grid(args.smoke) if args.points is None else [_parse_point(p) for p in args.points]
    rows = []
    for num_proposals, num_gt in points:
        image = synthetic_image(num_proposals, num_gt, data_gen, device)
        cases = make_cases(image, sample_gen)
        times = common.alternating_timings(cases, rounds=rounds, warmup=warmup, inner=inner,
                                           device=device)
        num_pos = int((image["labels"] >= 1).sum())
        for name in CASES:
            stats = common.summarize([t * 1e6 for t in times[name]])
            rows.append({
                "proposals": num_proposals, "gt": num_gt, "candidates_pos": num_pos,
                "case": name, "median_us": stats["median"], "p25_us": stats["p25"],
                "p75_us": stats["p75"], "rounds": stats["n"],
                "ratio_vs_torchvision": common.paired_ratio(times[name], times["torchvision"]),
                "ratio_vs_random": common.paired_ratio(times[name], times["random"]),
            })

    target = None
    libra_row = next((r for r in rows if (r["proposals"], r["gt"]) == TARGET_POINT
                      and r["case"] == "libra"), None)
    if not args.smoke and libra_row is not None:
        target = {"what": "libra sampler, 2000 proposals, 20 gt, median us per image",
                  "limit_us": TARGET_US, "measured_us": libra_row["median_us"],
                  "met": libra_row["median_us"] <= TARGET_US}

    columns = [("proposals", "proposals", "d"), ("gt", "gt", "d"), ("candidates_pos", "pos", "d"),
               ("case", "case", ""), ("median_us", "median us", ".1f"), ("p25_us", "p25", ".1f"),
               ("p75_us", "p75", ".1f"), ("ratio_vs_torchvision", "x torchvision", ".2f"),
               ("ratio_vs_random", "x random", ".2f")]
    print(common.format_table(rows, columns))
    if target is not None:
        print(f"target: {target['what']} <= {TARGET_US:.0f} us: measured "
              f"{target['measured_us']:.1f} us -> {'met' if target['met'] else 'MISSED'}")

    if args.profile:
        image = synthetic_image(*TARGET_POINT, data_gen, device)
        print(common.profile_summary(make_cases(image, sample_gen)["libra"], device, calls=50))

    payload = {
        "benchmark": NAME,
        "environment": common.environment_info(device, args),
        "settings": {"rounds": rounds, "warmup": warmup, "inner": inner,
                     "num_samples": NUM_SAMPLES, "pos_fraction": POS_FRACTION,
                     "iou_threshold": IOU_THRESHOLD, "num_bins": 3, "image_hw": IMAGE_HW},
        "rows": rows,
        "target": target,
    }
    return common.write_results(NAME, device, args, payload)


if __name__ == "__main__":
    main()
