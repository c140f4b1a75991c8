"""Static speed report of the Triton kernels: compiled ahead of time, no GPU needed.

Every kernel of :mod:`mbmlib.kernels.triton` (GEMM, convolution forward, both convolution
gradients for MBM and Mitchell; the integer GEMM and convolution for mbm-int8 and mitchell-int8),
for every tile the host may pick, is compiled with ``triton.compile`` for a ``GPUTarget``
(sm_75, sm_80, sm_90), disassembled with the ``cuobjdump`` shipped with Triton, and its K loop
(the innermost loop: a backward branch whose body holds the multiply-accumulates) is read
instruction by instruction.  Per MAC:
instructions, global loads, warp shuffles, shared-memory and spill operations; per kernel:
registers and spill bytes (local memory plus the stack frame, where ptxas puts spills: the kernels
make no calls and keep no local arrays).  The implied ceiling assumes every SM issues
4 warp instructions per clock, 32 lanes each: SMs x 4 x 32 x clock / instructions per MAC.
It is a bound from the code, not a timing.
"""
from __future__ import annotations

import collections
import json
import os
import re
import subprocess
import tempfile
from pathlib import Path
from typing import Callable

__all__ = ["CHIPS", "KERNELS", "multipliers_of", "compile_kernel", "k_loop_stats", "int_macs", "analyse", "write_reports"]

# Named chip per architecture: (name, SMs, clock in GHz) -- boost clocks from the vendors' data sheets.
CHIPS = {
    "sm_75": ("Tesla T4", 40, 1.59),
    "sm_80": ("A100 SXM", 108, 1.41),
    "sm_90": ("H100 SXM", 132, 1.75),
}
ISSUE_SLOTS = 4 * 32  # warp instructions per SM and clock x lanes

# Report name -> (loop of mbmlib.kernels.triton.KERNELS, the multipliers it is compiled for): the float
# designs, and the integer ones on the same GEMM and convolution loops (their MAC is a constexpr).
FLOAT_MULTIPLIERS = ("mbm", "mitchell")
INT_MULTIPLIERS = ("mbm-int8", "mitchell-int8")  # tables need a file; their loop is the formula's with a gather
KERNELS = {
    "gemm": ("gemm", FLOAT_MULTIPLIERS),
    "conv2d": ("conv2d", FLOAT_MULTIPLIERS),
    "conv2d_grad_input": ("conv2d_grad_input", FLOAT_MULTIPLIERS),
    "conv2d_grad_weight": ("conv2d_grad_weight", FLOAT_MULTIPLIERS),
    "gemm_int": ("gemm", INT_MULTIPLIERS),
    "conv2d_int": ("conv2d", INT_MULTIPLIERS),
}
INT_K = 3 * 3 * 64  # the sum length the integer kernels are compiled for: int32 sums (below 2**31)


def multipliers_of(kernel: str) -> tuple[str, ...]:
    """The multipliers a kernel of the report is compiled for."""
    return KERNELS[kernel][1]


_SHARED_OPS = ("LDS", "STS", "LDSM", "ATOMS", "BAR", "LDGSTS")


def _tools() -> Path:
    import triton

    return Path(triton.__file__).parent / "backends" / "nvidia" / "bin"


def compile_kernel(kernel: str, multiplier: str, tile, arch: str):
    """triton.compile one kernel for one tile and architecture; returns the CompiledKernel."""
    if os.environ.get("TRITON_INTERPRET") == "1":
        raise RuntimeError("mbmlib.workflow.sass compiles for a GPU: run it without TRITON_INTERPRET=1")
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from ..kernels import triton as tk
    from ..multipliers import as_multiplier

    fn, shape = tk.KERNELS[KERNELS[kernel][0]]
    m = as_multiplier(multiplier)
    integer = m.is_integer
    kind = tk.design_constexprs(m, INT_K if integer else 1)
    options = {"num_warps": tile.num_warps, "num_stages": 1, "enable_fp_fusion": kind.pop("enable_fp_fusion")}
    consts = dict(kind, RZ=True, BLOCK_M=tile.block_m, BLOCK_N=tile.block_n, **shape)
    consts = {k: v for k, v in consts.items() if k in fn.arg_names}
    pointers = {"out_ptr": "*i64" if integer else "*fp32", "table_ptr": "*i32"}
    sig = {n: "constexpr" if n in consts else pointers.get(n, "*i64") if n.endswith("_ptr") else "i32"
           for n in fn.arg_names}
    aligned = {(fn.arg_names.index(n),): [["tt.divisibility", 16]] for n in fn.arg_names if n.endswith("_ptr")}
    src = ASTSource(fn=fn, signature=sig, constexprs={(fn.arg_names.index(k),): v for k, v in consts.items()},
                    attrs=aligned)
    return triton.compile(src, target=GPUTarget("cuda", int(arch[3:]), 32), options=options)


