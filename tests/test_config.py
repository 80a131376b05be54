"""Config loading: shipped configs, strict validation, ``_base_`` inheritance, ``--set`` overrides."""

from __future__ import annotations

import dataclasses

from dataclasses import dataclass, field
from typing import Literal, Optional

import pytest

from libra_rcnn.config import (
    Config,
    ConfigError,
    config_to_dict,
    dataclass_from_dict,
    dump_config,
    list_configs,
    load_config,
    resolve_config_path,
)
from libra_rcnn.models import baseline_model_config, check_model_config, libra_model_config

IMAGENET = "IMAGENET1K_V1"


def _write(path, text):
    path.write_text(text)
    return path


def _model_diff(a, b, prefix=""):
    """Dotted keys whose values differ between two plain dicts."""
    keys = set()
    for key in set(a) | set(b):
        va, vb = a.get(key), b.get(key)
        if isinstance(va, dict) and isinstance(vb, dict):
            keys |= _model_diff(va, vb, f"{prefix}{key}.")
        elif va != vb:
            keys.add(prefix + key)
    return keys


# ------------------------------------------------------------------------------ shipped configs


def test_every_shipped_config_loads_and_has_a_valid_model():
    names = list_configs()
    assert len(names) >= 35
    for name in names:
        cfg = load_config(name)
        check_model_config(cfg.model)
        assert cfg.output_dir.endswith(name.split("/")[-1])


@pytest.mark.parametrize("libra", [False, True])
def test_lite0_cascade_configs_are_the_faster_rcnn_ones_with_three_stages(libra):
    prefix = "libra_" if libra else ""
    cascade = load_config(f"{prefix}cascade_rcnn_lite0_fpn_cpu")
    faster = load_config(f"{prefix}faster_rcnn_lite0_fpn_cpu")
    assert cascade.train == faster.train and cascade.data == faster.data
    assert cascade.model.arch == "cascade_rcnn" and cascade.model.cascade.num_stages == 3
    assert cascade.model.roi_sampler.binning == "negatives"
    # apart from the stages and their bins, the same detector
    expected = dataclasses.replace(
        faster.model, arch="cascade_rcnn", cascade=cascade.model.cascade,
        roi_sampler=dataclasses.replace(faster.model.roi_sampler, binning="negatives"))
    assert cascade.model == expected


@pytest.mark.parametrize("name, arch, backbone", [
    ("libra_faster_rcnn_r50_fpn_1x_coco", "faster_rcnn", "resnet50"),
    ("libra_faster_rcnn_r101_fpn_1x_coco", "faster_rcnn", "resnet101"),
    ("libra_faster_rcnn_r101_fpn_2x_coco", "faster_rcnn", "resnet101"),
    ("libra_faster_rcnn_x101_64x4d_fpn_1x_coco", "faster_rcnn", "resnext101_64x4d"),
    ("libra_retinanet_r50_fpn_1x_coco", "retinanet", "resnet50"),
    ("libra_rpn_r50_fpn_1x_coco", "rpn", "resnet50"),
    ("ablation/table2_libra", "fast_rcnn", "resnet50"),
    ("libra_cascade_rcnn_r50_fpn_1x_coco", "cascade_rcnn", "resnet50"),
])
def test_libra_configs_match_the_model_packages_libra_settings(name, arch, backbone):
    # the YAML files spell the settings out; the models package defines them in code
    assert load_config(name).model == libra_model_config(arch, backbone, settings="mmdet",
                                                         backbone_weights=IMAGENET)


@pytest.mark.parametrize("name, arch, backbone", [
    ("faster_rcnn_r50_fpn_1x_coco", "faster_rcnn", "resnet50"),
    ("faster_rcnn_r101_fpn_1x_coco", "faster_rcnn", "resnet101"),
    ("faster_rcnn_r101_fpn_2x_coco", "faster_rcnn", "resnet101"),
    ("faster_rcnn_x101_64x4d_fpn_1x_coco", "faster_rcnn", "resnext101_64x4d"),
    ("retinanet_r50_fpn_1x_coco", "retinanet", "resnet50"),
    ("rpn_r50_fpn_1x_coco", "rpn", "resnet50"),
    ("ablation/table2_baseline", "fast_rcnn", "resnet50"),
    ("cascade_rcnn_r50_fpn_1x_coco", "cascade_rcnn", "resnet50"),
])
def test_baseline_configs_match_the_baseline_settings(name, arch, backbone):
    # the paper's ablation baseline regresses with smooth L1 (Table 6), mmdetection's with L1
    paper = {"box_loss": {"kind": "smooth_l1"}} if name.startswith("ablation/") else {}
    assert load_config(name).model == baseline_model_config(arch, backbone, settings="mmdet",
                                                            backbone_weights=IMAGENET, **paper)


