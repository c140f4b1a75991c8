"""Approximate conv2d / linear / matmul: every backend against float64 oracles and F.conv2d."""
import pytest
import torch
import torch.nn.functional as F

from mbmlib import functional as AF
from oracle import check_close_to_terms, conv2d_terms, linear_terms

CPU_BACKENDS = ["reference", "compiled"]
MULTIPLIERS = ["mbm", "mitchell", "mbm-t16"]

# (name, input shape, weight shape, kwargs)
CONV_CASES = [
    ("batch1-odd", (1, 3, 7, 5), (5, 3, 3, 3), dict(padding=1)),
    ("stride2", (2, 4, 9, 8), (6, 4, 3, 3), dict(stride=2, padding=1)),
    ("same-even-kernel", (2, 3, 6, 7), (4, 3, 2, 4), dict(padding="same")),
    ("valid", (2, 3, 6, 7), (4, 3, 3, 3), dict(padding="valid")),
    ("dilation2", (2, 3, 9, 9), (4, 3, 3, 3), dict(dilation=2, padding=2)),
    ("groups2", (2, 4, 6, 6), (6, 2, 3, 3), dict(groups=2, padding=1)),
    ("depthwise", (2, 5, 6, 6), (5, 1, 3, 3), dict(groups=5, padding=1)),
    ("1x1", (3, 7, 4, 5), (3, 7, 1, 1), dict()),
    ("5x5-stride2-pad2", (2, 3, 11, 10), (4, 3, 5, 5), dict(stride=2, padding=2)),
    ("rect-args", (2, 3, 8, 9), (4, 3, 3, 2), dict(stride=(2, 1), padding=(1, 0), dilation=(1, 2))),
]


