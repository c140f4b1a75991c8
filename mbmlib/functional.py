"""Approximate conv2d / linear / matmul / bmm / attention with autograd, registered as torch custom ops.

Every product is ``approx_mul(x, w)`` accumulated in float32; a bias is added
exactly.  ``backward="exact"`` differentiates the exact map (straight-through:
the fast cuDNN/MKL gradients); ``backward="approx"`` computes the two gradient
products with the approximate multiplier too, as approximate hardware would.
Attention (:func:`scaled_dot_product_attention`) runs Q K^T and P V through the
same matmul; its scale, masks and softmax stay exact (:mod:`mbmlib.attention`).

The ops are defined with ``torch.library.custom_op`` + ``register_fake`` +
``register_autograd`` so that models using them also work under
``torch.compile`` (the ops stay opaque to the graph).
"""
from __future__ import annotations

import functools
import math
from typing import List, Optional, Sequence, Union

import torch
import torch.nn.functional as F
from torch import Tensor

from . import attention, kernels
from .multipliers.floating import check_float_tensors
from .multipliers.integer import check_int_tensor
from .multipliers.specs import MultiplierLike, as_multiplier

BACKWARD_MODES = ("exact", "approx")

__all__ = ["conv2d", "linear", "matmul", "bmm", "scaled_dot_product_attention", "attention_with_weights", "linear_int",
           "conv2d_int", "BACKWARD_MODES", "check_backward", "conv2d_args", "linear_args", "matmul_args",
           "conv2d_exact_grads", "bmm_nt_exact_grads"]


def check_backward(backward: str) -> str:
    """Validate a backward mode name."""
    if backward not in BACKWARD_MODES:
        raise ValueError(f"unknown backward mode {backward!r}; valid modes are 'exact' (straight-through "
                         "gradients of the exact layer) and 'approx' (gradient products approximate too)")
    return backward


# ----------------------------------------------------------------------------- batched GEMM


@torch.library.custom_op("mbmlib::bmm_nt", mutates_args=())
def _bmm_nt(a: Tensor, b: Tensor, multiplier: str, backward: str, backend: str) -> Tensor:
    """(G, M, K), (G, N, K) -> (G, M, N): approximate ``a @ b.T``, computed in float32."""
    mult = as_multiplier(multiplier)
    if mult.is_exact or a.shape[2] == 0:  # K = 0: empty sums are zeros, as torch.bmm gives
        return torch.bmm(a, b.transpose(1, 2))
    return kernels.load(backend).bmm_nt(a.float(), b.float(), mult).to(a.dtype)


@_bmm_nt.register_fake
def _(a, b, multiplier, backward, backend):
    return a.new_empty(a.shape[0], a.shape[1], b.shape[1])


def _bmm_nt_setup(ctx, inputs, output):
    a, b, multiplier, backward, backend = inputs
    ctx.save_for_backward(a, b)
    ctx.opts = (multiplier, backward, backend)


def bmm_nt_exact_grads(grad: Tensor, a: Tensor, b: Tensor, needs) -> tuple:
    """(grad_a, grad_b) of the exact ``a @ b.T``, each only where ``needs`` says (else None).

    With one group the products are ``torch.mm``s, as ``F.linear``'s own backward computes them:
    ``torch.bmm`` may pick another BLAS kernel and sum in another order (last bits differ on some CPUs).
    """
    mm = torch.bmm if grad.shape[0] != 1 else (lambda p, q: torch.mm(p[0], q[0])[None])
    grad_a = mm(grad, b.to(grad.dtype)) if needs[0] else None  # (G, M, N) @ (G, N, K)
    grad_b = mm(grad.transpose(1, 2), a.to(grad.dtype)) if needs[1] else None  # (G, N, M) @ (G, M, K)
    return grad_a, grad_b


def _bmm_nt_backward(ctx, grad):
    a, b = ctx.saved_tensors
    multiplier, backward, backend = ctx.opts
    if backward == "exact":
        grad_a, grad_b = bmm_nt_exact_grads(grad, a, b, ctx.needs_input_grad)
    else:
        grad_a = grad_b = None
        if ctx.needs_input_grad[0]:
            grad_a = _bmm_nt(grad, b.transpose(1, 2).contiguous(), multiplier, "approx", backend)
        if ctx.needs_input_grad[1]:
            grad_b = _bmm_nt(grad.transpose(1, 2).contiguous(), a.transpose(1, 2).contiguous(),
                             multiplier, "approx", backend)
    return grad_a, grad_b, None, None, None


