"""Approximate attention in the core: functional.bmm / scaled_dot_product_attention, quant.matmul, ApproxMatmul.

Tolerances: with the multiplier "exact" the attention equals the plain math (matmul, scale, mask, softmax,
matmul) bit for bit and torch's F.scaled_dot_product_attention within rtol 1e-5 / atol 1e-6 (torch scales Q
and K before its product, we scale the product: float rounding only).  Approximate designs are held against the
reference backend (float32 sums in another order: rtol / atol 1e-5) and against float64 oracles built from the
elementwise op.
"""
import math

import pytest
import torch
import torch.nn.functional as F

import mbmlib
from mbmlib import ApproxMatmul, MatmulQuantSpec, calibrate, quant
from mbmlib import functional as AF
from oracle import check_close_to_terms
from triton_backend import every_backend

BACKENDS = every_backend()
EXACT_TOL = dict(rtol=1e-5, atol=1e-6)


def bool_mask(shape, p=0.3, gen=None):
    return torch.rand(shape, generator=gen) > p


# (name, query shape, key shape, value shape, kwargs): broadcast batch dims, odd head dims, L != S, every mask
CASES = [
    ("plain", (2, 3, 4, 5), (2, 3, 6, 5), (2, 3, 6, 7), {}),
    ("broadcast-batch", (2, 1, 3, 5), (1, 4, 6, 5), (4, 6, 3), {}),
    ("unbatched-2d", (3, 7), (5, 7), (5, 2), {}),
    ("one-query", (2, 1, 3), (2, 9, 3), (2, 9, 3), {}),
    ("bool-mask-2d", (2, 3, 4, 5), (2, 3, 6, 5), (2, 3, 6, 7), dict(attn_mask=(4, 6))),
    ("bool-mask-broadcast", (2, 3, 4, 5), (2, 3, 6, 5), (2, 3, 6, 7), dict(attn_mask=(2, 1, 4, 6))),
    ("float-mask", (2, 3, 4, 5), (2, 3, 6, 5), (2, 3, 6, 7), dict(float_mask=(3, 1, 6))),
    ("causal-L<S", (2, 4, 5), (2, 7, 5), (2, 7, 3), dict(is_causal=True)),
    ("causal-L>S", (2, 7, 5), (2, 4, 5), (2, 4, 3), dict(is_causal=True)),
    ("scale", (2, 3, 4, 5), (2, 3, 6, 5), (2, 3, 6, 7), dict(scale=0.3)),
    ("gqa", (2, 6, 3, 5), (2, 2, 4, 5), (2, 3, 4, 7), dict(enable_gqa=True)),
]


def make_case(case, dtype=torch.float32, seed=0):
    _, qs, ks, vs, kw = case
    gen = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(s, generator=gen, dtype=dtype) for s in (qs, ks, vs))
    kw = dict(kw)
    if "attn_mask" in kw:
        kw["attn_mask"] = bool_mask(kw["attn_mask"], gen=gen)
    if "float_mask" in kw:
        kw["attn_mask"] = torch.randn(kw.pop("float_mask"), generator=gen, dtype=dtype)
    return q, k, v, kw


