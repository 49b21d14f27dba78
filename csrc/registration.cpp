// Every schema of the kl_kernels library, in one place. Kernels register per device key in
// csrc/cpu/<op>.cpp (and csrc/cuda/<op>.cu); fake impls and autograd live in kl_kernels/ops.py.
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

// The extension is loaded with `import kl_kernels._C`; the module itself is empty, importing it
// runs the static registrations below.
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
}
