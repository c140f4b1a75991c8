"""Triton backend (mbmlib.kernels.triton) against the reference backend.

Without CUDA the kernels run in Triton's interpreter (``TRITON_INTERPRET=1``), slowly, so the shapes
are small.  Triton reads that flag when ``triton`` itself is first imported (its standard library is
decorated then) and when a kernel is decorated, and once more at the first launch (a lazy import).
Importing triton inside a fixture would come too late when the whole suite runs: the torch.compile
tests that run earlier import triton as a side effect.  So this module imports the backend at
collection time, with the flag set only for the duration of that import and restored right after:
other test modules see an unchanged environment (``mbmlib.kernels.resolve`` still refuses
backend="triton" on the CPU), only the process-wide ``triton`` module is the interpreter flavour,
which nothing else uses on a CPU-only machine.  If triton was imported before this module in a
CPU-only process, the tests here are skipped with the reason.
"""
import importlib
import os
import subprocess
import sys
import textwrap

import pytest
import torch
import torch.nn.functional as F

from mbmlib.kernels import reference
from mbmlib.multipliers import as_multiplier

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _import_backend():
    """(module, None), or (None, why it cannot be tested here)."""
    if torch.cuda.is_available():
        try:
            return importlib.import_module("mbmlib.kernels.triton"), None
        except ImportError as err:
            return None, f"triton backend not importable: {err}"
    loaded = sys.modules.get("mbmlib.kernels.triton")
    if loaded is not None:
        return (loaded, None) if loaded.INTERPRET else (None, "mbmlib.kernels.triton was imported without "
                                                              "TRITON_INTERPRET=1; run this file on its own")
    if "triton" in sys.modules:
        return None, "triton was imported before TRITON_INTERPRET=1 could be set; run this file on its own"
    old = os.environ.get("TRITON_INTERPRET")
    os.environ["TRITON_INTERPRET"] = "1"
    try:
        importlib.import_module("triton")
        try:  # imported lazily at the first launch, where it also needs the flag
            importlib.import_module("triton.experimental.gluon")
        except ImportError:
            pass
        return importlib.import_module("mbmlib.kernels.triton"), None
    except ImportError as err:
        return None, f"triton backend not importable: {err}"
    finally:
        if old is None:
            del os.environ["TRITON_INTERPRET"]
        else:
            os.environ["TRITON_INTERPRET"] = old


_BACKEND, _SKIP_REASON = _import_backend()
pytestmark = pytest.mark.skipif(_BACKEND is None, reason=_SKIP_REASON or "")

APPROX = ["mbm", "mitchell", "mbm-t16", "mitchell-t8"]

# (G, M, N, K): every pair of {1, 3, 17, 33} occurs for (M, N), (M, K) and (N, K) (a Latin square).
_SIZES = (1, 3, 17, 33)
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
    G, M, N, K = 2, 17, 33, 33
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


@pytest.mark.parametrize("config", [(32, 16, 4, 2), (8, 32, 16, 1), (16, 8, 32, 4)])
def test_explicit_tile_configs(tk, config):
    """Other tile shapes and GROUP_M swizzles than the default one (as the CUDA autotuner may pick)."""
    bm, bn, bk, group_m = config
    cfg = {"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": group_m}
    check_bmm(tk, randn(2, 33, 40, seed=31), randn(2, 17, 40, seed=32), "mbm", _config=cfg)
    x, w = randn(2, 4, 5, 7, seed=33), randn(6, 2, 3, 3, seed=34)
    check_conv(tk, x, w, (1, 1), (1, 1), (1, 1), 2, "mitchell", _config=cfg)


def test_batches_beyond_the_grid_limit_go_in_chunks(tk, monkeypatch):
    """Grid axis 1 holds at most 65535 batches / groups on CUDA; more are launched in chunks."""
    monkeypatch.setattr(tk, "_MAX_GRID_Y", 2)
    check_bmm(tk, randn(5, 3, 17, seed=71), randn(5, 4, 17, seed=72), "mbm")
    check_conv(tk, randn(2, 5, 5, 7, seed=73), randn(5, 1, 3, 3, seed=74), (1, 1), (1, 1), (1, 1), 5, "mitchell")