def plain_math(q, k, v, attn_mask=None, is_causal=False, scale=None, enable_gqa=False, matmul=torch.matmul):
    """The attention as three ops and a softmax, written out here (rows no key takes part in: zeros)."""
    if enable_gqa:
        k = k.repeat_interleave(q.shape[-3] // k.shape[-3], -3)
        v = v.repeat_interleave(q.shape[-3] // v.shape[-3], -3)
    scale = 1 / math.sqrt(q.shape[-1]) if scale is None else scale
    scores = matmul(q, k.transpose(-2, -1)) * scale
    if is_causal:
        attn_mask = torch.ones(q.shape[-2], k.shape[-2], dtype=torch.bool).tril()
    if attn_mask is not None and attn_mask.dtype == torch.bool:
        attn_mask = torch.zeros(attn_mask.shape).masked_fill(~attn_mask, float("-inf"))
    if attn_mask is not None:
        scores = scores + attn_mask
    dead = (scores == float("-inf")).all(-1, keepdim=True)
    weights = torch.softmax(scores, -1).masked_fill(dead, 0.0)
    return matmul(weights, v), weights


# ----------------------------------------------------------------------------- exact design: torch and plain math


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_exact_attention_equals_torch_and_the_plain_math(case):
    q, k, v, kw = make_case(case)
    got = AF.scaled_dot_product_attention(q, k, v, **kw, multiplier="exact")
    torch.testing.assert_close(got, F.scaled_dot_product_attention(q, k, v, **kw), **EXACT_TOL)
    want, weights = plain_math(q, k, v, **kw)
    assert torch.equal(got, want)
    out, w = AF.attention_with_weights(q, k, v, **kw, multiplier="exact")
    assert torch.equal(out, want) and torch.equal(w, weights)


def test_fully_masked_rows_give_zeros_and_zero_gradients_as_torch():
    q, k, v = (torch.randn(2, 3, s, 4, requires_grad=True) for s in (4, 5, 5))
    mask = bool_mask((4, 5))
    mask[1] = False  # query 1 sees no key
    float_mask = torch.zeros(4, 5).masked_fill(~mask, float("-inf"))
    for m in (mask, float_mask):
        got = AF.scaled_dot_product_attention(q, k, v, m, multiplier="mbm")
        want = F.scaled_dot_product_attention(q, k, v, m)
        assert torch.equal(got[..., 1, :], torch.zeros_like(got[..., 1, :]))
        assert torch.equal(want[..., 1, :], got[..., 1, :])
        grads = torch.autograd.grad(got.square().sum(), (q, k, v))
        assert all(torch.isfinite(g).all() for g in grads) and torch.equal(grads[0][..., 1, :], torch.zeros(2, 3, 4))


def test_dropout_draws_the_same_mask_as_torch():
    q, k, v, _ = make_case(CASES[0])
    torch.manual_seed(3)
    want = F.scaled_dot_product_attention(q, k, v, dropout_p=0.4)
    torch.manual_seed(3)
    got, weights = AF.attention_with_weights(q, k, v, dropout_p=0.4, multiplier="exact")
    torch.testing.assert_close(got, want, **EXACT_TOL)
    dropped = weights == 0
    assert 0.2 < dropped.float().mean() < 0.6  # about dropout_p of the weights, the others scaled by 1 / (1 - p)
    dropped_all = AF.scaled_dot_product_attention(q, k, v, dropout_p=1.0, multiplier="mbm")
    assert torch.equal(dropped_all, torch.zeros(2, 3, 4, 7))


def test_the_scale_multiplies_the_approximate_scores():
    """approx(Q K^T) * scale, exactly: the multiplier sees Q and K as given (scaling them first would change a
    log multiplier's products)."""
    q, k, v, _ = make_case(CASES[0])
    _, weights = AF.attention_with_weights(q, k, v, scale=0.37, multiplier="mitchell", backend="reference")
    scores = AF.matmul(q, k.transpose(-2, -1), multiplier="mitchell", backend="reference") * 0.37
    assert torch.equal(weights, torch.softmax(scores, -1))


# ----------------------------------------------------------------------------- approximate designs, every backend


@pytest.mark.parametrize("backend", BACKENDS, indirect=True)
@pytest.mark.parametrize("multiplier", ["mbm", "mitchell"])
def test_approximate_attention_on_every_backend(backend, multiplier):
    """The op is the plain math on the approximate matmul of the same backend, bit for bit, and matches the
    reference backend up to float32 summation order."""
    case = ("tiny", (2, 1, 3, 5), (1, 2, 4, 5), (2, 4, 3), dict(attn_mask=(1, 3, 4)))
    q, k, v, kw = make_case(case)
    got, weights = AF.attention_with_weights(q, k, v, **kw, multiplier=multiplier, backend=backend)
    approx = lambda a, b: AF.matmul(a, b, multiplier=multiplier, backend=backend)  # noqa: E731
    want, want_weights = plain_math(q, k, v, **kw, matmul=approx)
    assert torch.equal(got, want) and torch.equal(weights, want_weights)
    ref = AF.scaled_dot_product_attention(q, k, v, **kw, multiplier=multiplier, backend="reference")
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)
    assert (got - F.scaled_dot_product_attention(q, k, v, **kw)).abs().max() > 1e-4  # really approximate


@pytest.mark.parametrize("backend", ["reference", "compiled"])
def test_approximate_scores_against_the_elementwise_oracle(backend):
    q, k, v, _ = make_case(CASES[1])
    _, weights = AF.attention_with_weights(q, k, v, multiplier="mbm", backend=backend)
    terms = mbmlib.approx_mul(q[..., :, None, :], k[..., None, :, :], "mbm").double()  # (..., L, S, E)
    check_close_to_terms(AF.matmul(q, k.transpose(-2, -1), multiplier="mbm", backend=backend), terms)
    want = torch.softmax(terms.sum(-1) / math.sqrt(5), -1)
    torch.testing.assert_close(weights.double(), want, rtol=1e-5, atol=1e-6)


def test_straight_through_gradients_of_approximate_attention():
    """backward="exact": each matmul's gradient is the exact one at the approximate forward, softmax exact."""
    q, k, v, kw = make_case(CASES[4])
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    AF.scaled_dot_product_attention(*leaves, **kw, multiplier="mbm", backend="reference").square().sum().backward()

    def straight_through(a, b):
        exact = torch.matmul(a, b)
        return exact + (AF.matmul(a.detach(), b.detach(), multiplier="mbm", backend="reference") - exact).detach()

    twins = [t.clone().requires_grad_() for t in (q, k, v)]
    plain_math(*twins, **kw, matmul=straight_through)[0].square().sum().backward()
    for got, want in zip(leaves, twins):
        torch.testing.assert_close(got.grad, want.grad, rtol=1e-4, atol=1e-5)


def test_gradcheck_exact_multiplier_float64():
    """gradcheck needs a differentiable forward: the exact design (approximate designs are piecewise in the
    mantissas, and their backward is straight-through or approximate by design).  Masks, causal, broadcast
    batch dims and grouped-query heads all pass through autograd."""
    cases = [("gqa-mask", (1, 4, 2, 3), (1, 2, 3, 3), (1, 1, 3, 2), dict(attn_mask=(2, 3), enable_gqa=True)),
             ("broadcast-float-mask", (2, 1, 2, 3), (1, 2, 3, 3), (3, 2), dict(float_mask=(2, 1, 3))),
             ("causal", (3, 3), (4, 3), (4, 2), dict(is_causal=True))]
    for case in cases:
        q, k, v, kw = make_case(case, dtype=torch.float64)
        if kw.get("attn_mask") is not None and kw["attn_mask"].dtype == torch.bool:
            kw["attn_mask"][..., 0] = True  # no fully masked row: softmax is smooth everywhere then
        leaves = tuple(t.requires_grad_() for t in (q, k, v))
        assert torch.autograd.gradcheck(
            lambda q, k, v: AF.scaled_dot_product_attention(q, k, v, **kw, multiplier="exact"), leaves)


# ----------------------------------------------------------------------------- errors


def test_errors_are_torchs_or_say_what_to_do():
    q, k, v = torch.randn(2, 3, 4, 5), torch.randn(2, 3, 6, 5), torch.randn(2, 3, 6, 7)
    with pytest.raises(RuntimeError, match="Explicit attn_mask should not be set when is_causal=True"):
        AF.scaled_dot_product_attention(q, k, v, torch.ones(4, 6, dtype=torch.bool), is_causal=True)
    with pytest.raises(RuntimeError, match="attn_mask dtype to be bool or float"):
        AF.scaled_dot_product_attention(q, k, v, torch.ones(4, 6, dtype=torch.int32))
    with pytest.raises(RuntimeError, match="size"):
        AF.scaled_dot_product_attention(q, k[..., :4], v)
    with pytest.raises(RuntimeError, match="heads of key .* to divide the query's 3 heads"):
        AF.scaled_dot_product_attention(q, torch.randn(2, 2, 6, 5), torch.randn(2, 2, 6, 7), enable_gqa=True)
    with pytest.raises(ValueError, match="needs scales.*ApproxMultiheadAttention"):
        AF.scaled_dot_product_attention(q, k, v, multiplier="mbm-int8")
    with pytest.raises(RuntimeError, match="dropout probability"):
        AF.scaled_dot_product_attention(q, k, v, dropout_p=1.5)


# ----------------------------------------------------------------------------- bmm


def test_bmm_follows_torch_bmm():
    a, b = torch.randn(3, 4, 6), torch.randn(3, 6, 5)
    assert torch.equal(AF.bmm(a, b, multiplier="exact"), torch.bmm(a, b))
    got = AF.bmm(a, b, multiplier="mbm", backend="compiled")
    check_close_to_terms(got, mbmlib.approx_mul(a[:, :, None, :], b.transpose(1, 2)[:, None], "mbm").double())
    for bad in ((a[0], b), (a, b[:2]), (a, b[:, :5])):
        with pytest.raises(RuntimeError) as ours:
            AF.bmm(*bad)
        with pytest.raises(RuntimeError) as torchs:
            torch.bmm(*bad)
        assert str(ours.value) == str(torchs.value)
    a64, b64 = a[:2, :3, :4].double().requires_grad_(), b[:2, :4, :3].double().requires_grad_()
    for backward in ("exact", "approx"):  # the custom op's own backward, at the exact design
        assert torch.autograd.gradcheck(lambda a, b: AF.bmm(a, b, multiplier="exact", backward=backward), (a64, b64))


# ----------------------------------------------------------------------------- quantised matmul of two activations


def quantised_direct(a, b, name, s_a, s_b):
    """a @ b from the elementwise integer op: both operands quantised per tensor, exact sums, then scaled."""
    mult = mbmlib.as_multiplier(name)
    qa = quant.quantise(a, torch.tensor(s_a), mult)
    qb = quant.quantise(b, torch.tensor(s_b), mult)
    sums = mbmlib.approx_mul(qa[..., :, :, None], qb[..., None, :, :], name).sum(-2)  # exact int64
    return (sums.double() * (torch.tensor(s_a).double() * torch.tensor(s_b).double())).float()


@pytest.mark.parametrize("backend", BACKENDS, indirect=True)
def test_quantised_matmul_on_every_backend(backend):
    gen = torch.Generator().manual_seed(4)
    a, b = torch.randn(2, 1, 3, 6, generator=gen), torch.randn(3, 6, 4, generator=gen)  # broadcast batch dims
    got = quant.matmul(a, b, a_scale=0.03, b_scale=0.02, multiplier="mbm-int8", backend=backend)
    want = quantised_direct(a.expand(2, 3, 3, 6), b.expand(2, 3, 6, 4), "mbm-int8", 0.03, 0.02)
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-7)


