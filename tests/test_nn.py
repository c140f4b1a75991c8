"""MBMConv2d / MBMLinear modules and convert(model)."""
import pytest
import torch
from torch import nn

import mbmlib
from mbmlib import MBMConv2d, MBMLinear, convert
from mbmlib import functional as AF


def test_conv_module_matches_functional_and_state_dict_roundtrip():
    torch.manual_seed(1)
    ref = nn.Conv2d(3, 5, 3, stride=2, padding=1, bias=True)
    torch.manual_seed(1)
    approx = MBMConv2d(3, 5, 3, stride=2, padding=1, bias=True, multiplier="mbm")
    # same parameter names and initialisation
    assert ref.state_dict().keys() == approx.state_dict().keys()
    for k in ref.state_dict():
        assert torch.equal(ref.state_dict()[k], approx.state_dict()[k])
    approx.load_state_dict(ref.state_dict())
    ref.load_state_dict(approx.state_dict())
    x = torch.randn(2, 3, 8, 8)
    want = AF.conv2d(x, approx.weight, approx.bias, stride=2, padding=1, multiplier="mbm")
    assert torch.equal(approx(x), want)


@pytest.mark.parametrize("padding_mode", ["zeros", "reflect", "replicate", "circular"])
def test_conv_padding_modes_exact_multiplier_equals_nn_conv(padding_mode):
    conv = nn.Conv2d(2, 4, 3, padding=1, padding_mode=padding_mode)
    approx = MBMConv2d(2, 4, 3, padding=1, padding_mode=padding_mode, multiplier="exact")
    approx.load_state_dict(conv.state_dict())
    x = torch.randn(2, 2, 6, 7)
    torch.testing.assert_close(approx(x), conv(x), rtol=1e-5, atol=1e-5)


def test_linear_module():
    lin = MBMLinear(7, 3, multiplier="mitchell-t8", backward="approx")
    x = torch.randn(4, 7)
    assert torch.equal(lin(x), AF.linear(x, lin.weight, lin.bias, multiplier="mitchell-t8"))
    assert lin.multiplier == mbmlib.Multiplier("mitchell", 8)


def test_repr_shows_multiplier_and_backward():
    assert "multiplier=mbm-t16, backward=approx" in repr(MBMConv2d(1, 2, 3, multiplier="mbm-t16", backward="approx"))
    assert "multiplier=mitchell" in repr(MBMLinear(2, 3, multiplier="mitchell"))


def test_bad_constructor_arguments():
    with pytest.raises(ValueError, match="valid names"):
        MBMConv2d(1, 2, 3, multiplier="nope")
    with pytest.raises(ValueError, match="valid modes"):
        MBMLinear(1, 2, backward="nope")


def small_model():
    return nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(),
                         nn.Sequential(nn.Conv2d(4, 4, 3, groups=2)), nn.Flatten(), nn.Linear(4 * 6 * 6, 5))


def test_convert_swaps_layers_keeps_weights_and_original():
    model = small_model().eval()
    x = torch.randn(2, 1, 8, 8)
    converted = convert(model, multiplier="exact")
    kinds = [type(m) for m in converted.modules()]
    assert kinds.count(MBMConv2d) == 2 and kinds.count(MBMLinear) == 1
    assert not any(isinstance(m, (MBMConv2d, MBMLinear)) for m in model.modules())  # not inplace
    torch.testing.assert_close(converted(x), model(x), rtol=1e-5, atol=1e-5)
    approx = convert(model, multiplier="mbm", layers=(nn.Conv2d,))
    assert sum(isinstance(m, MBMLinear) for m in approx.modules()) == 0
    assert not torch.equal(approx(x), model(x))
    assert all(m.multiplier.name == "mbm" for m in approx.modules() if isinstance(m, MBMConv2d))


def test_convert_inplace_and_reconvert():
    model = small_model()
    same = convert(model, multiplier="mbm", inplace=True)
    assert same is model
    again = convert(model, multiplier="mitchell", backward="approx", layers=(MBMConv2d, MBMLinear))
    assert {m.multiplier.name for m in again.modules() if isinstance(m, (MBMConv2d, MBMLinear))} == {"mitchell"}
    assert convert(nn.Linear(2, 3)).__class__ is MBMLinear
    with pytest.raises(TypeError):
        convert(model, layers=(nn.BatchNorm2d,))


