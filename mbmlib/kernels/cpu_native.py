"""Loader for the register-blocked C++ approximate GEMM (``native/approx_gemm.cpp``) on the CPU.

The source is compiled once per instruction set (AVX-512, AVX2 or portable C++, picked at run time
from ``torch.backends.cpu.get_cpu_capability()``) with the system C++ compiler into a cache folder
(env ``MBMLIB_CACHE``, else ``$XDG_CACHE_HOME/mbmlib``, i.e. ``~/.cache/mbmlib``: the data loader's
cache too), then loaded with :mod:`ctypes`.  No torch headers are needed, so a build takes about a second.  ``-ffp-contract=off`` keeps every product
rounded exactly as :func:`mbmlib.multipliers.products` rounds it.  Tiles run on
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

import torch
import torch.nn.functional as F

from ..multipliers import Multiplier, split_operand
from .lowering import output_size, weight_rows

__all__ = ["library", "isa", "gemm", "bmm_nt_split", "conv2d", "BuildError"]

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


def _cache_dir() -> Path:
    if os.environ.get("MBMLIB_CACHE"):
        return Path(os.environ["MBMLIB_CACHE"]).expanduser()
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache").expanduser() / "mbmlib"


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
    target = _cache_dir() / f"approx_gemm-{key}.so"
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
    lib.mbm_gemm_tiles.argtypes = [ptr] * 4 + [i64] + [ptr] * 3 + [i64] * 5 + [ctypes.c_int, ctypes.c_int32,
                                                                                ctypes.c_int32, ctypes.c_int]
    lib.mbm_gemm_tiles.restype = None
    lib.mbm_tiles.argtypes = [i64, i64]
    lib.mbm_tiles.restype = i64
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


def _run_tiles(lib, args: tuple, tiles: int, macs: int) -> None:
    """Run tiles [0, tiles) of ``args`` (operands, M, Np, K | mbm, c0, c1) on OpenMP or Python threads."""
    workers = min(tiles, torch.get_num_threads()) if macs >= _MIN_PARALLEL_MACS else 1
    if workers <= 1 or lib.mbm_has_openmp():
        lib.mbm_gemm_tiles(*args[:11], 0, tiles, *args[11:], workers)
        return
    bounds = [tiles * i // workers for i in range(workers + 1)]
    jobs = [_pool(workers).submit(lib.mbm_gemm_tiles, *args[:11], lo, hi, *args[11:], 1)
            for lo, hi in zip(bounds, bounds[1:])]
    for job in jobs:
        job.result()


def gemm(a_fields: tuple[torch.Tensor, torch.Tensor], a_row: torch.Tensor, a_col: torch.Tensor, a_group: int,
         sb: torch.Tensor, mb: torch.Tensor, multiplier: Multiplier, capability: str | None = None) -> torch.Tensor:
    """Approximate GEMM with a gathered A: (G, M, N), out[g, m, n] = sum_k approx(A[g, m, k], b[g, n, k]).

    A[g, m, k] is element ``g * a_group + a_row[m] + a_col[k]`` of both flat fields ``a_fields``
    (scale float32, mantissa int32); ``a_row``, ``a_col`` are int64.  b fields are (G, N, K).
    Each product equals ``products(..., flush=False)`` bit for bit; sums are float32 in k order.
    """
    lib = library(capability)
    nr = lib.mbm_tile_cols()
    G, N, K = sb.shape
    M, Np = a_row.numel(), -(-N // nr) * nr
    b_s, b_m = _panels(sb, Np, nr), _panels(mb, Np, nr)  # (G, Np/nr, K, nr)
    out = torch.empty(G, M, Np, dtype=torch.float32)
    keep = (*a_fields, a_row, a_col, b_s, b_m, out)  # all contiguous; alive until the kernel returns
    c0, c1 = multiplier.corrections
    ptrs = [t.data_ptr() for t in keep]
    args = (*ptrs[:4], a_group, *ptrs[4:], M, Np, K, int(multiplier.kind == "mbm"), c0, c1)
    _run_tiles(lib, args, G * lib.mbm_tiles(M, Np), G * M * N * K)
    return out if Np == N else out[:, :, :N].contiguous()


def bmm_nt_split(sa: torch.Tensor, ma: torch.Tensor, sb: torch.Tensor, mb: torch.Tensor,
                 multiplier: Multiplier, capability: str | None = None) -> torch.Tensor:
    """Approximate ``a @ b.T`` from split CPU operands: (G, M, K), (G, N, K) -> (G, M, N) float32."""
    G, M, K = sa.shape
    a_row = torch.arange(M, dtype=torch.int64) * K
    a_col = torch.arange(K, dtype=torch.int64)
    return gemm((sa.contiguous(), ma.contiguous()), a_row, a_col, M * K, sb, mb, multiplier, capability)


def conv2d(x: torch.Tensor, w: torch.Tensor, stride, padding, dilation, groups: int, multiplier: Multiplier,
           capability: str | None = None) -> torch.Tensor:
    """Approximate convolution as an implicit GEMM: patches are read from the padded image, never copied.

    (B, C, H, W), (O, C/groups, kh, kw) -> (B, O, Ho, Wo); same products and k order as im2col + GEMM.
    """
    B, C, H, W = x.shape
    O, Cg, kh, kw = w.shape
    Ho, Wo = output_size((H, W), (kh, kw), stride, padding, dilation)
    pads = (0, 0, padding[1], padding[1], padding[0], padding[0])
    fields = split_operand(F.pad(x.permute(0, 2, 3, 1), pads), multiplier)  # (B, Hp, Wp, C); padding: scale 0
    sB, sH, sW, _ = fields[0].stride()
    a_row = (torch.arange(B)[:, None, None] * sB + torch.arange(Ho)[:, None] * (stride[0] * sH)
             + torch.arange(Wo) * (stride[1] * sW)).reshape(-1)  # (B*Ho*Wo,) patch corners
    a_col = (torch.arange(kh)[:, None, None] * (dilation[0] * sH) + torch.arange(kw)[:, None] * (dilation[1] * sW)
             + torch.arange(Cg)).reshape(-1)  # (kh*kw*Cg,) in weight_rows order
    sw, mw = split_operand(weight_rows(w, groups), multiplier)  # (G, O/G, K)
    res = gemm(fields, a_row, a_col, Cg, sw, mw, multiplier, capability)  # (G, B*Ho*Wo, O/G)
    return res.view(groups, B, Ho * Wo, O // groups).permute(1, 0, 3, 2).reshape(B, O, Ho, Wo)
