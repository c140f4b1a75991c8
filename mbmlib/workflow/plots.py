"""Figures for runs, benchmarks and multiplier errors, saved as PNG files.

Every function draws on its own :class:`matplotlib.figure.Figure` with the Agg
canvas (no pyplot state, no display needed, safe inside notebooks whatever
their backend), writes the PNG atomically and returns its path.  Notebooks show
the file with ``IPython.display.Image``.  Needs matplotlib and pandas (the
``notebooks`` extra).
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Iterable, Mapping, Optional, Sequence

import matplotlib
import numpy as np
import pandas as pd
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.colors import TwoSlopeNorm
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from ..multipliers import as_multiplier, error_map
from .report import runtime_name, seed_groups
from .store import atomic_write
from .text import is_text_dataset

__all__ = [
    "multiplier_colors",
    "new_figure",
    "report_title",
    "save_figure",
    "run_labels",
    "loss_curves",
    "loss_groups",
    "loss_panels",
    "run_epochs",
    "accuracy_bars",
    "epoch_time_bars",
    "seed_intervals",
    "multiplier_accuracy",
    "layer_sensitivity",
    "layer_throughput",
    "runtime_throughput",
    "elementwise_bars",
    "error_maps",
    "error_histograms",
    "comparison_figures",
]

DPI = 120
_MULT_COLORS = {"exact": "#4d4d4d", "mitchell": "#e66101", "mbm": "#1f78b4"}


def new_figure(width: float = 9.0, height: float = 5.0) -> Figure:
    """A figure on its own Agg canvas (no pyplot state), constrained layout."""
    fig = Figure(figsize=(width, height), dpi=DPI, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def save_figure(fig: Figure, path: str | Path) -> Path:
    """Write ``fig`` as a PNG at ``path`` (atomically) and return the path."""
    path = Path(path)
    return atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=DPI), mode="wb")


_EXTRA_COLORS = ("#33a02c", "#6a3d9a", "#b15928", "#e31a1c", "#a6761d", "#1b9e77", "#e7298a", "#666666")


def multiplier_colors(names: Iterable[str]) -> dict:
    """Fixed colours for exact / mitchell / mbm; other multipliers (e.g. mbm-t16) take distinct ones in order."""
    colors, extra = {}, 0
    for name in names:
        name = str(name)
        if name in _MULT_COLORS:
            colors[name] = _MULT_COLORS[name]
        elif name not in colors:
            colors[name] = _EXTRA_COLORS[extra % len(_EXTRA_COLORS)]
            extra += 1
    return colors


def _pct(v: float) -> str:
    """A signed percentage that never reads -0.00%."""
    return "0%" if abs(v) < 0.005 else f"{v:+.2f}%"


def _empty(fig: Figure, message: str) -> None:
    ax = fig.add_subplot()
    ax.text(0.5, 0.5, message, ha="center", va="center", transform=ax.transAxes, fontsize=12)
    ax.set_axis_off()


# ----------------------------------------------------------------------------- runs


def run_labels(runs: pd.DataFrame) -> dict:
    """Legend label per run: multiplier, backward mode and device, made unique with the run name if needed."""
    labels = {}
    for _, r in runs.iterrows():
        back = "" if r.get("backward") in (None, "exact") else f", {r.get('backward')} backward"
        labels[r["run"]] = f"{r.get('multiplier')}{back} – {r.get('runtime')}"
    counts = pd.Series(list(labels.values())).value_counts()
    for run, label in labels.items():
        if counts[label] > 1:
            labels[run] = f"{label} [{run}]"
    return labels


def _smooth(values: np.ndarray, span: int) -> np.ndarray:
    return pd.Series(values).ewm(span=max(1, span), adjust=True).mean().to_numpy()


def loss_curves(history: pd.DataFrame, path: str | Path, labels: Optional[Mapping[str, str]] = None,
                smooth: Optional[int] = None, title: str = "Training loss", log_y: bool = False) -> Path:
    """Loss per step of several runs overlaid: smoothed lines, the raw loss faint behind them.

    ``history`` is long format (columns ``run``, ``step``, ``loss``), as from
    :func:`mbmlib.workflow.report.load_runs`; ``labels`` maps run -> legend label;
    ``smooth`` is the EMA span in steps (default: 1/15 of the longest run, between 3 and 100).
    """
    fig = new_figure()
    if history.empty:
        _empty(fig, "no training history found")
        return save_figure(fig, path)
    ax = fig.add_subplot()
    longest = int(history.groupby("run").size().max())
    span = smooth if smooth is not None else min(100, max(3, longest // 15))
    runs = history.sort_values("step").groupby("run", sort=True)
    palette = matplotlib.colormaps["tab20" if runs.ngroups > 10 else "tab10"]
    for i, (run, h) in enumerate(runs):
        label = (labels or {}).get(run, run)
        steps, loss = h["step"].to_numpy(float), h["loss"].to_numpy(float)
        color, style = palette(i % palette.N), ("-", "--", ":", "-.")[i // palette.N % 4]  # no two runs alike
        ax.plot(steps, loss, color=color, alpha=0.25, linewidth=0.8)
        ax.plot(steps, _smooth(loss, span), color=color, linestyle=style, linewidth=1.8, label=label)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("training step (mini-batches)")
    ax.set_ylabel("cross-entropy loss (nats)")
    if log_y:
        ax.set_yscale("log")
    ax.set_title(f"{title}\n(lines: exponential moving average over {span} step(s); faint: raw loss per step)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="upper right")
    return save_figure(fig, path)


def loss_groups(history: pd.DataFrame, runs: pd.DataFrame) -> dict[tuple[str, int], list[str]]:
    """Runs with a history, grouped by (runtime, training samples per epoch), largest epochs first per runtime."""
    info = runs.drop_duplicates("run").set_index("run")
    groups: dict[tuple[str, int], list[str]] = {}
    for run in sorted(set(history["run"]) & set(info.index)):
        samples = info.at[run, "train_samples"]
        groups.setdefault((str(info.at[run, "runtime"]), 0 if pd.isna(samples) else int(samples)), []).append(run)
    return {key: groups[key] for key in sorted(groups, key=lambda k: (k[0], -k[1]))}


def _panels(history: pd.DataFrame, runs: pd.DataFrame) -> dict[tuple[str, str, int], list[str]]:
    """``{(dataset, runtime, samples per epoch): runs}``: :func:`loss_groups` within each dataset, so runs on
    different data (images, a text corpus) never share a loss axis."""
    if history.empty or runs.empty:
        return {}
    datasets = runs["dataset"].fillna("").astype(str) if "dataset" in runs else pd.Series("", index=runs.index)
    return {(dataset, *key): names for dataset in sorted(set(datasets))
            for key, names in loss_groups(history, runs[datasets == dataset]).items()}


def loss_panels(history: pd.DataFrame, runs: pd.DataFrame, path: str | Path, smooth: Optional[int] = None,
                title: str = "Training loss of every run") -> Path:
    """The loss of many runs, one panel per dataset, runtime and epoch size, one colour per multiplier.

    Runs that differ only in the seed share their multiplier's colour and one legend entry; the
    raw loss per step is drawn faintly behind the smoothed lines (EMA span as in :func:`loss_curves`).
    A text corpus' loss is in nats per character.
    """
    groups = _panels(history, runs)
    if not groups:
        fig = new_figure()
        _empty(fig, "no training history found")
        return save_figure(fig, path)
    cols = min(2, len(groups))
    rows = -(-len(groups) // cols)
    fig = new_figure(6.2 * cols, 3.4 * rows + 0.6)
    axes = fig.subplots(rows, cols, squeeze=False).ravel()
    multiplier = runs.drop_duplicates("run").set_index("run")["multiplier"].astype(str)
    colors = multiplier_colors(multiplier[sorted(multiplier.index)])
    for ax, ((dataset, runtime, samples), names) in zip(axes, groups.items()):
        curves = [history[history["run"] == run].sort_values("step") for run in names]
        span = smooth if smooth is not None else min(100, max(3, max(len(h) for h in curves) // 15))
        labelled = set()
        for run, h in zip(names, curves):
            mult, (steps, loss) = multiplier[run], (h["step"].to_numpy(float), h["loss"].to_numpy(float))
            ax.plot(steps, loss, color=colors[mult], alpha=0.12, linewidth=0.6)
            ax.plot(steps, _smooth(loss, span), color=colors[mult], linewidth=1.6,
                    label=None if mult in labelled else mult)
            labelled.add(mult)
        text = is_text_dataset(dataset)
        size = f"{samples:,} {'windows' if text else 'samples'}/epoch" if samples else "epoch size unknown"
        ax.set_title(f"{dataset + ', ' if dataset else ''}{runtime}, {size}: {len(names)} run(s), EMA over {span} "
                     "steps", fontsize=10)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_xlabel("training step (mini-batches)")
        ax.set_ylabel("cross-entropy loss (nats per character)" if text else "cross-entropy loss (nats)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8, loc="upper right", title="multiplier", title_fontsize=8)
    for ax in axes[len(groups):]:
        ax.set_axis_off()
    fig.suptitle(f"{title} (lines: smoothed; faint: raw loss per step)")
    return save_figure(fig, path)


def _epoch_scores(ax, x: list, epochs: list, final: dict) -> None:
    """The per-epoch validation score: accuracy (%), or a language model's bits per character, with the test line."""
    bits = "val_bits_per_char" in epochs[0]
    key, unit, label = ("bits_per_char", "", "bits per character") if bits else ("accuracy", "%", "accuracy (%)")
    values = [e[f"val_{key}"] for e in epochs]
    ax.plot(x, values, "o-", color="C2", label="validation")
    test = final.get(f"test_{key}")
    if test is not None:
        ax.axhline(test, color="C3", linestyle="--", label=f"test, final model: {test:.{3 if bits else 2}f}{unit}")
    for xi, v in zip(x, values):
        ax.annotate(f"{v:.{3 if bits else 2}f}{unit}", (xi, v), textcoords="offset points", xytext=(0, 6),
                    ha="center", fontsize=8)
    ax.set_xlabel("epoch")
    ax.set_ylabel(label)
    if bits:
        ax.set_ylim(0, max(values + [test or 0]) * 1.15)
    else:
        ax.set_ylim(0, 105)
    ax.set_title(f"Validation {label.split(' (')[0]} per epoch")
    ax.legend(fontsize=8, loc="best")


