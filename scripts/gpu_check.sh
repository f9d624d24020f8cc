#!/usr/bin/env bash
# The GPU check, runnable unchanged on a lent H100/H200 (torch 2.11+ and CUDA preinstalled, no network):
#   1. device.json   the card, torch/CUDA/Triton versions, the commit
#   2. build         the extension with its CUDA kernels, in place, for this card's architecture
#   3. tests         the whole suite on CUDA tensors (FASTGRAD_TEST_DEVICE=cuda): CUDA and Triton backends against
#                    the reference, same seed same samples across backends; junit XML + log
#   4. bench         the per-op benchmarks on cuda at the issue's sizes (the CPU rows come from the 2-core
#                    machine): torch.cuda.synchronize in every timed call, GB/s, fraction of the copy roofline
#                    measured on the same device, peak CUDA memory
#   5. bench_lm      the fused LM-head policy loss against torch eager, bf16, at the issue's GPU shapes
#   6. summary.json  each step's exit status and seconds; log.txt holds every step's output
# Everything lands in $OUT (default runs/gpu_check). Budget: under 8 minutes on an H200. Each step has its own
# timeout, and all of them share FASTGRAD_GPU_CHECK_BUDGET seconds (default 540: a device command is killed at 600 s,
# and summary.json must be written before that); a step with too little time left is recorded as skipped (rc 125).
# FASTGRAD_GPU_CHECK_STEPS=tests,bench (a comma list of build, tests, bench, bench_lm; default all) reruns a subset
# on a warm machine whose in-place build is still there.
# FASTGRAD_GPU_CHECK_DRY=1 runs the logic on a CPU-only machine (no build, tests and benchmarks on the CPU, smoke
# sizes): CI does this, so the script cannot rot between GPU loans.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-runs/gpu_check}
mkdir -p "$OUT"
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] && [ -z "${PYTHON:-}" ] && [ "${FASTGRAD_GPU_CHECK_DRY:-0}" = 1 ] && PY=.venv/bin/python
DRY=${FASTGRAD_GPU_CHECK_DRY:-0}
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
: > "$OUT/steps.jsonl"
: > "$OUT/log.txt"
DEADLINE=$(( $(date +%s) + ${FASTGRAD_GPU_CHECK_BUDGET:-540} ))
STEPS=",${FASTGRAD_GPU_CHECK_STEPS:-build,tests,bench,bench_lm},"

wanted() { [[ "$STEPS" == *",$1,"* ]]; }

step() {  # step NAME TIMEOUT_S COMMAND...: run, append to $OUT/log.txt, record status and seconds
  local name=$1 limit=$2; shift 2
  local t0; t0=$(date +%s.%N)
  local left=$(( DEADLINE - $(date +%s) - 5 ))  # 5 s kept for the summary
  (( left < limit )) && limit=$left
  local rc
  if (( left < 10 )); then
    echo "== $name skipped: ${left}s of the budget left" | tee -a "$OUT/log.txt"
    : > "$OUT/step.log"
    rc=125
  else
    echo "== $name (limit ${limit}s)" | tee -a "$OUT/log.txt"
    timeout "$limit" "$@" > "$OUT/step.log" 2>&1
    rc=$?
  fi
  local t1; t1=$(date +%s.%N)
  cat "$OUT/step.log" >> "$OUT/log.txt"
  tail -n 3 "$OUT/step.log"
  rm -f "$OUT/step.log"
  "$PY" -c "import json,sys; print(json.dumps({'step': sys.argv[1], 'rc': int(sys.argv[2]), \
'seconds': round(float(sys.argv[4]) - float(sys.argv[3]), 1)}))" "$name" "$rc" "$t0" "$t1" >> "$OUT/steps.jsonl"
  return $rc
}

step device 60 "$PY" - "$OUT/device.json" <<'EOF'
import json, platform, subprocess, sys
import torch
info = {"torch": torch.__version__, "cuda": torch.version.cuda, "python": platform.python_version(),
        "machine": platform.node(), "cuda_available": torch.cuda.is_available(), "argv": sys.argv}
try:
    info["commit"] = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
except OSError:
    info["commit"] = None
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    info.update(device_name=p.name, capability=f"{p.major}.{p.minor}", memory_gib=round(p.total_memory / 2**30, 1),
                multiprocessors=p.multi_processor_count)
try:
    import triton
    info["triton"] = triton.__version__
except ImportError:
    info["triton"] = None
