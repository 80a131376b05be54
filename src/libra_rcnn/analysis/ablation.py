"""Ablation runner: train and evaluate config variants with one seed and budget (Tables 2, 4-6).

Each variant is a list of ``key=value`` overrides of the base config (the same strings as
``--set``). Every variant is trained with :func:`libra_rcnn.engine.train.train` from the same
seed for the same budget, then its final checkpoint is evaluated on the validation set with
:func:`libra_rcnn.engine.evaluate.evaluate`; the results form a table in the paper's layout
(AP, AP50, AP75, APs, APm, APl, x100).

Layout under ``output_dir``::

    ablation.md              the table (markdown), rewritten after every variant
    ablation.json            base config, budget, seed and every variant's overrides and metrics
    <variant>/               the variant's training run (config.yaml, log.jsonl, latest.pth, ...)
    <variant>/metrics.json   its evaluation; present = done
    <variant>/val_results.json  its COCO detections on the validation set

Resuming: a variant whose ``metrics.json`` exists is not run again (its overrides must equal the
requested ones, else ``ValueError``: pick another ``output_dir``); a variant with a
``latest.pth`` but no metrics resumes training from it. During training the validation set is not
evaluated (the train config's ``data.val_*`` are set to null); the one evaluation is the final
checkpoint's.

The ready-made tables (:data:`ABLATION_TABLES`) start every row from :data:`BASELINE_OVERRIDES`,
which switches all Libra parts off, so a row means the same whatever the base config switches
on. Table 2 adds the components cumulatively, as the paper does; Tables 4-6 vary one component
on the baseline. ``libra_cascade`` adds them cumulatively to Cascade R-CNN (run it on a
``cascade_rcnn`` config).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import re
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence, Union

from ..errors import UserInputError
from ..io_utils import atomic_write_text

PathLike = Union[str, os.PathLike]

__all__ = [
    "AblationInterrupted",
    "ABLATION_TABLES",
    "ABLATION_TITLES",
    "BASELINE_OVERRIDES",
    "variant_dir_name",
    "evaluate_checkpoint",
    "train_variant",
    "run_ablation",
]

logger = logging.getLogger(__name__)

#: Every Libra part off: random RoI sampling, FPN without BFP, smooth L1 with weight 1.
BASELINE_OVERRIDES: tuple[str, ...] = (
    "model.roi_sampler.pos_balance=false",
    "model.roi_sampler.neg_balance=false",
    "model.roi_sampler.num_bins=3",
    "model.neck=fpn",
    "model.bfp.enabled=false",
    "model.box_loss.kind=smooth_l1",
    "model.box_loss.beta=1.0",
    "model.box_loss.loss_weight=1.0",
)

_IOU_BALANCED = ("model.roi_sampler.pos_balance=true", "model.roi_sampler.neg_balance=true")
_BFP = ("model.bfp.enabled=true", "model.bfp.refine_level=2", "model.bfp.refine_type=non_local")
_BALANCED_L1 = ("model.box_loss.kind=balanced_l1", "model.box_loss.alpha=0.5",
                "model.box_loss.gamma=1.5")


# Cascade R-CNN: IoU-balanced negatives binned over each stage's own IoU range (below the
# stage's threshold) and the RPN's negatives capped as in Libra Faster R-CNN
_CASCADE_SAMPLING = (*_IOU_BALANCED, "model.roi_sampler.binning=negatives", "model.rpn_neg_pos_ub=5.0")
_CASCADE_BASELINE = ("model.rpn_neg_pos_ub=-1",)


def _row(*parts: Sequence[str]) -> list[str]:
    return [*BASELINE_OVERRIDES, *(o for part in parts for o in part)]


def _balanced_l1(alpha: float, gamma: float) -> list[str]:
    return _row(("model.box_loss.kind=balanced_l1", f"model.box_loss.alpha={alpha}",
                 f"model.box_loss.gamma={gamma}"))


#: Variant lists of the paper's ablation tables: table -> {row name -> overrides}.
ABLATION_TABLES: dict[str, dict[str, list[str]]] = {
    # Table 2: components added one after another
    "table2": {
        "Baseline": _row(),
        "+ IoU-balanced sampling": _row(_IOU_BALANCED),
        "+ balanced feature pyramid": _row(_IOU_BALANCED, _BFP),
        "+ balanced L1 loss": _row(_IOU_BALANCED, _BFP, _BALANCED_L1),
    },
    # Table 4: instance-balanced positives alone, then IoU-balanced negatives with K bins
    "table4": {
        "Baseline": _row(),
        "Pos Balance": _row(("model.roi_sampler.pos_balance=true",)),
        "K = 2": _row(_IOU_BALANCED, ("model.roi_sampler.num_bins=2",)),
        "K = 3": _row(_IOU_BALANCED, ("model.roi_sampler.num_bins=3",)),
        "K = 5": _row(_IOU_BALANCED, ("model.roi_sampler.num_bins=5",)),
    },
    # Table 5: BFP without refinement, with non-local refinement, PAFPN, and both
    "table5": {
        "Baseline": _row(),
        "Integration": _row(("model.bfp.enabled=true", "model.bfp.refine_type=none")),
        "Refinement": _row(_BFP),
        "PAFPN": _row(("model.neck=pafpn",)),
        "Balanced PAFPN": _row(("model.neck=pafpn",), _BFP),
    },
    # Table 6: loss weight of smooth L1, L1 with weights, balanced L1 alpha / gamma
    "table6": {
        "Baseline": _row(),
        "loss weight = 1.5": _row(("model.box_loss.loss_weight=1.5",)),
        "loss weight = 2.0": _row(("model.box_loss.loss_weight=2.0",)),
        "L1 Loss (1.0)": _row(("model.box_loss.kind=l1", "model.box_loss.loss_weight=1.0")),
        "L1 Loss (1.5)": _row(("model.box_loss.kind=l1", "model.box_loss.loss_weight=1.5")),
        "L1 Loss (2.0)": _row(("model.box_loss.kind=l1", "model.box_loss.loss_weight=2.0")),
        "alpha = 0.2, gamma = 1.0": _balanced_l1(0.2, 1.0),
        "alpha = 0.3, gamma = 1.0": _balanced_l1(0.3, 1.0),
        "alpha = 0.5, gamma = 1.0": _balanced_l1(0.5, 1.0),
        "alpha = 0.5, gamma = 1.5": _balanced_l1(0.5, 1.5),
        "alpha = 0.5, gamma = 2.0": _balanced_l1(0.5, 2.0),
    },
    # Libra Cascade R-CNN: Table 2's components added one after another on Cascade R-CNN
    # (base config cascade_rcnn_r50_fpn_1x_coco); the last row is libra_cascade_rcnn_r50_fpn_1x_coco
    "libra_cascade": {
        "Cascade R-CNN": _row(_CASCADE_BASELINE),
        "+ IoU-balanced sampling": _row(_CASCADE_BASELINE, _CASCADE_SAMPLING),
        "+ balanced feature pyramid": _row(_CASCADE_BASELINE, _CASCADE_SAMPLING, _BFP),
        "+ balanced L1 loss": _row(_CASCADE_BASELINE, _CASCADE_SAMPLING, _BFP, _BALANCED_L1),
    },
}

ABLATION_TITLES = {
    "table2": "Table 2: effects of each component",
    "table4": "Table 4: IoU-balanced sampling",
    "table5": "Table 5: balanced feature pyramid",
    "table6": "Table 6: balanced L1 loss",
    "libra_cascade": "Libra Cascade R-CNN: effects of each component on Cascade R-CNN",
}


class AblationInterrupted(RuntimeError):
    """Training of a variant was interrupted (SIGINT/SIGTERM); ``latest.pth`` was written and a
    rerun resumes it. ``signal`` is the signal number (or ``None``)."""

    def __init__(self, message: str, signal: Optional[int] = None) -> None:
        super().__init__(message)
        self.signal = signal


def variant_dir_name(name: str) -> str:
    """Folder name of a variant: lower case, runs of other characters than ``[a-z0-9.]`` become
    ``_`` (``"alpha = 0.5, gamma = 1.5"`` -> ``"alpha_0.5_gamma_1.5"``)."""
    slug = re.sub(r"[^a-z0-9.]+", "_", name.lower()).strip("_.")
    if not slug:
        raise UserInputError(f"variant name {name!r} has no letters or digits to name its folder")
    return slug


def _check_variants(variants: Mapping[str, Sequence[str]]) -> dict[str, list[str]]:
    if not isinstance(variants, Mapping) or not variants:
        raise UserInputError("variants must be a non-empty mapping of name -> list of overrides")
    checked: dict[str, list[str]] = {}
    folders: dict[str, str] = {}
    for name, overrides in variants.items():
        if not isinstance(name, str) or not name.strip():
            raise UserInputError(f"variants: names must be non-empty strings, got {name!r}")
        if isinstance(overrides, str) or not all(isinstance(o, str) and "=" in o for o in overrides):
            raise UserInputError(f"variants[{name!r}] must be a list of 'key=value' strings, got "
                             f"{overrides!r}")
        folder = variant_dir_name(name)
        if folder in folders:
            raise UserInputError(f"variants {folders[folder]!r} and {name!r} would share the folder "
                             f"{folder!r}; rename one")
        folders[folder] = name
        checked[name] = list(overrides)
    return checked


# ----------------------------------------------------------------------------------------------
# One variant: train, evaluate


def train_variant(cfg: Any, *, resume: Optional[PathLike], device: Any, progress: bool) -> Any:
    """Train one variant (:func:`libra_rcnn.engine.train.train`); returns its
    :class:`~libra_rcnn.engine.train.TrainSummary`."""
    from libra_rcnn.engine.train import train

    return train(cfg, resume=resume, device=device, progress=progress)


def _default_device(device: Any) -> "torch.device":
    import torch

    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def evaluate_checkpoint(cfg: Any, checkpoint: PathLike, *, device: Any = None,
                        results_file: Optional[PathLike] = None, progress: bool = False) -> dict:
    """COCO metrics of ``checkpoint`` on ``cfg``'s validation set (:func:`evaluate`).

    The model is rebuilt with :func:`load_model_from_checkpoint` (``expected=cfg.model``: its
    structure must match, test-time settings come from ``cfg``); the data loader is un-augmented,
    ``cfg.data.val_batch_size`` images per batch. RPN-only models get proposal AR instead of AP.
    Unreadable validation images are not scored; a warning names them.
    """
    from libra_rcnn.engine.checkpoint import load_model_from_checkpoint
    from libra_rcnn.engine.distributed import DistInfo
    from libra_rcnn.engine.evaluate import describe_skipped, evaluate
    from libra_rcnn.engine.train import build_dataset, build_val_loader

    if cfg.data.val_ann is None or cfg.data.val_images is None:
        raise UserInputError("data.val_ann / data.val_images: the ablation needs a validation set")
    device = _default_device(device)
    loader = build_val_loader(build_dataset(cfg, train=False), cfg=cfg, info=DistInfo())
    model, _ = load_model_from_checkpoint(checkpoint, expected=cfg.model, device=device)
    evaluation = evaluate(model, loader, device=device, results_file=results_file,
                          proposals=cfg.model.arch == "rpn", progress=progress)
    if evaluation.skipped:
        logger.warning("%s: %d unreadable validation image(s) not scored:\n  %s", checkpoint,
                       len(evaluation.skipped), "\n  ".join(describe_skipped(evaluation.skipped)))
    return evaluation.metrics


def _write_json(path: Path, data: Any) -> None:
    """Atomic JSON write (temporary file + rename), so a crash never leaves half a file."""
    atomic_write_text(path, json.dumps(data, indent=2) + "\n")


# ----------------------------------------------------------------------------------------------
# The table


def _table(rows: Sequence[tuple[str, Mapping[str, float]]]) -> str:
    """Markdown rows in the paper's layout (AP ... APl, x100); RPN-only variants (proposal AR,
    no AP) get their own metrics as columns."""
    from libra_rcnn.engine.evaluate import PAPER_METRIC_NAMES, format_metrics_table

    first = rows[0][1]
    keys = PAPER_METRIC_NAMES if all(k in first for k in PAPER_METRIC_NAMES) else tuple(first)
    lines = []
    for i, (name, metrics) in enumerate(rows):
        lines.append(format_metrics_table(metrics, keys=keys, name=name.replace("|", "\\|"),
                                          header=i == 0))
    return "\n".join(lines)


def _write_outputs(output_dir: Path, *, title: Optional[str], base: str, shared: list[str],
                   budget: dict, seed: int, done: list[dict]) -> str:
    metric_rows = [(entry["name"], entry["metrics"]) for entry in done]
    table = _table(metric_rows) if metric_rows else ""
    header = [f"# {title}" if title else "# Ablation", "",
              f"Base config: `{base}`; seed {seed}; budget: "
              + ", ".join(f"{k}={v}" for k, v in budget.items()) + ".",
              "Metrics: COCO bbox on the validation set, x100.", "", ""]
    atomic_write_text(output_dir / "ablation.md", "\n".join(header) + table + "\n")
    _write_json(output_dir / "ablation.json", {
        "title": title, "base_config": base, "shared_overrides": shared, "budget": budget,
        "seed": seed, "variants": done})
    return table


def run_ablation(
    base_config: Union[str, os.PathLike, Any],
    variants: Mapping[str, Sequence[str]],
    *,
    output_dir: PathLike,
    overrides: Sequence[str] = (),
    epochs: Optional[int] = None,
    max_iters: Optional[int] = None,
    seed: int = 0,
    device: Any = None,
    title: Optional[str] = None,
    progress: bool = False,
) -> str:
    """Train and evaluate every variant; write ``ablation.md`` / ``ablation.json``.

    Args:
        base_config: a config file, a shipped config's name, or a :class:`~libra_rcnn.config.Config`
            (written to ``output_dir/base_config.yaml`` first).
        variants: ``{row name: ["key=value", ...]}``, e.g. ``ABLATION_TABLES["table2"]``.
        output_dir: where everything is written (see the module doc).
        overrides: ``key=value`` overrides shared by all variants, applied before the variant's
            (dataset paths, ``model.num_classes``, ``data.num_workers``...).
        epochs, max_iters: the training budget (``train.epochs`` / ``train.max_iters``); ``None``
            keeps the config's.
        seed: ``train.seed`` of every variant.
        device: training / evaluation device (default: CUDA if available).
        title: heading of ``ablation.md``.
        progress: show training / inference progress bars.

    Returns:
        the markdown table, one row per variant in ``variants`` order.

    Raises:
        ValueError / ConfigError for bad variants or overrides (checked for every variant before
        any training); AblationInterrupted when a variant's training is interrupted (the table
        of the finished variants is written first).
    """
    from libra_rcnn.config import Config, dump_config

    variants = _check_variants(variants)
    shared = list(overrides)
    _check_run_arguments(shared, epochs=epochs, max_iters=max_iters, seed=seed)
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    if isinstance(base_config, Config):
        base_path: Union[str, os.PathLike] = dump_config(base_config, output_dir / "base_config.yaml")
    else:
        base_path = base_config
    plans = _plan_variants(base_path, variants, output_dir=output_dir, shared=shared,
                           budget=_budget_overrides(seed, epochs, max_iters))
    probe = plans[0].cfg
    budget = {"epochs": probe.train.epochs, "max_iters": probe.train.max_iters}

    device = _default_device(device)
    done: list[dict] = []
    common = dict(title=title, base=str(base_path), shared=shared, budget=budget, seed=seed)
    for plan in plans:
        entry = _finished_entry(plan)
        if entry is None:
            try:
                entry = _train_and_evaluate(plan, device=device, progress=progress)
            except AblationInterrupted:
                _write_outputs(output_dir, done=done, **common)
                raise
            _write_json(plan.folder / "metrics.json", entry)
        done.append(entry)
        _write_outputs(output_dir, done=done, **common)
    return _write_outputs(output_dir, done=done, **common)


def _check_run_arguments(shared: Sequence[Any], *, epochs: Any, max_iters: Any, seed: Any) -> None:
    for override in shared:
        if not isinstance(override, str) or "=" not in override:
            raise UserInputError(f"overrides must be 'key=value' strings, got {override!r}")
    for name, value in (("epochs", epochs), ("max_iters", max_iters)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise UserInputError(f"{name} must be a positive int or None, got {value!r}")
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise UserInputError(f"seed must be an int, got {seed!r}")


def _budget_overrides(seed: int, epochs: Optional[int], max_iters: Optional[int]) -> list[str]:
    """The overrides every variant gets last: its seed and training budget."""
    budget = [f"train.seed={seed}"]
    if epochs is not None:
        budget.append(f"train.epochs={epochs}")
    if max_iters is not None:
        budget.append(f"train.max_iters={max_iters}")
    return budget


@dataclasses.dataclass
class _Plan:
    """One variant, resolved: its row name, folder, overrides in order, and config."""

    name: str
    folder: Path
    overrides: list[str]
    cfg: Any


def _plan_variants(base_path: Union[str, os.PathLike], variants: Mapping[str, Sequence[str]], *,
                   output_dir: Path, shared: list[str], budget: list[str]) -> list[_Plan]:
    """Every variant's config, resolved and validated before anything is trained."""
    from libra_rcnn.config import load_config

    plans = []
    for name, variant_overrides in variants.items():
        folder = output_dir / variant_dir_name(name)
        all_overrides = [*shared, *variant_overrides, *budget]
        cfg = load_config(base_path, all_overrides)
        cfg.output_dir = str(folder)  # set directly: a path is not always a valid YAML scalar
        if cfg.data.val_ann is None or cfg.data.val_images is None:
            raise UserInputError(f"variant {name!r}: data.val_ann / data.val_images are null; the "
                                 f"ablation evaluates on the validation set")
        plans.append(_Plan(name, folder, all_overrides, cfg))
    return plans


