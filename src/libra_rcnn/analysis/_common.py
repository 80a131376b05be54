"""Shared plumbing of the analysis commands: RoI candidates of one image, CSV output, CLI inputs.

Coordinates. A detector's ``transform`` resizes (and normalises) an image before the backbone;
proposals, ground truth and features then live in the *transformed* image's pixel frame
(``image_size`` below). Functions that draw boxes map them back to the original image with
torchvision's ``resize_boxes``.
"""

from __future__ import annotations

import csv
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence, Union

import torch
from torch import Tensor, nn

from ..errors import UserInputError
from ..models.mode import eval_mode, module_mode

PathLike = Union[str, os.PathLike]

#: Background IoU threshold of the RoI matcher when the model does not say (torchvision/paper).
DEFAULT_NEG_IOU_THRESH = 0.5


def model_device(model: nn.Module) -> torch.device:
    """Device of the model's first parameter (CPU for a parameterless module)."""
    for parameter in model.parameters():
        return parameter.device
    return torch.device("cpu")


def check_two_stage(model: nn.Module, what: str) -> None:
    """``ValueError`` unless ``model`` has the parts of a two-stage detector ``what`` needs."""
    missing = [name for name in ("transform", "backbone", "roi_heads") if not hasattr(model, name)]
    if missing:
        raise UserInputError(f"model: {what} needs a two-stage detector (transform, backbone, RPN or "
                         f"precomputed proposals, roi_heads); {type(model).__name__} lacks "
                         f"{', '.join(missing)}")
    if hasattr(model.roi_heads, "stages"):
        raise UserInputError(f"model: {what} reads one RoI head's sampler; a Cascade R-CNN has "
                             f"one per stage, which it does not analyse")


@dataclass
class RoiCandidates:
    """The RoI candidates of one image as the RoI head's sampler sees them in training.

    Attributes (``N`` candidates, ``G`` ground-truth boxes, all in the transformed frame):
        boxes: ``FloatTensor[N, 4]`` proposals, ground truth appended when the model adds it.
        max_overlaps: ``FloatTensor[N]`` largest IoU of each candidate with any ground truth.
        labels: ``Int64Tensor[N]`` matcher labels (``>= 1`` foreground, ``0`` background,
            ``-1`` ignored).
        matched_gt_inds: ``Int64Tensor[N]`` index of the best-matching ground truth.
        neg_inds: ``Int64Tensor[M]`` indices of the negatives (``labels == 0``).
        gt_boxes: ``FloatTensor[G, 4]``.
        features: the backbone's ``OrderedDict`` of feature maps (batch of one).
        image_size: ``(h, w)`` of the transformed image; original_size: ``(H, W)`` of the input.
        neg_iou_thresh: the matcher's background threshold (negatives have IoU below it).
    """

    boxes: Tensor
    max_overlaps: Tensor
    labels: Tensor
    matched_gt_inds: Tensor
    neg_inds: Tensor
    gt_boxes: Tensor
    features: "dict[str, Tensor]"
    image_size: tuple[int, int]
    original_size: tuple[int, int]
    neg_iou_thresh: float


def _background_threshold(model: nn.Module) -> float:
    matcher = getattr(model.roi_heads, "proposal_matcher", None)
    return float(getattr(matcher, "low_threshold", DEFAULT_NEG_IOU_THRESH))


def _match(model: nn.Module, boxes: Tensor, gt_boxes: Tensor, gt_labels: Tensor
           ) -> tuple[Tensor, Tensor, Tensor]:
    """Labels / max IoU / matched index of ``boxes`` with the model's own matcher rule."""
    from libra_rcnn.models.roi_heads import match_proposals
    from torchvision.models.detection._utils import Matcher

    matcher = getattr(model.roi_heads, "proposal_matcher", None)
    if matcher is None:
        thresh = DEFAULT_NEG_IOU_THRESH
        matcher = Matcher(thresh, thresh, allow_low_quality_matches=False)
    return match_proposals(boxes, gt_boxes, gt_labels, matcher)


def _training_proposals(rpn: nn.Module, image_list: Any, features: Mapping[str, Tensor],
                        targets: Sequence[Mapping[str, Tensor]]) -> Tensor:
    """The RPN's proposals for the first image with its training pre/post-NMS counts: the RPN
    runs in training mode for this one call (its losses are computed and dropped; the caller
    holds no gradients, so nothing is learned)."""
    with module_mode(rpn, True):
        boxes, _ = rpn(image_list, features, targets)
    return boxes[0]


