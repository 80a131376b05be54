"""The accuracy benchmark script (benchmarks/accuracy.py).

The script itself runs in ``--smoke`` mode, in its own process as a user would run it, on tiny
VOC folders generated here (so the tests never depend on ../shared and never skip): the fruit
layout (train/ and test/ folders), then again to check that finished (row, seed) pairs are
skipped, and the BCCD layout (VOC release with ImageSets) with the GPU recipe's settings. Its
pure parts (row definitions, aggregation, paired gains, subsetting, argument checks) get unit
tests with hand-computed answers.
"""

from __future__ import annotations

import csv
import dataclasses
import importlib
import json
import math
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from PIL import Image, ImageDraw

from figure_checks import assert_drawn, colour_pixels
from libra_rcnn.errors import UserInputError

REPO_ROOT = Path(__file__).resolve().parents[1]
CLASSES = ("apple", "banana", "orange")
COLOURS = {"apple": (200, 30, 30), "banana": (230, 210, 40), "orange": (240, 140, 20)}


@pytest.fixture
def acc(monkeypatch):
    """The benchmarks.accuracy module, importable for this test only."""
    monkeypatch.syspath_prepend(str(REPO_ROOT))
    return importlib.import_module("benchmarks.accuracy")


def _xml(filename: str, size: tuple[int, int], objects) -> str:
    body = "".join(
        f"<object><name>{name}</name><difficult>0</difficult><bndbox><xmin>{x1}</xmin>"
        f"<ymin>{y1}</ymin><xmax>{x2}</xmax><ymax>{y2}</ymax></bndbox></object>"
        for name, (x1, y1, x2, y2) in objects)
    return (f"<annotation><filename>{filename}</filename><size><width>{size[0]}</width>"
            f"<height>{size[1]}</height><depth>3</depth></size>{body}</annotation>")


def _write_split(folder: Path, specs) -> None:
    """specs: (stem, (w, h), [(class, (xmin, ymin, xmax, ymax)), ...], flags)."""
    folder.mkdir(parents=True)
    for stem, (w, h), objects, flags in specs:
        image = Image.new("RGB", (w, h), (90, 120, 90))
        draw = ImageDraw.Draw(image)
        for name, (x1, y1, x2, y2) in objects:
            draw.ellipse([x1 - 1, y1 - 1, x2 - 1, y2 - 1], fill=COLOURS[name])
        # messy on purpose, as the real set: PNG bytes behind a .jpg name, <size> 0 x 0
        image.save(folder / f"{stem}.jpg", format="PNG" if "png" in flags else "JPEG")
        xml_size = (0, 0) if "zero_size" in flags else (w, h)
        (folder / f"{stem}.xml").write_text(_xml(f"{stem}.jpg", xml_size, objects))


@pytest.fixture
def tiny_fruit(tmp_path):
    """A fruit-like VOC folder: train/ 6 photos (the first without objects), test/ 3."""
    root = tmp_path / "fruit"
    _write_split(root / "train", [
        ("a_empty", (80, 64), [], ()),
        ("apple_1", (96, 80), [("apple", (10, 12, 50, 56))], ("zero_size",)),
        ("banana_1", (80, 96), [("banana", (20, 8, 70, 40)), ("banana", (5, 50, 40, 90))], ("png",)),
        ("mixed_1", (96, 96), [("orange", (8, 8, 44, 44)), ("apple", (50, 50, 90, 90))], ()),
        ("orange_1", (72, 72), [("orange", (10, 10, 60, 62))], ()),
        ("orange_2", (72, 72), [("orange", (5, 10, 40, 42))], ()),
    ])
    _write_split(root / "test", [
        ("apple_t", (96, 80), [("apple", (20, 10, 70, 60))], ()),
        ("mixed_t", (96, 96), [("banana", (5, 5, 60, 40)), ("orange", (50, 50, 92, 92))], ("zero_size",)),
        ("orange_t", (72, 72), [("orange", (10, 10, 50, 50))], ()),
    ])
    return root


# ---------------------------------------------------------------------------------------------
# the script, end to end


def _strings(value):
    """Every string inside a JSON value."""
    if isinstance(value, str):
        yield value
    elif isinstance(value, dict):
        for item in value.values():
            yield from _strings(item)
    elif isinstance(value, list):
        for item in value:
            yield from _strings(item)


def _head_commit(repo: Path) -> str:
    """``git rev-parse HEAD`` of ``repo`` run here, or "unknown" outside a git checkout."""
    if shutil.which("git") is None:
        return "unknown"
    proc = subprocess.run(["git", "rev-parse", "HEAD"], cwd=repo, capture_output=True, text=True)
    return proc.stdout.strip() if proc.returncode == 0 else "unknown"


