"""Triton backend (mbmlib.kernels.triton) against the reference backend.

Without CUDA the kernels run in Triton's interpreter (``TRITON_INTERPRET=1``), slowly, so the shapes
are small; :mod:`triton_backend` says how the backend is imported for that.
"""
import warnings

import pytest
import torch
import torch.nn.functional as F

import mbmlib
from triton_backend import triton_backend
from mbmlib import kernels
from mbmlib.kernels import fallback, reference
from mbmlib.multipliers import Multiplier, as_multiplier

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


_BACKEND, _SKIP_REASON = triton_backend()
pytestmark = pytest.mark.skipif(_BACKEND is None, reason=_SKIP_REASON or "")

APPROX = ["mbm", "mitchell", "mbm-t16", "mitchell-t8"]

# (G, M, N, K): every pair of {1, 3, 5, 17} occurs for (M, N), (M, K) and (N, K) (a Latin square).  Against the
# interpreter's 16 x 4 tile (lanes along the longer of M and N, so N > M swaps the operands): 1 and 3 are one
# partial tile, 5 one full N tile and a tail, 17 a full M tile and a tail (and four N tiles and a tail); K = 1 is
# single products, G = 2 the batch axis of the grid.
_SIZES = (1, 3, 5, 17)
BMM_SHAPES = [(1 + (i + j) % 2, _SIZES[i], _SIZES[j], _SIZES[(i + j) % 4]) for i in range(4) for j in range(4)]

FLOAT_MIN_NORMAL = 2.0**-126
# The interpreter runs the kernels in numpy, which warns about the inf - inf and 0 * inf the tests ask for.
numpy_specials = pytest.mark.filterwarnings("ignore:(invalid value|overflow) encountered:RuntimeWarning")


@pytest.fixture(scope="module")
def tk():
    return _BACKEND


def randn(*shape, seed):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=gen)


def assert_close_to_reference(out, ref, abs_sum, rtol=1e-5):
    """Same NaN and inf positions (infs with sign); elsewhere |out - ref| <= rtol * sum_k |product|.

    The kernels sum over K in a different order than the reference, so only the float32 rounding of
    the sums may differ; ``abs_sum`` is the reference sum of |products| (approx(|a|, |b|) = |approx(a, b)|).
    """
    out, ref, abs_sum = out.cpu(), ref.cpu(), abs_sum.cpu()
    assert out.shape == ref.shape and out.dtype == torch.float32
    nan = torch.isnan(ref)
    assert torch.equal(torch.isnan(out), nan), f"NaN positions differ: {int((torch.isnan(out) != nan).sum())}"
    inf = torch.isinf(ref)
    assert torch.equal(torch.isinf(out), inf), "inf positions differ"
    assert torch.equal(out[inf], ref[inf]), "infinities of different sign"
    fin = ~(nan | inf)
    err = (out[fin] - ref[fin]).abs()
    bound = rtol * abs_sum[fin] + 1e-30
    bad = err > bound
    assert not bad.any(), (f"{int(bad.sum())} of {bad.numel()} outputs off; worst "
                           f"{float((err / (abs_sum[fin] + 1e-30)).max()):.2e} relative to sum |products|")


def check_bmm(tk, a, b, name, **kw):
    m = as_multiplier(name)
    out = tk.bmm_nt(a.to(DEVICE), b.to(DEVICE), m, **kw)
    assert out.shape == (a.shape[0], a.shape[1], b.shape[1]) and out.is_contiguous()
    assert_close_to_reference(out, reference.bmm_nt(a, b, m), reference.bmm_nt(a.abs(), b.abs(), m))
    return out


# --------------------------------------------------------------------------- bmm_nt

@pytest.mark.parametrize("shape", BMM_SHAPES, ids=[f"G{g}-M{m}-N{n}-K{k}" for g, m, n, k in BMM_SHAPES])
@pytest.mark.parametrize("name", APPROX)
def test_bmm_nt_matches_reference(tk, name, shape):
    G, M, N, K = shape
    check_bmm(tk, randn(G, M, K, seed=M * 1000 + K), randn(G, N, K, seed=N * 1000 + K + 7), name)


