"""Static speed report of the Triton kernels: compiled ahead of time, no GPU needed.

Every kernel of :mod:`mbmlib.kernels.triton` (GEMM, convolution forward, both convolution gradients for
MBM and Mitchell; the integer GEMM and convolution for mbm-int8 and mitchell-int8), for every tile the
host may pick, is compiled as a launch of its benchmark shape would compile it: the launcher runs on
meta tensors of that shape (shapes, dtypes and aligned addresses, no values to compute) with its launches
recorded (:func:`mbmlib.kernels.triton.launch.recorded_launches`), and Triton's own binder specialises the
recorded arguments (an integer 1 becomes a constant, multiples of 16 get alignment hints) for a ``GPUTarget``
(sm_75, sm_80, sm_90).  The GEMMs are also compiled, at the host's tile, for a batched attention shape
(``BATCHED_BUILDS``: 16 matrices in one launch, one a program along the grid's third axis).  Read per build:

* registers, stack frame and spill bytes from the ``ptxas -v`` log of the very ptxas run that made the
  cubin, and where the spill loads and stores sit (K loop, another loop, outside loops) from the SASS;
* the K loop (an innermost backward branch whose body loads from global memory): instructions per MAC,
  where its MACs per iteration are counted from the loop's structure, not its opcodes: the steps of k
  one iteration takes (the step of the counter its exit branch tests) x the thread's TM x TN outputs;
* per-pipe ceilings (T MAC/s): issue (4 warp instructions per SM and clock), the FMA pipe (FP32 and
  IMAD), the ALU (other integer, logic, compare, select, move), the XU (conversions), and L2 memory:
  bytes per MAC from L2 with the tile's reuse, 8 (BLOCK_M + BLOCK_N) / (BLOCK_M x BLOCK_N) for 64-bit words;
  the lowest is the bound named per row.  Bounds read from the code, not timings.
* per benchmark shape, every tile's modelled time (padded MACs / bound, scaled down when the grid leaves
  warp schedulers without a warp) beside the host's pick.
"""
from __future__ import annotations

import collections
import contextlib
import functools
import io
import json
import os
import re
import subprocess
import tempfile
from pathlib import Path
from typing import NamedTuple

__all__ = ["CHIPS", "KERNELS", "SHAPES", "BATCHED_BUILDS", "multipliers_of", "compile_launch", "ptxas_resources",
           "k_loop_stats", "ceilings", "analyse", "host_tile", "batched_builds", "tile_choice", "write_reports",
           "format_table"]


class Chip(NamedTuple):
    """A named chip of an architecture: SMs, boost clock, FP32 lanes per SM and clock, L2 bandwidth (GB/s)."""
    name: str
    sms: int
    ghz: float
    fp32_lanes: int
    l2_gb_s: float | None


# Boost clocks: NVIDIA's data sheets, each the clock its own FP32 peak implies (SMs x FP32 lanes x 2 x clock):
# T4 8.1 TFLOPS, 1590 MHz; A100 SXM 19.5 TFLOPS, 1410 MHz; H100 SXM 67 TFLOPS, 1980 MHz (1755 MHz is the
# H100 PCIe's).  FP32 lanes per SM and clock: CUDA C++ Programming Guide, "Throughput of Native Arithmetic
# Instructions" (64 on 7.5 and 8.0, 128 on 9.0).  L2 bandwidth: Table 3 of doi:10.3390/s23167045
# (pmc.ncbi.nlm.nih.gov/articles/PMC10448217), 7219 GB/s for a full GA100 and 8986 GB/s for a full GH100
# at 1755 MHz: full-chip figures, optimistic for the products; none is cited for the T4.
CHIPS = {
    "sm_75": Chip("Tesla T4", 40, 1.59, 64, None),
    "sm_80": Chip("A100 SXM", 108, 1.41, 64, 7219.0),
    "sm_90": Chip("H100 SXM", 132, 1.98, 128, 8986.0),
}
ISSUE_LANES = 4 * 32  # 4 warp schedulers per SM, one warp instruction (32 lanes) per clock each
# Pipes (NVIDIA's descriptions: Nsight Compute's pipeline metrics; forum posts by NVIDIA staff for GV100, GA100
# and GH100): the FMA pipe runs FP32 and IMAD (on sm_90 FP32 on two halves, IMAD on FMA-heavy only), the ALU
# integer ops but IMAD, logic, compares, selects and moves, the XU conversions.  Lanes per SM and clock from the
# Programming Guide's table: 32-bit integer add, compare, logic 64; multiply-add 64; conversions 16.
ALU_LANES, IMAD_LANES, XU_LANES = 64, 64, 16
_FP32_OPS = {"FADD", "FMUL", "FFMA"}
_IMAD_OPS = {"IMAD", "IMUL", "IDP"}
_ALU_OPS = {"IADD3", "VIADD", "LOP3", "SHF", "ISETP", "FSETP", "SEL", "FSEL", "IMNMX", "VIMNMX", "FMNMX", "LEA",
            "MOV", "PRMT", "PLOP3", "P2R", "R2P", "IABS", "SGXT", "BMSK", "FLO", "POPC", "BREV", "CSETP", "I2FP"}
