"""Drop-in approximate layers: MBMConv2d, MBMLinear, and ``convert(model)``.

They subclass ``nn.Conv2d`` / ``nn.Linear`` -- same constructor arguments,
parameter names and initialisation, so state dicts load both ways -- and only
replace the forward computation with :mod:`mbmlib.functional`.
"""
from __future__ import annotations

import copy
from typing import Optional

from torch import Tensor, nn

from . import functional as AF
from .multipliers import MultiplierLike, as_multiplier

__all__ = ["MBMConv2d", "MBMLinear", "convert"]


class _ApproxMixin:
    """Holds the multiplier, backward mode and backend of an approximate layer."""

    def _init_approx(self, multiplier: MultiplierLike, backward: str, backend: Optional[str]) -> None:
        self.multiplier = as_multiplier(multiplier)
        self.backward = AF.check_backward(backward)
        self.backend = backend

    def _approx_repr(self) -> str:
        extra = f"multiplier={self.multiplier.name}, backward={self.backward}"
        return extra + (f", backend={self.backend}" if self.backend else "")


class MBMConv2d(_ApproxMixin, nn.Conv2d):
    """``nn.Conv2d`` whose every product uses ``multiplier`` (default MBM)."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size, stride=1, padding=0, dilation=1,
                 groups: int = 1, bias: bool = True, padding_mode: str = "zeros", device=None, dtype=None, *,
                 multiplier: MultiplierLike = "mbm", backward: str = "exact", backend: Optional[str] = None):
        super().__init__(in_channels, out_channels, kernel_size, stride, padding, dilation, groups, bias,
                         padding_mode, device, dtype)
        self._init_approx(multiplier, backward, backend)

    def _conv_forward(self, input: Tensor, weight: Tensor, bias: Optional[Tensor]) -> Tensor:
        opts = dict(multiplier=self.multiplier, backward=self.backward, backend=self.backend)
        if self.padding_mode != "zeros":  # pad explicitly as nn.Conv2d does, then convolve unpadded
            input = nn.functional.pad(input, self._reversed_padding_repeated_twice, mode=self.padding_mode)
            return AF.conv2d(input, weight, bias, self.stride, (0, 0), self.dilation, self.groups, **opts)
        return AF.conv2d(input, weight, bias, self.stride, self.padding, self.dilation, self.groups, **opts)

    def extra_repr(self) -> str:
        return super().extra_repr() + ", " + self._approx_repr()


class MBMLinear(_ApproxMixin, nn.Linear):
    """``nn.Linear`` whose every product uses ``multiplier`` (default MBM)."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True, device=None, dtype=None, *,
                 multiplier: MultiplierLike = "mbm", backward: str = "exact", backend: Optional[str] = None):
        super().__init__(in_features, out_features, bias, device, dtype)
        self._init_approx(multiplier, backward, backend)

    def forward(self, input: Tensor) -> Tensor:
        return AF.linear(input, self.weight, self.bias, multiplier=self.multiplier, backward=self.backward,
                         backend=self.backend)

    def extra_repr(self) -> str:
        return super().extra_repr() + ", " + self._approx_repr()


def _convert_layer(layer: nn.Module, opts: dict) -> nn.Module:
    """An approximate twin of one Conv2d/Linear layer, sharing nothing, holding the same weights."""
    if isinstance(layer, nn.Conv2d):
        new = MBMConv2d(layer.in_channels, layer.out_channels, layer.kernel_size, layer.stride, layer.padding,
                        layer.dilation, layer.groups, layer.bias is not None, layer.padding_mode,
                        layer.weight.device, layer.weight.dtype, **opts)
    elif isinstance(layer, nn.Linear):
        new = MBMLinear(layer.in_features, layer.out_features, layer.bias is not None, layer.weight.device,
                        layer.weight.dtype, **opts)
    else:
        raise TypeError(f"convert() can replace nn.Conv2d and nn.Linear layers, not {type(layer).__name__}")
    new.load_state_dict(layer.state_dict())
    new.train(layer.training)
    return new


def convert(model: nn.Module, multiplier: MultiplierLike = "mbm", backward: str = "exact",
            layers=(nn.Conv2d, nn.Linear), inplace: bool = False, backend: Optional[str] = None) -> nn.Module:
    """Swap every layer of the types in ``layers`` for its approximate twin, keeping the weights.

    Already-approximate layers get the new multiplier/backward.  Returns the
    converted model (a deep copy unless ``inplace``).
    """
    opts = dict(multiplier=as_multiplier(multiplier), backward=AF.check_backward(backward), backend=backend)
    layers = tuple(layers)
    for kind in layers:
        if kind not in (nn.Conv2d, nn.Linear, MBMConv2d, MBMLinear):
            raise TypeError(f"convert() can replace nn.Conv2d and nn.Linear layers, not {kind.__name__}")
    if not inplace:
        model = copy.deepcopy(model)
    if isinstance(model, layers):
        return _convert_layer(model, opts)
    for parent in list(model.modules()):
        for child_name, child in list(parent.named_children()):
            if isinstance(child, layers):
                setattr(parent, child_name, _convert_layer(child, opts))
    return model

