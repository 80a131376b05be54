"""IoU distribution of sampled negatives (Libra R-CNN, Sec. 3.1, Figure 3).

The paper's motivating experiment: among the negative RoI candidates of an image (proposals with
IoU below the background threshold, 0.5), which IoUs do three selections have?

* **random**: ``N`` negatives drawn uniformly (Eq. 1), the baseline sampler;
* **IoU-balanced**: ``N`` negatives drawn with ``K`` IoU bins (Eq. 2), Libra's sampler;
* **hard negatives**: the ``N`` negatives the detector finds hardest, i.e. with the largest
  classification loss ``-log p_background`` under the model's box head.

The paper reports that more than 60 % of hard negatives have IoU above 0.05 while random sampling
gives only about 30 % there, and that IoU-balanced sampling brings the distribution close to the
hard negatives'. All three selections take the same number of negatives per image,
``min(N, M)`` out of the image's ``M`` candidates, so their histograms have the same total.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Optional

import torch
from torch import Tensor, nn

from libra_rcnn.checks import check_positive_int
from libra_rcnn.ops.iou_balanced_sampler import iou_balanced_negative_sample, random_choice

from ..data.coco import SkippedImage
from ..errors import UserInputError
from ._common import (
    PathLike,
    background_loss,
    roi_candidates,
    sampler_settings,
    save_figure,
    write_csv,
)

__all__ = [
    "SERIES",
    "SERIES_LABELS",
    "iou_histogram_counts",
    "iou_histograms",
    "plot_iou_histograms",
    "format_shares",
]

#: The three selections, in plotting order.
SERIES: tuple[str, ...] = ("random", "iou_balanced", "hard_negative")
SERIES_LABELS = {
    "random": "random sampling",
    "iou_balanced": "IoU-balanced sampling",
    "hard_negative": "hard negatives",
}
_SERIES_COLOURS = {"random": "#4c72b0", "iou_balanced": "#55a868", "hard_negative": "#dd8452"}


def iou_histogram_counts(ious: Tensor, *, bins: int, upper: float) -> Tensor:
    """Counts of ``ious`` in ``bins`` equal-width bins over ``[0, upper)``.

    Args:
        ious: ``FloatTensor[n]``, every value in ``[0, upper)`` (negatives' IoUs lie below the
            background threshold ``upper``).
        bins: number of bins, ``>= 1``; bin ``k`` is ``[k * w, (k + 1) * w)``, ``w = upper / bins``.
        upper: end of the range, ``> 0``.

    Returns:
        ``Int64Tensor[bins]`` summing to ``n``.
    """
    if isinstance(bins, bool) or not isinstance(bins, int) or bins < 1:
        raise ValueError(f"bins must be an int >= 1, got {bins!r}")
    if not upper > 0:
        raise ValueError(f"upper must be > 0, got {upper!r}")
    ious = ious.detach().reshape(-1).double().cpu()
    if ious.numel() and (float(ious.min()) < 0 or float(ious.max()) >= upper):
        raise ValueError(f"ious must lie in [0, {upper}), got values in "
                         f"[{float(ious.min())}, {float(ious.max())}]")
    # clamp: an IoU just below `upper` may round up to index `bins` in floating point
    index = (ious * (bins / upper)).floor().long().clamp_(0, bins - 1)
    return torch.bincount(index, minlength=bins)


def _hardest(neg_inds: Tensor, losses: Tensor, num: int) -> Tensor:
    """The ``min(num, M)`` entries of ``neg_inds`` with the largest ``losses``."""
    k = min(num, neg_inds.numel())
    return neg_inds[torch.topk(losses, k).indices]


def iou_histograms(
    model: nn.Module,
    dataset: Any,
    *,
    num_images: int,
    num_neg: Optional[int] = None,
    bins: int = 10,
    seed: int = 0,
    num_bins: Optional[int] = None,
    share_threshold: float = 0.05,
    out_dir: Optional[PathLike] = None,
) -> dict:
    """IoU histograms of random, IoU-balanced and hard-negative selections (Figure 3).

    For each of the first ``num_images`` readable images of ``dataset`` that have ground truth:
    proposals from the model (no gradients; the RPN's training proposal counts, ground truth
    added as proposals, as in training) are matched to the ground truth with the model's
    matcher; the negatives (IoU below its background threshold) are the candidates. From them
    ``min(num_neg, M)`` are chosen by each selection of :data:`SERIES`.

    Args:
        model: a two-stage detector (``transform``, ``backbone``, ``rpn``, ``roi_heads``).
        dataset: yields ``(image FloatTensor[3, H, W], target {"boxes", "labels"})``, or for an
            unreadable image ``None`` or a :class:`~libra_rcnn.data.SkippedImage` (skipped; the
            latter is also named in ``unreadable``).
        num_images: images to use (fewer if the dataset runs out), ``>= 1``.
        num_neg: negatives per image per selection; default the model's RoI sampler's
            ``num * (1 - pos_fraction)`` (512 x 0.75 = 384).
        bins: histogram bins over ``[0, background threshold)``.
        seed: seeds the ``torch.Generator`` of both samplers.
        num_bins: ``K`` of the IoU-balanced sampler (Eq. 2); default the model's (3).
        share_threshold: the IoU above which the reported share is counted (paper: 0.05).
        out_dir: when given, ``iou_histogram.png`` and ``iou_histogram.csv`` are written there.

    Returns:
        ``bin_edges`` (``bins + 1`` floats), ``counts`` (series -> ``bins`` ints),
        ``num_sampled`` (series -> total chosen; all equal), ``share_above`` (series -> share
        of chosen negatives with IoU ``> share_threshold``), ``share_threshold``,
        ``negatives_per_image`` (candidates ``M`` of each used image), ``image_ids``,
        ``num_neg``, ``num_bins``, ``binning`` (the model's sampler's bin layout, which the
        IoU-balanced selection uses), ``neg_iou_thresh``, ``skipped`` (``{"unreadable",
        "no_ground_truth"}`` counts), ``unreadable`` (``(file, reason)`` of the skipped
        unreadable images that were named) and ``files`` (paths written).
    """
    num_neg, num_bins, settings = _resolve_arguments(model, num_images=num_images, num_neg=num_neg,
                                                     num_bins=num_bins, bins=bins,
                                                     share_threshold=share_threshold)
    generator = torch.Generator().manual_seed(seed)

    def select(cand) -> dict[str, Tensor]:
        return _select_negatives(model, cand, num_neg=num_neg, num_bins=num_bins,
                                 settings=settings, generator=generator)

    collected = _collect_negative_ious(model, dataset, num_images=num_images, select=select)
    upper = float(collected["neg_iou_thresh"])
    result = {
        **_histograms(collected["chosen"], bins=bins, upper=upper,
                      share_threshold=share_threshold),
        "share_threshold": float(share_threshold),
        "negatives_per_image": collected["negatives_per_image"],
        "image_ids": collected["image_ids"],
        "num_neg": num_neg,
        "num_bins": num_bins,
        "binning": settings["binning"],
        "neg_iou_thresh": upper,
        "skipped": collected["skipped"],
        "unreadable": collected["unreadable"],
        "files": {},
    }
    if out_dir is not None:
        result["files"] = _write_files(result, Path(out_dir))
    return result


def _resolve_arguments(model: nn.Module, *, num_images: int, num_neg: Optional[int],
                       num_bins: Optional[int], bins: int, share_threshold: float
                       ) -> tuple[int, int, dict]:
    """``(num_neg, num_bins, the model's sampler settings)``, defaults taken from the model;
    ``ValueError`` naming the first bad argument."""
    check_positive_int(num_images, "num_images")
    settings = sampler_settings(model)
    num_neg = settings["num_neg"] if num_neg is None else num_neg
    check_positive_int(num_neg, "num_neg")
    num_bins = settings["num_bins"] if num_bins is None else num_bins
    check_positive_int(num_bins, "num_bins")
    check_positive_int(bins, "bins")
    if not 0.0 <= share_threshold < 1.0:
        raise ValueError(f"share_threshold must lie in [0, 1), got {share_threshold!r}")
    return num_neg, num_bins, settings


def _select_negatives(model: nn.Module, cand: Any, *, num_neg: int, num_bins: int,
                      settings: dict, generator: torch.Generator) -> dict[str, Tensor]:
    """The candidates' indices chosen by each selection of :data:`SERIES` (``min(num_neg, M)``
    each)."""
    neg, ious = cand.neg_inds, cand.max_overlaps
    return {
        "random": random_choice(neg, num_neg, generator),
        "iou_balanced": iou_balanced_negative_sample(
            neg, ious, num_neg, num_bins=num_bins, floor_thr=settings["floor_thr"],
            floor_fraction=settings["floor_fraction"], binning=settings["binning"],
            generator=generator),
        "hard_negative": _hardest(neg, background_loss(model, cand, neg), num_neg),
    }


def _collect_negative_ious(model: nn.Module, dataset: Any, *, num_images: int,
                           select: Callable[[Any], dict[str, Tensor]]) -> dict:
    """Walk ``dataset`` until ``num_images`` images with ground truth were used: per series the
    chosen negatives' IoUs (a list of tensors, one per image), the candidates per image, the
    image ids, the skipped-image counts and the named unreadable images."""
    chosen: dict[str, list[Tensor]] = {name: [] for name in SERIES}
    collected: dict[str, Any] = {"chosen": chosen, "negatives_per_image": [], "image_ids": [],
                                 "skipped": {"unreadable": 0, "no_ground_truth": 0},
                                 "unreadable": [], "neg_iou_thresh": None}
    for index in range(len(dataset)):
        if len(collected["image_ids"]) >= num_images:
            break
        sample = dataset[index]
        if sample is None or isinstance(sample, SkippedImage):
            collected["skipped"]["unreadable"] += 1
            if sample is not None:
                collected["unreadable"].append((sample.path, sample.reason))
            continue
        image, target = sample
        if target["boxes"].numel() == 0:
            collected["skipped"]["no_ground_truth"] += 1  # every proposal has IoU 0
            continue
        cand = roi_candidates(model, image, target)
        collected["neg_iou_thresh"] = cand.neg_iou_thresh
        for name, inds in select(cand).items():
            chosen[name].append(cand.max_overlaps[inds].float().cpu())
        collected["negatives_per_image"].append(int(cand.neg_inds.numel()))
        collected["image_ids"].append(int(target.get("image_id", index)))
    if not collected["image_ids"]:
        raise UserInputError(f"dataset: no usable image among {len(dataset)} (skipped: "
                             f"{collected['skipped']}); the analysis needs images with "
                             f"ground-truth boxes")
    return collected


def _histograms(chosen: dict[str, list[Tensor]], *, bins: int, upper: float,
                share_threshold: float) -> dict:
    """``bin_edges``, and per series ``counts``, ``num_sampled`` and ``share_above``."""
    counts, num_sampled, share_above = {}, {}, {}
    for name in SERIES:
        values = torch.cat(chosen[name])
        counts[name] = iou_histogram_counts(values, bins=bins, upper=upper).tolist()
        num_sampled[name] = int(values.numel())
        share_above[name] = (float((values > share_threshold).double().mean())
                             if values.numel() else 0.0)
    return {"bin_edges": [upper * k / bins for k in range(bins + 1)], "counts": counts,
            "num_sampled": num_sampled, "share_above": share_above}


def _write_files(result: dict, out_dir: Path) -> dict[str, str]:
    """``iou_histogram.csv`` (one row per bin, one column per series) and the figure."""
    edges, counts = result["bin_edges"], result["counts"]
    rows = [[f"{edges[k]:.4f}", f"{edges[k + 1]:.4f}", *(counts[s][k] for s in SERIES)]
            for k in range(len(edges) - 1)]
    csv_path = write_csv(out_dir / "iou_histogram.csv", ["iou_from", "iou_to", *SERIES], rows)
    return {"csv": str(csv_path),
            "png": str(plot_iou_histograms(result, out_dir / "iou_histogram.png"))}


def plot_iou_histograms(result: dict, out_png: PathLike) -> Path:
    """Grouped bars of the three selections' IoU distributions (share of each selection's
    samples per bin, in %), as Figure 3. ``result`` is :func:`iou_histograms`' return value."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    edges = result["bin_edges"]
    bins = len(edges) - 1
    width = edges[1] - edges[0]
    fig = Figure(figsize=(7.0, 4.0))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    bar_width = width / (len(SERIES) + 1)
    for offset, name in enumerate(SERIES):
        total = max(result["num_sampled"][name], 1)
        heights = [100.0 * c / total for c in result["counts"][name]]
        lefts = [edges[k] + (offset + 0.5) * bar_width for k in range(bins)]
        share = 100.0 * result["share_above"][name]
        ax.bar(lefts, heights, width=bar_width, align="edge", color=_SERIES_COLOURS[name],
               label=f"{SERIES_LABELS[name]} ({share:.0f}% > {result['share_threshold']:g})")
    ax.set_xlim(edges[0], edges[-1])
    ax.set_xlabel("IoU with the closest ground truth")
    ax.set_ylabel("share of selected negatives (%)")
    ax.set_title(f"IoU of negatives: {result['num_sampled']['random']} per selection, "
                 f"{len(result['image_ids'])} images")
    ax.legend(frameon=False)
    return save_figure(fig, out_png)


def format_shares(result: dict) -> str:
    """One line per selection: the share of its negatives above the IoU threshold."""
    lines = [f"share of selected negatives with IoU > {result['share_threshold']:g} "
             f"({result['num_sampled']['random']} per selection, "
             f"{len(result['image_ids'])} images):"]
    for name in SERIES:
        lines.append(f"  {SERIES_LABELS[name]:<22s} {100.0 * result['share_above'][name]:5.1f}%")
    return "\n".join(lines)
