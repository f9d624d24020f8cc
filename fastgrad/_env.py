"""What fastgrad runs on, for ``python -m fastgrad`` and bug reports (as ``torch.utils.collect_env``)."""
from __future__ import annotations

import os
import platform
from typing import Dict, List, Tuple

import torch

from ._version import __version__
from .ops import _backend, _extension

BACKENDS = tuple(b for b in _backend.BACKENDS if b != "auto")
# /proc/cpuinfo flags of the CPU features the C++ kernels and the bf16 GEMMs care about
CPU_FEATURES = (("avx2", "AVX2"), ("avx512f", "AVX-512"), ("avx512_bf16", "AVX512-BF16"), ("amx_bf16", "AMX-BF16"))


def _cpu() -> Tuple[str, List[str]]:
    name, flags = platform.processor() or platform.machine(), set()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name") and ":" in line:
                    name = line.split(":", 1)[1].strip()
                elif line.startswith("flags") and ":" in line:
                    flags = set(line.split(":", 1)[1].split())
                    break
    except OSError:
        return name, ["unknown (no /proc/cpuinfo)"]
    return name, [label for flag, label in CPU_FEATURES if flag in flags]


def backend_status() -> Dict[str, str]:
    """``{backend: "available" or "unavailable - <why, and the fix>"}`` on this machine."""
    gpu = torch.cuda.is_available()
    out = {"reference": "available"}
    if _extension.has_cpp():
        out["cpp"] = "available"
    else:
        out["cpp"] = (f"unavailable - fastgrad's C++ extension is not built ({_extension._C_error}); it is built on "
                      "first use where a C++ compiler and ninja are found, or `pip install --no-build-isolation .` "
                      "in this environment, or `bash scripts/setup.sh`")
    if not gpu:
        out["cuda"] = "unavailable - no CUDA GPU visible to torch (the CUDA kernels run CUDA tensors)"
    elif not _extension.has_cuda_kernels():
        out["cuda"] = ("unavailable - fastgrad._C was built without its CUDA kernels; rebuild with FASTGRAD_CUDA=1 "
                       "on a machine with nvcc and a CUDA build of torch")
    else:
        out["cuda"] = "available"
    if not _extension.has_triton():
        out["triton"] = "unavailable - triton is not installed (`pip install triton`, or a CUDA build of torch)"
    elif not gpu and os.environ.get("TRITON_INTERPRET") != "1":
        out["triton"] = ("unavailable - no CUDA GPU visible (TRITON_INTERPRET=1 runs the Triton kernels on CPU "
                         "tensors, slowly: for tests)")
    else:
        out["triton"] = "available"
    return out


def machine_record() -> Dict[str, object]:
    """What a measured result depends on, for result files (the benchmarks, the examples' summaries): the node, the
    CPU and its features, cores and torch threads, torch's and fastgrad's versions, and the checkout's commit (None
    outside a git checkout)."""
    import subprocess

    cpu, features = _cpu()
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10,
                                cwd=os.path.dirname(os.path.abspath(__file__))).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        commit = None
    return {"node": platform.node(), "cpu": cpu, "cpu_features": features, "cores": os.cpu_count(),
            "threads": torch.get_num_threads(), "torch": torch.__version__, "fastgrad": __version__,
            "commit": commit}


def collect_env() -> Dict[str, object]:
    """The facts of ``python -m fastgrad`` as a dict: versions, the CPU and its features, Triton, the GPU, each
    backend's status and the backend that runs by default."""
    cpu, features = _cpu()
    gpu = torch.cuda.is_available()
    try:
        import triton
        triton_version = triton.__version__
    except Exception:  # noqa: BLE001  (an import that fails for any reason: absent)
        triton_version = None
    device = torch.device("cuda" if gpu else "cpu")
    try:
        default = _backend.choose(device)
    except ValueError as e:  # a FASTGRAD_BACKEND that cannot run here
        default = f"none - {e}"
    return {
        "fastgrad": __version__, "python": platform.python_version(), "torch": torch.__version__,
        "torch_build": f"CUDA {torch.version.cuda}" if torch.version.cuda else "CPU",
        "cpu": cpu, "cpu_features": features, "threads": torch.get_num_threads(), "triton": triton_version,
        "gpu": torch.cuda.get_device_name(0) if gpu else None, "setting": _backend.get_backend(),
        "backends": backend_status(), "default": default, "default_device": device.type,
    }


def report() -> str:
    """``python -m fastgrad``'s text."""
    env = collect_env()
    features = ", ".join(env["cpu_features"]) or "none of " + ", ".join(label for _, label in CPU_FEATURES)
    lines = [f"fastgrad {env['fastgrad']}  python {env['python']}  torch {env['torch']} ({env['torch_build']})",
             f"cpu: {env['cpu']}; {features}; {env['threads']} threads",
             f"triton: {env['triton'] or 'not installed'}",
             f"gpu: {env['gpu'] or 'none visible'}"]
    lines += [f"{b}: {env['backends'][b]}" for b in BACKENDS]
    lines.append(f"default: {env['default']}")
    from .ops._lm_head import cpu_bf16_plan, cpu_gemm_rows_independent  # measured once (a few GEMMs, ~0.1 s)

    plan = cpu_bf16_plan()
    how = ("bf16 GEMMs for the gradients (dz rounded to bf16, as torch's bf16 backward), " if plan["grads"] == "bf16"
           else "every GEMM in fp32 on converted weight blocks, ")
    lines.append(f"bf16 LM head on this cpu: {how}logits GEMM {plan['logits']} with fp32 output "
                 f"(measured bf16/fp32 GEMM speed {plan['speedup']}x, oneDNN bf16 arithmetic on fp32 "
                 f"{plan['bf32_speedup']}x; FASTGRAD_CPU_BF16=fp32|bf16 overrides)")
    lines.append("LM-head log-probs on this cpu: " + (
        "bit for bit independent of chunk_size and of the other tokens of the batch (the GEMM's rows do not depend "
        "on its row count)" if cpu_gemm_rows_independent() else
        "equal across chunk sizes to fp32 rounding (this BLAS's GEMM rows depend on the row count)"))
    return "\n".join(lines)
