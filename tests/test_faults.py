"""Faults during training, with real processes: SIGKILL in the middle of a checkpoint write,
SIGTERM, a file-size limit hit while saving (a full disk as the kernel reports it), exact resume
after each, bad data, and the shared atomic-write helper.

The training runs use the shipped ``demo_quick`` config (Libra Faster R-CNN, ResNet-18, 64 px)
on four generated 64 px images: 2 iterations per epoch, 3 epochs. The child processes run
``python -m libra_rcnn train ...`` through a small wrapper (:data:`_CHILD`) that only adds a
pause at a chosen point so the parent can deliver its signal there deterministically; the
training code itself is the package's.
"""

from __future__ import annotations

import contextlib
import errno
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from libra_rcnn.cli import main
from libra_rcnn.data import make_shapes_dataset
from libra_rcnn.engine.checkpoint import CHECKPOINT_FORMAT, CheckpointError, load_checkpoint, \
    save_checkpoint
from libra_rcnn.engine.export import compare_detections
from libra_rcnn.io_utils import atomic_write, atomic_write_bytes, atomic_write_text, \
    temporary_files_of

CHILD_TIMEOUT_S = 180

# Runs the CLI exactly as ``python -m libra_rcnn`` after installing one pause point chosen by
# FAULT_HOOK ("half_save:N": the N-th checkpoint write stops half-way through the file;
# "pause_after_step:N": after the N-th optimizer step). At the pause the child creates
# FAULT_READY and waits: for SIGKILL (half_save) or for the file FAULT_GO (pause_after_step).
_CHILD = r"""
import io, os, runpy, sys, time
from pathlib import Path

hook, n = os.environ["FAULT_HOOK"].split(":")
n = int(n)
ready = Path(os.environ["FAULT_READY"])

def signal_ready(text):
    # complete before it appears: the parent may act the moment it sees the file
    tmp = ready.with_name(ready.name + ".part")
    tmp.write_text(text)
    os.replace(tmp, ready)

def wait_for(path, seconds=120):
    deadline = time.monotonic() + seconds
    while not path.exists():
        if time.monotonic() > deadline:
            sys.exit("fault hook: the parent never answered")
        time.sleep(0.02)

if hook == "half_save":
    from libra_rcnn.engine import checkpoint
    real_serialize, calls = checkpoint._serialize, []

    def serialize(state, fileobj):
        calls.append(1)
        if len(calls) < n:
            return real_serialize(state, fileobj)
        buffer = io.BytesIO()
        real_serialize(state, buffer)
        data = buffer.getvalue()
        fileobj.write(data[: len(data) // 2])
        fileobj.flush()
        os.fsync(fileobj.fileno())
        signal_ready(str(len(data)))
        time.sleep(120)
        sys.exit("fault hook: not killed")

    checkpoint._serialize = serialize
elif hook == "pause_after_step":
    from libra_rcnn.engine.train import _Trainer
    real_step, calls = _Trainer._step, []

    def step(self, images, targets):
        result = real_step(self, images, targets)
        calls.append(1)
        if len(calls) == n:
            signal_ready("paused")
            wait_for(Path(os.environ["FAULT_GO"]))
        return result

    _Trainer._step = step
else:
    sys.exit(f"fault hook: unknown {hook!r}")
runpy.run_module("libra_rcnn", run_name="__main__", alter_sys=True)
"""

# Full disk as the kernel reports it: RLIMIT_FSIZE makes a write past the limit fail with EFBIG
# (SIGXFSZ ignored, else the process would be killed instead). argv: path, limit, tensor size.
_SAVE_OVER_LIMIT = r"""
import resource, signal, sys
import torch
from libra_rcnn.engine.checkpoint import CHECKPOINT_FORMAT, CheckpointError, save_checkpoint

path, limit, numel = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
resource.setrlimit(resource.RLIMIT_FSIZE, (limit, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))
state = {"format": CHECKPOINT_FORMAT, "format_version": 1, "model_config": {}, "epoch": 2,
         "model": {"w": torch.ones(numel)}}
try:
    save_checkpoint(path, state)
except CheckpointError as exc:
    # the kernel's error, wherever torch's writer left it in the chain of exceptions
    chain, error = [], exc
    while error is not None:
        chain.append(error)
        error = error.__cause__ or error.__context__
    errnos = [e.errno for e in chain if isinstance(e, OSError)]
    print(exc)
    print(*errnos)
    sys.exit(3)
"""


