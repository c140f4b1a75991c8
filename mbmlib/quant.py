"""Quantised conv2d / linear on integer and table multipliers (SPEC section 4).

Real tensors go onto an n-bit sign-magnitude multiplier: ``q = clamp(round(x / s),
-(2^n - 1), 2^n - 1)``, or ``[-2^(n-1), 2^(n-1) - 1]`` for a signed table (two's-complement
hardware, SPEC section 6); weights per output channel, activations per tensor; the
output is ``s_x * s_w[o] * sum(sign * P(|q_x|, |q_w|))`` with the integer sum exact
(float64 from the kernels), scaled in float64, rounded once to the input's dtype,
then the bias added exactly.  Gradients are straight-through: those of the float
layer with the float weights (quantisation-aware training).  The integer sums
come from the backend's ``bmm_nt_int`` / ``conv2d_int`` (C++ on the CPU, Triton on CUDA),
which :func:`mbmlib.kernels.route` picks per design.

Scales are given (:class:`QuantSpec`), calibrated (:func:`calibrate`, with
PyTorch's own observers) or, when neither, follow the observed ranges while the
layer trains and stay frozen in eval mode (:class:`Quantiser`).
"""
from __future__ import annotations

import dataclasses
import math
from typing import Iterable, List, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.ao.quantization import observer as tq

from . import functional as AF
from . import kernels
from .multipliers import Multiplier, MultiplierLike, as_multiplier

__all__ = ["QuantSpec", "PROJECT_SCALES", "CALIBRATION_METHODS", "Quantiser", "calibrate", "conv2d", "linear",
           "quantise", "levels_of", "weight_scale_of"]

CALIBRATION_METHODS = ("minmax", "histogram", "percentile")


@dataclasses.dataclass(frozen=True)
class QuantSpec:
    """Fixed scales of a quantised layer; a scale left None comes from observed ranges.

    ``weight_scale`` applies to every output channel, ``act_scale`` to the input.
    """

    weight_scale: Optional[float] = None
    act_scale: Optional[float] = None

    def __post_init__(self):
        for name in ("weight_scale", "act_scale"):
            value = getattr(self, name)
            if value is not None and not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
                raise ValueError(f"QuantSpec.{name} must be a positive finite number or None, got {value!r}")


# The project's own 8-bit inference: weights in steps of 1/1000, activations in steps of 1/10.
PROJECT_SCALES = QuantSpec(weight_scale=1e-3, act_scale=0.1)


def levels_of(levels) -> tuple[int, int]:
    """``(q_min, q_max)`` from a multiplier, a pair, or one magnitude m (symmetric: ``(-m, m)``)."""
    if isinstance(levels, Multiplier):
        return levels.q_range
    return (-levels, levels) if isinstance(levels, int) else (int(levels[0]), int(levels[1]))


def quantise(x: Tensor, scale: Tensor, levels) -> Tensor:
    """``clamp(round(x / scale), q_min, q_max)`` as int32 (round half to even); ``levels`` as :func:`levels_of`
    takes it (a multiplier: its ``q_range``).

    NaN has no integer: it becomes 0 here, and the layers make every output it reaches NaN
    (:func:`_nan_where`), as a float layer's output would be.
    """
    lo, hi = levels_of(levels)
    q = torch.clamp(torch.round(x.float() / scale), lo, hi)
    return torch.where(torch.isnan(q), 0.0, q).to(torch.int32)


def _nan_where(out: Tensor, reached: Tensor) -> Tensor:
    """``out`` with NaN where ``reached`` (broadcasting): the outputs a non-finite operand fed (no synchronisation)."""
    return torch.where(reached, torch.full((), float("nan"), dtype=out.dtype, device=out.device), out)


def _integer(multiplier: MultiplierLike) -> Multiplier:
    mult = as_multiplier(multiplier)
    if not mult.is_integer:
        raise ValueError(f"quantised layers need an integer or table multiplier such as 'mbm-int8', got "
                         f"{mult.name!r}; float multipliers run on mbmlib.functional without scales")
    return mult


# ----------------------------------------------------------------------------- custom ops


