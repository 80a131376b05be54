"""The ``libra-rcnn`` command line end to end on a tiny generated dataset (real model, CPU):
train, exact resume, eval, predict, check-data, convert-voc, demo, and one-line user errors."""

from __future__ import annotations

import collections
import json
import os
import subprocess
import sys

import pytest
import torch
from PIL import Image

from libra_rcnn.cli import _report_training, main
from libra_rcnn.data import make_shapes_dataset
from libra_rcnn.engine.checkpoint import load_checkpoint
from libra_rcnn.engine.train import TrainSummary

TINY_MODEL = """\
model:
  arch: faster_rcnn
  num_classes: 4
  backbone: resnet18
  backbone_weights: null
  trainable_backbone_layers: 5
  norm: gn
  fpn_channels: 16
  bfp: {{enabled: true, refine_level: 2, refine_type: non_local}}
  min_size: 64
  max_size: 64
  rpn_pre_nms_top_n_train: 200
  rpn_post_nms_top_n_train: 50
  rpn_pre_nms_top_n_test: 100
  rpn_post_nms_top_n_test: 20
  rpn_batch_size_per_image: 64
  rpn_neg_pos_ub: 5.0
  roi_sampler: {{num: 32, pos_balance: true, neg_balance: true}}
  box_loss: {{kind: balanced_l1}}
  representation_size: 32
data:
  train_ann: {train_json}
  train_images: {train_images}
  val_ann: {val_json}
  val_images: {val_images}
  num_workers: 0
  aspect_ratio_grouping: false
train:
  epochs: 1
  batch_size: 2
  base_lr: 0.01
  base_batch_size: 2
  warmup_iters: 2
  lr_steps: [1]
  log_period: 1
  tensorboard: false
  deterministic: true
  seed: 0
"""


pytestmark = pytest.mark.usefixtures("one_intra_op_thread")


def _run(capsys, *argv):
    code = main(["--quiet", *map(str, argv)])
    out, err = capsys.readouterr()
    return code, out, err


def _assert_user_error(code, err, *fragments):
    lines = err.strip().splitlines()
    assert code == 2, err
    assert len(lines) == 1, err
    assert lines[0].startswith("libra-rcnn: error: "), err
    assert "Traceback" not in err
    for fragment in fragments:
        assert fragment in lines[0], err


def _losses(out_dir):
    records = [json.loads(line) for line in (out_dir / "log.jsonl").read_text().splitlines()]
    return {r["iter"]: r["loss"] for r in records if r["type"] == "train"}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """Dataset + config, and one uninterrupted 4-iteration training run with evaluation."""
    root = tmp_path_factory.mktemp("cli")
    paths = make_shapes_dataset(root / "data", num_train=8, num_val=3, image_size=64, seed=0)
    config = root / "tiny.yaml"
    config.write_text(TINY_MODEL.format(**paths))
    full = root / "full"
    code = main(["--quiet", "train", str(config), "--output-dir", str(full)])
    assert code == 0
    return {"root": root, "config": config, "full": full, "paths": paths}


def test_train_writes_checkpoints_logs_and_metrics(tiny):
    full = tiny["full"]
    assert sorted(p.name for p in full.iterdir()) == \
        ["config.yaml", "epoch_1.pth", "latest.pth", "log.jsonl", "val_results.json"]
    assert sorted(_losses(full)) == [1, 2, 3, 4]
    val = [json.loads(line) for line in (full / "log.jsonl").read_text().splitlines()
           if json.loads(line)["type"] == "val"]
    assert len(val) == 1 and 0.0 <= val[0]["AP50"] <= 1.0
    state = load_checkpoint(full / "latest.pth")
    assert state["label_to_cat_id"] == {1: 1, 2: 2, 3: 3}
    assert state["model_config"]["backbone"] == "resnet18"


