"""``bench --sass`` at the attention shape: the batched GEMM runs G matrices in one launch and its K loop is reported.

Recording launches needs no GPU and no compiler; the compile test runs in a subprocess without TRITON_INTERPRET,
as tests/test_sass.py does.
"""
import json
import os
import subprocess
import sys
import textwrap

import pytest

from mbmlib.workflow import sass
from test_sass import ROOT, assert_clean, cuda_backend

pytest.importorskip("triton")


def _launches(shape):
    """(grid, g_offset) of each launch the GEMM launcher makes for ``shape`` (MBM, the host's tile)."""
    from mbmlib.kernels.triton import pick_tile
    from mbmlib.multipliers import as_multiplier

    g, m, n, k = shape.dims
    calls = sass._launch_calls("gemm", shape, as_multiplier("mbm"), pick_tile(max(m, n), min(m, n)))
    return [(tuple(grid), args[7]) for _, grid, args, _ in calls]


@pytest.mark.parametrize("name", ["gpt.qk@b4h4", "gpt.pv@b4h4"])
def test_the_attention_products_are_one_launch_over_their_16_matrices(name):
    shape = sass.SHAPES[name]
    assert shape.dims[0] == 16 and shape.dims[1] == 256 and 64 in shape.dims[2:]
    tile = sass.host_tile("gemm", name)
    ((grid, g_offset),) = _launches(shape)
    assert grid == (-(-256 // tile.block_m), -(-shape.dims[2] // tile.block_n), 16) and g_offset == 0


def test_more_matrices_than_the_grid_holds_take_one_launch_per_65535():
    launches = _launches(sass.Shape("gemm", (65537, 1, 1, 1)))
    assert launches == [((1, 1, 65535), 0), ((1, 1, 2), 65535)]


def _fake_analyse(kernel, multiplier, tile, arch, shape=None):
    entry = {"kernel": kernel, "multiplier": multiplier, "arch": arch, "shape": shape or sass.shapes_of(kernel)[0],
             "tile": {"tm": tile.tm, "tn": tile.tn, "num_warps": tile.num_warps, "block_m": tile.block_m,
                      "block_n": tile.block_n},
             "instructions_per_mac": 1.0, "registers": 64, "spill_bytes": 0, "l2_bytes_per_mac": 1.0,
             "ceilings_tmac_per_s": {"issue": 1.0, "fma": 1.0, "alu": 1.0, "xu": 1.0, "l2": None},
             "ceiling_tmac_per_s": 1.0, "bound": "issue"}
    return entry, ""


def test_the_report_has_a_batched_row_per_gemm_multiplier_and_models_both_products(monkeypatch):
    monkeypatch.setattr(sass, "analyse", _fake_analyse)
    report, _ = sass._report("sm_90")
    batched = [e for e in report["kernels"] if e["shape"] == "gpt.qk@b4h4"]
    host = sass.host_tile("gemm", "gpt.qk@b4h4")
    assert [(e["kernel"], e["multiplier"]) for e in batched] == [
        ("gemm", "mbm"), ("gemm", "mitchell"), ("gemm_int", "mbm-int8"), ("gemm_int", "mitchell-int8")]
    assert all((e["tile"]["block_m"], e["tile"]["block_n"]) == (host.block_m, host.block_n) for e in batched)
    gemm_shapes = {row["shape"] for c in report["tile_choice"] if c["kernel"] == "gemm" for row in c["shapes"]}
    assert {"gpt.qk@b4h4", "gpt.pv@b4h4", "gemm4096"} <= gemm_shapes
    assert any(line.split()[:3] == ["gemm", "gpt.qk@b4h4", "mbm"] for line in sass.format_table(report).splitlines())


_SCRIPT = textwrap.dedent("""
    import json
    from mbmlib.workflow import sass

    tile = sass.host_tile("gemm", "gpt.qk@b4h4")
    print(json.dumps([sass.analyse("gemm", "mbm", tile, "sm_90", shape)[0] for shape in ("gpt.qk@b4h4", None)]))
""")


@cuda_backend
def test_the_batched_gemm_compiles_clean_with_the_k_loop_of_a_single_matrix():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-c", _SCRIPT], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    batched, single = json.loads(proc.stdout.strip().splitlines()[-1])
    assert_clean([batched, single])
    assert batched["shape"] == "gpt.qk@b4h4" and batched["grid"][2] == 16 and single["grid"][2] == 1
    assert batched["instructions_per_mac"] == single["instructions_per_mac"] <= 13.0  # the bound test_sass allows
    assert batched["registers"] == single["registers"]