@torch.library.custom_op("mbmlib::conv2d_quant", mutates_args=())
def _conv2d_quant(x: Tensor, w: Tensor, bias: Optional[Tensor], x_scale: Tensor, w_scale: Tensor,
                  stride: List[int], padding: List[int], dilation: List[int], groups: int, multiplier: str,
                  backend: str) -> Tensor:
    """Quantised convolution: integer sums (B, O, Ho, Wo) from the backend, scaled, plus the exact bias."""
    mult = as_multiplier(multiplier)
    qx = quantise(x, x_scale, mult)  # (B, C, H, W)
    qw = quantise(w, w_scale.view(-1, 1, 1, 1), mult)  # (O, C/groups, kh, kw)
    sums = kernels.conv2d_int(backend, qx.contiguous(), qw.contiguous(), stride, padding, dilation, groups, mult,
                              ranged=True)  # (B, O, Ho, Wo) float64
    out = (sums * (x_scale.double() * w_scale.double()).view(1, -1, 1, 1)).to(x.dtype)
    bad_x = (~torch.isfinite(x)).to(x.dtype)  # (B, C, H, W): which outputs a NaN/inf input reaches, exactly
    reached = F.conv2d(bad_x, torch.ones_like(w), None, stride, padding, dilation, groups) > 0
    reached = reached | ~torch.isfinite(w).flatten(1).all(1).view(1, -1, 1, 1)  # a non-finite weight: its channel
    out = _nan_where(out, reached)
    return out if bias is None else out + bias.view(1, -1, 1, 1)


@_conv2d_quant.register_fake
def _(x, w, bias, x_scale, w_scale, stride, padding, dilation, groups, multiplier, backend):
    return F.conv2d(x, w, bias, stride, padding, dilation, groups)


def _conv2d_quant_setup(ctx, inputs, output):
    x, w, bias, _, _, stride, padding, dilation, groups, _, _ = inputs
    ctx.save_for_backward(x, w)
    ctx.opts = (bias is not None, stride, padding, dilation, groups)


def _conv2d_quant_backward(ctx, grad):
    x, w = ctx.saved_tensors
    grads = AF.conv2d_exact_grads(grad, x, w, *ctx.opts, ctx.needs_input_grad[:3])  # straight-through
    return (*grads, None, None, None, None, None, None, None, None)


_conv2d_quant.register_autograd(_conv2d_quant_backward, setup_context=_conv2d_quant_setup)


@torch.library.custom_op("mbmlib::bmm_nt_quant", mutates_args=())
def _bmm_nt_quant(a: Tensor, b: Tensor, a_scale: Tensor, b_scale: Tensor, multiplier: str, backend: str) -> Tensor:
    """(G, M, K), (G, N, K) -> (G, M, N): quantised ``a @ b.T``, ``a`` per tensor, ``b`` per row (channel)."""
    mult = as_multiplier(multiplier)
    if a.shape[2] == 0:  # empty sums
        return a.new_zeros(a.shape[0], a.shape[1], b.shape[1])
    qa = quantise(a, a_scale, mult)  # (G, M, K)
    qb = quantise(b, b_scale.view(1, -1, 1), mult)  # (G, N, K)
    sums = kernels.load(backend).bmm_nt_int(qa.contiguous(), qb.contiguous(), mult, ranged=True)  # (G, M, N) float64
    out = (sums * (a_scale.double() * b_scale.double())).to(a.dtype)
    return _nan_where(out, ~torch.isfinite(a).all(-1)[:, :, None] | ~torch.isfinite(b).all(-1)[:, None, :])


@_bmm_nt_quant.register_fake
def _(a, b, a_scale, b_scale, multiplier, backend):
    return a.new_empty(a.shape[0], a.shape[1], b.shape[1])


def _bmm_nt_quant_setup(ctx, inputs, output):
    ctx.save_for_backward(inputs[0], inputs[1])


def _bmm_nt_quant_backward(ctx, grad):
    a, b = ctx.saved_tensors
    return (*AF.bmm_nt_exact_grads(grad, a, b, ctx.needs_input_grad), None, None, None, None)


_bmm_nt_quant.register_autograd(_bmm_nt_quant_backward, setup_context=_bmm_nt_quant_setup)


# ----------------------------------------------------------------------------- functional API


def _scales(act_scale, weight_scale, channels: int, device) -> tuple[Tensor, Tensor]:
    """Scales as float32 tensors: () for the activations, (channels,) for the weights."""
    s_x = torch.as_tensor(act_scale, dtype=torch.float32, device=device)
    s_w = torch.as_tensor(weight_scale, dtype=torch.float32, device=device)
    if s_x.numel() != 1 or s_w.numel() not in (1, channels):
        raise ValueError(f"act_scale must be one number and weight_scale one number or {channels} (one per "
                         f"output channel); got {s_x.numel()} and {s_w.numel()} values")
    return s_x.reshape(()), s_w.reshape(-1).expand(channels).contiguous()


