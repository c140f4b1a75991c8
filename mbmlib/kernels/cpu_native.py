"""Loader for the register-blocked C++ approximate GEMM (``native/approx_gemm.cpp``) on the CPU, its operand
packing and output layouts, and the float MACs' entry points (the integer and table MACs: :mod:`.cpu_native_int`).

The source is compiled once per instruction set (AVX-512, AVX2 or portable C++, picked at run time
from ``torch.backends.cpu.get_cpu_capability()``) with the system C++ compiler into a cache folder
(env ``MBMLIB_CACHE``, else ``$XDG_CACHE_HOME/mbmlib``, i.e. ``~/.cache/mbmlib``: the data loader's
cache too), then loaded with :mod:`ctypes`.  No torch headers are needed, so a build takes about a second.  ``-ffp-contract=off`` keeps every product
rounded exactly as :func:`mbmlib.multipliers.floating.products` rounds it.  Tiles run on
``torch.get_num_threads()`` threads: OpenMP ones where the compiler has ``-fopenmp`` (the library
then binds to the libgomp torch has loaded, so it reuses torch's threads instead of fighting their
spin-waits for the cores), else Python threads (ctypes releases the GIL).
"""
from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import subprocess
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Callable, NamedTuple, Optional

import torch
import torch.nn.functional as F

from ..cache import cache_dir
from ..multipliers.designs import lmul_constants
from ..multipliers.specs import Multiplier
from .lowering import output_size, weight_rows
from .prepared import prepared

__all__ = ["library", "isa", "gemm", "mitchell_words", "products_stay_normal", "bmm_nt", "bmm_nt_split", "conv2d",
           "BuildError", "GemmArgs", "MACS", "specialised_mac", "PackedB", "split", "MacConstants", "OutLayout"]

SOURCE = Path(__file__).with_name("native") / "approx_gemm.cpp"
ISA_FLAGS = {
    "AVX512": ["-mavx512f", "-mavx512dq", "-mavx512bw", "-mavx512vl", "-mavx2", "-mfma"],
    "AVX2": ["-mavx2", "-mfma"],
}
BASE_FLAGS = ["-O3", "-std=c++17", "-shared", "-fPIC", "-ffp-contract=off", "-fno-math-errno"]
OPENMP_FLAGS = ["-fopenmp"]  # dropped, and threads come from Python, where the compiler lacks OpenMP
_ISA_NAMES = ("portable", "AVX2", "AVX-512")
_MIN_PARALLEL_MACS = 1 << 18  # below this, threads cost more than they save


class BuildError(RuntimeError):
    """The C++ kernel could not be compiled or loaded (no compiler, unsupported flags, ...)."""


class GemmArgs(ctypes.Structure):
    """One GEMM call of the C++ kernel: the mirror of ``struct GemmArgs`` in approx_gemm.cpp (same order).

    One struct instead of a hand-written argument list: the two sides name every field once, and
    the loader checks that their sizes agree.  A: element (g, m, k) of field f at ``a[f] + g * a_group
    + a_row[m] + a_col[k]``; B: fields in (G, Np / NR, K, NR) K-major panels; ``out``: (G, M, Np).
    """

    _fields_ = [("a", ctypes.c_void_p * 3), ("a_row", ctypes.c_void_p), ("a_col", ctypes.c_void_p),
                ("a_group", ctypes.c_int64), ("b", ctypes.c_void_p * 3), ("out", ctypes.c_void_p),
                ("M", ctypes.c_int64), ("Np", ctypes.c_int64), ("K", ctypes.c_int64), ("mac", ctypes.c_int32),
                ("c0", ctypes.c_int32), ("c1", ctypes.c_int32), ("table", ctypes.c_void_p), ("bits", ctypes.c_int32),
                ("kblock", ctypes.c_int64), ("out_scale", ctypes.c_void_p), ("out_row", ctypes.c_void_p),
                ("out_col", ctypes.c_int64), ("out_group", ctypes.c_int64), ("N", ctypes.c_int64)]


