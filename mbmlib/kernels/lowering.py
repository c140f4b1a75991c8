"""Convolution lowered onto a backend's GEMM: output size, im2col / col2im index maths, batch chunking.

A backend without an implicit-GEMM convolution of its own computes one as
``patches(x) @ weights.T`` with :func:`conv2d_via_gemm`.  Patches are built
from the split operand fields, a chunk of the batch at a time, so that the
unrolled input never takes more than ``memory_budget`` bytes, whatever the layer.
"""
from __future__ import annotations

from typing import Callable, Optional

import torch
import torch.nn.functional as F

from ..multipliers.floating import split_operand
from ..multipliers.integer import EXACT_SUM_LIMIT, check_int_tensor
from ..multipliers.specs import Multiplier

__all__ = ["output_size", "im2col", "col2im", "weight_rows", "conv2d_via_gemm", "conv2d_grads_via_gemm",
           "conv2d_int_via_gemm", "check_int_gemm", "DEFAULT_MEMORY_BUDGET"]

DEFAULT_MEMORY_BUDGET = 256 * 2**20  # bytes for the largest intermediate of a reference/compiled kernel
_PATCH_COPIES = 3  # bytes of patches alive at once per patch element and field: the padded copy, the
#                    channels-last copy and the (G, rows, K) matrix

BmmNtSplit = Callable[..., torch.Tensor]  # (sa, ma, sb, mb, multiplier) -> (G, M, N)
BmmNt = Callable[..., torch.Tensor]  # (a, b, multiplier) -> (G, M, N)


def output_size(size: tuple[int, int], kernel_size, stride, padding, dilation) -> tuple[int, int]:
    """Spatial output size of a convolution, as F.conv2d computes it."""
    return tuple((n + 2 * p - d * (k - 1) - 1) // s + 1
                 for n, k, s, p, d in zip(size, kernel_size, stride, padding, dilation))


def im2col(x: torch.Tensor, kernel_size, stride, padding, dilation, groups: int) -> torch.Tensor:
    """Patches of ``x`` as GEMM rows: (B, C, H, W) -> (G, B*Ho*Wo, kh*kw*C/G), K contiguous.

    K is ordered (kh, kw, channel): built from a channels-last copy with one
    strided view and one copy, several times faster than ``F.unfold`` plus a
    transpose.  Weights must be flattened in the same order.
    """
    B, C, H, W = x.shape
    kh, kw = kernel_size
    Ho, Wo = output_size((H, W), kernel_size, stride, padding, dilation)
    xp = F.pad(x, (padding[1], padding[1], padding[0], padding[0])).permute(0, 2, 3, 1).contiguous()  # (B, Hp, Wp, C)
    sB, sH, sW, _ = xp.stride()
    Cg = C // groups
    view = xp.as_strided((groups, B, Ho, Wo, kh, kw, Cg),
                         (Cg, sB, stride[0] * sH, stride[1] * sW, dilation[0] * sH, dilation[1] * sW, 1))
    return view.reshape(groups, B * Ho * Wo, kh * kw * Cg)


def col2im(cols: torch.Tensor, input_shape, kernel_size, stride, padding, dilation, groups: int) -> torch.Tensor:
    """Adjoint of :func:`im2col`: sum patch gradients back onto the image, (G, B*L, K) -> (B, C, H, W)."""
    B, C, H, W = input_shape
    kh, kw = kernel_size
    Ho, Wo = output_size((H, W), kernel_size, stride, padding, dilation)
    Cg = C // groups
    patches = cols.view(groups, B, Ho, Wo, kh, kw, Cg).permute(1, 2, 3, 4, 5, 0, 6)  # (B, Ho, Wo, kh, kw, G, Cg)
    patches = patches.reshape(B, Ho, Wo, kh, kw, C)
    grad = cols.new_zeros(B, H + 2 * padding[0], W + 2 * padding[1], C)  # padded, channels last
    for i in range(kh):
        for j in range(kw):
            h0, w0 = i * dilation[0], j * dilation[1]
            grad[:, h0:h0 + stride[0] * (Ho - 1) + 1:stride[0], w0:w0 + stride[1] * (Wo - 1) + 1:stride[1]] += \
                patches[:, :, :, i, j]
    grad = grad[:, padding[0]:padding[0] + H, padding[1]:padding[1] + W]
    return grad.permute(0, 3, 1, 2).contiguous()


