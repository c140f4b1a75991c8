"""Elementwise approximate products of any multiplier, float or integer: the public ``approx_mul``."""
from __future__ import annotations

import torch

from .floating import approx_mul_float
from .integer import approx_mul_int
from .specs import Multiplier, MultiplierLike, as_multiplier

__all__ = ["approx_mul", "mbm_mul", "mitchell_mul"]


def approx_mul(a: torch.Tensor, b: torch.Tensor, multiplier: MultiplierLike = "mbm") -> torch.Tensor:
    """Elementwise approximate product, broadcasting like ``torch.mul``.

    Float multipliers: computed in float32 bit patterns and returned in the
    promoted input dtype; gradients are straight-through, those of ``a * b``
    (``grad_a = grad * b``, ``grad_b = grad * a``).  ``"exact"`` is ``torch.mul``.
    Integer multipliers ("mbm-int8", tables) take integer tensors of
    sign-magnitude values and return ``sign(a*b) * P(|a|, |b|)`` as int64.
    Integer inputs to a float multiplier, or float inputs to an integer one,
    raise ``TypeError``; tensors on different devices raise what ``torch.mul`` raises.
    """
    mult = as_multiplier(multiplier)
    if mult.is_integer:
        return approx_mul_int(a, b, mult)
    return approx_mul_float(a, b, mult)


def mbm_mul(a: torch.Tensor, b: torch.Tensor, t: int = 0) -> torch.Tensor:
    """Minimally Biased Multiplier product (Saadat et al. 2018), mantissa truncation ``t``."""
    return approx_mul(a, b, Multiplier("mbm", t))


def mitchell_mul(a: torch.Tensor, b: torch.Tensor, t: int = 0) -> torch.Tensor:
    """Mitchell's logarithmic multiplier product, mantissa truncation ``t``."""
    return approx_mul(a, b, Multiplier("mitchell", t))
