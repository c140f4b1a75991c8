"""Collect every run and benchmark under ``results/`` into tables, and write the summary.

Reads ``<results>/runs/*/metrics.json`` (+ ``history.csv``) as written by
:mod:`mbmlib.workflow.train` and ``<results>/bench/*.json`` as written by
:func:`mbmlib.workflow.bench.save_report`.  A file that cannot be read or does not look
like what those writers produce is skipped with a :class:`ReportWarning` (and
listed in ``problems``) -- one broken run must not hide all the others.
Needs pandas (the ``notebooks`` extra); ``python -m mbmlib report`` (see
:func:`mbmlib.workflow.cli.add_report_parser`) runs :func:`write_summary` and
:func:`mbmlib.workflow.plots.comparison_figures`.
"""
from __future__ import annotations

import dataclasses
import json
import math
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import pandas as pd

from .config import TrainConfig
from .runtime import plain_name
from .store import write_text

__all__ = [
    "ReportWarning",
    "Results",
    "load_results",
    "load_runs",
    "load_bench",
    "bench_frame",
    "runtime_name",
    "summary_table",
    "seed_groups",
    "groups_markdown",
    "t_interval",
    "bench_summary",
    "to_markdown",
    "summary_markdown",
    "bench_markdown",
    "write_summary",
    "read_run",
    "load_explore",
    "explore_markdown",
]

# Columns of the run summary: (CSV name, markdown header, number format or None)
SUMMARY_COLUMNS = [
    ("run", "run", None),
    ("model", "model", None),
    ("dataset", "dataset", None),
    ("multiplier", "multiplier", None),
    ("backward", "backward", None),
    ("seed", "seed", "{:.0f}"),
    ("runtime", "runtime / device", None),
    ("epochs", "epochs", "{:.0f}"),
    ("samples", "samples", "{:.0f}"),
    ("val_accuracy", "val acc (%)", "{:.2f}"),
    ("test_accuracy", "test acc (%)", "{:.2f}"),
    ("val_bits_per_char", "val bits/char", "{:.3f}"),
    ("test_bits_per_char", "test bits/char", "{:.3f}"),
    ("epoch_time_s", "epoch time (s)", "{:.1f}"),
    ("samples_per_s", "samples/s", "{:.1f}"),
    ("approx_to_exact", "approx/exact time", "{:.2f}"),
]

CONFIG_DEFAULTS = dataclasses.asdict(TrainConfig())
HISTORY_COLUMNS = ["run", "step", "epoch", "loss", "lr", "elapsed"]

# Config fields that do not change what a run measures: runs differing only in these (and the seed) are repeats.
# results_dir: runs_dir's name in configs saved before it was renamed.
NOT_THE_EXPERIMENT = ("seed", "run_name", "runs_dir", "results_dir", "resume", "overwrite", "log_interval", "progress",
                      "data_dir", "workers")


class ReportWarning(UserWarning):
    """A results file was skipped because it could not be read or understood."""


@dataclass
class Results:
    """Everything found under one results folder."""

    runs: pd.DataFrame  # one row per run
    history: pd.DataFrame  # one row per training step: run, step, epoch, loss, lr, elapsed
    bench: pd.DataFrame  # one row per timed case
    problems: list = field(default_factory=list)  # (path, reason) of every skipped file
    explore: pd.DataFrame = field(default_factory=pd.DataFrame)  # one row per explore result and loss limit


def _problem(problems: list, path: Path, reason: str) -> None:
    problems.append((str(path), reason))
    warnings.warn(f"skipping {path}: {reason}", ReportWarning, stacklevel=3)


def runtime_name(runtime: Optional[dict]) -> str:
    """A readable runtime name from a recorded runtime description, e.g. ``Tesla T4 (Colab)``."""
    if not runtime:
        return "unknown"
    name = plain_name(str(runtime.get("device_name") or runtime.get("runtime") or runtime.get("device") or "unknown"))
    if runtime.get("device_type") == "CPU" and not name.upper().endswith("CPU"):
        name = f"{name} CPU"
    return f"{name} (Colab)" if runtime.get("colab") else str(name)


def _num(value) -> float:
    """A float, or NaN for None / missing / non-numbers."""
    try:
        out = float(value)
    except (TypeError, ValueError):
        return math.nan
    return out