def test_resume_continues_exactly_like_an_uninterrupted_run(tiny, capsys):
    cut = tiny["root"] / "cut"
    no_val = ["--set", "data.val_ann=null", "--set", "data.val_images=null"]
    code, out, _ = _run(capsys, "train", tiny["config"], "--output-dir", cut,
                        "--set", "train.max_iters=2", *no_val)
    assert code == 0 and "max_iters at epoch 0, iteration 2" in out
    assert load_checkpoint(cut / "latest.pth")["iter_in_epoch"] == 2
    code, out, _ = _run(capsys, "train", tiny["config"], "--output-dir", cut,
                        "--resume", cut / "latest.pth", *no_val)
    assert code == 0 and "finished at epoch 1, iteration 4" in out
    assert _losses(cut) == _losses(tiny["full"])
    resumed = load_checkpoint(cut / "latest.pth")["model"]
    uninterrupted = load_checkpoint(tiny["full"] / "latest.pth")["model"]
    for name, tensor in uninterrupted.items():
        assert torch.equal(resumed[name], tensor), name


def test_eval_of_a_checkpoint_and_of_a_results_file(tiny, capsys):
    results = tiny["root"] / "results.json"
    code, out, _ = _run(capsys, "eval", tiny["config"], tiny["full"] / "latest.pth",
                        "--results", results)
    table, report = out.splitlines()[:3], out.splitlines()[3:]
    assert code == 0 and table[0] == "| AP | AP50 | AP75 | APs | APm | APl |"
    assert report == ["scored 3 image(s)", f"wrote {results}"]
    assert isinstance(json.loads(results.read_text()), list)
    code, again, _ = _run(capsys, "eval", "--results-file", results, "--ann",
                          tiny["paths"]["val_json"])
    assert code == 0 and again.splitlines() == table  # the same detections score the same
    val = json.loads((tiny["full"] / "log.jsonl").read_text().splitlines()[-1])
    assert f"{100 * val['AP50']:.1f}" in table[-1]


def test_eval_without_a_config_uses_the_checkpoints_own(tiny, capsys):
    ckpt = tiny["full"] / "latest.pth"
    code, with_config, _ = _run(capsys, "eval", ckpt, "--config", tiny["config"])
    assert code == 0 and "scored 3 image(s)" in with_config
    code, own, _ = _run(capsys, "eval", ckpt)
    assert code == 0 and own == with_config  # training stored this very config
    # --set still changes data and test-time settings of the stored config
    results = {}
    every = ["--set", "model.box_score_thresh=0.0"]  # an untrained model's scores are low
    for name, extra in (("own", []), ("fewer", ["--set", "model.box_detections_per_img=1"])):
        results[name] = tiny["root"] / f"{name}.json"
        code, _, _ = _run(capsys, "eval", ckpt, "--results", results[name], *every, *extra)
        assert code == 0
    per_image = {name: collections.Counter(r["image_id"] for r in json.loads(path.read_text()))
                 for name, path in results.items()}
    assert max(per_image["own"].values()) > 1 and max(per_image["fewer"].values()) == 1


def test_predict_draws_and_lists_detections(tiny, capsys):
    out_dir = tiny["root"] / "pred"
    code, out, _ = _run(capsys, "predict", tiny["full"] / "latest.pth", tiny["paths"]["val_images"],
                        "--score-thresh", "0.0", "--out-dir", out_dir)
    assert code == 0
    assert out.startswith(f"wrote {out_dir / 'predictions.json'} (") and \
        out.endswith(f" detections) and 3 drawn image(s) in {out_dir}\n")
    assert sorted(p.name for p in out_dir.iterdir()) == \
        ["000000.jpg", "000001.jpg", "000002.jpg", "predictions.json"]


