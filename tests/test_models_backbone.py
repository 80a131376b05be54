"""Backbone tests: weight loading from a local .pth, freezing, norms, and the neck switches
(BFP, PAFPN) changing what the pyramid computes."""

from __future__ import annotations

import pytest
import torch
import torchvision
from torch import nn
from torchvision.ops import FrozenBatchNorm2d

from libra_rcnn.models import (
    BalancedFeaturePyramidConfig,
    LibraBackboneWithFPN,
    build_resnet,
    fpn_backbone,
    resolve_backbone_weights,
)
from libra_rcnn.ops.balanced_feature_pyramid import BalancedFeaturePyramid
from libra_rcnn.ops.pafpn import PAFPN

CHANNELS = 16


def _image(seed=0):
    return torch.rand(1, 3, 64, 96, generator=torch.Generator().manual_seed(seed))


def _classification_state_dict(name="resnet18", seed=0):
    torch.manual_seed(seed)
    model = torchvision.models.get_model(name)
    with torch.no_grad():  # non-default BN statistics, so that loading them is visible
        for module in model.modules():
            if isinstance(module, nn.BatchNorm2d):
                module.running_mean.uniform_(-0.2, 0.2)
                module.running_var.uniform_(0.5, 1.5)
                module.weight.uniform_(0.5, 1.5)
    return model.state_dict()


def test_weights_from_local_pth_load_exactly(tmp_path):
    state_dict = _classification_state_dict()
    path = tmp_path / "resnet18_imagenet.pth"
    torch.save(state_dict, path)
    model = build_resnet("resnet18", norm="frozen_bn", weights=str(path))
    loaded = model.state_dict()
    compared = 0
    for key, value in state_dict.items():
        if key.endswith("num_batches_tracked"):  # FrozenBatchNorm2d keeps no step counter
            continue
        torch.testing.assert_close(loaded[key], value, rtol=0, atol=0)
        compared += 1
    assert compared == len(loaded)

    # trainable BN takes the same file; a path-like works too
    bn_model = build_resnet("resnet18", norm="bn", weights=path)
    torch.testing.assert_close(bn_model.layer3[1].bn2.running_var, state_dict["layer3.1.bn2.running_var"])


def test_checkpoint_without_classifier_loads(tmp_path):
    state_dict = {k: v for k, v in _classification_state_dict().items() if not k.startswith("fc.")}
    path = tmp_path / "no_fc.pth"
    torch.save({"state_dict": state_dict}, path)  # a common checkpoint wrapper
    model = build_resnet("resnet18", weights=str(path))
    torch.testing.assert_close(model.conv1.weight, state_dict["conv1.weight"])


def test_mismatched_or_unreadable_file_names_the_file(tmp_path):
    wrong_arch = tmp_path / "resnet34.pth"
    torch.save(_classification_state_dict("resnet34"), wrong_arch)
    with pytest.raises(ValueError, match="resnet34.pth") as info:
        build_resnet("resnet18", weights=str(wrong_arch))
    assert "does not fit resnet18" in str(info.value)

    wrong_shapes = tmp_path / "shapes.pth"
    state_dict = _classification_state_dict()
    state_dict["conv1.weight"] = torch.zeros(8, 3, 7, 7)
    torch.save(state_dict, wrong_shapes)
    with pytest.raises(ValueError, match="shapes.pth"):
        build_resnet("resnet18", weights=str(wrong_shapes))

    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(b"not a torch file")
    with pytest.raises(ValueError, match="garbage.pth"):
        build_resnet("resnet18", weights=str(garbage))

    not_a_state_dict = tmp_path / "list.pth"
    torch.save([torch.zeros(2)], not_a_state_dict)
    with pytest.raises(ValueError, match="list.pth"):
        build_resnet("resnet18", weights=str(not_a_state_dict))


def test_weight_names_resolve_without_download():
    assert resolve_backbone_weights("IMAGENET1K_V1", "resnet18") is torchvision.models.ResNet18_Weights.IMAGENET1K_V1
    assert resolve_backbone_weights("DEFAULT", "resnet50") is torchvision.models.ResNet50_Weights.IMAGENET1K_V2
    assert (resolve_backbone_weights("ResNeXt101_64X4D_Weights.IMAGENET1K_V1", "resnext101_64x4d")
            is torchvision.models.ResNeXt101_64X4D_Weights.IMAGENET1K_V1)
    assert resolve_backbone_weights(None, "resnet34") is None
    with pytest.raises(ValueError, match="neither an existing file nor a weight of resnet18"):
        resolve_backbone_weights("IMAGENET1K_V9", "resnet18")
    with pytest.raises(ValueError, match="not a weight of resnet18"):
        resolve_backbone_weights(torchvision.models.ResNet50_Weights.IMAGENET1K_V1, "resnet18")
    with pytest.raises(ValueError, match="neither an existing file"):
        resolve_backbone_weights("ResNet50_Weights.IMAGENET1K_V1", "resnet18")


