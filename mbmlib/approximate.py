"""Approximate any PyTorch model without module surgery: ``with approximate("mbm"): model(x)``.

:func:`convert` swaps layers; a model that multiplies in its own ``forward`` (attention's ``torch.matmul``,
Hugging Face GPT-2's ``Conv1D``, which calls ``torch.addmm``) keeps those products exact there.
:class:`approximate` is a :class:`torch.overrides.TorchFunctionMode`: while it is active, the multiplying
calls any code makes are computed by :mod:`mbmlib.functional`'s approximate ops instead:

=========  ==============================================================================================
``ops``    calls (and their ``Tensor`` methods) routed, the name they are counted under
=========  ==============================================================================================
linear     ``F.linear`` -> ``functional.linear``
conv2d     ``F.conv2d`` -> ``functional.conv2d``
matmul     ``torch.matmul`` and ``@`` (either side), ``torch.mm`` -> ``functional.matmul``;
           ``torch.bmm`` -> ``functional.bmm``; ``torch.addmm`` / ``torch.baddbmm`` ->
           ``alpha * approx(mat1 @ mat2) + beta * input``, the scalings and the sum exact (``input`` left out
           when ``beta`` is 0, as torch does: its NaN and inf do not reach the output)
sdpa       ``F.scaled_dot_product_attention`` -> ``functional.scaled_dot_product_attention``
           (counted as ``scaled_dot_product_attention``)
=========  ==============================================================================================

A routed call runs with every torch function mode off, so the approximate op's own torch calls reach no
mode (no recursion, and an outer mode sees the call as one op). Everything else passes through untouched
(torch's own op runs, with its own rules and errors); for a listed call the reason is counted in
``passed``: an op outside ``ops``, a call outside the selected modules, operands that are not all
float16/bfloat16/float32/float64 tensors of one dtype and device (integer or complex matmuls, Python
numbers, mixed dtypes), an argument the approximate op has no counterpart for (``out=``), arguments torch
itself refuses (checked on meta copies first: torch raises its own error). The autograd engine runs ``backward``
with no torch function mode active, so gradients are what the ops' ``backward=`` says. Never routed: in-place
variants (``addmm_``, ``baddbmm_``), ``einsum``, ``tensordot``, ``mv``, ``dot``, ``addmv``, ``addbmm``,
``F.bilinear``, 1-D / 3-D and transposed convolutions, and ``nn.MultiheadAttention``'s fused fast path
(an active mode already makes it take its slow path, whose linears and sdpa are routed).

Integer and table designs need a scale per operand tensor: they are refused here; use
:func:`mbmlib.convert` and :func:`mbmlib.calibrate`. Module hooks (for ``model=``) see every thread: do not
run the same model on another thread while its context is active.
"""
from __future__ import annotations

import fnmatch
import functools
from collections import Counter
from typing import Callable, NamedTuple, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_map_only

from . import functional as AF
from .kernels import BACKENDS
from .multipliers.floating import _FLOAT_DTYPES
from .multipliers.specs import MultiplierLike, as_multiplier

__all__ = ["approximate", "OPS"]


def _scaled_sum(product: Tensor, a: dict) -> Tensor:
    """``alpha * product + beta * input`` of addmm / baddbmm, each scaling skipped when it is 1 (exact)."""
    alpha, beta = a.get("alpha", 1), a.get("beta", 1)
    out = product if alpha == 1 else product * alpha
    if beta == 0:  # torch ignores input then
        return out
    return out + (a["input"] if beta == 1 else a["input"] * beta)


class _Call(NamedTuple):
    """How one torch callable is routed: its ``ops`` group, counted name, parameters in torch's order (to bind
    positional and keyword arguments alike), the parameters that must be float tensors, and the approximate
    computation ``run(bound, opts)``."""

    op: str
    name: str
    params: tuple
    operands: tuple
    run: Callable


_MM = ("input", "mat2")
_ADD = ("input", "mat1", "mat2", "beta", "alpha")
_BADD = ("input", "batch1", "batch2", "beta", "alpha")
_SDPA = ("query", "key", "value", "attn_mask", "dropout_p", "is_causal", "scale", "enable_gqa")
_CONV = ("input", "weight", "bias", "stride", "padding", "dilation", "groups")

_LINEAR = _Call("linear", "linear", ("input", "weight", "bias"), ("input", "weight", "bias"),
                lambda a, o: AF.linear(a["input"], a["weight"], a.get("bias"), **o))
_CONV2D = _Call("conv2d", "conv2d", _CONV, ("input", "weight", "bias"), lambda a, o: AF.conv2d(**a, **o))
_MATMUL = _Call("matmul", "matmul", ("input", "other"), ("input", "other"),
                lambda a, o: AF.matmul(a["input"], a["other"], **o))
