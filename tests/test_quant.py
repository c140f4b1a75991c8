"""Quantised layers on integer / table multipliers, against an independent integer oracle (SPEC section 4).

The oracle's products come from the float multipliers: for n-bit magnitudes
(n <= 12) the integer design's P(A, B) is floor(mbm_mul(float A, float B)) --
the float significand rules are the integer ones, and truncating below 2^-23
never moves the floor -- checked here against the SPEC's worked values.
"""
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.ao.quantization import observer as tq

import mbmlib
from triton_backend import triton_backend
from mbmlib import MBMConv2d, MBMLinear, QuantSpec, calibrate, convert, kernels
from mbmlib import quant as Q
from mbmlib.multipliers import Multiplier, mbm_mul, mitchell_mul

BACKENDS = ["reference", "compiled"]
FLOAT_OF = {"mbm": mbm_mul, "mitchell": mitchell_mul}


def products(a, b, kind):
    """sign(a) sign(b) P(|a|, |b|) as int64, for integer tensors a, b (|.| < 2^12)."""
    mag = torch.floor(FLOAT_OF[kind](a.abs().float(), b.abs().float())).long()
    return torch.sign(a).long() * torch.sign(b).long() * mag


def q_of(x, scale, qmax):
    return torch.clamp(torch.round(x / scale), -qmax, qmax).long()


def scaled(sums, s_x, s_w, dtype=torch.float32):
    """The layer's rounding: exact integer sums times s_x * s_w in float64, rounded once."""
    return (sums.double() * (s_x.double() * s_w.double())).to(dtype)


