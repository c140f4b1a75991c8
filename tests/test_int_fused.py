"""The C++ integer MACs (FloorMac, IntWordsMac) and the quantisation fused into their operand pass, against plain
references: the registry's integer products, :func:`mbmlib.quant.quantise` then the unfused kernels, and the
reference backend; plus the cached meta shape checks of :func:`mbmlib.functional.on_meta`.

Every instruction set this CPU can run is built and tested where the kernel itself is under test.
"""
import pytest
import torch
import torch.nn.functional as F

from mbmlib import functional as AF
from mbmlib import quant
from mbmlib.kernels import cpu_native, cpu_native_int
from mbmlib.multipliers import Multiplier, as_multiplier
from mbmlib.multipliers.integer import approx_mul_int

_ORDER = ("DEFAULT", "AVX2", "AVX512")
_HERE = torch.backends.cpu.get_cpu_capability()
CAPABILITIES = list(_ORDER[:_ORDER.index(_HERE) + 1]) if _HERE in _ORDER else [_HERE]

_TABLE = torch.randint(0, 1 << 16, (256, 256), generator=torch.Generator().manual_seed(5))  # row/column 0 not 0
_SIGNED_TABLE = torch.randint(-(1 << 15), 1 << 15, (256, 256), generator=torch.Generator().manual_seed(6))
_WIDE_TABLE = torch.randint(0, 1 << 20, (256, 256), generator=torch.Generator().manual_seed(7))  # past 16 bits
_SMALL_TABLE = torch.randint(0, 1 << 15, (256, 256), generator=torch.Generator().manual_seed(8))  # negatable in int16


def _multiplier(name: str) -> Multiplier:
    """A design by name, or "table" / "small table" / "signed table" / "wide table": random 8-bit tables (entries of
    16 bits, 15 or 20: each its own MAC) whose operand 0 gives nonzero products."""
    if name == "table":
        return Multiplier.from_table(_TABLE)
    if name == "wide table":
        return Multiplier.from_table(_WIDE_TABLE)
    if name == "small table":
        return Multiplier.from_table(_SMALL_TABLE)
    if name == "signed table":
        return Multiplier.from_table(_SIGNED_TABLE, signed=True)
    return as_multiplier(name)


FUSED = ["mbm-int8", "mitchell-int8", "drum4-int8", "table", "small table", "signed table",
         "wide table"]  # every QuantFields kind, every table MAC


def _bits(field: torch.Tensor) -> torch.Tensor:
    """A field as the int32 words the kernel reads (MBM's scale field is a float32 tensor in Python)."""
    return field.view(torch.int32) if field.dtype == torch.float32 else field.to(torch.int32)


# ----------------------------------------------------------------------------- 1. every product of the integer MACs


@pytest.mark.parametrize("capability", CAPABILITIES)
@pytest.mark.parametrize("name", ["mbm-int8", "mitchell-int8", "drum4-int8", "mbm-int4", "mitchell-int2"])
def test_every_product_of_the_integer_macs_is_the_registrys(capability, name):
    mult = as_multiplier(name)
    lo, hi = mult.q_range
    q = torch.arange(lo, hi + 1)
    got = cpu_native_int.bmm_nt_int(q.view(1, -1, 1), q.view(1, -1, 1), mult, capability=capability)[0]  # K = 1
    want = approx_mul_int(q[:, None], q[None, :], mult)
    assert got.dtype == torch.float64 and torch.equal(got, want.double())
    assert want.abs().max() > 0 and (want == 0).any()


@pytest.mark.parametrize("capability", CAPABILITIES)
@pytest.mark.parametrize("name", ["mbm-int12", "mitchell-int12"])
def test_12_bit_products_of_the_integer_macs_are_the_registrys(capability, name):
    mult = as_multiplier(name)
    lo, hi = mult.q_range
    gen = torch.Generator().manual_seed(12)
    qa = torch.cat([torch.tensor([lo, hi, 0, 1, -1]), torch.randint(lo, hi + 1, (300,), generator=gen)])
    qb = torch.cat([torch.tensor([hi, lo, 0, -1, 2]), torch.randint(lo, hi + 1, (300,), generator=gen)])
    got = cpu_native_int.bmm_nt_int(qa.view(1, -1, 1), qb.view(1, -1, 1), mult, capability=capability)[0]
    assert torch.equal(got, approx_mul_int(qa[:, None], qb[None, :], mult).double())


# ----------------------------------------------------------------------------- 2. quantisation into operand fields


