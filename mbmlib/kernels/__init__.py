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
  for integer and table multipliers: sign-magnitude integer operands, exact integer sums returned as float64.

Multiplier ``"exact"`` never reaches a backend: :mod:`mbmlib.functional` runs
PyTorch's own ops for it.  Index maths shared by backends is in :mod:`.lowering`.
"""
from __future__ import annotations

import functools
import importlib
import os
from types import ModuleType

import torch

BACKENDS = ("reference", "compiled", "triton")
ENV_VAR = "MBMLIB_BACKEND"

__all__ = ["BACKENDS", "ENV_VAR", "load", "default_backend", "resolve"]


def _check_name(backend: str) -> str:
    if backend not in BACKENDS + ("auto",):
        raise ValueError(f"unknown backend {backend!r}; valid backends are 'auto', " + ", ".join(
            repr(b) for b in BACKENDS) + f" (argument or env {ENV_VAR})")
    return backend


@functools.lru_cache(maxsize=None)
def load(backend: str) -> ModuleType:
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
