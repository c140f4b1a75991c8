"""The C++ CPU GEMM of the compiled backend against the reference: bit-exact products, float32 sums.

Every instruction set this CPU can run (portable C++, AVX2, AVX-512) is built and held against
``mbmlib.kernels.reference`` / ``products(flush=False)``; odd shapes cover short row tiles and
padded column panels.
"""
import warnings

import pytest
import torch

from mbmlib.kernels import compiled, cpu_native, cpu_native_int, fallback, reference
from mbmlib.multipliers import Multiplier, as_multiplier
from mbmlib.multipliers.floating import products, split_operand

_ORDER = ("DEFAULT", "AVX2", "AVX512")
_HERE = torch.backends.cpu.get_cpu_capability()
CAPABILITIES = list(_ORDER[:_ORDER.index(_HERE) + 1]) if _HERE in _ORDER else [_HERE]
# t = 17 and 19: the carry correction is not half the other (a separate kernel path on AVX-512)
MULTIPLIERS = [Multiplier("mbm", 0), Multiplier("mitchell", 0), Multiplier("mbm", 17), Multiplier("mbm", 16),
               Multiplier("mitchell", 5), Multiplier("mbm", 18), Multiplier("mbm", 19), Multiplier("mbm", 22),
               Multiplier("lmul", param=3), Multiplier("lmul", param=4), Multiplier("lmul", param=23)]
SPECIAL = [0.0, -0.0, 1e-40, -1e-45, float("inf"), -float("inf"), float("nan"), 1.0, -1.0, 1.5, -2.5, 1.99, 1.999999,
           3.0e38, -3.4e38, 1.0e-38, 2.0**-126, -(2.0**-126) * 1.5, 2.0**-75, 2.0**64, 1.0e20, 7.0e-20]


def _gemm(a, b, mult, capability):
    return cpu_native.bmm_nt_split(*split_operand(a, mult), *split_operand(b, mult), mult, capability=capability)


def _oracle(a, b, mult):
    """float64 sums of the exact float32 products: (G, M, K), (G, N, K) -> (G, M, N), and sum |p|."""
    p = products(*split_operand(a[:, :, None], mult), *split_operand(b[:, None], mult), mult, flush=False)
    return p.double().sum(-1), p.double().abs().sum(-1)


@pytest.mark.parametrize("capability", CAPABILITIES)
def test_each_instruction_set_builds(capability):
    expected = {"AVX512": "AVX-512", "AVX2": "AVX2"}.get(capability, "portable")
    assert cpu_native.isa(capability) == expected


@pytest.mark.parametrize("capability", CAPABILITIES)
@pytest.mark.parametrize("mult", MULTIPLIERS, ids=str)
def test_special_values_give_the_reference_products_bit_for_bit(capability, mult):
    v = torch.tensor(SPECIAL + torch.randn(9).tolist(), dtype=torch.float32)
    a, b = v.view(1, -1, 1), (v * 0.75).view(1, -1, 1)  # K = 1: every output is one product
    got = _gemm(a, b, mult, capability)
    want = products(*split_operand(a, mult), *split_operand(b.transpose(1, 2), mult), mult, flush=False)
    torch.testing.assert_close(got, want, rtol=0, atol=0, equal_nan=True)
    assert got.isnan().any() and got.isinf().any() and (got == 0).any()


@pytest.mark.parametrize("capability", CAPABILITIES)
@pytest.mark.parametrize("mult", MULTIPLIERS, ids=str)
def test_random_mantissas_bit_for_bit_including_the_corner_case(capability, mult):
    a = torch.rand(1, 257, 1) * 4 - 2  # (G, M, K): mantissas over the whole range, both signs, K = 1
    b = torch.rand(1, 263, 1) * 4 - 2
    a[0, :8, 0] = torch.tensor([1.99, 1.999, 1.98, 1.0, 1.5, -1.97, 1.9999999, 1.96])  # carry + sum >= 2
    b[0, :8, 0] = a[0, :8, 0]
    got = _gemm(a, b, mult, capability)
    want = reference.bmm_nt(a, b, mult)
    assert torch.equal(got, want)


