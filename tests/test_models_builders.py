"""Builder tests: Libra / baseline configurations, overrides, validation of the config, and the
torchvision-style named builders."""

from __future__ import annotations

import dataclasses
import inspect

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


def _mmdet_sampler(mmdet, cfg):
    """mmdetection's sampler built from a config dict: its attributes are the values in use,
    defaults of its classes included."""
    return mmdet.TASK_UTILS.build(cfg)


def _assert_libra_roi_settings(cfg, mm_cfg, mmdet):
    """The Libra parts of an R-CNN: mmdetection's sampler, box loss and pyramid."""
    sampler = _mmdet_sampler(mmdet, mm_cfg.model.train_cfg.rcnn.sampler)
    assert (cfg.roi_sampler.num, cfg.roi_sampler.pos_fraction, cfg.roi_sampler.neg_pos_ub,
            cfg.roi_sampler.add_gt_as_proposals) == (sampler.num, sampler.pos_fraction,
                                                     sampler.neg_pos_ub, sampler.add_gt_as_proposals)
    assert cfg.roi_sampler.pos_balance == (type(sampler.pos_sampler).__name__
                                           == "InstanceBalancedPosSampler")
    neg = sampler.neg_sampler
    assert cfg.roi_sampler.neg_balance == (type(neg).__name__ == "IoUBalancedNegSampler")
    assert (cfg.roi_sampler.num_bins, cfg.roi_sampler.floor_thr, cfg.roi_sampler.floor_fraction) \
        == (neg.num_bins, neg.floor_thr, neg.floor_fraction)
    loss = mm_cfg.model.roi_head.bbox_head.loss_bbox
    assert loss.type == "BalancedL1Loss" and cfg.box_loss.kind == "balanced_l1"
    assert (cfg.box_loss.alpha, cfg.box_loss.gamma, cfg.box_loss.beta, cfg.box_loss.loss_weight) \
        == (loss.alpha, loss.gamma, loss.beta, loss.loss_weight)
    bfp = mm_cfg.model.neck[1]
    assert bfp.type == "BFP" and cfg.bfp.enabled
    assert (cfg.bfp.refine_level, cfg.bfp.refine_type) == (bfp.refine_level, bfp.refine_type)


def test_libra_configs_take_mmdetections_libra_settings(mmdet):
    from mmdet_oracle import load_config

    mm_faster = load_config("libra-faster-rcnn_r50_fpn_1x_coco.py")
    cfg = libra_model_config("faster_rcnn")
    assert cfg.arch == "faster_rcnn" and cfg.backbone == "resnet50"
    _assert_libra_roi_settings(cfg, mm_faster, mmdet)
    rpn_sampler = _mmdet_sampler(mmdet, mm_faster.model.train_cfg.rpn.sampler)
    assert (cfg.rpn_neg_pos_ub, cfg.rpn_batch_size_per_image, cfg.rpn_positive_fraction) == (
        rpn_sampler.neg_pos_ub, rpn_sampler.num, rpn_sampler.pos_fraction)
    assert cfg.representation_size == mm_faster.model.roi_head.bbox_head.fc_out_channels
    test = mm_faster.model.test_cfg.rcnn
    assert (cfg.box_score_thresh, cfg.box_nms_thresh, cfg.box_detections_per_img) == (
        test.score_thr, test.nms.iou_threshold, test.max_per_img)
    resize = next(t for t in mm_faster.train_pipeline if t.type == "Resize")
    assert (cfg.max_size, cfg.min_size) == tuple(resize.scale)

    fast = libra_model_config("fast_rcnn", "resnet101")
    assert fast.backbone == "resnet101"
    _assert_libra_roi_settings(fast, load_config("libra-fast-rcnn_r50_fpn_1x_coco.py"), mmdet)

    mm_retina = load_config("libra-retinanet_r50_fpn_1x_coco.py")
    retina = libra_model_config("retinanet")
    bfp, loss = mm_retina.model.neck[1], mm_retina.model.bbox_head.loss_bbox
    assert retina.bfp.enabled and (retina.bfp.refine_level, retina.bfp.refine_type) == (
        bfp.refine_level, bfp.refine_type)
    assert loss.type == "BalancedL1Loss" and retina.retina_box_loss.kind == "balanced_l1"
    assert (retina.retina_box_loss.alpha, retina.retina_box_loss.gamma,
            retina.retina_box_loss.beta) == (loss.alpha, loss.gamma, loss.beta)

    # mmdetection ships no Libra RPN config: Libra RPN (Table 3) is the RPN of its Libra Faster
    # R-CNN with the balanced L1 loss on the anchors
    rpn = libra_model_config("rpn")
    assert rpn.bfp == cfg.bfp and rpn.rpn_neg_pos_ub == rpn_sampler.neg_pos_ub
    assert rpn.rpn_box_loss.kind == "balanced_l1"


