"""The training loop: data, model, SGD with warm-up + step decay, checkpoints, evaluation, DDP.

``train(cfg)`` runs one experiment described by a :class:`~libra_rcnn.config.Config` and writes
into ``cfg.output_dir``:

* ``config.yaml`` (the resolved config), ``log.jsonl`` (one JSON object per line:
  ``{"type": "train", ...losses, lr}`` every ``log_period`` iterations, ``{"type": "epoch"}``
  summaries with bad-sample counts, ``{"type": "val", ...metrics}``), TensorBoard scalars in
  ``tb/``;
* ``epoch_{n}.pth`` every ``checkpoint_period`` epochs and ``latest.pth`` after every epoch (and
  on interruption / ``max_iters``), written atomically.

Reproducibility and exact resume. Every source of randomness is seeded from ``train.seed``:
model initialisation (``seed``), the per-epoch shuffling (``seed + epoch``, the same on every rank
so ``DistributedSampler`` shards one permutation), each sample's augmentation (seeded from
``(seed, epoch, index)`` in isolation from the global generators, so it does not depend on the
worker that loads it or on which batches were skipped), and the in-model sampling of anchors and
RoIs (the global torch generator, seeded ``seed + rank`` and saved in checkpoints). A checkpoint
stores the number of batches consumed in the current epoch; resuming rebuilds the same epoch
order and skips them. On CPU a fixed seed gives identical losses, and an interrupted run resumed
from its checkpoint continues exactly like an uninterrupted one.

Failure handling. A non-finite loss skips the optimizer step with a warning; after
``max_consecutive_nonfinite`` in a row training stops with :class:`TrainingDivergedError` and
the last good checkpoint is kept. SIGINT/SIGTERM finish the current step, write ``latest.pth``
and return with ``stop_reason="interrupted"`` (the CLI then exits with 130 / 143, i.e.
128 + signal number). Samples whose image cannot be read are skipped and counted per epoch;
evaluation leaves them out of scoring and names them (``log.jsonl`` val records count them).

Distributed. Under ``torchrun`` (``WORLD_SIZE > 1``) each process trains on its shard with
``batch_size`` images; gradients are averaged by ``DistributedDataParallel`` (gloo on CPU, NCCL on
CUDA). The learning rate scales with the total batch ``batch_size * world_size``.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import random
import signal
import threading
import time
import warnings
from pathlib import Path
from typing import Any, Iterator, Optional, Sequence, Union

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from libra_rcnn.config import Config, ConfigError, config_to_dict, dump_config
from libra_rcnn.engine import distributed as dist_utils
from libra_rcnn.engine.checkpoint import (
    CheckpointError,
    capture_rng_state,
    describe_config_mismatch,
    load_checkpoint,
    model_config_from_checkpoint,
    restore_rng_state,
    save_checkpoint,
)
from libra_rcnn.engine.schedule import build_lr_scheduler
from libra_rcnn.errors import UserInputError

__all__ = [
    "TrainingDivergedError",
    "DataValidationError",
    "train",
    "build_dataset",
    "build_val_loader",
    "check_strict",
    "epoch_batches",
    "build_optimizer",
    "scaled_lr",
    "resolve_device",
]

logger = logging.getLogger(__name__)

_TARGET_KEYS = ("boxes", "labels")


class TrainingDivergedError(RuntimeError):
    """Too many consecutive non-finite losses; the last good checkpoint was kept."""


class DataValidationError(UserInputError):
    """``--strict`` start-up validation found bad samples. The message starts with the file."""


# ----------------------------------------------------------------------------------------------
# Data


def build_dataset(cfg: Config, *, train: bool):
    """The train or val :class:`~libra_rcnn.data.CocoDetection` of ``cfg.data``.

    Training samples get horizontal flips with ``flip_prob``; with ``data.strict`` annotation
    problems and unreadable images raise instead of being dropped/skipped.
    """
    from libra_rcnn.data import CocoDetection
    from libra_rcnn.data.transforms import build_transforms

    data = cfg.data
    ann, images = (data.train_ann, data.train_images) if train else (data.val_ann, data.val_images)
    proposals = data.train_proposals if train else data.val_proposals
    if cfg.model.arch == "fast_rcnn" and proposals is None:
        split = "train" if train else "val"
        raise ConfigError(f"data.{split}_proposals: a fast_rcnn model needs precomputed proposals "
                          f"for {ann}")
    for path, what in ((ann, "annotation file"), (images, "image folder")):
        if not Path(path).exists():
            raise FileNotFoundError(2, f"no such {what}", str(path))
    return CocoDetection(
        ann,
        images,
        transforms=build_transforms(train=train, flip_prob=data.flip_prob if train else 0.0),
        train=train,
        proposals_file=proposals,
        allow_outside_root=data.allow_outside_root,
        max_pixels=data.max_pixels,
        skip_bad=not data.strict,
        strict=data.strict,
        remove_empty=train and data.remove_empty,
    )


def check_strict(dataset) -> None:
    """``--strict``: decode every sample of ``dataset`` now and raise
    :class:`DataValidationError` naming the first problem (and how many there are)."""
    from libra_rcnn.data import check_dataset

    report = check_dataset(dataset)
    if not report["ok"]:
        problems = report["problems"]
        file, reason = problems[0]
        more = f" (and {len(problems) - 1} more problems; run `libra-rcnn check-data`)" \
            if len(problems) > 1 else ""
        raise DataValidationError(f"{file}: {reason}{more}")


def epoch_batches(
    dataset_len: int,
    *,
    batch_size: int,
    epoch: int,
    seed: int,
    rank: int = 0,
    world_size: int = 1,
    group_ids: Optional[Sequence[int]] = None,
) -> list[list[int]]:
    """This rank's batches (lists of dataset indices) for ``epoch``, in order.

    A pure function of its arguments: the permutation is seeded with ``seed + epoch`` (shared by
    all ranks, which take interleaved shards of it, as ``DistributedSampler`` does), and with
    ``group_ids`` images of one aspect-ratio group are batched together. Every rank gets the same
    number of batches.
    """
    sampler = DistributedSampler(range(dataset_len), num_replicas=world_size, rank=rank,
                                 shuffle=True, seed=seed, drop_last=False)
    sampler.set_epoch(epoch)
    if group_ids is not None:
        from libra_rcnn.data import GroupedBatchSampler

        return [list(b) for b in GroupedBatchSampler(sampler, group_ids, batch_size)]
    indices = list(sampler)
    return [indices[i:i + batch_size] for i in range(0, len(indices), batch_size)]


def _seed_everything(seed: int) -> None:
    """Seed the global torch (CPU and CUDA), Python and NumPy generators."""
    torch.manual_seed(seed)
    random.seed(seed)
    np.random.seed(seed % 2**32)


@contextlib.contextmanager
def _isolated_rng(seed: int) -> Iterator[None]:
    """Seed torch (CPU), Python and NumPy generators for the block and restore them after."""
    torch_state, py_state, np_state = torch.get_rng_state(), random.getstate(), np.random.get_state()
    torch.random.default_generator.manual_seed(seed)  # CPU only: CUDA generators stay untouched
    random.seed(seed)
    np.random.seed(seed % 2**32)
    try:
        yield
    finally:
        torch.set_rng_state(torch_state)
        random.setstate(py_state)
        np.random.set_state(np_state)


class _EpochSamples(Dataset):
    """``dataset[i]`` with its random augmentation seeded by ``(seed, epoch, i)``."""

    def __init__(self, dataset, *, seed: int, epoch: int) -> None:
        self.dataset = dataset
        self.seed = seed
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int):
        sample_seed = int(np.random.SeedSequence([self.seed, self.epoch, index]).generate_state(1)[0])
        with _isolated_rng(sample_seed):
            return self.dataset[index]


def _collate_counting_skipped(batch):
    """``collate_fn`` of the data package plus the number of skipped (``None``) samples."""
    from libra_rcnn.data import collate_fn

    images, targets = collate_fn(batch)
    return images, targets, sum(1 for sample in batch if sample is None)


def _seed_worker(worker_id: int) -> None:
    # Ctrl-C reaches the whole process group: the main process handles it (finishes the step,
    # writes a checkpoint) and needs its workers alive until then
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    # torch seeds each worker from the loader's generator; derive Python/NumPy seeds from it
    worker_seed = torch.initial_seed() % 2**32
    random.seed(worker_seed)
    np.random.seed(worker_seed)


def _train_loader(dataset, batches: list[list[int]], *, cfg: Config, epoch: int,
                  pin_memory: bool) -> DataLoader:
    generator = torch.Generator()
    generator.manual_seed(cfg.train.seed + epoch)
    return DataLoader(
        _EpochSamples(dataset, seed=cfg.train.seed, epoch=epoch),
        batch_sampler=batches,
        num_workers=cfg.data.num_workers,
        collate_fn=_collate_counting_skipped,
        worker_init_fn=_seed_worker,
        generator=generator,
        pin_memory=pin_memory,
    )


def build_val_loader(dataset, *, cfg: Config, info: dist_utils.DistInfo) -> DataLoader:
    """Evaluation loader in dataset order (this rank's shard under DDP). Its batches are
    ``(images, targets, skipped)``: unreadable images come out as
    :class:`~libra_rcnn.data.SkippedImage` records, so that evaluation can name them."""
    from libra_rcnn.data import WithSkipped, collate_with_skipped

    sampler = DistributedSampler(dataset, num_replicas=info.world_size, rank=info.rank,
                                 shuffle=False) if info.distributed else None
    return DataLoader(WithSkipped(dataset), batch_size=cfg.data.val_batch_size, sampler=sampler,
                      shuffle=False, num_workers=cfg.data.num_workers,
                      collate_fn=collate_with_skipped)


# ----------------------------------------------------------------------------------------------
# Model / optimisation


def resolve_device(device: Union[str, torch.device, None], info: dist_utils.DistInfo) -> torch.device:
    """``None`` -> the process's GPU (``cuda:LOCAL_RANK``) when available, else the CPU."""
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(device)
    except RuntimeError:
        raise UserInputError(f"device {device!r}: not a device name such as cpu, cuda, "
                             f"cuda:1") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise UserInputError(f"device {str(device)!r}: CUDA is not available")
        if device.index is None:
            device = torch.device("cuda", info.local_rank)
    return device


def scaled_lr(cfg: Config, world_size: int) -> float:
    """Linear scaling rule: ``base_lr * total_batch / base_batch_size`` (if ``scale_lr``)."""
    t = cfg.train
    if not t.scale_lr:
        return t.base_lr
    return t.base_lr * (t.batch_size * world_size) / t.base_batch_size


def build_optimizer(model: nn.Module, cfg: Config, *, lr: float) -> torch.optim.SGD:
    """SGD with momentum; weight decay on every trainable parameter (mmdetection's default)."""
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("model has no trainable parameters")
    return torch.optim.SGD(params, lr=lr, momentum=cfg.train.momentum,
                           weight_decay=cfg.train.weight_decay)


def _to_device_targets(targets, device: torch.device, arch: str):
    """Targets with only the keys the model trains on, plus the proposals list for Fast R-CNN."""
    model_targets = [{k: t[k].to(device, non_blocking=True) for k in _TARGET_KEYS if k in t}
                     for t in targets]
    proposals = None
    if arch == "fast_rcnn":
        proposals = [t["proposals"].to(device, non_blocking=True) for t in targets]
    return model_targets, proposals


# ----------------------------------------------------------------------------------------------
# Logging


class _RunLog:
    """JSON lines + TensorBoard on the main process; nothing elsewhere."""

    def __init__(self, output_dir: Path, *, enabled: bool, tensorboard: bool) -> None:
        self.enabled = enabled
        self._file = open(output_dir / "log.jsonl", "a") if enabled else None
        self._tb = None
        if enabled and tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self._tb = SummaryWriter(log_dir=str(output_dir / "tb"))
            except ImportError as exc:  # tensorboard is a dependency, but keep training if absent
                logger.warning("TensorBoard logging disabled: %s", exc)

    def write(self, record: dict, *, step: int, tb_prefix: Optional[str] = None) -> None:
        if not self.enabled:
            return
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()
        if self._tb is not None and tb_prefix is not None:
            for key, value in record.items():
                if isinstance(value, (int, float)) and key not in ("epoch", "iter", "type"):
                    self._tb.add_scalar(f"{tb_prefix}/{key}", value, step)

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
        if self._tb is not None:
            self._tb.close()


# ----------------------------------------------------------------------------------------------
# Signals


class _StopRequest:
    """SIGINT/SIGTERM set a flag that the loop checks between steps; a second signal of the same
    kind falls through to the previous handler (so a second Ctrl-C interrupts at once)."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self) -> None:
        self.signum: Optional[int] = None
        self._previous: dict = {}

    def _handle(self, signum, frame) -> None:
        self.signum = signum
        logger.warning("received %s: stopping after the current step (again to abort)",
                       signal.Signals(signum).name)
        signal.signal(signum, self._previous.get(signum, signal.SIG_DFL))

    def __enter__(self) -> "_StopRequest":
        if threading.current_thread() is threading.main_thread():
            for signum in self.SIGNALS:
                self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)


# ----------------------------------------------------------------------------------------------
# Training


def _unwrap(model: nn.Module) -> nn.Module:
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


def _gather_rng_states(info: dist_utils.DistInfo) -> list:
    state = capture_rng_state()
    if not info.distributed:
        return [state]
    gathered: list = [None] * info.world_size
    torch.distributed.all_gather_object(gathered, state)
    return gathered


@contextlib.contextmanager
def intra_op_threads(num_threads: Optional[int]) -> Iterator[None]:
    """``torch.set_num_threads(num_threads)`` for the block (``None``: unchanged), restored after."""
    if num_threads is None:
        yield
        return
    previous = torch.get_num_threads()
    torch.set_num_threads(num_threads)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


@contextlib.contextmanager
def _deterministic(enabled: bool, device: torch.device) -> Iterator[None]:
    """``torch.use_deterministic_algorithms`` for the block (warn-only), restored afterwards."""
    if not enabled:
        yield
        return
    if device.type == "cuda":
        logger.warning("train.deterministic on CUDA: torchvision's RoIAlign then runs a compiled "
                       "reference implementation, which takes minutes to compile and runs slowly; "
                       "the setting is meant for CPU runs")
    previous = torch.are_deterministic_algorithms_enabled()
    previous_warn = torch.is_deterministic_algorithms_warn_only_enabled()
    previous_benchmark = torch.backends.cudnn.benchmark
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.backends.cudnn.benchmark = False
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(previous, warn_only=previous_warn)
        torch.backends.cudnn.benchmark = previous_benchmark


class _Trainer:
    def __init__(self, cfg: Config, info: dist_utils.DistInfo, *, device, resume, progress: bool):
        self.cfg = cfg
        self.info = info
        self.device = resolve_device(device, info)
        self.resume = resume
        self.progress = progress and info.rank == 0
        self.main = info.rank == 0
        self.output_dir = Path(cfg.output_dir or "work_dirs/run")
        self.use_amp = cfg.train.amp and self.device.type == "cuda"
        if cfg.train.amp and not self.use_amp:
            logger.warning("train.amp: mixed precision needs CUDA; training in float32 on %s",
                           self.device)

    # -- set-up --------------------------------------------------------------------------------
    def setup(self) -> None:
        from libra_rcnn.data import aspect_ratio_group_ids
        from libra_rcnn.models import build_model

        cfg, info = self.cfg, self.info
        self.train_set = build_dataset(cfg, train=True)
        expected_classes = self.train_set.num_classes + 1
        if cfg.model.num_classes != expected_classes:
            raise ConfigError(
                f"{cfg.data.train_ann}: has {self.train_set.num_classes} classes, so "
                f"model.num_classes must be {expected_classes} (background included), got "
                f"{cfg.model.num_classes}; use --set model.num_classes={expected_classes}")
        self.val_set = None
        if cfg.data.val_ann is not None and cfg.data.val_images is not None:
            self.val_set = build_dataset(cfg, train=False)
            if self.val_set.class_names != self.train_set.class_names:
                raise ConfigError(f"{cfg.data.val_ann}: categories differ from those of "
                                  f"{cfg.data.train_ann}")
        if cfg.data.strict:
            check_strict(self.train_set)
            if self.val_set is not None:
                check_strict(self.val_set)

        self.group_ids = aspect_ratio_group_ids(self.train_set) \
            if cfg.data.aspect_ratio_grouping else None
        self.iters_per_epoch = len(self._batches(0))

        _seed_everything(cfg.train.seed)  # identical initialisation on every rank
        model = build_model(cfg.model).to(self.device)
        if info.distributed:
            if cfg.model.norm == "bn" and self.device.type == "cuda":
                model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
            model = nn.parallel.DistributedDataParallel(
                model,
                device_ids=[self.device.index] if self.device.type == "cuda" else None,
                find_unused_parameters=cfg.train.find_unused_parameters,
            )
        self.model = model
        self.lr = scaled_lr(cfg, info.world_size)
        self.optimizer = build_optimizer(model, cfg, lr=self.lr)
        self.scheduler = build_lr_scheduler(
            self.optimizer, iters_per_epoch=self.iters_per_epoch, lr_steps=cfg.train.lr_steps,
            gamma=cfg.train.gamma, warmup_iters=cfg.train.warmup_iters,
            warmup_ratio=cfg.train.warmup_ratio)
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.use_amp)
        # in-model sampling (anchors, RoIs) draws from the global generator: distinct per rank
        _seed_everything(dist_utils.seed_for_rank(cfg.train.seed, info.rank))

        self.epoch = 0  # completed epochs
        self.iter_in_epoch = 0  # batches consumed in the current epoch
        self.iteration = 0  # batches consumed in total
        if self.resume is not None:
            self._load_resume(Path(self.resume))

        if self.main:
            self.output_dir.mkdir(parents=True, exist_ok=True)
            dump_config(cfg, self.output_dir / "config.yaml")
        dist_utils.barrier()
        self.log = _RunLog(self.output_dir, enabled=self.main, tensorboard=cfg.train.tensorboard)

    def _batches(self, epoch: int) -> list[list[int]]:
        return epoch_batches(len(self.train_set), batch_size=self.cfg.train.batch_size,
                             epoch=epoch, seed=self.cfg.train.seed, rank=self.info.rank,
                             world_size=self.info.world_size, group_ids=self.group_ids)

    def _load_resume(self, path: Path) -> None:
        state = load_checkpoint(path, map_location="cpu")
        for key in ("optimizer", "scheduler", "epoch", "iteration", "iter_in_epoch", "rng"):
            if key not in state:
                raise CheckpointError(f"{path}: not a training checkpoint (no {key!r}); "
                                      f"cannot resume from it")
        stored = model_config_from_checkpoint(state, path=path)
        differences = describe_config_mismatch(stored, self.cfg.model)
        if differences:
            raise CheckpointError(f"{path}: cannot resume, checkpoint is from another model: "
                                  + "; ".join(differences))
        if stored != self.cfg.model:
            logger.warning("%s: model settings differ from the checkpoint's (training continues "
                           "with the config's)", path)
        saved_world = state.get("world_size", 1)
        saved_batch = state.get("batch_size", self.cfg.train.batch_size)
        if state["iter_in_epoch"] and (saved_world, saved_batch) != (
                self.info.world_size, self.cfg.train.batch_size):
            logger.warning("%s: mid-epoch checkpoint from %d process(es) x %d images, resuming "
                           "with %d x %d: the rest of the epoch is not the same data order",
                           path, saved_world, saved_batch, self.info.world_size,
                           self.cfg.train.batch_size)
        try:
            _unwrap(self.model).load_state_dict(state["model"])
            self.optimizer.load_state_dict(state["optimizer"])
            self.scheduler.load_state_dict(state["scheduler"])
            if state.get("scaler"):
                self.scaler.load_state_dict(state["scaler"])
        except (RuntimeError, ValueError, KeyError) as exc:
            detail = str(exc).splitlines()[0][:300]
            raise CheckpointError(f"{path}: cannot resume from this checkpoint: {detail}") from None
        rng_states = state["rng"]
        if len(rng_states) == self.info.world_size:
            restore_rng_state(rng_states[self.info.rank])
        else:
            _seed_everything(dist_utils.seed_for_rank(self.cfg.train.seed + state["iteration"],
                                                      self.info.rank))
        self.epoch = int(state["epoch"])
        self.iter_in_epoch = int(state["iter_in_epoch"])
        self.iteration = int(state["iteration"])
        if self.main:
            logger.info("resumed from %s: epoch %d, iteration %d (%d batches into the epoch)",
                        path, self.epoch, self.iteration, self.iter_in_epoch)

    # -- checkpoints ---------------------------------------------------------------------------
    def _checkpoint_state(self) -> dict:
        rng = _gather_rng_states(self.info)  # collective: every rank calls it
        train_set = self.train_set
        return {
            "format": "libra-rcnn-checkpoint",
            "format_version": 1,
            "model": _unwrap(self.model).state_dict(),
            "model_config": config_to_dict(self.cfg.model),
            "class_names": list(train_set.class_names),
            "label_to_cat_id": {int(k): int(v) for k, v in train_set.label_to_cat_id.items()},
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict(),
            "epoch": self.epoch,
            "iter_in_epoch": self.iter_in_epoch,
            "iteration": self.iteration,
            "world_size": self.info.world_size,
            "batch_size": self.cfg.train.batch_size,
            "rng": rng,
            "config": config_to_dict(self.cfg),
        }

    def _save(self, *, epoch_file: bool) -> Path:
        state = self._checkpoint_state()
        latest = self.output_dir / "latest.pth"
        if self.main:
            if epoch_file:
                save_checkpoint(self.output_dir / f"epoch_{self.epoch}.pth", state)
            save_checkpoint(latest, state)
            logger.info("checkpoint written: %s (epoch %d, iteration %d)", latest, self.epoch,
                        self.iteration)
        dist_utils.barrier()
        return latest

    # -- evaluation ----------------------------------------------------------------------------
    def _evaluate(self):
        from libra_rcnn.engine.evaluate import describe_skipped, evaluate

        loader = build_val_loader(self.val_set, cfg=self.cfg, info=self.info)
        evaluation = evaluate(
            _unwrap(self.model), loader, device=self.device,
            results_file=self.output_dir / "val_results.json",
            proposals=self.cfg.model.arch == "rpn", amp=self.use_amp, progress=self.progress)
        if self.main:
            metrics = evaluation.metrics
            record = {"type": "val", "epoch": self.epoch, "iter": self.iteration,
                      "images": len(evaluation.image_ids),
                      "skipped_images": len(evaluation.skipped),
                      **{k: float(v) for k, v in metrics.items()}}
            self.log.write(record, step=self.iteration, tb_prefix="val")
            if evaluation.skipped:
                logger.warning("val after epoch %d: %d unreadable image(s) not scored:\n  %s",
                               self.epoch, len(evaluation.skipped),
                               "\n  ".join(describe_skipped(evaluation.skipped)))
            logger.info("val after epoch %d on %d image(s): %s", self.epoch,
                        len(evaluation.image_ids),
                        ", ".join(f"{k}={v:.4f}" for k, v in metrics.items()) or "no metrics")
        return evaluation

    # -- the loop ------------------------------------------------------------------------------
    def _step(self, images, targets) -> tuple[dict, bool]:
        """One forward/backward/update. Returns (averaged losses for logging, stepped?)."""
        cfg = self.cfg
        images = [img.to(self.device, non_blocking=True) for img in images]
        model_targets, proposals = _to_device_targets(targets, self.device, cfg.model.arch)
        kwargs = {"proposals": proposals} if proposals is not None else {}
        with torch.autocast(device_type=self.device.type, enabled=self.use_amp):
            loss_dict = self.model(images, model_targets, **kwargs)
        loss = sum(loss_dict.values())
        # backward even for a non-finite loss so DDP's gradient all-reduce runs on every rank;
        # the reduced losses below then decide on every rank alike whether to step
        self.scaler.scale(loss).backward()
        reduced = dist_utils.reduce_loss_dict({**loss_dict, "loss": loss})
        if not all(math.isfinite(v) for v in reduced.values()):
            self.optimizer.zero_grad(set_to_none=True)
            return reduced, False
        if cfg.train.grad_clip_norm is not None:
            self.scaler.unscale_(self.optimizer)
            nn.utils.clip_grad_norm_(self.model.parameters(), cfg.train.grad_clip_norm)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        return reduced, True

    def _advance_schedule(self) -> None:
        with warnings.catch_warnings():
            # stepping the schedule for a skipped optimizer step is intended (lr follows data)
            warnings.filterwarnings("ignore", message=".*lr_scheduler.step.*")
            self.scheduler.step()

    def _record_step(self, losses: dict, stepped: bool, lr: float, state: dict) -> None:
        """Non-finite bookkeeping (raises after too many in a row) and logging of one step."""
        t = self.cfg.train
        if losses and not stepped:
            state["consecutive_nonfinite"] += 1
            state["epoch_nonfinite"] += 1
            if self.main:
                logger.warning("iteration %d: non-finite loss %s, step skipped (%d in a row)",
                               self.iteration, losses, state["consecutive_nonfinite"])
            if state["consecutive_nonfinite"] >= t.max_consecutive_nonfinite:
                latest = self.output_dir / "latest.pth"
                kept = f"; last good checkpoint: {latest}" if latest.exists() else ""
                raise TrainingDivergedError(
                    f"{state['consecutive_nonfinite']} consecutive non-finite losses, last at "
                    f"iteration {self.iteration} ({losses}){kept}")
        elif stepped:
            state["consecutive_nonfinite"] = 0
            state["last_losses"] = losses
        if losses and self.main and (self.iteration % t.log_period == 0 or self.iteration == 1):
            elapsed = time.perf_counter() - state["start_time"]
            per_iter = elapsed / max(1, self.iteration - state["start_iteration"])
            record = {"type": "train", "epoch": self.epoch + 1, "iter": self.iteration, "lr": lr,
                      **losses, "stepped": stepped, "time_per_iter": per_iter,
                      "eta_s": per_iter * (state["total_iters"] - self.iteration)}
            self.log.write(record, step=self.iteration, tb_prefix="train")

    def _train_epoch(self, stop: _StopRequest, state: dict) -> tuple[bool, int]:
        """Train from the current position to the end of the epoch (or ``total_iters``).
        Returns (interrupted by a signal?, number of batches in the epoch)."""
        from tqdm.auto import tqdm

        batches = self._batches(self.epoch)
        loader = _train_loader(self.train_set, batches[self.iter_in_epoch:], cfg=self.cfg,
                               epoch=self.epoch, pin_memory=self.device.type == "cuda")
        state["epoch_skipped"] = state["epoch_nonfinite"] = 0
        with tqdm(total=len(batches), initial=self.iter_in_epoch,
                  desc=f"epoch {self.epoch + 1}/{self.cfg.train.epochs}",
                  disable=not self.progress, dynamic_ncols=True, leave=False) as bar:
            for images, targets, skipped in loader:
                # every rank agrees on stopping and on skipping a batch left empty by bad samples
                empty, stop_flag = dist_utils.all_reduce_max(
                    [float(len(images) == 0), float(stop.signum is not None)])
                if stop_flag:
                    return True, len(batches)
                state["epoch_skipped"] += skipped
                losses, stepped = self._step(images, targets) if not empty else ({}, False)
                self.iteration += 1
                self.iter_in_epoch += 1
                lr = self.optimizer.param_groups[0]["lr"]
                self._advance_schedule()
                bar.update(1)
                if losses and self.main:
                    bar.set_postfix(loss=f"{losses['loss']:.4f}", lr=f"{lr:.2e}")
                self._record_step(losses, stepped, lr, state)
                if self.iteration >= state["total_iters"]:
                    break
        return False, len(batches)

    def run(self) -> dict:
        t = self.cfg.train
        total_iters = t.epochs * self.iters_per_epoch
        if t.max_iters is not None:
            total_iters = min(total_iters, t.max_iters)
        state = {"total_iters": total_iters, "consecutive_nonfinite": 0, "last_losses": {},
                 "start_time": time.perf_counter(), "start_iteration": self.iteration}
        summary: dict[str, Any] = {
            "output_dir": str(self.output_dir), "stop_reason": "finished", "signal": None,
            "metrics": {}, "eval_images": 0, "eval_skipped": [], "skipped_samples": 0,
            "nonfinite_steps": 0,
            "checkpoint": None, "iters_per_epoch": self.iters_per_epoch, "evaluated_at": -1,
        }
        self.model.train()
        with _StopRequest() as stop:
            while self.epoch < t.epochs and self.iteration < total_iters:
                interrupted, epoch_len = self._train_epoch(stop, state)
                skipped = int(dist_utils.all_reduce_sum([float(state["epoch_skipped"])])[0])
                summary["skipped_samples"] += skipped
                summary["nonfinite_steps"] += state["epoch_nonfinite"]
                if skipped and self.main:
                    logger.warning("epoch %d: %d bad sample(s) skipped (unreadable images)",
                                   self.epoch + 1, skipped)
                if interrupted:
                    summary["checkpoint"] = str(self._save(epoch_file=False))
                    summary.update(stop_reason="interrupted", signal=stop.signum)
                    break
                epoch_done = self.iter_in_epoch >= epoch_len
                if epoch_done:
                    self.epoch += 1
                    self.iter_in_epoch = 0
                if self.main:
                    self.log.write({"type": "epoch", "epoch": self.epoch, "iter": self.iteration,
                                    "epoch_done": epoch_done, "skipped_samples": skipped,
                                    "nonfinite_steps": state["epoch_nonfinite"]},
                                   step=self.iteration)
                epoch_file = epoch_done and (self.epoch % t.checkpoint_period == 0
                                             or self.epoch == t.epochs)
                summary["checkpoint"] = str(self._save(epoch_file=epoch_file))
                finished = self.epoch >= t.epochs or self.iteration >= total_iters
                if self.val_set is not None and (
                        finished or (epoch_done and self.epoch % t.eval_period == 0)):
                    evaluation = self._evaluate()
                    summary.update(metrics=evaluation.metrics,
                                   eval_images=len(evaluation.image_ids),
                                   eval_skipped=evaluation.skipped)
                    summary["evaluated_at"] = self.iteration
                    self.model.train()
        if summary["stop_reason"] == "finished" and self.epoch < t.epochs \
                and self.iteration >= total_iters:
            summary["stop_reason"] = "max_iters"
        summary.update(epoch=self.epoch, iteration=self.iteration,
                       last_losses=state["last_losses"])
        return summary

    def close(self) -> None:
        log = getattr(self, "log", None)
        if log is not None:
            log.close()


def train(
    cfg: Config,
    *,
    resume: Union[str, os.PathLike, None] = None,
    device: Union[str, torch.device, None] = None,
    progress: bool = True,
) -> dict:
    """Train the experiment ``cfg`` (see the module doc for outputs and guarantees).

    Args:
        resume: a checkpoint written by a previous run (``latest.pth`` / ``epoch_{n}.pth``) to
            continue exactly where it stopped (model, optimizer, schedule, scaler, RNG, epoch and
            position inside the epoch).
        device: ``"cpu"``, ``"cuda"``, ``"cuda:1"``...; default: this process's GPU if any.
        progress: show a tqdm bar (main process only).

    Returns:
        a summary dict: ``stop_reason`` (``"finished"``, ``"max_iters"`` or ``"interrupted"``),
        ``signal`` (the signal number when interrupted), ``epoch``, ``iteration``,
        ``iters_per_epoch``, ``metrics`` (last evaluation), ``eval_images`` (how many images it
        scored), ``eval_skipped`` (the :class:`~libra_rcnn.data.SkippedImage` records of the
        unreadable ones it could not score), ``last_losses``, ``skipped_samples`` (training
        samples), ``nonfinite_steps``, ``checkpoint`` (path of ``latest.pth``), ``output_dir``.

    Raises:
        ConfigError / FileNotFoundError / CheckpointError / DataValidationError and the data
        package's ``BadAnnotationError`` for user errors (each naming the file);
        TrainingDivergedError after too many consecutive non-finite losses.
    """
    info = dist_utils.init_distributed(
        None if device is None else resolve_device(device, dist_utils.DistInfo()).type)
    trainer = None
    try:
        trainer = _Trainer(cfg, info, device=device, resume=resume, progress=progress)
        with _deterministic(cfg.train.deterministic, trainer.device), \
                intra_op_threads(cfg.train.num_threads):
            trainer.setup()
            return trainer.run()
    finally:
        if trainer is not None:
            trainer.close()
        dist_utils.cleanup_distributed(info)
