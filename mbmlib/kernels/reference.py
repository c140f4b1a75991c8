"""Reference backend: plain eager PyTorch, chunked; the yardstick for every other backend.

The batched approximate GEMM ``out[g] = sum_k approx(a[g, m, k], b[g, k, n])``
is computed block by block so that the (rows, K, N) tensor of products never
exceeds ``memory_budget`` bytes, whatever the layer size.  Operands are split
into (scale, mantissa) once per call (see :mod:`mbmlib.multipliers`).
The integer kernels (``bmm_nt_int``, ``conv2d_int``) run the same loop on the
integer fields of :func:`mbmlib.multipliers.integer.int_fields`, summing exactly in int64.
"""
from __future__ import annotations

import functools

import torch

from ..multipliers.floating import products, split_operand
from ..multipliers.integer import int_fields, int_products
from ..multipliers.specs import Multiplier
from .lowering import (DEFAULT_MEMORY_BUDGET, check_int_gemm, conv2d_grads_via_gemm, conv2d_int_via_gemm,
                       conv2d_via_gemm)

_BYTES_PER_PRODUCT = 4 * 6  # int32/float32 temporaries alive at once per product

name = "reference"


def bmm_nt(a: torch.Tensor, b: torch.Tensor, multiplier: Multiplier,
           memory_budget: int = DEFAULT_MEMORY_BUDGET) -> torch.Tensor:
    """Batched approximate ``a @ b.T``: a (G, M, K), b (G, N, K) -> (G, M, N), float32 sums.

    Both operands are K-contiguous ("NT" layout): the natural layout of
    ``F.linear`` weights and of im2col patches against conv weights.
    """
    return bmm_nt_split(*split_operand(a, multiplier), *split_operand(b, multiplier), multiplier, memory_budget)


def bmm_nt_split(sa: torch.Tensor, ma: torch.Tensor, sb: torch.Tensor, mb: torch.Tensor, multiplier: Multiplier,
                 memory_budget: int = DEFAULT_MEMORY_BUDGET) -> torch.Tensor:
    """:func:`bmm_nt` from split operands (scale, mantissa): (G, M, K), (G, N, K) -> (G, M, N)."""
    product = functools.partial(products, multiplier=multiplier, flush=False)
    return _chunked_bmm_nt((sa, ma), (sb, mb), product, torch.float32, memory_budget)


def _chunked_bmm_nt(fa, fb, product, dtype: torch.dtype, memory_budget: int) -> torch.Tensor:
    """``out[g, m, n] = sum_k product(fa[g, m, k], fb[g, n, k])`` over operand fields, in ``dtype``.

    Rows and K are chunked so that the (rows, N, k) block of products stays within ``memory_budget``.
    """
    G, M, K = fa[0].shape
    N = fb[0].shape[1]
    out = torch.empty(G, M, N, dtype=dtype, device=fa[0].device)
    row_bytes = K * N * _BYTES_PER_PRODUCT
    rows = max(1, min(M, memory_budget // max(1, row_bytes)))
    k_step = K if row_bytes <= memory_budget else max(1, memory_budget // (N * _BYTES_PER_PRODUCT))
    for g in range(G):
        for m0 in range(0, M, rows):
            m1 = min(M, m0 + rows)
            acc = torch.zeros(m1 - m0, N, dtype=dtype, device=out.device)
            for k0 in range(0, K, k_step):
                k1 = min(K, k0 + k_step)
                p = product(*(f[g, m0:m1, None, k0:k1] for f in fa), *(f[g, None, :, k0:k1] for f in fb))
                acc += p.sum(dim=2)  # (rows, N, k) products summed over k
            out[g, m0:m1] = acc
    return out


def bmm_nt_int(qa: torch.Tensor, qb: torch.Tensor, multiplier: Multiplier,
               memory_budget: int = DEFAULT_MEMORY_BUDGET, *, ranged: bool = False) -> torch.Tensor:
    """Integer ``qa @ qb.T`` on an integer multiplier: (G, M, K), (G, N, K) -> (G, M, N) float64 exact sums.

    ``qa``, ``qb`` hold sign-magnitude values (``|q| <= multiplier.max_magnitude``);
    each term is ``sign * P(|a|, |b|)``.  ``ranged``: the magnitudes are known to fit (quantised).
    """
    check_int_gemm(qa, qb, multiplier, ranged=ranged)
    product = functools.partial(int_products, multiplier=multiplier)
    sums = _chunked_bmm_nt(int_fields(qa, multiplier), int_fields(qb, multiplier), product, torch.int64,
                           memory_budget // 2)
    return sums.to(torch.float64)


def conv2d(x: torch.Tensor, w: torch.Tensor, stride, padding, dilation, groups: int, multiplier: Multiplier,
           memory_budget: int = DEFAULT_MEMORY_BUDGET) -> torch.Tensor:
    """Approximate convolution as im2col + :func:`bmm_nt_split`, patches chunked to ``memory_budget``."""
    gemm = lambda *fields: bmm_nt_split(*fields, memory_budget=memory_budget)  # noqa: E731
    return conv2d_via_gemm(x, w, stride, padding, dilation, groups, multiplier, gemm, memory_budget)


def conv2d_grads(grad: torch.Tensor, x: torch.Tensor, w: torch.Tensor, stride, padding, dilation, groups: int,
                 multiplier: Multiplier) -> tuple[torch.Tensor, torch.Tensor]:
    """Input and weight gradients with approximate products (im2col / col2im around :func:`bmm_nt`)."""
    return conv2d_grads_via_gemm(grad, x, w, stride, padding, dilation, groups, multiplier, bmm_nt)


def conv2d_int(qx: torch.Tensor, qw: torch.Tensor, stride, padding, dilation, groups: int, multiplier: Multiplier,
               memory_budget: int = DEFAULT_MEMORY_BUDGET, *, ranged: bool = False) -> torch.Tensor:
    """Integer convolution on an integer multiplier: (B, C, H, W), (O, C/groups, kh, kw) -> float64 exact sums."""
    check_int_gemm(qx, qw, multiplier, k=qw[0].numel(), ranged=ranged)
    gemm = functools.partial(bmm_nt_int, memory_budget=memory_budget, ranged=True)  # checked once, above
    return conv2d_int_via_gemm(qx, qw, stride, padding, dilation, groups, multiplier, gemm, memory_budget)
