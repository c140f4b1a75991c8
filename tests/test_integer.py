"""Integer multipliers (SPEC section 4) against the independent scalar model, and their GEMM / conv kernels."""
import numpy as np
import pytest
import torch
import torch.nn.functional as F

import mbmlib
from mbmlib import Multiplier, approx_mul, as_multiplier, kernels
from mbmlib.kernels import reference
from scalar_model import int_products_model

KINDS = ["mbm", "mitchell"]
BACKENDS = ["reference", "compiled"]


def test_spec_worked_values():
    a, b = torch.tensor([16, 3, 3, 255, 63]), torch.tensor([1, 3, 7, 255, 63])
    want = [17, 8, 20, 65024, 4048]
    assert approx_mul(a, b, "mbm-int8").tolist() == want
    assert int_products_model(a.numpy(), b.numpy(), "mbm").tolist() == want
    assert approx_mul(torch.tensor([3, 5]), torch.tensor([3, 14]), "mitchell-int8").tolist() == [8, 64]
    assert int_products_model([3, 5], [3, 14], "mitchell").tolist() == [8, 64]


@pytest.mark.parametrize("kind", KINDS)
def test_every_pair_of_8_bit_magnitudes_matches_the_model(kind):
    a = torch.arange(256)
    got = approx_mul(a[:, None], a[None, :], f"{kind}-int8")  # (256, 256)
    assert got.dtype == torch.int64
    want = int_products_model(a.numpy()[:, None], a.numpy()[None, :], kind)
    assert np.array_equal(got.numpy(), want)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("bits", [12, 16])
def test_a_million_random_wide_pairs_match_the_model(kind, bits):
    gen = torch.Generator().manual_seed(bits)
    a, b = (torch.randint(0, 1 << bits, (1_000_000,), generator=gen) for _ in "ab")
    got = approx_mul(a, b, Multiplier(kind, bits=bits))
    assert np.array_equal(got.numpy(), int_products_model(a.numpy(), b.numpy(), kind))
    assert got.max().item() < 1 << (2 * bits)


@pytest.mark.parametrize("bits", [2, 3, 5, 9])
def test_narrow_widths_match_the_model_over_all_pairs(bits):
    a = torch.arange(1 << bits)
    for kind in KINDS:
        got = approx_mul(a[:, None], a[None, :], f"{kind}-int{bits}")
        assert np.array_equal(got.numpy(), int_products_model(a.numpy()[:, None], a.numpy()[None, :], kind))


def test_sign_magnitude_signs_and_integer_dtypes():
    gen = torch.Generator().manual_seed(3)
    a, b = (torch.randint(-127, 128, (5000,), generator=gen) for _ in "ab")
    want = torch.sign(a) * torch.sign(b) * torch.from_numpy(int_products_model(a.abs().numpy(), b.abs().numpy(),
                                                                               "mbm"))
    for dtype in (torch.int8, torch.int16, torch.int32, torch.int64):
        assert torch.equal(approx_mul(a.to(dtype), b.to(dtype), "mbm-int8"), want)
    assert torch.equal(approx_mul(a.abs().to(torch.uint8), b.abs().to(torch.uint8), "mbm-int8"), want.abs())
    assert approx_mul(torch.tensor(7), torch.tensor([[1, -2], [3, 0]]), "mbm-int8").shape == (2, 2)


def test_bad_inputs_raise_clear_errors():
    with pytest.raises(ValueError, match="holds 256, outside -255..255"):
        approx_mul(torch.tensor([256]), torch.tensor([1]), "mbm-int8")
    with pytest.raises(ValueError, match="outside -15..15"):
        approx_mul(torch.tensor([1]), torch.tensor([-16]), "mitchell-int4")
    with pytest.raises(TypeError, match="integer tensors"):
        approx_mul(torch.tensor([1.0]), torch.tensor([1]), "mbm-int8")
    with pytest.raises(TypeError, match="floating-point"):
        approx_mul(torch.tensor([1]), torch.tensor([1]), "mbm")
    for name in ("mbm-int1", "mbm-int17", "exact-int8", "mbm-t3-int8"):
        with pytest.raises(ValueError, match="valid|bits|width"):
            as_multiplier(name)
    with pytest.raises(ValueError, match="no truncation"):
        Multiplier("mbm", 4, bits=8)


def test_names_round_trip_and_multipliers_hash():
    for bits in range(2, 17):
        for kind in KINDS:
            m = as_multiplier(f"{kind}-int{bits}")
            assert m == Multiplier(kind, bits=bits) and as_multiplier(m.name) == m
            assert m.is_integer and m.bits == bits and m.max_magnitude == 2**bits - 1
    assert len({as_multiplier("mbm-int8"), Multiplier("mbm", bits=8), as_multiplier("mbm")}) == 2
    assert not as_multiplier("mbm-t16").is_integer and as_multiplier("mbm").max_magnitude is None