def _disassemble(cubin: bytes, flag: str) -> str:
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        return subprocess.run([str(_tools() / "cuobjdump"), flag, f.name], check=True, capture_output=True,
                              text=True).stdout


_INSTR = re.compile(r"^\s+/\*([0-9a-f]{4,})\*/\s+(.*?)\s*;")
_BRANCH = re.compile(r"\bBRA\b.*?0x([0-9a-f]+)")


def _opcode(text: str) -> str:
    return re.sub(r"^@!?U?P\w+\s+", "", text).split()[0].split(".")[0]


def _float_macs(ops: collections.Counter) -> int:
    return ops["FADD"]  # the accumulations: the float kernels' only FADDs


def int_macs(tile) -> Callable[[collections.Counter], int]:
    """MACs of an integer kernel's loop body: tm x tn per step of k, one load per owned row and column a step.

    Integer accumulations have no opcode of their own (IADD3 also adds indices), so the steps of k in
    the body (the compiler may unroll) are counted by its loads of operand words.
    """
    return lambda ops: ops["LDG"] * tile.tm * tile.tn // (tile.tm + tile.tn)


def k_loop_stats(sass: str, macs_of: Callable[[collections.Counter], int] = _float_macs) -> dict:
    """Instruction counts of the K loops of a SASS listing.

    Loops are backward branches; a K loop is an innermost one with MACs in its body, counted by
    ``macs_of`` from its opcodes (default: the float accumulations).  Returns the counts of the loop
    with the most instructions per MAC (the worst of, e.g., the KH x KW loops of a convolution).
    """
    ins = [(int(m.group(1), 16), m.group(2)) for m in map(_INSTR.match, sass.splitlines()) if m]
    index = {addr: i for i, (addr, _) in enumerate(ins)}
    loops = [(index[int(m.group(1), 16)], i) for i, (addr, text) in enumerate(ins)
             if (m := _BRANCH.search(text)) and int(m.group(1), 16) < addr and int(m.group(1), 16) in index]
    innermost = [(s, e) for s, e in loops if not any(s <= s2 and e2 < e for s2, e2 in loops if (s2, e2) != (s, e))]
    best = None
    for s, e in innermost:
        ops = collections.Counter(_opcode(t) for _, t in ins[s:e + 1])
        macs = macs_of(ops)
        if macs == 0:
            continue
        stats = {"instructions": e + 1 - s, "macs": macs, "instructions_per_mac": round((e + 1 - s) / macs, 3),
                 "loads_per_mac": round(ops["LDG"] / macs, 3), "shuffles_per_mac": round(ops["SHFL"] / macs, 3),
                 "shared_ops_per_mac": round(sum(ops[o] for o in _SHARED_OPS) / macs, 3),
                 "spill_ops": ops["LDL"] + ops["STL"], "k_loops": 0, "opcodes": dict(ops.most_common())}
        if best is None or stats["instructions_per_mac"] > best["instructions_per_mac"]:
            best = stats
    if best is None:
        raise ValueError("no K loop (backward branch with multiply-accumulates) found in the SASS listing")
    best["k_loops"] = sum(1 for s, e in innermost if macs_of(collections.Counter(_opcode(t) for _, t in ins[s:e + 1])))
    return best