_bmm_nt.register_autograd(_bmm_nt_backward, setup_context=_bmm_nt_setup)


# ----------------------------------------------------------------------------- convolution


@torch.library.custom_op("mbmlib::conv2d", mutates_args=())
def _conv2d(x: Tensor, w: Tensor, bias: Optional[Tensor], stride: List[int], padding: List[int],
            dilation: List[int], groups: int, multiplier: str, backward: str, backend: str) -> Tensor:
    """Approximate convolution, explicit symmetric zero padding, the bias added exactly."""
    mult = as_multiplier(multiplier)
    if mult.is_exact:
        return F.conv2d(x, w, bias, stride, padding, dilation, groups)
    out = kernels.load(backend).conv2d(x.float().contiguous(), w.float().contiguous(), tuple(stride),
                                       tuple(padding), tuple(dilation), groups, mult).to(x.dtype)
    return out if bias is None else out + bias.view(1, -1, 1, 1)


@_conv2d.register_fake
def _(x, w, bias, stride, padding, dilation, groups, multiplier, backward, backend):
    return F.conv2d(x, w, bias, stride, padding, dilation, groups)


@torch.library.custom_op("mbmlib::conv2d_grad_approx", mutates_args=())
def _conv2d_grad_approx(grad: Tensor, x: Tensor, w: Tensor, stride: List[int], padding: List[int],
                        dilation: List[int], groups: int, multiplier: str, backend: str) -> List[Tensor]:
    """Input and weight gradients of a convolution whose products are approximate."""
    grad_x, grad_w = kernels.load(backend).conv2d_grads(grad.float().contiguous(), x.float().contiguous(),
                                                        w.float().contiguous(), tuple(stride), tuple(padding),
                                                        tuple(dilation), groups, as_multiplier(multiplier))
    return [grad_x.to(x.dtype), grad_w.to(w.dtype)]


@_conv2d_grad_approx.register_fake
def _(grad, x, w, stride, padding, dilation, groups, multiplier, backend):
    return [torch.empty_like(x), torch.empty_like(w)]


def conv2d_exact_grads(grad: Tensor, x: Tensor, w: Tensor, has_bias: bool, stride, padding, dilation, groups,
                       mask) -> tuple:
    """(grad_x, grad_w, grad_bias) of the exact convolution, as ``nn.Conv2d``'s own backward computes them.

    ``mask`` says which of the three are wanted (the others come back None).
    """
    bias_sizes = [w.shape[0]] if has_bias else None
    return torch.ops.aten.convolution_backward(grad, x, w, bias_sizes, stride, padding, dilation, False, [0, 0],
                                               groups, list(mask))


def _conv2d_setup(ctx, inputs, output):
    x, w, bias, stride, padding, dilation, groups, multiplier, backward, backend = inputs
    ctx.save_for_backward(x, w)
    ctx.opts = (bias is not None, stride, padding, dilation, groups, multiplier, backward, backend)


def _conv2d_backward(ctx, grad):
    x, w = ctx.saved_tensors
    has_bias, stride, padding, dilation, groups, multiplier, backward, backend = ctx.opts
    needs = ctx.needs_input_grad[:3]
    approx = backward == "approx" and not as_multiplier(multiplier).is_exact
    mask = (False, False, needs[2]) if approx else needs
    grad_x, grad_w, grad_b = conv2d_exact_grads(grad, x, w, has_bias, stride, padding, dilation, groups, mask)
    if approx and (needs[0] or needs[1]):
        grad_x, grad_w = _conv2d_grad_approx(grad, x, w, stride, padding, dilation, groups, multiplier, backend)
    return grad_x, grad_w, grad_b, None, None, None, None, None, None, None


_conv2d.register_autograd(_conv2d_backward, setup_context=_conv2d_setup)


# ----------------------------------------------------------------------------- argument checks


def _pair(v, name: str) -> tuple[int, int]:
    """One int or a sequence of 1 or 2 ints -> a pair, with F.conv2d's error types."""
    values = (v,) if not isinstance(v, (tuple, list, torch.Size)) else tuple(v)
    if len(values) not in (1, 2):
        raise RuntimeError(f"expected {name} to be a single integer or a list of 2 values, got {list(values)}")
    if not all(isinstance(x, int) for x in values):
        raise TypeError(f"{name} must be an integer or a pair of integers, got {v!r}")
    return (values[0], values[-1])