_XU_OPS = {"I2F", "F2I", "F2F", "I2I", "MUFU", "FRND"}
_SHARED_OPS = ("LDS", "STS", "LDSM", "ATOMS", "BAR", "LDGSTS")
WORD_BYTES = 8  # every operand word is 64 bits (float words, integer words, DRUM's reduced operands)


class Shape(NamedTuple):
    """A benchmark shape: GEMM (G, M, N, K), or a convolution's input (B, C, H, W), weights (O, C, KH, KW), padding."""
    kind: str
    dims: tuple
    weight: tuple = ()
    padding: int = 0


# The shapes the report compiles (first of each kind) and models tiles for.  Attention: BERT-base's scores
# Q K^T (12 heads of 64, sequence 512) at batch 8, and GPT-sized attention at batch 4 with 4 heads (sequence
# 256, head dim 64): Q K^T and P V, the products ``bench layers`` times.
SHAPES = {
    "gemm4096": Shape("gemm", (1, 4096, 4096, 4096)),
    "attention-b8": Shape("gemm", (96, 512, 512, 64)),
    "gpt.qk@b4h4": Shape("gemm", (16, 256, 256, 64)),
    "gpt.pv@b4h4": Shape("gemm", (16, 256, 64, 256)),
    "seednet.fc1@b16": Shape("gemm", (1, 16, 128, 6272)),
    "seednet.conv2@b16": Shape("conv", (16, 32, 28, 28), (64, 32, 3, 3), 1),
    "seednet.conv1@b16": Shape("conv", (16, 1, 28, 28), (32, 1, 3, 3), 1),
    "seednet.conv3@b16": Shape("conv", (16, 64, 14, 14), (128, 64, 3, 3), 1),
    "seednet.conv2@b128": Shape("conv", (128, 32, 28, 28), (64, 32, 3, 3), 1),
}

# Report name -> (kernel of mbmlib.kernels.triton.KERNELS, the multipliers it is compiled for, shape kind).
FLOAT_MULTIPLIERS = ("mbm", "mitchell")
INT_MULTIPLIERS = ("mbm-int8", "mitchell-int8")  # tables need a file; their loop is the formula's with a gather
KERNELS = {
    "gemm": ("gemm", FLOAT_MULTIPLIERS, "gemm"),
    "conv2d": ("conv2d", FLOAT_MULTIPLIERS, "conv"),
    "conv2d_grad_input": ("conv2d_grad_input", FLOAT_MULTIPLIERS, "conv"),
    "conv2d_grad_weight": ("conv2d_grad_weight", FLOAT_MULTIPLIERS, "conv"),
    "gemm_int": ("gemm", INT_MULTIPLIERS, "gemm"),
    "conv2d_int": ("conv2d", INT_MULTIPLIERS, "conv"),
}


# Kernel -> a batched shape it is also compiled for (the host's tile), beside its first shape: the K loop of a
# launch over G > 1 matrices (the grid's third axis), as attention runs it.
BATCHED_BUILDS = {"gemm": "gpt.qk@b4h4", "gemm_int": "gpt.qk@b4h4"}


def multipliers_of(kernel: str) -> tuple[str, ...]:
    """The multipliers a kernel of the report is compiled for."""
    return KERNELS[kernel][1]


def shapes_of(kernel: str) -> list[str]:
    """The benchmark shapes of a kernel's kind; the first is the one its builds are compiled for."""
    return [name for name, shape in SHAPES.items() if shape.kind == KERNELS[kernel][2]]


