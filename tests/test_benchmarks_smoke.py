"""Smoke tests of the benchmark scripts (benchmarks/): they must keep running, not measure.

Each script runs once in ``--smoke`` mode (tiny sizes, one or two rounds, one thread) in its own
process, as a user would run it, and its JSON is checked for the rows the docs describe; its
timings are not checked (a smoke run measures nothing). The script the README names
(``benchmarks.onnx_runtime``) runs in the default suite, the others are marked ``slow``. The
shared measurement helpers get small unit tests with independently known answers.
"""

from __future__ import annotations

import importlib
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO_ROOT = Path(__file__).resolve().parents[1]


def _run_smoke(name: str, tmp_path: Path, *extra: str):
    out = tmp_path / f"{name}.json"
    command = [sys.executable, "-m", f"benchmarks.{name}", "--smoke", "--threads", "1",
               "--out", str(out), *extra]
    proc = subprocess.run(command, cwd=REPO_ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"{' '.join(command)} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}"
    payload = json.loads(out.read_text(encoding="utf-8"))
    assert payload["benchmark"] == name
    assert payload["environment"]["smoke"] is True
    assert payload["environment"]["torch_threads"] == 1
    assert f"wrote {out}" in proc.stdout
    return payload, proc.stdout


def _positive_finite(value) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value) and value > 0


@pytest.fixture
def bench(monkeypatch):
    """The benchmarks package, importable for this test only."""
    monkeypatch.syspath_prepend(str(REPO_ROOT))
    return importlib.import_module("benchmarks._common")


# ---------------------------------------------------------------------------------------------
# the scripts


@pytest.mark.slow
def test_sampler_script_smoke(tmp_path):
    payload, stdout = _run_smoke("sampler", tmp_path)
    rows = payload["rows"]
    cases = ("torchvision", "random", "pos_balance", "neg_balance", "libra")
    assert [r["case"] for r in rows] == list(cases) * 2
    assert {(r["proposals"], r["gt"]) for r in rows} == {(200, 1), (200, 5)}
    assert all(row["candidates_pos"] > 0 for row in rows)  # the synthetic images have positives
    assert payload["target"] is None  # a smoke run judges no target
    assert "median us" in stdout


@pytest.mark.slow
def test_losses_script_smoke(tmp_path):
    payload, _ = _run_smoke("losses", tmp_path)
    rows = payload["rows"]
    assert {(r["boxes"], r["pass"], r["case"]) for r in rows} == {
        (n, p, c) for n in (16, 64) for p in ("fwd", "fwd+bwd") for c in ("smooth_l1", "l1", "balanced_l1")
    }


@pytest.mark.slow
@pytest.mark.parametrize("layout, levels", [("two_stage", "P2-P6"), ("retinanet", "P3-P7")])
def test_pyramid_script_smoke(tmp_path, layout, levels):
    payload, _ = _run_smoke("pyramid", tmp_path, "--layout", layout)
    assert payload["settings"]["layout"] == layout and payload["settings"]["levels"] == levels
    rows = {r["case"]: r for r in payload["rows"]}
    assert list(rows) == ["fpn", "fpn+bfp(none)", "fpn+bfp(conv)", "fpn+bfp(non_local)", "pafpn",
                          "pafpn+bfp(non_local)"]
    assert all(_positive_finite(row["peak_mib"]) for row in rows.values())
    # the parameter-free integration adds nothing; refinement and PAFPN add parameters
    assert rows["fpn+bfp(none)"]["params_m"] == rows["fpn"]["params_m"]
    assert rows["fpn+bfp(non_local)"]["params_m"] > rows["fpn"]["params_m"]
    assert rows["pafpn"]["params_m"] > rows["fpn"]["params_m"]


