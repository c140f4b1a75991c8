"""Signed tables, every integer dtype, row and column 0, signed quantisation and the integer-in API (SPEC 4, 6).

Oracles index the tables directly (``T[a mod 2**n, b mod 2**n]``, ``sign * T[|a|, |b|]``) and sum in int64 or
float64: no kernel code.
"""
import pytest
import torch
import torch.nn.functional as F

import mbmlib
from mbmlib import Multiplier, quant
from mbmlib.functional import conv2d_int, linear_int
from triton_backend import every_backend

BACKENDS = every_backend()


def signed_table(bits: int = 8, seed: int = 0) -> torch.Tensor:
    """A signed circuit's table that is not sign-symmetric: the exact product plus an operand-dependent error."""
    ops = torch.arange(-(1 << (bits - 1)), 1 << (bits - 1))
    exact = ops[:, None] * ops[None, :]
    noise = torch.randint(-40, 41, exact.shape, generator=torch.Generator().manual_seed(seed))
    table = torch.empty(1 << bits, 1 << bits, dtype=torch.int64)
    table[ops[:, None] % (1 << bits), ops[None, :] % (1 << bits)] = exact + noise
    return table


def signed_products(qa: torch.Tensor, qb: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    """T[a mod 2**n, b mod 2**n], int64 (broadcasting)."""
    size = table.shape[0]
    return table[qa.long() % size, qb.long() % size]


def unsigned_products(qa: torch.Tensor, qb: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    """sign(a) sign(b) T[|a|, |b|] with the sign of 0 positive (sign-magnitude hardware), int64."""
    sign = (1 - 2 * (qa < 0).long()) * (1 - 2 * (qb < 0).long())
    return sign * table[qa.long().abs(), qb.long().abs()]


def conv_oracle(qx, qw, padding, products):
    """Integer convolution from im2col of the padded integers (the padding is the operand 0), int64."""
    O = qw.shape[0]
    cols = F.unfold(F.pad(qx.double(), [padding] * 4), qw.shape[2:]).long()  # (B, C*kh*kw, L)
    terms = products(cols.transpose(1, 2)[:, None], qw.reshape(O, -1)[None, :, None, :])  # (B, O, L, K)
    B, H, W = qx.shape[0], qx.shape[2] + 2 * padding - qw.shape[2] + 1, qx.shape[3] + 2 * padding - qw.shape[3] + 1
    return terms.sum(-1).reshape(B, O, H, W)


# ----------------------------------------------------------------------------- tables


@pytest.mark.parametrize("dtype", [torch.uint8, torch.int16, torch.int32, torch.int64, torch.float64])
def test_tables_of_every_integer_dtype_are_the_same_multiplier(dtype):
    values = torch.arange(16 * 16).reshape(16, 16) % 200
    m = Multiplier.from_table(values.to(dtype))
    assert m == Multiplier.from_table(values) and m.table.dtype == torch.int64 and m.bits == 4
    big = Multiplier.from_table(torch.full((4, 4), 30000, dtype=torch.int16))  # above int16's own 2**32 - 1
    assert big.max_product == 30000


def test_signed_tables_are_their_own_kind_and_check_their_entries():
    table = signed_table(4)
    m = Multiplier.from_table(table, signed=True)
    assert m.signed and m.q_range == (-8, 7) and m.max_magnitude == 8 and m.max_product == table.abs().max()
    assert m != Multiplier.from_table(table.abs()) and mbmlib.as_multiplier(m.key) == m
    with pytest.raises(ValueError, match=r"entry \[\d+, \d+\] = -\d+ is not an integer in 0..4294967295 .*signed=True"):
        Multiplier.from_table(table)
    with pytest.raises(ValueError, match="only tables are signed"):
        Multiplier("mbm", bits=8, signed=True)


def test_signed_csv_round_trip(tmp_path):
    m = Multiplier.from_table(signed_table(4, seed=3), signed=True)
    path = tmp_path / "s.csv"
    mbmlib.write_csv(m, path, column="P")
    lines = path.read_text().splitlines()
    assert lines[:2] == ["A,B,P", f"-8,-8,{int(signed_table(4, seed=3)[8, 8])}"] and len(lines) == 257
    back = Multiplier.from_csv(path)
    assert back == m and back.signed and back.source == str(path)
    path.write_text("A,B,P\n" + "\n".join(lines[1:200]))
    with pytest.raises(ValueError, match=r"pair A=\d+, B=-?\d+ is missing: .* every pair of -8..7"):
        Multiplier.from_csv(path)


def test_elementwise_signed_and_row_zero_products():
    table = signed_table(8)
    m = Multiplier.from_table(table, signed=True)
    a = torch.arange(-128, 128)
    assert torch.equal(mbmlib.approx_mul(a[:, None], a[None, :], m), signed_products(a[:, None], a[None, :], table))
    with pytest.raises(ValueError, match="holds 128, outside -128..127, the signed"):
        mbmlib.approx_mul(torch.tensor([128]), torch.tensor([1]), m)
    row0 = torch.arange(256 * 256).reshape(256, 256) % 97 + 1  # every product non-zero, row 0 too
    u = Multiplier.from_table(row0)
    assert not u.zero_annihilates and Multiplier.from_table(mbmlib.table_from_multiplier("mbm-int8")).zero_annihilates
    assert torch.equal(mbmlib.approx_mul(a[:, None], a[None, :], u), unsigned_products(a[:, None], a[None, :], row0))


# ----------------------------------------------------------------------------- layers on every backend


@pytest.mark.parametrize("backend", BACKENDS, indirect=True)
def test_signed_table_quantised_layers_equal_the_float64_sum_of_table_products(backend):
    table = signed_table(8, seed=1)
    m = Multiplier.from_table(table, signed=True)
    gen = torch.Generator().manual_seed(2)
    x, w = torch.randn(5, 37, generator=gen), torch.randn(6, 37, generator=gen)
    s_x, s_w = torch.tensor(1.0 / 127), torch.full((6,), 1.5 / 127)  # some inputs clip at both ends
    out = quant.linear(x, w, act_scale=s_x, weight_scale=s_w, multiplier=m, backend=backend)
    qx, qw = quant.quantise(x, s_x, m), quant.quantise(w, s_w[:, None], m)
    assert qx.min() == -128 and qx.max() == 127  # two's-complement range: -128 is reachable
    sums = signed_products(qx[:, None, :], qw[None, :, :], table).sum(-1).double()
    assert torch.equal(out, (sums * (s_x.double() * s_w.double())).float())
    img, k = torch.randn(2, 3, 7, 7, generator=gen), torch.randn(4, 3, 3, 3, generator=gen)
    y = quant.conv2d(img, k, padding=1, act_scale=s_x, weight_scale=s_w[:4], multiplier=m, backend=backend)
    qi, qk = quant.quantise(img, s_x, m), quant.quantise(k, s_w[:4].view(-1, 1, 1, 1), m)
    want = conv_oracle(qi, qk, 1, lambda a, b: signed_products(a, b, table)).double()
    assert torch.equal(y, (want * (s_x.double() * s_w[:4].double()).view(1, -1, 1, 1)).float())


@pytest.mark.parametrize("backend", BACKENDS, indirect=True)
def test_a_table_with_a_non_zero_row_0_multiplies_the_padding_as_hardware_does(backend):
    table = mbmlib.table_from_multiplier("mbm-int8")
    table[0, :] = 7  # P(0, B) = 7: a zero activation (and every padded position) adds 7 * sign(w)
    m = Multiplier.from_table(table)
    gen = torch.Generator().manual_seed(5)
    qx, qw = torch.randint(-255, 256, (2, 2, 6, 6), generator=gen), torch.randint(-255, 256, (3, 2, 3, 3), generator=gen)
    qx[0, 0, 2, 2] = 0
    got = conv2d_int(qx, qw, padding=1, multiplier=m, backend=backend)
    assert torch.equal(got, conv_oracle(qx, qw, 1, lambda a, b: unsigned_products(a, b, table)))
    plain = conv2d_int(qx, qw, padding=1, multiplier="mbm-int8", backend=backend)
    assert not torch.equal(got, plain)  # the border and the zero pixel differ, as the hardware's would
    assert torch.equal(got[:, :, 2:4, 2:4][1], plain[:, :, 2:4, 2:4][1])  # interior of the image without a zero


# ----------------------------------------------------------------------------- integers in, exact sums out


@pytest.mark.parametrize("backend", BACKENDS, indirect=True)
def test_integer_api_sums_exactly_above_2_to_the_24(backend):
    gen = torch.Generator().manual_seed(7)
    qa = torch.randint(3000, 4096, (3, 256), generator=gen, dtype=torch.int16)  # 256 products: every sum beyond
    qb = torch.randint(-4095, -3000, (4, 256), generator=gen, dtype=torch.int32)  # 2**31 too (int64 accumulators)
    bias = torch.tensor([1, -2, 3, 2**40])
    got = linear_int(qa, qb, bias, multiplier="mbm-int12", backend=backend)
    want = mbmlib.approx_mul(qa.long()[:, None, :], qb.long()[None, :, :], "mbm-int12").sum(-1) + bias
    assert got.dtype == torch.int64 and torch.equal(got, want) and want.abs().min() > 2**24
    assert torch.equal(got.double().float().long(), want) is False  # float32 would have rounded these sums
    x, k = torch.randint(-4095, 4096, (1, 2, 5, 5), generator=gen), torch.randint(-4095, 4096, (3, 2, 3, 3),
                                                                                   generator=gen)
    conv = conv2d_int(x[0], k, padding=1, stride=1, multiplier="mbm-int12", backend=backend)
    assert torch.equal(conv, conv_oracle(x, k, 1, lambda a, b: mbmlib.approx_mul(a, b, "mbm-int12"))[0])


def test_integer_api_refuses_what_it_cannot_sum():
    q = torch.ones(2, 3, dtype=torch.int32)
    with pytest.raises(ValueError, match="take an integer or table multiplier"):
        linear_int(q, q, multiplier="mbm")
    with pytest.raises(TypeError, match="needs integer tensors"):
        linear_int(q.float(), q, multiplier="mbm-int8")
    with pytest.raises(ValueError, match="holds 256, outside -255..255"):
        linear_int(q * 256, q, multiplier="mbm-int8")
    with pytest.raises(ValueError, match="numeric padding"):
        conv2d_int(torch.ones(1, 1, 3, 3, dtype=torch.int32), torch.ones(1, 1, 3, 3, dtype=torch.int32),
                   padding="same", multiplier="mbm-int8")


def test_signed_quantisers_observe_the_twos_complement_range():
    m = Multiplier.from_table(signed_table(8), signed=True)
    layer = mbmlib.MBMLinear(8, 3, multiplier=m)
    assert layer.quantiser.levels == (-128, 127)
    layer.train()
    layer(torch.linspace(-4, 4, 16).reshape(2, 8))
    assert torch.allclose(layer.quantiser.act_scale, torch.tensor(4 / 127.5))  # PyTorch's int8: range / 127.5
    assert "levels=-128..127" in repr(layer.quantiser)