def run_epochs(metrics: dict, path: str | Path) -> Path:
    """One run's per-epoch train/validation loss and validation accuracy -- a language model's bits per character
    -- (from its ``metrics.json``)."""
    epochs = [e for e in metrics.get("epochs") or [] if isinstance(e, dict)]
    fig = new_figure(10, 4.2)
    name = metrics.get("run_name", "run")
    if not epochs:
        _empty(fig, f"{name}: no finished epoch")
        return save_figure(fig, path)
    x = [e["epoch"] for e in epochs]
    ax1, ax2 = fig.subplots(1, 2)
    ax1.plot(x, [e["train_loss"] for e in epochs], "o-", label="training (mean over the epoch)")
    ax1.plot(x, [e["val_loss"] for e in epochs], "s-", label="validation (end of epoch)")
    ax1.set_xlabel("epoch")
    ax1.set_ylabel("cross-entropy loss (nats)")
    ax1.set_title("Loss per epoch")
    ax1.legend(fontsize=8, loc="best")
    ax1.margins(x=0.15, y=0.3)
    _epoch_scores(ax2, x, epochs, metrics.get("final") or {})
    for ax in (ax1, ax2):
        ax.set_xticks(x)
        ax.grid(alpha=0.3)
    cfg, rt = metrics.get("config") or {}, metrics.get("runtime") or {}
    fig.suptitle(f"{name}: {cfg.get('model')} with multiplier {cfg.get('multiplier')} "
                 f"(backward {cfg.get('backward')}) on {runtime_name(rt)}")
    return save_figure(fig, path)