# --------------------------------------------------------------------------- launches, recorded and compiled

class _Pointer:
    """What Triton's binder reads of a tensor argument: its dtype and address (for the alignment hint)."""

    def __init__(self, dtype, address: int):
        self.dtype, self.address = dtype, address

    def data_ptr(self) -> int:
        return self.address


def _operands(shape: Shape, integer: bool, device: str):
    """Tensors of a shape on ``device``: small integers for integer designs (sign-magnitude 8-bit), floats
    otherwise.  On "meta" they have no values, only what a launch specialises on (shapes, dtypes, aligned
    addresses): the encodings of benchmark-sized values would take half a minute of the report."""
    import torch

    make = ((lambda *s: torch.randint(-127, 128, s, device=device)) if integer
            else (lambda *s: torch.rand(*s, device=device) + 0.5))
    if shape.kind == "gemm":
        g, m, n, k = shape.dims
        return make(g, m, k), make(g, n, k)
    return make(*shape.dims), make(*shape.weight)


def _launch_calls(kernel: str, shape: Shape, multiplier, tile, device: str = "meta"):
    """Run the launcher of ``kernel`` on tensors of ``shape`` on ``device`` with its launches recorded; returns them."""
    import torch

    from ..kernels.triton import launch

    a, b = _operands(shape, multiplier.is_integer, device)
    out_dtype = torch.int64 if multiplier.is_integer else torch.float32
    with launch.recorded_launches() as calls:
        if shape.kind == "gemm":
            out = torch.zeros(a.shape[0], a.shape[1], b.shape[1], dtype=out_dtype, device=device)
            launch._gemm_launch(a, b, multiplier, out, tile)
        elif KERNELS[kernel][0] == "conv2d":
            p = (shape.padding,) * 2
            out = torch.zeros(a.shape[0], b.shape[0], *_conv_out(shape), dtype=out_dtype, device=device)
            launch._conv2d_launch(a, b, (1, 1), p, (1, 1), 1, multiplier, out, tile)
        else:
            p = (shape.padding,) * 2
            grad = torch.rand(a.shape[0], b.shape[0], *_conv_out(shape), device=device) + 0.5
            launch._conv2d_grads_launch(grad, a, b, (1, 1), p, (1, 1), 1, multiplier,
                                        launch.design_constexprs(multiplier), torch.zeros_like(a),
                                        torch.zeros_like(b), tile)
    return calls


def _conv_out(shape: Shape) -> tuple[int, int]:
    _, _, h, w = shape.dims
    kh, kw = shape.weight[2:]
    return h + 2 * shape.padding - kh + 1, w + 2 * shape.padding - kw + 1


@functools.lru_cache(maxsize=None)
def recorded_launch(kernel: str, shape_name: str, multiplier: str, tile, device: str = "meta"):
    """(JIT function, grid, arguments, meta) of the launch of ``kernel`` for a benchmark shape and tile, its
    tensors replaced by their dtype and address (the same on every architecture: computed once); recorded on
    meta tensors unless ``device`` says otherwise."""
    from ..kernels import triton as tk
    from ..multipliers import as_multiplier

    fn = tk.KERNELS[KERNELS[kernel][0]][0]
    calls = [c for c in _launch_calls(kernel, SHAPES[shape_name], as_multiplier(multiplier), tile, device)
             if c[0] is fn]
    fn, grid, args, meta = calls[0]
    args = tuple(_Pointer(a.dtype, a.data_ptr()) if hasattr(a, "data_ptr") else a for a in args)
    return fn, grid, args, meta


