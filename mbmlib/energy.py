"""A model's multiply-accumulates per layer and its relative multiplier energy (SPEC section 7).

``E = sum_l MACs_l * P(m_l) / sum_l MACs_l * P(exact_l)``: each conv/linear layer's MACs
weighted by its multiplier's published power relative to its source's exact multiplier
(:func:`mbmlib.cost`); a layer left exact counts 1.  Relative figures from different
sources share one sum (each against its own exact), and the sources are named.  A layer
whose multiplier has no published cost makes the total unknown (None), never a guess.
"""
from __future__ import annotations

import copy
from typing import Union

import torch
from torch import Tensor, nn

from .multipliers.cost import cost
from .multipliers.specs import as_multiplier

__all__ = ["layer_macs", "model_energy"]

ExampleInput = Union[Tensor, tuple]


def _macs_per_sample(layer: nn.Module, output: Tensor) -> int:
    """Multiply-accumulates of one conv or linear layer per sample, from its output shape."""
    outputs_per_sample = output[0].numel()
    if isinstance(layer, nn.Conv2d):
        kh, kw = layer.kernel_size
        return outputs_per_sample * (layer.in_channels // layer.groups) * kh * kw
    return outputs_per_sample * layer.in_features


def layer_macs(model: nn.Module, example_input: ExampleInput = (1, 1, 28, 28)) -> dict[str, int]:
    """Forward multiply-accumulates per sample of every Conv2d and Linear layer (approximate ones included),
    by module name; ``example_input`` is a batch or its shape.

    Forward hooks on an eval-mode copy of the model on the meta device: nothing is computed and the
    model is left untouched.  A layer called twice counts twice.
    """
    shape = tuple(example_input.shape) if isinstance(example_input, Tensor) else tuple(example_input)
    probe = copy.deepcopy(model).to("meta").eval()
    macs: dict[str, int] = {}

    def hook_for(name: str):
        def hook(layer: nn.Module, inputs, output: Tensor) -> None:
            macs[name] = macs.get(name, 0) + _macs_per_sample(layer, output)
        return hook

    for name, layer in probe.named_modules():
        if isinstance(layer, (nn.Conv2d, nn.Linear)):
            layer.register_forward_hook(hook_for(name))
    with torch.no_grad():
        probe(torch.empty(shape, device="meta"))
    return macs


def model_energy(model: nn.Module, example_input: ExampleInput = (1, 1, 28, 28)) -> dict:
    """The per-layer and total relative multiplier energy of ``model`` (SPEC section 7).

    Returns ``{"layers": [{name, multiplier, macs, relative_power, source}], "total_macs",
    "relative_energy" (None if a layer's cost is unknown), "unknown" (multipliers without a
    published cost), "sources"}``.
    """
    rows, unknown, sources = [], set(), set()
    modules = dict(model.named_modules())
    for name, macs in layer_macs(model, example_input).items():
        mult = as_multiplier(getattr(modules[name], "multiplier", "exact"))
        found = cost(mult)
        if found is None:
            unknown.add(mult.name)
        elif not mult.is_exact:
            sources.add(found.source)
        rows.append({"name": name, "multiplier": mult.name, "macs": macs,
                     "relative_power": None if found is None else found.relative_power,
                     "source": None if found is None else found.source})
    total = sum(r["macs"] for r in rows)
    energy = None if unknown or not total else sum(r["macs"] * r["relative_power"] for r in rows) / total
    return {"layers": rows, "total_macs": total, "relative_energy": energy, "unknown": sorted(unknown),
            "sources": sorted(sources)}