def test_schedules_follow_the_paper():
    one_x = load_config("libra_faster_rcnn_r50_fpn_1x_coco").train
    assert (one_x.epochs, one_x.lr_steps, one_x.base_lr, one_x.base_batch_size) == (12, [8, 11], 0.02, 16)
    # mmdetection 3.3: linear warm-up from 0.001 x lr, full rate at iteration 499, no clipping
    assert (one_x.warmup_iters, one_x.warmup_ratio, one_x.momentum, one_x.weight_decay) == \
        (499, 0.001, 0.9, 1e-4)
    assert one_x.grad_clip_norm is None
    two_x = load_config("libra_faster_rcnn_r101_fpn_2x_coco").train
    assert (two_x.epochs, two_x.lr_steps) == (24, [16, 22])
    assert load_config("retinanet_r50_fpn_1x_coco").train.base_lr == 0.01
    coco = load_config("faster_rcnn_r50_fpn_1x_coco").data
    assert coco.train_ann == "data/coco/annotations/instances_train2017.json"
    assert coco.val_ann == "data/coco/annotations/instances_val2017.json"
    ablation = load_config("ablation/table5_refinement").data
    assert ablation.train_proposals and ablation.val_proposals


# each ablation row changes only its own switches relative to the baseline row
ABLATION_CHANGES = {
    "table2_iou_sampling": {"roi_sampler.pos_balance", "roi_sampler.neg_balance"},
    "table4_pos_balance": {"roi_sampler.pos_balance"},
    "table4_k2": {"roi_sampler.pos_balance", "roi_sampler.neg_balance", "roi_sampler.num_bins"},
    "table4_k3": {"roi_sampler.pos_balance", "roi_sampler.neg_balance"},
    "table4_k5": {"roi_sampler.pos_balance", "roi_sampler.neg_balance", "roi_sampler.num_bins"},
    "table5_integration": {"bfp.enabled", "bfp.refine_type"},
    "table5_refinement": {"bfp.enabled"},
    "table5_pafpn": {"neck"},
    "table5_balanced_pafpn": {"neck", "bfp.enabled"},
    "table6_loss_weight_1.5": {"box_loss.loss_weight"},
    "table6_loss_weight_2.0": {"box_loss.loss_weight"},
    "table6_l1_1.0": {"box_loss.kind"},
    "table6_l1_1.5": {"box_loss.kind", "box_loss.loss_weight"},
    "table6_l1_2.0": {"box_loss.kind", "box_loss.loss_weight"},
    "table6_alpha0.2_gamma1.0": {"box_loss.kind", "box_loss.alpha", "box_loss.gamma"},
    "table6_alpha0.3_gamma1.0": {"box_loss.kind", "box_loss.alpha", "box_loss.gamma"},
    "table6_alpha0.5_gamma1.0": {"box_loss.kind", "box_loss.gamma"},
    "table6_alpha0.5_gamma1.5": {"box_loss.kind"},
    "table6_alpha0.5_gamma2.0": {"box_loss.kind", "box_loss.gamma"},
}


@pytest.mark.parametrize("row", sorted(ABLATION_CHANGES))
def test_ablation_rows_differ_from_the_baseline_only_in_their_switches(row):
    base = load_config("ablation/table2_baseline")
    cfg = load_config(f"ablation/{row}")
    assert _model_diff(config_to_dict(base.model), config_to_dict(cfg.model)) == ABLATION_CHANGES[row]
    assert cfg.train == base.train
    assert cfg.data == base.data


