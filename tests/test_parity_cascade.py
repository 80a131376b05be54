"""Cascade R-CNN against mmdetection 3.3: its Cascade R-CNN R-50 (random weights, saved in the
2.x and 3.x checkpoint layouts) converted with ``libra-rcnn convert-mmdet --config
cascade_rcnn_r50_fpn_1x_coco`` gives its detections through ``libra-rcnn predict``, and its
training losses with exhaustive sampling; so does the Libra Cascade R-CNN that mmdetection
builds from its parts (its Cascade R-CNN config with the Libra Faster R-CNN's neck, samplers and
box loss) against ``libra_cascade_rcnn_r50_fpn_1x_coco`` (its detections are measured by
``benchmarks/parity.py``)."""

from __future__ import annotations

import json

import pytest
import torch

from libra_rcnn.cli import main
from libra_rcnn.config import load_config
from libra_rcnn.data.coco_classes import COCO_CATEGORIES
from libra_rcnn.engine.checkpoint import CheckpointError
from libra_rcnn.engine.convert_mmdet import convert_mmdet_checkpoint
from mmdet_oracle import (
    CASCADE_CONFIG,
    build_libra_cascade_rcnn,
    build_model as build_mmdet_model,
    count_matched,
    detector_like,
    load_config as load_mmdet_config,
    mmdet_detections,
    photo_like,
    randomize_model,
    save_checkpoint,
    training_losses,
)

# Every test here needs mmdetection as the oracle: without it the ``mmdet`` fixture skips them
# with mmdet_oracle.SKIP_REASON ("pip install -e .[parity]").
pytestmark = pytest.mark.usefixtures("mmdet")

OURS = {"cascade": "cascade_rcnn_r50_fpn_1x_coco",
        "libra_cascade": "libra_cascade_rcnn_r50_fpn_1x_coco"}
CLS_SCALE = 0.06
# sides that are not multiples of 32, before and after mmdetection's resize (to 706 x 1333)
IMAGE_SIZE = (530, 1000)


def _coco_classes(mm):
    return list(mm.mmdet.datasets.CocoDataset.METAINFO["classes"])


@pytest.fixture(scope="module")
def converted(tmp_path_factory, mmdet):
    """name -> (mmdetection model, our converted checkpoint), R-50, random weights; Cascade
    R-CNN saved as a 2.x and a 3.x checkpoint, both converted (the 2.x one returned)."""
    folder = tmp_path_factory.mktemp("parity_cascade")
    out = {}
    builders = {"cascade": lambda: build_mmdet_model(CASCADE_CONFIG),
                "libra_cascade": build_libra_cascade_rcnn}
    for name, build in builders.items():
        # the classifiers scaled less than Faster R-CNN's (0.02): the softmax of three stages'
        # mean logits would stay near 1/81 and few detections would pass the 0.05 threshold
        model = detector_like(randomize_model(build(), seed=1), rcnn_cls_scale=CLS_SCALE)
        styles = ("2.x", "3.x") if name == "cascade" else ("3.x",)
        for style in styles:
            src, dst = folder / f"{name}_{style}_mmdet.pth", folder / f"{name}_{style}_ours.pth"
            save_checkpoint(model, str(src), classes=_coco_classes(mmdet), style=style)
            assert main(["convert-mmdet", str(src), str(dst), "--config", OURS[name]]) == 0
        out[name] = (model, folder / f"{name}_{styles[0]}_ours.pth")
    return out