def record_layers(model):
    """Hooks keeping each approximate layer's input and output, both holding their gradient after backward."""
    seen = {}

    def hook(layer, inputs, output):
        if inputs[0].requires_grad:
            inputs[0].retain_grad()
        output.retain_grad()
        seen[layer] = (inputs[0], output)

    for m in model.modules():
        if isinstance(m, (MBMConv2d, MBMLinear)):
            m.register_forward_hook(hook)
    return seen


def want_grads_exact(layer, x, g):
    """(grad_x, grad_w, grad_b) of the plain PyTorch layer with the same weights."""
    twin = nn.Conv2d(layer.in_channels, layer.out_channels, layer.kernel_size, layer.stride, layer.padding,
                     layer.dilation, layer.groups) if isinstance(layer, nn.Conv2d) else nn.Linear(
        layer.in_features, layer.out_features)
    twin.load_state_dict(layer.state_dict())
    x = x.detach().requires_grad_()
    return torch.autograd.grad(twin(x), (x, twin.weight, twin.bias), g)


def want_grads_approx(layer, x, g):
    """(grad_x, grad_w) from the reference backend's approximate gradient kernels; grad_b has no products."""
    ref, mult, x, w = mbmlib.kernels.load("reference"), layer.multiplier, x.detach(), layer.weight.detach()
    if isinstance(layer, nn.Conv2d):
        gx, gw = ref.conv2d_grads(g, x, w, layer.stride, layer.padding, layer.dilation, layer.groups, mult)
        return gx, gw, want_grads_exact(layer, x, g)[2]
    gx = ref.bmm_nt(g[None], w.T.contiguous()[None], mult)[0]  # (M, N) x (N, K) -> (M, K)
    gw = ref.bmm_nt(g.T.contiguous()[None], x.T.contiguous()[None], mult)[0]  # (N, M) x (M, K) -> (N, K)
    return gx, gw, g.sum(0)


@pytest.mark.parametrize("backward", ["exact", "approx"])
def test_module_gradients_equal_the_exact_layer_or_the_reference_approximate_kernels(backward):
    torch.manual_seed(0)
    model = convert(small_model(), multiplier="mbm", backward=backward, backend="reference")
    seen = record_layers(model)
    x, y = torch.randn(4, 1, 8, 8), torch.tensor([0, 1, 2, 3])
    nn.functional.cross_entropy(model(x), y).backward()
    assert len(seen) == 3
    want = want_grads_exact if backward == "exact" else want_grads_approx
    for layer, (inp, out) in seen.items():
        gx, gw, gb = want(layer, inp, out.grad)
        assert torch.equal(layer.weight.grad, gw)
        assert torch.equal(layer.bias.grad, gb)
        if inp.requires_grad:
            assert torch.equal(inp.grad, gx)
    if backward == "approx":  # the approximate gradients are not the exact ones
        layer, (inp, out) = next(iter(seen.items()))
        assert not torch.equal(layer.weight.grad, want_grads_exact(layer, inp, out.grad)[1])
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    before = [layer.weight.detach().clone() for layer in seen]
    opt.step()
    assert all(not torch.equal(w, layer.weight) for w, layer in zip(before, seen))


def test_linear_straight_through_gradients_equal_nn_linear_bit_for_bit_over_many_shapes():
    """bmm and mm may sum in different orders on some CPUs: the exact backward must be nn.Linear's own."""
    gen = torch.Generator().manual_seed(0)
    for _ in range(60):
        m, n, k = (int(v) for v in torch.randint(1, 40, (3,), generator=gen))
        layer = MBMLinear(k, n, multiplier="mbm", backward="exact")
        x = torch.randn(m, k, generator=gen, requires_grad=True)
        out = layer(x)
        g = torch.randn(out.shape, generator=gen)
        got = torch.autograd.grad(out, (x, layer.weight, layer.bias), g)
        want = want_grads_exact(layer, x, g)
        assert all(torch.equal(a, b) for a, b in zip(got, want)), (m, n, k)