def explicit_padding(w_shape, kwargs):
    """The (asymmetric) padding the oracle applies for string padding."""
    pad = kwargs.get("padding", 0)
    if pad == "valid":
        return None
    if pad == "same":
        d = kwargs.get("dilation", 1)
        total = [d * (k - 1) for k in w_shape[2:]]
        return [total[1] // 2, total[1] - total[1] // 2, total[0] // 2, total[0] - total[0] // 2]
    return None


def oracle_conv_terms(x, w, kwargs, multiplier):
    pad = kwargs.get("padding", 0)
    if isinstance(pad, str):
        x = F.pad(x, explicit_padding(w.shape, kwargs)) if pad == "same" else x
        pad = 0
    return conv2d_terms(x, w, kwargs.get("stride", 1), pad, kwargs.get("dilation", 1), kwargs.get("groups", 1),
                        multiplier)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("case", CONV_CASES, ids=[c[0] for c in CONV_CASES])
def test_conv2d_exact_multiplier_matches_torch(backend, case):
    _, xs, ws, kwargs = case
    x, w, b = torch.randn(*xs), torch.randn(*ws), torch.randn(ws[0])
    got = AF.conv2d(x, w, b, **kwargs, multiplier="exact", backend=backend)
    torch.testing.assert_close(got, F.conv2d(x, w, b, **kwargs), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("case", CONV_CASES, ids=[c[0] for c in CONV_CASES])
@pytest.mark.parametrize("multiplier", MULTIPLIERS)
def test_conv2d_approx_matches_oracle(backend, case, multiplier):
    _, xs, ws, kwargs = case
    x, w = torch.randn(*xs), torch.randn(*ws)
    got = AF.conv2d(x, w, None, **kwargs, multiplier=multiplier, backend=backend)
    assert got.shape == F.conv2d(x, w, None, **kwargs).shape
    check_close_to_terms(got, oracle_conv_terms(x, w, kwargs, multiplier))


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("layout", ["channels_last", "non_contiguous", "unbatched"])
def test_conv2d_layouts(backend, layout):
    x, w, b = torch.randn(2, 4, 8, 8), torch.randn(3, 4, 3, 3), torch.randn(3)
    want = AF.conv2d(x, w, b, padding=1, backend="reference")
    if layout == "channels_last":
        got = AF.conv2d(x.to(memory_format=torch.channels_last), w.to(memory_format=torch.channels_last), b,
                        padding=1, backend=backend)
    elif layout == "non_contiguous":
        xt = x.transpose(2, 3).contiguous().transpose(2, 3)  # same values, transposed strides
        got = AF.conv2d(xt, w[:, :, :, :], b, padding=1, backend=backend)
        assert not xt.is_contiguous()
    else:
        got = torch.stack([AF.conv2d(x[i], w, b, padding=1, backend=backend) for i in range(2)])
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_conv2d_bias_added_exactly():
    x, w, b = torch.randn(1, 2, 5, 5), torch.randn(3, 2, 3, 3), torch.randn(3)
    with_bias = AF.conv2d(x, w, b, backend="reference")
    without = AF.conv2d(x, w, None, backend="reference")
    assert torch.equal(with_bias, without + b.view(1, -1, 1, 1))


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("multiplier", MULTIPLIERS + ["exact"])
@pytest.mark.parametrize("shape", [(1, 1, 1), (3, 17, 5), (33, 64, 10), (7, 300, 2)])
def test_linear_matches_oracle(backend, multiplier, shape):
    M, K, N = shape
    x, w, b = torch.randn(M, K), torch.randn(N, K), torch.randn(N)
    got = AF.linear(x, w, b, multiplier=multiplier, backend=backend)
    if multiplier == "exact":
        torch.testing.assert_close(got, F.linear(x, w, b), rtol=1e-5, atol=1e-5)
    else:
        check_close_to_terms(got - b, linear_terms(x, w, multiplier))


def test_linear_batched_input_shapes():
    x, w = torch.randn(2, 3, 5, 7), torch.randn(4, 7)
    got = AF.linear(x, w, multiplier="mbm", backend="reference")
    assert got.shape == (2, 3, 5, 4)
    torch.testing.assert_close(got.reshape(-1, 4), AF.linear(x.reshape(-1, 7), w, multiplier="mbm",
                                                             backend="reference"))


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("shapes", [((5, 7), (7, 3)), ((7,), (7, 3)), ((5, 7), (7,)), ((2, 5, 7), (7, 3)),
                                    ((2, 1, 5, 7), (3, 7, 4))])
def test_matmul_shapes_and_values(backend, shapes):
    a, b = torch.randn(*shapes[0]), torch.randn(*shapes[1])
    got = AF.matmul(a, b, multiplier="mbm", backend=backend)
    want_shape = torch.matmul(a, b).shape
    assert got.shape == want_shape
    a2 = a if a.dim() > 1 else a[None]
    b2 = b if b.dim() > 1 else b[:, None]
    flat_a = a2.expand(*torch.broadcast_shapes(a2.shape[:-2], b2.shape[:-2]), *a2.shape[-2:]).reshape(
        -1, *a2.shape[-2:])
    flat_b = b2.expand(*torch.broadcast_shapes(a2.shape[:-2], b2.shape[:-2]), *b2.shape[-2:]).reshape(
        -1, *b2.shape[-2:])
    for g in range(flat_a.shape[0]):
        check_close_to_terms(got.reshape(flat_a.shape[0], flat_a.shape[1], flat_b.shape[2])[g],
                             linear_terms(flat_a[g], flat_b[g].T.contiguous(), "mbm"))


def test_matmul_exact_matches_torch():
    a, b = torch.randn(3, 5, 7), torch.randn(7, 2)
    torch.testing.assert_close(AF.matmul(a, b, multiplier="exact"), torch.matmul(a, b))


# ----------------------------------------------------------------------------- gradients


@pytest.mark.parametrize("case", CONV_CASES[:6], ids=[c[0] for c in CONV_CASES[:6]])
def test_conv2d_backward_exact_equals_exact_layer_gradients(case):
    _, xs, ws, kwargs = case
    x = torch.randn(*xs, requires_grad=True)
    w = torch.randn(*ws, requires_grad=True)
    b = torch.randn(ws[0], requires_grad=True)
    out = AF.conv2d(x, w, b, **kwargs, multiplier="mbm", backward="exact", backend="compiled")
    g = torch.randn_like(out)
    grads = torch.autograd.grad(out, (x, w, b), g)
    want = torch.autograd.grad(F.conv2d(x, w, b, **kwargs), (x, w, b), g)
    for got_g, want_g in zip(grads, want):  # the same aten backward as F.conv2d's, bit for bit
        assert torch.equal(got_g, want_g)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("case", [CONV_CASES[i] for i in (0, 1, 4, 5, 6, 8)],
                         ids=[CONV_CASES[i][0] for i in (0, 1, 4, 5, 6, 8)])
def test_conv2d_backward_approx_uses_approximate_products(backend, case):
    _, xs, ws, kwargs = case
    x = torch.randn(*xs, requires_grad=True)
    w = torch.randn(*ws, requires_grad=True)
    out = AF.conv2d(x, w, None, **kwargs, multiplier="mbm", backward="approx", backend=backend)
    g = torch.randn_like(out)
    gx, gw = torch.autograd.grad(out, (x, w), g)
    # oracle: grad_x = fold(sum_o approx(g, w)), grad_w = sum_{b,l} approx(g, patch), float64
    stride, padding = kwargs.get("stride", 1), kwargs.get("padding", 0)
    dilation, groups = kwargs.get("dilation", 1), kwargs.get("groups", 1)
    B, C, H, W = xs
    O, Cg, kh, kw = ws
    L = g.shape[2] * g.shape[3]
    gg = g.reshape(B, groups, O // groups, L)
    wg = w.detach().reshape(groups, O // groups, Cg * kh * kw)
    from mbmlib import approx_mul
    terms_x = approx_mul(gg[:, :, :, :, None], wg[None, :, :, None, :], "mbm").double()  # (B, G, Og, L, Kg)
    grad_cols = terms_x.sum(2).permute(0, 1, 3, 2).reshape(B, C * kh * kw, L)
    want_gx = F.fold(grad_cols, (H, W), (kh, kw), dilation=dilation, padding=padding, stride=stride)
    scale_x = F.fold(terms_x.abs().sum(2).permute(0, 1, 3, 2).reshape(B, C * kh * kw, L), (H, W), (kh, kw),
                     dilation=dilation, padding=padding, stride=stride)
    assert ((gx.double() - want_gx).abs() <= 1e-5 * scale_x + 1e-30).all()
    cols = F.unfold(x.detach(), (kh, kw), dilation=dilation, padding=padding, stride=stride).view(
        B, groups, Cg * kh * kw, L)
    terms_w = approx_mul(gg[:, :, :, None, :], cols[:, :, None, :, :], "mbm").double()  # (B, G, Og, Kg, L)
    check_close_to_terms(gw.reshape(groups, O // groups, -1),
                         terms_w.permute(1, 2, 3, 0, 4).reshape(groups, O // groups, Cg * kh * kw, -1))


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_linear_backward_modes(backend):
    x = torch.randn(6, 9, requires_grad=True)
    w = torch.randn(4, 9, requires_grad=True)
    out = AF.linear(x, w, multiplier="mbm", backward="exact", backend=backend)
    g = torch.randn_like(out)
    gx, gw = torch.autograd.grad(out, (x, w), g)
    torch.testing.assert_close(gx, g @ w.detach())
    torch.testing.assert_close(gw, g.T @ x.detach())
    out = AF.linear(x, w, multiplier="mbm", backward="approx", backend=backend)
    gx, gw = torch.autograd.grad(out, (x, w), g)
    check_close_to_terms(gx, linear_terms(g, w.detach().T.contiguous(), "mbm"))
    check_close_to_terms(gw, linear_terms(g.T.contiguous(), x.detach().T.contiguous(), "mbm"))


@pytest.mark.parametrize("backward", ["exact", "approx"])
def test_gradcheck_exact_multiplier_float64(backward):
    x = torch.randn(2, 4, 6, 5, dtype=torch.float64, requires_grad=True)
    w = torch.randn(6, 2, 3, 3, dtype=torch.float64, requires_grad=True)
    b = torch.randn(6, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(
        lambda x, w, b: AF.conv2d(x, w, b, stride=2, padding=1, groups=2, multiplier="exact", backward=backward),
        (x, w, b))
    xl = torch.randn(3, 7, dtype=torch.float64, requires_grad=True)
    wl = torch.randn(5, 7, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x, w: AF.linear(x, w, multiplier="exact", backward=backward), (xl, wl))
    assert torch.autograd.gradcheck(lambda a, b: AF.matmul(a, b, multiplier="exact", backward=backward),
                                    (xl, wl.T.detach().clone().requires_grad_()))


def test_opcheck_custom_ops():
    from mbmlib.functional import _bmm_nt, _conv2d

    x, w = torch.randn(2, 3, 6, 6, requires_grad=True), torch.randn(4, 3, 3, 3, requires_grad=True)
    b = torch.randn(4, requires_grad=True)
    torch.library.opcheck(_conv2d, (x, w, b, [1, 1], [1, 1], [1, 1], 1, "mbm", "exact", "reference"))
    torch.library.opcheck(_conv2d, (x, w, None, [2, 2], [0, 0], [1, 1], 1, "mitchell", "approx", "reference"))
    a, b = torch.randn(2, 5, 7, requires_grad=True), torch.randn(2, 3, 7, requires_grad=True)
    torch.library.opcheck(_bmm_nt, (a, b, "mbm", "approx", "reference"))


def test_layers_work_under_torch_compile():
    x, w = torch.randn(2, 3, 6, 6), torch.randn(4, 3, 3, 3)

    def f(x, w):
        return AF.conv2d(torch.relu(x), w, padding=1, multiplier="mbm", backend="reference").sum(dim=(2, 3))

    eager = f(x, w)
    compiled = torch.compile(f, fullgraph=True)(x, w)
    torch.testing.assert_close(compiled, eager)


# ----------------------------------------------------------------------------- bad input


def test_bad_input_errors():
    x, w = torch.randn(2, 3, 6, 6), torch.randn(4, 3, 3, 3)
    with pytest.raises(TypeError, match="floating-point"):
        AF.conv2d(x.long(), w.long())
    with pytest.raises(RuntimeError, match="should be the same"):
        AF.conv2d(x.double(), w)
    with pytest.raises(RuntimeError, match="expected input.*to have 4 channels, but got 3"):
        AF.conv2d(x, torch.randn(4, 4, 3, 3))
    with pytest.raises(RuntimeError, match="3D .unbatched. or 4D"):
        AF.conv2d(torch.randn(6, 6), w)
    with pytest.raises(RuntimeError, match="weight must be 4-D"):
        AF.conv2d(x, torch.randn(4, 3, 3))
    with pytest.raises(RuntimeError, match="same device"):
        AF.conv2d(x, w.to("meta"))
    with pytest.raises(ValueError, match="valid names"):
        AF.conv2d(x, w, multiplier="booth")
    with pytest.raises(ValueError, match="valid modes"):
        AF.conv2d(x, w, backward="ste")
    with pytest.raises(ValueError, match="valid backends"):
        AF.conv2d(x, w, backend="cuda-magic")
    with pytest.raises(RuntimeError):
        AF.conv2d(x, w, padding="same", stride=2)  # as F.conv2d
    with pytest.raises(RuntimeError):
        AF.linear(torch.randn(3, 5), torch.randn(4, 6))
    with pytest.raises(RuntimeError):
        AF.matmul(torch.randn(3, 5), torch.randn(4, 6))
    with pytest.raises(TypeError):
        AF.linear([1.0, 2.0], torch.randn(4, 2))


def test_half_precision_inputs_computed_in_float32():
    x, w = torch.randn(2, 3, 5, 5), torch.randn(4, 3, 3, 3)
    for dt in (torch.float16, torch.bfloat16):
        got = AF.conv2d(x.to(dt), w.to(dt), multiplier="mbm", backend="reference")
        assert got.dtype == dt
        want = AF.conv2d(x.to(dt).float(), w.to(dt).float(), multiplier="mbm", backend="reference").to(dt)
        assert torch.equal(got, want)


@pytest.mark.parametrize("kwargs, error, message", [
    (dict(padding=-1), RuntimeError, "negative padding"),
    (dict(padding=(1, -1)), RuntimeError, "negative padding"),
    (dict(padding=(1, 2, 3)), RuntimeError, "single integer or a list of 2"),
    (dict(padding=1.5), TypeError, "padding must be an integer"),
    (dict(dilation=0), RuntimeError, "non-positive dilation"),
    (dict(stride=0), RuntimeError, "non-positive stride"),
    (dict(stride=(1, -2)), RuntimeError, "non-positive stride"),
    (dict(groups=0), RuntimeError, "non-positive groups"),
    (dict(bias=(6, 1)), RuntimeError, "expected bias to be 1-dimensional with 6 elements"),
    (dict(bias=(5,)), RuntimeError, "expected bias to be 1-dimensional with 6 elements"),
])
def test_conv2d_rejects_what_torch_rejects(kwargs, error, message):
    x, w = torch.randn(2, 3, 6, 6), torch.randn(6, 3, 3, 3)
    kwargs = dict(kwargs)
    bias = torch.randn(*kwargs.pop("bias")) if "bias" in kwargs else None
    with pytest.raises(error):
        F.conv2d(x, w, bias, **kwargs)
    with pytest.raises(error, match=message):
        AF.conv2d(x, w, bias, **kwargs, backend="reference")


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("multiplier", ["mbm", "exact"])
def test_empty_sums_are_zeros_as_in_torch(backend, multiplier):
    x, w, b = torch.randn(3, 0, requires_grad=True), torch.randn(4, 0), torch.randn(4)
    got = AF.linear(x, w, b, multiplier=multiplier, backend=backend)
    assert torch.equal(got, F.linear(x, w, b))
    got.sum().backward()
    assert x.grad.shape == (3, 0)
    assert torch.equal(AF.linear(x, w, multiplier=multiplier, backend=backend), torch.zeros(3, 4))
    a, m = torch.randn(2, 3, 0), torch.randn(0, 5)
    assert torch.equal(AF.matmul(a, m, multiplier=multiplier, backend=backend), torch.zeros(2, 3, 5))