SHAPES = [(1, 1, 1, 1), (1, 1, 1, 20000), (2, 7, 31, 13), (1, 13, 17, 1), (3, 5, 97, 64), (1, 61, 33, 257),
          (1, 6, 32, 3), (1, 12, 64, 5), (2, 29, 1, 11), (1, 1, 47, 2)]


@pytest.mark.parametrize("capability", CAPABILITIES)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("mult", MULTIPLIERS[:3], ids=str)
def test_odd_shapes_match_float64_sums_and_the_reference(capability, shape, mult):
    G, M, N, K = shape
    a, b = torch.randn(G, M, K), torch.randn(G, N, K)
    got = _gemm(a, b, mult, capability)
    want, size = _oracle(a, b, mult)
    assert got.shape == (G, M, N) and got.dtype == torch.float32
    bound = 2 * K * 2.0**-24 * size + 1e-30  # float32 summation in any order
    assert ((got.double() - want).abs() <= bound).all()
    torch.testing.assert_close(got, reference.bmm_nt(a, b, mult), rtol=1e-5, atol=1e-4 * K**0.5)


@pytest.mark.parametrize("mult", MULTIPLIERS[:2], ids=str)
def test_sums_through_overflow_and_nan_rows(mult):
    a, b = torch.randn(1, 9, 70), torch.randn(1, 11, 70)
    a[0, 2, 5] = float("nan")
    a[0, 3, :] = 3.0e38  # every product of this row overflows
    b[0, 0] = b[0, 0].abs() + 1.0  # ... to +inf against this column
    b[0, 4, 7] = float("inf")
    got = _gemm(a, b, mult, None)
    want = reference.bmm_nt(a, b, mult)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-4, equal_nan=True)
    assert got[0, 2].isnan().all() and got[0, 3, 0] == float("inf")


def test_empty_and_zero_k():
    mult = Multiplier("mbm", 0)
    assert _gemm(torch.randn(1, 0, 5), torch.randn(1, 3, 5), mult, None).shape == (1, 0, 3)
    assert torch.equal(_gemm(torch.randn(2, 4, 0), torch.randn(2, 3, 0), mult, None), torch.zeros(2, 4, 3))


def test_non_contiguous_operands():
    mult = Multiplier("mitchell", 0)
    a, b = torch.randn(1, 40, 19).transpose(1, 2), torch.randn(1, 40, 23).transpose(1, 2)  # (1, 19, 40), (1, 23, 40)
    torch.testing.assert_close(_gemm(a, b, mult, None), reference.bmm_nt(a, b, mult), rtol=1e-5, atol=1e-4)


def test_threads_split_tiles_without_changing_results():
    mult = Multiplier("mbm", 0)
    a, b = torch.randn(3, 301, 96), torch.randn(3, 70, 96)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = _gemm(a, b, mult, None)
        torch.set_num_threads(max(2, before))
        many = _gemm(a, b, mult, None)
    finally:
        torch.set_num_threads(before)
    assert torch.equal(one, many)  # each output is summed by one thread, in k order


def test_compiled_backend_uses_the_native_kernel():
    mult = Multiplier("mbm", 0)
    a, b = torch.randn(1, 45, 30), torch.randn(1, 21, 30)
    assert torch.equal(compiled.bmm_nt(a, b, mult), _gemm(a, b, mult, None))


def test_a_missing_compiler_is_reported(monkeypatch, tmp_path):
    monkeypatch.setenv("CXX", str(tmp_path / "no-such-compiler"))
    monkeypatch.setenv("MBMLIB_CACHE", str(tmp_path))
    with pytest.raises(cpu_native.BuildError, match="cannot run the C\\+\\+ compiler"):
        cpu_native._library.__wrapped__("DEFAULT")  # uncached