_RMATMUL = _MATMUL._replace(params=("other", "input"))  # Tensor.__rmatmul__(self, other) is other @ self
_MMUL = _Call("matmul", "mm", _MM, _MM, lambda a, o: AF.matmul(a["input"], a["mat2"], **o))
_BMM = _Call("matmul", "bmm", _MM, _MM, lambda a, o: AF.bmm(a["input"], a["mat2"], **o))
_ADDMM = _Call("matmul", "addmm", _ADD, _ADD[:3],
               lambda a, o: _scaled_sum(AF.matmul(a["mat1"], a["mat2"], **o), a))
_BADDBMM = _Call("matmul", "baddbmm", _BADD, _BADD[:3],
                 lambda a, o: _scaled_sum(AF.bmm(a["batch1"], a["batch2"], **o), a))
_ATTENTION = _Call("sdpa", "scaled_dot_product_attention", _SDPA, _SDPA[:3],
                   lambda a, o: AF.scaled_dot_product_attention(**a, **o))

_CALLS = {
    F.linear: _LINEAR,
    F.conv2d: _CONV2D,
    torch.matmul: _MATMUL, Tensor.matmul: _MATMUL, Tensor.__rmatmul__: _RMATMUL,  # a @ b calls Tensor.matmul
    torch.mm: _MMUL, Tensor.mm: _MMUL,
    torch.bmm: _BMM, Tensor.bmm: _BMM,
    torch.addmm: _ADDMM, Tensor.addmm: _ADDMM,
    torch.baddbmm: _BADDBMM, Tensor.baddbmm: _BADDBMM,
    F.scaled_dot_product_attention: _ATTENTION,
}

# ops group -> the names its calls are counted under
OPS = {op: tuple(dict.fromkeys(c.name for c in _CALLS.values() if c.op == op))
       for op in ("linear", "conv2d", "matmul", "sdpa")}


def _bind(call: _Call, args: tuple, kwargs: dict) -> tuple[dict, Optional[str]]:
    """torch's arguments by parameter name, and why the call cannot be routed (None if it can)."""
    if len(args) > len(call.params):
        return {}, "more positional arguments than torch's signature has"
    bound = dict(zip(call.params, args))
    for key, value in kwargs.items():
        if key in call.params:
            bound[key] = value
        elif value is not None:
            return bound, f"{key}= given"
    tensors = [bound.get(p) for p in call.operands if bound.get(p) is not None]
    if len(tensors) < 2 or not all(isinstance(t, Tensor) for t in tensors) \
            or tensors[0].dtype not in _FLOAT_DTYPES or len({(t.dtype, t.device) for t in tensors}) > 1:
        return bound, "operands are not float tensors of one dtype and device"
    return bound, None


def _torch_refuses(func, args: tuple, kwargs: dict) -> bool:
    """Whether torch raises on this call (run on meta copies of the tensors: shapes only, no data)."""
    meta_args, meta_kwargs = tree_map_only(Tensor, lambda t: t.to("meta"), (args, kwargs))
    try:
        func(*meta_args, **meta_kwargs)
    except (RuntimeError, TypeError, ValueError, IndexError):
        return True
    return False


def _float_multiplier(multiplier: MultiplierLike):
    mult = as_multiplier(multiplier)
    if mult.is_integer:
        raise ValueError(f"approximate() takes float designs ('mbm', 'mitchell', 'lmul-m3', 'exact', ...); the "
                         f"integer multiplier {mult.name!r} needs a scale per operand tensor: use "
                         f"mbmlib.convert(model, {mult.name!r}) and mbmlib.calibrate(model, batches) instead")
    return mult


def _check_ops(ops) -> tuple[str, ...]:
    ops = (ops,) if isinstance(ops, str) else tuple(ops)
    unknown = [op for op in ops if op not in OPS]
    if unknown or not ops:
        raise ValueError(("ops is empty" if not ops else f"unknown ops {unknown!r}")
                         + f"; choose among {', '.join(map(repr, OPS))}")
    return ops


def _check_backend(backend: Optional[str]) -> Optional[str]:
    if backend is not None and backend not in BACKENDS + ("auto",):
        raise ValueError(f"unknown backend {backend!r}; valid backends are None, 'auto', "
                         + ", ".join(map(repr, BACKENDS)))
    return backend


def _module_patterns(model: Optional[nn.Module], modules) -> dict[str, bool]:
    """Module name -> whether one of the ``modules`` glob patterns matches it (all True without patterns)."""
    if model is None:
        if modules is not None:
            raise ValueError("modules= selects by module name and needs model=: pass the model whose "
                             "named_modules() names the patterns match")
        return {}
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    names = [name for name, _ in model.named_modules()]
    if modules is None:
        return dict.fromkeys(names, True)
    patterns = (modules,) if isinstance(modules, str) else tuple(modules)
    for pattern in patterns:
        if not isinstance(pattern, str) or not any(fnmatch.fnmatchcase(n, pattern) for n in names):
            raise ValueError(f"module pattern {pattern!r} matches no module of the model; its modules are "
                             f"{', '.join(repr(n) for n in names[:12])}{', ...' if len(names) > 12 else ''}")
    return {n: any(fnmatch.fnmatchcase(n, p) for p in patterns) for n in names}