def compile_launch(fn, args, meta: dict, arch: str):
    """triton.compile a recorded launch for ``arch`` exactly as a launch specialises it; (kernel, ptxas -v log).

    Triton's own binder (the function a launch calls) turns the arguments into the signature, constants and
    alignment hints; the compile is forced (no cache) so that ptxas runs and its log can be read.
    """
    if os.environ.get("TRITON_INTERPRET") == "1":
        raise RuntimeError("mbmlib.workflow.sass compiles for a GPU: run it without TRITON_INTERPRET=1")
    import triton
    from triton import knobs
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource, make_backend
    from triton.runtime.jit import create_function_from_signature

    target = GPUTarget("cuda", int(arch[3:]), 32)
    backend = make_backend(target)
    kwargs = dict(meta, debug=fn.debug or knobs.runtime.debug,
                  instrumentation_mode=knobs.compilation.instrumentation_mode)
    bound, specialization, options = create_function_from_signature(fn.signature, fn.params, backend)(*args, **kwargs)
    options, signature, constexprs, attrs = fn._pack_args(backend, kwargs, bound, specialization, options)
    log = io.StringIO()
    saved = knobs.compilation.always_compile, knobs.nvidia.dump_ptxas_log
    knobs.compilation.always_compile, knobs.nvidia.dump_ptxas_log = True, True
    try:
        with contextlib.redirect_stdout(log):
            compiled = triton.compile(ASTSource(fn, signature, constexprs, attrs), target=target,
                                      options=options.__dict__)
    finally:
        knobs.compilation.always_compile, knobs.nvidia.dump_ptxas_log = saved
    return compiled, log.getvalue()


def ptxas_resources(log: str) -> dict:
    """Registers, stack frame and spill bytes from a ``ptxas -v`` log of one kernel."""
    def number(pattern: str) -> int:
        found = re.search(pattern, log)
        if found is None:
            raise ValueError(f"no {pattern!r} in the ptxas log: {log[-500:]!r}")
        return int(found.group(1))

    stores, loads = number(r"(\d+) bytes spill stores"), number(r"(\d+) bytes spill loads")
    return {"registers": number(r"Used (\d+) registers"), "stack_bytes": number(r"(\d+) bytes stack frame"),
            "spill_store_bytes": stores, "spill_load_bytes": loads, "spill_bytes": max(stores, loads)}


def _tools() -> Path:
    import triton

    return Path(triton.__file__).parent / "backends" / "nvidia" / "bin"


def _disassemble(cubin: bytes) -> str:
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        return subprocess.run([str(_tools() / "cuobjdump"), "-sass", f.name], check=True, capture_output=True,
                              text=True).stdout


# --------------------------------------------------------------------------- the listing

_INSTR = re.compile(r"^\s+/\*([0-9a-f]{4,})\*/\s+(.*?)\s*;")
_BRANCH = re.compile(r"^(?:@(!?)(U?P\d)\s+)?BRA\b.*?0x([0-9a-f]+)")
_REG = r"(U?R\d+)"


def _opcode(text: str) -> str:
    return re.sub(r"^@!?U?P\w+\s+", "", text).split()[0].split(".")[0]


def _instructions(sass: str) -> list[str]:
    return [m.group(2) for m in map(_INSTR.match, sass.splitlines()) if m]


def _loops(ins: list[str], sass: str) -> list[tuple[int, int]]:
    """(first, last) instruction index of every loop: a conditional branch back to an earlier instruction."""
    addrs = [int(m.group(1), 16) for m in map(_INSTR.match, sass.splitlines()) if m]
    index = {a: i for i, a in enumerate(addrs)}
    out = []
    for i, text in enumerate(ins):
        m = _BRANCH.match(text)
        if m and int(m.group(3), 16) < addrs[i] and int(m.group(3), 16) in index:
            out.append((index[int(m.group(3), 16)], i))
    return out


def counter_step(body: list[str]) -> int:
    """Steps of k per iteration of a loop body: the constant step of the counter its exit test compares.

    The compares (``ISETP``) of the body are tried, the one setting the closing branch's predicate first (a
    loop closed by an unconditional branch exits through a forward one); of the registers compared, the counter
    is the one the body moves by a constant (``IADD3 R, R, imm`` / ``VIADD`` / ``UIADD3``), its steps summed.
    """
    pred = _BRANCH.match(body[-1]).group(2)
    compares = [t for t in reversed(body[:-1]) if re.match(r"^(@!?U?P\d+\s+)?U?ISETP", t)]
    compares.sort(key=lambda t: not (pred and re.match(rf"^(@!?U?P\d+\s+)?U?ISETP\S* {pred},", t)))
    for compare in compares:
        for reg in re.findall(_REG, compare.split(",", 2)[-1]):
            add = re.compile(rf"^(?:U?IADD3|VIADD) {reg}, {reg}(?:\.reuse)?, (-?0x[0-9a-f]+)\b|"
                             rf"^U?IADD3 {reg}, (-?0x[0-9a-f]+), {reg}\b")
            steps = [_signed(m.group(1) or m.group(2)) for m in map(add.match, body) if m]
            if steps and sum(steps):
                return abs(sum(steps))
    raise ValueError(f"no loop counter found for the loop closed by {body[-1]!r}")


