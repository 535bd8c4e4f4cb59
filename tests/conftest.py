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
