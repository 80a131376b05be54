"""Accuracy of the Libra parts on real photos, trained from scratch (project issue 8).

Question: on a small real-photo detection set (``fruit``: 240 train / 60 test photos of apples,
bananas and oranges), trained from scratch on a CPU budget, what does each Libra part add?

Rows (paper layout, COCO bbox metrics on ``fruit/test``, x100):

=========================  =====================================================================
``faster_rcnn``            Faster R-CNN, every Libra part off (``fruit_faster_rcnn.yaml``)
``iou_sampling``           + IoU-balanced sampling
``bfp``                    + balanced feature pyramid
``libra_faster_rcnn``      + balanced L1 loss = Libra Faster R-CNN
``retinanet``              RetinaNet, every Libra part off (``fruit_retinanet.yaml``)
``libra_retinanet``        + balanced feature pyramid + balanced L1 loss = Libra RetinaNet
=========================  =====================================================================

The Faster R-CNN rows are :data:`libra_rcnn.analysis.ABLATION_TABLES` ``["table2"]`` (each row
starts from :data:`~libra_rcnn.analysis.BASELINE_OVERRIDES`, so a row means the same whatever
the base config switches on); the RetinaNet rows switch the pyramid and the loss in the same
way. Within a family the rows share everything else: seeds, schedule, image size, batch, data
pipeline.

Every (row, seed) pair is trained and evaluated by :func:`libra_rcnn.analysis.run_ablation` in
its own folder, seed by seed (all rows of the first seed, then the next seed), so a partial run
already gives a complete table for one seed. Reruns skip finished pairs and resume interrupted
trainings from their ``latest.pth``.

Output (``--output-dir``, default ``work_dirs/accuracy``)::

    data/fruit_{train,test}.json       the VOC XML converted to COCO (written once)
    runs/<row>/seed_<s>/...            run_ablation's folder of one (row, seed)
    accuracy.md / accuracy.json        the table: mean +- half range over seeds, per-seed values
    iou_histogram.{png,csv,json}       Figure 3 on the train split, from the seed-0 (first seed)
                                       Libra Faster R-CNN's final checkpoint

Spread: **half the range** over seeds, ``(max - min) / 2`` (for two seeds, the distance of
each seed from the mean); ``accuracy.json`` also holds the sample standard deviation.

Run: ``python -m benchmarks.accuracy [--data-root D] [--seeds 0 1] [--rows ...] [--epochs N]
[--device cpu|cuda] [--set KEY=VALUE ...] [--jobs N] [--smoke]``. ``--jobs N`` trains N seeds
at once in separate processes (each with CPU count / N threads), then merges. ``--set``
overrides a shared setting of every row (how the shared settings were tuned on the baseline
row). ``--smoke`` runs 4 train / 2 test images, 2 iterations per row, one seed, 64 px: it
checks the pipeline in well under a minute and measures nothing.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime
import json
import logging
import math
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Dict, Iterator, List, Mapping, Optional, Sequence

if __package__ in (None, ""):  # run as a file: python benchmarks/accuracy.py
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

__all__ = [
    "ROWS",
    "ROW_KEYS",
    "SMOKE_OVERRIDES",
    "Row",
    "SeedProcessFailed",
    "aggregate_seeds",
    "convert_split",
    "format_cell",
    "git_commit",
    "main",
    "parse_args",
    "row_config",
    "run_benchmark",
    "seed_process_command",
    "subset_coco",
]

logger = logging.getLogger("benchmarks.accuracy")

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_DATA_ROOT = REPO_ROOT / ".." / "shared" / "data" / "fruit"
FASTER_RCNN_CONFIG = "fruit_faster_rcnn"
RETINANET_CONFIG = "fruit_retinanet"
METRICS = ("AP", "AP50", "AP75", "APs", "APm", "APl")

# RetinaNet's Libra switches, mirroring libra_retinanet_r50_fpn_1x_coco.yaml; the baseline sets
# them off explicitly for the same reason BASELINE_OVERRIDES does.
_RETINA_BASELINE = (
    "model.neck=fpn",
    "model.bfp.enabled=false",
    "model.retina_box_loss.kind=l1",
    "model.retina_box_loss.beta=0.11",
    "model.retina_box_loss.loss_weight=1.0",
)
_RETINA_LIBRA = (
    *_RETINA_BASELINE,
    "model.bfp.enabled=true",
    "model.bfp.refine_level=1",
    "model.bfp.refine_type=non_local",
    "model.retina_box_loss.kind=balanced_l1",
    "model.retina_box_loss.alpha=0.5",
    "model.retina_box_loss.gamma=1.5",
)

#: Shared overrides of ``--smoke``: a tiny model on 64 px images (checks the pipeline only).
SMOKE_OVERRIDES: tuple[str, ...] = (
    "model.min_size=64",
    "model.max_size=64",
    "model.fpn_channels=16",
    "model.representation_size=32",
    "model.roi_sampler.num=32",
    "model.rpn_batch_size_per_image=32",
    "model.rpn_pre_nms_top_n_train=100",
    "model.rpn_post_nms_top_n_train=50",
    "model.rpn_pre_nms_top_n_test=100",
    "model.rpn_post_nms_top_n_test=50",
    "model.box_detections_per_img=20",
    # one image per batch: the 2 iterations stay inside the first epoch, so only latest.pth
    # is written (no epoch_1.pth of the same ~90 MB)
    "train.batch_size=1",
    "train.warmup_iters=1",
    "train.lr_steps=[1]",
    "train.log_period=1",
    "train.checkpoint_period=100",
)
SMOKE_TRAIN_IMAGES = 4
SMOKE_TEST_IMAGES = 2
SMOKE_ITERS = 2


@dataclasses.dataclass(frozen=True)
class Row:
    """One row of the table: its base config (shipped name) and the variant's overrides."""

    key: str
    name: str
    config: str
    overrides: tuple[str, ...]
    baseline: str  # key of the row it is compared with (itself for a baseline)