def accuracy_bars(runs: pd.DataFrame, path: str | Path, labels: Optional[Mapping[str, str]] = None) -> Path:
    """Validation and test accuracy of every run as horizontal bars, values written on the bars."""
    n = len(runs)
    fig = new_figure(9, max(2.8, 0.55 * n + 1.6))
    if runs.empty:
        _empty(fig, "no runs found")
        return save_figure(fig, path)
    labels = labels or run_labels(runs)
    ax = fig.add_subplot()
    y = np.arange(n)
    h = 0.38
    names = [labels.get(r, r) for r in runs["run"]]
    for offset, col, label, color in ((-h / 2, "val_accuracy", "validation", "C0"),
                                      (h / 2, "test_accuracy", "test", "C1")):
        vals = runs[col].to_numpy(float)
        bars = ax.barh(y + offset, np.nan_to_num(vals), height=h, label=label, color=color)
        for bar, v in zip(bars, vals):
            text = "n/a" if math.isnan(v) else f"{v:.2f}%"
            ax.text(bar.get_width() + 0.5, bar.get_y() + bar.get_height() / 2, text, va="center", fontsize=8)
    ax.set_yticks(y, names, fontsize=8)
    ax.invert_yaxis()
    ax.set_xlim(0, 110)
    ax.set_xlabel("accuracy (%)")
    ax.set_title("Accuracy of the final model per run")
    ax.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.1), ncol=2)  # below: bars fill the width
    ax.grid(axis="x", alpha=0.3)
    return save_figure(fig, path)


def _grouped_bars(ax, values: Mapping, groups: Sequence[str], series: Sequence[str],
                  colors: Mapping[str, str], fmt: Optional[str], hatches: Optional[Mapping[str, str]] = None) -> None:
    """Bars of ``values[(group, series)]``: groups on the x axis, one bar per series.

    Values are written on the bars (``fmt``) unless there are too many bars to read them.
    """
    total = min(0.8, 0.25 * max(1, len(series)))
    width = total / max(1, len(series))
    x = np.arange(len(groups))
    annotate = fmt is not None and len(groups) * len(series) <= 40
    for i, s in enumerate(series):
        vals = [values.get((g, s), math.nan) for g in groups]
        bars = ax.bar(x - total / 2 + width * (i + 0.5), np.nan_to_num(vals), width, label=s, color=colors.get(s),
                      hatch=(hatches or {}).get(s), edgecolor="white" if (hatches or {}).get(s) else None,
                      linewidth=0)
        for bar, v in zip(bars, vals):
            if annotate and not math.isnan(v):
                ax.annotate(fmt.format(v), (bar.get_x() + bar.get_width() / 2, bar.get_height()),
                            xytext=(0, 2), textcoords="offset points", ha="center", va="bottom", fontsize=7,
                            rotation=90 if len(series) > 3 else 0)
    ax.set_xticks(x, groups)


