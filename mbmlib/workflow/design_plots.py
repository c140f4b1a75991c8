"""Figures that weigh error or accuracy against published hardware cost (SPEC section 7).

:func:`designs_pareto`: the catalogue's error against relative power, the Pareto front marked;
:func:`accuracy_energy`: a model's top-1 against its relative multiplier energy.  Designs
without a published cost cannot be placed on the cost axis: they stand in a strip beside the
chart (or are named under it), never at a guessed cost.  Relative figures from different
sources share an axis (each against its own exact); the title names the sources.
"""
from __future__ import annotations

import re
import textwrap
from pathlib import Path
from typing import Sequence

import pandas as pd

from .plots import new_figure, save_figure

__all__ = ["pareto_front", "designs_pareto", "accuracy_energy", "explore_figure"]

_FAMILY_STYLE = {"mbm": ("#1f78b4", "o"), "mitchell": ("#e66101", "s"), "drum": ("#33a02c", "D"),
                 "EvoApproxLib unsigned": ("#9e9e9e", "o"), "EvoApproxLib signed": ("#5a5a5a", "v")}
_OTHER_STYLE = ("#6a3d9a", "^")
_EVOAPPROX = "evoapprox:"


def pareto_front(cost: Sequence[float], error: Sequence[float]) -> list[int]:
    """Indices of the points no other point beats on both (lower cost, lower error), by rising cost."""
    order = sorted(range(len(cost)), key=lambda i: (cost[i], error[i]))
    front, best = [], float("inf")
    for i in order:
        if error[i] < best:
            front.append(i)
            best = error[i]
    return front


def _family(name: str, signed: bool = False) -> str:
    """The legend group of a multiplier name: its design, or EvoApproxLib signed/unsigned."""
    if name.startswith(_EVOAPPROX):
        return "EvoApproxLib signed" if signed else "EvoApproxLib unsigned"
    design = name.split("-")[0]
    return "drum" if design.startswith("drum") else design


def _point(ax, x: float, y: float, family: str, label: str | None, legend: set) -> None:
    """One design's marker in its family's style (the family named in the legend once), labelled if asked."""
    color, marker = _FAMILY_STYLE.get(family, _OTHER_STYLE)
    ax.scatter([x], [y], color=color, marker=marker, s=40, zorder=3, alpha=0.85,
               label=None if family in legend else family)
    legend.add(family)
    if label:
        ax.annotate(label.replace(_EVOAPPROX, ""), (x, y), fontsize=7, xytext=(4, 3), textcoords="offset points")


def _unplaced_strip(ax, unplaced: pd.DataFrame, error: str) -> None:
    """The designs without a published cost as a column beside the chart: their error on the same axis."""
    legend: set = set()
    for _, row in unplaced.iterrows():
        _point(ax, 0, row[error], _family(row["multiplier"], row["signed"]), row["multiplier"], legend)
    ax.set_xticks([])
    ax.set_xlim(-0.5, 3)
    ax.set_title("no published cost", fontsize=8)
    ax.grid(axis="y", alpha=0.3)


