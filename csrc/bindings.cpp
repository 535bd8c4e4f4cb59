// The one extension module, ttscale._C. Tensors cross as addresses plus sizes checked in Python,
// so the module does not link libtorch and one build serves any torch version.
#include <pybind11/pybind11.h>

#include "attention.h"
#include "prm.h"
#include "sampling.h"
#include "select.h"

namespace py = pybind11;
using namespace ttscale;

#define TTSCALE_FIELD(cls, name) .def_readwrite(#name, &cls::name)

PYBIND11_MODULE(_C, m) {
  m.doc() = "ttscale native kernels (C++ CPU, and CUDA when built with it)";
#ifdef TTSCALE_WITH_CUDA
  m.attr("with_cuda") = true;
#else
  m.attr("with_cuda") = false;
#endif
#ifdef TTSCALE_WITH_OPENMP
  m.attr("with_openmp") = true;
#else
  m.attr("with_openmp") = false;
#endif

  py::class_<AttentionParams>(m, "AttentionParams")
      .def(py::init<>())
      TTSCALE_FIELD(AttentionParams, q) TTSCALE_FIELD(AttentionParams, out)
      TTSCALE_FIELD(AttentionParams, lse) TTSCALE_FIELD(AttentionParams, k_cache)
      TTSCALE_FIELD(AttentionParams, v_cache) TTSCALE_FIELD(AttentionParams, prompt_block_tables)
      TTSCALE_FIELD(AttentionParams, prompt_lens) TTSCALE_FIELD(AttentionParams, problem_ids)
      TTSCALE_FIELD(AttentionParams, suffix_block_tables) TTSCALE_FIELD(AttentionParams, suffix_lens)
      TTSCALE_FIELD(AttentionParams, q_starts) TTSCALE_FIELD(AttentionParams, seq_order)
      TTSCALE_FIELD(AttentionParams, problem_starts) TTSCALE_FIELD(AttentionParams, num_seqs)
      TTSCALE_FIELD(AttentionParams, num_problems) TTSCALE_FIELD(AttentionParams, total_q)
      TTSCALE_FIELD(AttentionParams, num_q_heads) TTSCALE_FIELD(AttentionParams, num_kv_heads)
      TTSCALE_FIELD(AttentionParams, head_dim) TTSCALE_FIELD(AttentionParams, num_blocks)
      TTSCALE_FIELD(AttentionParams, block_size) TTSCALE_FIELD(AttentionParams, max_prompt_blocks)
      TTSCALE_FIELD(AttentionParams, max_suffix_blocks) TTSCALE_FIELD(AttentionParams, scale)
      TTSCALE_FIELD(AttentionParams, dtype) TTSCALE_FIELD(AttentionParams, stream)
      TTSCALE_FIELD(AttentionParams, device) TTSCALE_FIELD(AttentionParams, workspace)
      TTSCALE_FIELD(AttentionParams, workspace_floats);

  py::class_<MergeParams>(m, "MergeParams")
      .def(py::init<>())
      TTSCALE_FIELD(MergeParams, o_a) TTSCALE_FIELD(MergeParams, lse_a)
      TTSCALE_FIELD(MergeParams, o_b) TTSCALE_FIELD(MergeParams, lse_b)
      TTSCALE_FIELD(MergeParams, out) TTSCALE_FIELD(MergeParams, lse)
      TTSCALE_FIELD(MergeParams, rows) TTSCALE_FIELD(MergeParams, heads)
      TTSCALE_FIELD(MergeParams, head_dim) TTSCALE_FIELD(MergeParams, dtype)
      TTSCALE_FIELD(MergeParams, stream);

  py::class_<WriteKVParams>(m, "WriteKVParams")
      .def(py::init<>())
      TTSCALE_FIELD(WriteKVParams, k_cache) TTSCALE_FIELD(WriteKVParams, v_cache)
      TTSCALE_FIELD(WriteKVParams, k) TTSCALE_FIELD(WriteKVParams, v)
      TTSCALE_FIELD(WriteKVParams, slots) TTSCALE_FIELD(WriteKVParams, num_rows)
      TTSCALE_FIELD(WriteKVParams, num_kv_heads) TTSCALE_FIELD(WriteKVParams, head_dim)
      TTSCALE_FIELD(WriteKVParams, num_slots) TTSCALE_FIELD(WriteKVParams, dtype)
      TTSCALE_FIELD(WriteKVParams, stream);

  // The GIL is released: kernels touch only raw memory.
  auto nogil = py::call_guard<py::gil_scoped_release>();
  m.def("cascade_decode_attention_cpu", &cascade_decode_attention_cpu, nogil);
  m.def("paged_prefill_attention_cpu", &paged_prefill_attention_cpu, nogil);
  m.def("merge_attention_states_cpu", &merge_attention_states_cpu, nogil);
  m.def("write_kv_cpu", &write_kv_cpu, nogil);
#ifdef TTSCALE_WITH_CUDA
  m.def("cascade_decode_attention_cuda", &cascade_decode_attention_cuda, nogil);
  m.def("cascade_decode_workspace_floats_cuda", &cascade_decode_workspace_floats_cuda, nogil);
#endif

  py::class_<PRMParams>(m, "PRMParams")
      .def(py::init<>())
      TTSCALE_FIELD(PRMParams, hidden) TTSCALE_FIELD(PRMParams, weight)
      TTSCALE_FIELD(PRMParams, bias) TTSCALE_FIELD(PRMParams, seq_ids)
      TTSCALE_FIELD(PRMParams, state_in) TTSCALE_FIELD(PRMParams, state_out)
      TTSCALE_FIELD(PRMParams, scores) TTSCALE_FIELD(PRMParams, num_steps)
      TTSCALE_FIELD(PRMParams, hidden_size) TTSCALE_FIELD(PRMParams, num_seqs)
      TTSCALE_FIELD(PRMParams, kind) TTSCALE_FIELD(PRMParams, agg)
      TTSCALE_FIELD(PRMParams, dtype);
  m.def("prm_step_scores_cpu", &prm_step_scores_cpu, nogil);

  // select_and_fork and copy_blocks (csrc/select.h).
  py::class_<SelectParams>(m, "SelectParams")
      .def(py::init<>())
      TTSCALE_FIELD(SelectParams, scores) TTSCALE_FIELD(SelectParams, group_offsets)
      TTSCALE_FIELD(SelectParams, keep) TTSCALE_FIELD(SelectParams, children)
      TTSCALE_FIELD(SelectParams, block_tables) TTSCALE_FIELD(SelectParams, lens)
      TTSCALE_FIELD(SelectParams, ref_counts) TTSCALE_FIELD(SelectParams, free_stack)
      TTSCALE_FIELD(SelectParams, free_top) TTSCALE_FIELD(SelectParams, status)
      TTSCALE_FIELD(SelectParams, kept) TTSCALE_FIELD(SelectParams, num_kept)
      TTSCALE_FIELD(SelectParams, parents) TTSCALE_FIELD(SelectParams, child_offsets)
      TTSCALE_FIELD(SelectParams, child_tables) TTSCALE_FIELD(SelectParams, child_lens)
      TTSCALE_FIELD(SelectParams, copy_src) TTSCALE_FIELD(SelectParams, copy_dst)
      TTSCALE_FIELD(SelectParams, num_candidates) TTSCALE_FIELD(SelectParams, num_groups)
      TTSCALE_FIELD(SelectParams, max_blocks) TTSCALE_FIELD(SelectParams, block_size)
      TTSCALE_FIELD(SelectParams, num_blocks) TTSCALE_FIELD(SelectParams, max_keep)
      TTSCALE_FIELD(SelectParams, num_slots) TTSCALE_FIELD(SelectParams, num_copies)
      TTSCALE_FIELD(SelectParams, stream);

  py::class_<CopyBlocksParams>(m, "CopyBlocksParams")
      .def(py::init<>())
      TTSCALE_FIELD(CopyBlocksParams, k_cache) TTSCALE_FIELD(CopyBlocksParams, v_cache)
      TTSCALE_FIELD(CopyBlocksParams, src) TTSCALE_FIELD(CopyBlocksParams, dst)
      TTSCALE_FIELD(CopyBlocksParams, num_pairs) TTSCALE_FIELD(CopyBlocksParams, num_layers)
      TTSCALE_FIELD(CopyBlocksParams, num_blocks) TTSCALE_FIELD(CopyBlocksParams, block_bytes)
      TTSCALE_FIELD(CopyBlocksParams, stream);

  m.def("select_and_fork_cpu", &select_and_fork_cpu, nogil);
  m.def("copy_blocks_cpu", &copy_blocks_cpu, nogil);

  py::class_<SampleParams>(m, "SampleParams")
      .def(py::init<>())
      TTSCALE_FIELD(SampleParams, logits) TTSCALE_FIELD(SampleParams, temperature)
      TTSCALE_FIELD(SampleParams, top_k) TTSCALE_FIELD(SampleParams, top_p)
      TTSCALE_FIELD(SampleParams, min_p) TTSCALE_FIELD(SampleParams, offsets)
      TTSCALE_FIELD(SampleParams, tokens) TTSCALE_FIELD(SampleParams, logprobs)
      TTSCALE_FIELD(SampleParams, top_ids) TTSCALE_FIELD(SampleParams, top_logprobs)
      TTSCALE_FIELD(SampleParams, batch) TTSCALE_FIELD(SampleParams, vocab)
      TTSCALE_FIELD(SampleParams, num_logprobs) TTSCALE_FIELD(SampleParams, seed)
      TTSCALE_FIELD(SampleParams, dtype) TTSCALE_FIELD(SampleParams, stream);
  m.def("sample_cpu", &sample_cpu, nogil);
}