def test_ablation_values():
    assert load_config("ablation/table4_k5").model.roi_sampler.num_bins == 5
    assert load_config("ablation/table6_l1_1.5").model.box_loss.loss_weight == 1.5
    loss = load_config("ablation/table6_alpha0.2_gamma1.0").model.box_loss
    assert (loss.kind, loss.alpha, loss.gamma) == ("balanced_l1", 0.2, 1.0)
    assert load_config("ablation/table5_integration").model.bfp.refine_type == "none"


def test_bare_names_and_paths_resolve(tmp_path):
    by_name = resolve_config_path("ablation/table2_libra")
    assert resolve_config_path("ablation/table2_libra.yaml") == by_name
    assert resolve_config_path(str(by_name)) == by_name
    with pytest.raises(ConfigError, match="no_such_config: no such config file"):
        resolve_config_path("no_such_config")


# ------------------------------------------------------------------------------ validation


def test_unknown_key_names_the_file_and_the_key(tmp_path):
    path = _write(tmp_path / "x.yaml", "model:\n  bfp:\n    refine_typo: 3\n")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert str(info.value) == f"{path}: model.bfp.refine_typo: unknown key"


def test_unknown_top_level_section(tmp_path):
    path = _write(tmp_path / "x.yaml", "optimizer:\n  lr: 0.1\n")
    with pytest.raises(ConfigError, match=r"x\.yaml: optimizer: unknown key"):
        load_config(path)


@pytest.mark.parametrize("text, key, problem", [
    ("train:\n  epochs: twelve\n", "train.epochs", "expected an integer"),
    ("train:\n  epochs: true\n", "train.epochs", "expected an integer"),
    ("train:\n  base_lr: fast\n", "train.base_lr", "expected a number"),
    ("train:\n  amp: 1\n", "train.amp", "expected true or false"),
    ("train:\n  lr_steps: 8\n", "train.lr_steps", "expected a list"),
    ("train:\n  lr_steps: [8, x]\n", r"train.lr_steps\[1\]", "expected an integer"),
    ("model:\n  arch: mask_rcnn\n", "model.arch", "'mask_rcnn' is not one of 'faster_rcnn'"),
    ("model:\n  bfp:\n    refine_type: attention\n", "model.bfp.refine_type", "is not one of"),
    ("model:\n  bfp: null\n", "model.bfp", "expected a mapping"),
    ("model:\n  box_loss: [1, 2]\n", "model.box_loss", "expected a mapping"),
    ("data:\n  val_ann: 3\n", "data.val_ann", "expected a string"),
])
def test_ill_typed_values_name_the_file_and_the_key(tmp_path, text, key, problem):
    path = _write(tmp_path / "bad.yaml", text)
    with pytest.raises(ConfigError, match=rf"^{path}: {key}: .*{problem}"):
        load_config(path)


def test_value_checks_of_the_dataclasses_name_the_section(tmp_path):
    path = _write(tmp_path / "bad.yaml", "train:\n  lr_steps: [11, 8]\n")
    with pytest.raises(ConfigError, match=rf"{path}: train: lr_steps must be strictly increasing"):
        load_config(path)
    path = _write(tmp_path / "bad2.yaml", "data:\n  flip_prob: 1.5\n")
    with pytest.raises(ConfigError, match=r"data: flip_prob must be in \[0, 1\]"):
        load_config(path)


def test_ints_are_accepted_for_floats_and_optionals_take_null(tmp_path):
    path = _write(tmp_path / "ok.yaml", "train:\n  base_lr: 1\n  max_iters: null\n"
                                        "  grad_clip_norm: 5\n  weight_decay: 1e-4\n"
                                        "model:\n  backbone_weights: null\n")
    cfg = load_config(path)
    # PyYAML (YAML 1.1) alone would read 1e-4 as a string
    assert cfg.train.weight_decay == pytest.approx(1e-4)
    assert cfg.train.base_lr == 1.0 and isinstance(cfg.train.base_lr, float)
    assert cfg.train.grad_clip_norm == 5.0
    assert cfg.model.backbone_weights is None


def test_python_tags_are_refused_and_never_executed(tmp_path):
    marker = tmp_path / "marker"
    path = _write(tmp_path / "evil.yaml",
                  f"model: !!python/object/apply:os.system ['touch {marker}']\n")
    with pytest.raises(ConfigError, match=rf"^{path}: not a valid YAML config"):
        load_config(path)
    assert not marker.exists()


