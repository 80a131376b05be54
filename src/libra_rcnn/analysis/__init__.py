"""The paper's analyses as functions and CLI commands.

* :func:`iou_histograms` (:mod:`.iou_distribution`) -- IoU of random / IoU-balanced / hard
  negatives (Figure 3)
* :func:`bfp_heatmaps` (:mod:`.feature_heatmaps`) -- feature heatmaps before and after the
  balanced feature pyramid (Figure 4)
* :func:`loss_curves` (:mod:`.balanced_l1_curves`) -- balanced L1 gradient and loss vs smooth L1
  (Figure 5)
* :func:`sample_visualization` (:mod:`.sampled_negatives`) -- negatives chosen by random vs
  IoU-balanced sampling (Figure 6)
* :func:`run_ablation` (:mod:`.ablation`) -- train + evaluate config variants into the ablation
  tables (Tables 2, 4-6)

:mod:`.commands` holds the ``libra-rcnn analyze ...`` / ``libra-rcnn ablate`` commands
(:func:`add_analyze_subcommands`, :func:`add_ablate_command`). Plots use matplotlib's ``Figure``
with the Agg canvas directly (no pyplot, no global state).

The analysis functions are imported on first use, so that importing this package (e.g. to build
the CLI parser) does not import torch.
"""

from __future__ import annotations

import importlib
from typing import Any

from .ablation import (
    ABLATION_TABLES,
    BASELINE_OVERRIDES,
    AblationInterrupted,
    evaluate_checkpoint,
    run_ablation,
)
from .commands import add_ablate_command, add_analyze_subcommands

# public name -> the submodule that defines it (imported on first access)
_LAZY = {
    "iou_histograms": "iou_distribution",
    "iou_histogram_counts": "iou_distribution",
    "bfp_heatmaps": "feature_heatmaps",
    "loss_curves": "balanced_l1_curves",
    "sample_visualization": "sampled_negatives",
}

__all__ = [
    "ABLATION_TABLES",
    "BASELINE_OVERRIDES",
    "AblationInterrupted",
    "add_ablate_command",
    "add_analyze_subcommands",
    "bfp_heatmaps",
    "evaluate_checkpoint",
    "iou_histogram_counts",
    "iou_histograms",
    "loss_curves",
    "run_ablation",
    "sample_visualization",
]


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f".{module}", __name__), name)


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
