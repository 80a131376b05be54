"""Libra Faster R-CNN and Libra Fast R-CNN (second stage on precomputed proposals).

Both take their parts built, as torchvision's ``GeneralizedRCNN`` does: a backbone, an RPN
(:class:`~libra_rcnn.models.rpn.LibraRegionProposalNetwork`), RoI heads
(:class:`~libra_rcnn.models.roi_heads.LibraRoIHeads`) and a transform. ``build_model`` (or a
builder such as ``libra_faster_rcnn_resnet50_fpn``) assembles them from a ``ModelConfig``. The
submodules keep torchvision's names, so a torchvision Faster R-CNN state dict loads into
:class:`LibraFasterRCNN` (only ``backbone.bfp.*`` / PAFPN parameters are new).

:class:`LibraFastRCNN` is the detector without the RPN: it takes the proposals of a separate RPN
(e.g. :func:`~libra_rcnn.models.proposals.dump_proposals`), as the paper's ablations do ("the same
precomputed proposals for fair comparisons", Sec. 4.4).
"""

from __future__ import annotations

from typing import Any, Optional

from torch import Tensor, nn
from torchvision.models.detection.faster_rcnn import FastRCNNPredictor, TwoMLPHead
from torchvision.models.detection.generalized_rcnn import GeneralizedRCNN
from torchvision.models.detection.transform import GeneralizedRCNNTransform, resize_boxes

from .roi_heads import LibraRoIHeads
from .rpn import LibraRegionProposalNetwork
from .validation import validate_inputs, validate_proposals

__all__ = ["ClassAgnosticPredictor", "LibraFasterRCNN", "LibraFastRCNN", "box_head_and_predictor"]

ROI_RESOLUTION = 7


class ClassAgnosticPredictor(FastRCNNPredictor):
    """torchvision's ``FastRCNNPredictor`` with one set of box deltas shared by every class
    (mmdetection's ``reg_class_agnostic=True``): ``cls_score [C]``, ``bbox_pred [4]``."""

    def __init__(self, in_channels: int, num_classes: int) -> None:
        super().__init__(in_channels, num_classes)
        self.bbox_pred = nn.Linear(in_channels, 4)


def box_head_and_predictor(out_channels: int, num_classes: int, representation_size: int, *,
                           class_agnostic: bool = False) -> tuple[TwoMLPHead, FastRCNNPredictor]:
    """Two shared FC layers of ``representation_size`` on ``7 x 7`` RoI features
    (mmdetection's ``Shared2FCBBoxHead``) and box deltas for ``num_classes`` classes, background
    included: class-specific, or shared by every class with ``class_agnostic``."""
    if isinstance(representation_size, bool) or not isinstance(representation_size, int) \
            or representation_size < 1:
        raise ValueError(f"representation_size must be a positive int, got {representation_size!r}")
    box_head = TwoMLPHead(out_channels * ROI_RESOLUTION**2, representation_size)
    predictor = ClassAgnosticPredictor if class_agnostic else FastRCNNPredictor
    return box_head, predictor(representation_size, num_classes)


def _num_classes(roi_heads: nn.Module) -> Optional[int]:
    """Classes (background included) of the RoI heads' predictor (a cascade's last stage's),
    if it says."""
    stages = getattr(roi_heads, "stages", None)
    predictor = (stages[-1] if stages else roi_heads).box_predictor
    return getattr(getattr(predictor, "cls_score", None), "out_features", None)


class LibraFasterRCNN(GeneralizedRCNN):
    """Faster R-CNN from its parts (torchvision's ``GeneralizedRCNN`` with input checks).

    Args:
        backbone: returns the feature levels the RPN and the RoI pooler read (``"0".."3"`` =
            P2-P5 and ``"pool"`` = P6 for :func:`~libra_rcnn.models.backbone.fpn_backbone`).
        rpn: a :class:`LibraRegionProposalNetwork`.
        roi_heads: a :class:`LibraRoIHeads`.
        transform: resizes, normalises and batches the images and maps the detections back.

    ``forward(images, targets=None)``: torchvision's contract (losses
    ``loss_classifier, loss_box_reg, loss_objectness, loss_rpn_box_reg`` in training,
    ``[{"boxes", "labels", "scores"}]`` at inference), after :mod:`.validation` checks.
    """

    def __init__(self, backbone: nn.Module, rpn: LibraRegionProposalNetwork,
                 roi_heads: LibraRoIHeads, transform: GeneralizedRCNNTransform) -> None:
        super().__init__(backbone, rpn, roi_heads, transform)
        self.num_classes = _num_classes(roi_heads)

    def forward(self, images: list[Tensor], targets: Optional[list[dict[str, Tensor]]] = None) -> Any:
        validate_inputs(images, targets, training=self.training, num_classes=self.num_classes)
        return super().forward(images, targets)


class LibraFastRCNN(nn.Module):
    """Fast R-CNN: ``transform -> backbone -> roi_heads`` on precomputed proposals.

    Args: ``backbone``, ``roi_heads``, ``transform`` as :class:`LibraFasterRCNN`.

    ``forward(images, targets=None, proposals=None)``:

    * ``proposals``: one ``Tensor[K, 4]`` (or ``[K, 5]`` with a score column, ignored) per
      image in *original* image coordinates; they are rescaled with the transform's resize
      ratios. When ``None``, each target's ``"proposals"`` entry is used if every target has one;
      otherwise a ``ValueError`` explains what is missing.
    * training: ``{"loss_classifier", "loss_box_reg"}`` (ground truth boxes join the proposals
      when ``roi_sampler.add_gt_as_proposals``); inference: ``[{"boxes", "labels", "scores"}]``
      in original image coordinates.
    """

    def __init__(self, backbone: nn.Module, roi_heads: LibraRoIHeads,
                 transform: GeneralizedRCNNTransform) -> None:
        super().__init__()
        self.transform = transform
        self.backbone = backbone
        self.roi_heads = roi_heads
        self.num_classes = _num_classes(roi_heads)

    def forward(
        self,
        images: list[Tensor],
        targets: Optional[list[dict[str, Tensor]]] = None,
        proposals: Optional[list[Tensor]] = None,
    ) -> Any:
        validate_inputs(images, targets, training=self.training, num_classes=self.num_classes)
        if proposals is None:
            if targets is not None and all("proposals" in t for t in targets):
                proposals = [t["proposals"] for t in targets]
            else:
                raise ValueError(
                    "LibraFastRCNN needs precomputed proposals: pass proposals=[Tensor[K, 4] or "
                    "Tensor[K, 5] per image, in original image coordinates] (e.g. from "
                    "load_proposals), or put them in every target's 'proposals' entry"
                )
        validate_proposals(proposals, num_images=len(images))

        original_sizes = [(int(img.shape[-2]), int(img.shape[-1])) for img in images]
        image_list, targets = self.transform(images, targets)
        device, dtype = image_list.tensors.device, image_list.tensors.dtype
        boxes = [
            resize_boxes(p[:, :4].to(device=device, dtype=dtype), list(orig), list(new))
            for p, orig, new in zip(proposals, original_sizes, image_list.image_sizes)
        ]
        features = self.backbone(image_list.tensors)
        if isinstance(features, Tensor):
            features = {"0": features}
        detections, losses = self.roi_heads(features, boxes, image_list.image_sizes, targets)
        if self.training:
            return losses
        return self.transform.postprocess(detections, image_list.image_sizes, original_sizes)