def _rows() -> Dict[str, Row]:
    from libra_rcnn.analysis import ABLATION_TABLES

    table2 = list(ABLATION_TABLES["table2"].values())
    faster = [("faster_rcnn", "Faster R-CNN (baseline)"),
              ("iou_sampling", "+ IoU-balanced sampling"),
              ("bfp", "+ balanced feature pyramid"),
              ("libra_faster_rcnn", "+ balanced L1 loss = Libra Faster R-CNN")]
    rows = [Row(key, name, FASTER_RCNN_CONFIG, tuple(overrides), "faster_rcnn")
            for (key, name), overrides in zip(faster, table2, strict=True)]
    rows.append(Row("retinanet", "RetinaNet (baseline)", RETINANET_CONFIG, _RETINA_BASELINE,
                    "retinanet"))
    rows.append(Row("libra_retinanet", "Libra RetinaNet", RETINANET_CONFIG, _RETINA_LIBRA,
                    "retinanet"))
    return {row.key: row for row in rows}


#: The six rows, in table order: key -> :class:`Row`.
ROWS: Dict[str, Row] = _rows()
ROW_KEYS: tuple[str, ...] = tuple(ROWS)


# ----------------------------------------------------------------------------------------------
# Data


def subset_coco(data: Mapping[str, Any], num_images: int) -> dict:
    """The first ``num_images`` images (by id) of a COCO dict that have at least one
    annotation, with their annotations; categories unchanged."""
    if isinstance(num_images, bool) or not isinstance(num_images, int) or num_images < 1:
        raise ValueError(f"num_images must be an int >= 1, got {num_images!r}")
    annotated = {a["image_id"] for a in data["annotations"]}
    images = sorted((im for im in data["images"] if im["id"] in annotated),
                    key=lambda im: im["id"])[:num_images]
    if len(images) < num_images:
        raise ValueError(f"num_images={num_images}: only {len(images)} annotated images")
    keep = {im["id"] for im in images}
    out = dict(data)
    out["images"] = images
    out["annotations"] = [a for a in data["annotations"] if a["image_id"] in keep]
    return out