def test_without_the_native_kernel_inductor_serves_without_warning(monkeypatch):
    def no_native(capability=None):
        raise cpu_native.BuildError("cannot run the C++ compiler 'c++'")

    monkeypatch.setattr(cpu_native, "library", no_native)
    monkeypatch.setattr(fallback, "_REASONS", {})  # this test's failures stay in it
    mult = Multiplier("mitchell", 0)
    a, b = torch.randn(1, 6, 9), torch.randn(1, 5, 9)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        got = compiled.bmm_nt(a, b, mult)
    assert "compiler" in fallback.reason("native")
    torch.testing.assert_close(got, reference.bmm_nt(a, b, mult), rtol=1e-5, atol=1e-5)


def test_a_compiler_error_is_reported(monkeypatch, tmp_path):
    monkeypatch.setenv("MBMLIB_CACHE", str(tmp_path))
    monkeypatch.setattr(cpu_native, "BASE_FLAGS", cpu_native.BASE_FLAGS + ["-fno-such-flag"])
    with pytest.raises(cpu_native.BuildError, match="failed to build"):
        cpu_native._library.__wrapped__("DEFAULT")
    assert not list(tmp_path.glob("*.so"))  # no half-written library left behind


CONVS = [  # x shape, w shape, stride, padding, dilation, groups
    ((2, 3, 7, 5), (5, 3, 3, 3), (1, 1), (1, 1), (1, 1), 1),
    ((1, 4, 9, 11), (6, 2, 3, 2), (2, 1), (0, 2), (1, 2), 2),
    ((3, 1, 6, 6), (7, 1, 1, 1), (1, 1), (0, 0), (1, 1), 1),
    ((1, 6, 8, 7), (6, 1, 3, 3), (2, 3), (2, 1), (2, 1), 6),
    ((2, 32, 5, 5), (33, 32, 3, 3), (1, 1), (1, 1), (1, 1), 1),
]


@pytest.mark.parametrize("capability", CAPABILITIES)
@pytest.mark.parametrize("case", CONVS, ids=str)
@pytest.mark.parametrize("mult", MULTIPLIERS[:3], ids=str)
def test_implicit_gemm_conv_matches_the_reference(capability, case, mult):
    x_shape, w_shape, *args = case
    x, w = torch.randn(x_shape), torch.randn(w_shape)
    x.view(-1)[::7] = 0.0  # ReLU-like zeros
    got = cpu_native.conv2d(x, w, *args, mult, capability=capability)
    torch.testing.assert_close(got, reference.conv2d(x, w, *args, mult), rtol=1e-5, atol=1e-5)


def test_implicit_gemm_conv_with_one_input_channel_is_bit_exact():
    mult = Multiplier("mbm", 0)
    v = torch.tensor(SPECIAL, dtype=torch.float32)
    x, w = v.view(1, 1, 2, -1), torch.tensor([-1.25, 0.0, 3.0]).view(3, 1, 1, 1)  # K = 1: one product each
    got = cpu_native.conv2d(x, w, (1, 1), (0, 0), (1, 1), 1, mult)
    want = products(*split_operand(x, mult), *split_operand(w.view(1, 3, 1, 1), mult), mult, flush=False)
    torch.testing.assert_close(got, want, rtol=0, atol=0, equal_nan=True)  # (1, 3, 2, 11)


def test_compiled_conv2d_uses_the_implicit_gemm():
    mult = Multiplier("mitchell", 0)
    x, w = torch.randn(2, 4, 6, 6), torch.randn(3, 4, 3, 3)
    args = ((1, 1), (1, 1), (1, 1), 1)
    assert torch.equal(compiled.conv2d(x, w, *args, mult), cpu_native.conv2d(x, w, *args, mult))


def test_without_openmp_python_threads_split_the_tiles(monkeypatch, tmp_path):
    monkeypatch.setenv("MBMLIB_CACHE", str(tmp_path))
    monkeypatch.setattr(cpu_native, "OPENMP_FLAGS", ["-fno-such-openmp-flag"])  # the OpenMP build fails
    lib = cpu_native._library.__wrapped__("DEFAULT")
    assert lib.mbm_has_openmp() == 0
    monkeypatch.setattr(cpu_native, "_library", lambda capability: lib)
    mult = Multiplier("mbm", 0)
    a, b = torch.randn(2, 131, 80), torch.randn(2, 45, 80)
    torch.testing.assert_close(_gemm(a, b, mult, None), reference.bmm_nt(a, b, mult), rtol=1e-5, atol=1e-4)


