"""mmdetection's resize + normalisation (``MMDetTransform``) against mmdetection's own pipeline,
and the pure-torch OpenCV resize against ``cv2.resize``."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from libra_rcnn.models.transform import (
    MMDetTransform,
    mmdet_rescale_size,
    resize_uint8_bilinear,
)
from mmdet_oracle import load_config

# Every test here needs mmdetection (and the OpenCV it installs) as the oracle: without it the
# ``mmdet`` fixture skips them with mmdet_oracle.SKIP_REASON ("pip install -e .[parity]").
pytestmark = pytest.mark.usefixtures("mmdet")

CONFIG = "libra-faster-rcnn_r50_fpn_1x_coco.py"
SIZES = [(480, 640), (333, 500), (800, 1216), (1000, 600)]  # (h, w)


def _image(height: int, width: int, seed: int = 0) -> np.ndarray:
    """A uint8 RGB ``[H, W, 3]`` image with smooth regions and noise (both rounding regimes)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width]
    smooth = 127.5 + 120 * np.sin(xx[..., None] / (7.0 + np.arange(3)) + yy[..., None] / 11.0)
    noisy = smooth + rng.normal(0, 25, (height, width, 3))
    return np.clip(np.rint(noisy), 0, 255).astype(np.uint8)


def _as_input(rgb: np.ndarray) -> torch.Tensor:
    """Our detectors' input: float32 ``[3, H, W]`` in [0, 1] (values k / 255)."""
    return torch.from_numpy(rgb).permute(2, 0, 1).float() / 255


# --------------------------------------------------------------------------------------------
# the OpenCV resize


def _random_shapes(count: int, seed: int, largest: int):
    rng = np.random.default_rng(seed)
    return [tuple(int(v) for v in rng.integers(1, largest, 4)) for _ in range(count)]


SPECIAL_SHAPES = [
    (480, 640, 800, 1067), (333, 500, 800, 1201),  # mmdetection's up-scaling
    (100, 100, 50, 50), (64, 96, 32, 48),  # exact halves (OpenCV's area shortcut)
    (101, 99, 50, 50), (7, 5, 7, 5), (1, 1, 4, 6), (5, 7, 1, 1), (1, 50, 3, 10), (50, 1, 10, 3),
    (20, 30, 61, 91), (300, 200, 97, 41),
]


@pytest.mark.parametrize("in_h,in_w,out_h,out_w",
                         SPECIAL_SHAPES + _random_shapes(120, seed=0, largest=160))
def test_resize_is_opencv_bit_for_bit(in_h, in_w, out_h, out_w):
    import cv2

    rgb = _image(in_h, in_w, seed=in_h * 1000 + in_w)
    expected = cv2.resize(rgb, (out_w, out_h), interpolation=cv2.INTER_LINEAR)
    ours = resize_uint8_bilinear(torch.from_numpy(rgb).permute(2, 0, 1), (out_h, out_w))
    assert ours.dtype == torch.uint8
    assert np.array_equal(ours.permute(1, 2, 0).numpy(), expected.reshape(out_h, out_w, 3))


def test_resize_is_not_torch_bilinear():
    """The same image through torch's float bilinear differs (what this module exists for)."""
    rgb = torch.from_numpy(_image(333, 500)).permute(2, 0, 1)
    ours = resize_uint8_bilinear(rgb, (800, 1201))
    theirs = torch.nn.functional.interpolate(rgb[None].float(), size=(800, 1201), mode="bilinear",
                                             align_corners=False)[0].round().to(torch.uint8)
    assert not torch.equal(ours, theirs)


# --------------------------------------------------------------------------------------------
# the whole transform against mmdetection's pipeline


def _mmdet_transforms(pipeline_key: str):
    from mmdet.registry import TRANSFORMS

    steps = getattr(load_config(CONFIG), pipeline_key)
    return {step["type"]: TRANSFORMS.build(step) for step in steps
            if step["type"] in ("Resize", "PackDetInputs")}


