#!/usr/bin/env bash
# One-time set-up on a fresh machine: a virtualenv in .venv with torch 2.14.1 (CUDA build, brings triton),
# the test/plot extras, and fastgrad built in place (C++ kernels; CUDA sources too when nvcc is present).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip setuptools wheel ninja
.venv/bin/python -c "import torch, sys; sys.exit(torch.__version__.split('+')[0] != '2.14.1')" 2>/dev/null \
  || .venv/bin/python -m pip install -q torch==2.14.1
.venv/bin/python -m pip install -q numpy tqdm pytest pytest-benchmark scipy matplotlib psutil
if [ -d /usr/local/cuda ] && [ -z "${CUDA_HOME:-}" ]; then export CUDA_HOME=/usr/local/cuda; fi
.venv/bin/python -m pip install -q --no-build-isolation -e .
.venv/bin/python -c "import fastgrad.ops._backend as b; print('fastgrad: C++ kernels', 'built' if b.has_cpp() else 'NOT built (reference fallback)', '| triton', b.has_triton())"
