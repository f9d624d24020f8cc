"""One declaration per op: :func:`define` registers ``torch.ops.fastgrad.<name>`` (schema, fake, autograd) and its
backward op, and builds the callable :mod:`fastgrad.functional` uses. Follow an op to the kernel that runs:

    fastgrad.functional.<estimator>  ->  Op.call  ->  run(): Op.check, then one of
        "reference": Op.reference                          (fastgrad/ops/<name>.py, pure torch)
        "cpp"/"cuda": torch.ops.fastgrad_C.<name>          (csrc/cpu/<name>.cpp, csrc/cuda/<name>.cu)
        "triton":   fastgrad.kernels.<name>.<name>         (fastgrad/kernels/<name>.py)

which of them is :func:`fastgrad.ops._backend.choose`'s rule.
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Optional

import torch

from . import _backend


@dataclass
class Backward:
    """The backward op of an op: ``<name>_backward`` with its own schema, reference, check and fake, and the
    autograd glue: ``setup(ctx, inputs, output)`` saves what the formula needs; ``formula(backward_op)``
    returns ``backward(ctx, *grads)`` calling ``backward_op``."""

    schema: str
    reference: Callable[..., Any]
    check: Callable[..., Any]
    fake: Callable[..., Any]
    setup: Callable[..., None]
    formula: Callable[[Callable[..., Any]], Callable[..., Any]]


@dataclass
class Op:
    name: str
    schema: str
    reference: Callable[..., Any]
    check: Callable[..., Any]
    fake: Callable[..., Any]
    backward: Optional[Backward] = None
    op: Any = None  # torch.ops.fastgrad.<name> (the registered custom op)
    backward_op: Any = None  # torch.ops.fastgrad.<name>_backward
    call: Callable[..., Any] = None  # what fastgrad.functional calls (see define)
    _kernels: Dict[str, Any] = field(default_factory=dict)

    def kernel(self, backend: str, name: Optional[str] = None) -> Callable[..., Any]:
        """The compiled or Triton kernel of ``name`` (this op or its backward) for ``backend``, looked up once."""
        name = name or self.name
        key = (backend, name)
        fn = self._kernels.get(key)
        if fn is None:
            if backend in ("cpp", "cuda"):
                fn = getattr(torch.ops.fastgrad_C, name).default
            else:  # triton
                fn = getattr(importlib.import_module(f"fastgrad.kernels.{self.name}"), name)
            self._kernels[key] = fn
        return fn


def run(op: Op, name: str, reference: Callable[..., Any], check: Callable[..., Any], *args: Any) -> Any:
    """Run ``name`` (``op`` or its backward) on the backend chosen for ``args[0]``'s device.

    ``check(backend, *args)`` enforces the op's input contract first (:mod:`fastgrad.ops._checks`), the same on
    every backend; it may return a callable that checks the output (e.g. the per-row logsumexp)."""
    b = _backend.choose(args[0].device)
    post = check(b, *args)
    out = reference(*args) if b == "reference" else op.kernel(b, name)(*args)
    if post is not None:
        post(out)
    return out


def define(name: str, schema: str, reference: Callable[..., Any], check: Callable[..., Any],
           fake: Callable[..., Any], backward: Optional[Backward] = None) -> Op:
    """Register ``torch.ops.fastgrad.<name>`` (and ``<name>_backward``) and build ``Op.call``.

    ``Op.call`` is the registered op under ``torch.compile`` and for meta tensors (its fake runs). In eager mode
    it calls the backend directly, through a ``torch.autograd.Function`` built from the same ``setup`` and
    ``formula``: torch.library's Python dispatch costs 30-70 us per call, most of an op's time at the seed VAE's
    sizes."""
    o = Op(name, schema, reference, check, fake, backward)

    def impl(*args: Any) -> Any:
        return run(o, name, reference, check, *args)

    o.op = torch.library.custom_op(f"fastgrad::{name}", impl, mutates_args=(), schema=schema)
    o.op.register_fake(fake)
    if backward is None:
        eager = impl
    else:
        bname = name + "_backward"

        def backward_impl(*args: Any) -> Any:
            return run(o, bname, backward.reference, backward.check, *args)

        o.backward_op = torch.library.custom_op(f"fastgrad::{bname}", backward_impl, mutates_args=(),
                                                schema=backward.schema)
        o.backward_op.register_fake(backward.fake)
        o.op.register_autograd(backward.formula(o.backward_op), setup_context=backward.setup)

        def forward(ctx: Any, *args: Any) -> Any:
            # ctx-style forward: a separate setup_context would make every apply() call inspect.signature
            out = impl(*args)
            backward.setup(ctx, args, out)
            return out

        eager = type(f"{name}_eager", (torch.autograd.Function,), {
            "forward": staticmethod(forward),
            "backward": staticmethod(torch.autograd.function.once_differentiable(backward.formula(backward_impl))),
        }).apply

    op = o.op

    def call(*args: Any) -> Any:
        # meta tensors (shape inference, torch.device("meta") model init): the registered op's fake runs
        if torch.compiler.is_compiling() or args[0].device.type == "meta":
            return op(*args)
        return eager(*args)

    call.__name__ = name
    call.__doc__ = reference.__doc__
    o.call = call
    return o
