"""Tests for libra_rcnn.engine.evaluate: pycocotools parity on hand-computed cases.

Golden values are derived by hand from the COCO protocol: greedy matching by score at each IoU
threshold t in {0.50, 0.55, ..., 0.95} (match iff IoU >= t), precision made monotone, sampled at
the 101 recall points 0.00, 0.01, ..., 1.00.
"""

from __future__ import annotations

import contextlib
import io
import json

import numpy as np
import pytest
import torch
from PIL import Image
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval
from torch import nn
from torch.utils.data import DataLoader

from libra_rcnn.data import CocoDetection, WithSkipped, collate_with_skipped
from libra_rcnn.engine.evaluate import (
    BBOX_METRIC_NAMES,
    class_ap_from_precision,
    coco_bbox_eval,
    coco_bbox_eval_per_class,
    detections_to_coco_results,
    evaluate,
    evaluate_results_file,
    format_metrics_table,
    merge_rank_results,
    proposal_recall_eval,
    run_inference,
    write_results_file,
)


def make_gt_dict(images, annotations, cat_ids=(1,)):
    """images: [(id, w, h)]; annotations: [(image_id, cat_id, [x, y, w, h], iscrowd)]."""
    return {
        "images": [{"id": i, "width": w, "height": h, "file_name": f"{i}.jpg"} for i, w, h in images],
        "annotations": [
            {"id": k + 1, "image_id": img, "category_id": cat, "bbox": list(map(float, bb)),
             "area": float(bb[2] * bb[3]), "iscrowd": crowd}
            for k, (img, cat, bb, crowd) in enumerate(annotations)
        ],
        "categories": [{"id": c, "name": f"c{c}"} for c in cat_ids],
    }


def make_coco(gt_dict) -> COCO:
    coco = COCO()
    coco.dataset = json.loads(json.dumps(gt_dict))
    coco.createIndex()
    return coco


def det(image_id, cat, bbox, score):
    return {"image_id": image_id, "category_id": cat, "bbox": list(map(float, bbox)), "score": score}


# ------------------------------------------------------------------------------ bbox AP
def test_perfect_detections_give_ap_one():
    gt = make_gt_dict(
        [(1, 200, 200), (2, 200, 200)],
        [(1, 1, [10, 10, 20, 20], 0), (1, 2, [50, 50, 60, 60], 0), (2, 1, [0, 0, 150, 120], 0)],
        cat_ids=(1, 2),
    )
    coco = make_coco(gt)
    results = [det(a["image_id"], a["category_id"], a["bbox"], 0.9) for a in gt["annotations"]]
    metrics = coco_bbox_eval(coco, results)
    assert set(metrics) == set(BBOX_METRIC_NAMES)
    for name in ("AP", "AP50", "AP75", "APs", "APm", "APl", "AR1", "AR10", "AR100", "ARs", "ARm", "ARl"):
        assert metrics[name] == pytest.approx(1.0), name
    # the caller's dicts are not mutated by loadRes
    assert set(results[0]) == {"image_id", "category_id", "bbox", "score"}


def test_one_match_at_iou_062_and_one_miss():
    # gt A (medium, 40x40) and gt B (medium, 40x40); det 1 overlaps A with IoU 40*24.8/1600 = 0.62,
    # det 2 (lower score) hits nothing.
    gt = make_gt_dict(
        [(1, 300, 300)],
        [(1, 1, [10, 10, 40, 40], 0), (1, 1, [100, 100, 40, 40], 0)],
    )
    coco = make_coco(gt)
    results = [det(1, 1, [10, 10, 40, 24.8], 0.9), det(1, 1, [200, 200, 30, 30], 0.8)]
    metrics = coco_bbox_eval(coco, results)
    # At t <= 0.60: TP then FP -> recall [0.5, 0.5], precision [1, 0.5]; recall points
    # 0.00..0.50 (51 of 101) read precision 1, the rest 0 -> AP_t = 51/101.
    # At t >= 0.65: no TP -> AP_t = 0.  Three of ten thresholds match.
    ap_matched = 51 / 101
    assert metrics["AP50"] == pytest.approx(ap_matched)
    assert metrics["AP75"] == pytest.approx(0.0)
    assert metrics["AP"] == pytest.approx(3 * ap_matched / 10)
    assert metrics["AR100"] == pytest.approx(3 * 0.5 / 10)
    assert metrics["APs"] == -1.0 and metrics["APl"] == -1.0  # no gt of those sizes


