"""Build detectors from a :class:`~libra_rcnn.models.config.ModelConfig`.

* :func:`baseline_model_config` / :func:`libra_model_config` give the configuration of a
  baseline or Libra model of the paper (mmdetection's settings), with optional overrides;
* :func:`build_model` turns any ``ModelConfig`` into a ``torch.nn.Module``;
* the keyword-only builders (``libra_faster_rcnn_resnet50_fpn`` ...) are the models of Tables 1
  and 3, torchvision style. Training schedules (1x / 2x) are not models and have no builders.

Libra settings per architecture (mmdetection's ``configs/libra_rcnn``):

=============  ===========================================================================
faster_rcnn    BFP (non-local, refine level 2 = C4 size); RoI sampler: instance-balanced
               positives + IoU-balanced negatives (3 bins, no floor); balanced L1 box loss
               (alpha 0.5, gamma 1.5, beta 1.0); RPN sampler ``neg_pos_ub = 5``
fast_rcnn      the same, without an RPN (precomputed proposals)
retinanet      BFP (non-local, refine level 1 of P3-P7); balanced L1 box loss with beta 0.11
rpn            BFP (refine level 2); balanced L1 RPN box loss (alpha 0.5, gamma 1.5,
               beta 1.0); RPN sampler ``neg_pos_ub = 5``
=============  ===========================================================================

The Libra RPN row is not in mmdetection's configs; it combines the paper's components with the
first-stage settings of mmdetection's Libra Faster R-CNN (see the project notes).
"""

from __future__ import annotations

import dataclasses
import math
import os
import typing
from typing import Any, Mapping, Optional, Union

import torch
from torch import nn
from torchvision.models import WeightsEnum

from .backbone import BACKBONE_NAMES, NECK_KINDS, NORM_KINDS, resnet_fpn_backbone
from .box_losses import check_box_loss_config
from .config import (
    BalancedFeaturePyramidConfig,
    BoxLossConfig,
    ModelConfig,
    RefineKind,
    SamplerConfig,
)
from .faster_rcnn import LibraFastRCNN, LibraFasterRCNN
from .retinanet import LibraRetinaNet
from .roi_heads import check_sampler_config
from .rpn import LibraRPN

__all__ = [
    "ARCHS",
    "apply_overrides",
    "baseline_model_config",
    "build_model",
    "check_model_config",
    "libra_model_config",
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
]

ARCHS = ("faster_rcnn", "retinanet", "rpn", "fast_rcnn")
REFINE_KINDS = typing.get_args(RefineKind)
NUM_NECK_LEVELS = 5  # P2-P6 (two-stage) or P3-P7 (RetinaNet)

WeightsArg = Union[None, str, os.PathLike, WeightsEnum]


# ---------------------------------------------------------------------------------------------
# configuration


