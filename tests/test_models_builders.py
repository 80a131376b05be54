"""Builder tests: Libra / baseline configurations, overrides, validation of the config, and the
torchvision-style named builders."""

from __future__ import annotations

import dataclasses

import pytest
import torchvision

import libra_rcnn.models.builders as builders
from libra_rcnn.models import (
    BalancedFeaturePyramidConfig,
    BoxLossConfig,
    LibraCascadeRCNN,
    LibraFasterRCNN,
    LibraFastRCNN,
    LibraRetinaNet,
    LibraRPN,
    ModelConfig,
    SamplerConfig,
    apply_overrides,
    baseline_model_config,
    build_model,
    libra_model_config,
)

TINY = dict(min_size=64, max_size=96, fpn_channels=16, representation_size=32, num_classes=4)


def test_libra_faster_rcnn_config_is_mmdetections():
    cfg = libra_model_config("faster_rcnn")
    assert cfg.arch == "faster_rcnn" and cfg.backbone == "resnet50" and cfg.num_classes == 81
    assert cfg.bfp == BalancedFeaturePyramidConfig(enabled=True, refine_level=2, refine_type="non_local")
    assert cfg.roi_sampler == SamplerConfig(num=512, pos_fraction=0.25, neg_pos_ub=-1.0,
                                            add_gt_as_proposals=True, pos_balance=True,
                                            neg_balance=True, num_bins=3, floor_thr=-1.0,
                                            floor_fraction=0.0)
    assert cfg.box_loss == BoxLossConfig(kind="balanced_l1", beta=1.0, alpha=0.5, gamma=1.5, loss_weight=1.0)
    assert cfg.rpn_neg_pos_ub == 5.0
    # untouched paper defaults
    assert cfg.rpn_box_loss == BoxLossConfig(kind="smooth_l1", beta=1.0 / 9.0)
    assert (cfg.min_size, cfg.max_size, cfg.norm, cfg.neck, cfg.trainable_backbone_layers) == (
        800, 1333, "frozen_bn", "fpn", 3)


def test_libra_configs_of_the_other_architectures():
    retina = libra_model_config("retinanet")
    assert retina.bfp.enabled and retina.bfp.refine_level == 1
    assert retina.retina_box_loss == BoxLossConfig(kind="balanced_l1", beta=0.11, alpha=0.5, gamma=1.5)

    rpn = libra_model_config("rpn")
    assert rpn.bfp.enabled and rpn.bfp.refine_level == 2
    assert rpn.rpn_box_loss.kind == "balanced_l1" and rpn.rpn_neg_pos_ub == 5.0

    fast = libra_model_config("fast_rcnn", "resnet101")
    assert fast.backbone == "resnet101" and fast.roi_sampler.neg_balance and fast.box_loss.kind == "balanced_l1"


@pytest.mark.parametrize("arch", builders.ARCHS)
def test_baseline_configs_have_every_switch_off(arch):
    cfg = baseline_model_config(arch)
    assert cfg == ModelConfig(arch=arch)
    assert not cfg.bfp.enabled and cfg.neck == "fpn"
    assert not cfg.roi_sampler.pos_balance and not cfg.roi_sampler.neg_balance
    assert "balanced_l1" not in (cfg.box_loss.kind, cfg.rpn_box_loss.kind, cfg.retina_box_loss.kind)
    assert cfg.retina_box_loss.kind == "l1" and cfg.rpn_neg_pos_ub == -1.0


def test_overrides_dicts_update_and_dataclasses_replace():
    cfg = libra_model_config("faster_rcnn", roi_sampler={"num": 64}, bfp={"refine_type": "conv"}, min_size=600)
    assert cfg.roi_sampler.num == 64 and cfg.roi_sampler.neg_balance and cfg.roi_sampler.pos_balance
    assert cfg.bfp == BalancedFeaturePyramidConfig(enabled=True, refine_level=2, refine_type="conv")
    assert cfg.min_size == 600

    sampler = SamplerConfig(num=64)
    cfg = libra_model_config("faster_rcnn", roi_sampler=sampler)
    assert cfg.roi_sampler == sampler and not cfg.roi_sampler.neg_balance
    assert cfg.roi_sampler is not sampler  # copied

    base = ModelConfig()
    changed = apply_overrides(base, {"box_loss": {"kind": "l1"}})
    assert base.box_loss.kind == "smooth_l1" and changed.box_loss.kind == "l1"


