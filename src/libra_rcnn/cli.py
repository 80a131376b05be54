"""``libra-rcnn`` command line (also ``python -m libra_rcnn``).

Subcommands::

    libra-rcnn train CONFIG [--set KEY=VALUE ...] [--resume CKPT] [--strict] [--output-dir D]
    libra-rcnn eval CONFIG CHECKPOINT [--results FILE]
    libra-rcnn eval --results-file FILE --ann ANN_JSON [--proposals]
    libra-rcnn predict CHECKPOINT IMAGE_OR_DIR ... [--score-thresh T] [--out-dir D]
    libra-rcnn convert-voc FOLDER OUT_JSON
    libra-rcnn export CHECKPOINT OUT_ONNX [--opset N] [--check IMAGE ...]
    libra-rcnn check-data CONFIG
    libra-rcnn demo [--output-dir D] [--quick]
    libra-rcnn configs
    libra-rcnn analyze iou-hist|loss-curves|samples|bfp-heatmaps ...
    libra-rcnn ablate CONFIG (--table tableN | --variant NAME k=v ...) [--max-iters N] ...

CONFIG is a YAML file or the name of a shipped config (``libra-rcnn configs`` lists them).
Multi-GPU / multi-process: ``torchrun --nproc_per_node N -m libra_rcnn train CONFIG``.

Exit codes: 0 success; 1 training diverged (non-finite losses), ``check-data`` found problems
or ``export --check`` found onnxruntime's detections differing from PyTorch's;
2 user error (bad or missing config, dataset, checkpoint; one line on stderr
``libra-rcnn: error: <file>: <problem>``, no traceback); 130 / 143 training interrupted by
SIGINT / SIGTERM after writing ``latest.pth`` (resume with ``--resume``).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path
from typing import Optional, Sequence

__all__ = ["main", "build_parser"]

PROG = "libra-rcnn"
EXIT_USER_ERROR = 2
EXIT_FAILURE = 1
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp"}


class UserError(Exception):
    """A problem with the user's input, reported as one line."""


def _add_config_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config value, e.g. --set train.epochs=24 "
                             "(repeatable; VALUE is parsed as YAML)")


