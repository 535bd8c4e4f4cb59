"""Bad input to prm_step_scores raises ValueError naming the argument, never a crash."""

from __future__ import annotations

import pytest
import torch

from ttscale import ops
from ttscale.testing import make_prm_case


@pytest.fixture
def case():
    return make_prm_case(6, 32, 3, kind="two_class", seed=1)


def score(case, **changes):
    args = dict(hidden=case.hidden, seq_ids=case.seq_ids, weight=case.weight, bias=case.bias,
                kind="two_class", agg="mean", state=case.state)
    args.update(changes)
    return ops.prm_step_scores(**args)


def test_unknown_kind(case):
    with pytest.raises(ValueError,
                       match="kind: expected one of two_token, two_class, value, got 'three'"):
        score(case, kind="three")


def test_unknown_agg(case):
    with pytest.raises(ValueError, match="agg: expected one of last, min, prod, mean, got 'max'"):
        score(case, agg="max")


def test_hidden_not_a_tensor(case):
    with pytest.raises(ValueError, match="hidden: expected a torch.Tensor"):
        score(case, hidden=[[1.0]])


def test_hidden_integer_dtype(case):
    with pytest.raises(ValueError, match="hidden: expected dtype"):
        score(case, hidden=case.hidden.to(torch.int32))


def test_hidden_not_2d(case):
    with pytest.raises(ValueError, match="hidden: expected 2 dimensions"):
        score(case, hidden=case.hidden[None])


def test_weight_dtype_differs_from_hidden(case):
    with pytest.raises(ValueError, match="weight: expected dtype float32, got float16"):
        score(case, weight=case.weight.half())


def test_weight_rows_wrong_for_kind(case):
    with pytest.raises(ValueError, match=r"weight: expected shape \[1, 32\] for kind 'value'"):
        score(case, kind="value", bias=None)
    with pytest.raises(ValueError, match=r"weight: expected shape \[2, 32\] for kind 'two_token'"):
        score(case, kind="two_token", weight=torch.randn(3, 32), bias=None)


def test_full_lm_head_is_rejected(case):
    # The op takes the two rows of + and -, never the vocabulary.
    with pytest.raises(ValueError, match=r"weight: expected shape \[2, 32\]"):
        score(case, kind="two_token", weight=torch.randn(1000, 32), bias=None)


def test_weight_hidden_size_mismatch(case):
    with pytest.raises(ValueError, match=r"weight: expected shape \[2, 32\].*got \[2, 31\]"):
        score(case, weight=case.weight[:, :31])


def test_bias_shape(case):
    with pytest.raises(ValueError, match=r"bias: expected shape \[2\], got \[1\]"):
        score(case, bias=case.bias[:1])


def test_bias_dtype(case):
    with pytest.raises(ValueError, match="bias: expected dtype float32, got float64"):
        score(case, bias=case.bias.double())


def test_seq_ids_not_integer(case):
    with pytest.raises(ValueError, match="seq_ids: expected dtype"):
        score(case, seq_ids=case.seq_ids.float())


def test_seq_ids_length(case):
    with pytest.raises(ValueError, match="seq_ids: expected 6 entries"):
        score(case, seq_ids=case.seq_ids[:5])


def test_seq_ids_outside_state(case):
    with pytest.raises(ValueError, match=r"seq_ids: value 3 outside \[0, 3\)"):
        score(case, seq_ids=torch.tensor([0, 1, 2, 3, 0, 0]))


def test_seq_ids_negative(case):
    with pytest.raises(ValueError, match=r"seq_ids: value -1 outside \[0, 3\)"):
        score(case, seq_ids=torch.tensor([0, 1, -1, 0, 0, 0]))
    with pytest.raises(ValueError, match="seq_ids: value -1 is negative"):
        score(case, seq_ids=torch.tensor([0, 1, -1, 0, 0, 0]), state=None)


def test_seq_ids_outside_num_seqs(case):
    with pytest.raises(ValueError, match=r"seq_ids: value 2 outside \[0, 2\)"):
        score(case, state=None, num_seqs=2, seq_ids=torch.tensor([0, 1, 2, 0, 0, 0]))


def test_state_dtype(case):
    with pytest.raises(ValueError, match="state: expected dtype float32, got float64"):
        score(case, state=case.state.double())


def test_state_shape(case):
    with pytest.raises(ValueError, match=r"state: expected shape \[\*, 2\], got \[3, 3\]"):
        score(case, state=torch.zeros(3, 3))
    with pytest.raises(ValueError, match="state: expected 2 dimensions"):
        score(case, state=torch.zeros(6))


def test_num_seqs_disagrees_with_state(case):
    with pytest.raises(ValueError, match="num_seqs: 4 disagrees with state's 3 rows"):
        score(case, num_seqs=4)


def test_num_seqs_negative(case):
    with pytest.raises(ValueError, match="num_seqs: expected an int >= 0, got -1"):
        score(case, state=None, num_seqs=-1)


def test_unknown_backend(case):
    with pytest.raises(ValueError, match="backend: expected one of"):
        score(case, backend="tpu")


def test_weight_on_another_device(case):
    with pytest.raises(ValueError, match="weight: expected device cpu, got meta"):
        score(case, weight=case.weight.to("meta"))


def test_state_on_another_device(case):
    with pytest.raises(ValueError, match="state: expected device cpu, got meta"):
        score(case, state=case.state.to("meta"))
