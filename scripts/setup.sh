#!/usr/bin/env bash
# Set-up on a fresh machine (and a quick no-op on a set-up one): a virtualenv in .venv with torch 2.14.1 (CUDA
# build, brings triton), the test/plot/docs extras, the trainers of fastgrad.integrations (TRL, verl), and fastgrad
# built in place.
#   C++ kernels: always. CUDA kernels: when a GPU is visible (nvidia-smi), or when asked with FASTGRAD_CUDA=1,
#   or under CI (CI=true), so the CUDA sources keep compiling; FASTGRAD_NO_CUDA=1 skips them in every case.
#   The build is skipped when the extension is newer than every source and has the kernels wanted.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
V=.venv/bin/python
$V -m pip install -q --upgrade pip "setuptools>=77" wheel ninja
$V -c "import torch, sys; sys.exit(torch.__version__.split('+')[0] != '2.14.1')" 2>/dev/null \
  || { echo "setup: installing torch 2.14.1 (a few minutes)"; $V -m pip install -q torch==2.14.1; }
extra() { $V -c "import tomllib; print(' '.join(tomllib.load(open('pyproject.toml', 'rb'))['project']['optional-dependencies']['$1']))"; }
$V -m pip install -q numpy tqdm ninja pytest pytest-benchmark scipy matplotlib psutil $(extra docs)
# The trainers the integration tests compare against (fastgrad.integrations): TRL with its dependencies (the trl
# extra), verl without them (its pins would replace torch) plus what its modules import.
$V -m pip install -q $(extra trl) $(extra verl-imports)
$V -m pip show -q verl 2>/dev/null || $V -m pip install -q --no-deps verl==0.9.1

want_cuda=0
if [ -z "${FASTGRAD_NO_CUDA:-}" ] && [ -x /usr/local/cuda/bin/nvcc -o -n "${CUDA_HOME:-}" ]; then
  if [ "${FASTGRAD_CUDA:-0}" = 1 ] || [ "${CI:-}" = true ] || nvidia-smi -L >/dev/null 2>&1; then want_cuda=1; fi
fi
if [ $want_cuda = 1 ]; then
  export CUDA_HOME=${CUDA_HOME:-/usr/local/cuda}
else
  export FASTGRAD_NO_CUDA=1
fi

so=$(ls fastgrad/_C*.so 2>/dev/null | head -n 1 || true)
current=0
if [ -n "$so" ] && [ -z "$(find csrc setup.py pyproject.toml -newer "$so" -type f 2>/dev/null | head -n 1)" ] \
   && (cd /tmp && "$OLDPWD/$V" -c "import fastgrad.ops._backend as b, sys; \
sys.exit(not b.has_cpp() or (b.has_cuda_kernels() < $want_cuda))") 2>/dev/null; then
  current=1
fi
if [ $current = 1 ]; then
  echo "setup: fastgrad's extension is built and current ($so): not rebuilding"
else
  what="C++ kernels, a few minutes"
  [ $want_cuda = 1 ] && what="C++ and CUDA kernels, 5-10 minutes on 2 cores"
  echo "setup: building fastgrad's $what ..."
  t0=$(date +%s)
  $V -m pip install -q --no-build-isolation -e .
  echo "setup: built in $(( $(date +%s) - t0 )) s"
fi
$V -c "import fastgrad.ops._backend as b; print('fastgrad: C++ kernels', 'built' if b.has_cpp() else \
'NOT built (reference fallback)', '| CUDA kernels', b.has_cuda_kernels(), '| triton', b.has_triton())"