# ----------------------------------------------------------------------------- integer multipliers (SPEC section 4)

INT_MULTIPLIERS = ["mbm-int8", "mitchell-int8", "mbm-int2", "mbm-int5", "mitchell-int11", "mbm-int12"]


def _int_operands(name, shape_a, shape_b, seed=0):
    """Random sign-magnitude operands over the whole range, with zeros and the extremes planted."""
    mult = as_multiplier(name)
    gen = torch.Generator().manual_seed(seed)
    hi = mult.max_magnitude
    qa = torch.randint(-hi, hi + 1, shape_a, generator=gen)
    qb = torch.randint(-hi, hi + 1, shape_b, generator=gen)
    for q, planted in ((qa, [0, hi, -hi, 1]), (qb, [hi, 0, -hi, -1])):
        n = min(4, q.numel())
        q.view(-1)[:n] = torch.tensor(planted[:n])
    return mult, qa, qb


@pytest.mark.parametrize("capability", CAPABILITIES)
@pytest.mark.parametrize("name", INT_MULTIPLIERS)
@pytest.mark.parametrize("shape", [(1, 1, 1, 1), (2, 7, 5, 9), (1, 13, 37, 300), (3, 6, 33, 64)])
def test_integer_gemm_equals_the_reference_exactly(capability, name, shape):
    G, M, N, K = shape
    mult, qa, qb = _int_operands(name, (G, M, K), (G, N, K))
    got = cpu_native_int.bmm_nt_int(qa, qb, mult, capability=capability)
    assert got.dtype == torch.float64 and got.shape == (G, M, N)
    assert torch.equal(got, reference.bmm_nt_int(qa, qb, mult))


@pytest.mark.parametrize("capability", CAPABILITIES)
def test_table_gemm_gives_zero_for_zero_operands_whatever_the_table_holds(capability):
    table = torch.randint(1, 100_000, (256, 256), generator=torch.Generator().manual_seed(3))  # row/column 0 not 0
    mult = Multiplier.from_table(table)
    _, qa, qb = _int_operands("mbm-int8", (2, 9, 40), (2, 21, 40), seed=4)
    assert cpu_native_int.supports_int(mult)
    got = cpu_native_int.bmm_nt_int(qa, qb, mult, capability=capability)
    assert torch.equal(got, reference.bmm_nt_int(qa, qb, mult))


@pytest.mark.parametrize("capability", CAPABILITIES)
@pytest.mark.parametrize("mult", [Multiplier("mbm", 0), Multiplier("mbm", 17), Multiplier("mitchell", 3)],
                         ids=lambda m: m.name)
def test_the_one_pass_split_gives_split_operands_bits(capability, mult):
    """cpu_native.split (the kernels' A operand) is split_operand bit for bit: NaN, infinities, zeros of both signs,
    subnormals, and the truncated mantissas of t > 0."""
    x = torch.randn(3, 70001, generator=torch.Generator().manual_seed(5)) * 1e3  # past the threads' threshold
    x.view(-1)[:8] = torch.tensor([float("nan"), float("inf"), -float("inf"), 0.0, -0.0, 1e-40, -3e-39, 2.0**-126])
    got, want = cpu_native.split(x, mult, capability), split_operand(x, mult)
    assert torch.equal(got[0].view(torch.int32), want[0].view(torch.int32)) and torch.equal(got[1], want[1])


def _random_table(bits: int, low: int, high: int, seed: int, signed: bool = False) -> Multiplier:
    size = 1 << bits
    return Multiplier.from_table(torch.randint(low, high, (size, size), generator=torch.Generator().manual_seed(seed)),
                                 signed=signed)