def oracle_conv(x, w, b, s_x, s_w, kind, qmax, stride=1, padding=0, dilation=1, groups=1):
    B, C, H, W = x.shape
    O, Cg, kh, kw = w.shape
    qx, qw = q_of(x, s_x, qmax), q_of(w, s_w.view(-1, 1, 1, 1), qmax)
    cols = F.unfold(qx.double(), (kh, kw), dilation=dilation, padding=padding, stride=stride).long()  # (B, C*k, L)
    L = cols.shape[-1]
    cols = cols.view(B, groups, 1, Cg * kh * kw, L)
    wg = qw.reshape(1, groups, O // groups, Cg * kh * kw, 1)
    sums = products(cols, wg, kind).sum(3).reshape(B, O, L)  # exact int64
    Ho = (H + 2 * padding - dilation * (kh - 1) - 1) // stride + 1
    out = scaled(sums, s_x, s_w.view(1, -1, 1)).view(B, O, Ho, -1)
    return out if b is None else out + b.view(1, -1, 1, 1)


def oracle_linear(x, w, b, s_x, s_w, kind, qmax):
    qx, qw = q_of(x, s_x, qmax), q_of(w, s_w.view(-1, 1), qmax)
    sums = products(qx[:, None, :], qw[None, :, :], kind).sum(-1)  # (M, N) exact int64
    out = scaled(sums, s_x, s_w)
    return out if b is None else out + b


def test_oracle_reproduces_the_spec_worked_values():
    a, b = torch.tensor([16, 3, 3, 255, 63]), torch.tensor([1, 3, 7, 255, 63])
    assert products(a, b, "mbm").tolist() == [17, 8, 20, 65024, 4048]
    assert products(torch.tensor([3, -5]), torch.tensor([3, 14]), "mitchell").tolist() == [8, -64]


def test_integer_multiplier_properties():
    m = mbmlib.as_multiplier("mbm-int8")
    assert m.is_integer and m.bits == 8 and m.max_magnitude == 255
    assert not mbmlib.as_multiplier("mbm").is_integer


CONV_CASES = [  # (input shape, weight shape, kwargs)
    ((1, 1, 1, 1), (1, 1, 1, 1), dict()),
    ((1, 3, 7, 5), (5, 3, 3, 3), dict(padding=1)),
    ((2, 4, 9, 8), (7, 4, 3, 3), dict(stride=2, padding=1)),
    ((2, 6, 7, 7), (4, 3, 3, 3), dict(groups=2, padding=2, dilation=2)),
    ((3, 5, 6, 6), (5, 1, 3, 3), dict(groups=5, padding=1)),
    ((2, 3, 11, 10), (2, 3, 5, 5), dict(stride=2, padding=2)),
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", CONV_CASES, ids=[str(c[0]) for c in CONV_CASES])
@pytest.mark.parametrize("name", ["mbm-int8", "mitchell-int8", "mbm-int5"])
def test_quantised_conv_equals_exact_integer_sums_times_scales(backend, case, name):
    torch.manual_seed(0)
    xs, ws, kw = case
    x, w, b = torch.randn(*xs), torch.randn(*ws), torch.randn(ws[0])
    m = mbmlib.as_multiplier(name)
    s_x = torch.tensor(x.abs().max().item() / m.max_magnitude * 0.9)  # some inputs clip
    s_w = torch.rand(ws[0]) * 0.02 + 0.001
    got = Q.conv2d(x, w, b, **kw, act_scale=s_x, weight_scale=s_w, multiplier=name, backend=backend)
    assert torch.equal(got, oracle_conv(x, w, b, s_x, s_w, m.kind, m.max_magnitude, **kw))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape", [(1, 1, 1), (3, 17, 5), (7, 300, 2), (13, 64, 11)])
@pytest.mark.parametrize("name", ["mbm-int8", "mitchell-int8"])
def test_quantised_linear_equals_exact_integer_sums_times_scales(backend, shape, name):
    torch.manual_seed(1)
    M, K, N = shape
    x, w, b = torch.randn(M, K), torch.randn(N, K), torch.randn(N)
    m = mbmlib.as_multiplier(name)
    s_x, s_w = torch.tensor(0.02), torch.rand(N) * 0.01 + 0.002
    got = Q.linear(x, w, b, act_scale=s_x, weight_scale=s_w, multiplier=name, backend=backend)
    assert torch.equal(got, oracle_linear(x, w, b, s_x, s_w, m.kind, m.max_magnitude))


def test_integer_kernels_of_every_backend_sum_exactly():
    torch.manual_seed(2)
    qa, qb = torch.randint(-255, 256, (2, 5, 37), dtype=torch.int32), torch.randint(-255, 256, (2, 3, 37),
                                                                                      dtype=torch.int32)
    want = products(qa[:, :, None, :], qb[:, None, :, :], "mbm").sum(-1).double()
    for backend in BACKENDS:
        assert torch.equal(kernels.load(backend).bmm_nt_int(qa, qb, mbmlib.as_multiplier("mbm-int8")), want)


def mbm8_table():
    a = torch.arange(256)
    return products(a[:, None], a[None, :], "mbm")  # (256, 256)


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_table_of_mbm_int8_gives_the_same_layers_bit_for_bit(backend, tmp_path):
    torch.manual_seed(3)
    table = Multiplier.from_table(mbm8_table())
    pairs = torch.cartesian_prod(torch.arange(256), torch.arange(256)).tolist()  # A-major, as the table flattens
    rows = [f"{a},{b},{p}" for (a, b), p in zip(pairs, mbm8_table().flatten().tolist())]
    (tmp_path / "mbm8.csv").write_text("A,B,product\n" + "\n".join(rows) + "\n")
    from_csv = Multiplier.from_csv(tmp_path / "mbm8.csv")
    x, w = torch.randn(2, 3, 6, 7), torch.randn(5, 3, 3, 3)
    kw = dict(padding=1, stride=2, act_scale=0.02, weight_scale=0.005, backend=backend)
    want = Q.conv2d(x, w, **kw, multiplier="mbm-int8")
    assert torch.equal(Q.conv2d(x, w, **kw, multiplier=table), want)
    assert torch.equal(Q.conv2d(x, w, **kw, multiplier=from_csv), want)
    xl, wl = torch.randn(4, 29), torch.randn(3, 29)
    assert torch.equal(Q.linear(xl, wl, act_scale=0.03, weight_scale=0.01, multiplier=table, backend=backend),
                       Q.linear(xl, wl, act_scale=0.03, weight_scale=0.01, multiplier="mbm-int8", backend=backend))


def test_project_fixed_scales_reproduce_the_integer_computation():
    torch.manual_seed(4)
    conv = MBMConv2d(3, 4, 3, padding=1, multiplier="mbm-int8", quant=Q.PROJECT_SCALES, backend="reference")
    x = torch.rand(2, 3, 5, 5) * 20
    s_x, s_w = torch.tensor(0.1), torch.full((4,), 1e-3)
    want = oracle_conv(x, conv.weight.detach(), conv.bias.detach(), s_x, s_w, "mbm", 255, padding=1)
    assert torch.equal(conv(x), want)  # train mode: fixed scales never move
    assert torch.equal(conv.eval()(x), want)
    assert Q.PROJECT_SCALES == QuantSpec(weight_scale=1e-3, act_scale=0.1)
    lin = MBMLinear(6, 2, multiplier="mbm-int8", quant=QuantSpec(weight_scale=1e-3, act_scale=0.1)).eval()
    xl = torch.randn(3, 6) * 10
    assert torch.equal(lin(xl), oracle_linear(xl, lin.weight.detach(), lin.bias.detach(), s_x, torch.full((2,), 1e-3),
                                              "mbm", 255))


def two_layer_net(multiplier="mbm-int8", **kw):
    torch.manual_seed(5)
    return nn.Sequential(MBMConv2d(2, 4, 3, padding=1, multiplier=multiplier, **kw), nn.ReLU(), nn.Flatten(),
                         MBMLinear(4 * 5 * 5, 3, multiplier=multiplier, **kw))


def batches(n=3):
    torch.manual_seed(6)
    return [(torch.randn(4, 2, 5, 5) * (i + 1), torch.zeros(4)) for i in range(n)]


def layer_inputs(model, data):
    """The float model's inputs to the linear layer for each batch."""
    with torch.no_grad():
        return [model[2](model[1](F.conv2d(x, model[0].weight, model[0].bias, padding=1))) for x, _ in data]


def expected_act_scale(method, inputs, qmax):
    kw = dict(dtype=torch.qint32, qscheme=torch.per_tensor_symmetric, quant_min=-qmax, quant_max=qmax)
    if method == "minmax":
        obs = tq.MinMaxObserver(**kw)
    else:
        obs = tq.HistogramObserver(**kw)
        obs.dst_nbins = 2 * qmax + 1
    for x in inputs:
        obs(x)
    return obs.calculate_qparams()[0].reshape(())


@pytest.mark.parametrize("method", ["minmax", "histogram", "percentile"])
def test_calibrate_sets_and_freezes_the_scales(method):
    model, data = two_layer_net(backend="reference"), batches()
    calibrate(model, data, method=method, percentile=99.0)
    conv, lin = model[0], model[3]
    assert torch.equal(conv.quantiser.weight_scale, (conv.weight.detach().abs().amax((1, 2, 3)) / 255))
    assert torch.equal(lin.quantiser.weight_scale, (lin.weight.detach().abs().amax(1) / 255))
    first = [x for x, _ in data]
    absmax = torch.stack([x.abs().max() for x in first]).max() / 255
    if method == "percentile":
        flat = torch.cat([x.abs().flatten() for x in first])
        got = conv.quantiser.act_scale * 255
        assert abs(got - torch.quantile(flat, 0.99)) <= flat.max() / 2048 + 1e-6  # one histogram bin
        assert got < flat.max()
    else:
        assert torch.equal(conv.quantiser.act_scale, expected_act_scale(method, first, 255))
        assert torch.equal(lin.quantiser.act_scale, expected_act_scale(method, layer_inputs(model, data), 255))
        assert torch.equal(conv.quantiser.act_scale, absmax) if method == "minmax" else \
            conv.quantiser.act_scale <= absmax
    frozen = [b.clone() for b in model.buffers()]
    model.train()(torch.randn(4, 2, 5, 5) * 100)  # calibrated scales no longer follow the data
    assert all(torch.equal(a, b) for a, b in zip(frozen, model.buffers()))
    x = torch.randn(3, 2, 5, 5)
    s_x, s_w = conv.quantiser.act_scale, conv.quantiser.weight_scale
    assert torch.equal(conv(x), oracle_conv(x, conv.weight.detach(), conv.bias.detach(), s_x, s_w, "mbm", 255,
                                            padding=1))


def test_calibrate_errors():
    with pytest.raises(ValueError, match="valid methods"):
        calibrate(two_layer_net(), batches(), method="kl")
    with pytest.raises(ValueError, match="no quantised layer"):
        calibrate(nn.Sequential(nn.Linear(2, 2)), batches())
    with pytest.raises(ValueError, match="got 0 batches"):
        calibrate(two_layer_net(), [])
    with pytest.raises(ValueError, match="no quantised layer"):
        calibrate(two_layer_net(quant=Q.PROJECT_SCALES), batches())


def test_scales_track_training_and_freeze_in_eval():
    model = two_layer_net(backend="reference")
    x = torch.randn(4, 2, 5, 5)
    with pytest.raises(RuntimeError, match="no scales yet.*calibrate"):
        model.eval()(x)
    model.train()(x)
    conv = model[0]
    assert torch.equal(conv.quantiser.act_scale, x.abs().max() / 255)  # the first batch sets the range
    assert torch.equal(conv.quantiser.weight_scale, conv.weight.detach().abs().amax((1, 2, 3)) / 255)
    model(x * 3)  # moves 1% of the way (MovingAverageMinMaxObserver)
    want = (x.abs().max() + 0.01 * (3 * x.abs().max() - x.abs().max())) / 255
    torch.testing.assert_close(conv.quantiser.act_scale, want, rtol=1e-6, atol=0)
    before = conv.quantiser.act_scale.clone()
    model.eval()(x * 10)
    assert torch.equal(conv.quantiser.act_scale, before)


@pytest.mark.parametrize("layer_kind", ["conv", "linear"])
def test_gradients_are_the_float_layers(layer_kind):
    torch.manual_seed(7)
    if layer_kind == "conv":
        layer = MBMConv2d(3, 4, 3, stride=2, padding=1, multiplier="mbm-int8", quant=Q.PROJECT_SCALES)
        twin, x = nn.Conv2d(3, 4, 3, stride=2, padding=1), torch.randn(2, 3, 7, 7, requires_grad=True)
    else:
        layer = MBMLinear(9, 4, multiplier="mbm-int8", quant=Q.PROJECT_SCALES)
        twin, x = nn.Linear(9, 4), torch.randn(5, 9, requires_grad=True)
    twin.load_state_dict(layer.state_dict(), strict=False)
    out = layer(x)
    g = torch.randn_like(out)
    got = torch.autograd.grad(out, (x, layer.weight, layer.bias), g)
    want = torch.autograd.grad(twin(x), (x, twin.weight, twin.bias), g)
    assert all(torch.equal(a, b) for a, b in zip(got, want))
    with pytest.raises(ValueError, match="backward='approx' is not supported"):
        MBMConv2d(1, 1, 1, multiplier="mbm-int8", backward="approx")


def test_state_dicts_carry_the_scales_and_float_state_dicts_still_load():
    model = two_layer_net(backend="reference")
    calibrate(model, batches())
    state = model.state_dict()
    assert {"0.quantiser.weight_scale", "0.quantiser.act_scale", "3.quantiser.act_scale"} <= set(state)
    fresh = two_layer_net(backend="reference")
    fresh.load_state_dict(state)
    x = torch.randn(2, 2, 5, 5)
    assert torch.equal(fresh.eval()(x), model.eval()(x))
    assert fresh[0].quantiser.calibrated
    float_model = nn.Sequential(nn.Conv2d(2, 4, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(100, 3))
    fresh.load_state_dict(float_model.state_dict())  # strict: quantiser entries may be missing
    assert torch.equal(fresh[0].weight, float_model[0].weight)
    assert torch.equal(fresh[0].quantiser.act_scale, model[0].quantiser.act_scale)
    with pytest.raises(RuntimeError, match="Missing key"):
        fresh.load_state_dict({k: v for k, v in state.items() if k != "0.weight"})


def test_convert_makes_quantised_layers_and_back():
    model = nn.Sequential(nn.Conv2d(2, 4, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(100, 3))
    q = convert(model, multiplier="mbm-int8", quant=QuantSpec(weight_scale=0.01, act_scale=0.05),
                backend="reference")
    assert q[0].quantiser.levels == (-255, 255) and torch.equal(q[3].quantiser.act_scale, torch.tensor(0.05))
    x = torch.randn(2, 2, 5, 5)
    s_x, s_w = torch.tensor(0.05), torch.full((4,), 0.01)
    assert torch.equal(q[0](x), oracle_conv(x, model[0].weight.detach(), model[0].bias.detach(), s_x, s_w, "mbm", 255,
                                            padding=1))
    again = convert(q, multiplier="mitchell-int8", layers=(MBMConv2d, MBMLinear))
    assert again[0].quantiser.spec == QuantSpec(weight_scale=0.01, act_scale=0.05)  # same width: scales kept
    exact = convert(q, multiplier="exact", layers=(MBMConv2d, MBMLinear))
    assert exact[0].quantiser is None and "quantiser" not in dict(exact.named_children())
    mixed = convert(model, multiplier={"0": "mbm-int8", "*": "mbm"}, quant=Q.PROJECT_SCALES)
    assert mixed[0].quantiser is not None and mixed[3].quantiser is None
    with pytest.raises(ValueError, match="quant=... is for integer multipliers"):
        convert(model, multiplier="mbm", quant=Q.PROJECT_SCALES)


def test_functional_refuses_integer_multipliers_without_scales():
    with pytest.raises(ValueError, match="needs scales"):
        mbmlib.functional.conv2d(torch.randn(1, 1, 3, 3), torch.randn(1, 1, 1, 1), multiplier="mbm-int8")
    with pytest.raises(ValueError, match="integer or table multiplier"):
        Q.linear(torch.randn(2, 3), torch.randn(4, 3), act_scale=0.1, weight_scale=0.1, multiplier="mbm")
    with pytest.raises(ValueError, match="one per output channel"):
        Q.linear(torch.randn(2, 3), torch.randn(4, 3), act_scale=0.1, weight_scale=torch.ones(3))
    with pytest.raises(ValueError, match="positive finite"):
        QuantSpec(weight_scale=0.0)


def test_opcheck_and_torch_compile():
    from mbmlib.quant import _bmm_nt_quant, _conv2d_quant

    x, w = torch.randn(2, 3, 6, 6, requires_grad=True), torch.randn(4, 3, 3, 3, requires_grad=True)
    b = torch.randn(4, requires_grad=True)
    s_x, s_w = torch.tensor(0.02), torch.full((4,), 0.01)
    torch.library.opcheck(_conv2d_quant, (x, w, b, s_x, s_w, [2, 2], [1, 1], [1, 1], 1, "mbm-int8", "reference"))
    a, m = torch.randn(1, 5, 7, requires_grad=True), torch.randn(1, 3, 7, requires_grad=True)
    torch.library.opcheck(_bmm_nt_quant, (a, m, s_x, s_w[:3], "mbm-int8", "reference"))
    model = two_layer_net(quant=Q.PROJECT_SCALES, backend="reference").eval()
    xin = torch.randn(2, 2, 5, 5)
    assert torch.equal(torch.compile(model, fullgraph=True)(xin), model(xin))


def test_a_short_training_run_and_the_meta_device():
    from mbmlib.workflow.models import count_macs, new_model

    assert count_macs(new_model("seednet", multiplier="mbm-int8"))["total"] > 0  # eval on meta before any scale exists
    model = two_layer_net(backend="compiled")
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    x, y = torch.randn(8, 2, 5, 5), torch.randint(0, 3, (8,))
    losses = []
    for _ in range(3):
        opt.zero_grad()
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    assert torch.isfinite(model.eval()(x)).all()


def test_string_padding_padding_modes_and_unbatched_input():
    torch.manual_seed(8)
    x, w = torch.randn(2, 3, 6, 5), torch.randn(4, 3, 3, 3)
    kw = dict(act_scale=0.02, weight_scale=0.005, backend="reference")
    want = Q.conv2d(x, w, padding=1, **kw)
    assert torch.equal(Q.conv2d(x, w, padding="same", **kw), want)
    assert torch.equal(Q.conv2d(x[1], w, padding=1, **kw), want[1])
    conv = MBMConv2d(3, 4, 3, padding=1, padding_mode="reflect", bias=False, multiplier="mbm-int8",
                     quant=QuantSpec(weight_scale=0.005, act_scale=0.02), backend="reference")
    conv.weight.data.copy_(w)
    assert torch.equal(conv(x), Q.conv2d(F.pad(x, [1, 1, 1, 1], mode="reflect"), w, **kw))


_TRITON, _TRITON_SKIP = triton_backend()  # at collection: see tests/triton_backend.py


@pytest.mark.skipif(_TRITON is None, reason=_TRITON_SKIP or "")
def test_triton_backend_gives_the_same_integer_sums(monkeypatch):
    if not torch.cuda.is_available():
        monkeypatch.setenv("TRITON_INTERPRET", "1")  # lets the 'triton' backend be named on the CPU
    torch.manual_seed(9)
    x, w = torch.randn(3, 2, 5, 5), torch.randn(4, 2, 3, 3)
    kw = dict(padding=1, act_scale=0.02, weight_scale=0.01)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # the Triton kernel itself, not its fallback
        assert torch.equal(Q.conv2d(x, w, **kw, backend="triton"), Q.conv2d(x, w, **kw, backend="reference"))


@pytest.mark.parametrize("backend", ["reference", "compiled"])
def test_a_quantised_forward_never_synchronises(backend, monkeypatch):
    """Quantisation clamps the integers, so the kernels skip their magnitude scan (no .item() per call)."""
    from mbmlib import MBMConv2d, MBMLinear, QuantSpec

    conv = MBMConv2d(2, 3, 3, padding=1, multiplier="mbm-int8", backend=backend, quant=QuantSpec(0.01, 0.1)).eval()
    lin = MBMLinear(8, 4, multiplier="mbm-int8", backend=backend, quant=QuantSpec(0.01, 0.1)).eval()
    x, v = torch.randn(2, 2, 5, 5), torch.randn(3, 8)
    expect = (conv(x), lin(v))

    def no_item(self):
        raise AssertionError("Tensor.item() in a quantised layer's forward")

    monkeypatch.setattr(torch.Tensor, "item", no_item)
    assert torch.equal(conv(x), expect[0]) and torch.equal(lin(v), expect[1])
    with pytest.raises(AssertionError, match="Tensor.item"):  # the check is live: a direct kernel call scans
        mbmlib.kernels.load(backend).bmm_nt_int(torch.ones(1, 2, 3, dtype=torch.int32),
                                                torch.ones(1, 2, 3, dtype=torch.int32), mbmlib.as_multiplier("mbm-int8"))


@pytest.mark.parametrize("backend", ["reference", "compiled"])
def test_nan_inputs_make_nan_outputs_where_they_reach_not_an_integer_error(backend):
    from mbmlib import MBMConv2d, MBMLinear, QuantSpec

    conv = MBMConv2d(1, 2, 3, padding=1, multiplier="mbm-int8", backend=backend, quant=QuantSpec(0.01, 0.1)).eval()
    x = torch.rand(1, 1, 6, 6)
    x[0, 0, 0, 0] = float("nan")
    y = conv(x)
    reached = torch.zeros(6, 6, dtype=torch.bool)
    reached[:2, :2] = True  # a 3x3 kernel with padding 1: the NaN pixel feeds the outputs next to it
    assert torch.isnan(y[0]).equal(reached.expand(2, 6, 6)) and torch.isfinite(y[0][:, ~reached]).all()
    lin = MBMLinear(4, 3, multiplier="mbm-int8", backend=backend, quant=QuantSpec(0.01, 0.1)).eval()
    v = torch.rand(2, 4)
    v[1, 2] = float("inf")
    out = lin(v)
    assert torch.isfinite(out[0]).all() and torch.isnan(out[1]).all()