def _add_device_arg(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--device", default=None,
                        help="cpu, cuda, cuda:1, ... (default: GPU if available)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=PROG, description="Libra R-CNN object detection "
                                     "(train, evaluate, predict).")
    parser.add_argument("-q", "--quiet", action="store_true", help="no progress bars, warnings only")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    p = sub.add_parser("train", help="train a detector from a config")
    p.add_argument("config", help="YAML config file or shipped config name")
    _add_config_args(p)
    p.add_argument("--resume", metavar="CKPT", help="continue from this checkpoint (latest.pth)")
    p.add_argument("--strict", action="store_true",
                   help="validate every sample first and stop on any bad image or annotation")
    p.add_argument("--output-dir", help="where checkpoints and logs go (default: from the config)")
    _add_device_arg(p)
    p.set_defaults(func=_cmd_train)

    p = sub.add_parser("eval", help="COCO evaluation of a checkpoint, or of a results file",
                       description="eval CONFIG CHECKPOINT [--results FILE] evaluates a checkpoint on "
                                   "the config's val set; eval --results-file F --ann A scores an "
                                   "existing COCO results json.")
    p.add_argument("config", nargs="?", help="YAML config file or shipped config name")
    p.add_argument("checkpoint", nargs="?", help="checkpoint (.pth) written by train")
    _add_config_args(p)
    p.add_argument("--results", metavar="FILE", help="also write the COCO results json here")
    p.add_argument("--results-file", metavar="FILE", help="evaluate this COCO results json instead")
    p.add_argument("--ann", metavar="ANN_JSON", help="COCO annotations for --results-file")
    p.add_argument("--proposals", action="store_true",
                   help="with --results-file: class-agnostic proposal recall (AR@100/300/1000)")
    _add_device_arg(p)
    p.set_defaults(func=_cmd_eval)

    p = sub.add_parser("predict", help="detect objects in images and draw them")
    p.add_argument("checkpoint", help="checkpoint (.pth) written by train")
    p.add_argument("images", nargs="+", help="image files or folders of images")
    p.add_argument("--score-thresh", type=float, default=0.5, help="minimum score (default 0.5)")
    p.add_argument("--out-dir", default="predictions", help="output folder (default predictions/)")
    _add_device_arg(p)
    p.set_defaults(func=_cmd_predict)

    p = sub.add_parser("convert-voc", help="convert a VOC-style folder to a COCO json")
    p.add_argument("folder", help="folder with .xml annotations (and images)")
    p.add_argument("out_json", help="COCO json to write")
    p.add_argument("--class-names", help="comma-separated class names (fixes the label order)")
    p.add_argument("--difficult-as-crowd", action="store_true",
                   help="mark VOC 'difficult' objects as crowd (ignored in training/evaluation)")
    p.set_defaults(func=_cmd_convert_voc)

    p = sub.add_parser("export", help="export a checkpoint to ONNX (Libra Faster R-CNN, RetinaNet, "
                       "RPN) for onnxruntime", description="Writes an ONNX file whose input 'image' "
                       "is a float32 [3, H, W] RGB image in 0..1 (any H, W) and whose outputs are "
                       "'boxes' [N, 4] (x1, y1, x2, y2 in the input's pixels), 'labels' [N] (not "
                       "for an RPN) and 'scores' [N]. Needs pip install \"libra-rcnn[export]\".")
    p.add_argument("checkpoint", help="checkpoint (.pth) written by train")
    p.add_argument("output", help="ONNX file to write")
    p.add_argument("--opset", type=int, default=None, help="ONNX opset, >= 16 (default 17)")
    p.add_argument("--check", nargs="+", default=[], metavar="IMAGE",
                   help="image files or folders: run PyTorch and onnxruntime on each and compare "
                        "their detections (exit 1 if they differ)")
    p.set_defaults(func=_cmd_export)

    p = sub.add_parser("check-data", help="decode every image of a config's datasets and report")
    p.add_argument("config", help="YAML config file or shipped config name")
    _add_config_args(p)
    p.add_argument("--split", choices=("train", "val", "all"), default="all")
    p.set_defaults(func=_cmd_check_data)

    p = sub.add_parser("demo", help="generate a synthetic shapes dataset, train, evaluate, predict")
    p.add_argument("--output-dir", default="work_dirs/demo", help="default work_dirs/demo")
    p.add_argument("--quick", action="store_true", help="tiny run (about a minute) for smoke tests")
    _add_config_args(p)
    _add_device_arg(p)
    p.set_defaults(func=_cmd_demo)

    p = sub.add_parser("configs", help="list the shipped configs")
    p.set_defaults(func=_cmd_configs)

    from libra_rcnn.analysis import add_ablate_command, add_analyze_subcommands  # torch-free

    p = sub.add_parser("analyze", help="the paper's figures as PNG/CSV: iou-hist (Fig. 3), "
                       "bfp-heatmaps (Fig. 4), loss-curves (Fig. 5), samples (Fig. 6)")
    add_analyze_subcommands(p.add_subparsers(dest="analysis", metavar="ANALYSIS", required=True))
    p = sub.add_parser("ablate", help="train + evaluate config variants into a paper-style "
                       "ablation table (Tables 2, 4, 5, 6)")
    add_ablate_command(p)
    return parser


# ----------------------------------------------------------------------------------------------
# Commands


def _load_config(name: str, overrides: Sequence[str]):
    from libra_rcnn.config import load_config

    return load_config(name, overrides)


def _cmd_train(args) -> int:
    from libra_rcnn.engine.train import train

    overrides = list(args.overrides)
    if args.strict:
        overrides.append("data.strict=true")
    cfg = _load_config(args.config, overrides)
    if args.output_dir:
        cfg.output_dir = args.output_dir
    if args.resume is not None and not Path(args.resume).is_file():
        raise UserError(f"{args.resume}: no such checkpoint file (--resume)")
    summary = train(cfg, resume=args.resume, device=args.device, progress=not args.quiet)
    return _report_training(summary)