def _signed(immediate: str) -> int:
    """A SASS immediate as a signed 32-bit value (``0xffffffff`` is -1, as is ``-0x1``)."""
    value = int(immediate, 16)
    return value - 2**32 if value >= 2**31 else value


def _spill_places(ins: list[str], loops, k_loops) -> dict:
    """Spill loads and stores (LDL / STL) in a K loop, in another loop, and outside every loop."""
    places = collections.Counter()
    for i, text in enumerate(ins):
        if _opcode(text) in ("LDL", "STL"):
            where = ("k_loop" if any(s <= i <= e for s, e in k_loops)
                     else "other_loop" if any(s <= i <= e for s, e in loops) else "outside_loops")
            places[where] += 1
    return {k: places[k] for k in ("k_loop", "other_loop", "outside_loops")}


def k_loop_stats(sass: str, outputs_per_thread: int) -> dict:
    """Counts of the worst K loop of a listing (most instructions per MAC) and where its spills sit.

    A K loop is an innermost loop whose body loads from global memory; its MACs per iteration are
    ``counter_step(body) * outputs_per_thread`` (each step of k updates the thread's TM x TN outputs once).
    """
    ins = _instructions(sass)
    loops = _loops(ins, sass)
    innermost = [(s, e) for s, e in loops if not any(s <= s2 and e2 < e for s2, e2 in loops if (s2, e2) != (s, e))]
    k_loops = [(s, e) for s, e in innermost if any(_opcode(t) == "LDG" for t in ins[s:e + 1])]
    if not k_loops:
        raise ValueError("no K loop (an innermost backward branch whose body loads from global memory) found")
    best = None
    for s, e in k_loops:
        body = ins[s:e + 1]
        ops = collections.Counter(map(_opcode, body))
        steps = counter_step(body)
        macs = steps * outputs_per_thread
        stats = {"instructions": len(body), "k_steps": steps, "macs": macs,
                 "instructions_per_mac": round(len(body) / macs, 3), "loads_per_mac": round(ops["LDG"] / macs, 3),
                 "shuffles_per_mac": round(ops["SHFL"] / macs, 3),
                 "shared_ops_per_mac": round(sum(ops[o] for o in _SHARED_OPS) / macs, 3),
                 "opcodes": dict(ops.most_common())}
        if best is None or stats["instructions_per_mac"] > best["instructions_per_mac"]:
            best = stats
    best["k_loops"] = len(k_loops)
    best["spill_ops"] = _spill_places(ins, loops, k_loops)
    return best


# --------------------------------------------------------------------------- the model

def pipe_ops(opcodes: dict) -> dict:
    """Instructions of a loop body per pipe: issue (all), fp32, imad, alu, xu."""
    def count(names):
        return sum(n for op, n in opcodes.items() if op in names)

    return {"issue": sum(opcodes.values()), "fp32": count(_FP32_OPS), "imad": count(_IMAD_OPS),
            "alu": count(_ALU_OPS), "xu": count(_XU_OPS)}


def l2_bytes_per_mac(tile) -> float:
    """Bytes read from L2 per MAC by one program: its BLOCK_M + BLOCK_N words per step of k, reused over the tile."""
    return WORD_BYTES * (tile.block_m + tile.block_n) / (tile.block_m * tile.block_n)


def ceilings(opcodes: dict, macs: int, tile, chip: Chip) -> dict:
    """T MAC/s each pipe allows (SMs x lanes x clock / its operations per MAC) and L2 allows; the bound is the least.

    FMA pipe: FP32 and IMAD share it (64 lanes on sm_75 / sm_80); with 128 FP32 lanes (sm_90) IMAD still
    has 64.  L2: the chip's cited bandwidth over the tile's bytes per MAC (none where no figure is cited).
    """
    ops = {k: v / macs for k, v in pipe_ops(opcodes).items()}
    rate = chip.sms * chip.ghz * 1e9 / 1e12

    def per(lanes, n):
        return round(rate * lanes / n, 3) if n else None

    fma = [c for c in (per(chip.fp32_lanes, ops["fp32"] + ops["imad"]),
                       per(IMAD_LANES, ops["imad"]) if chip.fp32_lanes > IMAD_LANES else None) if c]
    out = {"issue": per(ISSUE_LANES, ops["issue"]), "fma": min(fma) if fma else None,
           "alu": per(ALU_LANES, ops["alu"]), "xu": per(XU_LANES, ops["xu"]),
           "l2": round(chip.l2_gb_s / 1e3 / l2_bytes_per_mac(tile), 3) if chip.l2_gb_s else None}
    bound = min((k for k in out if out[k]), key=lambda k: out[k])
    return {"per_mac": {k: round(v, 3) for k, v in ops.items()}, "ceilings_tmac_per_s": out, "bound": bound,
            "ceiling_tmac_per_s": out[bound],
            "l2_tb_s_at_bound": round(out[bound] * l2_bytes_per_mac(tile), 3)}


