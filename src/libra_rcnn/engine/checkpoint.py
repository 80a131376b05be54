"""Checkpoints: atomic writes, safe (``weights_only``) loads, and model rebuilding.

A checkpoint is a ``dict`` of plain containers and tensors only, so ``torch.load(weights_only=True)``
reads it without unpickling arbitrary objects:

``format``
    :data:`CHECKPOINT_FORMAT`, and ``format_version``.
``model``
    the model's ``state_dict`` (unwrapped from DDP).
``model_config``
    ``ModelConfig`` as a plain dict; :func:`load_model_from_checkpoint` rebuilds the model from it.
``class_names`` / ``label_to_cat_id``
    foreground class names (index ``i`` is label ``i + 1``) and contiguous label -> dataset
    category id.
``optimizer`` / ``scheduler`` / ``scaler``
    their ``state_dict`` s (training checkpoints).
``epoch`` / ``iter_in_epoch`` / ``iteration``
    completed epochs, batches already consumed in the current epoch (non-zero for a mid-epoch
    checkpoint) and optimizer iterations so far.
``rng``
    ``python``/``numpy``/``torch``/``cuda`` generator states (numpy's key as an int64 tensor).
``config``
    the whole experiment config as a plain dict (for the record).
"""

from __future__ import annotations

import dataclasses
import os
import pickle
import random
import re
from pathlib import Path
from typing import Any, Optional, Union

import numpy as np
import torch
from torch import nn

from libra_rcnn.errors import UserInputError
from libra_rcnn.io_utils import atomic_write

__all__ = [
    "CHECKPOINT_FORMAT",
    "CheckpointError",
    "capture_rng_state",
    "restore_rng_state",
    "save_checkpoint",
    "load_checkpoint",
    "read_torch_file",
    "load_model_from_checkpoint",
    "model_config_from_checkpoint",
    "model_from_checkpoint_state",
    "describe_config_mismatch",
]

CHECKPOINT_FORMAT = "libra-rcnn-checkpoint"
FORMAT_VERSION = 1

PathLike = Union[str, os.PathLike]

# ModelConfig fields that change the network's parameters; the rest (score thresholds, NMS,
# input size, sampling, losses) may differ between training and evaluation.
STRUCTURAL_FIELDS = (
    "arch", "convention", "num_classes", "backbone", "norm", "neck", "fpn_channels", "bfp",
    "representation_size", "retina_p6_input", "retina_head_norm",
    # a cascade's stage count and box coders give its weights their meaning
    "cascade",
)


# how torch's weights-only unpickler words a refused Python object (as opposed to plain garbage,
# "Unsupported operand")
_UNSAFE_PICKLE = re.compile(r"unsupported global|unsupported class|reduce|unrecognized function",
                            re.IGNORECASE)


class CheckpointError(UserInputError):
    """A checkpoint cannot be written, read or used. The message starts with the file."""


# ----------------------------------------------------------------------------------------------
# RNG state


def capture_rng_state() -> dict:
    """Python, NumPy, torch CPU and CUDA generator states as plain containers/tensors."""
    np_state = np.random.get_state()
    return {
        "python": random.getstate(),
        "numpy": {
            "kind": np_state[0],
            "key": torch.from_numpy(np_state[1].astype(np.int64)),
            "pos": int(np_state[2]),
            "has_gauss": int(np_state[3]),
            "cached_gaussian": float(np_state[4]),
        },
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }


def _as_tuple(value: Any) -> Any:
    # weights_only loading may give lists where tuples were saved; random.setstate needs tuples
    if isinstance(value, (list, tuple)):
        return tuple(_as_tuple(v) for v in value)
    return value


def restore_rng_state(state: dict) -> None:
    """Inverse of :func:`capture_rng_state` (CUDA states restored when the device count matches)."""
    random.setstate(_as_tuple(state["python"]))
    np_state = state["numpy"]
    np.random.set_state((
        np_state["kind"],
        np_state["key"].numpy().astype(np.uint32),
        int(np_state["pos"]),
        int(np_state["has_gauss"]),
        float(np_state["cached_gaussian"]),
    ))
    torch.set_rng_state(state["torch"])
    cuda_states = state.get("cuda") or []
    if cuda_states and torch.cuda.is_available() and len(cuda_states) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(cuda_states)


