"""One declaration per op: :func:`define` registers ``torch.ops.fastgrad.<name>`` (schema, fake, autograd) and its
backward op, and builds the callable :mod:`fastgrad.functional` uses; :func:`define_driver` does the same for an op
whose one Python implementation drives smaller kernels on every backend (the fused LM head). Every declaration
enters :data:`REGISTRY` with the op's sample inputs, so the generic op tests (every backend against the reference,
``opcheck``, the input contract, the differential fuzz, the Triton ahead-of-time compile) reach a new op without a
list to edit. Follow an op to the kernel that runs:

    fastgrad.functional.<estimator>  ->  Op.call  ->  run(): Op.check, then one of
        "reference": Op.reference                          (fastgrad/ops/<name>.py, pure torch)
        "cpp"/"cuda": torch.ops.fastgrad_C.<name>          (csrc/cpu/<name>.cpp, csrc/cuda/<name>.cu)
        "triton":   fastgrad.kernels.<name>.<name>         (fastgrad/kernels/<name>.py)

which of them is :func:`fastgrad.ops._backend.choose`'s rule.
"""
from __future__ import annotations

import importlib
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Tuple

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


# sample_inputs(device, dtype) -> [(args, kwargs-free label)]: valid calls of the op, edge shapes included, for
# the generic op tests (extension-cpp's habit); dtype is the floating dtype of the op's main input
SampleInputs = Callable[[torch.device, torch.dtype], List[Tuple[str, tuple]]]


@dataclass
class Op:
    name: str
    schema: str
    reference: Callable[..., Any]
    check: Optional[Callable[..., Any]]
    fake: Callable[..., Any]
    backward: Optional[Backward] = None
    sample_inputs: Optional[SampleInputs] = None
    dtypes: Tuple[torch.dtype, ...] = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
    kernels: Tuple[str, ...] = ("cpp", "cuda", "triton")  # backends with a kernel of the whole op
    differentiable: bool = False  # whether autograd is registered
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


REGISTRY: Dict[str, Op] = {}  # every op of fastgrad, by name, in declaration order


def random_rows(device: torch.device, dtype: torch.dtype, R: int, K: int, seed: int = 0,
                masked: bool = False) -> torch.Tensor:
    """Logits ``[R, K]`` for sample inputs: ``2 N(0, 1)`` from a fixed seed; with ``masked`` (and K > 2) the second
    category of every row at ``-inf`` (zero probability)."""
    x = (2 * torch.randn(R, K, generator=torch.Generator().manual_seed(seed))).to(device=device, dtype=dtype)
    if masked and K > 2:
        x[:, 1] = -float("inf")
    return x


def renamed(module: str, old: str, new: str, obj: Any) -> Callable[[str], Any]:
    """A module ``__getattr__`` that keeps ``old`` working for a release, with a DeprecationWarning naming ``new``
    (``module.new``)."""
    return moved(module, {old: (f"{module}.{new}", lambda: obj)})


def moved(module: str, names: Dict[str, Tuple[str, Callable[[], Any]]]) -> Callable[[str], Any]:
    """A module ``__getattr__`` for names that moved: ``{old: (new full name, getter)}``, each kept working for a
    release with a DeprecationWarning naming its new place (the getter imports late: no import circle)."""
    def __getattr__(name: str) -> Any:
        if name in names:
            where, get = names[name]
            warnings.warn(f"{module}.{name} is deprecated: use {where}", DeprecationWarning, stacklevel=2)
            return get()
        raise AttributeError(f"module {module!r} has no attribute {name!r}")
    return __getattr__


def define(name: str, schema: str, reference: Callable[..., Any], check: Callable[..., Any],
           fake: Callable[..., Any], backward: Optional[Backward] = None, *,
           sample_inputs: Optional[SampleInputs] = None) -> Op:
    """Register ``torch.ops.fastgrad.<name>`` (and ``<name>_backward``) and build ``Op.call``.

    ``Op.call`` is the registered op under ``torch.compile`` and for meta tensors (its fake runs). In eager mode
    it calls the backend directly, through a ``torch.autograd.Function`` built from the same ``setup`` and
    ``formula``: torch.library's Python dispatch costs 30-70 us per call, most of an op's time at the seed VAE's
    sizes."""
    o = Op(name, schema, reference, check, fake, backward, sample_inputs, differentiable=backward is not None)
    REGISTRY[name] = o

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


def define_driver(name: str, schema: str, impl: Callable[..., Any], fake: Callable[..., Any], *,
                  reference: Callable[..., Any], setup: Optional[Callable[..., None]] = None,
                  formula: Optional[Callable[..., Any]] = None, backward: Optional[Tuple[str, Callable[..., Any],
                                                                                          Callable[..., Any]]] = None,
                  sample_inputs: Optional[SampleInputs] = None,
                  dtypes: Tuple[torch.dtype, ...] = (torch.bfloat16, torch.float32, torch.float64)) -> Op:
    """Register ``torch.ops.fastgrad.<name>`` whose implementation ``impl`` is one Python driver on every backend
    (it picks the backend of the kernels it calls itself), with its fake and, when given, its autograd
    (``setup``, ``formula(ctx, *grads)``) and a backward op ``(schema, impl, fake)`` registered as
    ``<name>_backward`` (the formula calls it as ``Op.backward_op``). ``reference`` is the unfused computation the
    tests compare against. ``Op.call`` is the registered op."""
    o = Op(name, schema, reference, None, fake, None, sample_inputs, dtypes, kernels=(),
           differentiable=formula is not None)
    REGISTRY[name] = o
    o.op = torch.library.custom_op(f"fastgrad::{name}", impl, mutates_args=(), schema=schema)
    o.op.register_fake(fake)
    if backward is not None:
        bschema, bimpl, bfake = backward
        o.backward_op = torch.library.custom_op(f"fastgrad::{name}_backward", bimpl, mutates_args=(), schema=bschema)
        o.backward_op.register_fake(bfake)
    if formula is not None:
        o.op.register_autograd(formula, setup_context=setup)
    o.call = o.op
    return o
