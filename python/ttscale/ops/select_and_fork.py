"""``select_and_fork``: beam selection and forking, with the block pool's bookkeeping, on the device."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from ttscale import backends
from ttscale._checks import (
    FLOAT_DTYPES,
    check_block_table,
    check_range,
    check_tensor,
    check_values,
)
from ttscale.block_pool import BlockPool
from ttscale.errors import InvalidArgument
from ttscale.ops import dispatch


@dataclass(frozen=True)
class ForkResult:
    """What :func:`select_and_fork` returns. ``G`` groups, ``K`` kept per group at most,
    ``S`` child slots and ``P`` copy pairs at most, all known on the host.

    Attributes
    ----------
    kept : Tensor
        ``[G, K]`` int32, each group's kept candidates, best first; -1 after ``num_kept[g]``.
    num_kept : Tensor
        ``[G]`` int32, ``min(keep[g], group size)``.
    parents : Tensor
        ``[S]`` int32, the candidate each child slot was forked from; -1 on padding slots.
    child_offsets : Tensor
        ``[G + 1]`` int32; group ``g``'s children are slots ``child_offsets[g]`` up to
        ``child_offsets[g + 1]``, kept candidate ``r``'s ``children[g]`` children together in
        rank order. It is the ``group_offsets`` of the next step; slots from
        ``child_offsets[G]`` on are padding.
    block_tables : Tensor
        ``[S, max_blocks]`` int32, each child's blocks; -1 past its used entries.
    lens : Tensor
        ``[S]`` int32, each child's length: its parent's, unless the pool ran out of blocks
        for its copy (then rounded down to a whole block); 0 on padding slots.
    copy_src, copy_dst : Tensor
        ``[P]`` int32, the copy-on-write copies :func:`copy_blocks` must make before the children
        write to their last blocks; -1 pairs (at the end) are unused.
    """

    kept: Tensor
    num_kept: Tensor
    parents: Tensor
    child_offsets: Tensor
    block_tables: Tensor
    lens: Tensor
    copy_src: Tensor
    copy_dst: Tensor


@torch.library.custom_op(
    "ttscale::select_and_fork", mutates_args=("ref_counts", "free_stack", "free_top", "status")
)
def _select_and_fork(
    scores: Tensor, group_offsets: Tensor, keep: Tensor, children: Tensor, block_tables: Tensor,
    lens: Tensor, ref_counts: Tensor, free_stack: Tensor, free_top: Tensor, status: Tensor,
    block_size: int, max_keep: int, num_slots: int, num_copies: int, backend: str,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    fn = backends.implementation("select_and_fork", backend)
    return fn(scores, group_offsets, keep, children, block_tables, lens, ref_counts, free_stack,
              free_top, status, block_size, max_keep, num_slots, num_copies)


@_select_and_fork.register_fake
def _(scores, group_offsets, keep, children, block_tables, lens, ref_counts, free_stack, free_top,
      status, block_size, max_keep, num_slots, num_copies, backend):
    groups = group_offsets.shape[0] - 1
    new = lambda *shape: group_offsets.new_empty(shape)
    return (new(groups, max_keep), new(groups), new(num_slots), new(groups + 1),
            new(num_slots, block_tables.shape[1]), new(num_slots), new(num_copies), new(num_copies))


def _per_group(name: str, value, bound, bound_name: str, groups: int, device) -> tuple[Tensor, int]:
    """``keep`` or ``children`` as int32 ``[G]`` on the device, and its host-known maximum."""
    if isinstance(value, bool) or not isinstance(value, (int, Tensor)):
        raise InvalidArgument(f"{name}: expected an int or an int32 tensor, got {type(value).__name__}")
    if bound is not None and (not isinstance(bound, int) or bound < 0):
        raise InvalidArgument(f"{bound_name}: expected an int >= 0, got {bound!r}")
    if isinstance(value, int):
        if value < 0:
            raise InvalidArgument(f"{name}: expected >= 0, got {value}")
        if bound is not None and value > bound:
            raise InvalidArgument(f"{name}: {value} exceeds {bound_name} ({bound})")
        return torch.full((groups,), value, dtype=torch.int32, device=device), value
    check_tensor(name, value, dtype=torch.int32, device=device, shape=(groups,))
    if bound is None:
        raise InvalidArgument(
            f"{bound_name}: required when {name} is a tensor (a host-known bound sizes the outputs)"
        )
    if check_values(value):
        check_range(name, value, 0, bound + 1)
    return value.contiguous(), bound


def _check_fork_values(group_offsets, block_tables, lens, pool, num_candidates: int) -> None:
    """Value checks of select_and_fork's inputs (they read memory: CPU, or TTSCALE_DEBUG=1)."""
    offsets = group_offsets.tolist()
    if offsets[0] != 0 or offsets[-1] != num_candidates:
        raise InvalidArgument(
            f"group_offsets: expected to run from 0 to {num_candidates} (the candidates), "
            f"got {offsets[0]} to {offsets[-1]}"
        )
    if any(b < a for a, b in zip(offsets, offsets[1:], strict=False)):
        raise InvalidArgument("group_offsets: expected non-decreasing offsets")
    check_range("lens", lens, 0, 2**31 - 1)
    check_block_table("block_tables", block_tables, lens, pool.block_size, pool.num_blocks)
    check_range("pool.free_top", pool.free_top, 0, pool.num_blocks + 1)
    used = -(-lens.long() // pool.block_size)
    column = torch.arange(block_tables.shape[1], device=lens.device)
    in_use = column[None, :] < used[:, None]
    if not pool.num_blocks:  # check_block_table saw to it that no table holds a block
        return
    held = pool.ref_counts[torch.where(in_use, block_tables, 0).long()]
    if bool((in_use & (held < 1)).any()):
        raise InvalidArgument(
            "block_tables: a table holds a block whose reference count in pool.ref_counts is 0"
        )


def select_and_fork(
    scores: Tensor,
    group_offsets: Tensor,
    keep: int | Tensor,
    children: int | Tensor,
    block_tables: Tensor,
    lens: Tensor,
    pool: BlockPool,
    *,
    max_keep: int | None = None,
    max_children: int | None = None,
    backend: str | None = None,
) -> ForkResult:
    """Keep the best candidates of each group, fork each into children, free the rest's blocks.

    One search step's selection, on the device, with no host synchronisation and outputs sized
    by host-known bounds, so it can be captured in a CUDA graph (the Triton backend runs a fixed
    handful of launches).

    Selection: group ``g`` is candidates ``group_offsets[g]`` up to ``group_offsets[g + 1]``
    (a problem, or a DVTS subtree; empty groups allowed). Its ``min(keep[g], size)`` best are
    kept, sorted by score descending, ties to the lower index; NaN ranks below every number
    (-inf included), so a NaN is kept only when nothing else is left.

    Forking: kept candidate ``p`` gets ``children[g]`` child slots (layout in
    :class:`ForkResult`). The candidates' tables are consumed: every child takes a reference to
    each of its parent's full blocks, then every candidate's table gives up its own references,
    so the blocks of candidates not kept (and of kept ones with no children) go back to the
    pool when no child holds them; blocks that reach zero are pushed in ascending order. So a
    kept parent's references move to its children (a full block's count changes by
    ``children[g] - 1``), and the input tables must not be used afterwards. A
    parent's partial last block passes to its first child (its reference moves, no copy); every
    other child gets a fresh block popped from the free stack (in slot order) and a
    ``copy_src -> copy_dst`` pair, so each child owns its partial last block and can write the
    next token into it once :func:`copy_blocks` has run. A child that finds the free stack empty
    keeps only its shared full blocks (``lens`` rounded down, no pair) and
    :data:`ttscale.block_pool.POOL_EXHAUSTED` is set in ``pool.status``; the pool stays
    consistent and nothing raises.

    Parameters
    ----------
    scores : Tensor
        ``[C]`` float32, float16 or bfloat16, one per candidate.
    group_offsets : Tensor
        ``[G + 1]`` int32, non-decreasing from 0 to ``C``.
    keep, children : int or Tensor
        Per group, an int for all groups or int32 ``[G]``; ``keep`` may exceed a group's size.
    block_tables : Tensor
        ``[C, max_blocks]`` int32, each candidate's blocks (its first ``ceil(lens / block_size)``
        entries are used; the rest are ignored). A partial last block is normally held by its
        table alone, as in every table this op returns; one held by other tables too (from an
        engine that forks lazily and copies on the first write) stays shared with the first
        child, and the op never writes into it.
    lens : Tensor
        ``[C]`` int32, tokens in each candidate's table.
    pool : BlockPool
        The pool's state, updated in place.
    max_keep, max_children : int, optional
        Host-known bounds on ``keep`` and ``children``; required when those are tensors.
    backend : str, optional
        Force ``"torch"``, ``"cpu"`` or ``"triton"``.

    Returns
    -------
    ForkResult
        With ``K = min(max_keep, C)``, ``S = min(C, G * K) * max_children`` child slots and
        ``P = min(C, G * K) * max(max_children - 1, 0)`` copy pairs.

    Notes
    -----
    An engine's step: ``r = select_and_fork(...)``, then ``copy_blocks(k, v, r.copy_src,
    r.copy_dst)`` before the next write, and the children (rows ``r.parents >= 0``, tables
    ``r.block_tables``, lengths ``r.lens``, groups ``r.child_offsets``) are the next batch; the
    sampler and PRM states fork as ``state[r.parents]``. ``pool.status`` is read whenever the
    host synchronises anyway.
    """
    check_tensor("scores", scores, ndim=1, dtype=FLOAT_DTYPES)
    device = scores.device
    num_candidates = scores.shape[0]
    check_tensor("group_offsets", group_offsets, ndim=1, dtype=torch.int32, device=device)
    if group_offsets.shape[0] == 0:
        raise InvalidArgument("group_offsets: expected at least one entry ([G + 1]), got shape [0]")
    groups = group_offsets.shape[0] - 1
    keep, max_keep = _per_group("keep", keep, max_keep, "max_keep", groups, device)
    children, max_children = _per_group("children", children, max_children, "max_children",
                                        groups, device)
    check_tensor("block_tables", block_tables, ndim=2, dtype=torch.int32, device=device)
    if block_tables.shape[0] != num_candidates:
        raise InvalidArgument(
            f"block_tables: expected {num_candidates} rows (one per score), "
            f"got {block_tables.shape[0]}"
        )
    check_tensor("lens", lens, dtype=torch.int32, device=device, shape=(num_candidates,))
    if not isinstance(pool, BlockPool):
        raise InvalidArgument(f"pool: expected a BlockPool, got {type(pool).__name__}")
    if pool.device != device:
        raise InvalidArgument(f"pool: expected device {device} (the scores'), got {pool.device}")
    if check_values(group_offsets, lens, keep, children, *pool.tensors()):
        _check_fork_values(group_offsets, block_tables, lens, pool, num_candidates)
    max_keep = min(max_keep, num_candidates)
    forked = min(num_candidates, groups * max_keep)
    num_slots, num_copies = forked * max_children, forked * max(max_children - 1, 0)
    if num_slots >= 2**31:
        raise InvalidArgument(
            f"max_children: {max_children} children of {forked} candidates overflow int32 slots"
        )
    chosen = backends.resolve("select_and_fork", device, backend)
    outputs = dispatch.run(_select_and_fork, "select_and_fork",
        scores.float().contiguous(), group_offsets.contiguous(), keep, children,
        block_tables.contiguous(), lens.contiguous(), *pool.tensors(), pool.block_size, max_keep,
        num_slots, num_copies, chosen,
    )
    return ForkResult(*outputs)
