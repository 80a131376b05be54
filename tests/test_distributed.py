"""DDP: helpers in the single-process case, the reductions across two gloo processes, and a
two-process CPU (gloo) ``torchrun`` run that matches a one-process run over the same global
batch."""

from __future__ import annotations

import json
import multiprocessing
import os
import socket
import subprocess
import sys

import pytest
import torch

from libra_rcnn.config import load_config
from libra_rcnn.data import make_shapes_dataset
from libra_rcnn.engine import distributed as dist_utils
from libra_rcnn.engine.checkpoint import load_checkpoint
from libra_rcnn.engine.train import train
from libra_rcnn.models import build_model


pytestmark = pytest.mark.usefixtures("one_intra_op_thread")


def test_single_process_defaults(monkeypatch):
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    info = dist_utils.init_distributed("cpu")
    assert (info.rank, info.world_size, info.distributed, info.owns_group) == (0, 1, False, False)
    assert dist_utils.get_rank() == 0 and dist_utils.get_world_size() == 1
    assert dist_utils.is_main_process() and not dist_utils.is_distributed()
    dist_utils.barrier()
    dist_utils.cleanup_distributed(info)


def _reduce_worker(rank, port, out_dir):
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2",
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    info = dist_utils.init_distributed("cpu")
    # each rank's own numbers; the expected results are computed by the test from both
    # (inserted in a different order on each rank: the reduction pairs them by name)
    losses = {"b": torch.tensor(2.0 + rank), "a": torch.tensor(0.5 * (rank + 1), requires_grad=True)}
    if rank == 1:
        losses = dict(reversed(list(losses.items())))
    result = {"max": dist_utils.all_reduce_max([float(rank), 1.0 - rank, 7.0]),
              "sum": dist_utils.all_reduce_sum([3.0 + rank, -1.0]),
              "losses": dist_utils.reduce_loss_dict(losses),
              "rank": (dist_utils.get_rank(), dist_utils.get_world_size())}
    (out_dir / f"rank{rank}.json").write_text(json.dumps(result))
    dist_utils.cleanup_distributed(info)


