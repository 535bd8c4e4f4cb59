"""A search step's selection and forks, on the pool's device.

``select_and_fork`` gathers the candidates' table rows, runs ``ops.select_and_fork`` (segmented
top-k per group, forks of the kept candidates, frees of the rest, copy-on-write pairs) on the
pool's own state, copies the pairs with ``ops.copy_blocks`` and writes the children's tables
into rows, all on the device. The host reads what it must know to hand the search its children
(each child's parent, the groups' offsets, the lengths) in one counted read, which also brings
the pool's free count.
"""

from __future__ import annotations

from collections.abc import Sequence as Seq

import torch

from ttscale import ops
from ttscale.engine.sequence import Sequence, copy_sequence
from ttscale.errors import InvalidArgument


def check_counts(candidates: Seq[Sequence], scores, group_sizes: Seq[int]) -> None:
    """One score per candidate, and groups that cover them."""
    if len(scores) != len(candidates):
        raise InvalidArgument(
            f"scores: expected {len(candidates)} (one per sequence), got {len(scores)}")
    if sum(group_sizes) != len(candidates):
        raise InvalidArgument(f"group_sizes: expected them to sum to {len(candidates)} "
                              f"candidates, got {sum(group_sizes)}")


def check_selection(candidates: Seq[Sequence], scores, group_sizes: Seq[int], keep, children,
                    device=None) -> tuple:
    """:func:`check_counts`, and ``keep`` and ``children`` (an int, or one per group) >= 0.
    Returns the scores as a float32 tensor on ``device``, the group sizes, and keep and children
    as one int per group."""
    check_counts(candidates, scores, group_sizes)
    keep = per_group("keep", keep, len(group_sizes))
    children = per_group("children", children, len(group_sizes))
    try:
        numbers = torch.as_tensor(scores, dtype=torch.float32, device=device)
    except (TypeError, ValueError, RuntimeError) as error:
        raise InvalidArgument(f"scores: expected numbers, got {error}", param="scores") from None
    if numbers.dim() != 1:
        raise InvalidArgument(f"scores: expected one score per candidate, got shape "
                              f"{list(numbers.shape)}", param="scores")
    return numbers, list(group_sizes), keep, children


def per_group(name: str, value: int | Seq[int], groups: int) -> list[int]:
    """``value`` (an int for every group, or one per group) as one int >= 0 per group."""
    values = [value] * groups if isinstance(value, int) else list(value)
    if len(values) != groups:
        raise InvalidArgument(f"{name}: expected one value per group ({groups}), got {len(values)}")
    if any(v < 0 for v in values):
        raise InvalidArgument(f"{name}: expected values >= 0, got {values}")
    return values


def select_and_fork(engine, candidates: Seq[Sequence], scores: Seq[float], group_sizes: Seq[int],
                    keep, children) -> tuple[list[Sequence], list[int], list[int]]:
    """:meth:`Engine.select_and_fork` on ``engine`` (which holds its lock and checked that the
    candidates are live); the same arguments and results."""
    check_counts(candidates, scores, group_sizes)
    pool = engine.pool
    int32 = dict(dtype=torch.int32, device=pool.device)
    for seq in candidates:
        pool.trim(seq.row, seq.kv_len)
    rows = [s.row for s in candidates]
    # whether each candidate's partial last block is its own (else its first child shares it)
    own_last = [pool.private_from[r] < pool.used[r] for r in rows]
    tables = pool.gather(rows, pad=-1)
    offsets = [0]
    for size in group_sizes:
        offsets.append(offsets[-1] + size)
    bounds = {}
    if not isinstance(keep, int):
        bounds["max_keep"] = max(list(keep) + [0])
        keep = torch.tensor(list(keep), **int32)
    if not isinstance(children, int):
        bounds["max_children"] = max(list(children) + [0])
        children = torch.tensor(list(children), **int32)
    result = ops.select_and_fork(
        torch.as_tensor(scores, dtype=torch.float32, device=pool.device),
        torch.tensor(offsets, **int32), keep, children, tables,
        torch.tensor([s.kv_len for s in candidates], **int32), pool.state, **bounds,
    )
    engine.runner.copy_blocks(result.copy_src, result.copy_dst)
    # a child that found the pool empty keeps only its full blocks (and re-prefills the rest)
    child_offsets, parents, lens = (t.tolist() for t in pool.read_host(
        [result.child_offsets, result.parents, result.lens], allow_exhausted=True))
    num_children = child_offsets[-1]
    parents, lens = parents[:num_children], lens[:num_children]
    # the first child of each kept candidate carries on as the candidate itself, in its row
    continuing: dict[int, int] = {}
    for slot, p in enumerate(parents):
        continuing.setdefault(p, slot)
    new_rows = iter(pool.new_rows(num_children - len(continuing)))
    child_rows = [rows[p] if continuing[p] == slot else next(new_rows)
                  for slot, p in enumerate(parents)]
    used = [pool.blocks_for(n) for n in lens]  # shorter than the parent's only if the pool ran out
    pool.forget([rows[p] for p in range(len(candidates)) if p not in continuing])
    private = [bool(n % pool.block_size) and (continuing[p] != slot or own_last[p])
               for slot, (p, n) in enumerate(zip(parents, lens, strict=True))]
    pool.set_rows(child_rows, result.block_tables[:num_children], used,
                  [u - own for u, own in zip(used, private, strict=True)])
    kids = []
    for slot, p in enumerate(parents):
        parent = candidates[p]
        if continuing[p] == slot:
            parent.kv_len = lens[slot]
            kids.append(parent)
            continue
        kid = copy_sequence(parent, engine._new_seq_id(parent.prompt), child_rows[slot])
        kid.kv_len = lens[slot]
        kid.prompt.num_sequences += 1
        kid.prompt.live.add(kid)
        kids.append(kid)
    for p, seq in enumerate(candidates):
        if p not in continuing:
            seq.row, seq.freed = None, True
            seq.prompt.num_sequences -= 1
            seq.prompt.live.discard(seq)
    return kids, parents, child_offsets
