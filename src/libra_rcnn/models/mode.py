"""Training/eval mode for a block of code, restored afterwards (even when the block raises).

Evaluation, prediction, proposal dumping and the analysis commands all run a model that may be
in the middle of training; they must hand it back in the mode it came in.
"""

from __future__ import annotations

import contextlib
from typing import Iterator

from torch import nn

__all__ = ["eval_mode", "module_mode"]


@contextlib.contextmanager
def module_mode(module: nn.Module, training: bool) -> Iterator[nn.Module]:
    """Put ``module`` in training (``True``) or eval mode for the block and restore its previous
    mode afterwards."""
    was_training = module.training
    module.train(training)
    try:
        yield module
    finally:
        module.train(was_training)


def eval_mode(model: nn.Module) -> contextlib.AbstractContextManager:
    """Put ``model`` in eval mode for the block and restore its previous mode afterwards."""
    return module_mode(model, False)