def test_check_data_reports_bad_images(tiny, tmp_path, capsys):
    code, out, _ = _run(capsys, "check-data", tiny["config"])
    assert code == 0 and "problems: 0 (ok)" in out and "[val]" in out
    paths = make_shapes_dataset(tmp_path, num_train=3, num_val=0, image_size=48, seed=2)
    broken = os.path.join(paths["train_images"], "000001.png")
    with open(broken, "wb") as f:
        f.write(b"\x89PNG truncated")
    code, out, _ = _run(capsys, "check-data", tiny["config"], "--split", "train",
                        "--set", f"data.train_ann={paths['train_json']}",
                        "--set", f"data.train_images={paths['train_images']}")
    assert code == 1 and "1 bad" in out and broken in out


def test_convert_voc_writes_a_coco_json(tmp_path, capsys):
    Image.new("RGB", (40, 30)).save(tmp_path / "a.jpg")
    (tmp_path / "a.xml").write_text(
        "<annotation><filename>a.jpg</filename><size><width>40</width><height>30</height>"
        "</size><object><name>apple</name><bndbox><xmin>3</xmin><ymin>4</ymin><xmax>20</xmax>"
        "<ymax>25</ymax></bndbox></object></annotation>")
    out_json = tmp_path / "out" / "coco.json"
    code, out, _ = _run(capsys, "convert-voc", tmp_path, out_json)
    assert code == 0 and "1 images, 1 boxes, 1 classes (apple)" in out
    coco = json.loads(out_json.read_text())
    assert coco["annotations"][0]["bbox"] == [2, 3, 18, 22]


def test_convert_voc_reads_an_image_set_of_the_voc_release_layout(tmp_path, capsys):
    for sub in ("Annotations", "JPEGImages", "ImageSets/Main"):
        (tmp_path / sub).mkdir(parents=True)
    for stem, name in (("p1", "cell"), ("p2", "blob"), ("p3", "cell")):
        Image.new("RGB", (40, 30)).save(tmp_path / "JPEGImages" / f"{stem}.jpg")
        (tmp_path / "Annotations" / f"{stem}.xml").write_text(
            f"<annotation><filename>{stem}.jpg</filename><size><width>40</width><height>30"
            f"</height></size><object><name>{name}</name><bndbox><xmin>3</xmin><ymin>4</ymin>"
            f"<xmax>20</xmax><ymax>25</ymax></bndbox></object></annotation>")
    (tmp_path / "ImageSets" / "Main" / "train.txt").write_text("p1\np3\n")
    out_json = tmp_path / "train.json"
    code, out, _ = _run(capsys, "convert-voc", tmp_path, out_json, "--image-set", "train",
                        "--class-names", "cell,blob")
    assert code == 0 and "2 images, 2 boxes, 2 classes (cell, blob)" in out
    coco = json.loads(out_json.read_text())
    assert [im["file_name"] for im in coco["images"]] == ["JPEGImages/p1.jpg", "JPEGImages/p3.jpg"]
    code, _, err = _run(capsys, "convert-voc", tmp_path, out_json, "--image-set", "val")
    assert code == 2 and "ImageSets/Main/val.txt: no such image set file" in err


def test_demo_quick_runs_the_whole_pipeline(tmp_path, capsys):
    code, out, _ = _run(capsys, "demo", "--quick", "--output-dir", tmp_path, "--device", "cpu",
                        "--set", "demo.num_train=4", "--set", "demo.num_val=2")
    assert code == 0
    assert "| AP | AP50 | AP75 | APs | APm | APl |" in out
    assert (tmp_path / "latest.pth").is_file()
    assert sorted(p.name for p in (tmp_path / "predictions").iterdir()) == \
        ["000000.jpg", "000001.jpg", "predictions.json"]


@pytest.mark.parametrize("signum, code", [(2, 130), (15, 143), (None, 0)])
def test_interrupted_training_exits_with_128_plus_the_signal(signum, code, capsys):
    summary = TrainSummary(stop_reason="interrupted" if signum else "finished", signal=signum,
                           epoch=0, iteration=5, iters_per_epoch=4, checkpoint="w/latest.pth",
                           output_dir="w")
    assert _report_training(summary) == code
    err = capsys.readouterr().err
    assert ("resume with --resume w/latest.pth" in err) == bool(signum)