def _run(args, cwd=REPO_ROOT):
    command = [sys.executable, "-m", "benchmarks.accuracy", *args]
    proc = subprocess.run(command, cwd=cwd, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, (f"{' '.join(command)} failed:\n{proc.stdout[-3000:]}\n"
                                  f"{proc.stderr[-5000:]}")
    return proc


def test_smoke_run_writes_table_histogram_and_resumes(tiny_fruit, tmp_path):
    out = tmp_path / "out"
    args = ["--smoke", "--regime", "scratch", "--data-root", str(tiny_fruit), "--output-dir",
            str(out), "--threads", "1", "--set", "train.momentum=0.8", "--quiet"]
    first = _run(args)
    earlier = tmp_path / "earlier.json"
    shutil.copy(out / "accuracy.json", earlier)

    # the data: 4 annotated train images (the empty one skipped), 2 test images, fixed classes
    train = json.loads((out / "data" / "smoke_train.json").read_text())
    test = json.loads((out / "data" / "smoke_test.json").read_text())
    assert [im["file_name"] for im in train["images"]] == [
        "apple_1.jpg", "banana_1.jpg", "mixed_1.jpg", "orange_1.jpg"]
    assert [im["file_name"] for im in test["images"]] == ["apple_t.jpg", "mixed_t.jpg"]
    assert len(train["annotations"]) == 6 and len(test["annotations"]) == 3
    assert [c["name"] for c in test["categories"]] == list(CLASSES)
    # 0 x 0 in the XML: the size came from the image file
    assert (train["images"][0]["width"], train["images"][0]["height"]) == (96, 80)

    report = json.loads((out / "accuracy.json").read_text())
    assert [r["key"] for r in report["rows"]] == [
        "faster_rcnn", "iou_sampling", "bfp", "libra_faster_rcnn", "retinanet", "libra_retinanet"]
    # no absolute paths (a value, an override or a command argument): relative to the checkout
    absolute = re.compile(r"(^|[\s=])/")
    assert not [s for s in _strings(report) if absolute.search(s)]
    assert report["data"]["root"] == os.path.relpath(tiny_fruit, REPO_ROOT)
    assert report["settings"]["seeds"] == [0] and report["settings"]["smoke"] is True
    assert report["settings"]["min_size"] == 64 and report["settings"]["max_iters"] == 2
    assert report["settings"]["threads"] == 1
    assert report["settings"]["shared_overrides"][-1] == "train.momentum=0.8"
    assert report["data"]["classes"] == list(CLASSES)
    assert report["git"]["commit"] == _head_commit(REPO_ROOT)
    for row in report["rows"]:
        metrics = row["per_seed"]["0"]
        assert set(metrics) >= {"AP", "AP50", "AP75", "APs", "APm", "APl"}
        assert all(-1.0 <= v <= 1.0 for v in metrics.values())
        run_dir = out / "runs" / row["key"] / "seed_0"
        log = [json.loads(line) for line in next(run_dir.glob("*/log.jsonl")).read_text().splitlines()]
        assert max(e["iter"] for e in log if e["type"] == "train") == 2
        assert not list(run_dir.glob("*/epoch_*.pth"))  # only latest.pth in the smoke run
        run_config = yaml.safe_load(next(run_dir.glob("*/config.yaml")).read_text())
        assert run_config["train"]["momentum"] == 0.8  # --set reached every row's training
    # the baselines carry no delta; every other row is paired with its family's baseline
    deltas = {r["key"]: r["delta_AP"] for r in report["rows"]}
    assert deltas["faster_rcnn"] is None and deltas["retinanet"] is None
    by_key = {r["key"]: r for r in report["rows"]}
    assert deltas["libra_retinanet"]["gains"] == [pytest.approx(
        by_key["libra_retinanet"]["per_seed"]["0"]["AP"] - by_key["retinanet"]["per_seed"]["0"]["AP"])]
    # per-class AP of every run, recomputed from its detections
    for row in report["rows"]:
        assert list(row["per_class"]["0"]) == list(CLASSES)
        assert set(row["stats_per_class"]["apple"]) == {"AP", "AP50", "AP75"}
    assert report["data"]["test_boxes_per_class"] == {"apple": 1, "banana": 1, "orange": 1}

    hist = report["iou_histogram"]
    assert hist["seed"] == 0 and hist["checkpoint"].endswith("latest.pth")
    assert "libra_faster_rcnn" in hist["checkpoint"]
    for series, counts in hist["counts"].items():
        assert sum(counts) == hist["num_sampled"][series] > 0
    # the figure's numbers, and the figure: each selection's bars (its shares, 100 % in all)
    with open(out / "iou_histogram.csv") as f:
        rows = list(csv.DictReader(f))
    for series, counts in hist["counts"].items():
        assert [int(r[series]) for r in rows] == counts
    pixels = assert_drawn(out / "iou_histogram.png", figsize=(7.0, 4.0))
    areas = [colour_pixels(pixels, colour) for colour in ("#4c72b0", "#55a868", "#dd8452")]
    assert min(areas) > 1000 and max(areas) < 1.05 * min(areas), areas

    table = (out / "accuracy.md").read_text()
    assert "smoke run" in table and report["git"]["commit"] in table
    # three tables: metrics (header + 6 rows), per-class AP (header + 6), paired gains
    # (header + 4 rows compared with a baseline, 2 with the Table 2 row before them)
    assert table.count("\n| ") == 7 + 7 + 7
    assert "| + balanced feature pyramid | + IoU-balanced sampling | " in table
    assert "| + balanced L1 loss = Libra Faster R-CNN | + balanced feature pyramid | " in table
    assert "| + balanced L1 loss = Libra Faster R-CNN | 1 |" in table
    assert "| AP apple | AP banana | AP orange |" in table
    assert "wrote" in first.stdout

    # rerun (with the config's thread count: not part of a run's identity): every pair is
    # finished, nothing is trained or evaluated again
    stamps = {p: p.stat().st_mtime_ns for p in out.glob("runs/*/seed_0/*/*")
              if p.name in ("latest.pth", "metrics.json")}
    assert len(stamps) == 12
    _run([a for a in args if a not in ("--threads", "1")])
    assert {p: p.stat().st_mtime_ns for p in stamps} == stamps
    again = json.loads((out / "accuracy.json").read_text())
    assert again["settings"]["threads"] == 2
    assert [r["per_seed"] for r in again["rows"]] == [r["per_seed"] for r in report["rows"]]

    # --reuse: the earlier table's other rows join a table that asks for one row, untrained
    _run(args + ["--rows", "faster_rcnn", "--reuse", str(earlier)])
    assert {p: p.stat().st_mtime_ns for p in stamps} == stamps
    joined = json.loads((out / "accuracy.json").read_text())
    assert joined["settings"]["rows"] == ["faster_rcnn"]
    assert joined["reused"]["rows"] == [
        "iou_sampling", "bfp", "libra_faster_rcnn", "retinanet", "libra_retinanet"]
    assert joined["reused"]["file"] == os.path.relpath(earlier, REPO_ROOT)
    for key in ("rows", "iou_histogram", "data"):
        assert joined[key] == report[key], key
    assert "not trained again" in (out / "accuracy.md").read_text()


@pytest.mark.slow  # a third run of the script; the two datasets' runs above and below stay
def test_jobs_train_seeds_in_separate_processes_then_merge(tiny_fruit, tmp_path):
    out = tmp_path / "out"
    _run(["--smoke", "--data-root", str(tiny_fruit), "--output-dir", str(out), "--rows",
          "faster_rcnn", "retinanet", "--seeds", "0", "1", "--jobs", "2", "--threads", "1"])
    report = json.loads((out / "accuracy.json").read_text())
    assert report["settings"]["seeds"] == [0, 1]
    assert [r["key"] for r in report["rows"]] == ["faster_rcnn", "retinanet"]
    for row in report["rows"]:
        assert sorted(row["per_seed"]) == ["0", "1"]  # each seed's process trained every row
        values = [row["per_seed"][s]["AP"] for s in ("0", "1")]
        assert row["stats"]["AP"]["mean"] == pytest.approx((values[0] + values[1]) / 2)
        assert row["stats"]["AP"]["half_range"] == pytest.approx(abs(values[0] - values[1]) / 2)
        for seed in (0, 1):
            run_dir = out / "runs" / row["key"] / f"seed_{seed}"
            assert next(run_dir.glob("*/metrics.json")).is_file()
    for seed in (0, 1):  # one log per process, each naming its own seed only
        text = (out / f"seed_{seed}.log").read_text()
        assert f"row 'retinanet', seed {seed}" in text and f"seed {1 - seed}" not in text
    assert report["iou_histogram"] is None  # no Libra Faster R-CNN row was asked for


@pytest.fixture
def tiny_bccd(tmp_path):
    """A BCCD-like VOC release folder (Annotations/, JPEGImages/, ImageSets/Main/): 5 train
    photos (one with a zero-area box, as the real set has), 3 test photos, classes RBC / WBC /
    Platelets."""
    root = tmp_path / "bccd"
    for sub in ("Annotations", "JPEGImages", "ImageSets/Main"):
        (root / sub).mkdir(parents=True)
    colours = {"RBC": (220, 120, 120), "WBC": (120, 60, 160), "Platelets": (90, 40, 120)}
    cells = [("RBC", (5, 5, 40, 40)), ("RBC", (30, 10, 66, 46)), ("WBC", (40, 40, 90, 88)),
             ("Platelets", (70, 8, 84, 22))]
    splits = {"train": [f"BloodImage_{i:05d}" for i in range(5)],
              "test": [f"BloodImage_{i:05d}" for i in range(5, 8)]}
    for split, stems in splits.items():
        (root / "ImageSets/Main" / f"{split}.txt").write_text("\n".join(stems) + "\n")
        for i, stem in enumerate(stems):
            objects = [(name, (x1 + i, y1, x2 + i, y2)) for name, (x1, y1, x2, y2) in cells]
            image = Image.new("RGB", (96, 96), (235, 225, 200))
            draw = ImageDraw.Draw(image)
            for name, (x1, y1, x2, y2) in objects:
                draw.ellipse([x1 - 1, y1 - 1, x2 - 1, y2 - 1], fill=colours[name])
            if split == "train" and i == 0:
                objects.append(("RBC", (50, 50, 50, 60)))  # xmin == xmax: dropped, and counted
            image.save(root / "JPEGImages" / f"{stem}.jpg", format="JPEG")
            (root / "Annotations" / f"{stem}.xml").write_text(_xml(f"{stem}.jpg", (96, 96), objects))
    return root


def test_bccd_smoke_run_with_more_seeds_and_the_gpu_recipe(tiny_bccd, tmp_path):
    out = tmp_path / "out"
    proc = _run(["--dataset", "bccd", "--smoke", "--data-root", str(tiny_bccd), "--output-dir",
                 str(out), "--threads", "1", "--recipe", "gpu", "--seeds", "0", "--more-seeds",
                 "1", "--rows", "faster_rcnn", "iou_sampling", "bfp", "iou_sampling_own_bins",
                 "libra_faster_rcnn", "--quiet"])
    report = json.loads((out / "accuracy.json").read_text())
    assert report["dataset"]["key"] == "bccd" and report["settings"]["recipe"] == "gpu"
    assert report["settings"]["convention"] == "torchvision" and report["settings"]["spread"] == "std"
    # the VOC image sets pick the split; the class list is fixed
    assert (report["data"]["train_images"], report["data"]["test_images"]) == (4, 2)
    assert report["data"]["classes"] == ["RBC", "WBC", "Platelets"]
    assert report["data"]["conversion"]["train"]["dropped_degenerate_boxes"] == [
        {"image": "JPEGImages/BloodImage_00000.jpg", "category": "RBC",
         "bbox": [49.0, 49.0, 1.0, 11.0]}]
    assert report["data"]["train_boxes"] == 4 * 4  # the degenerate one is not among them
    # the recipe's settings reached the runs (the smoke run's shrink them again, after them)
    shared = report["settings"]["shared_overrides"]
    assert "train.epochs=8" in shared and "data.num_workers=4" in shared
    assert shared.index("model.min_size=800") < shared.index("model.min_size=64")
    # --more-seeds trains the headline pairs and the feature pyramid row only
    seeds = {r["key"]: sorted(r["per_seed"]) for r in report["rows"]}
    assert seeds == {"faster_rcnn": ["0", "1"], "iou_sampling": ["0", "1"], "bfp": ["0", "1"],
                     "iou_sampling_own_bins": ["0", "1"], "libra_faster_rcnn": ["0", "1"]}
    assert report["settings"]["regime"] == "pretrained"
    assert report["settings"]["backbone"] == "efficientnet_lite0"
    by_key = {r["key"]: r for r in report["rows"]}
    assert by_key["libra_faster_rcnn"]["delta_AP"]["seeds"] == [0, 1]
    own = by_key["iou_sampling_own_bins"]
    assert own["delta_AP_partner"]["gains"] == pytest.approx(
        [own["per_seed"][s]["AP"] - by_key["iou_sampling"]["per_seed"][s]["AP"] for s in "01"])
    assert set(own["delta_AP_per_class"]) == {"RBC", "WBC", "Platelets"}
    run_config = yaml.safe_load(next((out / "runs" / "iou_sampling_own_bins" / "seed_0").glob(
        "*/config.yaml")).read_text())
    assert run_config["model"]["roi_sampler"]["binning"] == "negatives"
    assert run_config["data"]["num_workers"] == 4
    # Figure 3 with the model's own bins (mmdetection's)
    assert report["iou_histogram"]["binning"] == "all_candidates"
    table = (out / "accuracy.md").read_text()
    assert "BCCD" in table and "sample standard deviation" in table
    assert "1 degenerate box(es) (at most 1 px wide or high) dropped" in table
    assert "| + IoU-balanced sampling, bins over the negatives' own IoU range | " \
           "+ IoU-balanced sampling | " in table
    assert "wrote" in proc.stdout


def test_seed_process_command_passes_the_settings_on(acc, tmp_path):
    args = acc.parse_args(["--data-root", "d", "--output-dir", str(tmp_path), "--rows", "bfp",
                           "--epochs", "2", "--set", "train.momentum=0.8", "--jobs", "2"])
    command = acc.seed_process_command(args, 1, threads=3)
    assert command[:4] == [sys.executable, "-m", "benchmarks.accuracy", "--train-only"]
    text = " ".join(command)
    for part in ("--seeds 1 --more-seeds --threads 3", "--rows bfp", "--epochs 2",
                 "--set train.momentum=0.8", "--dataset fruit", "--recipe cpu",
                 "--regime pretrained",
                 f"--output-dir {tmp_path.resolve()}", f"--data-root {Path('d').resolve()}"):
        assert part in text
    assert "--jobs" not in text and "--smoke" not in text
    # a more-seed's process trains the rows it is given; the command parses back to them
    bccd = acc.parse_args(["--dataset", "bccd", "--recipe", "gpu", "--output-dir", str(tmp_path)])
    command = acc.seed_process_command(bccd, 3, threads=1, rows=["faster_rcnn",
                                                                  "libra_faster_rcnn"])
    child = acc.parse_args(command[3:])
    assert (child.dataset, child.recipe, child.seeds, child.more_seeds, child.rows) == (
        "bccd", "gpu", [3], [], ["faster_rcnn", "libra_faster_rcnn"])
    assert child.train_only


def test_a_failing_seed_process_is_reported_with_its_log(acc, tmp_path, monkeypatch):
    args = acc.parse_args(["--output-dir", str(tmp_path), "--jobs", "2"])
    monkeypatch.setattr(acc, "seed_process_command", lambda args, seed, threads, rows: [
        sys.executable, "-c", f"import sys; print('seed {seed} broke'); sys.exit({seed + 3})"])
    with pytest.raises(acc.SeedProcessFailed) as info:
        acc._train_seeds_in_processes(args, {0: ["faster_rcnn"], 1: ["faster_rcnn"]}, tmp_path)
    message = str(info.value)
    assert "seed 0 exited with 3" in message and "seed 1 exited with 4" in message
    assert str(tmp_path / "seed_1.log") in message
    assert (tmp_path / "seed_1.log").read_text() == "seed 1 broke\n"


# ---------------------------------------------------------------------------------------------
# the rows


def _flat(obj, prefix=""):
    """A config as {"model.bfp.enabled": value, ...}."""
    if dataclasses.is_dataclass(obj):
        obj = dataclasses.asdict(obj)
    if isinstance(obj, dict):
        out = {}
        for k, v in obj.items():
            out.update(_flat(v, f"{prefix}{k}."))
        return out
    return {prefix[:-1]: obj}


LIBRA_KEYS = {
    "model.roi_sampler.pos_balance", "model.roi_sampler.neg_balance", "model.bfp.enabled",
    "model.bfp.refine_level", "model.bfp.refine_type", "model.box_loss.kind",
    "model.box_loss.alpha", "model.box_loss.gamma", "model.retina_box_loss.kind",
    "model.retina_box_loss.alpha", "model.retina_box_loss.gamma", "model.roi_sampler.binning",
    "model.box_loss.beta",
}


@pytest.mark.parametrize("dataset", ["fruit", "bccd"])
@pytest.mark.parametrize("regime", ["pretrained", "scratch"])
def test_rows_differ_from_their_baseline_only_in_libra_switches(acc, dataset, regime):
    keys = acc.DATASETS[dataset].rows[regime]
    configs = {key: _flat(acc.row_config(acc.ROWS[key], (), dataset, regime)) for key in keys}
    for key in keys:
        row = acc.ROWS[key]
        for other in (row.baseline, row.partner):
            if other is None:
                continue
            base = configs[other]
            changed = {k for k in base if configs[key][k] != base[k]}
            allowed = LIBRA_KEYS
            if acc.ROWS[other].family != row.family:  # a cascade against its Faster R-CNN
                allowed = LIBRA_KEYS | {"model.arch", "output_dir"} | {k for k in base
                                                         if k.startswith("model.cascade.")}
            assert changed <= allowed, (key, changed - allowed)
    fr, libra = configs["faster_rcnn"], configs["libra_faster_rcnn"]
    assert (fr["model.roi_sampler.pos_balance"], fr["model.roi_sampler.neg_balance"],
            fr["model.bfp.enabled"], fr["model.box_loss.kind"]) == (False, False, False, "smooth_l1")
    assert (libra["model.roi_sampler.pos_balance"], libra["model.roi_sampler.neg_balance"],
            libra["model.bfp.enabled"], libra["model.box_loss.kind"]) == (True, True, True,
                                                                          "balanced_l1")
    # the rows are cumulative, in the paper's order
    assert configs["iou_sampling"]["model.bfp.enabled"] is False
    assert configs["bfp"]["model.bfp.enabled"] is True
    assert configs["bfp"]["model.box_loss.kind"] == "smooth_l1"
    rt, lrt = configs["retinanet"], configs["libra_retinanet"]
    assert (rt["model.bfp.enabled"], rt["model.retina_box_loss.kind"]) == (False, "l1")
    assert (lrt["model.bfp.enabled"], lrt["model.retina_box_loss.kind"],
            lrt["model.bfp.refine_level"]) == (True, "balanced_l1", 1)
    # the two families share backbone, input size, data pipeline, batch and schedule
    shared = [k for k in fr if k.startswith(("data.", "train.")) or k in (
        "model.backbone", "model.norm", "model.backbone_weights", "model.min_size",
        "model.max_size", "model.fpn_channels", "model.trainable_backbone_layers",
        "model.convention")]
    differing = {k for k in shared if fr[k] != rt[k]}
    assert differing <= {"train.base_lr"}  # each family's rate, tuned on its own baseline
    assert fr["model.backbone_weights"] == {"scratch": None, "pretrained": "imagenet"}[regime]


@pytest.mark.parametrize("regime, convention", [("pretrained", "torchvision"),
                                                ("scratch", "mmdet")])
def test_bccd_rows_bin_as_the_reference(acc, regime, convention):
    configs = {key: _flat(acc.row_config(acc.ROWS[key], (), "bccd", regime))
               for key in acc.DATASETS["bccd"].rows[regime]}
    for config in configs.values():
        assert config["model.convention"] == convention
        assert config["model.roi_sampler.floor_thr"] == 0.0
        assert (config["model.min_size"], config["model.max_size"]) == (480, 640)  # scale 1
    assert configs["iou_sampling"]["model.roi_sampler.binning"] == "all_candidates"
    own = configs["iou_sampling_own_bins"]
    assert own["model.roi_sampler.binning"] == "negatives"
    # the pair differs in the bins' range only
    assert {k for k in own if own[k] != configs["iou_sampling"][k]} == {
        "model.roi_sampler.binning"}
    assert configs["libra_retinanet"]["model.retina_box_loss.formula"] == "beta_in_log"
    assert acc.ROWS["iou_sampling_own_bins"].partner == "iou_sampling"
    # Table 2's later rows are each one part more than the row before them
    sampling, bfp, libra = (configs[k] for k in ("iou_sampling", "bfp", "libra_faster_rcnn"))
    assert acc.ROWS["bfp"].partner == "iou_sampling"
    assert {k for k in bfp if bfp[k] != sampling[k]} == {"model.bfp.enabled"}
    assert acc.ROWS["libra_faster_rcnn"].partner == "bfp"
    assert {k for k in libra if libra[k] != bfp[k]} <= {
        "model.box_loss.kind", "model.box_loss.alpha", "model.box_loss.gamma",
        "model.box_loss.beta"}
    assert libra["model.box_loss.kind"] != bfp["model.box_loss.kind"]
    assert "iou_sampling_own_bins" not in acc.DATASETS["fruit"].rows["scratch"]


@pytest.mark.parametrize("regime", ["pretrained", "scratch"])
def test_the_baselines_box_loss_is_the_configs_and_balanced_l1_the_papers(acc, regime):
    from libra_rcnn.config import load_config

    for dataset in ("fruit", "bccd"):
        config = load_config(acc.DATASETS[dataset].configs[regime]["faster_rcnn"]).model.box_loss
        rows = {key: acc.row_config(acc.ROWS[key], (), dataset, regime).model.box_loss
                for key in ("faster_rcnn", "iou_sampling", "bfp", "libra_faster_rcnn")}
        for key in ("faster_rcnn", "iou_sampling", "bfp"):
            assert (rows[key].kind, rows[key].beta) == (config.kind, config.beta), key
        libra = rows["libra_faster_rcnn"]
        assert (libra.kind, libra.beta, libra.alpha, libra.gamma) == ("balanced_l1", 1.0, 0.5, 1.5)
    tuned = load_config(acc.DATASETS["bccd"].configs[regime]["faster_rcnn"]).model.box_loss
    assert tuned.beta == {"pretrained": pytest.approx(1 / 9), "scratch": 1.0}[regime]


def test_gpu_recipe_resolves_to_the_longer_schedule(acc):
    shared = list(acc.GPU_RECIPE)
    for key in ("faster_rcnn", "libra_retinanet"):
        config = acc.row_config(acc.ROWS[key], shared, "bccd")
        assert (config.model.min_size, config.model.max_size) == (800, 1333)
        assert (config.train.epochs, config.train.lr_steps) == (8, [5, 7])
        assert config.train.batch_size == 8 and config.data.num_workers == 4


# ---------------------------------------------------------------------------------------------
# aggregation, subsetting, arguments


def test_aggregate_seeds_mean_half_range_std(acc):
    per_seed = {0: {"AP": 0.30, "APs": -1.0}, 1: {"AP": 0.34, "APs": 0.2}}
    stats = acc.aggregate_seeds(per_seed, keys=("AP", "APs"))
    assert stats["AP"]["mean"] == pytest.approx(0.32)
    assert stats["AP"]["half_range"] == pytest.approx(0.02)
    assert stats["AP"]["std"] == pytest.approx(0.02 * math.sqrt(2))  # sample std of two values
    assert stats["APs"] == {"mean": None, "half_range": None, "std": None}  # -1: undefined
    three = acc.aggregate_seeds({0: {"AP": 0.1}, 1: {"AP": 0.4}, 2: {"AP": 0.25}}, keys=("AP",))
    assert three["AP"]["half_range"] == pytest.approx(0.15)
    assert three["AP"]["mean"] == pytest.approx(0.25)
    assert acc.aggregate_seeds({3: {"AP": 0.5}}, keys=("AP",))["AP"]["std"] is None
    with pytest.raises(ValueError, match="per_seed"):
        acc.aggregate_seeds({})


def test_format_cell(acc):
    assert acc.format_cell({"mean": 0.32, "half_range": 0.02}, num_seeds=2) == "32.0 ± 2.0"
    assert acc.format_cell({"mean": 0.3216, "half_range": 0.0}, num_seeds=1) == "32.2"
    assert acc.format_cell({"mean": None, "half_range": None}, num_seeds=2) == "-"
    assert acc.format_cell({"mean": 0.32, "half_range": 0.02, "std": 0.031}, num_seeds=3,
                           spread="std") == "32.0 ± 3.1"


def test_paired_gains_seed_by_seed(acc):
    mine = {0: {"AP": 0.30}, 1: {"AP": 0.25}, 2: {"AP": 0.40}, 3: {"AP": -1.0}}
    base = {0: {"AP": 0.28}, 1: {"AP": 0.26}, 2: {"AP": 0.35}, 3: {"AP": 0.2}, 4: {"AP": 0.3}}
    gain = acc.paired_gains(mine, base)
    # seed 3 is undefined for `mine`, seed 4 has no partner: both left out
    assert gain["seeds"] == [0, 1, 2]
    assert gain["gains"] == pytest.approx([0.02, -0.01, 0.05])
    assert gain["mean"] == pytest.approx(0.02)
    assert gain["half_range"] == pytest.approx(0.03)
    assert gain["std"] == pytest.approx(0.03)  # sqrt((0 + 0.0009 + 0.0009) / 2)
    assert gain["all_positive"] is False
    # the mean's 95 % interval: t(0.975, 2 df) = 4.302653 (tables), 0.03 / sqrt(3) its error
    assert gain["ci95"] == pytest.approx([0.02 - 0.0745240, 0.02 + 0.0745240], abs=1e-6)
    one = acc.paired_gains({0: {"AP": 0.3}}, {0: {"AP": 0.1}})
    assert one["std"] is None and one["ci95"] is None and one["all_positive"] is True


def test_t_critical_values_match_published_tables(acc):
    published = {1: 12.7062, 2: 4.3027, 3: 3.1824, 4: 2.7764, 5: 2.5706, 7: 2.3646, 8: 2.3060,
                 10: 2.2281, 20: 2.0860, 30: 2.0423}
    for df, value in published.items():
        assert acc.t_critical(df) == pytest.approx(value, abs=1e-4), df
    assert acc.t_critical(5, confidence=0.99) == pytest.approx(4.0321, abs=1e-4)
    with pytest.raises(ValueError, match="df"):
        acc.t_critical(0)
    assert acc.paired_gains({0: {"AP": 0.3}}, {1: {"AP": 0.1}}) is None


def test_subset_coco_keeps_the_first_annotated_images(acc):
    data = {"images": [{"id": 3}, {"id": 1}, {"id": 2}, {"id": 4}],
            "annotations": [{"id": 1, "image_id": 2}, {"id": 2, "image_id": 3},
                            {"id": 3, "image_id": 4}, {"id": 4, "image_id": 3}],
            "categories": [{"id": 1, "name": "x"}]}
    out = acc.subset_coco(data, 2)
    assert [im["id"] for im in out["images"]] == [2, 3]  # image 1 has no box
    assert [a["id"] for a in out["annotations"]] == [1, 2, 4]
    assert out["categories"] == data["categories"] and len(data["images"]) == 4
    with pytest.raises(ValueError, match="only 3 annotated"):
        acc.subset_coco(data, 4)
    with pytest.raises(ValueError, match="num_images"):
        acc.subset_coco(data, 0)


def test_convert_split_is_done_once(acc, tiny_fruit, tmp_path):
    out = tmp_path / "train.json"
    first = acc.convert_split(tiny_fruit / "train", out)
    assert len(first["images"]) == 6 and first["info"]["conversion"]["size_from_image"] == 6
    stamp = out.stat().st_mtime_ns
    assert acc.convert_split(tiny_fruit / "train", out) == first
    assert out.stat().st_mtime_ns == stamp
    smaller = acc.convert_split(tiny_fruit / "train", out, num_images=2)  # other request: redone
    assert len(smaller["images"]) == 2 and out.stat().st_mtime_ns != stamp


def test_arguments(acc, tmp_path):
    args = acc.parse_args([])
    assert args.regime == "pretrained" and args.seeds == [0, 1]
    assert args.rows == list(acc.DATASETS["fruit"].rows["pretrained"])
    assert args.rows == [k for k in acc.ROW_KEYS if k not in acc.CASCADE_ROWS]
    assert args.device == "cpu"
    assert Path(args.data_root).resolve() == (REPO_ROOT.parent / "shared" / "data" / "fruit").resolve()
    assert Path(args.output_dir) == REPO_ROOT / "work_dirs" / "accuracy_fruit_pretrained"
    smoke = acc.parse_args(["--smoke"])
    assert smoke.seeds == [0] and Path(smoke.output_dir).name == "accuracy_fruit_pretrained_smoke"
    scratch = acc.parse_args(["--regime", "scratch"])
    assert (scratch.seeds, scratch.more_seeds) == ([0, 1], [])
    assert Path(scratch.output_dir).name == "accuracy_fruit_scratch"
    # rows come back in table order
    assert acc.parse_args(["--rows", "libra_retinanet", "faster_rcnn"]).rows == [
        "faster_rcnn", "libra_retinanet"]
    for bad in (["--rows", "mask_rcnn"], ["--seeds", "0", "0"], ["--smoke", "--epochs", "2"],
                ["--epochs", "0"], ["--set", "train.base_lr"], ["--set", "=1"],
                ["--set", "data.train_ann=x.json"]):
        with pytest.raises(SystemExit):
            acc.parse_args(bad)
    assert args.overrides == []
    tuned = acc.parse_args(["--set", "train.base_lr=0.02", "--set", "train.epochs=5"])
    assert tuned.overrides == ["train.base_lr=0.02", "train.epochs=5"]
    missing = acc.parse_args(["--data-root", str(tmp_path / "nowhere"),
                              "--output-dir", str(tmp_path / "out")])
    with pytest.raises(ValueError, match="--data-root"):
        acc.run_benchmark(missing)
    assert args.dataset == "fruit" and args.more_seeds == [2, 3, 4, 5, 6, 7]
    assert args.recipe == "cpu"


def test_reuse_takes_the_rows_not_asked_for_from_a_table_made_the_same_way(acc, tmp_path):
    committed = REPO_ROOT / "benchmarks/results/accuracy_bccd_pretrained_cpu.json"
    report = json.loads(committed.read_text())
    dataset, rows = acc.DATASETS["bccd"], [acc.ROWS["iou_sampling"]]
    settings = dict(report["settings"])
    # the data files' location is the output folder's, not part of what a run is
    settings["shared_overrides"] = [o.replace("work_dirs/", "elsewhere/")
                                    for o in settings["shared_overrides"]]

    def read(text=None, **changed):
        path = committed
        if text is not None:
            path = tmp_path / "earlier.json"
            path.write_text(text)
        return acc.read_reused(path, dataset=dataset, regime="pretrained",
                               settings=dict(settings, **changed), rows=rows)

    reused = read()
    assert reused.row_keys == [r["key"] for r in report["rows"] if r["key"] != "iou_sampling"]
    # the same seeds, given to every row
    assert read(seeds=list(range(8)), more_seeds=[]).row_keys == reused.row_keys
    assert reused.histogram == report["iou_histogram"]
    assert reused.provenance()["git"] == report["git"]
    there = sorted({*settings["seeds"], *settings["more_seeds"]})
    fewer = [s for s in there if s != there[1]]
    errors = {
        "threads: 2 there, 1 here": dict(threads=1),
        # "here" joins --seeds and --more-seeds, as "there" does
        f"all_seeds: {there} there, {fewer} here": dict(seeds=fewer[:1], more_seeds=fewer[1:]),
        "shared_overrides: ": dict(shared_overrides=settings["shared_overrides"] + ["x.y=1"]),
    }
    for message, changed in errors.items():
        with pytest.raises(UserInputError, match=re.escape(message)):
            read(**changed)
    edited = json.loads(committed.read_text())
    edited["rows"][0]["overrides"].append("model.box_loss.alpha=0.3")
    other_values = json.loads(committed.read_text())
    other_values["rows"][0]["config_sha256"] = "0" * 64
    unchecked = json.loads(committed.read_text())
    del unchecked["rows"][0]["config_sha256"]
    broken = {
        "another config, other config values or other overrides": json.dumps(edited),
        "other config values": json.dumps(other_values),
        "has no config_sha256": json.dumps(unchecked),
        "cannot read it as JSON": "{not json",
        "not an accuracy.json": json.dumps({"rows": []}),
        "not 'bccd'": json.dumps(dict(report, dataset={"key": "fruit"})),
        "interrupted": json.dumps(dict(report, interrupted="stopped")),
        "lacks some of": json.dumps(dict(report, rows=[{"key": "faster_rcnn"}])),
    }
    for message, text in broken.items():
        with pytest.raises(UserInputError, match=re.escape(message)):
            read(text)
    with pytest.raises(UserInputError, match="nothing to reuse"):
        acc.read_reused(committed, dataset=dataset, regime="pretrained", settings=settings,
                        rows=[acc.ROWS[r["key"]] for r in report["rows"]])


def test_config_fingerprint_follows_the_config_values_not_its_text(acc, tmp_path, monkeypatch):
    shipped = REPO_ROOT / "src/libra_rcnn/configs/faster_rcnn_lite0_fpn_cpu.yaml"
    copy = tmp_path / "faster.yaml"
    copy.write_text(shipped.read_text())
    fruit = acc.DATASETS["fruit"]
    configs = {"pretrained": dict(fruit.configs["pretrained"], faster_rcnn=str(copy))}
    monkeypatch.setitem(acc.DATASETS, "fruit", dataclasses.replace(fruit, configs=configs))
    baseline = acc.ROWS["faster_rcnn"]

    def fingerprint(row=baseline):
        return acc.config_fingerprint(row, "fruit", "pretrained")

    first = fingerprint()
    assert re.fullmatch(r"[0-9a-f]{64}", first)
    assert fingerprint(acc.ROWS["iou_sampling"]) != first  # the row's overrides count
    copy.write_text("# a comment changes no value\n" + shipped.read_text())
    assert fingerprint() == first
    copy.write_text(shipped.read_text().replace("base_lr: 0.005", "base_lr: 0.004"))
    assert fingerprint() != first


def test_a_bad_reuse_file_is_one_line_before_any_training(acc, tiny_fruit, tmp_path, capsys):
    out = tmp_path / "out"
    code = acc.main(["--smoke", "--data-root", str(tiny_fruit), "--output-dir", str(out),
                     "--reuse", str(tmp_path / "missing.json")])
    assert code == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --reuse ") and "missing.json" in err
    assert len(err.strip().splitlines()) == 1
    assert not (out / "runs").exists()


def test_arguments_bccd(acc, tmp_path):
    args = acc.parse_args(["--dataset", "bccd"])
    # pretrained: the rows of MORE_SEED_ROWS at 8 seeds, the cascades at 4, every other at 2
    assert args.seeds == [0, 1] and args.more_seeds == [2, 3, 4, 5, 6, 7]
    assert args.recipe == "cpu" and args.regime == "pretrained"
    assert args.rows == list(acc.ROW_KEYS) and len(args.rows) == 10
    assert Path(args.data_root).resolve() == (REPO_ROOT.parent / "shared" / "data" / "bccd").resolve()
    assert Path(args.output_dir) == REPO_ROOT / "work_dirs" / "accuracy_bccd_pretrained"
    assert Path(acc.parse_args(["--dataset", "bccd", "--recipe", "gpu"]).output_dir) == (
        REPO_ROOT / "work_dirs" / "accuracy_bccd_pretrained_gpu")
    scratch = acc.parse_args(["--dataset", "bccd", "--regime", "scratch"])
    assert (scratch.seeds, scratch.more_seeds, len(scratch.rows)) == ([0, 1], [2, 3], 7)
    assert acc.parse_args(["--dataset", "bccd", "--smoke"]).more_seeds == []
    assert acc.parse_args(["--dataset", "bccd", "--more-seeds"]).more_seeds == []
    for bad in (["--regime", "scratch", "--rows", "iou_sampling_own_bins"],  # not a fruit row
                ["--recipe", "gpu"],  # fruit has no GPU recipe
                ["--dataset", "bccd", "--seeds", "0", "4"],  # 4 is also a more-seed
                ["--dataset", "bccd", "--more-seeds", "1"]):
        with pytest.raises(SystemExit):
            acc.parse_args(bad)
    missing = acc.parse_args(["--dataset", "bccd", "--data-root", str(tmp_path),
                              "--output-dir", str(tmp_path / "out")])
    with pytest.raises(ValueError, match="Annotations"):
        acc.run_benchmark(missing)


def test_git_commit_outside_a_repository_is_unknown(acc, tmp_path):
    assert acc.git_commit(tmp_path) == {"commit": "unknown", "dirty": None}


@pytest.mark.skipif(shutil.which("git") is None, reason="needs the git command")
def test_git_commit_names_the_checked_out_commit_and_tracked_changes(acc, tmp_path):
    def git(*args):
        subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@t", *args], cwd=tmp_path,
                       check=True, capture_output=True)

    git("init", "-q", "-b", "main")
    (tmp_path / "a.txt").write_text("one\n")
    git("add", "a.txt")
    git("commit", "-q", "-m", "first")
    # the commit, read from git's own files rather than through the git command
    head = (tmp_path / ".git" / "refs" / "heads" / "main").read_text().strip()
    assert len(head) == 40
    assert acc.git_commit(tmp_path) == {"commit": head, "dirty": False}
    (tmp_path / "new.txt").write_text("untracked files do not count\n")
    assert acc.git_commit(tmp_path)["dirty"] is False
    (tmp_path / "a.txt").write_text("two\n")
    assert acc.git_commit(tmp_path) == {"commit": head, "dirty": True}


