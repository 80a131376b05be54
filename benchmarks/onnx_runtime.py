"""Exported Libra detectors in onnxruntime against the same models in PyTorch eager, on the CPU.

Question: on this machine, with the same number of threads, does an ONNX file written by
``libra-rcnn export`` run inference faster in onnxruntime than the model does in PyTorch?

Models (random weights from a fixed seed, 81 classes, the Libra settings of
:func:`libra_rcnn.models.libra_model_config`):

* ``libra_faster_rcnn_r50``: Libra Faster R-CNN, ResNet-50-FPN, on an 800 x 1333 image (the
  paper's test scale);
* ``libra_faster_rcnn_r18``: a small model, Libra Faster R-CNN ResNet-18-FPN with
  ``min_size=320, max_size=533``, on a 320 x 533 image.

Each model is exported with :func:`libra_rcnn.engine.export.export_onnx` and loaded into an
onnxruntime session (CPU execution provider, ``intra_op_num_threads`` = torch's thread count,
default graph optimisations). One call = inference on one image: ``model([image])`` under
``torch.inference_mode`` for PyTorch, ``session.run`` on the same image for onnxruntime. The
two alternate round-robin in this one process (``benchmarks/_common.py``); ``x pytorch`` is the
median of the per-round ratios onnxruntime / PyTorch (below 1: onnxruntime is faster).

Agreement, on the timed image: ``matched`` counts onnxruntime's detections that match
PyTorch's one to one within 1e-2 px and 1e-4 in score (:func:`compare_detections`). To tell
float32 rounding from export errors, both are also set against the same model run in float64
by PyTorch: for each float64 detection, the nearest detection of the same class, and the
median / 90th percentile / largest of those box distances (the largest coordinate difference,
in pixels) and the largest score difference among pairs closer than 0.1 px.

Run: ``python -m benchmarks.onnx_runtime [--models NAME ...] [--threads N] [--rounds N]
[--smoke]``.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Dict, List

if __package__ in (None, ""):  # run as a file: python benchmarks/onnx_runtime.py
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch

from benchmarks import _common as common
from libra_rcnn.engine.export import OnnxDetector, compare_detections, export_onnx
from libra_rcnn.models import build_model, libra_model_config

NAME = "onnx_runtime"
MODELS: Dict[str, Dict[str, Any]] = {
    "libra_faster_rcnn_r50": {"backbone": "resnet50", "size": (800, 1333), "overrides": {}},
    "libra_faster_rcnn_r18": {"backbone": "resnet18", "size": (320, 533),
                              "overrides": {"min_size": 320, "max_size": 533}},
}
# the smoke run only checks that the script works: tiny models and images
SMOKE_OVERRIDES = {"min_size": 64, "max_size": 96, "fpn_channels": 32, "representation_size": 32,
                   "rpn_pre_nms_top_n_test": 100, "rpn_post_nms_top_n_test": 100,
                   "box_score_thresh": 0.0}  # random tiny heads score below the default 0.05
SMOKE_SIZE = (64, 96)
CASES = ("pytorch", "onnxruntime")


def make_pytorch_call(model: torch.nn.Module, image: torch.Tensor) -> Callable[[], Any]:
    def infer():
        with torch.inference_mode():
            return model([image])[0]
    return infer


def nearest_differences(reference: Dict[str, torch.Tensor], other: Dict[str, torch.Tensor]
                        ) -> Dict[str, Any]:
    """For each reference detection, the box distance to the nearest ``other`` detection of the
    same label (largest coordinate difference, px): median, 90th percentile and maximum, and the
    largest score difference among pairs closer than 0.1 px."""
    boxes_r, boxes_o = reference["boxes"].double(), other["boxes"].double()
    if len(boxes_r) == 0 or len(boxes_o) == 0:
        return {"box_median": None, "box_p90": None, "box_max": None, "score_max": None}
    distance = (boxes_r[:, None] - boxes_o[None]).abs().amax(dim=2)
    if "labels" in reference:
        distance[reference["labels"][:, None] != other["labels"][None]] = float("inf")
    nearest, index = distance.min(dim=1)
    close = nearest < 0.1
    score = (reference["scores"].double() - other["scores"].double()[index]).abs()
    ordered = sorted(nearest.tolist())
    return {"box_median": statistics.median(ordered),
            "box_p90": ordered[min(len(ordered) - 1, int(0.9 * len(ordered)))],
            "box_max": ordered[-1], "score_max": float(score[close].max()) if close.any() else None}


def float64_detections(model: torch.nn.Module, image: torch.Tensor) -> Dict[str, torch.Tensor]:
    """The same model's detections computed in float64 (outputs cast back to float32)."""
    reference = copy.deepcopy(model).double()
    with torch.inference_mode():
        output = reference([image.double()])[0]
    return {k: v.float() if v.is_floating_point() else v for k, v in output.items()}