def _awkward_inputs(scale: float, mult: Multiplier) -> torch.Tensor:
    """Ties (k + 1/2) * scale over the whole range, 0, random values, values beyond the range, +-inf and NaN; none
    rounding to -0 (their own test below)."""
    lo, hi = mult.q_range
    k = torch.arange(lo - 2, hi + 2, dtype=torch.float32)
    ties = (k[k != -1] + 0.5) * scale
    extremes = torch.tensor([0.0, 1e30, -1e30, (hi + 7) * scale, (lo - 7) * scale, float("inf"), -float("inf"),
                             float("nan"), float("nan")])
    noise = torch.randn(200, generator=torch.Generator().manual_seed(2)) * (hi * scale / 3)
    x = torch.cat([ties, extremes, noise])
    return x[~(torch.signbit(x) & (torch.round(x / scale) == 0))]


@pytest.mark.parametrize("capability", CAPABILITIES)
@pytest.mark.parametrize("scale", [0.0625, 0.3])
@pytest.mark.parametrize("name", FUSED)
def test_quantised_operand_writes_the_fields_of_quantise(capability, scale, name):
    mult = _multiplier(name)
    x = _awkward_inputs(scale, mult)
    s = torch.tensor(scale)
    mac = cpu_native_int._int_mac(mult, cpu_native.library(capability))  # MBM on AVX-512: FoldMac's folded fields
    fields, bad = cpu_native_int.quantised_operand(x, s, mult, mac, capability=capability)
    want = cpu_native_int._int_operand(quant.quantise(x, s, mult), mult, "a", mac)
    assert len(fields) == len(want)
    for got_field, want_field in zip(fields, want):
        assert torch.equal(got_field, _bits(want_field))
    assert bad == 4


@pytest.mark.parametrize("name", FUSED)
def test_quantised_operand_of_inputs_rounding_to_minus_zero_is_the_operand_zero(name):
    """-0.0, -tiny and -scale/2 (a tie) quantise to q = 0: the fields of 0 (for Mitchell its zero word)."""
    mult = _multiplier(name)
    x = torch.tensor([-0.0, -1e-45, -1e-30, -0.1, -0.5, -0.49, 0.0])
    mac = cpu_native_int._int_mac(mult, cpu_native.library())
    fields, bad = cpu_native_int.quantised_operand(x, torch.tensor(1.0), mult, mac)
    want = cpu_native_int._int_operand(torch.zeros(x.shape, dtype=torch.int32), mult, "a", mac)
    assert bad == 0 and len(fields) == len(want)
    for got_field, want_field in zip(fields, want):
        assert torch.equal(got_field, _bits(want_field))


@pytest.mark.parametrize("capability", CAPABILITIES)
@pytest.mark.parametrize("side", ["a", "b"])
@pytest.mark.parametrize("name", FUSED)
def test_rows_with_their_own_scales_get_the_fields_of_quantise(capability, side, name):
    """Each row quantised with its own scale (a weight's per-channel scales), into A's or B's fields; each row's
    count of NaN/inf."""
    mult = _multiplier(name)
    first, second = _awkward_inputs(0.0625, mult), _awkward_inputs(0.3, mult)
    n = min(len(first), len(second))  # both hold the ties, the extremes and some noise
    rows = torch.stack([first[:n], second[:n]])
    rows[1, torch.isnan(rows[1]).nonzero()[0]] = 1.0  # one NaN fewer
    scales = torch.tensor([0.0625, 0.3])
    lib = cpu_native.library(capability)
    mac = cpu_native_int._int_mac(mult, lib)
    fields, bad = cpu_native_int._quantised_rows(rows, scales, mult, mac, side, lib)
    want = cpu_native_int._int_operand(quant.quantise(rows, scales.view(2, 1), mult), mult, side, mac)
    assert len(fields) == len(want)
    for got_field, want_field in zip(fields, want):
        assert torch.equal(got_field, _bits(want_field))
    assert bad.tolist() == [4, 3]


def test_quantised_operand_reads_float64_inputs_as_float32():
    mult = as_multiplier("mbm-int8")
    x = torch.tensor([1.5, 2.5, -7.25, float("nan")], dtype=torch.float64)
    mac = cpu_native_int._int_mac(mult, cpu_native.library())
    fields, bad = cpu_native_int.quantised_operand(x, torch.tensor(0.5), mult, mac)
    want = cpu_native_int._int_operand(quant.quantise(x, torch.tensor(0.5), mult), mult, "a", mac)
    assert bad == 1 and all(torch.equal(f, _bits(w)) for f, w in zip(fields, want))


# ----------------------------------------------------------------------------- 3. fused kernels == the unfused path


