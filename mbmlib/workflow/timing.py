"""Interleaved timing of callables on one device: the one way this package times anything.

Used by :mod:`.bench` (layer and elementwise throughput) and :mod:`.train`
(the approximate model's step time against its exact twin).
"""
from __future__ import annotations

import statistics
import time

import torch

__all__ = ["compare", "synchronize"]


def synchronize(device: torch.device) -> None:
    """Wait for queued CUDA work on ``device`` (no-op on the CPU), so a timer sees it finished."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def compare(fns: dict, device: torch.device, baseline: str, rounds: int = 5, warmup: int = 1,
            rounds_of: dict | None = None) -> dict:
    """Time several callables interleaved, round by round, against ``fns[baseline]``.

    Each round runs every callable once, so slow phases of a shared machine hit
    all of them alike; a callable's ratio is the median over rounds of its time
    divided by the baseline's time in the same round.  ``rounds_of`` caps the
    rounds of slow callables (they still get ratios from the rounds they ran in).
    """
    rounds_of = rounds_of or {}
    for name, fn in fns.items():
        for _ in range(0 if rounds_of.get(name, 2) <= 1 else warmup):  # a capped one-off is not warmed up
            fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    ratios: dict[str, list[float]] = {name: [] for name in fns}
    for r in range(rounds):
        this_round = {}
        for name, fn in fns.items():
            if r >= rounds_of.get(name, rounds):
                continue
            synchronize(device)
            t0 = time.perf_counter()
            fn()
            synchronize(device)
            this_round[name] = time.perf_counter() - t0
        for name, t in this_round.items():
            times[name].append(t)
            ratios[name].append(t / this_round[baseline])
    return {name: {"median_s": statistics.median(times[name]), "min_s": min(times[name]),
                   "repeats": len(times[name]), "ratio_to_exact": statistics.median(ratios[name])}
            for name in fns}
