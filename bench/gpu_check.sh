#!/usr/bin/env bash
# The GPU check of issues 4, 5 and 8, in one call on a device machine (no network, its own torch):
#   bash bench/gpu_check.sh        (writes under $OUT, default ./gpu_out)
# 1. installs this package against the machine's torch (builds the CUDA extension when nvcc and a
#    CUDA torch are there; Liger-Kernel too when a wheel was carried in wheels/), 2. runs the whole
#    test suite on CUDA (the GPU backends on CUDA tensors; tests/test_launch_count.py counts
#    kl_penalty's CUDA kernels there: issue 14 wants <= 2 forward, <= 1 backward), 3. runs kl-bench at the issues' shapes
#    (N = 16384, V = 32000 / 128256 / 151936, bf16) for eager and every backend present (+ liger),
#    4. kl-bench --linear (hidden states, N = 8192, H = 4096, V = 128256, bf16).
# At most 8 files come back from a device call: environment, install (+ build_inplace when it runs),
# tests, bench (txt, json), bench_linear (txt, json). Each step has its own time limit so that the
# whole stays inside a 10-minute call; a failed step does not stop the later ones, and the exit
# status says whether any failed. A CPU smoke test of the plumbing:
#   GPU_CHECK_TESTS=tests/test_bench.py GPU_CHECK_BENCH="--tokens 256 --vocab 500" \
#   GPU_CHECK_LINEAR="--tokens 256 --hidden 32 --vocab 500" GPU_CHECK_PROVIDERS="eager cpu" \
#   OUT=/tmp/gc bash bench/gpu_check.sh
# Liger-Kernel: `pip download liger-kernel --no-deps -d wheels` here, then name wheels in carry.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-$PWD/gpu_out}"
mkdir -p "$OUT"
status=0
step() {  # step NAME SECONDS COMMAND...: run with a limit, log to $OUT/NAME.txt
  local name=$1 limit=$2
  shift 2
  echo "== $name (limit ${limit}s)"
  timeout "$limit" "$@" >"$OUT/$name.txt" 2>&1
  local rc=$?
  tail -n 25 "$OUT/$name.txt"
  echo "== $name: exit $rc"
  [ $rc -eq 0 ] || status=1
}

{
  date -u +%FT%TZ
  echo "commit ${KL_KERNELS_COMMIT:-$(git rev-parse HEAD 2>/dev/null || echo unknown)}"
  nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.memory --format=csv
  python -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__)"
  nvcc --version | tail -n 2
} >"$OUT/environment.txt" 2>&1
cat "$OUT/environment.txt"

# CUDA_HOME: the folder of the nvcc this machine has (setup.py decides from torch.version.cuda and it)
if [ -z "${CUDA_HOME:-}" ] && command -v nvcc >/dev/null; then
  CUDA_HOME="$(dirname "$(dirname "$(readlink -f "$(command -v nvcc)")")")"
  export CUDA_HOME
fi
export MAX_JOBS="${MAX_JOBS:-16}"
# the package from this tree even if the editable install fails (then the extension is built in place)
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
step install 180 bash -c 'pip install --no-build-isolation --no-deps --no-index -e . &&
  { ! ls wheels/*.whl >/dev/null 2>&1 || pip install --no-deps --no-index wheels/*.whl; }'
if [ $status -ne 0 ]; then
  step build_inplace 180 python setup.py build_ext --inplace
fi
python -c "import kl_kernels; [print(b) for b in kl_kernels.available_backends()]" | tee -a "$OUT/environment.txt"

# GPU_CHECK_TESTS / _BENCH / _PROVIDERS override what runs (a CPU smoke test of this script uses both)
# the GPU backends' tests (CI runs the CPU ones; the compile-only checks need no GPU)
gpu_names=$(python -c "from kl_kernels.dispatch import BACKENDS; print(' or '.join(n for n, b in BACKENDS.items() if b.home == 'cuda'))")
gpu_tests=(tests -k "($gpu_names) and not compile_for_gpu and not plain_nvcc and not glue_compiles and not lower_without")
if [ -n "${GPU_CHECK_TESTS:-}" ]; then gpu_tests=($GPU_CHECK_TESTS); fi
step tests 200 python -m pytest "${gpu_tests[@]}" -q -x -p no:cacheprovider -m "not slow" -rs

providers="${GPU_CHECK_PROVIDERS:-eager $(python -c "from kl_kernels.dispatch import native_backends; print(' '.join(native_backends('cuda')))")}"
[ -z "${GPU_CHECK_PROVIDERS:-}" ] && python -c "import liger_kernel" 2>/dev/null && providers="$providers liger"
step bench 160 python -m kl_kernels.tools.bench ${GPU_CHECK_BENCH:---tokens 16384 --vocab 32000 128256 151936 --dtype bfloat16 \
  --repeats 10} --providers $providers --json "$OUT/bench.json"
linear_providers="${GPU_CHECK_PROVIDERS:-eager $(python -c "from kl_kernels.dispatch import native_backends
print(' '.join(native_backends('cuda') + ['logits+' + name for name in native_backends('cuda')]))")}"
step bench_linear 90 python -m kl_kernels.tools.bench --linear ${GPU_CHECK_LINEAR:---tokens 8192 --hidden 4096 --vocab 128256 \
  --dtype bfloat16 --modes fwd+bwd --repeats 5} --providers $linear_providers --json "$OUT/bench_linear.json"
exit $status
