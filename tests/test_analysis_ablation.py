"""Tests of the ablation runner (libra_rcnn.analysis.ablation): real tiny training runs whose
table must hold the evaluator's numbers, resuming, interruption, and the ready-made tables."""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import pytest
from torch.utils.data import DataLoader

from libra_rcnn.analysis import (
    ABLATION_TABLES,
    AblationInterrupted,
    ablation,
    add_ablate_command,
    run_ablation,
)
from libra_rcnn.config import load_config
from libra_rcnn.data import CocoDetection, collate_fn, make_shapes_dataset
from libra_rcnn.engine.checkpoint import load_model_from_checkpoint
from libra_rcnn.engine.evaluate import PAPER_METRIC_NAMES, evaluate
from libra_rcnn.engine.train import TrainSummary

BASE_YAML = """
model:
  arch: faster_rcnn
  backbone: resnet18
  num_classes: 4
  min_size: 64
  max_size: 64
  fpn_channels: 16
  representation_size: 32
  rpn_post_nms_top_n_train: 64
  rpn_post_nms_top_n_test: 32
  roi_sampler:
    num: 32
train:
  epochs: 1
  batch_size: 2
  warmup_iters: 1
  log_period: 1
  tensorboard: false
data:
  num_workers: 0
"""


pytestmark = pytest.mark.usefixtures("one_intra_op_thread")


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    root = tmp_path_factory.mktemp("ablation_data")
    paths = make_shapes_dataset(root / "shapes", num_train=4, num_val=2, image_size=64, seed=0)
    config = root / "base.yaml"
    config.write_text(BASE_YAML)
    data = [f"data.train_ann={paths['train_json']}", f"data.train_images={paths['train_images']}",
            f"data.val_ann={paths['val_json']}", f"data.val_images={paths['val_images']}"]
    return config, data, paths


VARIANTS = {
    "Baseline": list(ablation.BASELINE_OVERRIDES),
    "+ balanced L1 (alpha=0.5|gamma=1.5)": [*ablation.BASELINE_OVERRIDES,
                                           "model.box_loss.kind=balanced_l1"],
}


def _evaluate_independently(checkpoint: Path, paths: dict) -> dict:
    model, _ = load_model_from_checkpoint(checkpoint)
    dataset = CocoDetection(paths["val_json"], paths["val_images"], train=False)
    loader = DataLoader(dataset, batch_size=1, collate_fn=collate_fn)
    return evaluate(model, loader, progress=False).metrics


def _table_rows(markdown: str) -> list[list[str]]:
    lines = [line for line in markdown.splitlines() if line.startswith("|")]
    return [[cell.strip() for cell in line.strip("|").split(" | ")] for line in lines[2:]]


def test_ablation_trains_evaluates_and_resumes(base, tmp_path, monkeypatch):
    config, data, paths = base
    out = tmp_path / "ablation"
    table = run_ablation(config, VARIANTS, output_dir=out, overrides=data, max_iters=1, seed=7,
                         device="cpu")

    # one row per variant, in order, with the paper's columns
    assert table.splitlines()[0] == "| Method | " + " | ".join(PAPER_METRIC_NAMES) + " |"
    rows = _table_rows(table)
    assert [r[0] for r in rows] == ["Baseline", "+ balanced L1 (alpha=0.5\\|gamma=1.5)"]
    assert (out / "ablation.md").read_text().count(table) == 1

    summary = json.loads((out / "ablation.json").read_text())
    assert summary["seed"] == 7 and summary["budget"]["max_iters"] == 1
    folders = ["baseline", "balanced_l1_alpha_0.5_gamma_1.5"]
    assert [v["dir"] for v in summary["variants"]] == folders
    for entry, row in zip(summary["variants"], rows):
        folder = out / entry["dir"]
        # each variant trained with its overrides, the shared seed and the budget
        trained = load_config(folder / "config.yaml")
        assert trained.train.seed == 7 and trained.train.max_iters == 1
        assert entry["iteration"] == 1
        # the metrics are the evaluator's on the saved checkpoint
        expected = _evaluate_independently(folder / "latest.pth", paths)
        assert entry["metrics"] == pytest.approx(expected, abs=1e-12)
        assert row[1:] == [f"{100 * expected[k]:.1f}" if expected[k] >= 0 else "-"
                           for k in PAPER_METRIC_NAMES]
        assert (folder / "val_results.json").is_file()
    assert load_config(out / folders[0] / "config.yaml").model.box_loss.kind == "smooth_l1"
    assert load_config(out / folders[1] / "config.yaml").model.box_loss.kind == "balanced_l1"

    # a rerun skips finished variants: nothing is trained or evaluated
    def must_not_run(*args, **kwargs):
        raise AssertionError("a finished variant was run again")

    monkeypatch.setattr(ablation, "train_variant", must_not_run)
    monkeypatch.setattr(ablation, "evaluate_checkpoint", must_not_run)
    assert run_ablation(config, VARIANTS, output_dir=out, overrides=data, max_iters=1, seed=7,
                        device="cpu") == table
    monkeypatch.undo()

    # a variant without metrics but with a checkpoint resumes from it
    (out / folders[1] / "metrics.json").unlink()
    resumed_from = []
    real_train = ablation.train_variant

    def spy(cfg, *, resume, device, progress):
        resumed_from.append(resume)
        return real_train(cfg, resume=resume, device=device, progress=progress)

    monkeypatch.setattr(ablation, "train_variant", spy)
    assert run_ablation(config, VARIANTS, output_dir=out, overrides=data, max_iters=1, seed=7,
                        device="cpu") == table
    assert resumed_from == [out / folders[1] / "latest.pth"]

    # other overrides for a finished variant: refused rather than mixing results
    with pytest.raises(ValueError, match="other overrides"):
        run_ablation(config, VARIANTS, output_dir=out, overrides=data, max_iters=1, seed=8,
                     device="cpu")


