"""COCO-style evaluation: inference loop, results conversion and pycocotools metrics.

Conventions
-----------
* Model outputs follow torchvision's eval-mode contract: one dict per image with ``"boxes"``
  ``FloatTensor[K, 4]`` (x1, y1, x2, y2 in original image pixels), ``"scores"`` ``FloatTensor[K]``
  and ``"labels"`` ``Int64Tensor[K]`` holding contiguous labels ``1..C``. RPN-only models return
  no ``"labels"``.
* COCO results are the list-of-dicts format of the COCO API:
  ``{"image_id": int, "category_id": int, "bbox": [x, y, w, h], "score": float}``; contiguous
  labels are mapped back to the (possibly non-contiguous) COCO category ids.

Metrics are the standard COCO bbox metrics reported in the paper (Sec. 4.1): AP averaged over
IoU thresholds 0.50:0.05:0.95, AP50, AP75, AP for small/medium/large objects, and average recall
(AR). Proposal quality is measured as class-agnostic AR at 100/300/1000 proposals per image.

Unreadable images. A loader may yield ``(images, targets, skipped)`` batches, ``skipped`` being
the :class:`~libra_rcnn.data.SkippedImage` records of images that could not be read
(:func:`~libra_rcnn.data.collate_with_skipped`). They are not run and not scored: scoring is
restricted to the images that were run, and :func:`evaluate` returns the skipped ones so the
caller can name them. A batch left without any image is passed over.
"""

from __future__ import annotations

import contextlib
import io
import json
import math
import os
import warnings
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
from torch import nn

from libra_rcnn.errors import UserInputError
from libra_rcnn.io_utils import atomic_write
from libra_rcnn.models.mode import eval_mode

__all__ = [
    "BBOX_METRIC_NAMES",
    "CLASS_METRIC_NAMES",
    "PAPER_METRIC_NAMES",
    "Evaluation",
    "InferenceOutput",
    "detections_to_coco_results",
    "merge_rank_results",
    "run_inference",
    "coco_bbox_eval",
    "coco_bbox_eval_per_class",
    "class_ap_from_precision",
    "describe_skipped",
    "proposal_recall_eval",
    "evaluate",
    "evaluate_results_file",
    "write_results_file",
    "format_metrics_table",
]

#: Names of the twelve numbers printed by ``COCOeval.summarize()`` for bbox evaluation, in order.
BBOX_METRIC_NAMES: tuple[str, ...] = (
    "AP", "AP50", "AP75", "APs", "APm", "APl",
    "AR1", "AR10", "AR100", "ARs", "ARm", "ARl",
)

#: Columns of the paper's result tables (Tables 1-6).
PAPER_METRIC_NAMES: tuple[str, ...] = ("AP", "AP50", "AP75", "APs", "APm", "APl")

#: Category id written for class-agnostic outputs (RPN proposals); ignored by ``useCats=0``.
PROPOSAL_CATEGORY_ID = 1


# --------------------------------------------------------------------------------------------
# Conversion
# --------------------------------------------------------------------------------------------
def _to_int(value: Any) -> int:
    if isinstance(value, torch.Tensor):
        return int(value.item())
    return int(value)


