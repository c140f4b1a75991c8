"""Weights prepared once per version (mbmlib.kernels.prepared): reused while unchanged, never stale.

Every change of a weight -- in place, by an optimiser, by load_state_dict, by ``.data =`` or ``.to()``, by
convert() to another design -- must show in the next output: each output is compared bit for bit with an
uncached computation (a deep copy of the layer: new tensors, so nothing of the first is reused) and with the
reference backend (bit for bit for quantised layers, whose sums are exact integers; float sums only differ in
their order there).
"""
import copy
import gc

import pytest
import torch

from mbmlib import MBMConv2d, MBMLinear, convert
from mbmlib import functional as AF
from mbmlib.kernels import cpu_native, prepared

MULTIPLIERS = ["mbm", "mitchell", "mbm-int8", "mitchell-int8"]


def _layer(kind: str, multiplier: str):
    """A small layer and an input; quantised layers get their scales from one training-mode call."""
    torch.manual_seed(0)
    if kind == "linear":
        layer, x = MBMLinear(70, 37, multiplier=multiplier, backend="compiled"), torch.randn(5, 70)
    else:
        layer, x = MBMConv2d(3, 6, 3, padding=1, multiplier=multiplier, backend="compiled"), torch.randn(2, 3, 7, 7)
    with torch.no_grad():
        layer(x)  # train mode: a quantised layer takes its scales from these ranges
    return layer.eval(), x


def _fresh(layer, x, backend="compiled"):
    """The layer's output from a deep copy (tensors no cache has seen) on ``backend``."""
    twin = copy.deepcopy(layer)
    twin.backend = backend
    with torch.no_grad():
        return twin(x)


def _add(layer):
    with torch.no_grad():
        layer.weight.add_(0.25)


def _copy(layer):
    with torch.no_grad():
        layer.weight.copy_(torch.randn_like(layer.weight))


def _optimiser_step(layer):
    opt = torch.optim.SGD(layer.parameters(), lr=0.5)
    layer.weight.grad = torch.randn_like(layer.weight)
    opt.step()


def _load_state_dict(layer):
    state = dict(layer.state_dict())  # the quantiser's extra state is a dict, the rest tensors
    state["weight"] = torch.randn_like(state["weight"])
    layer.load_state_dict(state)


def _assign_data(layer):
    layer.weight.data = torch.randn_like(layer.weight)


def _to_and_back(layer):
    version = layer.weight._version
    layer.to(torch.float16).to(torch.float32)  # new memory under the same object, the values rounded
    assert layer.weight._version == version  # what only the data pointer tells apart


MUTATIONS = [_add, _copy, _optimiser_step, _load_state_dict, _assign_data, _to_and_back]


@pytest.mark.parametrize("mutate", MUTATIONS, ids=lambda f: f.__name__.strip("_"))
@pytest.mark.parametrize("kind", ["linear", "conv"])
@pytest.mark.parametrize("multiplier", MULTIPLIERS)
def test_a_changed_weight_is_never_served_stale(multiplier, kind, mutate):
    layer, x = _layer(kind, multiplier)
    with torch.no_grad():
        before = layer(x)
        assert torch.equal(layer(x), before)  # the second call reuses the prepared weight
        mutate(layer)
        after = layer(x)
    assert not torch.equal(after, before)  # the change reached the output...
    assert torch.equal(after, _fresh(layer, x))  # ...bit for bit as an uncached computation gives it
    reference = _fresh(layer, x, "reference")
    if multiplier.endswith("int8"):
        assert torch.equal(after, reference)
    else:
        torch.testing.assert_close(after, reference, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kind", ["linear", "conv"])
def test_convert_to_another_design_prepares_the_weight_again(kind):
    layer, x = _layer(kind, "mbm")
    model = torch.nn.Sequential(layer).eval()
    with torch.no_grad():
        first = model(x)
        for multiplier in ("mitchell", "mbm-int8", "mbm"):
            convert(model, multiplier=multiplier, inplace=True, backend="compiled")
            if multiplier == "mbm-int8":
                model.train()(x)  # its scales
                model.eval()
            assert torch.equal(model(x), _fresh(model, x))
    assert torch.equal(model(x), first)


def test_each_weight_version_is_prepared_once(monkeypatch):
    builds = []
    original = cpu_native.float_b
    monkeypatch.setattr(cpu_native, "float_b", lambda *args: builds.append(1) or original(*args))
    layer, x = _layer("linear", "mbm")
    with torch.no_grad():
        for _ in range(3):
            layer(x)
        assert len(builds) == 1
        _add(layer)
        layer(x)
        layer(x)
    assert len(builds) == 2


def test_prepared_weights_go_with_their_layer():
    prepared.clear()
    layer, x = _layer("conv", "mbm-int8")
    with torch.no_grad():
        layer(x)
    assert prepared.size() == 1  # the weight quantised into its panels
    del layer
    gc.collect()
    assert prepared.size() == 0


def test_inference_tensors_are_computed_without_the_cache():
    layer, x = _layer("linear", "mbm")
    with torch.inference_mode():
        w = layer.weight.detach().clone()  # an inference tensor: no version counter to key on
        got = torch.nn.functional.linear(x, w, layer.bias)
        approx = MBMLinear(70, 37, backend="compiled")
        approx.weight, approx.bias = torch.nn.Parameter(w, requires_grad=False), layer.bias
        out = approx(x)
    assert not torch.equal(out, got)  # approximate...
    assert torch.equal(out, _fresh(layer, x))  # ...and the same as the layer's own weights give


def test_activations_that_autograd_keeps_are_not_held():
    prepared.clear()
    a = torch.randn(3, 4, 5, requires_grad=True)
    b = torch.randn(3, 6, 5, requires_grad=True) * 2  # computed by autograd: an activation, not a weight
    out = AF.bmm(a, b.transpose(1, 2), backend="compiled")
    assert prepared.size() == 0
    torch.testing.assert_close(out, AF.bmm(a, b.transpose(1, 2), backend="reference"), rtol=1e-5, atol=1e-5)


def test_alternating_designs_reuse_their_weights_and_a_sweep_keeps_a_few(monkeypatch):
    builds = []
    original = cpu_native.float_b
    monkeypatch.setattr(cpu_native, "float_b", lambda *args: builds.append(1) or original(*args))
    prepared.clear()
    x, w = torch.randn(4, 9), torch.randn(5, 9)
    for _ in range(3):
        for multiplier in ("mbm", "mitchell"):  # as the benchmark interleaves them
            AF.linear(x, w, multiplier=multiplier, backend="compiled")
    assert len(builds) == 2
    for t in range(2 * prepared.PER_TENSOR):  # a sweep over many designs holds only the last few
        AF.linear(x, w, multiplier=f"mbm-t{t}", backend="compiled")
    assert prepared.size() == prepared.PER_TENSOR
