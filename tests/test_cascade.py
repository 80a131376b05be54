"""Cascade R-CNN (libra_rcnn.models.cascade): the stages' own settings, refinement in training
(ground truth left out), test-time averaging of the stages' logits, IoU-balanced bins per stage,
the RPN's allowed border, and the errors of a cascade configuration."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torchvision.ops import box_iou

from libra_rcnn.cli import main
from libra_rcnn.config import CONFIG_DIR, ConfigError, load_config
from libra_rcnn.engine.checkpoint import describe_config_mismatch
from libra_rcnn.models import (
    CascadeConfig,
    CascadeRoIHeads,
    LibraCascadeRCNN,
    ModelConfig,
    baseline_model_config,
    build_model,
    check_model_config,
    libra_model_config,
    refine_boxes,
)
from libra_rcnn.models.faster_rcnn import box_head_and_predictor

pytestmark = pytest.mark.usefixtures("one_intra_op_thread")

REPO_ROOT = Path(__file__).resolve().parents[1]

SMALL = dict(num_classes=5, min_size=64, max_size=96, fpn_channels=16, representation_size=32,
             rpn_pre_nms_top_n_train=100, rpn_post_nms_top_n_train=60,
             rpn_pre_nms_top_n_test=100, rpn_post_nms_top_n_test=60, roi_sampler={"num": 32})
MMDET_STDS = [(0.1, 0.1, 0.2, 0.2), (0.05, 0.05, 0.1, 0.1), (0.033, 0.033, 0.067, 0.067)]


def _model(libra=False, settings="torchvision", seed=0, **overrides):
    make = libra_model_config if libra else baseline_model_config
    torch.manual_seed(seed)
    return build_model(make("cascade_rcnn", "resnet18", settings=settings, **{**SMALL, **overrides}),
                       generator=torch.Generator().manual_seed(seed))


def _images(seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.rand(3, 64, 80, generator=g), torch.rand(3, 72, 56, generator=g)]


def _targets():
    return [{"boxes": torch.tensor([[5.0, 6.0, 40.0, 50.0], [20.0, 10.0, 70.0, 40.0]]),
             "labels": torch.tensor([1, 3])},
            {"boxes": torch.tensor([[8.0, 8.0, 50.0, 60.0]]), "labels": torch.tensor([2])}]


# ---------------------------------------------------------------------------------------------
# the stages


@pytest.mark.parametrize("settings", ["torchvision", "mmdet"])
def test_each_stage_has_its_threshold_coder_and_own_head(settings):
    model = _model(libra=True, settings=settings)
    assert isinstance(model, LibraCascadeRCNN) and model.num_classes == 5
    assert model.backbone.bfp is not None  # one balanced pyramid under every stage
    stages = model.roi_heads.stages
    assert len(stages) == 3 and model.roi_heads.stage_loss_weights == (1.0, 0.5, 0.25)
    assert [(s.proposal_matcher.high_threshold, s.proposal_matcher.low_threshold,
             s.proposal_matcher.allow_low_quality_matches) for s in stages] == [
        (0.5, 0.5, False), (0.6, 0.6, False), (0.7, 0.7, False)]
    for stage, stds in zip(stages, MMDET_STDS):
        # deltas are divided by mmdetection's stds: torchvision weights 1 / std
        assert stage.box_coder.weights == pytest.approx(tuple(1 / s for s in stds))
        if settings == "mmdet":
            assert stage.box_coder.stds == pytest.approx(stds)
        assert stage.box_predictor.bbox_pred.out_features == 4  # class-agnostic
        assert stage.box_predictor.cls_score.out_features == 5
        assert stage.sampler.pos_balance and stage.sampler.neg_balance
        assert stage.box_loss.kind == "balanced_l1"
    weights = {id(s.box_head.fc6.weight) for s in stages} | {id(s.box_predictor.cls_score.weight)
                                                             for s in stages}
    assert len(weights) == 6  # no head shared between stages


def test_cascade_stages_differ_from_faster_rcnn_only_where_cascade_settings_say():
    base = baseline_model_config("cascade_rcnn")
    assert base.cascade == CascadeConfig()
    assert (base.cascade.iou_thresholds, base.cascade.stage_loss_weights,
            base.cascade.box_coder_stds) == ([0.5, 0.6, 0.7], [1.0, 0.5, 0.25], MMDET_STDS)
    mmdet = baseline_model_config("cascade_rcnn", settings="mmdet")
    assert (mmdet.rpn_post_nms_top_n_train, mmdet.rpn_allowed_border) == (2000, 0.0)
    assert (mmdet.box_loss.kind, mmdet.box_loss.beta) == ("smooth_l1", 1.0)
    assert (mmdet.rpn_box_loss.kind, mmdet.rpn_box_loss.beta) == ("smooth_l1", 1.0 / 9.0)
    assert mmdet.roi_sampler.binning == "negatives"  # per-stage bins (see the configs)
    libra = libra_model_config("cascade_rcnn", settings="mmdet")
    faster = libra_model_config("faster_rcnn", settings="mmdet")
    assert (libra.bfp, libra.box_loss, libra.rpn_neg_pos_ub) == (faster.bfp, faster.box_loss, 5.0)
    assert dataclasses.replace(libra.roi_sampler, binning="all_candidates") == faster.roi_sampler


@pytest.mark.parametrize("settings", ["torchvision", "mmdet"])
def test_training_refines_the_sampled_rois_without_the_added_ground_truth(settings, monkeypatch):
    model = _model(settings=settings).train()
    seen = []
    for k, stage in enumerate(model.roi_heads.stages):
        def spy_sample(proposals, targets, stage=stage, k=k, original=stage.sample_training_rois):
            out = original(proposals, targets)
            seen.append({"stage": k, "input": [p.clone() for p in proposals], "sampled": out})
            return out

        def spy_outputs(features, proposals, shapes, original=stage.box_outputs):
            out = original(features, proposals, shapes)
            seen[-1]["outputs"], seen[-1]["shapes"] = out, shapes
            return out

        monkeypatch.setattr(stage, "sample_training_rois", spy_sample)
        monkeypatch.setattr(stage, "box_outputs", spy_outputs)
    losses = model(_images(), _targets())
    assert [s["stage"] for s in seen] == [0, 1, 2]
    for before, after, stage in zip(seen, seen[1:], model.roi_heads.stages):
        rois, _, labels, _, from_gt = before["sampled"]
        assert sum(int(g.sum()) for g in from_gt) > 0  # ground truth was sampled ...
        moved = refine_boxes(stage.box_coder, before["outputs"][1], rois, before["shapes"])
        expected = [boxes[~gt] for boxes, gt in zip(moved, from_gt)]
        for got, want, rois_i, gt, (height, width) in zip(after["input"], expected, rois,
                                                            from_gt, before["shapes"]):
            assert got.shape[0] == rois_i.shape[0] - int(gt.sum())  # ... and left out
            torch.testing.assert_close(got, want)
            assert got[:, 0::2].min() >= 0 and got[:, 2].max() <= width  # clipped
            assert got[:, 1::2].min() >= 0 and got[:, 3].max() <= height
    # each stage's loss comes from its own samples, weighted
    for k, record in enumerate(seen):
        class_logits, _ = record["outputs"]
        labels = torch.cat(record["sampled"][2])
        weight = (1.0, 0.5, 0.25)[k]
        torch.testing.assert_close(losses[f"s{k}.loss_classifier"],
                                   F.cross_entropy(class_logits, labels) * weight)


def test_stage_loss_weights_scale_each_stage():
    default = _model(seed=1)
    flat = _model(seed=1, cascade={"stage_loss_weights": [1.0, 1.0, 1.0]})
    flat.load_state_dict(default.state_dict())
    a, b = default.train()(_images(), _targets()), flat.train()(_images(), _targets())
    for k, weight in enumerate((1.0, 0.5, 0.25)):
        for name in ("loss_classifier", "loss_box_reg"):
            torch.testing.assert_close(a[f"s{k}.{name}"], b[f"s{k}.{name}"] * weight)


@pytest.mark.parametrize("settings", ["torchvision", "mmdet"])
def test_inference_scores_are_the_softmax_of_the_stages_mean_logits(settings):
    model = _model(settings=settings).eval()
    with torch.no_grad():
        for stage in model.roi_heads.stages:  # spread the scores so a wrong rule shows
            stage.box_predictor.cls_score.weight.normal_(0, 0.3)
            stage.box_predictor.bbox_pred.weight.normal_(0, 0.05)
        image_list, _ = model.transform(_images())
        features = model.backbone(image_list.tensors)
        proposals, _ = model.rpn(image_list, features)
        shapes = image_list.image_sizes
        boxes, logits = proposals, []
        for stage in model.roi_heads.stages:
            class_logits, deltas = stage.box_outputs(features, boxes, shapes)
            logits.append(class_logits)
            last_boxes, boxes = boxes, refine_boxes(stage.box_coder, deltas, boxes, shapes)
        scores = F.softmax(sum(logits) / 3, dim=-1).split([b.shape[0] for b in last_boxes])
        detections = model.roi_heads.detect(features, proposals, shapes)
    for found, candidates, candidate_scores in zip(detections, boxes, scores):
        assert found["boxes"].shape[0] > 10
        # every detection is a last-stage box with the averaged score of its class
        distance = (found["boxes"][:, None] - candidates[None]).abs().amax(dim=2)
        nearest = distance.argmin(dim=1)
        assert distance.min(dim=1).values.max() < 1e-4
        torch.testing.assert_close(found["scores"], candidate_scores[nearest, found["labels"]])


# ---------------------------------------------------------------------------------------------
# IoU-balanced sampling per stage


def _boxes_at_ious(ious):
    """Boxes slid right along the ground truth ``[0, 0, 100, 100]`` to the given IoUs."""
    shifts = [100.0 * (1 - iou) / (1 + iou) for iou in ious]
    return torch.tensor([[d, 0.0, 100.0 + d, 100.0] for d in shifts])


@pytest.mark.parametrize("stage_index, threshold", [(0, 0.5), (1, 0.6), (2, 0.7)])
def test_each_stage_bins_its_own_negatives_below_its_threshold(stage_index, threshold):
    # the libra cascade config's sampler: K = 3 bins over each stage's negative IoU range
    model = _model(libra=True, settings="mmdet", roi_sampler={"num": 48})
    stage = model.roi_heads.stages[stage_index]
    assert (stage.sampler.binning, stage.sampler.num_bins, stage.sampler.floor_thr) == ("negatives", 3, 0.0)
    top = threshold - 0.01  # the hardest negative
    width = top / 3
    # plenty of easy negatives, 30 in each higher third of [0, top], 4 positives (+ the ground truth)
    # (no IoU near a bin edge, where float rounding would decide the bin)
    ious = ([0.01 + 0.2 * width * i / 200 for i in range(200)]
            + [(1.05 + 0.9 * i / 30) * width for i in range(30)]
            + [(2.05 + 0.9 * i / 29) * width for i in range(29)] + [top]
            + [threshold + 0.05 * i for i in range(4)])
    target = {"boxes": torch.tensor([[0.0, 0.0, 100.0, 100.0]]), "labels": torch.tensor([1])}
    rois, _, labels, _, _ = stage.sample_training_rois([_boxes_at_ious(ious)], [target])
    iou = box_iou(rois[0], target["boxes"])[:, 0]
    negatives = iou[labels[0] == 0]
    assert int((labels[0] > 0).sum()) == 5 and negatives.numel() == 43
    assert negatives.max() < threshold
    # 43 negatives: 14, 14 and 15 (the remainder to the hard end) from the three bins
    counts = torch.bincount((negatives / width).long().clamp(max=2), minlength=3)
    assert counts.tolist() == [14, 14, 15]


# ---------------------------------------------------------------------------------------------
# the RPN's allowed border


def test_rpn_allowed_border_matches_among_the_anchors_inside_the_image():
    gt = {"boxes": torch.tensor([[0.0, 10.0, 40.0, 50.0]]), "labels": torch.tensor([1])}
    anchors = torch.tensor([[-9.0, 10.0, 31.0, 50.0],   # crosses the left border, IoU 0.63
                            [12.0, 10.0, 52.0, 50.0],   # inside, IoU 0.54
                            [22.0, 22.0, 62.0, 62.0]])  # inside, IoU 0.19: negative
    every = _model(settings="mmdet", rpn_allowed_border=-1.0).rpn
    inside = _model(settings="mmdet", rpn_allowed_border=0.0).rpn
    # every anchor: the best one (outside) is the ground truth's low-quality match, 0.54 ignored
    labels, _ = every.assign_anchors_inside([anchors], [gt], [(64, 64)])
    assert labels[0].tolist() == [1.0, -1.0, 0.0]
    # inside only: the outside anchor is ignored and the best inside one becomes the match
    labels, boxes = inside.assign_anchors_inside([anchors], [gt], [(64, 64)])
    assert labels[0].tolist() == [-1.0, 1.0, 0.0]
    assert boxes[0][0].abs().sum() == 0 and torch.equal(boxes[0][1], gt["boxes"][0])
    # a border of 10 px lets the first anchor back in
    wide = _model(settings="mmdet", rpn_allowed_border=10.0).rpn
    assert wide.assign_anchors_inside([anchors], [gt], [(64, 64)])[0][0].tolist() == [1.0, -1.0, 0.0]


# ---------------------------------------------------------------------------------------------
# bad input


@pytest.mark.parametrize("cascade, match", [
    ({"iou_thresholds": [0.5, 0.6]},
     r"^cascade.iou_thresholds has 2 entries but cascade.num_stages is 3: give one per stage$"),
    ({"stage_loss_weights": [1.0, 0.5, 0.25, 0.125]},
     r"^cascade.stage_loss_weights has 4 entries but cascade.num_stages is 3"),
    ({"box_coder_stds": MMDET_STDS[:2]}, r"^cascade.box_coder_stds has 2 entries but"),
    ({"num_stages": 2}, r"^cascade.iou_thresholds has 3 entries but cascade.num_stages is 2"),
    ({"num_stages": 0}, r"^cascade.num_stages must be a positive int"),
    ({"iou_thresholds": [0.5, 0.6, 1.0]}, r"^cascade.iou_thresholds must lie in \(0, 1\)"),
    ({"stage_loss_weights": [1.0, -0.5, 0.25]}, r"^cascade.stage_loss_weights must be finite"),
    ({"box_coder_stds": [*MMDET_STDS[:2], (0.033, 0.033, 0.0, 0.067)]},
     r"^cascade.box_coder_stds must be four numbers > 0 per stage"),
])
def test_a_stage_count_mismatch_is_a_value_error_naming_the_setting(cascade, match):
    with pytest.raises(ValueError, match=match):
        libra_model_config("cascade_rcnn", "resnet18", cascade=cascade)
    with pytest.raises(ValueError, match=match):
        build_model(dataclasses.replace(ModelConfig(arch="cascade_rcnn"),
                                        cascade=dataclasses.replace(CascadeConfig(), **cascade)))


def test_a_cascade_setting_on_another_architecture_is_refused():
    with pytest.raises(ValueError, match=r"faster_rcnn does not use \['cascade'\]"):
        libra_model_config("faster_rcnn", cascade={"num_stages": 2})


def test_a_config_file_with_mismatched_stages_is_a_one_line_config_error(tmp_path, capsys):
    path = tmp_path / "two_thresholds.yaml"
    path.write_text("_base_: libra_cascade_rcnn_r50_fpn_1x_coco.yaml\n"
                    "model:\n  cascade:\n    iou_thresholds: [0.5, 0.6]\n")
    # a shipped config named as a base from another folder: copy the chain next to it
    for name in ("base_coco_1x", "cascade_rcnn_r50_fpn_1x_coco", "libra_cascade_rcnn_r50_fpn_1x_coco"):
        (tmp_path / f"{name}.yaml").write_text(
            (CONFIG_DIR / f"{name}.yaml").read_text())
    with pytest.raises(ConfigError) as error:
        load_config(path)
    assert str(error.value) == (f"{path}: model.cascade.iou_thresholds has 2 entries but "
                                f"cascade.num_stages is 3: give one per stage")
    with pytest.raises(ConfigError, match="box_coder_stds\\[2\\]: expected a list of 4 items"):
        load_config("cascade_rcnn_r50_fpn_1x_coco",
                    ["model.cascade.box_coder_stds=[[0.1,0.1,0.2,0.2],[0.05,0.05,0.1,0.1],[0.1,0.1]]"])
    assert main(["train", str(path)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "model.cascade.iou_thresholds has 2 entries" in err


def test_cascade_heads_refuse_parts_that_do_not_fit():
    stage = _model().roi_heads.stages[0]
    with pytest.raises(ValueError, match="stage_loss_weights has 2 entries for 1 stages"):
        CascadeRoIHeads([stage], [1.0, 0.5])
    with pytest.raises(ValueError, match="at least one stage"):
        CascadeRoIHeads([], [])
    specific = type(stage)(stage.box_roi_pool, *box_head_and_predictor(16, 5, 32))
    with pytest.raises(ValueError, match="stage 0: a cascade stage regresses one class-agnostic box"):
        CascadeRoIHeads([specific], [1.0])
    model = _model()
    with pytest.raises(ValueError, match="roi_heads must be a CascadeRoIHeads"):
        LibraCascadeRCNN(model.backbone, model.rpn, specific, model.transform)


def test_a_checkpoint_of_another_cascade_is_another_model():
    three = libra_model_config("cascade_rcnn")
    two = libra_model_config("cascade_rcnn", cascade={
        "num_stages": 2, "iou_thresholds": [0.5, 0.6], "stage_loss_weights": [1.0, 0.5],
        "box_coder_stds": MMDET_STDS[:2]})
    assert [d.split(":")[0] for d in describe_config_mismatch(three, two)] == ["model.cascade"]
    assert check_model_config(two).cascade.num_stages == 2
    model = _model(cascade=dataclasses.replace(two.cascade))
    assert len(model.roi_heads.stages) == 2 and {f"s{k}.{name}" for k in range(2) for name in (
        "loss_classifier", "loss_box_reg")} < set(model.train()(_images(), _targets()))


# ---------------------------------------------------------------------------------------------
# the speed benchmark runs


def test_speed_benchmark_smoke_run(tmp_path):
    out = tmp_path / "speed.json"
    command = [sys.executable, "-m", "benchmarks.cascade_speed", "--smoke", "--threads", "1",
               "--out", str(out)]
    proc = subprocess.run(command, cwd=REPO_ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    payload = json.loads(out.read_text())
    assert payload["benchmark"] == "cascade_speed" and payload["environment"]["smoke"] is True
    rows = {(r["phase"], r["model"]): r for r in payload["rows"]}
    models = ("faster_rcnn", "cascade_rcnn", "libra_faster_rcnn", "libra_cascade_rcnn")
    assert set(rows) == {(phase, model) for phase in ("train", "infer") for model in models}
    assert rows["train", "cascade_rcnn"]["versus"] == "faster_rcnn"
    assert rows["infer", "libra_cascade_rcnn"]["versus"] == "libra_faster_rcnn"
    assert all(r["median_ms"] > 0 and r["ratio_vs_faster"] > 0 for r in rows.values())
    assert len(rows["train", "cascade_rcnn"]["rois_per_stage"]) == 3
    assert len(rows["train", "faster_rcnn"]["rois_per_stage"]) == 1


def test_sampler_analyses_refuse_a_cascade_in_one_line():
    from libra_rcnn.analysis._common import roi_candidates
    from libra_rcnn.errors import UserInputError

    with pytest.raises(UserInputError, match="a Cascade R-CNN has one per stage"):
        roi_candidates(_model(), _images()[0], _targets()[0])


def test_configs_lists_both_cascade_configs(capsys):
    assert main(["configs"]) == 0
    listed = capsys.readouterr().out.split()
    assert "cascade_rcnn_r50_fpn_1x_coco" in listed and "libra_cascade_rcnn_r50_fpn_1x_coco" in listed