def test_seed_plan_gives_table2_every_seed_and_the_cascades_four(acc):
    rows = [acc.ROWS[k] for k in acc.ROW_KEYS]
    plan = acc.seed_plan(rows, [0, 1], [2, 3, 4, 5, 6, 7],
                         more_seed_rows=acc.MORE_SEED_ROWS["pretrained"])
    assert plan[0] == plan[1] == list(acc.ROW_KEYS)
    assert plan[2] == plan[3]
    table2 = ["faster_rcnn", "iou_sampling", "bfp", "libra_faster_rcnn"]
    assert sorted(plan[2]) == sorted([*table2, "iou_sampling_own_bins", "cascade_rcnn",
                                      "libra_cascade_rcnn"])
    assert [k for k in acc.ROW_KEYS if k in plan[2]] == plan[2]  # table order
    for seed in (4, 5, 6, 7):
        assert sorted(plan[seed]) == sorted([*acc.HEADLINE_ROWS, "bfp"])
    counts = {k: sum(k in keys for keys in plan.values()) for k in acc.ROW_KEYS}
    assert counts["libra_cascade_rcnn"] == counts["cascade_rcnn"] == 4
    assert {counts[k] for k in [*table2, "iou_sampling_own_bins"]} == {8}
    assert counts["libra_faster_rcnn_own_bins"] == counts["retinanet"] == 2
    # from scratch the feature pyramid row keeps to --seeds
    scratch = acc.seed_plan(rows, [0, 1], [2, 3], more_seed_rows=acc.MORE_SEED_ROWS["scratch"])
    assert sorted(scratch[2]) == sorted([*acc.HEADLINE_ROWS, "cascade_rcnn",
                                         "libra_cascade_rcnn"])
    # rows not asked for are never planned; a plan without any of its rows leaves the seed out
    only_retina = acc.seed_plan([acc.ROWS["retinanet"]], [0], [2, 3],
                                more_seed_rows=acc.MORE_SEED_ROWS["pretrained"])
    assert only_retina == {0: ["retinanet"]}