def epoch_time_bars(runs: pd.DataFrame, path: str | Path) -> Path:
    """Training throughput (samples/s) and mean epoch time (s) by runtime, epoch size and multiplier.

    Runs are grouped by runtime *and* samples per epoch (an epoch of 2048 samples and one of
    48000 are not comparable); several runs in one group are averaged.
    """
    fig = new_figure(10, 4.8)
    runs = runs[runs["samples_per_s"].notna()] if not runs.empty else runs
    if runs.empty:
        _empty(fig, "no timed runs found")
        return save_figure(fig, path)
    per_epoch = (runs["samples"] / runs["epochs"].clip(lower=1)).round().astype(int)
    runs = runs.assign(multiplier=runs["multiplier"].astype(str),
                       group=runs["runtime"].astype(str) + "\n" + per_epoch.map("{:,} samples/epoch".format))
    mults = sorted(runs["multiplier"].unique(), key=lambda m: (m.split("-t")[0] != "exact", m))
    order = runs.assign(n=per_epoch).sort_values(["runtime", "n"])["group"]
    groups = list(dict.fromkeys(order))
    ax1, ax2 = fig.subplots(1, 2)
    colors = multiplier_colors(mults)
    grouped = runs.groupby(["group", "multiplier"])
    _grouped_bars(ax1, grouped["samples_per_s"].mean().to_dict(), groups, mults, colors, "{:.0f}")
    ax1.set_ylabel("training throughput (samples/s)")
    ax1.set_title("Training samples per second (higher is better)")
    _grouped_bars(ax2, grouped["epoch_time_s"].mean().to_dict(), groups, mults, colors, "{:.1f}")
    ax2.set_ylabel("epoch time (s)")
    ax2.set_title("Epoch time (lower is better)")
    for ax, col in ((ax1, "samples_per_s"), (ax2, "epoch_time_s")):
        values = runs[col].dropna()
        if len(values) and values.min() > 0 and values.max() / values.min() > 30:  # e.g. CPU next to GPU
            ax.set_yscale("log")
            label = ax.get_ylabel()
            ax.set_ylabel(label[:-1] + ", log scale)" if label.endswith(")") else label + " (log scale)")
        ax.margins(y=0.12)
        ax.set_xlabel("runtime (device) and epoch size")
        ax.grid(axis="y", alpha=0.3)
        ax.legend(title="multiplier", fontsize=8)
        ax.tick_params(axis="x", labelsize=7)
    fig.suptitle("Training speed by runtime and multiplier")
    return save_figure(fig, path)


def _interval_panel(ax, groups: pd.DataFrame, runs: pd.DataFrame, col: str, ylabel: str) -> None:
    """One panel of :func:`seed_intervals`: every seed's value as a dot, the mean with its 95% CI as a bar."""
    colors = multiplier_colors(groups["multiplier"])
    for x, (_, g) in enumerate(groups.iterrows()):
        if math.isnan(g[f"{col}_mean"]):  # e.g. bits per character of an image classifier
            continue
        color = colors[str(g["multiplier"])]
        members = runs[runs["experiment"] == g["experiment"]][col].to_numpy(float)
        ax.scatter(np.full(len(members), x + 0.15), members, s=14, color=color, alpha=0.5, linewidths=0)
        ax.errorbar([x], [g[f"{col}_mean"]], yerr=[[np.nan_to_num(g[f"{col}_ci95"])]] * 2, fmt="o", ms=7,
                    capsize=6, color=color, elinewidth=2)
        ci = g[f"{col}_ci95"]
        text = f"{g[f'{col}_mean']:.2f}" + ("" if math.isnan(ci) else f"\n± {ci:.2f}")
        ax.annotate(text, (x, g[f"{col}_mean"]), xytext=(-10, 0), textcoords="offset points", ha="right",
                    va="center", fontsize=7)
    one_runtime = groups["runtime"].nunique() == 1  # then the runtime goes in the title, not on every tick
    labels = [f"{g.multiplier}\n{g.model}{'' if pd.isna(g.train_samples) else f', n={g.train_samples:.0f}'}\n"
              f"{'' if one_runtime else g.runtime + ', '}{g.seeds} seeds" for g in groups.itertuples()]
    ax.set_xticks(np.arange(len(groups)), labels, fontsize=7)
    ax.set_xlim(-0.7, len(groups) - 0.3)
    ax.set_ylabel(ylabel)
    ax.grid(axis="y", alpha=0.3)


def seed_intervals(runs: pd.DataFrame, path: str | Path) -> Path:
    """Final test accuracy (of language models also bits per character) and epoch time per multiplier over
    repeated seeds: mean and 95% Student-t CI.

    Only experiments run with at least two seeds are shown (:func:`mbmlib.workflow.report.seed_groups`);
    dots are the single runs, the error bar the confidence interval of the mean.
    """
    groups = seed_groups(runs) if not runs.empty else pd.DataFrame()
    groups = groups[groups["seeds"] > 1] if not groups.empty else groups
    panels = [("test_accuracy", "final test accuracy (%)", "Test accuracy (higher is better)"),
              ("test_bits_per_char", "final test bits per character", "Test bits per character (lower is better)"),
              ("epoch_time_s", "epoch time (s)", "Epoch time (lower is better)")]
    panels = [p for p in panels if p[0] != "test_bits_per_char" or (not groups.empty
                                                                   and groups[f"{p[0]}_mean"].notna().any())]
    fig = new_figure(max(8.0, 2.6 * len(groups) + 2) * len(panels) / 2, 5.2)
    if groups.empty:
        _empty(fig, "no experiment was run with more than one seed")
        return save_figure(fig, path)
    experiment = {r: e for r, e in zip(runs["run"], runs["experiment"])}
    groups = groups.assign(experiment=[experiment[g.split(", ")[0]] for g in groups["runs"]])
    for ax, (col, ylabel, title) in zip(fig.subplots(1, len(panels)), panels):
        _interval_panel(ax, groups, runs, col, ylabel)
        ax.set_title(title)
    where = f" on {groups['runtime'].iloc[0]}" if groups["runtime"].nunique() == 1 else ""
    fig.suptitle(f"Repeated seeds{where}: mean and 95% Student-t confidence interval (dots: single runs)")
    return save_figure(fig, path)


