"""Whole detectors against mmdetection: its Libra Faster R-CNN and Libra RetinaNet, saved as
mmdetection checkpoints, converted with ``libra-rcnn convert-mmdet`` and run through
``libra-rcnn predict`` / our model must give mmdetection's detections and features; with
exhaustive sampling, the same weights give mmdetection's training losses."""

from __future__ import annotations

import json

import pytest
import torch

from libra_rcnn.cli import main
from libra_rcnn.config import load_config
from libra_rcnn.data.coco_classes import COCO_CATEGORIES
from libra_rcnn.engine.checkpoint import CheckpointError, load_model_from_checkpoint
from libra_rcnn.engine.convert_mmdet import convert_mmdet_checkpoint
from mmdet_oracle import (
    LIBRA_CONFIGS,
    build_model as build_mmdet_model,
    count_matched,
    detector_like,
    mmdet_detections,
    photo_like,
    randomize_model,
    save_checkpoint,
    training_losses,
)

# Every test here needs mmdetection as the oracle: without it the ``mmdet`` fixture skips them
# with mmdet_oracle.SKIP_REASON ("pip install -e .[parity]").
pytestmark = pytest.mark.usefixtures("mmdet")

OURS = {"faster_rcnn": "libra_faster_rcnn_r50_fpn_1x_coco",
        "retinanet": "libra_retinanet_r50_fpn_1x_coco"}


def _coco_classes(mm):
    return list(mm.mmdet.datasets.CocoDataset.METAINFO["classes"])


@pytest.fixture(scope="module")
def converted(tmp_path_factory, mmdet):
    """arch -> (mmdetection model, our converted checkpoint path), R-50, random weights."""
    out = {}
    folder = tmp_path_factory.mktemp("parity")
    for arch, style in (("faster_rcnn", "2.x"), ("retinanet", "3.x")):
        model = detector_like(randomize_model(build_mmdet_model(LIBRA_CONFIGS[(arch, "r50")]),
                                               seed=1))
        src, dst = folder / f"{arch}_mmdet.pth", folder / f"{arch}_ours.pth"
        save_checkpoint(model, str(src), classes=_coco_classes(mmdet), style=style)
        assert main(["convert-mmdet", str(src), str(dst), "--config", OURS[arch]]) == 0
        out[arch] = (model, dst)
    return out


@pytest.mark.parametrize("arch", ["faster_rcnn", "retinanet"])
def test_predict_on_a_converted_checkpoint_gives_mmdetections_detections(
        arch, converted, mmdet, tmp_path):
    model, checkpoint = converted[arch]
    rgb = photo_like(800, 1216, seed=2)  # 800 x 1216: mmdetection does not resize it
    ref_boxes, ref_scores, ref_labels = mmdet_detections(model, rgb)
    assert len(ref_boxes) == 100  # a full test: the detections cap is reached

    from PIL import Image

    Image.fromarray(rgb).save(tmp_path / "photo.png")
    assert main(["predict", str(checkpoint), str(tmp_path / "photo.png"), "--score-thresh", "0.0",
                 "--out-dir", str(tmp_path / "out")]) == 0
    predictions = json.loads((tmp_path / "out" / "predictions.json").read_text())
    assert len(predictions) == len(ref_boxes)
    xywh = torch.tensor([p["bbox"] for p in predictions], dtype=torch.float64)
    boxes = torch.cat([xywh[:, :2], xywh[:, :2] + xywh[:, 2:]], dim=1)
    scores = torch.tensor([p["score"] for p in predictions], dtype=torch.float64)
    # predictions carry COCO category ids: map mmdetection's labels the same way
    cat_ids = [cat_id for cat_id, _ in COCO_CATEGORIES]
    labels = torch.tensor([p["category_id"] for p in predictions])
    ref_cat = torch.tensor([cat_ids[int(label) - 1] for label in ref_labels])
    matched = count_matched(boxes, scores, labels, ref_boxes.double(), ref_scores.double(), ref_cat)
    assert matched >= 99, f"{matched} of {len(ref_boxes)} detections within tolerance"


@pytest.mark.parametrize("arch", ["faster_rcnn", "retinanet"])
def test_a_resized_image_gives_mmdetections_detections(arch, converted, mmdet):
    model, checkpoint = converted[arch]
    rgb = photo_like(480, 640, seed=3)  # mmdetection resizes it to 800 x 1067
    ref = mmdet_detections(model, rgb)
    ours, _ = load_model_from_checkpoint(checkpoint)
    with torch.no_grad():
        out = ours([torch.from_numpy(rgb).permute(2, 0, 1).float() / 255])[0]
    assert len(out["boxes"]) == len(ref[0]) > 0
    matched = count_matched(out["boxes"], out["scores"], out["labels"], *ref)
    assert matched >= 0.99 * len(ref[0]), f"{matched} of {len(ref[0])} detections within tolerance"


def _relative_error(ours: torch.Tensor, ref: torch.Tensor) -> float:
    return float((ours - ref).abs().max() / ref.abs().max())


