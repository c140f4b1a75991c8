"""Approximate GEMM / convolution kernels, one backend a file, chosen once.

``backend`` is ``"auto"``, ``"reference"``, ``"compiled"`` or ``"triton"``;
``"auto"`` (or the env var ``MBMLIB_BACKEND``) picks Triton on CUDA, the
torch.compile kernels on the CPU.  Every backend provides
``bmm_nt(a (G, M, K), b (G, N, K), multiplier) -> (G, M, N)``; a backend may
also provide an implicit-GEMM ``conv2d``, otherwise convolutions go through
im2col (``F.unfold``) and ``bmm_nt``.
"""
from __future__ import annotations

import functools
import importlib
import os
from types import ModuleType

import torch
import torch.nn.functional as F

from ..multipliers import Multiplier, split_operand

BACKENDS = ("reference", "compiled", "triton")
ENV_VAR = "MBMLIB_BACKEND"


def _check_name(backend: str) -> str:
    if backend not in BACKENDS + ("auto",):
        raise ValueError(f"unknown backend {backend!r}; valid backends are 'auto', " + ", ".join(
            repr(b) for b in BACKENDS) + f" (argument or env {ENV_VAR})")
    return backend


@functools.lru_cache(maxsize=None)
def load(backend: str) -> ModuleType:
    """Import a backend module by name (ImportError if e.g. Triton is missing)."""
    return importlib.import_module(f".{_check_name(backend)}", __name__)


def default_backend(device: torch.device) -> str:
    """The backend ``"auto"`` means on ``device``: env override, else triton on CUDA, compiled on CPU."""
    env = os.environ.get(ENV_VAR, "auto").strip().lower() or "auto"
    if _check_name(env) != "auto":
        return env
    if device.type == "cuda":
        try:
            load("triton")
            return "triton"
        except ImportError:
            return "compiled"
    return "compiled"


def resolve(backend: str | None, device: torch.device) -> str:
    """Resolve ``None``/``"auto"`` to a concrete backend name for ``device``."""
    if backend is None or _check_name(backend) == "auto":
        return default_backend(device)
    if backend == "triton" and device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        raise ValueError("the 'triton' backend needs a CUDA device (or TRITON_INTERPRET=1 for CPU testing); "
                         "use backend='compiled' or 'reference' on the CPU")
    return backend


def bmm_nt(a: torch.Tensor, b: torch.Tensor, multiplier: Multiplier, backend: str) -> torch.Tensor:
    """Batched approximate ``a @ b.T`` on a concrete backend: (G, M, K), (G, N, K) -> (G, M, N)."""
    return load(backend).bmm_nt(a, b, multiplier)


def output_size(size: tuple[int, int], kernel_size, stride, padding, dilation) -> tuple[int, int]:
    """Spatial output size of a convolution, as F.conv2d computes it."""
    return tuple((n + 2 * p - d * (k - 1) - 1) // s + 1
                 for n, k, s, p, d in zip(size, kernel_size, stride, padding, dilation))


def conv2d(x: torch.Tensor, w: torch.Tensor, stride: tuple[int, int], padding: tuple[int, int],
           dilation: tuple[int, int], groups: int, multiplier: Multiplier, backend: str) -> torch.Tensor:
    """Approximate convolution with explicit symmetric zero padding: (B, C, H, W) -> (B, O, Ho, Wo)."""
    module = load(backend)
    if hasattr(module, "conv2d") and not multiplier.is_exact:
        return module.conv2d(x, w, stride, padding, dilation, groups, multiplier)
    B = x.shape[0]
    O, Cg, kh, kw = w.shape
    Ho, Wo = output_size(x.shape[2:], (kh, kw), stride, padding, dilation)
    wk = w.view(groups, O // groups, Cg, kh, kw).permute(0, 1, 3, 4, 2).reshape(groups, O // groups, -1)  # im2col order
    patches = functools.partial(im2col, kernel_size=(kh, kw), stride=stride, padding=padding, dilation=dilation,
                                groups=groups)  # (B, C, H, W) -> (G, B*L, kh*kw*Cg)
    if multiplier.is_exact:
        out = module.bmm_nt(patches(x), wk, multiplier)
    else:
        sx, mx = split_operand(x, multiplier)
        out = module.bmm_nt_split(patches(sx), patches(mx), *split_operand(wk, multiplier), multiplier)
    # out: (G, B*L, O/G)
    return out.view(groups, B, Ho * Wo, O // groups).permute(1, 0, 3, 2).reshape(B, O, Ho, Wo).contiguous()


def im2col(x: torch.Tensor, kernel_size, stride, padding, dilation, groups: int) -> torch.Tensor:
    """Patches of ``x`` as GEMM rows: (B, C, H, W) -> (G, B*Ho*Wo, kh*kw*C/G), K contiguous.

    K is ordered (kh, kw, channel): built from a channels-last copy with one
    strided view and one copy, several times faster than ``F.unfold`` plus a
    transpose.  Weights must be flattened in the same order.
    """
    B, C, H, W = x.shape
    kh, kw = kernel_size
    Ho, Wo = output_size((H, W), kernel_size, stride, padding, dilation)
    xp = F.pad(x, (padding[1], padding[1], padding[0], padding[0])).permute(0, 2, 3, 1).contiguous()  # (B, Hp, Wp, C)
    sB, sH, sW, _ = xp.stride()
    Cg = C // groups
    view = xp.as_strided((groups, B, Ho, Wo, kh, kw, Cg),
                         (Cg, sB, stride[0] * sH, stride[1] * sW, dilation[0] * sH, dilation[1] * sW, 1))
    return view.reshape(groups, B * Ho * Wo, kh * kw * Cg)


def col2im(cols: torch.Tensor, input_shape, kernel_size, stride, padding, dilation, groups: int) -> torch.Tensor:
    """Adjoint of :func:`im2col`: sum patch gradients back onto the image, (G, B*L, K) -> (B, C, H, W)."""
    B, C, H, W = input_shape
    kh, kw = kernel_size
    Ho, Wo = output_size((H, W), kernel_size, stride, padding, dilation)
    Cg = C // groups
    patches = cols.view(groups, B, Ho, Wo, kh, kw, Cg).permute(1, 2, 3, 4, 5, 0, 6)  # (B, Ho, Wo, kh, kw, G, Cg)
    patches = patches.reshape(B, Ho, Wo, kh, kw, C)
    grad = cols.new_zeros(B, H + 2 * padding[0], W + 2 * padding[1], C)  # padded, channels last
    for i in range(kh):
        for j in range(kw):
            h0, w0 = i * dilation[0], j * dilation[1]
            grad[:, h0:h0 + stride[0] * (Ho - 1) + 1:stride[0], w0:w0 + stride[1] * (Wo - 1) + 1:stride[1]] += \
                patches[:, :, :, i, j]
    grad = grad[:, padding[0]:padding[0] + H, padding[1]:padding[1] + W]
    return grad.permute(0, 3, 1, 2).contiguous()
