"""``ttscale run --ray``: the problems of a run searched by Ray actors, one per GPU (or CPU slot).

    driver (ttscale run): the queue of batches, the only writer of --out
        │  a batch at a time to whichever worker is free (a fast worker takes more)
        ▼
    K workers (Ray actors): each loads the policy and the PRM once, searches the batches it gets

A problem's result depends only on the settings, the seed and the problem (its random streams are
keyed by its index in the data file), so it does not matter which worker ran it, with which
other problems, or after how many restarts: the output equals a single-process run's. A worker
that dies has its batch put back on the queue; a model that fails to load fails the run with the
worker's error. The driver writes each batch as it comes back (fsynced), so a killed driver
resumes from the file like any run.
"""

from __future__ import annotations

import os
import time
from collections import deque
from typing import Any

RAY_HINT = "pip install 'ttscale[ray]'"


def ray_module():
    try:
        import ray
    except ImportError:
        return None
    return ray


def parse_resources(text: str | None) -> dict[str, float]:
    """``"CPU=2,GPU=1"`` -> ``{"num_cpus": 2, "num_gpus": 1}`` (the actor's options)."""
    if not text:
        return {}
    names = {"cpu": "num_cpus", "gpu": "num_gpus"}
    out = {}
    for part in text.split(","):
        key, _, value = part.partition("=")
        if key.strip().lower() not in names:
            raise ValueError(f"expected CPU=N and/or GPU=N, got {part!r}")
        try:
            amount = float(value)
        except ValueError:
            raise ValueError(f"expected a number after {key.strip()}=, got {value!r}") from None
        if amount < 0:
            raise ValueError(f"expected a non-negative amount, got {part!r}")
        out[names[key.strip().lower()]] = amount
    return out


def connect(address: str | None, num_workers: int, resources: dict[str, float]):
    """Join the cluster at ``address`` (``"auto"``, ``"ray://..."``, ``host:port``), the one this
    process already joined, or start a local one sized for the workers."""
    ray = ray_module()
    if ray.is_initialized():
        return ray
    if address in (None, "local"):
        cpus = max(int(resources.get("num_cpus", 1)) * num_workers, os.cpu_count() or 1)
        ray.init(num_cpus=cpus, include_dashboard=False, log_to_driver=False)
    else:
        ray.init(address=address, log_to_driver=False)
    return ray


def default_resources(ray) -> dict[str, float]:
    gpus = ray.cluster_resources().get("GPU", 0)
    return {"num_gpus": 1} if gpus >= 1 else {"num_cpus": 1}


class _Worker:
    """One worker: the run's models, loaded once; searches the batches it is given."""

    def __init__(self, args: Any, threads: int | None):
        import torch

        from ttscale import run_command
        from ttscale.search import registry

        if threads:
            torch.set_num_threads(threads)
        self.search = run_command.Search(args, registry.get(args.strategy).function)
        self.search.load_models()

    def ready(self) -> bool:
        return True

    def run(self, batch):
        start = time.perf_counter()
        results = self.search(batch)
        return results, time.perf_counter() - start


def executor(args, num_workers: int | None, resources: dict[str, float], address: str | None):
    """``execute`` for :func:`ttscale.evaluate.run_evaluation`: batches go to K Ray actors
    (default: one per GPU of the cluster, else 2)."""

    def execute(batches):
        if not batches:
            return
        ray = connect(address, num_workers or 2, resources)
        count = num_workers or int(ray.cluster_resources().get("GPU", 0)) or 2
        options = resources or default_resources(ray)
        threads = int(options.get("num_cpus", 0)) or None
        actor_class = ray.remote(**options)(_Worker)
        workers = [actor_class.options(name=worker_name(i)).remote(args, threads) for i in range(count)]
        try:
            ray.get([w.ready.remote() for w in workers])  # a model that fails to load fails the run
        except Exception as error:
            for w in workers:
                ray.kill(w)
            from ttscale.errors import UsageError

            raise UsageError(f"a Ray worker could not load the models: {_cause(error)}") from None
        # Batches go out in order and come back in any order; they are handed on in order (so
        # the output reads like a single-process run's), holding back at most a few finished
        # batches behind a slower one.
        queue = deque(enumerate(batches))
        running: dict[Any, tuple[Any, int]] = {}  # task -> (worker, batch number)
        finished: dict[int, tuple[list, float]] = {}
        next_out = 0
        idle = list(workers)
        try:
            while next_out < len(batches):
                while queue and idle:
                    worker, (number, batch) = idle.pop(), queue.popleft()
                    running[worker.run.remote(batch)] = (worker, number)
                if not running:
                    raise RuntimeError("every worker died; the problems left are not answered")
                (task,), _ = ray.wait(list(running), num_returns=1)
                worker, number = running.pop(task)
                try:
                    finished[number] = ray.get(task)
                except ray.exceptions.RayActorError:
                    queue.appendleft((number, batches[number]))  # it died: another takes its batch
                    continue
                idle.append(worker)
                while next_out in finished:
                    results, seconds = finished.pop(next_out)
                    yield batches[next_out], results, seconds
                    next_out += 1
        finally:
            for w in workers:
                ray.kill(w)

    return execute


def worker_name(i: int) -> str:
    """The name of this driver's worker ``i`` in the cluster (so it can be found, e.g. to test
    what happens when one dies)."""
    return f"ttscale-worker-{os.getpid()}-{i}"


def _cause(error: BaseException) -> str:
    text = str(error)
    lines = [line for line in text.splitlines() if line.strip()]
    return lines[-1] if lines else type(error).__name__