def test_crowd_ground_truth_is_ignored_not_a_false_positive():
    gt = make_gt_dict(
        [(1, 300, 300)],
        [(1, 1, [10, 10, 50, 50], 0), (1, 1, [150, 150, 100, 100], 1)],
    )
    coco = make_coco(gt)
    on_crowd = det(1, 1, [160, 160, 40, 40], 0.95)  # inside the crowd region, highest score
    good = det(1, 1, [10, 10, 50, 50], 0.9)
    assert coco_bbox_eval(coco, [on_crowd, good])["AP"] == pytest.approx(1.0)
    # Control: the same detection with no crowd box around is a top-ranked false positive:
    # precision [0, 0.5] -> monotone [0.5, 0.5] on recall [0, 1] -> AP = 0.5 at every threshold.
    gt_no_crowd = make_gt_dict([(1, 300, 300)], [(1, 1, [10, 10, 50, 50], 0)])
    assert coco_bbox_eval(make_coco(gt_no_crowd), [on_crowd, good])["AP"] == pytest.approx(0.5)


def test_noncontiguous_category_ids_are_mapped_back():
    cat_ids = (3, 7, 12)
    label_to_cat_id = {1: 3, 2: 7, 3: 12}
    gt = make_gt_dict(
        [(5, 128, 128)],
        [(5, 3, [0, 0, 40, 40], 0), (5, 7, [50, 50, 40, 40], 0), (5, 12, [10, 80, 60, 40], 0)],
        cat_ids=cat_ids,
    )
    coco = make_coco(gt)
    output = {
        "boxes": torch.tensor([[0, 0, 40, 40], [50, 50, 90, 90], [10, 80, 70, 120]], dtype=torch.float32),
        "scores": torch.tensor([0.9, 0.8, 0.7]),
        "labels": torch.tensor([1, 2, 3]),
    }
    results = detections_to_coco_results([output], [torch.tensor(5)], label_to_cat_id)
    assert [r["category_id"] for r in results] == [3, 7, 12]
    assert results[1]["bbox"] == pytest.approx([50, 50, 40, 40])
    assert results[0]["image_id"] == 5 and isinstance(results[0]["score"], float)
    assert coco_bbox_eval(coco, results)["AP"] == pytest.approx(1.0)
    # Without the mapping the labels (1, 2, 3) hit no category present in the images.
    unmapped = detections_to_coco_results([output], [5], None)
    assert coco_bbox_eval(coco, unmapped)["AP"] == pytest.approx(0.0)
    with pytest.raises(ValueError, match="label_to_cat_id"):
        detections_to_coco_results([output], [5], {1: 3})


def test_results_without_labels_and_length_mismatch():
    out = {"boxes": torch.zeros(2, 4), "scores": torch.ones(2)}
    res = detections_to_coco_results([out], [1], {1: 9})
    assert [r["category_id"] for r in res] == [1, 1]
    with pytest.raises(ValueError, match="same length"):
        detections_to_coco_results([out], [1, 2], None)


def test_empty_results_warn_and_give_zeros():
    coco = make_coco(make_gt_dict([(1, 64, 64)], [(1, 1, [0, 0, 10, 10], 0)]))
    with pytest.warns(UserWarning, match="no detections"):
        metrics = coco_bbox_eval(coco, [])
    assert metrics == {name: 0.0 for name in BBOX_METRIC_NAMES}


def test_unknown_image_id_is_a_value_error():
    coco = make_coco(make_gt_dict([(1, 64, 64)], [(1, 1, [0, 0, 10, 10], 0)]))
    with pytest.raises(ValueError, match="not in the ground truth"):
        coco_bbox_eval(coco, [det(99, 1, [0, 0, 10, 10], 0.5)])