# ----------------------------------------------------------------------------- gradients of the float ops


@pytest.mark.parametrize("shapes", [((3,), (3,)), ((4, 1), (1, 5)), ((2, 3), ()), ((1,), (2, 2))])
@pytest.mark.parametrize("op", [mbmlib.mbm_mul, mbmlib.mitchell_mul, lambda a, b: approx_mul(a, b, "mbm-t16")])
def test_float_products_have_the_straight_through_gradient_of_torch_mul(shapes, op):
    gen = torch.Generator().manual_seed(4)
    a, b = (torch.randn(s, generator=gen, dtype=torch.float64 if i else torch.float32) for i, s in enumerate(shapes))
    up = torch.randn(torch.broadcast_shapes(*shapes), generator=gen, dtype=torch.float64)
    grads = []
    for fn in (op, torch.mul):
        x, y = a.clone().requires_grad_(), b.clone().requires_grad_()
        (fn(x, y) * up).sum().backward()
        grads.append((x.grad, y.grad))
    assert grads[0][0].dtype == torch.float32 and grads[0][1].dtype == torch.float64
    assert torch.equal(grads[0][0], grads[1][0]) and torch.equal(grads[0][1], grads[1][1])
    assert grads[0][0].abs().sum() > 0


def test_issue_example_gradient_is_not_zero():
    x = torch.tensor([1.5, 2.0, -3.0], requires_grad=True)
    mbmlib.mbm_mul(x, torch.tensor([2.0, 3.0, 4.0])).sum().backward()
    assert x.grad.tolist() == [2.0, 3.0, 4.0]


def test_exact_keeps_float64():
    a = torch.tensor([1 + 2**-40], dtype=torch.float64)
    assert torch.equal(approx_mul(a, a, "exact"), a * a)


# ----------------------------------------------------------------------------- kernels


def int_sums(qa, qb, multiplier):
    """float64 sums of the elementwise products: (G, M, K), (G, N, K) -> (G, M, N)."""
    return approx_mul(qa[:, :, None, :], qb[:, None, :, :], multiplier).sum(-1).double()


GEMM_SHAPES = [(1, 1, 1, 1), (1, 13, 1, 7), (2, 5, 37, 3), (3, 1, 29, 11), (1, 17, 64, 2)]  # (G, M, K, N)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", ["mbm-int8", "mitchell-int8", "mbm-int12", "mbm-int3"])
def test_bmm_nt_int_sums_exactly(backend, name):
    m = as_multiplier(name)
    gen = torch.Generator().manual_seed(5)
    for G, M, K, N in GEMM_SHAPES:
        qa = torch.randint(-m.max_magnitude, m.max_magnitude + 1, (G, M, K), generator=gen, dtype=torch.int32)
        qb = torch.randint(-m.max_magnitude, m.max_magnitude + 1, (G, N, K), generator=gen, dtype=torch.int32)
        got = kernels.load(backend).bmm_nt_int(qa, qb, m)
        assert got.dtype == torch.float64 and torch.equal(got, int_sums(qa, qb, m)), (G, M, K, N)


def test_reference_chunks_give_the_same_sums():
    gen = torch.Generator().manual_seed(6)
    qa, qb = torch.randint(-255, 256, (2, 9, 41), generator=gen), torch.randint(-255, 256, (2, 7, 41), generator=gen)
    m = as_multiplier("mbm-int8")
    assert torch.equal(reference.bmm_nt_int(qa, qb, m, memory_budget=600), int_sums(qa, qb, m))