def detections_to_coco_results(
    outputs: Sequence[Mapping[str, torch.Tensor]],
    image_ids: Sequence[int],
    label_to_cat_id: Mapping[int, int] | None,
) -> list[dict]:
    """Convert per-image detections to the COCO results format.

    Args:
        outputs: one dict per image with ``"boxes"`` ``[K, 4]`` xyxy, ``"scores"`` ``[K]`` and
            optionally ``"labels"`` ``[K]`` (contiguous ``1..C``). Without ``"labels"`` (RPN
            proposals) every result gets ``category_id = PROPOSAL_CATEGORY_ID``.
        image_ids: COCO image id of each output, same length as ``outputs``.
        label_to_cat_id: contiguous label -> COCO category id. ``None`` writes labels unchanged.

    Returns:
        list of ``{"image_id", "category_id", "bbox": [x, y, w, h], "score"}`` dicts with plain
        Python numbers (json-serialisable).
    """
    if len(outputs) != len(image_ids):
        raise ValueError(
            f"outputs and image_ids must have the same length, got {len(outputs)} and {len(image_ids)}"
        )
    results: list[dict] = []
    for output, image_id in zip(outputs, image_ids):
        for key in ("boxes", "scores"):
            if key not in output:
                raise ValueError(f"outputs: each output needs a {key!r} entry, got keys {sorted(output)}")
        boxes = torch.as_tensor(output["boxes"]).detach().to("cpu", torch.float64).reshape(-1, 4)
        scores = torch.as_tensor(output["scores"]).detach().to("cpu", torch.float64).reshape(-1)
        if boxes.shape[0] != scores.shape[0]:
            raise ValueError(
                f"outputs: boxes ({boxes.shape[0]}) and scores ({scores.shape[0]}) disagree in length"
            )
        if "labels" in output:
            labels = torch.as_tensor(output["labels"]).detach().to("cpu").reshape(-1).tolist()
            if len(labels) != boxes.shape[0]:
                raise ValueError(
                    f"outputs: labels ({len(labels)}) and boxes ({boxes.shape[0]}) disagree in length"
                )
        else:
            labels = None
        xywh = boxes.clone()
        xywh[:, 2:] = boxes[:, 2:] - boxes[:, :2]
        image_id = _to_int(image_id)
        for k, (box, score) in enumerate(zip(xywh.tolist(), scores.tolist())):
            if labels is None:
                category_id = PROPOSAL_CATEGORY_ID
            elif label_to_cat_id is None:
                category_id = int(labels[k])
            else:
                label = int(labels[k])
                if label not in label_to_cat_id:
                    raise ValueError(
                        f"label_to_cat_id has no entry for predicted label {label} "
                        f"(known labels: {sorted(label_to_cat_id)})"
                    )
                category_id = int(label_to_cat_id[label])
            results.append(
                {"image_id": image_id, "category_id": category_id, "bbox": box, "score": float(score)}
            )
    return results


# --------------------------------------------------------------------------------------------
# Inference
# --------------------------------------------------------------------------------------------
def _find_dataset_attr(data_loader: Any, name: str) -> Any:
    """Look up ``name`` on the loader's dataset, unwrapping ``torch.utils.data.Subset`` layers."""
    dataset = getattr(data_loader, "dataset", None)
    while dataset is not None:
        if hasattr(dataset, name):
            return getattr(dataset, name)
        dataset = getattr(dataset, "dataset", None)
    return None


