"""Inference cost of the EfficientNet-Lite0 detectors against torchvision's
``fasterrcnn_mobilenet_v3_large_fpn``, in PyTorch eager and in onnxruntime, on the CPU.

Question: at the same input size and thread count, what does one image cost with the detectors
the pretrained CPU configs build, next to torchvision's own mobile two-stage detector?

Models (random weights from a fixed seed, 4 classes with background; every one resizes to a
short side of 480, long side at most 640, and scores every box, ``score_thresh`` 0, so that
each keeps its 100 best detections and the post-processing costs the same):

* ``faster_rcnn_lite0``, ``libra_faster_rcnn_lite0``, ``retinanet_lite0``,
  ``libra_retinanet_lite0``: the shipped ``*_lite0_fpn_cpu`` configs;
* ``tv_mobilenet_v3``: torchvision's ``fasterrcnn_mobilenet_v3_large_fpn`` (MobileNetV3-Large
  with its FPN on the last two stages, 256 channels, its RPN and box head settings).

Each model is exported to ONNX (the TorchScript-based exporter, opset 17; ours with
:func:`libra_rcnn.engine.export.export_onnx`, torchvision's through the same single-image
wrapper) and run in onnxruntime (CPU provider, ``intra_op_num_threads`` = torch's threads). One
call = inference on one 480 x 640 image. Every (model, runtime) alternates round-robin in this
one process (``benchmarks/_common.py``); ``x mobilenet`` is the median of the per-round ratios
against ``tv_mobilenet_v3`` in the same runtime. GFLOPs: ``torch.utils.flop_counter`` over one
eager forward pass (convolutions and matrix products; RoIAlign and NMS are not counted).

Run: ``python -m benchmarks.lite_speed [--models NAME ...] [--threads N] [--rounds N]
[--smoke]``.
"""

from __future__ import annotations

import argparse
import io
import sys
import tempfile
import warnings
from pathlib import Path
from typing import Any, Callable, Dict, List

if __package__ in (None, ""):  # run as a file: python benchmarks/lite_speed.py
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch
from torch import nn

from benchmarks import _common as common
from libra_rcnn.config import load_config
from libra_rcnn.engine.export import OnnxDetector, SingleImageDetector, export_onnx
from libra_rcnn.models import apply_overrides, build_model

NAME = "lite_speed"
CONFIGS = {"faster_rcnn_lite0": "faster_rcnn_lite0_fpn_cpu",
           "libra_faster_rcnn_lite0": "libra_faster_rcnn_lite0_fpn_cpu",
           "retinanet_lite0": "retinanet_lite0_fpn_cpu",
           "libra_retinanet_lite0": "libra_retinanet_lite0_fpn_cpu"}
REFERENCE = "tv_mobilenet_v3"
MODELS = (*CONFIGS, REFERENCE)
SIZE = (480, 640)
NUM_CLASSES = 4
SMOKE_SIZE = (96, 128)
RUNTIMES = ("eager", "onnxruntime")


def build(name: str, size: tuple[int, int]) -> nn.Module:
    """The model ``name`` in eval mode, resizing to ``size`` (short side, long side at most)."""
    if name == REFERENCE:
        from torchvision.models.detection import fasterrcnn_mobilenet_v3_large_fpn

        return fasterrcnn_mobilenet_v3_large_fpn(
            weights=None, weights_backbone=None, num_classes=NUM_CLASSES, min_size=size[0],
            max_size=size[1], box_score_thresh=0.0).eval()
    cfg = apply_overrides(load_config(CONFIGS[name]).model, {
        "num_classes": NUM_CLASSES, "backbone_weights": None, "min_size": size[0],
        "max_size": size[1], "box_score_thresh": 0.0})
    return build_model(cfg).eval()


