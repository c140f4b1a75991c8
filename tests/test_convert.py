"""convert(): in place on bare layers, a warning naming every layer left exact, per-layer multipliers by glob."""
import warnings

import pytest
import torch
from torch import nn

import mbmlib
from mbmlib import MBMConv2d, MBMLinear, convert
from mbmlib import functional as AF
from mbmlib.nn import NotConvertedWarning


def approx_layers(model):
    return {name: m.multiplier.name for name, m in model.named_modules() if isinstance(m, (MBMConv2d, MBMLinear))}


@pytest.mark.parametrize("make", [lambda: nn.Conv2d(2, 3, 3, padding=1), lambda: nn.Linear(5, 4)])
def test_inplace_on_a_bare_layer_converts_that_object(make):
    torch.manual_seed(0)
    layer = make().eval()
    calls = []
    layer.register_forward_hook(lambda m, i, o: calls.append(1))
    weight = layer.weight
    x = torch.randn(2, 2, 5, 5) if isinstance(layer, nn.Conv2d) else torch.randn(3, 5)
    same = convert(layer, multiplier="mitchell", inplace=True, backend="reference")
    assert same is layer and isinstance(layer, (MBMConv2d, MBMLinear)) and layer.weight is weight
    assert layer.multiplier.name == "mitchell" and not layer.training
    want = (AF.conv2d(x, weight, layer.bias, padding=1, multiplier="mitchell", backend="reference")
            if isinstance(layer, nn.Conv2d) else AF.linear(x, weight, layer.bias, multiplier="mitchell", backend="reference"))
    assert torch.equal(layer(x), want)
    assert calls == [1]  # hooks stay
    fresh = make()
    copy = convert(fresh)
    assert copy is not fresh and type(fresh) in (nn.Conv2d, nn.Linear)


def test_convert_refuses_parametrized_layers():
    layer = nn.utils.parametrizations.weight_norm(nn.Linear(3, 2))
    with pytest.raises(TypeError, match="remove_parametrizations"):
        convert(layer)