def convert_split(folder: Path, out_file: Path, *, class_names: Optional[Sequence[str]] = None,
                  num_images: Optional[int] = None) -> dict:
    """COCO json of a VOC folder (``voc_to_coco``), written to ``out_file`` once.

    An existing ``out_file`` made from the same folder, image count and class list is reused;
    otherwise the folder is converted again. ``num_images`` keeps only the first annotated
    images (the smoke run). Returns the COCO dict.
    """
    from libra_rcnn.data import voc_to_coco, write_coco_json

    source = {"folder": str(folder.resolve()), "num_images": num_images,
              "class_names": list(class_names) if class_names is not None else None}
    if out_file.is_file():
        data = json.loads(out_file.read_text(encoding="utf-8"))
        if data.get("info", {}).get("benchmark_source") == source:
            return data
    data = voc_to_coco(folder, class_names=class_names)
    if num_images is not None:
        data = subset_coco(data, num_images)
    data["info"]["benchmark_source"] = source
    out_file.parent.mkdir(parents=True, exist_ok=True)
    write_coco_json(data, out_file)
    return data


# ----------------------------------------------------------------------------------------------
# Aggregation and formatting


def aggregate_seeds(per_seed: Mapping[int, Mapping[str, float]],
                    keys: Sequence[str] = METRICS) -> Dict[str, Dict[str, Optional[float]]]:
    """Mean, half range ``(max - min) / 2`` and sample std (``None`` for one seed) per metric.

    A metric that is negative for any seed (pycocotools' -1: no ground truth in that size
    range) gets ``None`` everywhere: it is undefined, not zero.
    """
    if not per_seed:
        raise ValueError("per_seed must hold at least one seed's metrics")
    out: Dict[str, Dict[str, Optional[float]]] = {}
    for key in keys:
        values = [float(m[key]) for m in per_seed.values()]
        if any(v < 0 or not math.isfinite(v) for v in values):
            out[key] = {"mean": None, "half_range": None, "std": None}
            continue
        out[key] = {
            "mean": statistics.fmean(values),
            "half_range": (max(values) - min(values)) / 2.0,
            "std": statistics.stdev(values) if len(values) > 1 else None,
        }
    return out


def format_cell(stats: Mapping[str, Optional[float]], *, num_seeds: int) -> str:
    """``mean ± half range`` x100 with one decimal; ``-`` if undefined; the mean alone for one
    seed."""
    if stats["mean"] is None:
        return "-"
    if num_seeds < 2:
        return f"{100.0 * stats['mean']:.1f}"
    return f"{100.0 * stats['mean']:.1f} ± {100.0 * stats['half_range']:.1f}"


def _paired_delta(rows: Mapping[str, dict], row: Row, metric: str = "AP") -> Optional[dict]:
    """``metric`` of ``row`` minus its baseline's, seed by seed (same seed = same
    initialisation and data order); mean and half range over the shared seeds."""
    if row.key == row.baseline or row.baseline not in rows:
        return None
    mine, base = rows[row.key]["per_seed"], rows[row.baseline]["per_seed"]
    seeds = sorted(set(mine) & set(base))
    diffs = [mine[s][metric] - base[s][metric] for s in seeds
             if mine[s][metric] >= 0 and base[s][metric] >= 0]
    if not diffs:
        return None
    return {"mean": statistics.fmean(diffs), "half_range": (max(diffs) - min(diffs)) / 2.0,
            "seeds": seeds}


# ----------------------------------------------------------------------------------------------
# Provenance


def git_commit(repo: Path = REPO_ROOT) -> Dict[str, Any]:
    """``{"commit": sha or "unknown", "dirty": bool or None}`` of the checkout (read-only git)."""
    def run(*cmd: str) -> Optional[str]:
        try:
            out = subprocess.run(["git", *cmd], cwd=repo, capture_output=True, text=True,
                                 timeout=20, check=False)
        except (OSError, subprocess.SubprocessError):
            return None
        return out.stdout.strip() if out.returncode == 0 else None

    commit = run("rev-parse", "HEAD")
    status = run("status", "--porcelain", "--untracked-files=no") if commit else None
    return {"commit": commit or "unknown", "dirty": None if status is None else bool(status)}


@contextlib.contextmanager
def _torch_threads(num: Optional[int]) -> Iterator[None]:
    """``torch.set_num_threads(num)`` for the block, restored after (None: leave as is)."""
    import torch

    before = torch.get_num_threads()
    if num is not None:
        torch.set_num_threads(num)
    try:
        yield
    finally:
        torch.set_num_threads(before)


