"""Drop-in approximate Conv2d and Linear layers: MBMConv2d, MBMLinear, and what every approximate layer holds.

They subclass ``nn.Conv2d`` / ``nn.Linear`` -- same constructor arguments,
parameter names and initialisation, so state dicts load both ways -- and only
replace the forward computation with :mod:`mbmlib.functional`.  With an integer
multiplier they are quantised layers (:mod:`mbmlib.quant`): their state dicts add
``quantiser.*`` scale entries, which a float layer loads with ``strict=False``, and
they load a float layer's state dict as it is.
"""
from __future__ import annotations

from typing import Optional

from torch import Tensor, nn
from torch.nn.utils import parametrize

from . import functional as AF
from .multipliers import MultiplierLike, as_multiplier
from .quant import QuantSpec, Quantiser, quantiser_for

__all__ = ["ApproxLayer", "MBMConv2d", "MBMLinear", "make_approx"]


class ApproxLayer:
    """What every approximate layer holds: its multiplier, backward mode, backend and (integer multipliers) its
    quantiser.  ``isinstance(module, ApproxLayer)`` tells the approximate layers of a model."""

    def _init_approx(self, multiplier: MultiplierLike, backward: str, backend: Optional[str],
                     quant: Optional[QuantSpec] = None) -> None:
        self.multiplier = as_multiplier(multiplier)
        self.backward = AF.check_backward(backward)
        self.backend = backend
        self.quantiser = quantiser_for(self, self.multiplier, backward, quant)

    def new_quantiser(self, multiplier, spec: Optional[QuantSpec]) -> Quantiser:
        """A fresh quantiser for this layer's weights (per output channel) and input."""
        return Quantiser(self.weight.shape[0], multiplier, spec, device=self.weight.device)

    def _approx_repr(self) -> str:
        extra = f"multiplier={self.multiplier.name}, backward={self.backward}"
        return extra + (f", backend={self.backend}" if self.backend else "")


class MBMConv2d(ApproxLayer, nn.Conv2d):
    """``nn.Conv2d`` whose every product uses ``multiplier`` (default MBM).

    An integer multiplier (``"mbm-int8"``, a table) makes it a quantised layer
    (:mod:`mbmlib.quant`): ``quant`` may fix its scales, else they are observed.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size, stride=1, padding=0, dilation=1,
                 groups: int = 1, bias: bool = True, padding_mode: str = "zeros", device=None, dtype=None, *,
                 multiplier: MultiplierLike = "mbm", backward: str = "exact", backend: Optional[str] = None,
                 quant: Optional[QuantSpec] = None):
        super().__init__(in_channels, out_channels, kernel_size, stride, padding, dilation, groups, bias,
                         padding_mode, device, dtype)
        self._init_approx(multiplier, backward, backend, quant)

    def _conv_forward(self, input: Tensor, weight: Tensor, bias: Optional[Tensor]) -> Tensor:
        padding = self.padding
        if self.padding_mode != "zeros":  # pad explicitly as nn.Conv2d does, then convolve unpadded
            input = nn.functional.pad(input, self._reversed_padding_repeated_twice, mode=self.padding_mode)
            padding = (0, 0)
        args = (input, weight, bias, self.stride, padding, self.dilation, self.groups)
        if self.quantiser is not None:
            return self.quantiser.conv2d(*args, multiplier=self.multiplier, backend=self.backend)
        return AF.conv2d(*args, multiplier=self.multiplier, backward=self.backward, backend=self.backend)

    def extra_repr(self) -> str:
        return super().extra_repr() + ", " + self._approx_repr()


class MBMLinear(ApproxLayer, nn.Linear):
    """``nn.Linear`` whose every product uses ``multiplier`` (default MBM); quantised as MBMConv2d is."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True, device=None, dtype=None, *,
                 multiplier: MultiplierLike = "mbm", backward: str = "exact", backend: Optional[str] = None,
                 quant: Optional[QuantSpec] = None):
        super().__init__(in_features, out_features, bias, device, dtype)
        self._init_approx(multiplier, backward, backend, quant)

    def forward(self, input: Tensor) -> Tensor:
        if self.quantiser is not None:
            return self.quantiser.linear(input, self.weight, self.bias, multiplier=self.multiplier,
                                         backend=self.backend)
        return AF.linear(input, self.weight, self.bias, multiplier=self.multiplier, backward=self.backward,
                         backend=self.backend)

    def extra_repr(self) -> str:
        return super().extra_repr() + ", " + self._approx_repr()


def make_approx(layer: nn.Module, opts: dict) -> None:
    """Turn one Conv2d/Linear into its approximate twin in place: same object, parameters, hooks, mode."""
    if parametrize.is_parametrized(layer):
        raise TypeError(f"convert() cannot convert a parametrized {type(layer).__name__}; call "
                        "torch.nn.utils.parametrize.remove_parametrizations on it first")
    twin = MBMConv2d if isinstance(layer, nn.Conv2d) else MBMLinear
    if not isinstance(layer, twin):
        layer.__class__ = twin  # the twins add no parameters, only the attributes _init_approx sets
    layer._init_approx(**opts)