def designs_pareto(table: pd.DataFrame, path: str | Path, title: str, error: str = "mean_abs") -> Path:
    """Mean relative error (%) against relative power of every costed design, the Pareto front joined and its
    members labelled (the built-in designs always); designs without a published cost in a strip beside it."""
    fig = new_figure(11, 6.5)
    ax, strip = fig.subplots(1, 2, sharey=True, gridspec_kw={"width_ratios": [7, 1]})
    placed = table[table["relative_power"].notna()].reset_index(drop=True)
    front = pareto_front(list(placed["relative_power"]), list(placed[error]))
    legend: set = set()
    for i, row in placed.iterrows():
        labelled = i in front or not row["multiplier"].startswith(_EVOAPPROX)
        _point(ax, row["relative_power"], row[error], _family(row["multiplier"], row["signed"]),
               row["multiplier"] if labelled else None, legend)
    ax.plot(placed.loc[front, "relative_power"], placed.loc[front, error], color="#d62728", lw=1.2, zorder=2,
            label="Pareto front (lower power, lower error)")
    ax.set_yscale("symlog", linthresh=0.1)
    ax.set_ylabel("mean relative error (%)")
    ax.set_xlabel("relative power (design / exact multiplier of the same source)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="upper right")
    fig.suptitle(f"{title}: error against published power (the MBM paper's designs against its Wallace "
                 "multiplier, EvoApproxLib's circuits against its exact circuit)", fontsize=10)
    _unplaced_strip(strip, table[table["relative_power"].isna()], error)
    return save_figure(fig, path)


def accuracy_energy(rows: Sequence[dict], path: str | Path, title: str) -> Path:
    """Top-1 drop against exact (points, symlog: a one-image drop and a collapse on one axis) against relative
    multiplier energy, one labelled point per multiplier with a published cost; the others named under the
    axis.  Labels alternate above and below their points, which crowd where designs cost about the same."""
    fig = new_figure(11, 6.5)
    ax = fig.add_subplot()
    exact = next(r["top1"] for r in rows if r["multiplier"] == "exact")
    placed = sorted((r for r in rows if r.get("relative_energy") is not None and r["multiplier"] != "exact"),
                    key=lambda r: r["relative_energy"])
    legend: set = set()
    for i, r in enumerate(placed):
        signed = bool(re.match(r"evoapprox:mul\d+s_", r["multiplier"]))
        _point(ax, r["relative_energy"], exact - r["top1"], _family(r["multiplier"], signed), None, legend)
        ax.annotate(r["multiplier"].replace(_EVOAPPROX, ""), (r["relative_energy"], exact - r["top1"]),
                    fontsize=7, rotation=30, xytext=(3, 4 if i % 2 == 0 else -12), textcoords="offset points")
    ax.set_yscale("symlog", linthresh=0.1)
    ax.set_ylim(bottom=-0.02)
    ax.set_ylabel(f"top-1 drop against exact ({exact:.2f}%), points (lower is better)")
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="upper right")
    unplaced = [r["multiplier"] for r in rows if r.get("relative_energy") is None and r["multiplier"] != "exact"]
    label = "relative multiplier energy of the model (MAC-weighted, each design against its source's exact)"
    if unplaced:
        note = "no published cost, not placed: " + ", ".join(unplaced)
        label += "\n" + "\n".join(textwrap.wrap(note, 140))
    ax.set_xlabel(label)
    return save_figure(fig, path)


def explore_figure(report: dict, path: str | Path) -> Path:
    """An exploration's every scored assignment (top-1 drop against relative energy), its Pareto front joined,
    the uniform assignments marked and labelled, and the loss budget as a line; the drop axis is symlog."""
    fig = new_figure(11, 6.5)
    ax = fig.add_subplot()
    points, front = report["points"], report["front"]
    ax.scatter([p["relative_energy"] for p in points], [p["top1_drop"] for p in points], s=12, color="#bdbdbd",
               label=f"every assignment scored ({len(points)})", zorder=2)
    line = sorted((p for p in front if not p.get("reference")), key=lambda p: p["relative_energy"])
    ax.plot([p["relative_energy"] for p in line], [p["top1_drop"] for p in line], color="#d62728", marker="o", ms=4,
            lw=1.2, label="Pareto front", zorder=3)
    uniform = [p for p in points if p["origin"] == "uniform"]
    ax.scatter([p["relative_energy"] for p in uniform], [p["top1_drop"] for p in uniform], marker="D", s=40,
               color="#1f78b4", label="uniform assignments", zorder=4)
    for rank, p in enumerate(sorted(uniform, key=lambda p: p["relative_energy"])):  # neighbours' labels alternate
        ax.annotate(p["label"].replace(_EVOAPPROX, ""), (p["relative_energy"], p["top1_drop"]), fontsize=7,
                    rotation=30, xytext=(3, (4, -14, 16)[rank % 3]), textcoords="offset points")
    ax.axhline(report["max_loss"], color="#4d4d4d", ls="--", lw=1,
               label=f"loss budget {report['max_loss']:g} points (exact: {report['exact_top1']:.2f}%)")
    ax.axhline(0, color="#4d4d4d", lw=0.6)
    ax.set_yscale("symlog", linthresh=0.1)
    ax.set_ylim(bottom=min([-0.02] + [1.5 * p["top1_drop"] for p in points]))  # negative drops: above exact
    ax.set_xlabel("relative multiplier energy of the model (MAC-weighted, each design against its source's exact)")
    ax.set_ylabel("top-1 drop on the search split, points (lower is better)")
    ax.set_title(f"Design-space exploration: {report['model']} on {report['dataset']}, one design per layer",
                 fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))  # beside: no point hidden
    return save_figure(fig, path)