# ----------------------------------------------------------------------------------------------
# The benchmark


def row_config(row: Row, shared: Sequence[str] = ()) -> Any:
    """The resolved :class:`~libra_rcnn.config.Config` of ``row`` (shared overrides first, then
    the row's, as run_ablation applies them)."""
    from libra_rcnn.config import load_config

    return load_config(row.config, [*shared, *row.overrides])


def _shared_overrides(train_json: Path, train_images: Path, test_json: Path, test_images: Path,
                      *, num_classes: int, smoke: bool) -> List[str]:
    # train.num_threads=null: training keeps the process's thread count, which run_benchmark
    # sets (--threads or the config's); a thread count is then no part of a run's overrides,
    # so resuming with another --threads is allowed
    shared = [f"data.train_ann={train_json}", f"data.train_images={train_images}",
              f"data.val_ann={test_json}", f"data.val_images={test_images}",
              f"model.num_classes={num_classes}", "train.num_threads=null"]
    if smoke:
        shared.extend(SMOKE_OVERRIDES)
    return shared


def _run_one(row: Row, seed: int, *, runs_dir: Path, shared: Sequence[str],
             epochs: Optional[int], max_iters: Optional[int], device: str) -> dict:
    """Train + evaluate one (row, seed) with run_ablation; returns its metrics.json entry plus
    ``seconds`` (wall clock of this call, or of the call that produced it)."""
    from libra_rcnn.analysis import run_ablation
    from libra_rcnn.analysis.ablation import variant_dir_name

    out = runs_dir / row.key / f"seed_{seed}"
    metrics_file = out / variant_dir_name(row.name) / "metrics.json"
    timing_file = out / "seconds.json"
    fresh = not metrics_file.is_file()
    start = time.perf_counter()
    run_ablation(row.config, {row.name: list(row.overrides)}, output_dir=out,
                 overrides=list(shared), epochs=epochs, max_iters=max_iters, seed=seed,
                 device=device, title=f"{row.name}, seed {seed}")
    if fresh:
        # resumed trainings record only the last part; the log's time_per_iter has the rest
        timing_file.write_text(json.dumps({"seconds": time.perf_counter() - start}) + "\n")
    entry = json.loads(metrics_file.read_text())
    entry["seconds"] = (json.loads(timing_file.read_text())["seconds"]
                        if timing_file.is_file() else None)
    return entry


