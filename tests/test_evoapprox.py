"""EvoApproxLib circuits as tables: C models written here in the library's file format (none of its code),
compiled and evaluated on every pair, checked against independent models and the header's MAE%."""
import ctypes
import os
import shlex
import shutil
import subprocess

import pytest
import torch

from mbmlib import Multiplier
from mbmlib.multipliers.evoapprox import CLONE_COMMAND, circuit_for_digest, list_circuits, load_circuit
from mbmlib.multipliers.table import table_digest

COMPILER = shlex.split(os.environ.get("CC") or "cc")
pytestmark = pytest.mark.skipif(shutil.which(COMPILER[0]) is None, reason="no C compiler")

UNITS = {"PDK45_PWR": "mW", "PDK45_AREA": "um2", "PDK45_DELAY": "ns"}

# 4-bit unsigned, lower-case operands as some library files have: the shift-and-add array with bit 0 dropped.
LOW_BIT_DROPPED = """uint64_t mul4u_tst(uint64_t a, uint64_t b) {
  uint64_t o = 0;
  int i;
  for (i = 0; i < 4; i++) {
    uint64_t row = a & (0 - ((b >> i) & 0x1));
    o = o + (row << i);
  }
  return o & ~(uint64_t)1;
}
"""
# 8-bit unsigned declared B first: A * (B | 1) tells the operands apart.
B_FIRST = """uint64_t mul8u_bfst(const uint64_t B,const uint64_t A)
{
  return A * (B | 1);
}
"""
# 8-bit signed returning its 16-bit two's-complement product as an unsigned word, bit 0 forced to 1.
UNSIGNED_WORD = """uint16_t mul8s_uret(uint8_t A, uint8_t B)
{
  int16_t p = (int16_t)(int8_t)A * (int16_t)(int8_t)B;
  return (uint16_t)(p | 1);
}
"""
# 8-bit signed in a wider signed type, the 16-bit word not sign-extended (as the library's mul12s_2PP does).
UNEXTENDED_WORD = """int32_t mul8s_word(int16_t A, int16_t B)
{
  return ((int32_t)A * (int32_t)B) & 0xFFFF;
}
"""


def low_bit_dropped(a, b):
    return (a * b) & ~1


def b_first(a, b):
    return a * (b | 1)


def forced_odd(a, b):
    return (a * b) | 1


def operands(bits, signed):
    """Every operand, in table-index order (two's complement for signed tables)."""
    ops = torch.arange(1 << bits)
    return torch.where(ops >= 1 << (bits - 1), ops - (1 << bits), ops) if signed else ops


def model_table(model, bits, signed):
    ops = operands(bits, signed)
    return model(ops[:, None], ops[None, :])


def mae_pct_text(model, bits, signed):
    """The MAE% a header prints for the model: mean |P - a*b| over all pairs / 2**(2n), in %, two digits."""
    ops = operands(bits, signed)
    err = (model_table(model, bits, signed) - ops[:, None] * ops[None, :]).abs().double().mean().item()
    return f"{err / 4.0**bits * 100:.2g}"


def write_circuit(folder, code, figures=(), comment="a test circuit in EvoApproxLib's file format"):
    """A .c file named after its function: header comment, figure lines ``// LABEL = value unit``, includes."""
    name = code.split("(")[0].split()[-1]
    lines = ["/***", f"* {comment}", "***/"]
    lines += [f"// {label} = {value} {UNITS.get(label, '%' if label.endswith('%') else '')}".rstrip()
              for label, value in dict(figures).items()]
    path = folder / f"{name}.c"
    folder.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines + ["#include <stdint.h>", "#include <stdlib.h>", "", code]))
    return path