def _dist_info() -> tuple[bool, int]:
    """(is distributed initialised, rank)."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return True, torch.distributed.get_rank()
    return False, 0


class InferenceOutput(NamedTuple):
    """What :func:`run_inference` collected."""

    results: list[dict]  # COCO results of the images run
    image_ids: list[int]  # the images run, unique, in first-seen order
    skipped: list[Any]  # SkippedImage records of images that could not be read, unique by id


def merge_rank_results(per_rank: Sequence[Sequence[Any]]) -> InferenceOutput:
    """Merge ``(image_ids, results[, skipped])`` tuples gathered from several ranks.

    ``DistributedSampler`` pads the last batch by repeating images, so an image id may come from
    more than one rank; only the first rank's detections (or skip record) for it are kept.
    """
    seen: set[int] = set()
    merged_ids: list[int] = []
    merged_results: list[dict] = []
    merged_skipped: dict[int, Any] = {}
    for image_ids, results, *skipped in per_rank:
        fresh = [i for i in dict.fromkeys(int(i) for i in image_ids) if i not in seen]
        fresh_set = set(fresh)
        merged_ids.extend(fresh)
        merged_results.extend(r for r in results if int(r["image_id"]) in fresh_set)
        seen.update(fresh_set)
        for record in (skipped[0] if skipped else ()):
            merged_skipped.setdefault(int(record.image_id), record)
    return InferenceOutput(merged_results, merged_ids, list(merged_skipped.values()))


def run_inference(
    model: nn.Module,
    data_loader: Iterable,
    *,
    device: str | torch.device = "cpu",
    amp: bool = False,
    progress: bool = True,
    label_to_cat_id: Mapping[int, int] | None = None,
    proposals_key: str = "proposals",
) -> InferenceOutput:
    """Run ``model`` over ``data_loader`` and collect COCO-format results.

    Args:
        model: torchvision-style detector; put in eval mode for the loop, its previous mode is
            restored afterwards.
        data_loader: yields ``(images, targets)`` or ``(images, targets, skipped)``: a sequence
            of ``FloatTensor[3, H, W]``, a sequence of target dicts holding ``"image_id"`` and
            the batch's :class:`~libra_rcnn.data.SkippedImage` records. A batch without images
            is passed over. When a target holds ``proposals_key`` (``Tensor[P, 4]`` xyxy, Fast
            R-CNN), the proposals of the batch are passed as ``model(images, proposals=[...])``.
        device: where images (and proposals) are moved before the forward pass.
        amp: run the forward pass under ``torch.autocast`` for ``device``'s type.
        progress: show a tqdm bar (rank 0 only).
        label_to_cat_id: contiguous label -> COCO category id; defaults to the dataset's
            ``label_to_cat_id`` attribute (``Subset`` wrappers are unwrapped); ``None`` if neither.
        proposals_key: target key holding precomputed proposals.

    Returns:
        :class:`InferenceOutput` ``(results, image_ids, skipped)``. Under ``torch.distributed``
        every rank's outputs are gathered with ``all_gather_object`` (once, after the loop, so
        ranks may pass over different numbers of empty batches), and each rank returns the
        full, de-duplicated set.
    """
    from tqdm.auto import tqdm

    device = torch.device(device)
    if label_to_cat_id is None:
        label_to_cat_id = _find_dataset_attr(data_loader, "label_to_cat_id")
    distributed, rank = _dist_info()

    results: list[dict] = []
    image_ids: list[int] = []
    skipped: list[Any] = []
    with eval_mode(model):
        with torch.inference_mode():
            for images, targets, *batch_skipped in tqdm(
                data_loader, desc="inference", disable=not progress or rank != 0, leave=False
            ):
                skipped.extend(batch_skipped[0] if batch_skipped else ())
                if len(images) == 0:
                    continue
                images = [image.to(device, non_blocking=True) for image in images]
                batch_ids = [_to_int(t["image_id"]) for t in targets]
                kwargs = {}
                if targets and all(proposals_key in t for t in targets):
                    kwargs["proposals"] = [t[proposals_key].to(device) for t in targets]
                with torch.autocast(device_type=device.type, enabled=amp):
                    outputs = model(images, **kwargs)
                outputs = [
                    {k: v.detach().to("cpu", torch.float32 if v.is_floating_point() else v.dtype)
                     for k, v in out.items()}
                    for out in outputs
                ]
                results.extend(detections_to_coco_results(outputs, batch_ids, label_to_cat_id))
                image_ids.extend(batch_ids)

    if distributed:
        gathered: list[Any] = [None] * torch.distributed.get_world_size()
        torch.distributed.all_gather_object(gathered, (image_ids, results, skipped))
        return merge_rank_results(gathered)
    return merge_rank_results([(image_ids, results, skipped)])


# --------------------------------------------------------------------------------------------
# Metrics
# --------------------------------------------------------------------------------------------
def _quiet(verbose: bool):
    """pycocotools prints progress and the summary table; silence it unless asked for."""
    return contextlib.nullcontext() if verbose else contextlib.redirect_stdout(io.StringIO())


def _check_results_image_ids(coco_gt: Any, results: Sequence[Mapping], *, source: str) -> None:
    known = set(coco_gt.getImgIds())
    unknown = sorted({int(r["image_id"]) for r in results} - known)
    if unknown:
        raise UserInputError(
            f"{source}: {len(unknown)} image id(s) are not in the ground truth, e.g. {unknown[:5]}"
        )


def _load_results(coco_gt: Any, results: Sequence[Mapping], *, verbose: bool) -> Any:
    _check_results_image_ids(coco_gt, results, source="results")
    # loadRes adds keys (area, id, segmentation) in place; keep the caller's dicts intact.
    copies = [dict(r) for r in results]
    with _quiet(verbose):
        return coco_gt.loadRes(copies)


def coco_bbox_eval(
    coco_gt: Any,
    results: Sequence[Mapping],
    *,
    image_ids: Iterable[int] | None = None,
    verbose: bool = False,
) -> dict[str, float]:
    """COCO bbox metrics of ``results`` against ``coco_gt`` with pycocotools' ``COCOeval``.

    Args:
        coco_gt: ``pycocotools.coco.COCO`` ground truth.
        results: COCO results (``image_id``, ``category_id``, ``bbox`` xywh, ``score``).
        image_ids: restrict evaluation to these images (e.g. the images actually run); default all
            ground-truth images.
        verbose: let pycocotools print its progress and summary table.

    Returns:
        ``{name: value}`` for the twelve :data:`BBOX_METRIC_NAMES` in ``[0, 1]``; pycocotools'
        ``-1`` (no ground truth in that area range) is kept as ``-1.0``. Empty ``results`` give
        all zeros and a warning.
    """
    if len(results) == 0:
        warnings.warn("coco_bbox_eval: no detections to evaluate; all metrics are 0", stacklevel=2)
        return {name: 0.0 for name in BBOX_METRIC_NAMES}
    coco_eval = _accumulated_bbox_eval(coco_gt, results, image_ids=image_ids, verbose=verbose)
    with _quiet(verbose):
        coco_eval.summarize()
    return {name: float(value) for name, value in zip(BBOX_METRIC_NAMES, coco_eval.stats)}


def _accumulated_bbox_eval(coco_gt: Any, results: Sequence[Mapping], *,
                           image_ids: Iterable[int] | None, verbose: bool) -> Any:
    """pycocotools' ``COCOeval`` of ``results`` after ``evaluate()`` and ``accumulate()``."""
    from pycocotools.cocoeval import COCOeval

    coco_dt = _load_results(coco_gt, results, verbose=verbose)
    coco_eval = COCOeval(coco_gt, coco_dt, iouType="bbox")
    if image_ids is not None:
        coco_eval.params.imgIds = sorted({int(i) for i in image_ids})
    with _quiet(verbose):
        coco_eval.evaluate()
        coco_eval.accumulate()
    return coco_eval