def test_exact_multiplier_never_reaches_the_kernels(tk):
    """The ops run PyTorch's own kernels for "exact"; a backend handed it refuses instead of guessing."""
    a, w = randn(1, 3, 4, seed=1).to(DEVICE), randn(1, 1, 3, 3, seed=2).to(DEVICE)
    with pytest.raises(ValueError, match="exact"):
        tk.bmm_nt(a, a, as_multiplier("exact"))
    with pytest.raises(ValueError, match="exact"):
        tk.conv2d(randn(1, 1, 5, 5, seed=3).to(DEVICE), w, (1, 1), (0, 0), (1, 1), 1, as_multiplier("exact"))


@pytest.mark.parametrize("layout", ["transposed", "strided", "expanded"])
@pytest.mark.parametrize("name", ["mbm", "mitchell-t8"])
def test_bmm_nt_non_contiguous(tk, name, layout):
    G, M, N, K = 2, 5, 17, 3  # N > M: the operands swap; 2 x 2 tiles, both with tails
    if layout == "transposed":  # K-major operands: the TN layout
        a = randn(G, K, M, seed=3).transpose(1, 2)
        b = randn(G, K, N, seed=4).transpose(1, 2)
    elif layout == "strided":  # every other row / column of larger tensors
        a = randn(G, 2 * M, 2 * K, seed=5)[:, ::2, 1::2]
        b = randn(2 * G, N, K + 3, seed=6)[::2, :, 3:]
    else:  # a broadcast batch (stride 0)
        a = randn(1, M, K, seed=7).expand(G, M, K)
        b = randn(G, N, K, seed=8)
    assert not a.is_contiguous()
    check_bmm(tk, a, b, name)


def _edge_operands(seed):
    """Values whose mantissas sit on the carry / correction / corner-case boundaries, plus specials."""
    one = 1 << 23
    fields = torch.tensor([0, 1, 2, 0x5FFFF, 0x60000, 0x7FFFF, one // 2 - 1, one // 2, one // 2 + 1,
                           one - 0xA0000, one - 0x50000, one - 0x50001, one - 0x28000, one - 2, one - 1], dtype=torch.int32)
    exps = torch.tensor([127, 126, 130, 100, 150, 1, 254], dtype=torch.int32)  # 1.0, 0.5, 8, tiny, huge, ...
    gen = torch.Generator().manual_seed(seed)
    f = fields[torch.randint(0, len(fields), (40,), generator=gen)]
    e = exps[torch.randint(0, len(exps), (40,), generator=gen)]
    s = torch.randint(0, 2, (40,), generator=gen, dtype=torch.int32) << 31
    vals = (s | (e << 23) | f).view(torch.float32)
    specials = torch.tensor([0.0, -0.0, float("inf"), float("-inf"), float("nan"), 1e-40, -3e-39,
                             FLOAT_MIN_NORMAL, 3.0e38, 1.0, 1.5, -2.5], dtype=torch.float32)
    return torch.cat([vals, specials])


@numpy_specials
@pytest.mark.parametrize("name", APPROX + ["mbm-t18", "mbm-t20", "mitchell-t22"])
def test_bmm_nt_single_products_are_bit_exact(tk, name):
    """K = 1: every output is one product, so it must equal the reference product bit for bit."""
    m = as_multiplier(name)
    a, b = _edge_operands(11)[None, :, None], _edge_operands(12)[None, :, None]  # (1, 52, 1)
    out = tk.bmm_nt(a.to(DEVICE), b.to(DEVICE), m).cpu()
    ref = reference.bmm_nt(a, b, m)
    nan = torch.isnan(ref)
    assert torch.equal(torch.isnan(out), nan)
    tiny = ref.abs() < FLOAT_MIN_NORMAL  # a GPU may flush subnormal products; the SPEC flushes them too
    assert (out[tiny].abs() < FLOAT_MIN_NORMAL).all()
    keep = ~(nan | tiny)
    assert torch.equal(out[keep], ref[keep])