@torch.no_grad()
def roi_candidates(model: nn.Module, image: Tensor, target: Mapping[str, Any]) -> RoiCandidates:
    """Proposals of ``image`` matched to its ground truth, as in the RoI head's training step.

    Runs the model's ``transform`` and ``backbone`` in eval mode and its RPN with its *training*
    proposal counts (the candidates a training step's RoI sampler chooses from; test-time counts
    are often fewer than the sampler's negative quota, so every selection would take them all),
    or takes ``target["proposals"]`` (original image coordinates) for models without an RPN
    (Fast R-CNN). Ground-truth boxes join the proposals when the model's sampler says so
    (``roi_heads.sampler.add_gt_as_proposals``, default yes), as torchvision's
    ``RoIHeads.add_gt_proposals`` does in training. Matching uses the model's matcher.

    Args:
        model: a two-stage detector (``transform``, ``backbone``, ``rpn``, ``roi_heads``).
        image: ``FloatTensor[3, H, W]`` in ``[0, 1]``.
        target: ``{"boxes": FloatTensor[G, 4] xyxy, "labels": Int64Tensor[G]}`` in original
            image pixels (``"proposals"`` too when the model has no RPN).
    """
    check_two_stage(model, "this analysis")
    if not isinstance(image, Tensor) or image.dim() != 3:
        raise ValueError(f"image must be a FloatTensor[3, H, W], got {getattr(image, 'shape', image)!r}")
    for key in ("boxes", "labels"):
        if key not in target:
            raise ValueError(f"target must hold {key!r}, got keys {sorted(target)}")
    from torchvision.models.detection.transform import resize_boxes

    device = model_device(model)
    original_size = (int(image.shape[-2]), int(image.shape[-1]))
    gt = {"boxes": target["boxes"].to(device, torch.float32).reshape(-1, 4),
          "labels": target["labels"].to(device, torch.int64).reshape(-1)}
    with eval_mode(model):
        image_list, transformed = model.transform([image.to(device)], [gt])
        image_size = tuple(int(v) for v in image_list.image_sizes[0])
        features = model.backbone(image_list.tensors)
        if isinstance(features, Tensor):
            features = {"0": features}
        rpn = getattr(model, "rpn", None)
        if rpn is not None:
            proposals = _training_proposals(rpn, image_list, features, transformed)
        elif "proposals" in target:
            proposals = resize_boxes(target["proposals"][:, :4].to(device, torch.float32),
                                     list(original_size), list(image_size))
        else:
            raise ValueError("model has no RPN: target must hold precomputed 'proposals'")
    gt_boxes = transformed[0]["boxes"]
    sampler = getattr(model.roi_heads, "sampler", None)
    if getattr(sampler, "add_gt_as_proposals", True):
        proposals = torch.cat([proposals, gt_boxes.to(proposals.dtype)])
    labels, max_overlaps, matched = _match(model, proposals, gt_boxes, transformed[0]["labels"])
    return RoiCandidates(
        boxes=proposals,
        max_overlaps=max_overlaps,
        labels=labels,
        matched_gt_inds=matched,
        neg_inds=torch.nonzero(labels == 0).squeeze(1),
        gt_boxes=gt_boxes,
        features=features,
        image_size=image_size,
        original_size=original_size,
        neg_iou_thresh=_background_threshold(model),
    )


@torch.no_grad()
def background_loss(model: nn.Module, candidates: RoiCandidates, inds: Tensor) -> Tensor:
    """Classification loss of the box head for calling candidates ``inds`` background.

    ``-log softmax(class_logits)[0]`` (cross-entropy with label 0) of the RoI head's box branch
    (``box_roi_pool -> box_head -> box_predictor``) in eval mode; ``FloatTensor[len(inds)]``.
    A high value is a *hard negative*: the head believes it is an object.
    """
    import torch.nn.functional as F

    heads = model.roi_heads
    if inds.numel() == 0:
        return torch.zeros(0, device=candidates.boxes.device)
    with eval_mode(model):
        pooled = heads.box_roi_pool(candidates.features, [candidates.boxes[inds]],
                                    [candidates.image_size])
        class_logits, _ = heads.box_predictor(heads.box_head(pooled))
    zeros = torch.zeros(class_logits.shape[0], dtype=torch.int64, device=class_logits.device)
    return F.cross_entropy(class_logits.float(), zeros, reduction="none")


def sampler_settings(model: nn.Module) -> dict:
    """``num_bins``/``floor_thr``/``floor_fraction``/``binning`` and the negatives per image
    (``num * (1 - pos_fraction)``) of the model's RoI sampler; the paper's defaults if it has
    none."""
    sampler = getattr(getattr(model, "roi_heads", None), "sampler", None)
    num = int(getattr(sampler, "num", 512))
    pos_fraction = float(getattr(sampler, "pos_fraction", 0.25))
    return {
        "num_neg": int(num * (1.0 - pos_fraction)),
        "num_bins": int(getattr(sampler, "num_bins", 3)),
        "floor_thr": float(getattr(sampler, "floor_thr", -1.0)),
        "floor_fraction": float(getattr(sampler, "floor_fraction", 0.0)),
        "binning": str(getattr(sampler, "binning", "negatives")),
    }


def write_csv(path: PathLike, header: Sequence[str], rows: Sequence[Sequence[Any]]) -> Path:
    """Write a CSV file (parent folders created). Returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(list(header))
        writer.writerows(rows)
    return path


def save_figure(fig: Any, path: PathLike, *, dpi: int = 120) -> Path:
    """Save a ``matplotlib.figure.Figure`` in the format its suffix names (parent folders
    created); a path without a suffix gets ``.png``. Returns the path of the file written.

    Raises:
        UserInputError: a suffix matplotlib cannot write.
    """
    path = Path(path)
    if not path.suffix:
        path = path.with_name(path.name + ".png")
    file_format = path.suffix[1:].lower()
    supported = fig.canvas.get_supported_filetypes()
    if file_format not in supported:
        raise UserInputError(f"{path}: cannot write a figure as {path.suffix!r}; use one of "
                             f"{', '.join('.' + s for s in sorted(supported))}")
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=dpi, bbox_inches="tight", format=file_format)
    return path