def _run_row(run_dir: Path, metrics: dict) -> dict:
    cfg = {**CONFIG_DEFAULTS, **(metrics.get("config") or {})}  # a run saved before a field existed had its default
    rt = metrics.get("runtime") or {}
    final = metrics.get("final") or {}
    epochs = [e for e in metrics.get("epochs") or [] if isinstance(e, dict)]
    epoch_times = [_num(e.get("epoch_time_s")) for e in epochs]
    samples = final.get("samples", sum(_num(e.get("samples")) for e in epochs) if epochs else None)
    train_time = final.get("train_time_s", sum(epoch_times) if epochs else None)
    speed = final.get("speed") or {}
    last = epochs[-1] if epochs else {}
    sps = final.get("samples_per_s")
    if sps is None and samples and train_time:
        sps = _num(samples) / _num(train_time)
    return {
        "run": metrics.get("run_name") or run_dir.name,
        "status": metrics.get("status", "unknown"),
        "model": cfg.get("model"),
        "dataset": cfg.get("dataset"),
        "multiplier": f"map:{Path(cfg['multiplier_map']).stem}" if cfg.get("multiplier_map") else cfg.get("multiplier"),
        "backward": cfg.get("backward"),
        "backend": cfg.get("backend") or "auto",
        "seed": _num(cfg.get("seed")),
        "experiment": json.dumps({k: v for k, v in cfg.items() if k not in NOT_THE_EXPERIMENT}, sort_keys=True,
                                 default=str) + "|" + runtime_name(rt),
        "batch_size": cfg.get("batch_size"),
        "preset": cfg.get("preset"),
        "runtime": runtime_name(rt),
        "runtime_label": rt.get("runtime"),
        "device": rt.get("device"),
        "device_type": rt.get("device_type"),
        "device_name": rt.get("device_name"),
        "colab": bool(rt.get("colab", False)),
        "torch": rt.get("torch"),
        "epochs": len(epochs),
        "steps": metrics.get("global_step", sum(int(_num(e.get("steps")) or 0) for e in epochs)),
        "samples": _num(samples),
        "train_samples": (metrics.get("data") or {}).get("train"),
        "val_accuracy": _num(final.get("val_accuracy", last.get("val_accuracy"))),
        "test_accuracy": _num(final.get("test_accuracy")),
        "val_loss": _num(final.get("val_loss", last.get("val_loss"))),
        "val_bits_per_char": _num(final.get("val_bits_per_char", last.get("val_bits_per_char"))),
        "test_bits_per_char": _num(final.get("test_bits_per_char")),
        "epoch_time_s": (sum(epoch_times) / len(epoch_times)) if epoch_times else math.nan,
        "train_time_s": _num(train_time),
        "samples_per_s": _num(sps),
        "approx_to_exact": _num(speed.get("approx_to_exact_time_per_sample")),
        "finished_at": metrics.get("finished_at"),
        "path": str(run_dir),
    }


def _read_history(path: Path, run: str, problems: list) -> Optional[pd.DataFrame]:
    try:
        hist = pd.read_csv(path)
    except (OSError, ValueError, pd.errors.ParserError) as err:
        _problem(problems, path, f"unreadable history ({err})")
        return None
    missing = {"step", "loss"} - set(hist.columns)
    if missing:
        _problem(problems, path, f"history lacks column(s) {', '.join(sorted(missing))}")
        return None
    hist = hist.assign(run=run)
    for col in HISTORY_COLUMNS:
        if col not in hist.columns:
            hist[col] = math.nan
    hist["step"] = pd.to_numeric(hist["step"], errors="coerce")
    hist["loss"] = pd.to_numeric(hist["loss"], errors="coerce")
    return hist[HISTORY_COLUMNS].dropna(subset=["step"])


def _load_run(run_dir: Path, problems: list) -> tuple[Optional[dict], Optional[pd.DataFrame]]:
    """A run folder's summary row and step history (None for what cannot be read)."""
    mpath = run_dir / "metrics.json"
    try:
        with open(mpath) as f:
            metrics = json.load(f)
        if not isinstance(metrics, dict):
            raise ValueError("not a JSON object")
        row = _run_row(run_dir, metrics)
    except (OSError, ValueError, TypeError, AttributeError) as err:
        _problem(problems, mpath, f"unreadable metrics ({err})")
        return None, None
    hpath = run_dir / "history.csv"
    return row, _read_history(hpath, row["run"], problems) if hpath.exists() else None