class approximate(TorchFunctionMode):
    """Context manager: inside ``with approximate(...) as run:``, the model's multiplying calls are approximate.

    ``multiplier`` is a float design (``"mbm"``, ``"mitchell-t18"``, ``"exact"``...); ``ops`` the groups to
    route (``OPS``: ``"linear"``, ``"conv2d"``, ``"matmul"``, ``"sdpa"``); ``backward`` and ``backend`` as
    in :mod:`mbmlib.functional`. With ``model``, ``modules`` (glob patterns on ``model.named_modules()``
    names) routes only calls made while a matching module's ``forward`` runs (its submodules' included), by
    forward hooks held for the context only; ``model`` alone just records where calls were made.

    ``run.counts`` counts routed calls by name (``linear``, ``conv2d``, ``matmul``, ``mm``, ``bmm``, ``addmm``,
    ``baddbmm``, ``scaled_dot_product_attention``); ``run.module_counts`` by the innermost module of ``model``
    whose forward made them (calls outside the model's forward are not in it); ``run.passed`` the listed
    calls left to torch, by ``(name, reason)``. Counts add up over every entry of one object. Contexts nest:
    the innermost decides for the calls it routes, and what it passes through reaches the outer ones.

    Works under ``torch.no_grad``, with training steps inside (gradients per ``backward``), and with
    ``torch.compile``: a model compiled outside the context runs approximate inside it (dynamo guards on the
    active mode: exact again outside) and the counts grow on every compiled call; a context entered inside a
    compiled function is traced, except with ``model=``, whose hooks break the graph there (``fullgraph=True``
    refuses it: enter it around the compiled call).
    """

    OPS = OPS  # also reachable as mbmlib.approximate.OPS once the package exports this class under that name

    def __init__(self, multiplier: MultiplierLike = "mbm", ops=tuple(OPS), backward: str = "exact",
                 backend: Optional[str] = None, model: Optional[nn.Module] = None, modules=None):
        super().__init__()
        self.multiplier = _float_multiplier(multiplier)
        self.ops = _check_ops(ops)
        self.backward = AF.check_backward(backward)
        self.backend = _check_backend(backend)
        self.model = model
        self._selected = _module_patterns(model, modules)
        self._select_all = modules is None
        self.counts: Counter = Counter()
        self.module_counts: Counter = Counter()
        self.passed: Counter = Counter()
        self._running: list[tuple[str, bool]] = []  # (name, selected) of the model's modules in forward
        self._hooks: list = []
        self._active = False

    def __enter__(self):
        if self._active:
            raise RuntimeError("this approximate() context is already active; create another one to nest")
        if self.model is not None:
            if torch.compiler.is_compiling():
                raise RuntimeError("approximate(model=...) adds module hooks, which torch.compile cannot trace in "
                                   "fullgraph mode; enter it around the compiled call instead")
            self._hooks = self._hook_modules()
        try:
            entered = super().__enter__()
        except BaseException:
            self._unhook()
            raise
        self._active = True
        return entered

    def __exit__(self, *exc):
        try:
            return super().__exit__(*exc)
        finally:
            self._active = False
            self._unhook()

    def _hook_modules(self) -> list:
        hooks = []
        for name, module in self.model.named_modules():
            hooks.append(module.register_forward_pre_hook(functools.partial(self._enter_module, name)))
            hooks.append(module.register_forward_hook(self._leave_module, always_call=True))
        return hooks

    def _unhook(self) -> None:
        for hook in self._hooks:
            hook.remove()
        self._hooks = []
        self._running.clear()

    def _enter_module(self, name: str, module, args) -> None:
        inherited = bool(self._running) and self._running[-1][1]
        self._running.append((name, inherited or self._selected.get(name, False)))  # added since: not selected

    def _leave_module(self, module, args, output) -> None:
        if self._running:
            self._running.pop()

    def _why_not(self, call: _Call, func, args: tuple, kwargs: dict) -> tuple[dict, Optional[str]]:
        """The bound arguments, and why the call passes through (None: it is routed)."""
        if call.op not in self.ops:
            return {}, "op not selected"
        if not self._select_all and not (self._running and self._running[-1][1]):
            return {}, "outside the selected modules"
        bound, why = _bind(call, args, kwargs)
        if why is None and _torch_refuses(func, args, kwargs):
            why = "torch refuses these arguments"
        return bound, why

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        call = _CALLS.get(func)
        if call is None:
            return func(*args, **kwargs)
        with torch._C.DisableTorchFunction():  # mbmlib's own torch calls reach no mode
            bound, why = self._why_not(call, func, args, kwargs)
            if why is None:
                self.counts[call.name] += 1
                if self._running:
                    self.module_counts[self._running[-1][0]] += 1
                return call.run(bound, dict(multiplier=self.multiplier, backward=self.backward, backend=self.backend))
        self.passed[call.name, why] += 1
        return func(*args, **kwargs)