#: Per-class metrics of :func:`coco_bbox_eval_per_class`.
CLASS_METRIC_NAMES: tuple[str, ...] = ("AP", "AP50", "AP75")


def class_ap_from_precision(precision: np.ndarray, iou_thrs: Sequence[float]) -> np.ndarray:
    """AP, AP50 and AP75 of each category from ``COCOeval.eval["precision"]``.

    The same averages as ``COCOeval.summarize()``'s first three numbers, taken per category
    instead of over all of them: all object sizes (area index 0), the largest ``maxDets`` (last
    index), precision averaged over the recall thresholds and, for AP, over ``iou_thrs``.

    Args:
        precision: ``float[T, R, K, A, M]`` (IoU thresholds, recall thresholds, categories,
            area ranges, max detections); ``-1`` where a category has no ground truth.
        iou_thrs: the ``T`` IoU thresholds (``COCOeval.params.iouThrs``); must hold 0.5 and 0.75.

    Returns:
        ``float[K, 3]``: AP, AP50, AP75 per category, ``-1`` for a category without ground truth
        (pycocotools' convention).
    """
    precision = np.asarray(precision, dtype=np.float64)
    if precision.ndim != 5:
        raise ValueError(f"precision must have 5 dimensions [T, R, K, A, M], got shape "
                         f"{precision.shape}")
    thrs = np.asarray(iou_thrs, dtype=np.float64)
    if thrs.shape != (precision.shape[0],):
        raise ValueError(f"iou_thrs has {thrs.size} values for {precision.shape[0]} IoU "
                         f"thresholds in precision")
    rows = {"AP": slice(None)}
    for name, thr in (("AP50", 0.5), ("AP75", 0.75)):
        match = np.flatnonzero(np.isclose(thrs, thr))
        if match.size != 1:
            raise ValueError(f"iou_thrs must hold {thr} exactly once for {name}, got {thrs}")
        rows[name] = slice(int(match[0]), int(match[0]) + 1)
    out = np.full((precision.shape[2], len(CLASS_METRIC_NAMES)), -1.0)
    for k in range(precision.shape[2]):
        for j, name in enumerate(CLASS_METRIC_NAMES):
            out[k, j] = _mean_valid(precision[rows[name], :, k, 0, -1])
    return out