def _conv_args(stride, padding, dilation, groups):
    """Stride/dilation/padding as pairs, checked with the error types and wording F.conv2d uses."""
    stride, dilation = _pair(stride, "stride"), _pair(dilation, "dilation")
    if min(stride) <= 0:
        raise RuntimeError(f"non-positive stride is not supported: got stride={list(stride)}; use strides >= 1")
    if min(dilation) <= 0:
        raise RuntimeError(f"non-positive dilation is not supported: got dilation={list(dilation)}; use dilations "
                           ">= 1")
    if not isinstance(padding, str):
        padding = _pair(padding, "padding")
        if min(padding) < 0:
            raise RuntimeError(f"negative padding is not supported: got padding={list(padding)}; crop the input "
                               "instead")
    if not isinstance(groups, int) or groups <= 0:
        raise RuntimeError(f"non-positive groups is not supported: got groups={groups!r}; use an integer >= 1")
    return stride, padding, dilation


_LAYER = "an approximate layer"  # what needs float tensors, in check_float_tensors' messages


def _check_layer_inputs(named: dict) -> None:
    """The layers' input check: float tensors of one dtype and device, and not under ``torch.jit.trace``."""
    if torch.jit.is_tracing():
        raise RuntimeError("mbmlib's approximate layers cannot be traced with torch.jit.trace (TorchScript records "
                           "no custom-op checks); use torch.export.export(model, (x,)) or torch.compile(model), "
                           "which both keep the approximate ops")
    check_float_tensors(named, _LAYER)


def _check_conv_shapes(input: Tensor, weight: Tensor, bias: Optional[Tensor], groups: int) -> None:
    """Rank, channel and bias checks with the messages F.conv2d gives (its meta kernel's are terser or absent)."""
    if weight.dim() != 4:
        raise RuntimeError(f"weight must be 4-D (out_channels, in_channels/groups, kH, kW), got shape "
                           f"{list(weight.shape)}")
    if input.dim() not in (3, 4):
        raise RuntimeError(f"Expected 3D (unbatched) or 4D (batched) input to conv2d, but got input of size: "
                           f"{list(input.shape)}")
    channels = input.shape[-3]
    if channels != weight.shape[1] * groups:
        raise RuntimeError(f"Given groups={groups}, weight of size {list(weight.shape)}, expected input"
                           f"{list(input.shape)} to have {weight.shape[1] * groups} channels, but got "
                           f"{channels} channels instead")
    if bias is not None and (bias.dim() != 1 or bias.shape[0] != weight.shape[0]):
        raise RuntimeError(f"Given weight of size {list(weight.shape)}, expected bias to be 1-dimensional with "
                           f"{weight.shape[0]} elements, but got bias of size {list(bias.shape)} instead")


def _resolve(multiplier: MultiplierLike, backward: str, backend: Optional[str], device) -> tuple[str, str, str]:
    """(multiplier key, backward, backend) of a float call: checked once here, routed by the design's kernels."""
    mult = as_multiplier(multiplier)
    if mult.is_integer:
        raise ValueError(f"the integer multiplier {mult.name!r} multiplies quantised values and needs scales: use "
                         "mbmlib.quant.conv2d / linear / matmul, or the layers (MBMConv2d, MBMLinear, ApproxMatmul, "
                         "ApproxMultiheadAttention) with multiplier=...")
    check_backward(backward)
    way = kernels.route(mult, kernels.resolve(backend, device))
    return way.key, backward, way.backend


def _spec(t: Optional[Tensor], dtype: Optional[torch.dtype]) -> Optional[tuple]:
    return None if t is None else (tuple(t.shape), dtype or t.dtype)


@functools.lru_cache(maxsize=4096)
def _meta_call(fn, specs: tuple, args: tuple) -> None:
    fn(*(None if s is None else torch.empty(s[0], dtype=s[1], device="meta") for s in specs), *args)


def on_meta(fn, tensors: Sequence[Optional[Tensor]], *args, dtype: Optional[torch.dtype] = None) -> None:
    """``fn(*tensors, *args)`` on meta tensors of the same shapes (and dtypes, or ``dtype``): torch's own shape
    rules and errors, nothing computed.  Once per distinct call: a layer's forward does not pay meta dispatch
    (~70 us) every time; a call that raises is not remembered, so it raises again.  Under torch.compile the
    check is traced as it is (dynamo would only warn that it ignores the cache)."""
    if torch.compiler.is_compiling():
        fn(*(None if t is None else t.to("meta", dtype or t.dtype) for t in tensors), *args)
        return
    _meta_call(fn, tuple(_spec(t, dtype) for t in tensors), tuple(tuple(a) if isinstance(a, list) else a for a in args))


