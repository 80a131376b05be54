"""Training engine: LR schedule, deterministic batching, and the loop's failure handling
(non-finite losses, signals, bad samples, exact resume) with a tiny stand-in detector."""

from __future__ import annotations

import json
import math
import os
import random
import signal

import numpy as np
import pytest
import torch
from torch import nn

import libra_rcnn.models
from libra_rcnn.config import Config, ConfigError, DataConfig, TrainConfig
from libra_rcnn.data import make_shapes_dataset
from libra_rcnn.engine.checkpoint import load_checkpoint
from libra_rcnn.engine.schedule import build_lr_scheduler
from libra_rcnn.engine.hooks import HookBase
from libra_rcnn.engine.train import (
    DataValidationError,
    TrainingDivergedError,
    _EpochSamples,
    epoch_batches,
    scaled_lr,
    train,
)
from libra_rcnn.models import ModelConfig

# ------------------------------------------------------------------------------ schedule


def _lrs(iterations, *, iters_per_epoch=100, base_lr=0.02):
    param = nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.SGD([param], lr=base_lr)
    scheduler = build_lr_scheduler(optimizer, iters_per_epoch=iters_per_epoch, lr_steps=(8, 11),
                                   gamma=0.1, warmup_iters=500, warmup_ratio=1 / 3)
    seen = {}
    for it in range(max(iterations) + 1):
        seen[it] = optimizer.param_groups[0]["lr"]  # the rate used by optimizer step ``it``
        optimizer.step()
        scheduler.step()
    return [seen[i] for i in iterations], scheduler


def test_schedule_values_at_key_iterations():
    lrs, _ = _lrs([0, 250, 499, 500, 799, 800, 1099, 1100, 1199])
    expected = [
        0.02 / 3,  # warm-up starts at ratio 1/3
        0.02 * (1 - 0.5 * (2 / 3)),  # half-way: linear between 1/3 and 1
        0.02 * (1 - (1 / 500) * (2 / 3)),
        0.02,  # warm-up over
        0.02,  # last iteration of epoch 8
        0.002,  # epoch 9: first step
        0.002,
        0.0002,  # epoch 12: second step
        0.0002,
    ]
    assert lrs == pytest.approx(expected, rel=1e-12)


def test_warmup_and_step_multiply_when_they_overlap():
    def factors(iterations, **kwargs):
        optimizer = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=1.0)
        scheduler = build_lr_scheduler(optimizer, iters_per_epoch=100, **kwargs)
        seen = []
        for _ in range(max(iterations) + 1):
            seen.append(optimizer.param_groups[0]["lr"])
            optimizer.step()
            scheduler.step()
        return [seen[i] for i in iterations]

    at_0, at_100 = factors([0, 100], lr_steps=[1], gamma=0.1, warmup_iters=500, warmup_ratio=0.25)
    assert at_0 == pytest.approx(0.25)
    assert at_100 == pytest.approx(0.1 * (1 - 0.8 * 0.75))
    assert factors([0], lr_steps=[], warmup_iters=0) == [1.0]
    with pytest.raises(ValueError, match="factor"):  # torch's LinearLR refuses a zero ratio
        factors([0], lr_steps=[1], warmup_ratio=0.0)


def test_schedule_state_resumes_mid_run():
    _, scheduler = _lrs([1098])  # 1099 steps taken
    param = nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.SGD([param], lr=0.02)
    fresh = build_lr_scheduler(optimizer, iters_per_epoch=100, lr_steps=(8, 11),
                               warmup_iters=500, warmup_ratio=1 / 3)
    # as the trainer resumes: optimizer (holds the current lr) and scheduler (the position)
    optimizer.load_state_dict(scheduler.optimizer.state_dict())
    fresh.load_state_dict(scheduler.state_dict())
    assert fresh.last_epoch == 1099
    assert optimizer.param_groups[0]["lr"] == pytest.approx(0.002)
    optimizer.step()
    fresh.step()
    assert optimizer.param_groups[0]["lr"] == pytest.approx(0.0002)