# ------------------------------------------------------------------------------ per-class AP
def test_per_class_ap_hand_computed():
    # class 1 (c1): both boxes found exactly -> AP 1 at every threshold.
    # class 2 (c2): one of two boxes found at IoU 0.62 (as in test_one_match_at_iou_062...):
    #   AP50 = 51/101, AP75 = 0, AP = 3 * 51/101 / 10.
    # class 3 (c3): no ground truth (a detection of it is a false positive nowhere) -> -1.
    gt = make_gt_dict(
        [(1, 300, 300), (2, 300, 300)],
        [(1, 1, [10, 10, 40, 40], 0), (2, 1, [50, 60, 80, 90], 0),
         (1, 2, [150, 150, 40, 40], 0), (2, 2, [100, 100, 40, 40], 0)],
        cat_ids=(1, 2, 3),
    )
    coco = make_coco(gt)
    results = [det(1, 1, [10, 10, 40, 40], 0.9), det(2, 1, [50, 60, 80, 90], 0.8),
               det(1, 2, [150, 150, 40, 24.8], 0.9), det(2, 3, [0, 0, 30, 30], 0.7)]
    per_class = coco_bbox_eval_per_class(coco, results)
    assert list(per_class) == ["c1", "c2", "c3"]  # category-id order, named
    assert per_class["c1"] == pytest.approx({"AP": 1.0, "AP50": 1.0, "AP75": 1.0})
    matched = 51 / 101
    assert per_class["c2"] == pytest.approx({"AP": 3 * matched / 10, "AP50": matched, "AP75": 0.0})
    assert per_class["c3"] == {"AP": -1.0, "AP50": -1.0, "AP75": -1.0}
    # the overall AP is the mean over the classes that have ground truth
    overall = coco_bbox_eval(coco, results)
    for name in ("AP", "AP50", "AP75"):
        assert overall[name] == pytest.approx((per_class["c1"][name] + per_class["c2"][name]) / 2)
    # restricted to image 2: class 2's only found box is gone
    only_2 = coco_bbox_eval_per_class(coco, results, image_ids=[2])
    assert only_2["c2"] == pytest.approx({"AP": 0.0, "AP50": 0.0, "AP75": 0.0})


def test_per_class_ap_without_detections_warns_and_gives_zeros():
    coco = make_coco(make_gt_dict([(1, 64, 64)], [(1, 1, [0, 0, 10, 10], 0)], cat_ids=(1, 2)))
    with pytest.warns(UserWarning, match="no detections"):
        per_class = coco_bbox_eval_per_class(coco, [])
    assert per_class == {"c1": {"AP": 0.0, "AP50": 0.0, "AP75": 0.0},
                         "c2": {"AP": 0.0, "AP50": 0.0, "AP75": 0.0}}


def test_class_ap_from_precision_averages_and_checks_shapes():
    thrs = [0.5 + 0.05 * i for i in range(10)]
    precision = np.full((10, 3, 2, 4, 3), 0.5)
    precision[:, :, 0, 0, -1] = np.arange(10)[:, None] / 10  # class 0: 0.0 ... 0.9 by threshold
    precision[:, :, 1, 0, -1] = -1.0  # class 1: no ground truth
    precision[:, :, 0, 1:, :] = 7.0  # other areas / maxDets: never read
    out = class_ap_from_precision(precision, thrs)
    assert out.shape == (2, 3)
    assert out[0] == pytest.approx([0.45, 0.0, 0.5])  # mean, threshold 0.5, threshold 0.75
    assert out[1].tolist() == [-1.0, -1.0, -1.0]
    with pytest.raises(ValueError, match="5 dimensions"):
        class_ap_from_precision(precision[0], thrs)
    with pytest.raises(ValueError, match="IoU thresholds"):
        class_ap_from_precision(precision, thrs[:9])
    with pytest.raises(ValueError, match="0.75"):
        class_ap_from_precision(precision[:2], [0.5, 0.6])