# ----------------------------------------------------------------------------- public API


def conv2d_args(input: Tensor, weight: Tensor, bias: Optional[Tensor], stride, padding, dilation, groups):
    """Check a conv2d call as F.conv2d would; return ``(x, stride, padding, dilation, unbatched)``.

    ``x`` is (B, C, H, W) -- unbatched input gets a batch of one, lopsided
    ``"same"`` padding is applied to it -- so that ``padding`` is explicit and symmetric.
    """
    _check_layer_inputs({"input": input, "weight": weight, "bias": bias})
    stride, padding, dilation = _conv_args(stride, padding, dilation, groups)
    _check_conv_shapes(input, weight, bias, groups)
    # PyTorch's own checks (padding strings, kernel vs input size), without computing anything
    on_meta(F.conv2d, (input, weight, None), stride, padding, dilation, groups)
    unbatched = input.dim() == 3
    x = input.unsqueeze(0) if unbatched else input  # (B, C, H, W)
    if isinstance(padding, str):
        x, padding = _string_padding(x, weight.shape[2:], dilation, padding)
    return x, list(stride), list(padding), list(dilation), unbatched


def conv2d(input: Tensor, weight: Tensor, bias: Optional[Tensor] = None, stride=1,
           padding: Union[str, int, Sequence[int]] = 0, dilation=1, groups: int = 1, *,
           multiplier: MultiplierLike = "mbm", backward: str = "exact", backend: Optional[str] = None) -> Tensor:
    """``F.conv2d`` with every product approximate; same arguments, rules and errors.

    ``padding`` may be ``"same"`` or ``"valid"``.  Input (B, C, H, W) or unbatched
    (C, H, W); weight (O, C/groups, kh, kw).
    """
    x, stride, padding, dilation, unbatched = conv2d_args(input, weight, bias, stride, padding, dilation, groups)
    mult, backward, backend = _resolve(multiplier, backward, backend, input.device)
    out = _conv2d(x, weight, bias, stride, padding, dilation, groups, mult, backward, backend)
    return out.squeeze(0) if unbatched else out


