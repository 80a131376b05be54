"""Convert an mmdetection checkpoint (2.x or 3.x layout) into a libra-rcnn checkpoint.

mmdetection saves ``{"state_dict": {...}, "meta": {...}}``. Its Libra models are ours under other
names, with two layout differences:

* the R-CNN box classifier puts the background *last* (81 rows for COCO) and regresses 80 x 4
  class-specific deltas; ours (torchvision's) puts the background first and has 81 x 4 rows, the
  background's never read (written as zeros here); Cascade R-CNN's stages
  (``roi_head.bbox_head.<k>.*``, ours ``roi_heads.stages.<k>.*``) regress one class-agnostic box,
  4 rows in both;
* RetinaNet's classifier has 80 sigmoid channels per anchor, as our ``MMDetRetinaNetHead``.

The result holds our model config (``model.convention: mmdet``), the class names (from the
checkpoint's ``meta``) and the dataset category id of every label, so ``predict``, ``eval`` and
``analyze`` take it as they take a checkpoint written by ``train``.
"""

from __future__ import annotations

import dataclasses
import os
import re
from collections import OrderedDict
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence, Union

import torch
from torch import Tensor

from libra_rcnn.config import Config, config_to_dict
from libra_rcnn.data.coco_classes import COCO_CATEGORIES
from libra_rcnn.engine.checkpoint import (
    CHECKPOINT_FORMAT,
    FORMAT_VERSION,
    CheckpointError,
    read_torch_file,
    save_checkpoint,
)
from libra_rcnn.models import build_model
from libra_rcnn.models.config import ModelConfig

__all__ = ["convert_mmdet_checkpoint", "describe_mmdet_model", "mmdet_to_ours"]

PathLike = Union[str, os.PathLike]

# (mmdetection name pattern, our name); applied in order, the first match wins. ``{n}``-style
# groups are carried over. ``neck.0.`` / ``neck.1.``: a neck list (FPN or PAFPN, then the BFP).
_RENAMES: tuple[tuple[str, str], ...] = (
    (r"^backbone\.(.+)$", r"backbone.body.\1"),
    (r"^neck(?:\.0)?\.lateral_convs\.(\d+)\.conv\.(weight|bias)$", r"backbone.fpn.inner_blocks.\1.0.\2"),
    (r"^neck(?:\.0)?\.downsample_convs\.(\d+)\.conv\.(weight|bias)$",
     r"backbone.fpn.downsample_blocks.\1.0.\2"),
    (r"^neck(?:\.0)?\.pafpn_convs\.(\d+)\.conv\.(weight|bias)$", r"backbone.fpn.pafpn_blocks.\1.0.\2"),
    (r"^neck\.1\.refine\.(g|theta|phi|conv_out)\.conv\.(weight|bias)$", r"backbone.bfp.refine.\1.\2"),
    (r"^neck\.1\.refine\.conv\.(weight|bias)$", r"backbone.bfp.refine.0.\1"),
    # the RPN's head: rpn_head.* in a two-stage detector, bbox_head.* in mmdetection's RPN-only one
    (r"^(?:rpn|bbox)_head\.rpn_conv\.(weight|bias)$", r"rpn.head.conv.0.0.\1"),
    (r"^(?:rpn|bbox)_head\.rpn_cls\.(weight|bias)$", r"rpn.head.cls_logits.\1"),
    (r"^(?:rpn|bbox)_head\.rpn_reg\.(weight|bias)$", r"rpn.head.bbox_pred.\1"),
    (r"^roi_head\.bbox_head\.(\d+)\.shared_fcs\.0\.(weight|bias)$", r"roi_heads.stages.\1.box_head.fc6.\2"),
    (r"^roi_head\.bbox_head\.(\d+)\.shared_fcs\.1\.(weight|bias)$", r"roi_heads.stages.\1.box_head.fc7.\2"),
    (r"^roi_head\.bbox_head\.(\d+)\.fc_cls\.(weight|bias)$",
     r"roi_heads.stages.\1.box_predictor.cls_score.\2"),
    (r"^roi_head\.bbox_head\.(\d+)\.fc_reg\.(weight|bias)$",
     r"roi_heads.stages.\1.box_predictor.bbox_pred.\2"),
    (r"^roi_head\.bbox_head\.shared_fcs\.0\.(weight|bias)$", r"roi_heads.box_head.fc6.\1"),
    (r"^roi_head\.bbox_head\.shared_fcs\.1\.(weight|bias)$", r"roi_heads.box_head.fc7.\1"),
    (r"^roi_head\.bbox_head\.fc_cls\.(weight|bias)$", r"roi_heads.box_predictor.cls_score.\1"),
    (r"^roi_head\.bbox_head\.fc_reg\.(weight|bias)$", r"roi_heads.box_predictor.bbox_pred.\1"),
    (r"^bbox_head\.cls_convs\.(\d+)\.conv\.(weight|bias)$", r"head.classification_head.conv.\1.0.\2"),
    (r"^bbox_head\.reg_convs\.(\d+)\.conv\.(weight|bias)$", r"head.regression_head.conv.\1.0.\2"),
    (r"^bbox_head\.retina_cls\.(weight|bias)$", r"head.classification_head.cls_logits.\1"),
    (r"^bbox_head\.retina_reg\.(weight|bias)$", r"head.regression_head.bbox_reg.\1"),
)
_RETINANET_EXTRA = {"3": "p6", "4": "p7"}  # RetinaNet's fpn_convs beyond the three outputs


