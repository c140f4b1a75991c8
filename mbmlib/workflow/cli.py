"""Command line: ``python -m mbmlib bench|train|sweep``."""
from __future__ import annotations

import argparse
import sys

from pathlib import Path
from typing import Sequence

from . import bench
from .sweep import KERNEL, run_sweep


def _add_bench(sub) -> None:
    p = sub.add_parser("bench", help="measure throughput on this machine and write JSON to results/bench/",
                       description="Time exact vs approximate ops in one run; ratios are to the exact op.")
    p.add_argument("what", nargs="?", default="all", choices=["all", "elementwise", "layers"],
                   help="which benchmark to run (default: all)")
    p.add_argument("--device", default="auto", help="cpu, cuda or auto (default: auto)")
    p.add_argument("--out", default="results/bench", help="output folder (default: results/bench)")
    p.add_argument("--elements", type=int, default=10_000_000, help="elementwise benchmark size (default: 1e7)")
    p.add_argument("--repeat", type=int, default=5, help="elementwise: timed repetitions; the median is kept")
    p.add_argument("--batches", type=int, nargs="+", default=[16, 128], help="layers: batch sizes (default: 16 128)")
    p.add_argument("--gemm-size", type=int, default=2048, help="layers: size of the square GEMM, 0 to skip")
    p.add_argument("--rounds", type=int, default=5, help="layers: interleaved timing rounds; medians are kept")
    p.add_argument("--multipliers", nargs="+", default=["mitchell", "mbm"], help="layers: multipliers to time")
    p.add_argument("--backends", nargs="+", default=None,
                   help="layers: backends to time (default: every one usable on the device)")
    p.set_defaults(func=_run_bench)


def _run_bench(args) -> int:
    if args.what in ("all", "elementwise"):
        report = bench.stamp(bench.bench_elementwise(args.elements, args.device, args.repeat), args.device)
        path = bench.save_report(report, args.out)
        for name, r in report["results"].items():
            print(f"{name:>14}: {r['median_s'] * 1e3:8.2f} ms  ({r['ratio_to_torch_mul']:.2f}x torch.mul)")
        print(f"wrote {path}")
    if args.what in ("all", "layers"):
        report = bench.bench_layers(args.device, tuple(args.batches), args.gemm_size, tuple(args.multipliers),
                                    args.backends, args.rounds)
        print(f"wrote {bench.save_report(bench.stamp(report, args.device), args.out)}")
    return 0


