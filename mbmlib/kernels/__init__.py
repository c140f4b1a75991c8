"""Approximate GEMM / convolution kernels, one backend a file; this module only picks and loads one.

``backend`` is ``"auto"``, ``"reference"``, ``"compiled"`` or ``"triton"``;
``"auto"`` (or the env var ``MBMLIB_BACKEND``) picks Triton on CUDA, the
torch.compile kernels on the CPU.  Every backend module provides

* ``bmm_nt(a, b, multiplier)``: batched approximate ``a @ b.T`` of float32 operands,
  (G, M, K), (G, N, K) -> (G, M, N), float32 sums;
* ``conv2d(x, w, stride, padding, dilation, groups, multiplier)``: (B, C, H, W) -> (B, O, Ho, Wo),
  explicit symmetric zero padding;
* ``conv2d_grads(grad, x, w, stride, padding, dilation, groups, multiplier)``: the input and weight
  gradients of that convolution with every gradient product approximate too;
* ``bmm_nt_int(qa, qb, multiplier)`` and ``conv2d_int(qx, qw, stride, padding, dilation, groups, multiplier)``
  for integer and table multipliers: sign-magnitude (a signed table's two's-complement) integer operands,
  exact integer sums returned as float64; :func:`conv2d_int` here pads for tables whose row 0 is not zero.

The compiled backend also quantises float activations inside its C++ kernel (``conv2d_quant``,
``bmm_nt_quant``; :func:`quantises_in_kernel` says where), one pass instead of quantise + fields.

Multiplier ``"exact"`` never reaches a backend: :mod:`mbmlib.functional` runs
PyTorch's own ops for it.  Index maths shared by backends is in :mod:`.lowering`.

The kernels specialise the multiply-accumulate of designs that declare one
(``Design.mac``: MBM, Mitchell, L-Mul, DRUM, tables).  :func:`route` sends every other design
to a generic path, with one warning: an integer design of up to 12 bits to the
table kernels of the same backend (its generated table, the same products), any
other design to the reference backend.
"""
from __future__ import annotations

import functools
import importlib
import os
import sys
import warnings
from typing import NamedTuple, Protocol

import torch

from ..multipliers.designs import on_registry_change
from ..multipliers.integer import generated_table
from ..multipliers.specs import Multiplier, MultiplierLike, as_multiplier
from ..multipliers.table import MAX_TABLE_BITS

BACKENDS = ("reference", "compiled", "triton")
ENV_VAR = "MBMLIB_BACKEND"

__all__ = ["BACKENDS", "ENV_VAR", "Backend", "Route", "GenericPathWarning", "load", "default_backend", "resolve",
           "route", "quantises_in_kernel"]


class Backend(Protocol):
    """What a backend module provides (see the module docstring for shapes and dtypes)."""

    name: str

    def bmm_nt(self, a: torch.Tensor, b: torch.Tensor, multiplier: Multiplier) -> torch.Tensor: ...

    def conv2d(self, x: torch.Tensor, w: torch.Tensor, stride, padding, dilation, groups: int,
               multiplier: Multiplier) -> torch.Tensor: ...

    def conv2d_grads(self, grad: torch.Tensor, x: torch.Tensor, w: torch.Tensor, stride, padding, dilation,
                     groups: int, multiplier: Multiplier) -> tuple[torch.Tensor, torch.Tensor]: ...

    def bmm_nt_int(self, qa: torch.Tensor, qb: torch.Tensor, multiplier: Multiplier, *,
                   ranged: bool = False) -> torch.Tensor: ...

    def conv2d_int(self, qx: torch.Tensor, qw: torch.Tensor, stride, padding, dilation, groups: int,
                   multiplier: Multiplier, *, ranged: bool = False) -> torch.Tensor: ...


class GenericPathWarning(UserWarning):
    """A design without a specialised kernel runs on a generic path (said once per design and path)."""


def _check_name(backend: str) -> str:
    if backend not in BACKENDS + ("auto",):
        raise ValueError(f"unknown backend {backend!r}; valid backends are 'auto', " + ", ".join(
            repr(b) for b in BACKENDS) + f" (argument or env {ENV_VAR})")
    return backend


# The MACs a backend's own kernels lack (a design with one of these runs on its generic path there): none today,
# every specialised MAC (MBM, Mitchell, L-Mul, DRUM, tables) is in both the C++ and the Triton kernels.
_MISSING_MACS: dict[str, frozenset] = {}


@functools.lru_cache(maxsize=None)
def load(backend: str) -> Backend:
    """Import a backend module by name (ImportError if e.g. Triton is missing)."""
    return importlib.import_module(f".{_check_name(backend)}", __name__)


