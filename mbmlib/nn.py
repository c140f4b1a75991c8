"""Approximate layers and ``convert(model)``: a model's multiplying layers, approximate.

The layers are :class:`MBMConv2d` / :class:`MBMLinear` (:mod:`mbmlib.layers`: ``nn.Conv2d`` /
``nn.Linear`` with the same constructor, parameters and initialisation, so state dicts load both
ways) and :class:`ApproxMultiheadAttention` with its ops ``in_proj``, ``qk``, ``pv`` (an
:class:`ApproxMatmul`) and ``out_proj`` (:mod:`mbmlib.attention_layers`).  With an integer
multiplier they are quantised layers (:mod:`mbmlib.quant`): their state dicts add ``quantiser.*``
scale entries, which a float layer loads with ``strict=False``, and they load a float layer's state
dict as it is.  :func:`convert` turns a model's Conv2d, Linear and MultiheadAttention layers into
them in place.
"""
from __future__ import annotations

import copy
import fnmatch
import json
import os
import warnings
from pathlib import Path
from typing import Optional

from torch import nn

from . import functional as AF
from .attention_layers import ATTENTION_OPS, ApproxMatmul, ApproxMultiheadAttention, InProjection, op_name
from .layers import ApproxLayer, MBMConv2d, MBMLinear, make_approx
from .multipliers import as_multiplier
from .quant import split_quant

__all__ = ["MBMConv2d", "MBMLinear", "ApproxMatmul", "ApproxMultiheadAttention", "InProjection", "ApproxLayer",
           "convert", "approximable_layers", "NotConvertedWarning", "UNCONVERTIBLE", "DEFAULT_LAYERS",
           "read_multiplier_map", "is_multiplier_map_path"]

# Layers that multiply but have no approximate twin: convert() leaves them exact and says so.
UNCONVERTIBLE = (nn.Conv1d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d, nn.Bilinear,
                 nn.RNNBase, nn.RNNCellBase)

# What convert() makes approximate unless told otherwise.
DEFAULT_LAYERS = (nn.Conv2d, nn.Linear, nn.MultiheadAttention)
_KINDS = (nn.Conv2d, nn.Linear, nn.MultiheadAttention, MBMConv2d, MBMLinear, ApproxMultiheadAttention)


class NotConvertedWarning(UserWarning):
    """``convert()`` met layers it has no approximate version of; they stay exact."""


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


def _walk(module: nn.Module, prefix: str = ""):
    """(name, module) of ``module`` and everything below it, not entering MultiheadAttention.

    An attention computes with its weights directly, so its submodules are reached as its ops
    (:func:`_targets`), never as layers of their own.
    """
    yield prefix, module
    if isinstance(module, nn.MultiheadAttention):
        return
    for attr, child in module.named_children():
        yield from _walk(child, f"{prefix}.{attr}" if prefix else attr)


def _check_layers(layers) -> tuple:
    layers = tuple(layers)
    for kind in layers:
        if kind not in _KINDS:
            raise TypeError(f"convert() can replace nn.Conv2d, nn.Linear and nn.MultiheadAttention layers, not "
                            f"{getattr(kind, '__name__', kind)}")
    return layers


def _targets(model: nn.Module, layers: tuple) -> list[tuple[str, nn.Module, Optional[str]]]:
    """``(name, module, op)`` of what convert() can make approximate, in order: each Conv2d/Linear outside attention
    ``(name, layer, None)``, each op of a MultiheadAttention ``("<name>.<op>", attention, op)``."""
    found = []
    for name, module in _walk(model):
        if isinstance(module, nn.MultiheadAttention) and isinstance(module, layers):
            found += [(op_name(name, op), module, op) for op in ATTENTION_OPS]
        elif isinstance(module, layers):
            found.append((name, module, None))
    return found


def approximable_layers(model: nn.Module, layers=DEFAULT_LAYERS) -> list[str]:
    """The names :func:`convert`'s multiplier patterns choose among, in order: every Conv2d and Linear outside
    attention and, for each MultiheadAttention ``<a>``, ``<a>.in_proj``, ``<a>.qk``, ``<a>.pv``, ``<a>.out_proj``
    (plain or converted alike; a layer shared under two names is listed under both)."""
    return [name for name, _, _ in _targets(model, _check_layers(layers))]


def _no_fast_paths(model: nn.Module) -> None:
    """Keep torch's fused transformer paths, which never call submodules, from skipping approximate layers.

    A TransformerEncoderLayer holding an approximate layer never takes ``torch._transformer_encoder_layer_fwd``
    (its eval-mode fast path needs ``activation_relu_or_gelu``, a flag nothing else reads after construction),
    and a TransformerEncoder holding one never packs padded batches into nested tensors (``use_nested_tensor``).
    """
    for module in model.modules():
        if isinstance(module, (nn.TransformerEncoderLayer, nn.TransformerEncoder)) and \
                any(isinstance(m, ApproxLayer) for m in module.modules()):
            if isinstance(module, nn.TransformerEncoderLayer):
                module.activation_relu_or_gelu = 0
            else:
                module.use_nested_tensor = False


