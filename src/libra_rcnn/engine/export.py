"""Export detectors to ONNX with stock tools and run the exported files with onnxruntime.

The exporter is torch.onnx's TorchScript-based one (``torch.onnx.export(..., dynamo=False)``,
deprecated since torch 2.9 but still shipped): it traces the model once and keeps the image's
height and width, and every size computed from them, as run-time values.

The ``torch.export``-based exporter (``dynamo=True``) cannot export these detectors with a
dynamic image size. The Libra parts are not what stops it (the balanced feature pyramid exports
with ``torch.export`` too, see its export path); torchvision's detection code is:

* ``GeneralizedRCNNTransform`` computes the resized and padded size with Python floats and
  ``int(math.ceil(...))``, which ``torch.export`` turns into guards: the program accepts only
  images that resize to the example's size ("Guard failed: ... == 80");
* ``torchvision.ops.batched_nms`` branches on ``boxes.numel() == 0`` for the boxes left after
  score thresholding, a data-dependent size (``GuardOnDataDependentSymNode``);
* ``MultiScaleRoIAlign`` takes ``len(rois)`` of the proposals NMS kept (data-dependent too).

The ONNX graph of every detector takes one image and returns its detections:

========  =============================  ==============================================
name      type and shape                 meaning
========  =============================  ==============================================
image     float32 ``[3, H, W]``          RGB in 0..1, any ``H, W`` (the model resizes)
boxes     float32 ``[N, 4]``             ``(x1, y1, x2, y2)`` in the input's pixels
labels    int64 ``[N]``                  class label (Faster R-CNN, RetinaNet only)
scores    float32 ``[N]``                detection score / objectness, highest first
========  =============================  ==============================================

Two parts of the model are traced through export paths that compute the same values with
traceable operations: the balanced feature pyramid's rescaling
(:mod:`libra_rcnn.ops.balanced_feature_pyramid`, whenever tracing or exporting) and the input
resize of torchvision's ``GeneralizedRCNNTransform`` (:func:`traceable_resize`, swapped in for
the export only). onnx, onnxruntime and onnxscript come with ``pip install "libra-rcnn[export]"``.
"""

from __future__ import annotations

import contextlib
import importlib
import inspect
import io
import os
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Optional, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.models.detection.transform import GeneralizedRCNNTransform

from ..errors import UserInputError
from ..io_utils import atomic_write_bytes
from ..models.cascade import LibraCascadeRCNN
from ..models.faster_rcnn import LibraFasterRCNN
from ..models.mode import eval_mode
from ..models.retinanet import LibraRetinaNet
from ..models.transform import MMDetTransform, keep_ratio_scale
from ..models.rpn import LibraRPN

__all__ = [
    "DEFAULT_OPSET",
    "ExportDependencyError",
    "ExportError",
    "OnnxDetector",
    "SingleImageDetector",
    "compare_detections",
    "export_checkpoint",
    "export_onnx",
    "output_names",
    "traceable_resize",
]

PathLike = Union[str, os.PathLike]
DEFAULT_OPSET = 17
EXPORTABLE = (LibraFasterRCNN, LibraCascadeRCNN, LibraRetinaNet, LibraRPN)
# tracing needs one example; its values and size do not enter the graph
EXAMPLE_SIZE = (480, 640)


class ExportDependencyError(ImportError):
    """onnx or onnxruntime is not installed."""


class ExportError(UserInputError):
    """The model, its transform or an export setting cannot be exported; the message says why."""


def _import_extra(module: str) -> Any:
    try:
        return importlib.import_module(module)
    except ImportError:
        raise ExportDependencyError(
            f"{module} is not installed; ONNX export and inference need the 'export' extra: "
            f"pip install \"libra-rcnn[export]\"") from None


def output_names(model: nn.Module) -> tuple[str, ...]:
    """The ONNX outputs of ``model``: ``("boxes", "scores")`` for an RPN, else
    ``("boxes", "labels", "scores")``."""
    return ("boxes", "scores") if isinstance(model, LibraRPN) else ("boxes", "labels", "scores")


class SingleImageDetector(nn.Module):
    """The signature of the exported graph: one ``[3, H, W]`` image in, a tuple of tensors out.

    ``forward(image) -> (boxes, labels, scores)`` (``(boxes, scores)`` for an RPN): the detector's
    inference output for ``[image]``, in :func:`output_names` order.
    """

    def __init__(self, detector: nn.Module) -> None:
        super().__init__()
        self.detector = detector
        self.names = output_names(detector)

    def forward(self, image: Tensor) -> tuple[Tensor, ...]:
        detections = self.detector([image])[0]
        return tuple(detections[name] for name in self.names)