def test_quantised_matmul_gradients_nan_and_errors():
    a, b = torch.randn(2, 3, 5, requires_grad=True), torch.randn(5, 4, requires_grad=True)
    out = quant.matmul(a, b, a_scale=0.02, b_scale=torch.tensor(0.02), multiplier="mitchell-int8")
    g = torch.randn_like(out)
    ga, gb = torch.autograd.grad(out, (a, b), g)
    torch.testing.assert_close(ga, g @ b.detach().T)  # straight-through to both operands
    torch.testing.assert_close(gb, (a.detach().transpose(1, 2) @ g).sum(0))
    bad = a.detach().clone()
    bad[0, 1, 2] = float("nan")
    out = quant.matmul(bad, b.detach(), a_scale=0.02, b_scale=0.02)
    assert torch.isnan(out[0, 1]).all() and torch.isfinite(out[0, [0, 2]]).all() and torch.isfinite(out[1]).all()
    with pytest.raises(ValueError, match="b_scale must be one number"):
        quant.matmul(a, b, a_scale=0.02, b_scale=torch.full((4,), 0.02))
    with pytest.raises(ValueError, match="integer or table multiplier"):
        quant.matmul(a, b, a_scale=0.02, b_scale=0.02, multiplier="mbm")
    with pytest.raises(RuntimeError):
        quant.matmul(a, b[:4], a_scale=0.02, b_scale=0.02)