def _approximate(module: nn.Module, op: Optional[str], opts: dict, quant) -> None:
    """Make one layer (``op`` None) or one op of an attention approximate with ``opts``, in place."""
    if op is None:
        make_approx(module, dict(opts, quant=split_quant(quant)[0]))
        return
    if not isinstance(module, ApproxMultiheadAttention):
        module.__class__ = ApproxMultiheadAttention  # same parameters; the ops come next
        module.attach_ops()
    module.set_op(op, quant=quant, **opts)


def convert(model: nn.Module, multiplier="mbm", backward: str = "exact", layers=DEFAULT_LAYERS,
            inplace: bool = False, backend: Optional[str] = None, quant=None) -> nn.Module:
    """Make every layer of the types in ``layers`` approximate, keeping its weights; return the model.

    The names ``multiplier`` chooses among are :func:`approximable_layers`: Conv2d/Linear layers by
    their module names, and the four ops of each MultiheadAttention ``<a>``: ``<a>.in_proj``,
    ``<a>.qk``, ``<a>.pv``, ``<a>.out_proj``.  ``multiplier`` is one multiplier for all, a dict of
    choices keyed by glob patterns (:func:`fnmatch.fnmatchcase`) on those names, e.g.
    ``{"features.0": "exact", "*": "mbm"}`` or ``{"*.qk": "mbm", "*.pv": "mbm"}`` (the attention
    matmuls only), or the path of an assignment file holding such a dict (:func:`read_multiplier_map`;
    a ``.json`` name or a path object): the first pattern that matches a name, in dict order, wins; a
    layer no pattern matches stays as it is; a pattern that matches no name is a ValueError.  A bare
    layer's name is ``""`` (a bare attention's ops are ``in_proj``, ``qk``, ...).

    Layers turn into :class:`MBMConv2d` / :class:`MBMLinear` / :class:`ApproxMultiheadAttention` in
    place (their class changes; parameters, hooks and train/eval mode stay), on a deep copy of
    ``model`` unless ``inplace`` -- so ``convert(layer, inplace=True) is layer``.  An attention any
    pattern matches gets all four ops, those not matched exact; one no pattern matches stays a plain
    ``nn.MultiheadAttention``.  Already-approximate layers get the new settings.  Transformer
    encoder layers and encoders holding approximate layers stop taking torch's fused fast paths, which
    would skip them.  Layers that multiply but have no approximate version (``UNCONVERTIBLE``:
    Conv1d/3d, transposed convs, Bilinear, RNNs) stay exact and are named in one
    :class:`NotConvertedWarning` (unless every multiplier asked for is "exact").  Products a model
    computes in its own ``forward`` (``F.linear``, ``torch.matmul``) are not seen.

    An integer multiplier (``"mbm-int8"``) makes quantised layers; ``quant`` fixes their scales, else
    they are observed -- see :func:`mbmlib.calibrate`: a :class:`~mbmlib.QuantSpec` for layers with
    weights (Conv2d, Linear, in_proj, out_proj), a :class:`~mbmlib.MatmulQuantSpec` for the attention
    matmuls, or a tuple of one of each.  With a dict, ``quant`` goes to the integer layers only.
    """
    if is_multiplier_map_path(multiplier):
        multiplier = read_multiplier_map(multiplier)
    opts = dict(backward=AF.check_backward(backward), backend=backend)
    layers = _check_layers(layers)
    split_quant(quant)  # a wrong quant is refused before anything changes
    if not inplace:
        model = copy.deepcopy(model)
    targets = _targets(model, layers)
    choose = _chooser(multiplier, [name for name, _, _ in targets])
    done = set()
    for name, module, op in targets:
        mult = choose(name)
        if mult is not None and (id(module), op) not in done:  # a shared layer takes its first name's multiplier
            layer_quant = quant if mult.is_integer or not isinstance(multiplier, dict) else None
            _approximate(module, op, dict(opts, multiplier=mult), layer_quant)
            done.add((id(module), op))
    _no_fast_paths(model)
    asked = multiplier.values() if isinstance(multiplier, dict) else [multiplier]
    if any(not as_multiplier(m).is_exact for m in asked):  # asking for exact layers leaves nothing behind
        _warn_not_converted([(name, m) for name, m in _walk(model) if isinstance(m, UNCONVERTIBLE)])
    return model