def test_reductions_across_two_processes(tmp_path):
    port = _free_port()
    context = multiprocessing.get_context("fork")
    workers = [context.Process(target=_reduce_worker, args=(rank, port, tmp_path))
               for rank in range(2)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(timeout=120)
        if worker.is_alive():
            worker.kill()
    assert [w.exitcode for w in workers] == [0, 0]
    for rank in range(2):
        result = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert result["rank"] == [rank, 2]
        assert result["max"] == [1.0, 1.0, 7.0]  # elementwise max of [0, 1, 7] and [1, 0, 7]
        assert result["sum"] == [7.0, -2.0]  # [3, -1] + [4, -1]
        assert result["losses"] == {"a": pytest.approx(0.75), "b": pytest.approx(2.5)}  # means


def test_rank_seeds_and_bad_environment(monkeypatch):
    assert [dist_utils.seed_for_rank(10, r) for r in range(3)] == [10, 11, 12]
    with pytest.raises(ValueError, match="seed and rank must be >= 0"):
        dist_utils.seed_for_rank(-1, 0)
    monkeypatch.setenv("WORLD_SIZE", "two")
    with pytest.raises(ValueError, match="WORLD_SIZE must be an integer, got 'two'"):
        dist_utils.init_distributed("cpu")


# RetinaNet normalises its losses per image, and group norm does not look at the batch, so two
# processes x 1 image must reproduce one process x 2 images (gradients averaged by DDP).
DDP_CONFIG = """\
model:
  arch: retinanet
  num_classes: 4
  backbone: resnet18
  backbone_weights: null
  trainable_backbone_layers: 5
  norm: gn
  fpn_channels: 16
  bfp: {{enabled: true, refine_level: 1, refine_type: non_local}}
  retina_box_loss: {{kind: balanced_l1, beta: 0.11}}
  min_size: 64
  max_size: 64
data:
  train_ann: {train_json}
  train_images: {train_images}
  val_ann: null
  val_images: null
  num_workers: 0
  flip_prob: 0.5
  aspect_ratio_grouping: false
train:
  epochs: 1
  batch_size: 1
  base_lr: 0.01
  base_batch_size: 2
  warmup_iters: 2
  lr_steps: [1]
  max_iters: 3
  log_period: 1
  tensorboard: false
  seed: 3
"""


def _losses(out_dir):
    records = [json.loads(line) for line in (out_dir / "log.jsonl").read_text().splitlines()]
    return [r for r in records if r["type"] == "train"]


@pytest.fixture(scope="module")
def ddp_case(tmp_path_factory):
    """The config, and the reference: one process with the global batch of 2 images."""
    root = tmp_path_factory.mktemp("ddp")
    paths = make_shapes_dataset(root / "data", num_train=8, num_val=0, image_size=64, seed=4)
    config = root / "ddp.yaml"
    config.write_text(DDP_CONFIG.format(**paths))
    one = root / "one"
    cfg = load_config(config, ["train.batch_size=2", f"output_dir={one}"])
    train(cfg, device="cpu", progress=False)
    return {"root": root, "config": config, "one": one, "cfg": cfg}


def _assert_same_training(two, one, cfg):
    two_losses, one_losses = _losses(two), _losses(one)
    assert [r["iter"] for r in two_losses] == [r["iter"] for r in one_losses] == [1, 2, 3]
    for a, b in zip(two_losses, one_losses):
        assert a["lr"] == pytest.approx(b["lr"], rel=1e-12)
        for key in ("loss", "classification", "bbox_regression"):
            assert a[key] == pytest.approx(b[key], rel=1e-4, abs=1e-6), (a["iter"], key)
    state_two = load_checkpoint(two / "latest.pth")
    state_one = load_checkpoint(one / "latest.pth")
    assert (state_two["world_size"], state_two["batch_size"]) == (2, 1)
    assert len(state_two["rng"]) == 2  # one generator state per rank
    for name, tensor in state_one["model"].items():
        torch.testing.assert_close(state_two["model"][name], tensor, rtol=1e-4, atol=1e-5,
                                   msg=lambda m: f"{name}: {m}")
    # training moved the weights: the comparison is not between two initialisations
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.train.seed)  # the trainer initialises with train.seed
        initial = build_model(cfg.model).state_dict()
    moved = max((state_one["model"][n] - t).abs().max().item()
                for n, t in initial.items() if t.is_floating_point())
    assert moved > 1e-3


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ddp_worker(rank, port, config, out_dir):
    # what torchrun would set; the forked child already has everything imported
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2",
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    cfg = load_config(config, [f"output_dir={out_dir}"])
    train(cfg, device="cpu", progress=False)


def test_two_process_gloo_training_matches_one_process(ddp_case):
    two = ddp_case["root"] / "two_forked"
    port = _free_port()
    context = multiprocessing.get_context("fork")
    workers = [context.Process(target=_ddp_worker, args=(rank, port, ddp_case["config"], two))
               for rank in range(2)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(timeout=240)
    for worker in workers:
        if worker.is_alive():
            worker.kill()
    assert [w.exitcode for w in workers] == [0, 0]
    _assert_same_training(two, ddp_case["one"], ddp_case["cfg"])


def test_torchrun_cli_matches_one_process(ddp_case):
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env.update(OMP_NUM_THREADS="1")
    two = ddp_case["root"] / "two_torchrun"
    result = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nnodes", "1",
         "--nproc_per_node", "2", "-m", "libra_rcnn", "--quiet", "train",
         str(ddp_case["config"]), "--device", "cpu", "--output-dir", str(two)],
        capture_output=True, text=True, timeout=300, env=env, cwd=ddp_case["root"])
    assert result.returncode == 0, result.stderr[-3000:]
    _assert_same_training(two, ddp_case["one"], ddp_case["cfg"])
