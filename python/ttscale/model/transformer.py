"""The transformer of the Llama / Qwen2 / Mistral / Qwen3 families, on a paged two-level KV pool.

Tokens come in packed, ``[T]`` new tokens of many sequences at once; there is no batch or
padding dimension. Each layer writes its new K/V into its cache with :func:`ttscale.ops.write_kv`
and attends with :func:`ttscale.ops.paged_prefill_attention` (a chunk of new tokens per sequence)
or :func:`ttscale.ops.cascade_decode_attention` (one per sequence), as the step's
:class:`~ttscale.model.batch.AttentionBatch` says.

``forward`` returns final hidden states of the rows asked for; the heads run on those rows
only: :meth:`Transformer.compute_logits` (the LM head, or a few of its rows for a token-head
PRM) and :meth:`Transformer.compute_scores` (a two-class or value head).

Parameters are allocated uninitialised; :func:`ttscale.model.loader.load_model` fills them and,
on the CPU, packs them for oneDNN (:meth:`Transformer.pack_weights`).
Projections are fused (q/k/v into one matrix, gate/up into one) so a layer runs two matmuls
where the checkpoint has five.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ttscale import backends, ops
from ttscale._checks import check_range, check_values
from ttscale.errors import InvalidArgument
from ttscale.model import cpu_linear
from ttscale.model.batch import DECODE, AttentionBatch
from ttscale.model.config import ModelConfig
from ttscale.model.kv_cache import KVCache
from ttscale.model.rope import apply_rotary, rotary_table


def _param(*shape: int, dtype: torch.dtype, device) -> nn.Parameter:
    return nn.Parameter(torch.empty(*shape, dtype=dtype, device=device), requires_grad=False)


class Linear(nn.Module):
    """``y = x W^T (+ b)`` with ``W [out, in]``, as checkpoints store it.

    On the CPU, :meth:`pack` keeps oneDNN's reordered copy of ``W`` (see
    :mod:`ttscale.model.cpu_linear`); ``weight`` stays the truth, and a pack is made again after
    the weight changes.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool, *, dtype, device):
        super().__init__()
        self.weight = _param(out_features, in_features, dtype=dtype, device=device)
        self.bias = _param(out_features, dtype=dtype, device=device) if bias else None
        self.packed: Tensor | None = None

    def pack(self) -> None:
        self.packed = cpu_linear.pack(self.weight)

    def _apply(self, fn, recurse=True):
        self.packed = None  # moved or converted: the pack is stale until pack() runs again
        return super()._apply(fn, recurse)

    def forward(self, x: Tensor) -> Tensor:
        if self.packed is not None:
            return cpu_linear.linear(x, self.packed, self.bias)
        return F.linear(x, self.weight, self.bias)


class RMSNorm(nn.Module):
    """Normalise in float32, cast back, then scale (the order HF's Llama-family norms use)."""

    def __init__(self, size: int, eps: float, *, dtype, device):
        super().__init__()
        self.weight = _param(size, dtype=dtype, device=device)
        self.eps = eps

    def forward(self, x: Tensor) -> Tensor:
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(x.dtype)

    def add_forward(self, delta: Tensor, residual: Tensor, fused: bool) -> tuple[Tensor, Tensor]:
        """``(norm(residual + delta), residual + delta)``: one kernel when ``fused``."""
        if fused:
            return ops.add_rms_norm(delta, residual, self.weight, self.eps, backend="triton",
                                    validate=False)
        summed = residual + delta
        return self(summed), summed


def fuses_elementwise(backend: str | None, device: torch.device) -> bool:
    """Whether a step runs the fused elementwise ops (ops.add_rms_norm, ops.rope_write_kv,
    ops.silu_mul): where its kernels are GPU kernels (Triton, which the tests run interpreted
    on the CPU, or CUDA) and Triton is there. The CPU's kernels keep the unfused torch code."""
    gpu_step = backend in ("triton", "cuda") or (backend is None and device.type == "cuda")
    return gpu_step and "triton" in backends.available("add_rms_norm", device)


