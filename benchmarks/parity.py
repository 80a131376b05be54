"""How far our mmdetection-convention detectors are from mmdetection itself.

The parity tests (``tests/test_parity_*.py``) check tolerances; this script measures the actual
deviations that the docs' parity table quotes. For mmdetection's Libra Faster R-CNN, Libra
RetinaNet, Cascade R-CNN and the Libra Cascade R-CNN it builds from its parts (R-50) with
reproducible random weights (``tests/mmdet_oracle.py``: every weight random, batch norm
statistics from data, output layers scaled as a trained detector's), saved as an mmdetection
checkpoint and converted with ``convert_mmdet_checkpoint``:

* detections on an 800 x 1216 image (no resize), a 480 x 640 one (resized to 800 x 1067) and a
  530 x 1000 one (resized to 706 x 1333; no side a multiple of 32): how many of mmdetection's
  are matched (same class, box corners within 0.01 px, score within 1e-4), and the largest box /
  score difference over the matched pairs;
* backbone (C2-C5) and pyramid (after the balanced feature pyramid) features of a 480 x 640 image
  (800 x 1067 after the resize): largest absolute difference over the largest absolute value;
* training losses of a two-image batch with exhaustive sampling: largest relative difference.

Needs the ``parity`` extra (mmdetection). Run: ``python -m benchmarks.parity [--models ...]
[--out PATH]`` (a few minutes on 2 CPU cores); writes ``benchmarks/results/parity_cpu.json``.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))  # the oracle is test code: mmdet stays out of src/

from benchmarks import _common as common  # noqa: E402
from libra_rcnn.config import load_config  # noqa: E402
from libra_rcnn.engine.checkpoint import load_model_from_checkpoint  # noqa: E402
from libra_rcnn.engine.convert_mmdet import convert_mmdet_checkpoint  # noqa: E402

OURS = {"faster_rcnn": "libra_faster_rcnn_r50_fpn_1x_coco",
        "retinanet": "libra_retinanet_r50_fpn_1x_coco",
        "cascade_rcnn": "cascade_rcnn_r50_fpn_1x_coco",
        "libra_cascade_rcnn": "libra_cascade_rcnn_r50_fpn_1x_coco"}
# the oracle's loss names of each model
LOSS_ARCH = {"faster_rcnn": "faster_rcnn", "retinanet": "retinanet",
             "cascade_rcnn": "cascade_rcnn", "libra_cascade_rcnn": "cascade_rcnn"}
SIZES = ((800, 1216), (480, 640), (530, 1000))
# the R-CNN classifiers' scale (oracle.detector_like; every other output layer 0.02): a
# cascade's scores are the softmax of three stages' mean logits, which at 0.02 stays near 1/81,
# so few detections would pass 0.05
CLS_SCALE = {"cascade_rcnn": 0.06, "libra_cascade_rcnn": 0.06}


def _image(rgb) -> torch.Tensor:
    return torch.from_numpy(rgb).permute(2, 0, 1).float() / 255


def _detections(oracle, mm_model, ours, size, seed) -> dict:
    rgb = oracle.photo_like(*size, seed=seed)
    ref_boxes, ref_scores, ref_labels = oracle.mmdet_detections(mm_model, rgb)
    with torch.no_grad():
        out = ours([_image(rgb)])[0]
    box_gap, score_gap = 0.0, 0.0
    for box, score, label in zip(ref_boxes, ref_scores, ref_labels):
        same = torch.where(out["labels"] == label)[0]
        if len(same) == 0:
            continue
        distance = (out["boxes"][same] - box).abs().amax(dim=1)
        best = same[distance.argmin()]
        box_gap = max(box_gap, float(distance.min()))
        score_gap = max(score_gap, float((out["scores"][best] - score).abs()))
    matched = oracle.count_matched(out["boxes"], out["scores"], out["labels"], ref_boxes,
                                   ref_scores, ref_labels)
    return {"image": f"{size[0]}x{size[1]}", "mmdet_detections": len(ref_boxes),
            "ours_detections": len(out["boxes"]), "matched": matched,
            "max_box_difference_px": box_gap, "max_score_difference": score_gap}


def _features(mm_model, ours) -> dict:
    import numpy as np

    rgb = np.random.default_rng(4).integers(0, 256, (480, 640, 3), dtype=np.uint8)
    with torch.no_grad():
        batch = ours.transform([_image(rgb)])[0].tensors  # resized to 800 x 1067, padded
        ours_stages = list(ours.backbone.body(batch).values())
        ours_pyramid = list(ours.backbone(batch).values())
        ref_stages = list(mm_model.backbone(batch))[-len(ours_stages):]
        ref_pyramid = list(mm_model.extract_feat(batch))

    def relative(a, b):
        return max(float((x - y).abs().max() / y.abs().max()) for x, y in zip(a, b))

    return {"backbone_max_relative_difference": relative(ours_stages, ref_stages),
            "pyramid_max_relative_difference": relative(ours_pyramid, ref_pyramid)}


def _losses(oracle, mm_model, checkpoint, name) -> dict:
    weights = torch.load(checkpoint, weights_only=True)["model"]
    ours, expected = oracle.training_losses(mm_model, OURS[name], weights, LOSS_ARCH[name])
    return {key: {"ours": float(ours[key]), "mmdet": float(value),
                  "relative_difference": abs(float(ours[key]) - float(value)) / abs(float(value))}
            for key, value in expected.items()}


def _mmdet_model(oracle, name: str):
    if name == "cascade_rcnn":
        return oracle.build_model(oracle.CASCADE_CONFIG)
    if name == "libra_cascade_rcnn":
        return oracle.build_libra_cascade_rcnn()
    return oracle.build_model(oracle.LIBRA_CONFIGS[(name, "r50")])


def measure(arch: str, oracle, folder: Path) -> dict:
    mm = oracle.import_mmdet()
    mm_model = oracle.detector_like(oracle.randomize_model(_mmdet_model(oracle, arch), seed=1),
                                    rcnn_cls_scale=CLS_SCALE.get(arch))
    classes = list(mm.mmdet.datasets.CocoDataset.METAINFO["classes"])
    src, dst = folder / f"{arch}_mmdet.pth", folder / f"{arch}_ours.pth"
    oracle.save_checkpoint(mm_model, str(src), classes=classes)
    convert_mmdet_checkpoint(src, dst, load_config(OURS[arch]))
    ours, _ = load_model_from_checkpoint(dst)
    return {"detections": [_detections(oracle, mm_model, ours, size, seed)
                           for seed, size in enumerate(SIZES, start=2)],
            "features": _features(mm_model, ours),
            "training_losses": _losses(oracle, mm_model, dst, arch)}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", choices=list(OURS), default=list(OURS))
    parser.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "parity_cpu.json"))
    args = parser.parse_args(argv)
    import mmdet_oracle as oracle

    torch.set_num_threads(max(1, torch.get_num_threads()))
    with tempfile.TemporaryDirectory() as folder:
        results = {arch: measure(arch, oracle, Path(folder)) for arch in args.models}
    # the shared record of where and how; no AMP and no smoke mode here
    environment = common.environment_info(torch.device("cpu"),
                                          argparse.Namespace(amp=False, smoke=False))
    environment["mmdet"] = oracle.import_mmdet().mmdet.__version__
    common.write_json(args.out, {"environment": environment, "results": results})
    rows = [{"model": arch, **d} for arch, result in results.items() for d in result["detections"]]
    print(common.format_table(rows, [
        ("model", "model", ""), ("image", "image", ""), ("matched", "matched", ""),
        ("mmdet_detections", "of", ""), ("max_box_difference_px", "max box diff (px)", ".2e"),
        ("max_score_difference", "max score diff", ".2e")]))
    for arch, result in results.items():
        losses = ", ".join(f"{k} {v['relative_difference']:.1e}"
                           for k, v in result["training_losses"].items())
        print(f"{arch}: features {result['features']}; loss relative differences: {losses}")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