@pytest.fixture(autouse=True)
def own_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("MBMLIB_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("MBMLIB_EVOAPPROX", raising=False)


def test_an_unsigned_circuit_is_its_table_of_magnitudes_with_the_header_figures(tmp_path):
    figures = {"MAE%": mae_pct_text(low_bit_dropped, 4, False), "MAE": "0.25", "WCE": "1", "EP%": "25.00",
               "PDK45_PWR": "0.012", "PDK45_AREA": "31.5", "PDK45_DELAY": "0.41"}
    circuit = load_circuit(str(write_circuit(tmp_path, LOW_BIT_DROPPED, figures)))
    assert (circuit.name, circuit.bits, circuit.signed) == ("mul4u_tst", 4, False)
    assert circuit.table.dtype == torch.int64 and circuit.table.shape == (16, 16)
    assert torch.equal(circuit.table, model_table(low_bit_dropped, 4, False))
    assert circuit.figures == {"mae_pct": 0.098, "mae": 0.25, "wce": 1.0, "ep_pct": 25.0, "power_mw": 0.012,
                               "area_um2": 31.5, "delay_ns": 0.41}


def test_operands_are_passed_by_name_when_b_is_declared_first(tmp_path):
    path = write_circuit(tmp_path, B_FIRST, {"MAE%": mae_pct_text(b_first, 8, False)})
    assert torch.equal(load_circuit(str(path)).table, model_table(b_first, 8, False))


def test_a_signed_circuit_returning_an_unsigned_word_equals_the_compiled_function(tmp_path):
    path = write_circuit(tmp_path, UNSIGNED_WORD, {"MAE%": mae_pct_text(forced_odd, 8, True)})
    circuit = load_circuit(str(path))
    assert circuit.signed and circuit.table[255, 255] == 1 and circuit.table[128, 127] == -128 * 127 + 1
    assert torch.equal(circuit.table, model_table(forced_odd, 8, True))
    library = tmp_path / "direct.so"
    subprocess.run([*COMPILER, "-shared", "-fPIC", "-o", str(library), str(path)], check=True)
    function = ctypes.CDLL(str(library)).mul8s_uret
    function.argtypes, function.restype = [ctypes.c_uint8, ctypes.c_uint8], ctypes.c_uint16
    direct = torch.tensor([[ctypes.c_int16(function(a, b)).value for b in range(256)] for a in range(256)])
    assert torch.equal(circuit.table, direct)


def test_a_signed_word_returned_unextended_in_a_wider_type_is_read_as_two_complement(tmp_path):
    circuit = load_circuit(str(write_circuit(tmp_path, UNEXTENDED_WORD, {"MAE%": "0.00"})))
    assert torch.equal(circuit.table, model_table(torch.mul, 8, True))


def test_a_12_bit_circuit_makes_a_4096_square_table(tmp_path):
    def low_nibble_dropped(a, b):
        return (a * b) & ~15

    code = "uint64_t mul12u_tst(uint64_t a, uint64_t b) {\n  return (a * b) & ~(uint64_t)15;\n}\n"
    circuit = load_circuit(str(write_circuit(tmp_path, code, {"MAE%": mae_pct_text(low_nibble_dropped, 12, False)})))
    assert circuit.table.shape == (4096, 4096)
    assert torch.equal(circuit.table, model_table(low_nibble_dropped, 12, False))


def test_a_header_mae_that_the_table_does_not_have_is_an_error_naming_both(tmp_path):
    path = write_circuit(tmp_path, LOW_BIT_DROPPED, {"MAE%": "0.50"})
    with pytest.raises(ValueError, match=r"MAE% is 0\.0976562 % .* header says 0\.50 %") as err:
        load_circuit(str(path))
    assert str(path) in str(err.value)


def test_the_library_rounding_of_mae_before_mae_pct_is_accepted(tmp_path):
    # MAE 0.25 printed "0.2" (half to even), MAE% from it: 0.2 / 256 = 0.078 % (the table's own: 0.098 %)
    assert load_circuit(str(write_circuit(tmp_path, LOW_BIT_DROPPED, {"MAE%": "0.078", "MAE": "0.2"}))).bits == 4
    with pytest.raises(ValueError, match="header says 0.16"):  # 0.4 / 256 = 0.16 %, but the table's MAE is 0.25
        load_circuit(str(write_circuit(tmp_path / "b", LOW_BIT_DROPPED, {"MAE%": "0.16", "MAE": "0.4"})))


@pytest.mark.parametrize("code, message", [
    ("uint32_t mul16u_big(uint16_t A, uint16_t B)\n{\n  return (uint32_t)A * B;\n}\n",
     r"16-bit operands; tables stop at 12 bits \(a 16-bit table would have 2\*\*32 entries\)"),
    ("uint64_t mul8x4u_asy(const uint64_t A /* 8-bit */, const uint64_t B /* 4-bit */)\n{\n  return A * B;\n}\n",
     "multiplies 8-bit by 4-bit operands; table layers multiply two n-bit operands"),
])
def test_widths_that_make_no_table_are_refused_before_compiling(tmp_path, monkeypatch, code, message):
    monkeypatch.setenv("CC", "false")
    with pytest.raises(ValueError, match=message):
        load_circuit(str(write_circuit(tmp_path, code)))


def test_without_a_name_pattern_the_width_comes_from_the_operand_types(tmp_path):
    code = "int16_t product(int8_t A, int8_t B)\n{\n  return A * B;\n}\n"
    circuit = load_circuit(str(write_circuit(tmp_path, code, {"MAE%": "0.00"})))
    assert (circuit.bits, circuit.signed) == (8, True)
    assert torch.equal(circuit.table, model_table(torch.mul, 8, True))


def test_the_second_load_reads_the_cache_without_compiling(tmp_path, monkeypatch):
    path = write_circuit(tmp_path, B_FIRST, {"MAE%": mae_pct_text(b_first, 8, False)})
    first = load_circuit(str(path))
    assert len(list((tmp_path / "cache" / "evoapprox").iterdir())) == 1
    monkeypatch.setenv("CC", "false")
    assert torch.equal(load_circuit(str(path)).table, first.table)
    path.write_text(path.read_text() + "\n/* another content */\n")
    with pytest.raises(ValueError, match="false failed to compile"):
        load_circuit(str(path))


def test_a_compile_error_gives_the_compiler_message(tmp_path):
    path = write_circuit(tmp_path, "uint16_t mul8u_bad(uint8_t A, uint8_t B)\n{\n  return A * B +;\n}\n")
    with pytest.raises(ValueError, match=r"mul8u_bad\.c: .*failed to compile \(exit \d+\): .*error"):
        load_circuit(str(path))


def fake_checkout(root):
    """An EvoApproxLib-like tree: the same circuit in two pareto folders (differing only in that comment)."""
    figures = {"MAE%": mae_pct_text(forced_odd, 8, True), "PDK45_PWR": "0.3"}
    for front in ("ep", "mae"):
        write_circuit(root / "multiplers" / "8x8_signed" / f"pareto_pwr_{front}", UNSIGNED_WORD, figures,
                      comment=f"pareto optimal with respect to the pwr and {front} parameters")
    write_circuit(root / "multiplers" / "8x8_unsigned" / "pareto_pwr_ep", B_FIRST)
    write_circuit(root / "multiplers" / "8x4_unsigned" / "pareto_pwr_ep",
                  "uint64_t mul8x4u_asy(const uint64_t A, const uint64_t B)\n{\n  return A * B;\n}\n")
    write_circuit(root / "multiplers" / "4x4_unsigned" / "pareto_pwr_ep", LOW_BIT_DROPPED)
    return root


def test_a_name_is_found_in_the_checkout_given_or_named_by_the_environment(tmp_path, monkeypatch):
    root = fake_checkout(tmp_path / "evoapproxlib")
    by_directory = load_circuit("mul8s_uret", directory=str(root))
    assert by_directory.path == str(root / "multiplers" / "8x8_signed" / "pareto_pwr_ep" / "mul8s_uret.c")
    monkeypatch.setenv("MBMLIB_EVOAPPROX", str(root))
    by_environment = load_circuit("mul8s_uret")
    assert by_environment == by_directory and by_environment.figures["power_mw"] == 0.3
    assert torch.equal(by_environment.table, model_table(forced_odd, 8, True))


def test_an_unknown_name_lists_the_folder_and_close_names(tmp_path):
    root = fake_checkout(tmp_path / "evoapproxlib")
    with pytest.raises(ValueError, match=f"no circuit 'mul8s_uref' under {root}; close names: mul8s_uret"):
        load_circuit("mul8s_uref", directory=str(root))


def test_files_of_one_name_with_different_circuits_are_an_error_naming_them(tmp_path):
    root = fake_checkout(tmp_path / "evoapproxlib")
    other = write_circuit(root / "multiplers" / "8x8_signed" / "pareto_pwr_wce", UNSIGNED_WORD.replace("| 1", "| 3"))
    with pytest.raises(ValueError, match="'mul8s_uret' has different files: .*pareto_pwr_ep/mul8s_uret.c, .*"
                                         "pareto_pwr_mae/mul8s_uret.c, .*pareto_pwr_wce/mul8s_uret.c"):
        load_circuit("mul8s_uret", directory=str(root))
    assert other.exists()


def test_a_missing_checkout_says_what_to_clone_and_what_to_set(tmp_path):
    for directory in (None, str(tmp_path / "absent"), str(tmp_path)):
        with pytest.raises(ValueError) as err:
            load_circuit("mul8s_1L2J", directory=directory)
        assert CLONE_COMMAND in str(err.value) and "MBMLIB_EVOAPPROX" in str(err.value)
        assert "--evoapprox-dir" in str(err.value)


def test_list_circuits_gives_the_n_by_n_names_of_a_width(tmp_path):
    root = fake_checkout(tmp_path / "evoapproxlib")
    assert list_circuits(str(root)) == ["mul8s_uret", "mul8u_bfst"]
    assert list_circuits(str(root), bits=4) == ["mul4u_tst"]
    assert list_circuits(str(root), bits=12) == []


def test_a_loaded_circuit_is_found_by_its_table_digest(tmp_path):
    circuit = load_circuit(str(write_circuit(tmp_path, UNSIGNED_WORD, {"PDK45_PWR": "0.25"})))
    assert circuit.digest == table_digest(circuit.table, signed=True)
    assert circuit.digest == Multiplier.from_table(circuit.table, signed=True).digest
    assert circuit_for_digest(circuit.digest) is circuit and circuit.figures == {"power_mw": 0.25}
    assert circuit_for_digest("0" * 16) is None
