"""Cascade R-CNN against Faster R-CNN: cost per training step and per inference, one run.

Four detectors with the same backbone and sizes, built by ``build_model`` with torchvision's
settings: Faster R-CNN, Cascade R-CNN (three stages), and their Libra versions (balanced feature
pyramid, IoU-balanced sampling and balanced L1 loss; in every stage for the cascade). Weights are
random and seeded; the backbone, FPN and RPN weights of Faster R-CNN are copied into the
others. The box regressors (the RPN's and every R-CNN stage's) are scaled by 0.02, as a trained
detector's move boxes by a fraction of their size: left random, they shrink many proposals to
nothing, and a model would sample fewer RoIs than another for reasons of its random weights.
Each model's RoIs per image and stage in one training step are recorded (``rois_per_stage``).
With the learning rate at 0 a training step does all the arithmetic of an SGD step but the
weights, hence the workload, do not drift.

Timing alternates the four round-robin in this one process (``benchmarks/_common.py``); the
ratios are medians over rounds of the per-round ratio to the Faster R-CNN of the same kind
(Cascade / Faster R-CNN, Libra Cascade / Libra Faster R-CNN). One training step = forward
(losses), sum, backward, SGD step; inference = one image, batch 1, ``torch.inference_mode``.

Inputs: training ``--train-batch`` images of ``--train-size`` pixels (min/max size set to them,
so nothing is resized) with 1-10 random boxes each; inference one ``--infer-size`` image, with
the score threshold at 0 so that every model post-processes all its (RoI, class) pairs (random
classifiers put different numbers of them above 0.05).

Run: ``python -m benchmarks.cascade_speed [--backbone resnet50] [--train-size 512 512]
[--infer-size 512 683] [--rounds N] [--smoke]``; writes
``benchmarks/results/cascade_speed_cpu.json``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any, Dict, List

if __package__ in (None, ""):  # run as a file: python benchmarks/cascade_speed.py
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch

from benchmarks import _common as common
from benchmarks.end_to_end import make_inference, make_train_step, training_batch
from libra_rcnn.models import baseline_model_config, build_model, libra_model_config

NAME = "cascade_speed"
# model name -> (architecture, Libra parts on); each cascade is compared with the Faster R-CNN
# of the same kind
MODELS = {"faster_rcnn": ("faster_rcnn", False), "cascade_rcnn": ("cascade_rcnn", False),
          "libra_faster_rcnn": ("faster_rcnn", True),
          "libra_cascade_rcnn": ("cascade_rcnn", True)}
PARTNER = {"faster_rcnn": "faster_rcnn", "cascade_rcnn": "faster_rcnn",
           "libra_faster_rcnn": "libra_faster_rcnn", "libra_cascade_rcnn": "libra_faster_rcnn"}
SHARED_PREFIXES = ("backbone.body.", "backbone.fpn.", "rpn.")
REGRESSOR_SCALE = 0.02


def _stages(model: torch.nn.Module) -> list:
    return list(getattr(model.roi_heads, "stages", [model.roi_heads]))


@torch.no_grad()
def _scale_regressors(model: torch.nn.Module) -> None:
    for layer in [model.rpn.head.bbox_pred] + [s.box_predictor.bbox_pred for s in _stages(model)]:
        layer.weight.mul_(REGRESSOR_SCALE)
        layer.bias.mul_(REGRESSOR_SCALE)


@torch.no_grad()
def rois_per_stage(model: torch.nn.Module, images, targets) -> List[List[int]]:
    """RoIs per image that each stage's box head sees in one training forward."""
    counts: List[List[int]] = []
    for stage in _stages(model):
        def counting(features, proposals, shapes, original=stage.box_outputs):
            counts.append([int(p.shape[0]) for p in proposals])
            return original(features, proposals, shapes)
        stage.box_outputs = counting
    try:
        model.train()(images, targets)
    finally:
        for stage in _stages(model):
            del stage.box_outputs
    return counts


def build_models(args: argparse.Namespace, size: tuple[int, int], device: torch.device
                 ) -> Dict[str, torch.nn.Module]:
    """The four models for images of ``size`` (H, W), Faster R-CNN's backbone, FPN and RPN
    weights copied into the others."""
    # score threshold 0: every model post-processes all its (RoI, class) pairs, the same work
    # whatever its random classifier scores (at 0.05 some would keep none)
    settings: Dict[str, Any] = {"num_classes": args.num_classes, "min_size": min(size),
                                "max_size": max(size), "box_score_thresh": 0.0}
    if args.smoke:
        settings.update(representation_size=32, roi_sampler={"num": 32},
                        rpn_post_nms_top_n_train=100, rpn_post_nms_top_n_test=100)
    models = {}
    for name, (arch, libra) in MODELS.items():
        make = libra_model_config if libra else baseline_model_config
        torch.manual_seed(args.seed)
        generator = torch.Generator().manual_seed(args.seed)
        models[name] = build_model(make(arch, args.backbone, **settings), generator=generator)
    shared = {k: v for k, v in models["faster_rcnn"].state_dict().items()
              if k.startswith(SHARED_PREFIXES)}
    for model in models.values():
        result = model.load_state_dict(shared, strict=False)
        assert not result.unexpected_keys, result.unexpected_keys
        _scale_regressors(model)
    return {name: model.to(device) for name, model in models.items()}