def test_our_cascade_settings_are_mmdetections(mmdet):
    ref = load_mmdet_config(CASCADE_CONFIG).model
    ours = load_config(OURS["cascade"]).model
    stages = ref.train_cfg.rcnn
    assert ours.cascade.num_stages == ref.roi_head.num_stages == len(stages)
    assert ours.cascade.stage_loss_weights == ref.roi_head.stage_loss_weights
    assert ours.cascade.iou_thresholds == [s.assigner.pos_iou_thr for s in stages] \
        == [s.assigner.neg_iou_thr for s in stages] == [s.assigner.min_pos_iou for s in stages]
    assert not any(s.assigner.match_low_quality for s in stages)
    heads = ref.roi_head.bbox_head
    assert [list(s) for s in ours.cascade.box_coder_stds] == [h.bbox_coder.target_stds for h in heads]
    assert all(h.reg_class_agnostic for h in heads)
    assert all((h.loss_bbox.type, h.loss_bbox.beta) == ("SmoothL1Loss", ours.box_loss.beta)
               for h in heads) and ours.box_loss.kind == "smooth_l1"
    assert all(s.sampler.num == ours.roi_sampler.num and s.sampler.add_gt_as_proposals
               for s in stages)
    assert ref.train_cfg.rpn_proposal.max_per_img == ours.rpn_post_nms_top_n_train == 2000
    assert ref.train_cfg.rpn.allowed_border == ours.rpn_allowed_border == 0
    assert (ref.rpn_head.loss_bbox.type, ref.rpn_head.loss_bbox.beta) == (
        "SmoothL1Loss", ours.rpn_box_loss.beta)


def test_both_checkpoint_layouts_convert_to_the_same_model(converted, tmp_path):
    folder = converted["cascade"][1].parent
    two, three = (torch.load(folder / f"cascade_{style}_ours.pth", weights_only=True)
                  for style in ("2.x", "3.x"))
    assert two["model"].keys() == three["model"].keys()
    assert all(torch.equal(two["model"][k], three["model"][k]) for k in two["model"])
    assert two["class_names"] == three["class_names"] and len(two["class_names"]) == 80
    assert two["converted_from"]["model"] == "Cascade R-CNN (3 stages), ResNet-50, FPN, 80 classes"


def test_predict_on_a_converted_checkpoint_gives_mmdetections_detections(converted, mmdet,
                                                                         tmp_path):
    # (Libra Cascade R-CNN's detections: benchmarks/parity.py; its pyramid is tested with Libra
    # Faster R-CNN's, its stages here, so the suite spends its minute on the losses)
    model, checkpoint = converted["cascade"]
    rgb = photo_like(*IMAGE_SIZE, seed=2)
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
    cat_ids = [cat_id for cat_id, _ in COCO_CATEGORIES]
    labels = torch.tensor([p["category_id"] for p in predictions])
    ref_cat = torch.tensor([cat_ids[int(label) - 1] for label in ref_labels])
    matched = count_matched(boxes, scores, labels, ref_boxes.double(), ref_scores.double(), ref_cat)
    assert matched >= 99, f"{matched} of {len(ref_boxes)} detections within tolerance"


@pytest.mark.parametrize("name", ["cascade", "libra_cascade"])
def test_training_losses_match_with_exhaustive_sampling(name, converted):
    model, checkpoint = converted[name]
    weights = torch.load(checkpoint, weights_only=True)["model"]
    # 500 proposals per image instead of 2000: four times fewer RoIs through the three stages
    ours, expected = training_losses(model, OURS[name], weights, "cascade_rcnn", proposals=500)
    assert len(expected) == 8  # the RPN's two and two per stage
    for key, value in expected.items():
        torch.testing.assert_close(ours[key], value.to(ours[key].dtype), rtol=2e-4, atol=1e-6)


def test_a_cascade_checkpoint_against_a_faster_rcnn_config_names_what_it_is(converted, tmp_path):
    src = converted["cascade"][1].parent / "cascade_2.x_mmdet.pth"
    with pytest.raises(CheckpointError, match=r"looks like: Cascade R-CNN \(3 stages\), ResNet-50"):
        convert_mmdet_checkpoint(src, tmp_path / "out.pth",
                                 load_config("faster_rcnn_r50_fpn_1x_coco"))
    assert not (tmp_path / "out.pth").exists()