def oracle_conv_int(qx, qw, stride, padding, dilation, groups, multiplier):
    """Sum of elementwise products over F.unfold patches: (B, C, H, W), (O, Cg, kh, kw) -> float64."""
    B, C, H, W = qx.shape
    O, Cg, kh, kw = qw.shape
    cols = F.unfold(qx.double(), (kh, kw), dilation=dilation, padding=padding, stride=stride).long()  # (B, C*k, L)
    L = cols.shape[-1]
    cols = cols.view(B, groups, 1, Cg * kh * kw, L)
    wg = qw.long().reshape(1, groups, O // groups, Cg * kh * kw, 1)
    sums = approx_mul(cols, wg, multiplier).sum(3).double().reshape(B, O, L)
    Ho = (H + 2 * padding[0] - dilation[0] * (kh - 1) - 1) // stride[0] + 1
    return sums.view(B, O, Ho, L // Ho)


CONV_CASES = [  # (input shape, weight shape, stride, padding, dilation, groups)
    ((1, 1, 1, 1), (1, 1, 1, 1), (1, 1), (0, 0), (1, 1), 1),
    ((2, 3, 7, 5), (5, 3, 3, 3), (2, 2), (1, 1), (1, 1), 1),
    ((1, 6, 7, 11), (4, 3, 3, 2), (1, 2), (2, 1), (2, 1), 2),
    ((3, 5, 6, 6), (5, 1, 3, 3), (1, 1), (1, 1), (1, 1), 5),
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", CONV_CASES, ids=[str(c[0]) for c in CONV_CASES])
def test_conv2d_int_sums_exactly(backend, case):
    xs, ws, stride, padding, dilation, groups = case
    gen = torch.Generator().manual_seed(7)
    m = as_multiplier("mbm-int8")
    qx = torch.randint(-255, 256, xs, generator=gen, dtype=torch.int32)
    qw = torch.randint(-255, 256, ws, generator=gen, dtype=torch.int32)
    got = kernels.load(backend).conv2d_int(qx, qw, stride, padding, dilation, groups, m)
    assert got.dtype == torch.float64
    assert torch.equal(got, oracle_conv_int(qx, qw, stride, padding, dilation, groups, m))


def test_reference_conv_chunks_over_the_batch():
    gen = torch.Generator().manual_seed(8)
    qx, qw = torch.randint(-15, 16, (5, 2, 6, 6), generator=gen), torch.randint(-15, 16, (3, 2, 3, 3), generator=gen)
    m = as_multiplier("mitchell-int4")
    got = reference.conv2d_int(qx, qw, (1, 1), (1, 1), (1, 1), 1, m, memory_budget=4000)
    assert torch.equal(got, oracle_conv_int(qx, qw, (1, 1), (1, 1), (1, 1), 1, m))


def test_integer_kernels_refuse_bad_operands():
    m = as_multiplier("mbm-int4")
    with pytest.raises(ValueError, match="outside -15..15"):
        reference.bmm_nt_int(torch.full((1, 1, 2), 16), torch.ones(1, 1, 2, dtype=torch.int64), m)
    with pytest.raises(TypeError, match="integer or table multiplier"):
        reference.bmm_nt_int(torch.ones(1, 1, 2, dtype=torch.int64), torch.ones(1, 1, 2, dtype=torch.int64),
                             as_multiplier("mbm"))
    with pytest.raises(TypeError, match="integer tensors"):
        kernels.load("compiled").bmm_nt_int(torch.ones(1, 1, 2), torch.ones(1, 1, 2), m)


@pytest.mark.parametrize("kind", KINDS)
def test_error_stats_over_every_8_bit_pair_match_the_model(kind):
    a = np.arange(1, 256)
    exact = (a[:, None] * a[None, :]).astype(np.float64)
    rel = (int_products_model(a[:, None], a[None, :], kind) - exact) / exact * 100.0
    stats = mbmlib.error_stats(f"{kind}-int8")
    assert stats["n"] == 256 * 256  # every pair of magnitudes, 0 included; relative errors over the non-zero ones
    assert stats["max"] == rel.max() and stats["min"] == rel.min()
    assert stats["bias"] == pytest.approx(rel.mean(), abs=1e-12)
    assert stats["mean_abs"] == pytest.approx(np.abs(rel).mean(), abs=1e-12)
    err = np.abs(int_products_model(a[:, None], a[None, :], kind) - exact)  # zero operands: no error
    assert stats["wce"] == err.max() and stats["ep"] == pytest.approx((err != 0).sum() / 65536 * 100, abs=1e-12)
    assert stats["mae_pct"] == pytest.approx(err.sum() / 65536 / 65536 * 100, rel=1e-12)


def test_error_stats_of_a_signed_table_cover_its_twos_complement_range():
    ops = torch.arange(-8, 8)
    table = torch.zeros(16, 16, dtype=torch.int64)
    table[ops[:, None] % 16, ops[None, :] % 16] = ops[:, None] * ops[None, :] + (ops[:, None] == -8).long()
    stats = mbmlib.error_stats(Multiplier.from_table(table, signed=True))
    assert stats["n"] == 256 and stats["wce"] == 1 and stats["ep"] == pytest.approx(16 / 256 * 100)
    assert stats["mae_pct"] == pytest.approx(16 / 256 / 256 * 100)
    rel = 1 / (-8 * ops[ops != 0].double()) * 100  # the row a = -8 is off by one
    assert stats["max"] == pytest.approx(rel.max().item()) and stats["min"] == pytest.approx(rel.min().item())


def test_error_stats_sample_wide_multipliers_and_see_the_power_of_two_peak():
    stats = mbmlib.error_stats("mbm-int16", n=20_000)
    peak = (approx_mul(torch.tensor(1 << 12), torch.tensor(1 << 12), "mbm-int16").item() / 2**24 - 1) * 100
    assert stats["n"] == 20_000 and stats["max"] == peak and stats["min"] < 0 < stats["max"]
    x, err = mbmlib.error_map("mbm-int12", bins=64)
    assert x.shape == (64,) and err.shape == (64, 64) and x[0] == 1 and x[-1] == 4095