@pytest.mark.parametrize("overrides,match", [
    ({"fpn_chanels": 32}, "unknown ModelConfig field 'fpn_chanels'"),
    ({"roi_sampler": {"bins": 3}}, r"unknown SamplerConfig field\(s\) \['bins'\]"),
    ({"roi_sampler": BoxLossConfig()}, "roi_sampler"),
    ({"bfp": {"refine_level": 5}}, "bfp.refine_level"),
    ({"bfp": {"refine_type": "attention"}}, "bfp.refine_type"),
    ({"box_loss": {"kind": "giou"}}, "box_loss.kind"),
    ({"retina_box_loss": {"kind": "balanced_l1", "gamma": -1.0}}, "retina_box_loss"),
    ({"roi_sampler": {"pos_fraction": 1.5}}, "roi_sampler.pos_fraction"),
    ({"num_classes": 1}, "num_classes"),
    ({"norm": "syncbn"}, "norm"),
    ({"neck": "bifpn"}, "neck"),
    ({"trainable_backbone_layers": 6}, "trainable_backbone_layers"),
    ({"rpn_neg_pos_ub": -2.0}, "rpn_neg_pos_ub"),
    ({"min_size": 0}, "min_size"),
])
def test_bad_configs_raise_value_error_naming_the_field(overrides, match):
    with pytest.raises(ValueError, match=match):
        libra_model_config("faster_rcnn", **overrides)


def test_bad_arch_or_backbone():
    with pytest.raises(ValueError, match="arch"):
        libra_model_config("mask_rcnn")
    with pytest.raises(ValueError, match="backbone"):
        baseline_model_config("faster_rcnn", "vgg16")
    with pytest.raises(ValueError, match="arch"):
        build_model(dataclasses.replace(ModelConfig(), arch="ssd"))


NAMED_BUILDERS = {
    "faster_rcnn_resnet50_fpn": ("faster_rcnn", "resnet50", False),
    "faster_rcnn_resnet101_fpn": ("faster_rcnn", "resnet101", False),
    "faster_rcnn_resnext101_64x4d_fpn": ("faster_rcnn", "resnext101_64x4d", False),
    "libra_faster_rcnn_resnet50_fpn": ("faster_rcnn", "resnet50", True),
    "libra_faster_rcnn_resnet101_fpn": ("faster_rcnn", "resnet101", True),
    "libra_faster_rcnn_resnext101_64x4d_fpn": ("faster_rcnn", "resnext101_64x4d", True),
    "retinanet_resnet50_fpn": ("retinanet", "resnet50", False),
    "libra_retinanet_resnet50_fpn": ("retinanet", "resnet50", True),
    "rpn_resnet50_fpn": ("rpn", "resnet50", False),
    "rpn_resnet101_fpn": ("rpn", "resnet101", False),
    "rpn_resnext101_64x4d_fpn": ("rpn", "resnext101_64x4d", False),
    "libra_rpn_resnet50_fpn": ("rpn", "resnet50", True),
    "fast_rcnn_resnet50_fpn": ("fast_rcnn", "resnet50", False),
    "libra_fast_rcnn_resnet50_fpn": ("fast_rcnn", "resnet50", True),
    "cascade_rcnn_resnet50_fpn": ("cascade_rcnn", "resnet50", False),
    "libra_cascade_rcnn_resnet50_fpn": ("cascade_rcnn", "resnet50", True),
}


@pytest.mark.parametrize("name", sorted(NAMED_BUILDERS))
def test_named_builders_use_the_matching_config(name, monkeypatch):
    arch, backbone, libra = NAMED_BUILDERS[name]
    seen = []
    monkeypatch.setattr(builders, "build_model", lambda cfg: seen.append(cfg) or cfg)
    cfg = getattr(builders, name)(num_classes=21, weights_backbone=None, min_size=512)
    make_config = libra_model_config if libra else baseline_model_config
    assert seen == [cfg]
    assert cfg == make_config(arch, backbone, num_classes=21, min_size=512)


