"""``libra-rcnn`` command line (also ``python -m libra_rcnn``).

Subcommands::

    libra-rcnn train CONFIG [--set KEY=VALUE ...] [--resume CKPT] [--strict] [--output-dir D]
    libra-rcnn eval CHECKPOINT [--config CONFIG] [--set KEY=VALUE ...] [--results FILE] [--strict]
    libra-rcnn eval --results-file FILE --ann ANN_JSON [--proposals]
    libra-rcnn predict CHECKPOINT IMAGE_OR_DIR ... [--score-thresh T] [--out-dir D]
    libra-rcnn convert-voc FOLDER OUT_JSON [--image-set NAME] [--class-names A,B] [--skip-bad]
    libra-rcnn convert-mmdet SRC DST --config CONFIG [--class-names A,B,...]
    libra-rcnn export CHECKPOINT OUT_ONNX [--opset N] [--check IMAGE ...]
    libra-rcnn check-data CONFIG
    libra-rcnn demo [--output-dir D] [--quick]
    libra-rcnn configs
    libra-rcnn analyze iou-hist|loss-curves|samples|bfp-heatmaps ...
    libra-rcnn ablate CONFIG (--table tableN | --variant NAME k=v ...) [--max-iters N] ...

CONFIG is a YAML file or the name of a shipped config (``libra-rcnn configs`` lists them).
``eval CHECKPOINT`` takes the data and test-time settings from the config stored in the
checkpoint unless ``--config`` names another (``eval CONFIG CHECKPOINT`` is the same as
``eval CHECKPOINT --config CONFIG``).

Multi-GPU / multi-process: ``torchrun --nproc_per_node N -m libra_rcnn train|eval ...`` splits
the work between the processes. The commands that do not split their work (``predict``,
``check-data``, ``convert-voc``, ``convert-mmdet``, ``export``, ``analyze``) run in the first
process only under torchrun; the others exit at once with 0.

Unreadable images never stop ``train`` or ``eval``: they are skipped, counted and named, and
evaluation scores the other images (``--strict`` refuses them up front instead). ``predict``
writes every image it can read and lists the others with the reason.

Exit codes: 0 success; 1 training diverged (non-finite losses), ``check-data`` found problems
or ``export --check`` found onnxruntime's detections differing from PyTorch's; 2 user error (bad
or missing config, dataset, checkpoint, argument; one line on stderr
``libra-rcnn: error: <file>: <problem>``, no traceback unless ``--debug``); 3 ``predict`` or
``export --check`` could not read some of its input images (it did the others); 130 / 143 training interrupted
by SIGINT / SIGTERM after writing ``latest.pth`` (resume with ``--resume``). Any other failure
is a bug: Python prints its traceback and the exit code is 1.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import traceback
from pathlib import Path
from typing import Optional, Sequence

__all__ = ["main", "build_parser"]

from libra_rcnn.errors import UserInputError

PROG = "libra-rcnn"
EXIT_FAILURE = 1
EXIT_USER_ERROR = 2
EXIT_UNREADABLE_INPUTS = 3
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp"}

UserError = UserInputError  # the short name the commands below raise


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
    parser.add_argument("--debug", action="store_true",
                        help="show the traceback of user errors too (bad config, data, arguments)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for add_command in (_add_train_command, _add_eval_command, _add_predict_command,
                        _add_convert_voc_command, _add_convert_mmdet_command,
                        _add_export_command, _add_check_data_command, _add_demo_command,
                        _add_configs_command, _add_analysis_commands):
        add_command(sub)
    return parser


def _add_train_command(sub) -> None:
    """The ``train`` command."""
    p = sub.add_parser("train", help="train a detector from a config")
    p.add_argument("config", help="YAML config file or shipped config name")
    _add_config_args(p)
    p.add_argument("--resume", metavar="CKPT", help="continue from this checkpoint (latest.pth)")
    p.add_argument("--strict", action="store_true",
                   help="validate every sample first and stop on any bad image or annotation")
    p.add_argument("--output-dir", help="where checkpoints and logs go (default: from the config)")
    _add_device_arg(p)
    p.set_defaults(func=_cmd_train)


def _add_eval_command(sub) -> None:
    """The ``eval`` command."""
    p = sub.add_parser("eval", help="COCO evaluation of a checkpoint, or of a results file",
                       description="eval CHECKPOINT [--config CONFIG] [--results FILE] evaluates a "
                                   "checkpoint on the val set of its own config (or of CONFIG); "
                                   "eval --results-file F --ann A scores an existing COCO results "
                                   "json. Unreadable images are skipped, named and not scored.")
    p.add_argument("paths", nargs="*", metavar="[CONFIG] CHECKPOINT",
                   help="checkpoint (.pth) written by train, optionally preceded by a config")
    p.add_argument("--config", help="YAML config file or shipped config name giving the data and "
                                    "test-time settings (default: the checkpoint's own config)")
    _add_config_args(p)
    p.add_argument("--strict", action="store_true",
                   help="decode every val image first and stop on any bad image or annotation")
    p.add_argument("--results", metavar="FILE", help="also write the COCO results json here")
    p.add_argument("--results-file", metavar="FILE", help="evaluate this COCO results json instead")
    p.add_argument("--ann", metavar="ANN_JSON", help="COCO annotations for --results-file")
    p.add_argument("--proposals", action="store_true",
                   help="with --results-file: class-agnostic proposal recall (AR@100/300/1000)")
    _add_device_arg(p)
    p.set_defaults(func=_cmd_eval)


def _add_predict_command(sub) -> None:
    """The ``predict`` command."""
    p = sub.add_parser("predict", help="detect objects in images and draw them",
                       description="Writes <out-dir>/<image stem>.jpg per image and "
                                   "<out-dir>/predictions.json. Images that cannot be read are "
                                   f"listed with the reason and the exit status is "
                                   f"{EXIT_UNREADABLE_INPUTS}; the others are still written.")
    p.add_argument("checkpoint", help="checkpoint (.pth) written by train")
    p.add_argument("images", nargs="+", help="image files or folders of images")
    p.add_argument("--score-thresh", type=float, default=0.5, help="minimum score (default 0.5)")
    p.add_argument("--out-dir", default="predictions", help="output folder (default predictions/)")
    _add_device_arg(p)
    p.set_defaults(func=_cmd_predict, single_process=True)


def _add_convert_voc_command(sub) -> None:
    """The ``convert-voc`` command."""
    p = sub.add_parser("convert-voc", help="convert a VOC-style folder to a COCO json")
    p.add_argument("folder", help="folder with .xml annotations (and images)")
    p.add_argument("out_json", help="COCO json to write")
    p.add_argument("--class-names", help="comma-separated class names (fixes the label order)")
    p.add_argument("--image-set", metavar="NAME",
                   help="VOC release layout (Annotations/, JPEGImages/, ImageSets/Main/): "
                        "convert only the files listed in ImageSets/Main/NAME.txt")
    p.add_argument("--difficult-as-crowd", action="store_true",
                   help="mark VOC 'difficult' objects as crowd (ignored in training/evaluation)")
    p.add_argument("--skip-bad", action="store_true",
                   help="leave out XML files that cannot be converted (each is listed with the "
                        "reason) instead of stopping at the first")
    p.set_defaults(func=_cmd_convert_voc, single_process=True)


def _add_convert_mmdet_command(sub) -> None:
    """The ``convert-mmdet`` command."""
    p = sub.add_parser("convert-mmdet", help="convert an mmdetection checkpoint into ours",
                       description="Convert an mmdetection (2.x / 3.x) checkpoint of a Libra or "
                                   "baseline detector into a libra-rcnn checkpoint that predict, "
                                   "eval and analyze take.")
    p.add_argument("src", help="mmdetection checkpoint (.pth)")
    p.add_argument("dst", help="libra-rcnn checkpoint to write")
    p.add_argument("--config", required=True,
                   help="our config of the same model, e.g. libra_faster_rcnn_r50_fpn_1x_coco")
    _add_config_args(p)
    p.add_argument("--class-names", help="comma-separated class names, when the file has none")
    p.set_defaults(func=_cmd_convert_mmdet, single_process=True)


def _add_export_command(sub) -> None:
    """The ``export`` command."""
    p = sub.add_parser("export", help="export a checkpoint to ONNX (Libra Faster R-CNN, Cascade "
                       "R-CNN, RetinaNet, RPN) for onnxruntime", description="Writes an ONNX file whose input 'image' "
                       "is a float32 [3, H, W] RGB image in 0..1 (any H, W) and whose outputs are "
                       "'boxes' [N, 4] (x1, y1, x2, y2 in the input's pixels), 'labels' [N] (not "
                       "for an RPN) and 'scores' [N]. Needs pip install \"libra-rcnn[export]\".")
    p.add_argument("checkpoint", help="checkpoint (.pth) written by train")
    p.add_argument("output", help="ONNX file to write")
    p.add_argument("--opset", type=int, default=None, help="ONNX opset, >= 16 (default 17)")
    p.add_argument("--check", nargs="+", default=[], metavar="IMAGE",
                   help="image files or folders: run PyTorch and onnxruntime on each and compare "
                        "their detections (exit 1 if they differ)")
    p.set_defaults(func=_cmd_export, single_process=True)


def _add_check_data_command(sub) -> None:
    """The ``check-data`` command."""
    p = sub.add_parser("check-data", help="decode every image of a config's datasets and report")
    p.add_argument("config", help="YAML config file or shipped config name")
    _add_config_args(p)
    p.add_argument("--split", choices=("train", "val", "all"), default="all")
    p.set_defaults(func=_cmd_check_data, single_process=True)


def _add_demo_command(sub) -> None:
    """The ``demo`` command."""
    p = sub.add_parser("demo", help="generate a synthetic shapes dataset, train, evaluate, predict")
    p.add_argument("--output-dir", default="work_dirs/demo", help="default work_dirs/demo")
    p.add_argument("--quick", action="store_true", help="tiny run (about a minute) for smoke tests")
    _add_config_args(p)
    _add_device_arg(p)
    p.set_defaults(func=_cmd_demo)


def _add_configs_command(sub) -> None:
    """The ``configs`` command."""
    p = sub.add_parser("configs", help="list the shipped configs")
    p.set_defaults(func=_cmd_configs)


def _add_analysis_commands(sub) -> None:
    """``analyze`` (the paper's figures) and ``ablate`` (ablation tables)."""
    from libra_rcnn.analysis import add_ablate_command, add_analyze_subcommands  # torch-free

    p = sub.add_parser("analyze", help="the paper's figures as PNG/CSV: iou-hist (Fig. 3), "
                       "bfp-heatmaps (Fig. 4), loss-curves (Fig. 5), samples (Fig. 6)")
    add_analyze_subcommands(p.add_subparsers(dest="analysis", metavar="ANALYSIS", required=True))
    p.set_defaults(single_process=True)
    p = sub.add_parser("ablate", help="train + evaluate config variants into a paper-style "
                       "ablation table (Tables 2, 4, 5, 6)")
    add_ablate_command(p)


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


def _report_training(summary) -> int:
    """Print the run's report (a :class:`~libra_rcnn.engine.train.TrainSummary`; first
    process only under torchrun); the exit code."""
    interrupted = summary.stop_reason == "interrupted"
    if not _secondary_process():
        if summary.metrics or summary.eval_skipped:
            print(_evaluation_report(summary.metrics, summary.eval_images, summary.eval_skipped))
        print(f"{summary.stop_reason} at epoch {summary.epoch}, iteration "
              f"{summary.iteration}; checkpoint: {summary.checkpoint}")
        if interrupted:
            print(f"interrupted: resume with --resume {summary.checkpoint}", file=sys.stderr)
    return 128 + int(summary.signal) if interrupted and summary.signal else 0


def _metrics_table(metrics: dict) -> str:
    """The paper's AP columns, or AR@N for proposal metrics."""
    from libra_rcnn.engine.evaluate import format_metrics_table

    if "AP" in metrics:
        return format_metrics_table(metrics)
    keys = [k for k in metrics if k.startswith("AR@")]
    return format_metrics_table(metrics, keys=keys)


def _evaluation_report(metrics: dict, num_scored: int, skipped: Sequence) -> str:
    """The metrics table, how many images were scored, and the unreadable ones by name."""
    from libra_rcnn.engine.evaluate import describe_skipped

    lines = [_metrics_table(metrics)] if metrics else []
    if skipped:
        lines.append(f"scored {num_scored} image(s); {len(skipped)} unreadable image(s) not "
                     f"scored:")
        lines.extend(f"  {line}" for line in describe_skipped(skipped))
    else:
        lines.append(f"scored {num_scored} image(s)")
    if not metrics:
        lines.append("no metrics: no image could be read")
    return "\n".join(lines)


def _cmd_eval(args) -> int:
    if args.results_file is not None:
        return _eval_results_file(args)
    if len(args.paths) not in (1, 2) or (len(args.paths) == 2 and args.config is not None):
        raise UserError("eval needs CHECKPOINT [--config CONFIG] (or --results-file FILE "
                        "--ann ANN_JSON)")
    config, checkpoint = (args.paths if len(args.paths) == 2 else (args.config, args.paths[0]))

    from libra_rcnn.engine import distributed as dist_utils
    from libra_rcnn.engine.checkpoint import load_checkpoint
    from libra_rcnn.engine.train import resolve_device

    state = load_checkpoint(checkpoint)
    cfg = _eval_config(config, checkpoint, state, args)
    info = dist_utils.init_distributed(resolve_device(args.device, dist_utils.DistInfo()).type)
    try:
        evaluation = _evaluate_checkpoint(cfg, checkpoint, state, args, info)
    finally:
        dist_utils.cleanup_distributed(info)
    if info.rank == 0:
        print(_evaluation_report(evaluation.metrics, len(evaluation.image_ids),
                                 evaluation.skipped))
        if args.results:
            print(f"wrote {args.results}")
    return 0


def _eval_results_file(args) -> int:
    from libra_rcnn.engine.evaluate import evaluate_results_file

    if args.ann is None:
        raise UserError("eval --results-file needs --ann ANN_JSON")
    if args.paths or args.config is not None:
        raise UserError("eval: give either CHECKPOINT [--config CONFIG] or --results-file/--ann, "
                        "not both")
    metrics = evaluate_results_file(args.ann, args.results_file, proposals=args.proposals)
    print(_metrics_table(metrics))
    return 0


def _eval_config(config: Optional[str], checkpoint: str, state: dict, args):
    """The config of ``eval``: ``config`` if given, else the one stored in the checkpoint; then
    ``--set`` overrides and ``--strict``."""
    from libra_rcnn.config import apply_overrides, config_from_dict

    overrides = list(args.overrides) + (["data.strict=true"] if args.strict else [])
    if config is not None:
        cfg = _load_config(config, overrides)
        source = config
    else:
        if not isinstance(state.get("config"), dict):
            raise UserError(f"{checkpoint}: the checkpoint holds no config; pass --config CONFIG")
        source = f"{checkpoint} (its stored config)"
        cfg = config_from_dict(apply_overrides(state["config"], overrides), source=source)
    if cfg.data.val_ann is None or cfg.data.val_images is None:
        raise UserError(f"{source}: data.val_ann / data.val_images are not set (use --set or "
                        f"--config)")
    return cfg


def _evaluate_checkpoint(cfg, checkpoint: str, state: dict, args, info):
    from libra_rcnn.engine.checkpoint import CheckpointError, model_from_checkpoint_state
    from libra_rcnn.engine.evaluate import evaluate
    from libra_rcnn.engine.train import build_dataset, build_val_loader, check_strict, \
        intra_op_threads, resolve_device

    device = resolve_device(args.device, info)
    model, meta = model_from_checkpoint_state(state, path=checkpoint, expected=cfg.model,
                                              device=device)
    dataset = build_dataset(cfg, train=False)
    if list(meta.get("class_names", dataset.class_names)) != list(dataset.class_names):
        raise CheckpointError(f"{checkpoint}: trained on classes {meta['class_names']}, but "
                              f"{cfg.data.val_ann} has {dataset.class_names}")
    if cfg.data.strict:
        check_strict(dataset)
    loader = build_val_loader(dataset, cfg=cfg, info=info)
    # training's thread count, so that the checkpoint scores as training's evaluation scored it
    with intra_op_threads(cfg.train.num_threads):
        return evaluate(model, loader, device=device, results_file=args.results,
                        proposals=cfg.model.arch == "rpn", progress=not args.quiet)


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
    written = predict_images(
        model, images, class_names=meta.get("class_names") or [],
        label_to_cat_id=meta.get("label_to_cat_id"), score_thresh=args.score_thresh,
        device=device, out_dir=args.out_dir)
    print(f"wrote {written.json_file} ({len(written.detections)} detections) and "
          f"{len(written.drawn)} drawn image(s) in {args.out_dir}")
    return _report_unreadable(written.failed, len(images))


def _report_unreadable(failed: Sequence[tuple[object, str]], total: int) -> int:
    """List the input images that could not be read; the exit status that says so (0 if none)."""
    if not failed:
        return 0
    print(f"{len(failed)} of {total} image(s) could not be read (exit status "
          f"{EXIT_UNREADABLE_INPUTS}):")
    for file, reason in failed:
        print(f"  {file}: {reason}")
    return EXIT_UNREADABLE_INPUTS


def _cmd_convert_voc(args) -> int:
    from libra_rcnn.data import voc_to_coco, write_coco_json

    class_names = None
    if args.class_names:
        class_names = [n.strip() for n in args.class_names.split(",") if n.strip()]
    coco = voc_to_coco(args.folder, class_names=class_names, image_set=args.image_set,
                       difficult_as_crowd=args.difficult_as_crowd, skip_bad=args.skip_bad)
    write_coco_json(coco, args.out_json)
    names = [c["name"] for c in coco["categories"]]
    counts = coco["info"]["conversion"]
    print(f"wrote {args.out_json}: {len(coco['images'])} images, {len(coco['annotations'])} "
          f"boxes, {len(names)} classes ({', '.join(names)}); use image root {args.folder} and "
          f"model.num_classes={len(names) + 1}")
    warned = [f"{counts[key]} {what}" for key, what in (
        ("dropped_empty_boxes", "empty or inverted box(es) dropped"),
        ("size_from_xml", "image(s) missing or unreadable (sizes taken from the XML)"))
        if counts[key]]
    if warned:
        print("  " + "; ".join(warned) + " (warnings name the files)")
    if counts["clipped_boxes"]:
        print(f"  {counts['clipped_boxes']} box(es) clipped to their image")
    skipped = counts["skipped_files"]
    if skipped:
        print(f"  skipped {len(skipped)} file(s) that could not be converted:")
        for entry in skipped:
            print(f"    {entry['file']}: {entry['reason']}")
    return 0


def _cmd_convert_mmdet(args) -> int:
    from libra_rcnn.engine.convert_mmdet import convert_mmdet_checkpoint

    cfg = _load_config(args.config, args.overrides)
    names = None
    if args.class_names:
        names = [n.strip() for n in args.class_names.split(",") if n.strip()]
    summary = convert_mmdet_checkpoint(args.src, args.dst, cfg, class_names=names)
    print(f"wrote {summary['dst']}: {summary['model']}; {summary['converted']} tensors, "
          f"{summary['num_classes'] - 1} classes")
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
    from libra_rcnn.data.errors import BadImageError
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
    agree, unreadable = True, []
    for image_path in images:  # none unless --check, and then there is a detector
        try:
            image = load_image_tensor(image_path)
        except BadImageError as exc:  # checked as predict reads: the others still are
            unreadable.append((image_path, exc.reason))
            continue
        with torch.no_grad():
            expected = model([image])[0]
        result = compare_detections(expected, detector(image))
        agree = agree and result["agree"]
        print(f"{image_path}: PyTorch {result['expected']} detections, onnxruntime "
              f"{result['actual']}, {result['matched']} matched (boxes within 1e-2 px, scores "
              f"within 1e-4); largest differences {result['max_box_diff']:.2g} px, "
              f"{result['max_score_diff']:.2g}")
    if not agree:
        return EXIT_FAILURE
    return _report_unreadable(unreadable, len(images))


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
    if summary.stop_reason == "interrupted":
        return _report_training(summary)

    model, meta = load_model_from_checkpoint(summary.checkpoint, device=device)
    val_images = sorted(p for p in Path(paths["val_images"]).iterdir()
                        if p.suffix.lower() in IMAGE_SUFFIXES)[:demo.num_predictions]
    if val_images:
        predict_images(model, val_images, class_names=meta["class_names"],
                       label_to_cat_id=meta["label_to_cat_id"], score_thresh=demo.score_thresh,
                       device=device, out_dir=out / "predictions")
    print(_metrics_table(summary.metrics) if summary.metrics
          else "no metrics (no val set)")
    print(f"demo outputs in {out}: checkpoint {summary.checkpoint}, predictions "
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
    if isinstance(exc, OSError):
        return f"{exc.filename}: {(exc.strerror or str(exc)).lower()}"
    path, reason = getattr(exc, "path", None), getattr(exc, "reason", None)
    if path is not None and reason is not None:  # the data package's BadImage/BadAnnotation
        return f"{path}: {reason}"
    return str(exc)


def _is_user_error(exc: BaseException) -> bool:
    """Our user-error type, or an operating-system error about a file the user named."""
    return isinstance(exc, UserInputError) or (isinstance(exc, OSError)
                                               and exc.filename is not None)


def _secondary_process() -> bool:
    """Under torchrun: a process other than the first."""
    rank = os.environ.get("RANK", "0").strip()
    return rank.isdigit() and int(rank) > 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run the CLI; returns the exit code (see the module doc)."""
    from libra_rcnn.engine.train import TrainingDivergedError

    parser = build_parser()
    args = parser.parse_args(argv)
    _configure_logging(args.quiet)
    if getattr(args, "single_process", False) and _secondary_process():
        return 0
    try:
        return int(args.func(args) or 0)
    except TrainingDivergedError as exc:
        if args.debug:
            traceback.print_exc()
        print(f"{PROG}: error: {_one_line(exc)}", file=sys.stderr)
        return EXIT_FAILURE
    except (UserInputError, OSError) as exc:
        if not _is_user_error(exc):
            raise  # a bug, or an operating-system failure not about a user's file
        if args.debug:
            traceback.print_exc()
        print(f"{PROG}: error: {_one_line(_user_error_message(exc))}", file=sys.stderr)
        return EXIT_USER_ERROR


if __name__ == "__main__":
    sys.exit(main())