def to_onnx(name: str, model: nn.Module, path: Path) -> Path:
    if name != REFERENCE:
        return export_onnx(model, path)
    example = torch.rand(3, *SIZE, generator=torch.Generator().manual_seed(0))
    outputs = ["boxes", "labels", "scores"]
    dynamic = {"image": {1: "height", 2: "width"}, **{n: {0: "detections"} for n in outputs}}
    buffer = io.BytesIO()
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(SingleImageDetector(model).eval(), (example,), buffer, opset_version=17,
                          input_names=["image"], output_names=outputs, dynamic_axes=dynamic,
                          dynamo=False)
    path.write_bytes(buffer.getvalue())
    return path


def eager_call(model: nn.Module, image: torch.Tensor) -> Callable[[], Any]:
    def infer():
        with torch.inference_mode():
            return model([image])[0]
    return infer


def bench(args: argparse.Namespace, folder: Path) -> List[Dict[str, Any]]:
    size = SMOKE_SIZE if args.smoke else SIZE
    image = torch.rand(3, *size, generator=torch.Generator().manual_seed(args.seed))
    calls: Dict[str, Callable[[], Any]] = {}
    flops: Dict[str, int] = {}
    for name in args.models:
        torch.manual_seed(args.seed)
        model = build(name, size)
        flops[name] = common.count_flops(eager_call(model, image))
        detector = OnnxDetector(to_onnx(name, model, folder / f"{name}.onnx"),
                                threads=torch.get_num_threads())
        calls[f"{name}/eager"] = eager_call(model, image)
        calls[f"{name}/onnxruntime"] = lambda detector=detector: detector(image)
    times = common.alternating_timings(calls, rounds=args.rounds, warmup=args.warmup,
                                       device=torch.device("cpu"))
    rows = []
    for name in args.models:
        for runtime in RUNTIMES:
            key = f"{name}/{runtime}"
            stats = common.summarize([t * 1e3 for t in times[key]])
            reference = f"{REFERENCE}/{runtime}"
            rows.append({
                "model": name, "runtime": runtime, "size": f"{size[0]}x{size[1]}",
                "median_ms": stats["median"], "p25_ms": stats["p25"], "p75_ms": stats["p75"],
                "rounds": stats["n"], "gflops": flops[name] / 1e9,
                "flops_vs_mobilenet": (flops[name] / flops[REFERENCE]
                                       if REFERENCE in flops else None),
                "x_mobilenet": (common.paired_ratio(times[key], times[reference])
                                if reference in times else None),
            })
    return rows


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    common.add_common_arguments(parser, name=NAME)
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    args = parser.parse_args(argv)
    if args.device != "cpu" or args.amp:
        raise ValueError("this benchmark compares CPU inference in float32: "
                         "no --device cuda, no --amp")
    if args.rounds is None:
        args.rounds = 1 if args.smoke else 10
    if args.warmup is None:
        args.warmup = 0 if args.smoke else 2
    return args


def main(argv=None) -> Dict[str, Any]:
    args = parse_args(argv)
    device = common.resolve_device(args)
    with tempfile.TemporaryDirectory() as folder:
        rows = bench(args, Path(folder))
    columns = [("model", "model", ""), ("runtime", "runtime", ""), ("size", "size", ""),
               ("median_ms", "median ms", ".1f"), ("p25_ms", "p25", ".1f"),
               ("p75_ms", "p75", ".1f"), ("x_mobilenet", "x mobilenet", ".2f"),
               ("gflops", "GFLOPs", ".2f"), ("flops_vs_mobilenet", "FLOPs x mobilenet", ".2f")]
    print(common.format_table(rows, columns))
    import onnxruntime

    payload = {
        "benchmark": NAME,
        "environment": dict(common.environment_info(device, args),
                            onnxruntime=onnxruntime.__version__),
        "settings": {"rounds": args.rounds, "warmup": args.warmup, "models": args.models,
                     "size": list(SMOKE_SIZE if args.smoke else SIZE),
                     "onnxruntime_threads": torch.get_num_threads()},
        "rows": rows,
    }
    return common.write_results(NAME, device, args, payload)


if __name__ == "__main__":
    main()