def _float_operand(shape, scale: float, mult: Multiplier, seed: int) -> torch.Tensor:
    """Float32 values spread over the multiplier's range, beyond it at a few places, with one NaN and one inf."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=gen) * (mult.q_range[1] * scale / 2)
    flat = x.view(-1)
    flat[:4] = torch.tensor([float("nan"), float("inf"), 1e6, -0.4 * scale])[:flat.numel()]
    return x


def _weights(shape, mult: Multiplier, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Float weights (row 1 of dim 0 holds a NaN), their float32 scales per output row (dim 0 of ``shape``) and
    the weights quantised with them."""
    w = torch.randn(shape, generator=torch.Generator().manual_seed(seed))
    if shape[0] > 1:
        w[1].view(-1)[0] = float("nan")
    w_scale = (0.5 + torch.rand(shape[0], generator=torch.Generator().manual_seed(seed + 1))) / 100
    return w, w_scale, quant.quantise(w, w_scale.view(-1, *[1] * (w.dim() - 1)), mult)


def _bad(x: torch.Tensor) -> int:
    return int((~torch.isfinite(x)).sum())


CONV_CASES = [  # (B, C, H, W), (O, C/groups, kh, kw), stride, padding, dilation, groups
    ((2, 3, 9, 8), (5, 3, 3, 3), (1, 1), (1, 1), (1, 1), 1),
    ((1, 4, 11, 7), (6, 2, 3, 2), (2, 1), (0, 2), (1, 2), 2),
    ((1, 6, 8, 8), (6, 1, 3, 3), (2, 2), (1, 0), (2, 1), 6),  # depthwise
    ((1, 2, 5, 5), (37, 2, 2, 2), (1, 1), (2, 1), (1, 1), 1),  # 37 output channels: a partial column panel
]


@pytest.mark.parametrize("case", range(len(CONV_CASES)))
@pytest.mark.parametrize("name", FUSED)
def test_fused_conv_equals_quantise_then_conv2d_int(name, case):
    x_shape, w_shape, stride, padding, dilation, groups = CONV_CASES[case]
    mult = _multiplier(name)
    x_scale = torch.tensor(0.37)
    x = _float_operand(x_shape, 0.37, mult, seed=case)
    w, w_scale, qw = _weights(w_shape, mult, seed=case)
    got, bad, quantised_w = cpu_native_int.conv2d_quant(x, x_scale, w, w_scale, stride, padding, dilation, groups, mult)
    sums = cpu_native_int.conv2d_int(quant.quantise(x, x_scale, mult), qw, stride, padding, dilation, groups, mult)
    want = (sums * (x_scale.double() * w_scale.double()).view(1, -1, 1, 1)).float()
    assert got.dtype == torch.float32 and got.shape == want.shape and got.stride() == want.stride()
    assert torch.equal(got, want) and bad == _bad(x) == 2
    assert torch.equal(quantised_w.bad_rows, torch.arange(w_shape[0]) == 1) and quantised_w.any_bad
    assert (sums != 0).any()


BMM_SHAPES = [(1, 1, 1, 1), (3, 5, 37, 19), (2, 7, 33, 64), (1, 9, 70, 3)]  # (G, M, N, K)


@pytest.mark.parametrize("capability", CAPABILITIES)
@pytest.mark.parametrize("shape", BMM_SHAPES, ids=str)
@pytest.mark.parametrize("name", FUSED)
def test_fused_bmm_equals_quantise_then_bmm_nt_int(capability, name, shape):
    G, M, N, K = shape
    mult = _multiplier(name)
    a_scale = torch.tensor(0.05)
    a = _float_operand((G, M, K), 0.05, mult, seed=K)
    b, b_scale, qb = _weights((N, G, K), mult, seed=N)  # one scale per row n, shared by the groups
    b, qb = b.transpose(0, 1).contiguous(), qb.transpose(0, 1).contiguous()  # (G, N, K)
    got, bad, quantised_b = cpu_native_int.bmm_nt_quant(a, a_scale, b, b_scale, mult, capability=capability)
    sums = cpu_native_int.bmm_nt_int(quant.quantise(a, a_scale, mult), qb, mult, capability=capability)
    want = (sums * (a_scale.double() * b_scale.double())).float()
    assert got.dtype == torch.float32 and got.shape == (G, M, N)
    assert torch.equal(got, want) and bad == _bad(a)
    bad_rows = ~torch.isfinite(b).all(-1)  # (G, N): row 1 of group 0
    assert torch.equal(quantised_b.bad_rows, bad_rows) and quantised_b.any_bad == (N > 1) == bool(bad_rows.any())


# ----------------------------------------------------------------------------- 4. the public API: compiled == reference


