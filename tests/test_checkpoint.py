"""Checkpoints: atomic writes, weights-only loading with clear errors, model rebuilding."""

from __future__ import annotations

import dataclasses
import errno
import random

import numpy as np
import pytest
import torch

from libra_rcnn.config import config_to_dict
from libra_rcnn.engine import checkpoint as ckpt
from libra_rcnn.engine.checkpoint import (
    CHECKPOINT_FORMAT,
    CheckpointError,
    capture_rng_state,
    load_checkpoint,
    load_model_from_checkpoint,
    restore_rng_state,
    save_checkpoint,
)
from libra_rcnn.models import build_model, libra_model_config


def _state(**extra):
    return {"format": CHECKPOINT_FORMAT, "format_version": 1,
            "model": {"w": torch.arange(4.0)}, "model_config": {}, **extra}


def _tiny_model_config(**overrides):
    return libra_model_config("faster_rcnn", "resnet18", num_classes=3, norm="gn",
                              trainable_backbone_layers=5, fpn_channels=16, min_size=64,
                              max_size=64, representation_size=32, **overrides)


def test_round_trip_of_plain_containers_and_rng_states(tmp_path):
    rng = capture_rng_state()
    state = _state(class_names=["a", "b"], label_to_cat_id={1: 7, 2: 9}, epoch=3,
                   rng=[rng], optimizer={"state": {0: {"momentum_buffer": torch.ones(2)}},
                                         "param_groups": [{"lr": 0.1, "params": [0]}]})
    path = save_checkpoint(tmp_path / "sub" / "c.pth", state)
    loaded = load_checkpoint(path)
    assert loaded["label_to_cat_id"] == {1: 7, 2: 9}
    assert loaded["class_names"] == ["a", "b"] and loaded["epoch"] == 3
    assert torch.equal(loaded["model"]["w"], torch.arange(4.0))
    assert torch.equal(loaded["optimizer"]["state"][0]["momentum_buffer"], torch.ones(2))
    assert list(tmp_path.joinpath("sub").iterdir()) == [path]  # no temporary file left


def test_rng_state_restores_every_generator(tmp_path):
    torch.manual_seed(1)
    random.seed(2)
    np.random.seed(3)
    np.random.standard_normal()  # leaves a cached gaussian in numpy's state
    state = capture_rng_state()
    save_checkpoint(tmp_path / "rng.pth", _state(rng=state))
    expected = (torch.rand(3), random.random(), np.random.rand(), np.random.standard_normal())
    restore_rng_state(load_checkpoint(tmp_path / "rng.pth")["rng"])
    again = (torch.rand(3), random.random(), np.random.rand(), np.random.standard_normal())
    assert torch.equal(expected[0], again[0]) and expected[1:] == again[1:]


def test_failed_write_keeps_the_old_file_and_leaves_no_temporary(tmp_path, monkeypatch):
    path = tmp_path / "latest.pth"
    save_checkpoint(path, _state(epoch=1))

    def disk_full(state, fileobj):
        fileobj.write(b"PK\x03\x04 half a checkpoint")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(ckpt, "_serialize", disk_full)
    with pytest.raises(CheckpointError, match=rf"{path}: cannot write checkpoint: No space left"):
        save_checkpoint(path, _state(epoch=2))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["latest.pth"]
    assert load_checkpoint(path)["epoch"] == 1


def test_writer_errors_from_torch_are_reported_too(tmp_path, monkeypatch):
    def zip_writer_failure(state, fileobj):
        fileobj.write(b"PK\x03\x04")
        raise RuntimeError("PytorchStreamWriter failed writing file data/0: file write failed")

    monkeypatch.setattr(ckpt, "_serialize", zip_writer_failure)
    with pytest.raises(CheckpointError, match=r"x\.pth: cannot write checkpoint: PytorchStreamWriter"):
        save_checkpoint(tmp_path / "x.pth", _state())
    assert list(tmp_path.iterdir()) == []


def test_interrupted_write_is_cleaned_up_and_reraised(tmp_path, monkeypatch):
    def interrupted(state, fileobj):
        raise KeyboardInterrupt

    monkeypatch.setattr(ckpt, "_serialize", interrupted)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(tmp_path / "x.pth", _state())
    assert list(tmp_path.iterdir()) == []