def _resources(cubin: bytes) -> dict:
    usage = _disassemble(cubin, "-res-usage")
    regs = re.search(r"REG:(\d+)", usage)
    local = int(re.search(r"LOCAL:(\d+)", usage).group(1))
    stack = int(re.search(r"STACK:(\d+)", usage).group(1))
    return {"registers": int(regs.group(1)), "local_bytes": local, "stack_bytes": stack, "spill_bytes": local + stack}


def analyse(kernel: str, multiplier: str, tile, arch: str) -> tuple[dict, str]:
    """(report entry, SASS listing) of one kernel / multiplier / tile on one architecture."""
    compiled = compile_kernel(kernel, multiplier, tile, arch)
    cubin = compiled.asm["cubin"]
    sass = _disassemble(cubin, "-sass")
    stats = k_loop_stats(sass, int_macs(tile) if multiplier in INT_MULTIPLIERS else _float_macs)
    _, sms, ghz = CHIPS[arch]
    entry = {"kernel": kernel, "multiplier": multiplier,
             "tile": {"tm": tile.tm, "tn": tile.tn, "num_warps": tile.num_warps,
                      "block_m": tile.block_m, "block_n": tile.block_n},
             **_resources(cubin), **stats,
             "ceiling_tmac_per_s": round(sms * ISSUE_SLOTS * ghz * 1e9 / stats["instructions_per_mac"] / 1e12, 3)}
    return entry, sass


def _report(arch: str, tiles) -> tuple[dict, str]:
    import triton

    name, sms, ghz = CHIPS[arch]
    entries, default_sass = [], ""
    for kernel in KERNELS:
        for mult in multipliers_of(kernel):
            for tile in tiles:
                entry, sass = analyse(kernel, mult, tile, arch)
                entries.append(entry)
                if kernel == "gemm" and mult == "mbm" and tile == tiles[0]:
                    default_sass = sass
    report = {
        "arch": arch, "triton": triton.__version__,
        "chip": {"name": name, "sms": sms, "clock_ghz": ghz, "issue_slots_per_sm_clock": ISSUE_SLOTS},
        "ceiling": "SMs x 4 issue slots x 32 lanes x clock / K-loop instructions per MAC (a bound, not a timing)",
        "default_tile": {"tm": tiles[0].tm, "tn": tiles[0].tn, "num_warps": tiles[0].num_warps},
        "conv_kernel_size": "3x3", "kernels": entries,
    }
    return report, default_sass


def write_reports(out_dir: str | Path = "results/bench", archs=("sm_75", "sm_80", "sm_90")) -> list[Path]:
    """Write ``sass-<arch>.json`` per architecture and the default MBM GEMM's listing; print a table."""
    from ..kernels.triton import TILES

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for arch in archs:
        report, sass = _report(arch, TILES)
        paths.append(out / f"sass-{arch}.json")
        paths[-1].write_text(json.dumps(report, indent=1) + "\n")
        paths.append(out / f"sass-{arch}-gemm-mbm.sass")
        paths[-1].write_text(sass)
        print(format_table(report))
    return paths


def format_table(report: dict) -> str:
    """One line per kernel / multiplier / tile: instructions, loads, shuffles, shared ops per MAC, ceiling."""
    chip = report["chip"]
    lines = [f"{report['arch']} ({chip['name']}, {chip['sms']} SMs, {chip['clock_ghz']} GHz)",
             f"{'kernel':20} {'mult':9} {'tile':9} {'instr/MAC':>9} {'LDG/MAC':>8} {'SHFL':>5} {'smem':>5} "
             f"{'regs':>5} {'spill':>6} {'T MAC/s':>8}"]
    for e in report["kernels"]:
        t = e["tile"]
        lines.append(f"{e['kernel']:20} {e['multiplier']:9} {t['tm']}x{t['tn']}/{t['num_warps']}w".ljust(41)
                     + f"{e['instructions_per_mac']:>9.2f} {e['loads_per_mac']:>8.3f} {e['shuffles_per_mac']:>5.2f} "
                     f"{e['shared_ops_per_mac']:>5.2f} {e['registers']:>5} {e['spill_bytes']:>6} "
                     f"{e['ceiling_tmac_per_s']:>8.2f}")
    return "\n".join(lines)
