"""mmdetection 3.3 as a reference oracle for the parity tests (test-only; never imported by src/).

Tests that use it compare our functions with mmdetection's own on identical inputs. mmdetection
comes from the ``parity`` extra (``pip install -e .[test,parity]``); the ``mmdet`` fixture of
``tests/conftest.py`` skips a test, naming the reason, only when :func:`import_mmdet` cannot
import it.

mmcv-lite has no compiled ``mmcv._ext``, but ``mmcv.ops`` (which mmdet imports) asserts at import
that hundreds of kernels exist. :func:`import_mmdet` therefore installs a stand-in module, only
when the real one is missing: ``nms`` and ``roi_align_forward`` call torchvision's ops (the two
kernels the Libra detectors run on CPU), every other kernel raises ``NotImplementedError``.

Builders: :func:`build_model` builds a model from one of the Libra configs shipped inside the
mmdet package (no download: the backbone's pretrained ``init_cfg`` is dropped);
:func:`build_libra_cascade_rcnn` composes mmdetection's Cascade R-CNN with its Libra parts;
:func:`randomize_model` gives every weight and norm statistic reproducible, non-trivial values
(mmdetection's init leaves heads near zero and the non-local block's output conv at zero, which
would hide differences); :func:`save_checkpoint` writes an mmdetection-style checkpoint.
"""

from __future__ import annotations

import importlib
import logging
import importlib.util
import os
import sys
import types
from typing import Any, Optional, Sequence

import torch
import torchvision
from torch import nn

__all__ = [
    "SKIP_REASON",
    "LIBRA_CONFIGS",
    "CASCADE_CONFIG",
    "import_mmdet",
    "config_path",
    "load_config",
    "build_model",
    "build_libra_faster_rcnn",
    "build_libra_retinanet",
    "build_libra_cascade_rcnn",
    "randomize_model",
    "save_checkpoint",
    "detector_like",
    "photo_like",
    "mmdet_detections",
    "count_matched",
    "BOX_TOLERANCE",
    "SCORE_TOLERANCE",
    "LOSS_NAMES",
    "training_losses",
]

#: Why an oracle test may be skipped (used as the module-level reason of the parity tests).
SKIP_REASON = (
    "mmdetection parity test: needs mmdet 3.3.0 / mmengine 0.10.7 / mmcv-lite 2.1.0 "
    "(pip install -e .[parity]) as the reference oracle"
)

#: The Libra R-CNN configs of mmdetection 3.3, by (detector, backbone).
LIBRA_CONFIGS = {
    ("faster_rcnn", "r50"): "libra-faster-rcnn_r50_fpn_1x_coco.py",
    ("faster_rcnn", "r101"): "libra-faster-rcnn_r101_fpn_1x_coco.py",
    ("faster_rcnn", "x101-64x4d"): "libra-faster-rcnn_x101-64x4d_fpn_1x_coco.py",
    ("fast_rcnn", "r50"): "libra-fast-rcnn_r50_fpn_1x_coco.py",
    ("retinanet", "r50"): "libra-retinanet_r50_fpn_1x_coco.py",
}

#: mmdetection 3.3's Cascade R-CNN, R-50 (three stages, IoU 0.5 / 0.6 / 0.7).
CASCADE_CONFIG = "cascade_rcnn/cascade-rcnn_r50_fpn_1x_coco.py"

_EXT_NAME = "mmcv._ext"


# --------------------------------------------------------------------------------------------
# the mmcv._ext stand-in


def _nms(boxes: torch.Tensor, scores: torch.Tensor, iou_threshold: float, offset: int = 0):
    if offset != 0:  # mmcv's legacy "+1" box convention; torchvision has none
        raise NotImplementedError("mmcv._ext stand-in: nms with offset != 0")
    return torchvision.ops.nms(boxes, scores, float(iou_threshold))


def _roi_align_forward(input, rois, output, argmax_y, argmax_x, aligned_height, aligned_width,
                       spatial_scale, sampling_ratio, pool_mode, aligned):
    if pool_mode != 1:  # mmcv: 0 = max, 1 = avg; torchvision only averages
        raise NotImplementedError("mmcv._ext stand-in: roi_align with pool_mode 'max'")
    output.copy_(torchvision.ops.roi_align(input, rois, (aligned_height, aligned_width),
                                           spatial_scale, sampling_ratio, aligned))