def _rename(key: str, arch: str) -> Optional[str]:
    match = re.match(r"^neck(?:\.0)?\.fpn_convs\.(\d+)\.conv\.(weight|bias)$", key)
    if match:
        index, kind = match.groups()
        if arch == "retinanet" and index in _RETINANET_EXTRA:
            return f"backbone.fpn.extra_blocks.{_RETINANET_EXTRA[index]}.{kind}"
        return f"backbone.fpn.layer_blocks.{index}.0.{kind}"
    for pattern, replacement in _RENAMES:
        if re.match(pattern, key):
            return re.sub(pattern, replacement, key)
    return None


def _background_first(key: str, value: Tensor) -> Tensor:
    """Our row layout for the R-CNN classifier (background first) and class-specific regressor
    (background's four rows, never read, as zeros); a cascade stage's class-agnostic regressor
    stays as it is."""
    if re.match(r"^roi_heads\.(stages\.\d+\.)?box_predictor\.cls_score\.", key):
        return torch.cat([value[-1:], value[:-1]])
    if key.startswith("roi_heads.box_predictor.bbox_pred."):
        return torch.cat([value.new_zeros((4, *value.shape[1:])), value])
    return value


def mmdet_to_ours(state_dict: Mapping[str, Tensor], model_cfg: ModelConfig
                  ) -> tuple["OrderedDict[str, Tensor]", list[str]]:
    """Rename and re-lay out an mmdetection state dict for ``build_model(model_cfg)``.

    Returns ``(ours, unknown)``: the converted tensors and the mmdetection keys no rule knows.
    """
    ours: "OrderedDict[str, Tensor]" = OrderedDict()
    unknown = []
    for key, value in state_dict.items():
        name = _rename(key, model_cfg.arch)
        if name is None:
            unknown.append(key)
            continue
        ours[name] = _background_first(name, value)
    return ours, unknown


def describe_mmdet_model(state_dict: Mapping[str, Tensor]) -> str:
    """What an mmdetection state dict looks like, e.g. ``"Faster R-CNN, ResNet-101, FPN +
    balanced feature pyramid (non_local), 80 classes"`` (for error messages)."""
    keys = set(state_dict)
    stages = {m.group(1) for k in keys if (m := re.match(r"^roi_head\.bbox_head\.(\d+)\.", k))}
    if stages:
        arch = f"Cascade R-CNN ({len(stages)} stages)"
    elif any(k.startswith("roi_head.") for k in keys):
        arch = "Faster R-CNN" if any(k.startswith("rpn_head.") for k in keys) else "Fast R-CNN"
    elif any(k.startswith("bbox_head.retina_cls") for k in keys):
        arch = "RetinaNet"
    elif any(k.startswith(("rpn_head.", "bbox_head.rpn_")) for k in keys):
        arch = "RPN"
    elif any(k.startswith("bbox_head.") for k in keys):
        arch = "a single-stage detector other than RetinaNet"
    else:
        arch = "not a detector known here"
    blocks = 1 + max([int(m.group(1)) for k in keys
                      if (m := re.match(r"^backbone\.layer3\.(\d+)\.", k))], default=-1)
    conv2 = state_dict.get("backbone.layer1.0.conv2.weight")
    grouped = conv2 is not None and conv2.shape[1] != conv2.shape[0]
    depth = {6: "ResNet-50", 23: "ResNet-101", 36: "ResNet-152", 0: "no ResNet"}.get(
        blocks, f"a ResNet with {blocks} blocks in stage 3")
    backbone = depth.replace("ResNet", "ResNeXt") if grouped else depth
    neck = "PAFPN" if any(".pafpn_convs." in k for k in keys) else "FPN"
    if any(k.startswith("neck.1.refine.theta") for k in keys):
        neck += " + balanced feature pyramid (non_local)"
    elif any(k.startswith("neck.1.refine.conv") for k in keys):
        neck += " + balanced feature pyramid (conv)"
    parts = [arch, backbone, neck]
    cls = _classifier_weight(state_dict)
    if cls is not None:
        parts.append(f"{cls.shape[0] - 1} classes")
    return ", ".join(parts)


