"""Accuracy of the Libra parts on real photos, trained on a CPU budget.

Question: on a small real-photo detection set, what does each Libra part add? Two data sets
(``--dataset``):

* ``fruit``: 240 train / 60 test photos of apples, bananas and oranges, one or two large fruit
  per photo;
* ``bccd``: blood-cell photos, 205 train / 72 test (the set's own ``ImageSets`` split), 13
  overlapping cells per photo, a 12:1 class imbalance and small platelets.

Two regimes (``--regime``):

* ``pretrained`` (the default): the paper's regime, fine-tuning ImageNet-pretrained weights:
  EfficientNet-Lite0 with the configs for your own photos on a CPU
  (``faster_rcnn_lite0_fpn_cpu``, ``retinanet_lite0_fpn_cpu``; the reference's conventions),
  fruit at a short side of 320, BCCD at its photos' own 480;
* ``scratch``: ResNet-18 with group norm from random weights (``fruit_*.yaml`` with
  torchvision's conventions, ``bccd_*.yaml`` with the reference's).

Rows (paper layout, COCO bbox metrics on the test split, x100):

==============================  ================================================================
``faster_rcnn``                 Faster R-CNN, every Libra part off
``iou_sampling``                + IoU-balanced sampling
``bfp``                         + balanced feature pyramid
``libra_faster_rcnn``           + balanced L1 loss = Libra Faster R-CNN
``iou_sampling_own_bins``       ``iou_sampling`` with the IoU bins over the negatives' own IoU
                                range (``binning: negatives``) instead of the reference's
``libra_faster_rcnn_own_bins``  ``libra_faster_rcnn`` with the negatives' own range
``cascade_rcnn``                Cascade R-CNN (three stages at IoU 0.5 / 0.6 / 0.7), every Libra
                                part off; pretrained ``bccd`` only
``libra_cascade_rcnn``          + the three parts in every stage = Libra Cascade R-CNN
``retinanet``                   RetinaNet, every Libra part off
``libra_retinanet``             + balanced feature pyramid + balanced L1 loss = Libra RetinaNet
==============================  ================================================================

The Faster R-CNN rows are :data:`libra_rcnn.analysis.ABLATION_TABLES` ``["table2"]`` (each row
starts from :data:`~libra_rcnn.analysis.BASELINE_OVERRIDES`, so a row means the same whatever
the base config switches on); the RetinaNet rows switch the pyramid and the loss in the same
way. Within a family the rows share everything else: seeds, schedule, image size, batch, data
pipeline. Each row is compared, seed by seed, with its family's baseline; the feature
pyramid and balanced L1 rows also with the Table 2 row before them (the part's own step), each
own-range row with its partner of the reference's bins, and each cascade with the Faster R-CNN
of its kind.

Seeds: ``--seeds`` for every row; ``--more-seeds`` for the headline pairs only (baseline and
Libra Faster R-CNN; the reference's bins and the negatives' own range), and fine-tuned also for
the feature pyramid row (:data:`MORE_SEED_ROWS`). Pretrained: seeds 0 1 and more seeds 2-7, so
those rows get eight and the cascade pair (which trains the first :data:`CASCADE_MORE_SEEDS` of
them) four; scratch: 0 1, and for ``bccd`` 2 3 more.

Every (row, seed) pair is trained and evaluated by :func:`libra_rcnn.analysis.run_ablation` in
its own folder, seed by seed (all rows of the first seed, then the next seed), so a partial run
already gives a complete table for one seed. Reruns skip finished pairs and resume interrupted
trainings from their ``latest.pth``.

Output (``--output-dir``, default ``work_dirs/accuracy_<dataset>_<regime>``)::

    data/<set>_{train,test}.json       the VOC XML converted to COCO (written once)
    runs/<row>/seed_<s>/...            run_ablation's folder of one (row, seed)
    accuracy.md / accuracy.json        the table: mean +- spread over seeds, per-seed values,
                                       paired gains with their 95 % intervals, per-class AP
    iou_histogram.{png,csv,json}       Figure 3 on the train split, from the first seed's
                                       Libra Faster R-CNN's final checkpoint

Spread: the cells print the sample **standard deviation** over seeds; ``accuracy.json`` also
holds half the range, ``(max - min) / 2``.

Recipes (``--recipe``): ``cpu`` is the config files' schedule; ``bccd``'s ``gpu`` (the default
with ``--device cuda``) trains longer at the paper's input scale (:data:`GPU_RECIPE`).

Run: ``python -m benchmarks.accuracy [--dataset fruit|bccd] [--regime pretrained|scratch]
[--data-root D] [--seeds 0 1] [--more-seeds 2 3] [--rows ...] [--epochs N]
[--device cpu|cuda] [--recipe cpu|gpu] [--set KEY=VALUE ...] [--jobs N]
[--reuse ACCURACY_JSON] [--smoke]``. ``--jobs N`` trains N seeds at once in separate processes
(each with CPU count / N threads), then merges.
``--reuse`` adds rows to a finished table: the earlier table's rows that ``--rows`` leaves out
join the new one as they are, once checked to be made with the same settings. ``--set``
overrides a shared setting of every row (how the shared settings were tuned on the baseline
row). ``--smoke`` runs 4 train / 2 test images, 2 iterations per row, one seed, 64 px: it checks
the pipeline in well under a minute and measures nothing.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime
import hashlib
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

from benchmarks._common import relative_paths  # noqa: E402

__all__ = [
    "DATASETS",
    "GPU_RECIPE",
    "CASCADE_MORE_SEEDS",
    "CASCADE_ROWS",
    "HEADLINE_ROWS",
    "MORE_SEED_ROWS",
    "ROWS",
    "ROW_KEYS",
    "SMOKE_OVERRIDES",
    "Dataset",
    "Row",
    "SeedProcessFailed",
    "aggregate_seeds",
    "convert_split",
    "drop_degenerate_boxes",
    "format_cell",
    "git_commit",
    "main",
    "paired_gains",
    "parse_args",
    "row_config",
    "run_benchmark",
    "seed_plan",
    "seed_process_command",
    "subset_coco",
]

logger = logging.getLogger("benchmarks.accuracy")

REPO_ROOT = Path(__file__).resolve().parent.parent
SHARED_DATA = REPO_ROOT / ".." / "shared" / "data"
METRICS = ("AP", "AP50", "AP75", "APs", "APm", "APl")

# RetinaNet's Libra switches, mirroring libra_retinanet_r50_fpn_1x_coco.yaml; the baseline sets
# them off explicitly for the same reason BASELINE_OVERRIDES does. The balanced L1 formula
# (scaled / beta_in_log) is the base config's: the convention it follows.
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
    # RetinaNet's group norm needs 32 channels, and more than P7's one value per image at 64 px
    "model.retina_head_norm=none",
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

#: ``bccd``'s ``--recipe gpu``: the paper's input scale (short side 800: platelets ~66 px, twice
#: the smallest anchor), 8 epochs (4x the CPU recipe's photos) with the 1x schedule's steps
#: scaled (after 5 and 7 of 8 epochs, as 8 and 11 of 12), 8 images per batch (the learning rate
#: scales with the batch: base_batch_size stays 2), data loaded in 4 workers. Sized by
#: arithmetic to finish in about 6 minutes on one H200 with ``--jobs 4``; not yet run.
GPU_RECIPE: tuple[str, ...] = (
    "model.min_size=800",
    "model.max_size=1333",
    "train.epochs=8",
    "train.lr_steps=[5,7]",
    "train.batch_size=8",
    "train.warmup_iters=50",
    "train.log_period=20",
    "data.num_workers=4",
)


@dataclasses.dataclass(frozen=True)
class Row:
    """One row of the table: its family (which base config), the variant's overrides, the row
    it is compared with (its family's baseline; itself for a baseline) and the row it is also
    compared with (its partner: the other side of a one-switch pair, or a cascade's Faster
    R-CNN)."""

    key: str
    name: str
    family: str  # "faster_rcnn", "cascade_rcnn" or "retinanet"
    overrides: tuple[str, ...]
    baseline: str
    partner: Optional[str] = None


# the baseline's box loss is the config's (tuned with it); balanced L1 replaces it with the
# paper's beta 1
_CONFIG_BOX_LOSS = ("model.box_loss.kind=smooth_l1", "model.box_loss.beta=1.0")
_PAPER_BETA = ("model.box_loss.beta=1.0",)


def _table2_row(overrides: Sequence[str]) -> tuple[str, ...]:
    """A Table 2 row of ``ABLATION_TABLES`` with the box loss left to the config unless the row
    switches balanced L1 on."""
    if "model.box_loss.kind=balanced_l1" in overrides:
        return (*overrides, *_PAPER_BETA)
    return tuple(o for o in overrides if o not in _CONFIG_BOX_LOSS)


def _rows() -> Dict[str, Row]:
    from libra_rcnn.analysis import ABLATION_TABLES

    table2 = [_table2_row(overrides) for overrides in ABLATION_TABLES["table2"].values()]
    faster = [("faster_rcnn", "Faster R-CNN (baseline)"),
              ("iou_sampling", "+ IoU-balanced sampling"),
              ("bfp", "+ balanced feature pyramid"),
              ("libra_faster_rcnn", "+ balanced L1 loss = Libra Faster R-CNN")]
    # Table 2 adds one part per row: each row after the first two is also compared with the
    # row before it, the part's own step (the second's step is its baseline already)
    rows = [Row(key, name, "faster_rcnn", tuple(overrides), "faster_rcnn",
                partner=faster[i - 1][0] if i >= 2 else None)
            for i, ((key, name), overrides) in enumerate(zip(faster, table2, strict=True))]
    own_bins = "model.roi_sampler.binning=negatives"
    rows.append(Row("iou_sampling_own_bins",
                    "+ IoU-balanced sampling, bins over the negatives' own IoU range",
                    "faster_rcnn", (*table2[1], own_bins), "faster_rcnn",
                    partner="iou_sampling"))
    rows.append(Row("libra_faster_rcnn_own_bins",
                    "Libra Faster R-CNN, bins over the negatives' own IoU range",
                    "faster_rcnn", (*table2[3], own_bins), "faster_rcnn",
                    partner="libra_faster_rcnn"))
    rows.append(Row("cascade_rcnn", "Cascade R-CNN (baseline)", "cascade_rcnn", table2[0],
                    "cascade_rcnn", partner="faster_rcnn"))
    rows.append(Row("libra_cascade_rcnn", "Libra Cascade R-CNN", "cascade_rcnn", table2[3],
                    "cascade_rcnn", partner="libra_faster_rcnn"))
    rows.append(Row("retinanet", "RetinaNet (baseline)", "retinanet", _RETINA_BASELINE,
                    "retinanet"))
    rows.append(Row("libra_retinanet", "Libra RetinaNet", "retinanet", _RETINA_LIBRA,
                    "retinanet"))
    return {row.key: row for row in rows}


#: Every row, in table order: key -> :class:`Row`.
ROWS: Dict[str, Row] = _rows()
ROW_KEYS: tuple[str, ...] = tuple(ROWS)
#: The headline pairs: baseline and Libra Faster R-CNN; the reference's IoU bins and the
#: negatives' own range.
HEADLINE_ROWS: tuple[str, ...] = ("faster_rcnn", "libra_faster_rcnn", "iou_sampling",
                                  "iou_sampling_own_bins")
#: The rows that ``--more-seeds`` trains, by regime: the headline pairs, and fine-tuned also the
#: feature pyramid row, so that each part's step of Table 2 is paired over every seed.
MORE_SEED_ROWS: Mapping[str, tuple[str, ...]] = {"pretrained": (*HEADLINE_ROWS, "bfp"),
                                                 "scratch": HEADLINE_ROWS}
#: Cascade R-CNN and Libra Cascade R-CNN: they train the first ``CASCADE_MORE_SEEDS`` of
#: ``--more-seeds`` (a cascade step costs about 1.4 Faster R-CNN steps on the CPU).
CASCADE_ROWS: tuple[str, ...] = ("cascade_rcnn", "libra_cascade_rcnn")
CASCADE_MORE_SEEDS = 2
#: How the detectors start: ``pretrained`` (ImageNet EfficientNet-Lite0, the configs for your
#: own photos on a CPU) or ``scratch`` (the data set's from-scratch configs).
REGIMES = ("pretrained", "scratch")
_PRETRAINED_CONFIGS = {"faster_rcnn": "faster_rcnn_lite0_fpn_cpu",
                       "cascade_rcnn": "cascade_rcnn_lite0_fpn_cpu",
                       "retinanet": "retinanet_lite0_fpn_cpu"}


@dataclasses.dataclass(frozen=True)
class Dataset:
    """A data set of the benchmark: where it is, how its splits are found, its configs."""

    key: str
    title: str
    configs: Mapping[str, Mapping[str, str]]  # regime -> family -> shipped config name
    rows: Mapping[str, tuple[str, ...]]  # regime -> row keys, table order
    # VOC release layout with ImageSets/Main/<split>.txt (True), or <root>/<split>/ folders
    image_sets: bool
    class_names: Optional[tuple[str, ...]]  # None: the sorted names found in train
    spread: str  # "half_range" or "std": the cells' ± (accuracy.json has both)
    seeds: Mapping[str, tuple[int, ...]]  # regime -> the seeds of every row
    more_seeds: Mapping[str, tuple[int, ...]]  # regime -> more seeds of MORE_SEED_ROWS
    # regime -> the data set's own settings over the config (image size)
    overrides: Mapping[str, tuple[str, ...]] = dataclasses.field(default_factory=dict)
    recipes: Mapping[str, tuple[str, ...]] = dataclasses.field(
        default_factory=lambda: {"cpu": ()})
    splits: tuple[str, str] = ("train", "test")

    @property
    def default_root(self) -> Path:
        return SHARED_DATA / self.key

    def config(self, row: Row, regime: str) -> str:
        return self.configs[regime][row.family]


_SCRATCH_FRUIT_ROWS = ("faster_rcnn", "iou_sampling", "bfp", "libra_faster_rcnn", "retinanet",
                       "libra_retinanet")
_SCRATCH_BCCD_ROWS = ("faster_rcnn", "iou_sampling", "bfp", "libra_faster_rcnn",
                      "iou_sampling_own_bins", "retinanet", "libra_retinanet")
_PRETRAINED_SEEDS = {"seeds": (0, 1), "more_seeds": (2, 3, 4, 5, 6, 7)}
_PRETRAINED_FRUIT_ROWS = tuple(key for key in ROW_KEYS if key not in CASCADE_ROWS)
#: The data sets, by ``--dataset`` key.
DATASETS: Dict[str, Dataset] = {
    "fruit": Dataset(
        "fruit", "fruit",
        {"pretrained": _PRETRAINED_CONFIGS,
         "scratch": {"faster_rcnn": "fruit_faster_rcnn", "retinanet": "fruit_retinanet"}},
        {"pretrained": _PRETRAINED_FRUIT_ROWS, "scratch": _SCRATCH_FRUIT_ROWS},
        image_sets=False, class_names=None, spread="std",
        seeds={"pretrained": _PRETRAINED_SEEDS["seeds"], "scratch": (0, 1)},
        more_seeds={"pretrained": _PRETRAINED_SEEDS["more_seeds"], "scratch": ()},
        # the fruit are large (90 % of boxes wider than a third of the short side)
        overrides={"pretrained": ("model.min_size=320", "model.max_size=480")}),
    "bccd": Dataset(
        "bccd", "BCCD (blood cells)",
        {"pretrained": _PRETRAINED_CONFIGS,
         "scratch": {"faster_rcnn": "bccd_faster_rcnn", "retinanet": "bccd_retinanet"}},
        {"pretrained": ROW_KEYS, "scratch": _SCRATCH_BCCD_ROWS},
        image_sets=True, class_names=("RBC", "WBC", "Platelets"), spread="std",
        seeds={"pretrained": _PRETRAINED_SEEDS["seeds"], "scratch": (0, 1)},
        more_seeds={"pretrained": _PRETRAINED_SEEDS["more_seeds"], "scratch": (2, 3)},
        recipes={"cpu": (), "gpu": GPU_RECIPE}),
}


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


def drop_degenerate_boxes(data: Mapping[str, Any]) -> dict:
    """A COCO dict without the boxes at most 1 px wide or high: VOC boxes with ``xmin == xmax``
    or ``ymin == ymax`` (inclusive pixel indices), a point or a line rather than an object's
    outline (BCCD has two). Each dropped box is listed under
    ``info["conversion"]["dropped_degenerate_boxes"]`` as ``{"image", "category", "bbox"}``."""
    files = {im["id"]: im["file_name"] for im in data["images"]}
    names = {c["id"]: c["name"] for c in data["categories"]}
    keep, dropped = [], []
    for ann in data["annotations"]:
        if min(ann["bbox"][2], ann["bbox"][3]) <= 1.0:
            dropped.append({"image": files[ann["image_id"]], "category": names[ann["category_id"]],
                            "bbox": ann["bbox"]})
            logger.warning("%s: dropping a degenerate %s box %s (at most 1 px wide or high)",
                           dropped[-1]["image"], dropped[-1]["category"], ann["bbox"])
        else:
            keep.append(ann)
    out = dict(data)
    out["annotations"] = keep
    out["info"] = dict(data.get("info", {}))
    out["info"]["conversion"] = {**out["info"].get("conversion", {}),
                                 "dropped_degenerate_boxes": dropped}
    return out


def convert_split(folder: Path, out_file: Path, *, class_names: Optional[Sequence[str]] = None,
                  num_images: Optional[int] = None, image_set: Optional[str] = None) -> dict:
    """COCO json of a VOC folder (``voc_to_coco``), written to ``out_file`` once.

    ``image_set`` picks the files listed in ``folder/ImageSets/Main/<image_set>.txt`` (the VOC
    release layout); ``None`` takes every XML file of ``folder``. An existing ``out_file`` made
    from the same folder, image set, image count and class list is reused; otherwise the folder
    is converted again. Degenerate boxes are dropped (:func:`drop_degenerate_boxes`).
    ``num_images`` keeps only the first annotated images (the smoke run). Returns the COCO
    dict; what the conversion dropped or clipped is in ``info["conversion"]``.
    """
    from libra_rcnn.data import voc_to_coco, write_coco_json

    source = {"folder": str(folder.resolve()), "num_images": num_images,
              "class_names": list(class_names) if class_names is not None else None,
              "drop_degenerate_boxes": True}
    if image_set is not None:
        source["image_set"] = image_set
    if out_file.is_file():
        data = json.loads(out_file.read_text(encoding="utf-8"))
        if data.get("info", {}).get("benchmark_source") == source:
            return data
    data = drop_degenerate_boxes(voc_to_coco(folder, class_names=class_names,
                                             image_set=image_set))
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


def format_cell(stats: Mapping[str, Optional[float]], *, num_seeds: int,
                spread: str = "half_range") -> str:
    """``mean ± spread`` x100 with one decimal (``spread``: ``"half_range"`` or ``"std"``);
    ``-`` if undefined; the mean alone for one seed."""
    if stats["mean"] is None:
        return "-"
    if num_seeds < 2:
        return f"{100.0 * stats['mean']:.1f}"
    return f"{100.0 * stats['mean']:.1f} ± {100.0 * stats[spread]:.1f}"


def _two_sided_t_probability(t: float, df: int) -> float:
    """P(|T| <= t) for Student's t with ``df`` (integer) degrees of freedom: the closed forms
    of Abramowitz & Stegun 26.7.3 (odd ``df``) and 26.7.4 (even)."""
    theta = math.atan(t / math.sqrt(df))
    cos2 = math.cos(theta) ** 2
    if df % 2:
        term, total = 1.0, 0.0
        if df > 1:
            total = term = math.cos(theta)
            for k in range(3, df - 1, 2):
                term *= cos2 * (k - 1) / k
                total += term
        return 2.0 / math.pi * (theta + math.sin(theta) * total)
    term = total = 1.0
    for k in range(2, df - 1, 2):
        term *= cos2 * (k - 1) / k
        total += term
    return math.sin(theta) * total


def t_critical(df: int, confidence: float = 0.95) -> float:
    """The two-sided critical value of Student's t: ``P(|T| <= t) = confidence`` (bisection)."""
    if isinstance(df, bool) or not isinstance(df, int) or df < 1:
        raise ValueError(f"df must be an int >= 1, got {df!r}")
    low, high = 0.0, 1e4
    for _ in range(200):
        middle = (low + high) / 2.0
        if _two_sided_t_probability(middle, df) < confidence:
            low = middle
        else:
            high = middle
    return (low + high) / 2.0


def paired_gains(mine: Mapping[Any, Mapping[str, float]], other: Mapping[Any, Mapping[str, float]],
                 metric: str = "AP") -> Optional[dict]:
    """``metric`` of one row minus another's, seed by seed (same seed = same initialisation and
    data order), over the seeds both have where both values are defined (>= 0).

    Returns ``None`` without such a seed, else ``{"seeds", "gains"}`` (lists, seed order),
    ``"mean"``, ``"half_range"``, ``"std"`` (``None`` for one seed), ``"ci95"`` (the mean's
    95 % confidence interval ``[low, high]`` by Student's t with n - 1 degrees of freedom;
    ``None`` for one seed) and ``"all_positive"``.
    """
    seeds = sorted(s for s in set(mine) & set(other)
                   if mine[s][metric] >= 0 and other[s][metric] >= 0)
    if not seeds:
        return None
    gains = [float(mine[s][metric]) - float(other[s][metric]) for s in seeds]
    mean = statistics.fmean(gains)
    std = statistics.stdev(gains) if len(gains) > 1 else None
    ci95 = None
    if std is not None:
        half_width = t_critical(len(gains) - 1) * std / math.sqrt(len(gains))
        ci95 = [mean - half_width, mean + half_width]
    return {"seeds": seeds, "gains": gains, "mean": mean,
            "half_range": (max(gains) - min(gains)) / 2.0, "std": std, "ci95": ci95,
            "all_positive": all(g > 0 for g in gains)}


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


def seed_plan(rows: Sequence[Row], seeds: Sequence[int], more_seeds: Sequence[int], *,
              more_seed_rows: Sequence[str]) -> Dict[int, List[str]]:
    """Seed -> the keys of the rows it trains, in table order: every row for ``seeds``; for
    ``more_seeds`` the rows of ``more_seed_rows`` (:data:`MORE_SEED_ROWS` of the regime), and
    the cascade rows for the first :data:`CASCADE_MORE_SEEDS` of them."""
    plan = {seed: [row.key for row in rows] for seed in seeds}
    for index, seed in enumerate(more_seeds):
        keys = [row.key for row in rows if row.key in more_seed_rows
                or (row.key in CASCADE_ROWS and index < CASCADE_MORE_SEEDS)]
        if keys:
            plan[seed] = keys
    return plan


def row_config(row: Row, shared: Sequence[str] = (), dataset: str = "fruit",
               regime: str = "pretrained") -> Any:
    """The resolved :class:`~libra_rcnn.config.Config` of ``row`` on ``dataset`` (shared
    overrides first, then the row's, as run_ablation applies them)."""
    from libra_rcnn.config import load_config

    return load_config(DATASETS[dataset].config(row, regime), [*shared, *row.overrides])


def config_fingerprint(row: Row, dataset: str, regime: str) -> str:
    """SHA-256 of ``row``'s resolved config on ``dataset`` without the shared overrides (those
    are compared as settings): it changes when a shipped config file's values change, which its
    name alone does not show."""
    from libra_rcnn.config import config_to_dict

    text = json.dumps(config_to_dict(row_config(row, (), dataset, regime)), sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()


def _shared_overrides(train_json: Path, train_images: Path, test_json: Path, test_images: Path,
                      *, num_classes: int, recipe: Sequence[str], smoke: bool,
                      user: Sequence[str], dataset: Sequence[str] = ()) -> List[str]:
    """Every row's shared overrides: data, class count, the data set's own settings, the
    recipe's, the smoke run's, then the user's ``--set`` (later ones win)."""
    # train.num_threads=null: training keeps the process's thread count, which run_benchmark
    # sets (--threads or the config's); a thread count is then no part of a run's overrides,
    # so resuming with another --threads is allowed
    shared = [f"data.train_ann={train_json}", f"data.train_images={train_images}",
              f"data.val_ann={test_json}", f"data.val_images={test_images}",
              f"model.num_classes={num_classes}", "train.num_threads=null", *dataset,
              *recipe]
    if smoke:
        shared.extend(SMOKE_OVERRIDES)
    shared.extend(user)
    return shared


def _run_one(row: Row, seed: int, *, config: str, runs_dir: Path, shared: Sequence[str],
             epochs: Optional[int], max_iters: Optional[int], device: str) -> dict:
    """Train + evaluate one (row, seed) with run_ablation; returns its metrics.json entry plus
    ``seconds`` (wall clock of this call, or of the call that produced it) and ``dir`` (the
    variant's folder)."""
    from libra_rcnn.analysis import run_ablation
    from libra_rcnn.analysis.ablation import variant_dir_name

    out = runs_dir / row.key / f"seed_{seed}"
    folder = out / variant_dir_name(row.name)
    timing_file = out / "seconds.json"
    fresh = not (folder / "metrics.json").is_file()
    start = time.perf_counter()
    run_ablation(config, {row.name: list(row.overrides)}, output_dir=out,
                 overrides=list(shared), epochs=epochs, max_iters=max_iters, seed=seed,
                 device=device, title=f"{row.name}, seed {seed}")
    if fresh:
        # resumed trainings record only the last part; the log's time_per_iter has the rest
        timing_file.write_text(json.dumps({"seconds": time.perf_counter() - start}) + "\n")
    entry = json.loads((folder / "metrics.json").read_text())
    entry["seconds"] = (json.loads(timing_file.read_text())["seconds"]
                        if timing_file.is_file() else None)
    entry["dir"] = str(folder)
    return entry


def _per_class(results_file: Path, coco_gt: Any) -> Dict[str, Dict[str, float]]:
    """AP / AP50 / AP75 of each class of one run, from its detections on the test split."""
    import warnings

    from libra_rcnn.engine.evaluate import coco_bbox_eval_per_class

    results = json.loads(results_file.read_text())
    with warnings.catch_warnings():  # a smoke run may detect nothing: zeros, as its metrics
        warnings.simplefilter("ignore")
        return coco_bbox_eval_per_class(coco_gt, results)


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


def _gain_cell(gain: Optional[dict], spread: str) -> str:
    if gain is None:
        return ""
    cell = f"{100 * gain['mean']:+.1f}"
    if len(gain["seeds"]) > 1:
        cell += f" ± {100 * gain[spread]:.1f}"
    return cell


_SPREAD_WORDS = {"half_range": "half the range", "std": "the sample standard deviation"}


def _reused_line(reused: Optional[dict]) -> str:
    if not reused:
        return ""
    figure = ", and Figure 3," if "libra_faster_rcnn" in reused["rows"] else ""
    return (f"  \nRows {', '.join(f'`{key}`' for key in reused['rows'])}{figure} read from "
            f"`{reused['file']}` (commit `{reused['git']['commit']}`, finished "
            f"{reused['time_utc']}), not trained again")


def _header_lines(report: dict) -> list[str]:
    settings, data = report["settings"], report["data"]
    seeds = settings["seeds"] + settings["more_seeds"]
    regime = {"pretrained": "fine-tuned from ImageNet-pretrained EfficientNet-Lite0",
              "scratch": "trained from scratch"}[settings.get("regime", "scratch")]
    return [
        f"# Accuracy on real photos: {report['dataset']['title']}, {regime}",
        "",
        f"Command: `{report['command']}`  ",
        f"Commit: `{report['git']['commit']}`"
        + (" (with uncommitted changes)" if report["git"]["dirty"] else "") + "  ",
        f"Finished: {report['time_utc']}; device {settings['device']}, recipe "
        f"{settings['recipe']}, torch threads: {settings['threads'] or 'default'}"
        + ("; **smoke run: the numbers mean nothing**" if settings["smoke"] else "")
        + _reused_line(report.get("reused")),
        "",
        f"COCO bbox metrics on `{report['dataset']['key']}/test` ({data['test_images']} images, "
        f"{data['test_boxes']} boxes), x100. Cells: mean ± {_SPREAD_WORDS[settings['spread']]} "
        f"over the seeds done (column `seeds`; of {seeds} requested), a single value where only "
        f"one is done; `-`: undefined (pycocotools' -1, no ground truth in that size range). "
        f"ΔAP, ΔAP75: the row's AP (AP75) minus its family baseline's, paired by seed.",
        "",
    ]


def _metrics_table(rows: Sequence[dict], spread: str) -> list[str]:
    lines = ["| Method | seeds | AP | AP50 | AP75 | APs | APm | APl | ΔAP | ΔAP75 |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for row in rows:
        n = len(row["per_seed"])
        if n == 0:
            lines.append(f"| {row['name']} | 0 | " + " | ".join(["not yet run"] * 6) + " | | |")
            continue
        cells = [format_cell(row["stats"][m], num_seeds=n, spread=spread) for m in METRICS]
        lines.append(f"| {row['name']} | {n} | " + " | ".join(cells)
                     + f" | {_gain_cell(row['delta_AP'], spread)}"
                     + f" | {_gain_cell(row.get('delta_AP75'), spread)} |")
    return lines


def _class_table(done: Sequence[dict], data: Mapping[str, Any], spread: str) -> list[str]:
    classes = data["classes"]
    lines = [
        "",
        f"Per-class AP (x100, mean ± {_SPREAD_WORDS[spread]}; test boxes: "
        + ", ".join(f"{c} {data['test_boxes_per_class'][c]}" for c in classes)
        + "); ΔAP per class against the family baseline, paired by seed:",
        "",
        "| Method | seeds | " + " | ".join(f"AP {c}" for c in classes) + " | "
        + " | ".join(f"ΔAP {c}" for c in classes) + " |",
        "|---|---|" + "---|" * (2 * len(classes)),
    ]
    for row in done:
        n = len(row["per_seed"])
        cells = [format_cell(row["stats_per_class"][c]["AP"], num_seeds=n, spread=spread)
                 for c in classes]
        gains = [_gain_cell((row["delta_AP_per_class"] or {}).get(c), spread) for c in classes]
        lines.append(f"| {row['name']} | {n} | " + " | ".join(cells + gains) + " |")
    return lines


def _gains_table(done: Sequence[dict], rows: Sequence[dict]) -> list[str]:
    """Each row's paired AP gains against its baseline and its partner, seed by seed."""
    lines = ["", "Paired AP gains (x100), seed by seed; the mean's 95 % confidence interval "
                 "by Student's t (n - 1 degrees of freedom):", "",
             "| Method | against | gain per seed | mean ± std | 95 % interval | every gain > 0 |",
             "|---|---|---|---|---|---|"]
    names = {row["key"]: row["name"] for row in rows}
    for row in done:
        for other_key, gain in ((row["baseline"], row["delta_AP"]),
                                (row.get("partner"), row.get("delta_AP_partner"))):
            if gain is None:
                continue
            per_seed = ", ".join(f"{100 * g:+.1f} (seed {s})"
                                 for s, g in zip(gain["seeds"], gain["gains"]))
            std = "" if gain["std"] is None else f" ± {100 * gain['std']:.1f}"
            interval = "" if gain.get("ci95") is None else \
                f"[{100 * gain['ci95'][0]:+.1f}, {100 * gain['ci95'][1]:+.1f}]"
            lines.append(f"| {row['name']} | {names[other_key]} | {per_seed} | "
                         f"{100 * gain['mean']:+.1f}{std} | {interval} | "
                         f"{'yes' if gain['all_positive'] else 'no'} |")
    return lines


def _conversion_lines(conversion: Mapping[str, Mapping[str, Any]]) -> list[str]:
    """One line per split whose conversion dropped, clipped or skipped anything."""
    lines = []
    for split, conv in conversion.items():
        degenerate = conv["dropped_degenerate_boxes"]
        if not (conv["dropped_empty_boxes"] or conv["clipped_boxes"] or conv["skipped_files"]
                or degenerate):
            continue
        listed = "; ".join(f"{d['image']} {d['category']} {d['bbox']}" for d in degenerate)
        lines.append(f"Conversion of {split}: {conv['dropped_empty_boxes']} empty box(es) "
                     f"dropped, {len(degenerate)} degenerate box(es) "
                     f"(at most 1 px wide or high) dropped"
                     + (f" ({listed})" if listed else "")
                     + f", {conv['clipped_boxes']} clipped to the image, "
                     f"{len(conv['skipped_files'])} file(s) skipped.")
    return lines + [""] if lines else []


def _histogram_lines(hist: Mapping[str, Any], dataset_key: str) -> list[str]:
    from libra_rcnn.analysis.iou_distribution import SERIES_LABELS

    shares = ", ".join(f"{SERIES_LABELS.get(name, name)} {100 * v:.0f}%"
                       for name, v in hist["share_above"].items())
    return [
        f"IoU of sampled negatives (Figure 3), seed-{hist['seed']} Libra Faster R-CNN on "
        f"`{dataset_key}/train` ({len(hist['image_ids'])} images, "
        f"{hist['num_sampled']['random']} negatives per selection, IoU-balanced bins "
        f"'{hist.get('binning', 'negatives')}'): share above IoU {hist['share_threshold']:g}: "
        f"{shares}. ![IoU histogram](iou_histogram.png) (`iou_histogram.csv`)",
        "",
    ]


def _markdown(report: dict) -> str:
    """``accuracy.md``: the metrics table, then (once a row has a seed) per-class AP and the
    paired gains, the data conversion's changes and Figure 3's shares."""
    spread = report["settings"]["spread"]
    rows = report["rows"]
    done = [row for row in rows if row["per_seed"]]
    lines = _header_lines(report) + _metrics_table(rows, spread)
    if done:
        lines += _class_table(done, report["data"], spread) + _gains_table(done, rows)
    lines += [""] + _conversion_lines(report["data"]["conversion"])
    if report.get("iou_histogram"):
        lines += _histogram_lines(report["iou_histogram"], report["dataset"]["key"])
    return "\n".join(lines)


class SeedProcessFailed(RuntimeError):
    """A per-seed training process of ``--jobs`` exited with an error (its log names why)."""


def seed_process_command(args: argparse.Namespace, seed: int, threads: int,
                         rows: Optional[Sequence[str]] = None) -> List[str]:
    """The command line of the process that trains ``rows`` (default: every requested row)
    for ``seed`` alone (``--jobs``): the same data, budget, recipe and overrides, ``threads``
    torch threads, and ``--train-only`` (no histogram, no table: the parent writes those once
    all seeds are done)."""
    command = [sys.executable, "-m", "benchmarks.accuracy", "--train-only",
               "--dataset", args.dataset, "--regime", args.regime, "--recipe", args.recipe,
               "--seeds", str(seed), "--more-seeds", "--threads", str(threads),
               "--data-root", str(Path(args.data_root).resolve()),
               "--output-dir", str(Path(args.output_dir).resolve()),
               "--device", args.device, "--rows", *(args.rows if rows is None else rows)]
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


def _train_seeds_in_processes(args: argparse.Namespace, plan: Mapping[int, Sequence[str]],
                              out_dir: Path) -> None:
    """Train each seed's rows of ``plan`` (seed -> row keys) in a process of its own, at most
    ``args.jobs`` at once, in ``plan`` order, each with ``--threads`` torch threads (default:
    the CPU count divided by the jobs). Each process's output goes to
    ``<output-dir>/seed_<s>.log``. On 2 cores, two 1-thread processes finish the table about
    twice as fast as one 2-thread process: the small detector's kernels do not keep two
    threads busy.

    Raises:
        AblationInterrupted: Ctrl-C (SIGINT); every running process is interrupted too and
            writes its ``latest.pth`` before this returns (rerun to resume).
        SeedProcessFailed: a process exited with an error.
    """
    from libra_rcnn.analysis import AblationInterrupted

    threads = args.threads or max(1, (os.cpu_count() or 1) // args.jobs)
    waiting = list(plan)
    running: Dict[int, tuple] = {}
    failed = []
    try:
        while waiting or running:
            while waiting and len(running) < args.jobs:
                seed = waiting.pop(0)
                log_path = out_dir / f"seed_{seed}.log"
                log = open(log_path, "w", encoding="utf-8")
                proc = subprocess.Popen(seed_process_command(args, seed, threads, plan[seed]),
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


def _split_paths(dataset: Dataset, data_root: Path, split: str) -> tuple[Path, Optional[str]]:
    """(folder to convert and to read the images from, VOC image set or None) of a split."""
    if dataset.image_sets:
        return data_root, split
    return data_root / split, None


def _check_data_root(dataset: Dataset, data_root: Path) -> None:
    from libra_rcnn.errors import UserInputError

    for split in dataset.splits:
        if dataset.image_sets:
            needed = [data_root / "Annotations", data_root / "ImageSets" / "Main" / f"{split}.txt"]
            what = "the VOC release layout (Annotations/, JPEGImages/, ImageSets/Main/)"
        else:
            needed = [data_root / split]
            what = f"the {dataset.key} set's train/ and test/ with VOC XML next to the images"
        for path in needed:
            if not path.exists():
                raise UserInputError(f"--data-root {data_root}: no "
                                     f"{path.relative_to(data_root)} (expected {what})")


def _class_stats(per_class: Mapping[int, Mapping[str, Mapping[str, float]]],
                 classes: Sequence[str]) -> Dict[str, dict]:
    from libra_rcnn.engine.evaluate import CLASS_METRIC_NAMES

    return {c: aggregate_seeds({s: v[c] for s, v in per_class.items()}, CLASS_METRIC_NAMES)
            for c in classes}


def _boxes_per_class(data: Mapping[str, Any]) -> Dict[str, int]:
    names = {c["id"]: c["name"] for c in data["categories"]}
    counts = {name: 0 for name in names.values()}
    for ann in data["annotations"]:
        counts[names[ann["category_id"]]] += 1
    return counts


def _class_names(data: Mapping[str, Any]) -> List[str]:
    return [c["name"] for c in sorted(data["categories"], key=lambda c: c["id"])]


@dataclasses.dataclass(frozen=True)
class _Splits:
    """The data set's train and test splits, converted to COCO once."""
    train_json: Path
    train_folder: Path
    train_data: dict
    test_json: Path
    test_folder: Path
    test_data: dict


def _convert_splits(dataset: Dataset, data_root: Path, out_dir: Path, smoke: bool) -> _Splits:
    prefix = "smoke" if smoke else dataset.key
    train_json = (out_dir / "data" / f"{prefix}_train.json").resolve()
    test_json = (out_dir / "data" / f"{prefix}_test.json").resolve()
    (train_folder, train_set), (test_folder, test_set) = (
        _split_paths(dataset, data_root.resolve(), split) for split in dataset.splits)
    train_data = convert_split(train_folder, train_json, class_names=dataset.class_names,
                               num_images=SMOKE_TRAIN_IMAGES if smoke else None,
                               image_set=train_set)
    test_data = convert_split(test_folder, test_json, class_names=_class_names(train_data),
                              num_images=SMOKE_TEST_IMAGES if smoke else None,
                              image_set=test_set)
    return _Splits(train_json, train_folder, train_data, test_json, test_folder, test_data)


@dataclasses.dataclass
class _Measured:
    """What the (row, seed) runs gave, by row key, then seed."""
    metrics: Dict[str, Dict[int, dict]]
    per_class: Dict[str, Dict[int, dict]]
    seconds: Dict[str, Dict[int, Optional[float]]]
    interrupted: Optional[Exception] = None


def _run_plan(rows: Sequence[Row], plan: Mapping[int, Sequence[str]],
              args: argparse.Namespace, *, dataset: Dataset, splits: _Splits, runs_dir: Path,
              shared: Sequence[str], epochs: Optional[int], max_iters: Optional[int]) -> _Measured:
    """Train (or read) every planned (row, seed), seed by seed: after the first seed the table
    is complete, with one value per cell. An interruption stops the loop and is returned with
    the pairs finished so far."""
    from libra_rcnn.analysis import AblationInterrupted
    from libra_rcnn.data import ground_truth_coco

    keys = [row.key for row in rows]
    measured = _Measured({k: {} for k in keys}, {k: {} for k in keys}, {k: {} for k in keys})
    test_gt = ground_truth_coco(json.loads(splits.test_json.read_text()))
    try:
        for seed, row_keys in plan.items():
            for row in (ROWS[key] for key in row_keys):
                logger.info("row %r, seed %d", row.key, seed)
                entry = _run_one(row, seed, config=dataset.config(row, args.regime),
                                 runs_dir=runs_dir, shared=shared, epochs=epochs,
                                 max_iters=max_iters, device=args.device)
                measured.metrics[row.key][seed] = entry["metrics"]
                measured.seconds[row.key][seed] = entry["seconds"]
                if not args.train_only:
                    measured.per_class[row.key][seed] = _per_class(
                        Path(entry["dir"]) / "val_results.json", test_gt)
    except AblationInterrupted as exc:
        measured.interrupted = exc
    return measured


def _row_entries(rows: Sequence[Row], measured: _Measured, class_names: Sequence[str], *,
                 dataset: Dataset, regime: str) -> List[dict]:
    """Each row's report entry: its per-seed values, their statistics, and its paired gains
    over its family baseline (AP, AP75, per class) and over its partner (AP)."""
    by_key = {}
    for row in rows:
        per_seed, per_class = measured.metrics[row.key], measured.per_class[row.key]
        by_key[row.key] = {
            "key": row.key, "name": row.name, "config": dataset.config(row, regime),
            "config_sha256": config_fingerprint(row, dataset.key, regime),
            "overrides": list(row.overrides), "baseline": row.baseline, "partner": row.partner,
            "per_seed": per_seed, "per_class": per_class, "seconds": measured.seconds[row.key],
            "stats": aggregate_seeds(per_seed) if per_seed else None,
            "stats_per_class": _class_stats(per_class, class_names) if per_class else None}
    for row in rows:
        entry = by_key[row.key]
        base = by_key.get(row.baseline) if row.baseline != row.key else None
        partner = by_key.get(row.partner) if row.partner else None
        entry["delta_AP"] = base and paired_gains(entry["per_seed"], base["per_seed"])
        entry["delta_AP75"] = base and paired_gains(entry["per_seed"], base["per_seed"], "AP75")
        entry["delta_AP_partner"] = partner and paired_gains(entry["per_seed"],
                                                             partner["per_seed"])
        entry["delta_AP_per_class"] = base and {
            c: paired_gains({s: v[c] for s, v in entry["per_class"].items()},
                            {s: v[c] for s, v in base["per_class"].items()})
            for c in class_names}
    return [by_key[row.key] for row in rows]


def _libra_histogram(seed: int, splits: _Splits, out_dir: Path, *, device: str) -> dict:
    """Figure 3 from the final checkpoint of Libra Faster R-CNN's run of ``seed``."""
    from libra_rcnn.analysis.ablation import variant_dir_name

    libra = ROWS["libra_faster_rcnn"]
    checkpoint = (out_dir / "runs" / libra.key / f"seed_{seed}" / variant_dir_name(libra.name)
                  / "latest.pth")
    hist = _iou_histogram(checkpoint, splits.train_json, splits.train_folder, out_dir,
                          num_images=len(splits.train_data["images"]), device=device)
    hist["seed"] = seed
    return hist


def _data_summary(data_root: Path, splits: _Splits) -> dict:
    train, test = splits.train_data, splits.test_data
    return {"root": str(data_root.resolve()), "classes": _class_names(train),
            "train_images": len(train["images"]), "train_boxes": len(train["annotations"]),
            "test_images": len(test["images"]), "test_boxes": len(test["annotations"]),
            "train_boxes_per_class": _boxes_per_class(train),
            "test_boxes_per_class": _boxes_per_class(test),
            "conversion": {"train": train["info"]["conversion"],
                           "test": test["info"]["conversion"]}}


#: The settings an earlier table need not share for its rows to join this one: the rows
#: themselves, and how the seeds were split between ``--seeds`` and ``--more-seeds`` (they are
#: compared as one list, ``all_seeds``). Every other setting must match, the data files'
#: location excepted.
_REUSE_IGNORED = ("rows", "seeds", "more_seeds")


@dataclasses.dataclass(frozen=True)
class Reused:
    """Rows of an earlier ``accuracy.json`` that join this table as they are, untrained."""
    file: Path
    report: dict  # the earlier report
    entries: List[dict]  # its row entries that this run does not train

    @property
    def row_keys(self) -> List[str]:
        return [entry["key"] for entry in self.entries]

    @property
    def histogram(self) -> Optional[dict]:
        return self.report.get("iou_histogram")

    def provenance(self) -> dict:
        return {"file": str(self.file.resolve()), "rows": self.row_keys,
                "command": self.report.get("command"), "git": self.report.get("git"),
                "time_utc": self.report.get("time_utc")}


def _comparable(settings: Mapping[str, Any]) -> dict:
    return dict(settings, all_seeds=sorted([*settings.get("seeds", ()),
                                            *settings.get("more_seeds", ())]),
                shared_overrides=[o for o in settings.get("shared_overrides", ())
                                  if not o.startswith("data.")])


def read_reused(path: Path, *, dataset: Dataset, regime: str, settings: Mapping[str, Any],
                rows: Sequence[Row]) -> Reused:
    """The rows of the earlier table ``path`` that ``rows`` leaves out, checked to be what
    they would be if trained now: same data set and settings, each row's config and overrides
    as defined today.

    Raises:
        UserInputError: ``path`` is unreadable, not a finished table, or made otherwise.
    """
    from libra_rcnn.errors import UserInputError

    try:
        report = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise UserInputError(f"--reuse {path}: cannot read it as JSON ({exc})") from None
    if not isinstance(report, dict) or not {"dataset", "settings", "rows"} <= set(report):
        raise UserInputError(f"--reuse {path}: not an accuracy.json (no dataset, settings "
                             f"and rows)")
    if report.get("interrupted"):
        raise UserInputError(f"--reuse {path}: an interrupted table; finish it first")
    if report["dataset"].get("key") != dataset.key:
        raise UserInputError(f"--reuse {path}: a table of {report['dataset'].get('key')!r}, "
                             f"not {dataset.key!r}")
    earlier, now = _comparable(report["settings"]), _comparable(settings)
    differ = [f"{key}: {earlier.get(key)!r} there, {value!r} here"
              for key, value in now.items()
              if key not in _REUSE_IGNORED and earlier.get(key) != value]
    if differ:
        raise UserInputError(f"--reuse {path}: made with other settings ({'; '.join(differ)})")
    needed = {"key", "config", "overrides", "per_seed", "per_class", "seconds"}
    broken = [entry for entry in report["rows"]
              if not isinstance(entry, dict) or not needed <= set(entry)]
    if broken:
        raise UserInputError(f"--reuse {path}: a row entry lacks some of {sorted(needed)}")
    asked = {row.key for row in rows}
    entries = [entry for entry in report["rows"] if entry["key"] not in asked]
    for entry in entries:
        row = ROWS.get(entry["key"])
        if "config_sha256" not in entry:
            raise UserInputError(f"--reuse {path}: row {entry['key']!r} has no config_sha256, "
                                 f"so its config values cannot be checked; train it with --rows")
        if (row is None or entry["overrides"] != list(row.overrides)
                or entry["config"] != dataset.config(row, regime)
                or entry["config_sha256"] != config_fingerprint(row, dataset.key, regime)):
            raise UserInputError(f"--reuse {path}: row {entry['key']!r} was made with another "
                                 f"config, other config values or other overrides than it has "
                                 f"now; train it with --rows")
    if not entries:
        raise UserInputError(f"--reuse {path}: --rows trains all of its rows; nothing to reuse")
    return Reused(path, report, entries)


def _add_reused(reused: Reused, measured: _Measured, table: Sequence[str]) -> List[Row]:
    """Add the reused rows' per-seed values to ``measured``; return every row, in table
    order."""
    for entry in reused.entries:
        key = entry["key"]
        measured.metrics[key] = {int(s): v for s, v in entry["per_seed"].items()}
        measured.per_class[key] = {int(s): v for s, v in entry["per_class"].items()}
        measured.seconds[key] = {int(s): v for s, v in entry["seconds"].items()}
    return [ROWS[key] for key in table if key in measured.metrics]


def _settings(args: argparse.Namespace, rows: Sequence[Row], faster: Any, *,
              dataset: Dataset, shared: Sequence[str], threads: Optional[int], epochs: int,
              max_iters: Optional[int]) -> dict:
    """The report's ``settings``: what every row of the table shares (``faster``: the
    resolved config of the Faster R-CNN row, else of the first row)."""
    return {"seeds": list(args.seeds), "more_seeds": list(args.more_seeds),
            "rows": [r.key for r in rows], "smoke": args.smoke, "device": args.device,
            "regime": args.regime, "recipe": args.recipe, "threads": threads,
            "epochs": epochs, "max_iters": max_iters, "shared_overrides": list(shared),
            "spread": dataset.spread, "convention": faster.model.convention,
            "min_size": faster.model.min_size, "max_size": faster.model.max_size,
            "backbone": faster.model.backbone, "norm": faster.model.norm,
            "batch_size": faster.train.batch_size}


def run_benchmark(args: argparse.Namespace) -> dict:
    """Run (or resume) every requested (row, seed), then write the table and the histogram.
    Returns the report written to ``accuracy.json``.

    Raises:
        UserInputError: ``args.data_root`` lacks the data set's splits, or ``args.reuse``
            is not a table this run can join; ConfigError for a bad row config (both before
            any training); AblationInterrupted after writing the table of the finished pairs
            when a training is interrupted (rerun to resume).
    """
    dataset = DATASETS[args.dataset]
    data_root = Path(args.data_root)
    _check_data_root(dataset, data_root)
    out_dir = Path(args.output_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    smoke = args.smoke
    splits = _convert_splits(dataset, data_root, out_dir, smoke)
    class_names = _class_names(splits.train_data)

    rows = [ROWS[key] for key in args.rows]
    plan = seed_plan(rows, args.seeds, args.more_seeds,
                     more_seed_rows=MORE_SEED_ROWS[args.regime])
    shared = _shared_overrides(splits.train_json, splits.train_folder, splits.test_json,
                               splits.test_folder, num_classes=len(class_names) + 1,
                               recipe=dataset.recipes[args.recipe], smoke=smoke,
                               user=args.overrides,
                               dataset=dataset.overrides.get(args.regime, ()))
    epochs = 1 if smoke else args.epochs
    max_iters = SMOKE_ITERS if smoke else args.max_iters
    # fail on a bad config before any training
    resolved = {row.key: row_config(row, shared, args.dataset, args.regime) for row in rows}
    faster = resolved.get("faster_rcnn") or next(iter(resolved.values()))
    # one thread count for training, evaluation and the histogram: --threads, else the
    # config file's train.num_threads (2)
    configured = row_config(rows[0], (), args.dataset, args.regime).train.num_threads
    cpu_threads = (args.threads or configured) if args.device == "cpu" else None

    settings = _settings(args, rows, faster, dataset=dataset, shared=shared,
                         threads=cpu_threads, epochs=epochs or faster.train.epochs,
                         max_iters=max_iters)
    reused = None if args.reuse is None else read_reused(
        Path(args.reuse), dataset=dataset, regime=args.regime, settings=settings, rows=rows)

    if args.jobs > 1 and len(plan) > 1:
        # the processes train; _run_plan then finds every pair finished and only reads it
        _train_seeds_in_processes(args, plan, out_dir)
    with _torch_threads(cpu_threads):
        measured = _run_plan(rows, plan, args, dataset=dataset, splits=splits,
                             runs_dir=out_dir / "runs", shared=shared, epochs=epochs,
                             max_iters=max_iters)
    interrupted = measured.interrupted
    if args.train_only:  # a --jobs process: the parent writes the histogram and the table
        if interrupted is not None:
            raise interrupted
        return {}

    hist = None
    first = next(iter(plan))
    if interrupted is None and first in measured.metrics.get("libra_faster_rcnn", {}):
        with _torch_threads(cpu_threads):
            hist = _libra_histogram(first, splits, out_dir, device=args.device)
    if reused is not None:
        rows = _add_reused(reused, measured, dataset.rows[args.regime])
        if "libra_faster_rcnn" in reused.row_keys:
            hist = reused.histogram

    report = {
        "command": " ".join([Path(sys.executable).name, "-m", "benchmarks.accuracy",
                             *sys.argv[1:]]) if args.command is None else args.command,
        "time_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "git": git_commit(),
        "environment": {"python": platform.python_version(), "cpu_count": os.cpu_count(),
                        "torch": _version("torch"), "torchvision": _version("torchvision")},
        "dataset": {"key": dataset.key, "title": dataset.title},
        "settings": settings,
        "reused": None if reused is None else reused.provenance(),
        "data": _data_summary(data_root, splits),
        "rows": _row_entries(rows, measured, class_names, dataset=dataset, regime=args.regime),
        "iou_histogram": hist,
        "interrupted": None if interrupted is None else str(interrupted),
    }
    written = relative_paths(report)
    (out_dir / "accuracy.json").write_text(json.dumps(written, indent=2) + "\n")
    (out_dir / "accuracy.md").write_text(_markdown(written))
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


def _default_output_dir(dataset: str, regime: str, recipe: str, smoke: bool) -> Path:
    name = f"accuracy_{dataset}_{regime}"
    name += "" if recipe == "cpu" else f"_{recipe}"
    return REPO_ROOT / "work_dirs" / (name + ("_smoke" if smoke else ""))


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.accuracy",
        description="Train on a data set's train split, evaluate on its test "
                    "split: Faster R-CNN + each Libra part, RetinaNet vs Libra RetinaNet; mean "
                    "± spread over seeds, paired gains, per-class AP.")
    parser.add_argument("--dataset", choices=tuple(DATASETS), default="fruit",
                        help="fruit (the default) or bccd (blood cells)")
    parser.add_argument("--regime", choices=REGIMES, default="pretrained",
                        help="pretrained (the default: ImageNet EfficientNet-Lite0, the configs "
                             "for your own photos on a CPU) or scratch (the data set's "
                             "from-scratch configs)")
    parser.add_argument("--data-root", default=None,
                        help="the data set's folder (default: ../shared/data/<dataset> from the "
                             "repository root)")
    parser.add_argument("--seeds", type=int, nargs="+", default=None,
                        help="training seeds of every row (default: 0 1; --smoke: 0)")
    parser.add_argument("--more-seeds", type=int, nargs="*", default=None,
                        help="more seeds for the rows of MORE_SEED_ROWS only (default: "
                             "pretrained 2-7; scratch: fruit none, bccd 2 3; --smoke: none)")
    parser.add_argument("--rows", nargs="+", choices=ROW_KEYS, default=None,
                        help="rows to run (default: all of the data set's)")
    parser.add_argument("--output-dir", default=None,
                        help="default: work_dirs/accuracy (fruit) or work_dirs/accuracy_bccd, "
                             "with _gpu for --recipe gpu and _smoke for --smoke")
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"),
                        help="training and evaluation device (default: cpu)")
    parser.add_argument("--recipe", choices=("cpu", "gpu"), default=None,
                        help="cpu: the config files' schedule; gpu (bccd only; the default "
                             "with --device cuda): longer, at the paper's input scale")
    parser.add_argument("--epochs", type=_positive, default=None,
                        help="training epochs of every row (default: the recipe's)")
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
    parser.add_argument("--reuse", metavar="ACCURACY_JSON", default=None,
                        help="an earlier accuracy.json of the same data set and settings: "
                             "its rows that --rows leaves out join the table as they are "
                             "(per-seed values, per-class AP, Figure 3), untrained; for adding "
                             "rows to a finished table")
    parser.add_argument("--train-only", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--quiet", action="store_true", help="log warnings only")
    args = parser.parse_args(argv)
    dataset = DATASETS[args.dataset]
    for override in args.overrides:
        key = override.split("=", 1)[0]
        if "=" not in override or not key:
            parser.error(f"--set {override!r}: expected KEY=VALUE")
        if key.startswith(("data.", "model.num_classes")):
            parser.error(f"--set {override!r}: the data and the class count are the "
                         f"benchmark's own (see --data-root)")
    if args.data_root is None:
        args.data_root = str(dataset.default_root)
    if args.seeds is None:
        args.seeds = [0] if args.smoke else list(dataset.seeds[args.regime])
    if args.more_seeds is None:
        args.more_seeds = [] if args.smoke else list(dataset.more_seeds[args.regime])
    every = args.seeds + args.more_seeds
    if len(set(every)) != len(every):
        parser.error(f"--seeds / --more-seeds: duplicates in {every}")
    table = dataset.rows[args.regime]
    if args.rows is None:
        args.rows = list(table)
    if len(set(args.rows)) != len(args.rows):
        parser.error(f"--rows: duplicates in {args.rows}")
    foreign = [key for key in args.rows if key not in table]
    if foreign:
        parser.error(f"--rows: {foreign} not in the {args.dataset} {args.regime} table "
                     f"({list(table)})")
    args.rows = [key for key in table if key in args.rows]  # table order
    if args.recipe is None:
        args.recipe = "gpu" if args.device == "cuda" and "gpu" in dataset.recipes else "cpu"
    if args.recipe not in dataset.recipes:
        parser.error(f"--recipe {args.recipe}: the {args.dataset} set has "
                     f"{sorted(dataset.recipes)}")
    if args.output_dir is None:
        args.output_dir = str(_default_output_dir(args.dataset, args.regime, args.recipe,
                                                  args.smoke))
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
    from libra_rcnn.errors import UserInputError

    try:
        report = run_benchmark(args)
    except AblationInterrupted as exc:
        print(f"interrupted: {exc}; rerun the same command to resume")
        return 128 + (exc.signal or 2)
    except SeedProcessFailed as exc:
        print(f"error: {exc}; finished runs are kept, rerun the same command to retry",
              file=sys.stderr)
        return 1
    except UserInputError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if args.train_only:
        return 0
    print(Path(args.output_dir, "accuracy.md").read_text())
    print(f"wrote {Path(args.output_dir) / 'accuracy.md'} and "
          f"{Path(args.output_dir) / 'accuracy.json'}")
    reused = report["reused"]["rows"] if report["reused"] else ()
    if report["iou_histogram"] and "libra_faster_rcnn" not in reused:
        for path in report["iou_histogram"]["files"].values():
            print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    logging.basicConfig(level=logging.WARNING if "--quiet" in sys.argv else logging.INFO,
                        format="%(asctime)s %(name)s %(levelname)s: %(message)s")
    sys.exit(main())