class Attention(nn.Module):
    def __init__(self, config: ModelConfig, *, dtype, device):
        super().__init__()
        c = config
        self.num_heads, self.num_kv_heads, self.head_dim = c.num_heads, c.num_kv_heads, c.head_dim
        self.qkv_proj = Linear(
            c.hidden_size, c.q_size + 2 * c.kv_size, c.qkv_bias, dtype=dtype, device=device
        )
        self.o_proj = Linear(c.q_size, c.hidden_size, c.o_bias, dtype=dtype, device=device)
        # Qwen3 normalises each head's q and k over head_dim before the rotation.
        self.q_norm = (
            RMSNorm(c.head_dim, c.rms_norm_eps, dtype=dtype, device=device) if c.qk_norm else None
        )
        self.k_norm = (
            RMSNorm(c.head_dim, c.rms_norm_eps, dtype=dtype, device=device) if c.qk_norm else None
        )

    def forward(
        self, x: Tensor, cos_sin: Tensor, batch: AttentionBatch, k_cache: Tensor, v_cache: Tensor,
        validate: bool = True, fused: bool = False,
    ) -> Tensor:
        tokens = x.shape[0]
        q_size, kv_size = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        q, k, v = self.qkv_proj(x).split([q_size, kv_size, kv_size], dim=-1)
        q = q.reshape(tokens, self.num_heads, self.head_dim)  # [T, Hq, D]
        k = k.reshape(tokens, self.num_kv_heads, self.head_dim)  # [T, Hkv, D]
        v = v.reshape(tokens, self.num_kv_heads, self.head_dim)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        if fused:
            q = ops.rope_write_kv(q, k, v, cos_sin, k_cache, v_cache, batch.slots,
                                  backend="triton", validate=validate)
        else:
            q, k = apply_rotary(q, cos_sin), apply_rotary(k, cos_sin)
            ops.write_kv(k_cache, v_cache, k, v, batch.slots, backend=batch.backend,
                         validate=validate)
        levels = (
            batch.prompt_block_tables,
            batch.prompt_lens,
            batch.problem_ids,
            batch.suffix_block_tables,
            batch.suffix_lens,
        )
        if batch.mode == DECODE:
            out, _ = ops.cascade_decode_attention(
                q, k_cache, v_cache, *levels, plan=batch.plan, backend=batch.backend,
                validate=validate,
            )
        else:
            out, _ = ops.paged_prefill_attention(
                q, k_cache, v_cache, *levels, batch.q_lens, backend=batch.backend,
                validate=validate,
            )
        return self.o_proj(out.reshape(tokens, q_size))


class MLP(nn.Module):
    """SwiGLU: ``down(silu(gate(x)) * up(x))``, gate and up fused."""

    def __init__(self, config: ModelConfig, *, dtype, device):
        super().__init__()
        c = config
        self.intermediate_size = c.intermediate_size
        self.gate_up_proj = Linear(
            c.hidden_size, 2 * c.intermediate_size, c.mlp_bias, dtype=dtype, device=device
        )
        self.down_proj = Linear(
            c.intermediate_size, c.hidden_size, c.mlp_bias, dtype=dtype, device=device
        )

    def forward(self, x: Tensor, fused: bool = False) -> Tensor:
        if fused:
            return self.down_proj(ops.silu_mul(self.gate_up_proj(x), backend="triton"))
        gate, up = self.gate_up_proj(x).split(self.intermediate_size, dim=-1)
        return self.down_proj(F.silu(gate) * up)


