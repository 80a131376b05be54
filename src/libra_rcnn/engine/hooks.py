"""Hooks of the training loop (:class:`libra_rcnn.engine.train.Trainer`).

A hook is called when training starts and ends, before and after every epoch and after every
step. It reads, and may change, ``self.trainer.state`` (a
:class:`~libra_rcnn.engine.train.TrainState`: position, the last step's losses, counters, why
training stopped) and uses the trainer's parts (``model``, ``optimizer``, ``cfg``, ``main``...)::

    hook.before_train()
    for each epoch (or the rest of one, after a resume):
        hook.before_epoch()
        for each batch:
            trainer.run_step(...)        # forward, backward, optimizer step
            hook.after_step()
        hook.after_epoch()               # also when training stops mid-epoch
    hook.after_train()                   # always, also after an error

Every process of a distributed run calls every hook: a hook that writes files does so on the
main process only (``self.trainer.main``), and the ones that communicate (checkpointing,
evaluation) are called on all of them in the same order.

The built-in hooks, in the order the trainer calls them: :class:`SignalHandler` (SIGINT / SIGTERM
stop the run after the current step), :class:`NonFiniteLossPolicy` (stop after too many
non-finite losses in a row), :class:`MetricsWriter` (``log.jsonl`` and TensorBoard),
:class:`ProgressBar`, :class:`Checkpointer` (``latest.pth``, ``epoch_{n}.pth``) and
:class:`Evaluator` (COCO evaluation on the validation set). Extra hooks given to
:func:`~libra_rcnn.engine.train.train` are called after them.
"""

from __future__ import annotations

import json
import logging
import signal
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional

from libra_rcnn.engine import distributed as dist_utils
from libra_rcnn.engine.checkpoint import save_checkpoint

if TYPE_CHECKING:
    from libra_rcnn.engine.train import Trainer

__all__ = [
    "HookBase",
    "SignalHandler",
    "NonFiniteLossPolicy",
    "MetricsWriter",
    "ProgressBar",
    "Checkpointer",
    "Evaluator",
    "TrainingDivergedError",
]

logger = logging.getLogger(__name__)


class TrainingDivergedError(RuntimeError):
    """Too many consecutive non-finite losses; the last good checkpoint was kept."""


class HookBase:
    """Does nothing at every point of the loop; subclasses override the points they need.
    ``trainer`` is set when the trainer takes the hook."""

    trainer: "Trainer"

    def before_train(self) -> None:
        """Once, before the first step (after set-up and any resume)."""

    def before_epoch(self) -> None:
        """Before the epoch's first step; ``state.epoch_len`` is its number of batches."""

    def after_step(self) -> None:
        """After each step; ``state.losses`` is empty when every sample of the batch was bad."""

    def after_epoch(self) -> None:
        """After an epoch, or the part of one that ran; ``state.epoch_done`` says whether it is
        complete, ``state.stop_reason == "interrupted"`` whether a signal stopped it."""

    def after_train(self) -> None:
        """Once, at the end, also when training raised."""


