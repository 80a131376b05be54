"""Tests of the figure analyses (libra_rcnn.analysis): IoU histograms (Fig. 3), BFP heatmaps
(Fig. 4), balanced L1 curves (Fig. 5), sampled negatives (Fig. 6) and their CLI commands.

Everything runs on a tiny generated shapes set (64 px images) with a ResNet-18 Libra Faster R-CNN
whose heads are a few dozen channels wide; the model is untrained (the analyses only need *a*
detector). The numbers behind each plot are checked against independent computations.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import math
import re
import shutil

import matplotlib
import numpy as np
import pytest
import torch
from torchvision.ops import box_iou

from libra_rcnn.analysis import (
    add_analyze_subcommands,
    bfp_heatmaps,
    iou_histogram_counts,
    iou_histograms,
    loss_curves,
    sample_visualization,
)
from libra_rcnn.analysis._common import background_loss, roi_candidates
from libra_rcnn.config import config_to_dict
from libra_rcnn.data import CocoDetection, make_shapes_dataset
from libra_rcnn.engine.checkpoint import CHECKPOINT_FORMAT, save_checkpoint
from libra_rcnn.errors import UserInputError
from libra_rcnn.models import baseline_model_config, build_model, libra_model_config
from libra_rcnn.ops import balanced_l1_loss

from figure_checks import assert_drawn, colour_pixels

TINY = dict(backbone="resnet18", num_classes=4, min_size=64, max_size=64, representation_size=32,
            fpn_channels=16, rpn_post_nms_top_n_test=150)


pytestmark = pytest.mark.usefixtures("one_intra_op_thread")


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    return make_shapes_dataset(tmp_path_factory.mktemp("shapes"), num_train=4, num_val=2,
                               image_size=64, seed=0)


@pytest.fixture(scope="module")
def dataset(shapes):
    return CocoDetection(shapes["train_json"], shapes["train_images"], train=True)


def _build(cfg, seed=0):
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return build_model(cfg).eval()


@pytest.fixture(scope="module")
def model_cfg():
    return libra_model_config("faster_rcnn", **TINY)


@pytest.fixture(scope="module")
def model(model_cfg):
    return _build(model_cfg)


@pytest.fixture(scope="module")
def sample_with_gt(dataset):
    for index in range(len(dataset)):
        image, target = dataset[index]
        if target["boxes"].numel():
            return image, target
    pytest.fail("the shapes set has no image with boxes")


# ----------------------------------------------------------------------------------------------
# Figure 3: IoU histograms


def test_iou_histogram_counts_golden_bins():
    ious = torch.tensor([0.0, 0.049, 0.05, 0.2499, 0.25, 0.4999])
    counts = iou_histogram_counts(ious, bins=10, upper=0.5)
    assert counts.tolist() == [2, 1, 0, 0, 1, 1, 0, 0, 0, 1]
    assert iou_histogram_counts(torch.zeros(0), bins=3, upper=0.5).tolist() == [0, 0, 0]
    with pytest.raises(ValueError, match="ious must lie in"):
        iou_histogram_counts(torch.tensor([0.1, 0.5]), bins=10, upper=0.5)
    with pytest.raises(ValueError, match="bins"):
        iou_histogram_counts(ious, bins=0, upper=0.5)


def test_iou_histograms_counts_sum_to_sampled_negatives(model, dataset, tmp_path):
    num_neg = 20
    result = iou_histograms(model, dataset, num_images=3, num_neg=num_neg, bins=10, seed=0,
                            out_dir=tmp_path)
    per_image = result["negatives_per_image"]
    assert len(per_image) == len(result["image_ids"]) >= 1
    expected_total = sum(min(num_neg, m) for m in per_image)
    assert expected_total > 0
    for name in ("random", "iou_balanced", "hard_negative"):
        counts = result["counts"][name]
        assert len(counts) == 10
        assert sum(counts) == result["num_sampled"][name] == expected_total
        # bin 0 is [0, 0.05): the share above 0.05 is everything else
        assert result["share_above"][name] == pytest.approx(1 - counts[0] / expected_total)
    assert result["bin_edges"] == pytest.approx([0.05 * k for k in range(11)])
    assert result["neg_iou_thresh"] == 0.5

    with open(result["files"]["csv"]) as f:
        rows = list(csv.reader(f))
    assert rows[0] == ["iou_from", "iou_to", "random", "iou_balanced", "hard_negative"]
    assert len(rows) == 11
    for name_index, name in enumerate(("random", "iou_balanced", "hard_negative")):
        assert [int(r[2 + name_index]) for r in rows[1:]] == result["counts"][name]
    # the figure: one bar colour per selection, and since each selection's bars are its shares
    # (summing to 100 %), every selection's bars cover the same area
    pixels = assert_drawn(tmp_path / "iou_histogram.png", figsize=(7.0, 4.0))
    areas = [colour_pixels(pixels, colour) for colour in ("#4c72b0", "#55a868", "#dd8452")]
    assert min(areas) > 2000 and max(areas) < 1.05 * min(areas), areas


def test_iou_histograms_take_all_negatives_when_fewer_than_asked(model, dataset):
    # asking for more negatives than exist: every selection is the whole negative pool, so all
    # three histograms equal the histogram of all negatives' IoUs (computed here with numpy)
    result = iou_histograms(model, dataset, num_images=1, num_neg=100_000, bins=5)
    image, target = next(s for s in (dataset[i] for i in range(len(dataset)))
                         if s[1]["boxes"].numel())
    cand = roi_candidates(model, image, target)
    all_negative_ious = cand.max_overlaps[cand.neg_inds].numpy()
    expected, _ = np.histogram(all_negative_ious, bins=5, range=(0.0, 0.5))
    assert result["negatives_per_image"] == [len(all_negative_ious)]
    for name in ("random", "iou_balanced", "hard_negative"):
        assert result["counts"][name] == expected.tolist()


def test_iou_histograms_bin_as_the_models_sampler(model_cfg, dataset, sample_with_gt):
    # the IoU-balanced selection uses the model's own bin layout (mmdetection's here), as its
    # training step does; recomputed directly with the same generator sequence
    from libra_rcnn.ops.iou_balanced_sampler import iou_balanced_negative_sample, random_choice

    image, target = sample_with_gt
    one_image = torch.utils.data.Subset(dataset, [next(
        i for i in range(len(dataset)) if dataset[i][1]["boxes"].numel())])
    counts = {}
    for binning in ("negatives", "all_candidates"):
        cfg = dataclasses.replace(model_cfg, roi_sampler=dataclasses.replace(
            model_cfg.roi_sampler, binning=binning, floor_thr=0.0))
        model = _build(cfg)
        result = iou_histograms(model, one_image, num_images=1, num_neg=12, bins=50)
        assert result["binning"] == binning
        cand = roi_candidates(model, image, target)
        generator = torch.Generator().manual_seed(0)
        random_choice(cand.neg_inds, 12, generator)
        picked = iou_balanced_negative_sample(
            cand.neg_inds, cand.max_overlaps, 12, num_bins=3, floor_thr=0.0, binning=binning,
            generator=generator)
        expected, _ = np.histogram(cand.max_overlaps[picked].numpy(), bins=50, range=(0.0, 0.5))
        assert result["counts"]["iou_balanced"] == expected.tolist()
        counts[binning] = result["counts"]["iou_balanced"]
    assert counts["negatives"] != counts["all_candidates"]  # the two layouts choose differently here


def test_hard_negatives_are_the_highest_background_loss(model, dataset, sample_with_gt):
    image, target = sample_with_gt
    cand = roi_candidates(model, image, target)
    neg = cand.neg_inds
    # the box head's probability of "background" for every negative, computed here directly
    heads = model.roi_heads
    with torch.no_grad():
        pooled = heads.box_roi_pool(cand.features, [cand.boxes[neg]], [cand.image_size])
        logits, _ = heads.box_predictor(heads.box_head(pooled))
    loss = -torch.log_softmax(logits, dim=1)[:, 0]
    hardest_ious = cand.max_overlaps[neg[torch.argsort(loss, descending=True)[:7]]]
    expected, _ = np.histogram(hardest_ious.numpy(), bins=50, range=(0.0, 0.5))

    one_image = torch.utils.data.Subset(dataset, [next(
        i for i in range(len(dataset)) if dataset[i][1]["boxes"].numel())])
    result = iou_histograms(model, one_image, num_images=1, num_neg=7, bins=50)
    assert result["counts"]["hard_negative"] == expected.tolist()


def test_roi_candidates_match_training_rule(model, sample_with_gt):
    image, target = sample_with_gt
    cand = roi_candidates(model, image, target)
    # ground truth joins the proposals (as in training) and is matched to itself
    num_gt = target["boxes"].shape[0]
    assert torch.equal(cand.boxes[-num_gt:], cand.gt_boxes)
    assert torch.all(cand.max_overlaps[-num_gt:] > 0.999)
    # negatives are exactly the candidates whose best IoU (recomputed) is below 0.5
    iou = box_iou(cand.gt_boxes, cand.boxes).max(dim=0).values
    assert torch.equal(cand.neg_inds, torch.nonzero(iou < 0.5).squeeze(1))
    # hard-negative scores are the box head's background cross-entropy
    losses = background_loss(model, cand, cand.neg_inds[:5])
    assert losses.shape == (min(5, cand.neg_inds.numel()),)
    assert torch.all(losses >= 0)


def test_roi_candidates_use_the_training_proposal_count(sample_with_gt):
    # a training step's RoI sampler chooses from the RPN's training-time proposals; with the
    # test-time count (5 here) the pool would be smaller than the sampler's negative quota
    cfg = libra_model_config("faster_rcnn", **{**TINY, "rpn_post_nms_top_n_test": 5,
                                               "rpn_post_nms_top_n_train": 60})
    model = _build(cfg)
    image, target = sample_with_gt
    cand = roi_candidates(model, image, target)
    num_gt = target["boxes"].shape[0]
    assert 5 < cand.boxes.shape[0] - num_gt <= 60
    assert not model.training and not model.rpn.training  # modes restored


def test_iou_histograms_rejects_bad_arguments(model, dataset):
    with pytest.raises(ValueError, match="num_images"):
        iou_histograms(model, dataset, num_images=0)
    with pytest.raises(ValueError, match="num_neg"):
        iou_histograms(model, dataset, num_images=1, num_neg=0)


# ----------------------------------------------------------------------------------------------
# Figure 5: balanced L1 curves


def test_loss_curves_equal_the_loss_function(tmp_path):
    settings = ((0.5, 1.0), (0.3, 1.0), (0.5, 1.5))
    result = loss_curves(tmp_path / "curves.png", settings=settings, beta=1.0, num_points=61)
    x = result["x"]
    assert x[0] == 0.0 and x[-1] == pytest.approx(3.0) and len(x) == 61
    for alpha, gamma in settings:
        curve = result["balanced_l1"][(alpha, gamma)]
        # the loss values are the library function's
        direct = balanced_l1_loss(torch.tensor(x), torch.zeros(len(x), dtype=torch.float64),
                                  alpha=alpha, gamma=gamma, beta=1.0, reduction="none")
        np.testing.assert_allclose(curve["loss"], direct.numpy(), rtol=0, atol=1e-12)
        # the gradient is Eq. 7, written out independently: alpha ln(b x + 1) below 1, gamma above
        b = math.exp(gamma / alpha) - 1
        expected_grad = np.where(x < 1.0, alpha * np.log(b * x + 1.0), gamma)
        np.testing.assert_allclose(curve["grad"], expected_grad, rtol=1e-9, atol=1e-12)
    # smooth L1 (beta = 1): 0.5 x^2 then x - 0.5; gradient min(x, 1)
    np.testing.assert_allclose(result["smooth_l1"]["loss"], np.where(x < 1, 0.5 * x**2, x - 0.5),
                               atol=1e-12)
    np.testing.assert_allclose(result["smooth_l1"]["grad"], np.minimum(x, 1.0), atol=1e-12)

    with open(tmp_path / "curves.csv") as f:
        rows = list(csv.reader(f))
    header = rows[0]
    assert header[:3] == ["x", "smooth_l1_loss", "smooth_l1_grad"]
    table = np.array([[float(v) for v in row] for row in rows[1:]])
    column = header.index("loss_a0.5_g1.5")
    np.testing.assert_array_equal(table[:, column], result["balanced_l1"][(0.5, 1.5)]["loss"])
    # the figure: the three balanced L1 curves in matplotlib's first three colours, in both
    # panels
    pixels = assert_drawn(tmp_path / "curves.png", figsize=(10.0, 4.0))
    for half in np.array_split(pixels, 2, axis=1):
        assert all(colour_pixels(half, colour) > 200 for colour in ("C0", "C1", "C2"))
    assert colour_pixels(pixels, "C3") == 0  # no fourth curve


def test_loss_curves_beta_moves_the_inlier_boundary():
    result = loss_curves(settings=((0.5, 1.5),), beta=0.5, max_error=2.0, num_points=41)
    x = result["x"]
    b = math.exp(1.5 / 0.5) - 1
    expected = np.where(x < 0.5, 0.5 * np.log(b * x / 0.5 + 1.0), 1.5)
    np.testing.assert_allclose(result["balanced_l1"][(0.5, 1.5)]["grad"], expected, atol=1e-9)
    assert result["files"] == {}


def test_loss_curves_rejects_bad_settings():
    with pytest.raises(ValueError, match="alpha"):
        loss_curves(settings=((0.0, 1.0),))
    with pytest.raises(ValueError, match="duplicate"):
        loss_curves(settings=((0.5, 1.0), (0.5, 1.0)))
    with pytest.raises(ValueError, match="settings"):
        loss_curves(settings=())


# ----------------------------------------------------------------------------------------------
# Figure 6: sampled negatives


def test_sample_visualization_boxes_are_negatives_in_image_pixels(model, sample_with_gt, tmp_path):
    image, target = sample_with_gt
    result = sample_visualization(model, image, target, num_neg=12, seed=3,
                                  out_png=tmp_path / "samples.png")
    # the figure: both panels show the ground truth (green) and the negatives (magenta, drawn
    # translucent over the image, hence the tolerance)
    height, width = image.shape[-2:]
    pixels = assert_drawn(tmp_path / "samples.png", figsize=(10.0, 5.0 * height / width + 0.6))
    for panel in np.array_split(pixels, 2, axis=1):
        assert colour_pixels(panel, "#34c759") > 1000
        assert colour_pixels(panel, "#ff00ff", tolerance=60) > 1000
    torch.testing.assert_close(result["gt_boxes"], target["boxes"], rtol=0, atol=1e-4)
    height, width = image.shape[-2:]
    for name in ("random", "iou_balanced"):
        boxes, ious = result[name]["boxes"], result[name]["ious"]
        assert boxes.shape == (min(12, result["num_candidates"]), 4)
        assert torch.all(boxes[:, 0::2] >= 0) and torch.all(boxes[:, 0::2] <= width)
        assert torch.all(boxes[:, 1::2] >= 0) and torch.all(boxes[:, 1::2] <= height)
        # recomputed in the original frame, each box's best IoU with the ground truth is the
        # reported one and below the background threshold
        recomputed = box_iou(target["boxes"], boxes).max(dim=0).values
        torch.testing.assert_close(recomputed, ious, rtol=0, atol=1e-4)
        assert torch.all(ious < 0.5)
    # Eq. 2: each of K = 3 equal IoU bins over [0, max negative IoU] gives num / K = 4 picks, or
    # all its candidates when it has fewer
    cand = roi_candidates(model, image, target)
    neg_ious = cand.max_overlaps[cand.neg_inds]
    width = float(neg_ious.max()) / 3

    def per_bin(ious):
        return torch.bincount((ious / width).long().clamp(max=2), minlength=3)

    available = per_bin(neg_ious)
    picked = per_bin(result["iou_balanced"]["ious"])
    assert torch.all(picked >= torch.clamp(available, max=4)), (picked, available)
    # same seed, same picks
    again = sample_visualization(model, image, target, num_neg=12, seed=3)
    assert torch.equal(again["iou_balanced"]["boxes"], result["iou_balanced"]["boxes"])


# ----------------------------------------------------------------------------------------------
# Figure 4: BFP heatmaps


def test_bfp_heatmaps_before_and_after_the_pyramid(model, sample_with_gt, tmp_path):
    image, _ = sample_with_gt
    result = bfp_heatmaps(model, image, tmp_path / "bfp.png")
    # the figure: the 1 x 1 level is one flat panel before and one after the pyramid, each in
    # the jet colour of its value on the column's common scale [0, max of the two]
    pixels = assert_drawn(tmp_path / "bfp.png", figsize=(2.6 * 5, 5.4))
    before, after = float(result["before"][-1]), float(result["after"][-1])
    jet = matplotlib.colormaps["jet"]
    assert jet(before / max(before, after)) != jet(after / max(before, after))
    for value in (before, after):
        assert colour_pixels(pixels, jet(value / max(before, after))) > 5000
    assert result["levels"] == ["0", "1", "2", "3", "pool"]
    # independent paths: the neck output, and the whole backbone (body -> fpn -> bfp)
    with torch.no_grad():
        images, _ = model.transform([image])
        neck = model.backbone.fpn(model.backbone.body(images.tensors))
        full = model.backbone(images.tensors)
    # 64 px images are not padded (64 is a multiple of 32): no cropping
    assert images.tensors.shape[-2:] == (64, 64)
    for k, name in enumerate(result["levels"]):
        torch.testing.assert_close(result["before"][k], neck[name][0].abs().mean(0))
        torch.testing.assert_close(result["after"][k], full[name][0].abs().mean(0))
    assert not torch.allclose(result["before"][2], result["after"][2])


def test_bfp_heatmaps_needs_a_balanced_feature_pyramid(sample_with_gt):
    baseline = _build(baseline_model_config("faster_rcnn", **TINY))
    with pytest.raises(ValueError, match="model.bfp.enabled"):
        bfp_heatmaps(baseline, sample_with_gt[0])


# ----------------------------------------------------------------------------------------------
# CLI commands (wired the way libra_rcnn.cli does)


@pytest.fixture(scope="module")
def checkpoint(model, model_cfg, shapes, tmp_path_factory):
    path = tmp_path_factory.mktemp("ckpt") / "model.pth"
    save_checkpoint(path, {
        "format": CHECKPOINT_FORMAT, "format_version": 1,
        "model": model.state_dict(), "model_config": config_to_dict(model_cfg),
        "config": {"data": {"train_ann": shapes["train_json"], "train_images": shapes["train_images"],
                            "val_ann": shapes["val_json"], "val_images": shapes["val_images"]}},
    })
    return path


def _parse(argv):
    parser = argparse.ArgumentParser(prog="libra-rcnn analyze")
    add_analyze_subcommands(parser.add_subparsers(dest="analysis", required=True))
    return parser.parse_args(argv)


def test_cli_commands_write_their_files(checkpoint, shapes, tmp_path, capsys):
    out = tmp_path / "out"
    args = _parse(["iou-hist", str(checkpoint), "--num-images", "2", "--num-neg", "8",
                   "--bins", "5", "--out-dir", str(out)])
    assert args.func(args) == 0
    printed = capsys.readouterr().out
    assert "IoU > 0.05" in printed and "hard negatives" in printed
    with open(out / "iou_histogram.csv") as f:
        rows = list(csv.reader(f))
    assert len(rows) == 6
    assert sum(int(r[2]) for r in rows[1:]) == sum(int(r[4]) for r in rows[1:]) > 0

    args = _parse(["loss-curves", "--setting", "0.5,1.5", "--out-dir", str(out)])
    assert args.func(args) == 0
    assert colour_pixels(assert_drawn(out / "loss_curves.png", figsize=(10.0, 4.0)), "C0") > 200
    assert (out / "loss_curves.csv").read_text().splitlines()[0].endswith(
        "loss_a0.5_g1.5,grad_a0.5_g1.5")

    # explicit data paths instead of the checkpoint's stored config; val split image 0
    args = _parse(["samples", str(checkpoint), "--ann-file", shapes["val_json"], "--image-root",
                   shapes["val_images"], "--num-neg", "6", "--out", str(out / "samples.png")])
    assert args.func(args) == 0
    assert colour_pixels(assert_drawn(out / "samples.png", figsize=(10.0, 5.6)), "#34c759") > 0

    args = _parse(["bfp-heatmaps", str(checkpoint), "--split", "val", "--index", "1",
                   "--out", str(out / "bfp.png")])
    assert args.func(args) == 0
    assert_drawn(out / "bfp.png", figsize=(2.6 * 5, 5.4))

    args = _parse(["samples", str(checkpoint), "--index", "99", "--out", str(out / "x.png")])
    with pytest.raises(ValueError, match="index must lie in"):
        args.func(args)


def test_analyze_and_ablate_are_wired_into_the_libra_rcnn_command(tmp_path, capsys):
    from libra_rcnn.cli import main

    out = tmp_path / "curves"
    assert main(["analyze", "loss-curves", "--setting", "0.5,1.5", "--out-dir", str(out)]) == 0
    assert_drawn(out / "loss_curves.png", figsize=(10.0, 4.0))
    assert (out / "loss_curves.csv").is_file()

    # a user error in ablate is one line on stderr and exit code 2, no traceback
    code = main(["ablate", str(tmp_path / "missing.yaml"), "--table", "table2"])
    err = capsys.readouterr().err
    assert code == 2 and "missing.yaml" in err and "Traceback" not in err


def test_analyses_name_the_files_they_write_and_the_images_they_cannot_read(checkpoint, shapes,
                                                                            tmp_path, capsys):
    out = tmp_path / "out"
    # an --out without a suffix becomes a PNG, and the message names the file actually written
    args = _parse(["bfp-heatmaps", str(checkpoint), "--split", "val", "--out", str(out / "fig4")])
    assert args.func(args) == 0
    assert capsys.readouterr().out == f"wrote {out / 'fig4.png'}\n"
    assert sorted(p.name for p in out.iterdir()) == ["fig4.png"]
    args = _parse(["bfp-heatmaps", str(checkpoint), "--split", "val", "--out", str(out / "fig4.v2")])
    with pytest.raises(UserInputError, match=r"fig4\.v2: cannot write a figure as '\.v2'; use one "
                                             r"of .*\.pdf.*\.png"):
        args.func(args)

    # the same images with image 1 truncated
    damaged = tmp_path / "damaged"
    shutil.copytree(shapes["train_images"], damaged)
    broken = damaged / "000001.png"
    broken.write_bytes(broken.read_bytes()[:100])
    data = ["--ann-file", shapes["train_json"], "--image-root", str(damaged)]
    args = _parse(["samples", str(checkpoint), *data, "--index", "1", "--out", str(out / "s.png")])
    with pytest.raises(UserInputError, match=f"{re.escape(str(broken))}: cannot decode: .* "
                                             f"\\(image --index 1; pick another one\\)"):
        args.func(args)
    args = _parse(["iou-hist", str(checkpoint), *data, "--num-images", "4", "--num-neg", "8",
                   "--out-dir", str(out)])
    assert args.func(args) == 0
    printed = capsys.readouterr().out.splitlines()
    at = printed.index("1 unreadable image(s) skipped:")
    assert printed[at + 1].startswith(f"  {broken}: cannot decode: ")
