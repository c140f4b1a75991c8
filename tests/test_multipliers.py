"""The elementwise multipliers against the scalar model of SPEC.md section 1."""
import math
import struct

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import mbmlib
from mbmlib import Multiplier, approx_mul, as_multiplier, error_map, error_stats, mbm_mul, mitchell_mul
from scalar_model import approx_mul_bits

TRUNCATIONS = [0, 8, 16, 18, 20, 22]


def bits_of(x: torch.Tensor) -> torch.Tensor:
    return x.contiguous().view(torch.int32).to(torch.int64) & 0xFFFFFFFF


def assert_matches_model(a, b, kind, t):
    """Vectorised op equals the scalar model: NaN as NaN, zeros by value, else bit for bit."""
    got = approx_mul(a, b, Multiplier(kind, t)).cpu()
    a_bits, b_bits, got_bits = bits_of(a.cpu()).tolist(), bits_of(b.cpu()).tolist(), bits_of(got).tolist()
    bad = []
    for i, (x, y, g) in enumerate(zip(a_bits, b_bits, got_bits)):
        want = approx_mul_bits(x, y, kind, t)
        want_nan = (want & 0x7F800000) == 0x7F800000 and (want & 0x7FFFFF) != 0
        got_nan = (g & 0x7F800000) == 0x7F800000 and (g & 0x7FFFFF) != 0
        if want_nan or got_nan:
            ok = want_nan and got_nan
        elif (want & 0x7FFFFFFF) == 0:
            ok = (g & 0x7FFFFFFF) == 0
        else:
            ok = want == g
        if not ok:
            bad.append((i, hex(x), hex(y), hex(want), hex(g)))
    assert not bad, f"{len(bad)} mismatches, first: {bad[:5]}"


def random_floats(n, gen, exp_lo=1, exp_hi=254):
    """float32 with random signs, random mantissas and exponent fields in [exp_lo, exp_hi]."""
    sign = torch.randint(0, 2, (n,), generator=gen, dtype=torch.int64) << 31
    exp = torch.randint(exp_lo, exp_hi + 1, (n,), generator=gen, dtype=torch.int64) << 23
    mant = torch.randint(0, 1 << 23, (n,), generator=gen, dtype=torch.int64)
    return (sign | exp | mant).to(torch.int32).view(torch.float32)