# table -> (the MAC it runs on with AVX-512, what it exercises).  Table16MaddMac: a sign-magnitude table's negated
# rows (read by a negative A) and B's +-1 signs, a signed (two's-complement) table's entries as they are, a
# narrower table's padded rows; Table16Mac: entries zero-extended past 2**15; entries past 16 bits stay on the
# gather kernel.
TABLES_16 = {
    "8-bit table, entries up to 2**15 - 1": ("table16_madd", lambda: _random_table(8, 0, 1 << 15, 6)),
    "signed table, entries -2**15..2**15-1": ("table16_madd",
                                              lambda: _random_table(8, -(1 << 15), 1 << 15, 2, signed=True)),
    "5-bit table": ("table16_madd", lambda: _random_table(5, 0, 1000, 3)),
    "5-bit signed table": ("table16_madd", lambda: _random_table(5, -500, 500, 4, signed=True)),
    "unsigned entries up to 2**16 - 1": ("table16", lambda: _random_table(8, 0, 1 << 16, 1)),
    "entries past 16 bits": ("table", lambda: _random_table(8, 0, 1 << 20, 5)),
    "signed entries past 16 bits": ("table", lambda: _random_table(8, -(1 << 16), 1 << 16, 8, signed=True)),
}


@pytest.mark.parametrize("capability", CAPABILITIES)
@pytest.mark.parametrize("table", list(TABLES_16))
@pytest.mark.parametrize("shape", [(1, 1, 1, 1), (2, 13, 70, 9), (1, 7, 33, 300)])
def test_tables_in_registers_equal_the_reference(capability, table, shape):
    """The register tables (AVX-512: rows looked up with vpermt2w) give the reference's sums: N past one 32- and
    64-column panel and not a multiple of them, zero operands, both signs, every index."""
    mac, make = TABLES_16[table]
    mult, (G, M, N, K) = make(), shape
    lo, hi = mult.q_range
    gen = torch.Generator().manual_seed(G * M + N)
    qa, qb = torch.randint(lo, hi + 1, (G, M, K), generator=gen), torch.randint(lo, hi + 1, (G, N, K), generator=gen)
    qa.view(-1)[:3] = torch.tensor([0, lo, hi])[:qa.numel()]
    packed = cpu_native_int._int_b(qb, mult, cpu_native.library(capability))
    assert packed.mac == cpu_native.MACS["int", mac if capability == "AVX512" else "table"]
    got = cpu_native_int.bmm_nt_int(qa, qb, mult, capability=capability)
    assert torch.equal(got, reference.bmm_nt_int(qa, qb, mult))


@pytest.mark.parametrize("capability", CAPABILITIES)
def test_the_loaders_mirrors_are_the_kernels_constants(capability):
    """MAC ids, QuantFields kinds and the zero operands' stand-ins are spelled twice (C++ and Python): the
    library's own report of them equals the Python side's."""
    report = cpu_native.library(capability).mbm_constants().decode()
    got = {name: int(value) for name, value in (word.split("=") for word in report.split())}
    macs = cpu_native.MACS
    quant = cpu_native_int._QUANT_FIELDS
    want = {"F_MITCHELL": macs["float", "mitchell"], "F_MBM": macs["float", "mbm"],
            "F_MITCHELL_WORDS": macs["float", "words"], "I_MBM": macs["int", "mbm"], "I_TABLE": macs["int", "table"],
            "F_LMUL": macs["float", "lmul"], "I_DRUM": macs["int", "drum"], "I_MITCHELL_WORDS": macs["int", "words"],
            "I_TABLE16": macs["int", "table16"], "I_MBM_FOLD": macs["int", "mbm_fold"],
            "I_TABLE16_MADD": macs["int", "table16_madd"], "Q_FLOAT": quant["mbm"], "Q_WORDS": quant["mitchell"],
            "Q_TABLE": quant["table"], "Q_SIGNED_TABLE": quant["signed table"], "Q_DRUM": quant["drum"],
            "Q_FOLD": quant["mbm_fold"], "Q_WORDS_B": quant["mitchell b"],
            "INT_ZERO_A": cpu_native_int.INT_ZERO_WORDS["a"], "INT_ZERO_B": cpu_native_int.INT_ZERO_WORDS["b"],
            "FOLDED_ZERO_BITS": int(torch.tensor(cpu_native_int.FOLDED_ZERO).view(torch.int32))}
    assert got == want
    assert len(set(macs.values())) == len(macs) and len(set(quant.values())) == len(quant)


