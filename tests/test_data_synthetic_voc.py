"""Synthetic shapes data and PASCAL VOC conversion."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from libra_rcnn.data import (
    BadAnnotationError,
    CocoDetection,
    check_dataset,
    make_shapes_dataset,
    voc_to_coco,
    write_coco_json,
)

# the fruit photos where benchmarks/accuracy.py looks for them by default, next to the checkout
FRUIT = Path(os.environ.get("LIBRA_RCNN_FRUIT_DIR",
                            Path(__file__).resolve().parents[2] / "shared" / "data" / "fruit"))


# ---------------------------------------------------------------------------- synthetic
@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    out = tmp_path_factory.mktemp("shapes")
    return out, make_shapes_dataset(out, num_train=24, num_val=40, image_size=128, seed=5)


def test_shapes_is_deterministic_per_seed(shapes, tmp_path):
    first_dir, first = shapes
    again = make_shapes_dataset(tmp_path / "again", num_train=24, num_val=40, image_size=128, seed=5)
    other = make_shapes_dataset(tmp_path / "other", num_train=2, num_val=0, image_size=128, seed=6)
    for key in ("train_json", "val_json"):
        assert Path(again[key]).read_bytes() == Path(first[key]).read_bytes()
    for name in ("000000.png", "000013.png"):
        assert (Path(again["train_images"]) / name).read_bytes() == (Path(first["train_images"]) / name).read_bytes()
    assert (Path(other["train_images"]) / "000000.png").read_bytes() != \
        (Path(first["train_images"]) / "000000.png").read_bytes()
    # validation images do not depend on the number of training images
    fewer = make_shapes_dataset(tmp_path / "fewer", num_train=1, num_val=1, image_size=128, seed=5)
    assert (Path(fewer["val_images"]) / "000000.png").read_bytes() == \
        (Path(first["val_images"]) / "000000.png").read_bytes()


def test_shapes_load_through_coco_dataset_with_all_scales(shapes):
    _, paths = shapes
    ds = CocoDetection(paths["val_json"], paths["val_images"], train=False)
    assert len(ds) == 40 and ds.class_names == ["circle", "square", "triangle"]
    report = check_dataset(ds)
    assert report["ok"] and report["readable_images"] == 40
    stats = ds.stats
    assert stats["boxes"] > 40 and stats["clipped_boxes"] == 0 and stats["dropped_degenerate_box"] == 0
    areas = np.array([a["area"] for a in ds.coco.dataset["annotations"]])
    # COCO's absolute ranges, as COCOeval uses them for APs / APm / APl
    assert (areas < 32 ** 2).sum() > 0
    assert ((areas >= 32 ** 2) & (areas < 96 ** 2)).sum() > 0
    assert (areas >= 96 ** 2).sum() > 0
    labels = {a["category_id"] for a in ds.coco.dataset["annotations"]}
    assert labels == {1, 2, 3}
    per_image = [len(ds.coco.getAnnIds(imgIds=[i])) for i in ds.ids]
    assert max(per_image) <= 6
    image, target = ds[0]
    assert image.shape == (3, 128, 128) and target["boxes"].shape[1] == 4
    assert (target["boxes"][:, 2:] > target["boxes"][:, :2]).all()


def test_shapes_boxes_cover_class_coloured_pixels(shapes):
    """The top-most (last drawn, smallest) object of each image is fully visible, so the mean
    colour inside its box must lean towards its class colour."""
    _, paths = shapes
    ds = CocoDetection(paths["train_json"], paths["train_images"], train=False)
    dominant = {1: 0, 2: 1, 3: 2}  # circle red, square green, triangle blue
    checked = 0
    for index in range(len(ds)):
        image, target = ds[index]
        if len(target["boxes"]) == 0:
            continue
        smallest = int(torch.argmin(target["area"]))
        x1, y1, x2, y2 = target["boxes"][smallest].round().int().tolist()
        # the central third of a shape's box is inside the shape for circle, square and triangle
        cx1, cx2 = x1 + (x2 - x1) // 3, x2 - (x2 - x1) // 3
        cy1, cy2 = y1 + (y2 - y1) // 2, y2 - (y2 - y1) // 4
        mean = image[:, cy1:cy2, cx1:cx2].mean(dim=(1, 2))
        assert int(mean.argmax()) == dominant[int(target["labels"][smallest])]
        checked += 1
    assert checked >= 15


def test_shapes_argument_errors(tmp_path):
    with pytest.raises(ValueError, match="classes"):
        make_shapes_dataset(tmp_path, num_train=1, num_val=1, classes=("circle", "hexagon"))
    with pytest.raises(ValueError, match="image_size"):
        make_shapes_dataset(tmp_path, num_train=1, num_val=1, image_size=16)
    with pytest.raises(ValueError, match="num_train"):
        make_shapes_dataset(tmp_path, num_train=-1)


# ---------------------------------------------------------------------------- VOC
def voc_xml(filename, objects, size=None):
    size_xml = "" if size is None else (
        f"<size><width>{size[0]}</width><height>{size[1]}</height><depth>3</depth></size>")
    objs = "".join(
        f"<object><name>{name}</name><difficult>{int(difficult)}</difficult><bndbox>"
        f"<xmin>{x1}</xmin><ymin>{y1}</ymin><xmax>{x2}</xmax><ymax>{y2}</ymax></bndbox></object>"
        for name, (x1, y1, x2, y2), difficult in objects
    )
    return f"<annotation><filename>{filename}</filename>{size_xml}{objs}</annotation>"


@pytest.fixture
def flat_voc(tmp_path):
    folder = tmp_path / "voc"
    folder.mkdir()
    Image.new("RGB", (40, 30), (200, 0, 0)).save(folder / "a.jpg", format="JPEG")
    Image.new("RGB", (50, 20), (0, 200, 0)).save(folder / "b.jpg", format="PNG")  # PNG bytes
    Image.new("RGB", (16, 16)).save(folder / "c.png")
    (folder / "a.xml").write_text(voc_xml("a.jpg", [("cat", (1, 1, 10, 20), False),
                                                    ("dog", (5, 5, 45, 35), True)], size=(40, 30)))
    # size 0x0 in the XML: the real size comes from the image
    (folder / "b.xml").write_text(voc_xml("b.jpg", [("dog", (11, 2, 20, 12), False)], size=(0, 0)))
    # no <size>, and <filename> from another machine: found by the XML's stem instead
    (folder / "c.xml").write_text(voc_xml(r"C:\\data\\elsewhere\\c_old.png", [("cat", (2, 3, 4, 5), False)]))
    return folder


def test_voc_conversion(flat_voc, tmp_path):
    data = voc_to_coco(flat_voc)
    assert [c["name"] for c in data["categories"]] == ["cat", "dog"]
    images = {img["file_name"]: img for img in data["images"]}
    assert sorted(images) == ["a.jpg", "b.jpg", "c.png"]
    assert (images["b.jpg"]["width"], images["b.jpg"]["height"]) == (50, 20)
    assert (images["c.png"]["width"], images["c.png"]["height"]) == (16, 16)
    boxes = [(a["image_id"], a["category_id"], a["bbox"], a["difficult"], a["iscrowd"])
             for a in data["annotations"]]
    assert boxes == [
        (1, 1, [0.0, 0.0, 10.0, 20.0], 0, 0),  # 1-based inclusive 1..10 -> x 0, width 10
        (1, 2, [4.0, 4.0, 36.0, 26.0], 1, 0),  # 5..45 x 5..35 clipped to the 40x30 image
        (2, 2, [10.0, 1.0, 10.0, 11.0], 0, 0),
        (3, 1, [1.0, 2.0, 3.0, 3.0], 0, 0),
    ]
    assert data["info"]["conversion"]["clipped_boxes"] == 1
    assert data["info"]["conversion"]["difficult"] == 1

    crowd = voc_to_coco(flat_voc, difficult_as_crowd=True)
    assert [a["iscrowd"] for a in crowd["annotations"]] == [0, 1, 0, 0]

    ann_file = write_coco_json(data, tmp_path / "out" / "voc.json")
    assert json.loads(Path(ann_file).read_text()) == data
    assert not [p for p in os.listdir(tmp_path / "out") if p.startswith(".tmp")]
    ds = CocoDetection(ann_file, flat_voc, train=True)
    image, target = ds[1]
    assert image.shape == (3, 20, 50)  # the .jpg holding PNG bytes decodes
    torch.testing.assert_close(target["boxes"], torch.tensor([[10.0, 1.0, 20.0, 12.0]]))
    assert check_dataset(ds)["ok"]


def test_voc_unknown_class_names_the_file(flat_voc):
    with pytest.raises(BadAnnotationError, match=r"a\.xml.*unknown class 'dog'"):
        voc_to_coco(flat_voc, class_names=["cat"])
    fixed = voc_to_coco(flat_voc, class_names=["dog", "cat", "bird"])
    assert [c["name"] for c in fixed["categories"]] == ["dog", "cat", "bird"]
    assert fixed["annotations"][0]["category_id"] == 2


def test_voc_malformed_xml_and_unknown_size(tmp_path):
    folder = tmp_path / "bad"
    folder.mkdir()
    (folder / "x.xml").write_text("<annotation><object>")
    with pytest.raises(BadAnnotationError, match=r"x\.xml.*malformed XML"):
        voc_to_coco(folder)
    (folder / "x.xml").write_text(voc_xml("gone.jpg", [("cat", (1, 1, 2, 2), False)], size=(0, 0)))
    with pytest.raises(BadAnnotationError, match=r"x\.xml.*image size unknown"):
        voc_to_coco(folder)


def test_voc_skip_bad_converts_the_rest_and_lists_every_file_left_out(flat_voc):
    good = voc_to_coco(flat_voc, class_names=["cat", "dog"])
    bad = {
        "malformed.xml": "<annotation><object>",
        "no_box.xml": "<annotation><object><name>cat</name></object></annotation>",
        "not_a_number.xml": voc_xml("a.jpg", [("cat", (1, "one", 5, 5), False)], size=(40, 30)),
        "unknown_class.xml": voc_xml("a.jpg", [("bird", (1, 1, 5, 5), False)], size=(40, 30)),
        "no_size.xml": voc_xml("gone.jpg", [("cat", (1, 1, 2, 2), False)]),
    }
    for name, text in bad.items():
        (flat_voc / name).write_text(text)
    with pytest.raises(BadAnnotationError, match=r"malformed\.xml"):
        voc_to_coco(flat_voc, class_names=["cat", "dog"])  # strict unless asked

    data = voc_to_coco(flat_voc, class_names=["cat", "dog"], skip_bad=True)
    assert data["images"] == good["images"] and data["annotations"] == good["annotations"]
    skipped = data["info"]["conversion"]["skipped_files"]
    assert [os.path.basename(s["file"]) for s in skipped] == sorted(bad)
    reasons = {os.path.basename(s["file"]): s["reason"] for s in skipped}
    assert reasons["no_box.xml"] == "<object> 'cat' without <bndbox>"
    assert reasons["not_a_number.xml"] == "<ymin> is 'one', not a number"
    assert reasons["unknown_class.xml"].startswith("unknown class 'bird'")
    assert reasons["no_size.xml"].startswith("image size unknown")
    assert data["info"]["conversion"]["images"] == 3

    only_bad = flat_voc.parent / "only_bad"
    only_bad.mkdir()
    (only_bad / "malformed.xml").write_text(bad["malformed.xml"])
    with pytest.raises(BadAnnotationError, match=r"none of the 1 \.xml files could be converted; "
                                                 r"first: .*malformed\.xml: malformed XML"):
        voc_to_coco(only_bad, skip_bad=True)


def test_voc_release_layout_with_image_set(tmp_path):
    root = tmp_path / "VOC"
    for sub in ("Annotations", "JPEGImages", "ImageSets/Main"):
        (root / sub).mkdir(parents=True)
    for stem in ("0001", "0002"):
        Image.new("RGB", (20, 10)).save(root / "JPEGImages" / f"{stem}.jpg")
        (root / "Annotations" / f"{stem}.xml").write_text(
            voc_xml(f"{stem}.jpg", [("car", (1, 1, 5, 5), False)], size=(20, 10)))
    (root / "ImageSets" / "Main" / "val.txt").write_text("0002\n")
    data = voc_to_coco(root, image_set="val")
    assert [img["file_name"] for img in data["images"]] == ["JPEGImages/0002.jpg"]
    assert len(voc_to_coco(root)["images"]) == 2


@pytest.mark.skipif(not (FRUIT / "train").is_dir(), reason="fruit photos not available")
def test_fruit_photos_convert_and_load(tmp_path):
    data = voc_to_coco(FRUIT / "train")
    assert len(data["images"]) == 240
    assert [c["name"] for c in data["categories"]] == ["apple", "banana", "orange"]
    assert all(img["width"] > 0 and img["height"] > 0 for img in data["images"])
    ann_file = write_coco_json(data, tmp_path / "fruit_train.json")
    ds = CocoDetection(ann_file, FRUIT / "train", train=True)
    # decode the awkward ones: palette, RGBA cut-outs, PNG bytes behind .jpg names
    odd = []
    for index, image_id in enumerate(ds.ids):
        with Image.open(ds.image_path(index)) as img:
            if img.format != "JPEG" or img.mode != "RGB":
                odd.append(index)
    assert odd
    for index in odd[:8]:
        image, target = ds[index]
        assert image.shape[0] == 3 and len(target["boxes"]) > 0
        assert (target["boxes"][:, 2] <= image.shape[2]).all() and (target["boxes"][:, 3] <= image.shape[1]).all()