def _make_ext_stand_in() -> types.ModuleType:
    module = types.ModuleType(_EXT_NAME, "torchvision-backed stand-in for mmcv's compiled ops")
    module.nms = _nms
    module.roi_align_forward = _roi_align_forward

    def __getattr__(name: str):
        # dunder look-ups (inspect, pickle, copy) must fail as for any module
        if name.startswith("__") and name.endswith("__"):
            raise AttributeError(name)

        def missing_kernel(*args, **kwargs):
            raise NotImplementedError(f"mmcv._ext stand-in has no kernel {name!r}")

        missing_kernel.__name__ = name
        return missing_kernel

    module.__getattr__ = __getattr__
    return module


def _install_ext_stand_in() -> None:
    if _EXT_NAME in sys.modules:
        return
    try:
        real = importlib.util.find_spec(_EXT_NAME)
    except ImportError:  # mmcv itself is missing: let the import below report it
        return
    if real is None:
        sys.modules[_EXT_NAME] = _make_ext_stand_in()


# --------------------------------------------------------------------------------------------
# importing and building


_IMPORTED: Optional[types.SimpleNamespace] = None


def import_mmdet() -> types.SimpleNamespace:
    """Import mmdetection for CPU use (once) and register its modules.

    Returns:
        A namespace with ``mmdet``, ``mmengine``, ``mmcv``, ``MODELS``, ``TASK_UTILS`` and
        ``Config``.
    Raises:
        ImportError: naming the missing or incompatible package.
    """
    global _IMPORTED
    if _IMPORTED is not None:
        return _IMPORTED
    for name in ("mmengine", "mmcv", "mmdet"):
        if importlib.util.find_spec(name) is None:
            raise ImportError(f"{name} is not installed ({SKIP_REASON})")
    _install_ext_stand_in()
    try:
        import mmcv
        import mmcv.ops  # noqa: F401  (asserts the kernels exist)
        import mmdet
        import mmengine
        import mmengine.logging
        from mmdet.registry import MODELS, TASK_UTILS
        from mmdet.utils import register_all_modules
        from mmengine.config import Config
    except AssertionError as err:  # mmdet's own mmcv / mmengine version checks
        raise ImportError(f"mmdetection cannot be imported: {err}") from err
    register_all_modules()
    # building a model logs every parameter's init at INFO; only warnings matter here
    mmengine.logging.MMLogger.get_current_instance().setLevel(logging.WARNING)
    _IMPORTED = types.SimpleNamespace(mmdet=mmdet, mmengine=mmengine, mmcv=mmcv, MODELS=MODELS,
                                      TASK_UTILS=TASK_UTILS, Config=Config)
    return _IMPORTED


def config_path(name: str) -> str:
    """Path of a config shipped inside the mmdet package, e.g.
    ``config_path("libra-faster-rcnn_r50_fpn_1x_coco.py")`` (looked up under ``libra_rcnn/``
    unless ``name`` contains a folder)."""
    mm = import_mmdet()
    folder = "" if "/" in name else "libra_rcnn"
    path = os.path.join(os.path.dirname(mm.mmdet.__file__), ".mim", "configs", folder, name)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"mmdetection config {name!r} not found at {path}")
    return path


def load_config(name: str):
    """The ``mmengine.config.Config`` of a shipped config (see :func:`config_path`)."""
    return import_mmdet().Config.fromfile(config_path(name))


def build_model(name: str, *, num_classes: Optional[int] = None, seed: int = 0,
                libra_cascade: bool = False) -> nn.Module:
    """Build and initialise (``init_weights``, seeded, global RNG untouched) the model of a
    shipped config, without downloading pretrained weights; in eval mode. ``libra_cascade``:
    with the Libra parts of :func:`libra_cascade_overrides` (a Cascade R-CNN config only)."""
    mm = import_mmdet()
    cfg = load_config(name)
    cfg.model.backbone.init_cfg = None
    if libra_cascade:
        cfg.merge_from_dict(libra_cascade_overrides(cfg))
    if num_classes is not None:
        head = cfg.model.roi_head.bbox_head if "roi_head" in cfg.model else cfg.model.bbox_head
        for stage_head in head if isinstance(head, list) else [head]:
            stage_head.num_classes = num_classes
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = mm.MODELS.build(cfg.model)
        model.init_weights()
    return model.eval()


def build_libra_faster_rcnn(backbone: str = "r50", **kwargs: Any) -> nn.Module:
    """mmdetection's Libra Faster R-CNN, ``backbone`` in ``"r50"``, ``"r101"``, ``"x101-64x4d"``."""
    return build_model(LIBRA_CONFIGS[("faster_rcnn", backbone)], **kwargs)


