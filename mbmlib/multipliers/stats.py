"""Relative-error statistics and maps of a multiplier (SPEC section 1's table; section 4 for integer designs).

Float multipliers are measured over operand mantissas, integer and table
multipliers over their operands (every pair for n <= 8, sampled above), always
against the exact product.
"""
from __future__ import annotations

import torch

from .designs import MANT_BITS, ONE
from .elementwise import approx_mul
from .integer import approx_mul_int
from .specs import Multiplier, MultiplierLike, as_multiplier

__all__ = ["error_stats", "error_map"]


def _operands_from_fields(fields: torch.Tensor) -> torch.Tensor:
    """Floats in [1, 2) with the given 23-bit mantissa fields."""
    return (fields | 0x3F800000).view(torch.float32)


def _relative_error_pct(a: torch.Tensor, b: torch.Tensor, mult: Multiplier) -> torch.Tensor:
    """(approx - exact) / exact in percent, exact in float64."""
    exact = a.double() * b.double()
    return (approx_mul(a, b, mult).double() - exact) / exact * 100.0


_EDGE_BITS = 10  # lattice of 2**10 mantissas per operand with the low 13 bits zero


_ALL_PAIRS_BITS = 8  # integer multipliers up to this width are measured over every pair of magnitudes


def _int_operands(mult: Multiplier) -> torch.Tensor:
    """Every operand an integer multiplier takes: magnitudes 0..2**n-1 (sign-magnitude designs are symmetric in
    the sign), or a signed table's two's-complement range."""
    lo, hi = mult.q_range
    return torch.arange(lo if mult.signed else 0, hi + 1)


def _int_errors(a: torch.Tensor, b: torch.Tensor, mult: Multiplier) -> tuple[torch.Tensor, torch.Tensor]:
    """(P(a, b) - a*b, exact a*b) as int64 (broadcasting)."""
    exact = a.to(torch.int64) * b.to(torch.int64)
    return approx_mul_int(a, b, mult) - exact, exact


def _int_figures(err: torch.Tensor, exact: torch.Tensor, bits: int) -> dict:
    """Relative-error statistics (percent, over pairs with a non-zero exact product) and the hardware
    literature's figures over all pairs: error probability ``ep`` (%), worst-case error ``wce``, and
    ``mae_pct``, the mean absolute error over 2**(2n) (EvoApproxLib's MAE%)."""
    nonzero = exact != 0
    rel = err[nonzero].double() / exact[nonzero].double() * 100.0
    return {"n": err.numel(), "bias": rel.mean().item(), "mean_abs": rel.abs().mean().item(),
            "max": rel.max().item(), "min": rel.min().item(), "ep": (err != 0).double().mean().item() * 100.0,
            "wce": err.abs().max().item(), "mae_pct": err.abs().double().mean().item() / 4.0**bits * 100.0}


def _int_error_stats(mult: Multiplier, n: int, seed: int) -> dict:
    """Integer multipliers: every pair of operands for n <= 8 bits, else ``n`` random pairs, whose max/min/wce
    also cover a lattice holding the powers of two."""
    ops = _int_operands(mult)
    if mult.bits <= _ALL_PAIRS_BITS:
        stats = _int_figures(*_int_errors(ops[:, None], ops[None, :], mult), mult.bits)
        return {"multiplier": mult.name, **stats}
    gen = torch.Generator().manual_seed(seed)
    a, b = (ops[torch.randint(0, len(ops), (n,), generator=gen)] for _ in "ab")
    stats = _int_figures(*_int_errors(a, b, mult), mult.bits)
    lattice = torch.arange(1, 1 << _ALL_PAIRS_BITS) << (mult.bits - _ALL_PAIRS_BITS)
    lattice = torch.cat([-lattice.flip(0), lattice]) if mult.signed else lattice
    lattice = lattice[(lattice >= ops[0]) & (lattice <= ops[-1])]
    edges = _int_figures(*_int_errors(lattice[:, None], lattice[None, :], mult), mult.bits)
    stats.update(max=max(stats["max"], edges["max"]), min=min(stats["min"], edges["min"]),
                 wce=max(stats["wce"], edges["wce"]))
    return {"multiplier": mult.name, **stats}


def error_stats(multiplier: MultiplierLike, n: int = 1_000_000, seed: int = 0) -> dict:
    """Relative-error statistics (percent) of ``multiplier`` over operands in [1, 2).

    ``bias`` (mean) and ``mean_abs`` come from ``n`` pairs with uniformly random
    23-bit mantissas.  ``max`` and ``min`` are taken over those pairs *and* the
    1024 x 1024 lattice of mantissas whose low 13 bits are zero: the error
    peaks sit at powers of two (x = 0), which random sampling almost never hits.
    Exponents do not change the relative error.

    Integer and table multipliers: over every pair of operands when ``bits <= 8``
    (magnitudes 0..2**n-1, a signed table's two's-complement range; ``n`` is then that
    count), else over ``n`` uniform random pairs, with the extremes also over a lattice
    holding the powers of two.  Relative errors skip pairs whose exact product is 0; they
    add ``ep`` (error probability, %), ``wce`` (worst-case absolute error) and
    ``mae_pct`` (mean absolute error over 2**(2n), %), EvoApproxLib's figures.
    """
    mult = as_multiplier(multiplier)
    if n < 1:
        raise ValueError(f"n must be a positive number of samples, got {n}")
    if mult.is_integer:
        return _int_error_stats(mult, n, seed)
    gen = torch.Generator().manual_seed(seed)
    a, b = (_operands_from_fields(torch.randint(0, ONE, (n,), generator=gen, dtype=torch.int32)) for _ in "ab")
    rel = _relative_error_pct(a, b, mult)
    edges = _operands_from_fields(torch.arange(1 << _EDGE_BITS, dtype=torch.int32) << (MANT_BITS - _EDGE_BITS))
    rel_edges = _relative_error_pct(edges[:, None], edges[None, :], mult)
    return {
        "multiplier": mult.name,
        "n": n,
        "bias": rel.mean().item(),
        "mean_abs": rel.abs().mean().item(),
        "max": max(rel.max().item(), rel_edges.max().item()),
        "min": min(rel.min().item(), rel_edges.min().item()),
    }


def error_map(multiplier: MultiplierLike, bins: int = 256) -> tuple[torch.Tensor, torch.Tensor]:
    """Relative error (%) over a ``bins x bins`` grid of mantissas ``x1, x2`` in [0, 1).

    Returns ``(x, err)``: the grid coordinates (bins,) and ``err[i, j]`` for
    operands ``1 + x[i]`` and ``1 + x[j]`` -- ready for a heat map.  Integer and
    table multipliers: ``x`` are magnitudes spread evenly over 1..2**n-1 (all of
    them when ``bins >= 2**n - 1``) and ``err[i, j]`` is for the pair ``x[i], x[j]``.
    """
    mult = as_multiplier(multiplier)
    if not 2 <= bins <= 4096:
        raise ValueError(f"bins must be between 2 and 4096, got {bins}")
    if mult.is_integer:
        top = mult.q_range[1]
        mags = torch.linspace(1, top, min(bins, top), dtype=torch.float64).round().long().unique()
        err, exact = _int_errors(mags[:, None], mags[None, :], mult)
        return mags.double(), err.double() / exact.double() * 100.0
    step = ONE // bins
    fields = torch.arange(bins, dtype=torch.int32) * step + step // 2  # cell centres
    ops = _operands_from_fields(fields)
    return fields.double() / ONE, _relative_error_pct(ops[:, None], ops[None, :], mult)
