"""Quantised conv2d / linear / matmul on integer and table multipliers (SPEC sections 4 and 8).

Real tensors go onto an n-bit sign-magnitude multiplier: ``q = clamp(round(x / s),
-(2^n - 1), 2^n - 1)``, or ``[-2^(n-1), 2^(n-1) - 1]`` for a signed table (two's-complement
hardware, SPEC section 6); weights per output channel, activations per tensor; the
output is ``s_x * s_w[o] * sum(sign * P(|q_x|, |q_w|))`` with the integer sum exact
(float64 from the kernels), scaled in float64, rounded once to the input's dtype,
then the bias added exactly.  Gradients are straight-through: those of the float
layer with the float weights (quantisation-aware training).  The integer sums
come from the backend's ``bmm_nt_int`` / ``conv2d_int`` (C++ on the CPU, Triton on CUDA),
which :func:`mbmlib.kernels.route` picks per design; on the CPU the C++ kernel takes float32 activations
itself (``conv2d_quant`` / ``bmm_nt_quant``: quantised in its operand pass, the scaled sums stored with the
same rounding), so no integer tensor is made per call.

A matmul of two activations (attention's Q K^T and P V, :func:`matmul`) quantises both
operands per tensor, with straight-through gradients to both.

Scales are given (:class:`QuantSpec`, :class:`MatmulQuantSpec`), calibrated (:func:`calibrate`,
with PyTorch's own observers) or, when neither, follow the observed ranges while the
layer trains and stay frozen in eval mode (:class:`Quantiser`, :class:`MatmulQuantiser`).
"""
from __future__ import annotations

import dataclasses
import math
from typing import Iterable, List, Optional, Sequence, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.ao.quantization import observer as tq

from . import functional as AF
from . import kernels
from .kernels.prepared import prepared
from .multipliers import Multiplier, MultiplierLike, as_multiplier

__all__ = ["QuantSpec", "MatmulQuantSpec", "PROJECT_SCALES", "CALIBRATION_METHODS", "Quantiser", "MatmulQuantiser",
           "calibrate", "conv2d", "linear", "matmul", "quantise", "levels_of", "weight_scale_of", "split_quant"]

CALIBRATION_METHODS = ("minmax", "histogram", "percentile")


@dataclasses.dataclass(frozen=True)
class QuantSpec:
    """Fixed scales of a quantised layer; a scale left None comes from observed ranges.

    ``weight_scale`` applies to every output channel, ``act_scale`` to the input.
    """

    weight_scale: Optional[float] = None
    act_scale: Optional[float] = None

    def __post_init__(self):
        _check_fixed_scales(self)


@dataclasses.dataclass(frozen=True)
class MatmulQuantSpec:
    """Fixed per-tensor scales of a quantised ``a @ b`` of two activations; a scale left None is observed."""

    a_scale: Optional[float] = None
    b_scale: Optional[float] = None

    def __post_init__(self):
        _check_fixed_scales(self)


def _check_fixed_scales(spec) -> None:
    for field in dataclasses.fields(spec):
        value = getattr(spec, field.name)
        if value is not None and not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
            raise ValueError(f"{type(spec).__name__}.{field.name} must be a positive finite number or None, got "
                             f"{value!r}")


def split_quant(quant) -> tuple[Optional[QuantSpec], Optional[MatmulQuantSpec]]:
    """``(layer spec, matmul spec)`` of a ``quant`` argument: a :class:`QuantSpec` (layers with weights), a
    :class:`MatmulQuantSpec` (matmuls of two activations), a tuple of one of each, or None."""
    specs = [s for s in (quant if isinstance(quant, (tuple, list)) else (quant,)) if s is not None]
    layer = [s for s in specs if isinstance(s, QuantSpec)]
    matmul_ = [s for s in specs if isinstance(s, MatmulQuantSpec)]
    if len(layer) > 1 or len(matmul_) > 1 or len(layer) + len(matmul_) != len(specs):
        raise TypeError(f"quant must be a mbmlib.QuantSpec (layers with weights), a mbmlib.MatmulQuantSpec (matmuls "
                        f"of two activations), a tuple of one of each, or None; got {quant!r}")
    return (layer[0] if layer else None), (matmul_[0] if matmul_ else None)


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


