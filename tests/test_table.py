"""Table multipliers: built from tensors or CSV files, validated, named, and exact through the kernels."""
import random

import pytest
import torch

import mbmlib
from mbmlib import Multiplier, approx_mul, as_multiplier, kernels, table_from_multiplier, write_csv
from test_integer import int_sums, oracle_conv_int

BACKENDS = ["reference", "compiled"]


@pytest.fixture(scope="module")
def mbm8_csv(tmp_path_factory):
    path = tmp_path_factory.mktemp("tables") / "reference_mbm.csv"
    write_csv("mbm-int8", path)
    return path


def test_a_table_of_mbm_int8_multiplies_like_mbm_int8(mbm8_csv):
    table = Multiplier.from_table(table_from_multiplier("mbm-int8"))
    assert table.is_integer and table.bits == 8 and table.max_magnitude == 255 and table.kind == "table"
    a = torch.arange(-255, 256)
    want = approx_mul(a[:, None], a[None, :], "mbm-int8")  # every signed pair
    assert torch.equal(approx_mul(a[:, None], a[None, :], table), want)
    assert torch.equal(approx_mul(a[:, None], a[None, :], Multiplier.from_csv(mbm8_csv)), want)


def test_csv_and_tensor_tables_are_one_multiplier(mbm8_csv):
    from_csv, from_tensor = Multiplier.from_csv(mbm8_csv), Multiplier.from_table(table_from_multiplier("mbm-int8"))
    assert from_csv == from_tensor and hash(from_csv) == hash(from_tensor)
    assert from_csv.name == f"table:{mbm8_csv}" and from_tensor.name.startswith("table:sha256=")
    assert as_multiplier(from_csv.name) == from_csv and as_multiplier(from_tensor.name) == from_tensor
    assert as_multiplier(from_csv.name).source == str(mbm8_csv)
    assert from_csv != as_multiplier("mbm-int8") and from_csv != Multiplier.from_table(table_from_multiplier(
        "mitchell-int8"))
    assert mbm8_csv.read_text().splitlines()[:3] == ["A,B,MBM", "0,0,0", "0,1,0"]


def test_rows_in_any_order_and_a_renamed_product_column(tmp_path):
    table = torch.randint(0, 300, (16, 16), generator=torch.Generator().manual_seed(1))
    rows = [f"{a},{b},{table[a, b].item()}" for a in range(16) for b in range(16)]
    random.Random(2).shuffle(rows)
    (tmp_path / "t.csv").write_text("a, b, product\n" + "\n".join(rows) + "\n\n")
    m = Multiplier.from_csv(tmp_path / "t.csv")
    assert m.bits == 4 and torch.equal(m.table, table)


def test_the_named_file_is_reread_when_it_changes(tmp_path):
    path = tmp_path / "t.csv"
    write_csv("mbm-int5", path)
    first = as_multiplier(f"table:{path}")
    write_csv("mitchell-int5", path, column="MITCHELL")
    second = as_multiplier(f"table:{path}")
    assert first != second and torch.equal(second.table, table_from_multiplier("mitchell-int5"))


@pytest.mark.parametrize("backend", BACKENDS)
def test_tables_through_the_integer_kernels(backend, mbm8_csv):
    gen = torch.Generator().manual_seed(3)
    kern = kernels.load(backend)
    m, table = as_multiplier("mbm-int8"), as_multiplier(f"table:{mbm8_csv}")
    qa, qb = torch.randint(-255, 256, (2, 7, 31), generator=gen), torch.randint(-255, 256, (2, 5, 31), generator=gen)
    assert torch.equal(kern.bmm_nt_int(qa, qb, table), kern.bmm_nt_int(qa, qb, m))
    assert torch.equal(kern.bmm_nt_int(qa, qb, table), int_sums(qa, qb, m))
    qx = torch.randint(-255, 256, (2, 4, 7, 6), generator=gen, dtype=torch.int32)
    qw = torch.randint(-255, 256, (6, 2, 3, 3), generator=gen, dtype=torch.int32)
    args = ((2, 2), (1, 1), (1, 1), 2)
    assert torch.equal(kern.conv2d_int(qx, qw, *args, table), kern.conv2d_int(qx, qw, *args, m))
    assert torch.equal(kern.conv2d_int(qx, qw, *args, table), oracle_conv_int(qx, qw, *args, m))


@pytest.mark.parametrize("backend", BACKENDS)
def test_an_arbitrary_table_is_a_gather(backend):
    gen = torch.Generator().manual_seed(4)
    t = torch.randint(0, 2**32 - 1, (8, 8), generator=gen, dtype=torch.int64)
    t[0, 3] = 5  # the hardware's row 0: the operand 0 is positive and T[0, B] is its product
    m = Multiplier.from_table(t)
    qa, qb = torch.randint(-7, 8, (1, 3, 11), generator=gen), torch.randint(-7, 8, (1, 4, 11), generator=gen)
    sign_a, sign_b = 1 - 2 * (qa < 0).long(), 1 - 2 * (qb < 0).long()
    prods = sign_a[:, :, None] * sign_b[:, None] * t[qa.abs()[:, :, None], qb.abs()[:, None]]
    assert torch.equal(kernels.load(backend).bmm_nt_int(qa, qb, m), prods.sum(-1).double())
    assert approx_mul(torch.tensor(0), torch.tensor(3), m).item() == 5
    assert approx_mul(torch.tensor(0), torch.tensor(-3), m).item() == -5