def _layer_inputs(x_shape, w_shape, mult: Multiplier, dtype=torch.float32):
    """Float input with a NaN and an inf, weights with one non-finite output row, and their scales."""
    gen = torch.Generator().manual_seed(7)
    x = torch.randn(x_shape, generator=gen, dtype=torch.float64).to(dtype) * 2
    w = torch.randn(w_shape, generator=gen, dtype=torch.float64).to(dtype)
    x.view(-1)[3], x.view(-1)[-2] = float("nan"), -float("inf")
    w[1].view(-1)[0] = float("inf")
    hi = mult.q_range[1]
    return x, w, float(x[torch.isfinite(x)].abs().max()) / hi, w.flatten(1).nan_to_num(posinf=0).abs().amax(1) / hi


def _same_with_nans(got: torch.Tensor, want: torch.Tensor) -> None:
    assert got.dtype == want.dtype and torch.equal(got.isnan(), want.isnan()) and got.isnan().any()
    assert torch.equal(got.nan_to_num(), want.nan_to_num()) and not got.isnan().all()


def _record(monkeypatch, name: str) -> list:
    calls, native = [], getattr(cpu_native_int, name)
    monkeypatch.setattr(cpu_native_int, name, lambda *a, **kw: calls.append(a[0].dtype) or native(*a, **kw))
    return calls


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("name", FUSED)
def test_quantised_conv2d_on_compiled_equals_the_reference(monkeypatch, name, dtype):
    mult = _multiplier(name)
    x, w, s_x, s_w = _layer_inputs((2, 4, 7, 6), (6, 2, 3, 3), mult, dtype)
    bias = torch.linspace(-1, 1, 6, dtype=dtype)
    calls = _record(monkeypatch, "conv2d_quant")
    kw = dict(stride=(2, 1), padding=(1, 2), dilation=(1, 2), groups=2, act_scale=s_x, weight_scale=s_w,
              multiplier=mult)
    got = quant.conv2d(x, w, bias, backend="compiled", **kw)
    assert calls == ([torch.float32] if dtype == torch.float32 else [])  # float64 keeps quantise + conv2d_int
    _same_with_nans(got, quant.conv2d(x, w, bias, backend="reference", **kw))
    assert got[:, 1].isnan().all() and not got[:, 0].isnan().all()  # the inf weight's channel


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("name", FUSED)
def test_quantised_linear_on_compiled_equals_the_reference(monkeypatch, name, dtype):
    mult = _multiplier(name)
    x, w, s_x, s_w = _layer_inputs((3, 5, 40), (37, 40), mult, dtype)
    calls = _record(monkeypatch, "bmm_nt_quant")
    kw = dict(act_scale=s_x, weight_scale=s_w, multiplier=mult)
    got = quant.linear(x, w, None, backend="compiled", **kw)
    assert calls == ([torch.float32] if dtype == torch.float32 else [])
    _same_with_nans(got, quant.linear(x, w, None, backend="reference", **kw))
    assert got[..., 1].isnan().all() and got[0, 0].isnan().all() and not got[1, :, 0].isnan().any()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("name", FUSED)
def test_quantised_matmul_on_compiled_equals_the_reference(monkeypatch, name, dtype):
    mult = _multiplier(name)
    a, b, s_a, _ = _layer_inputs((2, 3, 6, 20), (2, 3, 20, 11), mult, dtype)
    calls = _record(monkeypatch, "bmm_nt_quant")
    kw = dict(a_scale=s_a, b_scale=s_a / 2, multiplier=mult)
    got = quant.matmul(a, b, backend="compiled", **kw)
    assert calls == ([torch.float32] if dtype == torch.float32 else [])
    _same_with_nans(got, quant.matmul(a, b, backend="reference", **kw))


def test_a_channels_last_weight_is_quantised_as_its_contiguous_copy():
    """The weight's rows are read in im2col order whatever its memory format (a model moved to channels_last)."""
    mult = _multiplier("mbm-int8")
    x, w, s_x, s_w = _layer_inputs((2, 4, 7, 6), (6, 4, 3, 3), mult)
    kw = dict(padding=1, act_scale=s_x, weight_scale=s_w, multiplier=mult)
    got = quant.conv2d(x, w.to(memory_format=torch.channels_last), backend="compiled", **kw)
    _same_with_nans(got, quant.conv2d(x, w, backend="reference", **kw))