def test_configs_lists_the_shipped_configs(capsys):
    code, out, _ = _run(capsys, "configs")
    assert code == 0 and "libra_faster_rcnn_r50_fpn_1x_coco" in out and "ablation/table2_libra" in out


# ------------------------------------------------------------------------------ user errors


def test_user_errors_are_one_line_with_exit_code_2(tiny, tmp_path, capsys):
    config, ckpt = tiny["config"], tiny["full"] / "latest.pth"

    code, _, err = _run(capsys, "train", tmp_path / "nope.yaml")
    _assert_user_error(code, err, f"{tmp_path / 'nope.yaml'}: no such config file")

    typo = tmp_path / "typo.yaml"
    typo.write_text(config.read_text().replace("refine_type:", "refine_typo:"))
    code, _, err = _run(capsys, "train", typo)
    _assert_user_error(code, err, f"{typo}: model.bfp.refine_typo: unknown key")

    code, _, err = _run(capsys, "train", config, "--set", f"data.train_ann={tmp_path / 'x.json'}")
    _assert_user_error(code, err, f"{tmp_path / 'x.json'}: no such annotation file")

    not_coco = tmp_path / "list.json"
    not_coco.write_text("[1, 2, 3]")
    code, _, err = _run(capsys, "train", config, "--set", f"data.train_ann={not_coco}")
    _assert_user_error(code, err, str(not_coco))

    code, _, err = _run(capsys, "train", config, "--resume", tmp_path / "gone.pth")
    _assert_user_error(code, err, f"{tmp_path / 'gone.pth'}: no such checkpoint file")

    code, _, err = _run(capsys, "eval", config, ckpt, "--set", "model.arch=retinanet")
    _assert_user_error(code, err, f"{ckpt}: checkpoint is from another model",
                       "model.arch: checkpoint has 'faster_rcnn', config has 'retinanet'")

    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(b"definitely not torch")
    code, _, err = _run(capsys, "predict", garbage, tiny["paths"]["val_images"])
    _assert_user_error(code, err, f"{garbage}: not a PyTorch checkpoint")

    code, _, err = _run(capsys, "predict", ckpt, tmp_path / "missing.png")
    _assert_user_error(code, err, f"{tmp_path / 'missing.png'}: no such image file")

    code, _, err = _run(capsys, "eval", "--results-file", tmp_path / "r.json")
    _assert_user_error(code, err, "needs --ann")

    code, _, err = _run(capsys, "eval", "--results-file", not_coco, "--ann",
                        tiny["paths"]["val_json"])
    _assert_user_error(code, err, str(not_coco))


def test_more_user_errors_are_one_line(tiny, tmp_path, capsys):
    config, ckpt = tiny["config"], tiny["full"] / "latest.pth"
    # a model setting no detector can be built with is reported when the config is read
    code, _, err = _run(capsys, "train", config, "--set", "model.trainable_backbone_layers=7")
    _assert_user_error(code, err, f"{config}: model.trainable_backbone_layers must be an int in "
                                  f"[0, 5], got 7")
    code, _, err = _run(capsys, "eval", ckpt, "--device", "abacus")
    _assert_user_error(code, err, "device 'abacus': not a device name")
    code, _, err = _run(capsys, "eval")
    _assert_user_error(code, err, "eval needs CHECKPOINT [--config CONFIG]")
    code, _, err = _run(capsys, "eval", config, ckpt, "--config", config)
    _assert_user_error(code, err, "eval needs CHECKPOINT [--config CONFIG]")
    code, _, err = _run(capsys, "eval", ckpt, "--set", "data.val_ann=null",
                        "--set", "data.val_images=null")
    _assert_user_error(code, err, f"{ckpt} (its stored config): data.val_ann / data.val_images "
                                  f"are not set")
    code, _, err = _run(capsys, "convert-voc", tmp_path / "no_folder", tmp_path / "x.json")
    _assert_user_error(code, err, f"{tmp_path / 'no_folder'}: not an existing directory")
    code, _, err = _run(capsys, "predict", ckpt, tiny["paths"]["val_images"], "--score-thresh", "2")
    _assert_user_error(code, err, "score_thresh must lie in [0, 1], got 2.0")