def test_linear_lr_scaling():
    cfg = Config(train=TrainConfig(base_lr=0.02, base_batch_size=16, batch_size=2))
    assert scaled_lr(cfg, world_size=8) == pytest.approx(0.02)
    assert scaled_lr(cfg, world_size=1) == pytest.approx(0.0025)
    cfg.train.scale_lr = False
    assert scaled_lr(cfg, world_size=1) == 0.02


# ------------------------------------------------------------------------------ batching


def test_epoch_batches_are_deterministic_and_shard_one_permutation():
    kwargs = dict(batch_size=2, seed=5)
    first = epoch_batches(10, epoch=0, **kwargs)
    assert first == epoch_batches(10, epoch=0, **kwargs)
    assert first != epoch_batches(10, epoch=1, **kwargs)
    assert sorted(i for b in first for i in b) == list(range(10))
    shards = [epoch_batches(10, epoch=0, rank=r, world_size=2, **kwargs) for r in range(2)]
    assert len(shards[0]) == len(shards[1]) == 3
    assert sorted(i for shard in shards for b in shard for i in b) == list(range(10))
    # rank r takes every world_size-th element of the same permutation
    flat = [i for b in epoch_batches(10, epoch=0, batch_size=10, seed=5) for i in b]
    assert [i for b in shards[0] for i in b] == flat[0::2]


def test_epoch_batches_group_by_aspect_ratio():
    group_ids = [0, 1] * 6
    batches = epoch_batches(12, batch_size=3, epoch=0, seed=0, group_ids=group_ids)
    assert sorted(i for b in batches for i in b) == list(range(12))
    assert all(len({group_ids[i] for i in b}) == 1 for b in batches)


class _RandomValues(torch.utils.data.Dataset):
    def __len__(self):
        return 5

    def __getitem__(self, index):
        return torch.rand(()).item(), random.random(), np.random.rand()


def test_sample_augmentation_is_seeded_per_sample_and_isolated():
    samples = _EpochSamples(_RandomValues(), seed=3, epoch=1)
    torch.manual_seed(0)
    before = torch.get_rng_state()
    forward = [samples[i] for i in range(5)]
    backward = [samples[i] for i in reversed(range(5))][::-1]
    assert forward == backward  # independent of the order (and so of skipped batches/workers)
    assert torch.equal(torch.get_rng_state(), before)  # global generators untouched
    assert len({v[0] for v in forward}) == 5
    assert _EpochSamples(_RandomValues(), seed=3, epoch=2)[0] != forward[0]


# ------------------------------------------------------------------------------ loop (stand-in)


