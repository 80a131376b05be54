"""ONNX export (libra_rcnn.engine.export, ``libra-rcnn export``) and the export paths it relies
on: the balanced feature pyramid's traceable rescaling and the float64 input resize.

The onnxruntime tests compare the exported Libra Faster R-CNN, RetinaNet, RPN and Cascade R-CNN with PyTorch on
two image sizes other than the one traced. The small test models have randomly initialised
heads scaled up (:func:`_separate_scores`): with torchvision's tiny initial head weights the
scores are nearly tied (RetinaNet's to about 1e-8), so which of two detections comes first, or
is the 100th kept, is decided by rounding (trained models are not like that).
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torchvision.models.detection.transform import GeneralizedRCNNTransform

from libra_rcnn.cli import main
from libra_rcnn.config import config_to_dict
from libra_rcnn.engine.checkpoint import CHECKPOINT_FORMAT, save_checkpoint
from libra_rcnn.engine.export import (
    SingleImageDetector,
    compare_detections,
    export_checkpoint,
    export_onnx,
    traceable_resize,
)
from libra_rcnn.models import build_model, libra_model_config, used_settings
from libra_rcnn.ops.balanced_feature_pyramid import (
    BalancedFeaturePyramid,
    adaptive_max_pool2d_by_gather,
    nearest_resize_by_gather,
)

pytestmark = pytest.mark.usefixtures("one_intra_op_thread")

SMALL = dict(num_classes=4, fpn_channels=16, representation_size=32, min_size=96, max_size=160,
             rpn_pre_nms_top_n_test=200, rpn_post_nms_top_n_test=100)
# neither is the export's example size (480 x 640); both are resized, one up, one down
CHECK_SIZES = [(72, 100), (150, 131)]
BOX_TOL, SCORE_TOL = 1e-2, 1e-4


def _pyramid(height, width, levels=5, channels=3, seed=0):
    """Feature sizes of a stride-4..64 pyramid over an image padded to multiples of 32, the
    last level a max-pool of the one before (sizes that halve with rounding up)."""
    generator = torch.Generator().manual_seed(seed)
    sizes = [(height // 4, width // 4)]
    for _ in range(levels - 1):
        h, w = sizes[-1]
        sizes.append(((h + 1) // 2, (w + 1) // 2))
    return [torch.randn(1, channels, h, w, generator=generator) for h, w in sizes]


# ---------------------------------------------------------------------------------------------
# the export paths, in PyTorch


def test_gather_resizers_equal_torch_on_every_size_pair():
    generator = torch.Generator().manual_seed(0)
    for out_size in range(1, 14):
        for ratio in (1, 2, 4, 8):
            for in_size in range(out_size, ratio * out_size + 1):
                x = torch.randn(1, 2, in_size, 3, generator=generator)
                expected = F.adaptive_max_pool2d(x, (out_size, 3))
                got = adaptive_max_pool2d_by_gather(x, (out_size, 3), max_ratio=ratio)
                assert torch.equal(got, expected), (in_size, out_size, ratio)
    for in_size in range(1, 40):
        for out_size in range(1, 90):
            x = torch.randn(1, 1, 2, in_size, generator=generator)
            expected = F.interpolate(x, (2, out_size), mode="nearest")
            got = nearest_resize_by_gather(x, (2, out_size))
            assert torch.equal(got, expected), (in_size, out_size)


def _perturbed_pyramid(refine_type, refine_level=2, channels=3):
    bfp = BalancedFeaturePyramid(channels, 5, refine_level=refine_level, refine_type=refine_type)
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for parameter in bfp.parameters():  # non-local's zero output conv would hide the block
            parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.3)
    return bfp.eval()


@pytest.mark.parametrize("refine_type, refine_level", [("none", 2), ("non_local", 2), ("conv", 1)])
def test_traced_pyramid_follows_other_sizes_bit_for_bit(refine_type, refine_level):
    bfp = _perturbed_pyramid(refine_type, refine_level)
    # traced on a tiny pyramid whose last two levels are both 1 x 1 (where the eager code
    # skips the resize), then run on other pyramids, odd and even sizes
    with torch.no_grad():
        traced = torch.jit.trace(bfp, (_pyramid(32, 32),), check_trace=False)
        for height, width in [(800, 1216), (608, 416), (96, 64)]:
            features = _pyramid(height, width, seed=height)
            for got, expected in zip(traced(features), bfp(features)):
                assert torch.equal(got, expected), (height, width)


def test_traceable_resize_gives_torchvisions_sizes_and_pixels():
    generator = torch.Generator().manual_seed(0)
    transform = GeneralizedRCNNTransform(64, 96, [0.0] * 3, [1.0] * 3).eval()
    big = GeneralizedRCNNTransform(800, 1333, [0.0] * 3, [1.0] * 3).eval()
    sizes = [(90, 61), (50, 70), (120, 200), (64, 80), (33, 47), (61, 61)]
    cases = [(transform, size) for size in sizes] + [(big, (480, 640)), (big, (427, 640))]
    for t, (height, width) in cases:
        image = torch.rand(3, height, width, generator=generator)
        assert torch.equal(traceable_resize(t, image)[0], t.resize(image)[0]), (height, width)
    # why float64: torchvision's traced float32 scale makes the 61-pixel side 63 pixels long
    assert math.floor(61 * (64 / 61)) == 64
    assert (torch.tensor(61.0) * (torch.tensor(64.0) / torch.tensor(61.0))).floor() == 63


def test_compare_detections_pairs_ties_in_any_order():
    boxes = torch.tensor([[0.0, 0.0, 10.0, 10.0], [5.0, 5.0, 20.0, 20.0], [1.0, 2.0, 3.0, 4.0]])
    expected = {"boxes": boxes, "labels": torch.tensor([1, 2, 1]),
                "scores": torch.tensor([0.9, 0.5, 0.5])}
    swapped = {k: v[[0, 2, 1]] for k, v in expected.items()}
    swapped["boxes"] = swapped["boxes"] + 0.004
    result = compare_detections(expected, swapped)
    assert result["agree"] and result["matched"] == 3
    assert result["max_box_diff"] == pytest.approx(0.004, abs=1e-6)
    assert result["max_score_diff"] == 0.0

    relabelled = dict(swapped, labels=torch.tensor([1, 1, 1]))
    assert compare_detections(expected, relabelled)["matched"] == 2
    moved = dict(swapped, boxes=swapped["boxes"] + 0.02)
    assert compare_detections(expected, moved)["matched"] == 0
    fewer = {k: v[:2] for k, v in expected.items()}
    result = compare_detections(expected, fewer)
    assert not result["agree"]
    assert (result["expected"], result["actual"], result["matched"]) == (3, 2, 2)
    proposals = {"boxes": boxes, "scores": torch.tensor([0.9, 0.5, 0.5])}  # no labels (RPN)
    assert compare_detections(proposals, proposals)["agree"]


def test_export_refuses_what_it_cannot_export(tmp_path):
    fast_rcnn = build_model(libra_model_config("fast_rcnn", "resnet18",
                                               **used_settings("fast_rcnn", SMALL)))
    with pytest.raises(ValueError, match="cannot export a LibraFastRCNN.*proposals"):
        export_onnx(fast_rcnn, tmp_path / "m.onnx")
    rpn = build_model(libra_model_config("rpn", "resnet18", **used_settings("rpn", SMALL)))
    with pytest.raises(ValueError, match="opset must be an int >= 16, got 11"):
        export_onnx(rpn, tmp_path / "m.onnx", opset=11)
    assert not (tmp_path / "m.onnx").exists()


# ---------------------------------------------------------------------------------------------
# torch.export: the pyramid exports; the whole detector is stopped by torchvision's code


def _image_dims(smallest=32):
    """Dynamic height and width for ``torch.export``."""
    return (torch.export.Dim("height", min=smallest, max=2048),
            torch.export.Dim("width", min=smallest, max=2048))


def test_torch_export_fails_on_torchvisions_data_dependent_nms():
    from torch.fx.experimental.symbolic_shapes import GuardOnDataDependentSymNode

    model = build_model(libra_model_config("faster_rcnn", "resnet18",
                                           **used_settings("faster_rcnn", SMALL))).eval()
    height, width = _image_dims()
    with pytest.raises(GuardOnDataDependentSymNode) as info:
        torch.export.export(SingleImageDetector(model), (torch.rand(3, 96, 128),),
                            dynamic_shapes={"image": {1: height, 2: width}}, strict=False)
    assert "torchvision/ops/boxes.py" in str(info.value)  # batched_nms: if boxes.numel() == 0


def test_torch_export_freezes_torchvisions_resized_size():
    transform = GeneralizedRCNNTransform(64, 96, [0.0] * 3, [1.0] * 3).eval()

    class Resize(nn.Module):
        def forward(self, image):
            return transform([image])[0].tensors

    height, width = _image_dims()
    program = torch.export.export(Resize(), (torch.rand(3, 64, 80),),
                                  dynamic_shapes={"image": {1: height, 2: width}}, strict=False)
    program.module()(torch.rand(3, 64, 80))
    with pytest.raises(Exception, match="Guard failed"):  # the resized width was fixed at 80
        program.module()(torch.rand(3, 50, 70))


def _levels_module(bfp):
    class Levels(nn.Module):  # one tensor per argument, so each gets its dynamic sizes
        def forward(self, p0, p1, p2, p3, p4):
            return tuple(bfp([p0, p1, p2, p3, p4]))

    height, width = _image_dims(smallest=1)
    # exact halving here: torch.export's shape symbols cannot express the rounding up
    shapes = {f"p{level}": {2: height * 2 ** (4 - level), 3: width * 2 ** (4 - level)}
              for level in range(5)}
    return Levels().eval(), shapes


def _halving_pyramid(height, width, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return [torch.randn(1, 3, height * 2 ** (4 - level), width * 2 ** (4 - level),
                        generator=generator) for level in range(5)]


def test_pyramid_exports_with_torch_export():
    bfp = _perturbed_pyramid("non_local")
    module, shapes = _levels_module(bfp)
    program = torch.export.export(module, tuple(_halving_pyramid(3, 4)), dynamic_shapes=shapes,
                                  strict=False)
    features = _halving_pyramid(5, 2, seed=1)
    with torch.no_grad():
        for got, expected in zip(program.module()(*features), bfp(features)):
            assert torch.equal(got, expected)


# ---------------------------------------------------------------------------------------------
# onnxruntime against PyTorch


def _separate_scores(model: nn.Module) -> None:
    """Random heads whose scores spread over (0, 1) instead of sitting at the initial prior."""
    generator = torch.Generator().manual_seed(3)
    with torch.no_grad():
        bfp = model.backbone.bfp
        for parameter in bfp.refine.conv_out.parameters():
            parameter.normal_(0.0, 0.05, generator=generator)
        if hasattr(model, "rpn"):
            nn.init.kaiming_normal_(model.rpn.head.conv[0][0].weight, generator=generator)
            model.rpn.head.cls_logits.weight.normal_(0.0, 0.03, generator=generator)
        if hasattr(model, "head"):  # RetinaNet
            for branch in (model.head.classification_head, model.head.regression_head):
                for layer in branch.conv.modules():
                    if isinstance(layer, nn.Conv2d):
                        nn.init.kaiming_normal_(layer.weight, generator=generator)
            model.head.classification_head.cls_logits.weight.normal_(0.0, 0.03, generator=generator)
            model.head.classification_head.cls_logits.bias.fill_(-3.0)


# every exportable detector in torchvision's conventions; in mmdetection's (its OpenCV-exact
# resize, fixed-stride anchors, aligned RoIAlign...) the three that mmdetection checkpoints
# convert to; all on ResNet-18, and Faster R-CNN on EfficientNet-Lite0 too (timm's network),
# and RetinaNet on it with the group-norm head of the shipped lite configs
EXPORTED = [("faster_rcnn", "torchvision", "resnet18"), ("retinanet", "torchvision", "resnet18"),
            ("rpn", "torchvision", "resnet18"), ("cascade_rcnn", "torchvision", "resnet18"),
            ("faster_rcnn", "mmdet", "resnet18"), ("retinanet", "mmdet", "resnet18"),
            ("cascade_rcnn", "mmdet", "resnet18"), ("faster_rcnn", "mmdet", "efficientnet_lite0"),
            ("retinanet", "torchvision", "efficientnet_lite0")]
# group norm refuses a one-value group, so P7 (1/128 of the image) must be larger than 1 x 1
MORE_SETTINGS = {("retinanet", "torchvision", "efficientnet_lite0"):
                 dict(retina_head_norm="gn", fpn_channels=32, min_size=160, max_size=256)}


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """A small checkpoint of each exportable Libra detector, by (arch, convention, backbone)."""
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("export")
    paths = {}
    for arch, convention, backbone in EXPORTED:
        settings = {**SMALL, **MORE_SETTINGS.get((arch, convention, backbone), {})}
        cfg = libra_model_config(arch, backbone, settings=convention,
                                 **used_settings(arch, settings))
        model = build_model(cfg)
        _separate_scores(model)
        paths[arch, convention, backbone] = save_checkpoint(
            folder / f"{arch}_{convention}_{backbone}.pth", {
                "format": CHECKPOINT_FORMAT, "format_version": 1, "model": model.state_dict(),
                "model_config": config_to_dict(cfg), "class_names": ["a", "b", "c"]})
    return paths


@pytest.mark.parametrize("arch, convention, backbone", EXPORTED)
def test_onnxruntime_gives_pytorchs_detections_at_other_sizes(arch, convention, backbone,
                                                              checkpoints, tmp_path):
    onnx = pytest.importorskip("onnx")
    pytest.importorskip("onnxruntime")
    from libra_rcnn.engine.export import OnnxDetector
    from libra_rcnn.engine.checkpoint import load_model_from_checkpoint

    path, _ = export_checkpoint(checkpoints[arch, convention, backbone], tmp_path / f"{arch}.onnx")
    graph = onnx.load(str(path)).graph
    names = ["boxes", "scores"] if arch == "rpn" else ["boxes", "labels", "scores"]
    assert [o.name for o in graph.output] == names
    image_dims = [d.dim_param or d.dim_value for d in graph.input[0].type.tensor_type.shape.dim]
    assert [i.name for i in graph.input] == ["image"] and image_dims == [3, "height", "width"]

    model, _ = load_model_from_checkpoint(checkpoints[arch, convention, backbone])
    detector = OnnxDetector(path, threads=1)
    generator = torch.Generator().manual_seed(5)
    for height, width in CHECK_SIZES:
        image = torch.rand(3, height, width, generator=generator)
        with torch.no_grad():
            expected = model([image])[0]
        result = compare_detections(expected, detector(image), box_tol=BOX_TOL, score_tol=SCORE_TOL)
        assert result["agree"], (height, width, result)
        assert result["expected"] >= 20  # enough detections to compare
        scores = expected["scores"]
        assert scores.max() - scores.min() > 0.05  # not one tied score


def test_pyramid_alone_is_bit_exact_in_onnxruntime(tmp_path):
    pytest.importorskip("onnx")
    onnxruntime = pytest.importorskip("onnxruntime")
    bfp = _perturbed_pyramid("none")
    names = [f"p{level}" for level in range(5)]
    torch.onnx.export(bfp, (_pyramid(256, 192),), str(tmp_path / "bfp.onnx"), dynamo=False,
                      opset_version=17, input_names=names,
                      dynamic_axes={name: {2: f"h{i}", 3: f"w{i}"} for i, name in enumerate(names)})
    session = onnxruntime.InferenceSession(str(tmp_path / "bfp.onnx"))
    for height, width in [(800, 1216), (608, 416)]:
        features = _pyramid(height, width, seed=height)
        outputs = session.run(None, {name: f.numpy() for name, f in zip(names, features)})
        for got, expected in zip(outputs, bfp(features)):
            assert torch.equal(torch.from_numpy(got), expected)


@pytest.mark.slow  # the dynamo exporter takes about 20 s for the pyramid on 2 CPU cores
def test_pyramid_exports_to_onnx_with_torch_export(tmp_path):
    pytest.importorskip("onnxscript")
    onnxruntime = pytest.importorskip("onnxruntime")
    bfp = _perturbed_pyramid("non_local")
    module, shapes = _levels_module(bfp)
    program = torch.onnx.export(module, tuple(_halving_pyramid(3, 4)), dynamo=True,
                                dynamic_shapes=shapes)
    program.save(str(tmp_path / "bfp.onnx"))
    session = onnxruntime.InferenceSession(str(tmp_path / "bfp.onnx"))
    features = _halving_pyramid(5, 2, seed=1)
    inputs = {arg.name: f.numpy() for arg, f in zip(session.get_inputs(), features)}
    with torch.no_grad():
        for got, expected in zip(session.run(None, inputs), bfp(features)):
            torch.testing.assert_close(torch.from_numpy(got), expected, rtol=1e-5, atol=1e-5)


def test_cli_exports_and_checks_against_pytorch(checkpoints, tmp_path, capsys):
    pytest.importorskip("onnx")
    pytest.importorskip("onnxruntime")
    from PIL import Image

    generator = torch.Generator().manual_seed(7)
    pixels = (torch.rand(CHECK_SIZES[0] + (3,), generator=generator) * 255).to(torch.uint8)
    Image.fromarray(pixels.numpy()).save(tmp_path / "image.png")
    out = tmp_path / "sub" / "rpn.onnx"
    code = main(["--quiet", "export", str(checkpoints["rpn", "torchvision", "resnet18"]), str(out), "--check",
                 str(tmp_path / "image.png")])
    stdout = capsys.readouterr().out
    assert code == 0, stdout
    assert out.is_file()
    assert f"wrote {out}: input image float32 [3, H, W] in 0..1, outputs boxes, scores" in stdout
    assert "image.png: PyTorch 100 detections, onnxruntime 100, 100 matched" in stdout

    from libra_rcnn.engine.export import OnnxDetector

    with pytest.raises(ValueError, match="float tensor in 0..1, got dtype torch.uint8"):
        OnnxDetector(out)(pixels.permute(2, 0, 1))
    with pytest.raises(FileNotFoundError, match="no such ONNX file"):
        OnnxDetector(tmp_path / "missing.onnx")


def test_cli_export_errors_are_one_line(checkpoints, tmp_path, capsys):
    code = main(["--quiet", "export", str(tmp_path / "missing.pth"), str(tmp_path / "m.onnx")])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "missing.pth: no such checkpoint file" in err
    code = main(["--quiet", "export", str(checkpoints["rpn", "torchvision", "resnet18"]), str(tmp_path / "m.onnx"),
                 "--opset", "9"])
    err = capsys.readouterr().err
    assert code == 2 and "opset must be an int >= 16, got 9" in err
    assert not (tmp_path / "m.onnx").exists()


def test_missing_export_extra_is_a_one_line_cli_error(checkpoints, tmp_path, capsys, monkeypatch):
    import libra_rcnn.engine.export as export

    def no_onnx(name):
        raise ImportError(f"No module named {name!r}")

    monkeypatch.setattr(export.importlib, "import_module", no_onnx)
    code = main(["--quiet", "export", str(checkpoints["rpn", "torchvision", "resnet18"]), str(tmp_path / "m.onnx")])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1
    assert ("onnx is not installed; ONNX export and inference need the 'export' extra: "
            'pip install "libra-rcnn[export]"') in err


def test_cli_check_reads_what_it_can_and_lists_unreadable_images(checkpoints, tmp_path, capsys):
    pytest.importorskip("onnx")
    pytest.importorskip("onnxruntime")
    from PIL import Image

    folder = tmp_path / "photos"
    folder.mkdir()
    pixels = (torch.rand(CHECK_SIZES[1] + (3,), generator=torch.Generator().manual_seed(8)) * 255)
    Image.fromarray(pixels.to(torch.uint8).numpy()).save(folder / "good.png")
    (folder / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not a whole jpeg")
    code = main(["--quiet", "export", str(checkpoints["rpn", "torchvision", "resnet18"]),
                 str(tmp_path / "m.onnx"), "--check", str(folder)])
    stdout = capsys.readouterr().out
    assert code == 3, stdout  # as predict: every readable image checked, the others listed
    assert "good.png: PyTorch 100 detections, onnxruntime 100, 100 matched" in stdout
    assert "1 of 2 image(s) could not be read" in stdout and "broken.jpg:" in stdout