# ----------------------------------------------------------------------------- evaluation and sensitivity


def _weights_name(checkpoint: Optional[str]) -> str:
    """A run's ``checkpoint.pt`` by its run folder, any other weights file by its stem; no file: untrained."""
    if not checkpoint:
        return "untrained"
    path = Path(checkpoint)
    return path.parent.name if path.name.startswith("checkpoint") else path.stem


def report_title(report: dict) -> str:
    """``model on dataset (split), runtime`` for an evaluation or sensitivity report."""
    source = "pretrained" if report.get("pretrained") else _weights_name(report.get("checkpoint"))
    return (f"{report['model']} ({source}) on {report['dataset']} ({report['split']}), "
            f"{runtime_name(report.get('runtime'))}")


def multiplier_bits(report: dict, path: str | Path) -> Path:
    """Bits per character per multiplier of a language model's :func:`mbmlib.workflow.evaluate.evaluate_multipliers`
    report, each bar with its rise against exact."""
    rows = report["results"]
    fig = new_figure(max(6.0, 1.1 * len(rows) + 2.5), 4.8)
    ax = fig.add_subplot()
    names = [r["multiplier"] for r in rows]
    colors = multiplier_colors(names)
    bars = ax.bar(np.arange(len(rows)), [r["bits_per_char"] for r in rows], 0.6, color=[colors[n] for n in names])
    for bar, r in zip(bars, rows):
        rise = "" if r["multiplier"] == "exact" else f"\n({r['bits_per_char_rise']:+.3f})"
        ax.annotate(f"{r['bits_per_char']:.3f}{rise}", (bar.get_x() + bar.get_width() / 2, bar.get_height()),
                    xytext=(0, 2), textcoords="offset points", ha="center", va="bottom", fontsize=8)
    ax.set_xticks(np.arange(len(rows)), names)
    ax.set_ylim(0, 1.2 * max(r["bits_per_char"] for r in rows))
    ax.set_ylabel("bits per character (lower is better)")
    ax.set_xlabel("multiplier (rise against exact in brackets, bits per character)")
    ax.grid(axis="y", alpha=0.3)
    ax.set_title(f"Bits per character per multiplier\n{report_title(report)}, {rows[0]['samples']} characters",
                 fontsize=10)
    return save_figure(fig, path)


def multiplier_accuracy(report: dict, path: str | Path) -> Path:
    """Top-1 and top-5 accuracy per multiplier of one :func:`mbmlib.workflow.evaluate.evaluate_multipliers` report
    (a language model's: bits per character, :func:`multiplier_bits`)."""
    rows = report["results"]
    if "bits_per_char" in rows[0]:
        return multiplier_bits(report, path)
    fig = new_figure(max(6.0, 1.3 * len(rows) + 2.5), 4.8)
    ax = fig.add_subplot()
    names = [r["multiplier"] for r in rows]
    x = np.arange(len(rows))
    colors = multiplier_colors(names)
    top1 = ax.bar(x - 0.2, [r["top1"] for r in rows], 0.4, color=[colors[n] for n in names], label="top-1")
    ax.bar(x + 0.2, [r["top5"] for r in rows], 0.4, color=[colors[n] for n in names], alpha=0.45, label="top-5")
    for bar, r in zip(top1, rows):
        drop = "" if r["multiplier"] == "exact" else f"\n({-r['top1_drop']:+.2f})"
        ax.annotate(f"{r['top1']:.2f}%{drop}", (bar.get_x() + bar.get_width() / 2, bar.get_height()),
                    xytext=(0, 2), textcoords="offset points", ha="center", va="bottom", fontsize=8)
    ax.set_xticks(x, names)
    top1s = [r["top1"] for r in rows]
    low = max(0.0, math.floor(min(top1s) - max(1.0, 3 * (max(top1s) - min(top1s)))))  # zoomed to the differences
    ax.set_ylim(low, 100 + 0.15 * (100 - low))
    ax.set_ylabel("accuracy (%)")
    ax.set_xlabel("multiplier (top-1 change against exact in brackets, points)")
    ax.legend(fontsize=8, loc="lower right")
    ax.grid(axis="y", alpha=0.3)
    ax.set_title(f"Accuracy per multiplier (axis zoomed from {low:.0f}%)\n{report_title(report)}, "
                 f"{rows[0]['samples']} images", fontsize=10)
    return save_figure(fig, path)