@pytest.mark.parametrize("kind", ["mbm", "mitchell"])
@pytest.mark.parametrize("t", TRUNCATIONS)
def test_random_pairs_bit_exact(kind, t, device):
    gen = torch.Generator().manual_seed(1000 + t)
    n = 100_000
    # half near 1 (normal products), half across the whole exponent range (overflow, underflow)
    a = torch.cat([random_floats(n // 2, gen, 100, 154), random_floats(n // 2, gen)])
    b = torch.cat([random_floats(n // 2, gen, 100, 154), random_floats(n // 2, gen)])
    assert_matches_model(a.to(device), b.to(device), kind, t)


def special_values():
    f = lambda b: struct.unpack("<f", struct.pack("<I", b))[0]  # noqa: E731
    vals = [0.0, -0.0, 1.0, -1.0, 1.5, 2.0, 3.0, 0.75, math.inf, -math.inf, math.nan,
            f(0x00000001), f(0x007FFFFF), f(0x80400000),  # subnormals
            f(0x00800000), f(0x80800000), f(0x7F7FFFFF), f(0xFF7FFFFF),  # smallest / largest normals
            1e38, -3e38, 1e-38, 2e-20, 3e-20, 1.9e19, 1.8e19, 1.0000001, 1.9999999]
    return vals


@pytest.mark.parametrize("kind", ["mbm", "mitchell"])
@pytest.mark.parametrize("t", TRUNCATIONS)
def test_special_values_bit_exact(kind, t, device):
    vals = torch.tensor(special_values(), dtype=torch.float32)
    a, b = torch.meshgrid(vals, vals, indexing="ij")
    assert_matches_model(a.reshape(-1).to(device), b.reshape(-1).to(device), kind, t)


def test_special_cases_semantics():
    inf, nan = math.inf, math.nan
    a = torch.tensor([nan, inf, inf, -inf, 0.0, 1e-40, 3e38, 1e-30])
    b = torch.tensor([1.0, 0.0, 2.0, 3.0, 5.0, 1.0, 3e38, 1e-30])
    r = mbm_mul(a, b)
    assert math.isnan(r[0]) and math.isnan(r[1])
    assert r[2] == inf and r[3] == -inf
    assert r[4] == 0 and r[5] == 0  # zero operand; subnormal counts as zero
    assert r[6] == inf  # overflow
    assert r[7] == 0  # underflow below the smallest normal


def test_worked_values():
    assert mbm_mul(torch.tensor(1.0), torch.tensor(1.0)).item() == 1.078125
    assert mitchell_mul(torch.tensor(1.5), torch.tensor(1.5)).item() == 2.0
    assert mbm_mul(torch.tensor(-2.5), torch.tensor(1.0)).item() == -2.65625


# SPEC.md section 1 table: (bias, mean abs, max, min) in percent
SPEC_TABLE = {
    "mitchell": (-3.85, 3.85, 0.0, -11.11),
    "mbm": (-0.095, 2.58, 7.81, -7.64),
    "mbm-t16": (-0.095, 2.60, 9.35, -8.56),
    "mbm-t18": (-0.84, 2.91, 12.47, -11.98),
}


@pytest.mark.parametrize("name", list(SPEC_TABLE))
def test_error_stats_reproduce_spec_table(name):
    stats = error_stats(name, n=1_000_000, seed=0)
    bias, mean_abs, mx, mn = SPEC_TABLE[name]
    assert stats["bias"] == pytest.approx(bias, abs=0.02)
    assert stats["mean_abs"] == pytest.approx(mean_abs, abs=0.02)
    assert stats["max"] == pytest.approx(mx, abs=0.05)
    assert stats["min"] == pytest.approx(mn, abs=0.05)
    assert stats["multiplier"] == name and stats["n"] == 1_000_000


def test_error_map_shape_and_values():
    x, err = error_map("mitchell", bins=16)
    assert x.shape == (16,) and err.shape == (16, 16)
    assert (err <= 0).all()  # Mitchell never overestimates
    assert torch.allclose(err, err.T)
    a, b = 1 + x[3], 1 + x[5]
    want = (mitchell_mul(a.float(), b.float()).double() - a * b) / (a * b) * 100
    assert err[3, 5].item() == pytest.approx(want.item(), rel=1e-6)
    with pytest.raises(ValueError, match="bins"):
        error_map("mbm", bins=1)


@pytest.mark.parametrize("name,kind,t", [("mbm", "mbm", 0), ("MBM-t16", "mbm", 16), ("mitchell-t8", "mitchell", 8),
                                         ("exact", "exact", 0), ("mbm-t22", "mbm", 22)])
def test_parse_multiplier(name, kind, t):
    m = as_multiplier(name)
    assert (m.kind, m.t) == (kind, t)
    assert as_multiplier(m.name) == m and as_multiplier(m) is m


@pytest.mark.parametrize("bad", ["mbn", "mbm-t23", "mbm-t-1", "exact-t4", "mitchell-8", ""])
def test_bad_multiplier_names(bad):
    with pytest.raises(ValueError, match="valid"):
        as_multiplier(bad)
    with pytest.raises(ValueError):
        approx_mul(torch.ones(2), torch.ones(2), bad)


def test_bad_multiplier_objects():
    with pytest.raises(ValueError, match="0..22"):
        Multiplier("mbm", 23)
    with pytest.raises(ValueError, match="unknown float design 'booth'.*valid names"):
        Multiplier("booth")
    with pytest.raises(TypeError):
        as_multiplier(3)


def test_broadcasting_and_dtypes():
    a = torch.randn(3, 1, 5)
    b = torch.randn(4, 1)
    r = mbm_mul(a, b)
    assert r.shape == (3, 4, 5) and r.dtype == torch.float32
    assert torch.equal(r, mbm_mul(a.expand(3, 4, 5).contiguous(), b.expand(3, 4, 5).contiguous()))
    for dt in (torch.float16, torch.bfloat16, torch.float64):
        r = mbm_mul(a.to(dt), b.to(dt))
        assert r.dtype == dt
        want = mbm_mul(a.to(dt).float(), b.to(dt).float()).to(dt)
        assert torch.equal(r, want)
    assert mbm_mul(torch.tensor(2.0), torch.tensor([1.0, 1.5])).tolist() == [2.15625, 3.0 + 0.15625 / 1]


def test_exact_multiplier_is_torch_mul():
    a, b = torch.randn(100), torch.randn(100)
    assert torch.equal(approx_mul(a, b, "exact"), a * b)


@pytest.mark.parametrize("dtype", [torch.int32, torch.int64, torch.complex64, torch.bool])
def test_non_float_inputs_raise_type_error(dtype):
    with pytest.raises(TypeError, match="floating-point"):
        mbm_mul(torch.ones(3, dtype=dtype), torch.ones(3))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_device_mismatch_raises_like_torch_mul():
    a, b = torch.ones(3), torch.ones(3, device="cuda")
    with pytest.raises(RuntimeError) as want:
        torch.mul(a, b)
    with pytest.raises(type(want.value)):
        mbm_mul(a, b)
    scalar = mbm_mul(torch.tensor(1.5), b)  # a 0-dim CPU tensor is allowed, as in torch.mul
    assert scalar.device == b.device and torch.equal(scalar.cpu(), mbm_mul(torch.tensor(1.5), a))


def test_public_api():
    for name in ("mbm_mul", "mitchell_mul", "approx_mul", "Multiplier", "error_stats", "error_map"):
        assert hasattr(mbmlib, name)


finite = st.floats(width=32, allow_nan=False, allow_infinity=False, allow_subnormal=False)


@settings(max_examples=300, deadline=None)
@given(finite, finite)
def test_mbm_commutative_and_signed(a, b):
    ta, tb = torch.tensor([a]), torch.tensor([b])
    ab, ba = mbm_mul(ta, tb), mbm_mul(tb, ta)
    assert torch.equal(ab, ba)
    if ab.item() != 0:
        assert math.copysign(1, ab.item()) == math.copysign(1, a) * math.copysign(1, b)


@settings(max_examples=300, deadline=None)
@given(finite.filter(lambda x: x != 0), finite.filter(lambda x: x != 0))
def test_mbm_relative_error_bound(a, b):
    exact = float(torch.tensor(a, dtype=torch.float64) * torch.tensor(b, dtype=torch.float64))
    if not 2.0**-126 <= abs(exact) < 2.0**127:  # product must be a normal float
        return
    got = mbm_mul(torch.tensor([a]), torch.tensor([b])).item()
    assert abs((got - exact) / exact) <= 0.0782


def test_float64_operands_beyond_float32_are_refused():
    with pytest.raises(ValueError, match="a holds float64 values beyond float32's range"):
        approx_mul(torch.tensor([1e300], dtype=torch.float64), torch.tensor([1e-300], dtype=torch.float64))
    ok = approx_mul(torch.tensor([1.5, float("inf")], dtype=torch.float64), torch.tensor([1.5, 2.0], dtype=torch.float64))
    assert ok.dtype == torch.float64 and ok[1] == float("inf")  # infinities are values the designs take