def weight_rows(w: torch.Tensor, groups: int) -> torch.Tensor:
    """Conv weights as GEMM rows in im2col order: (O, Cg, kh, kw) -> (G, O/G, kh*kw*Cg)."""
    O, Cg, kh, kw = w.shape
    return w.view(groups, O // groups, Cg, kh, kw).permute(0, 1, 3, 4, 2).reshape(groups, O // groups, -1)


def batch_chunk(x_shape, kernel_size, stride, padding, dilation, memory_budget: int) -> int:
    """How many images' patches (both fields, with their copies) fit in ``memory_budget`` bytes."""
    _, C, H, W = x_shape
    Ho, Wo = output_size((H, W), kernel_size, stride, padding, dilation)
    per_image = 2 * 4 * _PATCH_COPIES * max(Ho * Wo * kernel_size[0] * kernel_size[1] * C,
                                            (H + 2 * padding[0]) * (W + 2 * padding[1]) * C)
    return max(1, memory_budget // max(1, per_image))


def _conv_by_batch_chunks(x: torch.Tensor, w_shape, stride, padding, dilation, groups: int, gemm_of_patches,
                          dtype: torch.dtype, memory_budget: int) -> torch.Tensor:
    """Convolution output (B, O, Ho, Wo) from ``gemm_of_patches(x_chunk) -> (G, n*L, O/G)``, chunked over the batch."""
    B = x.shape[0]
    O, _, kh, kw = w_shape
    Ho, Wo = output_size(x.shape[2:], (kh, kw), stride, padding, dilation)
    out = x.new_empty(B, O, Ho, Wo, dtype=dtype)
    step = batch_chunk(x.shape, (kh, kw), stride, padding, dilation, memory_budget)
    for b0 in range(0, B, step):
        n = min(step, B - b0)
        res = gemm_of_patches(x[b0:b0 + n])  # (G, n*L, O/G)
        out[b0:b0 + n] = res.view(groups, n, Ho * Wo, O // groups).permute(1, 0, 3, 2).reshape(n, O, Ho, Wo)
    return out


def conv2d_via_gemm(x: torch.Tensor, w: torch.Tensor, stride, padding, dilation, groups: int,
                    multiplier: Multiplier, bmm_nt_split: BmmNtSplit,
                    memory_budget: int = DEFAULT_MEMORY_BUDGET) -> torch.Tensor:
    """Approximate convolution as im2col + ``bmm_nt_split``, chunked over the batch: (B, C, H, W) -> (B, O, Ho, Wo)."""
    kernel_size = tuple(w.shape[2:])
    sw, mw = split_operand(weight_rows(w, groups), multiplier)  # (G, O/G, K)

    def gemm_of_patches(xb):
        sx, mx = (im2col(f, kernel_size, stride, padding, dilation, groups) for f in split_operand(xb, multiplier))
        return bmm_nt_split(sx, mx, sw, mw, multiplier)

    return _conv_by_batch_chunks(x, w.shape, stride, padding, dilation, groups, gemm_of_patches, torch.float32,
                                 memory_budget)


def check_int_gemm(qa: torch.Tensor, qb: torch.Tensor, multiplier: Multiplier, k: Optional[int] = None,
                   ranged: bool = False) -> None:
    """Integer GEMM operands: integer tensors within the multiplier's magnitudes (not scanned if ``ranged``),
    sums of ``k`` (default: the last dimension of ``qa``) products exact in float64."""
    if not multiplier.is_integer:
        raise TypeError(f"integer kernels need an integer or table multiplier such as 'mbm-int8', got "
                        f"{multiplier.name!r}")
    check_int_tensor(qa, "qa", multiplier, ranged)
    check_int_tensor(qb, "qb", multiplier, ranged)
    check_exact_sums(qa.shape[-1] if k is None else k, multiplier)


def check_exact_sums(k: int, multiplier: Multiplier) -> None:
    """Sums of ``k`` of the integer multiplier's products must be exact in float64."""
    largest = multiplier.max_product
    if k * largest >= EXACT_SUM_LIMIT:
        raise ValueError(f"K = {k} products of up to {largest} may not sum exactly in float64 "
                         f"(limit 2**53); split K or use fewer bits")


def conv2d_int_via_gemm(qx: torch.Tensor, qw: torch.Tensor, stride, padding, dilation, groups: int,
                        multiplier: Multiplier, bmm_nt_int: BmmNt,
                        memory_budget: int = DEFAULT_MEMORY_BUDGET) -> torch.Tensor:
    """Integer convolution as im2col of the integers + ``bmm_nt_int``: (B, C, H, W) -> (B, O, Ho, Wo) float64.

    Zero padding is the integer 0, an operand like any other (``T[0, w]`` for a table).
    """
    kernel_size = tuple(qw.shape[2:])
    wrows = weight_rows(qw.contiguous(), groups)  # (G, O/G, K)

    def gemm_of_patches(xb):
        return bmm_nt_int(im2col(xb, kernel_size, stride, padding, dilation, groups), wrows, multiplier)

    return _conv_by_batch_chunks(qx, qw.shape, stride, padding, dilation, groups, gemm_of_patches, torch.float64,
                                 memory_budget)


def conv2d_grads_via_gemm(grad: torch.Tensor, x: torch.Tensor, w: torch.Tensor, stride, padding, dilation,
                          groups: int, multiplier: Multiplier, bmm_nt: BmmNt) -> tuple[torch.Tensor, torch.Tensor]:
    """Input and weight gradients of an approximate convolution through im2col / col2im and ``bmm_nt``.

    grad (B, O, Ho, Wo), x (B, C, H, W), w (O, Cg, kh, kw), all float32 -> (grad_x, grad_w).
    """
    B = x.shape[0]
    O, Cg, kh, kw = w.shape
    G, Og = groups, O // groups
    L = grad.shape[2] * grad.shape[3]
    gmat = grad.reshape(B, G, Og, L).permute(1, 0, 3, 2).reshape(G, B * L, Og)  # (G, B*L, Og)
    wmat = weight_rows(w, G)  # (G, Og, Kg), im2col order
    # d input: each patch gets sum_o approx(grad, w), then the patches are summed back (exactly) by col2im
    grad_cols = bmm_nt(gmat, wmat.transpose(1, 2).contiguous(), multiplier)  # (G, B*L, Kg)
    grad_x = col2im(grad_cols, x.shape, (kh, kw), stride, padding, dilation, groups)
    # d weight: sum over batch and positions of approx(grad, patch)
    cols = im2col(x, (kh, kw), stride, padding, dilation, groups)  # (G, B*L, Kg)
    grad_w = bmm_nt(gmat.transpose(1, 2).contiguous(), cols.transpose(1, 2).contiguous(), multiplier)
    grad_w = grad_w.reshape(O, kh, kw, Cg).permute(0, 3, 1, 2)  # (O, Cg, kh, kw), back from im2col order
    return grad_x, grad_w.contiguous()