def traceable_resize(transform: GeneralizedRCNNTransform, image: Tensor,
                     target: Optional[dict[str, Tensor]] = None
                     ) -> tuple[Tensor, Optional[dict[str, Tensor]]]:
    """``transform.resize`` at inference, with the output size computed in float64 as PyTorch
    computes it eagerly.

    torchvision's traced resize takes the scale in float32, so the exported graph can make an
    image one pixel smaller than PyTorch does (a 61-pixel side scaled to 64 gives
    ``61 * fp32(64 / 61) = 63.999996``, floored to 63). Here ``floor(side * scale)`` is taken
    in float64, as ``F.interpolate`` does with a Python float scale.

    Args:
        transform: an eval-mode ``GeneralizedRCNNTransform`` without ``fixed_size``.
        image: ``[C, H, W]``.
        target: must be ``None`` (inference).

    Returns:
        ``(image resized to [C, h, w], None)``.
    """
    if target is not None or transform.training or transform.fixed_size is not None:
        raise ValueError("traceable_resize handles inference without fixed_size only")
    sides, scale = keep_ratio_scale(image, transform.min_size[-1], transform.max_size)
    size = (sides * scale).floor().to(torch.int64)
    resized = F.interpolate(image[None], size=(size[0], size[1]), mode="bilinear",
                            align_corners=False)
    return resized[0], None


@contextlib.contextmanager
def _traceable_transform(detector: nn.Module) -> Iterator[None]:
    """Route ``detector.transform.resize`` through :func:`traceable_resize` for the block
    (mmdetection's transform traces as it is: it computes its sizes with tensor operations)."""
    transform = detector.transform
    if type(transform) is MMDetTransform:
        yield
        return
    if type(transform) is not GeneralizedRCNNTransform or transform.fixed_size is not None:
        raise ExportError(f"cannot export a detector whose transform is "
                         f"{type(transform).__name__} (fixed_size={transform.fixed_size}); "
                         f"torchvision's GeneralizedRCNNTransform without fixed_size is supported")
    transform.resize = lambda image, target=None: traceable_resize(transform, image, target)
    try:
        yield
    finally:
        del transform.resize


# torch.onnx.export's TorchScript-based exporter: the default before torch 2.9 (which has no
# `dynamo` argument before 2.5), selected with dynamo=False since
_TORCHSCRIPT_EXPORTER = (
    {"dynamo": False} if "dynamo" in inspect.signature(torch.onnx.export).parameters else {})


def _ignore_tracing_warnings() -> None:
    """Silence the warnings every export of these models gives, none of which applies."""
    # a Python bool evaluated while tracing (input checks, torchvision's shape asserts): the
    # graph does not depend on them
    warnings.simplefilter("ignore", torch.jit.TracerWarning)
    # torchvision's box resizing and clipping build tensors from traced sizes
    warnings.filterwarnings("ignore", message="To copy construct from a tensor")
    # the RPN's indices come from topk, never negative
    warnings.filterwarnings("ignore", message="Exporting aten::index operator of advanced indexing")
    # torchvision's ops script helper functions while tracing
    warnings.filterwarnings("ignore", message="`torch.jit.script` is deprecated")


def _check_exportable(model: nn.Module) -> None:
    if not isinstance(model, EXPORTABLE):
        names = ", ".join(cls.__name__ for cls in EXPORTABLE)
        raise ExportError(f"cannot export a {type(model).__name__}: ONNX export supports {names} "
                         f"(Fast R-CNN needs proposals from another model)")


def export_onnx(model: nn.Module, path: PathLike, *, opset: int = DEFAULT_OPSET,
                example_size: tuple[int, int] = EXAMPLE_SIZE) -> Path:
    """Write ``model`` (Libra Faster R-CNN, Cascade R-CNN, RetinaNet or RPN) as an ONNX file.

    Args:
        model: built by :func:`libra_rcnn.models.build_model` (weights loaded); it is traced in
            eval mode and its mode is restored afterwards.
        path: the ``.onnx`` file (parent folders are created; written atomically).
        opset: ONNX opset (>= 16: torchvision's RoIAlign needs it).
        example_size: ``(H, W)`` of the random image the tracer runs once.

    Returns:
        ``path``. The graph's input and outputs are described in the module docstring; its
        height and width are dynamic.

    Raises:
        ExportError: a model or transform that cannot be exported, or an opset below 16 (a
            ``ValueError``, shown as one line by the command line).
    """
    _check_exportable(model)
    if isinstance(opset, bool) or not isinstance(opset, int) or opset < 16:
        raise ExportError(f"opset must be an int >= 16, got {opset!r}")
    onnx = _import_extra("onnx")
    names = output_names(model)
    wrapper = SingleImageDetector(model).eval()
    device = next(model.parameters()).device
    example = torch.rand(3, *example_size, generator=torch.Generator().manual_seed(0)).to(device)
    dynamic_axes = {"image": {1: "height", 2: "width"}}
    dynamic_axes.update({name: {0: "detections"} for name in names})
    buffer = io.BytesIO()  # the file is written once, atomically, after a successful export
    with eval_mode(model), _traceable_transform(model), torch.no_grad(), warnings.catch_warnings():
        _ignore_tracing_warnings()
        torch.onnx.export(wrapper, (example,), buffer, opset_version=opset, input_names=["image"],
                          output_names=list(names), dynamic_axes=dynamic_axes,
                          **_TORCHSCRIPT_EXPORTER)
    data = buffer.getvalue()
    onnx.checker.check_model(onnx.load_from_string(data))
    return atomic_write_bytes(path, data)