@pytest.mark.parametrize("arch", ["faster_rcnn", "retinanet"])
def test_backbone_and_pyramid_features_match(arch, converted):
    model, checkpoint = converted[arch]
    ours, _ = load_model_from_checkpoint(checkpoint)
    batch = torch.randn(1, 3, 320, 480, generator=torch.Generator().manual_seed(4))  # normalised
    with torch.no_grad():
        stages = list(ours.backbone.body(batch).values())
        pyramid = list(ours.backbone(batch).values())
        ref_stages = model.backbone(batch)
        ref_pyramid = model.extract_feat(batch)
    ref_stages = ref_stages[-len(stages):]  # RetinaNet reads C3-C5 of the four
    assert len(pyramid) == len(ref_pyramid) == 5
    for ours_level, ref_level in zip(stages + pyramid, list(ref_stages) + list(ref_pyramid)):
        assert ours_level.shape == ref_level.shape
        assert _relative_error(ours_level, ref_level) < 1e-4


@pytest.mark.parametrize("arch,backbone,ours", [
    ("faster_rcnn", "r101", "libra_faster_rcnn_r101_fpn_1x_coco"),
    ("faster_rcnn", "x101-64x4d", "libra_faster_rcnn_x101_64x4d_fpn_1x_coco"),
    ("fast_rcnn", "r50", "ablation/table2_libra"),
])
def test_other_backbones_and_fast_rcnn_convert_to_every_weight(arch, backbone, ours, mmdet,
                                                               tmp_path):
    model = build_mmdet_model(LIBRA_CONFIGS[(arch, backbone)])
    save_checkpoint(model, str(tmp_path / "src.pth"), classes=_coco_classes(mmdet), style="2.x")
    summary = convert_mmdet_checkpoint(tmp_path / "src.pth", tmp_path / "dst.pth", load_config(ours))
    converted_model, meta = load_model_from_checkpoint(tmp_path / "dst.pth")  # strict load
    assert meta["class_names"] == _coco_classes(mmdet)
    state = converted_model.state_dict()
    # every mmdetection tensor arrived (the classifier with the background moved to the front)
    source = model.state_dict()
    assert torch.equal(state["backbone.body.layer4.2.conv3.weight"],
                       source["backbone.layer4.2.conv3.weight"])
    cls = source["roi_head.bbox_head.fc_cls.weight"]
    assert torch.equal(state["roi_heads.box_predictor.cls_score.weight"][0], cls[-1])
    assert torch.equal(state["roi_heads.box_predictor.cls_score.weight"][1:], cls[:-1])
    assert summary["converted"] == len(state)


def test_rpn_only_checkpoints_convert(mmdet, tmp_path):
    model = build_mmdet_model("rpn/rpn_r50_fpn_1x_coco.py")
    save_checkpoint(model, str(tmp_path / "src.pth"), classes=[], style="3.x")
    convert_mmdet_checkpoint(tmp_path / "src.pth", tmp_path / "dst.pth",
                             load_config("rpn_r50_fpn_1x_coco"), class_names=["object"])
    ours, _ = load_model_from_checkpoint(tmp_path / "dst.pth")
    assert torch.equal(ours.state_dict()["rpn.head.cls_logits.weight"],
                       model.state_dict()["bbox_head.rpn_cls.weight"])  # RPN-only: bbox_head


def test_wrong_files_get_a_clear_error(converted, tmp_path, capsys):
    model, _ = converted["retinanet"]
    src = tmp_path / "retina.pth"
    save_checkpoint(model, str(src), classes=[str(i) for i in range(80)])
    # a RetinaNet checkpoint against a Faster R-CNN config: names what the file looks like
    with pytest.raises(CheckpointError, match="looks like: RetinaNet, ResNet-50, FPN \\+ balanced"):
        convert_mmdet_checkpoint(src, tmp_path / "out.pth",
                                 load_config("libra_faster_rcnn_r50_fpn_1x_coco"))
    # a torchvision-convention config would not give mmdetection's detections
    with pytest.raises(CheckpointError, match="convention"):
        convert_mmdet_checkpoint(src, tmp_path / "out.pth",
                                 load_config(OURS["retinanet"], ["model.convention=torchvision"]))
    (tmp_path / "junk.pth").write_bytes(b"not a checkpoint")
    assert main(["convert-mmdet", str(tmp_path / "junk.pth"), str(tmp_path / "out.pth"),
                 "--config", OURS["retinanet"]]) == 2
    assert "junk.pth: not a PyTorch checkpoint file" in capsys.readouterr().err
    assert not (tmp_path / "out.pth").exists()


# --------------------------------------------------------------------------------------------
# training losses


@pytest.mark.parametrize("arch", ["faster_rcnn", "retinanet"])
def test_training_losses_match_with_exhaustive_sampling(arch, converted):
    model, checkpoint = converted[arch]
    weights = torch.load(checkpoint, weights_only=True)["model"]
    ours, expected = training_losses(model, OURS[arch], weights, arch)
    for key, value in expected.items():
        torch.testing.assert_close(ours[key], value.to(ours[key].dtype), rtol=2e-4, atol=1e-6)


def test_coco_class_names_are_mmdetections(mmdet):
    from libra_rcnn.data.coco_classes import COCO_CLASS_NAMES

    assert list(COCO_CLASS_NAMES) == _coco_classes(mmdet)