# ------------------------------------------------------------------------------ helpers


def _train_args(data: dict, out: Path, *extra: str) -> list[str]:
    return ["train", "demo_quick", "--output-dir", str(out), "--device", "cpu",
            "--set", f"data.train_ann={data['train_json']}",
            "--set", f"data.train_images={data['train_images']}",
            "--set", "data.val_ann=null", "--set", "data.val_images=null",
            "--set", "train.epochs=3", "--set", "train.checkpoint_period=100",
            "--set", "train.log_period=1", "--set", "train.tensorboard=false",
            "--set", "train.deterministic=true", *extra]


def _child_env(**extra: str) -> dict:
    # demo_quick trains with one intra-op thread (train.num_threads); OpenMP is told the same
    return dict(os.environ, OMP_NUM_THREADS="1", **extra)


def _start_child(tmp_path: Path, argv: list[str], **hook_env: str) -> subprocess.Popen:
    stdout = open(tmp_path / "child.out", "w")
    stderr = open(tmp_path / "child.err", "w")
    with stdout, stderr:
        return subprocess.Popen([sys.executable, "-c", _CHILD, "--quiet", *argv],
                                stdout=stdout, stderr=stderr, env=_child_env(**hook_env))


def _child_output(tmp_path: Path) -> str:
    return (tmp_path / "child.out").read_text() + (tmp_path / "child.err").read_text()


def _wait_for_file(path: Path, child: subprocess.Popen, tmp_path: Path) -> None:
    deadline = time.monotonic() + CHILD_TIMEOUT_S
    while not path.exists():
        if child.poll() is not None:
            pytest.fail(f"child exited with {child.returncode} before {path.name}:\n"
                        f"{_child_output(tmp_path)}")
        if time.monotonic() > deadline:
            pytest.fail(f"child never reached {path.name}")
        time.sleep(0.02)


def _stop(child: subprocess.Popen) -> None:
    if child.poll() is None:
        child.kill()
        child.wait(timeout=30)


def _losses(out: Path) -> dict[int, float]:
    """iteration -> total loss of the train records in ``out/log.jsonl`` (the last one wins)."""
    records = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    return {r["iter"]: r["loss"] for r in records if r["type"] == "train"}


def _assert_same_weights(path_a: Path, path_b: Path) -> None:
    a, b = load_checkpoint(path_a)["model"], load_checkpoint(path_b)["model"]
    assert a.keys() == b.keys()
    for name, tensor in a.items():
        assert torch.equal(tensor, b[name]), name


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("faults_data")
    return make_shapes_dataset(root, num_train=4, num_val=0, image_size=64, seed=0)


@pytest.fixture(scope="module")
def reference(data, tmp_path_factory):
    """One uninterrupted run (3 epochs x 2 iterations) in this process."""
    out = tmp_path_factory.mktemp("faults_reference") / "run"
    assert main(["--quiet", *_train_args(data, out)]) == 0
    losses = _losses(out)
    assert sorted(losses) == [1, 2, 3, 4, 5, 6]
    return {"out": out, "losses": losses}


# ------------------------------------------------------------------------------ SIGKILL


@pytest.fixture(scope="module")
def killed_mid_save(data, tmp_path_factory):
    """A training process SIGKILLed half-way through writing its second ``latest.pth``
    (end of epoch 2, iteration 4); the first one (end of epoch 1, iteration 2) is complete."""
    tmp_path = tmp_path_factory.mktemp("faults_kill")
    out, ready = tmp_path / "run", tmp_path / "ready"
    child = _start_child(tmp_path, _train_args(data, out), FAULT_HOOK="half_save:2",
                         FAULT_READY=str(ready))
    try:
        _wait_for_file(ready, child, tmp_path)
        child.send_signal(signal.SIGKILL)
        child.wait(timeout=CHILD_TIMEOUT_S)
    finally:
        _stop(child)
    assert child.returncode == -signal.SIGKILL, _child_output(tmp_path)
    return {"out": out, "full_size": int(ready.read_text())}