def conv2d(input: Tensor, weight: Tensor, bias: Optional[Tensor] = None, stride=1, padding=0, dilation=1,
           groups: int = 1, *, act_scale, weight_scale, multiplier: MultiplierLike = "mbm-int8",
           backend: Optional[str] = None) -> Tensor:
    """``F.conv2d`` on a quantised integer multiplier: ``act_scale`` per tensor, ``weight_scale`` per channel.

    Arguments, shapes and errors as ``F.conv2d``; scales are positive numbers or tensors.
    """
    mult = _integer(multiplier)
    x, stride, padding, dilation, unbatched = AF.conv2d_args(input, weight, bias, stride, padding, dilation, groups)
    s_x, s_w = _scales(act_scale, weight_scale, weight.shape[0], input.device)
    way = kernels.route(mult, kernels.resolve(backend, input.device))
    out = _conv2d_quant(x, weight, bias, s_x, s_w, stride, padding, dilation, groups, way.key, way.backend)
    return out.squeeze(0) if unbatched else out


def linear(input: Tensor, weight: Tensor, bias: Optional[Tensor] = None, *, act_scale, weight_scale,
           multiplier: MultiplierLike = "mbm-int8", backend: Optional[str] = None) -> Tensor:
    """``F.linear`` on a quantised integer multiplier: ``act_scale`` per tensor, ``weight_scale`` per output."""
    mult = _integer(multiplier)
    x, w, out_shape = AF.linear_args(input, weight, bias)
    s_x, s_w = _scales(act_scale, weight_scale, w.shape[1], input.device)
    way = kernels.route(mult, kernels.resolve(backend, input.device))
    out = _bmm_nt_quant(x, w, s_x, s_w, way.key, way.backend).reshape(out_shape)
    return out if bias is None else out + bias


# ----------------------------------------------------------------------------- observers and scales


def _observer(method: str, levels, percentile: float = 99.99) -> nn.Module:
    """A PyTorch observer of symmetric scales for the integers ``levels`` (:func:`levels_of`): ``max|x|`` over
    ``(q_max - q_min) / 2`` (``2**n - 1``, or ``2**(n-1) - 1/2`` for two's complement, as PyTorch's int8 does)."""
    lo, hi = levels_of(levels)
    kw = dict(dtype=torch.qint32, qscheme=torch.per_tensor_symmetric, quant_min=lo, quant_max=hi)
    if method == "moving":
        return tq.MovingAverageMinMaxObserver(**kw)
    if method == "minmax":
        return tq.MinMaxObserver(**kw)
    if method == "histogram":
        obs = tq.HistogramObserver(**kw)
        obs.dst_nbins = hi - lo + 1  # its L2 search assumes 2^32 levels for qint32; we have these
        return obs
    return _PercentileObserver(percentile, **kw)


class _PercentileObserver(tq.HistogramObserver):
    """A histogram of |x| (PyTorch's HistogramObserver); the scale maps its ``percentile``-th percentile,
    read off the histogram at bin resolution (2048 bins over the observed range), to the top level."""

    def __init__(self, percentile: float, **kw):
        super().__init__(**kw)
        self.percentile = percentile

    def forward(self, x: Tensor) -> Tensor:
        super().forward(x.abs())
        return x

    def calculate_qparams(self):
        cdf = self.histogram.cumsum(0) / self.histogram.sum()  # (bins,)
        top = int(torch.searchsorted(cdf, torch.tensor([self.percentile / 100], device=cdf.device)))
        edge = self.min_val + (min(top, self.bins - 1) + 1) * (self.max_val - self.min_val) / self.bins
        return self._calculate_qparams(torch.zeros_like(edge), edge)


def weight_scale_of(weight: Tensor, levels) -> Tensor:
    """Per-output-channel symmetric scales (O,) of ``weight`` for the integers ``levels`` (:func:`levels_of`),
    from PyTorch's PerChannelMinMaxObserver."""
    lo, hi = levels_of(levels)
    obs = tq.PerChannelMinMaxObserver(ch_axis=0, dtype=torch.qint32, qscheme=torch.per_channel_symmetric,
                                      quant_min=lo, quant_max=hi).to(weight.device)
    obs(weight.detach().float())
    return obs.calculate_qparams()[0].float()