def _classifier_weight(state_dict: Mapping[str, Tensor]) -> Optional[Tensor]:
    """The R-CNN classifier's weight (a cascade's first stage's), if any."""
    return state_dict.get("roi_head.bbox_head.fc_cls.weight",
                          state_dict.get("roi_head.bbox_head.0.fc_cls.weight"))


def _load_mmdet_file(path: Path) -> tuple[Mapping[str, Tensor], dict]:
    """``(state_dict, meta)`` of an mmdetection checkpoint, read with ``weights_only=True``."""
    obj = read_torch_file(path, refused_hint=(
        "strip the training state (such as mmengine's message hub) with mmdetection's "
        "tools/model_converters/publish_model.py first"))
    if isinstance(obj, Mapping) and obj.get("format") == CHECKPOINT_FORMAT:
        raise CheckpointError(f"{path}: already a libra-rcnn checkpoint, nothing to convert")
    if isinstance(obj, Mapping) and isinstance(obj.get("state_dict"), Mapping):
        state_dict, meta = obj["state_dict"], obj.get("meta") or {}
    elif isinstance(obj, Mapping) and obj and all(isinstance(v, Tensor) for v in obj.values()):
        state_dict, meta = obj, {}  # a bare state dict
    else:
        raise CheckpointError(f"{path}: not an mmdetection checkpoint (expected a dict with "
                              f"'state_dict' and 'meta')")
    state_dict = {k[len("module."):] if k.startswith("module.") else k: v
                  for k, v in state_dict.items()}
    if any(k.startswith("bbox_head.") for k in state_dict) and any(
            k.startswith("rpn_head.") for k in state_dict):
        raise CheckpointError(f"{path}: an mmdetection 1.x two-stage layout (bbox_head.* beside "
                              f"rpn_head.*); upgrade it with mmdetection 2.x's "
                              f"tools/model_converters/upgrade_model_version.py first")
    return state_dict, dict(meta) if isinstance(meta, Mapping) else {}


def _class_names(meta: Mapping[str, Any]) -> Optional[list[str]]:
    names = meta.get("CLASSES")
    if names is None and isinstance(meta.get("dataset_meta"), Mapping):
        names = meta["dataset_meta"].get("classes")
    return None if names is None else [str(n) for n in names]


def _num_classes(state_dict: Mapping[str, Tensor], arch: str, num_anchors: int) -> Optional[int]:
    """Classes including background, from the classifier's shape."""
    if arch in ("faster_rcnn", "fast_rcnn", "cascade_rcnn"):
        cls = _classifier_weight(state_dict)
        return None if cls is None else int(cls.shape[0])
    if arch == "retinanet":
        cls = state_dict.get("bbox_head.retina_cls.weight")
        return None if cls is None else int(cls.shape[0]) // num_anchors + 1
    return None


def _category_ids(class_names: Sequence[str]) -> dict[int, int]:
    """Label -> dataset category id: COCO's ids for COCO's 80 names, else 1..K."""
    coco = {name: cat_id for cat_id, name in COCO_CATEGORIES}
    if len(class_names) == len(COCO_CATEGORIES) and all(n in coco for n in class_names):
        return {label: coco[name] for label, name in enumerate(class_names, start=1)}
    return {label: label for label in range(1, len(class_names) + 1)}