def test_opcheck_the_ops_on_attention_operands():
    """The custom ops take the broadcast, transposed views attention hands them."""
    from mbmlib.functional import _bmm_nt, _nt_operands
    from mbmlib.quant import _bmm_nt_quant

    q, k = torch.randn(2, 1, 3, 5, requires_grad=True), torch.randn(1, 2, 4, 5, requires_grad=True)
    a3, b3, _ = _nt_operands(q, k.transpose(-2, -1))
    torch.library.opcheck(_bmm_nt, (a3, b3, "mbm", "approx", "reference"))
    torch.library.opcheck(_bmm_nt_quant, (a3, b3, torch.tensor(0.02), torch.full((4,), 0.03), "mbm-int8",
                                          "reference"))


# ----------------------------------------------------------------------------- ApproxMatmul and its quantiser


def test_approx_matmul_layer_is_the_functional_op():
    a, b = torch.randn(2, 3, 4), torch.randn(4, 5)
    layer = ApproxMatmul("mitchell", backend="reference")
    assert torch.equal(layer(a, b), AF.matmul(a, b, multiplier="mitchell", backend="reference"))
    assert "multiplier=mitchell" in repr(layer)
    with pytest.raises(TypeError, match="MatmulQuantSpec"):
        ApproxMatmul("mbm-int8", quant=mbmlib.QuantSpec(act_scale=0.1))
    with pytest.raises(ValueError, match="MatmulQuantSpec.a_scale must be a positive"):
        MatmulQuantSpec(a_scale=-1.0)