def test_non_mapping_and_syntax_errors(tmp_path):
    with pytest.raises(ConfigError, match="must be a mapping at the top level"):
        load_config(_write(tmp_path / "list.yaml", "- 1\n- 2\n"))
    with pytest.raises(ConfigError, match=r"not a valid YAML config \(line"):
        load_config(_write(tmp_path / "broken.yaml", "train: [1, 2\n"))
    empty = load_config(_write(tmp_path / "empty.yaml", ""))
    assert empty.model == Config().model and empty.output_dir.endswith("empty")


# ------------------------------------------------------------------------------ inheritance


def test_base_inheritance_merges_mappings_and_replaces_other_values(tmp_path):
    (tmp_path / "sub").mkdir()
    _write(tmp_path / "parent.yaml",
           "model:\n  backbone: resnet18\n  bfp:\n    enabled: true\n    refine_level: 1\n"
           "train:\n  lr_steps: [3, 5]\n  epochs: 6\n")
    child = _write(tmp_path / "sub" / "child.yaml",
                   "_base_: ../parent.yaml\nmodel:\n  bfp:\n    refine_level: 3\n"
                   "train:\n  lr_steps: [4]\n")
    cfg = load_config(child)
    assert cfg.model.backbone == "resnet18"  # inherited
    assert cfg.model.bfp.enabled is True  # sibling of an overridden key kept
    assert cfg.model.bfp.refine_level == 3  # overridden
    assert cfg.train.lr_steps == [4]  # lists are replaced, not merged
    assert cfg.train.epochs == 6
    assert cfg.output_dir.endswith("child")


def test_several_bases_merge_left_to_right(tmp_path):
    _write(tmp_path / "a.yaml", "train:\n  epochs: 3\n  seed: 1\n")
    _write(tmp_path / "b.yaml", "train:\n  epochs: 4\n")
    cfg = load_config(_write(tmp_path / "c.yaml", "_base_: [a.yaml, b.yaml]\n"))
    assert (cfg.train.epochs, cfg.train.seed) == (4, 1)


def test_error_in_a_base_file_names_that_file(tmp_path):
    parent = _write(tmp_path / "parent.yaml", "train:\n  epochz: 3\n")
    child = _write(tmp_path / "child.yaml", "_base_: parent.yaml\n")
    with pytest.raises(ConfigError) as info:
        load_config(child)
    assert str(info.value) == f"{parent}: train.epochz: unknown key"


def test_missing_base_and_cycles(tmp_path):
    with pytest.raises(ConfigError, match=r"x\.yaml: _base_: no such file"):
        load_config(_write(tmp_path / "x.yaml", "_base_: nowhere.yaml\n"))
    _write(tmp_path / "a.yaml", "_base_: b.yaml\n")
    _write(tmp_path / "b.yaml", "_base_: a.yaml\n")
    with pytest.raises(ConfigError, match="inheritance cycle"):
        load_config(tmp_path / "a.yaml")
    with pytest.raises(ConfigError, match="_base_: expected a file name"):
        load_config(_write(tmp_path / "n.yaml", "_base_: 3\n"))


# ------------------------------------------------------------------------------ overrides


def test_set_overrides_are_parsed_as_yaml_and_applied_last():
    cfg = load_config("libra_faster_rcnn_r50_fpn_1x_coco", [
        "train.lr_steps=[16, 22]", "train.epochs=24", "model.bfp.enabled=false",
        "model.backbone_weights=null", "output_dir=/tmp/x", "train.base_lr=1e-3"])
    assert cfg.train.lr_steps == [16, 22] and cfg.train.epochs == 24
    assert cfg.model.bfp.enabled is False and cfg.model.bfp.refine_level == 2
    assert cfg.model.backbone_weights is None
    assert cfg.output_dir == "/tmp/x"
    assert cfg.train.base_lr == pytest.approx(1e-3)


def test_cross_field_checks_apply_to_the_merged_result():
    # each override alone would leave val_ann/val_images half-set; together they are valid
    cfg = load_config("faster_rcnn_r50_fpn_1x_coco", ["data.val_ann=null", "data.val_images=null"])
    assert cfg.data.val_ann is None and cfg.data.val_images is None
    with pytest.raises(ConfigError, match="val_ann and val_images"):
        load_config("faster_rcnn_r50_fpn_1x_coco", ["data.val_ann=null"])


