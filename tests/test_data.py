"""Data layer: image decoding, COCO dataset validation, transforms, samplers.

Every bad file is generated in ``tmp_path``; expected values are written out by hand.
"""

from __future__ import annotations

import io
import json
import logging
import math
import os

import numpy as np
import pytest
import torch
from torchvision.transforms import v2
from PIL import Image
from torch.utils.data import DistributedSampler, SequentialSampler

from libra_rcnn.data import (
    BadAnnotationError,
    BadImageError,
    CocoDetection,
    DetectionTransforms,
    GroupedBatchSampler,
    aspect_ratio_group_ids,
    build_dataset,
    check_dataset,
    collate_fn,
    ground_truth_coco,
    image_to_tensor,
    load_image,
    read_image_size,
)
from libra_rcnn.data.transforms import build_transforms

EXIF_ORIENTATION = 0x0112


def pixel(image: Image.Image, xy) -> tuple:
    return tuple(int(v) for v in image.getpixel(xy))


# ---------------------------------------------------------------------------- image decoding
def test_missing_file_raises_bad_image_naming_the_file(tmp_path):
    path = tmp_path / "nope.jpg"
    with pytest.raises(BadImageError, match="nope.jpg") as info:
        load_image(path)
    assert isinstance(info.value, ValueError)
    assert info.value.path == str(path) and "not found" in info.value.reason


