"""Drop-in approximate layers: MBMConv2d, MBMLinear, and ``convert(model)``.

They subclass ``nn.Conv2d`` / ``nn.Linear`` -- same constructor arguments,
parameter names and initialisation, so state dicts load both ways -- and only
replace the forward computation with :mod:`mbmlib.functional`.  With an integer
multiplier they are quantised layers (:mod:`mbmlib.quant`): their state dicts add
``quantiser.*`` scale entries, which a float layer loads with ``strict=False``, and
they load a float layer's state dict as it is.
"""
from __future__ import annotations

import copy
import fnmatch
import json
import os
import warnings
from pathlib import Path
from typing import Optional

from torch import Tensor, nn
from torch.nn.utils import parametrize

from . import functional as AF
from .multipliers import MultiplierLike, as_multiplier
from .quant import QuantSpec, quantiser_for

__all__ = ["MBMConv2d", "MBMLinear", "convert", "NotConvertedWarning", "UNCONVERTIBLE", "read_multiplier_map",
           "is_multiplier_map_path"]


class _ApproxMixin:
    """Holds the multiplier, backward mode, backend and (integer multipliers) the quantiser of a layer."""

    def _init_approx(self, multiplier: MultiplierLike, backward: str, backend: Optional[str],
                     quant: Optional[QuantSpec] = None) -> None:
        self.multiplier = as_multiplier(multiplier)
        self.backward = AF.check_backward(backward)
        self.backend = backend
        self.quantiser = quantiser_for(self, self.multiplier, backward, quant)

    def _approx_repr(self) -> str:
        extra = f"multiplier={self.multiplier.name}, backward={self.backward}"
        return extra + (f", backend={self.backend}" if self.backend else "")


class MBMConv2d(_ApproxMixin, nn.Conv2d):
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


class MBMLinear(_ApproxMixin, nn.Linear):
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


# Layers that multiply but have no approximate twin: convert() leaves them exact and says so.
UNCONVERTIBLE = (nn.Conv1d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d, nn.Bilinear,
                 nn.MultiheadAttention, nn.RNNBase, nn.RNNCellBase)


class NotConvertedWarning(UserWarning):
    """``convert()`` met layers it has no approximate version of; they stay exact."""


def _walk(module: nn.Module, prefix: str = ""):
    """(name, module) of ``module`` and everything below it, not entering MultiheadAttention.

    MultiheadAttention computes with its ``out_proj`` weights directly
    (``F.multi_head_attention_forward``), so swapping that submodule would change nothing.
    """
    yield prefix, module
    if isinstance(module, nn.MultiheadAttention):
        return
    for attr, child in module.named_children():
        yield from _walk(child, f"{prefix}.{attr}" if prefix else attr)


def _make_approx(layer: nn.Module, opts: dict) -> None:
    """Turn one Conv2d/Linear into its approximate twin in place: same object, parameters, hooks, mode."""
    if parametrize.is_parametrized(layer):
        raise TypeError(f"convert() cannot convert a parametrized {type(layer).__name__}; call "
                        "torch.nn.utils.parametrize.remove_parametrizations on it first")
    twin = MBMConv2d if isinstance(layer, nn.Conv2d) else MBMLinear
    if not isinstance(layer, twin):
        layer.__class__ = twin  # the twins add no parameters, only the attributes _init_approx sets
    layer._init_approx(**opts)


def _chooser(multiplier, names: list[str]):
    """name -> Multiplier (or None: leave the layer as it is) from one multiplier or a {glob: multiplier} dict."""
    if not isinstance(multiplier, dict):
        mult = as_multiplier(multiplier)
        return lambda name: mult
    bad = [p for p in multiplier if not isinstance(p, str)]
    if bad:
        raise TypeError(f"multiplier patterns are strings (glob patterns on module names such as 'features.*'), got "
                        f"{bad[0]!r}")
    table = [(pattern, as_multiplier(m)) for pattern, m in multiplier.items()]
    taken: set[str] = set()
    for pattern, _ in table:
        matched = {name for name in names if fnmatch.fnmatchcase(name, pattern)}
        if not matched:
            raise ValueError(f"multiplier pattern {pattern!r} matches no convertible layer; the layers are "
                             f"{', '.join(repr(n) for n in names) or '(none)'}")
        if matched <= taken:
            warnings.warn(f"mbmlib.convert: multiplier pattern {pattern!r} never applies: every layer it matches is "
                          "taken by an earlier pattern (the first match wins); put it before them", stacklevel=4)
        taken |= matched
    return lambda name: next((m for pattern, m in table if fnmatch.fnmatchcase(name, pattern)), None)


def is_multiplier_map_path(multiplier) -> bool:
    """Whether ``multiplier`` names an assignment file (a path object, or a string ending in ``.json``) rather
    than one multiplier (``table:<file.csv>`` and ``evoapprox:<file.c>`` name their files differently)."""
    return isinstance(multiplier, os.PathLike) or (isinstance(multiplier, str) and multiplier.endswith(".json")
                                                   and not multiplier.startswith(("table:", "evoapprox:")))