def _iou_histogram(checkpoint: Path, train_json: Path, train_images: Path, out_dir: Path, *,
                   num_images: int, device: str) -> dict:
    """Figure 3 on the train split with the given checkpoint (as ``analyze iou-hist``); reused
    from ``iou_histogram.json`` when that was made from the same checkpoint file."""
    from libra_rcnn.analysis import iou_histograms
    from libra_rcnn.data import CocoDetection
    from libra_rcnn.engine.checkpoint import load_model_from_checkpoint

    stamp = {"checkpoint": str(checkpoint), "checkpoint_mtime_ns": checkpoint.stat().st_mtime_ns,
             "num_images_requested": num_images}
    cached = out_dir / "iou_histogram.json"
    if cached.is_file() and (out_dir / "iou_histogram.png").is_file():
        summary = json.loads(cached.read_text())
        if all(summary.get(k) == v for k, v in stamp.items()):
            return summary
    model, _ = load_model_from_checkpoint(checkpoint, device=device)
    # no transforms, train=True: the targets the training step saw (crowd boxes left out)
    dataset = CocoDetection(str(train_json), str(train_images), train=True)
    result = iou_histograms(model, dataset, num_images=min(num_images, len(dataset)), seed=0,
                            out_dir=out_dir)
    summary = {k: v for k, v in result.items() if k != "negatives_per_image"}
    summary.update(stamp)
    summary["num_negatives_total"] = int(sum(result["negatives_per_image"]))
    (out_dir / "iou_histogram.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary


def _markdown(report: dict) -> str:
    seeds = report["settings"]["seeds"]
    lines = [
        "# Accuracy on real photos: fruit, trained from scratch",
        "",
        f"Command: `{report['command']}`  ",
        f"Commit: `{report['git']['commit']}`"
        + (" (with uncommitted changes)" if report["git"]["dirty"] else "") + "  ",
        f"Finished: {report['time_utc']}; device {report['settings']['device']}, "
        f"torch threads: {report['settings']['threads'] or 'default'}"
        + ("; **smoke run: the numbers mean nothing**" if report["settings"]["smoke"] else ""),
        "",
        f"COCO bbox metrics on `fruit/test` ({report['data']['test_images']} images, "
        f"{report['data']['test_boxes']} boxes), x100. Cells: mean ± half the range over the "
        f"seeds done (column `seeds`; of {seeds} requested), a single value where only one "
        f"is done; `-`: undefined (pycocotools' -1, no ground truth in that size range). "
        f"ΔAP: the row's AP minus its family baseline's, paired by seed.",
        "",
        "| Method | seeds | AP | AP50 | AP75 | APs | APm | APl | ΔAP |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for row in report["rows"]:
        n = len(row["per_seed"])
        if n == 0:
            lines.append(f"| {row['name']} | 0 | " + " | ".join(["not yet run"] * 6) + " | |")
            continue
        cells = [format_cell(row["stats"][m], num_seeds=n) for m in METRICS]
        delta = row.get("delta_AP")
        delta_cell = "" if delta is None else (
            f"{100 * delta['mean']:+.1f}" + (f" ± {100 * delta['half_range']:.1f}"
                                             if len(delta["seeds"]) > 1 else ""))
        lines.append(f"| {row['name']} | {n} | " + " | ".join(cells) + f" | {delta_cell} |")
    lines.append("")
    hist = report.get("iou_histogram")
    if hist:
        from libra_rcnn.analysis.iou_distribution import SERIES_LABELS

        shares = ", ".join(f"{SERIES_LABELS.get(name, name)} {100 * v:.0f}%"
                           for name, v in hist["share_above"].items())
        lines += [
            f"IoU of sampled negatives (Figure 3), seed-{hist['seed']} Libra Faster R-CNN on "
            f"`fruit/train` ({len(hist['image_ids'])} images, {hist['num_sampled']['random']} "
            f"negatives per selection): share above IoU {hist['share_threshold']:g}: {shares}. "
            f"![IoU histogram](iou_histogram.png) (`iou_histogram.csv`)",
            "",
        ]
    return "\n".join(lines)


class SeedProcessFailed(RuntimeError):
    """A per-seed training process of ``--jobs`` exited with an error (its log names why)."""


def seed_process_command(args: argparse.Namespace, seed: int, threads: int) -> List[str]:
    """The command line of the process that trains every requested row for ``seed`` alone
    (``--jobs``): the same data, rows, budget and overrides, ``threads`` torch threads, and
    ``--train-only`` (no histogram, no table: the parent writes those once all seeds are done)."""
    command = [sys.executable, "-m", "benchmarks.accuracy", "--train-only",
               "--seeds", str(seed), "--threads", str(threads),
               "--data-root", str(Path(args.data_root).resolve()),
               "--output-dir", str(Path(args.output_dir).resolve()),
               "--device", args.device, "--rows", *args.rows]
    if args.smoke:
        command.append("--smoke")
    if args.epochs is not None:
        command += ["--epochs", str(args.epochs)]
    if args.max_iters is not None:
        command += ["--max-iters", str(args.max_iters)]
    for override in args.overrides:
        command += ["--set", override]
    if args.quiet:
        command.append("--quiet")
    return command


def _train_seeds_in_processes(args: argparse.Namespace, seeds: Sequence[int],
                              out_dir: Path) -> None:
    """Train the seeds in separate processes, at most ``args.jobs`` at once, each with
    ``--threads`` torch threads (default: the CPU count divided by the jobs). Each process's
    output goes to ``<output-dir>/seed_<s>.log``. On 2 cores, two 1-thread processes finish
    the table about twice as fast as one 2-thread process (docs/benchmarks.md, Timing): the
    small detector's kernels do not keep two threads busy.

    Raises:
        AblationInterrupted: Ctrl-C (SIGINT); every running process is interrupted too and
            writes its ``latest.pth`` before this returns (rerun to resume).
        SeedProcessFailed: a process exited with an error.
    """
    from libra_rcnn.analysis import AblationInterrupted

    threads = args.threads or max(1, (os.cpu_count() or 1) // args.jobs)
    waiting = list(seeds)
    running: Dict[int, tuple] = {}
    failed = []
    try:
        while waiting or running:
            while waiting and len(running) < args.jobs:
                seed = waiting.pop(0)
                log_path = out_dir / f"seed_{seed}.log"
                log = open(log_path, "w", encoding="utf-8")
                proc = subprocess.Popen(seed_process_command(args, seed, threads),
                                        cwd=REPO_ROOT, stdout=log, stderr=subprocess.STDOUT)
                logger.info("seed %d: process %d, %d thread(s), log %s", seed, proc.pid,
                            threads, log_path)
                running[seed] = (proc, log, log_path)
            time.sleep(0.5)
            for seed, (proc, log, log_path) in list(running.items()):
                if proc.poll() is None:
                    continue
                log.close()
                del running[seed]
                if proc.returncode != 0:
                    failed.append((seed, proc.returncode, log_path))
    except KeyboardInterrupt:
        import signal

        for proc, _, _ in running.values():  # they may have had the Ctrl-C already
            if proc.poll() is None:
                proc.send_signal(signal.SIGINT)
        for proc, log, _ in running.values():
            proc.wait()
            log.close()
        raise AblationInterrupted("interrupted while the per-seed processes trained; each "
                                  "wrote its latest.pth", signal.SIGINT) from None
    if failed:
        details = "; ".join(f"seed {seed} exited with {code} (log: {path})"
                            for seed, code, path in failed)
        raise SeedProcessFailed(f"per-seed training failed: {details}")


def run_benchmark(args: argparse.Namespace) -> dict:
    """Run (or resume) every requested (row, seed), then write the table and the histogram.
    Returns the report written to ``accuracy.json``.

    Raises:
        ValueError: ``args.data_root`` lacks ``train/`` or ``test/``; ConfigError for a bad
            row config (before any training); AblationInterrupted after writing the table of
            the finished pairs when a training is interrupted (rerun to resume).
    """
    from libra_rcnn.analysis import AblationInterrupted

    data_root = Path(args.data_root)
    for split in ("train", "test"):
        if not (data_root / split).is_dir():
            raise ValueError(f"--data-root {data_root}: no {split}/ folder (expected the fruit "
                             f"set's train/ and test/ with VOC XML next to the images)")
    out_dir = Path(args.output_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    smoke = args.smoke
    prefix = "smoke" if smoke else "fruit"
    train_json = (out_dir / "data" / f"{prefix}_train.json").resolve()
    test_json = (out_dir / "data" / f"{prefix}_test.json").resolve()
    train_images, test_images = (data_root / "train").resolve(), (data_root / "test").resolve()
    train_data = convert_split(train_images, train_json,
                               num_images=SMOKE_TRAIN_IMAGES if smoke else None)
    class_names = [c["name"] for c in sorted(train_data["categories"], key=lambda c: c["id"])]
    test_data = convert_split(test_images, test_json, class_names=class_names,
                              num_images=SMOKE_TEST_IMAGES if smoke else None)

    seeds = list(args.seeds)
    rows = [ROWS[key] for key in args.rows]
    shared = _shared_overrides(train_json, train_images, test_json, test_images,
                               num_classes=len(class_names) + 1, smoke=smoke)
    shared.extend(getattr(args, "overrides", ()))
    epochs = 1 if smoke else args.epochs
    max_iters = SMOKE_ITERS if smoke else args.max_iters
    # fail on a bad config before any training
    resolved = {row.key: row_config(row, shared) for row in rows}
    faster = resolved.get("faster_rcnn") or next(iter(resolved.values()))
    # one thread count for training, evaluation and the histogram: --threads, else the
    # config file's train.num_threads (2)
    configured = row_config(rows[0]).train.num_threads
    cpu_threads = (args.threads or configured) if args.device == "cpu" else None

    if args.jobs > 1 and len(seeds) > 1:
        # the processes train; the loop below then finds every pair finished and only reads it
        _train_seeds_in_processes(args, seeds, out_dir)

    per_seed: Dict[str, Dict[int, dict]] = {row.key: {} for row in rows}
    seconds: Dict[str, Dict[int, Optional[float]]] = {row.key: {} for row in rows}
    interrupted = None
    # seed by seed: after the first seed the table is complete, with one value per cell
    pairs = [(seed, row) for seed in seeds for row in rows]
    try:
        with _torch_threads(cpu_threads):
            for seed, row in pairs:
                logger.info("row %r, seed %d", row.key, seed)
                entry = _run_one(row, seed, runs_dir=out_dir / "runs", shared=shared,
                                 epochs=epochs, max_iters=max_iters, device=args.device)
                per_seed[row.key][seed] = entry["metrics"]
                seconds[row.key][seed] = entry["seconds"]
    except AblationInterrupted as exc:  # write the finished pairs' table, then re-raise
        interrupted = exc
    if args.train_only:  # a --jobs process: the parent writes the histogram and the table
        if interrupted is not None:
            raise interrupted
        return {}

    hist = None
    libra = ROWS["libra_faster_rcnn"]
    if interrupted is None and libra.key in per_seed and seeds[0] in per_seed[libra.key]:
        from libra_rcnn.analysis.ablation import variant_dir_name

        checkpoint = (out_dir / "runs" / libra.key / f"seed_{seeds[0]}"
                      / variant_dir_name(libra.name) / "latest.pth")
        with _torch_threads(cpu_threads):
            hist = _iou_histogram(checkpoint, train_json, train_images, out_dir,
                                  num_images=len(train_data["images"]), device=args.device)
        hist["seed"] = seeds[0]

    table_rows = []
    by_key = {}
    for row in rows:
        entry = {"key": row.key, "name": row.name, "config": row.config,
                 "overrides": list(row.overrides), "baseline": row.baseline,
                 "per_seed": per_seed[row.key], "seconds": seconds[row.key]}
        entry["stats"] = aggregate_seeds(per_seed[row.key]) if per_seed[row.key] else None
        by_key[row.key] = entry
        table_rows.append(entry)
    for row in rows:
        by_key[row.key]["delta_AP"] = _paired_delta(by_key, row)
    report = {
        "command": " ".join([Path(sys.executable).name, "-m", "benchmarks.accuracy",
                             *sys.argv[1:]]) if args.command is None else args.command,
        "time_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "git": git_commit(),
        "environment": {"python": platform.python_version(), "cpu_count": os.cpu_count(),
                        "torch": _version("torch"), "torchvision": _version("torchvision")},
        "settings": {"seeds": seeds, "rows": [r.key for r in rows], "smoke": smoke,
                     "device": args.device, "threads": cpu_threads,
                     "epochs": epochs or faster.train.epochs, "max_iters": max_iters,
                     "shared_overrides": shared, "spread": "half range (max - min) / 2",
                     "min_size": faster.model.min_size, "max_size": faster.model.max_size,
                     "backbone": faster.model.backbone, "norm": faster.model.norm,
                     "batch_size": faster.train.batch_size},
        "data": {"root": str(data_root.resolve()), "classes": class_names,
                 "train_images": len(train_data["images"]),
                 "train_boxes": len(train_data["annotations"]),
                 "test_images": len(test_data["images"]),
                 "test_boxes": len(test_data["annotations"])},
        "rows": table_rows,
        "iou_histogram": hist,
        "interrupted": None if interrupted is None else str(interrupted),
    }
    (out_dir / "accuracy.json").write_text(json.dumps(report, indent=2) + "\n")
    (out_dir / "accuracy.md").write_text(_markdown(report))
    if interrupted is not None:
        raise interrupted
    return report


def _version(module: str) -> Optional[str]:
    try:
        return __import__(module).__version__
    except ImportError:
        return None


# ----------------------------------------------------------------------------------------------
# Command line


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.accuracy",
        description="Train from scratch on fruit/train, evaluate on fruit/test: Faster R-CNN "
                    "+ each Libra part, RetinaNet vs Libra RetinaNet; mean ± half range over "
                    "seeds.")
    parser.add_argument("--data-root", default=str(DEFAULT_DATA_ROOT),
                        help="folder with the fruit set's train/ and test/ "
                             "(default: ../shared/data/fruit from the repository root)")
    parser.add_argument("--seeds", type=int, nargs="+", default=None,
                        help="training seeds (default: 0 1; --smoke: 0)")
    parser.add_argument("--rows", nargs="+", choices=ROW_KEYS, default=list(ROW_KEYS),
                        help="rows to run (default: all six)")
    parser.add_argument("--output-dir", default=None,
                        help="default: work_dirs/accuracy (--smoke: work_dirs/accuracy_smoke)")
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"),
                        help="training and evaluation device (default: cpu)")
    parser.add_argument("--epochs", type=_positive, default=None,
                        help="training epochs of every row (default: the configs', 6)")
    parser.add_argument("--max-iters", type=_positive, default=None,
                        help="stop every training after this many iterations (debugging)")
    parser.add_argument("--threads", type=_positive, default=None,
                        help="torch CPU threads for training, evaluation and the histogram "
                             "(default: the configs' train.num_threads, 2)")
    parser.add_argument("--smoke", action="store_true",
                        help="4 train / 2 test images, 2 iterations per row, one seed, 64 px: "
                             "checks the pipeline, measures nothing")
    parser.add_argument("--set", dest="overrides", action="append", default=[],
                        metavar="KEY=VALUE",
                        help="a config override shared by every row (repeatable), e.g. "
                             "train.base_lr=0.02: for tuning the shared settings on the "
                             "baseline; part of each run's overrides, so runs made with other "
                             "values are never mixed into one output folder")
    parser.add_argument("--jobs", type=_positive, default=1,
                        help="train up to N seeds at once, each in its own process with "
                             "--threads threads (default threads: CPU count / N); on 2 "
                             "cores, --jobs 2 halves the table's time (default: 1)")
    parser.add_argument("--train-only", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--quiet", action="store_true", help="log warnings only")
    args = parser.parse_args(argv)
    for override in args.overrides:
        key = override.split("=", 1)[0]
        if "=" not in override or not key:
            parser.error(f"--set {override!r}: expected KEY=VALUE")
        if key.startswith(("data.", "model.num_classes")):
            parser.error(f"--set {override!r}: the data and the class count are the "
                         f"benchmark's own (see --data-root)")
    if args.seeds is None:
        args.seeds = [0] if args.smoke else [0, 1]
    if len(set(args.seeds)) != len(args.seeds):
        parser.error(f"--seeds: duplicates in {args.seeds}")
    if len(set(args.rows)) != len(args.rows):
        parser.error(f"--rows: duplicates in {args.rows}")
    args.rows = [key for key in ROW_KEYS if key in args.rows]  # table order
    if args.output_dir is None:
        args.output_dir = str(REPO_ROOT / "work_dirs" / ("accuracy_smoke" if args.smoke
                                                         else "accuracy"))
    if args.smoke and args.epochs is not None:
        parser.error("--smoke fixes the budget (2 iterations per row); drop --epochs")
    if args.device == "cuda":
        import torch

        if not torch.cuda.is_available():
            parser.error("--device cuda: torch.cuda.is_available() is False")
    args.command = None
    return args


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args(argv)
    if argv is not None:
        args.command = " ".join(["python -m benchmarks.accuracy", *argv])
    from libra_rcnn.analysis import AblationInterrupted

    try:
        report = run_benchmark(args)
    except AblationInterrupted as exc:
        print(f"interrupted: {exc}; rerun the same command to resume")
        return 128 + (exc.signal or 2)
    except SeedProcessFailed as exc:
        print(f"error: {exc}; finished runs are kept, rerun the same command to retry",
              file=sys.stderr)
        return 1
    if args.train_only:
        return 0
    print(Path(args.output_dir, "accuracy.md").read_text())
    print(f"wrote {Path(args.output_dir) / 'accuracy.md'} and "
          f"{Path(args.output_dir) / 'accuracy.json'}")
    if report["iou_histogram"]:
        for path in report["iou_histogram"]["files"].values():
            print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    logging.basicConfig(level=logging.WARNING if "--quiet" in sys.argv else logging.INFO,
                        format="%(asctime)s %(name)s %(levelname)s: %(message)s")
    sys.exit(main())