def test_sigkill_mid_save_leaves_the_last_complete_checkpoint(killed_mid_save):
    out = killed_mid_save["out"]
    latest = out / "latest.pth"
    state = load_checkpoint(latest)  # weights_only
    assert (state["epoch"], state["iter_in_epoch"], state["iteration"]) == (1, 0, 2)
    assert torch.isfinite(state["model"]["backbone.body.conv1.weight"]).all()
    # the half-written file is a hidden temporary next to it, never named latest.pth
    leftovers = temporary_files_of(latest)
    assert len(leftovers) == 1
    assert 0 < leftovers[0].stat().st_size < killed_mid_save["full_size"]
    with pytest.raises(CheckpointError, match="truncated or corrupted"):
        load_checkpoint(leftovers[0])
    assert sorted(p.name for p in out.iterdir() if not p.name.startswith(".")) == \
        ["config.yaml", "latest.pth", "log.jsonl"]
    assert sorted(_losses(out)) == [1, 2, 3, 4]  # it was killed while saving after iteration 4


def test_resume_after_sigkill_continues_to_the_same_losses(killed_mid_save, reference, data,
                                                           tmp_path):
    out = killed_mid_save["out"]
    # the steps the killed run took match the uninterrupted run's ...
    killed = _losses(out)
    assert killed == {i: reference["losses"][i] for i in killed}
    # ... and resuming from its last complete checkpoint reproduces the rest exactly
    resumed = tmp_path / "resumed"
    code = main(["--quiet", *_train_args(data, resumed, "--resume", str(out / "latest.pth"))])
    assert code == 0
    assert _losses(resumed) == {i: reference["losses"][i] for i in (3, 4, 5, 6)}
    _assert_same_weights(resumed / "latest.pth", reference["out"] / "latest.pth")


# ------------------------------------------------------------------------------ SIGTERM


def test_sigterm_writes_a_checkpoint_exits_143_and_resume_continues(data, reference, tmp_path):
    out, ready, go = tmp_path / "run", tmp_path / "ready", tmp_path / "go"
    # pause after the first step of epoch 2 (iteration 3), so the stop is mid-epoch
    child = _start_child(tmp_path, _train_args(data, out), FAULT_HOOK="pause_after_step:3",
                         FAULT_READY=str(ready), FAULT_GO=str(go))
    try:
        _wait_for_file(ready, child, tmp_path)
        child.send_signal(signal.SIGTERM)
        go.touch()
        code = child.wait(timeout=CHILD_TIMEOUT_S)
    finally:
        _stop(child)
    output = _child_output(tmp_path)
    assert code == 128 + signal.SIGTERM, output
    assert "interrupted at epoch 1, iteration 3" in output
    assert f"resume with --resume {out / 'latest.pth'}" in output
    assert "Traceback" not in output
    state = load_checkpoint(out / "latest.pth")
    assert (state["epoch"], state["iter_in_epoch"], state["iteration"]) == (1, 1, 3)
    assert temporary_files_of(out / "latest.pth") == []
    assert _losses(out) == {i: reference["losses"][i] for i in (1, 2, 3)}

    assert main(["--quiet", *_train_args(data, out, "--resume", str(out / "latest.pth"))]) == 0
    assert _losses(out) == reference["losses"]
    _assert_same_weights(out / "latest.pth", reference["out"] / "latest.pth")


# ------------------------------------------------------------------------------ full disk


def test_file_size_limit_during_a_save_keeps_the_previous_checkpoint(tmp_path):
    path = tmp_path / "latest.pth"
    previous = {"format": CHECKPOINT_FORMAT, "format_version": 1, "model_config": {}, "epoch": 1,
                "model": {"w": torch.arange(16.0)}}
    save_checkpoint(path, previous)
    before = path.read_bytes()
    limit = 256 * 1024
    result = subprocess.run(
        [sys.executable, "-c", _SAVE_OVER_LIMIT, str(path), str(limit), str(limit)],  # 4 bytes each
        capture_output=True, text=True, timeout=CHILD_TIMEOUT_S, env=_child_env())
    assert result.returncode == 3, result.stdout + result.stderr
    message, errnos = result.stdout.strip().splitlines()
    assert message.startswith(f"{path}: cannot write checkpoint: ")
    assert message.endswith(os.strerror(errno.EFBIG)), message  # the cause, not torch's wording
    assert errnos.split() == [str(errno.EFBIG)]  # a real "File too large" from the kernel
    assert path.read_bytes() == before
    assert load_checkpoint(path)["epoch"] == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["latest.pth"]