@pytest.mark.slow
@pytest.mark.parametrize("arch, layout", [("faster_rcnn", "two_stage"), ("retinanet", "retinanet")])
def test_pyramid_benchmark_builds_the_detectors_own_neck(bench, arch, layout):
    """The benchmark's stand-alone neck has exactly the parameters (names and shapes) and the
    refine level of the neck inside our Libra detector, so its timings are that neck's."""
    pyramid = importlib.import_module("benchmarks.pyramid")
    from libra_rcnn.models import build_model, libra_model_config

    cfg = libra_model_config(arch, "resnet50")
    backbone = build_model(cfg).backbone
    in_channels = [pyramid.STAGE_CHANNELS[stage] for stage in pyramid.LAYOUTS[layout][0]]
    neck = pyramid.Neck("fpn", cfg.bfp.refine_type, in_channels, 256, layout)
    expected = {k: v.shape for k, v in backbone.state_dict().items() if k.startswith(("fpn.", "bfp."))}
    assert {k: v.shape for k, v in neck.state_dict().items()} == expected
    assert neck.bfp.refine_level == backbone.bfp.refine_level == cfg.bfp.refine_level
    features = pyramid.backbone_features(1, 64, 96, torch.device("cpu"), torch.float32,
                                         torch.Generator().manual_seed(0), layout=layout)
    with torch.no_grad():
        body_shapes = [f.shape for f in backbone.body(torch.zeros(1, 3, 64, 96)).values()]
    assert [f.shape for f in features.values()] == body_shapes


@pytest.mark.slow
def test_end_to_end_script_smoke(tmp_path):
    payload, stdout = _run_smoke("end_to_end", tmp_path, "--no-parts", "--twin")
    rows = payload["rows"]
    keys = {(r["arch"], r["phase"], r["model"]) for r in rows}
    assert keys == {(a, p, m) for a in ("faster_rcnn", "retinanet") for p in ("train", "infer")
                    for m in ("torchvision", "torchvision_twin", "ours_baseline", "libra")}
    for row in rows:
        assert _positive_finite(row["peak_mib"])
        if row["phase"] == "infer":
            assert _positive_finite(row["gflop"]) and _positive_finite(row["gflops_per_s"])
        if row["model"] == "torchvision_twin":  # a second instance: the same arithmetic
            assert row["flop_ratio_vs_torchvision"] == 1.0
    for arch in payload["architectures"]:
        # torchvision's weights fill our baseline entirely; Libra adds only the pyramid's
        assert arch["loading"]["ours_baseline"]["new_parameters"] == 0
        assert arch["loading"]["libra"]["new_parameters"] > 0
    assert "target:" not in stdout  # a smoke run judges no target


def test_retina_head_signal_script_smoke(tmp_path):
    """The measurement the RetinaNet config's group-norm head rests on: at initialisation the
    plain head's tower shrinks the pyramid's spread layer by layer, the group-norm head's does
    not."""
    from PIL import Image

    voc = tmp_path / "voc"
    (voc / "ImageSets" / "Main").mkdir(parents=True)
    (voc / "JPEGImages").mkdir()
    (voc / "ImageSets" / "Main" / "test.txt").write_text("a\n")
    pixels = torch.Generator().manual_seed(0)
    noise = (torch.rand(48, 64, 3, generator=pixels) * 255).to(torch.uint8).numpy()
    Image.fromarray(noise).save(voc / "JPEGImages" / "a.jpg")
    payload, stdout = _run_smoke("retina_head_signal", tmp_path, "--data-root", str(voc))
    spread = {row["retina_head_norm"]: row["std"] for row in payload["rows"]}
    assert set(spread) == {"none", "gn"}
    assert spread["none"]["pyramid"] == pytest.approx(spread["gn"]["pyramid"], rel=1e-4)
    plain = [spread["none"][f"tower layer {i}"] for i in range(1, 5)]
    assert all(later < 0.5 * earlier for earlier, later in zip(plain, plain[1:]))
    normed = [spread["gn"][f"tower layer {i}"] for i in range(1, 5)]
    assert min(normed) > 0.5 * max(normed) and normed[-1] > 10 * plain[-1]
    assert "head norm gn" in stdout