def test_named_builder_weights_become_a_config_string(monkeypatch):
    monkeypatch.setattr(builders, "build_model", lambda cfg: cfg)
    cfg = builders.libra_faster_rcnn_resnet50_fpn(
        weights_backbone=torchvision.models.ResNet50_Weights.IMAGENET1K_V1)
    assert cfg.backbone_weights == "ResNet50_Weights.IMAGENET1K_V1"
    assert builders.libra_faster_rcnn_resnet50_fpn(weights_backbone="DEFAULT").backbone_weights == "DEFAULT"
    with pytest.raises(ValueError, match="fixes 'backbone'"):
        builders.libra_faster_rcnn_resnet50_fpn(backbone="resnet18")
    with pytest.raises(ValueError, match="weights_backbone"):
        builders.libra_faster_rcnn_resnet50_fpn(weights_backbone=3)
    with pytest.raises(TypeError):
        builders.libra_faster_rcnn_resnet50_fpn(81)  # keyword-only


@pytest.mark.parametrize("name,cls,arch", [
    ("libra_faster_rcnn_resnet50_fpn", LibraFasterRCNN, "faster_rcnn"),
    ("retinanet_resnet50_fpn", LibraRetinaNet, "retinanet"),
    ("libra_rpn_resnet50_fpn", LibraRPN, "rpn"),
    ("libra_fast_rcnn_resnet50_fpn", LibraFastRCNN, "fast_rcnn"),
    ("libra_cascade_rcnn_resnet50_fpn", LibraCascadeRCNN, "cascade_rcnn"),
])
def test_named_builders_build_real_models(name, cls, arch):
    model = getattr(builders, name)(**builders.used_settings(arch, TINY))
    assert type(model) is cls
    assert model.backbone.body.layer1[0].conv3.in_channels == 64  # a bottleneck ResNet-50
    assert (model.backbone.bfp is not None) == name.startswith("libra")
    assert model.backbone.out_channels == 16


# arguments that would have no effect raise, naming them


@pytest.mark.parametrize("name", sorted(NAMED_BUILDERS))
def test_named_builders_refuse_arguments_without_effect(name):
    arch = NAMED_BUILDERS[name][0]
    builder = getattr(builders, name)
    # torchvision's argument names that are not settings here
    with pytest.raises(ValueError, match="box_batch_size_per_image"):
        builder(box_batch_size_per_image=128)
    # settings this architecture never reads
    ignored = builders.UNUSED_FIELDS[arch][0]
    with pytest.raises(ValueError, match=ignored):
        builder(**{ignored: getattr(ModelConfig(), ignored)})


@pytest.mark.parametrize("make", [baseline_model_config, libra_model_config])
@pytest.mark.parametrize("arch", builders.ARCHS)
def test_config_factories_refuse_settings_the_architecture_ignores(make, arch):
    for field in builders.UNUSED_FIELDS[arch]:
        with pytest.raises(ValueError, match=f"does not use \\['{field}'\\]"):
            make(arch, "resnet18", **{field: getattr(ModelConfig(), field)})
    make(arch, "resnet18", **builders.used_settings(arch, {"min_size": 64, "rpn_neg_pos_ub": 3.0,
                                                          "representation_size": 32}))


@pytest.mark.parametrize("arch", builders.ARCHS)
def test_detector_classes_take_only_what_they_use(arch):
    # the detectors take built parts; torchvision's size and sampling arguments, which they
    # would otherwise swallow, are not theirs: Python refuses them by name
    model = build_model(libra_model_config(
        arch, "resnet18", fpn_channels=8, **builders.used_settings(arch, {"representation_size": 8})))
    cls = type(model)
    names = {"faster_rcnn": ("backbone", "rpn", "roi_heads", "transform"),
             "cascade_rcnn": ("backbone", "rpn", "roi_heads", "transform"),
             "fast_rcnn": ("backbone", "roi_heads", "transform"),
             "rpn": ("backbone", "rpn", "transform"),
             "retinanet": ("backbone", "head", "anchor_generator", "transform")}[arch]
    parts = [getattr(model, name) for name in names]
    extra = {"num_classes": 5} if arch == "retinanet" else {}
    cls(*parts, **extra)
    with pytest.raises(TypeError, match="box_batch_size_per_image"):
        cls(*parts, box_batch_size_per_image=128, **extra)