@pytest.mark.slow
def test_training_that_cannot_save_stops_with_one_line_and_keeps_latest(data, reference, tmp_path):
    """The same limit on a real training run that resumes from a copy of the reference's last
    checkpoint and must save again after one more epoch."""
    out = tmp_path / "run"
    out.mkdir()
    latest = out / "latest.pth"
    shutil.copyfile(reference["out"] / "latest.pth", latest)
    before = latest.stat().st_size, load_checkpoint(latest)["iteration"]
    limit = 4 * 1024 * 1024  # far above the logs, far below a checkpoint (~90 MB)
    child_code = (
        "import resource, runpy, signal\n"
        "signal.signal(signal.SIGXFSZ, signal.SIG_IGN)\n"
        f"resource.setrlimit(resource.RLIMIT_FSIZE, ({limit}, "
        "resource.getrlimit(resource.RLIMIT_FSIZE)[1]))\n"
        "runpy.run_module('libra_rcnn', run_name='__main__', alter_sys=True)\n")
    # one more epoch (iterations 7-8), then a mid-run latest.pth save (no epoch_N.pth file)
    argv = _train_args(data, out, "--resume", str(latest), "--set", "train.epochs=5",
                       "--set", "train.max_iters=8")
    result = subprocess.run([sys.executable, "-c", child_code, "--quiet", *argv],
                            capture_output=True, text=True, timeout=CHILD_TIMEOUT_S,
                            env=_child_env())
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2, result.stderr
    assert lines[-1].startswith(f"libra-rcnn: error: {latest}: cannot write checkpoint: "), lines
    assert (latest.stat().st_size, load_checkpoint(latest)["iteration"]) == before
    assert [p.name for p in out.iterdir() if p.suffix == ".tmp"] == []
    assert sorted(_losses(out)) == [7, 8]  # the epoch was trained, only its save failed


# ------------------------------------------------------------------------------ bad data


@pytest.fixture
def bad_data(tmp_path):
    paths = make_shapes_dataset(tmp_path / "bad", num_train=4, num_val=0, image_size=64, seed=0)
    corrupt = Path(paths["train_images"]) / "000001.png"
    corrupt.write_bytes(b"\x89PNG\r\n\x1a\n this is not image data")
    missing = Path(paths["train_images"]) / "000002.png"
    missing.unlink()
    return paths, str(corrupt), str(missing)


def test_check_data_names_a_corrupt_and_a_missing_image(bad_data, capsys):
    paths, corrupt, missing = bad_data
    code = main(["--quiet", "check-data", "demo_quick", "--split", "train",
                 "--set", f"data.train_ann={paths['train_json']}",
                 "--set", f"data.train_images={paths['train_images']}"])
    out = capsys.readouterr().out
    assert code == 1, out
    # one of the four images has no box and is left out of training (remove_empty)
    assert "images: 3 (1 readable, 2 bad, 0 size mismatches)" in out
    problem_lines = [line.strip() for line in out.splitlines() if line.startswith("    ")]
    assert len(problem_lines) == 2, out
    assert problem_lines[0].startswith(f"{corrupt}: ")
    assert problem_lines[1] == f"{missing}: file not found"


def test_strict_training_refuses_bad_data_with_one_line(bad_data, tmp_path, capsys):
    paths, corrupt, missing = bad_data
    out = tmp_path / "run"
    code = main(["--quiet", *_train_args(paths, out, "--strict")])
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert code == 2, captured.err
    assert len(lines) == 1 and lines[0].startswith(f"libra-rcnn: error: {corrupt}: "), lines
    assert lines[0].endswith("(and 1 more problems; run `libra-rcnn check-data`)")
    assert not out.exists()  # refused before writing anything


# ------------------------------------------------------------------------------ atomic writes