# ----------------------------------------------------------------------------------------------
# Save / load


def _serialize(state: dict, fileobj) -> None:
    torch.save(state, fileobj)


def _os_error_reason(exc: BaseException) -> Optional[str]:
    """The ``strerror`` of the first ``OSError`` in ``exc``'s cause/context chain, if any."""
    seen: set[int] = set()
    current: Optional[BaseException] = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, OSError) and current.strerror:
            return current.strerror
        current = current.__cause__ or current.__context__
    return None


def save_checkpoint(path: PathLike, state: dict) -> Path:
    """Write ``state`` to ``path`` atomically (:func:`libra_rcnn.io_utils.atomic_write`): a
    temporary file in the same directory is written, flushed and fsync'ed, then renamed over
    ``path``. On any failure (e.g. a full disk) the temporary file is removed and an existing
    ``path`` is left untouched; the error is re-raised as :class:`CheckpointError` naming the file
    (``KeyboardInterrupt`` and other non-I/O exceptions propagate unchanged).
    """
    path = Path(path)
    try:
        # ``_serialize`` is looked up at call time (tests replace it to simulate failures)
        atomic_write(path, lambda f: _serialize(state, f))
    except (OSError, RuntimeError) as exc:
        # torch's zip writer reports a failed write (e.g. a full disk) as a RuntimeError whose
        # own text is cryptic; the OSError that caused it, if chained, says what happened
        reason = _os_error_reason(exc) or str(exc).splitlines()[0]
        raise CheckpointError(f"{path}: cannot write checkpoint: {reason}") from exc
    return path