def default_backend(device: torch.device) -> str:
    """The backend ``"auto"`` means on ``device``: env override, else triton on CUDA, compiled on CPU."""
    env = os.environ.get(ENV_VAR, "auto").strip().lower() or "auto"
    if _check_name(env) != "auto":
        return env
    if device.type == "cuda":
        try:
            load("triton")
            return "triton"
        except ImportError:
            return "compiled"
    return "compiled"


def resolve(backend: str | None, device: torch.device) -> str:
    """Resolve ``None``/``"auto"`` to a concrete backend name for ``device``."""
    if backend is None or _check_name(backend) == "auto":
        return default_backend(device)
    if backend == "triton" and device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        raise ValueError("the 'triton' backend needs a CUDA device (or TRITON_INTERPRET=1 for CPU testing); "
                         "use backend='compiled' or 'reference' on the CPU")
    return backend


def conv2d_int(backend: str, qx: torch.Tensor, qw: torch.Tensor, stride, padding, dilation, groups: int,
               multiplier: Multiplier, ranged: bool = False) -> torch.Tensor:
    """``backend``'s integer convolution, float64 exact sums, with the padding multiplied as the hardware does.

    The kernels skip padded positions (their products are 0 for every design and for tables whose
    row and column 0 are zero); for any other table the padding is the operand 0 with real
    products ``P(0, w)``, so the input is padded here and the kernels see none.
    """
    if any(padding) and not multiplier.zero_annihilates:
        qx = torch.nn.functional.pad(qx, (padding[1], padding[1], padding[0], padding[0]))
        padding = (0, 0)
    return load(backend).conv2d_int(qx, qw, tuple(stride), tuple(padding), tuple(dilation), groups, multiplier,
                                    ranged=ranged)


def quantises_in_kernel(backend: str, multiplier: Multiplier, x: torch.Tensor, w: torch.Tensor) -> bool:
    """Whether ``backend`` quantises the float32 operands ``x`` and ``w`` inside its integer kernel
    (``conv2d_quant``, ``bmm_nt_quant``: the C++ kernel on the CPU), so the quantised layers pass it floats and
    get scaled sums."""
    return (backend == "compiled" and x.dtype == w.dtype == torch.float32
            and load(backend).fuses_quantisation(multiplier, x.device))


class Route(NamedTuple):
    """Where a call runs: the ``backend``, the ``multiplier`` form it computes, and that form's ``key`` (its name
    for the custom ops, parsed back without touching files)."""

    backend: str
    multiplier: Multiplier
    key: str


def route(multiplier: MultiplierLike, backend: str) -> Route:
    """The route of ``multiplier`` on the concrete ``backend``: specialised kernels, else a generic path.

    An integer design without a specialised MAC (up to 12 bits) runs on ``backend``'s table kernels with
    its generated table; any other design without one runs on the reference backend.  Each is said once
    (:class:`GenericPathWarning`), naming the design and the path; never computed as another design.
    """
    mult = as_multiplier(multiplier)
    way = _ROUTES.get((mult, backend))
    if way is None:
        way = _ROUTES[mult, backend] = _route(mult, backend)
    return way


_ROUTES: dict[tuple[Multiplier, str], Route] = {}  # a dict, not lru_cache: torch.compile traces it plainly


def _route(mult: Multiplier, backend: str) -> Route:
    if mult.is_exact or (mult.mac is not None and mult.mac not in _MISSING_MACS.get(backend, ())):
        return Route(backend, mult, mult.key)
    if mult.is_integer and mult.bits <= MAX_TABLE_BITS:
        table = generated_table(mult)
        _warn_generic(mult, f"the table kernels of the {backend!r} backend (its generated {1 << mult.bits} x "
                            f"{1 << mult.bits} table)")
        return Route(backend, table, table.key)
    _warn_generic(mult, "the 'reference' backend (plain PyTorch, slow)" + (
        "" if backend == "reference" else f" instead of {backend!r}"))
    return Route("reference", mult, mult.key)


def _warn_generic(mult: Multiplier, path: str) -> None:
    where = "" if mult.mac is None else " in this backend yet"  # specialised on another backend (_MISSING_MACS)
    warnings.warn(f"mbmlib: design {mult.kind!r} has no specialised kernel{where}; {mult.name!r} runs on {path}",
                  GenericPathWarning, stacklevel=_callers_level())


_INNER = (os.path.dirname(os.path.dirname(__file__)), os.path.dirname(torch.__file__))  # mbmlib's and torch's code


def _callers_level() -> int:
    """The warnings stacklevel of the first frame outside mbmlib and torch: the user's line that asked."""
    frame, level = sys._getframe(2), 2
    while frame is not None and frame.f_code.co_filename.startswith(_INNER):
        frame, level = frame.f_back, level + 1
    return level


on_registry_change(_ROUTES.clear)
