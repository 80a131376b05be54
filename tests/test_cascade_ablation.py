"""The Libra Cascade R-CNN ablation (``ABLATION_TABLES["libra_cascade"]``): its rows turn either
cascade config into the same models, end at the shipped Libra Cascade config, and train and
evaluate through the ablation runner."""

from __future__ import annotations

import json

import pytest

from libra_rcnn.analysis import ABLATION_TABLES, run_ablation
from libra_rcnn.config import load_config
from libra_rcnn.data import make_shapes_dataset

pytestmark = pytest.mark.usefixtures("one_intra_op_thread")

ROWS = ABLATION_TABLES["libra_cascade"]
CONFIGS = ("cascade_rcnn_r50_fpn_1x_coco", "libra_cascade_rcnn_r50_fpn_1x_coco")


def test_rows_mean_the_same_on_either_cascade_config_and_end_at_libra_cascade():
    assert list(ROWS) == ["Cascade R-CNN", "+ IoU-balanced sampling", "+ balanced feature pyramid",
                          "+ balanced L1 loss"]
    models = {name: [load_config(name, overrides).model for overrides in ROWS.values()]
              for name in CONFIGS}
    assert models[CONFIGS[0]] == models[CONFIGS[1]]
    rows = models[CONFIGS[0]]
    assert rows[0] == load_config(CONFIGS[0]).model
    assert rows[-1] == load_config(CONFIGS[1]).model
    assert [(m.roi_sampler.neg_balance, m.roi_sampler.binning, m.rpn_neg_pos_ub, m.bfp.enabled,
             m.box_loss.kind) for m in rows] == [
        (False, "negatives", -1.0, False, "smooth_l1"), (True, "negatives", 5.0, False, "smooth_l1"),
        (True, "negatives", 5.0, True, "smooth_l1"), (True, "negatives", 5.0, True, "balanced_l1")]


def test_the_runner_trains_and_evaluates_every_row(tmp_path):
    paths = make_shapes_dataset(tmp_path / "shapes", num_train=4, num_val=2, image_size=64, seed=0)
    tiny = ["model.backbone=resnet18", "model.backbone_weights=null", "model.num_classes=4",
            "model.min_size=64", "model.max_size=64", "model.fpn_channels=16",
            "model.representation_size=32", "model.rpn_post_nms_top_n_train=64",
            "model.rpn_post_nms_top_n_test=32", "model.roi_sampler.num=32",
            "train.batch_size=2", "train.warmup_iters=1", "train.log_period=1",
            "train.tensorboard=false", "data.num_workers=0",
            f"data.train_ann={paths['train_json']}", f"data.train_images={paths['train_images']}",
            f"data.val_ann={paths['val_json']}", f"data.val_images={paths['val_images']}"]
    out = tmp_path / "ablation"
    table = run_ablation(CONFIGS[0], ROWS, output_dir=out, overrides=tiny, max_iters=1, seed=3,
                         device="cpu")
    lines = [line for line in table.splitlines() if line.startswith("| ")][1:]
    assert [line.split(" | ")[0].strip("| ") for line in lines] == list(ROWS)
    summary = json.loads((out / "ablation.json").read_text())
    for entry in summary["variants"]:
        assert entry["iteration"] == 1 and set(entry["metrics"]) >= {"AP", "AP50", "AP75"}
        trained = load_config(out / entry["dir"] / "config.yaml").model
        assert trained.arch == "cascade_rcnn" and trained.cascade.num_stages == 3
    first = out / summary["variants"][0]["dir"] / "log.jsonl"
    record = next(json.loads(line) for line in first.read_text().splitlines()
                  if json.loads(line).get("type") == "train")
    assert {"s0.loss_classifier", "s2.loss_box_reg", "loss_objectness"} <= set(record)
