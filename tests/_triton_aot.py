"""Ahead-of-time compilation of fastgrad's Triton kernels for a GPU this machine does not have.

The CPU tests run the Triton kernels under the interpreter, which executes their Python with numpy and so never
meets the compiler: a kernel can pass every interpreted test and still fail to compile (a type the compiler
rejects, a non-constexpr shape, a too-large block). This module records, under the interpreter, every kernel
launch with its argument types, constexpr values and launch options (:func:`record_launches`), and compiles
each distinct one for a CUDA target in a process without the interpreter (:func:`compile_records`, the
``__main__`` below): Triton's compiler needs no GPU to emit PTX and a cubin.
"""
from __future__ import annotations

import contextlib
import inspect
import json
import os
import sys
from typing import Any, Dict, Iterator, List

import torch

_PTR = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16", torch.float64: "fp64",
        torch.int64: "i64", torch.int32: "i32", torch.int16: "i16", torch.int8: "i8", torch.uint8: "u8",
        torch.bool: "i1"}
_LAUNCH_OPTIONS = ("num_warps", "num_stages", "num_ctas", "maxnreg")


def _tag(v: Any) -> Any:
    """A launch argument as JSON: what the compiler's signature needs (its type, or its value if constexpr)."""
    import triton.language as tl

    if isinstance(v, torch.Tensor):
        return {"ptr": _PTR[v.dtype]}
    if isinstance(v, bool):
        return {"bool": v}
    if isinstance(v, int):
        return {"int": v}
    if isinstance(v, float):
        return {"float": v}
    if v is None:
        return {"none": None}
    if isinstance(v, tl.dtype):
        return {"tl_dtype": v.name}
    raise TypeError(f"cannot record a Triton launch argument of type {type(v).__name__}")


@contextlib.contextmanager
def record_launches() -> Iterator[List[Dict[str, Any]]]:
    """Record every interpreted Triton launch (TRITON_INTERPRET=1) as ``{module, kernel, args, options}``."""
    from triton.runtime.interpreter import InterpretedFunction

    records: List[Dict[str, Any]] = []
    seen = set()
    orig = InterpretedFunction.run

    def run(self, *args, grid, warmup, **kwargs):
        sig = inspect.signature(self.fn)
        options = {k: kwargs.pop(k) for k in list(kwargs) if k in _LAUNCH_OPTIONS and k not in sig.parameters}
        bound = sig.bind(*args, **kwargs)
        bound.apply_defaults()
        rec = {"module": self.fn.__module__, "kernel": self.fn.__name__,
               "args": {k: _tag(v) for k, v in bound.arguments.items()}, "options": options}
        key = json.dumps(rec, sort_keys=True)
        if key not in seen:
            seen.add(key)
            records.append(rec)
        return orig(self, *args, grid=grid, warmup=warmup, **kwargs, **options)

    InterpretedFunction.run = run
    try:
        yield records
    finally:
        InterpretedFunction.run = orig


def _signature(fn, args: Dict[str, Any]):
    """(signature, constexprs) for ``triton.compiler.ASTSource`` from recorded arguments: the JIT's own rules for
    integers (int32 when they fit, else int64); pointer alignment left unspecialized."""
    import triton.language as tl

    sig, const = {}, {}
    for p in fn.params:
        (kind, v), = args[p.name].items()
        if p.is_constexpr:
            sig[p.name] = "constexpr"
            const[p.name] = tl.dtype(v) if kind == "tl_dtype" else v
        elif kind == "ptr":
            sig[p.name] = "*" + v
        elif kind == "bool":
            sig[p.name] = "i1"
        elif kind == "int":
            sig[p.name] = "i32" if -2**31 <= v < 2**31 else "i64"
        elif kind == "float":
            sig[p.name] = "fp32"
        else:
            raise TypeError(f"{fn.__name__}: non-constexpr argument {p.name} recorded as {kind}")
    return sig, const


def compile_records(records: List[Dict[str, Any]], arch: int) -> List[Dict[str, Any]]:
    """Compile each record for ``cuda`` compute capability ``arch`` (e.g. 90): one result per record, with the
    cubin's size or the compiler's error."""
    import importlib

    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    target = GPUTarget("cuda", arch, 32)
    out = []
    for rec in records:
        fn = getattr(importlib.import_module(rec["module"]), rec["kernel"])
        res = {"kernel": f"{rec['module']}.{rec['kernel']}", "options": rec["options"]}
        try:
            sig, const = _signature(fn, rec["args"])
            res["constexprs"] = {k: str(v) for k, v in const.items()}
            k = triton.compile(ASTSource(fn=fn, signature=sig, constexprs=const), target=target,
                               options=rec["options"] or None)
            res["cubin_bytes"] = len(k.asm["cubin"])
            res["shared_bytes"] = int(getattr(k.metadata, "shared", 0))
        except Exception as e:  # the compiler's error, reported per kernel
            res["error"] = f"{type(e).__name__}: {e}"[:2000]
        out.append(res)
    return out


def _compile_part(args):
    records, arch = args
    return compile_records(records, arch)


if __name__ == "__main__":  # python -m tests._triton_aot RECORDS.json ARCH  (TRITON_INTERPRET unset)
    from concurrent.futures import ProcessPoolExecutor

    recs = json.load(open(sys.argv[1]))
    workers = max(1, min(len(recs), os.cpu_count() or 1))
    with ProcessPoolExecutor(workers) as pool:  # one compiler process per core: each compile is serial
        parts = pool.map(_compile_part, [(recs[i::workers], int(sys.argv[2])) for i in range(workers)])
        print(json.dumps([r for part in parts for r in part]))