def build_libra_retinanet(backbone: str = "r50", **kwargs: Any) -> nn.Module:
    """mmdetection's Libra RetinaNet (R-50 only in mmdetection's configs)."""
    return build_model(LIBRA_CONFIGS[("retinanet", backbone)], **kwargs)


def libra_cascade_overrides(cfg) -> dict:
    """mmdetection's Libra Faster R-CNN parts on its Cascade R-CNN ``cfg`` (no such config ships):
    the FPN followed by the balanced feature pyramid, every stage's sampler instance-balanced
    positives + IoU-balanced negatives and its box loss balanced L1, RPN negatives capped at 5
    per positive (the libra-faster-rcnn config's values)."""
    sampler = dict(type="CombinedSampler", num=512, pos_fraction=0.25, add_gt_as_proposals=True,
                   pos_sampler=dict(type="InstanceBalancedPosSampler"),
                   neg_sampler=dict(type="IoUBalancedNegSampler", floor_thr=-1,
                                    floor_fraction=0, num_bins=3))
    heads = [dict(head, loss_bbox=dict(type="BalancedL1Loss", alpha=0.5, gamma=1.5, beta=1.0,
                                       loss_weight=1.0))
             for head in cfg.model.roi_head.bbox_head]
    stages = [dict(stage, sampler=dict(sampler)) for stage in cfg.model.train_cfg.rcnn]
    return {
        "model.neck": [dict(cfg.model.neck),
                       dict(type="BFP", in_channels=256, num_levels=5, refine_level=2,
                            refine_type="non_local")],
        "model.roi_head.bbox_head": heads,
        "model.train_cfg.rcnn": stages,
        "model.train_cfg.rpn.sampler.neg_pos_ub": 5,
    }


def build_libra_cascade_rcnn(**kwargs: Any) -> nn.Module:
    """mmdetection's Cascade R-CNN R-50 with the Libra parts (:func:`libra_cascade_overrides`)."""
    return build_model(CASCADE_CONFIG, libra_cascade=True, **kwargs)


# --------------------------------------------------------------------------------------------
# randomising and saving


_BATCH_NORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.SyncBatchNorm)


@torch.no_grad()
def randomize_model(model: nn.Module, *, seed: int = 0, image_size: Sequence[int] = (160, 224),
                    batch_size: int = 2) -> nn.Module:
    """Give every weight reproducible random values and set BatchNorm statistics from data.

    Every conv / linear weight is drawn ``N(0, 1 / fan_in)`` and its bias ``N(0, 0.1^2)``
    (heads included, and the non-local block's output conv that mmdetection starts at zero);
    every norm layer's affine weight ``U(0.5, 1.5)`` and bias ``N(0, 0.1^2)``. BatchNorm running
    statistics are then those of one forward pass of ``model.extract_feat`` over a random
    ``[batch_size, 3, *image_size]`` batch, so that features stay of order one in eval mode.
    Uses its own ``torch.Generator``; returns ``model`` (in eval mode).
    """
    gen = torch.Generator().manual_seed(seed)

    def normal_(t: torch.Tensor, std: float) -> None:
        t.copy_(torch.randn(t.shape, generator=gen) * std)

    for module in model.modules():
        if isinstance(module, (nn.Conv2d, nn.Linear)):
            fan_in = module.weight[0].numel()
            normal_(module.weight, fan_in ** -0.5)
            if module.bias is not None:
                normal_(module.bias, 0.1)
        elif isinstance(module, (*_BATCH_NORMS, nn.GroupNorm)) and module.weight is not None:
            module.weight.copy_(torch.rand(module.weight.shape, generator=gen) + 0.5)
            normal_(module.bias, 0.1)

    batch_norms = [m for m in model.modules() if isinstance(m, _BATCH_NORMS)]
    momenta = [m.momentum for m in batch_norms]
    model.eval()
    for m in batch_norms:
        m.reset_running_stats()
        m.momentum = None  # cumulative average: after one batch, exactly its statistics
        m.train()
    model.extract_feat(torch.randn(batch_size, 3, *image_size, generator=gen))
    for m, momentum in zip(batch_norms, momenta):
        m.momentum = momentum
    return model.eval()