class _StandInDetector(nn.Module):
    """Training-mode stand-in for a detector: losses depend on the weights and on the images (so
    on the data order and flips). ``scale(call)`` multiplies one loss (NaN to diverge) and may
    have side effects such as sending a signal."""

    def __init__(self, scale):
        super().__init__()
        self.weight = nn.Parameter(torch.tensor([1.0, -2.0, 0.5]))
        self.scale = scale
        self.calls = 0
        self.threads_seen = set()

    def forward(self, images, targets=None):
        self.calls += 1
        self.threads_seen.add(torch.get_num_threads())
        assert all(set(t) == {"boxes", "labels"} for t in targets)
        signal_ = torch.stack([img[:, :, : img.shape[-1] // 2].mean() for img in images]).mean()
        loss = (self.weight ** 2).sum() * signal_
        return {"loss_a": loss * self.scale(self.calls), "loss_b": self.weight.abs().sum() * 0.1}


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    root = tmp_path_factory.mktemp("shapes")
    return make_shapes_dataset(root, num_train=8, num_val=2, image_size=48, seed=0)


def _config(shapes, out, **train):
    settings = dict(epochs=2, batch_size=2, base_lr=0.1, base_batch_size=2, warmup_iters=2,
                    lr_steps=[1], log_period=1, tensorboard=False, max_consecutive_nonfinite=3,
                    seed=7)
    settings.update(train)
    return Config(
        model=ModelConfig(num_classes=4),
        data=DataConfig(train_ann=shapes["train_json"], train_images=shapes["train_images"],
                        val_ann=None, val_images=None, num_workers=0, flip_prob=0.5,
                        aspect_ratio_grouping=True),
        train=TrainConfig(**settings),
        output_dir=str(out),
    )


def _use_stand_in(monkeypatch, scale=lambda call: 1.0):
    made = []

    def build(cfg):
        made.append(_StandInDetector(scale))
        return made[-1]

    monkeypatch.setattr(libra_rcnn.models, "build_model", build)
    return made


def _records(out, kind="train"):
    lines = (out / "log.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r["type"] == kind]


def test_fixed_seed_run_and_checkpoints(shapes, tmp_path, monkeypatch):
    made = _use_stand_in(monkeypatch)
    summary = train(_config(shapes, tmp_path / "a"), device="cpu", progress=False)
    assert summary.stop_reason == "finished"
    assert (summary.epoch, summary.iteration, summary.iters_per_epoch) == (2, 8, 4)
    assert sorted(p.name for p in (tmp_path / "a").glob("*.pth")) == \
        ["epoch_1.pth", "epoch_2.pth", "latest.pth"]
    state = load_checkpoint(tmp_path / "a" / "latest.pth")
    assert (state["epoch"], state["iter_in_epoch"], state["iteration"]) == (2, 0, 8)
    assert state["class_names"] == ["circle", "square", "triangle"]
    assert torch.equal(state["model"]["weight"], made[0].weight.detach())
    records = _records(tmp_path / "a")
    assert [r["iter"] for r in records] == list(range(1, 9))
    # lr: warm-up (2 iterations from 1/3) then x0.1 after epoch 1 (iteration 4)
    assert [r["lr"] for r in records[:6]] == pytest.approx([0.1 / 3, 0.1 * (1 - 0.5 * 2 / 3), 0.1,
                                                            0.1, 0.01, 0.01])
    _use_stand_in(monkeypatch)
    again = train(_config(shapes, tmp_path / "b"), device="cpu", progress=False)
    assert [r["loss"] for r in _records(tmp_path / "b")] == [r["loss"] for r in records]
    assert again.last_losses == summary.last_losses


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_signal_checkpoints_mid_epoch_and_resume_continues_exactly(shapes, tmp_path, monkeypatch,
                                                                   signum):
    _use_stand_in(monkeypatch)
    train(_config(shapes, tmp_path / "full"), device="cpu", progress=False)
    full = _records(tmp_path / "full")

    def interrupt_on_call_6(call):
        if call == 6:
            os.kill(os.getpid(), signum)
        return 1.0

    handler_before = signal.getsignal(signum)
    _use_stand_in(monkeypatch, interrupt_on_call_6)
    out = tmp_path / "cut"
    summary = train(_config(shapes, out), device="cpu", progress=False)
    assert signal.getsignal(signum) is handler_before
    assert (summary.stop_reason, summary.signal) == ("interrupted", signum)
    assert summary.iteration == 6  # the step in progress was finished, no further one
    state = load_checkpoint(out / "latest.pth")
    assert (state["epoch"], state["iter_in_epoch"], state["iteration"]) == (1, 2, 6)
    assert not (out / "epoch_2.pth").exists()

    made = _use_stand_in(monkeypatch)
    resumed = train(_config(shapes, out), device="cpu", progress=False, resume=out / "latest.pth")
    assert resumed.stop_reason == "finished" and resumed.iteration == 8
    assert made[0].calls == 2
    records = _records(out)
    assert [r["iter"] for r in records] == list(range(1, 9))
    assert [r["loss"] for r in records] == [r["loss"] for r in full]
    assert torch.equal(load_checkpoint(out / "latest.pth")["model"]["weight"],
                       load_checkpoint(tmp_path / "full" / "latest.pth")["model"]["weight"])


class _Recorder(HookBase):
    """A user's hook: records what it is told, and asks to stop after ``stop_at`` iterations."""

    def __init__(self, stop_at=None):
        self.stop_at = stop_at
        self.events = []
        self.losses = {}

    def before_train(self):
        self.events.append(("before_train", self.trainer.state.iteration))

    def before_epoch(self):
        self.events.append(("before_epoch", self.trainer.state.epoch))

    def after_step(self):
        state = self.trainer.state
        self.losses[state.iteration] = state.losses["loss"]
        if state.iteration == self.stop_at:
            state.request_stop()

    def after_epoch(self):
        state = self.trainer.state
        self.events.append(("after_epoch", state.epoch, state.epoch_done, state.checkpoint))

    def after_train(self):
        self.events.append(("after_train", self.trainer.state.iteration))


def test_a_users_hook_sees_every_step_and_can_stop_the_run(shapes, tmp_path, monkeypatch):
    _use_stand_in(monkeypatch)
    recorder = _Recorder()
    summary = train(_config(shapes, tmp_path / "a"), device="cpu", progress=False,
                    hooks=[recorder])
    latest = str(tmp_path / "a" / "latest.pth")
    # called after the built-in hooks: the epoch's checkpoint is already written
    assert recorder.events == [("before_train", 0), ("before_epoch", 0),
                               ("after_epoch", 1, True, latest), ("before_epoch", 1),
                               ("after_epoch", 2, True, latest), ("after_train", 8)]
    assert recorder.losses == {r["iter"]: r["loss"] for r in _records(tmp_path / "a")}
    assert summary.stop_reason == "finished"

    # a stop asked by a hook: the step finishes, latest.pth is written, resume continues
    _use_stand_in(monkeypatch)
    stopper = _Recorder(stop_at=3)
    stopped = train(_config(shapes, tmp_path / "b"), device="cpu", progress=False,
                    hooks=[stopper])
    assert (stopped.stop_reason, stopped.signal, stopped.iteration) == ("interrupted", None, 3)
    assert stopper.events[-2:] == [("after_epoch", 0, False, str(tmp_path / "b" / "latest.pth")),
                                   ("after_train", 3)]
    assert load_checkpoint(tmp_path / "b" / "latest.pth")["iteration"] == 3
    _use_stand_in(monkeypatch)
    train(_config(shapes, tmp_path / "b"), device="cpu", progress=False,
          resume=tmp_path / "b" / "latest.pth")
    assert [r["loss"] for r in _records(tmp_path / "b")] == [r["loss"] for r in
                                                              _records(tmp_path / "a")]


def test_non_finite_losses_skip_the_step(shapes, tmp_path, monkeypatch):
    made = _use_stand_in(monkeypatch, lambda call: float("nan") if call in (2, 3) else 1.0)
    summary = train(_config(shapes, tmp_path, epochs=1), device="cpu", progress=False)
    assert summary.stop_reason == "finished" and summary.nonfinite_steps == 2
    records = _records(tmp_path)
    assert [r["stepped"] for r in records] == [True, False, False, True]
    assert all(torch.isfinite(made[0].weight).tolist())
    assert _records(tmp_path, "epoch")[0]["nonfinite_steps"] == 2


class _NaNGradientStandIn(_StandInDetector):
    """On its second call, a finite loss whose gradient is NaN: sqrt(0 * w) is 0, its
    derivative 0 / (2 sqrt(0)) is not a number."""

    def forward(self, images, targets=None):
        losses = super().forward(images, targets)
        if self.calls == 2:
            losses["loss_b"] = losses["loss_b"] + torch.sqrt(self.weight.sum() * 0.0)
        return losses


@pytest.mark.parametrize("clip", [None, 10.0])
def test_a_finite_loss_with_non_finite_gradients_skips_the_step(shapes, tmp_path, monkeypatch,
                                                                 clip):
    made = []
    monkeypatch.setattr(libra_rcnn.models, "build_model",
                        lambda cfg: made.append(_NaNGradientStandIn(lambda call: 1.0)) or made[-1])
    summary = train(_config(shapes, tmp_path, epochs=1, grad_clip_norm=clip), device="cpu",
                    progress=False)
    assert summary.nonfinite_steps == 1
    records = _records(tmp_path)
    assert all(math.isfinite(r["loss"]) for r in records)
    assert [r["stepped"] for r in records] == [True, False, True, True]
    assert all(torch.isfinite(made[0].weight).tolist())


def test_too_many_non_finite_losses_stop_and_keep_the_last_good_checkpoint(shapes, tmp_path,
                                                                          monkeypatch):
    _use_stand_in(monkeypatch, lambda call: float("inf") if call > 5 else 1.0)
    with pytest.raises(TrainingDivergedError, match=r"3 consecutive non-finite losses.*iteration 8"
                                                     r".*last good checkpoint: .*latest\.pth"):
        train(_config(shapes, tmp_path, epochs=3), device="cpu", progress=False)
    state = load_checkpoint(tmp_path / "latest.pth")
    assert (state["epoch"], state["iteration"]) == (1, 4)
    assert torch.isfinite(state["model"]["weight"]).all()


def test_max_iters_stops_mid_epoch_with_a_checkpoint(shapes, tmp_path, monkeypatch):
    made = _use_stand_in(monkeypatch)
    threads_before = torch.get_num_threads()
    wanted = 2 if threads_before == 1 else 1
    summary = train(_config(shapes, tmp_path, max_iters=3, num_threads=wanted), device="cpu",
                    progress=False)
    assert made[0].threads_seen == {wanted}  # train.num_threads applies while training ...
    assert torch.get_num_threads() == threads_before  # ... and only then
    assert (summary.stop_reason, summary.iteration) == ("max_iters", 3)
    state = load_checkpoint(tmp_path / "latest.pth")
    assert (state["epoch"], state["iter_in_epoch"]) == (0, 3)


def test_unreadable_images_are_skipped_counted_or_refused_with_strict(shapes, tmp_path,
                                                                     monkeypatch):
    root = tmp_path / "data"
    paths = make_shapes_dataset(root, num_train=8, num_val=0, image_size=48, seed=1)
    broken = os.path.join(paths["train_images"], "000003.png")
    with open(broken, "wb") as f:
        f.write(b"not a png")
    _use_stand_in(monkeypatch)
    summary = train(_config(paths, tmp_path / "run"), device="cpu", progress=False)
    assert summary.skipped_samples == 2  # once per epoch
    assert [r["skipped_samples"] for r in _records(tmp_path / "run", "epoch")] == [1, 1]

    cfg = _config(paths, tmp_path / "strict")
    cfg.data.strict = True
    with pytest.raises(DataValidationError, match=rf"^{broken}: "):
        train(cfg, device="cpu", progress=False)


def test_class_count_mismatch_and_missing_files_are_user_errors(shapes, tmp_path, monkeypatch):
    _use_stand_in(monkeypatch)
    cfg = _config(shapes, tmp_path)
    cfg.model.num_classes = 3
    with pytest.raises(ConfigError, match=r"train\.json: has 3 classes, so model\.num_classes "
                                          r"must be 4 .*--set model\.num_classes=4"):
        train(cfg, device="cpu", progress=False)
    cfg = _config(shapes, tmp_path)
    cfg.data.train_ann = str(tmp_path / "missing.json")
    with pytest.raises(FileNotFoundError) as info:
        train(cfg, device="cpu", progress=False)
    assert info.value.filename == str(tmp_path / "missing.json")