def convert_mmdet_checkpoint(src: PathLike, dst: PathLike, cfg: Config, *,
                             class_names: Optional[Sequence[str]] = None) -> dict:
    """Convert mmdetection checkpoint ``src`` to our checkpoint ``dst`` (written atomically).

    Args:
        src: mmdetection ``.pth`` (2.x or 3.x; weights, plain ``meta``).
        dst: where our checkpoint goes.
        cfg: our experiment config whose model the weights are for; its ``model.convention``
            must be ``"mmdet"``. ``model.num_classes`` is taken from the checkpoint.
        class_names: the foreground class names, when ``meta`` lacks them (COCO's 80 are
            assumed for an 81-class model without any).

    Returns:
        a summary: ``model`` (what the file looks like), ``num_classes``, ``class_names``,
        ``converted`` (number of tensors), ``dst``.

    Raises:
        CheckpointError: naming the file: unreadable, not mmdetection's, or weights that do not
            fit the config's model (the message lists missing and unexpected keys and what the
            file looks like).
    """
    src, dst = Path(src), Path(dst)
    if cfg.model.convention != "mmdet":
        raise CheckpointError(f"{src}: converting for a model with convention "
                              f"{cfg.model.convention!r}; mmdetection's weights give mmdetection's "
                              f"detections only with model.convention=mmdet")
    state_dict, meta = _load_mmdet_file(src)
    looks_like = describe_mmdet_model(state_dict)
    num_anchors = 9 if cfg.model.arch == "retinanet" else 3
    names = list(class_names) if class_names is not None else _class_names(meta)
    num_classes = _num_classes(state_dict, cfg.model.arch, num_anchors)
    if num_classes is None:  # a class-agnostic RPN: the classes are only names to carry along
        num_classes = len(names) + 1 if names else cfg.model.num_classes
    if names is None and num_classes == len(COCO_CATEGORIES) + 1:
        names = [name for _, name in COCO_CATEGORIES]
    model_cfg = dataclasses.replace(cfg.model, num_classes=num_classes, backbone_weights=None)
    if names is None or len(names) != num_classes - 1:
        raise CheckpointError(
            f"{src}: {num_classes - 1} classes in the weights but "
            f"{'no class names in its meta' if names is None else f'{len(names)} class names'}; "
            f"give them with --class-names")

    converted, unknown = mmdet_to_ours(state_dict, model_cfg)
    model = build_model(model_cfg)
    expected = model.state_dict()
    for key in [k for k in expected if k.endswith("num_batches_tracked") and k not in converted]:
        converted[key] = expected[key]  # a BN step counter absent from older files
    for key in [k for k in converted if k.endswith("num_batches_tracked") and k not in expected]:
        del converted[key]  # frozen BN has no step counter
    missing = sorted(set(expected) - set(converted))
    unexpected = sorted(set(converted) - set(expected)) + unknown
    wrong_shape = sorted(k for k in set(expected) & set(converted)
                         if expected[k].shape != converted[k].shape)
    if missing or unexpected or wrong_shape:
        details = "; ".join(f"{what} {len(keys)}: {keys[:4]}" for what, keys in
                            (("missing", missing), ("unexpected", unexpected),
                             ("wrong shape", wrong_shape)) if keys)
        raise CheckpointError(
            f"{src}: weights do not fit {model_cfg.arch} / {model_cfg.backbone} / "
            f"{'BFP ' + model_cfg.bfp.refine_type if model_cfg.bfp.enabled else 'no BFP'} / "
            f"{model_cfg.neck}; the file looks like: {looks_like} ({details})")
    model.load_state_dict(converted, strict=True)

    cfg = dataclasses.replace(cfg, model=model_cfg)
    state = {
        "format": CHECKPOINT_FORMAT,
        "format_version": FORMAT_VERSION,
        "model": model.state_dict(),
        "model_config": config_to_dict(model_cfg),
        "class_names": names,
        "label_to_cat_id": _category_ids(names),
        "config": config_to_dict(cfg),
        "converted_from": {"file": str(src), "model": looks_like,
                           "mmdet_version": str(meta.get("mmdet_version", "unknown"))},
    }
    save_checkpoint(dst, state)
    return {"model": looks_like, "num_classes": num_classes, "class_names": names,
            "converted": len(converted), "dst": str(dst)}