def _report_training(summary: dict) -> int:
    if summary["metrics"]:
        print(_metrics_table(summary["metrics"]))
    print(f"{summary['stop_reason']} at epoch {summary['epoch']}, iteration "
          f"{summary['iteration']}; checkpoint: {summary['checkpoint']}")
    if summary["stop_reason"] == "interrupted" and summary["signal"]:
        print(f"interrupted: resume with --resume {summary['checkpoint']}", file=sys.stderr)
        return 128 + int(summary["signal"])
    return 0


def _metrics_table(metrics: dict) -> str:
    """The paper's AP columns, or AR@N for proposal metrics."""
    from libra_rcnn.engine.evaluate import format_metrics_table

    if "AP" in metrics:
        return format_metrics_table(metrics)
    keys = [k for k in metrics if k.startswith("AR@")]
    return format_metrics_table(metrics, keys=keys)


def _cmd_eval(args) -> int:
    from libra_rcnn.engine.evaluate import evaluate, evaluate_results_file

    if args.results_file is not None:
        if args.ann is None:
            raise UserError("eval --results-file needs --ann ANN_JSON")
        if args.config is not None or args.checkpoint is not None:
            raise UserError("eval: give either CONFIG CHECKPOINT or --results-file/--ann, not both")
        metrics = evaluate_results_file(args.ann, args.results_file, proposals=args.proposals)
        print(_metrics_table(metrics))
        return 0
    if args.config is None or args.checkpoint is None:
        raise UserError("eval needs CONFIG and CHECKPOINT (or --results-file FILE --ann ANN_JSON)")

    from libra_rcnn.engine.checkpoint import CheckpointError, load_model_from_checkpoint
    from libra_rcnn.engine.distributed import DistInfo
    from libra_rcnn.engine.train import build_dataset, build_val_loader, resolve_device

    cfg = _load_config(args.config, args.overrides)
    if cfg.data.val_ann is None or cfg.data.val_images is None:
        raise UserError(f"{args.config}: data.val_ann / data.val_images are not set")
    device = resolve_device(args.device, DistInfo())
    model, meta = load_model_from_checkpoint(args.checkpoint, expected=cfg.model, device=device)
    dataset = build_dataset(cfg, train=False)
    if list(meta.get("class_names", dataset.class_names)) != list(dataset.class_names):
        raise CheckpointError(f"{args.checkpoint}: trained on classes {meta['class_names']}, but "
                              f"{cfg.data.val_ann} has {dataset.class_names}")
    loader = build_val_loader(dataset, cfg=cfg, info=DistInfo())
    metrics = evaluate(model, loader, device=device, results_file=args.results,
                       proposals=cfg.model.arch == "rpn", progress=not args.quiet)
    print(_metrics_table(metrics))
    return 0