# The kernel's MACs (enum Mac in approx_gemm.cpp), by (operand kind, the multiplier's mac); the tests compare
# this mirror, and cpu_native_int's, with what the library reports (mbm_constants).
MACS = {("float", "mitchell"): 0, ("float", "mbm"): 1, ("float", "words"): 2,
        ("int", "mbm"): 4, ("int", "table"): 5, ("float", "lmul"): 6, ("int", "drum"): 7, ("int", "words"): 8,
        ("int", "table16"): 9, ("int", "mbm_fold"): 10,
        ("int", "table16_madd"): 11}


def _compile(compiler: str, flags: list[str], target: Path) -> None:
    """Compile SOURCE to ``target`` atomically (a temporary file renamed), so parallel builds are safe."""
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=target.parent)
    os.close(fd)
    try:
        done = subprocess.run([compiler, *flags, str(SOURCE), "-o", tmp], capture_output=True, text=True)
        if done.returncode != 0:
            raise BuildError(f"{compiler} failed to build {SOURCE.name}: {done.stderr.strip()[:500]}")
        os.replace(tmp, target)
    except OSError as err:
        raise BuildError(f"cannot run the C++ compiler {compiler!r}: {err}") from err
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def library(capability: str | None = None) -> ctypes.CDLL:
    """The kernel built for ``capability`` (default: this CPU's, as torch detects it), built on first use.

    ``capability`` is a value of ``torch.backends.cpu.get_cpu_capability()``: 'AVX512' and 'AVX2'
    get intrinsics, anything else the portable C++ loop.  BuildError if it cannot be built.
    """
    return _library(capability or torch.backends.cpu.get_cpu_capability())


def _built(compiler: str, flags: list[str]) -> Path:
    """The cached library for this compiler, flags and source, compiled if missing."""
    key = hashlib.sha256("\0".join([compiler, *flags, SOURCE.read_text()]).encode()).hexdigest()[:16]
    target = cache_dir() / f"approx_gemm-{key}.so"
    if not target.exists():
        _compile(compiler, flags, target)
    return target


@functools.lru_cache(maxsize=None)
def _library(capability: str) -> ctypes.CDLL:
    compiler = os.environ.get("CXX", "c++")
    flags = BASE_FLAGS + ISA_FLAGS.get(capability, [])
    try:
        target = _built(compiler, flags + OPENMP_FLAGS)
    except BuildError:
        target = _built(compiler, flags)
    try:
        lib = ctypes.CDLL(str(target))
    except OSError as err:
        raise BuildError(f"cannot load {target}: {err}") from err
    i64, ptr = ctypes.c_int64, ctypes.c_void_p
    lib.mbm_args_size.restype = i64
    if lib.mbm_args_size() != ctypes.sizeof(GemmArgs):
        raise BuildError(f"{target}: its GemmArgs has {lib.mbm_args_size()} bytes, the loader's mirror "
                         f"{ctypes.sizeof(GemmArgs)}; delete the cached library to rebuild it")
    lib.mbm_gemm.argtypes = [ctypes.POINTER(GemmArgs), i64, i64, ctypes.c_int]
    lib.mbm_gemm.restype = ctypes.c_int
    lib.mbm_has_words.restype = ctypes.c_int
    lib.mbm_has_table16.restype = ctypes.c_int
    lib.mbm_mitchell_words.argtypes = [ptr] * 3 + [i64, ctypes.c_int32, ptr, ctypes.c_int]
    lib.mbm_mitchell_words.restype = None
    lib.mbm_tiles.argtypes = [ctypes.c_int, i64, i64]
    lib.mbm_tiles.restype = i64
    lib.mbm_tile_cols.argtypes = [ctypes.c_int]
    lib.mbm_tile_cols.restype = i64
    i32 = ctypes.c_int32
    lib.mbm_quantise.argtypes = [ptr, i64, i64, ptr] + [i32] * 5 + [ptr] * 4 + [ctypes.c_int]
    lib.mbm_quantise.restype = ctypes.c_int
    lib.mbm_split.argtypes = [ptr, i64, i32, ptr, ptr, ctypes.c_int]
    lib.mbm_split.restype = None
    lib.mbm_constants.restype = ctypes.c_char_p
    return lib