def save_checkpoint(model: nn.Module, path: str, *, classes: Sequence[str],
                    style: str = "3.x") -> dict:
    """Save ``model`` as mmdetection does: ``{"state_dict": ..., "meta": {...}}``.

    ``style="2.x"`` writes the 2.x meta (``"CLASSES"``, as the published Libra R-CNN checkpoints),
    ``"3.x"`` the 3.x meta (``"dataset_meta": {"classes": ...}``). Returns the saved dict.
    """
    if style == "2.x":
        meta = {"mmdet_version": "2.28.2", "CLASSES": tuple(classes)}
    elif style == "3.x":
        meta = {"mmengine_version": "0.10.7", "dataset_meta": {"classes": tuple(classes)}}
    else:
        raise ValueError(f"style must be '2.x' or '3.x', got {style!r}")
    checkpoint = {"state_dict": {k: v.detach().clone() for k, v in model.state_dict().items()},
                  "meta": meta}
    torch.save(checkpoint, path)
    return checkpoint


# --------------------------------------------------------------------------------------------
# comparing whole detectors

#: The issue's tolerances for "the same detection": box corners in px, score.
BOX_TOLERANCE = 0.01
SCORE_TOLERANCE = 1e-4


@torch.no_grad()
def detector_like(model: nn.Module, scale: float = 0.02,
                  rcnn_cls_scale: Optional[float] = None) -> nn.Module:
    """Scale the output layers of a :func:`randomize_model` detector down, in place.

    Random output layers saturate: every score 1.0 (ties, ranked arbitrarily) and every box moved
    by many times its size (a clipped sliver). Scaled down, scores spread below 1 and boxes move
    as a trained detector's do, so a comparison sees detections that ties, NMS and clipping have
    not made arbitrary. ``rcnn_cls_scale``: another scale for the R-CNN classifiers (``fc_cls``).
    """
    for name, module in model.named_modules():
        last = name.split(".")[-1]
        if last in ("rpn_reg", "fc_reg", "retina_reg", "rpn_cls", "fc_cls", "retina_cls"):
            factor = rcnn_cls_scale if last == "fc_cls" and rcnn_cls_scale is not None else scale
            module.weight.mul_(factor)
            module.bias.mul_(factor)
    return model


def photo_like(height: int, width: int, seed: int):
    """A uint8 RGB ``[H, W, 3]`` numpy image with structure at several scales (random detectors
    fire unevenly on it)."""
    import numpy as np

    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float64)
    image = np.zeros((height, width, 3))
    for period in (9.0, 37.0, 151.0):
        phase = rng.uniform(0, 6.3, 3)
        image += 40 * np.sin(xx[..., None] / period + phase) * np.cos(yy[..., None] / (1.3 * period))
    image += 127.5 + rng.normal(0, 12, (height, width, 3))
    return np.clip(np.rint(image), 0, 255).astype(np.uint8)


def mmdet_detections(model: nn.Module, rgb) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """mmdetection's test pipeline (keep-ratio resize to 1333 x 800, pack) and ``predict`` on one
    RGB uint8 image: ``(boxes [K, 4], scores [K], labels [K])`` with labels counted from 1."""
    import numpy as np
    from mmdet.datasets.transforms import PackDetInputs, Resize

    results = Resize(scale=(1333, 800), keep_ratio=True)(
        {"img": np.ascontiguousarray(rgb[:, :, ::-1]), "img_shape": rgb.shape[:2],
         "ori_shape": rgb.shape[:2]})
    packed = PackDetInputs(meta_keys=("img_shape", "ori_shape", "scale_factor"))(results)
    data = {"inputs": [packed["inputs"]], "data_samples": [packed["data_samples"]]}
    with torch.no_grad():
        batch = model.data_preprocessor(data, False)
        instances = model(**batch, mode="predict")[0].pred_instances
    return instances.bboxes, instances.scores, instances.labels + 1


def count_matched(ours_boxes, ours_scores, ours_labels, ref_boxes, ref_scores, ref_labels,
                  box_tolerance: float = BOX_TOLERANCE,
                  score_tolerance: float = SCORE_TOLERANCE) -> int:
    """How many reference detections have one of ours with the same label, every box corner
    within ``box_tolerance`` and the score within ``score_tolerance``."""
    count = 0
    for box, score, label in zip(ref_boxes, ref_scores, ref_labels):
        close = ((ours_boxes - box).abs().amax(dim=1) <= box_tolerance) \
            & ((ours_scores - score).abs() <= score_tolerance) & (ours_labels == label)
        count += int(close.any())
    return count


# --------------------------------------------------------------------------------------------
# training losses

