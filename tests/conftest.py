"""Test setup. Triton must know it runs interpreted before any kernel is defined (TOOLCHAIN.md)."""

import os
import random

import pytest
import torch

# Kernel outputs start as NaN in tests, so an unwritten element fails the comparison.
os.environ.setdefault("TTSCALE_POISON", "1")

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


# Every seed a test draws from is printed with its failure, so any failure can be replayed:
# torch.Generator(...).manual_seed(s), torch.manual_seed(s) and random.Random(s) record s for the
# running test.
_seeds: list[int] = []


class _SeedRecordingRandom(random.Random):
    def seed(self, a=None, version=2):
        if isinstance(a, int):
            _seeds.append(a)
        super().seed(a, version)


class _SeedRecordingGenerator(torch.Generator):
    def manual_seed(self, seed):
        _seeds.append(int(seed))
        return super().manual_seed(seed)


_torch_manual_seed = torch.manual_seed


def _recording_manual_seed(seed):
    _seeds.append(int(seed))
    return _torch_manual_seed(seed)


torch.Generator = _SeedRecordingGenerator
random.Random = _SeedRecordingRandom
torch.manual_seed = _recording_manual_seed


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item, nextitem):
    _seeds.clear()
    yield


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    if report.failed:
        seeds = list(dict.fromkeys(_seeds))
        drawn = ", ".join(map(str, seeds[:50])) + (f", ... ({len(seeds)} in all)" if len(seeds) > 50 else "")
        drawn = drawn or "none recorded (literals in the test)"
        report.sections.append(("seeds", f"seeds drawn from, in order: {drawn}"))


def pytest_collection_modifyitems(config, items):
    # The op a kernel test checks goes into the JUnit report, which counts GPU tests per op.
    for item in items:
        mark = item.get_closest_marker("op")
        if mark is not None:
            item.user_properties.append(("op", mark.args[0]))
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


@pytest.fixture(autouse=True)
def _collect_what_a_long_test_left(request):
    """After a test that ran a second or more (one that loaded models), a full garbage
    collection: a search's objects can hold an LLM's KV pool (2 GiB on the CPU) in a reference
    cycle until the collector's next full pass, and the suite ran one test after another near
    the machine's memory."""
    import gc
    import time

    start = time.perf_counter()
    yield
    if time.perf_counter() - start >= 1.0:
        gc.collect()
