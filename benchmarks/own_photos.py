"""Your own photos, as a user would: ``convert-voc -> train -> eval -> predict`` on the command
line with a pretrained CPU config, timed step by step.

Question: how long does it take on this machine to go from a folder of VOC-annotated photos to a
trained detector and its predictions, and what COCO AP does that detector reach?

Default data: BCCD (``../shared/data/bccd``, the VOC release layout: its ``train`` image set to
train on, ``test`` to evaluate), with ``libra_faster_rcnn_lite0_fpn_cpu``. Every step is the
``libra-rcnn`` command a user types, run in a subprocess: ::

    libra-rcnn convert-voc DATA train.json --image-set train --class-names C1,C2,...
    libra-rcnn convert-voc DATA test.json --image-set test --class-names C1,C2,...
    libra-rcnn train CONFIG --set model.num_classes=K+1 --set data.train_ann=train.json ...
    libra-rcnn eval OUT/latest.pth --results OUT/test_results.json
    libra-rcnn predict OUT/latest.pth DATA/JPEGImages/<first --predict test photos>

``train`` evaluates once at its end (the config's schedule); ``eval`` scores the checkpoint again
on its own, as a user who comes back later would.

Run: ``python -m benchmarks.own_photos [--data-root D] [--config NAME] [--set KEY=VALUE ...]
[--out-dir DIR] [--predict N]``.
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

if __package__ in (None, ""):  # run as a file: python benchmarks/own_photos.py
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks import _common as common

NAME = "own_photos"
REPO_ROOT = Path(__file__).resolve().parent.parent
BCCD_CLASSES = ("RBC", "WBC", "Platelets")
METRIC_ROW = re.compile(r"^\|\s*([-\d.]+\s*\|\s*){6}$")


def run_step(name: str, argv: Sequence[str], log: Path) -> Dict[str, Any]:
    """``libra-rcnn ARGV`` in a subprocess; its output appended to ``log``; wall seconds."""
    command = [sys.executable, "-m", "libra_rcnn", *map(str, argv)]
    start = time.perf_counter()
    result = subprocess.run(command, cwd=REPO_ROOT, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    with log.open("a", encoding="utf-8") as f:
        f.write(f"$ libra-rcnn {' '.join(map(str, argv))}\n{result.stdout}{result.stderr}\n")
    if result.returncode != 0:
        raise RuntimeError(f"{name} exited with {result.returncode}: {result.stderr[-2000:]}")
    return {"step": name, "seconds": seconds, "stdout": result.stdout}


def metrics_from_table(stdout: str) -> Dict[str, float]:
    """The AP / AP50 / AP75 / APs / APm / APl row that ``train`` and ``eval`` print (x100)."""
    rows = [line for line in stdout.splitlines() if METRIC_ROW.match(line.strip())]
    if not rows:
        raise RuntimeError(f"no metrics table in the output:\n{stdout[-2000:]}")
    values = [float(v) if v.strip() != "-" else -1.0 for v in rows[-1].strip("| ").split("|")]
    return dict(zip(("AP", "AP50", "AP75", "APs", "APm", "APl"), values))


def steps(args: argparse.Namespace, out: Path) -> List[List[Any]]:
    data = Path(args.data_root).resolve()
    classes = ",".join(args.class_names)
    train_json, test_json, run = out / "train.json", out / "test.json", out / "run"
    photos = sorted((data / "JPEGImages").glob("*.jpg"))
    test_stems = (data / "ImageSets" / "Main" / "test.txt").read_text().split()
    predict = [p for p in photos if p.stem in set(test_stems)][:args.predict]
    overrides = [f"model.num_classes={len(args.class_names) + 1}",
                 f"data.train_ann={train_json}", f"data.train_images={data}",
                 f"data.val_ann={test_json}", f"data.val_images={data}", *args.overrides]
    return [
        ["convert-voc train", ["convert-voc", data, train_json, "--image-set", "train",
                               "--class-names", classes]],
        ["convert-voc test", ["convert-voc", data, test_json, "--image-set", "test",
                              "--class-names", classes]],
        ["train", ["train", args.config, "--output-dir", run, "--device", "cpu",
                   *[a for o in overrides for a in ("--set", o)]]],
        ["eval", ["eval", run / "latest.pth", "--device", "cpu",
                  "--results", out / "test_results.json"]],
        ["predict", ["predict", run / "latest.pth", *predict, "--device", "cpu",
                     "--out-dir", out / "predictions"]],
    ]


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-root", default=str(REPO_ROOT / ".." / "shared" / "data" / "bccd"),
                        help="a VOC release folder with train and test image sets "
                             "(default: ../shared/data/bccd)")
    parser.add_argument("--class-names", nargs="+", default=list(BCCD_CLASSES))
    parser.add_argument("--config", default="libra_faster_rcnn_lite0_fpn_cpu")
    parser.add_argument("--set", dest="overrides", action="append", default=[],
                        metavar="KEY=VALUE", help="more config overrides for train")
    parser.add_argument("--out-dir", default=str(REPO_ROOT / "work_dirs" / NAME))
    parser.add_argument("--predict", type=int, default=8, help="test photos to predict")
    parser.add_argument("--out", type=Path, default=None,
                        help=f"JSON output (default: benchmarks/results/{NAME}_cpu.json)")
    return parser.parse_args(argv)


def main(argv: Optional[Sequence[str]] = None) -> Dict[str, Any]:
    args = parse_args(argv)
    out = Path(args.out_dir).resolve()
    out.mkdir(parents=True, exist_ok=True)
    log = out / "commands.log"
    log.write_text("")
    results = [run_step(name, argv, log) for name, argv in steps(args, out)]
    by_step = {r["step"]: r for r in results}
    row = {"config": args.config, "overrides": args.overrides,
           "seconds": {r["step"]: round(r["seconds"], 1) for r in results},
           "total_seconds": round(sum(r["seconds"] for r in results), 1),
           "train_metrics": metrics_from_table(by_step["train"]["stdout"]),
           "eval_metrics": metrics_from_table(by_step["eval"]["stdout"])}
    print(json.dumps(row, indent=2))
    device_args = argparse.Namespace(amp=False, smoke=False, out=args.out)
    import torch

    payload = {"benchmark": NAME,
               "environment": common.environment_info(torch.device("cpu"), device_args),
               "settings": {"data_root": args.data_root, "class_names": args.class_names,
                            "predicted_photos": args.predict},
               "rows": [row]}
    return common.write_results(NAME, torch.device("cpu"), device_args, payload)


if __name__ == "__main__":
    main()