@numpy_specials
@pytest.mark.parametrize("name", ["mbm", "mitchell"])
def test_bmm_nt_special_values(tk, name):
    G, M, N, K = 2, 9, 11, 17
    a, b = randn(G, M, K, seed=21), randn(G, N, K, seed=22)
    gen = torch.Generator().manual_seed(23)
    specials = torch.tensor([0.0, -0.0, float("inf"), float("-inf"), float("nan"), 1e-40, -1e-39])
    for t in (a, b):
        idx = torch.randint(0, t.numel(), (12,), generator=gen)
        t.view(-1)[idx] = specials[torch.randint(0, len(specials), (12,), generator=gen)]
    a[0, 0] = 0.0  # a zero row against infinite weights gives NaN (0 * inf) ...
    b[0, 0, 0] = float("inf")
    a[1, 1, :] = 1e-40  # ... and a subnormal row counts as zero
    out = check_bmm(tk, a, b, name)
    assert torch.isnan(out[0, 0, 0])
    assert torch.equal(torch.isnan(out[1, 1]).cpu(), (~torch.isfinite(b[1])).any(1))


def test_bmm_nt_empty_and_errors(tk):
    m = as_multiplier("mbm")
    z = lambda *s: torch.zeros(*s, device=DEVICE)  # noqa: E731
    assert tk.bmm_nt(z(2, 0, 3), z(2, 4, 3), m).shape == (2, 0, 4)
    assert torch.equal(tk.bmm_nt(z(2, 3, 0), z(2, 4, 0), m), z(2, 3, 4))
    with pytest.raises(TypeError, match="float32"):
        tk.bmm_nt(z(1, 2, 3).double(), z(1, 2, 3), m)
    with pytest.raises(ValueError, match="expects"):
        tk.bmm_nt(z(1, 2, 3), z(1, 2, 4), m)
    with pytest.raises(ValueError, match="expects"):
        tk.bmm_nt(z(2, 3), z(2, 3), m)


# --------------------------------------------------------------------------- conv2d

def _out_size(n, k, s, p, d):
    return (n + 2 * p - d * (k - 1) - 1) // s + 1


