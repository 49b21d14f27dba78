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
    from kl_kernels.triton import fused_kl as F

    arch, policy, reference, case = sys.argv[1:5]
    flags, entropy_only = case == "all", case == "entropy"
    stats = ["*fp32"] * 6
    scalars = {"T": "i32", "V": "i32", "ignore_index": "i64", "vocab_start": "i64", "vocab_size": "i64"}
    fwd = dict(zip(["logits_ptr", "ref_logits_ptr", "labels_ptr", "temperature_ptr", "logp_ptr", "ref_logp_ptr",
                    "entropy_ptr", "full_kl_ptr", "lse_ptr", "ref_lse_ptr"],
                   [f"*{policy}", f"*{reference}", "*i64", "*fp32", *stats]))
    fwd.update(scalars, **{f"stride_{t}_{d}": "i64" for t in ("logits", "ref") for d in "bt"})
    fwd_constants = dict(INV_TEMPERATURE=0.7, HAS_TEMPERATURE_TENSOR=flags, HAS_REF=flags,
                         NEED_ENTROPY=flags or entropy_only, NEED_FULL=flags, BLOCK_V=4096)
    bwd = dict(zip(["grad_ptr", "logits_ptr", "ref_logits_ptr", "labels_ptr", "temperature_ptr", "grad_logp_ptr",
                    "grad_entropy_ptr", "grad_full_ptr", "lse_ptr", "ref_lse_ptr", "entropy_ptr", "full_kl_ptr"],
                   [f"*{policy}", f"*{policy}", f"*{reference}", "*i64", "*fp32", *stats, "*fp32"]))
    bwd.update(scalars, **{f"stride_{t}_{d}": "i64" for t in ("grad", "logits", "ref") for d in "bt"})
    bwd_constants = dict(INV_TEMPERATURE=0.7, HAS_TEMPERATURE_TENSOR=flags, HAS_GRAD_LOGP=not entropy_only,
                         HAS_GRAD_ENTROPY=flags or entropy_only, HAS_GRAD_FULL=flags, BLOCK_V=4096)
    sizes = {}
    for kernel, signature, constants in ((F._fused_kl_fwd_kernel, fwd, fwd_constants),
                                         (F._fused_kl_bwd_kernel, bwd, bwd_constants)):
        signature = {**signature, **{name: "constexpr" for name in constants}}
        compiled = triton.compile(ASTSource(kernel, signature, constants),
                                  target=GPUTarget("cuda", int(arch), 32), options=dict(num_warps=8))
        sizes[kernel.__name__] = len(compiled.asm["cubin"])
    print(json.dumps(sizes))
""")


@pytest.mark.parametrize("arch", ["80", "90"])
# flags: every option on; every option off; only entropy (no label log-prob gradient)
@pytest.mark.parametrize("policy,reference,flags", [("bf16", "bf16", "all"), ("fp16", "fp32", "all"),
                                                    ("fp32", "fp32", "none"), ("bf16", "bf16", "entropy")])
def test_triton_kernels_compile_for_gpu(arch, policy, reference, flags):
    pytest.importorskip("triton")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_DEFAULT_FP_FUSION"] = "1"
    result = subprocess.run([sys.executable, "-c", SCRIPT, arch, policy, reference, flags], capture_output=True,
                            text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stderr[-4000:]
    sizes = json.loads(result.stdout.strip().splitlines()[-1])
    assert sizes["_fused_kl_fwd_kernel"] > 0 and sizes["_fused_kl_bwd_kernel"] > 0