def _expand_images(paths: Sequence[str]) -> list[Path]:
    images: list[Path] = []
    for raw in paths:
        path = Path(raw)
        if path.is_dir():
            found = sorted(p for p in path.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
            if not found:
                raise UserError(f"{path}: no image files in this folder")
            images.extend(found)
        elif path.is_file():
            images.append(path)
        else:
            raise UserError(f"{path}: no such image file or folder")
    return images


def _cmd_predict(args) -> int:
    from libra_rcnn.engine.checkpoint import load_model_from_checkpoint
    from libra_rcnn.engine.distributed import DistInfo
    from libra_rcnn.engine.predict import predict_images
    from libra_rcnn.engine.train import resolve_device

    images = _expand_images(args.images)
    device = resolve_device(args.device, DistInfo())
    model, meta = load_model_from_checkpoint(args.checkpoint, device=device)
    predictions = predict_images(
        model, images, class_names=meta.get("class_names") or [],
        label_to_cat_id=meta.get("label_to_cat_id"), score_thresh=args.score_thresh,
        device=device, out_dir=args.out_dir)
    print(f"{len(predictions)} detections in {len(images)} image(s) written to {args.out_dir}")
    return 0


def _cmd_convert_voc(args) -> int:
    from libra_rcnn.data import voc_to_coco, write_coco_json

    class_names = None
    if args.class_names:
        class_names = [n.strip() for n in args.class_names.split(",") if n.strip()]
    coco = voc_to_coco(args.folder, class_names=class_names,
                       difficult_as_crowd=args.difficult_as_crowd)
    write_coco_json(coco, args.out_json)
    names = [c["name"] for c in coco["categories"]]
    print(f"wrote {args.out_json}: {len(coco['images'])} images, {len(coco['annotations'])} "
          f"boxes, {len(names)} classes ({', '.join(names)}); use image root {args.folder} and "
          f"model.num_classes={len(names) + 1}")
    return 0


def _cmd_export(args) -> int:
    import torch

    from libra_rcnn.engine.checkpoint import load_model_from_checkpoint
    from libra_rcnn.engine.export import (
        DEFAULT_OPSET,
        ExportDependencyError,
        OnnxDetector,
        compare_detections,
        export_onnx,
        output_names,
    )
    from libra_rcnn.engine.predict import load_image_tensor

    images = _expand_images(args.check) if args.check else []
    model, _ = load_model_from_checkpoint(args.checkpoint)
    try:
        opset = DEFAULT_OPSET if args.opset is None else args.opset
        path = export_onnx(model, args.output, opset=opset)
        detector = OnnxDetector(path) if images else None
    except ExportDependencyError as exc:
        raise UserError(str(exc)) from None
    names = ", ".join(output_names(model))
    print(f"wrote {path}: input image float32 [3, H, W] in 0..1, outputs {names}")
    agree = True
    if detector is not None:
        for image_path in images:
            image = load_image_tensor(image_path)
            with torch.no_grad():
                expected = model([image])[0]
            result = compare_detections(expected, detector(image))
            agree = agree and result["agree"]
            print(f"{image_path}: PyTorch {result['expected']} detections, onnxruntime "
                  f"{result['actual']}, {result['matched']} matched (boxes within 1e-2 px, scores "
                  f"within 1e-4); largest differences {result['max_box_diff']:.2g} px, "
                  f"{result['max_score_diff']:.2g}")
    return 0 if agree else EXIT_FAILURE


def _format_report(split: str, report: dict) -> str:
    lines = [f"[{split}] {report['ann_file']} (images in {report['image_root']})",
             f"  images: {report['images']} ({report['readable_images']} readable, "
             f"{report['bad_images']} bad, {report['size_mismatches']} size mismatches)",
             f"  boxes: {report['boxes']} in {len(report['classes'])} classes: "
             f"{', '.join(report['classes'])}"]
    counters = {k: v for k, v in report["stats"].items() if v and k not in ("images", "boxes")}
    if counters:
        lines.append("  counters: " + ", ".join(f"{k}={v}" for k, v in counters.items()))
    problems = report["problems"]
    lines.append(f"  problems: {len(problems)}" + ("" if problems else " (ok)"))
    for file, reason in problems[:50]:
        lines.append(f"    {file}: {reason}")
    if len(problems) > 50:
        lines.append(f"    ... and {len(problems) - 50} more")
    return "\n".join(lines)


def _cmd_check_data(args) -> int:
    from libra_rcnn.data import check_dataset
    from libra_rcnn.engine.train import build_dataset

    cfg = _load_config(args.config, list(args.overrides) + ["data.strict=false"])
    splits = ["train", "val"] if args.split == "all" else [args.split]
    if "val" in splits and cfg.data.val_ann is None:
        if args.split == "val":
            raise UserError(f"{args.config}: data.val_ann is not set")
        splits.remove("val")
    ok = True
    for split in splits:
        report = check_dataset(build_dataset(cfg, train=split == "train"))
        print(_format_report(split, report))
        ok = ok and report["ok"]
    return 0 if ok else EXIT_FAILURE


def _cmd_demo(args) -> int:
    from libra_rcnn.data import make_shapes_dataset
    from libra_rcnn.engine.checkpoint import load_model_from_checkpoint
    from libra_rcnn.engine.distributed import DistInfo
    from libra_rcnn.engine.predict import predict_images
    from libra_rcnn.engine.train import resolve_device, train

    cfg = _load_config("demo_quick" if args.quick else "demo", args.overrides)
    out = Path(args.output_dir)
    cfg.output_dir = str(out)
    demo = cfg.demo
    paths = make_shapes_dataset(out / "data", num_train=demo.num_train, num_val=demo.num_val,
                                image_size=demo.image_size, seed=demo.seed)
    cfg.data.train_ann, cfg.data.train_images = paths["train_json"], paths["train_images"]
    cfg.data.val_ann, cfg.data.val_images = paths["val_json"], paths["val_images"]
    device = resolve_device(args.device, DistInfo())
    summary = train(cfg, device=device, progress=not args.quiet)
    if summary["stop_reason"] == "interrupted":
        return _report_training(summary)

    model, meta = load_model_from_checkpoint(summary["checkpoint"], device=device)
    val_images = sorted(p for p in Path(paths["val_images"]).iterdir()
                        if p.suffix.lower() in IMAGE_SUFFIXES)[:demo.num_predictions]
    if val_images:
        predict_images(model, val_images, class_names=meta["class_names"],
                       label_to_cat_id=meta["label_to_cat_id"], score_thresh=demo.score_thresh,
                       device=device, out_dir=out / "predictions")
    print(_metrics_table(summary["metrics"]) if summary["metrics"]
          else "no metrics (no val set)")
    print(f"demo outputs in {out}: checkpoint {summary['checkpoint']}, predictions "
          f"{out / 'predictions'}, log {out / 'log.jsonl'}")
    return 0


def _cmd_configs(args) -> int:
    from libra_rcnn.config import CONFIG_DIR, list_configs

    print(f"shipped configs (in {CONFIG_DIR}):")
    for name in list_configs():
        print(f"  {name}")
    return 0


# ----------------------------------------------------------------------------------------------
# Entry point


class _TqdmLogHandler(logging.Handler):
    """Log records printed through tqdm so they do not tear progress bars."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            from tqdm.auto import tqdm

            tqdm.write(self.format(record), file=sys.stderr)
        except Exception:  # logging must never raise
            self.handleError(record)


def _configure_logging(quiet: bool) -> None:
    package_logger = logging.getLogger("libra_rcnn")
    if not any(isinstance(h, _TqdmLogHandler) for h in package_logger.handlers):
        handler = _TqdmLogHandler()
        handler.setFormatter(logging.Formatter("%(message)s"))
        package_logger.addHandler(handler)
    package_logger.setLevel(logging.WARNING if quiet else logging.INFO)
    package_logger.propagate = False


def _one_line(message: str) -> str:
    return " ".join(str(message).split())


def _user_error_message(exc: BaseException) -> str:
    if isinstance(exc, OSError) and exc.filename is not None:
        return f"{exc.filename}: {(exc.strerror or str(exc)).lower()}"
    path, reason = getattr(exc, "path", None), getattr(exc, "reason", None)
    if path is not None and reason is not None:  # the data package's BadImage/BadAnnotation
        return f"{path}: {reason}"
    return str(exc)


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run the CLI; returns the exit code (see the module doc)."""
    from libra_rcnn.engine.train import TrainingDivergedError

    parser = build_parser()
    args = parser.parse_args(argv)
    _configure_logging(args.quiet)
    try:
        return int(args.func(args) or 0)
    except TrainingDivergedError as exc:
        print(f"{PROG}: error: {_one_line(exc)}", file=sys.stderr)
        return EXIT_FAILURE
    # user errors: the boundary where ValueError (our ConfigError, CheckpointError,
    # BadAnnotationError, BadImageError, ... all subclass it) becomes one line and exit 2
    except (UserError, ValueError, FileNotFoundError, NotADirectoryError, IsADirectoryError,
            PermissionError, json.JSONDecodeError) as exc:
        print(f"{PROG}: error: {_one_line(_user_error_message(exc))}", file=sys.stderr)
        return EXIT_USER_ERROR


if __name__ == "__main__":
    sys.exit(main())
