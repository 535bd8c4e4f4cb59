"""The ``cpu`` backend of ``prm_step_scores``: the C++ kernel in csrc/cpu/prm.cpp."""

from __future__ import annotations

import torch

from ttscale.backends import new_output
from ttscale.backends.native import DTYPE_CODES, _C, address

# Mirrored in csrc/prm.h.
KIND_CODES = {"two_token": 0, "two_class": 1, "value": 2}
AGG_CODES = {"last": 0, "min": 1, "prod": 2, "mean": 3}


def prm_step_scores(hidden, seq_ids, weight, bias, kind, agg, state):
    scores = new_output((hidden.shape[0],), torch.float32, hidden.device)
    state_out = new_output(state.shape, torch.float32, hidden.device)
    p = _C.PRMParams()
    p.hidden, p.weight, p.bias = address(hidden), address(weight), address(bias)
    p.seq_ids = address(seq_ids)
    p.state_in, p.state_out, p.scores = address(state), address(state_out), address(scores)
    p.num_steps, p.hidden_size = hidden.shape
    p.num_seqs = state.shape[0]
    p.kind, p.agg, p.dtype = KIND_CODES[kind], AGG_CODES[agg], DTYPE_CODES[hidden.dtype]
    _C.prm_step_scores_cpu(p)
    return scores, state_out