def coco_bbox_eval_per_class(
    coco_gt: Any,
    results: Sequence[Mapping],
    *,
    image_ids: Iterable[int] | None = None,
    verbose: bool = False,
) -> dict[str, dict[str, float]]:
    """AP, AP50 and AP75 of each category (:func:`class_ap_from_precision`), keyed by the
    category's name in ``coco_gt``, in category-id order.

    Arguments as for :func:`coco_bbox_eval`. A category without ground truth among the
    evaluated images gets ``-1.0``; empty ``results`` give zeros (with a warning) for the
    others.
    """
    categories = sorted(coco_gt.loadCats(coco_gt.getCatIds()), key=lambda c: c["id"])
    if len(results) == 0:
        warnings.warn("coco_bbox_eval_per_class: no detections to evaluate; all metrics are 0",
                      stacklevel=2)
        return {c["name"]: dict.fromkeys(CLASS_METRIC_NAMES, 0.0) for c in categories}
    coco_eval = _accumulated_bbox_eval(coco_gt, results, image_ids=image_ids, verbose=verbose)
    # eval["precision"]'s category axis follows params.catIds (sorted ids)
    names = {c["id"]: c["name"] for c in categories}
    values = class_ap_from_precision(coco_eval.eval["precision"], coco_eval.params.iouThrs)
    return {names[cat_id]: {name: float(v) for name, v in zip(CLASS_METRIC_NAMES, row)}
            for cat_id, row in zip(coco_eval.params.catIds, values)}


def _mean_valid(values: np.ndarray) -> float:
    valid = values[values > -1]
    return float(valid.mean()) if valid.size else -1.0


def proposal_recall_eval(
    coco_gt: Any,
    proposals_results: Sequence[Mapping],
    *,
    max_dets: Sequence[int] = (100, 300, 1000),
    image_ids: Iterable[int] | None = None,
    verbose: bool = False,
) -> dict[str, float]:
    """Class-agnostic average recall of region proposals (``AR@N`` of the paper, Sec. 4.1).

    Runs ``COCOeval`` with ``params.useCats = 0`` and ``params.maxDets = max_dets``, the protocol
    mmdetection uses for proposal AR: recall is averaged over IoU thresholds 0.50:0.05:0.95 (and
    over ground-truth boxes of all sizes, crowd boxes ignored) keeping the top ``N`` proposals per
    image by score.

    Returns:
        ``{"AR@N": value for N in max_dets}`` plus ``"ARs@M"``, ``"ARm@M"``, ``"ARl@M"`` at the
        largest ``M = max(max_dets)``. Empty ``proposals_results`` give zeros and a warning.
    """
    from pycocotools.cocoeval import COCOeval

    max_dets = [int(m) for m in max_dets]
    if not max_dets or any(m <= 0 for m in max_dets):
        raise ValueError(f"max_dets must be a non-empty sequence of positive ints, got {max_dets}")
    max_dets = sorted(set(max_dets))
    largest = max_dets[-1]
    names = [f"AR@{m}" for m in max_dets] + [f"AR{s}@{largest}" for s in ("s", "m", "l")]
    if len(proposals_results) == 0:
        warnings.warn("proposal_recall_eval: no proposals to evaluate; all metrics are 0", stacklevel=2)
        return {name: 0.0 for name in names}

    coco_dt = _load_results(coco_gt, proposals_results, verbose=verbose)
    coco_eval = COCOeval(coco_gt, coco_dt, iouType="bbox")
    coco_eval.params.useCats = 0
    coco_eval.params.maxDets = max_dets
    if image_ids is not None:
        coco_eval.params.imgIds = sorted({int(i) for i in image_ids})
    with _quiet(verbose):
        coco_eval.evaluate()
        coco_eval.accumulate()
    # recall: [T iou thresholds, K categories (1 with useCats=0), A area ranges, M maxDets];
    # area ranges are all, small, medium, large in pycocotools' default order.
    recall = coco_eval.eval["recall"]
    metrics = {f"AR@{m}": _mean_valid(recall[:, :, 0, j]) for j, m in enumerate(max_dets)}
    for area_index, size in ((1, "s"), (2, "m"), (3, "l")):
        metrics[f"AR{size}@{largest}"] = _mean_valid(recall[:, :, area_index, -1])
    return metrics