def _add_train(sub) -> None:
    from ..multipliers import MAX_TRUNCATION

    p = sub.add_parser(
        "train", help="train a model on MNIST with an approximate multiplier",
        description="Train / validate / test a small CNN on MNIST with every multiplication approximate. "
                    "Writes results/runs/<run-name>/ (config.json, metrics.json, history.csv, checkpoint.pt). "
                    "Under `torchrun --nproc-per-node N` it trains with DistributedDataParallel.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    g = p.add_argument_group("model and arithmetic")
    g.add_argument("--preset", choices=["seed"], default=None,
                   help="'seed': the original experiment (SeedNet, batch 16, Adam lr 3e-3, StepLR(7, 0.1), "
                        "stratified 80/20 split with seed 123); explicit options override it")
    g.add_argument("--model", default=None, help="seednet, lenet5 or example (default: seednet)")
    g.add_argument("--multiplier", default=None,
                   help=f"exact, mitchell, mbm, or with truncation mbm-t16 / mitchell-t8 (t = 0..{MAX_TRUNCATION}); "
                        "default: mbm")
    g.add_argument("--backward", choices=["exact", "approx"], default=None,
                   help="gradient products exact (straight-through) or approximate too (default: exact)")
    g.add_argument("--exact-linear", dest="approx_linear", action="store_false", default=None,
                   help="keep the linear layers exact (only convolutions approximate)")
    g.add_argument("--backend", choices=["auto", "reference", "compiled", "triton"], default=None,
                   help="kernel backend (default: auto, or env MBMLIB_BACKEND)")
    g = p.add_argument_group("optimisation")
    g.add_argument("--epochs", type=int, default=None, help="epochs (default: 1)")
    g.add_argument("--batch-size", type=int, default=None, help="mini-batch size (default: 16)")
    g.add_argument("--lr", type=float, default=None, help="learning rate (default: 3e-3)")
    g.add_argument("--optimizer", choices=["adam", "sgd"], default=None, help="optimiser (default: adam)")
    g.add_argument("--step-size", type=int, default=None, help="StepLR step size in epochs (default: 7)")
    g.add_argument("--gamma", type=float, default=None, help="StepLR decay factor (default: 0.1)")
    g.add_argument("--seed", type=int, default=None, help="seed for initialisation, shuffling, dropout (default: 0)")
    g.add_argument("--max-steps", type=int, default=None, help="stop after this many optimiser steps in total")
    g = p.add_argument_group("data")
    g.add_argument("--data-dir", default=None,
                   help="torchvision-style root holding MNIST/raw/ (default: env MBMLIB_DATA, else ./data)")
    g.add_argument("--data-csv", default=None, help="train from a Kaggle-style CSV (label + 784 pixels) instead")
    g.add_argument("--train-samples", type=int, default=None,
                   help="use a stratified subset of this many training samples (default: all 48000)")
    g.add_argument("--val-samples", type=int, default=None, help="stratified subset of the validation split")
    g.add_argument("--test-samples", type=int, default=None, help="stratified subset of the test set")
    g.add_argument("--split-seed", type=int, default=None, help="seed of the stratified split (default: 123)")
    g = p.add_argument_group("run and output")
    g.add_argument("--device", default=None, help="cpu, cuda, cuda:N or auto (default: auto)")
    g.add_argument("--run-name", default=None,
                   help="folder name under --results-dir (default: <model>-<multiplier>-<backward>-b<batch>-<runtime>)")
    g.add_argument("--results-dir", default=None, help="where run folders go (default: results/runs)")
    g.add_argument("--resume", action="store_true", default=None, help="continue the run from its last checkpoint")
    g.add_argument("--log-interval", type=int, default=None, help="log the loss every N steps (default: 100)")
    g.add_argument("--no-progress", dest="progress", action="store_false", default=None,
                   help="no progress bar: one log line per epoch (for notebooks and logs)")
    g.add_argument("--speed-ratio-steps", type=int, default=None,
                   help="steps used to time the model against its exact twin at the end (0 = skip; default: 10)")
    p.set_defaults(func=_run_train)


def _run_train(args) -> int:
    from .train import TrainingDiverged, config_with_preset, train

    options = {k: v for k, v in vars(args).items() if k not in ("func", "command", "preset")}
    if options.get("backend") == "auto":
        options["backend"] = None
    try:
        cfg = config_with_preset(args.preset, **options)
        train(cfg)
    except (ValueError, FileNotFoundError, TrainingDiverged) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1 if isinstance(err, TrainingDiverged) else 2
    return 0


def parse_overrides(items: Sequence[str] | None) -> dict:
    """``["key=value", ...]`` -> dict; values are read as YAML (``512`` is an int, ``[a, b]`` a list, ``null`` None)."""
    import yaml

    out = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"--set expects key=value, got {item!r}")
        out[key.strip()] = yaml.safe_load(value) if value.strip() else ""
    return out



_SWEEP_EPILOG = """\
sweep file (YAML):
  sweep: demo                        name of the sweep (default: the file's name)
  notebook: notebooks/02_train_mnist.ipynb
  base: {model: seednet, epochs: 1}  parameters of every run
  grid: {multiplier: [exact, mitchell, mbm]}
                                     one run per combination of these lists
  name: "{model}-{multiplier}-{runtime}"
                                     run name template: parameters, {runtime}, {sweep}
  after: [notebooks/04_compare_runtimes.ipynb]
                                     notebooks run once at the end

Parameter names must be those of the notebook's 'parameters' cell. Outputs:
results/runs/<name>/<notebook>.ipynb per run and results/runs/sweep-<sweep>.json.
Exit status: 0 if every run succeeded, 1 if any failed, 2 for a bad sweep file.

examples:
  python -m mbmlib sweep experiments/demo.yaml --dry-run
  python -m mbmlib sweep experiments/demo.yaml --set train_samples=512 --set multiplier=[exact,mbm]
"""


