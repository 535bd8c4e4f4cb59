"""The ``torch`` backend: the reference itself, under the backends' internal signatures."""

from ttscale import reference


def cascade_decode_attention(q, k_cache, v_cache, pbt, prompt_lens, problem_ids, sbt, suffix_lens, scale, plan):
    return reference.cascade_decode_attention(
        q, k_cache, v_cache, pbt, prompt_lens, problem_ids, sbt, suffix_lens, scale
    )


def paged_prefill_attention(
    q, k_cache, v_cache, pbt, prompt_lens, problem_ids, sbt, suffix_lens, q_lens, scale, plan
):
    return reference.paged_prefill_attention(
        q, k_cache, v_cache, pbt, prompt_lens, problem_ids, sbt, suffix_lens, q_lens, scale
    )


merge_attention_states = reference.merge_attention_states
write_kv = reference.write_kv
add_rms_norm = reference.add_rms_norm
rope_write_kv = reference.rope_write_kv
silu_mul = reference.silu_mul


def prm_step_scores(hidden, seq_ids, weight, bias, kind, agg, state):
    return reference.prm_step_scores(hidden, seq_ids, weight, bias, kind, agg, state)


select_and_fork = reference.select_and_fork
copy_blocks = reference.copy_blocks


def sample(logits, temperature, top_k, top_p, min_p, seed, offsets, num_logprobs):
    tokens, logprobs, top = reference.sample(
        logits, temperature, top_k, top_p, min_p, seed, offsets, num_logprobs)
    if top is None:
        empty = logits.new_empty((logits.shape[0], 0)).float()
        top = (empty.long(), empty)
    # the reference's ids are a view of the whole sort; an op's outputs are its own tensors,
    # laid out as its fake kernel says (contiguous)
    return tokens, logprobs, *(t.contiguous() for t in top)