def layer_sensitivity(report: dict, path: str | Path) -> Path:
    """Top-1 drop (a language model: rise in bits per character) when only one layer uses the approximate
    multiplier, with each layer's share of the MACs."""
    rows = report["layers"] + report["combined"]
    bits = report.get("ranked_by") == "bits_per_char_rise"
    fig = new_figure(10, max(3.5, 0.38 * len(rows) + 1.8))
    ax1, ax2 = fig.subplots(1, 2, sharey=True, width_ratios=[3, 2])
    y = np.arange(len(rows))
    drops = [r["bits_per_char_rise" if bits else "top1_drop"] for r in rows]
    colors = ["#1f78b4" if r in report["layers"] else "#e66101" for r in rows]
    ax1.barh(y, drops, color=colors)
    for yi, d in zip(y, drops):
        ax1.annotate(f"{d:+.{3 if bits else 2}f}", (d, yi), xytext=(3 if d >= 0 else -3, 0), textcoords="offset points",
                     ha="left" if d >= 0 else "right", va="center", fontsize=7)
    ax1.axvline(0, color="black", linewidth=0.8)
    ax1.set_yticks(y, [r["layer"] for r in rows], fontsize=8)
    ax1.invert_yaxis()
    ax1.margins(x=0.25)
    one_image = 100.0 / report["baseline"]["samples"]  # the finest step a drop can take
    if bits:
        ax1.set_xlabel(f"rise in bits per character against exact ({report['baseline']['bits_per_char']:.3f})")
    else:
        ax1.set_xlabel(f"top-1 drop against exact ({report['baseline']['top1']:.2f}%), points "
                       f"(one image = {one_image:.2g})")
    ax1.set_title(f"{'Bits per character rise' if bits else 'Accuracy drop'} (blue: one layer approximate; orange: "
                  "together)", fontsize=9)
    ax2.barh(y, [100.0 * r["macs"] / report["total_macs"] for r in rows], color=colors, alpha=0.6)
    ax2.set_xlabel("share of the model's MACs (%)")
    ax2.set_title("Work moved to the approximate multiplier", fontsize=9)
    for ax in (ax1, ax2):
        ax.grid(axis="x", alpha=0.3)
    fig.suptitle(f"Layer sensitivity to {report['multiplier']}: {report_title(report)}", fontsize=10)
    return save_figure(fig, path)


# ----------------------------------------------------------------------------- benchmarks


def _method(row) -> str:
    return "exact (torch)" if row["multiplier"] == "exact" else f"{row['multiplier']} ({row['backend']})"


def layer_throughput(bench: pd.DataFrame, path: str | Path, title: Optional[str] = None) -> Path:
    """Per-layer throughput (G MAC/s, log scale) and time relative to exact, for one benchmark run.

    ``bench`` holds the ``layers`` rows of one runtime (from :func:`mbmlib.workflow.report.load_bench`
    or built from a :func:`mbmlib.workflow.bench.bench_layers` report); skipped cases are left out.
    Colour = multiplier, hatching = the slower backends.
    """
    timed = bench[bench["median_s"].notna()].copy() if not bench.empty else bench
    fig = new_figure(12, 8)
    if timed.empty:
        _empty(fig, "no timed layer cases")
        return save_figure(fig, path)
    timed["method"] = timed.apply(_method, axis=1)
    cases = list(dict.fromkeys(timed["case"]))
    backend_order = {"torch": 0, "triton": 1, "compiled": 2, "reference": 3}
    methods = sorted(dict.fromkeys(timed["method"]), key=lambda m: (
        not m.startswith("exact"), m.split(" ")[0], backend_order.get(m.split("(")[-1].rstrip(")"), 9)))
    mult_of = dict(zip(timed["method"], timed["multiplier"].astype(str)))
    backend_of = dict(zip(timed["method"], timed["backend"].astype(str)))
    family = multiplier_colors(mult_of[m] for m in methods)
    palette = {m: family[mult_of[m]] for m in methods}
    hatches = {m: {"reference": "////"}.get(backend_of[m])
               for m in methods}
    ax1, ax2 = fig.subplots(2, 1, sharex=True)
    table = timed.set_index(["case", "method"])
    _grouped_bars(ax1, table["G_MAC_per_s"].to_dict(), cases, methods, palette, "{:.2g}", hatches)
    ax1.set_yscale("log")
    ax1.set_ylabel("throughput (G MAC/s, log scale)")
    ax1.set_title("Throughput per layer (higher is better)")
    ax1.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0), title="multiplier (backend)")
    approx = [m for m in methods if not m.startswith("exact")]
    _grouped_bars(ax2, table["ratio_to_exact"].to_dict(), cases, approx, palette, "{:.2g}", hatches)
    ax2.axhline(1.0, color="#4d4d4d", linestyle="--", linewidth=1, label="exact = 1")
    ax2.set_yscale("log")
    ax2.set_ylabel("time relative to exact (×, log scale)")
    ax2.set_title("Time relative to the exact layer timed in the same rounds (lower is better)")
    ax2.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    ax2.set_xlabel("layer case (SeedNet layer @ batch size; gemmN: N×N by N×N matrix product)")
    ax2.tick_params(axis="x", labelrotation=30, labelsize=8)
    for ax in (ax1, ax2):
        ax.grid(axis="y", alpha=0.3, which="major")
        ax.margins(y=0.25)
    runtime = timed["runtime"].iloc[0] if "runtime" in timed and timed["runtime"].notna().any() else ""
    fig.suptitle(title or f"Exact vs approximate layers on {runtime}")
    return save_figure(fig, path)