class _WritesMarker:
    """Unpickling this would call ``open(marker, "w")``, creating the marker file."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_pickled_objects_are_refused_and_not_executed(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pth"
    torch.save(_state(payload=_WritesMarker(marker)), path)
    assert not marker.exists()
    with pytest.raises(CheckpointError, match=rf"^{path}: refused to load: .*pickled Python objects"):
        load_checkpoint(path)
    assert not marker.exists()


def test_unreadable_files_name_the_file_and_the_problem(tmp_path):
    with pytest.raises(CheckpointError, match=rf"^{tmp_path / 'none.pth'}: no such checkpoint file"):
        load_checkpoint(tmp_path / "none.pth")
    with pytest.raises(CheckpointError, match="is a directory"):
        load_checkpoint(tmp_path)
    empty = tmp_path / "empty.pth"
    empty.write_bytes(b"")
    with pytest.raises(CheckpointError, match=rf"^{empty}: empty file"):
        load_checkpoint(empty)
    garbage = tmp_path / "garbage.pth"
    for junk in (b"this is not a checkpoint at all", b"definitely not torch"):
        garbage.write_bytes(junk)  # the second one starts like a pickle stream
        with pytest.raises(CheckpointError, match=rf"^{garbage}: not a PyTorch checkpoint"):
            load_checkpoint(garbage)
    good = save_checkpoint(tmp_path / "good.pth", _state(big=torch.zeros(10_000)))
    truncated = tmp_path / "truncated.pth"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    with pytest.raises(CheckpointError, match=rf"^{truncated}: truncated or corrupted"):
        load_checkpoint(truncated)
    bare = tmp_path / "bare.pth"
    torch.save({"weight": torch.ones(2)}, bare)
    with pytest.raises(CheckpointError, match=rf"^{bare}: not a libra-rcnn checkpoint"):
        load_checkpoint(bare)
    newer = save_checkpoint(tmp_path / "newer.pth", {**_state(), "format_version": 99})
    with pytest.raises(CheckpointError, match="format version 99 is newer"):
        load_checkpoint(newer)


def test_model_is_rebuilt_from_the_stored_config(tmp_path):
    cfg = _tiny_model_config()
    torch.manual_seed(0)
    model = build_model(cfg)
    path = save_checkpoint(tmp_path / "m.pth", _state(
        model=model.state_dict(), model_config=config_to_dict(cfg), class_names=["x", "y"],
        label_to_cat_id={1: 1, 2: 2}, optimizer={}, rng=[]))
    rebuilt, meta = load_model_from_checkpoint(path)
    assert not rebuilt.training
    assert meta["class_names"] == ["x", "y"] and meta["model_config"] == cfg
    assert "model" not in meta and "optimizer" not in meta and "rng" not in meta
    for name, tensor in model.state_dict().items():
        assert torch.equal(rebuilt.state_dict()[name], tensor), name
    images = [torch.rand(3, 64, 64)]
    model.eval()
    with torch.no_grad():
        assert torch.equal(model(images)[0]["scores"], rebuilt(images)[0]["scores"])

    # test-time settings may differ from the stored ones; structure may not
    relaxed, _ = load_model_from_checkpoint(path, expected=dataclasses.replace(cfg, box_score_thresh=0.3))
    assert relaxed.roi_heads.score_thresh == 0.3
    other = dataclasses.replace(cfg, num_classes=5, bfp=dataclasses.replace(cfg.bfp, enabled=False))
    with pytest.raises(CheckpointError) as info:
        load_model_from_checkpoint(path, expected=other)
    message = str(info.value)
    assert message.startswith(f"{path}: checkpoint is from another model")
    assert "model.num_classes: checkpoint has 3, config has 5" in message
    assert "model.bfp" in message


def test_weights_that_do_not_fit_are_reported(tmp_path):
    cfg = _tiny_model_config()
    wrong = build_model(dataclasses.replace(cfg, representation_size=16)).state_dict()
    path = save_checkpoint(tmp_path / "w.pth", _state(model=wrong, model_config=config_to_dict(cfg)))
    with pytest.raises(CheckpointError, match=rf"^{path}: weights do not fit the model"):
        load_model_from_checkpoint(path)