# ------------------------------------------------------------------------------ proposal AR
def test_proposal_recall_at_several_budgets():
    # gt 1 is recovered by the top proposal at IoU 50*48/2500 = 0.96 (>= every threshold up to
    # 0.95); gt 2 only by the proposal ranked 151st (exact).  Categories are ignored (useCats=0).
    gt = make_gt_dict(
        [(1, 400, 400)],
        [(1, 1, [10, 10, 50, 50], 0), (1, 2, [100, 10, 50, 50], 0)],
        cat_ids=(1, 2),
    )
    coco = make_coco(gt)
    g = torch.Generator().manual_seed(0)
    junk_xy = 250 + torch.rand(149, 2, generator=g) * 100  # lies in [250, 350] x [250, 350], far from both gts
    proposals = [det(1, 1, [10, 10, 50, 48], 1.0)]
    proposals += [det(1, 1, [x, y, 20, 20], 0.9 - 0.001 * k) for k, (x, y) in enumerate(junk_xy.tolist())]
    proposals.append(det(1, 1, [100, 10, 50, 50], 0.01))
    assert len(proposals) == 151
    metrics = proposal_recall_eval(coco, proposals, max_dets=(100, 300, 1000))
    assert metrics["AR@100"] == pytest.approx(0.5)
    assert metrics["AR@300"] == pytest.approx(1.0)
    assert metrics["AR@1000"] == pytest.approx(1.0)
    assert metrics["ARm@1000"] == pytest.approx(1.0)
    assert metrics["ARs@1000"] == -1.0  # no small gt
    small = proposal_recall_eval(coco, proposals, max_dets=(1, 10))
    assert small["AR@1"] == pytest.approx(0.5) and small["AR@10"] == pytest.approx(0.5)
    with pytest.raises(ValueError, match="max_dets"):
        proposal_recall_eval(coco, proposals, max_dets=(0,))


def test_proposal_recall_partial_iou():
    # One gt, one proposal at IoU 0.72 (50x36 inside 50x50): matched at t in {0.50,...,0.70},
    # i.e. 5 of 10 thresholds -> AR = 0.5.
    coco = make_coco(make_gt_dict([(1, 100, 100)], [(1, 1, [0, 0, 50, 50], 0)]))
    metrics = proposal_recall_eval(coco, [det(1, 1, [0, 0, 50, 36], 0.5)], max_dets=(100,))
    assert metrics["AR@100"] == pytest.approx(0.5)


# ------------------------------------------------------------------------------ files
def test_results_file_round_trip_and_bad_files(tmp_path):
    gt = make_gt_dict([(1, 300, 300)], [(1, 1, [10, 10, 40, 40], 0), (1, 1, [100, 100, 40, 40], 0)])
    ann_file = tmp_path / "ann.json"
    ann_file.write_text(json.dumps(gt))
    results = [det(1, 1, [10, 10, 40, 24.8], 0.9), det(1, 1, [200, 200, 30, 30], 0.8)]
    results_file = write_results_file(results, tmp_path / "sub" / "res.json")
    assert json.loads(results_file.read_text()) == results
    assert [p.name for p in results_file.parent.iterdir()] == ["res.json"]  # no temp left over
    from_file = evaluate_results_file(ann_file, results_file)
    assert from_file == coco_bbox_eval(make_coco(gt), results)
    assert from_file["AP50"] == pytest.approx(51 / 101)

    missing = tmp_path / "nope.json"
    with pytest.raises(ValueError, match="nope.json"):
        evaluate_results_file(ann_file, missing)
    with pytest.raises(ValueError, match="nope.json"):
        evaluate_results_file(missing, results_file)
    not_json = tmp_path / "garbage.json"
    not_json.write_text("{not json")
    with pytest.raises(ValueError, match="garbage.json.*not valid JSON"):
        evaluate_results_file(ann_file, not_json)
    a_dict = tmp_path / "dict.json"
    a_dict.write_text(json.dumps({"image_id": 1}))
    with pytest.raises(ValueError, match="dict.json.*list"):
        evaluate_results_file(ann_file, a_dict)
    no_score = tmp_path / "noscore.json"
    no_score.write_text(json.dumps([{"image_id": 1, "category_id": 1, "bbox": [0, 0, 1, 1]}]))
    with pytest.raises(ValueError, match="noscore.json.*score"):
        evaluate_results_file(ann_file, no_score)
    bad_box = tmp_path / "badbox.json"
    bad_box.write_text(json.dumps([det(1, 1, [0, 0, 1], 0.5)]))
    with pytest.raises(ValueError, match="badbox.json.*bbox"):
        evaluate_results_file(ann_file, bad_box)
    other_image = tmp_path / "other.json"
    other_image.write_text(json.dumps([det(42, 1, [0, 0, 1, 1], 0.5)]))
    with pytest.raises(ValueError, match="other.json.*not in the ground truth"):
        evaluate_results_file(ann_file, other_image)