def _seednet_totals(bench: pd.DataFrame) -> pd.DataFrame:
    """Per runtime and multiplier: G MAC/s of a whole SeedNet forward pass at the largest common batch,
    from the fastest backend (total MACs / total median time over the six layers)."""
    rows = bench[(bench["benchmark"] == "layers") & bench["median_s"].notna()
                 & bench["case"].astype(str).str.startswith("seednet.")].copy()
    if rows.empty:
        return pd.DataFrame(columns=["runtime", "multiplier", "backend", "batch", "G_MAC_per_s"])
    rows["batch"] = rows["case"].str.extract(r"@b(\d+)$")[0].astype(float)
    per_rt_batches = rows.groupby("runtime")["batch"].apply(set)
    common = set.intersection(*per_rt_batches) if len(per_rt_batches) else set()
    batch = max(common) if common else rows["batch"].max()
    rows = rows[rows["batch"] == batch]
    agg = rows.groupby(["runtime", "multiplier", "backend"]).agg(macs=("macs", "sum"), s=("median_s", "sum"),
                                                                 layers=("case", "nunique")).reset_index()
    agg = agg[agg["layers"] == agg["layers"].max()]
    agg["G_MAC_per_s"] = agg["macs"] / agg["s"] / 1e9
    best = agg.sort_values("G_MAC_per_s").groupby(["runtime", "multiplier"]).tail(1)
    return best.assign(batch=int(batch))


def runtime_throughput(bench: pd.DataFrame, path: str | Path) -> Path:
    """SeedNet forward throughput (G MAC/s, log scale) per runtime and multiplier, fastest backend each."""
    totals = _seednet_totals(bench) if not bench.empty else pd.DataFrame()
    fig = new_figure(10, 5)
    if totals.empty:
        _empty(fig, "no SeedNet layer benchmarks found")
        return save_figure(fig, path)
    ax = fig.add_subplot()
    _log_bars_by_runtime(ax, totals, "G_MAC_per_s", "SeedNet forward throughput (G MAC/s, log scale)")
    best = ", ".join(f"{m}: {b}" for m, b in totals.groupby("multiplier")["backend"].agg(
        lambda s: "/".join(sorted(set(s)))).items())
    ax.set_title(f"Whole SeedNet forward pass, batch {totals['batch'].iloc[0]}: six layers' MACs / their summed "
                 f"time\nfastest backend per multiplier ({best})", fontsize=10)
    fig.suptitle("Layer throughput by runtime")
    return save_figure(fig, path)


def elementwise_bars(bench: pd.DataFrame, path: str | Path) -> Path:
    """Elementwise products per second (G/s) of torch.mul, Mitchell and MBM, per runtime."""
    rows = bench[bench["benchmark"] == "elementwise"] if not bench.empty else bench
    fig = new_figure(9, 4.5)
    if rows.empty:
        _empty(fig, "no elementwise benchmark found")
        return save_figure(fig, path)
    ax = fig.add_subplot()
    _log_bars_by_runtime(ax, rows, "G_MAC_per_s", "elementwise products (G/s, log scale)")
    ax.set_title("Elementwise multiply of float32 tensors (exact = torch.mul)")
    return save_figure(fig, path)


def _log_bars_by_runtime(ax, frame: pd.DataFrame, value: str, ylabel: str) -> None:
    """Log-scale bars of ``frame[value]`` grouped by runtime, one colour per multiplier (mean of repeats)."""
    rts = sorted(frame["runtime"].unique())
    mults = sorted(frame["multiplier"].unique(), key=lambda m: (m != "exact", m))
    table = frame.groupby(["runtime", "multiplier"])[value].mean().to_dict()
    _grouped_bars(ax, table, rts, mults, multiplier_colors(mults), "{:,.4g}")
    ax.set_yscale("log")
    ax.set_ylabel(ylabel)
    ax.set_xlabel("runtime (device)")
    ax.legend(title="multiplier", fontsize=8)
    ax.grid(axis="y", alpha=0.3, which="both")
    ax.margins(y=0.15)


# ----------------------------------------------------------------------------- multiplier errors


def _error_panels(panels, extent, axis_labels: tuple[str, str], suptitle: str, path: str | Path,
                  marks=None) -> Path:
    """Heat maps ``[(title, err)]`` side by side on one diverging colour scale centred on 0 (error in %)."""
    lim = max(max(abs(float(e.min())), abs(float(e.max()))) for _, e in panels) or 1e-9
    norm = TwoSlopeNorm(vcenter=0.0, vmin=-lim, vmax=lim)
    fig = new_figure(4.6 * len(panels) + 1.2, 5.6)
    axes = np.atleast_1d(fig.subplots(1, len(panels), sharey=True))
    image = None
    for ax, (title, err) in zip(axes, panels):
        image = ax.imshow(err.numpy(), origin="lower", extent=extent, cmap="RdBu_r", norm=norm,
                          interpolation="nearest", aspect="equal")
        if marks is not None:
            marks(ax)
        ax.set_title(f"{title}: error from {_pct(float(err.min()))} to {_pct(float(err.max()))}", fontsize=10)
        ax.set_xlabel(axis_labels[0])
    axes[0].set_ylabel(axis_labels[1])
    cbar = fig.colorbar(image, ax=list(axes), shrink=0.9)
    cbar.set_label("relative error (approx − exact) / exact (%)")
    fig.suptitle(suptitle, fontsize=10)
    return save_figure(fig, path)