def read_multiplier_map(path) -> dict:
    """The ``{layer pattern: multiplier name}`` dict of an assignment file (JSON with a ``"multipliers"`` object,
    as ``python -m mbmlib explore`` writes them); ValueError naming the file if it holds none."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"assignment file {path} does not exist; give a JSON file with a \"multipliers\" "
                                "object of layer patterns to multiplier names (python -m mbmlib explore writes them)")
    try:
        data = json.loads(path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(f"assignment file {path} is not valid JSON ({err}); fix or regenerate it") from None
    table = data.get("multipliers") if isinstance(data, dict) else None
    if not isinstance(table, dict) or not table or not all(isinstance(k, str) and isinstance(v, str)
                                                           for k, v in table.items()):
        raise ValueError(f"assignment file {path} has no \"multipliers\" object of layer patterns to multiplier "
                         "names (e.g. {\"multipliers\": {\"features.0\": \"exact\", \"*\": \"mbm\"}})")
    return dict(table)


def _warn_not_converted(skipped: list[tuple[str, nn.Module]]) -> None:
    if skipped:
        listed = ", ".join(f"{name or '(model)'!r} ({type(m).__name__})" for name, m in skipped)
        warnings.warn(NotConvertedWarning(
            f"convert() left {len(skipped)} layer(s) exact, having no approximate version of them: {listed}"),
            stacklevel=3)


def convert(model: nn.Module, multiplier="mbm", backward: str = "exact", layers=(nn.Conv2d, nn.Linear),
            inplace: bool = False, backend: Optional[str] = None, quant: Optional[QuantSpec] = None) -> nn.Module:
    """Make every layer of the types in ``layers`` approximate, keeping its weights; return the model.

    ``multiplier`` is one multiplier for all, a dict of per-layer choices keyed by
    glob patterns (:func:`fnmatch.fnmatchcase`) on the module names of
    ``model.named_modules()``, e.g. ``{"features.0": "exact", "*": "mbm"}``, or the path of an
    assignment file holding such a dict (:func:`read_multiplier_map`; a ``.json`` name or a path object): the
    first pattern that matches a layer's name, in dict order, wins; a layer no
    pattern matches stays as it is; a pattern that matches no layer is a
    ValueError.  A bare layer's name is ``""``.

    Layers turn into :class:`MBMConv2d` / :class:`MBMLinear` in place (their class
    changes; parameters, hooks and train/eval mode stay), on a deep copy of
    ``model`` unless ``inplace`` -- so ``convert(layer, inplace=True) is layer``.
    Already-approximate layers get the new settings.  Layers that multiply but
    have no approximate version (``UNCONVERTIBLE``: Conv1d/3d, transposed convs,
    Bilinear, MultiheadAttention, RNNs) stay exact and are named in one
    :class:`NotConvertedWarning` (unless every multiplier asked for is "exact"); MultiheadAttention is left whole, its
    ``out_proj`` included, since it never calls that submodule.  Products a model
    computes in its own ``forward`` (``F.linear``, ``torch.matmul``) are not seen.

    An integer multiplier (``"mbm-int8"``) makes quantised layers; ``quant`` (a
    :class:`~mbmlib.QuantSpec`) fixes their scales, else they are observed -- see
    :func:`mbmlib.calibrate`.  With a dict, ``quant`` goes to the integer layers only.
    """
    if is_multiplier_map_path(multiplier):
        multiplier = read_multiplier_map(multiplier)
    opts = dict(backward=AF.check_backward(backward), backend=backend)
    layers = tuple(layers)
    for kind in layers:
        if kind not in (nn.Conv2d, nn.Linear, MBMConv2d, MBMLinear):
            raise TypeError(f"convert() can replace nn.Conv2d and nn.Linear layers, not {kind.__name__}")
    if not inplace:
        model = copy.deepcopy(model)
    found = list(_walk(model))
    targets = [(name, m) for name, m in found if isinstance(m, layers)]
    choose = _chooser(multiplier, [name for name, _ in targets])
    done = set()
    for name, layer in targets:
        mult = choose(name)
        if mult is not None and id(layer) not in done:  # a shared layer takes its first name's multiplier
            layer_quant = quant if mult.is_integer or not isinstance(multiplier, dict) else None
            _make_approx(layer, dict(opts, multiplier=mult, quant=layer_quant))
            done.add(id(layer))
    asked = multiplier.values() if isinstance(multiplier, dict) else [multiplier]
    if any(not as_multiplier(m).is_exact for m in asked):  # asking for exact layers leaves nothing behind
        _warn_not_converted([(name, m) for name, m in found if isinstance(m, UNCONVERTIBLE)])
    return model