def _quantise_rows(w: Tensor, scale: Tensor, mult: Multiplier) -> tuple[Tensor, Tensor]:
    """(quantised ``w`` contiguous, which rows of dim 1 (a matmul's B: dim 0 of a conv weight) hold a NaN/inf)."""
    if w.dim() == 4:  # a conv weight (O, C/groups, kh, kw): one scale per output channel
        return quantise(w, scale.view(-1, 1, 1, 1), mult).contiguous(), ~torch.isfinite(w).flatten(1).all(1)
    return quantise(w, scale.view(1, -1, 1), mult).contiguous(), ~torch.isfinite(w).all(-1)  # (G, N, K)


def _quantised_weight(w: Tensor, scale: Tensor, mult: Multiplier) -> tuple[Tensor, Tensor]:
    """:func:`_quantise_rows` once per version of the weight and its scales (:mod:`mbmlib.kernels.prepared`):
    the same quantised tensor each call, so the kernels' packing of it is kept too."""
    return prepared((w, scale), ("quantised", mult), lambda: _quantise_rows(w, scale, mult))



@torch.library.custom_op("mbmlib::conv2d_quant", mutates_args=())
def _conv2d_quant(x: Tensor, w: Tensor, bias: Optional[Tensor], x_scale: Tensor, w_scale: Tensor,
                  stride: List[int], padding: List[int], dilation: List[int], groups: int, multiplier: str,
                  backend: str) -> Tensor:
    """Quantised convolution: integer sums (B, O, Ho, Wo) from the backend, scaled, plus the exact bias."""
    mult = as_multiplier(multiplier)
    if kernels.quantises_in_kernel(backend, mult, x, w):  # quantised in the kernel's operand passes, sums scaled there
        out, bad_x, qw = kernels.load(backend).conv2d_quant(x, x_scale, w, w_scale, stride, padding, dilation, groups,
                                                            mult)
        bad_w, inputs_bad, weights_bad = qw.bad_rows, bad_x > 0, qw.any_bad  # (O,); both counted in the kernel
    else:
        qw, bad_w = _quantised_weight(w, w_scale, mult)  # (O, C/groups, kh, kw), (O,)
        qx = quantise(x, x_scale, mult)  # (B, C, H, W)
        sums = kernels.conv2d_int(backend, qx.contiguous(), qw, stride, padding, dilation, groups, mult,
                                  ranged=True)  # (B, O, Ho, Wo) float64
        out = (sums * (x_scale.double() * w_scale.double()).view(1, -1, 1, 1)).to(x.dtype)
        inputs_bad = weights_bad = True  # not asked: that would synchronise with the device
    reached = bad_w.view(1, -1, 1, 1)  # a non-finite weight: its channel
    if inputs_bad:  # which outputs a NaN/inf input reaches, exactly
        bad = (~torch.isfinite(x)).to(x.dtype)
        reached = reached | (F.conv2d(bad, torch.ones_like(w), None, stride, padding, dilation, groups) > 0)
    if inputs_bad or weights_bad:  # some output may need a NaN
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
    if kernels.quantises_in_kernel(backend, mult, a, b):  # quantised in the kernel's operand passes, sums scaled there
        out, bad_a, qb = kernels.load(backend).bmm_nt_quant(a, a_scale, b, b_scale, mult)
        bad_b, inputs_bad, weights_bad = qb.bad_rows, bad_a > 0, qb.any_bad  # (G, N); both counted in the kernel
    else:
        qb, bad_b = _quantised_weight(b, b_scale, mult)  # (G, N, K), (G, N)
        qa = quantise(a, a_scale, mult)  # (G, M, K)
        sums = kernels.load(backend).bmm_nt_int(qa.contiguous(), qb, mult, ranged=True)  # (G, M, N) float64
        out = (sums * (a_scale.double() * b_scale.double())).to(a.dtype)
        inputs_bad = weights_bad = True  # not asked: that would synchronise with the device
    reached = bad_b[:, None, :]
    if inputs_bad:
        reached = reached | ~torch.isfinite(a).all(-1)[:, :, None]
    return _nan_where(out, reached) if inputs_bad or weights_bad else out


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


