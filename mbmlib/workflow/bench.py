"""Throughput measurements, in one run on the current device.

Every timing warms up, synchronises and repeats, and reports the median; every
approximate figure is reported as a ratio to the exact op measured in the same
run, because this kind of machine is shared and noisy.
"""
from __future__ import annotations

import functools
from datetime import datetime, timezone
from pathlib import Path

import torch

from .. import functional as AF
from .. import kernels, quant
from ..multipliers import Multiplier, approx_mul, as_multiplier
from . import runtime
from .store import write_json
from .timing import compare


def _check_counts(**counts) -> None:
    """ValueError unless every count is an integer >= 1 (a zero or negative size measures nothing)."""
    for name, value in counts.items():
        values = value if isinstance(value, (list, tuple)) else [value]
        if not values or any(isinstance(v, bool) or not isinstance(v, int) or v < 1 for v in values):
            raise ValueError(f"{name} must be {'integers' if isinstance(value, (list, tuple)) else 'an integer'} "
                             f">= 1, got {value!r}")


def bench_elementwise(n: int = 10_000_000, device: str = "auto", repeat: int = 7) -> dict:
    """Time ``mitchell_mul`` / ``mbm_mul`` on ``n`` elements against ``torch.mul``, interleaved."""
    _check_counts(elements=n, repeat=repeat)
    dev = runtime.resolve_device(device)
    gen = torch.Generator().manual_seed(0)
    a = torch.randn(n, generator=gen).to(dev)
    b = torch.randn(n, generator=gen).to(dev)
    fns = {"torch.mul": functools.partial(torch.mul, a, b)}
    for name in ("mitchell", "mbm"):
        fns[f"{name}_mul"] = functools.partial(approx_mul, a, b, name)
    results = compare(fns, dev, "torch.mul", rounds=repeat)
    for r in results.values():
        r["ratio_to_torch_mul"] = r.pop("ratio_to_exact")
        r["G_elements_per_s"] = n / r["median_s"] / 1e9
    return {"benchmark": "elementwise", "n": n, "results": results}


def stamp(report: dict, device: str = "auto") -> dict:
    """Add the runtime description and a UTC timestamp to a report."""
    report = dict(report)
    report["runtime"] = runtime.describe(device)
    report["timestamp"] = datetime.now(timezone.utc).isoformat(timespec="seconds")
    return report


def save_report(report: dict, out_dir: str | Path = "results/bench") -> Path:
    """Write a stamped report as ``<benchmark>[-<backends>]-<runtime>.json`` (atomically).

    A run limited to some backends gets their names in the file name, so it never replaces the full report.
    """
    subset = "".join(f"-{b}" for b in report.get("backends") or [])
    name = f"{report['benchmark']}{subset}-{report['runtime']['runtime']}.json"
    return write_json(Path(out_dir) / name, report)


# (name, kind, input shape without batch, weight shape, padding) of the SeedNet layers, SPEC.md section 2
SEEDNET_LAYERS = [
    ("seednet.conv1", "conv", (1, 28, 28), (32, 1, 3, 3), 1),
    ("seednet.conv2", "conv", (32, 28, 28), (64, 32, 3, 3), 1),
    ("seednet.conv3", "conv", (64, 14, 14), (128, 64, 3, 3), 1),
    ("seednet.fc1", "linear", (6272,), (128, 6272), 0),
    ("seednet.fc2", "linear", (128,), (64, 128), 0),
    ("seednet.fc3", "linear", (64,), (10, 64), 0),
]
REFERENCE_MAC_LIMIT = 1e9  # the eager reference runs at ~0.05 G MAC/s: bigger cases would take minutes
ATTENTION = (4, 4)  # batch and heads of the attention products timed (sequence 256, head dim 64: GPT-sized)


def attention_cases(batch: int, heads: int, sequence: int = 256, head_dim: int = 64) -> list[tuple]:
    """The two attention products as layer cases, batch x heads matrices each: Q K^T, (B*H, L, d) @ (B*H, d, L),
    and P V, (B*H, L, L) @ (B*H, L, d)."""
    g = batch * heads
    return [(f"gpt.qk@b{batch}h{heads}", "attention", (g, sequence, head_dim), (g, head_dim, sequence), 0),
            (f"gpt.pv@b{batch}h{heads}", "attention", (g, sequence, sequence), (g, sequence, head_dim), 0)]


