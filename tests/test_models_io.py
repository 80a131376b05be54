"""Input validation shared by the detectors, and the proposal dump/load round trip feeding
Fast R-CNN."""

from __future__ import annotations

import pytest
import torch

from libra_rcnn.models.builders import used_settings
from libra_rcnn.models import (
    baseline_model_config,
    build_model,
    dump_proposals,
    libra_model_config,
    load_proposals,
    select_proposals,
    validate_inputs,
)

NUM_CLASSES = 5
SMALL = dict(num_classes=NUM_CLASSES, min_size=64, max_size=96, fpn_channels=16, representation_size=32,
             rpn_pre_nms_top_n_train=100, rpn_post_nms_top_n_train=40, rpn_pre_nms_top_n_test=100,
             rpn_post_nms_top_n_test=40, roi_sampler={"num": 32})


def _small(arch):
    """SMALL without the settings ``arch`` does not use (the builders refuse those)."""
    return used_settings(arch, SMALL)


def _good_images():
    return [torch.rand(3, 40, 50), torch.rand(3, 48, 36)]


def _good_targets():
    return [{"boxes": torch.tensor([[1.0, 2.0, 30.0, 20.0]]), "labels": torch.tensor([2])},
            {"boxes": torch.tensor([[3.0, 3.0, 9.0, 9.0], [0.0, 0.0, 30.0, 40.0]]),
             "labels": torch.tensor([1, 4])}]


def _bad(key, value):
    targets = _good_targets()
    targets[1][key] = value
    return targets


BAD_TARGETS = {
    "zero width": (_bad("boxes", torch.tensor([[3.0, 3.0, 3.0, 9.0], [0.0, 0.0, 30.0, 40.0]])),
                   "image 1: box 0 has zero or negative width/height"),
    "negative height": (_bad("boxes", torch.tensor([[3.0, 3.0, 9.0, 9.0], [0.0, 40.0, 30.0, 10.0]])),
                        "image 1: box 1 has zero or negative"),
    "nan": (_bad("boxes", torch.tensor([[3.0, float("nan"), 9.0, 9.0], [0.0, 0.0, 30.0, 40.0]])),
            "image 1: box 0 has a NaN or infinite value"),
    "inf": (_bad("boxes", torch.tensor([[3.0, 3.0, 9.0, 9.0], [0.0, 0.0, float("inf"), 40.0]])),
            "image 1: box 1 has a NaN or infinite value"),
    "label 0": (_bad("labels", torch.tensor([1, 0])), r"image 1: label 0 of box 1 is outside \[1, 5\)"),
    "label too big": (_bad("labels", torch.tensor([5, 1])), r"image 1: label 5 of box 0 is outside \[1, 5\)"),
    "label dtype": (_bad("labels", torch.tensor([1.0, 2.0])), "image 1: labels must be int64"),
    "label count": (_bad("labels", torch.tensor([1])), "image 1: 2 boxes but 1 labels"),
    "box shape": (_bad("boxes", torch.zeros(2, 3)), r"image 1: box must have shape \[N, 4\]"),
    "box dtype": (_bad("boxes", torch.tensor([[3, 3, 9, 9], [0, 0, 30, 40]])), "image 1: box must be a floating"),
    "no labels": ([_good_targets()[0], {"boxes": torch.zeros(0, 4)}], "image 1: target has no 'labels'"),
    "count": (_good_targets()[:1], "one dict per image"),
}


@pytest.mark.parametrize("case", sorted(BAD_TARGETS))
def test_bad_targets_name_the_image(case):
    targets, match = BAD_TARGETS[case]
    with pytest.raises(ValueError, match=match):
        validate_inputs(_good_images(), targets, training=True, num_classes=NUM_CLASSES)


@pytest.mark.parametrize("image,match", [
    (torch.rand(1, 40, 50), r"image 1: expected shape \[3, H, W\], got \(1, 40, 50\)"),
    (torch.rand(1, 3, 40, 50), r"image 1: expected shape \[3, H, W\]"),
    ((torch.rand(3, 40, 50) * 255).to(torch.uint8), "image 1: expected a floating-point tensor"),
    ([[0.0]], "image 1: expected a Tensor"),
    (torch.rand(3, 0, 50), "image 1: empty image"),
])
def test_bad_images_name_the_image(image, match):
    images = [torch.rand(3, 40, 50), image]
    with pytest.raises(ValueError, match=match):
        validate_inputs(images, None, training=False, num_classes=NUM_CLASSES)


