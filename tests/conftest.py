"""Shared test fixtures."""

import pytest
import torch


@pytest.fixture(scope="module")
def one_intra_op_thread():
    """Tiny tensors: one intra-op thread is as fast on an idle machine and several times faster
    on a busy 2-core one (threads spinning against each other). Restored afterwards.
    Modules opt in with ``pytestmark = pytest.mark.usefixtures("one_intra_op_thread")``."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="session")
def mmdet():
    """mmdetection imported for CPU use (``tests/mmdet_oracle.py``); skips the test, with the
    reason, only when it cannot be imported."""
    from mmdet_oracle import import_mmdet

    try:
        return import_mmdet()
    except ImportError as err:
        pytest.skip(f"mmdetection oracle unavailable: {err}")