def apply_overrides(cfg: ModelConfig, overrides: Mapping[str, Any]) -> ModelConfig:
    """A copy of ``cfg`` with ``overrides`` (``ModelConfig`` field names) applied.

    A nested dataclass field (``bfp``, ``roi_sampler``, ``box_loss``, ``rpn_box_loss``,
    ``retina_box_loss``) takes an instance of its dataclass (replaces it) or a dict (updates
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


def _check_choice(value: Any, choices: tuple, name: str) -> None:
    if value not in choices:
        raise ValueError(f"{name} must be one of {choices}, got {value!r}")


def _check_positive_int(value: Any, name: str) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")


def _check_unit_interval(value: Any, name: str) -> None:
    if not isinstance(value, (int, float)) or not 0.0 <= value <= 1.0:
        raise ValueError(f"{name} must lie in [0, 1], got {value!r}")


def check_model_config(cfg: ModelConfig) -> ModelConfig:
    """Validate every field ``build_model`` reads; ``ValueError`` names the field."""
    if not isinstance(cfg, ModelConfig):
        raise ValueError(f"cfg must be a ModelConfig, got {type(cfg).__name__}")
    _check_choice(cfg.arch, ARCHS, "arch")
    _check_choice(cfg.backbone, BACKBONE_NAMES, "backbone")
    _check_choice(cfg.norm, NORM_KINDS, "norm")
    _check_choice(cfg.neck, NECK_KINDS, "neck")
    if isinstance(cfg.num_classes, bool) or not isinstance(cfg.num_classes, int) or cfg.num_classes < 2:
        raise ValueError(f"num_classes must be an int >= 2 (background included), got {cfg.num_classes!r}")
    if cfg.backbone_weights is not None and not isinstance(cfg.backbone_weights, str):
        raise ValueError(f"backbone_weights must be None, a weight name or a file path, "
                         f"got {cfg.backbone_weights!r}")
    tbl = cfg.trainable_backbone_layers
    if isinstance(tbl, bool) or not isinstance(tbl, int) or not 0 <= tbl <= 5:
        raise ValueError(f"trainable_backbone_layers must be an int in [0, 5], got {tbl!r}")
    _check_positive_int(cfg.fpn_channels, "fpn_channels")
    if not isinstance(cfg.bfp, BalancedFeaturePyramidConfig):
        raise ValueError(f"bfp must be a BalancedFeaturePyramidConfig, got {type(cfg.bfp).__name__}")
    if cfg.bfp.enabled:
        rl = cfg.bfp.refine_level
        if isinstance(rl, bool) or not isinstance(rl, int) or not 0 <= rl < NUM_NECK_LEVELS:
            raise ValueError(f"bfp.refine_level must be an int in [0, {NUM_NECK_LEVELS}), got {rl!r}")
        _check_choice(cfg.bfp.refine_type, REFINE_KINDS, "bfp.refine_type")
    _check_positive_int(cfg.min_size, "min_size")
    _check_positive_int(cfg.max_size, "max_size")
    for name in ("rpn_pre_nms_top_n_train", "rpn_post_nms_top_n_train", "rpn_pre_nms_top_n_test",
                 "rpn_post_nms_top_n_test", "rpn_batch_size_per_image", "representation_size",
                 "box_detections_per_img"):
        _check_positive_int(getattr(cfg, name), name)
    _check_unit_interval(cfg.rpn_positive_fraction, "rpn_positive_fraction")
    ub = cfg.rpn_neg_pos_ub
    if not isinstance(ub, (int, float)) or not math.isfinite(ub) or (ub < 0 and ub != -1):
        raise ValueError(f"rpn_neg_pos_ub must be -1 (no cap) or a finite number >= 0, got {ub!r}")
    _check_unit_interval(cfg.box_score_thresh, "box_score_thresh")
    _check_unit_interval(cfg.box_nms_thresh, "box_nms_thresh")
    check_box_loss_config(cfg.rpn_box_loss, "rpn_box_loss")
    check_box_loss_config(cfg.box_loss, "box_loss")
    check_box_loss_config(cfg.retina_box_loss, "retina_box_loss")
    check_sampler_config(cfg.roi_sampler, "roi_sampler")
    return cfg


def baseline_model_config(arch: str, backbone: str = "resnet50", **overrides: Any) -> ModelConfig:
    """The baseline (no Libra component) ``ModelConfig`` of ``arch`` on ``backbone``."""
    _check_choice(arch, ARCHS, "arch")
    _check_choice(backbone, BACKBONE_NAMES, "backbone")
    return check_model_config(apply_overrides(ModelConfig(arch=arch, backbone=backbone), overrides))


def _libra_parts(arch: str) -> dict[str, Any]:
    balanced_l1 = BoxLossConfig(kind="balanced_l1", alpha=0.5, gamma=1.5, beta=1.0, loss_weight=1.0)
    balanced_sampler = SamplerConfig(num=512, pos_fraction=0.25, add_gt_as_proposals=True,
                                     pos_balance=True, neg_balance=True, num_bins=3,
                                     floor_thr=-1.0, floor_fraction=0.0)
    if arch == "faster_rcnn":
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


def libra_model_config(arch: str, backbone: str = "resnet50", **overrides: Any) -> ModelConfig:
    """The Libra ``ModelConfig`` of ``arch`` on ``backbone`` (see the module table), then
    ``overrides`` (``ModelConfig`` field names; nested fields as dataclasses or dicts)."""
    _check_choice(arch, ARCHS, "arch")
    _check_choice(backbone, BACKBONE_NAMES, "backbone")
    cfg = apply_overrides(ModelConfig(arch=arch, backbone=backbone), _libra_parts(arch))
    return check_model_config(apply_overrides(cfg, overrides))


# ---------------------------------------------------------------------------------------------
# models


def build_model(cfg: ModelConfig, *, generator: Optional[torch.Generator] = None) -> nn.Module:
    """The detector described by ``cfg``.

    Args:
        cfg: a :class:`ModelConfig` (validated here).
        generator: optional ``torch.Generator`` for the RPN / RoI samplers (``None``: global RNG).

    Returns:
        :class:`LibraFasterRCNN`, :class:`LibraRetinaNet`, :class:`LibraRPN` or
        :class:`LibraFastRCNN`, following torchvision's images/targets/losses contract.
    """
    check_model_config(cfg)
    backbone = resnet_fpn_backbone(
        backbone_name=cfg.backbone,
        weights=cfg.backbone_weights,
        norm=cfg.norm,
        trainable_layers=cfg.trainable_backbone_layers,
        out_channels=cfg.fpn_channels,
        neck=cfg.neck,
        bfp=cfg.bfp,
        layout="retinanet" if cfg.arch == "retinanet" else "two_stage",
    )
    transform = {"min_size": cfg.min_size, "max_size": cfg.max_size}
    rpn = {
        "rpn_pre_nms_top_n_train": cfg.rpn_pre_nms_top_n_train,
        "rpn_pre_nms_top_n_test": cfg.rpn_pre_nms_top_n_test,
        "rpn_post_nms_top_n_train": cfg.rpn_post_nms_top_n_train,
        "rpn_post_nms_top_n_test": cfg.rpn_post_nms_top_n_test,
        "rpn_batch_size_per_image": cfg.rpn_batch_size_per_image,
        "rpn_positive_fraction": cfg.rpn_positive_fraction,
        "rpn_box_loss": dataclasses.replace(cfg.rpn_box_loss),
        "rpn_neg_pos_ub": float(cfg.rpn_neg_pos_ub),
    }
    box = {
        "roi_sampler": dataclasses.replace(cfg.roi_sampler),
        "box_loss": dataclasses.replace(cfg.box_loss),
        "representation_size": cfg.representation_size,
        "box_score_thresh": cfg.box_score_thresh,
        "box_nms_thresh": cfg.box_nms_thresh,
        "box_detections_per_img": cfg.box_detections_per_img,
    }
    if cfg.arch == "faster_rcnn":
        return LibraFasterRCNN(backbone, cfg.num_classes, generator=generator, **transform, **rpn, **box)
    if cfg.arch == "fast_rcnn":
        return LibraFastRCNN(backbone, cfg.num_classes, generator=generator, **transform, **box)
    if cfg.arch == "rpn":
        return LibraRPN(backbone, num_classes=cfg.num_classes, generator=generator, **transform, **rpn)
    return LibraRetinaNet(
        backbone,
        cfg.num_classes,
        box_loss=dataclasses.replace(cfg.retina_box_loss),
        score_thresh=cfg.box_score_thresh,
        nms_thresh=cfg.box_nms_thresh,
        detections_per_img=cfg.box_detections_per_img,
        **transform,
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
    return build_model(cfg)


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