def test_good_inputs_pass_and_training_needs_targets():
    validate_inputs(_good_images(), _good_targets(), training=True, num_classes=NUM_CLASSES)
    empty = [{"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.int64)}] * 2
    validate_inputs(_good_images(), empty, training=True, num_classes=NUM_CLASSES)
    # class-agnostic models do not need labels
    validate_inputs(_good_images(), [{"boxes": t["boxes"]} for t in _good_targets()], training=True,
                    num_classes=None, require_labels=False)
    with pytest.raises(ValueError, match="targets are required in training mode"):
        validate_inputs(_good_images(), None, training=True, num_classes=NUM_CLASSES)
    with pytest.raises(ValueError, match="list of Tensor"):
        validate_inputs(torch.rand(2, 3, 40, 50), None, training=False, num_classes=NUM_CLASSES)


@pytest.mark.parametrize("arch", ["faster_rcnn", "retinanet", "rpn", "fast_rcnn"])
def test_every_model_validates_before_running(arch):
    model = build_model(baseline_model_config(arch, "resnet18", **_small(arch))).train()
    targets, match = BAD_TARGETS["zero width"]
    kwargs = {"proposals": [torch.tensor([[0.0, 0.0, 10.0, 10.0]])] * 2} if arch == "fast_rcnn" else {}
    with pytest.raises(ValueError, match=match):
        model(_good_images(), targets, **kwargs)
    model.eval()
    with pytest.raises(ValueError, match="image 0: expected a floating-point tensor"):
        model([torch.zeros(3, 40, 50, dtype=torch.uint8)])


def _loader():
    g = torch.Generator().manual_seed(0)
    images = [torch.rand(3, 40, 50, generator=g), torch.rand(3, 48, 36, generator=g), torch.rand(3, 30, 30, generator=g)]
    targets = [{"boxes": torch.tensor([[1.0, 2.0, 30.0, 20.0]]), "labels": torch.tensor([2]), "image_id": 7},
               {"boxes": torch.tensor([[3.0, 3.0, 20.0, 30.0]]), "labels": torch.tensor([1]),
                "image_id": torch.tensor(11)},
               {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.int64), "image_id": 3}]
    return [(images[:2], targets[:2]), (images[2:], targets[2:])]


def test_dump_load_proposals_round_trip_and_fast_rcnn_on_them(tmp_path):
    rpn = build_model(libra_model_config("rpn", "resnet18", **_small("rpn"))).train()
    path = tmp_path / "props" / "rpn.pth"
    table = dump_proposals(rpn, _loader(), path, max_per_image=25)
    assert rpn.training  # mode restored
    loaded = load_proposals(path)
    assert sorted(loaded) == [3, 7, 11] and all(type(k) is int for k in loaded)
    sizes = {7: (40, 50), 11: (48, 36), 3: (30, 30)}
    for image_id, rows in loaded.items():
        torch.testing.assert_close(rows, table[image_id], rtol=0, atol=0)
        assert rows.dtype == torch.float32 and rows.dim() == 2 and rows.shape[1] == 5
        assert 0 < rows.shape[0] <= 25
        assert (rows[:-1, 4] >= rows[1:, 4]).all()  # best first
        height, width = sizes[image_id]
        assert (rows[:, 2] <= width + 1e-4).all() and (rows[:, 3] <= height + 1e-4).all()
    # the same proposals as a direct RPN inference, in original coordinates
    rpn.eval()
    with torch.no_grad():
        direct = rpn(_loader()[0][0])
    torch.testing.assert_close(loaded[7][:, :4], direct[0]["boxes"][:25])

    fast = build_model(libra_model_config("fast_rcnn", "resnet18", **_small("fast_rcnn")))
    images, targets = _loader()[0]
    ids = [int(t["image_id"]) for t in targets]
    proposals = select_proposals(loaded, ids, max_per_image=20)
    fast.train()
    losses = fast(images, targets, proposals=proposals)
    assert set(losses) == {"loss_classifier", "loss_box_reg"}
    sum(losses.values()).backward()
    fast.eval()
    with torch.no_grad():
        detections = fast(images, proposals=proposals)
    assert len(detections) == 2 and all(set(d) == {"boxes", "labels", "scores"} for d in detections)
    with pytest.raises(ValueError, match="no proposals for image_id 99"):
        select_proposals(loaded, [99])


def test_load_proposals_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing.pth"):
        load_proposals(tmp_path / "missing.pth")
    wrong_type = tmp_path / "list.pth"
    torch.save([torch.zeros(2, 5)], wrong_type)
    with pytest.raises(ValueError, match="list.pth.*must hold a dict"):
        load_proposals(wrong_type)
    wrong_shape = tmp_path / "shape.pth"
    torch.save({1: torch.zeros(3, 7)}, wrong_shape)
    with pytest.raises(ValueError, match=r"shape.pth.*image 1 must map to a float Tensor\[K, 5\]"):
        load_proposals(wrong_shape)
    string_keys = tmp_path / "keys.pth"
    torch.save({"1": torch.zeros(3, 5)}, string_keys)
    with pytest.raises(ValueError, match="keys must be int"):
        load_proposals(string_keys)
    pickled_object = tmp_path / "object.pth"
    torch.save({1: _Opaque()}, pickled_object)
    with pytest.raises(ValueError, match="object.pth.*weights_only=True"):
        load_proposals(pickled_object)


class _Opaque:
    """Not loadable with weights_only=True."""


def test_dump_proposals_argument_errors(tmp_path):
    rpn = build_model(baseline_model_config("rpn", "resnet18", **_small("rpn")))
    with pytest.raises(ValueError, match="max_per_image"):
        dump_proposals(rpn, _loader(), tmp_path / "x.pth", max_per_image=0)
    no_ids = [(_loader()[0][0], [{"boxes": torch.zeros(0, 4)}] * 2)]
    with pytest.raises(ValueError, match="image 0: target has no 'image_id'"):
        dump_proposals(rpn, no_ids, tmp_path / "x.pth")
    twice = [_loader()[0], _loader()[0]]
    with pytest.raises(ValueError, match="image_id 7 appears twice"):
        dump_proposals(rpn, twice, tmp_path / "x.pth")


def test_mode_context_restores_the_mode_even_when_the_block_raises():
    from libra_rcnn.models.mode import eval_mode, module_mode

    net = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Dropout())
    with pytest.raises(RuntimeError, match="boom"):
        with eval_mode(net.train()):
            assert not net.training and not net[1].training
            raise RuntimeError("boom")
    assert net.training and net[1].training
    net.eval()
    with module_mode(net, True) as inside:
        assert inside is net and net[1].training
    assert not net.training and not net[1].training
