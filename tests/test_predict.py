"""Tests for libra_rcnn.engine.predict and libra_rcnn.engine.visualize."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from libra_rcnn.engine.predict import load_image_tensor, predict_images
from libra_rcnn.errors import UserInputError
from libra_rcnn.engine.visualize import class_color, draw_detections, to_pil_image


class ThreeBoxModel(nn.Module):
    """Three detections per image with scores 0.9 / 0.6 / 0.2 and labels 1 / 2 / 1."""

    def __init__(self):
        super().__init__()
        self.seen_shapes = []

    def forward(self, images):
        assert not self.training
        outs = []
        for img in images:
            self.seen_shapes.append(tuple(img.shape))
            assert img.dtype == torch.float32 and 0.0 <= float(img.min()) and float(img.max()) <= 1.0
            outs.append({
                "boxes": torch.tensor([[2.0, 3.0, 30.0, 20.0], [10.0, 10.0, 40.0, 44.0], [0.0, 0.0, 8.0, 8.0]]),
                "scores": torch.tensor([0.9, 0.6, 0.2]),
                "labels": torch.tensor([1, 2, 1]),
            })
        return outs


def write_images(tmp_path):
    g = torch.Generator().manual_seed(0)
    paths = []
    for name, (h, w) in (("a.png", (48, 64)), ("b.jpg", (56, 40))):
        pixels = torch.randint(0, 256, (h, w, 3), generator=g, dtype=torch.uint8)
        path = tmp_path / "in" / name
        path.parent.mkdir(exist_ok=True)
        Image.fromarray(pixels.numpy()).save(path)
        paths.append(path)
    return paths


def test_predict_images_writes_images_and_json(tmp_path):
    paths = write_images(tmp_path)
    out_dir = tmp_path / "out"
    model = ThreeBoxModel().train()
    written = predict_images(
        model, paths, class_names=["cat", "dog"], label_to_cat_id={1: 17, 2: 18},
        score_thresh=0.5, out_dir=out_dir,
    )
    preds = written.detections
    assert written.json_file == out_dir / "predictions.json" and written.failed == []
    assert written.drawn == [out_dir / "a.jpg", out_dir / "b.jpg"]
    assert model.training  # mode restored
    assert model.seen_shapes == [(3, 48, 64), (3, 56, 40)]
    assert sorted(p.name for p in out_dir.iterdir()) == ["a.jpg", "b.jpg", "predictions.json"]
    with Image.open(out_dir / "a.jpg") as im:
        assert im.size == (64, 48)
    # threshold 0.5 keeps the 0.9 and 0.6 detections of each image
    assert len(preds) == 4
    assert json.loads((out_dir / "predictions.json").read_text()) == preds
    first = preds[0]
    assert first["file_name"] == str(paths[0])
    assert first["category_id"] == 17 and first["category_name"] == "cat"
    assert first["bbox"] == pytest.approx([2.0, 3.0, 28.0, 17.0])
    assert first["score"] == pytest.approx(0.9)
    assert [p["category_id"] for p in preds] == [17, 18, 17, 18]

    # Without a mapping the label is written; a lower threshold keeps all three boxes.
    preds_all = predict_images(ThreeBoxModel(), paths[:1], class_names=["cat", "dog"],
                               score_thresh=0.1, out_dir=tmp_path / "out2").detections
    assert [p["category_id"] for p in preds_all] == [1, 2, 1]


def test_predict_images_draws_only_kept_boxes(tmp_path):
    # A flat grey image makes drawn pixels easy to find: the 0.2-score box (0..8, 0..8) must not
    # be drawn at threshold 0.5, while the 0.9 box outline at x=2 is.
    path = tmp_path / "grey.png"
    Image.new("RGB", (64, 64), (128, 128, 128)).save(path)
    predict_images(ThreeBoxModel(), [path], class_names=["cat", "dog"], score_thresh=0.5, out_dir=tmp_path / "o")
    with Image.open(tmp_path / "o" / "grey.jpg") as im:
        drawn = torch.from_numpy(np.array(im.convert("RGB"))).float()
    grey = torch.tensor([128.0, 128.0, 128.0])
    assert (drawn[18, 2] - grey).abs().max() > 40  # left edge of the kept box (below its caption)
    # interior of the skipped low-score box (away from the kept boxes) stays grey up to jpeg noise
    assert (drawn[1, 0] - grey).abs().max() < 25


def test_predict_images_writes_the_readable_and_lists_the_unreadable(tmp_path):
    paths = write_images(tmp_path)
    missing = tmp_path / "in" / "missing.jpg"
    broken = tmp_path / "in" / "broken.jpg"
    broken.write_bytes(b"definitely not a jpeg")
    empty = tmp_path / "in" / "empty.png"
    empty.write_bytes(b"")
    truncated = tmp_path / "in" / "truncated.png"
    truncated.write_bytes(paths[0].read_bytes()[:200])
    model = ThreeBoxModel()
    inputs = [missing, paths[0], broken, empty, truncated, paths[1]]
    written = predict_images(model, inputs, class_names=["cat", "dog"], out_dir=tmp_path / "o")
    assert model.seen_shapes == [(3, 48, 64), (3, 56, 40)]  # only the readable images ran
    assert written.drawn == [tmp_path / "o" / "a.jpg", tmp_path / "o" / "b.jpg"]
    assert sorted(p.name for p in (tmp_path / "o").iterdir()) == ["a.jpg", "b.jpg", "predictions.json"]
    assert {d["file_name"] for d in written.detections} == {str(paths[0]), str(paths[1])}
    assert json.loads(written.json_file.read_text()) == written.detections
    assert [file for file, _ in written.failed] == [str(missing), str(broken), str(empty), str(truncated)]
    reasons = dict(written.failed)
    assert reasons[str(missing)] == "file not found"
    assert reasons[str(broken)] == "not a recognised image format"
    assert reasons[str(truncated)].startswith("cannot decode")

    # nothing readable: an empty predictions.json, every input listed
    nothing = predict_images(model, [broken], class_names=["cat"], out_dir=tmp_path / "n")
    assert nothing.detections == [] and json.loads(nothing.json_file.read_text()) == []
    assert len(nothing.failed) == 1
    with pytest.raises(UserInputError, match="score_thresh"):
        predict_images(ThreeBoxModel(), paths, class_names=["cat"], score_thresh=1.5, out_dir=tmp_path / "o")


def test_duplicate_stems_do_not_overwrite(tmp_path):
    (tmp_path / "x").mkdir()
    (tmp_path / "y").mkdir()
    for d in ("x", "y"):
        Image.new("RGB", (16, 16)).save(tmp_path / d / "img.png")
    predict_images(ThreeBoxModel(), [tmp_path / "x" / "img.png", tmp_path / "y" / "img.png"],
                   class_names=["cat", "dog"], out_dir=tmp_path / "o")
    assert sorted(p.name for p in (tmp_path / "o").iterdir()) == ["img.jpg", "img_1.jpg", "predictions.json"]


def test_load_image_tensor_applies_exif_orientation(tmp_path):
    img = Image.new("RGB", (20, 10), (255, 0, 0))
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to display": the displayed image is 10 wide, 20 tall
    path = tmp_path / "rot.jpg"
    img.save(path, exif=exif)
    tensor = load_image_tensor(path)
    assert tensor.shape == (3, 20, 10)
    assert tensor.dtype == torch.float32 and float(tensor[0].mean()) > 0.9


def test_draw_detections_tensor_and_colours():
    image = torch.full((3, 32, 32), 0.5)
    out = draw_detections(image, torch.tensor([[4.0, 4.0, 20.0, 20.0]]), torch.tensor([2]),
                          torch.tensor([0.8]), ["cat", "dog"])
    assert isinstance(out, Image.Image) and out.size == (32, 32)
    assert out.getpixel((4, 25)) == (128, 128, 128)  # outside the box: untouched
    assert out.getpixel((4, 18)) == class_color(2)  # left edge of the box
    assert class_color(1) != class_color(2)
    assert torch.equal(image, torch.full((3, 32, 32), 0.5))  # input untouched
    skipped = draw_detections(image, [[4.0, 4.0, 20.0, 20.0]], [2], [0.1], ["cat", "dog"], score_thresh=0.5)
    assert skipped.getpixel((4, 18)) == (128, 128, 128)
    assert to_pil_image(torch.zeros(1, 5, 7, dtype=torch.uint8)).size == (7, 5)
    with pytest.raises(ValueError, match="labels"):
        draw_detections(image, [[0, 0, 1, 1]], [1, 2], None, None)