def read_torch_file(path: PathLike, map_location: Any = "cpu", *,
                    refused_hint: str = "only weights-only checkpoints are accepted") -> Any:
    """``torch.load(path, weights_only=True)`` with one :class:`CheckpointError` naming the file
    for every way it can fail: missing, a directory, unreadable, empty, truncated, not a PyTorch
    file, or holding pickled Python objects (refused: loading them could run code;
    ``refused_hint`` says what to do instead)."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{path}: no such checkpoint file")
    if path.is_dir():
        raise CheckpointError(f"{path}: is a directory, not a checkpoint file")
    try:
        with open(path, "rb") as f:
            head = f.read(4)
    except OSError as exc:
        raise CheckpointError(f"{path}: cannot read checkpoint: {exc.strerror or exc}") from exc
    if not head:
        raise CheckpointError(f"{path}: empty file, not a checkpoint")
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:  # torch raises UnpicklingError/RuntimeError/OSError/KeyError/...
        if isinstance(exc, pickle.UnpicklingError) and _UNSAFE_PICKLE.search(str(exc)):
            raise CheckpointError(
                f"{path}: refused to load: the file contains pickled Python objects, which could "
                f"run arbitrary code; {refused_hint}") from None
        if head == b"PK\x03\x04":  # a zip (PyTorch's format) that cannot be read to the end
            raise CheckpointError(f"{path}: truncated or corrupted checkpoint") from None
        if isinstance(exc, OSError):
            raise CheckpointError(
                f"{path}: cannot read checkpoint: {exc.strerror or exc}") from exc
        raise CheckpointError(f"{path}: not a PyTorch checkpoint file") from None


def load_checkpoint(path: PathLike, map_location: Any = "cpu") -> dict:
    """Read a checkpoint written by :func:`save_checkpoint` with ``torch.load(weights_only=True)``.

    Raises :class:`CheckpointError` naming the file when :func:`read_torch_file` does, or when it
    is not a libra-rcnn checkpoint.
    """
    path = Path(path)
    state = read_torch_file(path, map_location)
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
        what = "a bare state_dict or another tool's file" if isinstance(state, dict) else \
            type(state).__name__
        raise CheckpointError(f"{path}: not a libra-rcnn checkpoint ({what})")
    if state.get("format_version", 0) > FORMAT_VERSION:
        raise CheckpointError(f"{path}: checkpoint format version {state['format_version']} is "
                              f"newer than this libra-rcnn supports ({FORMAT_VERSION})")
    for key in ("model", "model_config"):
        if key not in state:
            raise CheckpointError(f"{path}: incomplete libra-rcnn checkpoint (no {key!r})")
    return state


# ----------------------------------------------------------------------------------------------
# Model rebuilding


def model_config_from_checkpoint(state: dict, *, path: PathLike = "checkpoint"):
    """The ``ModelConfig`` stored in a loaded checkpoint."""
    from libra_rcnn.checks import dataclass_from_dict
    from libra_rcnn.models import check_model_values
    from libra_rcnn.models.config import ModelConfig

    try:
        return check_model_values(dataclass_from_dict(ModelConfig, state["model_config"]))
    except ValueError as exc:
        raise CheckpointError(f"{path}: stored model config is not valid here: {exc}") from None


def describe_config_mismatch(stored, expected) -> list[str]:
    """``"field: stored != expected"`` for every structural ModelConfig field that differs."""
    differences = []
    for name in STRUCTURAL_FIELDS:
        a, b = getattr(stored, name), getattr(expected, name)
        if dataclasses.is_dataclass(a):
            a, b = dataclasses.asdict(a), dataclasses.asdict(b)
        if a != b:
            differences.append(f"model.{name}: checkpoint has {a!r}, config has {b!r}")
    return differences


def _load_state_into(model: nn.Module, state_dict: dict, path: Path) -> None:
    try:
        model.load_state_dict(state_dict, strict=True)
    except RuntimeError as exc:
        first = str(exc).splitlines()
        detail = " ".join(line.strip() for line in first[:3])
        raise CheckpointError(f"{path}: weights do not fit the model: {detail[:400]}") from None


def load_model_from_checkpoint(
    path: PathLike,
    *,
    expected=None,
    device: Union[str, torch.device] = "cpu",
) -> tuple[nn.Module, dict]:
    """Rebuild the model stored in checkpoint ``path`` and load its weights (eval mode).

    ``expected``: a ``ModelConfig`` the checkpoint must match (e.g. from ``eval CONFIG CKPT``).
    Its structural fields (architecture, backbone, classes, neck, BFP, ...) must equal the stored
    ones, else :class:`CheckpointError` names the file and every mismatch; its test-time settings
    (score threshold, NMS, input size) are the ones used for the returned model.

    Returns ``(model, meta)``: ``meta`` is the checkpoint without the weights and training
    state (``model_config``, ``class_names``, ``label_to_cat_id``, ``epoch``, ``iteration``, ...).
    """
    return model_from_checkpoint_state(load_checkpoint(path), path=path, expected=expected,
                                       device=device)


def model_from_checkpoint_state(
    state: dict,
    *,
    path: PathLike,
    expected=None,
    device: Union[str, torch.device] = "cpu",
) -> tuple[nn.Module, dict]:
    """:func:`load_model_from_checkpoint` for a checkpoint already read with
    :func:`load_checkpoint` (``path`` is only named in errors)."""
    from libra_rcnn.models import build_model

    path = Path(path)
    stored = model_config_from_checkpoint(state, path=path)
    if expected is not None:
        differences = describe_config_mismatch(stored, expected)
        if differences:
            raise CheckpointError(
                f"{path}: checkpoint is from another model: " + "; ".join(differences))
        # weights from the file, every setting from the given config
        model_cfg = dataclasses.replace(expected, backbone_weights=None)
    else:
        model_cfg = dataclasses.replace(stored, backbone_weights=None)  # weights come from the file
    model = build_model(model_cfg)
    _load_state_into(model, state["model"], path)
    model.to(device).eval()
    meta = {k: v for k, v in state.items()
            if k not in ("model", "optimizer", "scheduler", "scaler", "rng")}
    meta["model_config"] = model_cfg
    return model, meta
