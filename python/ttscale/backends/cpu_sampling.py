"""The ``cpu`` backend of the sample op: the C++ kernel in csrc/cpu/sampling.cpp."""

from __future__ import annotations

import torch

from ttscale.backends import new_output
from ttscale.backends.native import _C, DTYPE_CODES, address


def sample(logits, temperature, top_k, top_p, min_p, seed, offsets, num_logprobs):
    batch, vocab = logits.shape
    tokens = new_output((batch,), torch.int64, logits.device)
    logprobs = new_output((batch,), torch.float32, logits.device)
    top_ids = new_output((batch, num_logprobs), torch.int64, logits.device)
    top_logprobs = new_output((batch, num_logprobs), torch.float32, logits.device)
    p = _C.SampleParams()
    p.logits, p.temperature, p.top_k = address(logits), address(temperature), address(top_k)
    p.top_p, p.min_p, p.offsets = address(top_p), address(min_p), address(offsets)
    p.tokens, p.logprobs = address(tokens), address(logprobs)
    p.top_ids, p.top_logprobs = address(top_ids), address(top_logprobs)
    p.batch, p.vocab, p.num_logprobs = batch, vocab, num_logprobs
    p.seed = seed % 2**64
    p.dtype = DTYPE_CODES[logits.dtype]
    _C.sample_cpu(p)
    return tokens, logprobs, top_ids, top_logprobs