class DecoderLayer(nn.Module):
    def __init__(self, config: ModelConfig, *, dtype, device):
        super().__init__()
        eps = config.rms_norm_eps
        self.input_layernorm = RMSNorm(config.hidden_size, eps, dtype=dtype, device=device)
        self.self_attn = Attention(config, dtype=dtype, device=device)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, eps, dtype=dtype, device=device)
        self.mlp = MLP(config, dtype=dtype, device=device)

    def forward(
        self, x: Tensor, delta: Tensor | None, cos_sin: Tensor, batch: AttentionBatch,
        k_cache: Tensor, v_cache: Tensor, validate: bool = True, fused: bool = False,
    ) -> tuple[Tensor, Tensor]:
        """The residual stream ``x`` before adding the previous layer's output ``delta`` (None
        at the first layer); returns this layer's ``(x, delta)``. Each add is done with the norm
        that follows it, one kernel when ``fused`` (:func:`fuses_elementwise`)."""
        if delta is None:
            h = self.input_layernorm(x)
        else:
            h, x = self.input_layernorm.add_forward(delta, x, fused)
        attended = self.self_attn(h, cos_sin, batch, k_cache, v_cache, validate, fused)
        h, x = self.post_attention_layernorm.add_forward(attended, x, fused)
        return x, self.mlp(h, fused)


def _check_uniform_layers(kv_cache: KVCache) -> None:
    """Every layer's cache like layer 0's, so that the ops' checks at layer 0 cover them all."""
    first = kv_cache.k[0]
    for name, caches in (("k", kv_cache.k), ("v", kv_cache.v)):
        for i, cache in enumerate(caches):
            if (cache.shape != first.shape or cache.dtype != first.dtype
                    or cache.device != first.device or not cache.is_contiguous()):
                layout = "" if cache.is_contiguous() else " (not contiguous)"
                raise InvalidArgument(
                    f"kv_cache: {name}[{i}] is {list(cache.shape)} {cache.dtype} on "
                    f"{cache.device}{layout}, expected every layer like k[0]: "
                    f"{list(first.shape)} {first.dtype} on {first.device}, contiguous"
                )