@pytest.mark.parametrize("trainable_layers,trainable_prefixes", [
    (0, ()),
    (3, ("layer2", "layer3", "layer4")),
    (5, ("conv1", "bn1", "layer1", "layer2", "layer3", "layer4")),
])
def test_frozen_layers_do_not_require_grad(trainable_layers, trainable_prefixes):
    model = build_resnet("resnet18", norm="bn", trainable_layers=trainable_layers)
    for name, parameter in model.named_parameters():
        if name.startswith("fc."):
            continue
        expected = name.split(".")[0] in trainable_prefixes
        assert parameter.requires_grad == expected, name


def test_trainable_layers_and_norm_errors():
    with pytest.raises(ValueError, match="trainable_backbone_layers"):
        build_resnet("resnet18", trainable_layers=6)
    with pytest.raises(ValueError, match="norm"):
        build_resnet("resnet18", norm="syncbn")
    with pytest.raises(ValueError, match="backbone"):
        build_resnet("resnet152")
    with pytest.raises(ValueError, match="gn"):
        build_resnet("resnet18", norm="gn", weights="IMAGENET1K_V1")


@pytest.mark.parametrize("norm,norm_type", [("frozen_bn", FrozenBatchNorm2d), ("bn", nn.BatchNorm2d),
                                            ("gn", nn.GroupNorm)])
def test_norm_kinds(norm, norm_type):
    backbone = fpn_backbone(backbone_name="resnet18", norm=norm, out_channels=CHANNELS)
    assert isinstance(backbone.body.bn1, norm_type)
    assert isinstance(backbone.body.layer4[0].bn2, norm_type)
    out = backbone(_image())
    assert list(out) == ["0", "1", "2", "3", "pool"]


def test_pyramid_layouts_and_parameter_names():
    two_stage = fpn_backbone(backbone_name="resnet18", out_channels=CHANNELS)
    assert isinstance(two_stage, LibraBackboneWithFPN) and two_stage.out_channels == CHANNELS
    shapes = {k: tuple(v.shape) for k, v in two_stage(_image()).items()}
    assert shapes == {"0": (1, CHANNELS, 16, 24), "1": (1, CHANNELS, 8, 12), "2": (1, CHANNELS, 4, 6),
                      "3": (1, CHANNELS, 2, 3), "pool": (1, CHANNELS, 1, 2)}
    names = {k.split(".")[0] for k in two_stage.state_dict()}
    assert names == {"body", "fpn"}

    retina = fpn_backbone(backbone_name="resnet18", out_channels=512, layout="retinanet")
    # C5 has 512 channels too, yet P6 is still computed from C5 (torchvision would switch to P5)
    assert retina.fpn.extra_blocks.use_P5 is False
    shapes = {k: tuple(v.shape[-2:]) for k, v in retina(_image()).items()}
    assert shapes == {"0": (8, 12), "1": (4, 6), "2": (2, 3), "p6": (1, 2), "p7": (1, 1)}


def test_bfp_adds_parameters_and_changes_features():
    torch.manual_seed(0)
    plain = fpn_backbone(backbone_name="resnet18", out_channels=CHANNELS).eval()
    for refine_type in ("non_local", "conv", "none"):
        balanced = fpn_backbone(
            backbone_name="resnet18", out_channels=CHANNELS,
            bfp=BalancedFeaturePyramidConfig(enabled=True, refine_level=2, refine_type=refine_type)).eval()
        result = balanced.load_state_dict(plain.state_dict(), strict=False)
        assert result.unexpected_keys == []
        assert all(k.startswith("bfp.") for k in result.missing_keys)
        assert isinstance(balanced.bfp, BalancedFeaturePyramid) and balanced.bfp.num_levels == 5
        assert (len(result.missing_keys) > 0) == (refine_type != "none")
        with torch.no_grad():
            before, after = plain(_image()), balanced(_image())
        assert list(after) == list(before)
        for key in before:
            assert after[key].shape == before[key].shape
            assert not torch.allclose(after[key], before[key]), (refine_type, key)
    # enabled=False means no module and no parameters
    off = fpn_backbone(backbone_name="resnet18", out_channels=CHANNELS,
                              bfp=BalancedFeaturePyramidConfig(enabled=False))
    assert off.bfp is None and not any(k.startswith("bfp.") for k in off.state_dict())


def test_pafpn_changes_features_above_the_finest_level():
    torch.manual_seed(0)
    fpn = fpn_backbone(backbone_name="resnet18", out_channels=CHANNELS).eval()
    pafpn = fpn_backbone(backbone_name="resnet18", out_channels=CHANNELS, neck="pafpn").eval()
    assert isinstance(pafpn.fpn, PAFPN)
    result = pafpn.load_state_dict(fpn.state_dict(), strict=False)
    assert result.unexpected_keys == [] and result.missing_keys
    assert all(k.startswith(("fpn.downsample_blocks.", "fpn.pafpn_blocks.")) for k in result.missing_keys)
    with torch.no_grad():
        before, after = fpn(_image()), pafpn(_image())
    torch.testing.assert_close(after["0"], before["0"])  # the bottom-up path starts at P2
    for key in ("1", "2", "3", "pool"):
        assert not torch.allclose(after[key], before[key]), key
    with pytest.raises(ValueError, match="neck"):
        fpn_backbone(backbone_name="resnet18", neck="bifpn")