def error_maps(multipliers: Iterable[str], path: str | Path, bins: int = 256) -> Path:
    """Heat maps of the relative error (%) over the mantissa grid, one panel per multiplier.

    Axes are the operands' mantissa fractions x1, x2 in [0, 1) (operands 1 + x);
    one diverging colour scale, centred on 0, is shared by all panels.
    The dashed line x1 + x2 = 1 is where the mantissa sum carries.
    """
    names = [as_multiplier(m).name for m in multipliers]
    panels = [(name, error_map(name, bins)[1]) for name in names]
    return _error_panels(panels, (0, 1, 0, 1), ("x2 (mantissa fraction of operand b)",
                                                "x1 (mantissa fraction of operand a)"),
                         f"Relative error over the mantissa grid ({bins}×{bins} cell centres; dashed: x1 + x2 = 1, "
                         "the carry boundary)", path,
                         marks=lambda ax: ax.plot([0, 1], [1, 0], "k--", linewidth=0.8, alpha=0.6))


def integer_error_maps(multipliers: Iterable, path: str | Path, bins: int = 255) -> Path:
    """Heat maps of the relative error (%) of integer / table multipliers over pairs of magnitudes (A, B).

    One panel per multiplier, ``bins`` magnitudes per axis spread over 1..2^n - 1 (255 for 8 bits: every pair);
    one diverging colour scale centred on 0.  Products of small magnitudes are floored to integers, so the
    worst errors sit in the bottom-left corner.
    """
    mults = [as_multiplier(m) for m in multipliers]
    maps = [error_map(m, bins) for m in mults]
    top = float(maps[0][0][-1])
    panels = [(m.name if len(m.name) <= 24 else f"table ({m.bits}-bit)", err) for m, (_, err) in zip(mults, maps)]
    return _error_panels(panels, (0.5, top + 0.5, 0.5, top + 0.5),
                         ("B (magnitude of operand b)", "A (magnitude of operand a)"),
                         f"Relative error of integer multipliers over {len(maps[0][0])}x{len(maps[0][0])} pairs of "
                         "magnitudes", path)


def error_histograms(multipliers: Iterable[str], path: str | Path, bins: int = 512,
                     hist_bins: int = 120) -> Path:
    """Distribution of the relative error (%) over a uniform ``bins x bins`` mantissa grid, overlaid.

    Dotted vertical lines mark each multiplier's mean (its bias).
    """
    names = [as_multiplier(m).name for m in multipliers]
    fig = new_figure(9, 4.8)
    ax = fig.add_subplot()
    values = {n: error_map(n, bins)[1].flatten().numpy() for n in names}
    lo = min(v.min() for v in values.values())
    hi = max(v.max() for v in values.values())
    edges = np.linspace(lo, hi, hist_bins + 1) if hi > lo else np.linspace(lo - 1, hi + 1, hist_bins + 1)
    colors = multiplier_colors(names)
    for name, v in values.items():
        color = colors[name]
        weights = np.full(v.shape, 100.0 / v.size)
        ax.hist(v, bins=edges, weights=weights, histtype="step", linewidth=1.6, color=color,
                linestyle="-" if "-t" not in name else (0, (4, 1.5)),
                label=f"{name}: mean {v.mean():+.3f}%, mean |err| {np.abs(v).mean():.2f}%")
        ax.axvline(v.mean(), color=color, linestyle=":", linewidth=1.2)
    ax.axvline(0, color="black", linewidth=0.6)
    ax.set_xlabel("relative error (approx − exact) / exact (%)")
    ax.set_ylabel("share of operand pairs (% per bin)")
    ax.set_title(f"Relative error distribution over a uniform {bins}×{bins} mantissa grid\n"
                 f"(bins {edges[1] - edges[0]:.2f} percentage points wide; dotted lines: mean = bias)", fontsize=10)
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    return save_figure(fig, path)


# ----------------------------------------------------------------------------- all at once


def comparison_figures(results, out_dir: str | Path, smooth: Optional[int] = None) -> list[Path]:
    """The runtime/multiplier comparison figures of a :class:`mbmlib.workflow.report.Results`, into ``out_dir``.

    Writes ``loss_curves.png``, ``accuracy.png``, ``training_speed.png``, ``seed_intervals.png``,
    ``runtime_throughput.png``, ``elementwise.png`` and one ``layers-<runtime>.png``
    per layer benchmark file; returns the paths written.  ``smooth``: EMA span of the loss curves.
    """
    out = Path(out_dir)
    labels = run_labels(results.runs) if not results.runs.empty else {}
    paths = [loss_panels(results.history, results.runs, out / "loss_curves.png", smooth=smooth),
             accuracy_bars(results.runs, out / "accuracy.png", labels),
             epoch_time_bars(results.runs, out / "training_speed.png"),
             seed_intervals(results.runs, out / "seed_intervals.png"),
             runtime_throughput(results.bench, out / "runtime_throughput.png"),
             elementwise_bars(results.bench, out / "elementwise.png")]
    layers = results.bench[results.bench["benchmark"] == "layers"] if not results.bench.empty else results.bench
    for file, rows in (layers.groupby("file") if not layers.empty else []):
        paths.append(layer_throughput(rows, out / f"layers-{Path(file).stem.removeprefix('layers-')}.png"))
    return paths