# ------------------------------------------------------------------------------ inference
class FixedBoxModel(nn.Module):
    """Predicts, for each image, the box covering its top-left quarter with label 2 and a
    class-1 box in the bottom-right corner at lower score."""

    def __init__(self):
        super().__init__()
        self.dummy = nn.Parameter(torch.zeros(()))
        self.calls = 0

    def forward(self, images, proposals=None):
        assert not self.training
        self.calls += 1
        outs = []
        for img in images:
            h, w = img.shape[-2:]
            outs.append({
                "boxes": torch.tensor([[0.0, 0.0, w / 2, h / 2], [w - 8.0, h - 8.0, w, h]]) + self.dummy,
                "scores": torch.tensor([0.9, 0.3]),
                "labels": torch.tensor([2, 1]),
            })
        return outs


class ProposalEchoModel(nn.Module):
    """Fast R-CNN stand-in: returns the proposals it is given as class-1 detections."""

    def forward(self, images, proposals=None):
        assert proposals is not None, "proposals were not passed"
        return [{"boxes": p, "scores": torch.linspace(1.0, 0.5, len(p)), "labels": torch.ones(len(p), dtype=torch.long)}
                for p in proposals]


class ListDataset(torch.utils.data.Dataset):
    def __init__(self, items, coco=None, label_to_cat_id=None):
        self.items, self.coco, self.label_to_cat_id = items, coco, label_to_cat_id

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        return self.items[i]


def collate(batch):
    return tuple(zip(*batch))


def tiny_items(sizes):
    return [
        (torch.zeros(3, h, w), {"image_id": torch.tensor(i + 1), "boxes": torch.zeros(0, 4), "labels": torch.zeros(0)})
        for i, (h, w) in enumerate(sizes)
    ]


def test_run_inference_with_fake_model():
    items = tiny_items([(32, 48), (64, 64), (40, 24)])
    dataset = ListDataset(items, label_to_cat_id={1: 10, 2: 20})
    loader = DataLoader(dataset, batch_size=2, collate_fn=collate)
    model = FixedBoxModel().train()
    results, image_ids, skipped = run_inference(model, loader, progress=False)
    assert model.training and model.calls == 2  # mode restored, two batches
    assert image_ids == [1, 2, 3] and skipped == []
    assert len(results) == 6
    first = results[0]
    assert first == {"image_id": 1, "category_id": 20, "bbox": pytest.approx([0, 0, 24, 16]), "score": pytest.approx(0.9)}
    assert results[1]["category_id"] == 10 and results[1]["bbox"] == pytest.approx([40, 24, 8, 8])
    assert results[5]["image_id"] == 3 and results[5]["bbox"] == pytest.approx([16, 32, 8, 8])
    json.dumps(results)  # plain python types only