def _one_scale(value, name: str, device) -> Tensor:
    scale = torch.as_tensor(value, dtype=torch.float32, device=device)
    if scale.numel() != 1:
        raise ValueError(f"{name} must be one number (a per-tensor scale), got {scale.numel()} values")
    return scale.reshape(())


def matmul(a: Tensor, b: Tensor, *, a_scale, b_scale, multiplier: MultiplierLike = "mbm-int8",
           backend: Optional[str] = None) -> Tensor:
    """``torch.matmul`` (its broadcasting, shapes and errors) of two activations on a quantised integer
    multiplier, each operand with one scale; straight-through gradients to both operands, and a NaN or inf
    operand makes every output it feeds NaN."""
    mult = _integer(multiplier)
    a3, b3, out_shape = AF.matmul_args(a, b)  # (G, M, K), (G, N, K)
    s_a, s_b = _one_scale(a_scale, "a_scale", a.device), _one_scale(b_scale, "b_scale", a.device)
    way = kernels.route(mult, kernels.resolve(backend, a.device))
    return _bmm_nt_quant(a3, b3, s_a, s_b.expand(b3.shape[1]).contiguous(), way.key, way.backend).reshape(out_shape)


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


def _forgive_float_state(module: "_Scales", incompatible) -> None:
    """Load-state-dict post hook: a state dict without quantiser entries (a float layer's) loads cleanly."""
    prefix = module._float_state_prefix
    if prefix is not None:
        incompatible.missing_keys[:] = [k for k in incompatible.missing_keys if not k.startswith(prefix)]
        module._float_state_prefix = None


Operand = Union[Tensor, Sequence[Tensor]]


def _joined(x: Operand) -> Tensor:
    """An operand for an observer: a tensor as it is, several (an attention's query, key, value) as the values of
    the distinct ones, so that one scale covers them all."""
    if isinstance(x, Tensor):
        return x.detach().float()
    distinct = list({id(t): t for t in x}.values())
    if len(distinct) == 1:
        return distinct[0].detach().float()
    return torch.cat([t.detach().float().flatten() for t in distinct])


def _joined_device(operands: dict) -> str:
    """The device type of the first operand (a tensor or a list of tensors)."""
    first = next(iter(operands.values()))
    return (first if isinstance(first, Tensor) else first[0]).device.type