# --------------------------------------------------------------------------------------------
# Results files
# --------------------------------------------------------------------------------------------
def write_results_file(results: Sequence[Mapping], path: str | os.PathLike) -> Path:
    """Write COCO results json atomically (:func:`libra_rcnn.io_utils.atomic_write`)."""
    return atomic_write(path, lambda f: json.dump(list(results), f), binary=False)


def _validate_results_list(results: Any, *, source: str) -> None:
    if not isinstance(results, list):
        raise UserInputError(
            f"{source}: expected a JSON list of COCO results, got a JSON {type(results).__name__}"
        )
    for index, entry in enumerate(results):
        if not isinstance(entry, dict):
            raise UserInputError(f"{source}: entry {index} is a {type(entry).__name__}, expected an object")
        missing = [k for k in ("image_id", "category_id", "bbox", "score") if k not in entry]
        if missing:
            raise UserInputError(f"{source}: entry {index} lacks COCO result key(s) {missing}")
        bbox = entry["bbox"]
        if (
            not isinstance(bbox, list)
            or len(bbox) != 4
            or not all(isinstance(v, (int, float)) and math.isfinite(v) for v in bbox)
        ):
            raise UserInputError(f"{source}: entry {index} has bbox {bbox!r}; expected 4 finite numbers [x, y, w, h]")
        if not isinstance(entry["score"], (int, float)):
            raise UserInputError(f"{source}: entry {index} has non-numeric score {entry['score']!r}")


def evaluate_results_file(
    ann_file: str | os.PathLike,
    results_file: str | os.PathLike,
    *,
    proposals: bool = False,
    verbose: bool = False,
) -> dict[str, float]:
    """Evaluate an existing COCO results json against a COCO annotation file.

    Args:
        ann_file: COCO ground-truth annotation json.
        results_file: COCO results json (a list of ``image_id``/``category_id``/``bbox``/``score``).
        proposals: compute proposal AR (:func:`proposal_recall_eval`) instead of bbox AP.

    The ground truth is ``ann_file`` as it is (:func:`~libra_rcnn.data.ground_truth_coco`), as
    for :func:`evaluate`.

    Raises:
        UserInputError: naming the file when it is missing, not valid json, not a list of COCO
            results, or refers to images absent from the ground truth.
    """
    from libra_rcnn.data import ground_truth_coco, load_coco_json

    results_file = Path(results_file)
    if not results_file.is_file():
        raise UserInputError(f"{results_file}: no such results file")
    try:
        with open(results_file) as f:
            results = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise UserInputError(f"{results_file}: not valid JSON: {err}") from None
    _validate_results_list(results, source=str(results_file))
    coco_gt = ground_truth_coco(load_coco_json(ann_file))
    _check_results_image_ids(coco_gt, results, source=str(results_file))
    if proposals:
        return proposal_recall_eval(coco_gt, results, verbose=verbose)
    return coco_bbox_eval(coco_gt, results, verbose=verbose)


