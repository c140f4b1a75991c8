"""Loader for the register-blocked C++ approximate GEMM (``native/approx_gemm.cpp``) on the CPU.

The source is compiled once per instruction set (AVX-512, AVX2 or portable C++, picked at run time
from ``torch.backends.cpu.get_cpu_capability()``) with the system C++ compiler into a cache folder
(``$MBMLIB_CACHE_DIR``, default ``~/.cache/mbmlib``), then loaded with :mod:`ctypes`.  No torch
headers are needed, so a build takes about a second.  ``-ffp-contract=off`` keeps every product
rounded exactly as :func:`mbmlib.multipliers.products` rounds it.  ctypes releases the GIL, so
tiles run on ``torch.get_num_threads()`` Python threads at once.
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

from ..multipliers import Multiplier

__all__ = ["library", "isa", "bmm_nt_split", "BuildError"]

SOURCE = Path(__file__).with_name("native") / "approx_gemm.cpp"
ISA_FLAGS = {
    "AVX512": ["-mavx512f", "-mavx512dq", "-mavx512bw", "-mavx512vl", "-mavx2", "-mfma"],
    "AVX2": ["-mavx2", "-mfma"],
}
BASE_FLAGS = ["-O3", "-std=c++17", "-shared", "-fPIC", "-ffp-contract=off", "-fno-math-errno"]
_ISA_NAMES = ("portable", "AVX2", "AVX-512")
_MIN_PARALLEL_MACS = 1 << 18  # below this, threads cost more than they save


class BuildError(RuntimeError):
    """The C++ kernel could not be compiled or loaded (no compiler, unsupported flags, ...)."""


def _cache_dir() -> Path:
    return Path(os.environ.get("MBMLIB_CACHE_DIR") or Path.home() / ".cache" / "mbmlib")


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


@functools.lru_cache(maxsize=None)
def _library(capability: str) -> ctypes.CDLL:
    compiler = os.environ.get("CXX", "c++")
    flags = BASE_FLAGS + ISA_FLAGS.get(capability, [])
    key = hashlib.sha256("\0".join([compiler, *flags, SOURCE.read_text()]).encode()).hexdigest()[:16]
    target = _cache_dir() / f"approx_gemm-{key}.so"
    if not target.exists():
        _compile(compiler, flags, target)
    try:
        lib = ctypes.CDLL(str(target))
    except OSError as err:
        raise BuildError(f"cannot load {target}: {err}") from err
    i64, ptr = ctypes.c_int64, ctypes.c_void_p
    lib.mbm_gemm_tiles.argtypes = [ptr] * 5 + [i64] * 5 + [ctypes.c_int, ctypes.c_int32, ctypes.c_int32]
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
    """Run tiles [0, tiles) of ``args`` (pointers, M, Np, K | mbm, c0, c1), one contiguous range a thread."""
    workers = min(tiles, torch.get_num_threads()) if macs >= _MIN_PARALLEL_MACS else 1
    if workers <= 1:
        lib.mbm_gemm_tiles(*args[:8], 0, tiles, *args[8:])
        return
    bounds = [tiles * i // workers for i in range(workers + 1)]
    jobs = [_pool(workers).submit(lib.mbm_gemm_tiles, *args[:8], lo, hi, *args[8:])
            for lo, hi in zip(bounds, bounds[1:])]
    for job in jobs:
        job.result()


def bmm_nt_split(sa: torch.Tensor, ma: torch.Tensor, sb: torch.Tensor, mb: torch.Tensor,
                 multiplier: Multiplier, capability: str | None = None) -> torch.Tensor:
    """Approximate ``a @ b.T`` from split CPU operands: (G, M, K), (G, N, K) -> (G, M, N) float32.

    Each product equals ``products(..., flush=False)`` bit for bit; sums are float32 in k order.
    """
    lib = library(capability)
    nr = lib.mbm_tile_cols()
    G, M, K = sa.shape
    N = sb.shape[1]
    Np = -(-N // nr) * nr
    a_s, a_m = sa.contiguous(), ma.contiguous()  # (G, M, K)
    b_s, b_m = _panels(sb, Np, nr), _panels(mb, Np, nr)  # (G, Np/nr, K, nr)
    out = torch.empty(G, M, Np, dtype=torch.float32)
    c0, c1 = multiplier.corrections
    fields = [t.data_ptr() for t in (a_s, a_m, b_s, b_m, out)]
    args = (*fields, M, Np, K, int(multiplier.kind == "mbm"), c0, c1)
    _run_tiles(lib, args, G * lib.mbm_tiles(M, Np), G * M * N * K)
    return out if Np == N else out[:, :, :N].contiguous()
