"""The transformer comparison (notebook 07): exact vs each design on vit-tiny and gpt-char, and attention only.

Runs are read by :func:`mbmlib.workflow.report.load_runs`; runs that differ only in the seed form one row of
:func:`design_table`, with the mean and 95% Student-t interval of the test score (top-1 for an image model,
bits per character for a language model), its change against the exact runs of the same model, and the time
per training sample relative to exact measured inside each run (the trainer's paired exact twin).  A run
trained with an assignment file shows as ``map:<file stem>``; ``map:attention-mbm`` (only Q K^T and P V
approximate) is labelled "attention only (mbm)".
"""
from __future__ import annotations

import fnmatch
import math
from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd

from .plots import multiplier_colors, new_figure, save_figure
from .report import t_interval, to_markdown
from .text import is_text_dataset

__all__ = ["select_runs", "design_table", "design_markdown", "attention_figure", "design_label"]

ATTENTION_ONLY = "map:attention-"  # the assignment files experiments/maps/attention-<design>.json


def design_label(multiplier: str) -> str:
    """How a run's multiplier column reads in the comparison: attention-only maps get a plain label."""
    if multiplier.startswith(ATTENTION_ONLY):
        return f"attention only ({multiplier[len(ATTENTION_ONLY):]})"
    return multiplier


def select_runs(runs: pd.DataFrame, history: pd.DataFrame, patterns: Sequence[str]) -> tuple:
    """``(runs, history)`` of the finished runs whose names match one of the glob ``patterns``."""
    if runs.empty:
        raise ValueError("no runs found: run the sweeps experiments/transformers-*.yaml first")
    chosen = runs[runs["run"].map(lambda r: any(fnmatch.fnmatchcase(r, p) for p in patterns))
                  & (runs["status"] == "finished")]
    if chosen.empty:
        raise ValueError(f"no finished run matches {list(patterns)}; the runs are {', '.join(runs['run'])}")
    return chosen.reset_index(drop=True), history[history["run"].isin(chosen["run"])]


def _score(dataset: str) -> tuple[str, str]:
    """(column, name) of the test score: bits per character for a text corpus, else top-1."""
    return ("test_bits_per_char", "test bits/char") if is_text_dataset(dataset) else ("test_accuracy",
                                                                                     "test top-1 (%)")


def _group_row(model: str, dataset: str, multiplier: str, group: pd.DataFrame) -> dict:
    col, name = _score(dataset)
    mean, _, ci = t_interval(group[col])
    ratio = 1.0 if multiplier == "exact" else float(pd.to_numeric(group["approx_to_exact"]).mean())
    return {"model": model, "dataset": dataset, "design": design_label(multiplier), "multiplier": multiplier,
            "seeds": int(group["seed"].nunique()), "score": name, "mean": mean, "ci95": ci,
            "values": ", ".join(f"{v:.3f}" for v in group[col]), "time_vs_exact": ratio}


def design_table(runs: pd.DataFrame) -> pd.DataFrame:
    """One row per (model, dataset, multiplier): the test score's mean and 95% interval over the seeds, its
    change against exact (``delta``: points of top-1, or bits per character), time per sample vs exact."""
    latest = runs.sort_values("finished_at").drop_duplicates(["model", "dataset", "multiplier", "seed"], keep="last")
    rows = [_group_row(model, dataset, mult, group)
            for (model, dataset, mult), group in latest.groupby(["model", "dataset", "multiplier"], sort=True)]
    table = pd.DataFrame(rows)
    exact = table[table["multiplier"] == "exact"].set_index(["model", "dataset"])["mean"]
    table["delta"] = [m - exact.get((mo, d), math.nan) for mo, d, m in
                      zip(table["model"], table["dataset"], table["mean"])]
    order = {"exact": 0}
    table["order"] = [order.get(m, 2 if m.startswith(ATTENTION_ONLY) else 1) for m in table["multiplier"]]
    return table.sort_values(["model", "order", "design"]).drop(columns="order").reset_index(drop=True)


def design_markdown(table: pd.DataFrame) -> str:
    """:func:`design_table` as markdown: mean ± 95% half-width, the change against exact, the time ratio."""
    shown = table[["model", "dataset", "design", "seeds", "score"]].copy()
    shown["mean ± 95% CI"] = [f"{m:.3f}" if math.isnan(c) else f"{m:.3f} ± {c:.3f}"
                              for m, c in zip(table["mean"], table["ci95"])]
    shown["vs exact"] = [f"{d:+.3f}" for d in table["delta"]]
    shown["seeds' values"] = table["values"]
    shown["time/sample vs exact"] = [f"{r:.2f}x" for r in table["time_vs_exact"]]
    return to_markdown(shown)


def attention_figure(table: pd.DataFrame, path: str | Path) -> Path:
    """One panel per model: each design's change of the test score against exact, with its 95% interval;
    attention-only bars hatched, so "attention only" and "everything approximate" sit side by side."""
    models = list(dict.fromkeys(table["model"]))
    fig = new_figure(5.2 * len(models) + 1, 4.6)
    colors = multiplier_colors(table["design"])
    for ax, model in zip(fig.subplots(1, len(models), squeeze=False)[0], models):
        rows = table[(table["model"] == model) & (table["multiplier"] != "exact")]
        x = np.arange(len(rows))
        for i, row in zip(x, rows.itertuples()):
            ax.bar(i, row.delta, color=colors[row.design], hatch="//" if row.design.startswith("attention") else None,
                   edgecolor="black", linewidth=0.5, yerr=0 if math.isnan(row.ci95) else row.ci95, capsize=4)
            ax.annotate(f"{row.delta:+.2f}\n{row.time_vs_exact:.1f}x time", (i, row.delta), ha="center",
                        va="bottom" if row.delta >= 0 else "top", fontsize=7)
        ax.axhline(0, color="black", linewidth=0.8)
        ax.margins(y=0.2)  # room for the labels above and below the bars
        ax.set_xticks(x, list(rows["design"]), rotation=25, ha="right", fontsize=8)
        score = rows["score"].iloc[0] if len(rows) else ""
        better = "lower is better" if "bits" in score else "higher is better"
        ax.set_ylabel(f"change of {score} against exact ({better})")
        ax.set_title(f"{model} ({rows['dataset'].iloc[0] if len(rows) else ''})", fontsize=10)
        ax.grid(axis="y", alpha=0.3)
    fig.suptitle("Every product approximate vs attention only (hatched): mean over seeds, 95% interval")
    return save_figure(fig, path)
