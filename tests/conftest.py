"""Test setup. Triton must know it runs interpreted before any kernel is defined (TOOLCHAIN.md)."""

import os

import pytest
import torch

# Kernel outputs start as NaN in tests, so an unwritten element fails the comparison.
os.environ.setdefault("TTSCALE_POISON", "1")

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="module")
def one_thread():
    """One torch thread for a module, restored afterwards: tiny matmuls gain nothing from
    threads (on a loaded shared machine two OpenMP threads spinning at each barrier made a
    module 10x slower), and sums come out the same on any machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