def test_atomic_write_replaces_or_keeps_the_old_file(tmp_path):
    path = tmp_path / "sub" / "f.json"
    assert atomic_write_text(path, "old ✓") == path
    assert path.read_text(encoding="utf-8") == "old ✓"

    def half_then(exc):
        def write(f):
            f.write(b"half")
            raise exc
        return write

    for exc in (OSError(errno.ENOSPC, "No space left on device"), KeyboardInterrupt()):
        with pytest.raises(type(exc)):
            atomic_write(path, half_then(exc))
        assert path.read_text(encoding="utf-8") == "old ✓"
        assert temporary_files_of(path) == [] and os.listdir(path.parent) == ["f.json"]

    atomic_write_bytes(path, b"new")
    assert path.read_bytes() == b"new" and os.listdir(path.parent) == ["f.json"]
    with pytest.raises(ValueError, match="encoding='latin-1' is only valid with binary=False"):
        atomic_write(path, lambda f: None, encoding="latin-1")


def test_temporary_files_of_finds_only_this_files_leftovers(tmp_path):
    (tmp_path / ".a[1].pth.x1.tmp").write_bytes(b"")
    (tmp_path / ".a[1].pth.x2.tmp").write_bytes(b"")
    (tmp_path / ".b.pth.x3.tmp").write_bytes(b"")
    (tmp_path / "a[1].pth").write_bytes(b"")
    assert [p.name for p in temporary_files_of(tmp_path / "a[1].pth")] == \
        [".a[1].pth.x1.tmp", ".a[1].pth.x2.tmp"]
    assert temporary_files_of(tmp_path / "missing_dir" / "a.pth") == []


# ------------------------------------------------------------------------------ damaged VOC folder
#
# A PASCAL VOC folder of photos as users have them: in the val split one image is truncated, one
# is an empty file and one is missing; in the train split one XML file is cut off, one box is
# inverted and one image is truncated. Every command must finish with its report, nothing lost.

CLASSES = "circle,square,triangle"
# the damaged val images are the odd ones: under two processes, the second one's whole shard
DAMAGED_VAL = {"truncated": "000001.png", "empty": "000003.png", "missing": "000005.png"}


def _write_voc_folder(paths: dict, split: str, folder: Path) -> None:
    """labelImg's flat layout: ``name.xml`` next to ``name.png``, VOC's 1-based inclusive boxes."""
    coco = json.loads(Path(paths[f"{split}_json"]).read_text())
    names = {c["id"]: c["name"] for c in coco["categories"]}
    folder.mkdir(parents=True)
    for image in coco["images"]:
        shutil.copy(Path(paths[f"{split}_images"]) / image["file_name"], folder)
        objects = "".join(
            f"<object><name>{names[a['category_id']]}</name><difficult>0</difficult><bndbox>"
            f"<xmin>{a['bbox'][0] + 1:g}</xmin><ymin>{a['bbox'][1] + 1:g}</ymin>"
            f"<xmax>{a['bbox'][0] + a['bbox'][2]:g}</xmax>"
            f"<ymax>{a['bbox'][1] + a['bbox'][3]:g}</ymax></bndbox></object>"
            for a in coco["annotations"] if a["image_id"] == image["id"])
        (folder / image["file_name"]).with_suffix(".xml").write_text(
            f"<annotation><filename>{image['file_name']}</filename><size>"
            f"<width>{image['width']}</width><height>{image['height']}</height><depth>3</depth>"
            f"</size>{objects}</annotation>")


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


@pytest.fixture(scope="module")
def damaged_voc(tmp_path_factory):
    root = tmp_path_factory.mktemp("damaged_voc")
    paths = make_shapes_dataset(root / "shapes", num_train=8, num_val=6, image_size=64, seed=1)
    train, val = root / "train_voc", root / "val_voc"
    _write_voc_folder(paths, "train", train)
    _write_voc_folder(paths, "val", val)
    _truncate(val / DAMAGED_VAL["truncated"])
    (val / DAMAGED_VAL["empty"]).write_bytes(b"")
    (val / DAMAGED_VAL["missing"]).unlink()
    cut_off = train / "000003.xml"
    cut_off.write_text(cut_off.read_text()[:60])
    inverted = train / "000004.xml"
    text = inverted.read_text()
    xmin = text[text.index("<xmin>") + 6:text.index("</xmin>")]
    xmax = text[text.index("<xmax>") + 6:text.index("</xmax>")]
    inverted.write_text(text.replace(f"<xmin>{xmin}</xmin>", f"<xmin>{xmax}</xmin>", 1)
                        .replace(f"<xmax>{xmax}</xmax>", f"<xmax>{xmin}</xmax>", 1))
    _truncate(train / "000006.png")
    return {"root": root, "train": train, "val": val, "cut_off": cut_off,
            "damaged_val": {k: str(val / v) for k, v in DAMAGED_VAL.items()}}


