"""Test set-up: Triton kernels run under the interpreter when no CUDA device is present."""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
# Test tensors are tiny: intra-op threads only add contention (up to ~100x slower on a busy CPU).
torch.set_num_threads(1)

import pytest  # noqa: E402


@pytest.fixture(autouse=True)
def _one_torch_thread():
    """Every test starts and ends with one intra-op thread, whatever it set in between (a test
    that runs a benchmark or the CLI may set more)."""
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(1)


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
