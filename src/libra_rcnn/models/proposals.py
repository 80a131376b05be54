"""Precomputed proposals: dump them from an RPN, load them for Fast R-CNN.

File format: ``torch.save`` of a plain ``dict[int, Tensor[K, 5]]`` mapping each image id to
its proposals ``(x1, y1, x2, y2, score)`` in original image coordinates, float32, sorted by
decreasing score. Plain tensors in a plain dict load with ``torch.load(weights_only=True)``,
so reading a proposal file never runs pickled code.
"""

from __future__ import annotations

import os
from typing import Any, Iterable, Mapping, Optional, Sequence, Union

import torch
from torch import Tensor, nn

from ..io_utils import atomic_write
from .mode import eval_mode

__all__ = ["dump_proposals", "load_proposals", "select_proposals"]

PathLike = Union[str, os.PathLike]


def _image_id(target: Mapping[str, Any], where: str) -> int:
    if "image_id" not in target:
        raise ValueError(f"{where}: target has no 'image_id'")
    value = target["image_id"]
    if isinstance(value, Tensor):
        if value.numel() != 1:
            raise ValueError(f"{where}: image_id must hold one value, got shape {tuple(value.shape)}")
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{where}: image_id must be an int, got {value!r}")
    return int(value)


@torch.no_grad()
def dump_proposals(
    model: nn.Module,
    data_loader: Iterable[tuple[Sequence[Tensor], Sequence[Mapping[str, Any]]]],
    path: PathLike,
    *,
    max_per_image: int = 1000,
    device: Optional[Union[str, torch.device]] = None,
) -> dict[int, Tensor]:
    """Run an RPN over a data set and save its proposals.

    Args:
        model: a :class:`~libra_rcnn.models.rpn.LibraRPN` (any model whose inference output is
            ``[{"boxes": Tensor[K, 4], "scores": Tensor[K]}]`` in original coordinates works).
            It runs in eval mode; its previous mode is restored.
        data_loader: yields ``(images, targets)`` batches, each target holding ``"image_id"``
            (int or one-element tensor).
        path: output file (parent directories are created; written atomically).
        max_per_image: keep at most this many proposals per image, best first.
        device: where images go; default: the model's parameters' device.

    Returns:
        The saved ``{image_id: Tensor[K, 5]}`` (float32, CPU).
    """
    if isinstance(max_per_image, bool) or not isinstance(max_per_image, int) or max_per_image < 1:
        raise ValueError(f"max_per_image must be a positive int, got {max_per_image!r}")
    if device is None:
        first = next(model.parameters(), None)
        device = first.device if first is not None else torch.device("cpu")
    table: dict[int, Tensor] = {}
    with eval_mode(model):
        for batch_index, batch in enumerate(data_loader):
            if not isinstance(batch, (tuple, list)) or len(batch) != 2:
                raise ValueError(f"batch {batch_index}: data_loader must yield (images, targets)")
            images, targets = batch
            if len(images) != len(targets):
                raise ValueError(f"batch {batch_index}: {len(images)} images but {len(targets)} targets")
            ids = [_image_id(t, f"batch {batch_index}, image {i}") for i, t in enumerate(targets)]
            outputs = model([img.to(device) for img in images])
            for image_id, output in zip(ids, outputs):
                if image_id in table:
                    raise ValueError(f"batch {batch_index}: image_id {image_id} appears twice")
                scores, order = output["scores"].sort(descending=True)
                boxes = output["boxes"][order]
                rows = torch.cat([boxes, scores[:, None]], dim=1)[:max_per_image]
                table[image_id] = rows.detach().to("cpu", torch.float32).contiguous()

    atomic_write(path, lambda f: torch.save(table, f))
    return table


def load_proposals(path: PathLike) -> dict[int, Tensor]:
    """Load a file written by :func:`dump_proposals` with ``weights_only=True``.

    Raises:
        FileNotFoundError: no such file.
        ValueError: the file is not a ``{int: float Tensor[K, 4 or 5]}`` dict (message names it).
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"proposal file {path!r} does not exist")
    try:
        table = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # unpickling errors come in many types
        raise ValueError(f"proposal file {path!r} could not be loaded with weights_only=True: {err}") from None
    if not isinstance(table, dict):
        raise ValueError(f"proposal file {path!r} must hold a dict {{image_id: Tensor[K, 5]}}, "
                         f"got {type(table).__name__}")
    for key, value in table.items():
        if isinstance(key, bool) or not isinstance(key, int):
            raise ValueError(f"proposal file {path!r}: keys must be int image ids, got {key!r}")
        if not isinstance(value, Tensor) or value.dim() != 2 or value.shape[1] not in (4, 5) \
                or not value.is_floating_point():
            shape = tuple(value.shape) if isinstance(value, Tensor) else type(value).__name__
            raise ValueError(f"proposal file {path!r}: image {key} must map to a float "
                             f"Tensor[K, 5] (or [K, 4]), got {shape}")
    return table


def select_proposals(table: Mapping[int, Tensor], image_ids: Sequence[int], *,
                     max_per_image: Optional[int] = None) -> list[Tensor]:
    """The proposals of ``image_ids`` (best ``max_per_image`` each), ready for
    ``LibraFastRCNN(images, targets, proposals=...)``; ``ValueError`` for an unknown id."""
    selected = []
    for image_id in image_ids:
        key = int(image_id.item()) if isinstance(image_id, Tensor) else int(image_id)
        if key not in table:
            raise ValueError(f"no proposals for image_id {key} in the proposal table "
                             f"({len(table)} images)")
        rows = table[key]
        selected.append(rows if max_per_image is None else rows[:max_per_image])
    return selected