def test_integer_sums_pass_int32_in_blocks():
    """mbm-int12 products reach 2^24: sums over K = 5000 overflow int32 unless flushed to int64 in blocks."""
    mult = as_multiplier("mbm-int12")
    qa = torch.full((1, 2, 5000), mult.max_magnitude)
    qb = torch.full((1, 3, 5000), -mult.max_magnitude)
    got = cpu_native_int.bmm_nt_int(qa, qb, mult)
    assert got.abs().min() > 2**31 and torch.equal(got, reference.bmm_nt_int(qa, qb, mult))


def test_compiled_backend_runs_supported_integer_designs_natively(monkeypatch):
    calls = []
    monkeypatch.setattr(cpu_native_int, "bmm_nt_int", lambda *args, **kw: calls.append(args[2].name) or 0)
    mult, qa, qb = _int_operands("mbm-int8", (1, 3, 4), (1, 2, 4))
    compiled.bmm_nt_int(qa, qb, mult)
    assert calls == ["mbm-int8"]
    assert not cpu_native_int.supports_int(as_multiplier("mbm-int13"))  # wider designs stay on inductor
    assert not cpu_native_int.supports_int(Multiplier.from_table(torch.zeros(512, 512, dtype=torch.int64)))


INT_CONV_CASES = [  # (B, C, H, W), (O, C/groups, kh, kw), stride, padding, dilation, groups
    ((2, 3, 9, 8), (5, 3, 3, 3), (1, 1), (1, 1), (1, 1), 1),
    ((1, 4, 11, 7), (6, 2, 3, 2), (2, 1), (0, 2), (1, 2), 2),
    ((3, 1, 6, 6), (7, 1, 5, 5), (1, 1), (2, 2), (1, 1), 1),
    ((1, 6, 8, 8), (6, 1, 3, 3), (2, 2), (1, 0), (2, 1), 6),  # depthwise
]


@pytest.mark.parametrize("capability", CAPABILITIES)
@pytest.mark.parametrize("name", ["mbm-int8", "mitchell-int5", "mbm-int12"])
@pytest.mark.parametrize("case", range(len(INT_CONV_CASES)))
def test_integer_implicit_gemm_conv_equals_the_reference(capability, name, case):
    x_shape, w_shape, stride, padding, dilation, groups = INT_CONV_CASES[case]
    mult, qx, qw = _int_operands(name, x_shape, w_shape, seed=case)
    got = cpu_native_int.conv2d_int(qx, qw, stride, padding, dilation, groups, mult, capability=capability)
    want = reference.conv2d_int(qx, qw, stride, padding, dilation, groups, mult)
    assert torch.equal(got, want) and got.stride() == want.stride()  # the layout too: it steers later rounding


def test_compiled_integer_conv_uses_the_implicit_gemm(monkeypatch):
    calls = []
    monkeypatch.setattr(cpu_native_int, "conv2d_int", lambda *args, **kw: calls.append(args[6].name) or 0)
    mult, qx, qw = _int_operands("mbm-int8", (1, 2, 5, 5), (3, 2, 3, 3))
    compiled.conv2d_int(qx, qw, (1, 1), (1, 1), (1, 1), 1, mult)
    assert calls == ["mbm-int8"]


# --------------------------------------------------------------------------- Mitchell in the bit domain

def _range(*values):
    mult = Multiplier("mitchell", 0)
    _, lo, hi = cpu_native.mitchell_words(*split_operand(torch.tensor(values, dtype=torch.float32), mult), 0)
    return lo, hi


def test_products_stay_normal_at_the_edges_of_the_float_range():
    assert cpu_native.products_stay_normal(_range(2.0**-63), _range(-(2.0**-63)))  # 2**-126 * [1, 4): normal
    assert not cpu_native.products_stay_normal(_range(2.0**-64), _range(2.0**-63))  # 2**-127: subnormal
    assert cpu_native.products_stay_normal(_range(2.0**63), _range(1.5 * 2.0**63))  # below 2**128
    assert not cpu_native.products_stay_normal(_range(2.0**63), _range(2.0**64))  # up to 2**129: overflow
    assert not cpu_native.products_stay_normal(_range(1.0, float("inf")), _range(1.0))
    assert not cpu_native.products_stay_normal(_range(1.0), _range(float("nan")))
    assert _range(0.0, -0.0, 1e-40) == (256, -1)  # zeros and subnormals have no exponent: no product
    assert cpu_native.products_stay_normal(_range(0.0, 1e-40), _range(3e38))


