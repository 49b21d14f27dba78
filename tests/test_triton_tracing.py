"""How torch.compile sees the triton ops on a GPU, checked without one: AOT autograd traces
kl_penalty on fake CUDA tensors (a stub Triton driver names an sm_90 target, as a GPU's would), the
triton_op lowers to triton_kernel_wrapper_functional, and Triton's mutation analysis finds that
the kernels write only their outputs, so no logits tensor is ever cloned."""
import os
import subprocess
import sys
import textwrap

import pytest

SCRIPT = textwrap.dedent("""
    import re, torch, triton
    from triton.backends.compiler import GPUTarget
    from functorch.compile import aot_function, make_boxed_func
    from torch._subclasses.fake_tensor import FakeTensorMode
    import kl_kernels

    class StubDriver:  # what torch asks the active driver while tracing: the target to lower for
        def get_current_target(self):
            return GPUTarget("cuda", 90, 32)
        def get_active_torch_device(self):
            return torch.device("cuda", 0)
        def get_current_device(self):
            return 0

    triton.runtime.driver.set_active(StubDriver())
    graphs = []

    def capture(gm, inputs):
        graphs.append(gm.code)
        return make_boxed_func(gm.forward)

    with FakeTensorMode():
        z = torch.empty(2, 7, 50, device="cuda", dtype=torch.bfloat16)
        zr = torch.empty(2, 7, 50, device="cuda", dtype=torch.bfloat16)
        y = torch.zeros(2, 7, dtype=torch.long, device="cuda")
        mask = torch.ones(2, 7, device="cuda")
        temperature = torch.ones(2, 7, device="cuda")
        g = torch.ones(14, device="cuda")

        def forward(z, zr, y, mask, temperature):
            out = kl_kernels.kl_penalty(z, y, ref_logits=zr, mask=mask, estimator="full", return_entropy=True,
                                        temperature=temperature, validate=False, backend="triton")
            return out.kl_mean, out.entropy

        counts, sequence = torch.ones(2, device="cuda"), torch.zeros(14, dtype=torch.int32, device="cuda")

        def backward(z, zr, y, g, counts, sequence):
            f = torch.ops.kl_kernels.triton_fused_kl_fwd(z, y.view(-1), zr, None, 1.0, -100, 0, 50, True, True)
            logp, _, entropy, full, lse, ref_lse = f
            grad = torch.ops.kl_kernels.triton_fused_kl_bwd(g, g, g, z, y.view(-1), zr, None, 1.0, -100, 0, 50, lse, ref_lse,
                                                            entropy, full)
            # kl_penalty's one-pass backward (k3 with a mask): still only its gradient is written
            grad_penalty = torch.ops.kl_kernels.triton_kl_penalty_bwd(
                g, g, g, None, counts, None, z, y.view(-1), zr, g, None, 1.0, -100, 3, False, 20.0, 10.0, None, 0.1,
                logp, logp, counts, sequence, lse, ref_lse, None, None)
            z2 = z.clone()
            torch.ops.kl_kernels.triton_fused_kl_bwd_(g, None, None, z2, y.view(-1), None, None, 1.0, -100, 0, 50, lse, None,
                                                      None, None)
            return grad, grad_penalty, z2

        aot_function(forward, fw_compiler=capture)(z, zr, y, mask, temperature)
        aot_function(backward, fw_compiler=capture)(z, zr, y, g, counts, sequence)
    for code in graphs:
        for line in code.splitlines():
            if "triton_kernel_wrapper_functional(" in line:
                print(re.search(r"kernel_idx = \\d+", line).group(0),
                      re.search(r"tensors_to_clone = (\\[[^]]*\\])", line).group(1))
""")


def test_triton_ops_lower_without_cloning_the_logits():
    pytest.importorskip("triton")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    result = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stderr[-4000:]
    launches = [line.split(" ", 3)[-1] for line in result.stdout.strip().splitlines()]
    outputs = ["'logp_ptr'", "'ref_logp_ptr'", "'entropy_ptr'", "'full_kl_ptr'", "'lse_ptr'", "'ref_lse_ptr'"]
    sums = ["'kl_sum_ptr'", "'kl_mean_ptr'", "'counts_ptr'", "'sequence_ptr'"]
    assert launches == [
        # kl_penalty's forward: two launches, the rows (with kl and penalty) and the per-sequence sums
        f"[{', '.join(outputs + [repr('kl_ptr'), repr('penalty_ptr')])}]",
        f"[{', '.join(sums)}]",
        f"[{', '.join(outputs)}]",  # the forward op
        "['grad_ptr']",  # the backward writes only its fresh gradient
        "['grad_ptr']",  # so does kl_penalty's one-pass backward
        "['grad_ptr']",  # the in-place backward: grad_ptr is the logits themselves (declared mutated by the op)
    ], result.stdout