def _frames(rows: list, histories: list) -> tuple[pd.DataFrame, pd.DataFrame]:
    runs = pd.DataFrame(rows, columns=list(_run_row(Path("x"), {}).keys()))
    history = pd.concat(histories, ignore_index=True) if histories else pd.DataFrame(columns=HISTORY_COLUMNS)
    return runs, history


def read_run(run_dir: str | Path, problems: Optional[list] = None) -> tuple[pd.DataFrame, pd.DataFrame]:
    """``(runs, history)`` of one run folder (``runs`` has one row, or none if unreadable)."""
    problems = [] if problems is None else problems
    row, hist = _load_run(Path(run_dir), problems)
    return _frames([row] if row else [], [hist] if hist is not None else [])


def load_runs(results_dir: str | Path = "results",
              problems: Optional[list] = None) -> tuple[pd.DataFrame, pd.DataFrame]:
    """``(runs, history)`` DataFrames of every ``<results_dir>/runs/*/`` with a ``metrics.json``.

    Folders without a ``metrics.json`` are not runs and are ignored silently; a
    ``metrics.json`` or ``history.csv`` that cannot be parsed is skipped with a warning.
    """
    problems = [] if problems is None else problems
    rows, histories = [], []
    for run_dir in sorted(p for p in (Path(results_dir) / "runs").glob("*") if p.is_dir()):
        if not (run_dir / "metrics.json").exists():
            continue
        row, hist = _load_run(run_dir, problems)
        if row is not None:
            rows.append(row)
        if hist is not None:
            histories.append(hist)
    return _frames(rows, histories)


BENCH_COLUMNS = ["benchmark", "file", "runtime", "runtime_label", "device_name", "colab", "timestamp", "case",
                 "multiplier", "backend", "macs", "median_s", "G_MAC_per_s", "ratio_to_exact", "note"]


def _bench_rows(report: dict, path: Path) -> list[dict]:
    rt = report.get("runtime") or {}
    common = {"benchmark": report.get("benchmark"), "file": path.name, "runtime": runtime_name(rt),
              "runtime_label": rt.get("runtime"), "device_name": rt.get("device_name"),
              "colab": bool(rt.get("colab", False)), "timestamp": report.get("timestamp")}
    results = report["results"]
    rows = []
    if report.get("benchmark") == "elementwise":
        n = report.get("n")
        for op, r in results.items():
            mult = op.replace("_mul", "") if op != "torch.mul" else "exact"
            rows.append({**common, "case": f"elementwise n={n}", "multiplier": mult,
                         "backend": "torch" if mult == "exact" else "elementwise", "macs": _num(n),
                         "median_s": _num(r.get("median_s")), "G_MAC_per_s": _num(r.get("G_elements_per_s")),
                         "ratio_to_exact": _num(r.get("ratio_to_torch_mul")), "note": None})
    elif isinstance(results, list):
        for r in results:
            rows.append({**common, **{k: r.get(k) for k in ("case", "multiplier", "backend", "note")},
                         **{k: _num(r.get(k)) for k in ("macs", "median_s", "G_MAC_per_s", "ratio_to_exact")}})
    else:
        raise ValueError("'results' is neither the elementwise mapping nor a list of cases")
    return rows


def bench_frame(report: dict, file: str = "") -> pd.DataFrame:
    """One benchmark report (as from :func:`mbmlib.workflow.bench.stamp`) as rows like :func:`load_bench`'s."""
    return pd.DataFrame(_bench_rows(report, Path(file or f"{report.get('benchmark')}.json")), columns=BENCH_COLUMNS)