def test_onnx_runtime_script_smoke(tmp_path):
    pytest.importorskip("onnxruntime")
    payload, stdout = _run_smoke("onnx_runtime", tmp_path)
    rows = payload["rows"]
    assert [(r["model"], r["case"]) for r in rows] == [
        (m, c) for m in ("libra_faster_rcnn_r50", "libra_faster_rcnn_r18")
        for c in ("pytorch", "onnxruntime")]
    for row in rows:
        assert row["detections"] > 0 and 0 <= row["vs_float64_box_median"] <= row["vs_float64_box_max"]
        if row["case"] == "onnxruntime":
            assert 0 <= row["matched"] <= row["detections"]
    assert payload["settings"]["onnxruntime_threads"] == 1
    assert "x pytorch" in stdout


# ---------------------------------------------------------------------------------------------
# the helpers


def test_summarize_and_paired_ratio(bench):
    stats = bench.summarize([3.0, 1.0, 2.0, 10.0])
    assert stats["median"] == 2.5 and stats["min"] == 1.0 and stats["n"] == 4
    # rounds: 2/1 = 2, 9/3 = 3, 4/1 = 4 -> median 3 (the ratio of the medians would be 4/1)
    assert bench.paired_ratio([2.0, 9.0, 4.0], [1.0, 3.0, 1.0]) == 3.0
    with pytest.raises(ValueError):
        bench.paired_ratio([1.0], [1.0, 2.0])


@pytest.mark.skipif(not hasattr(__import__("os"), "getloadavg"), reason="no load average here")
def test_environment_records_the_load_at_the_start_not_after_the_runs(bench, monkeypatch, tmp_path):
    import argparse

    args = argparse.Namespace(amp=False, smoke=True)
    start = bench.environment_info(torch.device("cpu"), args)
    # the scripts describe their environment after the runs: a load that changed since must show
    # only as the load at the end
    monkeypatch.setattr(bench.os, "getloadavg", lambda: (99.0, 99.0, 99.0))
    later = bench.environment_info(torch.device("cpu"), args)
    assert later["loadavg_at_start"] == start["loadavg_at_start"] != [99.0, 99.0, 99.0]
    payload = json.loads(bench.write_json(tmp_path / "x.json", {"environment": later}).read_text())
    assert payload["environment"]["loadavg_at_end"] == [99.0, 99.0, 99.0]


def test_results_hold_paths_relative_to_the_repository(bench, tmp_path):
    root = Path("/srv/repo")
    payload = {
        "command": "python -m benchmarks.x --out /srv/repo/benchmarks/results/x.json --threads 2",
        "overrides": ["data.train_ann=/srv/repo/work_dirs/a/train.json",
                      "data.train_images=/srv/data/fruit/train"],
        "root": "/srv/data/fruit",
        "nested": [{"checkpoint": "/srv/repo/work_dirs/a/latest.pth"}],
        "unchanged": ["1/9", "time / iteration", "https://download.pytorch.org/x.pth",
                      "work_dirs/b", 1.5, None],
    }
    assert bench.relative_paths(payload, root) == {
        "command": "python -m benchmarks.x --out benchmarks/results/x.json --threads 2",
        "overrides": ["data.train_ann=work_dirs/a/train.json",
                      "data.train_images=../data/fruit/train"],
        "root": "../data/fruit",
        "nested": [{"checkpoint": "work_dirs/a/latest.pth"}],
        "unchanged": ["1/9", "time / iteration", "https://download.pytorch.org/x.pth",
                      "work_dirs/b", 1.5, None],
    }
    # the scripts' writer applies it, against this repository
    written = bench.write_json(tmp_path / "r.json", {"file": str(REPO_ROOT / "benchmarks" / "x")})
    assert json.loads(written.read_text())["file"] == "benchmarks/x"


def test_alternating_timings_rotates_the_order(bench):
    calls = []
    cases = {name: (lambda n=name: calls.append(n)) for name in "abc"}
    times = bench.alternating_timings(cases, rounds=3, warmup=1, inner=2, device=torch.device("cpu"))
    assert "".join(calls) == "aabbcc" + "bbccaa" + "ccaabb" + "aabbcc"
    assert all(len(values) == 3 and min(values) >= 0 for values in times.values())