def export_checkpoint(checkpoint: PathLike, path: PathLike, *, opset: int = DEFAULT_OPSET
                      ) -> tuple[Path, dict[str, Any]]:
    """Rebuild the model of a libra-rcnn checkpoint and export it (:func:`export_onnx`).

    Returns ``(path, meta)`` with the checkpoint's ``meta`` (``model_config``, ``class_names``...).
    Raises :class:`~libra_rcnn.engine.checkpoint.CheckpointError` for an unusable checkpoint.
    """
    from .checkpoint import load_model_from_checkpoint

    model, meta = load_model_from_checkpoint(checkpoint)
    return export_onnx(model, path, opset=opset), meta


class OnnxDetector:
    """An exported detector in onnxruntime, called like the PyTorch model on one image.

    Args:
        path: a file written by :func:`export_onnx`.
        threads: onnxruntime's intra-op threads (``None``: its default).

    ``detector(image)``: ``image`` a float ``Tensor[3, H, W]`` in 0..1; returns
    ``{"boxes", "labels", "scores"}`` (``{"boxes", "scores"}`` for an RPN) as tensors.
    """

    def __init__(self, path: PathLike, *, threads: Optional[int] = None) -> None:
        onnxruntime = _import_extra("onnxruntime")
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"{path}: no such ONNX file")
        options = onnxruntime.SessionOptions()
        if threads is not None:
            options.intra_op_num_threads = threads
        try:
            self.session = onnxruntime.InferenceSession(str(path), options,
                                                        providers=["CPUExecutionProvider"])
        except Exception as exc:  # onnxruntime raises its own error types for bad files
            raise ExportError(f"{path}: onnxruntime cannot load it: {exc}") from None
        self.output_names = tuple(output.name for output in self.session.get_outputs())

    def __call__(self, image: Tensor) -> dict[str, Tensor]:
        if not isinstance(image, Tensor) or image.dim() != 3 or image.shape[0] != 3:
            shape = tuple(image.shape) if isinstance(image, Tensor) else type(image).__name__
            raise ValueError(f"image must be a Tensor[3, H, W], got {shape}")
        if not image.is_floating_point():
            raise ValueError(f"image must be a float tensor in 0..1, got dtype {image.dtype}")
        array = image.detach().to("cpu", torch.float32).contiguous().numpy()
        outputs = self.session.run(None, {"image": array})
        return {name: torch.from_numpy(value) for name, value in zip(self.output_names, outputs)}


def compare_detections(expected: dict[str, Tensor], actual: dict[str, Tensor], *,
                       box_tol: float = 1e-2, score_tol: float = 1e-4) -> dict[str, Any]:
    """Match two detectors' outputs for one image one to one.

    A detection of ``expected`` matches an unmatched one of ``actual`` with the same label (when
    there are labels), every box coordinate within ``box_tol`` pixels and the score within
    ``score_tol``; among several, the closest box. The order of the two lists does not matter
    (detections with equal scores may come in either order).

    Args:
        expected, actual: ``{"boxes": [N, 4], "scores": [N], "labels": [N] (optional)}``.

    Returns:
        ``{"expected": N, "actual": M, "matched": K, "agree": N == M == K,
        "max_box_diff": ..., "max_score_diff": ...}`` (maxima over the matched pairs, 0.0 when
        none).
    """
    boxes_e, boxes_a = expected["boxes"].double(), actual["boxes"].double()
    box_diff = (boxes_e[:, None, :] - boxes_a[None, :, :]).abs().amax(dim=2)  # [N, M]
    score_diff = (expected["scores"].double()[:, None] - actual["scores"].double()[None, :]).abs()
    candidates = (box_diff <= box_tol) & (score_diff <= score_tol)
    if "labels" in expected:
        candidates &= expected["labels"][:, None] == actual["labels"][None, :]
    taken = torch.zeros(boxes_a.shape[0], dtype=torch.bool)
    pairs = []
    for row in range(boxes_e.shape[0]):
        allowed = candidates[row] & ~taken
        if allowed.any():
            column = int(torch.where(allowed, box_diff[row], torch.inf).argmin())
            taken[column] = True
            pairs.append((row, column))
    rows = torch.tensor([r for r, _ in pairs], dtype=torch.int64)
    columns = torch.tensor([c for _, c in pairs], dtype=torch.int64)
    matched_box = box_diff[rows, columns]
    matched_score = score_diff[rows, columns]
    n, m, k = boxes_e.shape[0], boxes_a.shape[0], len(pairs)
    return {
        "expected": n, "actual": m, "matched": k, "agree": n == m == k,
        "max_box_diff": float(matched_box.max()) if k else 0.0,
        "max_score_diff": float(matched_score.max()) if k else 0.0,
    }