class SignalHandler(HookBase):
    """SIGINT / SIGTERM ask the loop to stop after the current step (``state.request_stop``;
    the other hooks then write ``latest.pth``). A second signal of the same kind falls through to
    the previous handler, so a second Ctrl-C interrupts at once. Handlers can only be installed
    from the main thread; elsewhere this does nothing."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self) -> None:
        self._previous: dict = {}

    def _handle(self, signum, frame) -> None:
        self.trainer.state.request_stop(signum)
        logger.warning("received %s: stopping after the current step (again to abort)",
                       signal.Signals(signum).name)
        signal.signal(signum, self._previous.get(signum, signal.SIG_DFL))

    def before_train(self) -> None:
        if threading.current_thread() is threading.main_thread():
            for signum in self.SIGNALS:
                self._previous[signum] = signal.signal(signum, self._handle)

    def after_train(self) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous = {}


class NonFiniteLossPolicy(HookBase):
    """A step with a non-finite loss or gradient was skipped by the loop (no optimizer step); after
    ``max_consecutive`` in a row this raises :class:`TrainingDivergedError` naming the last
    good checkpoint. Every rank sees the same averaged losses, so all of them stop together."""

    def __init__(self, max_consecutive: int, latest: Path) -> None:
        self.max_consecutive = max_consecutive
        self.latest = latest
        self.consecutive = 0

    def after_step(self) -> None:
        state = self.trainer.state
        if not state.losses:  # no step was taken: no verdict
            return
        if state.stepped:
            self.consecutive = 0
            return
        self.consecutive += 1
        if self.trainer.main:
            logger.warning("iteration %d: non-finite loss or gradients (losses %s), step "
                           "skipped (%d in a row)", state.iteration, state.losses, self.consecutive)
        if self.consecutive >= self.max_consecutive:
            kept = f"; last good checkpoint: {self.latest}" if self.latest.exists() else ""
            raise TrainingDivergedError(
                f"{self.consecutive} consecutive non-finite losses or gradients, last at "
                f"iteration {state.iteration} ({state.losses}){kept}")


class MetricsWriter(HookBase):
    """``log.jsonl`` (one JSON object per line) and TensorBoard scalars under ``tb/``, on the main
    process: a ``{"type": "train", ...}`` record every ``log_period`` iterations (and at the
    first), a ``{"type": "epoch"}`` record after each epoch part that was not interrupted, and
    whatever other hooks :meth:`write` (the evaluator's ``{"type": "val"}`` records)."""

    def __init__(self, output_dir: Path, *, log_period: int, tensorboard: bool,
                 enabled: bool) -> None:
        self.output_dir = output_dir
        self.log_period = log_period
        self.tensorboard = tensorboard
        self.enabled = enabled
        self._file: Any = None
        self._tb: Any = None

    def before_train(self) -> None:
        self._start_time = time.perf_counter()
        self._start_iteration = self.trainer.state.iteration
        if not self.enabled:
            return
        self._file = open(self.output_dir / "log.jsonl", "a")
        if self.tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self._tb = SummaryWriter(log_dir=str(self.output_dir / "tb"))
            except ImportError as exc:  # tensorboard is a dependency, but keep training if absent
                logger.warning("TensorBoard logging disabled: %s", exc)

    def write(self, record: dict, *, step: int, tb_prefix: Optional[str] = None) -> None:
        """Append ``record`` to ``log.jsonl``; with ``tb_prefix`` its numbers also go to
        TensorBoard as ``{tb_prefix}/{key}`` at ``step``."""
        if self._file is None:
            return
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()
        if self._tb is not None and tb_prefix is not None:
            for key, value in record.items():
                if isinstance(value, (int, float)) and key not in ("epoch", "iter", "type"):
                    self._tb.add_scalar(f"{tb_prefix}/{key}", value, step)

    def after_step(self) -> None:
        state = self.trainer.state
        if not state.losses or not (state.iteration % self.log_period == 0
                                    or state.iteration == 1):
            return
        elapsed = time.perf_counter() - self._start_time
        per_iter = elapsed / max(1, state.iteration - self._start_iteration)
        self.write({"type": "train", "epoch": state.epoch + 1, "iter": state.iteration,
                    "lr": state.lr, **state.losses, "stepped": state.stepped,
                    "time_per_iter": per_iter,
                    "eta_s": per_iter * (state.total_iters - state.iteration)},
                   step=state.iteration, tb_prefix="train")

    def after_epoch(self) -> None:
        state = self.trainer.state
        if state.stop_reason == "interrupted":
            return
        self.write({"type": "epoch", "epoch": state.epoch, "iter": state.iteration,
                    "epoch_done": state.epoch_done, "skipped_samples": state.epoch_skipped,
                    "nonfinite_steps": state.epoch_nonfinite}, step=state.iteration)

    def after_train(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
        if self._tb is not None:
            self._tb.close()
            self._tb = None


class ProgressBar(HookBase):
    """A tqdm bar per epoch with the loss and learning rate (when ``enabled``)."""

    def __init__(self, *, enabled: bool) -> None:
        self.enabled = enabled
        self._bar: Any = None

    def before_epoch(self) -> None:
        from tqdm.auto import tqdm

        state = self.trainer.state
        self._bar = tqdm(total=state.epoch_len, initial=state.iter_in_epoch,
                         desc=f"epoch {state.epoch + 1}/{state.max_epochs}",
                         disable=not self.enabled, dynamic_ncols=True, leave=False)

    def after_step(self) -> None:
        state = self.trainer.state
        self._bar.update(1)
        if state.losses and self.enabled:
            self._bar.set_postfix(loss=f"{state.losses['loss']:.4f}", lr=f"{state.lr:.2e}")

    def after_epoch(self) -> None:
        self.after_train()

    def after_train(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None


class Checkpointer(HookBase):
    """After every epoch part: ``latest.pth`` (atomically, on the main process), and
    ``epoch_{n}.pth`` when epoch ``n`` completed and ``n`` is a multiple of ``period`` or the
    last epoch. ``state.checkpoint`` names ``latest.pth``."""

    def __init__(self, output_dir: Path, *, period: int) -> None:
        self.output_dir = output_dir
        self.period = period

    def after_epoch(self) -> None:
        trainer, state = self.trainer, self.trainer.state
        contents = trainer.checkpoint_state()  # collective: every rank calls it
        latest = self.output_dir / "latest.pth"
        if trainer.main:
            if state.epoch_done and (state.epoch % self.period == 0
                                     or state.epoch == state.max_epochs):
                save_checkpoint(self.output_dir / f"epoch_{state.epoch}.pth", contents)
            save_checkpoint(latest, contents)
            logger.info("checkpoint written: %s (epoch %d, iteration %d)", latest, state.epoch,
                        state.iteration)
        dist_utils.barrier()
        state.checkpoint = str(latest)


class Evaluator(HookBase):
    """COCO evaluation (:meth:`Trainer.evaluate`) after every ``period``-th completed epoch and
    when training ends (not when interrupted); the result goes to ``state.evaluation``, a
    ``{"type": "val"}`` record to ``writer``, and unreadable images are named in the log."""

    def __init__(self, *, period: int, writer: MetricsWriter) -> None:
        self.period = period
        self.writer = writer

    def after_epoch(self) -> None:
        trainer, state = self.trainer, self.trainer.state
        if state.stop_reason == "interrupted":
            return
        if not (state.finished or (state.epoch_done and state.epoch % self.period == 0)):
            return
        evaluation = trainer.evaluate()
        state.evaluation, state.evaluated_at = evaluation, state.iteration
        trainer.model.train()
        if trainer.main:
            self._report(evaluation)

    def _report(self, evaluation: Any) -> None:
        from libra_rcnn.engine.evaluate import describe_skipped

        state, metrics = self.trainer.state, evaluation.metrics
        self.writer.write({"type": "val", "epoch": state.epoch, "iter": state.iteration,
                           "images": len(evaluation.image_ids),
                           "skipped_images": len(evaluation.skipped),
                           **{k: float(v) for k, v in metrics.items()}},
                          step=state.iteration, tb_prefix="val")
        if evaluation.skipped:
            logger.warning("val after epoch %d: %d unreadable image(s) not scored:\n  %s",
                           state.epoch, len(evaluation.skipped),
                           "\n  ".join(describe_skipped(evaluation.skipped)))
        logger.info("val after epoch %d on %d image(s): %s", state.epoch,
                    len(evaluation.image_ids),
                    ", ".join(f"{k}={v:.4f}" for k, v in metrics.items()) or "no metrics")