def load_bench(results_dir: str | Path = "results", problems: Optional[list] = None) -> pd.DataFrame:
    """One row per timed case of every ``<results_dir>/bench/*.json`` (elementwise ops become cases too).

    The static SASS reports (``sass-*.json``) hold no timings and are left out.
    """
    problems = [] if problems is None else problems
    rows = []
    for path in sorted((Path(results_dir) / "bench").glob("*.json")):
        if path.name.startswith("sass-"):
            continue
        try:
            with open(path) as f:
                report = json.load(f)
            if not isinstance(report, dict) or "results" not in report:
                raise ValueError("no 'results' in it")
            rows.extend(_bench_rows(report, path))
        except (OSError, ValueError, TypeError, AttributeError, KeyError) as err:
            _problem(problems, path, f"unreadable benchmark ({err})")
    return pd.DataFrame(rows, columns=BENCH_COLUMNS)


def load_results(results_dir: str | Path = "results") -> Results:
    """Runs, step histories and benchmarks under ``results_dir``, with the list of skipped files."""
    problems: list = []
    runs, history = load_runs(results_dir, problems)
    bench = load_bench(results_dir, problems)
    return Results(runs, history, bench, problems, load_explore(results_dir, problems))


EXPLORE_COLUMNS = {"explore": "explore", "model": "model", "dataset": "dataset", "designs": "designs",
                   "evaluations": "evaluations", "search_samples": "search images", "max_loss": "max loss (points)",
                   "best_energy": "best energy", "best_top1": "its top-1 (%)", "best_test_top1": "its test top-1 (%)",
                   "uniform": "best uniform", "uniform_energy": "its energy", "uniform_top1": "its top-1 (%) "}


def _explore_rows(path: Path) -> list[dict]:
    """One row per loss limit of an ``explore.json``: the best point and the best uniform assignment within it."""
    report = json.loads(path.read_text())
    tested = {p["id"]: p.get("test_top1") for p in report["front"]}
    common = {"explore": path.parent.name, "model": report["model"], "dataset": report["dataset"],
              "designs": len(report["designs"]), "evaluations": report["evaluations"],
              "search_samples": report["search_samples"]}
    return [{**common, **{k: row[k] for k in EXPLORE_COLUMNS if k in row}, "best_test_top1": tested.get(row["best_id"])}
            for row in report["summary"]]


def load_explore(results_dir: str | Path = "results", problems: Optional[list] = None) -> pd.DataFrame:
    """The summaries of every ``<results>/explore/*/explore.json`` (``python -m mbmlib explore``)."""
    problems = [] if problems is None else problems
    rows = []
    for path in sorted(Path(results_dir).glob("explore/*/explore.json")):
        try:
            rows += _explore_rows(path)
        except (OSError, ValueError, KeyError, TypeError) as err:
            warnings.warn(f"skipping {path}: {err}", ReportWarning, stacklevel=2)
            _problem(problems, path, f"unreadable explore result ({err})")
    return pd.DataFrame(rows, columns=list(EXPLORE_COLUMNS))


def explore_markdown(table: pd.DataFrame) -> str:
    """A :func:`load_explore` table as markdown."""
    return to_markdown(table, EXPLORE_COLUMNS, {"max_loss": "{:g}", "best_energy": "{:.3f}", "best_top1": "{:.2f}",
                                                "best_test_top1": "{:.2f}", "uniform_energy": "{:.3f}",
                                                "uniform_top1": "{:.2f}"})


def summary_table(runs: pd.DataFrame) -> pd.DataFrame:
    """The summary columns (run, model, multiplier, ..., approx/exact ratio) of a runs DataFrame."""
    cols = [c for c, _, _ in SUMMARY_COLUMNS]
    if runs.empty:
        return pd.DataFrame(columns=cols)
    table = runs[cols].copy()
    return table.sort_values(["model", "runtime", "multiplier", "run"], na_position="last").reset_index(drop=True)


def t_interval(values) -> tuple[float, float, float]:
    """``(mean, std, half-width)`` of a 95% Student-t confidence interval of the mean; NaN where undefined.

    The half-width is ``t(0.975, n-1) * std / sqrt(n)`` with the sample std (ddof 1); one value has no interval.
    """
    from scipy import stats

    x = pd.to_numeric(pd.Series(values), errors="coerce").dropna().to_numpy(dtype=float)
    if len(x) == 0:
        return math.nan, math.nan, math.nan
    if len(x) == 1:
        return float(x[0]), math.nan, math.nan
    std = float(x.std(ddof=1))
    return float(x.mean()), std, float(stats.t.ppf(0.975, len(x) - 1) * std / math.sqrt(len(x)))


