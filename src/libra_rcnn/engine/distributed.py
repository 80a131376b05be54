"""Distributed data-parallel helpers (``torchrun``): process-group set-up, rank queries, reductions.

Launch with ``torchrun --nproc_per_node N -m libra_rcnn train CONFIG``; torchrun sets ``RANK``,
``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR`` and ``MASTER_PORT``. Without them everything here
degrades to the single-process case (rank 0 of 1), so the trainer calls these unconditionally.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta
from typing import Mapping, Optional

import torch
import torch.distributed as dist

from libra_rcnn.errors import UserInputError

__all__ = [
    "DistInfo",
    "init_distributed",
    "cleanup_distributed",
    "is_distributed",
    "get_rank",
    "get_world_size",
    "is_main_process",
    "barrier",
    "reduce_loss_dict",
    "all_reduce_max",
    "all_reduce_sum",
    "seed_for_rank",
]


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    # whether this call created the process group (and so must destroy it)
    owns_group: bool = False

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def _env_int(name: str, default: int) -> int:
    raw = os.environ.get(name)
    if raw is None or raw == "":
        return default
    try:
        return int(raw)
    except ValueError:
        raise UserInputError(f"environment variable {name} must be an integer, got {raw!r}") \
            from None


def init_distributed(device_type: Optional[str] = None, *, timeout_s: float = 1800.0) -> DistInfo:
    """Join the process group described by torchrun's environment variables.

    ``device_type``: ``"cuda"`` selects the NCCL backend (and the GPU ``LOCAL_RANK``), anything else
    gloo; ``None`` picks ``"cuda"`` when available. Without ``WORLD_SIZE > 1`` nothing is
    initialised. An existing process group is reused.
    """
    world_size = _env_int("WORLD_SIZE", 1)
    rank = _env_int("RANK", 0)
    local_rank = _env_int("LOCAL_RANK", 0)
    if dist.is_available() and dist.is_initialized():
        return DistInfo(dist.get_rank(), dist.get_world_size(), local_rank, owns_group=False)
    if world_size <= 1:
        return DistInfo(0, 1, 0, owns_group=False)
    if not dist.is_available():
        raise RuntimeError("WORLD_SIZE > 1 but this PyTorch build has no torch.distributed")
    if device_type is None:
        device_type = "cuda" if torch.cuda.is_available() else "cpu"
    if device_type == "cuda":
        torch.cuda.set_device(local_rank)
        backend = "nccl"
    else:
        backend = "gloo"
    dist.init_process_group(backend=backend, rank=rank, world_size=world_size,
                            timeout=timedelta(seconds=timeout_s))
    return DistInfo(rank, world_size, local_rank, owns_group=True)


def cleanup_distributed(info: Optional[DistInfo] = None) -> None:
    """Destroy the process group if ``info`` says this process created it (or, with no ``info``,
    if one exists)."""
    if not (dist.is_available() and dist.is_initialized()):
        return
    if info is None or info.owns_group:
        dist.destroy_process_group()


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def get_rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def get_world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def is_main_process() -> bool:
    return get_rank() == 0


def barrier() -> None:
    if is_distributed():
        dist.barrier()


def _reduction_device() -> torch.device:
    # NCCL reduces CUDA tensors only; gloo CPU tensors
    if is_distributed() and dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def reduce_loss_dict(loss_dict: Mapping[str, torch.Tensor]) -> dict[str, float]:
    """Average each (scalar) loss over all processes, for logging only (no autograd).

    Keys are reduced in sorted order so every rank pairs the same values.
    """
    names = sorted(loss_dict)
    if not names:
        return {}
    values = torch.stack([loss_dict[k].detach().float().reshape(()) for k in names])
    if is_distributed():
        values = values.to(_reduction_device())
        dist.all_reduce(values, op=dist.ReduceOp.SUM)
        values /= get_world_size()
    return {k: float(v) for k, v in zip(names, values.cpu())}


def _all_reduce(values: list[float], op) -> list[float]:
    tensor = torch.tensor(values, dtype=torch.float64)
    if is_distributed():
        tensor = tensor.to(_reduction_device())
        dist.all_reduce(tensor, op=op)
    return tensor.cpu().tolist()


def all_reduce_max(values: list[float]) -> list[float]:
    """Elementwise maximum over processes (e.g. "does any rank want to stop?" flags)."""
    return _all_reduce(values, dist.ReduceOp.MAX if dist.is_available() else None)


def all_reduce_sum(values: list[float]) -> list[float]:
    """Elementwise sum over processes (e.g. skipped-sample counts)."""
    return _all_reduce(values, dist.ReduceOp.SUM if dist.is_available() else None)


def seed_for_rank(seed: int, rank: int) -> int:
    """The seed of process ``rank``'s training-time randomness (sampling of anchors/RoIs):
    distinct per rank so processes do not draw identical samples. Model initialisation uses
    ``seed`` itself on every rank (DDP also broadcasts rank 0's parameters)."""
    if seed < 0 or rank < 0:
        raise ValueError(f"seed and rank must be >= 0, got seed={seed}, rank={rank}")
    return seed + rank