class _Scales(nn.Module):
    """Per-tensor scales of activation operands (buffers ``<name>_scale``), each fixed or observed.

    A fixed scale never changes.  Observed ones are frozen after :func:`calibrate`; before it, each
    training-mode forward moves them with PyTorch's MovingAverageMinMaxObserver (``<name>_observer``),
    and eval mode uses the last ones.  :class:`Quantiser` has one operand (``act``) and per-channel weight
    scales, :class:`MatmulQuantiser` two operands (``a``, ``b``).
    """

    _fix_hint = ""  # how to fix the scales, for the error of an unready quantiser

    def _init_scales(self, multiplier: MultiplierLike, fixed: dict, device) -> None:
        self.levels = _integer(multiplier).q_range
        self._fixed = fixed
        for name, value in fixed.items():
            self.register_buffer(f"{name}_scale", torch.tensor(value or 0.0, device=device))
        for name, value in fixed.items():
            setattr(self, f"{name}_observer", None if value else _observer("moving", self.levels).to(device))
        self.calibrated = False
        self._calibrating: dict = {}  # the observers calibrate() feeds, held outside the module tree
        self._float_state_prefix = None
        self.register_load_state_dict_post_hook(_forgive_float_state)

    @property
    def observed(self) -> bool:
        """Whether any scale comes from observed ranges (is not fixed by the spec)."""
        return not all(self._fixed.values())

    def _observe(self, operands: dict) -> bool:
        """Feed each operand to the observer the mode asks for; True while calibrating (the caller then
        computes in float), else the scales are checked to be ready."""
        if self._calibrating:
            for name, x in operands.items():
                self._calibrating[name](_joined(x))
            return True
        if self.training and not self.calibrated:
            self._track(operands)
        elif not self.ready and _joined_device(operands) != "meta":
            raise RuntimeError("this quantised layer has no scales yet: run mbmlib.calibrate(model, batches), "
                               "train it (scales follow the observed ranges in train mode), or fix them with "
                               f"{self._fix_hint}")
        return False

    @torch.no_grad()
    def _track(self, operands: dict) -> None:
        for name, x in operands.items():
            observer = getattr(self, f"{name}_observer")
            if observer is not None:
                observer(_joined(x))
                getattr(self, f"{name}_scale").copy_(observer.calculate_qparams()[0].reshape(()))
        self.ready = True

    def start_calibration(self, method: str, percentile: float) -> None:
        """Observe the operands with fresh observers of ``method`` until :meth:`finish_calibration`."""
        self._calibrating = {name: _observer(method, self.levels, percentile).to(getattr(self, f"{name}_scale").device)
                             for name in self._fixed}

    def calibration_saw_data(self) -> bool:
        return all(_saw_data(obs) for obs in self._calibrating.values())

    def finish_calibration(self) -> None:
        """Freeze the scales calibration observed."""
        for name, obs in self._calibrating.items():
            if not self._fixed[name]:
                getattr(self, f"{name}_scale").copy_(obs.calculate_qparams()[0].reshape(()))
        self.calibrated = self.ready = True

    def stop_calibration(self) -> None:
        self._calibrating = {}

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


def _spec(spec, kind: type):
    if spec is not None and not isinstance(spec, kind):
        raise TypeError(f"quant must be a mbmlib.{kind.__name__} or None, got {type(spec).__name__}")
    return spec or kind()


