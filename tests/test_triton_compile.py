"""The Triton kernels compile for sm_80 and sm_90 (Ampere, Hopper) through Triton's own compiler
and ptxas, here, without a GPU: the interpreter that runs the rest of the suite on CPU does not
type-check or lower the kernels, so this catches what only a GPU compile would. The GPU machine
runs them (bench/gpu_check.sh)."""
import json
import os
import subprocess
import sys
import textwrap

import pytest

SCRIPT = textwrap.dedent("""
    import json, sys
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from kl_kernels.backends.triton import fused_kl as F
    from kl_kernels.estimators import ESTIMATOR_CODES

    arch, policy, reference, case = sys.argv[1:5]
    flags, entropy_only = case in ("all", "penalty-full"), case == "entropy"
    # kl_penalty's one pass: the estimator (by its code), clamps, a mask, a kl_coef tensor
    penalty = case.startswith("penalty-")
    name = case.removeprefix("penalty-")
    chain = dict(PENALTY=penalty, HAS_MASK=penalty, HAS_COEF_TENSOR=penalty,
                 ESTIMATOR=ESTIMATOR_CODES[name.rstrip("+")] if penalty else 0, STRAIGHT_THROUGH=name.endswith("+"),
                 LOG_RATIO_CLAMP=20.0 if name == "k3" else 0.0, KL_CLAMP=10.0 if penalty else 0.0)
    stats = ["*fp32"] * 6
    scalars = {"T": "i32", "V": "i32", "ignore_index": "i64", "vocab_start": "i64", "vocab_size": "i64"}
    fwd = dict(zip(["logits_ptr", "ref_logits_ptr", "labels_ptr", "temperature_ptr", "logp_ptr", "ref_logp_ptr",
                    "entropy_ptr", "full_kl_ptr", "lse_ptr", "ref_lse_ptr"],
                   [f"*{policy}", f"*{reference}", "*i64", "*fp32", *stats]))
    fwd.update(scalars, **{f"stride_{t}_{d}": "i64" for t in ("logits", "ref") for d in "bt"})
    fwd.update(ref_logprobs_ptr="*fp32", mask_ptr="*i1", kl_ptr="*fp32", penalty_ptr="*fp32", kl_coef="fp32",
               kl_coef_ptr="*fp32")
    fwd_constants = dict(INV_TEMPERATURE=0.7, HAS_TEMPERATURE_TENSOR=flags, HAS_REF=flags or name == "k3",
                         NEED_ENTROPY=flags or entropy_only, NEED_FULL=flags, BLOCK_V=4096, **chain)
    bwd = dict(zip(["grad_ptr", "logits_ptr", "ref_logits_ptr", "labels_ptr", "temperature_ptr", "grad_logp_ptr",
                    "grad_entropy_ptr", "grad_full_ptr", "lse_ptr", "ref_lse_ptr", "entropy_ptr", "full_kl_ptr"],
                   [f"*{policy}", f"*{policy}", f"*{reference}", "*i64", "*fp32", *stats, "*fp32"]))
    bwd.update(scalars, **{f"stride_{t}_{d}": "i64" for t in ("grad", "logits", "ref") for d in "bt"})
    bwd.update(**{f"{n}_ptr": "*fp32" for n in ("grad_kl", "grad_penalty", "grad_kl_sum", "grad_kl_mean", "counts")},
               sequence_ptr="*i32", logp_ptr="*fp32", ref_logp_ptr="*fp32", mask_ptr="*i1", kl_coef="fp32",
               kl_coef_ptr="*fp32")
    # the upstream gradients' strides (0 for an expanded one)
    bwd.update({f"stride_grad_{n}": "i64" for n in ("logp", "entropy", "full", "kl", "penalty", "kl_sum", "kl_mean")})
    bwd_constants = dict(INV_TEMPERATURE=0.7, HAS_TEMPERATURE_TENSOR=flags, HAS_GRAD_LOGP=not entropy_only,
                         HAS_GRAD_ENTROPY=flags or entropy_only, HAS_GRAD_FULL=flags, BLOCK_V=4096,
                         HAS_GRAD_KL=penalty, HAS_GRAD_PENALTY=penalty, HAS_GRAD_KL_SUM=penalty,
                         HAS_GRAD_KL_MEAN=penalty, **chain)
    sums = dict(kl_ptr="*fp32", labels_ptr="*i64", mask_ptr="*i1", cu_seqlens_ptr="*i32", kl_sum_ptr="*fp32",
                kl_mean_ptr="*fp32", counts_ptr="*fp32", sequence_ptr="*i32", N="i64", T="i64", n_cu="i64",
                n_seq="i64", ignore_index="i64")
    sums_constants = dict(PADDED=not penalty, HAS_CU=penalty, HAS_MASK=penalty, BLOCK=F.SUMS_BLOCK)
    sizes = {}
    for kernel, signature, constants in ((F._fused_kl_fwd_kernel, fwd, fwd_constants),
                                         (F._fused_kl_bwd_kernel, bwd, bwd_constants),
                                         (F._sequence_sums_kernel, sums, sums_constants)):
        signature = {**signature, **{name: "constexpr" for name in constants}}
        compiled = triton.compile(ASTSource(kernel, signature, constants),
                                  target=GPUTarget("cuda", int(arch), 32), options=dict(num_warps=8))
        sizes[kernel.__name__] = len(compiled.asm["cubin"])
    print(json.dumps(sizes))
""")


@pytest.mark.parametrize("arch", ["80", "90"])
# flags: every option on; every option off; only entropy (no label log-prob gradient)
# penalty-<estimator>: kl_penalty's one pass (estimator epilogue, chain in the backward, sequence sums)
@pytest.mark.parametrize("policy,reference,flags", [("bf16", "bf16", "all"), ("fp16", "fp32", "all"),
                                                    ("fp32", "fp32", "none"), ("bf16", "bf16", "entropy"),
                                                    ("bf16", "bf16", "penalty-k3"), ("fp32", "fp32", "penalty-full"),
                                                    ("bf16", "fp32", "penalty-abs+")])
def test_triton_kernels_compile_for_gpu(arch, policy, reference, flags):
    pytest.importorskip("triton")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_DEFAULT_FP_FUSION"] = "1"
    result = subprocess.run([sys.executable, "-c", SCRIPT, arch, policy, reference, flags], capture_output=True,
                            text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stderr[-4000:]
    sizes = json.loads(result.stdout.strip().splitlines()[-1])
    assert sizes["_fused_kl_fwd_kernel"] > 0 and sizes["_fused_kl_bwd_kernel"] > 0 and sizes["_sequence_sums_kernel"] > 0