def add_sweep_parser(subparsers) -> argparse.ArgumentParser:
    """Add the ``sweep`` subcommand to an argparse ``subparsers`` object."""
    p = subparsers.add_parser(
        "sweep", help="run a notebook over a grid of parameters with papermill (YAML sweep file)",
        description="Execute a parameterised notebook once per point of a parameter grid (papermill, kernel\n"
                    "python3, working directory = repository root), keep going past failed runs, then run the\n"
                    "sweep's 'after' notebooks once and print a summary.",
        epilog=_SWEEP_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("config", help="the sweep's YAML file, e.g. experiments/demo.yaml")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a base parameter (value read as YAML: 512, null, [a, b]); a grid key's "
                        "value replaces that axis; repeatable")
    p.add_argument("--dry-run", action="store_true", help="list the planned runs and their parameters; run nothing")
    p.add_argument("--results-dir", default=None,
                   help="where runs/ and the summary go (default: results/ in the repository root)")
    p.add_argument("--root", default=None,
                   help="repository root: notebook paths are relative to it and notebooks run in it "
                        "(default: found above the sweep file)")
    p.add_argument("--no-after", dest="run_after", action="store_false",
                   help="skip the sweep's 'after' notebooks")
    p.add_argument("--timeout", type=float, default=None,
                   help="seconds a single notebook cell may run before the run counts as failed (default: none)")
    p.add_argument("--kernel", default=KERNEL, help=f"Jupyter kernel name (default: {KERNEL})")
    p.set_defaults(func=_run_sweep_cli)
    return p


def _run_sweep_cli(args) -> int:
    try:
        summary = run_sweep(args.config, parse_overrides(args.overrides), dry_run=args.dry_run, root=args.root,
                            results_dir=args.results_dir, kernel_name=args.kernel, timeout=args.timeout,
                            run_after=args.run_after)
    except (ValueError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 1 if summary["failed"] else 0


def add_report_parser(subparsers) -> argparse.ArgumentParser:
    """Add the ``report`` subcommand: summarise every run and benchmark under a results folder.

"""
    p = subparsers.add_parser(
        "report", help="summarise results/ into summary.csv/.md and comparison figures",
        description="Read every results/runs/*/metrics.json (+ history.csv) and results/bench/*.json and write\n"
                    "summary.csv / summary.md, bench_summary.csv / .md and the comparison figures under\n"
                    "<results>/figures/ (what notebooks/04_compare_runtimes.ipynb does). Unreadable files are\n"
                    "skipped with a warning.",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--results-dir", default="results", help="the results folder to read and write into "
                                                             "(default: results)")
    p.add_argument("--no-figures", dest="figures", action="store_false", help="write the tables only")
    p.set_defaults(func=_run_report_cli)
    return p


def _run_report_cli(args) -> int:
    from . import plots, report  # pandas and matplotlib (the notebooks extra): only when a report is asked for

    results = report.load_results(args.results_dir)
    out = report.write_summary(args.results_dir, results=results)
    print(f"{len(out['table'])} run(s), {len(out['bench'])} timed benchmark case(s); wrote {out['csv']}, "
          f"{out['markdown']}, {out['bench_csv']}, {out['bench_markdown']}")
    if args.figures:
        for path in plots.comparison_figures(results, Path(args.results_dir) / "figures"):
            print(f"wrote {path}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m mbmlib",
                                     description="Approximate-multiplier (MBM, Mitchell) tools for PyTorch.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _add_train(sub)
    _add_bench(sub)
    add_sweep_parser(sub)
    add_report_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
