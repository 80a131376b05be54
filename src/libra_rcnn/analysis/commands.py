"""CLI side of the analyses: ``libra-rcnn analyze iou-hist|loss-curves|samples|bfp-heatmaps``
and ``libra-rcnn ablate``.

Each command is an ``add_*_arguments(parser)`` / ``run_*(args) -> exit code`` pair;
:func:`add_analyze_subcommands` and :func:`add_ablate_command` wire them into a parser with
``func`` defaults. Importing this module is cheap (no torch): the analysis modules are imported
when a command runs, so ``libra-rcnn --help`` stays fast.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from ..errors import UserInputError
from .ablation import ABLATION_TABLES, ABLATION_TITLES

__all__ = [
    "add_analyze_subcommands",
    "add_ablate_command",
    "add_iou_hist_arguments",
    "run_iou_hist",
    "add_loss_curves_arguments",
    "run_loss_curves",
    "add_samples_arguments",
    "run_samples",
    "add_bfp_heatmaps_arguments",
    "run_bfp_heatmaps",
    "add_ablate_arguments",
    "run_ablate",
    "load_model_and_dataset",
]


def positive_int(text: str) -> int:
    """argparse type: an int >= 1."""
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


# ----------------------------------------------------------------------------------------------
# Inputs: a model from a checkpoint and the images to analyse


def add_model_data_arguments(parser: argparse.ArgumentParser) -> None:
    """``CHECKPOINT`` plus where the images come from (defaults: the checkpoint's own config)."""
    parser.add_argument("checkpoint", help="model checkpoint (.pth) written by `libra-rcnn train`")
    parser.add_argument("--config", default=None,
                        help="config file or shipped config name whose data section gives the "
                             "images (default: the config stored in the checkpoint)")
    parser.add_argument("--split", choices=("train", "val"), default="train",
                        help="which split of the config's data to read (default: train)")
    parser.add_argument("--ann-file", default=None,
                        help="COCO annotation json (overrides the config's)")
    parser.add_argument("--image-root", default=None,
                        help="image folder of --ann-file (overrides the config's)")
    parser.add_argument("--proposals", default=None,
                        help="precomputed proposals file for models without an RPN (Fast R-CNN; "
                             "default: the config's data.<split>_proposals)")
    parser.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ... (default: cpu)")


def load_model_and_dataset(args: argparse.Namespace) -> tuple[Any, Any]:
    """The checkpoint's model (eval mode, on ``args.device``) and an un-augmented dataset.

    Data paths: ``--ann-file``/``--image-root`` if given, else ``--config``'s data section, else
    the config recorded in the checkpoint; ``--split`` picks train or val. Models without an
    RPN (Fast R-CNN) also get the split's precomputed proposals (``--proposals`` or the config's).
    """
    from libra_rcnn.data import CocoDetection
    from libra_rcnn.engine.checkpoint import load_model_from_checkpoint

    model, meta = load_model_from_checkpoint(args.checkpoint, device=args.device)
    if args.config is not None:
        from libra_rcnn.config import load_config

        data = vars(load_config(args.config).data)
        source = args.config
    else:
        data = (meta.get("config") or {}).get("data") or {}
        source = f"{args.checkpoint} (stored config)"
    ann_key, root_key = (("train_ann", "train_images") if args.split == "train"
                         else ("val_ann", "val_images"))
    ann_file = args.ann_file if args.ann_file is not None else data.get(ann_key)
    image_root = args.image_root if args.image_root is not None else data.get(root_key)
    if ann_file is None or image_root is None:
        raise UserInputError(f"{source}: no data.{ann_key}/data.{root_key}; pass --ann-file and "
                         f"--image-root")
    proposals = None
    if getattr(model, "rpn", None) is None:
        proposals = args.proposals or data.get(f"{args.split}_proposals")
        if proposals is None:
            raise UserInputError(f"{args.checkpoint}: the model has no RPN; pass --proposals (a "
                             f"precomputed proposals file for {ann_file})")
    # no transforms (no flips): the model's own transform resizes; train=True leaves crowd
    # boxes out of the targets, as the training step sees them
    dataset = CocoDetection(ann_file, image_root, train=True, proposals_file=proposals)
    return model, dataset


def _dataset_sample(dataset: Any, index: int) -> tuple[Any, dict]:
    """``dataset[index]`` with a clear error for a bad index or an unreadable image."""
    from libra_rcnn.data import SkippedImage

    if not 0 <= index < len(dataset):
        raise UserInputError(f"--index must lie in [0, {len(dataset)}), got {index}")
    sample = dataset.load(index)
    if isinstance(sample, SkippedImage):
        raise UserInputError(f"{sample.path}: {sample.reason} (image --index {index}; pick "
                             f"another one)")
    return sample


# ----------------------------------------------------------------------------------------------
# analyze iou-hist (Figure 3)


def add_iou_hist_arguments(parser: argparse.ArgumentParser) -> None:
    add_model_data_arguments(parser)
    parser.add_argument("--num-images", type=positive_int, default=100,
                        help="images to use (default: 100)")
    parser.add_argument("--num-neg", type=positive_int, default=None,
                        help="negatives per image and selection (default: the model's sampler, "
                             "512 x 0.75 = 384)")
    parser.add_argument("--bins", type=positive_int, default=10,
                        help="histogram bins over [0, 0.5) (default: 10)")
    parser.add_argument("--num-bins", type=positive_int, default=None,
                        help="K of the IoU-balanced sampler (default: the model's, 3)")
    parser.add_argument("--seed", type=int, default=0, help="sampling seed (default: 0)")
    parser.add_argument("--out-dir", default="work_dirs/analysis",
                        help="where iou_histogram.png/.csv are written (default: work_dirs/analysis)")


def run_iou_hist(args: argparse.Namespace) -> int:
    from .iou_distribution import format_shares, iou_histograms

    from libra_rcnn.data import WithSkipped

    model, dataset = load_model_and_dataset(args)
    result = iou_histograms(model, WithSkipped(dataset), num_images=args.num_images,
                            num_neg=args.num_neg, bins=args.bins, seed=args.seed,
                            num_bins=args.num_bins, out_dir=args.out_dir)
    print(format_shares(result))
    if result["unreadable"]:
        print(f"{len(result['unreadable'])} unreadable image(s) skipped:")
        for path, reason in result["unreadable"]:
            print(f"  {path}: {reason}")
    for path in result["files"].values():
        print(f"wrote {path}")
    return 0


# ----------------------------------------------------------------------------------------------
# analyze loss-curves (Figure 5)


def _alpha_gamma(text: str) -> tuple[float, float]:
    try:
        alpha, gamma = (float(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected ALPHA,GAMMA such as 0.5,1.5, got {text!r}") from None
    return alpha, gamma


def add_loss_curves_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--setting", dest="settings", type=_alpha_gamma, action="append",
                        default=None, metavar="ALPHA,GAMMA",
                        help="a balanced L1 setting to draw (repeatable; default: 0.5,1 0.3,1 "
                             "0.2,1 0.5,1.5)")
    parser.add_argument("--beta", type=float, default=1.0, help="inlier threshold (default: 1)")
    parser.add_argument("--max-error", type=float, default=3.0,
                        help="largest regression error drawn (default: 3)")
    parser.add_argument("--num-points", type=positive_int, default=301,
                        help="samples of the error axis (default: 301)")
    parser.add_argument("--out-dir", default="work_dirs/analysis",
                        help="where loss_curves.png/.csv are written (default: work_dirs/analysis)")


def run_loss_curves(args: argparse.Namespace) -> int:
    from .balanced_l1_curves import DEFAULT_SETTINGS, loss_curves

    result = loss_curves(Path(args.out_dir) / "loss_curves.png",
                         settings=args.settings or DEFAULT_SETTINGS, beta=args.beta,
                         max_error=args.max_error, num_points=args.num_points)
    for path in result["files"].values():
        print(f"wrote {path}")
    return 0


# ----------------------------------------------------------------------------------------------
# analyze samples (Figure 6)


def add_samples_arguments(parser: argparse.ArgumentParser) -> None:
    add_model_data_arguments(parser)
    parser.add_argument("--index", type=int, default=0,
                        help="dataset index of the image (default: 0)")
    parser.add_argument("--num-neg", type=positive_int, default=64,
                        help="negatives drawn by each sampler (default: 64)")
    parser.add_argument("--num-bins", type=positive_int, default=None,
                        help="K of the IoU-balanced sampler (default: the model's, 3)")
    parser.add_argument("--seed", type=int, default=0, help="sampling seed (default: 0)")
    parser.add_argument("--out", default="work_dirs/analysis/samples.png",
                        help="output PNG (default: work_dirs/analysis/samples.png)")


def run_samples(args: argparse.Namespace) -> int:
    from .sampled_negatives import sample_visualization

    model, dataset = load_model_and_dataset(args)
    image, target = _dataset_sample(dataset, args.index)
    result = sample_visualization(model, image, target, num_neg=args.num_neg, seed=args.seed,
                                  num_bins=args.num_bins, out_png=args.out)
    if result["gt_boxes"].numel() == 0:
        print(f"note: image {args.index} has no ground-truth boxes; every proposal has IoU 0")
    for name in ("random", "iou_balanced"):
        ious = result[name]["ious"]
        print(f"{name}: {ious.numel()} of {result['num_candidates']} negatives, "
              f"mean IoU {float(ious.mean()) if ious.numel() else 0.0:.3f}")
    print(f"wrote {result['files']['png']}")
    return 0


# ----------------------------------------------------------------------------------------------
# analyze bfp-heatmaps (Figure 4)


def add_bfp_heatmaps_arguments(parser: argparse.ArgumentParser) -> None:
    add_model_data_arguments(parser)
    parser.add_argument("--index", type=int, default=0,
                        help="dataset index of the image (default: 0)")
    parser.add_argument("--out", default="work_dirs/analysis/bfp_heatmaps.png",
                        help="output PNG (default: work_dirs/analysis/bfp_heatmaps.png)")


def run_bfp_heatmaps(args: argparse.Namespace) -> int:
    from .feature_heatmaps import bfp_heatmaps

    model, dataset = load_model_and_dataset(args)
    image, _ = _dataset_sample(dataset, args.index)
    result = bfp_heatmaps(model, image, args.out)
    print(f"wrote {result['files']['png']}")
    return 0


# ----------------------------------------------------------------------------------------------
# ablate (Tables 2, 4, 5, 6)


def add_ablate_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", help="base config file or shipped config name")
    which = parser.add_mutually_exclusive_group(required=True)
    which.add_argument("--table", choices=sorted(ABLATION_TABLES),
                       help="a ready-made variant list of the paper's ablation tables")
    which.add_argument("--variant", dest="variants", nargs="+", action="append",
                       metavar="NAME [KEY=VALUE ...]",
                       help="a variant: its name, then its overrides (repeatable)")
    parser.add_argument("--only", action="append", default=None, metavar="NAME",
                        help="run only these rows of --table (repeatable)")
    parser.add_argument("--set", dest="overrides", action="append", default=[],
                        metavar="KEY=VALUE",
                        help="override shared by all variants, e.g. data.train_ann=... (repeatable)")
    parser.add_argument("--epochs", type=positive_int, default=None,
                        help="training epochs of every variant (default: the config's)")
    parser.add_argument("--max-iters", type=positive_int, default=None,
                        help="stop every variant after this many iterations")
    parser.add_argument("--seed", type=int, default=0, help="seed of every variant (default: 0)")
    parser.add_argument("--output-dir", default=None,
                        help="default: work_dirs/ablation_<table> (or work_dirs/ablation)")
    parser.add_argument("--device", default=None, help="default: CUDA if available, else CPU")
    parser.add_argument("--progress", action="store_true", help="show progress bars")


def _variants_from_args(args: argparse.Namespace) -> dict[str, list[str]]:
    if args.table is not None:
        table = ABLATION_TABLES[args.table]
        if args.only:
            unknown = [n for n in args.only if n not in table]
            if unknown:
                raise UserInputError(f"--only: {args.table} has no row(s) {unknown}; rows: {list(table)}")
            return {n: table[n] for n in table if n in args.only}
        return dict(table)
    if args.only:
        raise UserInputError("--only selects rows of --table; with --variant list just those")
    variants: dict[str, list[str]] = {}
    for name, *overrides in args.variants:
        if name in variants:
            raise UserInputError(f"--variant: duplicate name {name!r}")
        if "=" in name:
            raise UserInputError(f"--variant: the first value is the variant's name, got {name!r}")
        variants[name] = overrides
    return variants


def run_ablate(args: argparse.Namespace) -> int:
    """Exit code 0, or 128 + signal number when a variant's training was interrupted."""
    from .ablation import AblationInterrupted, run_ablation

    variants = _variants_from_args(args)
    output_dir = args.output_dir or (f"work_dirs/ablation_{args.table}" if args.table
                                     else "work_dirs/ablation")
    try:
        table = run_ablation(args.config, variants, output_dir=output_dir,
                             overrides=args.overrides, epochs=args.epochs,
                             max_iters=args.max_iters, seed=args.seed, device=args.device,
                             title=ABLATION_TITLES.get(args.table), progress=args.progress)
    except AblationInterrupted as exc:
        print(f"interrupted: {exc}")
        return 128 + (exc.signal or 2)
    print(table)
    print(f"wrote {Path(output_dir) / 'ablation.md'} and {Path(output_dir) / 'ablation.json'}")
    return 0


# ----------------------------------------------------------------------------------------------
# Wiring

# (name, help, add_arguments, run) of the `analyze` subcommands
_ANALYZE_COMMANDS = (
    ("iou-hist", "IoU distribution of random / IoU-balanced / hard negatives (Figure 3)",
     add_iou_hist_arguments, run_iou_hist),
    ("loss-curves", "balanced L1 gradient and loss curves vs smooth L1 (Figure 5)",
     add_loss_curves_arguments, run_loss_curves),
    ("samples", "negatives picked by random vs IoU-balanced sampling on one image (Figure 6)",
     add_samples_arguments, run_samples),
    ("bfp-heatmaps", "feature heatmaps before / after the balanced feature pyramid (Figure 4)",
     add_bfp_heatmaps_arguments, run_bfp_heatmaps),
)


def add_analyze_subcommands(subparsers: "argparse._SubParsersAction") -> None:
    """Add ``iou-hist``, ``loss-curves``, ``samples`` and ``bfp-heatmaps`` to ``subparsers``
    (those of an ``analyze`` command); each parser's ``func`` default is its ``run_*``."""
    for name, help_text, add_arguments, run in _ANALYZE_COMMANDS:
        parser = subparsers.add_parser(name, help=help_text, description=help_text)
        add_arguments(parser)
        parser.set_defaults(func=run)


def add_ablate_command(parser: argparse.ArgumentParser) -> None:
    """Fill the ``ablate`` command's parser; its ``func`` default is :func:`run_ablate`."""
    add_ablate_arguments(parser)
    parser.set_defaults(func=run_ablate)