def test_integer_matmul_layer_observes_calibrates_and_round_trips():
    gen = torch.Generator().manual_seed(2)
    batches = [(torch.randn(2, 3, 4, generator=gen), torch.randn(4, 5, generator=gen) * 3) for _ in range(3)]
    layer = ApproxMatmul("mbm-int8").eval()
    with pytest.raises(RuntimeError, match="no scales yet.*MatmulQuantSpec"):
        layer(*batches[0])
    layer.train()(*batches[0])  # train mode: moving-average observers, first step = that batch's range
    assert torch.allclose(layer.quantiser.a_scale, batches[0][0].abs().max() / 255)  # mbm-int8: magnitudes to 255
    assert torch.allclose(layer.quantiser.b_scale, batches[0][1].abs().max() / 255)

    class Pair(torch.nn.Module):  # calibrate() feeds models one input: a pair packed in one tensor
        def __init__(self):
            super().__init__()
            self.mm = ApproxMatmul("mbm-int8")

        def forward(self, x):  # (B, 5, 9): a = x[..., :4] (B, 5, 4), b = x[0, :4, 4:] (4, 5)
            return self.mm(x[..., :4], x[0, :4, 4:])

    model = Pair()
    data = [torch.randn(2, 5, 9, generator=gen) for _ in range(3)]
    calibrate(model, data)
    q = model.mm.quantiser
    assert q.calibrated and torch.allclose(q.a_scale, torch.stack([x[..., :4].abs().max() for x in data]).max() / 255)
    assert torch.allclose(q.b_scale, torch.stack([x[0, :4, 4:].abs().max() for x in data]).max() / 255)
    frozen = q.a_scale.clone()
    model.train()(data[0] * 10)
    assert torch.equal(q.a_scale, frozen)  # calibrated scales stay
    twin = Pair()
    twin.load_state_dict(model.state_dict())
    assert twin.mm.quantiser.calibrated and torch.equal(twin.eval()(data[1]), model.eval()(data[1]))
    fixed = ApproxMatmul("mbm-int8", quant=MatmulQuantSpec(a_scale=0.05, b_scale=0.04)).eval()
    a, b = batches[1]
    assert torch.equal(fixed(a, b), quant.matmul(a, b, a_scale=0.05, b_scale=0.04))
    assert fixed.load_state_dict(ApproxMatmul("exact").state_dict(), strict=False).missing_keys == []