GROUP_KEYS = ["model", "dataset", "multiplier", "backward", "runtime", "train_samples", "epochs"]
GROUP_STATS = {"test_accuracy": "test acc (%)", "val_accuracy": "val acc (%)", "test_bits_per_char": "test bits/char",
               "epoch_time_s": "epoch time (s)"}
_DIGITS = {"epoch_time_s": 1, "test_bits_per_char": 3}  # decimals shown per statistic (else 2)


def seed_groups(runs: pd.DataFrame) -> pd.DataFrame:
    """One row per experiment: runs whose config differs only in the seed (same runtime) are grouped.

    Runs with the same seed are one computation repeated: only the latest (``finished_at``) counts.

    Columns: the :data:`GROUP_KEYS`, ``seeds`` (count), ``runs`` (names), and for each of
    :data:`GROUP_STATS` ``<stat>_mean``, ``_std`` and ``_ci95`` (half-width of the 95% Student-t interval).
    """
    stat_cols = [f"{c}_{s}" for c in GROUP_STATS for s in ("mean", "std", "ci95")]
    if runs.empty:
        return pd.DataFrame(columns=GROUP_KEYS + ["seeds", "runs"] + stat_cols)
    rows = []
    for _, group in runs.groupby("experiment", sort=False):
        # a rerun with the same seed repeats the same computation: only the latest one counts
        group = group.sort_values("finished_at", na_position="first").drop_duplicates("seed", keep="last")
        row = {k: group[k].iloc[0] for k in GROUP_KEYS}
        row.update(seeds=len(group), runs=", ".join(sorted(group["run"])))
        for col in GROUP_STATS:
            row.update(zip((f"{col}_mean", f"{col}_std", f"{col}_ci95"), t_interval(group[col])))
        rows.append(row)
    table = pd.DataFrame(rows, columns=GROUP_KEYS + ["seeds", "runs"] + stat_cols)
    return table.sort_values(["model", "runtime", "train_samples", "multiplier"], na_position="last").reset_index(drop=True)


def _mean_ci(mean: float, ci: float, digits: int) -> str:
    """``98.12 ± 0.34`` (the half-width of the 95% interval), or the mean alone without one."""
    if math.isnan(mean):
        return "–"
    return f"{mean:.{digits}f}" if math.isnan(ci) else f"{mean:.{digits}f} ± {ci:.{digits}f}"


def groups_markdown(groups: pd.DataFrame) -> str:
    """A :func:`seed_groups` table as markdown: mean ± 95% CI half-width and std of each statistic."""
    shown = groups[GROUP_KEYS + ["seeds"]].copy()
    for col, header in GROUP_STATS.items():
        digits = _DIGITS.get(col, 2)
        shown[header] = [_mean_ci(m, c, digits) for m, c in zip(groups[f"{col}_mean"], groups[f"{col}_ci95"])]
        shown[f"{header} std"] = groups[f"{col}_std"]
    return to_markdown(shown, {"train_samples": "train samples", "runtime": "runtime / device"},
                       {"train_samples": "{:.0f}", "epochs": "{:.0f}",
                        **{f"{h} std": f"{{:.{_DIGITS.get(c, 2)}f}}" for c, h in GROUP_STATS.items()}})


def bench_summary(bench: pd.DataFrame) -> pd.DataFrame:
    """Timed benchmark cases (skipped ones dropped) in a compact column order."""
    cols = ["runtime", "benchmark", "case", "multiplier", "backend", "G_MAC_per_s", "ratio_to_exact", "median_s"]
    if bench.empty:
        return pd.DataFrame(columns=cols)
    timed = bench[bench["median_s"].notna()]
    return timed[cols].reset_index(drop=True)


