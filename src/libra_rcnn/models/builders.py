"""Build detectors from a :class:`~libra_rcnn.models.config.ModelConfig`.

* :func:`baseline_model_config` / :func:`libra_model_config` give the configuration of a
  baseline or Libra model of the paper, with torchvision's settings (``settings="torchvision"``,
  the default: torchvision's conventions, so torchvision weights keep working) or mmdetection's
  (``settings="mmdet"``: its conventions and defaults, as the shipped ``*_coco`` configs, so its
  checkpoints and recipes carry over), then optional overrides;
* :func:`build_model` turns any ``ModelConfig`` into a ``torch.nn.Module``: the one place where
  settings become parts (:mod:`.conventions`);
* the keyword-only builders (``libra_faster_rcnn_resnet50_fpn`` ...) are the models of Tables 1
  and 3, torchvision style and with torchvision's settings. Training schedules (1x / 2x) are not
  models and have no builders. Overrides that an architecture would ignore raise ``ValueError``.

Libra settings per architecture (mmdetection's ``configs/libra_rcnn``):

=============  ===========================================================================
faster_rcnn    BFP (non-local, refine level 2 = C4 size); RoI sampler: instance-balanced
               positives + IoU-balanced negatives (3 bins, no floor); balanced L1 box loss
               (alpha 0.5, gamma 1.5, beta 1.0); RPN sampler ``neg_pos_ub = 5``
fast_rcnn      the same, without an RPN (precomputed proposals)
retinanet      BFP (non-local, refine level 1 of P3-P7); balanced L1 box loss with beta 0.11
rpn            BFP (refine level 2); balanced L1 RPN box loss (alpha 0.5, gamma 1.5,
               beta 1.0); RPN sampler ``neg_pos_ub = 5``
cascade_rcnn   as faster_rcnn, in every stage: the RoI sampler and box loss of each of the
               three stages (IoU thresholds 0.5 / 0.6 / 0.7) are Libra's
=============  ===========================================================================

The Libra RPN and Libra Cascade R-CNN rows are not in mmdetection's configs; they combine the
paper's components with the settings of mmdetection's Libra Faster R-CNN and, for the cascade,
of its Cascade R-CNN (``ModelConfig.cascade``). With ``settings="mmdet"`` a cascade's
IoU-balanced sampler bins each stage's negatives over their own IoU range (``binning="negatives"``),
which lies below that stage's threshold.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import os
import typing
from typing import Any, Mapping, Optional, Union

import torch
from torch import nn
from torchvision.models import WeightsEnum
from torchvision.models.detection.rpn import RPNHead

from ..checks import (check_field_types, check_int_between, check_minus_one_or_non_negative,
                      check_one_of, check_positive_int, check_unit_interval)
from .backbone import NUM_LEVELS, fpn_backbone, input_normalization
from .efficientnet import EFFICIENTNET_NAMES, IMAGENET, NORMS as EFFICIENTNET_NORMS
from .box_coder import BoxParts
from .box_losses import check_box_loss_values
from .cascade import CascadeRoIHeads, LibraCascadeRCNN
from .config import (
    Arch,
    BalancedFeaturePyramidConfig,
    BoxLossConfig,
    CascadeConfig,
    ModelConfig,
    SamplerConfig,
)
from .conventions import CONVENTIONS, TorchvisionConvention, convention_parts
from .faster_rcnn import LibraFastRCNN, LibraFasterRCNN, box_head_and_predictor
from .head_settings import AnchorSampling, DetectionSettings, ProposalSettings
from .retinanet import LibraRetinaNet
from .roi_heads import LibraRoIHeads, sampling_settings
from .rpn import LibraRegionProposalNetwork, LibraRPN

__all__ = [
    "ARCHS",
    "UNUSED_FIELDS",
    "apply_overrides",
    "baseline_model_config",
    "build_model",
    "check_model_config",
    "check_model_values",
    "libra_model_config",
    "used_settings",
    "faster_rcnn_resnet50_fpn",
    "faster_rcnn_resnet101_fpn",
    "faster_rcnn_resnext101_64x4d_fpn",
    "libra_faster_rcnn_resnet50_fpn",
    "libra_faster_rcnn_resnet101_fpn",
    "libra_faster_rcnn_resnext101_64x4d_fpn",
    "retinanet_resnet50_fpn",
    "libra_retinanet_resnet50_fpn",
    "rpn_resnet50_fpn",
    "rpn_resnet101_fpn",
    "rpn_resnext101_64x4d_fpn",
    "libra_rpn_resnet50_fpn",
    "fast_rcnn_resnet50_fpn",
    "libra_fast_rcnn_resnet50_fpn",
    "cascade_rcnn_resnet50_fpn",
    "libra_cascade_rcnn_resnet50_fpn",
]

ARCHS: tuple[str, ...] = typing.get_args(Arch)

WeightsArg = Union[None, str, os.PathLike, WeightsEnum]


# ---------------------------------------------------------------------------------------------
# configuration


def apply_overrides(cfg: ModelConfig, overrides: Mapping[str, Any]) -> ModelConfig:
    """A copy of ``cfg`` with ``overrides`` (``ModelConfig`` field names) applied.

    A nested dataclass field (``bfp``, ``roi_sampler``, ``box_loss``, ``rpn_box_loss``,
    ``retina_box_loss``, ``cascade``) takes an instance of its dataclass (replaces it) or a dict (updates
    only the named sub-fields, keeping the others of ``cfg``).
    """
    fields = {f.name for f in dataclasses.fields(ModelConfig)}
    updates = {}
    for name, value in overrides.items():
        if name not in fields:
            raise ValueError(f"unknown ModelConfig field {name!r}; valid fields: {sorted(fields)}")
        current = getattr(cfg, name)
        if dataclasses.is_dataclass(current):
            nested_type = type(current)
            if isinstance(value, Mapping):
                known = {f.name for f in dataclasses.fields(nested_type)}
                unknown = sorted(set(value) - known)
                if unknown:
                    raise ValueError(f"unknown {nested_type.__name__} field(s) {unknown} in override "
                                     f"{name!r}; valid fields: {sorted(known)}")
                value = dataclasses.replace(current, **value)
            elif not isinstance(value, nested_type):
                raise ValueError(f"override {name!r} must be a {nested_type.__name__} or a dict, "
                                 f"got {type(value).__name__}")
            else:
                value = dataclasses.replace(value)  # a copy: the caller's object stays theirs
        updates[name] = value
    return dataclasses.replace(cfg, **updates)


_RPN_FIELDS = ("rpn_pre_nms_top_n_train", "rpn_post_nms_top_n_train", "rpn_pre_nms_top_n_test",
               "rpn_post_nms_top_n_test", "rpn_batch_size_per_image", "rpn_positive_fraction",
               "rpn_neg_pos_ub", "rpn_allowed_border", "rpn_box_loss")
_ROI_FIELDS = ("roi_sampler", "box_loss", "representation_size")
_DETECTION_FIELDS = ("box_score_thresh", "box_nms_thresh", "box_detections_per_img")
_RETINA_FIELDS = ("retina_box_loss", "retina_p6_input", "retina_head_norm")
#: ModelConfig fields each architecture does not read
_CASCADE_FIELDS = ("cascade",)
UNUSED_FIELDS = {
    "faster_rcnn": _RETINA_FIELDS + _CASCADE_FIELDS,
    "fast_rcnn": _RPN_FIELDS + _RETINA_FIELDS + _CASCADE_FIELDS,
    "rpn": _ROI_FIELDS + _DETECTION_FIELDS + _RETINA_FIELDS + _CASCADE_FIELDS,
    "retinanet": _RPN_FIELDS + _ROI_FIELDS + _CASCADE_FIELDS,
    "cascade_rcnn": _RETINA_FIELDS,
}


def used_settings(arch: str, settings: Mapping[str, Any]) -> dict[str, Any]:
    """The ``ModelConfig`` settings among ``settings`` that ``arch`` reads (one set of sizes for
    every architecture, e.g. in tests and benchmarks)."""
    return {k: v for k, v in settings.items() if k not in UNUSED_FIELDS[arch]}


def _check_overrides_apply(arch: str, overrides: Mapping[str, Any]) -> None:
    """``ValueError`` naming every override that ``arch`` would ignore."""
    unused = sorted(set(overrides) & set(UNUSED_FIELDS[arch]))
    if unused:
        raise ValueError(f"{arch} does not use {unused}: these settings would have no effect")


def check_model_config(cfg: ModelConfig) -> ModelConfig:
    """Validate every field ``build_model`` reads: its type and choices, as a config file's are
    checked when loaded, then its value (:func:`check_model_values`); ``ValueError`` names the
    field. Returns ``cfg`` unchanged."""
    if not isinstance(cfg, ModelConfig):
        raise ValueError(f"cfg must be a ModelConfig, got {type(cfg).__name__}")
    check_field_types(cfg)
    return check_model_values(cfg)


_POSITIVE_INTS = ("fpn_channels", "min_size", "max_size", "rpn_pre_nms_top_n_train",
                  "rpn_post_nms_top_n_train", "rpn_pre_nms_top_n_test", "rpn_post_nms_top_n_test",
                  "rpn_batch_size_per_image", "representation_size", "box_detections_per_img")


def check_model_values(cfg: ModelConfig) -> ModelConfig:
    """The rules a field's type cannot state (ranges, settings that must fit together), for a
    ``cfg`` whose field types are checked already; ``ValueError`` names the field."""
    if cfg.num_classes < 2:
        raise ValueError(f"num_classes must be an int >= 2 (background included), "
                         f"got {cfg.num_classes!r}")
    _check_backbone_fits(cfg.backbone, cfg.backbone_weights, cfg.norm)
    check_int_between(cfg.trainable_backbone_layers, "trainable_backbone_layers", 0, 5)
    if cfg.bfp.enabled:
        check_int_between(cfg.bfp.refine_level, "bfp.refine_level", 0, NUM_LEVELS - 1)
    for name in _POSITIVE_INTS:
        check_positive_int(getattr(cfg, name), name)
    for name in ("rpn_positive_fraction", "box_score_thresh", "box_nms_thresh"):
        check_unit_interval(getattr(cfg, name), name)
    check_minus_one_or_non_negative(cfg.rpn_neg_pos_ub, "rpn_neg_pos_ub", "no cap")
    check_minus_one_or_non_negative(cfg.rpn_allowed_border, "rpn_allowed_border", "every anchor")
    for name in ("rpn_box_loss", "box_loss", "retina_box_loss"):
        check_box_loss_values(getattr(cfg, name), name)
    sampling_settings(cfg.roi_sampler, "roi_sampler")
    _check_cascade_values(cfg.cascade)
    if cfg.arch == "retinanet" and cfg.retina_head_norm == "gn" and cfg.fpn_channels % 32:
        raise ValueError(f"retina_head_norm: gn splits the head's fpn_channels into 32 groups; "
                         f"fpn_channels is {cfg.fpn_channels}: use a multiple of 32")
    return cfg


def check_cascade_config(cascade: CascadeConfig) -> CascadeConfig:
    """Validate the cascade's stages: every list has ``num_stages`` entries, thresholds in
    ``(0, 1)``, weights ``>= 0``, coder stds ``> 0``; ``ValueError`` names the setting."""
    if not isinstance(cascade, CascadeConfig):
        raise ValueError(f"cascade must be a CascadeConfig, got {type(cascade).__name__}")
    check_field_types(cascade, "cascade.")
    return _check_cascade_values(cascade)


def _check_cascade_values(cascade: CascadeConfig) -> CascadeConfig:
    check_positive_int(cascade.num_stages, "cascade.num_stages")
    for name in ("iou_thresholds", "stage_loss_weights", "box_coder_stds"):
        values = getattr(cascade, name)
        if len(values) != cascade.num_stages:
            raise ValueError(f"cascade.{name} has {len(values)} entries but cascade.num_stages "
                             f"is {cascade.num_stages}: give one per stage")
    if not all(0.0 < t < 1.0 for t in cascade.iou_thresholds):
        raise ValueError(f"cascade.iou_thresholds must lie in (0, 1), got {cascade.iou_thresholds!r}")
    if not all(math.isfinite(w) and w >= 0 for w in cascade.stage_loss_weights):
        raise ValueError(f"cascade.stage_loss_weights must be finite numbers >= 0, "
                         f"got {cascade.stage_loss_weights!r}")
    for stds in cascade.box_coder_stds:
        if not all(math.isfinite(s) and s > 0 for s in stds):
            raise ValueError(f"cascade.box_coder_stds must be four numbers > 0 per stage, "
                             f"got {stds!r}")
    return cascade


def _check_backbone_fits(backbone: str, weights: Optional[str], norm: str) -> None:
    """The weights and norm that ``backbone`` can take (files are read when it is built)."""
    if backbone in EFFICIENTNET_NAMES:
        if norm not in EFFICIENTNET_NORMS:
            raise ValueError(f"norm: {norm!r} does not fit {backbone}, whose ImageNet statistics "
                             f"are batch norm; use one of {EFFICIENTNET_NORMS}")
    elif weights == IMAGENET:
        raise ValueError(f"backbone_weights: {IMAGENET!r} names the offline weights of "
                         f"{EFFICIENTNET_NAMES}; {backbone} has none: use a torchvision weight "
                         f"name (IMAGENET1K_V1, DEFAULT: downloaded) or a .pth file")


def _mmdet_settings(arch: str, libra: bool) -> dict[str, Any]:
    """mmdetection 3.3's values for what the paper leaves open (its configs and ``_base_``s):
    conventions, backbone norm, RPN proposal count, L1 box losses, IoU bins. The same for every
    architecture (what one does not read is inert), as in the shipped ``base_coco_1x.yaml``."""
    l1 = BoxLossConfig(kind="l1", loss_weight=1.0)
    settings: dict[str, Any] = {
        "convention": "mmdet",
        "norm": "frozen_stats_bn",
        "rpn_post_nms_top_n_train": 1000,
        # floor_thr 0: mmdetection's sampler replaces its configured -1 by 0 after its first image
        "roi_sampler": {"binning": "all_candidates", "floor_thr": 0.0},
    }
    if arch == "cascade_rcnn":
        # mmdetection's Cascade R-CNN: 2000 proposals per training image, RPN training on the
        # anchors inside the image, smooth L1 box losses (the ModelConfig defaults); IoU bins
        # over each stage's own negatives, which lie below that stage's threshold
        settings.update(rpn_post_nms_top_n_train=2000, rpn_allowed_border=0.0,
                        roi_sampler={"binning": "negatives", "floor_thr": 0.0})
        return settings
    if not (libra and arch == "rpn"):
        settings["rpn_box_loss"] = l1
    if not (libra and arch in ("faster_rcnn", "fast_rcnn")):
        settings["box_loss"] = dataclasses.replace(l1)
    if libra and arch == "retinanet":  # the two balanced L1 formulas differ at beta 0.11
        settings["retina_box_loss"] = {"formula": "beta_in_log"}
    return settings


def _model_config(arch: str, backbone: str, libra: bool, settings: str,
                  overrides: Mapping[str, Any]) -> ModelConfig:
    check_one_of(arch, ARCHS, "arch")
    check_one_of(settings, CONVENTIONS, "settings")
    _check_overrides_apply(arch, overrides)
    cfg = ModelConfig(arch=arch, backbone=backbone)
    if libra:
        cfg = apply_overrides(cfg, _libra_parts(arch))
    if settings == "mmdet":
        cfg = apply_overrides(cfg, _mmdet_settings(arch, libra))
    return check_model_config(apply_overrides(cfg, overrides))


def baseline_model_config(arch: str, backbone: str = "resnet50", *, settings: str = "torchvision",
                          **overrides: Any) -> ModelConfig:
    """The baseline (no Libra component) ``ModelConfig`` of ``arch`` on ``backbone``.

    ``settings="torchvision"``: torchvision's conventions and defaults (its weights load);
    ``"mmdet"``: mmdetection 3.3's (the shipped ``*_coco`` configs). ``overrides`` last.
    """
    return _model_config(arch, backbone, False, settings, overrides)


def _libra_parts(arch: str) -> dict[str, Any]:
    balanced_l1 = BoxLossConfig(kind="balanced_l1", alpha=0.5, gamma=1.5, beta=1.0, loss_weight=1.0)
    balanced_sampler = SamplerConfig(num=512, pos_fraction=0.25, add_gt_as_proposals=True,
                                     pos_balance=True, neg_balance=True, num_bins=3,
                                     floor_thr=-1.0, floor_fraction=0.0)
    if arch in ("faster_rcnn", "cascade_rcnn"):
        return {"bfp": BalancedFeaturePyramidConfig(enabled=True, refine_level=2, refine_type="non_local"),
                "roi_sampler": balanced_sampler, "box_loss": balanced_l1, "rpn_neg_pos_ub": 5.0}
    if arch == "fast_rcnn":
        return {"bfp": BalancedFeaturePyramidConfig(enabled=True, refine_level=2, refine_type="non_local"),
                "roi_sampler": balanced_sampler, "box_loss": balanced_l1}
    if arch == "retinanet":
        return {"bfp": BalancedFeaturePyramidConfig(enabled=True, refine_level=1, refine_type="non_local"),
                "retina_box_loss": dataclasses.replace(balanced_l1, beta=0.11)}
    # rpn
    return {"bfp": BalancedFeaturePyramidConfig(enabled=True, refine_level=2, refine_type="non_local"),
            "rpn_box_loss": balanced_l1, "rpn_neg_pos_ub": 5.0}


def libra_model_config(arch: str, backbone: str = "resnet50", *, settings: str = "torchvision",
                       **overrides: Any) -> ModelConfig:
    """The Libra ``ModelConfig`` of ``arch`` on ``backbone`` (see the module table), with
    torchvision's or mmdetection's ``settings`` (see :func:`baseline_model_config`), then
    ``overrides`` (``ModelConfig`` field names; nested fields as dataclasses or dicts)."""
    return _model_config(arch, backbone, True, settings, overrides)


# ---------------------------------------------------------------------------------------------
# models


def build_model(cfg: ModelConfig, *, generator: Optional[torch.Generator] = None) -> nn.Module:
    """The detector described by ``cfg``: the one place where settings become parts.

    Args:
        cfg: a :class:`ModelConfig` (validated here).
        generator: optional ``torch.Generator`` for the RPN / RoI samplers (``None``: global RNG).

    Returns:
        :class:`LibraFasterRCNN`, :class:`LibraRetinaNet`, :class:`LibraRPN`,
        :class:`LibraFastRCNN` or :class:`LibraCascadeRCNN`, following torchvision's images/targets/losses contract, with the
        parts of ``cfg.convention`` (:mod:`.conventions`).
    """
    return _assemble(check_model_config(cfg), generator)


def _assemble(cfg: ModelConfig, generator: Optional[torch.Generator] = None) -> nn.Module:
    """:func:`build_model` for a checked ``cfg``."""
    parts = convention_parts(cfg.convention)
    backbone = fpn_backbone(
        backbone_name=cfg.backbone,
        weights=cfg.backbone_weights,
        norm=cfg.norm,
        trainable_layers=cfg.trainable_backbone_layers,
        out_channels=cfg.fpn_channels,
        neck=cfg.neck,
        bfp=cfg.bfp,
        layout="retinanet" if cfg.arch == "retinanet" else "two_stage",
        retina_p6_input=cfg.retina_p6_input,
        relu_before_p7=parts.relu_before_p7,
        pafpn_bottom_up=parts.pafpn_bottom_up,
    )
    transform = parts.transform(cfg.min_size, cfg.max_size, *input_normalization(cfg.backbone))
    if cfg.arch == "retinanet":
        model: nn.Module = _retinanet(cfg, parts, backbone, transform)
    elif cfg.arch == "rpn":
        model = LibraRPN(backbone, _rpn(cfg, parts, generator), transform, num_classes=cfg.num_classes)
    elif cfg.arch == "fast_rcnn":
        model = LibraFastRCNN(backbone, _roi_heads(cfg, parts, generator), transform)
    elif cfg.arch == "cascade_rcnn":
        model = LibraCascadeRCNN(backbone, _rpn(cfg, parts, generator),
                                 _cascade_roi_heads(cfg, parts, generator), transform)
    else:
        model = LibraFasterRCNN(backbone, _rpn(cfg, parts, generator),
                                _roi_heads(cfg, parts, generator), transform)
    parts.init_weights(model)
    return model


def _rpn(cfg: ModelConfig, parts: TorchvisionConvention,
         generator: Optional[torch.Generator]) -> LibraRegionProposalNetwork:
    anchor_generator = parts.rpn_anchor_generator()
    head = RPNHead(cfg.fpn_channels, anchor_generator.num_anchors_per_location()[0])
    return LibraRegionProposalNetwork(
        anchor_generator,
        head,
        proposals=ProposalSettings(pre_nms_top_n_train=cfg.rpn_pre_nms_top_n_train,
                                   pre_nms_top_n_test=cfg.rpn_pre_nms_top_n_test,
                                   post_nms_top_n_train=cfg.rpn_post_nms_top_n_train,
                                   post_nms_top_n_test=cfg.rpn_post_nms_top_n_test),
        sampling=AnchorSampling(batch_size_per_image=cfg.rpn_batch_size_per_image,
                                positive_fraction=cfg.rpn_positive_fraction,
                                neg_pos_ub=float(cfg.rpn_neg_pos_ub),
                                allowed_border=float(cfg.rpn_allowed_border)),
        box_loss=dataclasses.replace(cfg.rpn_box_loss),
        box_parts=parts.rpn_box_parts(),
        generator=generator,
    )


def _detection_settings(cfg: ModelConfig) -> DetectionSettings:
    return DetectionSettings(score_thresh=cfg.box_score_thresh, nms_thresh=cfg.box_nms_thresh,
                             detections_per_img=cfg.box_detections_per_img)


def _roi_heads(cfg: ModelConfig, parts: TorchvisionConvention,
               generator: Optional[torch.Generator], *, box_parts: Optional[BoxParts] = None,
               class_agnostic: bool = False) -> LibraRoIHeads:
    """Faster R-CNN's RoI heads; ``box_parts`` default: the convention's ``roi_box_parts()``."""
    box_head, box_predictor = box_head_and_predictor(cfg.fpn_channels, cfg.num_classes,
                                                     cfg.representation_size,
                                                     class_agnostic=class_agnostic)
    return LibraRoIHeads(
        parts.box_roi_pool(),
        box_head,
        box_predictor,
        sampler=dataclasses.replace(cfg.roi_sampler),
        box_loss=dataclasses.replace(cfg.box_loss),
        detection=_detection_settings(cfg),
        box_parts=parts.roi_box_parts() if box_parts is None else box_parts,
        generator=generator,
    )


def _cascade_roi_heads(cfg: ModelConfig, parts: TorchvisionConvention,
                       generator: Optional[torch.Generator]) -> CascadeRoIHeads:
    """One :class:`LibraRoIHeads` per stage, with the stage's IoU threshold and box coder
    (torchvision weights ``1 / std``) and the shared sampler and box loss settings."""
    stages = [_roi_heads(cfg, parts, generator, class_agnostic=True,
                         box_parts=parts.roi_box_parts(float(threshold),
                                                       tuple(1.0 / s for s in stds)))
              for threshold, stds in zip(cfg.cascade.iou_thresholds, cfg.cascade.box_coder_stds)]
    return CascadeRoIHeads(stages, cfg.cascade.stage_loss_weights)


def _retinanet(cfg: ModelConfig, parts: TorchvisionConvention, backbone: nn.Module,
               transform: nn.Module) -> LibraRetinaNet:
    anchor_generator = parts.retinanet_anchor_generator()
    norm_layer = None if cfg.retina_head_norm == "none" else functools.partial(nn.GroupNorm, 32)
    head = parts.retinanet_head(cfg.fpn_channels, anchor_generator.num_anchors_per_location()[0],
                                cfg.num_classes, box_loss=dataclasses.replace(cfg.retina_box_loss),
                                norm_layer=norm_layer)
    return LibraRetinaNet(
        backbone,
        head,
        anchor_generator,
        transform,
        num_classes=cfg.num_classes,
        box_parts=parts.retinanet_box_parts(),
        detection=_detection_settings(cfg),
    )


def _weights_to_config(weights_backbone: WeightsArg) -> Optional[str]:
    """``ModelConfig.backbone_weights`` (a string) for an enum member, name or path."""
    if weights_backbone is None:
        return None
    if isinstance(weights_backbone, WeightsEnum):
        return f"{type(weights_backbone).__name__}.{weights_backbone.name}"
    if isinstance(weights_backbone, (str, os.PathLike)):
        return os.fspath(weights_backbone)
    raise ValueError(f"weights_backbone must be None, a weight enum member, its name or a file path, "
                     f"got {weights_backbone!r}")


def _build(arch: str, backbone: str, libra: bool, num_classes: int, weights_backbone: WeightsArg,
           overrides: dict[str, Any], builder_name: str) -> nn.Module:
    for fixed in ("arch", "backbone", "num_classes", "backbone_weights"):
        if fixed in overrides:
            raise ValueError(
                f"{builder_name}() fixes {fixed!r} (use num_classes= / weights_backbone=, or "
                f"build_model(libra_model_config(...)) for another architecture or backbone)"
            )
    make_config = libra_model_config if libra else baseline_model_config
    cfg = make_config(arch, backbone, num_classes=num_classes,
                      backbone_weights=_weights_to_config(weights_backbone), **overrides)
    return _assemble(cfg)  # checked by make_config


def faster_rcnn_resnet50_fpn(*, num_classes: int = 81, weights_backbone: WeightsArg = None,
                             **overrides: Any) -> LibraFasterRCNN:
    """Faster R-CNN, ResNet-50-FPN, no Libra component (Table 1 baseline)."""
    return _build("faster_rcnn", "resnet50", False, num_classes, weights_backbone, overrides,
                  "faster_rcnn_resnet50_fpn")


def faster_rcnn_resnet101_fpn(*, num_classes: int = 81, weights_backbone: WeightsArg = None,
                              **overrides: Any) -> LibraFasterRCNN:
    """Faster R-CNN, ResNet-101-FPN, no Libra component (Table 1 baseline)."""
    return _build("faster_rcnn", "resnet101", False, num_classes, weights_backbone, overrides,
                  "faster_rcnn_resnet101_fpn")


def faster_rcnn_resnext101_64x4d_fpn(*, num_classes: int = 81, weights_backbone: WeightsArg = None,
                                     **overrides: Any) -> LibraFasterRCNN:
    """Faster R-CNN, ResNeXt-101-64x4d-FPN, no Libra component (Table 1 baseline)."""
    return _build("faster_rcnn", "resnext101_64x4d", False, num_classes, weights_backbone, overrides,
                  "faster_rcnn_resnext101_64x4d_fpn")


def libra_faster_rcnn_resnet50_fpn(*, num_classes: int = 81, weights_backbone: WeightsArg = None,
                                   **overrides: Any) -> LibraFasterRCNN:
    """Libra R-CNN (Faster R-CNN), ResNet-50-FPN (Table 1: 38.7 AP on test-dev, 1x)."""
    return _build("faster_rcnn", "resnet50", True, num_classes, weights_backbone, overrides,
                  "libra_faster_rcnn_resnet50_fpn")


def libra_faster_rcnn_resnet101_fpn(*, num_classes: int = 81, weights_backbone: WeightsArg = None,
                                    **overrides: Any) -> LibraFasterRCNN:
    """Libra R-CNN (Faster R-CNN), ResNet-101-FPN (Table 1)."""
    return _build("faster_rcnn", "resnet101", True, num_classes, weights_backbone, overrides,
                  "libra_faster_rcnn_resnet101_fpn")


def libra_faster_rcnn_resnext101_64x4d_fpn(*, num_classes: int = 81,
                                           weights_backbone: WeightsArg = None,
                                           **overrides: Any) -> LibraFasterRCNN:
    """Libra R-CNN (Faster R-CNN), ResNeXt-101-64x4d-FPN (Table 1: 43.0 AP on test-dev)."""
    return _build("faster_rcnn", "resnext101_64x4d", True, num_classes, weights_backbone, overrides,
                  "libra_faster_rcnn_resnext101_64x4d_fpn")


def retinanet_resnet50_fpn(*, num_classes: int = 81, weights_backbone: WeightsArg = None,
                           **overrides: Any) -> LibraRetinaNet:
    """RetinaNet, ResNet-50-FPN, L1 box loss (Table 1 baseline)."""
    return _build("retinanet", "resnet50", False, num_classes, weights_backbone, overrides,
                  "retinanet_resnet50_fpn")


def libra_retinanet_resnet50_fpn(*, num_classes: int = 81, weights_backbone: WeightsArg = None,
                                 **overrides: Any) -> LibraRetinaNet:
    """Libra RetinaNet, ResNet-50-FPN: BFP + balanced L1 loss (Table 1: 37.8 AP)."""
    return _build("retinanet", "resnet50", True, num_classes, weights_backbone, overrides,
                  "libra_retinanet_resnet50_fpn")


def rpn_resnet50_fpn(*, num_classes: int = 81, weights_backbone: WeightsArg = None,
                     **overrides: Any) -> LibraRPN:
    """RPN-only, ResNet-50-FPN (Table 3 baseline)."""
    return _build("rpn", "resnet50", False, num_classes, weights_backbone, overrides, "rpn_resnet50_fpn")


def rpn_resnet101_fpn(*, num_classes: int = 81, weights_backbone: WeightsArg = None,
                      **overrides: Any) -> LibraRPN:
    """RPN-only, ResNet-101-FPN (Table 3 baseline)."""
    return _build("rpn", "resnet101", False, num_classes, weights_backbone, overrides,
                  "rpn_resnet101_fpn")


def rpn_resnext101_64x4d_fpn(*, num_classes: int = 81, weights_backbone: WeightsArg = None,
                             **overrides: Any) -> LibraRPN:
    """RPN-only, ResNeXt-101-64x4d-FPN (Table 3 baseline)."""
    return _build("rpn", "resnext101_64x4d", False, num_classes, weights_backbone, overrides,
                  "rpn_resnext101_64x4d_fpn")


def libra_rpn_resnet50_fpn(*, num_classes: int = 81, weights_backbone: WeightsArg = None,
                           **overrides: Any) -> LibraRPN:
    """Libra RPN, ResNet-50-FPN (Table 3)."""
    return _build("rpn", "resnet50", True, num_classes, weights_backbone, overrides,
                  "libra_rpn_resnet50_fpn")


def fast_rcnn_resnet50_fpn(*, num_classes: int = 81, weights_backbone: WeightsArg = None,
                           **overrides: Any) -> LibraFastRCNN:
    """Fast R-CNN on precomputed proposals, ResNet-50-FPN (Table 2 baseline setting)."""
    return _build("fast_rcnn", "resnet50", False, num_classes, weights_backbone, overrides,
                  "fast_rcnn_resnet50_fpn")


def libra_fast_rcnn_resnet50_fpn(*, num_classes: int = 81, weights_backbone: WeightsArg = None,
                                 **overrides: Any) -> LibraFastRCNN:
    """Libra Fast R-CNN on precomputed proposals, ResNet-50-FPN (mmdetection: 38.5 AP val)."""
    return _build("fast_rcnn", "resnet50", True, num_classes, weights_backbone, overrides,
                  "libra_fast_rcnn_resnet50_fpn")


def cascade_rcnn_resnet50_fpn(*, num_classes: int = 81, weights_backbone: WeightsArg = None,
                              **overrides: Any) -> LibraCascadeRCNN:
    """Cascade R-CNN, ResNet-50-FPN: three stages at IoU 0.5 / 0.6 / 0.7, no Libra component."""
    return _build("cascade_rcnn", "resnet50", False, num_classes, weights_backbone, overrides,
                  "cascade_rcnn_resnet50_fpn")


def libra_cascade_rcnn_resnet50_fpn(*, num_classes: int = 81, weights_backbone: WeightsArg = None,
                                    **overrides: Any) -> LibraCascadeRCNN:
    """Libra Cascade R-CNN, ResNet-50-FPN: BFP under the three stages, IoU-balanced sampling and
    balanced L1 loss in each stage."""
    return _build("cascade_rcnn", "resnet50", True, num_classes, weights_backbone, overrides,
                  "libra_cascade_rcnn_resnet50_fpn")
