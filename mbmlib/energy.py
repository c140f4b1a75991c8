"""A model's multiply-accumulates per layer and its relative multiplier energy (SPEC section 7).

``E = sum_l MACs_l * P(m_l) / sum_l MACs_l * P(exact_l)``: each layer's MACs weighted by its
multiplier's published power relative to its source's exact multiplier (:func:`mbmlib.cost`); a
layer left exact counts 1.  The layers are the Conv2d and Linear layers, matmul layers
(:class:`~mbmlib.ApproxMatmul`) and each attention's four ops, ``<a>.in_proj``, ``<a>.qk``,
``<a>.pv``, ``<a>.out_proj`` -- counted alike for a converted attention and for a plain
``nn.MultiheadAttention`` (from its inputs' shapes, exact), so an exact transformer's total equals its
converted twin's.  Relative figures from different
sources share one sum (each against its own exact), and the sources are named.  A layer
whose multiplier has no published cost makes the total unknown (None), never a guess.
"""
from __future__ import annotations

import copy
from typing import Union

import torch
from torch import Tensor, nn

from .attention_layers import ApproxMatmul, ApproxMultiheadAttention, InProjection, op_name
from .multipliers.cost import cost
from .multipliers.specs import as_multiplier

__all__ = ["layer_macs", "model_energy"]

ExampleInput = Union[Tensor, tuple]


_COUNTED = (nn.Conv2d, nn.Linear, ApproxMatmul, InProjection)


def _macs_per_sample(layer: nn.Module, inputs: tuple, output) -> int:
    """Multiply-accumulates of one layer per sample (its first dim), from its input and output shapes."""
    if isinstance(layer, InProjection):  # inputs (N, L, in): each projected to embed_dim outputs
        return sum(x[0].numel() * layer.embed_dim for x in inputs[:3])
    outputs_per_sample = output[0].numel() if output.dim() else 1
    if isinstance(layer, nn.Conv2d):
        kh, kw = layer.kernel_size
        return outputs_per_sample * (layer.in_channels // layer.groups) * kh * kw
    if isinstance(layer, ApproxMatmul):
        return outputs_per_sample * inputs[0].shape[-1]
    return outputs_per_sample * layer.in_features


def _attention_macs(attn: nn.MultiheadAttention, args: tuple, kwargs: dict) -> dict[str, int]:
    """MACs per sample of a plain ``nn.MultiheadAttention``'s four ops, from its forward's query, key and value."""
    query, key, value = (args[i] if len(args) > i else kwargs[name] for i, name in enumerate(("query", "key", "value")))
    seq = 1 if query.dim() == 3 and attn.batch_first else 0
    L, S, E = query.shape[seq], key.shape[seq], attn.embed_dim
    keys = S + (attn.bias_k is not None) + bool(attn.add_zero_attn)  # with bias_k and the zero key
    return {"in_proj": E * (L * query.shape[-1] + S * key.shape[-1] + S * value.shape[-1]), "qk": L * keys * E,
            "pv": L * keys * E, "out_proj": L * E * E}


def _probe_input(example_input: ExampleInput) -> Tensor:
    """The example batch on the meta device: a tensor keeps its dtype (int64 token ids), a shape gives float32."""
    if isinstance(example_input, Tensor):
        return torch.empty(example_input.shape, dtype=example_input.dtype, device="meta")
    return torch.empty(tuple(example_input), device="meta")


def layer_macs(model: nn.Module, example_input: ExampleInput = (1, 1, 28, 28)) -> dict[str, int]:
    """Forward multiply-accumulates per sample of every Conv2d, Linear and matmul layer and of each attention's
    ops (approximate ones included), by name (:func:`mbmlib.approximable_layers`'s); ``example_input`` is a
    batch (of any dtype) or its shape.

    Forward hooks on an eval-mode copy of the model on the meta device: nothing is computed and the
    model is left untouched.  A layer called twice counts twice.
    """
    probe = copy.deepcopy(model).to("meta").eval()
    macs: dict[str, int] = {}

    def add(name: str, count: int) -> None:
        macs[name] = macs.get(name, 0) + count

    def hook_for(name: str):
        return lambda layer, inputs, output: add(name, _macs_per_sample(layer, inputs, output))

    def attention_hook_for(name: str):
        def hook(attn, args, kwargs, output) -> None:
            for op, count in _attention_macs(attn, args, kwargs).items():
                add(op_name(name, op), count)
        return hook

    for name, layer in probe.named_modules():
        if isinstance(layer, nn.MultiheadAttention) and not isinstance(layer, ApproxMultiheadAttention):
            layer.register_forward_hook(attention_hook_for(name), with_kwargs=True)
        elif isinstance(layer, _COUNTED):
            layer.register_forward_hook(hook_for(name))
    with torch.no_grad():
        probe(_probe_input(example_input))
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
        mult = as_multiplier(getattr(modules.get(name), "multiplier", "exact"))  # a plain attention's ops: exact
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