def test_cascade_rows_compare_with_the_faster_rcnn_of_their_kind(acc):
    cascade, libra = acc.ROWS["cascade_rcnn"], acc.ROWS["libra_cascade_rcnn"]
    assert (cascade.baseline, cascade.partner) == ("cascade_rcnn", "faster_rcnn")
    assert (libra.baseline, libra.partner) == ("cascade_rcnn", "libra_faster_rcnn")
    # the same switches as the Faster R-CNN rows of their kind
    assert cascade.overrides == acc.ROWS["faster_rcnn"].overrides
    assert libra.overrides == acc.ROWS["libra_faster_rcnn"].overrides
    cfg = acc.row_config(libra, (), "bccd", "pretrained")
    assert cfg.model.arch == "cascade_rcnn" and cfg.model.bfp.enabled
    assert cfg.model.box_loss.kind == "balanced_l1" and cfg.model.roi_sampler.neg_balance


def _table_cells(markdown: str) -> list:
    """The data rows of every table in ``markdown``, each without its first (label) cell."""
    rows = []
    for line in markdown.splitlines():
        cells = [cell.strip() for cell in line.strip().strip("|").split("|")]
        if (line.startswith("|") and len(cells) > 1 and cells[0] not in ("Method", "")
                and set(cells[1]) != {"-"}):
            rows.append(tuple(cells[1:]))
    return rows


@pytest.mark.parametrize("results", ["accuracy_bccd_pretrained_cpu.json",
                                     "accuracy_fruit_pretrained_cpu.json"])
def test_docs_fine_tuned_tables_are_the_committed_results(acc, results):
    """Every number of the fine-tuned tables in docs/benchmarks.md is the benchmark's own
    rendering of the committed results file."""
    report = json.loads((REPO_ROOT / "benchmarks/results" / results).read_text())
    # the docs name the last Table-2 row by its detector only
    rendered = _table_cells(acc._markdown(report).replace(
        "+ balanced L1 loss = Libra Faster R-CNN", "Libra Faster R-CNN"))
    docs = set(_table_cells((REPO_ROOT / "docs/benchmarks.md").read_text()))
    assert len(rendered) >= 5  # two methods in the AP and per-class tables, one gain row at least
    assert [row for row in rendered if row not in docs] == []