def test_run_inference_passes_proposals():
    items = tiny_items([(32, 32), (32, 32)])
    items[0][1]["proposals"] = torch.tensor([[0.0, 0.0, 5.0, 5.0], [1.0, 1.0, 9.0, 9.0]])
    items[1][1]["proposals"] = torch.tensor([[2.0, 2.0, 4.0, 8.0]])
    loader = DataLoader(ListDataset(items), batch_size=2, collate_fn=collate)
    results, ids, _ = run_inference(ProposalEchoModel(), loader, progress=False, label_to_cat_id={1: 1})
    assert ids == [1, 2]
    assert [r["bbox"] for r in results] == [[0, 0, 5, 5], [1, 1, 8, 8], [2, 2, 2, 6]]


def test_merge_rank_results_dedupes_padded_images():
    rank0 = ([1, 3], [det(1, 1, [0, 0, 1, 1], 0.9), det(3, 1, [0, 0, 2, 2], 0.8)])
    # DistributedSampler padding repeats image 1 on rank 1
    rank1 = ([2, 1], [det(2, 1, [0, 0, 3, 3], 0.7), det(1, 1, [0, 0, 1, 1], 0.9)])
    results, ids, skipped = merge_rank_results([rank0, rank1])
    assert ids == [1, 3, 2] and skipped == []
    assert [r["image_id"] for r in results] == [1, 3, 2]


def test_evaluate_end_to_end(tmp_path):
    # Ground truth equals FixedBoxModel's output on 64x64 images -> AP = 1 (labels 1->10, 2->20).
    gt = make_gt_dict(
        [(1, 64, 64), (2, 64, 64)],
        [(i, c, bb, 0) for i in (1, 2) for c, bb in ((20, [0, 0, 32, 32]), (10, [56, 56, 8, 8]))],
        cat_ids=(10, 20),
    )
    coco = make_coco(gt)
    dataset = ListDataset(tiny_items([(64, 64), (64, 64)]), coco=coco, label_to_cat_id={1: 10, 2: 20})
    loader = DataLoader(dataset, batch_size=1, collate_fn=collate)
    results_file = tmp_path / "out" / "results.json"
    evaluation = evaluate(FixedBoxModel(), loader, results_file=results_file, progress=False)
    metrics = evaluation.metrics
    assert metrics["AP"] == pytest.approx(1.0)
    assert evaluation.image_ids == [1, 2] and evaluation.skipped == []
    ann_file = tmp_path / "ann.json"
    ann_file.write_text(json.dumps(gt))
    assert evaluate_results_file(ann_file, results_file) == metrics

    # Only image 1 in the loader: evaluation is restricted to it, still perfect.
    sub = torch.utils.data.Subset(dataset, [0])
    metrics_sub = evaluate(FixedBoxModel(), DataLoader(sub, batch_size=1, collate_fn=collate), progress=False)
    assert metrics_sub.metrics["AP"] == pytest.approx(1.0) and metrics_sub.image_ids == [1]

    prop = evaluate(FixedBoxModel(), loader, proposals=True, progress=False)
    assert prop.metrics["AR@100"] == pytest.approx(1.0)

    with pytest.raises(ValueError, match="coco"):
        evaluate(FixedBoxModel(), DataLoader(ListDataset(tiny_items([(8, 8)])), collate_fn=collate), progress=False)