def to_markdown(table: pd.DataFrame, headers: Optional[dict] = None, formats: Optional[dict] = None) -> str:
    """A GitHub markdown table (pandas' ``DataFrame.to_markdown``); ``formats`` per column, NaN/None as a dash."""
    formats = formats or {}

    def cell(col, value) -> str:
        if value is None or (isinstance(value, float) and math.isnan(value)):
            return "–"
        if formats.get(col) and isinstance(value, (int, float)):
            return formats[col].format(value)
        return f"{value:.4g}" if isinstance(value, float) else str(value).replace("|", "\\|")

    shown = pd.DataFrame({c: [cell(c, v) for v in table[c]] for c in table.columns}, columns=table.columns)
    align = ["right" if pd.api.types.is_numeric_dtype(table[c]) else "left" for c in table.columns]
    return shown.rename(columns=headers or {}).to_markdown(index=False, disable_numparse=True,
                                                            colalign=align or None) + "\n"


def summary_markdown(table: pd.DataFrame) -> str:
    """A :func:`summary_table` as a markdown table with readable headers and rounded numbers."""
    return to_markdown(table, {c: h for c, h, _ in SUMMARY_COLUMNS}, {c: f for c, _, f in SUMMARY_COLUMNS if f})


def bench_markdown(table: pd.DataFrame) -> str:
    """A :func:`bench_summary` as a markdown table."""
    return to_markdown(table, {"G_MAC_per_s": "G MAC/s", "ratio_to_exact": "time / exact", "median_s": "median (s)"},
                       {"G_MAC_per_s": "{:.3g}", "ratio_to_exact": "{:.2f}", "median_s": "{:.3g}"})


def write_summary(results_dir: str | Path = "results", csv_path: str | Path | None = None,
                  md_path: str | Path | None = None, results: Optional[Results] = None) -> dict:
    """Write the run summary as CSV and markdown (default ``<results_dir>/summary.csv|.md``).

    Also writes the benchmark cases to ``bench_summary.csv|.md`` beside them.
    Returns the paths written and the tables.
    """
    results_dir = Path(results_dir)
    results = results if results is not None else load_results(results_dir)
    csv_path = Path(csv_path) if csv_path else results_dir / "summary.csv"
    md_path = Path(md_path) if md_path else csv_path.with_suffix(".md")
    table = summary_table(results.runs)
    write_text(csv_path, table.to_csv(index=False))
    md = ["# Runs", "", f"{len(table)} run(s) under `{results_dir / 'runs'}`. Accuracy in % (of a language model: "
          "next-character accuracy; its loss is also given in bits per character), epoch time is the mean "
          "over the run's epochs, approx/exact time is the time per training step relative to the exact twin "
          "of the model, measured in the same run.", "", summary_markdown(table)]
    groups = seed_groups(results.runs)
    write_text(csv_path.with_name("summary_by_seed.csv"), groups.to_csv(index=False))
    md += ["", "## Repeated runs (seeds)", "", "Runs whose configuration differs only in the seed, on the same "
           "runtime, grouped: mean ± half-width of the 95% Student-t confidence interval of the mean "
           "(t(0.975, n-1) · std / √n), and the sample standard deviation.", "", groups_markdown(groups)]
    if results.problems:
        md += ["", "Skipped files:", ""] + [f"- `{p}`: {why}" for p, why in results.problems]
    write_text(md_path, "\n".join(md) + "\n")
    bench = bench_summary(results.bench)
    bench_csv = csv_path.with_name("bench_summary.csv")
    bench_md = csv_path.with_name("bench_summary.md")
    write_text(bench_csv, bench.to_csv(index=False))
    write_text(bench_md, "# Benchmarks\n\nThroughput in G MAC/s (elementwise: G products/s); ratio to exact is "
                         "time relative to the exact op timed in the same run (lower is better).\n\n"
                         + bench_markdown(bench))
    out = {"csv": csv_path, "markdown": md_path, "bench_csv": bench_csv, "bench_markdown": bench_md,
           "table": table, "groups": groups, "bench": bench, "problems": results.problems}
    if not results.explore.empty:
        out["explore_csv"] = write_text(csv_path.with_name("explore_summary.csv"), results.explore.to_csv(index=False))
        out["explore_markdown"] = write_text(csv_path.with_name("explore_summary.md"), "# Design-space "
                                             "explorations\n\nPer result of `python -m mbmlib explore` and loss "
                                             "limit: the lowest relative multiplier energy found within it (top-1 on "
                                             "the held-out validation images, and on the test split), against the "
                                             "best uniform assignment within the same loss.\n\n"
                                             + explore_markdown(results.explore))
    return out