def _saw_data(obs: nn.Module) -> bool:
    return bool(torch.isfinite(obs.min_val).all() and torch.isfinite(obs.max_val).all())


def _forgive_float_state(module: "Quantiser", incompatible) -> None:
    """Load-state-dict post hook: a state dict without quantiser entries (a float layer's) loads cleanly."""
    prefix = module._float_state_prefix
    if prefix is not None:
        incompatible.missing_keys[:] = [k for k in incompatible.missing_keys if not k.startswith(prefix)]
        module._float_state_prefix = None


class Quantiser(nn.Module):
    """The scales of one quantised layer (buffers ``weight_scale`` (O,), ``act_scale`` ()) and how they are set.

    A scale fixed by the :class:`QuantSpec` never changes.  The others are
    *observed*: after :func:`calibrate` they are frozen; before it, each
    training-mode forward sets the weight scales from the weights' own range and
    moves the activation scale with PyTorch's MovingAverageMinMaxObserver, and
    eval mode uses the last ones.  The layers call :meth:`conv2d` / :meth:`linear`.
    """

    def __init__(self, out_channels: int, multiplier: MultiplierLike, spec: Optional[QuantSpec] = None, device=None):
        super().__init__()
        self.spec = spec = spec or QuantSpec()
        self.levels = _integer(multiplier).q_range
        self.register_buffer("weight_scale", torch.full((out_channels,), spec.weight_scale or 0.0, device=device))
        self.register_buffer("act_scale", torch.tensor(spec.act_scale or 0.0, device=device))
        moving = None if spec.act_scale else _observer("moving", self.levels)
        self.act_observer = None if moving is None else moving.to(self.act_scale.device)
        self.calibrated = False
        self.ready = bool(spec.weight_scale and spec.act_scale)
        self._calibrating: list = []  # the observer calibrate() feeds, held outside the module tree
        self._float_state_prefix = None
        self.register_load_state_dict_post_hook(_forgive_float_state)

    @property
    def observed(self) -> bool:
        """Whether any scale comes from observed ranges (is not fixed by the spec)."""
        return not (self.spec.weight_scale and self.spec.act_scale)

    def scales(self, x: Tensor, w: Tensor) -> Optional[tuple[Tensor, Tensor]]:
        """(act_scale, weight_scale) for this forward, observing first as the mode says; None while calibrating."""
        if self._calibrating:
            self._calibrating[0](x.detach().float())
            self._set_weight_scale(w)
            return None
        if self.training and not self.calibrated:
            self._track(x, w)
        elif not self.ready and x.device.type != "meta":
            raise RuntimeError("this quantised layer has no scales yet: run mbmlib.calibrate(model, batches), "
                               "train it (scales follow the observed ranges in train mode), or fix them with "
                               "quant=mbmlib.QuantSpec(weight_scale=..., act_scale=...)")
        return self.act_scale, self.weight_scale

    @torch.no_grad()
    def _set_weight_scale(self, w: Tensor) -> None:
        if not self.spec.weight_scale:
            self.weight_scale.copy_(weight_scale_of(w, self.levels))

    @torch.no_grad()
    def _track(self, x: Tensor, w: Tensor) -> None:
        self._set_weight_scale(w)
        if self.act_observer is not None:
            self.act_observer(x.detach().float())
            self.act_scale.copy_(self.act_observer.calculate_qparams()[0].reshape(()))
        self.ready = True

    def start_calibration(self, method: str, percentile: float) -> None:
        """Observe the activations with a fresh observer of ``method`` until :meth:`finish_calibration`."""
        self._calibrating = [_observer(method, self.levels, percentile).to(self.act_scale.device)]

    def calibration_saw_data(self) -> bool:
        return _saw_data(self._calibrating[0])

    def finish_calibration(self) -> None:
        """Freeze the scales calibration observed (the weight scales are set on every calibration forward)."""
        if not self.spec.act_scale:
            self.act_scale.copy_(self._calibrating[0].calculate_qparams()[0].reshape(()))
        self.calibrated = self.ready = True

    def conv2d(self, input, weight, bias, stride, padding, dilation, groups, *, multiplier, backend) -> Tensor:
        scales = self.scales(input, weight)
        if scales is None:  # calibrating: the float layer's output
            return F.conv2d(input, weight, bias, stride, padding, dilation, groups)
        return conv2d(input, weight, bias, stride, padding, dilation, groups, act_scale=scales[0],
                      weight_scale=scales[1], multiplier=multiplier, backend=backend)

    def linear(self, input, weight, bias, *, multiplier, backend) -> Tensor:
        scales = self.scales(input, weight)
        if scales is None:
            return F.linear(input, weight, bias)
        return linear(input, weight, bias, act_scale=scales[0], weight_scale=scales[1], multiplier=multiplier,
                      backend=backend)

    def get_extra_state(self) -> dict:
        return {"calibrated": self.calibrated, "ready": self.ready}

    def set_extra_state(self, state: dict) -> None:
        self.calibrated, self.ready = bool(state["calibrated"]), bool(state["ready"])

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        if not any(key.startswith(prefix) for key in state_dict):
            self._float_state_prefix = prefix  # a float layer's state: keep these scales, report nothing missing
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def extra_repr(self) -> str:
        mode = "fixed" if not self.observed else "calibrated" if self.calibrated else "tracking"
        return f"levels={self.levels[0]}..{self.levels[1]}, scales={mode}, spec={self.spec}"