def _voc_config_args(voc: dict) -> list[str]:
    root = voc["root"]
    return ["--set", f"data.train_ann={root / 'train.json'}", "--set", f"data.train_images={voc['train']}",
            "--set", f"data.val_ann={root / 'val.json'}", "--set", f"data.val_images={voc['val']}",
            "--set", "train.tensorboard=false", "--set", "train.deterministic=true",
            "--set", "train.num_threads=1", "--set", "data.val_batch_size=1",
            # an untrained model's scores are low: keep its detections so scoring has work to do
            "--set", "model.box_score_thresh=0.0"]


def _cli(*argv) -> tuple[int, str, str]:
    """``libra-rcnn --quiet ARGV`` in this process: (exit code, stdout, stderr)."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(["--quiet", *map(str, argv)])
    return code, out.getvalue(), err.getvalue()


@pytest.fixture(scope="module")
def voc_run(damaged_voc, tmp_path_factory):
    """convert-voc (--skip-bad) -> check-data -> train with evaluation -> eval -> predict, each
    through the command line in this process; the outputs of every step."""
    voc, steps = damaged_voc, {}
    root = voc["root"]
    out = tmp_path_factory.mktemp("voc_run") / "run"
    steps["strict"] = _cli("convert-voc", voc["train"], root / "strict.json", "--class-names", CLASSES)
    steps["convert_train"] = _cli("convert-voc", voc["train"], root / "train.json",
                                  "--class-names", CLASSES, "--skip-bad")
    steps["convert_val"] = _cli("convert-voc", voc["val"], root / "val.json",
                                "--class-names", CLASSES, "--skip-bad")
    config = _voc_config_args(voc)
    steps["check"] = _cli("check-data", "demo_quick", *config)
    steps["train"] = _cli("train", "demo_quick", "--output-dir", out, "--device", "cpu", *config)
    steps["eval"] = _cli("eval", out / "latest.pth", "--device", "cpu",
                         "--results", out / "eval_results.json")
    steps["predict"] = _cli("predict", out / "latest.pth", voc["val"], "--device", "cpu",
                            "--score-thresh", "0", "--out-dir", out / "predictions")
    return {"steps": steps, "out": out, **voc}


def test_convert_voc_is_strict_by_default_and_skip_bad_converts_the_rest(voc_run):
    code, out, err = voc_run["steps"]["strict"]
    assert code == 2 and out == "", err
    assert err.startswith(f"libra-rcnn: error: {voc_run['cut_off']}: malformed XML: ")
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert not (voc_run["root"] / "strict.json").exists()

    code, out, _ = voc_run["steps"]["convert_train"]
    lines = out.splitlines()
    assert code == 0
    assert lines[0].startswith(f"wrote {voc_run['root'] / 'train.json'}: 7 images, ")
    assert lines[1] == "  1 empty or inverted box(es) dropped (warnings name the files)"
    assert lines[2:4] == ["  skipped 1 file(s) that could not be converted:",
                          f"    {voc_run['cut_off']}: malformed XML: " + lines[3].split(": ", 2)[2]]
    train = json.loads((voc_run["root"] / "train.json").read_text())
    assert [i["file_name"] for i in train["images"]] == \
        [f"{i:06d}.png" for i in range(8) if i != 3]
    assert train["info"]["conversion"]["skipped_files"][0]["file"] == str(voc_run["cut_off"])

    code, out, _ = voc_run["steps"]["convert_val"]
    assert code == 0 and out.startswith(f"wrote {voc_run['root'] / 'val.json'}: 6 images, ")
    assert out.splitlines()[1] == \
        "  2 image(s) missing or unreadable (sizes taken from the XML) (warnings name the files)"


def test_check_data_lists_every_damaged_image(voc_run):
    code, out, _ = voc_run["steps"]["check"]
    assert code == 1
    problems = [line.strip() for line in out.splitlines() if line.startswith("    ")]
    damaged = voc_run["damaged_val"]
    assert [p.split(": ")[0] for p in problems] == \
        [str(voc_run["train"] / "000006.png"), damaged["truncated"], damaged["empty"],
         damaged["missing"]]
    assert f"{damaged['missing']}: file not found" in problems


def _assert_evaluation_report(out: str, damaged: dict) -> None:
    """The table, then: 3 scored, the 3 damaged images named with their reasons."""
    lines = out.splitlines()
    assert lines[0] == "| AP | AP50 | AP75 | APs | APm | APl |"
    at = lines.index("scored 3 image(s); 3 unreadable image(s) not scored:")
    named = lines[at + 1:at + 4]
    assert [line.split(": ")[0].strip() for line in named] == \
        [damaged["truncated"], damaged["empty"], damaged["missing"]]
    assert named[2] == f"  {damaged['missing']}: file not found"
    assert named[1] == f"  {damaged['empty']}: not a recognised image format"


def test_training_evaluates_the_readable_images_and_names_the_others(voc_run):
    code, out, err = voc_run["steps"]["train"]
    assert code == 0, err
    _assert_evaluation_report(out, voc_run["damaged_val"])
    assert "finished at epoch 1, iteration 4" in out  # 7 images, one unreadable, batches of 2
    records = [json.loads(line) for line in (voc_run["out"] / "log.jsonl").read_text().splitlines()]
    (epoch,) = [r for r in records if r["type"] == "epoch"]
    (val,) = [r for r in records if r["type"] == "val"]
    assert epoch["skipped_samples"] == 1
    assert (val["images"], val["skipped_images"]) == (3, 3) and 0.0 <= val["AP50"] <= 1.0
    scored = {r["image_id"] for r in json.loads((voc_run["out"] / "val_results.json").read_text())}
    assert scored <= {1, 3, 5}  # image ids 1..6: only the readable 000000, 000002, 000004.png
    assert "unreadable image(s) not scored" in err  # and the warning in the log


def test_eval_without_a_config_reports_like_training(voc_run):
    code, out, err = voc_run["steps"]["eval"]
    assert code == 0, err
    _assert_evaluation_report(out, voc_run["damaged_val"])
    assert out.splitlines()[-1] == f"wrote {voc_run['out'] / 'eval_results.json'}"
    # the same model scores the same, up to float rounding: eval runs under training's thread
    # count, but a process is free to sum in another order (another CPU, another library build)
    train_table = voc_run["steps"]["train"][1].splitlines()[:3]
    assert out.splitlines()[:2] == train_table[:2]
    assert _table_values(out.splitlines()[2]) == pytest.approx(_table_values(train_table[2]), abs=0.5)
    _assert_same_detections(json.loads((voc_run["out"] / "eval_results.json").read_text()),
                            json.loads((voc_run["out"] / "val_results.json").read_text()))


def _table_values(row: str) -> list[float]:
    """The numbers of a markdown metrics row (``-`` as -1)."""
    return [-1.0 if cell.strip() == "-" else float(cell) for cell in row.strip("| ").split("|")]


def _assert_same_detections(results: list, expected: list) -> None:
    """Two COCO results lists hold the same detections, image by image: one to one, same
    category, boxes within 1e-2 px, scores within 1e-4; at most 2 % left unmatched, for
    detections whose scores tie within rounding at the per-image cut."""
    def by_image(records: list) -> dict:
        grouped: dict = {}
        for r in records:
            x, y, w, h = r["bbox"]
            grouped.setdefault(r["image_id"], []).append((x, y, x + w, y + h, r["score"],
                                                          r["category_id"]))
        return {k: torch.tensor(v, dtype=torch.float64) for k, v in grouped.items()}

    ours, theirs = by_image(results), by_image(expected)
    assert set(ours) == set(theirs)
    unmatched = 0
    for image_id, a in ours.items():
        b = theirs[image_id]
        agreement = compare_detections(
            {"boxes": b[:, :4], "scores": b[:, 4], "labels": b[:, 5].long()},
            {"boxes": a[:, :4], "scores": a[:, 4], "labels": a[:, 5].long()})
        unmatched += max(len(a), len(b)) - agreement["matched"]
    assert unmatched <= 0.02 * max(len(results), len(expected)), unmatched


def test_predict_writes_every_readable_image_and_exits_3(voc_run):
    code, out, _ = voc_run["steps"]["predict"]
    pred = voc_run["out"] / "predictions"
    lines = out.splitlines()
    assert code == 3
    assert lines[0].startswith(f"wrote {pred / 'predictions.json'} (")
    assert lines[0].endswith(f" detections) and 3 drawn image(s) in {pred}")
    damaged = voc_run["damaged_val"]
    assert lines[1:] == ["2 of 5 image(s) could not be read (exit status 3):",
                         f"  {damaged['truncated']}: " + lines[2].split(": ", 1)[1],
                         f"  {damaged['empty']}: not a recognised image format"]
    assert lines[2].split(": ", 1)[1].startswith("cannot decode: ")
    assert sorted(p.name for p in pred.iterdir()) == \
        ["000000.jpg", "000002.jpg", "000004.jpg", "predictions.json"]


def test_eval_strict_refuses_unreadable_images_up_front(voc_run, tmp_path):
    results = tmp_path / "results.json"
    code, out, err = _cli("eval", voc_run["out"] / "latest.pth", "--strict", "--results", results)
    damaged = voc_run["damaged_val"]
    assert code == 2 and out == ""
    assert err.strip().splitlines() == [
        f"libra-rcnn: error: {damaged['truncated']}: cannot decode: image file is truncated "
        f"(and 2 more problems; run `libra-rcnn check-data`)"]
    assert not results.exists()


def _torchrun(cwd: Path, *argv) -> subprocess.CompletedProcess:
    """``torchrun --nproc_per_node 2 -m libra_rcnn --quiet ARGV`` on the CPU (gloo)."""
    env = {k: v for k, v in _child_env().items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    return subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nnodes", "1",
         "--nproc_per_node", "2", "-m", "libra_rcnn", "--quiet", *map(str, argv)],
        capture_output=True, text=True, timeout=CHILD_TIMEOUT_S, env=env, cwd=cwd)


def test_two_processes_train_and_eval_when_one_shard_is_all_unreadable(voc_run):
    """Under torchrun the second process's val shard holds only the damaged images (every one
    of its batches is empty): training and evaluation still finish, on the readable images."""
    out = voc_run["out"].parent / "torchrun"
    config = _voc_config_args(voc_run)
    trained = _torchrun(voc_run["root"], "train", "demo_quick", "--output-dir", out,
                        "--device", "cpu", "--set", "train.batch_size=1", *config)
    assert trained.returncode == 0, trained.stderr[-3000:]
    _assert_evaluation_report(trained.stdout, voc_run["damaged_val"])
    assert trained.stdout.count("scored 3 image(s)") == 1  # reported by the first process only
    (val,) = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()
              if json.loads(line)["type"] == "val"]
    assert (val["images"], val["skipped_images"]) == (3, 3)

    evaluated = _torchrun(voc_run["root"], "eval", out / "latest.pth", "--device", "cpu")
    assert evaluated.returncode == 0, evaluated.stderr[-3000:]
    _assert_evaluation_report(evaluated.stdout, voc_run["damaged_val"])
    assert evaluated.stdout.splitlines()[:3] == trained.stdout.splitlines()[:3]


@pytest.mark.slow
def test_commands_that_do_not_split_their_work_run_once_under_torchrun(voc_run):
    checked = _torchrun(voc_run["root"], "check-data", "demo_quick", *_voc_config_args(voc_run))
    assert checked.returncode != 0 and checked.stdout.count("[val]") == 1, checked.stderr[-3000:]
    assert f"{voc_run['damaged_val']['missing']}: file not found" in checked.stdout
    pred = voc_run["out"].parent / "torchrun_predictions"
    predicted = _torchrun(voc_run["root"], "predict", voc_run["out"] / "latest.pth", voc_run["val"],
                          "--device", "cpu", "--out-dir", pred)
    assert predicted.returncode != 0  # the first process exits 3, torchrun reports the failure
    assert "exitcode  : 3" in predicted.stderr
    assert predicted.stdout.count("2 of 5 image(s) could not be read (exit status 3):") == 1
    assert sorted(p.name for p in pred.iterdir()) == \
        ["000000.jpg", "000002.jpg", "000004.jpg", "predictions.json"]