@pytest.mark.parametrize("override, message", [
    ("train.epochz=3", r"^--set train.epochz=3: train.epochz: unknown key"),
    ("train.epochs=many", r"^--set train.epochs=many: train.epochs: expected an integer"),
    ("model.arch=yolo", r"^--set model.arch=yolo: model.arch: 'yolo' is not one of"),
    ("train.epochs", r"^--set train.epochs: expected KEY=VALUE"),
    ("=3", r"^--set =3: expected KEY=VALUE"),
    ("train..epochs=3", r"expected KEY=VALUE"),
    ("train.lr_steps=[1, 2", r"cannot parse the value"),
])
def test_bad_overrides_name_the_override(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config("faster_rcnn_r50_fpn_1x_coco", [override])


@pytest.mark.parametrize("override, choices", [
    ("model.roi_sampler.binning=paper", "'negatives', 'all_candidates'"),
    ("model.roi_sampler.binning=mmdet", "'negatives', 'all_candidates'"),
    ("model.box_loss.formula=paper", "'scaled', 'beta_in_log'"),
    ("model.retina_box_loss.formula=mmdet", "'scaled', 'beta_in_log'"),
])
def test_the_sampler_binning_and_balanced_l1_formula_name_what_they_do(tmp_path, override, choices):
    key, _, value = override.partition("=")
    message = rf"^--set {override}: {key}: '{value}' is not one of {choices}$"
    with pytest.raises(ConfigError, match=message):
        load_config("libra_faster_rcnn_r50_fpn_1x_coco", [override])
    section, name = key.split(".")[1:]
    path = _write(tmp_path / "old.yaml", f"model:\n  {section}:\n    {name}: {value}\n")
    with pytest.raises(ConfigError, match=rf"^{path}: {key}: '{value}' is not one of {choices}$"):
        load_config(path)


def test_dump_and_reload_round_trip(tmp_path):
    cfg = load_config("ablation/table5_balanced_pafpn", ["train.max_iters=7"])
    path = dump_config(cfg, tmp_path / "dumped.yaml")
    assert load_config(path) == cfg


# ------------------------------------------------------------------------------ generic helper


@dataclass
class _Inner:
    size: int = 1
    mode: Literal["a", "b"] = "a"


@dataclass
class _Outer:
    inner: _Inner = field(default_factory=_Inner)
    pair: tuple[int, float] = (1, 2.0)
    names: tuple[str, ...] = ()
    weights: dict[str, float] = field(default_factory=dict)
    maybe: Optional[int] = None
    flag: Literal[True, 1] = 1


def test_dataclass_from_dict_handles_nested_tuples_dicts_and_literals():
    out = dataclass_from_dict(_Outer, {"inner": {"mode": "b"}, "pair": [3, 4], "names": ["x", "y"],
                                       "weights": {"a": 1}, "maybe": 5, "flag": True})
    assert out == _Outer(inner=_Inner(mode="b"), pair=(3, 4.0), names=("x", "y"),
                         weights={"a": 1.0}, maybe=5, flag=True)
    assert isinstance(out.pair[1], float)
    with pytest.raises(ValueError, match=r"^pair: expected a list of 2 items"):
        dataclass_from_dict(_Outer, {"pair": [1]})
    with pytest.raises(ValueError, match=r"^weights\.a: expected a number"):
        dataclass_from_dict(_Outer, {"weights": {"a": "heavy"}})
    with pytest.raises(ValueError, match=r"^inner\.mode: 'c' is not one of 'a', 'b'"):
        dataclass_from_dict(_Outer, {"inner": {"mode": "c"}})
    # True == 1 in Python, but a Literal keeps them apart
    with pytest.raises(ValueError, match=r"^flag: 1.0 is not one of"):
        dataclass_from_dict(_Outer, {"flag": 1.0})
    with pytest.raises(ValueError, match=r"^prefix\.maybe: expected an integer"):
        dataclass_from_dict(_Outer, {"maybe": "x"}, prefix="prefix.")
