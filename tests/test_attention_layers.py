"""ApproxMultiheadAttention against nn.MultiheadAttention, and its integer (quantised) form.

Tolerance: with the multiplier "exact" on all four ops the outputs and weights equal nn.MultiheadAttention's
within rtol 1e-5 / atol 1e-6 (its need_weights path scales Q before the product and projects in another
layout: float rounding only; many cases come out bit for bit).
"""
import pytest
import torch
from torch import nn

import mbmlib
from mbmlib import ApproxMultiheadAttention, MatmulQuantSpec, QuantSpec, calibrate
from mbmlib import functional as AF
from triton_backend import every_backend

TOL = dict(rtol=1e-5, atol=1e-6)

# (name, constructor kwargs): every way nn.MultiheadAttention can be built
CONFIGS = [
    ("seq-first", dict(embed_dim=8, num_heads=2)),
    ("batch-first", dict(embed_dim=8, num_heads=2, batch_first=True)),
    ("kdim-vdim", dict(embed_dim=8, num_heads=4, kdim=5, vdim=3)),
    ("bias-kv-zero-attn", dict(embed_dim=8, num_heads=2, add_bias_kv=True, add_zero_attn=True)),
    ("no-bias-odd-heads", dict(embed_dim=9, num_heads=3, bias=False)),
]


def twins(kw, **approx):
    """An nn.MultiheadAttention and an ApproxMultiheadAttention with the same parameters."""
    torch.manual_seed(0)
    ref = nn.MultiheadAttention(**kw)
    torch.manual_seed(1)
    mine = ApproxMultiheadAttention(**kw, **{"multiplier": "exact", **approx})
    mine.load_state_dict(ref.state_dict())
    return ref, mine


def inputs(kw, N=3, L=4, S=6, batched=True, self_attention=False, seed=0):
    gen = torch.Generator().manual_seed(seed)
    E = kw["embed_dim"]
    shape = (lambda n: (N, n) if kw.get("batch_first") else (n, N)) if batched else (lambda n: (n,))
    q = torch.randn(*shape(L), E, generator=gen)
    if self_attention:
        return q, q, q
    return q, torch.randn(*shape(S), kw.get("kdim") or E, generator=gen), \
        torch.randn(*shape(S), kw.get("vdim") or E, generator=gen)


def masks(kw, N=3, L=4, S=6, seed=0):
    """Forward kwargs: every kind of mask nn.MultiheadAttention takes."""
    gen = torch.Generator().manual_seed(seed)
    heads = kw["num_heads"]
    pad = torch.rand(N, S, generator=gen) > 0.7
    pad[:, 0] = False
    causal = torch.ones(L, S, dtype=torch.bool).triu(1)
    return {
        "none": {},
        "padding-bool": dict(key_padding_mask=pad),
        "padding-float": dict(key_padding_mask=torch.zeros(N, S).masked_fill(pad, float("-inf"))),
        "attn-bool-2d": dict(attn_mask=torch.rand(L, S, generator=gen) > 0.8),
        "attn-float-3d": dict(attn_mask=torch.randn(N * heads, L, S, generator=gen)),
        "both-per-head": dict(attn_mask=torch.rand(N * heads, L, S, generator=gen) > 0.8, key_padding_mask=pad,
                              average_attn_weights=False),
        "causal-no-weights": dict(attn_mask=causal, is_causal=True, need_weights=False),
        "causal-weights": dict(attn_mask=causal, is_causal=True),
        "padding-no-weights": dict(key_padding_mask=pad, need_weights=False),
    }


@pytest.mark.parametrize("config", CONFIGS, ids=[c[0] for c in CONFIGS])
def test_exact_ops_give_nn_multiheadattention_results(config):
    kw = config[1]
    ref, mine = twins(kw)
    assert list(mine.state_dict()) == list(ref.state_dict())
    cases = [(inputs(kw), masks(kw))]  # cross-attention, L != S
    if "kdim" not in kw:
        cases.append((inputs(kw, S=4, self_attention=True), masks(kw, S=4)))  # self-attention: the packed projection
    for args, mask_kwargs in cases:
        for mask_name, fkw in mask_kwargs.items():
            want, want_w = ref(*args, **fkw)
            got, got_w = mine(*args, **fkw)
            torch.testing.assert_close(got, want, **TOL, msg=mask_name)
            assert (got_w is None) == (want_w is None)
            if want_w is not None:
                torch.testing.assert_close(got_w, want_w, **TOL, msg=mask_name)


