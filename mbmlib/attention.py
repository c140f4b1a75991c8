"""Scaled dot-product attention whose two products are pluggable (SPEC section 8).

``weights = softmax(qk(Q, K^T) * scale + mask)``, ``out = pv(dropout(weights), V)``: the two
products are whatever ``qk`` and ``pv`` compute (:func:`mbmlib.functional.scaled_dot_product_attention`
passes the approximate matmul, :class:`mbmlib.ApproxMultiheadAttention` its ``qk`` and ``pv``
layers) and everything else is exact.  The scale multiplies the finished scores, so the multiplier
sees Q and K as they are (a hardware attention unit scales its accumulator, not every operand);
torch's own kernels scale Q and K first, which differs only by float rounding when the products are
exact.  Masks, softmax and dropout are torch's.  This module holds what the functional op and the
layer share, and imports torch only.
"""
from __future__ import annotations

import math
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["check_attention_args", "repeat_kv_heads", "additive_mask", "default_scale", "softmax_rows", "attend"]

Matmul = Callable[[Tensor, Tensor], Tensor]


def _check_gqa(query: Tensor, key: Tensor, value: Tensor) -> None:
    """Grouped-query attention needs heads (dim -3) whose numbers divide the query's."""
    if query.dim() < 3:
        return
    heads = query.shape[-3]
    for name, t in (("key", key), ("value", value)):
        if t.dim() >= 3 and (t.shape[-3] == 0 or heads % t.shape[-3]):
            raise RuntimeError(f"enable_gqa=True needs the heads of {name} (dim -3: {t.shape[-3]}) to divide the "
                               f"query's {heads} heads; give key and value a divisor of {heads} heads")


def _scores_shape(query: Tensor, key: Tensor, value: Tensor, enable_gqa: bool) -> list:
    """(..., L, S) of the scores: sizes checked, batch dims broadcast (torch's error if they cannot)."""
    if min(query.dim(), key.dim(), value.dim()) < 2:
        raise RuntimeError(f"Expected query, key, and value to all be at least 2 dimensional, but got query.dim: "
                           f"{query.dim()} key.dim: {key.dim()} and value.dim: {value.dim()} instead.")
    if key.shape[-1] != query.shape[-1]:
        raise RuntimeError(f"query and key must have the same size E (last dim), got {query.shape[-1]} and "
                           f"{key.shape[-1]}")
    if value.shape[-2] != key.shape[-2]:
        raise RuntimeError(f"key and value must have the same size S (dim -2), got {key.shape[-2]} and "
                           f"{value.shape[-2]}")
    if enable_gqa:
        _check_gqa(query, key, value)
    kv_batch = [t.shape[:-2] for t in (key, value)]
    if enable_gqa and query.dim() >= 3:  # their heads (dim -3) become the query's
        kv_batch = [b[:-1] + query.shape[-3:-2] if len(b) else b for b in kv_batch]
    batch = torch.broadcast_shapes(query.shape[:-2], *kv_batch)
    return [*batch, query.shape[-2], key.shape[-2]]


def check_attention_args(query: Tensor, key: Tensor, value: Tensor, attn_mask: Optional[Tensor], dropout_p: float,
                         is_causal: bool, enable_gqa: bool) -> None:
    """Check a call as ``F.scaled_dot_product_attention`` does (with its messages where they say enough): ranks and
    sizes, broadcastable batch dims, the mask's dtype, device and shape, a mask with ``is_causal``, dropout_p, and
    heads grouped-query attention can share.  Tensor dtypes and devices are the caller's check."""
    scores = _scores_shape(query, key, value, enable_gqa)
    if not 0.0 <= dropout_p <= 1.0:
        raise RuntimeError(f"dropout probability has to be between 0 and 1, but got {dropout_p}")
    if attn_mask is None:
        return
    if is_causal:
        raise RuntimeError("_scaled_dot_product_attention: Explicit attn_mask should not be set when is_causal=True")
    if attn_mask.dtype not in (torch.bool, query.dtype):
        raise RuntimeError(f"Expected attn_mask dtype to be bool or float or to match query dtype, but got "
                           f"attn_mask.dtype: {attn_mask.dtype} and query.dtype: {query.dtype} instead.")
    if attn_mask.device != query.device:
        raise RuntimeError(f"attn_mask is on {attn_mask.device} and query on {query.device}; move the mask with "
                           ".to(query.device)")
    if len(attn_mask.shape) > len(scores) or any(m not in (1, s) for m, s in zip(attn_mask.shape[::-1], scores[::-1])):
        raise RuntimeError(f"attn_mask of shape {list(attn_mask.shape)} does not broadcast to the scores' shape "
                           f"(..., L, S) {scores}")