def test_words_are_the_operand_bits_minus_the_bias_and_a_zero_word_for_zeros():
    mult = Multiplier("mitchell", 0)
    x = torch.tensor([1.5, -2.75, 0.0, -0.0, 1e-40, 3e38, -1e-30])
    words, lo, hi = cpu_native.mitchell_words(*split_operand(x, mult), 0x3F800000)
    want = (x.view(torch.int32).to(torch.int64) - 0x3F800000) % 2**32
    want = torch.where(want >= 2**31, want - 2**32, want).to(torch.int32)
    nonzero = torch.tensor([True, True, False, False, False, True, True])
    assert torch.equal(words[nonzero], want[nonzero]) and (words[~nonzero] == -0x3F800000).all()
    assert (lo, hi) == (int(torch.frexp(torch.tensor(1e-30)).exponent) + 126, 254)


def _awkward_normal_operands(seed):
    """Operands whose products are all normal: magnitudes over 2**+-40, zeros, -0, subnormals, both signs."""
    gen = torch.Generator().manual_seed(seed)
    a = torch.randn(2, 37, 300, generator=gen) * 2.0 ** torch.randint(-40, 40, (2, 37, 300), generator=gen)
    b = torch.randn(2, 45, 300, generator=gen) * 2.0 ** torch.randint(-40, 40, (2, 45, 300), generator=gen)
    for t in (a, b):
        t[torch.rand(t.shape, generator=gen) < 0.3] = 0.0
        t.view(-1)[:4] = torch.tensor([-0.0, 1e-40, -1e-42, 0.0])
    return a, b


@pytest.mark.parametrize("mult", [Multiplier("mitchell", 0), Multiplier("mitchell", 9)], ids=str)
def test_the_bit_domain_mitchell_kernel_equals_the_general_one_bit_for_bit(mult, monkeypatch):
    """Same products, same k order: the words path (AVX-512) gives the very same float32 sums, GEMM and conv."""
    a, b = _awkward_normal_operands(seed=5)
    fields = (*split_operand(a, mult), *split_operand(b, mult))
    x, w = a[:, :36].reshape(2, 4, 9, 300)[:, :, :, :9], b[0, :6, :36].reshape(6, 4, 3, 3)  # (2, 4, 9, 9), (6, 4, 3, 3)
    assert cpu_native.products_stay_normal(cpu_native.mitchell_words(*fields[:2], 0)[1:],
                                           cpu_native.mitchell_words(*fields[2:], 0)[1:])
    fast = cpu_native.bmm_nt_split(*fields, mult)
    fast_conv = cpu_native.conv2d(x, w, (1, 1), (1, 1), (1, 1), 1, mult)
    monkeypatch.setattr(cpu_native, "products_stay_normal", lambda *ranges: False)
    assert torch.equal(fast, cpu_native.bmm_nt_split(*fields, mult))
    assert torch.equal(fast_conv, cpu_native.conv2d(x, w, (1, 1), (1, 1), (1, 1), 1, mult))
    want, abs_sum = _oracle(a, b, mult)
    assert ((fast.double() - want).abs() <= 1e-5 * abs_sum + 1e-300).all()


def test_products_that_could_underflow_take_the_general_kernel():
    mult = Multiplier("mitchell", 0)
    a = torch.full((1, 3, 4), 2.0**-70)
    b = torch.full((1, 2, 4), 2.0**-70)  # every product 2**-140: subnormal, rounded as the reference does
    got = cpu_native.bmm_nt_split(*split_operand(a, mult), *split_operand(b, mult), mult)
    assert torch.equal(got, reference.bmm_nt(a, b, mult)) and (got > 0).all()