def test_int8_minus_128_is_magnitude_128():
    a = torch.tensor([-128, 127, -1], dtype=torch.int8)
    for m in (as_multiplier("mbm-int8"), Multiplier.from_table(table_from_multiplier("mbm-int8"))):
        assert approx_mul(a, a, m).tolist() == approx_mul(a.long(), a.long(), "mbm-int8").tolist()
        assert approx_mul(a, a, m)[0].item() == approx_mul(torch.tensor(128), torch.tensor(128), "mbm-int8").item()
    with pytest.raises(ValueError, match="holds -128, outside -127..127"):
        approx_mul(a, a, "mbm-int7")


def write_rows(path, rows, header="A,B,MBM"):
    path.write_text(header + "\n" + "\n".join(rows) + "\n")
    return path


def full_rows(size=4):
    return [f"{a},{b},{a * b}" for a in range(size) for b in range(size)]


@pytest.mark.parametrize("edit, message", [
    (lambda rows: rows[:5] + rows[6:], r"pair A=1, B=1 is missing"),
    (lambda rows: rows + ["2,3,6"], r"line 18: pair A=2, B=3 repeats line 13"),
    (lambda rows: rows[:3] + ["0,3,-1"] + rows[4:], r"line 5: product -1 is negative; an unsigned table"),
    (lambda rows: rows[:7] + ["1,3,3.5"] + rows[8:], r"line 9: '1,3,3.5' is not three integers"),
    (lambda rows: rows[:7] + ["1,3"] + rows[8:], r"line 9: '1,3' must be three"),
    (lambda rows: [r for r in rows if not r.startswith("3,") and ",3," not in r], r"pair A=0, B=3 is missing"),
    (lambda rows: rows + ["4,0,0"], r"pair A=0, B=4 is missing: a 8 x 8 table"),
])
def test_csv_validation_names_the_file_and_the_row(tmp_path, edit, message):
    path = write_rows(tmp_path / "bad.csv", edit(full_rows()))
    with pytest.raises(ValueError, match=message) as err:
        Multiplier.from_csv(path)
    assert str(path) in str(err.value)


def test_csv_header_and_missing_file(tmp_path):
    with pytest.raises(ValueError, match="line 1 must be the header"):
        Multiplier.from_csv(write_rows(tmp_path / "h.csv", full_rows(), header="x,y,z"))
    with pytest.raises(ValueError, match="cannot be read"):
        as_multiplier(f"table:{tmp_path / 'absent.csv'}")
    with pytest.raises(ValueError, match="no table with digest"):
        as_multiplier("table:sha256=0123456789abcdef")


@pytest.mark.parametrize("table, message", [
    (torch.zeros(4, 8), "must be square"),
    (torch.zeros(6, 6), "2\\*\\*n x 2\\*\\*n"),
    (torch.full((4, 4), -1), r"entry \[0, 0\] = -1"),
    (torch.full((4, 4), 2.5), "holds integers, got dtype torch.float32"),
    (torch.full((2, 2), 2**33), r"entry \[0, 0\]"),
])
def test_from_table_validation(table, message):
    with pytest.raises(ValueError, match=message):
        Multiplier.from_table(table)


def test_tables_from_numpy_and_error_stats():
    np = pytest.importorskip("numpy")
    t = np.arange(16).reshape(4, 4)
    assert Multiplier.from_table(t).table.tolist() == t.tolist()
    stats = mbmlib.error_stats(Multiplier.from_table(table_from_multiplier("mbm-int8")))
    assert stats == {**mbmlib.error_stats("mbm-int8"), "multiplier": stats["multiplier"]}
    x, err = mbmlib.error_map(Multiplier.from_table(table_from_multiplier("mitchell-int4")))
    assert x.tolist() == list(range(1, 16)) and err.max().item() == 0.0 and err.min().item() < -10


def _small_csv(tmp_path, product_of_3_3="9", encoding="utf-8", bom=False):
    rows = ["A,B,P"] + [f"{a},{b},{product_of_3_3 if (a, b) == (3, 3) else a * b}" for a in range(4) for b in range(4)]
    path = tmp_path / "t.csv"
    path.write_bytes((b"\xef\xbb\xbf" if bom else b"") + "\n".join(rows).encode(encoding))
    return path


def test_csv_tables_from_excel_and_bad_files_are_clear(tmp_path):
    assert torch.equal(Multiplier.from_csv(_small_csv(tmp_path, bom=True)).table,
                       torch.arange(4)[:, None] * torch.arange(4)[None, :])  # Excel's "CSV UTF-8" byte-order mark
    for huge in ("1000000000000000000000000000000", str(2**63)):
        with pytest.raises(ValueError, match=r"t.csv: line \d+: product \d+ is beyond 4294967295"):
            Multiplier.from_csv(_small_csv(tmp_path, huge))
    path = tmp_path / "t.csv"
    path.write_bytes(b"A,B,P\n0,0,\xff\xfe\n")
    with pytest.raises(ValueError, match="t.csv: not a UTF-8 text file .*save the table as CSV"):
        Multiplier.from_csv(path)


def test_truncation_must_be_an_integer_not_a_bool():
    with pytest.raises(ValueError, match="valid truncations are integers"):
        Multiplier("mbm", t=True)