def repeat_kv_heads(query: Tensor, t: Tensor, enable_gqa: bool) -> Tensor:
    """``t`` (key or value) with its heads (dim -3) repeated to the query's under grouped-query attention, each head
    serving a block of consecutive query heads (``repeat_interleave``, as torch does)."""
    if not enable_gqa or query.dim() < 3 or t.dim() < 3 or t.shape[-3] == query.shape[-3]:
        return t
    return t.repeat_interleave(query.shape[-3] // t.shape[-3], dim=-3)


def additive_mask(attn_mask: Optional[Tensor], is_causal: bool, L: int, S: int, dtype: torch.dtype,
                  device) -> Optional[Tensor]:
    """The mask to add to the scores: a bool mask (True = takes part) as 0 / -inf, a float mask as it is, and with
    ``is_causal`` the lower-triangular (L, S) mask aligned at the top left, as torch's is (None: no mask)."""
    if is_causal:
        attn_mask = torch.ones(L, S, dtype=torch.bool, device=device).tril()
    if attn_mask is None or attn_mask.dtype != torch.bool:
        return attn_mask
    return torch.zeros(attn_mask.shape, dtype=dtype, device=device).masked_fill(~attn_mask, float("-inf"))


def default_scale(query: Tensor, scale: Optional[float]) -> float:
    """``scale``, or ``1 / sqrt(E)`` (E: the query's last size; with E = 0 every score is an empty sum, 0)."""
    if scale is not None:
        return scale
    return 1 / math.sqrt(query.shape[-1]) if query.shape[-1] else 1.0


def softmax_rows(scores: Tensor) -> Tensor:
    """Softmax over the last dim; a row in which no key takes part (every score -inf) gives zeros and zero
    gradients, as ``F.scaled_dot_product_attention`` gives (a plain softmax gives NaN there)."""
    dead = (scores == float("-inf")).all(-1, keepdim=True)
    return torch.softmax(scores.masked_fill(dead, 0.0), -1).masked_fill(dead, 0.0)


def attend(query: Tensor, key: Tensor, value: Tensor, mask: Optional[Tensor], dropout_p: float, scale: float,
           qk: Matmul, pv: Matmul, masked_rows_zero: bool = True) -> tuple[Tensor, Tensor]:
    """``(output, weights)`` of attention with the products ``qk(Q, K^T)`` and ``pv(weights, V)``.

    query (..., L, E), key (..., S, E), value (..., S, Ev), ``mask`` additive (broadcast to (..., L, S)) or
    None; batch dims broadcast.  The weights returned are those ``pv`` multiplies (after dropout, as
    ``nn.MultiheadAttention`` returns them).  ``masked_rows_zero=False`` keeps the plain softmax's NaN for rows
    in which no key takes part (``nn.MultiheadAttention`` with ``need_weights=True`` gives those).
    """
    scores = qk(query, key.transpose(-2, -1)) * scale  # (..., L, S)
    if mask is not None:
        scores = scores + mask
    weights = softmax_rows(scores) if masked_rows_zero else torch.softmax(scores, -1)
    if dropout_p > 0.0:
        weights = F.dropout(weights, dropout_p)
    return pv(weights, value), weights
