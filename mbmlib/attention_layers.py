"""Approximate attention layers: ApproxMatmul and ApproxMultiheadAttention (SPEC section 8).

:class:`ApproxMultiheadAttention` is ``nn.MultiheadAttention`` -- same constructor, parameters, state
dict keys, forward arguments and results -- computing with four approximate layers of its own, which
``convert()``'s patterns, hooks, sensitivity and energy see by name: ``in_proj`` (the q, k, v
projections, with the attention's weights), ``qk`` and ``pv`` (the two attention matmuls, each an
:class:`ApproxMatmul`) and ``out_proj`` (an :class:`~mbmlib.MBMLinear`).  Its forward is the one
``F.multi_head_attention_forward`` computes outside torch's fused fast path (which it never takes), in
the same steps with the same mask helpers; softmax stays exact (:mod:`mbmlib.attention`).
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import attention
from . import functional as AF
from .layers import ApproxLayer, make_approx
from .multipliers import MultiplierLike
from .quant import MatmulQuantiser, MatmulQuantSpec, Quantiser, QuantSpec, split_quant

__all__ = ["ApproxMatmul", "InProjection", "ApproxMultiheadAttention", "ATTENTION_OPS", "op_name"]

ATTENTION_OPS = ("in_proj", "qk", "pv", "out_proj")  # the approximate layers of an attention, in the order they run


def op_name(attention_name: str, op: str) -> str:
    """The name of an attention's op (``"<attention>.<op>"``; a bare attention's ops are named ``op``)."""
    return f"{attention_name}.{op}" if attention_name else op


class ApproxMatmul(ApproxLayer, nn.Module):
    """``torch.matmul(a, b)`` with every product approximate, as a layer of its own (hooks, ``convert()``
    patterns and energy see it).  An integer multiplier quantises both operands per tensor
    (:class:`~mbmlib.quant.MatmulQuantiser`; ``quant`` a :class:`~mbmlib.MatmulQuantSpec` fixes the scales)."""

    def __init__(self, multiplier: MultiplierLike = "mbm", backward: str = "exact", backend: Optional[str] = None,
                 quant: Optional[MatmulQuantSpec] = None, device=None):
        super().__init__()
        self.quant_device = device  # where a quantiser's scales live: the layer has no weights to tell
        self._init_approx(multiplier, backward, backend, quant)

    def new_quantiser(self, multiplier, spec: Optional[MatmulQuantSpec]) -> MatmulQuantiser:
        return MatmulQuantiser(multiplier, spec, device=self.quant_device)

    def forward(self, a: Tensor, b: Tensor) -> Tensor:
        if self.quantiser is not None:
            return self.quantiser.matmul(a, b, multiplier=self.multiplier, backend=self.backend)
        return AF.matmul(a, b, multiplier=self.multiplier, backward=self.backward, backend=self.backend)

    def extra_repr(self) -> str:
        return self._approx_repr()


class InProjection(ApproxLayer, nn.Module):
    """The q, k, v input projections of an attention, computed with the weights it is given (it holds none): the
    packed weight in one linear for self-attention, else one linear per input.  An integer multiplier quantises
    them with one :class:`~mbmlib.quant.Quantiser` of ``3 * embed_dim`` channels (per-channel weight scales, one
    activation scale over query, key and value)."""

    def __init__(self, embed_dim: int, multiplier: MultiplierLike = "mbm", backward: str = "exact",
                 backend: Optional[str] = None, quant: Optional[QuantSpec] = None, device=None):
        super().__init__()
        self.embed_dim = embed_dim
        self.quant_device = device
        self._init_approx(multiplier, backward, backend, quant)

    def new_quantiser(self, multiplier, spec: Optional[QuantSpec]) -> Quantiser:
        return Quantiser(3 * self.embed_dim, multiplier, spec, device=self.quant_device)

    def forward(self, query: Tensor, key: Tensor, value: Tensor, weights: tuple, bias: Optional[Tensor]) -> tuple:
        """``(q, k, v)``; ``weights`` is ``(in_proj_weight,)`` or ``(q_proj_weight, k_proj_weight, v_proj_weight)``,
        ``bias`` the packed ``in_proj_bias`` or None."""
        if len(weights) == 1 and query is key is value:
            jobs = [(query, weights[0], bias)]
        else:
            separate = weights[0].chunk(3) if len(weights) == 1 else weights
            jobs = list(zip((query, key, value), separate, (None,) * 3 if bias is None else bias.chunk(3)))
        if self.quantiser is not None:
            outs = self.quantiser.linears(jobs, multiplier=self.multiplier, backend=self.backend)
        else:
            outs = [AF.linear(x, w, b, multiplier=self.multiplier, backward=self.backward, backend=self.backend)
                    for x, w, b in jobs]
        return tuple(outs[0].chunk(3, dim=-1)) if len(outs) == 1 else tuple(outs)

    def extra_repr(self) -> str:
        return f"embed_dim={self.embed_dim}, " + self._approx_repr()


def _same_transform(fn, *tensors: Tensor) -> list:
    """``fn`` of each tensor, computed once per distinct tensor so that ``query is key`` stays true."""
    done: dict = {}
    return [done.setdefault(id(t), fn(t)) for t in tensors]


class ApproxMultiheadAttention(nn.MultiheadAttention):
    """``nn.MultiheadAttention`` whose products are approximate: ``in_proj``, ``qk``, ``pv`` and ``out_proj``.

    Same constructor (plus ``multiplier``, ``backward``, ``backend``, ``quant`` for all four ops), parameters,
    state dict keys and forward as ``nn.MultiheadAttention``; with the multiplier ``"exact"`` its outputs equal
    the torch module's to float rounding.  :meth:`set_op` gives one op its own multiplier.  ``quant``: a
    :class:`~mbmlib.QuantSpec` (in_proj, out_proj), a :class:`~mbmlib.MatmulQuantSpec` (qk, pv), a tuple of one
    of each, or None (observed scales).  It never takes torch's fused attention path; a TransformerEncoderLayer
    or TransformerEncoder holding it has fused paths of its own, which :func:`mbmlib.convert` switches off.
    Rows in which no key takes part give what torch gives: NaN with ``need_weights`` (a plain softmax), zeros
    without.
    """

    def __init__(self, embed_dim: int, num_heads: int, dropout: float = 0.0, bias: bool = True,
                 add_bias_kv: bool = False, add_zero_attn: bool = False, kdim=None, vdim=None,
                 batch_first: bool = False, device=None, dtype=None, *, multiplier: MultiplierLike = "mbm",
                 backward: str = "exact", backend: Optional[str] = None, quant=None):
        super().__init__(embed_dim, num_heads, dropout, bias, add_bias_kv, add_zero_attn, kdim, vdim, batch_first,
                         device, dtype)
        self.attach_ops()
        for op in ATTENTION_OPS:
            self.set_op(op, multiplier, backward, backend, quant)

    def attach_ops(self) -> None:
        """Add the exact ops (``in_proj``, ``qk``, ``pv``; ``out_proj`` made an MBMLinear in place) where missing,
        in the order they run; ``convert()`` calls it on an ``nn.MultiheadAttention`` it turns into this class."""
        device = self.out_proj.weight.device
        if not hasattr(self, "in_proj"):
            self.in_proj = InProjection(self.embed_dim, "exact", device=device)
            self.qk = ApproxMatmul("exact", device=device)
            self.pv = ApproxMatmul("exact", device=device)
            make_approx(self.out_proj, dict(multiplier="exact", backward="exact", backend=None))
            self._modules["out_proj"] = self._modules.pop("out_proj")  # after the others: the order they run in

    def set_op(self, op: str, multiplier: MultiplierLike, backward: str = "exact", backend: Optional[str] = None,
               quant=None) -> None:
        """Give one op (``in_proj``, ``qk``, ``pv``, ``out_proj``) its multiplier; ``quant`` as the constructor's."""
        if op not in ATTENTION_OPS:
            raise ValueError(f"unknown attention op {op!r}; the ops are {', '.join(ATTENTION_OPS)}")
        layer_spec, matmul_spec = split_quant(quant)
        module = getattr(self, op)
        if op == "out_proj":
            make_approx(module, dict(multiplier=multiplier, backward=backward, backend=backend, quant=layer_spec))
            return
        module.quant_device = self.out_proj.weight.device
        module._init_approx(multiplier, backward, backend, matmul_spec if op in ("qk", "pv") else layer_spec)

    def forward(self, query: Tensor, key: Tensor, value: Tensor, key_padding_mask: Optional[Tensor] = None,
                need_weights: bool = True, attn_mask: Optional[Tensor] = None, average_attn_weights: bool = True,
                is_causal: bool = False) -> tuple[Tensor, Optional[Tensor]]:
        """``nn.MultiheadAttention.forward`` (its arguments, shapes, masks and results) on the approximate ops."""
        is_batched = F._mha_shape_check(query, key, value, key_padding_mask, attn_mask, self.num_heads)
        key_padding_mask, attn_mask, causal = self._canonical_masks(query, key_padding_mask, attn_mask, is_causal,
                                                                    need_weights)
        self._check_inputs(query, key, value)
        to_batch_first = (lambda t: t.unsqueeze(0)) if not is_batched else \
            (lambda t: t) if self.batch_first else (lambda t: t.transpose(0, 1))
        query, key, value = _same_transform(to_batch_first, query, key, value)  # (N, L, E), (N, S, kdim), ...
        if key_padding_mask is not None and not is_batched:
            key_padding_mask = key_padding_mask.unsqueeze(0)
        weights = (self.in_proj_weight,) if self._qkv_same_embed_dim else \
            (self.q_proj_weight, self.k_proj_weight, self.v_proj_weight)
        q, k, v = self.in_proj(query, key, value, weights, self.in_proj_bias)
        q, k, v, mask = self._heads_and_mask(q, k, v, attn_mask, key_padding_mask, causal)
        dropout_p = self.dropout if self.training else 0.0
        out, attn = attention.attend(q, k, v, mask, dropout_p, attention.default_scale(q, None), self.qk, self.pv,
                                     masked_rows_zero=not need_weights)
        N, H, L, head_dim = out.shape
        out = self.out_proj(out.transpose(1, 2).reshape(N, L, H * head_dim))  # (N, L, E)
        out = out.squeeze(0) if not is_batched else out if self.batch_first else out.transpose(0, 1)
        if not need_weights:
            return out, None
        attn = attn.mean(dim=1) if average_attn_weights else attn  # (N, L, S) or (N, H, L, S)
        return out, attn if is_batched else attn.squeeze(0)

    def _canonical_masks(self, query: Tensor, key_padding_mask, attn_mask, is_causal: bool, need_weights: bool):
        """(key_padding_mask, attn_mask, causal): the masks as additive float masks (torch's own helpers and
        rules), and whether the causal mask stands in for ``attn_mask`` (is_causal, no padding mask, no weights)."""
        key_padding_mask = F._canonical_mask(mask=key_padding_mask, mask_name="key_padding_mask",
                                             other_type=F._none_or_dtype(attn_mask), other_name="attn_mask",
                                             target_type=query.dtype)
        attn_mask = F._canonical_mask(mask=attn_mask, mask_name="attn_mask", other_type=None, other_name="",
                                      target_type=query.dtype, check_other=False)
        if is_causal and attn_mask is None:
            raise RuntimeError("Need attn_mask if specifying the is_causal hint. You may use the Transformer module "
                               "method `generate_square_subsequent_mask` to create this mask.")
        if is_causal and key_padding_mask is None and not need_weights:
            return None, None, True
        return key_padding_mask, attn_mask, False

    def _check_inputs(self, query: Tensor, key: Tensor, value: Tensor) -> None:
        """The embedding and key/value shape checks of ``F.multi_head_attention_forward``, with its messages."""
        if query.shape[-1] != self.embed_dim:
            raise AssertionError(f"was expecting embedding dimension of {self.embed_dim}, but got {query.shape[-1]}")
        if self._qkv_same_embed_dim and key.shape != value.shape:
            raise AssertionError(f"key shape {key.shape} does not match value shape {value.shape}")
        if key.shape[:-1] != value.shape[:-1]:
            raise AssertionError(f"key's sequence and batch dims {key.shape[:-1]} do not match value's "
                                 f"{value.shape[:-1]}")

    def _heads_and_mask(self, q: Tensor, k: Tensor, v: Tensor, attn_mask, key_padding_mask, causal: bool):
        """q (N, H, L, hd), k and v (N, H, S', hd) with bias_k/bias_v and the zero key appended, and the additive
        mask over (N, H, L, S') that attn_mask, key_padding_mask or the causal mask make (or None)."""
        (N, L, E), S = q.shape, k.shape[1]
        attn_mask = self._attn_mask(attn_mask, N, L, S)
        if self.bias_k is not None and self.bias_v is not None:
            k = torch.cat([k, self.bias_k.expand(N, 1, E)], dim=1)
            v = torch.cat([v, self.bias_v.expand(N, 1, E)], dim=1)
            attn_mask, key_padding_mask = _pad_masks(attn_mask, key_padding_mask)
        q, k, v = (t.view(N, t.shape[1], self.num_heads, self.head_dim).transpose(1, 2) for t in (q, k, v))
        if self.add_zero_attn:
            zeros = q.new_zeros(N, self.num_heads, 1, self.head_dim)
            k, v = torch.cat([k, zeros], dim=2), torch.cat([v, zeros], dim=2)
            attn_mask, key_padding_mask = _pad_masks(attn_mask, key_padding_mask)
        S = k.shape[2]
        if key_padding_mask is not None:
            F._check_key_padding_mask(key_padding_mask, S, N)
            key_padding_mask = key_padding_mask.view(N, 1, 1, S)
            attn_mask = key_padding_mask if attn_mask is None else attn_mask + key_padding_mask
        if causal:
            attn_mask = attention.additive_mask(None, True, L, S, q.dtype, q.device)
        return q, k, v, attn_mask

    def _attn_mask(self, attn_mask: Optional[Tensor], N: int, L: int, S: int) -> Optional[Tensor]:
        """A 2-D (L, S) mask as it is, a 3-D (N * heads, L, S) one as (N, heads, L, S); torch's shape errors."""
        if attn_mask is None or attn_mask.dim() == 2:
            if attn_mask is not None and attn_mask.shape != (L, S):
                raise RuntimeError(f"The shape of the 2D attn_mask is {attn_mask.shape}, but should be {(L, S)}.")
            return attn_mask
        if attn_mask.dim() != 3:
            raise RuntimeError(f"attn_mask's dimension {attn_mask.dim()} is not supported")
        if attn_mask.shape != (N * self.num_heads, L, S):
            raise RuntimeError(f"The shape of the 3D attn_mask is {attn_mask.shape}, but should be "
                               f"{(N * self.num_heads, L, S)}.")
        return attn_mask.view(N, self.num_heads, L, S)


def _pad_masks(attn_mask: Optional[Tensor], key_padding_mask: Optional[Tensor]) -> tuple:
    """Both masks with a column of zeros for one more key (bias_k/bias_v, the zero key), as torch pads them."""
    return tuple(None if m is None else F.pad(m, (0, 1)) for m in (attn_mask, key_padding_mask))