#: our loss name -> mmdetection's, per architecture
LOSS_NAMES = {
    "faster_rcnn": {"loss_objectness": "loss_rpn_cls", "loss_rpn_box_reg": "loss_rpn_bbox",
                    "loss_classifier": "loss_cls", "loss_box_reg": "loss_bbox"},
    "retinanet": {"classification": "loss_cls", "bbox_regression": "loss_bbox"},
    "cascade_rcnn": {"loss_objectness": "loss_rpn_cls", "loss_rpn_box_reg": "loss_rpn_bbox",
                     **{f"s{k}.{ours}": f"s{k}.{theirs}" for k in range(3)
                        for ours, theirs in (("loss_classifier", "loss_cls"),
                                             ("loss_box_reg", "loss_bbox"))}},
}


def _loss_batch(seed: int):
    """Two 320 x 480 uint8 RGB images and their boxes and labels (counted from 1)."""
    g = torch.Generator().manual_seed(seed)
    images = [torch.from_numpy(photo_like(320, 480, seed + k)).permute(2, 0, 1) for k in range(2)]
    boxes = [torch.tensor([[30.0, 40.0, 200.0, 230.0], [250.0, 20.0, 460.0, 140.0],
                           [100.0, 150.0, 150.0, 190.0]]),
             torch.tensor([[10.0, 10.0, 300.0, 310.0]])]
    labels = [torch.randint(1, 81, (len(b),), generator=g) for b in boxes]
    return images, boxes, labels


def _mmdet_loss(model: nn.Module, images, boxes, labels) -> dict:
    from mmdet.structures import DetDataSample
    from mmengine.structures import InstanceData

    samples = []
    for image, b, l in zip(images, boxes, labels):
        sample = DetDataSample(metainfo={"img_shape": tuple(image.shape[-2:]),
                                         "ori_shape": tuple(image.shape[-2:]),
                                         "scale_factor": (1.0, 1.0)})
        sample.gt_instances = InstanceData(bboxes=b, labels=l - 1)
        samples.append(sample)
    data = {"inputs": [image.flip(0) for image in images], "data_samples": samples}  # BGR
    with torch.no_grad():
        batch = model.data_preprocessor(data, True)
        losses = model.train().loss(batch["inputs"], batch["data_samples"])
    model.eval()
    return {k: sum(v) if isinstance(v, (list, tuple)) else v for k, v in losses.items()}


def training_losses(mm_model: nn.Module, our_config: str, our_weights: dict, arch: str,
                    seed: int = 5, proposals: Optional[int] = None) -> tuple[dict, dict]:
    """Both detectors' training losses on the same two 320 x 480 images (no resize) with every
    anchor and RoI sampled, so that no random choice is left on either side.

    Args:
        mm_model: mmdetection's model (its samplers are set to sample everything).
        our_config: our config name of the same model; ``our_weights`` its state dict.
        proposals: RPN proposals per training image on both sides (``None``: the configs').

    Returns:
        ``(ours, mmdet's)``: our loss dict and mmdetection's renamed to our names.
    """
    from libra_rcnn.config import load_config as load_our_config
    from libra_rcnn.models import build_model as build_our_model

    overrides = ["model.min_size=320", "model.max_size=480", "model.backbone_weights=null"]
    if arch in ("faster_rcnn", "cascade_rcnn"):
        mm_model.rpn_head.sampler.num = 10**6
        mm_model.rpn_head.sampler.neg_pos_ub = -1
        samplers = mm_model.roi_head.bbox_sampler
        for sampler in samplers if isinstance(samplers, list) else [samplers]:
            sampler.num = 10**6
        overrides += ["model.rpn_batch_size_per_image=1000000", "model.roi_sampler.num=1000000",
                      "model.rpn_neg_pos_ub=-1"]
    if proposals is not None:
        mm_model.train_cfg.rpn_proposal.max_per_img = proposals
        overrides.append(f"model.rpn_post_nms_top_n_train={proposals}")
    ours = build_our_model(load_our_config(our_config, overrides).model)
    ours.load_state_dict(our_weights)
    images, boxes, labels = _loss_batch(seed)
    with torch.no_grad():
        got = ours.train()([image.float() / 255 for image in images],
                           [{"boxes": b, "labels": l} for b, l in zip(boxes, labels)])
    ref = _mmdet_loss(mm_model, images, boxes, labels)
    return got, {ours_name: ref[name] for ours_name, name in LOSS_NAMES[arch].items()}