def quantiser_for(layer: nn.Module, multiplier: Multiplier, backward: str,
                  spec: Optional[QuantSpec]) -> Optional[Quantiser]:
    """The quantiser an approximate layer needs for ``multiplier``: None for float multipliers.

    Reconverting a quantised layer to a multiplier with the same integer range without a
    new ``spec`` keeps its quantiser (and so its calibrated scales).
    """
    if not multiplier.is_integer:
        if spec is not None:
            raise ValueError(f"quant=... is for integer multipliers such as 'mbm-int8'; {multiplier.name!r} is a "
                             "float multiplier and needs no scales")
        return None
    if backward != "exact":
        raise ValueError(f"backward={backward!r} is not supported with the integer multiplier {multiplier.name!r}: "
                         "quantised layers train with straight-through gradients, use backward='exact'")
    if spec is not None and not isinstance(spec, QuantSpec):
        raise TypeError(f"quant must be a mbmlib.QuantSpec or None, got {type(spec).__name__}")
    old = getattr(layer, "quantiser", None)
    if spec is None and old is not None and old.levels == multiplier.q_range:
        return old
    return Quantiser(layer.weight.shape[0], multiplier, spec, device=layer.weight.device)


def _inputs(batches: Iterable) -> Iterable[Tensor]:
    for batch in batches:
        yield batch[0] if isinstance(batch, (tuple, list)) else batch


@torch.no_grad()
def calibrate(model: nn.Module, batches: Iterable, method: str = "minmax", percentile: float = 99.99) -> nn.Module:
    """Set the observed scales of every quantised layer of ``model`` from ``batches``, then freeze them.

    ``batches`` yields inputs (or ``(input, target, ...)`` tuples) already on the
    model's device; the model runs them in eval mode with float layers, as PyTorch's
    post-training calibration does.  Activations per tensor with ``method``:
    ``"minmax"`` (MinMaxObserver), ``"histogram"`` (HistogramObserver's L2 search)
    or ``"percentile"`` (the ``percentile``-th percentile of |x|, from a
    HistogramObserver of |x|); weights per channel from their range
    (PerChannelMinMaxObserver).  Fixed :class:`QuantSpec` scales stay.  Returns ``model``.
    """
    if method not in CALIBRATION_METHODS:
        raise ValueError(f"unknown calibration method {method!r}; valid methods are {', '.join(CALIBRATION_METHODS)}")
    if not 0 < percentile <= 100:
        raise ValueError(f"percentile must be in (0, 100], got {percentile}")
    layers = [(name, q) for name, q in model.named_modules() if isinstance(q, Quantiser) and q.observed]
    if not layers:
        raise ValueError("calibrate() found no quantised layer with observed scales: build the layers with an "
                         "integer multiplier (multiplier='mbm-int8') and without fixed QuantSpec scales")
    was_training = model.training
    model.eval()
    try:
        for _, q in layers:
            q.start_calibration(method, percentile)
        count = 0
        for x in _inputs(batches):
            model(x)
            count += 1
        blind = [name for name, q in layers if not q.calibration_saw_data()]
        if count == 0 or blind:
            raise ValueError(f"calibrate() got {count} batches and layers {blind} saw no data; give it at least "
                             "one batch that reaches every quantised layer")
        for _, q in layers:
            q.finish_calibration()
    finally:
        for _, q in layers:
            q._calibrating = []
        model.train(was_training)
    return model
