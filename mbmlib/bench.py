"""Throughput measurements, in one run on the current device.

Every timing warms up, synchronises and repeats, and reports the median; every
approximate figure is reported as a ratio to the exact op measured in the same
run, because this kind of machine is shared and noisy.
"""
from __future__ import annotations

import statistics
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable

import torch

from . import runtime
from .multipliers import approx_mul
from .store import write_json


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_fn(fn: Callable[[], object], device: torch.device, warmup: int = 2, repeat: int = 5,
            min_time: float = 0.0) -> dict:
    """Median / min wall time (s) of ``fn()`` after ``warmup`` calls; at least ``repeat`` runs."""
    for _ in range(warmup):
        fn()
    _sync(device)
    times: list[float] = []
    start = time.perf_counter()
    while len(times) < repeat or time.perf_counter() - start < min_time:
        t0 = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - t0)
    return {"median_s": statistics.median(times), "min_s": min(times), "repeats": len(times)}


def bench_elementwise(n: int = 10_000_000, device: str = "auto", repeat: int = 7) -> dict:
    """Time ``mbm_mul`` / ``mitchell_mul`` on ``n`` elements against ``torch.mul``."""
    dev = runtime.resolve_device(device)
    gen = torch.Generator().manual_seed(0)
    a = torch.randn(n, generator=gen).to(dev)
    b = torch.randn(n, generator=gen).to(dev)
    results = {"torch.mul": time_fn(lambda: torch.mul(a, b), dev, repeat=repeat)}
    for name in ("mitchell", "mbm"):
        results[f"{name}_mul"] = time_fn(lambda: approx_mul(a, b, name), dev, repeat=repeat)
    base = results["torch.mul"]["median_s"]
    for r in results.values():
        r["ratio_to_torch_mul"] = r["median_s"] / base
        r["G_elements_per_s"] = n / r["median_s"] / 1e9
    return {"benchmark": "elementwise", "n": n, "results": results}


def stamp(report: dict, device: str = "auto") -> dict:
    """Add the runtime description and a UTC timestamp to a report."""
    report = dict(report)
    report["runtime"] = runtime.describe(device)
    report["timestamp"] = datetime.now(timezone.utc).isoformat(timespec="seconds")
    return report


def save_report(report: dict, out_dir: str | Path = "results/bench") -> Path:
    """Write a stamped report as ``<benchmark>-<runtime>.json`` (atomically)."""
    name = f"{report['benchmark']}-{report['runtime']['runtime']}.json"
    return write_json(Path(out_dir) / name, report)
