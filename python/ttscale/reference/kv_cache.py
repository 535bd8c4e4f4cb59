"""Writes into the paged KV cache: rows at flat slots (``write_kv``) and whole blocks copied
after a fork (``copy_blocks``). Both modify the caches in place."""

from __future__ import annotations


def write_kv(k_cache, v_cache, k, v, slots):
    """Scatter rows k/v ``[N, Hkv, D]`` into the caches at flat slots ``block * block_size + offset``.

    A slot of -1 is skipped (a padded row). Modifies the caches in place.
    """
    keep = slots >= 0
    rows = slots[keep].long()
    k_cache.view(-1, *k_cache.shape[2:])[rows] = k[keep].to(k_cache.dtype)
    v_cache.view(-1, *v_cache.shape[2:])[rows] = v[keep].to(v_cache.dtype)


def copy_blocks(k_cache, v_cache, src, dst):
    """Copy whole blocks ``src[i] -> dst[i]`` in every layer; a pair with a -1 is skipped.

    Caches ``[num_blocks, ...]`` (one layer) or ``[L, num_blocks, ...]``; modified in place.
    """
    for cache in (k_cache, v_cache):
        layers = cache if cache.dim() == 5 else cache.unsqueeze(0)
        for s, d in zip(src.tolist(), dst.tolist(), strict=True):
            if s >= 0 and d >= 0:
                layers[:, d] = layers[:, s]