def test_cpu_peak_memory_counts_live_tensor_bytes(bench):
    mib = 2**20

    def allocate():
        a = torch.ones(mib // 4)  # 1 MiB of float32
        b = torch.ones(mib)  # 4 MiB, while a is alive -> peak 5 MiB
        del a
        c = torch.ones(mib // 2)  # 2 MiB after a is gone -> live 6 MiB, the peak
        del b, c

    peak = bench.peak_memory_bytes(allocate, torch.device("cpu"))
    assert 6 * mib <= peak < 6 * mib + 64 * 1024


def test_count_flops_of_a_matmul(bench):
    a, b = torch.ones(16, 32), torch.ones(32, 8)
    assert bench.count_flops(lambda: a @ b) == 2 * 16 * 32 * 8


def test_count_flops_counts_the_fused_attention_of_the_non_local_block(bench):
    # The fused attention kernel must count as the matmuls it replaces: the explicit path
    # (taken under deterministic algorithms) is counted by torch's bmm formula.
    from libra_rcnn.engine.train import _deterministic
    from libra_rcnn.ops.non_local import NonLocal2d

    block = NonLocal2d(8, reduction=1)
    x = torch.randn(2, 8, 6, 7, requires_grad=True)
    fused_forward = bench.count_flops(lambda: block(x))
    fused_training = bench.count_flops(lambda: block(x).sum().backward())
    with _deterministic(True, torch.device("cpu")):
        explicit_forward = bench.count_flops(lambda: block(x))
        explicit_training = bench.count_flops(lambda: block(x).sum().backward())
    n, channels = 6 * 7, 8
    attention = 2 * (2 * n * n * channels)  # theta^T phi and A g, per image
    convs = 4 * 2 * n * channels * channels  # four 1x1 convolutions, per image
    assert explicit_forward == 2 * (attention + convs)
    assert fused_forward == explicit_forward
    # the fused backward recomputes the scores theta^T phi once more
    assert fused_training == explicit_training + 2 * (2 * n * n * channels)


def test_operator_calls_and_their_differences(bench):
    a, b = torch.ones(4, 4), torch.ones(4, 4)

    def one_product():
        return a @ b

    def two_products_and_a_sum():
        return (a @ b @ b).sum()

    ones = bench.operator_calls(bench.profile_operators(one_product, torch.device("cpu")))
    twos = bench.operator_calls(bench.profile_operators(two_products_and_a_sum, torch.device("cpu")))
    assert ones["aten::mm"] == 1 and twos["aten::mm"] == 2
    differences = bench.call_count_differences(ones, twos)
    assert ("aten::mm", 1, 2) in differences and ("aten::sum", 0, 1) in differences
    assert all(name != "aten::matmul" or ref != other for name, ref, other in differences)
    assert bench.call_count_differences(ones, ones) == []


def test_format_table_aligns_and_marks_missing(bench):
    text = bench.format_table([{"x": "a", "y": 1.5}, {"x": "bbb", "y": None}],
                              [("x", "name", ""), ("y", "value", ".2f")])
    lines = text.splitlines()
    assert lines[0].split() == ["name", "value"]
    assert lines[2].split() == ["a", "1.50"] and lines[3].split() == ["bbb", "-"]
    assert len({len(line) for line in lines}) == 1


def test_one_part_variants_differ_from_the_baseline_in_that_part_only(monkeypatch):
    monkeypatch.syspath_prepend(str(REPO_ROOT))
    e2e = importlib.import_module("benchmarks.end_to_end")
    faster = e2e.variant_changes(e2e.model_variants("faster_rcnn", "resnet18", 81, True))
    assert faster == {
        "torchvision": "torchvision reference",
        "ours_baseline": [],
        "+sampler": ["roi_sampler", "rpn_neg_pos_ub"],
        "+pyramid": ["bfp"],
        "+loss": ["box_loss"],
        "libra": ["bfp", "box_loss", "roi_sampler", "rpn_neg_pos_ub"],
    }
    retina = e2e.variant_changes(e2e.model_variants("retinanet", "resnet18", 81, True))
    assert retina["+pyramid"] == ["bfp"] and retina["+loss"] == ["retina_box_loss"]
    assert retina["libra"] == ["bfp", "retina_box_loss"] and "+sampler" not in retina
