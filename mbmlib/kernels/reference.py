"""Reference backend: plain eager PyTorch, chunked; the yardstick for every other backend.

The batched approximate GEMM ``out[g] = sum_k approx(a[g, m, k], b[g, k, n])``
is computed block by block so that the (rows, K, N) tensor of products never
exceeds ``memory_budget`` bytes, whatever the layer size.  Operands are split
into (scale, mantissa) once per call (see :mod:`mbmlib.multipliers`).
"""
from __future__ import annotations

import torch

from ..multipliers import Multiplier, products, split_operand
from .lowering import DEFAULT_MEMORY_BUDGET, conv2d_grads_via_gemm, conv2d_via_gemm

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
    G, M, K = sa.shape
    N = sb.shape[1]
    out = torch.empty(G, M, N, dtype=torch.float32, device=sa.device)
    row_bytes = K * N * _BYTES_PER_PRODUCT
    rows = max(1, min(M, memory_budget // max(1, row_bytes)))
    k_step = K if row_bytes <= memory_budget else max(1, memory_budget // (N * _BYTES_PER_PRODUCT))
    for g in range(G):
        for m0 in range(0, M, rows):
            m1 = min(M, m0 + rows)
            acc = torch.zeros(m1 - m0, N, dtype=torch.float32, device=sa.device)
            for k0 in range(0, K, k_step):
                k1 = min(K, k0 + k_step)
                p = products(sa[g, m0:m1, None, k0:k1], ma[g, m0:m1, None, k0:k1],
                             sb[g, None, :, k0:k1], mb[g, None, :, k0:k1], multiplier, flush=False)  # (rows, N, k)
                acc += p.sum(dim=2)
            out[g, m0:m1] = acc
    return out


def conv2d(x: torch.Tensor, w: torch.Tensor, stride, padding, dilation, groups: int, multiplier: Multiplier,
           memory_budget: int = DEFAULT_MEMORY_BUDGET) -> torch.Tensor:
    """Approximate convolution as im2col + :func:`bmm_nt_split`, patches chunked to ``memory_budget``."""
    gemm = lambda *fields: bmm_nt_split(*fields, memory_budget=memory_budget)  # noqa: E731
    return conv2d_via_gemm(x, w, stride, padding, dilation, groups, multiplier, gemm, memory_budget)


def conv2d_grads(grad: torch.Tensor, x: torch.Tensor, w: torch.Tensor, stride, padding, dilation, groups: int,
                 multiplier: Multiplier) -> tuple[torch.Tensor, torch.Tensor]:
    """Input and weight gradients with approximate products (im2col / col2im around :func:`bmm_nt`)."""
    return conv2d_grads_via_gemm(grad, x, w, stride, padding, dilation, groups, multiplier, bmm_nt)
