"""The mmdetection oracle harness itself (tests/mmdet_oracle.py): the ``mmcv._ext`` stand-in,
the Libra builders, reproducible randomisation and mmdetection-style checkpoints."""

from __future__ import annotations

import copy
import sys

import pytest
import torch
import torchvision

import mmdet_oracle as oracle

# Every test here needs mmdetection: without it the ``mmdet`` fixture skips them with
# mmdet_oracle.SKIP_REASON ("pip install -e .[parity]").
pytestmark = pytest.mark.usefixtures("mmdet")


@pytest.fixture(scope="module")
def faster_rcnn():
    return oracle.randomize_model(oracle.build_libra_faster_rcnn(num_classes=5), seed=3)


def test_stand_in_kernels_are_torchvision_ops():
    from mmcv.ops import RoIAlign, nms

    ext = sys.modules["mmcv._ext"]
    if getattr(ext, "__file__", None):  # a compiled mmcv: nothing of ours to test
        pytest.skip("mmcv has its compiled ops")
    g = torch.Generator().manual_seed(0)
    xy = torch.rand(50, 2, generator=g) * 100
    boxes = torch.cat([xy, xy + 5 + torch.rand(50, 2, generator=g) * 40], dim=1)
    scores = torch.rand(50, generator=g)
    _, keep = nms(boxes, scores, 0.5)
    assert torch.equal(keep, torchvision.ops.nms(boxes, scores, 0.5))

    features = torch.randn(2, 8, 32, 32, generator=g)
    rois = torch.cat([torch.tensor([[0.0], [1.0], [1.0]]), boxes[:3]], dim=1)  # (image, box)
    pooled = RoIAlign((7, 7), spatial_scale=0.25, sampling_ratio=0, aligned=True)(features, rois)
    assert torch.equal(pooled, torchvision.ops.roi_align(features, rois, (7, 7), 0.25, 0, True))

    with pytest.raises(NotImplementedError, match="deform_conv_forward"):
        ext.deform_conv_forward()
    with pytest.raises(AttributeError):
        ext.__wrapped__  # noqa: B018  (dunder look-ups fail as on any module)


def test_every_libra_config_is_shipped():
    for name in oracle.LIBRA_CONFIGS.values():
        assert oracle.load_config(name).model.type in ("FasterRCNN", "FastRCNN", "RetinaNet")
    with pytest.raises(FileNotFoundError, match="no-such-config"):
        oracle.config_path("no-such-config.py")


def test_faster_rcnn_is_libra_and_randomised(faster_rcnn):
    neck_types = [type(m).__name__ for m in faster_rcnn.neck]
    assert neck_types == ["FPN", "BFP"]
    assert faster_rcnn.roi_head.bbox_head.num_classes == 5
    # mmdetection starts the non-local output conv at zero; randomised, it is not
    assert faster_rcnn.neck[1].refine.conv_out.conv.weight.abs().sum() > 0
    variance = faster_rcnn.backbone.bn1.running_var
    assert (variance > 0).all() and not torch.allclose(variance, torch.ones_like(variance))
    image = torch.randn(1, 3, 128, 160, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        features = faster_rcnn.extract_feat(image)
    assert all(torch.isfinite(f).all() and 0.1 < f.std() < 20 for f in features)


def test_randomisation_is_reproducible(faster_rcnn):
    # every weight and statistic is overwritten, so re-randomising a copy reproduces it
    again = oracle.randomize_model(copy.deepcopy(faster_rcnn), seed=3)
    other = oracle.randomize_model(copy.deepcopy(faster_rcnn), seed=4)
    ours, theirs = faster_rcnn.state_dict(), again.state_dict()
    assert ours.keys() == theirs.keys()
    assert all(torch.equal(ours[k], theirs[k]) for k in ours)
    key = "rpn_head.rpn_cls.weight"
    assert not torch.equal(ours[key], other.state_dict()[key])


@pytest.mark.parametrize("style,classes_key",
                         [("2.x", ("CLASSES",)), ("3.x", ("dataset_meta", "classes"))])
def test_checkpoint_loads_with_weights_only(faster_rcnn, tmp_path, style, classes_key):
    classes = ("a", "b", "c", "d", "e")
    path = tmp_path / f"libra_{style}.pth"
    oracle.save_checkpoint(faster_rcnn, str(path), classes=classes, style=style)
    loaded = torch.load(path, map_location="cpu", weights_only=True)
    meta = loaded["meta"]
    for key in classes_key:
        meta = meta[key]
    assert tuple(meta) == classes
    state = faster_rcnn.state_dict()
    assert loaded["state_dict"].keys() == state.keys()
    assert all(torch.equal(loaded["state_dict"][k], state[k]) for k in state)
    with pytest.raises(ValueError, match="style"):
        oracle.save_checkpoint(faster_rcnn, str(path), classes=classes, style="4.x")


def test_retinanet_builds():
    model = oracle.randomize_model(oracle.build_libra_retinanet(), seed=0)
    assert [type(m).__name__ for m in model.neck] == ["FPN", "BFP"]
    assert model.bbox_head.loss_bbox.beta == 0.11


@pytest.mark.slow
@pytest.mark.parametrize("backbone,kind,groups",
                         [("r101", "ResNet", 1), ("x101-64x4d", "ResNeXt", 64)])
def test_deeper_backbones_build(backbone, kind, groups):
    model = oracle.randomize_model(oracle.build_libra_faster_rcnn(backbone), seed=0)
    assert type(model.backbone).__name__ == kind and model.backbone.depth == 101
    assert getattr(model.backbone, "groups", 1) == groups