class Quantiser(_Scales):
    """The scales of one quantised layer (buffers ``weight_scale`` (O,), ``act_scale`` ()) and how they are set.

    A scale fixed by the :class:`QuantSpec` never changes.  The others are
    *observed*: after :func:`calibrate` they are frozen; before it, each
    training-mode forward sets the weight scales from the weights' own range and
    moves the activation scale with PyTorch's MovingAverageMinMaxObserver, and
    eval mode uses the last ones.  The layers call :meth:`conv2d` / :meth:`linear`
    (:meth:`linears`: several inputs and weights sharing the channels, an attention's in-projection).
    """

    _fix_hint = "quant=mbmlib.QuantSpec(weight_scale=..., act_scale=...)"

    def __init__(self, out_channels: int, multiplier: MultiplierLike, spec: Optional[QuantSpec] = None, device=None):
        super().__init__()
        self.spec = spec = _spec(spec, QuantSpec)
        self.register_buffer("weight_scale", torch.full((out_channels,), spec.weight_scale or 0.0, device=device))
        self._init_scales(multiplier, {"act": spec.act_scale}, device)
        self.ready = bool(spec.weight_scale and spec.act_scale)

    @property
    def observed(self) -> bool:
        """Whether any scale comes from observed ranges (is not fixed by the spec)."""
        return not (self.spec.weight_scale and self.spec.act_scale)

    def scales(self, x: Operand, w: Operand) -> Optional[tuple[Tensor, Tensor]]:
        """(act_scale, weight_scale) for this forward, observing first as the mode says; None while calibrating.

        ``x`` and ``w`` may be lists (inputs sharing the one activation scale, weights whose rows are the channels
        in order)."""
        tracking = self.training and not self.calibrated
        calibrating = self._observe({"act": x})
        if calibrating or tracking:
            self._set_weight_scale(w)
        return None if calibrating else (self.act_scale, self.weight_scale)

    @torch.no_grad()
    def _set_weight_scale(self, w: Operand) -> None:
        if not self.spec.weight_scale:
            weights = [w] if isinstance(w, Tensor) else w
            self.weight_scale.copy_(torch.cat([weight_scale_of(t, self.levels) for t in weights]))

    def conv2d(self, input, weight, bias, stride, padding, dilation, groups, *, multiplier, backend) -> Tensor:
        scales = self.scales(input, weight)
        if scales is None:  # calibrating: the float layer's output
            return F.conv2d(input, weight, bias, stride, padding, dilation, groups)
        return conv2d(input, weight, bias, stride, padding, dilation, groups, act_scale=scales[0],
                      weight_scale=scales[1], multiplier=multiplier, backend=backend)

    def linears(self, jobs: Sequence[tuple], *, multiplier, backend) -> list[Tensor]:
        """``F.linear(input, weight, bias)`` of each job, quantised with one activation scale over the inputs and
        the weights' rows taking this quantiser's channels in order."""
        scales = self.scales([x for x, _, _ in jobs], [w for _, w, _ in jobs])
        if scales is None:  # calibrating: the float layer's outputs
            return [F.linear(x, w, b) for x, w, b in jobs]
        channel_scales = scales[1].split([w.shape[0] for _, w, _ in jobs])
        return [linear(x, w, b, act_scale=scales[0], weight_scale=s_w, multiplier=multiplier, backend=backend)
                for (x, w, b), s_w in zip(jobs, channel_scales)]

    def linear(self, input, weight, bias, *, multiplier, backend) -> Tensor:
        return self.linears([(input, weight, bias)], multiplier=multiplier, backend=backend)[0]


class MatmulQuantiser(_Scales):
    """The per-tensor scales of a quantised ``a @ b`` of two activations (buffers ``a_scale``, ``b_scale``), fixed
    by a :class:`MatmulQuantSpec` or observed as :class:`Quantiser`'s activation scale is."""

    _fix_hint = "quant=mbmlib.MatmulQuantSpec(a_scale=..., b_scale=...)"

    def __init__(self, multiplier: MultiplierLike, spec: Optional[MatmulQuantSpec] = None, device=None):
        super().__init__()
        self.spec = spec = _spec(spec, MatmulQuantSpec)
        self._init_scales(multiplier, {"a": spec.a_scale, "b": spec.b_scale}, device)
        self.ready = bool(spec.a_scale and spec.b_scale)

    def matmul(self, a: Tensor, b: Tensor, *, multiplier, backend) -> Tensor:
        if self._observe({"a": a, "b": b}):  # calibrating: the float matmul
            return torch.matmul(a, b)
        return matmul(a, b, a_scale=self.a_scale, b_scale=self.b_scale, multiplier=multiplier, backend=backend)


def quantiser_for(layer: nn.Module, multiplier: Multiplier, backward: str, spec) -> Optional[_Scales]:
    """The quantiser an approximate layer needs for ``multiplier``: None for float multipliers, else
    ``layer.new_quantiser(multiplier, spec)``.

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
    old = getattr(layer, "quantiser", None)
    if spec is None and old is not None and old.levels == multiplier.q_range:
        return old
    return layer.new_quantiser(multiplier, spec)


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
    layers = [(name, q) for name, q in model.named_modules() if isinstance(q, _Scales) and q.observed]
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
            q.stop_calibration()
        model.train(was_training)
    return model
