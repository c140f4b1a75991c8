"""Figures that weigh error or accuracy against published hardware cost (SPEC section 7).

:func:`designs_pareto`: the catalogue's error against relative power, the Pareto front marked;
:func:`accuracy_energy`: a model's top-1 against its relative multiplier energy.  Designs
without a published cost cannot be placed: they are listed beside the chart, never guessed.
Relative figures from different sources share an axis (each against its own exact); the
marker says the source.
"""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import pandas as pd

from .plots import new_figure, save_figure

__all__ = ["pareto_front", "designs_pareto", "accuracy_energy"]

_FAMILY_STYLE = {"mbm": ("#1f78b4", "o"), "mitchell": ("#e66101", "s"), "drum": ("#33a02c", "D"),
                 "EvoApproxLib": ("#9e9e9e", "."), "exact": ("#4d4d4d", "*")}
_OTHER_STYLE = ("#6a3d9a", "^")


def pareto_front(cost: Sequence[float], error: Sequence[float]) -> list[int]:
    """Indices of the points no other point beats on both (lower cost, lower error), by rising cost."""
    order = sorted(range(len(cost)), key=lambda i: (cost[i], error[i]))
    front, best = [], float("inf")
    for i in order:
        if error[i] < best:
            front.append(i)
            best = error[i]
    return front


def _unplaced_note(fig, names: Sequence[str], what: str) -> None:
    if names:
        shown = ", ".join(names[:12]) + (f" and {len(names) - 12} more" if len(names) > 12 else "")
        fig.text(0.01, 0.005, f"{what} (no published cost, not placed): {shown}", fontsize=7, color="#555555",
                 ha="left", va="bottom", wrap=True)


def designs_pareto(table: pd.DataFrame, path: str | Path, title: str, error: str = "mean_abs") -> Path:
    """Mean relative error (%) against relative power of every costed design; the Pareto front joined and its
    members labelled, MBM/Mitchell/DRUM always labelled."""
    fig = new_figure(10, 6.5)
    ax = fig.add_subplot()
    placed = table[table["relative_power"].notna()].reset_index(drop=True)
    for family, group in placed.groupby("family"):
        color, marker = _FAMILY_STYLE.get(family, _OTHER_STYLE)
        ax.scatter(group["relative_power"], group[error], color=color, marker=marker, s=40 if marker != "." else 60,
                   label=family, zorder=3)
    front = pareto_front(list(placed["relative_power"]), list(placed[error]))
    ax.plot(placed.loc[front, "relative_power"], placed.loc[front, error], color="#d62728", lw=1.2, zorder=2,
            label="Pareto front (lower power, lower error)")
    for i, row in placed.iterrows():
        if i in front or row["family"] != "EvoApproxLib":
            ax.annotate(row["multiplier"].replace("evoapprox:", ""), (row["relative_power"], row[error]),
                        fontsize=7, xytext=(4, 3), textcoords="offset points")
    ax.set_xlabel("relative power (design / exact multiplier of the same source)")
    ax.set_ylabel("mean relative error (%)")
    ax.set_yscale("symlog", linthresh=0.1)
    ax.set_title(f"{title}: error against published power (MBM paper's designs vs its Wallace multiplier; "
                 "EvoApproxLib vs its exact circuit)", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="upper right")
    _unplaced_note(fig, list(table.loc[table["relative_power"].isna(), "multiplier"]), "not placed")
    return save_figure(fig, path)


def accuracy_energy(rows: Sequence[dict], path: str | Path, title: str) -> Path:
    """Top-1 (%) against relative multiplier energy, one labelled point per multiplier with a published cost;
    the exact model's top-1 as a line, the others listed below."""
    fig = new_figure(10, 6)
    ax = fig.add_subplot()
    exact = next((r["top1"] for r in rows if r["multiplier"] == "exact"), None)
    placed = [r for r in rows if r.get("relative_energy") is not None and r["multiplier"] != "exact"]
    for r in placed:
        family = "EvoApproxLib" if r["multiplier"].startswith("evoapprox:") else r["multiplier"].split("-")[0]
        family = "drum" if family.startswith("drum") else family
        color, marker = _FAMILY_STYLE.get(family, _OTHER_STYLE)
        ax.scatter(r["relative_energy"], r["top1"], color=color, marker=marker if marker != "." else "o", s=40,
                   zorder=3)
        ax.annotate(r["multiplier"].replace("evoapprox:", ""), (r["relative_energy"], r["top1"]), fontsize=7,
                    xytext=(4, 3), textcoords="offset points")
    if exact is not None:
        ax.axhline(exact, color="#4d4d4d", ls="--", lw=1, label=f"exact: {exact:.2f}%")
        ax.legend(fontsize=8, loc="lower right")
    ax.set_xlabel("relative multiplier energy of the model (MAC-weighted, each design vs its source's exact)")
    ax.set_ylabel("top-1 accuracy (%)")
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    _unplaced_note(fig, [r["multiplier"] for r in rows if r.get("relative_energy") is None
                         and r["multiplier"] != "exact"], "not placed")
    return save_figure(fig, path)