def test_scores_match_pycocotools_on_the_untouched_annotation_file(tmp_path):
    """Degenerate, out-of-image, partly outside and crowd boxes, and two unreadable images (one
    alone in its batch): our metrics equal pycocotools' own evaluation of the same results file
    on the same annotation file, over the images that could be read."""
    annotations = [
        (1, 20, [0, 0, 32, 32], 0), (1, 10, [56, 56, 8, 8], 0),
        (1, 10, [5, 5, 0, 10], 0),  # degenerate: zero width
        (2, 20, [0, 0, 32, 32], 0),
        (2, 10, [100, 100, 10, 10], 0),  # entirely outside the 64x64 image
        (2, 20, [30, 30, 30, 30], 1),  # crowd
        (3, 20, [2, 2, 30, 30], 0), (3, 10, [50, 50, 14, 14], 0),
        (3, 10, [60, 10, 10, 10], 0),  # partly outside
        (4, 20, [0, 0, 32, 32], 0), (5, 10, [56, 56, 8, 8], 0),  # images 4, 5: unreadable
    ]
    gt = make_gt_dict([(i, 64, 64) for i in range(1, 6)], annotations, cat_ids=(10, 20))
    ann_file = tmp_path / "ann.json"
    ann_file.write_text(json.dumps(gt))
    root = tmp_path / "images"
    root.mkdir()
    for i in (1, 2, 3):
        Image.new("RGB", (64, 64)).save(root / f"{i}.jpg")
    for i in (4, 5):
        (root / f"{i}.jpg").write_bytes(b"not an image")
    dataset = CocoDetection(ann_file, root, train=False)
    assert (dataset.stats["dropped_degenerate_box"], dataset.stats["dropped_outside_image"],
            dataset.stats["clipped_boxes"]) == (1, 1, 1)  # training's view differs from the file
    loader = DataLoader(WithSkipped(dataset), batch_size=2, collate_fn=collate_with_skipped)
    results_file = tmp_path / "results.json"
    evaluation = evaluate(FixedBoxModel(), loader, results_file=results_file, progress=False)
    assert evaluation.image_ids == [1, 2, 3]
    assert [(s.image_id, s.path) for s in evaluation.skipped] == \
        [(4, str(root / "4.jpg")), (5, str(root / "5.jpg"))]

    with contextlib.redirect_stdout(io.StringIO()):
        coco_gt = COCO(str(ann_file))
        coco_eval = COCOeval(coco_gt, coco_gt.loadRes(str(results_file)), iouType="bbox")
        coco_eval.params.imgIds = [1, 2, 3]
        coco_eval.evaluate()
        coco_eval.accumulate()
        coco_eval.summarize()
    assert evaluation.metrics == {n: float(v) for n, v in zip(BBOX_METRIC_NAMES, coco_eval.stats)}
    # scoring against the filtered annotations instead would give other numbers
    usable = make_gt_dict([(i, 64, 64) for i in range(1, 6)],
                          [a for k, a in enumerate(annotations) if k not in (2, 4)],
                          cat_ids=(10, 20))
    results = json.loads(results_file.read_text())
    filtered = coco_bbox_eval(make_coco(usable), results, image_ids=[1, 2, 3])
    assert filtered["AP"] != pytest.approx(evaluation.metrics["AP"], abs=1e-3)


def test_nothing_readable_gives_no_metrics_and_names_every_image(tmp_path):
    gt = make_gt_dict([(1, 64, 64), (2, 64, 64)], [(1, 1, [0, 0, 8, 8], 0)])
    ann_file = tmp_path / "ann.json"
    ann_file.write_text(json.dumps(gt))
    (tmp_path / "images").mkdir()
    dataset = CocoDetection(ann_file, tmp_path / "images", train=False)  # no image file exists
    loader = DataLoader(WithSkipped(dataset), batch_size=1, collate_fn=collate_with_skipped)
    model = FixedBoxModel()
    evaluation = evaluate(model, loader, results_file=tmp_path / "r.json", progress=False)
    assert model.calls == 0 and evaluation.metrics == {} and evaluation.image_ids == []
    assert [(s.image_id, s.reason) for s in evaluation.skipped] == \
        [(1, "file not found"), (2, "file not found")]
    assert json.loads((tmp_path / "r.json").read_text()) == []


# ------------------------------------------------------------------------------ table
def test_format_metrics_table():
    metrics = {"AP": 0.3871, "AP50": 0.5987, "AP75": 0.4216, "APs": 0.2213, "APm": 0.4214, "APl": -1.0}
    table = format_metrics_table(metrics, name="Libra")
    lines = table.splitlines()
    assert lines[0] == "| Method | AP | AP50 | AP75 | APs | APm | APl |"
    assert lines[1].count("---") == 7
    assert lines[2] == "| Libra | 38.7 | 59.9 | 42.2 | 22.1 | 42.1 | - |"
    assert format_metrics_table(metrics, header=False).startswith("| 38.7 |")
    with pytest.raises(ValueError, match="AR@100"):
        format_metrics_table(metrics, keys=("AR@100",))