def summarize_phase(phase: str, times: Dict[str, List[float]], setting: Dict[str, Any]
                    ) -> List[Dict[str, Any]]:
    rows = []
    for name, values in times.items():
        ms = [t * 1e3 for t in values]
        stats = common.summarize(ms)
        partner = [t * 1e3 for t in times[PARTNER[name]]]
        rows.append({"phase": phase, "model": name, **setting, "median_ms": stats["median"],
                     "p25_ms": stats["p25"], "p75_ms": stats["p75"], "rounds": stats["n"],
                     "versus": PARTNER[name],
                     "ratio_vs_faster": common.paired_ratio(ms, partner)})
    return rows


def bench(args: argparse.Namespace, device: torch.device) -> List[Dict[str, Any]]:
    height, width = args.train_size
    models = build_models(args, (height, width), device)
    generator = torch.Generator().manual_seed(args.seed)
    images, targets = training_batch(args.train_batch, height, width, args.num_classes, device,
                                     generator)
    steps = {}
    for name, model in models.items():
        model.train()
        steps[name] = make_train_step(model, images, targets, device, amp=False)
    times = common.alternating_timings(steps, rounds=args.train_rounds, warmup=args.warmup,
                                       device=device)
    rows = summarize_phase("train", times, {"batch": args.train_batch, "size": f"{height}x{width}"})
    del steps
    for row in rows:
        row["rois_per_stage"] = rois_per_stage(models[row["model"]], images, targets)

    height, width = args.infer_size
    image = torch.rand(3, height, width, generator=generator).to(device)
    calls = {}
    for name, model in models.items():
        model.transform.min_size, model.transform.max_size = (min(height, width),), max(height, width)
        model.eval()
        calls[name] = make_inference(model, [image], device, amp=False)
    times = common.alternating_timings(calls, rounds=args.infer_rounds, warmup=args.warmup,
                                       device=device)
    infer_rows = summarize_phase("infer", times, {"batch": 1, "size": f"{height}x{width}"})
    for row in infer_rows:
        row["detections"] = int(calls[row["model"]]()[0]["boxes"].shape[0])
    return rows + infer_rows


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    common.add_common_arguments(parser, name=NAME)
    parser.add_argument("--backbone", default=None, help="default resnet50 (resnet18 in --smoke)")
    parser.add_argument("--num-classes", type=int, default=81, help="background included")
    parser.add_argument("--train-batch", type=int, default=None, help="default 2 (1 in --smoke)")
    parser.add_argument("--train-size", type=int, nargs=2, default=None, metavar=("H", "W"),
                        help="training images (default 512 512)")
    parser.add_argument("--infer-size", type=int, nargs=2, default=None, metavar=("H", "W"),
                        help="inference image (default 512 683)")
    parser.add_argument("--train-rounds", type=int, default=None, help="default --rounds or 5")
    parser.add_argument("--infer-rounds", type=int, default=None, help="default --rounds or 10")
    args = parser.parse_args(argv)
    if args.amp:
        parser.error("--amp is not supported here")
    if args.smoke:
        defaults = {"backbone": "resnet18", "train_batch": 1, "train_size": [64, 64],
                    "infer_size": [64, 96], "train_rounds": 1, "infer_rounds": 1, "warmup": 0}
    else:
        defaults = {"backbone": "resnet50", "train_batch": 2, "train_size": [512, 512],
                    "infer_size": [512, 683], "train_rounds": args.rounds or 5,
                    "infer_rounds": args.rounds or 10, "warmup": 1}
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.train_batch < 1 or min(args.train_size) < 32 or min(args.infer_size) < 32:
        parser.error("--train-batch must be >= 1 and image sizes >= 32")
    return args


def main(argv=None) -> Dict[str, Any]:
    args = parse_args(argv)
    device = common.resolve_device(args)
    rows = bench(args, device)
    print(common.format_table(rows, [
        ("phase", "phase", ""), ("model", "model", ""), ("batch", "B", "d"), ("size", "size", ""),
        ("median_ms", "median ms", ".1f"), ("p25_ms", "p25", ".1f"), ("p75_ms", "p75", ".1f"),
        ("versus", "versus", ""), ("ratio_vs_faster", "x versus", ".2f"),
        ("detections", "detections", ""), ("rois_per_stage", "RoIs per image and stage", "")]))
    settings = {key: getattr(args, key) for key in (
        "backbone", "num_classes", "train_batch", "train_size", "infer_size", "train_rounds",
        "infer_rounds", "warmup")}
    return common.write_results(NAME, device, args, {
        "benchmark": NAME, "environment": common.environment_info(device, args),
        "settings": settings, "rows": rows})


if __name__ == "__main__":
    main()
