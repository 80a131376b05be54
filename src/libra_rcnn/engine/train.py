"""The training loop: data, model, SGD with warm-up + step decay, checkpoints, evaluation, DDP.

``train(cfg)`` runs one experiment described by a :class:`~libra_rcnn.config.Config` and writes
into ``cfg.output_dir``:

* ``config.yaml`` (the resolved config), ``log.jsonl`` (one JSON object per line:
  ``{"type": "train", ...losses, lr}`` every ``log_period`` iterations, ``{"type": "epoch"}``
  summaries with bad-sample counts, ``{"type": "val", ...metrics}``), TensorBoard scalars in
  ``tb/``;
* ``epoch_{n}.pth`` every ``checkpoint_period`` epochs and ``latest.pth`` after every epoch (and
  on interruption / ``max_iters``), written atomically.

The loop and its hooks. :class:`Trainer` runs a short loop of steps (forward, backward,
optimizer step, schedule step) over the epochs' batches and keeps where it stands in a typed
:class:`TrainState`; everything else is a hook (:mod:`libra_rcnn.engine.hooks`) called before
and after training, each epoch and each step: signal handling, the non-finite-loss policy, the
``log.jsonl`` / TensorBoard writer, the progress bar, checkpoints and evaluation. A hook of your
own needs no change to the loop::

    from libra_rcnn.engine.hooks import HookBase
    from libra_rcnn.engine.train import train

    class StopAtLoss(HookBase):
        # stop (with a checkpoint, as for Ctrl-C) once the loss falls below a threshold
        def __init__(self, threshold):
            self.threshold = threshold

        def after_step(self):
            state = self.trainer.state
            if state.stepped and state.losses["loss"] < self.threshold:
                state.request_stop()

    summary = train(cfg, hooks=[StopAtLoss(0.1)])

``train`` returns a :class:`TrainSummary`.

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
import logging
import math
import os
import random
import signal
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Literal, Optional, Sequence, Union

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
)
from libra_rcnn.engine.hooks import (
    Checkpointer,
    Evaluator,
    HookBase,
    MetricsWriter,
    NonFiniteLossPolicy,
    ProgressBar,
    SignalHandler,
    TrainingDivergedError,
)
from libra_rcnn.engine.schedule import build_lr_scheduler
from libra_rcnn.errors import UserInputError

__all__ = [
    "TrainingDivergedError",
    "DataValidationError",
    "HookBase",
    "Trainer",
    "TrainState",
    "TrainSummary",
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


def _gradient_norm(parameters) -> torch.Tensor:
    """The L2 norm of all gradients together (what ``clip_grad_norm_`` compares)."""
    norms = [p.grad.detach().norm() for p in parameters if p.grad is not None]
    return torch.stack(norms).norm() if norms else torch.zeros(())


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


StopReason = Literal["finished", "max_iters", "interrupted"]


@dataclass
class TrainState:
    """Where training stands, what the last step did and what the run has counted. ``epoch``,
    ``iter_in_epoch`` and ``iteration`` go into checkpoints; hooks read the rest."""

    max_epochs: int
    total_iters: int  # epochs * iters_per_epoch, or train.max_iters if smaller
    iters_per_epoch: int
    epoch: int = 0  # completed epochs
    iter_in_epoch: int = 0  # batches consumed in the current epoch
    iteration: int = 0  # batches consumed in total
    epoch_len: int = 0  # batches in the current epoch
    epoch_done: bool = False  # after an epoch part: it completed the epoch
    # the last step: losses averaged over ranks ({} when the batch had no readable sample),
    # whether the weights were updated (not for a non-finite loss), the learning rate it used
    losses: dict[str, float] = field(default_factory=dict)
    stepped: bool = False
    lr: float = 0.0
    last_losses: dict[str, float] = field(default_factory=dict)  # of the last update
    epoch_skipped: int = 0  # unreadable samples in the current epoch (all ranks, at its end)
    epoch_nonfinite: int = 0  # steps skipped for a non-finite loss in the current epoch
    skipped_samples: int = 0
    nonfinite_steps: int = 0
    stop_requested: bool = False  # set by a signal or a hook: stop after the current step
    stop_signal: Optional[int] = None
    stop_reason: StopReason = "finished"
    checkpoint: Optional[str] = None  # latest.pth, once written
    evaluation: Any = None  # the last :class:`~libra_rcnn.engine.evaluate.Evaluation`
    evaluated_at: int = -1  # the iteration it was made at

    @property
    def finished(self) -> bool:
        return self.epoch >= self.max_epochs or self.iteration >= self.total_iters

    def request_stop(self, signum: Optional[int] = None) -> None:
        """Stop after the current step, with a checkpoint, as for SIGINT (``signum``)."""
        self.stop_requested, self.stop_signal = True, signum

    def record_step(self, losses: dict[str, float], stepped: bool, lr: float) -> None:
        self.losses, self.stepped, self.lr = losses, stepped, lr
        self.iteration += 1
        self.iter_in_epoch += 1
        if losses and not stepped:
            self.epoch_nonfinite += 1
            self.nonfinite_steps += 1
        elif stepped:
            self.last_losses = losses


@dataclass
class TrainSummary:
    """What :func:`train` did: why it stopped (``"finished"``, ``"max_iters"`` or
    ``"interrupted"``, with the ``signal`` number, or ``None`` when a hook asked), where it
    stopped, the last evaluation (``metrics``, how many images it scored, the
    :class:`~libra_rcnn.data.SkippedImage` records of those it could not read, the iteration it
    ran at), the last update's losses, the bad-sample and non-finite-step counts, and the path
    of ``latest.pth``."""

    stop_reason: StopReason
    signal: Optional[int]
    epoch: int
    iteration: int
    iters_per_epoch: int
    checkpoint: Optional[str]
    output_dir: str
    metrics: dict[str, float] = field(default_factory=dict)
    eval_images: int = 0
    eval_skipped: list = field(default_factory=list)
    evaluated_at: int = -1
    last_losses: dict[str, float] = field(default_factory=dict)
    skipped_samples: int = 0
    nonfinite_steps: int = 0


class Trainer:
    """Builds the data, model, optimizer and schedule of ``cfg`` (:meth:`setup`), then runs the
    step loop (:meth:`run`), calling the built-in hooks and then ``hooks``."""

    def __init__(self, cfg: Config, info: dist_utils.DistInfo, *, device, resume,
                 progress: bool, hooks: Sequence[HookBase] = ()) -> None:
        self.cfg = cfg
        self.info = info
        self.device = resolve_device(device, info)
        self.resume = resume
        self.main = info.rank == 0
        self.progress = progress and self.main
        self.extra_hooks = list(hooks)
        self.output_dir = Path(cfg.output_dir or "work_dirs/run")
        self.use_amp = cfg.train.amp and self.device.type == "cuda"
        if cfg.train.amp and not self.use_amp:
            logger.warning("train.amp: mixed precision needs CUDA; training in float32 on %s",
                           self.device)

    # -- set-up --------------------------------------------------------------------------------
    def setup(self) -> None:
        cfg = self.cfg
        self._build_data()
        self._build_model_and_optimizer()
        total_iters = cfg.train.epochs * self.iters_per_epoch
        if cfg.train.max_iters is not None:
            total_iters = min(total_iters, cfg.train.max_iters)
        self.state = TrainState(max_epochs=cfg.train.epochs, total_iters=total_iters,
                                iters_per_epoch=self.iters_per_epoch)
        if self.resume is not None:
            self._load_resume(Path(self.resume))
        if self.main:
            self.output_dir.mkdir(parents=True, exist_ok=True)
            dump_config(cfg, self.output_dir / "config.yaml")
        dist_utils.barrier()
        self.hooks = self._default_hooks() + self.extra_hooks
        for hook in self.hooks:
            hook.trainer = self

    def _default_hooks(self) -> list[HookBase]:
        t = self.cfg.train
        writer = MetricsWriter(self.output_dir, log_period=t.log_period,
                               tensorboard=t.tensorboard, enabled=self.main)
        hooks = [SignalHandler(),
                 NonFiniteLossPolicy(t.max_consecutive_nonfinite, self.output_dir / "latest.pth"),
                 writer, ProgressBar(enabled=self.progress),
                 Checkpointer(self.output_dir, period=t.checkpoint_period)]
        if self.val_set is not None:
            hooks.append(Evaluator(period=t.eval_period, writer=writer))
        return hooks

    def _build_data(self) -> None:
        from libra_rcnn.data import aspect_ratio_group_ids

        cfg = self.cfg
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

    def _build_model_and_optimizer(self) -> None:
        from libra_rcnn.models import build_model

        cfg, info = self.cfg, self.info
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
        self.optimizer = build_optimizer(model, cfg, lr=scaled_lr(cfg, info.world_size))
        self.scheduler = build_lr_scheduler(
            self.optimizer, iters_per_epoch=self.iters_per_epoch, lr_steps=cfg.train.lr_steps,
            gamma=cfg.train.gamma, warmup_iters=cfg.train.warmup_iters,
            warmup_ratio=cfg.train.warmup_ratio)
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.use_amp)
        # in-model sampling (anchors, RoIs) draws from the global generator: distinct per rank
        _seed_everything(dist_utils.seed_for_rank(cfg.train.seed, info.rank))

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
        self._check_resumed_model(state, path)
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
        self.state.epoch = int(state["epoch"])
        self.state.iter_in_epoch = int(state["iter_in_epoch"])
        self.state.iteration = int(state["iteration"])
        if self.main:
            logger.info("resumed from %s: epoch %d, iteration %d (%d batches into the epoch)",
                        path, self.state.epoch, self.state.iteration, self.state.iter_in_epoch)

    def _check_resumed_model(self, state: dict, path: Path) -> None:
        """The checkpoint must be of this model; a mid-epoch one from another number of
        processes or batch size continues with another data order (a warning says so)."""
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

    # -- what the hooks use --------------------------------------------------------------------
    def checkpoint_state(self) -> dict:
        """The contents of a checkpoint now. Collective under DDP: every rank calls it."""
        rng = _gather_rng_states(self.info)
        return {
            "format": "libra-rcnn-checkpoint",
            "format_version": 1,
            "model": _unwrap(self.model).state_dict(),
            "model_config": config_to_dict(self.cfg.model),
            "class_names": list(self.train_set.class_names),
            "label_to_cat_id": {int(k): int(v)
                                for k, v in self.train_set.label_to_cat_id.items()},
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict(),
            "epoch": self.state.epoch,
            "iter_in_epoch": self.state.iter_in_epoch,
            "iteration": self.state.iteration,
            "world_size": self.info.world_size,
            "batch_size": self.cfg.train.batch_size,
            "rng": rng,
            "config": config_to_dict(self.cfg),
        }

    def evaluate(self):
        """COCO evaluation of the model on the validation set (this rank's shard under DDP;
        the metrics on the main process). Collective under DDP."""
        from libra_rcnn.engine.evaluate import evaluate

        loader = build_val_loader(self.val_set, cfg=self.cfg, info=self.info)
        return evaluate(
            _unwrap(self.model), loader, device=self.device,
            results_file=self.output_dir / "val_results.json",
            proposals=self.cfg.model.arch == "rpn", amp=self.use_amp, progress=self.progress)

    # -- the loop ------------------------------------------------------------------------------
    def run_step(self, images, targets) -> tuple[dict, bool]:
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
        norm = None
        if cfg.train.grad_clip_norm is not None:
            self.scaler.unscale_(self.optimizer)
            norm = nn.utils.clip_grad_norm_(self.model.parameters(), cfg.train.grad_clip_norm)
        elif not self.use_amp:  # with AMP the scaler skips steps with non-finite gradients
            norm = _gradient_norm(self.model.parameters())
        if norm is not None and not self.use_amp and not torch.isfinite(norm):
            # a finite loss can still have non-finite gradients: stepping would poison the
            # weights for good (all ranks agree: the gradients are all-reduced)
            self.optimizer.zero_grad(set_to_none=True)
            return reduced, False
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        return reduced, True

    def _advance_schedule(self) -> None:
        with warnings.catch_warnings():
            # stepping the schedule for a skipped optimizer step is intended (lr follows data)
            warnings.filterwarnings("ignore", message=".*lr_scheduler.step.*")
            self.scheduler.step()

    def _call_hooks(self, point: str) -> None:
        for hook in self.hooks:
            getattr(hook, point)()

    def run_epoch(self) -> None:
        """Train from the current position to the end of the epoch, ``total_iters`` or a stop
        request, then close the epoch (counts, position, ``after_epoch`` hooks)."""
        state = self.state
        batches = self._batches(state.epoch)
        state.epoch_len, state.epoch_done = len(batches), False
        state.epoch_skipped = state.epoch_nonfinite = 0
        self._call_hooks("before_epoch")
        loader = _train_loader(self.train_set, batches[state.iter_in_epoch:], cfg=self.cfg,
                               epoch=state.epoch, pin_memory=self.device.type == "cuda")
        for images, targets, skipped in loader:
            # every rank agrees on stopping and on skipping a batch left empty by bad samples
            empty, stop = dist_utils.all_reduce_max(
                [float(len(images) == 0), float(state.stop_requested)])
            if stop:
                state.stop_reason = "interrupted"
                break
            state.epoch_skipped += skipped
            losses, stepped = self.run_step(images, targets) if not empty else ({}, False)
            state.record_step(losses, stepped, lr=self.optimizer.param_groups[0]["lr"])
            self._advance_schedule()
            self._call_hooks("after_step")
            if state.iteration >= state.total_iters:
                break
        self._end_epoch()

    def _end_epoch(self) -> None:
        state = self.state
        state.epoch_skipped = int(dist_utils.all_reduce_sum([float(state.epoch_skipped)])[0])
        state.skipped_samples += state.epoch_skipped
        if state.epoch_skipped and self.main:
            logger.warning("epoch %d: %d bad sample(s) skipped (unreadable images)",
                           state.epoch + 1, state.epoch_skipped)
        if state.stop_reason != "interrupted" and state.iter_in_epoch >= state.epoch_len:
            state.epoch += 1
            state.iter_in_epoch = 0
            state.epoch_done = True
        self._call_hooks("after_epoch")

    def run(self) -> TrainSummary:
        """Epochs until done, ``total_iters`` or a stop request; the hooks around them."""
        state = self.state
        self.model.train()
        self._call_hooks("before_train")
        try:
            while not state.finished and state.stop_reason != "interrupted":
                self.run_epoch()
        finally:
            self._call_hooks("after_train")
        if state.stop_reason == "finished" and state.epoch < state.max_epochs \
                and state.iteration >= state.total_iters:
            state.stop_reason = "max_iters"
        evaluation = state.evaluation
        return TrainSummary(
            stop_reason=state.stop_reason, signal=state.stop_signal, epoch=state.epoch,
            iteration=state.iteration, iters_per_epoch=state.iters_per_epoch,
            checkpoint=state.checkpoint, output_dir=str(self.output_dir),
            metrics=evaluation.metrics if evaluation else {},
            eval_images=len(evaluation.image_ids) if evaluation else 0,
            eval_skipped=evaluation.skipped if evaluation else [],
            evaluated_at=state.evaluated_at, last_losses=state.last_losses,
            skipped_samples=state.skipped_samples, nonfinite_steps=state.nonfinite_steps)


def train(
    cfg: Config,
    *,
    resume: Union[str, os.PathLike, None] = None,
    device: Union[str, torch.device, None] = None,
    progress: bool = True,
    hooks: Sequence[HookBase] = (),
) -> TrainSummary:
    """Train the experiment ``cfg`` (see the module doc for outputs and guarantees).

    Args:
        resume: a checkpoint written by a previous run (``latest.pth`` / ``epoch_{n}.pth``) to
            continue exactly where it stopped (model, optimizer, schedule, scaler, RNG, epoch and
            position inside the epoch).
        device: ``"cpu"``, ``"cuda"``, ``"cuda:1"``...; default: this process's GPU if any.
        progress: show a tqdm bar (main process only).
        hooks: :class:`~libra_rcnn.engine.hooks.HookBase` instances called after the built-in
            hooks at every point of the loop.

    Returns:
        a :class:`TrainSummary`.

    Raises:
        ConfigError / FileNotFoundError / CheckpointError / DataValidationError and the data
        package's ``BadAnnotationError`` for user errors (each naming the file);
        TrainingDivergedError after too many consecutive non-finite losses.
    """
    info = dist_utils.init_distributed(
        None if device is None else resolve_device(device, dist_utils.DistInfo()).type)
    try:
        trainer = Trainer(cfg, info, device=device, resume=resume, progress=progress,
                          hooks=hooks)
        with _deterministic(cfg.train.deterministic, trainer.device), \
                intra_op_threads(cfg.train.num_threads):
            trainer.setup()
            return trainer.run()
    finally:
        dist_utils.cleanup_distributed(info)