@pytest.mark.parametrize("fmt", ["JPEG", "PNG"])
def test_truncated_file_raises(tmp_path, fmt):
    noise = np.random.default_rng(0).integers(0, 256, size=(64, 64, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(noise).save(buffer, fmt)
    path = tmp_path / f"cut.{fmt.lower()}"
    path.write_bytes(buffer.getvalue()[: len(buffer.getvalue()) // 2])
    with pytest.raises(BadImageError, match="cut"):
        load_image(path)


def test_garbage_bytes_raise(tmp_path):
    path = tmp_path / "garbage.jpg"
    path.write_bytes(b"this is not an image at all" * 10)
    with pytest.raises(BadImageError, match="garbage.jpg"):
        load_image(path)


def test_grayscale_and_bilevel_become_gray_rgb(tmp_path):
    Image.new("L", (4, 3), 100).save(tmp_path / "g.png")
    image = load_image(tmp_path / "g.png")
    assert image.mode == "RGB" and image.size == (4, 3)
    assert pixel(image, (0, 0)) == (100, 100, 100)
    bilevel = Image.new("1", (4, 3), 0)
    bilevel.putpixel((1, 1), 1)
    bilevel.save(tmp_path / "b.png")
    image = load_image(tmp_path / "b.png")
    assert pixel(image, (0, 0)) == (0, 0, 0) and pixel(image, (1, 1)) == (255, 255, 255)


def test_alpha_is_composited_on_white(tmp_path):
    rgba = Image.new("RGBA", (3, 1))
    rgba.putpixel((0, 0), (10, 20, 30, 0))  # fully transparent: hidden colour must not leak
    rgba.putpixel((1, 0), (10, 20, 30, 255))
    rgba.putpixel((2, 0), (0, 0, 0, 51))  # 20 % black over white: 255 * 0.8 = 204
    rgba.save(tmp_path / "a.png")
    image = load_image(tmp_path / "a.png")
    assert pixel(image, (0, 0)) == (255, 255, 255)
    assert pixel(image, (1, 0)) == (10, 20, 30)
    assert all(abs(v - 204) <= 1 for v in pixel(image, (2, 0)))
    black = load_image(tmp_path / "a.png", alpha_background=(0, 0, 0))
    assert pixel(black, (0, 0)) == (0, 0, 0)

    la = Image.new("LA", (2, 1), (90, 0))
    la.putpixel((1, 0), (90, 255))
    la.save(tmp_path / "la.png")
    loaded = load_image(tmp_path / "la.png")
    assert pixel(loaded, (0, 0)) == (255, 255, 255) and pixel(loaded, (1, 0)) == (90, 90, 90)


def test_palette_with_and_without_transparency(tmp_path):
    palette = [255, 0, 0, 0, 0, 255] + [0] * (256 * 3 - 6)
    image = Image.new("P", (2, 1))
    image.putpalette(palette)
    image.putpixel((0, 0), 0)
    image.putpixel((1, 0), 1)
    image.save(tmp_path / "p.png")
    loaded = load_image(tmp_path / "p.png")
    assert pixel(loaded, (0, 0)) == (255, 0, 0) and pixel(loaded, (1, 0)) == (0, 0, 255)
    image.save(tmp_path / "pt.png", transparency=1)  # palette index 1 is transparent
    loaded = load_image(tmp_path / "pt.png")
    assert pixel(loaded, (0, 0)) == (255, 0, 0) and pixel(loaded, (1, 0)) == (255, 255, 255)


def test_sixteen_bit_scaled_by_full_range_not_clipped(tmp_path):
    values = np.array([[0, 257 * 128, 65535, 1000]], dtype=np.uint16)
    Image.fromarray(values).save(tmp_path / "16.png")
    assert Image.open(tmp_path / "16.png").mode.startswith("I;16")
    loaded = load_image(tmp_path / "16.png")
    # 1000 * 255 / 65535 = 3.89 -> 4; clipping would give 255 for everything >= 255
    assert [pixel(loaded, (x, 0))[0] for x in range(4)] == [0, 128, 255, 4]


def test_int32_and_float_stretched_from_min_to_max(tmp_path):
    # (v - min) * 255 / (max - min): -100 -> 0, -50 -> 63.75 -> 64, 100 -> 255
    Image.fromarray(np.array([[-100, -50, 100]], dtype=np.int32)).save(tmp_path / "i.tif")
    loaded = load_image(tmp_path / "i.tif")
    assert [pixel(loaded, (x, 0))[0] for x in range(3)] == [0, 64, 255]
    Image.fromarray(np.array([[0.5, 0.75, 1.5]], dtype=np.float32)).save(tmp_path / "f.tif")
    loaded = load_image(tmp_path / "f.tif")
    assert [pixel(loaded, (x, 0))[0] for x in range(3)] == [0, 64, 255]


def test_cmyk_converted_to_rgb(tmp_path):
    Image.new("CMYK", (4, 4), (0, 255, 255, 0)).save(tmp_path / "c.tif")  # lossless: exact
    assert pixel(load_image(tmp_path / "c.tif"), (0, 0)) == (255, 0, 0)
    Image.new("CMYK", (16, 16), (255, 0, 255, 0)).save(tmp_path / "c.jpg", quality=95)
    r, g, b = pixel(load_image(tmp_path / "c.jpg"), (8, 8))
    assert r < 20 and g > 235 and b < 20  # pure green, up to JPEG error


def test_jpg_extension_holding_png_bytes_loads(tmp_path):
    Image.new("RGB", (5, 4), (1, 2, 3)).save(tmp_path / "fake.jpg", format="PNG")
    image = load_image(tmp_path / "fake.jpg")
    assert image.size == (5, 4) and pixel(image, (2, 2)) == (1, 2, 3)  # lossless PNG decode


def _exif_rotated_photo(path):
    """40x20 stored image, red block at stored x 0..9, y 0..4, EXIF Orientation 6 (rotate
    90 degrees clockwise to display): displayed 20x40 with the block at x 15..19, y 0..9."""
    image = Image.new("RGB", (40, 20), (0, 0, 0))
    image.paste((255, 0, 0), (0, 0, 10, 5))
    exif = Image.Exif()
    exif[EXIF_ORIENTATION] = 6
    image.save(path, format="JPEG", quality=98, exif=exif)


def test_exif_orientation_applied(tmp_path):
    path = tmp_path / "rot.jpg"
    _exif_rotated_photo(path)
    image = load_image(path)
    assert image.size == (20, 40)
    assert read_image_size(path) == (20, 40)
    red = np.asarray(image)[..., 0] > 128
    ys, xs = np.nonzero(red)
    assert (xs.min(), xs.max(), ys.min(), ys.max()) == (15, 19, 0, 9)


def test_pixel_limit_checked_before_decoding(tmp_path):
    buffer = io.BytesIO()
    Image.new("RGB", (200, 100)).save(buffer, "PNG")
    (tmp_path / "big.png").write_bytes(buffer.getvalue()[:60])  # header only, no pixel data
    with pytest.raises(BadImageError, match="max_pixels"):
        load_image(tmp_path / "big.png", max_pixels=10_000)
    with pytest.raises(ValueError, match="max_pixels"):
        load_image(tmp_path / "big.png", max_pixels=0)


def test_bad_errors_survive_pickling():
    import pickle

    err = pickle.loads(pickle.dumps(BadImageError("/x/y.png", "broken")))
    assert isinstance(err, BadImageError) and err.path == "/x/y.png" and err.reason == "broken"
    assert "/a.json" in str(BadAnnotationError("/a.json", "bad"))


# ---------------------------------------------------------------------------- COCO dataset
def write_coco(tmp_path, *, images=None, annotations=None, categories=None, sizes=None,
               create_images=True):
    """Write a COCO json and (unless ``create_images=False``) a solid-colour PNG per image entry
    (of ``sizes[id]`` or the json size); returns (json path, image root)."""
    root = tmp_path / "images"
    root.mkdir(exist_ok=True)
    if images is None:
        images = [{"id": 1, "file_name": "a.png", "width": 64, "height": 48}]
    for img in images:
        w, h = (sizes or {}).get(img["id"], (img.get("width", 64), img.get("height", 48)))
        target = root / img["file_name"]
        if create_images and target.resolve().is_relative_to(root.resolve()) and not target.exists():
            Image.new("RGB", (w, h), (40, 80, 120)).save(target, format="PNG")
    data = {
        "images": images,
        "annotations": annotations if annotations is not None else [],
        "categories": categories if categories is not None else [{"id": 1, "name": "thing"}],
    }
    ann_file = tmp_path / "ann.json"
    ann_file.write_text(json.dumps(data))
    return ann_file, root


def ann(ann_id, bbox, *, image_id=1, category_id=1, iscrowd=0):
    return {"id": ann_id, "image_id": image_id, "category_id": category_id, "bbox": bbox,
            "area": 1.0, "iscrowd": iscrowd}


def test_malformed_json(tmp_path):
    path = tmp_path / "broken.json"
    path.write_text('{"images": [')
    (tmp_path / "im").mkdir()
    with pytest.raises(BadAnnotationError, match="broken.json.*malformed JSON"):
        CocoDetection(path, tmp_path / "im")


@pytest.mark.parametrize("content, message", [
    ([1, 2, 3], "top level is a list"),
    ({"images": [], "categories": []}, "missing key.*'annotations'"),
    ({"images": {}, "annotations": [], "categories": []}, "'images' must be a list"),
])
def test_json_that_is_not_coco(tmp_path, content, message):
    path = tmp_path / "other.json"
    path.write_text(json.dumps(content))
    (tmp_path / "im").mkdir()
    with pytest.raises(BadAnnotationError, match=f"other.json.*{message}"):
        CocoDetection(path, tmp_path / "im")


def test_duplicate_image_ids(tmp_path):
    images = [{"id": 7, "file_name": "a.png", "width": 8, "height": 8},
              {"id": 7, "file_name": "b.png", "width": 8, "height": 8}]
    ann_file, root = write_coco(tmp_path, images=images)
    with pytest.raises(BadAnnotationError, match=r"duplicate image ids \[7\]"):
        CocoDetection(ann_file, root)


def test_empty_dataset(tmp_path):
    ann_file, root = write_coco(tmp_path, images=[])
    with pytest.raises(BadAnnotationError, match="ann.json.*no images"):
        CocoDetection(ann_file, root)


def test_bad_boxes_dropped_clipped_and_counted(tmp_path):
    annotations = [
        ann(1, [10, 10, 20, 10]),  # fine -> [10, 10, 30, 20]
        ann(2, [5, 5, 0, 10]),  # zero width
        ann(3, [5, 5, 10, -3]),  # negative height
        ann(4, [float("nan"), 5, 10, 10]),  # NaN (json.dumps writes NaN, json.loads reads it)
        ann(5, [100, 100, 5, 5]),  # entirely outside the 64x48 image
        ann(6, [-10, 40, 30, 20]),  # partly outside -> clipped to [0, 40, 20, 48]
        ann(7, [1, 2, 3]),  # malformed
    ]
    ann_file, root = write_coco(tmp_path, annotations=annotations)
    ds = CocoDetection(ann_file, root)
    assert ds.stats["dropped_degenerate_box"] == 2
    assert ds.stats["dropped_invalid_bbox"] == 2
    assert ds.stats["dropped_outside_image"] == 1
    assert ds.stats["clipped_boxes"] == 1
    assert ds.stats["boxes"] == 2
    assert len(ds.problems) == 5 and all(f == str(ann_file) for f, _ in ds.problems)
    image, target = ds[0]
    assert image.shape == (3, 48, 64) and image.dtype == torch.float32
    assert 0.0 <= float(image.min()) and float(image.max()) <= 1.0
    torch.testing.assert_close(target["boxes"], torch.tensor([[10.0, 10, 30, 20], [0, 40, 20, 48]]))
    assert target["labels"].dtype == torch.int64 and target["labels"].tolist() == [1, 1]
    assert target["image_id"] == 1 and target["orig_size"].tolist() == [48, 64]
    # the COCO object, which evaluation scores against, holds the file as it is, less the
    # annotations pycocotools cannot score at all (NaN, malformed)
    assert sorted(ds.coco.anns) == [1, 2, 3, 5, 6]
    assert ds.coco.anns[2]["bbox"] == [5, 5, 0, 10] and ds.coco.anns[6]["bbox"] == [-10, 40, 30, 20]
    with pytest.raises(BadAnnotationError, match="annotation id 2"):
        CocoDetection(ann_file, root, strict=True)


def test_ground_truth_for_scoring_is_the_file_as_it_is():
    data = {
        "images": [{"id": 1, "file_name": "a.png", "width": 64, "height": 48}],
        "categories": [{"id": 1, "name": "c"}],
        "annotations": [
            {"id": 7, "image_id": 1, "category_id": 1, "bbox": [0, 0, -2, 5], "area": 3.5},
            {"image_id": 1, "category_id": 1, "bbox": [200, 1, 2, 2]},  # no id, area, iscrowd
            {"id": 7, "image_id": 1, "category_id": 1, "bbox": [1, 1, 2, 3], "iscrowd": 1},
            {"id": 8, "image_id": 1, "category_id": 99, "bbox": [1, 1, 2, 2]},  # unknown category
            {"id": 9, "image_id": 1, "category_id": 1, "bbox": [1, 1, 2]},  # cannot be scored
            {"id": 10, "image_id": "1", "category_id": 1, "bbox": [1, 1, 2, 2]},  # cannot either
            "not an object",
        ],
    }
    original = json.loads(json.dumps(data))
    coco = ground_truth_coco(data)
    assert data == original  # not modified
    anns = coco.dataset["annotations"]
    assert [a["bbox"] for a in anns] == [[0, 0, -2, 5], [200, 1, 2, 2], [1, 1, 2, 3], [1, 1, 2, 2]]
    assert [a["id"] for a in anns] == [7, 11, 12, 8]  # missing and repeated ids made unique
    assert [a["area"] for a in anns] == [3.5, 4.0, 6.0, 4.0]  # the file's, else the box area
    assert [a["iscrowd"] for a in anns] == [0, 0, 1, 0]
    assert sorted(coco.anns) == [7, 8, 11, 12]


def test_unknown_category_dropped_or_strict_error(tmp_path):
    annotations = [ann(1, [1, 1, 5, 5]), ann(2, [1, 1, 5, 5], category_id=99),
                   ann(3, [1, 1, 5, 5], image_id=42)]
    ann_file, root = write_coco(tmp_path, annotations=annotations)
    ds = CocoDetection(ann_file, root)
    assert ds.stats["dropped_unknown_category"] == 1 and ds.stats["dropped_unknown_image"] == 1
    assert len(ds[0][1]["boxes"]) == 1
    with pytest.raises(BadAnnotationError, match="ann.json.*category_id 99"):
        CocoDetection(ann_file, root, strict=True)


def test_category_mapping_round_trip(tmp_path):
    categories = [{"id": 10, "name": "ten"}, {"id": 3, "name": "three"}, {"id": 7, "name": "seven"}]
    annotations = [ann(1, [0, 0, 4, 4], category_id=10), ann(2, [0, 0, 4, 4], category_id=3)]
    ann_file, root = write_coco(tmp_path, annotations=annotations, categories=categories)
    ds = CocoDetection(ann_file, root)
    assert ds.class_names == ["three", "seven", "ten"] and ds.num_classes == 3
    assert ds.cat_id_to_label == {3: 1, 7: 2, 10: 3}
    assert all(ds.label_to_cat_id[ds.cat_id_to_label[c]] == c for c in (3, 7, 10))
    assert ds[0][1]["labels"].tolist() == [3, 1]


def test_crowd_dropped_in_training_kept_in_eval(tmp_path):
    annotations = [ann(1, [0, 0, 10, 10]), ann(2, [20, 20, 10, 10], iscrowd=1)]
    ann_file, root = write_coco(tmp_path, annotations=annotations)
    _, train_target = CocoDetection(ann_file, root, train=True)[0]
    _, eval_target = CocoDetection(ann_file, root, train=False)[0]
    assert train_target["iscrowd"].tolist() == [0] and len(train_target["boxes"]) == 1
    assert eval_target["iscrowd"].tolist() == [0, 1] and len(eval_target["boxes"]) == 2


@pytest.mark.parametrize("file_name", ["../outside.png", "sub/../../outside.png"])
def test_path_escaping_image_root_refused(tmp_path, file_name):
    Image.new("RGB", (8, 8)).save(tmp_path / "outside.png")
    images = [{"id": 1, "file_name": file_name, "width": 8, "height": 8}]
    ann_file, root = write_coco(tmp_path, images=images)
    with pytest.raises(BadAnnotationError, match="outside image_root"):
        CocoDetection(ann_file, root)
    ds = CocoDetection(ann_file, root, allow_outside_root=True)
    assert ds[0][0].shape == (3, 8, 8)


def test_absolute_path_refused(tmp_path):
    Image.new("RGB", (8, 8)).save(tmp_path / "abs.png")
    images = [{"id": 1, "file_name": str(tmp_path / "abs.png"), "width": 8, "height": 8}]
    ann_file, root = write_coco(tmp_path, images=images)
    with pytest.raises(BadAnnotationError, match="outside image_root"):
        CocoDetection(ann_file, root)


def test_bad_images_skipped_logged_or_raised(tmp_path, caplog):
    images = [{"id": 1, "file_name": "ok.png", "width": 16, "height": 16},
              {"id": 2, "file_name": "missing.png", "width": 16, "height": 16},
              {"id": 3, "file_name": "corrupt.png", "width": 16, "height": 16},
              {"id": 4, "file_name": "huge.png", "width": 16, "height": 16}]
    root = tmp_path / "images"
    root.mkdir()
    Image.new("RGB", (16, 16)).save(root / "ok.png")
    (root / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 30)
    Image.new("RGB", (20, 20)).save(root / "huge.png")  # 400 pixels > max_pixels=300
    ann_file, _ = write_coco(tmp_path, images=images, create_images=False)
    ds = CocoDetection(ann_file, root, max_pixels=300)
    with caplog.at_level(logging.WARNING, logger="libra_rcnn.data.coco"):
        samples = [ds[i] for i in range(len(ds))]
    assert samples[0] is not None and samples[1:] == [None, None, None]
    assert ds.stats["bad_images"] == 3
    logged = caplog.text
    assert "missing.png" in logged and "corrupt.png" in logged and "huge.png" in logged
    images_out, targets_out = collate_fn(samples)
    assert len(images_out) == 1 and targets_out[0]["image_id"] == 1
    assert collate_fn([None, None]) == ((), ())

    strict = CocoDetection(ann_file, root, skip_bad=False)
    with pytest.raises(BadImageError, match="missing.png"):
        strict[1]

    report = check_dataset(ds)
    assert report["images"] == 4 and report["readable_images"] == 1 and report["bad_images"] == 3
    assert not report["ok"]
    assert {os.path.basename(f) for f, _ in report["problems"]} == {"missing.png", "corrupt.png", "huge.png"}


def test_check_dataset_reports_size_mismatch_and_annotation_problems(tmp_path):
    images = [{"id": 1, "file_name": "a.png", "width": 30, "height": 20}]
    ann_file, root = write_coco(tmp_path, images=images, sizes={1: (20, 30)},
                                annotations=[ann(1, [0, 0, 4, 4]), ann(2, [0, 0, 4, 4], category_id=5)])
    report = check_dataset(CocoDetection(ann_file, root))
    reasons = [reason for _, reason in report["problems"]]
    assert report["size_mismatches"] == 1 and len(reasons) == 2
    assert any("category_id 5" in r for r in reasons) and any("30x20" in r for r in reasons)
    (tmp_path / "clean").mkdir()
    clean_file, clean_root = write_coco(tmp_path / "clean", annotations=[ann(1, [0, 0, 4, 4])])
    assert check_dataset(CocoDetection(clean_file, clean_root))["ok"]


def test_exif_rotated_image_boxes_refer_to_displayed_image(tmp_path):
    root = tmp_path / "images"
    root.mkdir()
    _exif_rotated_photo(root / "rot.jpg")
    # the red block as displayed: x 15..19, y 0..9 -> COCO [15, 0, 5, 10] on a 20x40 image
    images = [{"id": 1, "file_name": "rot.jpg", "width": 20, "height": 40}]
    ann_file, _ = write_coco(tmp_path, images=images, annotations=[ann(1, [15, 0, 5, 10])])
    ds = CocoDetection(ann_file, root)
    image, target = ds[0]
    assert image.shape == (3, 40, 20) and ds.stats["size_mismatch"] == 0
    x1, y1, x2, y2 = target["boxes"][0].int().tolist()
    inside = image[:, y1:y2, x1:x2].mean(dim=(1, 2))
    assert inside[0] > 0.9 and inside[1] < 0.1 and inside[2] < 0.1  # the box holds the red block
    assert ds.image_aspect_ratios() == [0.5]


def test_proposals_loaded_and_flipped(tmp_path):
    ann_file, root = write_coco(tmp_path, annotations=[ann(1, [0, 0, 10, 10])])
    proposals = {1: torch.tensor([[2.0, 4.0, 12.0, 14.0, 0.9], [50.0, 0.0, 70.0, 10.0, 0.1]])}
    torch.save(proposals, tmp_path / "props.pt")
    ds = CocoDetection(ann_file, root, proposals_file=tmp_path / "props.pt")
    _, target = ds[0]
    torch.testing.assert_close(target["proposals"], torch.tensor([[2.0, 4, 12, 14], [50, 0, 64, 10]]))
    torch.testing.assert_close(target["proposal_scores"], torch.tensor([0.9, 0.1]))
    flipped = CocoDetection(ann_file, root, proposals_file=tmp_path / "props.pt",
                            transforms=DetectionTransforms([v2.RandomHorizontalFlip(p=1.0)]))
    _, target = flipped[0]
    torch.testing.assert_close(target["proposals"], torch.tensor([[52.0, 4, 62, 14], [0, 0, 14, 10]]))
    torch.testing.assert_close(target["boxes"], torch.tensor([[54.0, 0, 64, 10]]))
    torch.save({1: torch.zeros(3, 7)}, tmp_path / "bad.pt")
    with pytest.raises(BadAnnotationError, match="bad.pt"):
        CocoDetection(ann_file, root, proposals_file=tmp_path / "bad.pt")


def test_constructor_argument_errors(tmp_path):
    ann_file, root = write_coco(tmp_path)
    with pytest.raises(ValueError, match="image_root"):
        CocoDetection(ann_file, tmp_path / "no_such_dir")
    with pytest.raises(ValueError, match="max_pixels"):
        CocoDetection(ann_file, root, max_pixels=-1)
    with pytest.raises(BadAnnotationError, match="file not found"):
        CocoDetection(tmp_path / "none.json", root)


def test_build_dataset_applies_flip_in_training_only(tmp_path):
    ann_file, root = write_coco(tmp_path, annotations=[ann(1, [0, 0, 10, 10])])
    train = build_dataset(ann_file, root, train=True, flip_prob=1.0)
    val = build_dataset(ann_file, root, train=False, flip_prob=1.0)
    assert train[0][1]["boxes"].tolist() == [[54.0, 0.0, 64.0, 10.0]]
    assert val[0][1]["boxes"].tolist() == [[0.0, 0.0, 10.0, 10.0]]


# ---------------------------------------------------------------------------- transforms
def _flip(p):
    return DetectionTransforms([v2.RandomHorizontalFlip(p)])


def test_horizontal_flip_boxes_and_pixels():
    image = torch.zeros(3, 4, 10)
    image[0, :, 1] = 1.0  # column 1 -> column 8 after flipping
    target = {"boxes": torch.tensor([[1.0, 0.0, 3.0, 2.0], [0.0, 1.0, 10.0, 4.0]]),
              "labels": torch.tensor([1, 2])}
    out_image, out_target = _flip(1.0)(image, target)
    assert out_image[0, :, 8].eq(1).all() and out_image[0].sum() == 4
    torch.testing.assert_close(out_target["boxes"], torch.tensor([[7.0, 0, 9, 2], [0, 1, 10, 4]]))
    assert type(out_image) is torch.Tensor and type(out_target["boxes"]) is torch.Tensor
    assert out_target["labels"].tolist() == [1, 2]
    assert target["boxes"][0].tolist() == [1.0, 0.0, 3.0, 2.0]  # input not modified
    same_image, same_target = _flip(0.0)(image, target)
    assert torch.equal(same_image, image) and torch.equal(same_target["boxes"], target["boxes"])
    with pytest.raises(ValueError, match="p"):
        build_transforms(train=True, flip_prob=1.5)


def test_flip_follows_global_seed():
    image, target = torch.zeros(3, 2, 2), {"boxes": torch.tensor([[0.0, 0.0, 1.0, 2.0]])}
    flip = _flip(0.5)

    def pattern():
        return [float(flip(image, target)[1]["boxes"][0, 0]) == 1.0 for _ in range(20)]

    torch.manual_seed(3)
    first = pattern()
    torch.manual_seed(3)
    assert pattern() == first and 0 < sum(first) < 20


def test_resize_keeps_aspect_and_scales_boxes():
    image = torch.rand(3, 50, 100)
    target = {"boxes": torch.tensor([[10.0, 5.0, 50.0, 25.0]]), "area": torch.tensor([800.0])}
    out_image, out_target = build_transforms(train=False, min_size=20, max_size=1000)(image, target)
    assert out_image.shape == (3, 20, 40)
    torch.testing.assert_close(out_target["boxes"], torch.tensor([[4.0, 2.0, 20.0, 10.0]]))
    assert torch.equal(out_target["area"], target["area"])  # the annotation's, as orig_size
    # 40 on the short side would make 80 > 60
    capped, _ = build_transforms(train=False, min_size=40, max_size=60)(image, target)
    assert capped.shape == (3, 30, 60)
    with pytest.raises(ValueError, match="max_size"):
        build_transforms(train=False, min_size=800, max_size=100)


def test_any_v2_transform_moves_boxes_and_proposals_with_the_image():
    # padding 4 px left and right, 2 px top and bottom: every box shifts by (4, 2)
    image = torch.rand(3, 10, 20)
    target = {"boxes": torch.tensor([[1.0, 2.0, 5.0, 6.0]]),
              "proposals": torch.tensor([[0.0, 0.0, 20.0, 10.0], [3.0, 1.0, 4.0, 2.0]]),
              "area": torch.tensor([16.0]), "image_id": 7}
    out_image, out = DetectionTransforms([v2.Pad([4, 2])])(image, target)
    assert out_image.shape == (3, 14, 28) and torch.equal(out_image[:, 2:12, 4:24], image)
    torch.testing.assert_close(out["boxes"], torch.tensor([[5.0, 4.0, 9.0, 8.0]]))
    torch.testing.assert_close(out["proposals"], torch.tensor([[4.0, 2.0, 24.0, 12.0],
                                                               [7.0, 3.0, 8.0, 4.0]]))
    assert out["image_id"] == 7 and torch.equal(out["area"], target["area"])


def test_image_to_tensor():
    image = image_to_tensor(Image.new("RGB", (3, 2), (255, 0, 51)))
    assert image.shape == (3, 2, 3) and image.dtype == torch.float32
    torch.testing.assert_close(image[:, 0, 0], torch.tensor([1.0, 0.0, 0.2]))
    grey = image_to_tensor(Image.new("L", (2, 2), 102))
    assert grey.shape == (3, 2, 2) and torch.allclose(grey, torch.full((3, 2, 2), 0.4))


# ---------------------------------------------------------------------------- samplers
def test_grouped_batch_sampler_groups_and_covers_everything():
    group_ids = [0, 1, 1, 0, 1, 0, 0, 1, 1, 0, 1]
    batcher = GroupedBatchSampler(SequentialSampler(range(11)), group_ids, 2)
    # worked by hand: a group's batch is emitted when it fills; the leftover [9] comes last
    assert list(batcher) == [[1, 2], [0, 3], [5, 6], [4, 7], [8, 10], [9]]
    assert len(batcher) == 6
    # no group ever fills: leftovers of both groups, in sampling order, possibly mixed
    mixed = GroupedBatchSampler(SequentialSampler(range(4)), [0, 1, 0, 1], 3)
    assert list(mixed) == [[0, 1, 2], [3]] and len(mixed) == 2
    dropping = GroupedBatchSampler(SequentialSampler(range(4)), [0, 1, 0, 1], 3, drop_last=True)
    assert list(dropping) == [[0, 1, 2]] and len(dropping) == 1
    with pytest.raises(ValueError, match="batch_size"):
        GroupedBatchSampler(SequentialSampler(range(3)), [0, 0, 0], 0)


def test_grouped_batch_sampler_with_distributed_sampler():
    group_ids = [i % 3 == 0 for i in range(20)]
    seen = []
    for rank in range(2):
        sampler = DistributedSampler(range(20), num_replicas=2, rank=rank, shuffle=True, seed=1)
        batcher = GroupedBatchSampler(sampler, [int(g) for g in group_ids], 3)
        batcher.set_epoch(4)
        batches = list(batcher)
        assert len(batches) == len(batcher) == math.ceil(10 / 3)
        seen += [i for b in batches for i in b]
    assert sorted(seen) == list(range(20))


def test_aspect_ratio_group_ids_from_json(tmp_path):
    images = [{"id": 1, "file_name": "w.png", "width": 30, "height": 20},
              {"id": 2, "file_name": "t.png", "width": 20, "height": 30},
              {"id": 3, "file_name": "s.png", "width": 20, "height": 20}]
    ann_file, root = write_coco(tmp_path, images=images)
    for name in ("w.png", "t.png", "s.png"):
        (root / name).unlink()  # no decoding needed: sizes come from the json
    ds = CocoDetection(ann_file, root)
    assert aspect_ratio_group_ids(ds) == [1, 0, 1]
    assert aspect_ratio_group_ids(torch.utils.data.Subset(ds, [1, 2])) == [0, 1]
