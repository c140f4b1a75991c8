"""The design catalogue: ``python -m mbmlib designs [--bits 8] [--evoapprox-dir D]``.

Every registered integer design of one width (MBM, Mitchell, DRUM-k for every k, users' own)
and every EvoApproxLib circuit of that width in a local checkout, each with its error
statistics over every operand pair (:func:`mbmlib.error_stats`) and its published hardware
cost relative to its own source's exact multiplier (:func:`mbmlib.cost`; empty where
nothing is published).  Written as ``results/tables/designs.csv`` / ``.md`` (8 bits;
``designs-int<n>`` otherwise) and ``results/figures/designs-pareto.png``.
"""
from __future__ import annotations

import os
import subprocess
from pathlib import Path
from typing import Optional

import pandas as pd

from ..multipliers import Multiplier, as_multiplier, error_stats, registered_designs
from ..multipliers.cost import cost
from ..multipliers.evoapprox import EVOAPPROX_ENV, list_circuits
from .store import write_text

__all__ = ["design_names", "catalogue", "checkout_description", "catalogue_paths", "save_catalogue"]

COLUMNS = {"multiplier": "design", "family": "family", "signed": "signed", "bias": "bias (%)",
           "mean_abs": "mean relative error (%)", "max": "max relative error (%)",
           "min": "min relative error (%)", "ep": "error probability (%)", "wce": "worst-case error",
           "mae_pct": "MAE (% of 2^2n)", "relative_power": "relative power", "relative_area": "relative area",
           "cost_source": "cost source"}


def design_names(bits: int = 8, evoapprox_dir: Optional[str] = None) -> list[str]:
    """Names of every registered integer design of ``bits`` (DRUM-k for each k from 3 to n-1) and every
    n x n EvoApproxLib circuit of the checkout (``evoapprox_dir``, else ``$MBMLIB_EVOAPPROX``, else none)."""
    names = []
    for design in registered_designs():
        if design.kind != "int":
            continue
        if design.param == "k":
            names += [f"{design.name}{k}-int{bits}" for k in range(3, bits)]
        else:
            names.append(f"{design.name}-int{bits}")
    checkout = evoapprox_dir or os.environ.get(EVOAPPROX_ENV)
    if checkout:
        names += [f"evoapprox:{name}" for name in list_circuits(checkout, bits)]
    return names


def _family(name: str) -> str:
    if name.startswith("evoapprox:"):
        return "EvoApproxLib"
    return as_multiplier(name).kind


def catalogue(bits: int = 8, evoapprox_dir: Optional[str] = None, progress: bool = True) -> pd.DataFrame:
    """One row per design: error statistics and relative power/area with their source (NaN where unpublished)."""
    from tqdm.auto import tqdm

    rows = []
    for name in tqdm(design_names(bits, evoapprox_dir), desc="designs", disable=not progress):
        mult = (Multiplier.from_evoapprox(name, evoapprox_dir) if name.startswith("evoapprox:")
                else as_multiplier(name))
        stats, published = error_stats(mult), cost(mult)
        rows.append({**{k: stats[k] for k in ("bias", "mean_abs", "max", "min", "ep", "wce", "mae_pct")},
                     "multiplier": name, "family": _family(name), "signed": mult.signed,
                     "relative_power": None if published is None else published.relative_power,
                     "relative_area": None if published is None else published.relative_area,
                     "cost_source": None if published is None else published.source})
    return pd.DataFrame(rows, columns=list(COLUMNS))


def checkout_description(evoapprox_dir: Optional[str] = None) -> str:
    """Where the EvoApproxLib circuits came from: the checkout, its branch and commit (as git reports them)."""
    checkout = evoapprox_dir or os.environ.get(EVOAPPROX_ENV)
    if not checkout:
        return "No EvoApproxLib checkout given (--evoapprox-dir or $MBMLIB_EVOAPPROX): built-in designs only."

    def git(*args: str) -> str:
        done = subprocess.run(["git", "-C", str(checkout), *args], capture_output=True, text=True)
        return done.stdout.strip() if done.returncode == 0 else "unknown"

    return (f"EvoApproxLib circuits from {Path(checkout).name} (branch {git('rev-parse', '--abbrev-ref', 'HEAD')}, "
            f"commit {git('rev-parse', 'HEAD')}).")


def catalogue_paths(bits: int, tables_dir="results/tables", figures_dir="results/figures") -> dict:
    stem = "designs" if bits == 8 else f"designs-int{bits}"
    return {"csv": Path(tables_dir) / f"{stem}.csv", "markdown": Path(tables_dir) / f"{stem}.md",
            "figure": Path(figures_dir) / f"{stem}-pareto.png"}


def save_catalogue(table: pd.DataFrame, bits: int, source: str, tables_dir="results/tables",
                   figures_dir="results/figures") -> dict:
    """Write the CSV, a markdown table (with ``source``: where the circuits came from) and the Pareto figure."""
    from . import design_plots, report as rep

    paths = catalogue_paths(bits, tables_dir, figures_dir)
    csv_path = write_text(paths["csv"], table.to_csv(index=False))
    formats = {c: "{:.3f}" for c in ("bias", "mean_abs", "max", "min", "ep", "mae_pct", "relative_power",
                                     "relative_area")}
    md = rep.to_markdown(table.sort_values(["relative_power", "mean_abs"], na_position="last"),
                         {k: v for k, v in COLUMNS.items() if k != "multiplier"}, {**formats, "wce": "{:,.0f}"})
    md_path = write_text(paths["markdown"], f"# {bits}-bit multipliers: error and published cost\n\n{source}\n\n"
                                            "Relative power and area are each against the exact multiplier of the "
                                            "same source; empty where nothing is published.\n\n" + md)
    png = design_plots.designs_pareto(table, paths["figure"], f"{bits}-bit multipliers")
    return {"csv": csv_path, "markdown": md_path, "figure": png}