def _layer_case(kind: str, x_shape, w_shape, padding: int, device: torch.device):
    """Inputs, MAC count and call builders (exact, approximate) of one layer case."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(*x_shape, generator=gen).to(device)
    w = (torch.randn(*w_shape, generator=gen) * 0.1).to(device)
    if kind == "conv":
        macs = torch.nn.functional.conv2d(x, w, padding=padding).numel() * w[0].numel()
        exact = functools.partial(torch.nn.functional.conv2d, x, w, padding=padding)
    elif kind == "linear":
        macs = x.shape[0] * w.numel()
        exact = functools.partial(torch.nn.functional.linear, x, w)
    else:  # gemm: x (M, K) @ w (K, N); attention: x (G, M, K) @ w (G, K, N), both activations
        macs = x.numel() * w.shape[-1]
        exact = functools.partial(torch.matmul, x, w)
    return macs, exact, functools.partial(_approx_call, kind, x, w, padding)


def _approx_call(kind: str, x: torch.Tensor, w: torch.Tensor, padding: int, mult: Multiplier, backend: str):
    """The approximate twin of a case's exact op: float multipliers as they are, integer ones quantised.

    Integer and table multipliers run the quantised layer with scales fixed beforehand (max-abs of the
    input, per output channel for the weights; attention's two activations one max-abs scale each), so the
    timing holds what a calibrated layer does.  Each call gets its own copy of the weight, as each layer has
    its own: what a design prepares from it once (:mod:`mbmlib.kernels.prepared`, a few entries per tensor)
    is not evicted by the other designs timed in the same rounds.
    """
    w = w.clone()
    if not mult.is_integer:
        op = {"conv": AF.conv2d, "linear": AF.linear, "gemm": AF.matmul, "attention": AF.matmul}[kind]
        extra = {"padding": padding} if kind == "conv" else {}
        return functools.partial(op, x, w, **extra, multiplier=mult, backend=backend)
    if kind == "attention":
        return functools.partial(quant.matmul, x, w, a_scale=x.abs().max() / mult.q_range[1],
                                 b_scale=w.abs().max() / mult.q_range[1], multiplier=mult, backend=backend)
    w_rows = w.t() if kind == "gemm" else w  # (out, ...): one weight scale per output
    scales = dict(act_scale=x.abs().max() / mult.q_range[1],
                  weight_scale=quant.weight_scale_of(w_rows, mult), multiplier=mult, backend=backend)
    if kind == "conv":
        return functools.partial(quant.conv2d, x, w, padding=padding, **scales)
    return functools.partial(quant.linear, x, w_rows, **scales)


def _too_slow(mult: Multiplier, backend: str, macs: int) -> str | None:
    """Why a case is skipped: the eager reference runs at well under 1 G MAC/s."""
    if backend == "reference" and macs > REFERENCE_MAC_LIMIT:
        return f"{macs / 1e9:.1f} G MAC is too slow for the eager reference"
    return None


def available_backends(device: torch.device) -> dict[str, str | None]:
    """Backend name -> None if usable on ``device``, else the reason it is skipped."""
    status: dict[str, str | None] = {"reference": None, "compiled": None}
    if device.type != "cuda":
        status["triton"] = "needs a CUDA device"
    else:
        try:
            kernels.load("triton")
            status["triton"] = None
        except ImportError as err:
            status["triton"] = f"not importable: {err}"
    return status


def check_layer_options(batches, gemm_size: int, multipliers, backends, rounds: int,
                        attention=ATTENTION) -> tuple[Multiplier, ...]:
    """The layer benchmark's options checked (ValueError naming the bad one) before anything is timed."""
    _check_counts(batches=list(batches), rounds=rounds)
    if attention is not None:
        if not isinstance(attention, (tuple, list)) or len(attention) != 2:
            raise ValueError(f"attention must be (batch, heads) or None (no attention rows), got {attention!r}")
        _check_counts(attention=list(attention))
    if gemm_size < 0:
        raise ValueError(f"gemm_size must be >= 0 (0 skips the GEMM), got {gemm_size}")
    unknown = sorted(set(backends or ()) - set(kernels.BACKENDS))
    if unknown:
        raise ValueError(f"unknown backend(s) {', '.join(unknown)}; valid backends are {', '.join(kernels.BACKENDS)}")
    return tuple(as_multiplier(m) for m in multipliers)


def bench_layers(device: str = "auto", batches=(16, 128), gemm_size: int = 2048,
                 multipliers=("mitchell", "mbm", "mbm-int8"), backends=None, rounds: int = 5,
                 progress: bool = True, attention=ATTENTION) -> dict:
    """Time exact vs every backend x multiplier on the SeedNet layers, one square GEMM and the two attention
    products (``attention``: batch and heads; None skips them), each against torch's op in the same run."""
    multipliers = check_layer_options(batches, gemm_size, multipliers, backends, rounds, attention)
    dev = runtime.resolve_device(device)
    status = available_backends(dev)
    if backends is not None:
        status = {b: status[b] for b in backends}
    cases = [(f"{n}@b{b}", kind, (b, *xs), ws, pad) for b in batches for n, kind, xs, ws, pad in SEEDNET_LAYERS]
    if gemm_size:
        cases.append((f"gemm{gemm_size}", "gemm", (gemm_size, gemm_size), (gemm_size, gemm_size), 0))
    cases += attention_cases(*attention) if attention is not None else []
    rows = []
    for case, kind, x_shape, w_shape, pad in cases:
        macs, exact, approx = _layer_case(kind, x_shape, w_shape, pad, dev)
        fns, rounds_of = {("exact", "torch"): exact}, {}
        for backend, reason in status.items():
            for mult in multipliers:
                why = reason or _too_slow(mult, backend, macs)
                if why is not None:
                    rows.append({"case": case, "multiplier": mult.name, "backend": backend, "macs": macs,
                                 "note": f"skipped: {why}"})
                    continue
                fns[(mult.name, backend)] = approx(mult, backend)
                if backend == "reference":
                    rounds_of[(mult.name, backend)] = 1
        timed = compare(fns, dev, ("exact", "torch"), rounds=rounds, rounds_of=rounds_of)
        for (name, backend), r in timed.items():
            rows.append({"case": case, "multiplier": name, "backend": backend, "macs": macs, **r,
                         "G_MAC_per_s": macs / r["median_s"] / 1e9})
            if progress:
                print(f"{case:>20} {name:>9} {backend:>9}: {rows[-1]['G_MAC_per_s']:8.3f} G MAC/s "
                      f"({r['ratio_to_exact']:5.1f}x exact)", flush=True)
    return {"benchmark": "layers", "backends": None if backends is None else list(backends),
            "batches": list(batches), "gemm_size": gemm_size,
            "attention": None if attention is None else list(attention), "rounds": rounds, "results": rows}