def isa(capability: str | None = None) -> str:
    """The instruction set the kernel for ``capability`` uses: 'AVX-512', 'AVX2' or 'portable'."""
    return _ISA_NAMES[library(capability).mbm_isa()]


@functools.lru_cache(maxsize=None)
def _pool(workers: int) -> ThreadPoolExecutor:
    return ThreadPoolExecutor(max_workers=workers, thread_name_prefix="mbmlib-gemm")


def _padded_rows(x: torch.Tensor, rows: int) -> torch.Tensor:
    """(G, R, K) -> (G, rows, K) contiguous, zero rows appended."""
    if x.shape[1] == rows:
        return x.contiguous()
    out = x.new_zeros(x.shape[0], rows, x.shape[2])
    out[:, :x.shape[1]] = x
    return out


def _panels(x: torch.Tensor, cols: int, nr: int) -> torch.Tensor:
    """B field (G, N, K) -> K-major column panels (G, cols/nr, K, nr), zero columns appended."""
    G, _, K = x.shape
    return _padded_rows(x, cols).view(G, cols // nr, nr, K).transpose(2, 3).contiguous()


class PackedB(NamedTuple):
    """B of a GEMM as the kernel reads it, prepared once per weight version (:mod:`.prepared`): ``panels``, its
    fields in (G, Np / NR, K, NR) K-major column panels (zero columns appended) for the MAC ``mac``; ``N``, its
    rows; ``words``, float Mitchell's bit-domain words in panels and their exponent range (else None)."""

    panels: tuple
    N: int
    mac: int
    words: Optional[tuple] = None


def _pack(fields, nr: int) -> tuple:
    """(G, N, K) fields -> K-major panels of ``nr`` columns, N rounded up to a multiple of ``nr``."""
    cols = -(-fields[0].shape[1] // nr) * nr
    return tuple(_panels(f, cols, nr) for f in fields)


def _prepared_b(w: torch.Tensor, groups: Optional[int], pack: Callable, multiplier: Multiplier,
                capability: str | None) -> PackedB:
    """``pack(rows, multiplier, lib)`` of the weight ``w``, computed once per version of it (:mod:`.prepared`):
    ``rows`` is ``w`` itself, a GEMM's (G, N, K) B (``groups`` None), or a convolution weight's rows per group."""
    capability = capability or torch.backends.cpu.get_cpu_capability()
    layout = "gemm" if groups is None else ("conv", groups)
    return prepared((w,), (layout, multiplier, capability),
                    lambda: pack(_b_rows(w, groups), multiplier, library(capability)))


def _b_rows(w: torch.Tensor, groups: Optional[int]) -> torch.Tensor:
    """A weight as the GEMM's (G, N, K) B: a GEMM's B as it is (``groups`` None), a convolution weight's rows per
    group (:func:`weight_rows`)."""
    return w if groups is None else weight_rows(w, groups)


class OutLayout(NamedTuple):
    """Where a GEMM's output (g, m, n) goes when not (G, M, Np) row-major: element ``g * group + row[m] + n * col``
    of a tensor of ``shape`` (padded columns are not stored), e.g. a convolution's NCHW (:func:`_nchw`)."""

    shape: tuple
    row: torch.Tensor
    col: int
    group: int


def _nchw(B: int, O: int, groups: int, Ho: int, Wo: int) -> OutLayout:
    """The (B, O, Ho, Wo) output of a convolution's GEMM, m = (b, position), n = channel within the group: written
    in place, contiguous as F.conv2d's output is (a layer's ``.view(N, -1)``, fake strides under torch.compile)."""
    hw = Ho * Wo
    row = (torch.arange(B)[:, None] * (O * hw) + torch.arange(hw)).reshape(-1)
    return OutLayout((B, O, Ho, Wo), row, hw, O // groups * hw)


class MacConstants(NamedTuple):
    """A MAC's constants in GemmArgs: ``c0``, ``c1`` (MBM's corrections, L-Mul's bias, DRUM's split,
    Table16MaddMac's first negated row) and a table MAC's entries and index width."""

    c0: int = 0
    c1: int = 0
    table: Optional[torch.Tensor] = None
    bits: int = 0


def _run(a_fields, a_row: torch.Tensor, a_col: torch.Tensor, a_group: int, panels: tuple, N: int, dtype: torch.dtype,
         mac: int, consts: MacConstants, capability: str | None, kblock: int = 0,
         out_scale: Optional[torch.Tensor] = None, layout: Optional[OutLayout] = None) -> torch.Tensor:
    """Run the GEMM with the MAC ``mac`` into a new ``dtype`` tensor: A's fields gathered (see :class:`GemmArgs`),
    B's ``panels`` packed (:class:`PackedB`); tiles on OpenMP threads, or Python ones (ctypes releases the GIL)
    where the build has no OpenMP.  ``out_scale``: an integer MAC's (G, Np) float64 column scales (then float32
    out).  Returns (G, M, N), or the tensor ``layout`` describes."""
    lib = library(capability)
    G, Np, K, M = panels[0].shape[0], panels[0].shape[1] * panels[0].shape[3], panels[0].shape[2], a_row.numel()
    out = torch.empty(layout.shape if layout else (G, M, Np), dtype=dtype)
    c0, c1, table, bits = consts
    out_row, out_col, out_group = (layout.row.data_ptr(), layout.col, layout.group) if layout else (None, 0, 0)
    args = GemmArgs((ctypes.c_void_p * 3)(*(f.data_ptr() for f in a_fields)), a_row.data_ptr(), a_col.data_ptr(),
                    a_group, (ctypes.c_void_p * 3)(*(f.data_ptr() for f in panels)), out.data_ptr(), M, Np, K, mac,
                    c0, c1, None if table is None else table.data_ptr(), bits, kblock,
                    None if out_scale is None else out_scale.data_ptr(), out_row, out_col, out_group, N)
    tiles, macs = G * lib.mbm_tiles(mac, M, Np), G * M * N * K
    workers = min(tiles, torch.get_num_threads()) if macs >= _MIN_PARALLEL_MACS else 1
    if workers <= 1 or lib.mbm_has_openmp():
        codes = [lib.mbm_gemm(ctypes.byref(args), 0, tiles, workers)]
    else:
        bounds = [tiles * i // workers for i in range(workers + 1)]
        jobs = [_pool(workers).submit(lib.mbm_gemm, ctypes.byref(args), lo, hi, 1) for lo, hi in zip(bounds, bounds[1:])]
        codes = [job.result() for job in jobs]
    if any(codes):
        raise ValueError(f"the native kernel has no MAC {mac} in its {isa(capability)} build")
    return out if layout or Np == N else out[:, :, :N].contiguous()


def _float_constants(multiplier: Multiplier) -> MacConstants:
    """The float MACs' constants: MBM's corrections, L-Mul's ``1 + 2**-l`` (23-bit fixed point); 0 for Mitchell."""
    if multiplier.mac == "lmul":
        return MacConstants(lmul_constants(multiplier.param)[1])
    return MacConstants(*multiplier.corrections)


def float_b(sb: torch.Tensor, mb: torch.Tensor, multiplier: Multiplier, lib) -> PackedB:
    """Split (G, N, K) B fields packed for :func:`gemm`: L-Mul's cut of the mantissas (its top n bits) and,
    where the build has the bit-domain Mitchell kernel, Mitchell's words, all in K-major panels."""
    if multiplier.mac == "lmul":
        mb = mb & lmul_constants(multiplier.param)[0]
    mac = MACS["float", specialised_mac(multiplier)]
    panels = _pack((sb, mb), lib.mbm_tile_cols(mac))
    words = None
    if multiplier.mac == "mitchell" and lib.mbm_has_words():  # elementwise: the panels' words are packed words
        b_words, *range_b = mitchell_words(*panels, 0, lib)
        words = ((b_words,), tuple(range_b))
    return PackedB(panels, sb.shape[1], mac, words)


def _split_float_b(b: torch.Tensor, multiplier: Multiplier, lib) -> PackedB:
    return float_b(*split(b, multiplier, lib=lib), multiplier, lib)


def gemm(a_fields: tuple[torch.Tensor, torch.Tensor], a_row: torch.Tensor, a_col: torch.Tensor, a_group: int,
         b: PackedB, multiplier: Multiplier, capability: str | None = None,
         layout: Optional[OutLayout] = None) -> torch.Tensor:
    """Approximate GEMM with a gathered A: (G, M, N), out[g, m, n] = sum_k approx(A[g, m, k], b[g, n, k]), or stored
    as ``layout`` says.

    A[g, m, k] is element ``g * a_group + a_row[m] + a_col[k]`` of both flat fields ``a_fields``
    (scale float32, mantissa int32); ``a_row``, ``a_col`` are int64.  ``b`` is (G, N, K) B packed by
    :func:`float_b`.  Each product equals ``products(..., flush=False)`` bit for bit; sums are float32 in k order.
    """
    lib = library(capability)
    mac, panels = b.mac, b.panels
    if multiplier.mac == "lmul":  # L-Mul's own truncation, once per operand: the top n mantissa bits
        a_fields = (a_fields[0], a_fields[1] & lmul_constants(multiplier.param)[0])
    if b.words is not None:
        a_words, *range_a = mitchell_words(*a_fields, _ONE_BITS, lib)
        if products_stay_normal(range_a, b.words[1]):  # Mitchell in the bit domain: words instead of fields
            a_fields, panels, mac = (a_words,), b.words[0], MACS["float", "words"]
    return _run(a_fields, a_row, a_col, a_group, panels, b.N, torch.float32, mac, _float_constants(multiplier),
                capability, layout=layout)


_ONE_BITS = 0x3F800000  # bits of 1.0f


def mitchell_words(scale: torch.Tensor, mant: torch.Tensor, bias: int, lib=None) -> tuple[torch.Tensor, int, int]:
    """Words of the bit-domain Mitchell kernel and the (smallest, largest) biased exponent of the nonzero scales.

    A word is bits(scale) + mant - bias mod 2**32, or -bias for a zero scale (zeros and subnormals);
    the exponents are (256, -1) if every scale is zero, and 255 stands for an infinity or NaN.
    """
    lib = lib or library()
    scale, mant = scale.contiguous(), mant.contiguous()
    words = torch.empty(scale.shape, dtype=torch.int32)
    rng = torch.empty(2, dtype=torch.int32)
    lib.mbm_mitchell_words(scale.data_ptr(), mant.data_ptr(), words.data_ptr(), scale.numel(), bias, rng.data_ptr(),
                           torch.get_num_threads() if scale.numel() >= 1 << 16 else 1)
    return words, int(rng[0]), int(rng[1])


def products_stay_normal(range_a: tuple[int, int], range_b: tuple[int, int]) -> bool:
    """Whether every product of nonzero operands with these biased exponent ranges (and a significand in
    [1, 4)) is a normal float: then Mitchell's products are exactly integer sums of the operands' bits."""
    (lo_a, hi_a), (lo_b, hi_b) = range_a, range_b
    if hi_a < 0 or hi_b < 0:
        return True  # one side is all zeros: every product is a zero, left out
    return lo_a + lo_b - 127 >= 1 and hi_a + hi_b - 127 + 1 <= 254  # no infinity or NaN (255) passes either


def split(x: torch.Tensor, multiplier: Multiplier, capability: str | None = None,
          lib=None) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`mbmlib.multipliers.floating.split_operand` of a float32 CPU tensor in one C++ pass (the same bits):
    the kernels' A operand is split on every call (a weight once per optimiser step), where torch's five
    elementwise passes cost as much as the MACs of a small layer."""
    x = x.contiguous() if x.dtype == torch.float32 else x.float().contiguous()
    scale, mant = torch.empty(x.shape, dtype=torch.float32), torch.empty(x.shape, dtype=torch.int32)
    (lib or library(capability)).mbm_split(x.data_ptr(), x.numel(), multiplier.t, scale.data_ptr(), mant.data_ptr(),
                                           torch.get_num_threads() if x.numel() >= 1 << 16 else 1)
    return scale, mant


def _rows_of(a: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(a_row, a_col) of a contiguous (G, M, K) A: row m at m * K, column k at k."""
    _, M, K = a.shape
    return torch.arange(M, dtype=torch.int64) * K, torch.arange(K, dtype=torch.int64)


def bmm_nt_split(sa: torch.Tensor, ma: torch.Tensor, sb: torch.Tensor, mb: torch.Tensor,
                 multiplier: Multiplier, capability: str | None = None) -> torch.Tensor:
    """Approximate ``a @ b.T`` from split CPU operands: (G, M, K), (G, N, K) -> (G, M, N) float32."""
    b = float_b(sb, mb, multiplier, library(capability))
    return gemm((sa.contiguous(), ma.contiguous()), *_rows_of(sa), sa.shape[1] * sa.shape[2], b, multiplier,
                capability)


def bmm_nt(a: torch.Tensor, b: torch.Tensor, multiplier: Multiplier, capability: str | None = None) -> torch.Tensor:
    """Approximate ``a @ b.T`` of float32 CPU operands (G, M, K), (G, N, K) -> (G, M, N); ``b`` (a layer's
    weight) is split and packed once per version of it."""
    packed = _prepared_b(b, None, _split_float_b, multiplier, capability)
    return gemm(split(a, multiplier, capability), *_rows_of(a), a.shape[1] * a.shape[2], packed, multiplier, capability)


def conv2d(x: torch.Tensor, w: torch.Tensor, stride, padding, dilation, groups: int, multiplier: Multiplier,
           capability: str | None = None) -> torch.Tensor:
    """Approximate convolution as an implicit GEMM: patches are read from the padded image, never copied.

    (B, C, H, W), (O, C/groups, kh, kw) -> (B, O, Ho, Wo); same products and k order as im2col + GEMM.
    """
    x_cl, a_row, a_col, (Ho, Wo) = _implicit_patches(x, w.shape, stride, padding, dilation)
    packed = _prepared_b(w, groups, _split_float_b, multiplier, capability)  # (G, O/G, K) rows, once per version
    return gemm(split(x_cl, multiplier, capability), a_row, a_col, w.shape[1], packed, multiplier, capability,
                _nchw(x.shape[0], w.shape[0], groups, Ho, Wo))


def _implicit_patches(x: torch.Tensor, w_shape, stride, padding, dilation):
    """The padded channels-last image and where each im2col element lies in it, without copying patches.

    Returns ``(x_cl, a_row, a_col, (Ho, Wo))``: ``x_cl`` (B, Hp, Wp, C) contiguous (padding zero), patch
    (b, ho, wo) starting at ``a_row``, its (kh, kw, channel) elements at ``a_col`` (weight_rows order).
    """
    B, C, H, W = x.shape
    O, Cg, kh, kw = w_shape
    Ho, Wo = output_size((H, W), (kh, kw), stride, padding, dilation)
    pads = (0, 0, padding[1], padding[1], padding[0], padding[0])
    x_cl = F.pad(x.permute(0, 2, 3, 1), pads).contiguous()
    sB, sH, sW, _ = x_cl.stride()
    a_row = (torch.arange(B)[:, None, None] * sB + torch.arange(Ho)[:, None] * (stride[0] * sH)
             + torch.arange(Wo) * (stride[1] * sW)).reshape(-1)  # (B*Ho*Wo,) patch corners
    a_col = (torch.arange(kh)[:, None, None] * (dilation[0] * sH) + torch.arange(kw)[:, None] * (dilation[1] * sW)
             + torch.arange(Cg)).reshape(-1)  # (kh*kw*Cg,) in weight_rows order
    return x_cl, a_row, a_col, (Ho, Wo)


def specialised_mac(multiplier: Multiplier) -> str:
    """The multiplier's MAC ("mbm", "mitchell", "lmul", "drum", "table"); ValueError for a design the kernel does
    not specialise."""
    if multiplier.mac is None:
        raise ValueError(f"the native kernel has no multiply-accumulate for {multiplier.name!r}; run it through "
                         "mbmlib.functional (mbmlib.kernels.route picks its generic path)")
    return multiplier.mac
