"""Independent float64 oracles for the approximate layers: elementwise products, then exact sums.

Built from F.unfold / F.fold and the bit-exact elementwise op only, so they
share no code with the kernels they check.
"""
import torch
import torch.nn.functional as F

from mbmlib import approx_mul


def conv2d_terms(x, w, stride, padding, dilation, groups, multiplier):
    """Products (B, O, L, K) of every output position and tap, float64, plus the output size."""
    B, C, H, W = x.shape
    O, Cg, kh, kw = w.shape
    cols = F.unfold(x.float(), (kh, kw), dilation=dilation, padding=padding, stride=stride)  # (B, C*kh*kw, L)
    L = cols.shape[-1]
    cols = cols.view(B, groups, Cg * kh * kw, L)
    wg = w.float().reshape(groups, O // groups, Cg * kh * kw)
    prods = approx_mul(cols.permute(0, 1, 3, 2)[:, :, None], wg[None, :, :, None], multiplier)  # (B,G,Og,L,K)
    return prods.double().reshape(B, O, L, -1)


def check_close_to_terms(out, terms, rtol=1e-5):
    """|out - sum(terms)| <= rtol * sum|terms| (+ a hair for all-zero sums), elementwise."""
    want = terms.sum(-1)
    scale = terms.abs().sum(-1)
    err = (out.double().reshape(want.shape) - want).abs()
    bad = err > rtol * scale + 1e-30
    assert not bad.any(), f"{int(bad.sum())} outputs off; worst {float((err / (scale + 1e-30)).max()):.2e} relative"


def linear_terms(x, w, multiplier):
    """Products (M, N, K) of x (M, K) and w (N, K), float64."""
    return approx_mul(x.float()[:, None, :], w.float()[None, :, :], multiplier).double()