def bench_model(name: str, args: argparse.Namespace, folder: Path) -> List[Dict[str, Any]]:
    spec = MODELS[name]
    overrides = dict(spec["overrides"], **(SMOKE_OVERRIDES if args.smoke else {}))
    size = SMOKE_SIZE if args.smoke else spec["size"]
    torch.manual_seed(args.seed)
    backbone = "resnet18" if args.smoke else spec["backbone"]
    model = build_model(libra_model_config("faster_rcnn", backbone, **overrides)).eval()
    start = time.perf_counter()
    path = export_onnx(model, folder / f"{name}.onnx")
    export_s = time.perf_counter() - start
    detector = OnnxDetector(path, threads=torch.get_num_threads())
    image = torch.rand(3, *size, generator=torch.Generator().manual_seed(args.seed))
    calls = {"pytorch": make_pytorch_call(model, image), "onnxruntime": lambda: detector(image)}
    outputs = {case: calls[case]() for case in CASES}
    agreement = compare_detections(outputs["pytorch"], outputs["onnxruntime"])
    exact = float64_detections(model, image)
    times = common.alternating_timings(calls, rounds=args.rounds, warmup=args.warmup,
                                       device=torch.device("cpu"))
    rows = []
    for case in CASES:
        stats = common.summarize([t * 1e3 for t in times[case]])
        rows.append({
            "model": name, "size": f"{size[0]}x{size[1]}", "case": case,
            "median_ms": stats["median"], "p25_ms": stats["p25"], "p75_ms": stats["p75"],
            "rounds": stats["n"],
            "ratio_vs_pytorch": common.paired_ratio(times[case], times["pytorch"]),
            "detections": agreement["expected" if case == "pytorch" else "actual"],
            **{f"vs_float64_{k}": v for k, v in nearest_differences(exact, outputs[case]).items()},
        })
    rows[-1].update({"export_s": export_s, "onnx_mib": path.stat().st_size / 2**20,
                     "matched": agreement["matched"], "max_box_diff": agreement["max_box_diff"],
                     "max_score_diff": agreement["max_score_diff"]})
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
        rows = [row for name in args.models for row in bench_model(name, args, Path(folder))]
    columns = [("model", "model", ""), ("size", "size", ""), ("case", "case", ""),
               ("median_ms", "median ms", ".1f"), ("p25_ms", "p25", ".1f"),
               ("p75_ms", "p75", ".1f"), ("ratio_vs_pytorch", "x pytorch", ".3f"),
               ("detections", "dets", "d"), ("matched", "matched", "d"),
               ("vs_float64_box_median", "fp64 box med", ".1e"),
               ("vs_float64_box_p90", "p90", ".1e"), ("vs_float64_box_max", "max", ".1e"),
               ("vs_float64_score_max", "score", ".1e"),
               ("export_s", "export s", ".1f"), ("onnx_mib", "MiB", ".0f")]
    print(common.format_table(rows, columns))
    import onnxruntime

    payload = {
        "benchmark": NAME,
        "environment": dict(common.environment_info(device, args),
                            onnxruntime=onnxruntime.__version__),
        "settings": {"rounds": args.rounds, "warmup": args.warmup, "models": args.models,
                     "sizes": {name: list(SMOKE_SIZE if args.smoke else MODELS[name]["size"])
                               for name in args.models},
                     "onnxruntime_threads": torch.get_num_threads()},
        "rows": rows,
    }
    return common.write_results(NAME, device, args, payload)


if __name__ == "__main__":
    main()