def test_config_pruning(tk):
    """The CUDA autotuner's pruning keeps tiles that fit the problem, and always at least one."""
    import triton

    cfgs = [triton.Config({"BLOCK_M": m, "BLOCK_N": n, "BLOCK_K": k, "GROUP_M": 8}, num_warps=4)
            for m, n, k in [(64, 64, 4), (128, 16, 8), (32, 32, 16)]]
    kept = tk._prune_configs(cfgs, {"M": 4096, "N": 1, "K": 9})  # depthwise conv: N = 1
    assert [c.kwargs["BLOCK_N"] for c in kept] == [16]
    assert len(tk._prune_configs(cfgs, {"M": 4096, "N": 512, "K": 512})) == 3
    assert len(tk._prune_configs(cfgs, {"M": 1, "N": 1, "K": 1})) == 1


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


# (name, x shape, w shape, stride, padding, dilation, groups)
CONV_CASES = [
    ("b1-odd-3x3-pad1", (1, 3, 5, 7), (4, 3, 3, 3), (1, 1), (1, 1), (1, 1), 1),
    ("b2-stride2-pad1", (2, 3, 5, 7), (5, 3, 3, 3), (2, 2), (1, 1), (1, 1), 1),
    ("dilation2-pad2", (2, 2, 7, 5), (3, 2, 3, 3), (1, 1), (2, 2), (2, 2), 1),
    ("groups2", (2, 4, 5, 7), (6, 2, 3, 3), (1, 1), (1, 1), (1, 1), 2),
    ("depthwise", (2, 5, 5, 7), (5, 1, 3, 3), (1, 1), (1, 1), (1, 1), 5),
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


def test_backend_name_and_picker(tk):
    assert tk.name == "triton"
    import mbmlib.kernels as kernels
    assert kernels.load("triton") is tk


_AOT_SCRIPT = textwrap.dedent("""
    import os, sys
    os.environ.pop("TRITON_INTERPRET", None)
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from mbmlib.kernels import triton as tk
    from mbmlib.multipliers import as_multiplier

    mult = as_multiplier(sys.argv[1])
    meta = dict(tk._CONFIGS[0].kwargs, **{k: v for k, v in tk._kind_args(mult).items() if k.isupper()})
    for fn, extra in ((tk._bmm_nt_kernel, {}), (tk._conv2d_kernel, {"KH": 3, "KW": 3})):
        consts = dict(meta, **extra)
        sig = {n: "constexpr" if n in consts else ("*i32" if n[1:3] == "m_" else "*fp32")
               if n.endswith("_ptr") else "i32" for n in fn.arg_names}
        src = ASTSource(fn=fn, signature=sig, constexprs={(fn.arg_names.index(k),): v for k, v in consts.items()})
        kernel = triton.compile(src, target=GPUTarget("cuda", 90, 32),
                                options={"num_warps": 4, "enable_fp_fusion": False})
        ptx = kernel.asm["ptx"]
        assert "fma.rn.f32" not in ptx, "FMA contraction in " + fn.__name__
        print(fn.__name__, "ok", len(ptx.splitlines()), "PTX lines, cubin", len(kernel.asm["cubin"]), "bytes")
""")


@pytest.mark.skipif(torch.cuda.is_available(), reason="on CUDA the other tests compile and run the kernels")
@pytest.mark.parametrize("name", ["mbm", "mitchell-t8"])
def test_kernels_compile_for_sm90(name):
    """The interpreter accepts more than the compiler: compile both kernels for an H100 (no GPU needed)."""
    try:
        importlib.import_module("triton.backends.nvidia")
    except ImportError:
        pytest.skip("this triton build has no CUDA backend")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    proc = subprocess.run([sys.executable, "-c", _AOT_SCRIPT, name], cwd=root, env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count(" ok ") == 2, proc.stdout