def _torchvision_defaults(cls) -> dict:
    return {name: p.default for name, p in inspect.signature(cls).parameters.items()
            if p.default is not inspect.Parameter.empty}


@pytest.mark.parametrize("arch", builders.ARCHS)
def test_baseline_configs_are_torchvisions_with_every_switch_off(arch):
    cfg = baseline_model_config(arch)
    assert cfg.arch == arch
    assert not cfg.bfp.enabled and cfg.neck == "fpn"
    assert not cfg.roi_sampler.pos_balance and not cfg.roi_sampler.neg_balance
    assert "balanced_l1" not in (cfg.box_loss.kind, cfg.rpn_box_loss.kind, cfg.retina_box_loss.kind)
    assert cfg.retina_box_loss.kind == "l1" and cfg.rpn_neg_pos_ub == -1.0
    # torchvision's own defaults (its constructors' signatures), which its weights were trained
    # and are evaluated with
    if arch == "retinanet":
        tv = _torchvision_defaults(torchvision.models.detection.RetinaNet)
        assert (cfg.min_size, cfg.max_size) == (tv["min_size"], tv["max_size"])
        return
    tv = _torchvision_defaults(torchvision.models.detection.FasterRCNN)
    assert (cfg.min_size, cfg.max_size) == (tv["min_size"], tv["max_size"])
    assert (cfg.roi_sampler.num, cfg.roi_sampler.pos_fraction) == (
        tv["box_batch_size_per_image"], tv["box_positive_fraction"])
    assert (cfg.box_score_thresh, cfg.box_nms_thresh, cfg.box_detections_per_img) == (
        tv["box_score_thresh"], tv["box_nms_thresh"], tv["box_detections_per_img"])
    assert (cfg.rpn_pre_nms_top_n_train, cfg.rpn_post_nms_top_n_train, cfg.rpn_pre_nms_top_n_test,
            cfg.rpn_post_nms_top_n_test, cfg.rpn_batch_size_per_image,
            cfg.rpn_positive_fraction) == (
        tv["rpn_pre_nms_top_n_train"], tv["rpn_post_nms_top_n_train"],
        tv["rpn_pre_nms_top_n_test"], tv["rpn_post_nms_top_n_test"],
        tv["rpn_batch_size_per_image"], tv["rpn_positive_fraction"])


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


def test_group_norm_head_needs_channels_in_groups_of_32():
    with pytest.raises(ValueError, match="fpn_channels is 48: use a multiple of 32"):
        libra_model_config("retinanet", retina_head_norm="gn", fpn_channels=48)
    assert libra_model_config("retinanet", retina_head_norm="gn", fpn_channels=64).fpn_channels == 64
    assert libra_model_config("retinanet", fpn_channels=48).fpn_channels == 48  # no group norm


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
    monkeypatch.setattr(builders, "_assemble", lambda cfg: seen.append(cfg) or cfg)
    cfg = getattr(builders, name)(num_classes=21, weights_backbone=None, min_size=512)
    make_config = libra_model_config if libra else baseline_model_config
    assert seen == [cfg]
    assert cfg == make_config(arch, backbone, num_classes=21, min_size=512)
    # what the name says, independently of the config factories
    assert (cfg.arch, cfg.backbone, cfg.num_classes, cfg.min_size) == (arch, backbone, 21, 512)
    assert cfg.bfp.enabled == libra
    box_loss = {"retinanet": cfg.retina_box_loss, "rpn": cfg.rpn_box_loss}.get(arch, cfg.box_loss)
    assert (box_loss.kind == "balanced_l1") == libra


def test_named_builder_weights_become_a_config_string(monkeypatch):
    monkeypatch.setattr(builders, "_assemble", lambda cfg: cfg)
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