json.dump(info, open(sys.argv[1], "w"), indent=1)
print(json.dumps(info))
EOF

if [ "$DRY" = 1 ]; then
  DEVICE=cpu
  wanted build && step build 60 "$PY" -c "import fastgrad.ops._backend as b; print('extension', b.has_cpp())"
  TESTS=(tests/test_contract.py -k "not float64_logits")
else
  DEVICE=cuda
  ARCH=$("$PY" -c "import torch; p = torch.cuda.get_device_properties(0); print(f'{p.major}.{p.minor}')")
  export CUDA_HOME=${CUDA_HOME:-/usr/local/cuda} TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-$ARCH}
  export MAX_JOBS=${MAX_JOBS:-$(nproc)} FASTGRAD_NATIVE=1
  wanted build && step build 300 "$PY" setup.py -q build_ext --inplace
  step build_check 60 "$PY" -c "import fastgrad.ops._backend as b; assert b.has_cuda_kernels(), 'no CUDA kernels'; \
print('CUDA kernels built')"
  # the kernels' tests (every backend against the reference, on CUDA tensors); the estimator statistics are pure
  # torch above the ops and run in CI on the CPU: the whole suite (~700 tests) would not fit the step's limit
  TESTS=(tests/test_registry.py tests/test_ops.py tests/test_contract.py tests/test_functional.py
         tests/test_gumbel_topk.py tests/test_linear_loss.py tests/test_fuzz.py
         # the LM head's numerics (row max, lse parts, sum_pi_squared) and the policy losses / rollout corrections
         tests/test_lm_head_numerics.py tests/test_policy_losses.py
         # the verl drop-in against verl's own head, on CUDA tensors (both run there)
         tests/test_integrations_verl.py::test_matches_verl_fp32 tests/test_integrations_verl.py::test_bf16_no_worse_than_verl
         tests/test_integrations_verl.py::test_sum_pi_squared
         # the functional estimators' checks on the fused ops (their families' files hold CPU statistics too)
         tests/estimators/test_score_function.py::test_score_function_surrogate_value_and_grad
         tests/estimators/test_score_function.py::test_score_function_unbiased_against_exact
         tests/estimators/test_expect.py::test_enumeration_and_expectation_brute_force
         tests/estimators/test_gumbel_softmax.py::test_gumbel_softmax_straight_through)
  # Triton compiles each kernel variant on first use: spread the suite over 4 processes where xdist is installed
  "$PY" -c "import xdist" 2>/dev/null && TESTS+=(-n 4)
fi

wanted tests && FASTGRAD_TEST_DEVICE=$DEVICE step tests 240 "$PY" -m pytest -q -p no:cacheprovider "${TESTS[@]}" \
  --junitxml="$OUT/tests.xml" --benchmark-disable
if [ "$DRY" = 1 ]; then
  BENCH=(--benchmark-min-rounds=1 --benchmark-max-time=0.01 --benchmark-warmup=off)
  export FASTGRAD_BENCH_DEVICES=cpu
else
  BENCH=(--benchmark-min-rounds=3 --benchmark-max-time=0.5)
  export FASTGRAD_BENCH_DEVICES=cuda FASTGRAD_BENCH_FULL=1
fi
wanted bench && step bench 150 "$PY" -m pytest -q -p no:cacheprovider benchmarks/test_ops_bench.py \
  --benchmark-json="$OUT/bench_ops.json" "${BENCH[@]}"
wanted bench_lm && step bench_lm 120 "$PY" -m pytest -q -p no:cacheprovider benchmarks/test_linear_loss_bench.py \
  --benchmark-json="$OUT/bench_linear.json"

"$PY" - "$OUT" <<'EOF'
import json, os, sys
out = sys.argv[1]
steps = [json.loads(l) for l in open(os.path.join(out, "steps.jsonl")) if l.strip()]
dev = os.path.join(out, "device.json")  # absent when the device step was skipped
summary = {"device": json.load(open(dev)) if os.path.exists(dev) else None, "steps": steps,
           "ok": all(s["rc"] == 0 for s in steps)}
json.dump(summary, open(os.path.join(out, "summary.json"), "w"), indent=1)
os.remove(os.path.join(out, "steps.jsonl"))  # in summary.json now: at most 8 files come back from a device run
print(json.dumps({s["step"]: s["rc"] for s in steps}), "ok" if summary["ok"] else "FAILED")
sys.exit(0 if summary["ok"] else 1)
EOF