def _mmdet_batch(images_rgb: list[np.ndarray]):
    """mmdetection's test pipeline (Resize, PackDetInputs) + its DetDataPreprocessor."""
    from mmdet.registry import MODELS

    transforms = _mmdet_transforms("test_pipeline")
    packed = []
    for index, rgb in enumerate(images_rgb):
        results = {"img": np.ascontiguousarray(rgb[..., ::-1]),  # LoadImageFromFile gives BGR
                   "img_shape": rgb.shape[:2], "ori_shape": rgb.shape[:2], "img_id": index,
                   "img_path": f"{index}.jpg"}
        packed.append(transforms["PackDetInputs"](transforms["Resize"](results)))
    preprocessor = MODELS.build(load_config(CONFIG).model.data_preprocessor)
    batch = preprocessor({"inputs": [p["inputs"] for p in packed],
                          "data_samples": [p["data_samples"] for p in packed]}, training=False)
    return batch["inputs"], [sample.metainfo for sample in batch["data_samples"]]


@pytest.mark.parametrize("height,width", SIZES)
def test_single_image_equals_mmdetection(height, width):
    rgb = _image(height, width)
    expected, (meta,) = _mmdet_batch([rgb])
    images, _ = MMDetTransform(800, 1333).eval()([_as_input(rgb)])
    assert images.image_sizes == [tuple(meta["img_shape"])]
    assert torch.equal(images.tensors, expected)
    new_h, new_w = images.image_sizes[0]
    assert (new_w / width, new_h / height) == tuple(meta["scale_factor"])


def test_batch_padding_equals_mmdetection():
    rgbs = [_image(h, w, seed=i) for i, (h, w) in enumerate(SIZES)]
    expected, metas = _mmdet_batch(rgbs)
    images, _ = MMDetTransform(800, 1333).eval()([_as_input(rgb) for rgb in rgbs])
    assert images.tensors.shape == expected.shape
    assert tuple(images.tensors.shape[-2:]) == tuple(metas[0]["batch_input_shape"])
    assert images.image_sizes == [tuple(m["img_shape"]) for m in metas]
    assert torch.equal(images.tensors, expected)


def test_rescale_size_equals_mmcv():
    from mmcv.image import rescale_size

    rng = np.random.default_rng(0)
    shapes = [(int(h), int(w)) for h, w in rng.integers(1, 3000, (500, 2))] + SIZES
    for height, width in shapes:
        new_w, new_h = rescale_size((width, height), (1333, 800))
        assert mmdet_rescale_size(height, width, 800, 1333) == (new_h, new_w)


def _boxes(height: int, width: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    xy = torch.rand(20, 2, generator=g) * torch.tensor([width - 10.0, height - 10.0])
    boxes = torch.cat([xy, xy + 1 + torch.rand(20, 2, generator=g) * 300], dim=1)
    boxes = torch.minimum(boxes, torch.tensor([width, height] * 2, dtype=torch.float32))
    boxes[0] = torch.tensor([0.0, 0.0, width, height])  # the whole image, on the border
    return boxes


@pytest.mark.parametrize("height,width", SIZES)
def test_training_boxes_equal_mmdetection_resize(height, width):
    from mmdet.structures.bbox import HorizontalBoxes

    rgb = _image(height, width)
    boxes = _boxes(height, width)
    results = {"img": rgb, "img_shape": (height, width), "ori_shape": (height, width),
               "gt_bboxes": HorizontalBoxes(boxes.clone())}
    expected = _mmdet_transforms("train_pipeline")["Resize"](results)
    transform = MMDetTransform(800, 1333).train()
    images, targets = transform([_as_input(rgb)], [{"boxes": boxes.clone(),
                                                    "labels": torch.ones(20, dtype=torch.int64)}])
    assert images.image_sizes == [tuple(expected["img_shape"])]
    assert torch.equal(targets[0]["boxes"], expected["gt_bboxes"].tensor)


@pytest.mark.parametrize("height,width", SIZES)
def test_postprocess_equals_mmdetection_scale_boxes(height, width):
    from mmdet.structures.bbox import scale_boxes

    new_h, new_w = mmdet_rescale_size(height, width, 800, 1333)
    scale_factor = (new_w / width, new_h / height)
    predictions = _boxes(new_h, new_w, seed=1)
    expected = scale_boxes(predictions.clone(), [1 / s for s in scale_factor])
    result = MMDetTransform(800, 1333).eval().postprocess(
        [{"boxes": predictions.clone()}], [(new_h, new_w)], [(height, width)])
    assert torch.equal(result[0]["boxes"], expected)