def test_commands_that_do_not_split_their_work_are_marked_for_the_first_process_only():
    from libra_rcnn.cli import build_parser

    parser = build_parser()
    single = {name: getattr(parser.parse_args(argv), "single_process", False) for name, argv in {
        "predict": ["predict", "c.pth", "x.png"], "check-data": ["check-data", "c.yaml"],
        "convert-voc": ["convert-voc", "f", "o.json"], "analyze": ["analyze", "loss-curves"],
        "train": ["train", "c.yaml"], "eval": ["eval", "c.pth"]}.items()}
    assert single == {"predict": True, "check-data": True, "convert-voc": True, "analyze": True,
                      "train": False, "eval": False}


def test_every_user_error_type_is_a_user_input_error():
    from libra_rcnn import cli
    from libra_rcnn.config import ConfigError
    from libra_rcnn.data import BadAnnotationError, BadImageError
    from libra_rcnn.engine.checkpoint import CheckpointError
    from libra_rcnn.engine.train import DataValidationError
    from libra_rcnn.errors import UserInputError

    for error in (ConfigError, CheckpointError, BadImageError, BadAnnotationError,
                  DataValidationError, cli.UserError):
        assert issubclass(error, UserInputError) and issubclass(error, ValueError), error


def test_a_bug_keeps_its_traceback_and_debug_shows_user_errors_in_full(tiny, tmp_path, capsys,
                                                                       monkeypatch):
    import libra_rcnn.data

    def broken(dataset):
        raise ValueError("internal inconsistency")  # a ValueError, but not a user error

    monkeypatch.setattr(libra_rcnn.data, "check_dataset", broken)
    with pytest.raises(ValueError, match="internal inconsistency"):
        main(["--quiet", "check-data", str(tiny["config"])])
    monkeypatch.undo()

    missing = tmp_path / "nope.yaml"
    assert main(["--debug", "--quiet", "train", str(missing)]) == 2
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert lines[0] == "Traceback (most recent call last):"
    assert "libra_rcnn.config.ConfigError: " in err
    assert lines[-1] == f"libra-rcnn: error: {missing}: no such config file (and no shipped " \
                        f"config of that name; see `libra-rcnn configs`)"


@pytest.mark.slow
def test_a_bug_exits_1_with_its_traceback_from_the_command_line(tiny):
    child = ("import runpy, libra_rcnn.data\n"
             "def broken(dataset):\n"
             "    raise ValueError('internal inconsistency')\n"
             "libra_rcnn.data.check_dataset = broken\n"
             "runpy.run_module('libra_rcnn', run_name='__main__', alter_sys=True)\n")
    result = subprocess.run([sys.executable, "-c", child, "--quiet", "check-data",
                             str(tiny["config"])], capture_output=True, text=True, timeout=120)
    assert result.returncode == 1
    assert "Traceback (most recent call last):" in result.stderr
    assert result.stderr.strip().splitlines()[-1] == "ValueError: internal inconsistency"
    assert "libra-rcnn: error:" not in result.stderr


def test_python_dash_m_entry_point(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "libra_rcnn", "train", str(tmp_path / "absent.yaml")],
        capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert result.stderr.strip() == \
        f"libra-rcnn: error: {tmp_path / 'absent.yaml'}: no such config file (and no shipped " \
        f"config of that name; see `libra-rcnn configs`)"