def reference_conv2d(x, w, stride, padding, dilation, groups, m):
    """im2col with F.unfold, then the reference bmm_nt, per group."""
    B, _, H, W = x.shape
    O, Cg, kh, kw = w.shape
    cols = F.unfold(x, (kh, kw), dilation=dilation, padding=padding, stride=stride)  # (B, C*kh*kw, L), K=(c,i,j)
    L = cols.shape[-1]
    a = cols.view(B, groups, Cg * kh * kw, L).permute(1, 0, 3, 2).reshape(groups, B * L, Cg * kh * kw)
    out = reference.bmm_nt(a, w.reshape(groups, O // groups, Cg * kh * kw), m)  # (G, B*L, O/G)
    Ho, Wo = (_out_size(n, k, s, p, d) for n, k, s, p, d in zip((H, W), (kh, kw), stride, padding, dilation))
    return out.view(groups, B, Ho, Wo, O // groups).permute(1, 0, 4, 2, 3).reshape(B, O, Ho, Wo)


def check_conv(tk, x, w, stride, padding, dilation, groups, name, **kw):
    m = as_multiplier(name)
    out = tk.conv2d(x.to(DEVICE), w.to(DEVICE), stride, padding, dilation, groups, m, **kw)
    ref = reference_conv2d(x, w, stride, padding, dilation, groups, m)
    assert out.is_contiguous() and out.shape == ref.shape
    assert_close_to_reference(out, ref, reference_conv2d(x.abs(), w.abs(), stride, padding, dilation, groups, m))
    return out


# (name, x shape, w shape, stride, padding, dilation, groups).  Against the interpreter's 16 x 4 tile most cases have
# B * Ho * Wo = 24..70 outputs (full M tiles and a tail; 9 and 12 one partial tile), H != W, and B = 2 where the
# weight gradient's batch is split over two programs.  The three grouped / dilated cases are the smallest that keep
# that (4 x 5 images, 3 depthwise channels): the weight gradient's loop runs over every output position.
CONV_CASES = [
    ("b1-odd-3x3-pad1", (1, 3, 5, 7), (4, 3, 3, 3), (1, 1), (1, 1), (1, 1), 1),
    ("b2-stride2-pad1", (2, 3, 5, 7), (5, 3, 3, 3), (2, 2), (1, 1), (1, 1), 1),
    ("dilation2-pad2", (2, 2, 5, 4), (3, 2, 3, 3), (1, 1), (2, 2), (2, 2), 1),
    ("groups2", (2, 4, 4, 5), (6, 2, 3, 3), (1, 1), (1, 1), (1, 1), 2),
    ("depthwise", (2, 3, 4, 5), (3, 1, 3, 3), (1, 1), (1, 1), (1, 1), 3),
    ("depthwise-x2-stride2", (1, 3, 7, 5), (6, 1, 3, 3), (2, 1), (1, 0), (1, 1), 3),
    ("1x1", (2, 7, 5, 7), (3, 7, 1, 1), (1, 1), (0, 0), (1, 1), 1),
    ("1x1-stride2-groups", (2, 6, 5, 7), (4, 3, 1, 1), (2, 2), (0, 0), (1, 1), 2),
    ("5x5-stride2-pad2", (1, 2, 6, 5), (3, 2, 5, 5), (2, 2), (2, 2), (1, 1), 1),
    ("rect-kernel", (2, 3, 5, 7), (4, 3, 3, 2), (1, 2), (1, 0), (1, 2), 1),
]


@pytest.mark.parametrize("name", APPROX)
@pytest.mark.parametrize("case", CONV_CASES, ids=[c[0] for c in CONV_CASES])
def test_conv2d_matches_reference(tk, case, name):
    _, xs, ws, stride, padding, dilation, groups = case
    check_conv(tk, randn(*xs, seed=41), randn(*ws, seed=42), stride, padding, dilation, groups, name)


def test_conv2d_non_contiguous_input(tk):
    x = randn(2, 5, 7, 4, seed=43).permute(0, 3, 1, 2)  # (2, 4, 5, 7) with channels innermost in memory
    w = randn(3, 4, 3, 3, seed=44)[:, :, :, :]
    assert not x.is_contiguous()
    check_conv(tk, x, w, (1, 1), (1, 1), (1, 1), 1, "mbm")


@numpy_specials
@pytest.mark.parametrize("name", ["mbm", "mitchell-t8"])
def test_conv2d_special_values(tk, name):
    x, w = randn(2, 4, 5, 7, seed=51), randn(6, 2, 3, 3, seed=52)
    x[0, 0, 1, 2] = float("nan")
    x[1, 1, 3, 3] = float("inf")
    x[0, 2, 4, 0] = 1e-40  # subnormal: counts as zero
    x[1, 3, 0, 6] = -0.0
    w[5, 1, 0, 0] = float("-inf")  # meets the zero padding in border positions: 0 * inf = NaN
    out = check_conv(tk, x, w, (1, 1), (1, 1), (1, 1), 2, name)
    assert torch.isnan(out[:, 5, 0, :]).all() and torch.isnan(out[:, 5, :, 0]).all()


def test_conv2d_errors(tk):
    m = as_multiplier("mbm")
    x, w = torch.zeros(1, 4, 5, 5, device=DEVICE), torch.zeros(2, 3, 3, 3, device=DEVICE)
    with pytest.raises(ValueError, match="groups"):
        tk.conv2d(x, w, (1, 1), (0, 0), (1, 1), 1, m)
    with pytest.raises(ValueError, match="larger than"):
        tk.conv2d(x[:, :3, :2], w, (1, 1), (0, 0), (1, 1), 1, m)
    with pytest.raises(TypeError, match="float32"):
        tk.conv2d(x[:, :3].half(), w, (1, 1), (0, 0), (1, 1), 1, m)


@pytest.mark.parametrize("tile", [(8, 8, 1), (32, 2, 1)], ids=["8x8", "32x2"])
def test_explicit_tiles(tk, tile):
    """Other BLOCK_M x BLOCK_N than the interpreter's default, for every kernel."""
    t = tk.Tile(*tile)  # M = 33, N = 9: full tiles and a tail both ways on either tile
    check_bmm(tk, randn(2, 33, 3, seed=31), randn(2, 9, 3, seed=32), "mbm", _tile=t)
    x, w = randn(2, 4, 3, 7, seed=33), randn(6, 2, 3, 3, seed=34)  # 42 outputs / pixels: full M tiles and a tail
    check_conv(tk, x, w, (1, 1), (1, 1), (1, 1), 2, "mitchell", _tile=t)
    check_grads(tk, x, w, (2, 1), (1, 1), (1, 1), 2, "mbm-t16", _tile=t)


def test_batches_beyond_the_grid_limit_go_in_chunks(tk, monkeypatch):
    """Grid axis 2 holds at most 65535 batches / groups on CUDA; more are launched in chunks."""
    monkeypatch.setattr(tk.launch, "_MAX_GRID_Z", 2)
    check_bmm(tk, randn(5, 3, 17, seed=71), randn(5, 4, 17, seed=72), "mbm")
    check_conv(tk, randn(2, 5, 5, 7, seed=73), randn(5, 1, 3, 3, seed=74), (1, 1), (1, 1), (1, 1), 5, "mitchell")


def test_pick_tile():
    """The host's tile choice: least padded work, the fattest tile among equals, thin tiles for thin outputs."""
    from mbmlib.kernels.triton import TILES, Tile, pick_tile

    big = pick_tile(4096, 64)
    assert 4096 % big.block_m == 0 and 64 % big.block_n == 0 and big.tm * big.tn >= 32  # no padding, fat tile
    assert pick_tile(100, 4).block_m == 128  # a small batch: one warp, not 1024 padded rows
    assert pick_tile(4096, 4).block_n == 4  # one output channel block, not 8 with 4 padded
    for m, n in [(1, 1), (17, 3), (12544, 1), (9, 288)]:
        t = pick_tile(m, n)
        assert t in TILES and t.tm * 32 * t.num_warps == t.block_m


def test_words_pack_both_fields(tk):
    """Scale bits low, mantissa (+ bias) high; +0 and padding are the word 0, NaN keeps a NaN scale."""
    from mbmlib.multipliers.floating import split_operand

    x = torch.tensor([1.5, -2.5, 0.0, 1e-40, float("inf"), float("nan"), 3.0e38])
    m = as_multiplier("mbm-t16")
    w = tk.words(x, m, tk.BIAS)
    scale, mant = split_operand(x, m)
    assert torch.equal((w & 0xFFFFFFFF).to(torch.int32).view(torch.float32).view(torch.int32), scale.view(torch.int32))
    assert torch.equal((w >> 32).to(torch.int32), mant + tk.BIAS)
    assert tk.words(torch.zeros(3), as_multiplier("mbm")).eq(0).all()  # t = 0: the padding word is +0


def test_significand_fallback_is_the_round_toward_zero_conversion():
    """The interpreter's m & ~(m >> 24) is what cvt.rz.f32.s32 gives on CUDA for m in [2**23, 2**25)."""
    import numpy as np

    m = np.concatenate([np.arange(2**23, 2**23 + 4096), np.arange(2**24 - 2048, 2**24 + 2048),
                        np.arange(2**25 - 4096, 2**25)]).astype(np.int64)
    rz = np.array([np.float32(v) if abs(np.float64(np.float32(v))) <= v else np.nextafter(np.float32(v), np.float32(0))
                   for v in m.tolist()], dtype=np.float32)
    assert np.array_equal((m & ~(m >> 24)).astype(np.float32), rz)


# --------------------------------------------------------------------------- conv2d gradients

def check_grads(tk, x, w, stride, padding, dilation, groups, name, **kw):
    """grad_x and grad_w against the reference backend's (same products, float64-free sums within tolerance)."""
    m = as_multiplier(name)
    B, O = x.shape[0], w.shape[0]
    Ho, Wo = (_out_size(n, k, s, p, d) for n, k, s, p, d in zip(x.shape[2:], w.shape[2:], stride, padding, dilation))
    grad = randn(B, O, Ho, Wo, seed=int(x.numel()) + 5)
    gx, gw = tk.conv2d_grads(grad.to(DEVICE), x.to(DEVICE), w.to(DEVICE), stride, padding, dilation, groups, m, **kw)
    rx, rw = reference.conv2d_grads(grad, x, w, stride, padding, dilation, groups, m)
    ax, aw = reference.conv2d_grads(grad.abs(), x.abs(), w.abs(), stride, padding, dilation, groups, m)
    assert gx.is_contiguous() and gw.is_contiguous()
    assert_close_to_reference(gx, rx, ax)
    assert_close_to_reference(gw, rw, aw)
    return gx, gw


@pytest.mark.parametrize("name", ["mbm", "mitchell", "mbm-t18"])
@pytest.mark.parametrize("case", CONV_CASES, ids=[c[0] for c in CONV_CASES])
def test_conv2d_grads_match_reference(tk, case, name):
    _, xs, ws, stride, padding, dilation, groups = case
    check_grads(tk, randn(*xs, seed=61), randn(*ws, seed=62), stride, padding, dilation, groups, name)


@numpy_specials
def test_conv2d_grads_special_values(tk):
    x, w = randn(2, 4, 5, 7, seed=63), randn(6, 2, 3, 3, seed=64)
    x[0, 0, 1, 2] = float("nan")
    x[1, 1, 3, 3] = float("inf")
    x[0, 2, 4, 0] = 1e-40
    w[5, 1, 0, 0] = float("-inf")
    w[2, 0, 1, 1] = 0.0
    gx, gw = check_grads(tk, x, w, (1, 1), (1, 1), (1, 1), 2, "mbm")
    assert torch.isnan(gw[:, 0]).any() and torch.isinf(gx).any()


def test_functional_approx_backward_matches_reference(tk, monkeypatch):
    """mbmlib.functional.conv2d(backward="approx", backend="triton") gives the reference backend's gradients."""
    import mbmlib.functional as MF

    if not torch.cuda.is_available():
        monkeypatch.setenv("TRITON_INTERPRET", "1")  # kernels.resolve accepts backend="triton" on the CPU then

    x0, w0 = randn(2, 4, 4, 5, seed=65), randn(6, 2, 3, 3, seed=66)
    grads = {}
    for backend in ("triton", "reference"):
        x, w = x0.clone().requires_grad_(), w0.clone().requires_grad_()
        out = MF.conv2d(x, w, stride=(2, 1), padding=1, dilation=1, groups=2, multiplier="mbm",
                        backward="approx", backend=backend)
        (out * randn(*out.shape, seed=67)).sum().backward()
        grads[backend] = (out.detach(), x.grad, w.grad)
    for got, ref in zip(grads["triton"], grads["reference"]):
        assert got.shape == ref.shape
        torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)


# --------------------------------------------------------------------------- integer and table multipliers

def _ints(shape, top, seed):
    """Sign-magnitude integers in [-top, top], a fifth of them 0, the extremes included."""
    gen = torch.Generator().manual_seed(seed)
    q = torch.randint(-top, top + 1, shape, generator=gen)
    q[torch.rand(shape, generator=gen) < 0.2] = 0
    q.view(-1)[:2] = torch.tensor([top, -top])[: q.numel()]
    return q


def _table_multiplier(bits, high, seed):
    gen = torch.Generator().manual_seed(seed)
    return Multiplier.from_table(torch.randint(0, high, (1 << bits, 1 << bits), generator=gen))


INT_DESIGNS = ["mbm-int8", "mitchell-int8", "mbm-int4", "mbm-int12", "mitchell-int13", "mbm-int16"]


INT_BMM_SHAPES = [(1, 1, 1, 1), (2, 3, 17, 33), (1, 17, 3, 5), (2, 33, 1, 17), (1, 5, 33, 3)]


@pytest.mark.parametrize("shape", INT_BMM_SHAPES, ids=[f"G{g}-M{m}-N{n}-K{k}" for g, m, n, k in INT_BMM_SHAPES])
@pytest.mark.parametrize("name", INT_DESIGNS)
def test_bmm_nt_int_equals_the_reference_exactly(tk, name, shape):
    """mbm-int12 is the widest design summed in int32 with one right shift; 13 and 16 bits take the int64 path."""
    G, M, N, K = shape
    m = as_multiplier(name)
    qa, qb = _ints((G, M, K), m.max_magnitude, seed=M + K), _ints((G, N, K), m.max_magnitude, seed=N + 2 * K)
    out = tk.bmm_nt_int(qa.to(DEVICE), qb.to(DEVICE), m)
    assert out.dtype == torch.float64 and torch.equal(out.cpu(), reference.bmm_nt_int(qa, qb, m))


@pytest.mark.parametrize("high", [1 << 16, 1 << 32], ids=["int32-table", "int64-table"])
def test_bmm_nt_int_table_both_operand_orders(tk, high):
    """Lanes run along the longer side, so a table is read transposed when N > M; huge entries sum in int64."""
    t = _table_multiplier(4, high, seed=3)
    qa, qb = _ints((2, 5, 9), 15, seed=1), _ints((2, 19, 9), 15, seed=2)
    for a, b in ((qa, qb), (qb, qa)):
        assert torch.equal(tk.bmm_nt_int(a.to(DEVICE), b.to(DEVICE), t).cpu(), reference.bmm_nt_int(a, b, t))


def test_int_kernels_sum_in_int64_when_int32_could_overflow(tk):
    m = as_multiplier("mbm-int8")
    int32, int64 = tk.ACC_IDS["int32"], tk.ACC_IDS["int64"]
    assert tk.design_constexprs(m, 32767)["ACC"] == int32 and tk.design_constexprs(m, 32768)["ACC"] == int64
    assert tk.design_constexprs(as_multiplier("mbm-int13"), 1)["WIDE"]
    assert not tk.design_constexprs(as_multiplier("mbm-int12"), 1)["WIDE"]


def test_one_loop_per_shape_picks_the_mac_and_accumulator_per_design(tk):
    """Float and integer designs share the GEMM and convolution kernels; the design constexprs tell them apart."""
    assert set(tk.KERNELS) == {"gemm", "conv2d", "conv2d_grad_input", "conv2d_grad_weight"}
    macs = {name: tk.design_constexprs(as_multiplier(name))["MAC"] for name in ("mitchell", "mbm", "lmul-m7",
                                                                                "mitchell-int8", "mbm-int8",
                                                                                "drum4-int8")}
    macs["table"] = tk.design_constexprs(_table_multiplier(4, 100, seed=1))["MAC"]
    assert sorted(macs.values()) == sorted(tk.MAC_IDS.values())
    assert tk.design_constexprs(as_multiplier("mbm"))["ACC"] == tk.ACC_IDS["float32"]
    with pytest.raises(ValueError, match="no multiply-accumulate for 'scratch2-int8'"):
        mbmlib.register_design("scratch2", lambda a, b: a * b, kind="int")
        try:
            tk.design_constexprs(as_multiplier("scratch2-int8"))
        finally:
            mbmlib.unregister_design("scratch2", "int")


INT_CONV = [(case, name) for case in CONV_CASES for name in ("mbm-int8", "table")] + [
    (case, "mitchell-int6") for case in CONV_CASES[1::3]]


@pytest.mark.parametrize("case, name", INT_CONV, ids=[f"{c[0]}-{n}" for c, n in INT_CONV])
def test_conv2d_int_equals_the_reference_exactly(tk, case, name):
    _, xs, ws, stride, padding, dilation, groups = case
    m = _table_multiplier(5, 1 << 12, seed=4) if name == "table" else as_multiplier(name)
    qx, qw = _ints(xs, m.max_magnitude, seed=61), _ints(ws, m.max_magnitude, seed=62)
    # through kernels.conv2d_int: the random table's row 0 is not zero, so its padding is a real operand
    out = kernels.conv2d_int("triton", qx.to(DEVICE), qw.to(DEVICE), stride, padding, dilation, groups, m)
    want = kernels.conv2d_int("reference", qx, qw, stride, padding, dilation, groups, m)
    assert out.dtype == torch.float64 and out.shape == want.shape and torch.equal(out.cpu(), want)
    if name == "table" and any(padding):
        assert not m.zero_annihilates  # so this case does test the padding as an operand


def test_the_mbm_int8_table_gives_the_design_s_sums(tk):
    m = as_multiplier("mbm-int8")
    table = Multiplier.from_table(mbmlib.approx_mul(torch.arange(256)[:, None], torch.arange(256), m))  # (256, 256)
    qx, qw = _ints((2, 3, 6, 5), 255, seed=71), _ints((4, 3, 3, 3), 255, seed=72)
    args = ((1, 1), (1, 1), (1, 1), 1)
    assert torch.equal(tk.conv2d_int(qx.to(DEVICE), qw.to(DEVICE), *args, table).cpu(),
                       tk.conv2d_int(qx.to(DEVICE), qw.to(DEVICE), *args, m).cpu())


def test_int_kernels_refuse_bad_operands(tk):
    m = as_multiplier("mbm-int8")
    q = torch.ones(1, 2, 3, dtype=torch.int64, device=DEVICE)
    with pytest.raises(TypeError, match="integer tensors"):
        tk.bmm_nt_int(q.float(), q, m)
    with pytest.raises(ValueError, match="holds 256, outside -255..255"):
        tk.bmm_nt_int(q * 256, q, m)
    with pytest.raises(TypeError, match="integer or table multiplier"):
        tk.bmm_nt_int(q, q, as_multiplier("mbm"))
    with pytest.raises(ValueError, match="groups"):
        tk.conv2d_int(q.view(1, 2, 3, 1), torch.ones(2, 3, 1, 1, dtype=torch.int64, device=DEVICE),
                      (1, 1), (0, 0), (1, 1), 1, m)
    assert torch.equal(tk.bmm_nt_int(q[:, :, :0], q[:, :, :0], m).cpu(), torch.zeros(1, 2, 2, dtype=torch.float64))


# --------------------------------------------------------------------------- fallback to the compiled backend

def test_a_failing_kernel_falls_back_to_compiled_with_one_warning(tk, monkeypatch):
    """A kernel that fails to compile or launch: warn once (kernel, GPU, how to choose), then the compiled backend."""
    import mbmlib.kernels as kernels

    monkeypatch.setattr(fallback, "_REASONS", {})  # this test's failures stay in it
    compiled = kernels.load("compiled")
    calls = []

    def fake_bmm(a, b, m):
        calls.append(a.shape)
        return reference.bmm_nt(a, b, m)

    def broken(*args):
        raise RuntimeError("PTX JIT compilation failed")

    monkeypatch.setattr(compiled, "bmm_nt", fake_bmm)
    monkeypatch.setattr(tk.launch, "_gemm_launch", broken)
    a, b = randn(1, 5, 7, seed=81), randn(1, 3, 7, seed=82)
    with pytest.warns(RuntimeWarning, match=r"bmm_nt failed on .*backend='compiled'.*MBMLIB_BACKEND"):
        out = tk.bmm_nt(a.to(DEVICE), b.to(DEVICE), as_multiplier("mbm"))
    assert torch.equal(out.cpu(), reference.bmm_nt(a, b, as_multiplier("mbm")))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the second call neither warns nor retries the kernel
        tk.bmm_nt(a.to(DEVICE), b.to(DEVICE), as_multiplier("mbm"))
    assert len(calls) == 2 and set(fallback._REASONS) == {"triton:bmm_nt"}  # the other kernels keep running


def test_backend_name_and_picker(tk):
    assert tk.name == "triton"
    import mbmlib.kernels as kernels
    assert kernels.load("triton") is tk