def _string_padding(x: Tensor, kernel_size, dilation, padding: str) -> tuple[Tensor, tuple[int, int]]:
    """Turn "valid"/"same" into symmetric padding, pre-padding the input where "same" is lopsided."""
    if padding == "valid":
        return x, (0, 0)
    total = [d * (k - 1) for d, k in zip(dilation, kernel_size)]
    left = [t // 2 for t in total]
    if all(t == 2 * l for t, l in zip(total, left)):
        return x, (left[0], left[1])
    extra = [t - 2 * l for t, l in zip(total, left)]  # the odd pixel goes right/bottom, as F.conv2d does
    x = F.pad(x, [0, extra[1], 0, extra[0]])
    return x, (left[0], left[1])


def linear_args(input: Tensor, weight: Tensor, bias: Optional[Tensor]) -> tuple[Tensor, Tensor, list]:
    """Check a linear call as F.linear would; return ``(x (1, M, K), w (1, N, K), output shape)``."""
    _check_layer_inputs({"input": input, "weight": weight, "bias": bias})
    on_meta(F.linear, (input, weight, bias))
    K = input.shape[-1]
    x = input.reshape(1, math.prod(input.shape[:-1]), K)  # (1, M, K)
    w = weight.reshape(1, weight.shape[0] if weight.dim() == 2 else 1, K)  # (1, N, K)
    return x, w, [*input.shape[:-1], *weight.shape[:-1]]


def linear(input: Tensor, weight: Tensor, bias: Optional[Tensor] = None, *, multiplier: MultiplierLike = "mbm",
           backward: str = "exact", backend: Optional[str] = None) -> Tensor:
    """``F.linear`` with every product approximate: input (..., in), weight (out, in) -> (..., out)."""
    x, w, out_shape = linear_args(input, weight, bias)
    mult, backward, backend = _resolve(multiplier, backward, backend, input.device)
    out = _bmm_nt(x, w, mult, backward, backend).reshape(out_shape)  # (1, M, N) -> (..., N)
    return out if bias is None else out + bias


def _nt_operands(a: Tensor, b: Tensor) -> tuple[Tensor, Tensor, list]:
    """``a @ b`` (torch.matmul's broadcasting) as ``a3 @ b3.T``: ``(a3 (G, M, K), b3 (G, N, K), output shape)``."""
    a2 = a.unsqueeze(0) if a.dim() == 1 else a  # (..., M, K)
    b2 = b.unsqueeze(-1) if b.dim() == 1 else b  # (..., K, N)
    batch = torch.broadcast_shapes(a2.shape[:-2], b2.shape[:-2])
    M, K, N = a2.shape[-2], a2.shape[-1], b2.shape[-1]
    G = math.prod(batch)
    a3 = a2.expand(*batch, M, K).reshape(G, M, K)
    b3 = b2.expand(*batch, K, N).transpose(-1, -2).reshape(G, N, K)
    return a3, b3, [*batch, *([M] if a.dim() > 1 else []), *([N] if b.dim() > 1 else [])]


def matmul_args(a: Tensor, b: Tensor) -> tuple[Tensor, Tensor, list]:
    """Check a matmul as torch.matmul would; return ``(a (G, M, K), b transposed (G, N, K), output shape)``."""
    _check_layer_inputs({"a": a, "b": b})
    on_meta(torch.matmul, (a, b))
    return _nt_operands(a, b)


def _matmul(a: Tensor, b: Tensor, multiplier: str, backward: str, backend: str) -> Tensor:
    """The approximate ``a @ b`` of checked operands and a resolved multiplier, backward mode and backend; the
    exact design is ``torch.matmul`` itself (its kernels for each rank, so exact attention is torch's math)."""
    if as_multiplier(multiplier).is_exact:
        return torch.matmul(a, b)
    a3, b3, out_shape = _nt_operands(a, b)
    return _bmm_nt(a3, b3, multiplier, backward, backend).reshape(out_shape)


def matmul(a: Tensor, b: Tensor, *, multiplier: MultiplierLike = "mbm", backward: str = "exact",
           backend: Optional[str] = None) -> Tensor:
    """``torch.matmul`` with every product approximate (1-D, 2-D and broadcast batched operands)."""
    matmul_args(a, b)
    return _matmul(a, b, *_resolve(multiplier, backward, backend, a.device))


def bmm(a: Tensor, b: Tensor, *, multiplier: MultiplierLike = "mbm", backward: str = "exact",
        backend: Optional[str] = None) -> Tensor:
    """``torch.bmm`` with every product approximate: (B, M, K) @ (B, K, N) -> (B, M, N), no broadcasting."""
    _check_layer_inputs({"a": a, "b": b})
    on_meta(torch.bmm, (a, b))  # torch.bmm's rules and errors
    return _bmm_nt(a, b.transpose(1, 2), *_resolve(multiplier, backward, backend, a.device))


def attention_with_weights(query: Tensor, key: Tensor, value: Tensor, attn_mask: Optional[Tensor] = None,
                           dropout_p: float = 0.0, is_causal: bool = False, scale: Optional[float] = None,
                           enable_gqa: bool = False, *, multiplier: MultiplierLike = "mbm", backward: str = "exact",
                           backend: Optional[str] = None) -> tuple[Tensor, Tensor]:
    """:func:`scaled_dot_product_attention` that also returns the attention weights (..., L, S) it multiplied V
    by (after dropout)."""
    _check_layer_inputs({"query": query, "key": key, "value": value})
    attention.check_attention_args(query, key, value, attn_mask, dropout_p, is_causal, enable_gqa)
    opts = _resolve(multiplier, backward, backend, query.device)
    key, value = (attention.repeat_kv_heads(query, t, enable_gqa) for t in (key, value))
    mask = attention.additive_mask(attn_mask, is_causal, query.shape[-2], key.shape[-2], query.dtype, query.device)
    approx = functools.partial(_matmul, multiplier=opts[0], backward=opts[1], backend=opts[2])
    return attention.attend(query, key, value, mask, dropout_p, attention.default_scale(query, scale), approx, approx)


def scaled_dot_product_attention(query: Tensor, key: Tensor, value: Tensor, attn_mask: Optional[Tensor] = None,
                                 dropout_p: float = 0.0, is_causal: bool = False, scale: Optional[float] = None,
                                 enable_gqa: bool = False, *, multiplier: MultiplierLike = "mbm",
                                 backward: str = "exact", backend: Optional[str] = None) -> Tensor:
    """``F.scaled_dot_product_attention`` with Q K^T and P V approximate: same arguments, rules and errors.

    query (..., L, E), key (..., S, E), value (..., S, Ev), batch dims broadcast; ``attn_mask`` bool (True =
    takes part) or float (added), broadcast to (..., L, S); ``is_causal`` (not with a mask); dropout on the
    weights; ``scale`` default ``1/sqrt(E)``, applied exactly to the approximate scores
    (``softmax(approx(Q K^T) * scale + mask)``, :mod:`mbmlib.attention`); grouped-query attention with
    ``enable_gqa``.  Softmax is exact; a row no key takes part in gives zeros, as torch's does.
    """
    return attention_with_weights(query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa,
                                  multiplier=multiplier, backward=backward, backend=backend)[0]


# ----------------------------------------------------------------------------- integers in, exact integer sums out


def _integer_call(multiplier: MultiplierLike, backend: Optional[str], named: dict):
    """(multiplier form, backend) of an integer-in call: an integer or table multiplier, integer tensors on one
    device within its range (sign-magnitude, or two's complement for a signed table)."""
    mult = as_multiplier(multiplier)
    if not mult.is_integer:
        raise ValueError(f"linear_int / conv2d_int take an integer or table multiplier such as 'mbm-int8', got "
                         f"{mult.name!r}; float tensors go through linear / conv2d")
    tensors = {name: t for name, t in named.items() if t is not None}
    for name, t in tensors.items():
        check_int_tensor(t, name, mult, ranged=name == "bias")
    devices = {t.device for t in tensors.values()}
    if len(devices) > 1:
        raise ValueError(f"all tensors must be on one device, got {', '.join(map(str, devices))}")
    way = kernels.route(mult, kernels.resolve(backend, next(iter(devices))))
    return way.multiplier, way.backend


def _int_out(sums: Tensor, bias: Optional[Tensor], bias_shape: tuple) -> Tensor:
    out = sums.to(torch.int64)  # the kernels' float64 sums are exact integers (they refuse sums past 2**53)
    return out if bias is None else out + bias.to(torch.int64).view(bias_shape)


def linear_int(input: Tensor, weight: Tensor, bias: Optional[Tensor] = None, *, multiplier: MultiplierLike,
               backend: Optional[str] = None) -> Tensor:
    """``F.linear`` of integer tensors on an integer or table multiplier: ``sum_k P(input[.., k], weight[n, k])``
    (+ ``bias``), exact int64 (no scales, no float rounding), for porting integer models.

    input (..., in), weight (out, in), bias (out,) of any integer dtype.
    """
    mult, backend = _integer_call(multiplier, backend, {"input": input, "weight": weight, "bias": bias})
    on_meta(F.linear, (input, weight, bias), dtype=torch.float32)
    K = input.shape[-1]
    x = input.reshape(1, math.prod(input.shape[:-1]), K).contiguous()
    w = weight.reshape(1, weight.shape[0] if weight.dim() == 2 else 1, K).contiguous()
    sums = kernels.load(backend).bmm_nt_int(x, w, mult)
    return _int_out(sums.reshape(*input.shape[:-1], *weight.shape[:-1]), bias, (-1,))


def conv2d_int(input: Tensor, weight: Tensor, bias: Optional[Tensor] = None, stride=1, padding=0, dilation=1,
               groups: int = 1, *, multiplier: MultiplierLike, backend: Optional[str] = None) -> Tensor:
    """``F.conv2d`` of integer tensors on an integer or table multiplier: exact int64 sums of ``P(x, w)``
    (+ ``bias``); zero padding is the operand 0, multiplied as the hardware does.

    Input (B, C, H, W) or (C, H, W), weight (O, C/groups, kh, kw), numeric padding; any integer dtype.
    """
    mult, backend = _integer_call(multiplier, backend, {"input": input, "weight": weight, "bias": bias})
    stride, padding, dilation = _conv_args(stride, padding, dilation, groups)
    if isinstance(padding, str):
        raise ValueError(f"conv2d_int takes numeric padding, got {padding!r}; pad the integers yourself")
    _check_conv_shapes(input, weight, bias, groups)
    on_meta(F.conv2d, (input, weight, None), stride, padding, dilation, groups, dtype=torch.float32)
    x = input.unsqueeze(0) if input.dim() == 3 else input
    sums = kernels.conv2d_int(backend, x.contiguous(), weight.contiguous(), stride, padding, dilation, groups, mult)
    out = _int_out(sums, bias, (1, -1, 1, 1))
    return out.squeeze(0) if input.dim() == 3 else out