@pytest.mark.parametrize("name", ["mbm-int8", "signed table"])
def test_finite_inputs_on_the_fused_path_still_get_the_nans_of_a_bad_weight_row(name):
    """The kernel counts no bad input, so only the weight rows decide where NaN goes (and with none, nowhere)."""
    mult = _multiplier(name)
    x, w, s_x, s_w = _layer_inputs((2, 4, 7, 6), (6, 4, 3, 3), mult)
    x = x.nan_to_num(posinf=1.0, neginf=-1.0)
    kw = dict(padding=1, act_scale=s_x, weight_scale=s_w, multiplier=mult)
    got = quant.conv2d(x, w, backend="compiled", **kw)
    _same_with_nans(got, quant.conv2d(x, w, backend="reference", **kw))
    assert torch.equal(got.isnan().flatten(2).all(2), torch.arange(6).expand(2, 6) == 1)
    x, w, s_x, s_w = _layer_inputs((3, 40), (5, 40), mult)
    kw = dict(act_scale=s_x, weight_scale=s_w, multiplier=mult)
    x, w = x.nan_to_num(posinf=1.0, neginf=-1.0), w.nan_to_num(posinf=0.5)
    got = quant.linear(x, w, backend="compiled", **kw)
    assert torch.equal(got, quant.linear(x, w, backend="reference", **kw)) and not got.isnan().any()


# ----------------------------------------------------------------------------- 5. meta shape checks, cached


def test_on_meta_raises_torchs_error_every_time_and_caches_good_calls():
    seen = []

    def linear(*args):  # a fresh cache key; counts the calls that reach torch
        seen.append(args[0].device.type)
        return F.linear(*args)

    x, w = torch.randn(2, 3), torch.randn(4, 5)
    with pytest.raises(RuntimeError) as direct:
        F.linear(x.to("meta"), w.to("meta"))
    for _ in range(2):
        with pytest.raises(RuntimeError) as err:
            AF.on_meta(linear, (x, w, None))
        assert str(err.value) == str(direct.value)
    assert seen == ["meta", "meta"]  # a failed check is not remembered
    good = torch.randn(4, 3)
    hits = AF._meta_call.cache_info().hits
    for _ in range(3):
        AF.on_meta(linear, (x, good, None))
    assert seen == ["meta"] * 3 and AF._meta_call.cache_info().hits == hits + 2


def test_cached_shape_checks_tell_calls_apart_by_their_arguments():
    """A good call cached for some arguments does not let the same shapes through with others."""
    x, w = torch.randn(1, 4, 2, 2), torch.randn(3, 4, 3, 3)
    assert AF.conv2d(x, w, None, 1, [1, 1], multiplier="mbm").shape == (1, 3, 2, 2)  # padded 4 x 4: fits
    with pytest.raises(RuntimeError) as direct:
        F.conv2d(x.to("meta"), w.to("meta"), None, 1, 0)
    for _ in range(2):
        with pytest.raises(RuntimeError) as err:
            AF.conv2d(x, w, None, 1, 0, multiplier="mbm")  # 2 x 2 unpadded: the kernel does not fit
        assert str(err.value) == str(direct.value)
    with pytest.raises(RuntimeError, match="strided convolutions"):
        AF.conv2d(x, w, None, 2, "same", multiplier="mbm")
    AF.linear(torch.randn(2, 5), torch.randn(4, 5), multiplier="mbm")
    with pytest.raises(RuntimeError) as direct:
        F.linear(torch.randn(2, 3, device="meta"), torch.randn(4, 5, device="meta"))
    for _ in range(2):
        with pytest.raises(RuntimeError) as err:
            AF.linear(torch.randn(2, 3), torch.randn(4, 5), multiplier="mbm")
        assert str(err.value) == str(direct.value)


# ----------------------------------------------------------------------------- 6. int32 blocks flushed to int64


@pytest.mark.parametrize("name", ["mbm-int12", "mitchell-int12"])
def test_long_sums_of_largest_products_pass_int32_in_blocks(name):
    mult = as_multiplier(name)
    hi, K = mult.q_range[1], 5000
    qa, qb = torch.full((1, 2, K), hi), torch.full((1, 3, K), -hi)
    qb[0, 1] = hi
    want = approx_mul_int(qa[0, :, :1], qb[0, :, 0][None, :], mult).double()[None] * K  # (1, 2, 3)
    assert want.abs().min() > 2**31
    assert torch.equal(cpu_native_int.bmm_nt_int(qa, qb, mult), want)
    a_scale, b_scale = torch.tensor(0.03), torch.tensor([1e-3, 0.37, 3.0])
    a = torch.full((1, 2, K), hi * 0.03)
    got, bad, quantised_b = cpu_native_int.bmm_nt_quant(a, a_scale, qb * b_scale.view(1, 3, 1), b_scale, mult)
    assert bad == 0 and not quantised_b.any_bad
    assert torch.equal(got, (want * (a_scale.double() * b_scale.double())).float())