def _fake_train(iterations: dict):
    def train_variant(cfg, *, resume, device, progress):
        out = Path(cfg.output_dir)
        out.mkdir(parents=True, exist_ok=True)
        # the runner trains without periodic validation
        assert cfg.data.val_ann is None and cfg.data.val_images is None
        stop = iterations.get(out.name, "max_iters")
        return TrainSummary(stop_reason=stop, signal=15 if stop == "interrupted" else None,
                            checkpoint=str(out / "latest.pth"), iteration=3, epoch=0,
                            iters_per_epoch=4, output_dir=str(out))
    return train_variant


def test_known_metrics_land_in_the_table_and_interruption_stops(base, tmp_path, monkeypatch):
    config, data, _ = base
    known = {
        "first": {"AP": 0.385, "AP50": 0.593, "AP75": 0.42, "APs": 0.229, "APm": 0.421, "APl": -1.0},
        "second": {"AP": 0.359, "AP50": 0.58, "AP75": 0.384, "APs": 0.212, "APm": 0.395, "APl": 0.464},
    }
    evaluated = []

    def fake_evaluate(cfg, checkpoint, *, device, results_file, progress):
        evaluated.append(Path(checkpoint).parent.name)
        return known[Path(checkpoint).parent.name]

    monkeypatch.setattr(ablation, "train_variant", _fake_train({}))
    monkeypatch.setattr(ablation, "evaluate_checkpoint", fake_evaluate)
    variants = {"first": [], "second": ["model.bfp.enabled=true"]}
    table = run_ablation(config, variants, output_dir=tmp_path / "a", overrides=data, epochs=2,
                         title="Known")
    assert _table_rows(table) == [["first", "38.5", "59.3", "42.0", "22.9", "42.1", "-"],
                                  ["second", "35.9", "58.0", "38.4", "21.2", "39.5", "46.4"]]
    assert evaluated == ["first", "second"]
    markdown = (tmp_path / "a" / "ablation.md").read_text()
    assert markdown.startswith("# Known") and "epochs=2" in markdown

    # an interrupted variant: the finished rows are written, the interrupted one has no metrics
    monkeypatch.setattr(ablation, "train_variant", _fake_train({"second": "interrupted"}))
    with pytest.raises(AblationInterrupted) as info:
        run_ablation(config, variants, output_dir=tmp_path / "b", overrides=data, epochs=2)
    assert info.value.signal == 15
    assert not (tmp_path / "b" / "second" / "metrics.json").exists()
    assert [r[0] for r in _table_rows((tmp_path / "b" / "ablation.md").read_text())] == ["first"]


def test_bad_variants_fail_before_any_training(base, tmp_path, monkeypatch):
    config, data, _ = base
    monkeypatch.setattr(ablation, "train_variant", _fake_train({}))
    with pytest.raises(ValueError, match="share the folder"):
        run_ablation(config, {"K = 2": [], "k 2": []}, output_dir=tmp_path, overrides=data)
    with pytest.raises(ValueError, match="key=value"):
        run_ablation(config, {"a": ["model.neck"]}, output_dir=tmp_path, overrides=data)
    with pytest.raises(ValueError, match="model.bfp.refine_typo"):
        run_ablation(config, {"a": [], "b": ["model.bfp.refine_typo=1"]}, output_dir=tmp_path,
                     overrides=data)
    assert not (tmp_path / "a").exists()  # the valid first variant was not started either
    with pytest.raises(ValueError, match="val"):
        run_ablation(config, {"a": []}, output_dir=tmp_path,
                     overrides=[*data, "data.val_ann=null", "data.val_images=null"])