class Transformer(nn.Module):
    """A decoder-only transformer with its head, reading and writing a paged KV pool.

    Parameters
    ----------
    config : ModelConfig
    max_positions : int
        Positions the rotary table covers; a sequence (prompt + suffix) may not be longer.
    dtype, device
        Of the parameters and of the KV cache the model expects.
    """

    def __init__(self, config: ModelConfig, max_positions: int, *, dtype: torch.dtype, device):
        super().__init__()
        c = config
        self.config = config
        self.max_positions = max_positions
        self.embed_tokens = _param(c.vocab_size, c.hidden_size, dtype=dtype, device=device)
        self.layers = nn.ModuleList(
            DecoderLayer(c, dtype=dtype, device=device) for _ in range(c.num_layers)
        )
        self.norm = RMSNorm(c.hidden_size, c.rms_norm_eps, dtype=dtype, device=device)
        self.lm_head: Tensor | None = None
        self.lm_head_packed: Tensor | None = None  # see pack_weights
        self.score_hidden: Linear | None = None
        self.score_out: Linear | None = None
        if c.head == "lm":
            self.lm_head = (
                self.embed_tokens
                if c.tie_word_embeddings
                else _param(c.vocab_size, c.hidden_size, dtype=dtype, device=device)
            )
        elif c.head == "two_class":
            self.score_hidden = Linear(
                c.hidden_size, c.hidden_size, True, dtype=dtype, device=device
            )
            self.score_out = Linear(c.hidden_size, c.num_labels, True, dtype=dtype, device=device)
        else:  # value head: one scalar per position
            self.score_out = Linear(c.hidden_size, 1, True, dtype=dtype, device=device)
        self.register_buffer(
            "rotary", rotary_table(c.rope, c.head_dim, max_positions, device), persistent=False
        )

    @property
    def dtype(self) -> torch.dtype:
        return self.embed_tokens.dtype

    @property
    def device(self) -> torch.device:
        return self.embed_tokens.device

    def pack_weights(self) -> None:
        """On the CPU, run every matrix product through oneDNN on reordered copies of the
        weights (2-3x faster than ``F.linear``; twice their memory): see
        :mod:`ttscale.model.cpu_linear`. Call again after changing weights. A no-op elsewhere."""
        for module in self.modules():
            if isinstance(module, Linear):
                module.pack()
        if self.lm_head is not None:
            self.lm_head_packed = cpu_linear.pack(self.lm_head)

    def _apply(self, fn, recurse=True):
        self.lm_head_packed = None  # as Linear._apply
        return super()._apply(fn, recurse)

    def allocate_kv_cache(self, budget_bytes: int, *, block_size: int = 16) -> KVCache:
        """A paged pool for this model holding as many blocks as ``budget_bytes`` allows."""
        return KVCache.from_budget(
            self.config, budget_bytes, block_size=block_size, dtype=self.dtype, device=self.device
        )

    @torch.no_grad()
    def forward(
        self,
        input_ids: Tensor,
        batch: AttentionBatch,
        kv_cache: KVCache,
        rows: Tensor | None = None,
    ) -> Tensor:
        """Run one step; write the new tokens' K/V into ``kv_cache``; return final hidden states.

        Parameters
        ----------
        input_ids : Tensor
            ``[T]`` integer, the step's new tokens, packed in ``batch``'s order.
        batch : AttentionBatch
            Positions, slots and the two-level context of the step.
        kv_cache : KVCache
            One ``[num_blocks, block_size, Hkv, D]`` pair per layer, this model's dtype and device.
        rows : Tensor, optional
            ``[R]`` integer indices into the ``T`` new tokens whose hidden states to return (for
            example each sequence's last new token); default all.

        Returns
        -------
        Tensor
            ``[R, H]`` after the final norm, in the model's dtype.
        """
        if input_ids.dim() != 1 or input_ids.shape[0] != batch.num_tokens:
            raise InvalidArgument(
                f"input_ids: expected shape [{batch.num_tokens}] (one per position), "
                f"got {list(input_ids.shape)}"
            )
        if len(kv_cache.k) != len(self.layers):
            raise InvalidArgument(f"kv_cache: expected {len(self.layers)} layers, got {len(kv_cache.k)}")
        _check_uniform_layers(kv_cache)
        if check_values(batch.positions):
            check_range("positions", batch.positions, 0, self.max_positions)
        cos_sin = self.rotary[batch.positions]  # [T, D], shared by every layer
        x = F.embedding(input_ids, self.embed_tokens)  # [T, H]
        # Every layer reads the same step metadata and a cache of the same shape: the ops check
        # them at the first layer only (on the CPU the checks read the block tables).
        layers = zip(self.layers, kv_cache.k, kv_cache.v, strict=True)
        fused = fuses_elementwise(batch.backend, x.device)
        delta = None  # the last layer's output, not yet added to the residual stream x
        for i, (layer, k_cache, v_cache) in enumerate(layers):
            x, delta = layer(x, delta, cos_sin, batch, k_cache, v_cache, i == 0, fused)
        if rows is not None:
            x, delta = x[rows], (None if delta is None else delta[rows])
        if delta is None:
            return self.norm(x)
        return self.norm.add_forward(delta, x, fused)[0]

    @torch.no_grad()
    def compute_logits(self, hidden: Tensor, token_ids: Tensor | None = None) -> Tensor:
        """LM-head logits ``[R, V]``, model dtype; ``[R, len(token_ids)]`` for chosen tokens only.

        ``token_ids`` reads only those rows of the LM head: a token-head PRM needs the ``+``/``-``
        logits, not the vocabulary's.
        """
        if self.lm_head is None:
            raise InvalidArgument(f"compute_logits: a {self.config.architecture} has no LM head")
        if token_ids is None and self.lm_head_packed is not None:
            return cpu_linear.linear(hidden, self.lm_head_packed, None)
        weight = self.lm_head if token_ids is None else self.lm_head[token_ids]
        return F.linear(hidden, weight)

    @torch.no_grad()
    def compute_scores(self, hidden: Tensor) -> Tensor:
        """The reward head on hidden states ``[R, H]``, float32.

        Two-class head: ``[R, num_labels]`` logits (``score.2(relu(score.0(h)))``); value head:
        ``[R]`` values before any sigmoid.
        """
        if self.score_out is None:
            raise InvalidArgument(f"compute_scores: a {self.config.architecture} has no reward head")
        if self.score_hidden is not None:
            return self.score_out(F.relu(self.score_hidden(hidden))).float()
        return self.score_out(hidden).squeeze(-1).float()