def _finished_entry(plan: _Plan) -> Optional[dict]:
    """The variant's ``metrics.json`` entry if it was evaluated before with the same overrides
    (``None`` if not evaluated; ``UserInputError`` if evaluated with other overrides)."""
    metrics_file = plan.folder / "metrics.json"
    if not metrics_file.is_file():
        return None
    entry = json.loads(metrics_file.read_text())
    if entry.get("overrides") != plan.overrides:
        raise UserInputError(
            f"{metrics_file}: was produced with other overrides ({entry.get('overrides')}) "
            f"than variant {plan.name!r} now has ({plan.overrides}); use another output_dir or "
            f"delete {plan.folder}")
    logger.info("variant %r: already evaluated (%s), skipped", plan.name, metrics_file)
    entry["name"] = plan.name
    return entry


def _train_and_evaluate(plan: _Plan, *, device: Any, progress: bool) -> dict:
    """Train the variant (resuming from its ``latest.pth`` if there is one) without periodic
    validation, evaluate the final checkpoint once, and return its ``metrics.json`` entry.
    Raises :class:`AblationInterrupted` if the training was interrupted."""
    latest = plan.folder / "latest.pth"
    resume = latest if latest.is_file() else None
    if resume is not None:
        logger.info("variant %r: resuming from %s", plan.name, resume)
    train_cfg = dataclasses.replace(
        plan.cfg, data=dataclasses.replace(plan.cfg.data, val_ann=None, val_images=None))
    summary = train_variant(train_cfg, resume=resume, device=device, progress=progress)
    if summary.stop_reason == "interrupted":
        raise AblationInterrupted(
            f"variant {plan.name!r} interrupted at iteration {summary.iteration}; rerun "
            f"to resume from {latest}", signal=summary.signal)
    checkpoint = Path(summary.checkpoint or latest)
    metrics = evaluate_checkpoint(plan.cfg, checkpoint, device=device,
                                  results_file=plan.folder / "val_results.json", progress=progress)
    return {"name": plan.name, "dir": plan.folder.name, "overrides": plan.overrides,
            "metrics": {k: float(v) for k, v in metrics.items()},
            "checkpoint": str(checkpoint), "iteration": summary.iteration,
            "epoch": summary.epoch}