# the paper's rows and the shipped per-row configs (configs/ablation/*.yaml) must agree
SHIPPED_ROWS = {
    "table2": ["table2_baseline", "table2_iou_sampling", "table2_iou_sampling_bfp", "table2_libra"],
    "table4": ["table2_baseline", "table4_pos_balance", "table4_k2", "table4_k3", "table4_k5"],
    "table5": ["table2_baseline", "table5_integration", "table5_refinement", "table5_pafpn",
               "table5_balanced_pafpn"],
    "table6": ["table2_baseline", "table6_loss_weight_1.5", "table6_loss_weight_2.0",
               "table6_l1_1.0", "table6_l1_1.5", "table6_l1_2.0", "table6_alpha0.2_gamma1.0",
               "table6_alpha0.3_gamma1.0", "table6_alpha0.5_gamma1.0", "table6_alpha0.5_gamma1.5",
               "table6_alpha0.5_gamma2.0"],
}


@pytest.mark.parametrize("table", sorted(SHIPPED_ROWS))
def test_ready_made_tables_match_the_shipped_row_configs(table):
    rows = ABLATION_TABLES[table]
    assert len(rows) == len(SHIPPED_ROWS[table])
    for (name, overrides), shipped in zip(rows.items(), SHIPPED_ROWS[table]):
        # the overrides turn the (Libra) Fast R-CNN base into exactly the shipped row
        from_overrides = load_config("ablation/table2_libra", overrides).model
        assert from_overrides == load_config(f"ablation/{shipped}").model, (table, name)


def test_table2_is_cumulative_and_table6_sets_alpha_gamma():
    rows = [load_config("fast_rcnn_r50_fpn_1x_coco", o).model
            for o in ABLATION_TABLES["table2"].values()]
    assert [(m.roi_sampler.neg_balance, m.bfp.enabled, m.box_loss.kind) for m in rows] == [
        (False, False, "smooth_l1"), (True, False, "smooth_l1"), (True, True, "smooth_l1"),
        (True, True, "balanced_l1")]
    model = load_config("fast_rcnn_r50_fpn_1x_coco",
                        ABLATION_TABLES["table6"]["alpha = 0.3, gamma = 1.0"]).model
    assert (model.box_loss.kind, model.box_loss.alpha, model.box_loss.gamma) == ("balanced_l1", 0.3, 1.0)


def test_ablate_cli(base, tmp_path, monkeypatch, capsys):
    config, data, _ = base
    monkeypatch.setattr(ablation, "train_variant", _fake_train({}))
    monkeypatch.setattr(ablation, "evaluate_checkpoint",
                        lambda cfg, checkpoint, **kw: {k: 0.5 for k in PAPER_METRIC_NAMES})
    parser = argparse.ArgumentParser(prog="libra-rcnn ablate")
    add_ablate_command(parser)
    set_args = [a for d in data for a in ("--set", d)]
    args = parser.parse_args([str(config), "--variant", "base", "--variant", "bl1",
                              "model.box_loss.kind=balanced_l1", *set_args, "--max-iters", "1",
                              "--output-dir", str(tmp_path / "cli")])
    assert args.func(args) == 0
    printed = capsys.readouterr().out
    assert "| base | 50.0" in printed and "| bl1 | 50.0" in printed

    args = parser.parse_args([str(config), "--table", "table4", "--only", "K = 3", *set_args,
                              "--output-dir", str(tmp_path / "t4")])
    assert args.func(args) == 0
    assert [r[0] for r in _table_rows((tmp_path / "t4" / "ablation.md").read_text())] == ["K = 3"]
    entry = json.loads((tmp_path / "t4" / "k_3" / "metrics.json").read_text())
    assert "model.roi_sampler.num_bins=3" in entry["overrides"]

    args = parser.parse_args([str(config), "--table", "table4", "--only", "K = 4"])
    with pytest.raises(ValueError, match="K = 4"):
        args.func(args)


def test_rpn_variants_get_their_recall_columns(base, tmp_path, monkeypatch):
    config, data, _ = base
    monkeypatch.setattr(ablation, "train_variant", _fake_train({}))
    monkeypatch.setattr(ablation, "evaluate_checkpoint",
                        lambda cfg, checkpoint, **kw: {"AR@100": 0.521, "AR@300": 0.583})
    table = run_ablation(config, {"Libra RPN": []}, output_dir=tmp_path, overrides=data)
    assert table.splitlines()[0] == "| Method | AR@100 | AR@300 |"
    assert _table_rows(table) == [["Libra RPN", "52.1", "58.3"]]


def test_cli_wiring_does_not_import_torch():
    # `libra-rcnn --help` builds every parser: the analysis commands must not pull in torch
    code = ("import sys, argparse, libra_rcnn.analysis as a\n"
            "p = argparse.ArgumentParser(); s = p.add_subparsers()\n"
            "a.add_analyze_subcommands(s.add_parser('analyze').add_subparsers())\n"
            "a.add_ablate_command(s.add_parser('ablate'))\n"
            "assert 'torch' not in sys.modules, 'torch imported'\n")
    subprocess.run([sys.executable, "-c", code], check=True)
