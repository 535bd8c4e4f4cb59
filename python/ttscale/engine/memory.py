"""One KV memory budget per device and process, split explicitly between the engines on it.

A policy and a process reward model on one GPU each need a KV pool. Sized independently, each
from 0.9 of the free memory, the second would find the memory already gone. Instead the first
engine on a device fixes the device's budget, ``fraction`` (0.9) of the memory free at that
moment, and every engine leases a share of it:

    policy = Engine(policy_model, memory_share=POLICY_SHARE)   # 0.6 of the budget
    prm = Engine(prm_model, memory_share=PRM_SHARE)            # 0.4 of it

Shares of one device sum to at most 1; asking for more is an error naming every lease. An
engine that names no share takes what is left, so a lone engine (``LLM``) gets the whole
budget, and an engine created beside it is refused with the numbers rather than running out of
memory later. A lease returns to the budget when its engine is garbage-collected; once every
lease is back the budget is measured again at the next lease.

Load every model before creating the engines: the budget is measured from the memory free
when the first lease is taken, so weights loaded later come out of it. A lease is also never
more than ``fraction`` of the memory free when it is taken.

Why ``POLICY_SHARE`` / ``PRM_SHARE`` = 0.6 / 0.4 for a policy beside a PRM: the policy's pool
bounds how many samples decode together, so it gets the larger part. The PRM caches prefixes
of the same sequences, so its pool should hold about as many tokens; when its KV per token
differs much from the policy's (search-and-learn pairs Llama-3.2-1B, 32 KB a token, with an 8B
PRM, 128 KB), :func:`token_balanced_shares` gives the split under which both pools hold the
same number of tokens.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from ttscale.errors import InvalidArgument

DEFAULT_FRACTION = 0.9  # of the free memory when a device's budget is measured
POLICY_SHARE = 0.6
PRM_SHARE = 0.4


def free_memory(device: torch.device) -> int:
    """Bytes free on ``device`` now (CUDA: ``torch.cuda.mem_get_info``; CPU: MemAvailable)."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free)
    if device.type == "cpu":
        try:
            with open("/proc/meminfo") as f:
                for line in f:
                    if line.startswith("MemAvailable:"):
                        return int(line.split()[1]) * 1024
        except OSError:
            pass
        raise InvalidArgument("memory_share: this CPU's free memory is unknown; pass kv_budget_bytes")
    raise InvalidArgument(f"memory_share: no free-memory query for device type {device.type!r}")


@dataclass
class Lease:
    """A share of a device's budget, held by one engine until :meth:`release`."""

    budget: DeviceBudget
    key: int
    owner: str
    share: float
    bytes: int

    def release(self) -> None:
        self.budget.leases.pop(self.key, None)


@dataclass
class DeviceBudget:
    """The KV memory of one device, measured at the first lease and split into shares."""

    device: torch.device
    fraction: float = DEFAULT_FRACTION
    total_bytes: int = 0  # fraction of the free memory when the first of the current leases began
    leases: dict[int, Lease] = field(default_factory=dict)
    _keys: itertools.count = field(default_factory=itertools.count)

    @property
    def share_left(self) -> float:
        return max(0.0, 1.0 - sum(lease.share for lease in self.leases.values()))

    def lease(self, share: float | None, owner: str, free: Callable[[torch.device], int]) -> Lease:
        """Take ``share`` of the budget (None: all that is left) for ``owner``."""
        if share is not None and not 0 < share <= 1:
            raise InvalidArgument(f"memory_share: expected a fraction in (0, 1], got {share!r}")
        free_now = free(self.device)
        if not self.leases:
            self.total_bytes = int(self.fraction * free_now)
        left = self.share_left
        wanted = left if share is None else share
        if wanted <= 1e-9 or wanted > left + 1e-9:
            held = ", ".join(f"{x.owner} holds {x.share:.2f}" for x in self.leases.values())
            raise InvalidArgument(
                f"memory_share: {owner} asks for {wanted:.2f} of the {self.device} KV budget "
                f"({self.total_bytes / 2**30:.1f} GiB), but only {left:.2f} is left ({held}); give "
                f"each engine an explicit memory_share (e.g. {POLICY_SHARE} for the policy, "
                f"{PRM_SHARE} for a PRM) or pass kv_budget_bytes"
            )
        nbytes = min(int(wanted * self.total_bytes), int(self.fraction * free_now))
        lease = Lease(self, next(self._keys), owner, wanted, nbytes)
        self.leases[lease.key] = lease
        return lease


_BUDGETS: dict[torch.device, DeviceBudget] = {}


def device_budget(device: torch.device | str) -> DeviceBudget:
    """The process's budget for ``device`` (one per device, created on first use)."""
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    if device not in _BUDGETS:
        _BUDGETS[device] = DeviceBudget(device)
    return _BUDGETS[device]


def lease(device: torch.device | str, share: float | None, owner: str) -> Lease:
    """Lease ``share`` (None: what is left) of ``device``'s KV budget for ``owner``."""
    return device_budget(device).lease(share, owner, free_memory)


def pair_shares(device: torch.device | str | None) -> tuple[float | None, float | None]:
    """``memory_share`` for a policy and the PRM beside it on ``device`` (None: CUDA when there is
    one, as :func:`ttscale.model.load_model` picks): ``POLICY_SHARE`` and ``PRM_SHARE`` on a GPU;
    None and None on the CPU, where each engine sizes its own pool (2 GiB)."""
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    return (None, None) if torch.device(device).type == "cpu" else (POLICY_SHARE, PRM_SHARE)


def token_balanced_shares(*bytes_per_token: int) -> tuple[float, ...]:
    """Shares under which each engine's pool holds the same number of tokens, for engines whose
    KV takes these bytes per token (e.g. a policy's and its PRM's, which cache the same
    sequences)."""
    if not bytes_per_token or any(b <= 0 for b in bytes_per_token):
        raise InvalidArgument(f"bytes_per_token: expected positive byte counts, got {bytes_per_token}")
    total = sum(bytes_per_token)
    return tuple(b / total for b in bytes_per_token)