def analyse(kernel: str, multiplier: str, tile, arch: str, shape: str | None = None) -> tuple[dict, str]:
    """(report entry, SASS listing) of one kernel / multiplier / tile on one architecture, compiled as a launch of
    ``shape`` (default: the kernel's first benchmark shape) would compile it."""
    shape = shape or shapes_of(kernel)[0]
    fn, grid, args, meta = recorded_launch(kernel, shape, multiplier, tile)
    compiled, log = compile_launch(fn, args, meta, arch)
    sass = _disassemble(compiled.asm["cubin"])
    stats = k_loop_stats(sass, tile.tm * tile.tn)
    entry = {"kernel": kernel, "multiplier": multiplier, "arch": arch, "shape": shape,
             "tile": {"tm": tile.tm, "tn": tile.tn, "num_warps": tile.num_warps,
                      "block_m": tile.block_m, "block_n": tile.block_n},
             "grid": list(grid), **ptxas_resources(log), **stats, "l2_bytes_per_mac": round(l2_bytes_per_mac(tile), 3),
             **ceilings(stats["opcodes"], stats["macs"], tile, CHIPS[arch])}
    return entry, sass


def tiles_of(kernel: str):
    """The tiles the host may pick for a kernel of the report (its launcher's tile set)."""
    from ..kernels.triton import CONV_TILES, TILES

    return CONV_TILES if kernel in ("conv2d", "conv2d_grad_input", "conv2d_int") else TILES


def _gemm_mnk(shape: Shape, kernel: str) -> tuple[int, int, int, int]:
    """(programs along the grid's third axis, M along the lanes, N, K a program sums) of a shape as the kernel's
    launcher sees it; the weight gradient's batch is modelled split one image a program."""
    if shape.kind == "gemm":
        g, m, n, k = shape.dims
        return g, max(m, n), min(m, n), k  # the launcher puts the lanes along the longer side
    b, c, h, w = shape.dims
    o, _, kh, kw = shape.weight
    ho, wo = _conv_out(shape)
    if kernel == "conv2d_grad_input":
        return 1, b * h * w, c, o * kh * kw
    if kernel == "conv2d_grad_weight":
        return b, o, c * kh * kw, ho * wo
    return 1, b * ho * wo, o, c * kh * kw


def host_tile(kernel: str, shape: str):
    """The tile the kernel's launcher picks for a benchmark shape."""
    from ..kernels.triton import pick_tile

    _, m, n, _ = _gemm_mnk(SHAPES[shape], kernel)
    return pick_tile(m, n, tiles_of(kernel))


def batched_builds(arch: str) -> list[dict]:
    """Report entries of the batched GEMM builds (``BATCHED_BUILDS``): each multiplier, the host's tile."""
    return [analyse(kernel, mult, host_tile(kernel, shape), arch, shape)[0]
            for kernel, shape in BATCHED_BUILDS.items() for mult in multipliers_of(kernel)]


