"""DRUM's and L-Mul's specialised kernels (C++ and Triton) held against the reference backend where the conformance
tests of test_designs.py do not reach: every DRUM width, 16-bit sums across the int32 flush boundary, the C++-less
fallback, L-Mul's special values through the Triton MAC, the routes (no generic path), and the compiled SASS.

Without CUDA the Triton kernels run in the interpreter (see :mod:`triton_backend`), on small shapes.
"""
import json
import os
import subprocess
import sys
import textwrap
import warnings

import pytest
import torch
from triton_backend import triton_backend

TK, TRITON_SKIP = triton_backend()  # before anything imports triton (torch.compile, the compiled backend)

import mbmlib  # noqa: E402
from mbmlib import kernels, quant  # noqa: E402
from mbmlib.kernels import compiled, cpu_native, cpu_native_int, fallback, reference  # noqa: E402
from mbmlib.multipliers import as_multiplier  # noqa: E402
from test_sass import ROOT, _has_cuda_backend, assert_clean  # noqa: E402

needs_triton = pytest.mark.skipif(TK is None, reason=TRITON_SKIP or "")
DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
_ORDER = ("DEFAULT", "AVX2", "AVX512")
_HERE = torch.backends.cpu.get_cpu_capability()
CAPABILITIES = list(_ORDER[:_ORDER.index(_HERE) + 1]) if _HERE in _ORDER else [_HERE]
DRUM_EVERY_WIDTH = [f"drum{k}-int{n}" for n in range(2, 17) for k in sorted({2, max(2, n // 2), n})]
SPECIAL = [0.0, -0.0, 1e-40, -1e-45, float("inf"), -float("inf"), float("nan"), 1.0, -1.0, 1.5, -2.5, 1.99, 1.999999,
           1.9375, 1.875, 3.0e38, -3.4e38, 1.0e-38, 2.0**-126, -(2.0**-126) * 1.5, 2.0**-75, 2.0**64, 1.0e20, 7.0e-20]


def _ints(name, shape_a, shape_b, seed=0):
    """Random sign-magnitude operands of the multiplier, the extremes planted in both."""
    mult = as_multiplier(name)
    gen, hi = torch.Generator().manual_seed(seed), mult.max_magnitude
    qa, qb = (torch.randint(-hi, hi + 1, shape, generator=gen) for shape in (shape_a, shape_b))
    for q, planted in ((qa, [0, hi, -hi, 1]), (qb, [hi, 0, -hi, -1])):
        q.view(-1)[:min(4, q.numel())] = torch.tensor(planted[:min(4, q.numel())])
    return mult, qa, qb


# ----------------------------------------------------------------------------- routes


@pytest.mark.parametrize("backend", ["compiled", "triton"])
@pytest.mark.parametrize("name", ["drum4-int8", "drum6-int12", "drum2-int14", "drum16-int16", "lmul-m3", "lmul-m23"])
def test_drum_and_lmul_take_their_own_kernels_without_a_generic_path(name, backend, monkeypatch):
    """No GenericPathWarning, no generated table, no reference backend: the design's own MAC on both backends."""
    def no_table(mult):
        raise AssertionError(f"a generated table was built for {mult.name}")

    monkeypatch.setattr(kernels, "_ROUTES", {})
    monkeypatch.setattr(kernels, "generated_table", no_table)
    mult = as_multiplier(name)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert kernels.route(name, backend) == (backend, mult, mult.key)


def test_compiled_drum_layers_run_the_cpp_kernel_without_warnings(monkeypatch):
    calls = []
    native = cpu_native_int.bmm_nt_quant  # the quantised layer's fused path: quantisation in the kernel's operand pass
    monkeypatch.setattr(cpu_native_int, "bmm_nt_quant", lambda *a, **kw: calls.append(a[4].name) or native(*a, **kw))
    x, w = torch.randn(3, 40), torch.randn(5, 40)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for name in ("drum4-int8", "drum3-int16"):
            out = quant.linear(x, w, act_scale=0.01, weight_scale=0.01, multiplier=name, backend="compiled")
            assert torch.equal(out, quant.linear(x, w, act_scale=0.01, weight_scale=0.01, multiplier=name,
                                                 backend="reference"))
    assert calls == ["drum4-int8", "drum3-int16"]


@pytest.mark.parametrize("backend", ["compiled", pytest.param("triton", marks=needs_triton)])
def test_drum_takes_every_integer_dtype_including_int8_minus_128(backend):
    """The reduced operands are formed in int32 (an int8 -128 has no int8 magnitude) on every path."""
    mult = as_multiplier("drum4-int8")
    qa = torch.tensor([[[-128, 127, -1, 0, 100, -77]]], dtype=torch.int8)
    qb = torch.tensor([[[-128, -128, 5, 9, -3, 64]], [[1, 2, 3, -4, -5, 6]]], dtype=torch.int8).transpose(0, 1)
    want = reference.bmm_nt_int(qa.long(), qb.long(), mult)
    assert want[0, 0, 0] == 144 * 144 - 120 * 144 - 5 - 104 * 3 - 72 * 72  # 100 -> 104, 77 and 64 -> 72
    assert torch.equal(kernels.load(backend).bmm_nt_int(qa.to(DEVICE), qb.to(DEVICE), mult).cpu(), want)
    assert torch.equal(reference.bmm_nt_int(qa, qb, mult), want)


# ----------------------------------------------------------------------------- the C++ kernel


@pytest.mark.parametrize("capability", CAPABILITIES)
@pytest.mark.parametrize("name", DRUM_EVERY_WIDTH)
def test_cpp_drum_equals_the_reference_at_every_width(capability, name):
    mult, qa, qb = _ints(name, (2, 7, 45), (2, 37, 45), seed=len(name))
    assert cpu_native_int.supports_int(mult)
    got = cpu_native_int.bmm_nt_int(qa, qb, mult, capability=capability)
    assert got.dtype == torch.float64 and torch.equal(got, reference.bmm_nt_int(qa, qb, mult))


def test_int32_blocks_of_the_drum_kernel():
    """Up to 12 bits one int32 sum of products below 2**24; above, A is split (2**8 * hi + lo), two sums of terms
    below 2**(2n - 8) and 2**(n + 8), each flushed before it can reach 2**31."""
    blocks = {n: cpu_native_int.int_block(as_multiplier(f"drum2-int{n}")) for n in (8, 12, 13, 14, 16)}
    assert blocks == {8: (2**31 - 1) // 2**16, 12: 127, 13: (2**31 - 1) // 2**21, 14: (2**31 - 1) // 2**22,
                      16: 127}
    assert [cpu_native_int.drum_split(as_multiplier(f"drum2-int{n}")) for n in (12, 13)] == [0, 8]
    assert cpu_native_int.int_block(as_multiplier("mbm-int12")) == 127  # the log designs' blocks are unchanged


@pytest.mark.parametrize("capability", CAPABILITIES)
@pytest.mark.parametrize("name", ["drum16-int16", "drum6-int16", "drum12-int12", "drum3-int13"])
@pytest.mark.parametrize("k", [1, 126, 127, 128, 3 * 127 + 5, 1024, 1025])
def test_cpp_drum_long_sums_across_the_int32_flush_boundary(capability, name, k):
    """The largest products, all of one sign or alternating: every block sum at its bound, totals far past 2**31."""
    mult = as_multiplier(name)
    top = mult.max_magnitude
    big = mbmlib.approx_mul(torch.tensor([top]), torch.tensor([top]), mult).item()  # the largest product
    alternating = torch.tensor([top, -top]).repeat(k)[:k]
    qa = torch.stack([torch.full((k,), top), torch.full((k,), -top), alternating])[None]  # (1, 3, K)
    qb = torch.stack([torch.full((k,), top), torch.full((k,), -top), alternating, -alternating])[None]
    got = cpu_native_int.bmm_nt_int(qa, qb, mult, capability=capability)
    assert torch.equal(got, reference.bmm_nt_int(qa, qb, mult))
    assert got[0, 0, 0] == k * big and got[0, 1, 0] == -k * big and got[0, 2, 2] == k * big


@pytest.mark.parametrize("capability", CAPABILITIES)
@pytest.mark.parametrize("name", ["drum4-int8", "drum6-int16"])
def test_cpp_drum_implicit_gemm_conv_equals_the_reference(capability, name):
    for x_shape, w_shape, stride, padding, dilation, groups in (
            ((2, 3, 9, 8), (5, 3, 3, 3), (1, 1), (1, 1), (1, 1), 1),
            ((1, 6, 8, 8), (6, 1, 3, 3), (2, 2), (1, 0), (2, 1), 6)):
        mult, qx, qw = _ints(name, x_shape, w_shape, seed=groups)
        got = cpu_native_int.conv2d_int(qx, qw, stride, padding, dilation, groups, mult, capability=capability)
        assert torch.equal(got, reference.conv2d_int(qx, qw, stride, padding, dilation, groups, mult))


def test_without_the_cpp_kernel_drum_sums_exactly_in_a_float64_gemm(monkeypatch):
    """No C++ compiler: DRUM's reduced operands in a float64 GEMM (exact), silently; inductor is not spent on it."""
    def no_native(capability=None):
        raise cpu_native.BuildError("cannot run the C++ compiler 'c++'")

    monkeypatch.setattr(cpu_native, "library", no_native)
    monkeypatch.setattr(fallback, "_REASONS", {})
    for name in ("drum4-int8", "drum16-int16"):
        mult, qa, qb = _ints(name, (2, 5, 300), (2, 9, 300), seed=3)
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            got = compiled.bmm_nt_int(qa, qb, mult)
        assert torch.equal(got, reference.bmm_nt_int(qa, qb, mult))
    assert fallback.failed("native") and not fallback.failed("inductor")


# ----------------------------------------------------------------------------- the Triton kernels


@needs_triton
@pytest.mark.parametrize("name", ["drum2-int2", "drum2-int4", "drum4-int8", "drum6-int12", "drum3-int15",
                                  "drum6-int16", "drum16-int16"])
def test_triton_drum_gemm_and_conv_equal_the_reference(name):
    mult, qa, qb = _ints(name, (2, 5, 5), (2, 18, 5), seed=5)  # 2 x 2 tiles with tails; K picks the same ACC as 19
    for a, b in ((qa, qb), (qb, qa)):  # lanes along the longer side either way
        assert torch.equal(TK.bmm_nt_int(a.to(DEVICE), b.to(DEVICE), mult).cpu(), reference.bmm_nt_int(a, b, mult))
    _, qx, qw = _ints(name, (2, 4, 6, 5), (6, 2, 3, 3), seed=6)
    args = ((2, 1), (1, 1), (1, 1), 2)
    assert torch.equal(TK.conv2d_int(qx.to(DEVICE), qw.to(DEVICE), *args, mult).cpu(),
                       reference.conv2d_int(qx, qw, *args, mult))


@needs_triton
def test_triton_drum_products_and_sums_widen_where_int32_could_overflow():
    """Up to 15 bits the products fit int32 (|P| < 2**30); 16-bit products reach 2**32 and are formed in int64."""
    int32, int64 = TK.ACC_IDS["int32"], TK.ACC_IDS["int64"]
    k8 = as_multiplier("drum4-int8")
    assert TK.design_constexprs(k8, 32767)["ACC"] == int32 and TK.design_constexprs(k8, 32768)["ACC"] == int64
    assert not TK.design_constexprs(as_multiplier("drum3-int15"), 1)["WIDE"]
    assert TK.design_constexprs(as_multiplier("drum3-int16"), 1)["WIDE"]
    mult = as_multiplier("drum16-int16")
    qa = torch.full((1, 2, 40), mult.max_magnitude)
    qa[0, 1] = -qa[0, 1]
    got = TK.bmm_nt_int(qa.to(DEVICE), qa.to(DEVICE), mult).cpu()
    assert torch.equal(got, reference.bmm_nt_int(qa, qa, mult)) and got[0, 0, 0] == 40 * mult.max_magnitude**2


@needs_triton
@pytest.mark.filterwarnings("ignore:(invalid value|overflow) encountered:RuntimeWarning")  # numpy, interpreter
@pytest.mark.parametrize("m", [1, 2, 3, 4, 5, 7, 16, 23])
def test_triton_lmul_special_values_bit_for_bit(m):
    """K = 1: every output is one product, bit for bit the reference's (NaN, infinities, zeros, subnormal inputs,
    overflow and underflow of the result exponent, the halving at 2)."""
    mult = as_multiplier(f"lmul-m{m}")
    v = torch.tensor(SPECIAL + torch.randn(9, generator=torch.Generator().manual_seed(m)).tolist())
    a, b = v.view(1, -1, 1), (v * 0.75).view(1, -1, 1)
    got = TK.bmm_nt(a.to(DEVICE), b.to(DEVICE), mult).cpu()
    want = reference.bmm_nt(a, b, mult)
    torch.testing.assert_close(got, want, rtol=0, atol=0, equal_nan=True)
    assert got.isnan().any() and got.isinf().any() and (got == 0).any()
    assert torch.equal(got.view(torch.int32)[~got.isnan()], want.view(torch.int32)[~want.isnan()])  # signs of zeros


@needs_triton
@pytest.mark.parametrize("m", [1, 4, 7, 23])
def test_triton_lmul_mantissas_over_their_whole_range_bit_for_bit(m):
    mult = as_multiplier(f"lmul-m{m}")
    gen = torch.Generator().manual_seed(m)
    a, b = torch.rand(1, 67, 1, generator=gen) * 4 - 2, torch.rand(1, 61, 1, generator=gen) * 4 - 2
    a[0, :4, 0] = b[0, :4, 0] = torch.tensor([1.9999999, 1.5, -1.0, 1.96875])  # sums at and past 2
    assert torch.equal(TK.bmm_nt(a.to(DEVICE), b.to(DEVICE), mult).cpu(), reference.bmm_nt(a, b, mult))


# ----------------------------------------------------------------------------- compiled ahead of time (no GPU)

_SASS_SCRIPT = textwrap.dedent("""
    import json, sys
    from mbmlib.kernels.triton import TILES
    from mbmlib.workflow import sass

    arch, out = sys.argv[1], []
    for kernel in ("gemm", "conv2d"):  # compiled as a launch of the kernel's benchmark shape would be
        for mult in sys.argv[2].split(","):
            out.append(sass.analyse(kernel, mult, TILES[0], arch)[0])
    print(json.dumps(out))
""")


@pytest.mark.slow
@pytest.mark.skipif(not _has_cuda_backend(), reason="this triton build has no CUDA backend")
def test_the_drum_and_lmul_kernels_compile_clean_for_sm90():
    """On the default tile: no spills, shuffles or shared memory in the K loop; L-Mul no dearer than MBM (12 a MAC
    on GEMM), DRUM one multiply-add a MAC at 8 bits and an int64 one at 16 (measured: 7.1, 2.1 and 6.5)."""
    mults = ("lmul-m7", "drum4-int8", "drum6-int16")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-c", _SASS_SCRIPT, "sm_90", ",".join(mults)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    entries = json.loads(proc.stdout.strip().splitlines()[-1])
    assert_clean(entries)
    bound = {("gemm", "lmul-m7"): 8, ("conv2d", "lmul-m7"): 10, ("gemm", "drum4-int8"): 3,
             ("conv2d", "drum4-int8"): 4, ("gemm", "drum6-int16"): 8, ("conv2d", "drum6-int16"): 11}
    for e in entries:
        assert e["instructions_per_mac"] <= bound[e["kernel"], e["multiplier"]], e
