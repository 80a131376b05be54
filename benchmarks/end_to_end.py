"""Libra detectors against torchvision's, end to end.

Questions:

1. Training step time and peak memory, and inference time per image, of Libra Faster R-CNN
   against torchvision's Faster R-CNN with the same backbone, weights and inputs; the same for
   Libra RetinaNet against torchvision's RetinaNet.
2. Each Libra part's share of the overhead: the parts (IoU-balanced sampler, balanced feature
   pyramid, balanced L1 loss) are switched on one at a time over our baseline model (every
   part off), which itself is compared with torchvision's model (the cost of our subclasses).
3. Achieved GFLOP/s of inference against the peak of a large matmul on this machine.

Resolution. ``ours_baseline`` does the same arithmetic as torchvision's model, so its ratio to
it shows how far this run can tell models apart. ``--twin`` adds a purer control,
``torchvision_twin``: a second, separately built copy of torchvision's model with the same
weights. Differences between models smaller than the twin's distance from 1.000 are not
resolved by the run.

Targets (CPU, ratios measured in one run): Libra Faster R-CNN training step <= 1.05x and
inference <= 1.03x torchvision's.

Models. torchvision's reference is built from torchvision's public pieces with our config's
settings (``resnet_fpn_backbone`` with ``FrozenBatchNorm2d`` and the same trainable layers,
``FasterRCNN`` / ``RetinaNet`` with the same sizes, RPN/RoI numbers, thresholds; RetinaNet's
P6/P7 from C5 as ours). Its state dict is loaded into every one of our models
(``strict=False``: only the balanced feature pyramid's parameters are new), so all models start
from the same weights. Weights are random (no downloads); with the learning rate at 0 the SGD
step still does all its arithmetic but the weights, hence the workload, do not drift between
rounds.

Inputs. Training: ``--train-batch`` images of ``--train-size`` H x W pixels (the transform's
``min_size``/``max_size`` are set to the short/long side, so nothing is resized), 1-10 random
boxes each. CPU default 2 x 512x512 (smaller than 800x1333, to keep training steps short on a
CPU); CUDA default 2 x 800x1333 (the paper's scale). Inference: one 800x1333 image
(the paper's test scale), batch 1.

One training step = forward (losses), sum, backward, SGD step (momentum 0.9, weight decay 1e-4),
``zero_grad(set_to_none=True)``; under ``--amp`` the forward runs under autocast, with a
GradScaler on CUDA. Timing alternates the models round-robin in this one process (see
``benchmarks/_common.py``); peak memory is measured per model on one extra call afterwards.

Run: ``python -m benchmarks.end_to_end [--arch faster_rcnn retinanet] [--device cuda] [--amp]
[--smoke] [--profile]``.
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import sys
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Tuple

if __package__ in (None, ""):  # run as a file: python benchmarks/end_to_end.py
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch
from torch import nn
from torchvision.models.detection import FasterRCNN, RetinaNet
from torchvision.models.detection.faster_rcnn import FastRCNNPredictor, TwoMLPHead
from torchvision.models.detection.backbone_utils import resnet_fpn_backbone as tv_resnet_fpn_backbone
from torchvision.ops import FrozenBatchNorm2d
from torchvision.ops.feature_pyramid_network import LastLevelP6P7

from benchmarks import _common as common
from libra_rcnn.models import (ModelConfig, baseline_model_config, build_model, libra_model_config,
                                used_settings)

NAME = "end_to_end"
TARGETS = {("faster_rcnn", "train"): 1.05, ("faster_rcnn", "infer"): 1.03}
SMOKE_OVERRIDES = {
    "representation_size": 32, "roi_sampler": {"num": 32}, "rpn_batch_size_per_image": 32,
    "rpn_pre_nms_top_n_train": 100, "rpn_post_nms_top_n_train": 100,
    "rpn_pre_nms_top_n_test": 100, "rpn_post_nms_top_n_test": 100,
}
REFERENCE = "torchvision"
TWIN = "torchvision_twin"
OURS_BASELINE = "ours_baseline"
FULL = "libra"


# --------------------------------------------------------------------------------------------
# models


def model_variants(arch: str, backbone: str, num_classes: int, parts: bool,
                   overrides: Optional[Dict[str, Any]] = None, twin: bool = False
                   ) -> Dict[str, Optional[ModelConfig]]:
    """name -> our ModelConfig (None for torchvision's reference and its twin), in alternation
    order.

    ``+sampler`` etc. switch ONE Libra part on over the baseline, taking its settings from the
    full Libra config so that the parts add up to ``libra``. ``overrides`` (ModelConfig fields)
    apply to all of them.
    """
    overrides = used_settings(arch, overrides or {})
    base = baseline_model_config(arch, backbone, num_classes=num_classes, **overrides)
    libra = libra_model_config(arch, backbone, num_classes=num_classes, **overrides)
    variants: Dict[str, Optional[ModelConfig]] = {REFERENCE: None}
    if twin:
        variants[TWIN] = None
    variants[OURS_BASELINE] = base
    if parts:
        if arch == "faster_rcnn":
            variants["+sampler"] = dataclasses.replace(
                base, roi_sampler=libra.roi_sampler, rpn_neg_pos_ub=libra.rpn_neg_pos_ub)
            variants["+pyramid"] = dataclasses.replace(base, bfp=libra.bfp)
            variants["+loss"] = dataclasses.replace(base, box_loss=libra.box_loss)
        elif arch == "retinanet":
            variants["+pyramid"] = dataclasses.replace(base, bfp=libra.bfp)
            variants["+loss"] = dataclasses.replace(base, retina_box_loss=libra.retina_box_loss)
    variants[FULL] = libra
    return variants


def variant_changes(variants: Dict[str, Optional[ModelConfig]]) -> Dict[str, Any]:
    """name -> the ModelConfig fields in which it differs from our baseline (for the record)."""
    base = variants[OURS_BASELINE]
    changes: Dict[str, Any] = {}
    for name, cfg in variants.items():
        if cfg is None:
            changes[name] = "torchvision reference" + (" (second copy)" if name == TWIN else "")
            continue
        changes[name] = sorted(field.name for field in dataclasses.fields(ModelConfig)
                               if getattr(cfg, field.name) != getattr(base, field.name))
    return changes


def torchvision_reference(cfg: ModelConfig) -> nn.Module:
    """torchvision's detector with the settings of our baseline ``cfg`` (same parameter names)."""
    if cfg.norm != "frozen_bn" or cfg.neck != "fpn" or cfg.fpn_channels != 256:
        raise ValueError("the torchvision reference needs norm='frozen_bn', neck='fpn', fpn_channels=256")
    if cfg.arch == "faster_rcnn":
        backbone = tv_resnet_fpn_backbone(backbone_name=cfg.backbone, weights=None,
                                          norm_layer=FrozenBatchNorm2d,
                                          trainable_layers=cfg.trainable_backbone_layers)
        representation = cfg.representation_size
        return FasterRCNN(
            backbone, num_classes=None, min_size=cfg.min_size, max_size=cfg.max_size,
            box_head=TwoMLPHead(backbone.out_channels * 7 * 7, representation),
            box_predictor=FastRCNNPredictor(representation, cfg.num_classes),
            rpn_pre_nms_top_n_train=cfg.rpn_pre_nms_top_n_train,
            rpn_pre_nms_top_n_test=cfg.rpn_pre_nms_top_n_test,
            rpn_post_nms_top_n_train=cfg.rpn_post_nms_top_n_train,
            rpn_post_nms_top_n_test=cfg.rpn_post_nms_top_n_test,
            rpn_batch_size_per_image=cfg.rpn_batch_size_per_image,
            rpn_positive_fraction=cfg.rpn_positive_fraction,
            box_batch_size_per_image=cfg.roi_sampler.num,
            box_positive_fraction=cfg.roi_sampler.pos_fraction,
            box_score_thresh=cfg.box_score_thresh, box_nms_thresh=cfg.box_nms_thresh,
            box_detections_per_img=cfg.box_detections_per_img,
        )
    if cfg.arch == "retinanet":
        probe = tv_resnet_fpn_backbone(backbone_name=cfg.backbone, weights=None,
                                       norm_layer=FrozenBatchNorm2d, trainable_layers=0)
        c5_channels = probe.body.layer4[-1].conv1.in_channels  # block input = stage output
        backbone = tv_resnet_fpn_backbone(
            backbone_name=cfg.backbone, weights=None, norm_layer=FrozenBatchNorm2d,
            trainable_layers=cfg.trainable_backbone_layers, returned_layers=[2, 3, 4],
            extra_blocks=LastLevelP6P7(c5_channels, 256))
        return RetinaNet(
            backbone, num_classes=cfg.num_classes, min_size=cfg.min_size, max_size=cfg.max_size,
            score_thresh=cfg.box_score_thresh, nms_thresh=cfg.box_nms_thresh,
            detections_per_img=cfg.box_detections_per_img,
        )
    raise ValueError(f"arch must be faster_rcnn or retinanet, got {cfg.arch!r}")


def build_models(variants: Dict[str, Optional[ModelConfig]], device: torch.device, seed: int
                 ) -> Tuple[Dict[str, nn.Module], Dict[str, Any]]:
    """All models on ``device``, torchvision's weights copied into ours; and a loading report."""
    base = variants[OURS_BASELINE]
    torch.manual_seed(seed)
    reference = torchvision_reference(base)
    state = reference.state_dict()
    models = {REFERENCE: reference}
    report: Dict[str, Any] = {}
    for name, cfg in variants.items():
        if name == TWIN:
            torch.manual_seed(seed)
            twin = torchvision_reference(base)
            twin.load_state_dict(state)
            models[name] = twin
            continue
        if cfg is None:
            continue
        torch.manual_seed(seed)
        # the samplers draw on the model's device, as torchvision's do
        model = build_model(cfg, generator=torch.Generator(device=device).manual_seed(seed))
        result = model.load_state_dict(state, strict=False)
        if result.unexpected_keys or any(not key.startswith("backbone.bfp.")
                                         for key in result.missing_keys):
            raise RuntimeError(f"{name}: torchvision's state dict does not fit: {result}")
        report[name] = {"new_parameters": len(result.missing_keys)}
        models[name] = model
    return {name: model.to(device) for name, model in models.items()}, report


def set_input_size(model: nn.Module, min_size: int, max_size: int) -> None:
    """The transform's resize target (torchvision's GeneralizedRCNNTransform attributes)."""
    model.transform.min_size = (min_size,)
    model.transform.max_size = max_size


# --------------------------------------------------------------------------------------------
# inputs and steps


def training_batch(batch: int, height: int, width: int, num_classes: int, device: torch.device,
                   generator: torch.Generator) -> Tuple[List[torch.Tensor], List[Dict[str, torch.Tensor]]]:
    """``batch`` random images ``[3, height, width]`` with 1-10 random boxes (labels >= 1) each."""
    images, targets = [], []
    extent = torch.tensor([width, height], dtype=torch.float32)
    for _ in range(batch):
        images.append(torch.rand(3, height, width, generator=generator).to(device))
        num_boxes = int(torch.randint(1, 11, (1,), generator=generator))
        xy = torch.rand(num_boxes, 2, generator=generator) * extent * 0.7
        wh = torch.rand(num_boxes, 2, generator=generator) * extent * 0.3 + 8.0
        boxes = torch.cat([xy, torch.minimum(xy + wh, extent)], dim=1)
        labels = torch.randint(1, num_classes, (num_boxes,), generator=generator)
        targets.append({"boxes": boxes.to(device), "labels": labels.to(device)})
    return images, targets


def make_train_step(model: nn.Module, images, targets, device: torch.device, amp: bool
                    ) -> Callable[[], Any]:
    params = [p for p in model.parameters() if p.requires_grad]
    # lr 0: every step does the full update arithmetic but the workload never drifts
    optimizer = torch.optim.SGD(params, lr=0.0, momentum=0.9, weight_decay=1e-4)
    scaler = torch.amp.GradScaler("cuda") if (amp and device.type == "cuda") else None

    def step():
        with common.autocast(device, amp):
            losses = model(images, targets)
            loss = sum(losses.values())
        if scaler is not None:
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
        else:
            loss.backward()
            optimizer.step()
        optimizer.zero_grad(set_to_none=True)  # at the end, so a step frees what it allocated
        return loss.detach()
    return step


def make_inference(model: nn.Module, images, device: torch.device, amp: bool) -> Callable[[], Any]:
    def infer():
        with torch.inference_mode(), common.autocast(device, amp):
            return model(images)
    return infer


def paired_difference(a: List[float], b: List[float]) -> float:
    return statistics.median(x - y for x, y in zip(a, b))


# --------------------------------------------------------------------------------------------
# one architecture


def bench_arch(arch: str, args: argparse.Namespace, device: torch.device,
               peak: Optional[Dict[str, float]]) -> Dict[str, Any]:
    overrides: Dict[str, Any] = {"min_size": args.infer_size[0], "max_size": args.infer_size[1]}
    if args.smoke:
        # the 12544 -> 1024 box head alone is ~80 GFLOP per training step; the smoke run only
        # checks that the script works, so it shrinks every per-RoI cost
        overrides.update(SMOKE_OVERRIDES)
    variants = model_variants(arch, args.backbone, args.num_classes, not args.no_parts,
                              overrides, twin=args.twin)
    models, load_report = build_models(variants, device, args.seed)
    generator = torch.Generator().manual_seed(args.seed)
    rows: List[Dict[str, Any]] = []
    result: Dict[str, Any] = {"arch": arch, "variants": variant_changes(variants),
                              "loading": load_report}

    if not args.no_train:
        height, width = args.train_size
        images, targets = training_batch(args.train_batch, height, width, args.num_classes,
                                         device, generator)
        steps = {}
        for name, model in models.items():
            set_input_size(model, min(height, width), max(height, width))
            model.train()
            steps[name] = make_train_step(model, images, targets, device, args.amp)
        times = common.alternating_timings(steps, rounds=args.train_rounds, warmup=args.warmup,
                                           device=device)
        rows += summarize_phase(arch, "train", times, variants,
                                {"batch": args.train_batch, "size": f"{height}x{width}"})
        for row in rows:
            if row["phase"] != "train":
                continue
            step = steps[row["model"]]
            if not args.no_memory:
                row["peak_mib"] = common.peak_memory_bytes(step, device) / 2**20
            # forward + backward FLOPs: a noise-free expectation of the time ratio
            row["gflop"] = common.count_flops(step) / 1e9
            row["gflops_per_s"] = row["gflop"] / (row["median_ms"] / 1e3)
            if peak is not None:
                row["fraction_of_peak"] = row["gflops_per_s"] * 1e9 / peak["flops_per_second"]
        if args.profile:
            print_profiles(f"{arch} training step", steps, device)
        del steps

    if not args.no_infer:
        image = torch.rand(3, *args.infer_size, generator=generator).to(device)
        infer_names = [name for name in variants if name in (REFERENCE, TWIN, OURS_BASELINE, FULL)]
        calls = {}
        for name in infer_names:
            set_input_size(models[name], *args.infer_size)
            models[name].eval()
            calls[name] = make_inference(models[name], [image], device, args.amp)
        times = common.alternating_timings(calls, rounds=args.infer_rounds, warmup=args.warmup,
                                           device=device)
        infer_rows = summarize_phase(arch, "infer", times, {n: variants[n] for n in infer_names},
                                     {"batch": 1, "size": f"{args.infer_size[0]}x{args.infer_size[1]}"})
        for row in infer_rows:
            call = calls[row["model"]]
            row["detections"] = int(call()[0]["boxes"].shape[0])
            if not args.no_memory:
                row["peak_mib"] = common.peak_memory_bytes(call, device) / 2**20
            row["gflop"] = common.count_flops(call) / 1e9
            row["gflops_per_s"] = row["gflop"] / (row["median_ms"] / 1e3)
            if peak is not None:
                row["fraction_of_peak"] = row["gflops_per_s"] * 1e9 / peak["flops_per_second"]
        rows += infer_rows
        if args.profile:
            print_profiles(f"{arch} inference", calls, device)

    for row in rows:
        reference = next(r for r in rows if r["phase"] == row["phase"] and r["model"] == REFERENCE)
        if row.get("gflop") and reference.get("gflop"):
            row["flop_ratio_vs_torchvision"] = row["gflop"] / reference["gflop"]
    result["rows"] = rows
    result["targets"] = [] if args.smoke else check_targets(arch, rows)
    return result


def print_profiles(title: str, calls: Dict[str, Callable[[], Any]], device: torch.device) -> None:
    """Top operators of torchvision's and Libra's call; then, for every other model, the
    operators whose call count differs from torchvision's (what our code adds or removes; none
    for the twin). Each model is profiled once."""
    averages = {name: common.profile_operators(call, device) for name, call in calls.items()}
    for name in (REFERENCE, FULL):
        print(f"\n== {title}, {name}: top ops by self time ==")
        print(common.top_operators_table(averages[name], device, row_limit=30))
    reference = common.operator_calls(averages[REFERENCE])
    for name in calls:
        if name == REFERENCE:
            continue
        differences = common.call_count_differences(reference,
                                                     common.operator_calls(averages[name]))
        print(f"\n== {title}, {name}: {len(differences)} operators called a different number "
              f"of times than in torchvision's ==")
        for operator, reference_count, count in differences[:40]:
            print(f"  {operator:<60} {reference_count:>6} -> {count:>6}")


def summarize_phase(arch: str, phase: str, times: Dict[str, List[float]],
                    variants: Dict[str, Optional[ModelConfig]], setting: Dict[str, Any]
                    ) -> List[Dict[str, Any]]:
    """One row per model: median ms, ratio to torchvision and to our baseline, and for the
    single-part variants their share of the full Libra model's overhead over torchvision."""
    ms = {name: [t * 1e3 for t in values] for name, values in times.items()}
    total_overhead = paired_difference(ms[FULL], ms[REFERENCE])
    # a share of an overhead that is lost in the noise means nothing: require the overhead to
    # exceed 1% of torchvision's time and the spread (IQR) of its per-round values
    per_round = common.summarize([a - b for a, b in zip(ms[FULL], ms[REFERENCE])])
    noise = max(0.01 * common.summarize(ms[REFERENCE])["median"], per_round["p75"] - per_round["p25"])
    overhead_resolved = abs(total_overhead) > noise
    rows = []
    for name in variants:
        stats = common.summarize(ms[name])
        row = {
            "arch": arch, "phase": phase, "model": name, **setting,
            "median_ms": stats["median"], "p25_ms": stats["p25"], "p75_ms": stats["p75"],
            "rounds": stats["n"],
            "ratio_vs_torchvision": common.paired_ratio(ms[name], ms[REFERENCE]),
            "ms_vs_torchvision": paired_difference(ms[name], ms[REFERENCE]),
            "ms_vs_ours_baseline": paired_difference(ms[name], ms[OURS_BASELINE]),
            "share_of_overhead": None, "peak_mib": None, "gflop": None,
        }
        if name.startswith("+") or name == OURS_BASELINE:
            # a part's own cost is measured over our baseline; the baseline's over torchvision
            own = row["ms_vs_torchvision"] if name == OURS_BASELINE else row["ms_vs_ours_baseline"]
            if overhead_resolved:
                row["share_of_overhead"] = own / total_overhead
        rows.append(row)
    return rows


def check_targets(arch: str, rows: List[Dict[str, Any]]) -> List[Dict[str, Any]]:
    verdicts = []
    for (target_arch, phase), limit in TARGETS.items():
        if target_arch != arch:
            continue
        row = next((r for r in rows if r["phase"] == phase and r["model"] == FULL), None)
        if row is None:
            continue
        verdicts.append({"what": f"libra {arch} {phase} time / torchvision's",
                         "limit": limit, "measured": row["ratio_vs_torchvision"],
                         "met": row["ratio_vs_torchvision"] <= limit})
    return verdicts


# --------------------------------------------------------------------------------------------
# entry point


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    common.add_common_arguments(parser, name=NAME)
    parser.add_argument("--arch", nargs="+", default=["faster_rcnn", "retinanet"],
                        choices=["faster_rcnn", "retinanet"])
    parser.add_argument("--backbone", default=None, help="default resnet50 (resnet18 in --smoke)")
    parser.add_argument("--num-classes", type=int, default=81, help="background included")
    parser.add_argument("--train-batch", type=int, default=None,
                        help="images per training step (default 2; 1 in --smoke)")
    parser.add_argument("--train-size", type=int, nargs="+", default=None, metavar="H [W]",
                        help="training images, H x W (square if W is omitted; default 512 512 "
                             "on CPU, 800 1333 on CUDA); nothing is resized")
    parser.add_argument("--infer-size", type=int, nargs=2, default=None, metavar=("H", "W"),
                        help="inference image (default 800 1333)")
    parser.add_argument("--train-rounds", type=int, default=None)
    parser.add_argument("--infer-rounds", type=int, default=None)
    parser.add_argument("--no-parts", action="store_true",
                        help="only torchvision, our baseline and Libra (no one-part variants)")
    parser.add_argument("--twin", action="store_true",
                        help="also time a second copy of torchvision's model (torchvision_twin): "
                             "its distance from 1.000x is the run's resolution")
    parser.add_argument("--no-train", action="store_true")
    parser.add_argument("--no-infer", action="store_true")
    parser.add_argument("--no-memory", action="store_true", help="skip the peak memory calls")
    parser.add_argument("--no-peak", action="store_true", help="skip the matmul peak estimate")
    parser.add_argument("--profile", action="store_true",
                        help="print torch.profiler's top ops of torchvision's and Libra's steps, "
                             "and the operators each of our models calls a different number "
                             "of times than torchvision's")
    args = parser.parse_args(argv)
    on_cuda = args.device.startswith("cuda")
    if args.smoke:
        defaults = {"backbone": "resnet18", "train_batch": 1, "train_size": [64, 64],
                    "infer_size": [64, 96],
                    "train_rounds": 1, "infer_rounds": 1, "warmup": 0}
    else:
        defaults = {"backbone": "resnet50", "train_batch": 2,
                    "train_size": [800, 1333] if on_cuda else [512, 512],
                    "infer_size": [800, 1333], "train_rounds": args.rounds or (20 if on_cuda else 5),
                    "infer_rounds": args.rounds or (50 if on_cuda else 10),
                    "warmup": 5 if on_cuda else 2}
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if len(args.train_size) == 1:
        args.train_size = args.train_size * 2
    if len(args.train_size) != 2:
        raise ValueError(f"--train-size takes H or H W, got {args.train_size}")
    if args.train_batch < 1 or min(args.train_size) < 32 or min(args.infer_size) < 32:
        raise ValueError("--train-batch must be >= 1 and image sizes >= 32")
    if args.train_rounds < 1 or args.infer_rounds < 1:
        raise ValueError("--train-rounds and --infer-rounds must be >= 1")
    return args


def main(argv=None) -> Dict[str, Any]:
    args = parse_args(argv)
    device = common.resolve_device(args)
    torch.manual_seed(args.seed)  # torchvision's samplers draw from the global generator

    peak = None
    if not args.no_peak:
        dtype = common.autocast_dtype(device) if args.amp else torch.float32
        size = 256 if args.smoke else (8192 if device.type == "cuda" else 2048)
        peak = common.matmul_peak_flops(device, dtype, size=size, repeats=3 if args.smoke else 10)
        print(f"matmul peak: {peak['flops_per_second'] / 1e9:.1f} GFLOP/s "
              f"({size}x{size}, {peak['dtype']})")

    results = [bench_arch(arch, args, device, peak) for arch in args.arch]
    rows = [row for result in results for row in result["rows"]]
    columns = [("arch", "arch", ""), ("phase", "phase", ""), ("model", "model", ""),
               ("batch", "B", "d"), ("size", "size", ""), ("median_ms", "median ms", ".1f"),
               ("p25_ms", "p25", ".1f"), ("p75_ms", "p75", ".1f"),
               ("ratio_vs_torchvision", "x tv", ".3f"),
               ("flop_ratio_vs_torchvision", "FLOP x tv", ".3f"),
               ("ms_vs_ours_baseline", "+ms vs base", ".1f"),
               ("share_of_overhead", "share", ".0%"), ("peak_mib", "peak MiB", ".0f"),
               ("gflop", "GFLOP", ".1f"), ("gflops_per_s", "GFLOP/s", ".1f"),
               ("fraction_of_peak", "of peak", ".0%")]
    print(common.format_table(rows, columns))
    for result in results:
        for verdict in result["targets"]:
            print(f"target: {verdict['what']} <= {verdict['limit']:.2f}: measured "
                  f"{verdict['measured']:.3f} -> {'met' if verdict['met'] else 'MISSED'}")

    settings = {key: getattr(args, key) for key in (
        "backbone", "num_classes", "train_batch", "train_size", "infer_size", "train_rounds",
        "infer_rounds", "warmup", "no_parts", "twin")}
    payload = {
        "benchmark": NAME,
        "environment": common.environment_info(device, args),
        "settings": settings,
        "matmul_peak": peak,
        "architectures": results,
        "rows": rows,
    }
    return common.write_results(NAME, device, args, payload)


if __name__ == "__main__":
    main()