def tile_choice(kernel: str, multiplier: str, entries: list[dict], chip: Chip) -> list[dict]:
    """Per benchmark shape: each tile's modelled time and the host's pick.

    Modelled time = padded MACs (whole tiles) / (the tile's bound x fill), fill = the share of the chip's 4 x SMs warp
    schedulers the grid can give a warp (a scheduler without one issues nothing).  The tile's bound is its
    build's for the kernel's first benchmark shape.
    """
    rows = []
    for name in shapes_of(kernel):
        g, m, n, k = _gemm_mnk(SHAPES[name], kernel)
        modelled = {}
        for e in entries:
            t = e["tile"]
            programs = g * -(-m // t["block_m"]) * -(-n // t["block_n"])
            fill = min(1.0, programs * t["num_warps"] / (4 * chip.sms))
            padded = programs * t["block_m"] * t["block_n"] * k
            modelled[f"{t['tm']}x{t['tn']}/{t['num_warps']}w"] = round(
                padded / (e["ceiling_tmac_per_s"] * 1e12 * fill) * 1e6, 2)
        host = host_tile(kernel, name)
        rows.append({"shape": name, "m": m, "n": n, "k": k, "groups": g, "modelled_us": modelled,
                     "host_pick": f"{host.tm}x{host.tn}/{host.num_warps}w",
                     "model_best": min(modelled, key=modelled.get)})
    return rows


def _report(arch: str) -> tuple[dict, str]:
    import triton

    chip = CHIPS[arch]
    entries, choices, default_sass = [], [], ""
    for kernel in KERNELS:
        for mult in multipliers_of(kernel):
            mine = []
            for tile in tiles_of(kernel):
                entry, sass = analyse(kernel, mult, tile, arch)
                mine.append(entry)
                if kernel == "gemm" and mult == "mbm" and tile == tiles_of(kernel)[0]:
                    default_sass = sass
            entries += mine
            choices.append({"kernel": kernel, "multiplier": mult, "shapes": tile_choice(kernel, mult, mine, chip)})
    entries += batched_builds(arch)
    report = {
        "arch": arch, "triton": triton.__version__,
        "chip": {**chip._asdict(), "issue_lanes_per_sm_clock": ISSUE_LANES, "alu_lanes": ALU_LANES,
                 "imad_lanes": IMAD_LANES, "xu_lanes": XU_LANES},
        "ceiling": "per pipe: SMs x lanes x clock / the pipe's K-loop operations per MAC; L2: bandwidth / bytes "
                   "per MAC; the least is the bound (ceilings read from the code, not timings)",
        "compiled_as": "a launch of each kernel's first benchmark shape (Triton's binder: 1 -> constant, "
                       "multiples of 16 -> alignment hints), and of the batched GEMM shapes at the host's tile "
                       "(the entries whose shape is another)",
        "shapes": {k: v._asdict() for k, v in SHAPES.items()},
        "kernels": entries, "tile_choice": choices,
    }
    return report, default_sass


def write_reports(out_dir: str | Path = "results/bench", archs=("sm_75", "sm_80", "sm_90")) -> list[Path]:
    """Write ``sass-<arch>.json`` per architecture and the default MBM GEMM's listing; print a table."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for arch in archs:
        report, sass = _report(arch)
        paths.append(out / f"sass-{arch}.json")
        paths[-1].write_text(json.dumps(report, indent=1) + "\n")
        paths.append(out / f"sass-{arch}-gemm-mbm.sass")
        paths[-1].write_text(sass)
        print(format_table(report), flush=True)
    return paths


def format_table(report: dict) -> str:
    """One line per kernel / shape compiled for / multiplier / tile: instructions per MAC, registers, spills,
    ceilings and the bound."""
    chip = report["chip"]
    lines = [f"{report['arch']} ({chip['name']}, {chip['sms']} SMs, {chip['ghz']} GHz)",
             f"{'kernel':19} {'shape':17} {'mult':13} {'tile':7} {'instr/MAC':>9} {'regs':>4} {'spill B':>7} "
             f"{'issue':>6} {'fma':>6} {'alu':>6} {'xu':>6} {'L2':>6} {'B/MAC':>5}  bound"]

    def cell(x):
        return f"{x:>6.2f}" if x else f"{'-':>6}"

    for e in report["kernels"]:
        t, c = e["tile"], e["ceilings_tmac_per_s"]
        lines.append(f"{e['kernel']:19} {e['shape']:17} {e['multiplier']:13} {t['tm']}x{t['tn']}/{t['num_warps']}w "
                     f"{e['instructions_per_mac']:>9.2f} {e['registers']:>4} {e['spill_bytes']:>7} "
                     + " ".join(cell(c[k]) for k in ("issue", "fma", "alu", "xu", "l2"))
                     + f" {e['l2_bytes_per_mac']:>5.2f}  {e['bound']}")
    return "\n".join(lines)