@pytest.mark.parametrize("config", CONFIGS[:3], ids=[c[0] for c in CONFIGS[:3]])
def test_unbatched_inputs_and_gradients(config):
    kw = config[1]
    ref, mine = twins(kw)
    q, k, v = inputs(kw, batched=False)
    pad = torch.tensor([False, True, False, False, True, False])
    for fkw in ({}, dict(key_padding_mask=pad), dict(attn_mask=torch.randn(kw["num_heads"], 4, 6)),
                dict(need_weights=False, average_attn_weights=False)):
        want, want_w = ref(q, k, v, **fkw)
        got, got_w = mine(q, k, v, **fkw)
        torch.testing.assert_close(got, want, **TOL)
        if want_w is not None:
            torch.testing.assert_close(got_w, want_w, **TOL)
    q, k, v = inputs(kw)
    ref(q, k, v)[0].square().sum().backward()
    mine(q, k, v)[0].square().sum().backward()
    for (name, p), (_, p2) in zip(ref.named_parameters(), mine.named_parameters()):
        torch.testing.assert_close(p2.grad, p.grad, rtol=1e-5, atol=1e-5, msg=name)


@pytest.mark.parametrize("need_weights", [True, False])
def test_dropout_and_fully_masked_rows_as_torch(need_weights):
    kw = dict(embed_dim=8, num_heads=2, dropout=0.4)
    ref, mine = twins(kw)
    q, k, v = inputs(kw)
    torch.manual_seed(7)
    want, want_w = ref(q, k, v, need_weights=need_weights)
    torch.manual_seed(7)
    got, got_w = mine(q, k, v, need_weights=need_weights)
    torch.testing.assert_close(got, want, **TOL)  # the same dropout mask: the same draws in the same order
    pad = torch.zeros(3, 6, dtype=torch.bool)
    pad[1] = True  # batch entry 1 attends to nothing: NaN with need_weights (a plain softmax), zeros without
    ref.eval(), mine.eval()
    want, _ = ref(q, k, v, key_padding_mask=pad, need_weights=need_weights)
    got, _ = mine(q, k, v, key_padding_mask=pad, need_weights=need_weights)
    torch.testing.assert_close(got, want, **TOL, equal_nan=True)
    assert torch.isnan(got[:, 1]).all() == need_weights


def test_errors_are_nn_multiheadattentions():
    kw = dict(embed_dim=8, num_heads=2)
    ref, mine = twins(kw)
    q, k, v = inputs(kw)
    bad_calls = [((q[..., :6], k, v), {}), ((q, k, v[:5]), {}), ((q, k, v), dict(attn_mask=torch.zeros(3, 6))),
                 ((q, k, v), dict(attn_mask=torch.zeros(5, 4, 6))), ((q, k, v), dict(is_causal=True)),
                 ((q, k, v), dict(key_padding_mask=torch.zeros(3, 5, dtype=torch.bool))), ((q[0], k, v), {})]
    for args, fkw in bad_calls:
        with pytest.raises((RuntimeError, AssertionError)) as theirs:
            ref(*args, **fkw)
        with pytest.raises(type(theirs.value)) as ours:
            mine(*args, **fkw)
        assert str(ours.value).split(",")[0] == str(theirs.value).split(",")[0]
    with pytest.raises(ValueError, match="unknown attention op 'proj'"):
        mine.set_op("proj", "mbm")


def test_approximate_ops_compute_the_functional_pipeline():
    """All four ops on MBM: in-projection, attention and out-projection are mbmlib.functional's ops."""
    kw = dict(embed_dim=8, num_heads=2, batch_first=True)
    _, mine = twins(kw, multiplier="mbm", backend="reference")
    x = inputs(kw, self_attention=True)[0]  # (N, L, E)
    opts = dict(multiplier="mbm", backend="reference")
    q, k, v = AF.linear(x, mine.in_proj_weight, mine.in_proj_bias, **opts).chunk(3, dim=-1)
    heads = [t.view(3, 4, 2, 4).transpose(1, 2) for t in (q, k, v)]
    attended = AF.scaled_dot_product_attention(*heads, **opts).transpose(1, 2).reshape(3, 4, 8)
    want = AF.linear(attended, mine.out_proj.weight, mine.out_proj.bias, **opts)
    got, _ = mine(x, x, x, need_weights=False)
    assert torch.equal(got, want)
    exact, _ = twins(kw)[1](x, x, x, need_weights=False)
    assert (got - exact).abs().max() > 1e-4
    mine.set_op("in_proj", "exact")
    mine.set_op("out_proj", "exact")
    only_attention, _ = mine(x, x, x, need_weights=False)
    assert not torch.equal(only_attention, got) and not torch.equal(only_attention, exact)
    assert [m.multiplier.name for m in (mine.in_proj, mine.qk, mine.pv, mine.out_proj)] == ["exact", "mbm", "mbm",
                                                                                           "exact"]