class Zoo(nn.Module):
    """One of every layer kind convert() cannot make approximate, and two it can."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(2, 2, 3)
        self.fc = nn.Linear(4, 4)
        self.c1 = nn.Conv1d(2, 2, 3)
        self.c3 = nn.Conv3d(2, 2, 3)
        self.t1 = nn.ConvTranspose1d(2, 2, 3)
        self.t2 = nn.ConvTranspose2d(2, 2, 3)
        self.t3 = nn.ConvTranspose3d(2, 2, 3)
        self.bil = nn.Bilinear(3, 3, 2)
        self.block = nn.Sequential(nn.MultiheadAttention(4, 2), nn.LSTM(4, 4))


def test_one_warning_names_every_layer_left_exact():
    with pytest.warns(NotConvertedWarning) as record:
        model = convert(Zoo())
    assert len(record) == 1
    message = str(record[0].message)
    for name, kind in [("c1", "Conv1d"), ("c3", "Conv3d"), ("t1", "ConvTranspose1d"), ("t2", "ConvTranspose2d"),
                       ("t3", "ConvTranspose3d"), ("bil", "Bilinear"), ("block.1", "LSTM")]:
        assert f"'{name}' ({kind})" in message
    assert "MultiheadAttention" not in message  # attention converts (tests/test_attention_convert.py)
    assert approx_layers(model) == {"conv": "mbm", "fc": "mbm", "block.0.out_proj": "mbm"}
    assert isinstance(model.block[0], mbmlib.ApproxMultiheadAttention)


def test_multihead_attention_converts_and_the_exact_design_keeps_it():
    torch.manual_seed(0)
    model = nn.Sequential(nn.MultiheadAttention(4, 2))
    q = torch.randn(3, 1, 4)
    want = model[0](q, q, q)[0]
    converted = convert(model)
    assert isinstance(converted[0], mbmlib.ApproxMultiheadAttention) and type(model[0]) is nn.MultiheadAttention
    assert not torch.equal(converted[0](q, q, q)[0], want)
    torch.testing.assert_close(convert(model, "exact")[0](q, q, q)[0], want, rtol=1e-5, atol=1e-6)
    assert type(convert(model, layers=(nn.Linear,))[0]) is nn.MultiheadAttention


def test_no_warning_when_everything_converts_or_all_is_asked_exact():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        convert(nn.Sequential(nn.Conv2d(1, 2, 3), nn.ReLU(), nn.Flatten(), nn.Linear(8, 2)))
        convert(Zoo(), multiplier="exact")
        convert(Zoo(), multiplier={"conv": "exact", "*": "exact"})
    with pytest.warns(NotConvertedWarning):
        convert(Zoo(), multiplier={"conv": "exact", "*": "mbm-int8"})


def net():
    return nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Sequential(nn.Conv2d(4, 4, 3), nn.Conv2d(4, 4, 1)),
                         nn.Flatten(), nn.Linear(4, 2))


def test_per_layer_multipliers_first_match_wins():
    model = convert(net(), multiplier={"0": "exact", "2.*": "mitchell", "*": "mbm"})
    assert approx_layers(model) == {"0": "exact", "2.0": "mitchell", "2.1": "mitchell", "4": "mbm"}
    with pytest.warns(UserWarning, match="pattern '0' never applies"):  # "*" comes first and takes everything
        model = convert(net(), multiplier={"*": "mbm", "0": "exact"})
    assert set(approx_layers(model).values()) == {"mbm"}


def test_layers_no_pattern_matches_stay_as_they_are():
    model = convert(net(), multiplier={"2.1": "mitchell-t8", "4": "mbm"})
    assert approx_layers(model) == {"2.1": "mitchell-t8", "4": "mbm"}
    assert type(model[0]) is nn.Conv2d and type(model[2][0]) is nn.Conv2d


def test_a_pattern_matching_nothing_is_an_error_naming_the_layers():
    with pytest.raises(ValueError, match=r"'features\.\*' matches no convertible layer.*'0', '2.0', '2.1', '4'"):
        convert(net(), multiplier={"features.*": "exact", "*": "mbm"})
    with pytest.raises(ValueError, match="valid names"):
        convert(net(), multiplier={"*": "booth"})


def test_per_layer_multipliers_compute_what_they_say():
    torch.manual_seed(0)
    model = net().eval()
    x = torch.randn(2, 1, 7, 7)
    mixed = convert(model, multiplier={"0": "exact", "*": "mbm"}, backend="reference")
    h = mixed[0](x)
    assert torch.equal(h, nn.functional.conv2d(x, model[0].weight, model[0].bias))
    assert torch.equal(mixed[2][0](h), AF.conv2d(h, model[2][0].weight, model[2][0].bias, multiplier="mbm",
                                                  backend="reference"))


@pytest.mark.parametrize("multiplier", ["mbm", "mitchell", "mbm-int8"])
def test_converted_conv_is_a_drop_in_that_compiles(multiplier):
    """Outputs are laid out as F.conv2d's (contiguous), so .view works and torch.compile's fake strides match."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.Conv2d(4, 4, 3, stride=2),
                          nn.Flatten(), nn.Linear(4 * 3 * 3, 5))
    approx = mbmlib.convert(model, multiplier=multiplier, backend="compiled",
                            quant=mbmlib.QuantSpec(0.05, 0.05) if multiplier.endswith("int8") else None).eval()
    x = torch.rand(2, 1, 8, 8)
    y = approx[0](x)
    assert y.is_contiguous() and y.view(2, -1).shape == (2, 4 * 64)
    with torch.no_grad():
        assert torch.allclose(torch.compile(approx)(x), approx(x), rtol=1e-5, atol=1e-6)


def test_dict_patterns_that_never_win_warn_and_non_string_keys_are_refused():
    model = nn.Sequential(nn.Linear(3, 3), nn.Linear(3, 2))
    with pytest.warns(UserWarning, match="pattern '1' never applies: every layer it matches is taken by an earlier"):
        convert(model, multiplier={"*": "mbm", "1": "exact"})
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        convert(model, multiplier={"1": "exact", "*": "mbm"})  # the specific one first: both apply
    with pytest.raises(TypeError, match="multiplier patterns are strings .* got 3"):
        convert(model, multiplier={3: "mbm"})


@pytest.mark.filterwarnings("ignore::torch.jit.TracerWarning", "ignore:`torch.jit.trace:FutureWarning")
@pytest.mark.parametrize("multiplier", ["mbm", "mbm-int8"])
def test_jit_trace_is_refused_by_name_and_torch_export_keeps_the_approximate_ops(multiplier):
    model = convert(nn.Sequential(nn.Conv2d(1, 2, 3), nn.Flatten(), nn.Linear(2 * 4 * 4, 3)), multiplier=multiplier,
                    quant=mbmlib.QuantSpec(0.01, 0.1) if multiplier.endswith("int8") else None).eval()
    x = torch.rand(1, 1, 6, 6)
    with pytest.raises(RuntimeError, match="cannot be traced with torch.jit.trace.*torch.export.export"):
        torch.jit.trace(model, x)
    exported = torch.export.export(model, (x,))
    assert torch.equal(exported.module()(x), model(x))
    assert "mbmlib" in str(exported.graph)  # the custom ops, not exact ones
