// Every schema of the kl_kernels library, in one place. Kernels register per device key in
// csrc/cpu/<op>.cpp (and csrc/cuda/<op>.cu); fake impls live in kl_kernels/backends/adapter.py, autograd in kl_kernels/api.py.
//
// The fused pass over [B, T, V] logits (vocabulary dim contiguous, rows at any stride):
//   fused_kl_fwd -> per-row label log-prob, reference label log-prob, entropy, exact KL, and the
//                   log-sum-exp of both rows (saved for the backward), each [N = B*T] float32
//                   (float64 for float64 logits); outputs not asked for are empty.
//   fused_kl_bwd -> gradient of the logits in their dtype, one more pass.
// temperature: a per-row [N] tensor, or None and then scalar_temperature applies.
// vocab_start, vocab_size: the V columns are ids [vocab_start, vocab_start + V) of a vocabulary of
// vocab_size ids (0 and V unless a tensor-parallel rank passes its shard; labels are global ids).
#include <Python.h>
#include <torch/library.h>


// The extension is loaded with `import kl_kernels._C`, which runs the static registrations below; the
// module itself has no functions (kl-bench's allocation counter is kl_kernels.tools._memory).
extern "C" PyObject* PyInit__C(void) {
  static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module);
}

TORCH_LIBRARY(kl_kernels, m) {
  m.def(
      "fused_kl_fwd(Tensor logits, Tensor labels, Tensor? ref_logits, Tensor? temperature, "
      "float scalar_temperature, int ignore_index, int vocab_start, int vocab_size, bool need_entropy, "
      "bool need_full) -> "
      "(Tensor logp, Tensor ref_logp, Tensor entropy, Tensor full_kl, Tensor lse, Tensor ref_lse)");
  m.def(
      "fused_kl_bwd(Tensor? grad_logp, Tensor? grad_entropy, Tensor? grad_full, Tensor logits, "
      "Tensor labels, Tensor? ref_logits, Tensor? temperature, float scalar_temperature, "
      "int ignore_index, int vocab_start, int vocab_size, Tensor lse, Tensor? ref_lse, Tensor? entropy, "
      "Tensor? full_kl) -> Tensor");
  // inplace_backward=True: the gradient overwrites the logits (declared as a mutation)
  m.def(
      "fused_kl_bwd_(Tensor? grad_logp, Tensor? grad_entropy, Tensor? grad_full, Tensor(a!) logits, "
      "Tensor labels, Tensor? ref_logits, Tensor? temperature, float scalar_temperature, "
      "int ignore_index, int vocab_start, int vocab_size, Tensor lse, Tensor? ref_lse, Tensor? entropy, "
      "Tensor? full_kl) -> ()");
  // kl_penalty in one op (docs/contract.md section 2): the row pass, then the estimator (a code of
  // estimators.ESTIMATOR_CODES; clamps None when unset), masks (mask: nonzero = valid), penalty
  // -kl_coef * kl (kl_coef: a 0-dim tensor, or None and then scalar_kl_coef) and per-sequence sums:
  // padded: sequence b is row b of [B, T]; else cu_seqlens [S+1] (None: one sequence of all rows).
  // Exactly one of ref_logits / ref_logprobs. Outputs [N] (logp .. penalty), [S] (kl_sum .. counts:
  // valid rows per sequence), [N] int32 sequence (each row's, -1 outside all), then [N] entropy,
  // full_kl, lse, ref_lse as fused_kl_fwd. counts and sequence are for the backward.
  m.def(
      "kl_penalty_fwd(Tensor logits, Tensor labels, Tensor? ref_logits, Tensor? ref_logprobs, Tensor? mask, "
      "Tensor? cu_seqlens, Tensor? temperature, float scalar_temperature, int ignore_index, int estimator, "
      "bool straight_through, float? log_ratio_clamp, float? kl_clamp, Tensor? kl_coef, float scalar_kl_coef, "
      "bool padded, bool need_entropy) -> (Tensor logp, Tensor ref_logp, Tensor kl, Tensor penalty, "
      "Tensor kl_sum, Tensor kl_mean, Tensor counts, Tensor sequence, Tensor entropy, Tensor full_kl, Tensor lse, "
      "Tensor ref_lse)");
  // its backward, one op: the upstream gradients of logprobs, kl, penalty, kl_sum, kl_mean and
  // entropy (None where nothing flows) -> the logits' gradient, from what the forward returned
#define KL_PENALTY_BWD_SCHEMA(name, logits)                                                                     \
  name "(Tensor? grad_logp, Tensor? grad_kl, Tensor? grad_penalty, Tensor? grad_kl_sum, Tensor? grad_kl_mean, " \
       "Tensor? grad_entropy, " logits ", Tensor labels, Tensor? ref_logits, Tensor? mask, Tensor? temperature, " \
       "float scalar_temperature, int ignore_index, int estimator, bool straight_through, "                        \
       "float? log_ratio_clamp, float? kl_clamp, Tensor? kl_coef, float scalar_kl_coef, Tensor logp, "             \
       "Tensor ref_logp, Tensor counts, Tensor sequence, Tensor lse, Tensor? ref_lse, Tensor? entropy, "           \
       "Tensor? full_kl)"
  m.def(KL_PENALTY_BWD_SCHEMA("kl_penalty_bwd", "Tensor logits") " -> Tensor");
  m.def(KL_PENALTY_BWD_SCHEMA("kl_penalty_bwd_", "Tensor(a!) logits") " -> ()");
#undef KL_PENALTY_BWD_SCHEMA
  // sampling replay (kl_kernels/replay.py): [N, K] int64 kept ids -> [N, K] bool, True where the entry
  // counts (an id in [0, columns) not seen earlier in its row); CPU only (elsewhere a stable sort)
  m.def("kept_counts(Tensor ids, int columns) -> Tensor");
  // frees the CPU backward's cached gradient block (csrc/cpu/gradient_cache.h)
  m.def("empty_cpu_cache() -> ()");
}