def test_integer_attention_calibrates_and_round_trips_its_state():
    kw = dict(embed_dim=8, num_heads=2, kdim=5, vdim=6)
    ref, mine = twins(kw, multiplier="mbm-int8")
    batches = [inputs(kw, seed=s) for s in range(3)]

    class Wrap(nn.Module):  # calibrate() feeds one input per batch
        def __init__(self, attn):
            super().__init__()
            self.attn = attn

        def forward(self, qkv):
            return self.attn(*qkv)[0]

    model = Wrap(mine)
    with pytest.raises(RuntimeError, match="no scales yet"):
        model.eval()(batches[0])
    calibrate(model, [(b,) for b in batches])
    for op in ("in_proj", "qk", "pv", "out_proj"):
        assert getattr(mine, op).quantiser.calibrated, op
    inp = mine.in_proj.quantiser
    assert inp.weight_scale.shape == (24,)
    assert torch.allclose(inp.act_scale, torch.stack([t.abs().max() for b in batches for t in b]).max() / 255)
    out, want = model(batches[1]), ref(*batches[1])[0]
    assert 0 < (out - want).abs().max() < 0.15 * want.abs().max()  # MBM on 8-bit magnitudes, not far from exact
    q, k, v = (t.transpose(0, 1) for t in batches[1])  # batch first, as the attention hands them to in_proj
    weights, biases = (mine.q_proj_weight, mine.k_proj_weight, mine.v_proj_weight), mine.in_proj_bias.chunk(3)
    projected = mine.in_proj(q, k, v, weights, mine.in_proj_bias)
    for i, (x, w, b) in enumerate(zip((q, k, v), weights, biases)):  # one act scale, the channels' weight scales
        assert torch.equal(projected[i], mbmlib.quant.linear(x, w, b, act_scale=inp.act_scale, multiplier="mbm-int8",
                                                             weight_scale=inp.weight_scale[8 * i:8 * i + 8]))
    twin = Wrap(ApproxMultiheadAttention(**kw, multiplier="mbm-int8"))
    twin.load_state_dict(model.state_dict())
    assert torch.equal(twin.eval()(batches[1]), out)
    plain = Wrap(nn.MultiheadAttention(**kw))
    result = plain.load_state_dict(model.state_dict(), strict=False)
    assert result.missing_keys == [] and all(".quantiser." in k for k in result.unexpected_keys)
    fresh = Wrap(ApproxMultiheadAttention(**kw, multiplier="mbm-int8"))
    assert fresh.load_state_dict(plain.state_dict()).missing_keys == []  # a float state dict loads as it is


def test_fixed_scales_for_layers_and_matmuls():
    kw = dict(embed_dim=8, num_heads=2)
    quant = (QuantSpec(weight_scale=0.01, act_scale=0.02), MatmulQuantSpec(a_scale=0.03, b_scale=0.04))
    attn = ApproxMultiheadAttention(**kw, multiplier="mbm-int8", quant=quant).eval()
    q, k, v = inputs(kw)
    attn(q, k, v)  # ready without calibration
    assert float(attn.qk.quantiser.b_scale) == pytest.approx(0.04) and float(attn.pv.quantiser.a_scale) == \
        pytest.approx(0.03)
    assert torch.equal(attn.in_proj.quantiser.weight_scale, torch.full((24,), 0.01))
    assert float(attn.out_proj.quantiser.act_scale) == pytest.approx(0.02)
    with pytest.raises(TypeError, match="MatmulQuantSpec"):
        ApproxMultiheadAttention(**kw, multiplier="mbm-int8", quant="0.1")
    with pytest.raises(ValueError, match="quant=... is for integer multipliers"):
        ApproxMultiheadAttention(**kw, multiplier="mbm", quant=quant)
    assert "mbm-int8" in repr(mbmlib.convert(nn.Sequential(nn.MultiheadAttention(**kw)), "mbm-int8", quant=quant))


@pytest.mark.parametrize("backend", every_backend(), indirect=True)
def test_approximate_attention_on_every_backend(backend):
    """Tiny cross-attention with a padding mask: the backend's ops match the reference backend's up to float32
    summation order."""
    kw = dict(embed_dim=4, num_heads=2, kdim=3)
    q, k, v = inputs(kw, N=1, L=2, S=3)
    pad = torch.tensor([[False, True, False]])
    outs = {}
    for be in ("reference", backend):
        _, attn = twins(kw, multiplier="mitchell", backend=be)
        outs[be] = attn(q, k, v, key_padding_mask=pad)
    torch.testing.assert_close(outs[backend][0], outs["reference"][0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(outs[backend][1], outs["reference"][1], rtol=1e-5, atol=1e-5)