# --------------------------------------------------------------------------------------------
# Full evaluation
# --------------------------------------------------------------------------------------------
@dataclass
class Evaluation:
    """What :func:`evaluate` measured and on which images."""

    #: metric name -> value (see :func:`coco_bbox_eval` / :func:`proposal_recall_eval`); empty
    #: on ranks other than 0, and when no image could be run
    metrics: dict[str, float] = field(default_factory=dict)
    #: the images run and scored
    image_ids: list[int] = field(default_factory=list)
    #: :class:`~libra_rcnn.data.SkippedImage` records of the images that could not be read
    #: (not scored)
    skipped: list[Any] = field(default_factory=list)


def evaluate(
    model: nn.Module,
    data_loader: Iterable,
    *,
    device: str | torch.device = "cpu",
    results_file: str | os.PathLike | None = None,
    proposals: bool = False,
    amp: bool = False,
    progress: bool = True,
    verbose: bool = False,
    max_dets: Sequence[int] = (100, 300, 1000),
) -> Evaluation:
    """Run inference over ``data_loader`` and compute COCO metrics.

    The ground truth is the dataset's ``coco`` attribute (``Subset`` wrappers are unwrapped; a
    :class:`~libra_rcnn.data.CocoDetection` holds its annotation file as it is there). Scoring
    is restricted to the images that were actually run: images the loader reports as skipped
    (unreadable) are left out of it and listed in the returned :class:`Evaluation`.

    Args:
        proposals: the model is an RPN; report class-agnostic ``AR@N`` for ``N`` in ``max_dets``
            instead of bbox AP.
        results_file: when given, the COCO results json is written there (atomically) by rank 0.

    Returns:
        an :class:`Evaluation`; under ``torch.distributed`` its ``metrics`` are empty on ranks
        other than 0 (the image lists are complete on every rank).
    """
    coco_gt = _find_dataset_attr(data_loader, "coco")
    if coco_gt is None:
        raise ValueError("data_loader: its dataset has no 'coco' attribute holding the COCO ground truth")
    results, image_ids, skipped = run_inference(model, data_loader, device=device, amp=amp,
                                                progress=progress)
    evaluation = Evaluation(image_ids=image_ids, skipped=skipped)
    if _dist_info()[1] != 0:
        return evaluation
    if results_file is not None:
        write_results_file(results, results_file)
    if not image_ids:
        return evaluation
    if proposals:
        evaluation.metrics = proposal_recall_eval(
            coco_gt, results, max_dets=max_dets, image_ids=image_ids, verbose=verbose
        )
    else:
        evaluation.metrics = coco_bbox_eval(coco_gt, results, image_ids=image_ids, verbose=verbose)
    return evaluation


def describe_skipped(skipped: Sequence[Any], *, limit: int = 20) -> list[str]:
    """``"<file>: <reason>"`` for each :class:`~libra_rcnn.data.SkippedImage` (the first
    ``limit``, then how many more)."""
    lines = [f"{s.path}: {s.reason}" for s in skipped[:limit]]
    if len(skipped) > limit:
        lines.append(f"... and {len(skipped) - limit} more")
    return lines


def format_metrics_table(
    metrics: Mapping[str, float],
    *,
    keys: Sequence[str] = PAPER_METRIC_NAMES,
    name: str | None = None,
    header: bool = True,
) -> str:
    """Markdown table in the paper's layout: values x100 with one decimal.

    Args:
        metrics: e.g. the output of :func:`coco_bbox_eval`.
        keys: columns, default ``AP AP50 AP75 APs APm APl``.
        name: optional first column (method / setting name).
        header: include the header and separator lines; ``False`` gives only the row.

    Negative values (pycocotools' "no ground truth in this range") print as ``-``.
    """
    missing = [k for k in keys if k not in metrics]
    if missing:
        raise ValueError(f"metrics lacks key(s) {missing}; has {sorted(metrics)}")
    columns = (["Method"] if name is not None else []) + list(keys)
    cells = ([name] if name is not None else []) + [
        f"{100.0 * metrics[k]:.1f}" if metrics[k] >= 0 else "-" for k in keys
    ]
    lines = []
    if header:
        lines.append("| " + " | ".join(columns) + " |")
        lines.append("|" + "|".join("---" for _ in columns) + "|")
    lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)
