"""Command line: ``python -m mbmlib train|bench|sweep|report|evaluate|sensitivity|designs|explore`` (``--designs`` first
registers users' own designs; ``--evoapprox-dir`` names the EvoApproxLib checkout ``evoapprox:<circuit>`` reads).

:func:`main` is the one error boundary: every expected failure becomes a one-line
message on stderr and a documented exit status (see ``EXIT_CODES``).
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Sequence

from ..multipliers.evoapprox import EVOAPPROX_ENV
from . import bench, plugins
from .store import claim_result_files
from .config import add_config_arguments, config_from_args
from .sweep import KERNEL, run_sweep
from .train import TrainingDiverged, train

EXIT_CODES = """exit status: 0 done, 1 training diverged (loss NaN/inf), 2 bad input (options, files, data),
3 interrupted or another failure (MBMLIB_DEBUG=1 shows its traceback)"""


def _add_bench(sub) -> None:
    p = sub.add_parser("bench", help="measure throughput on this machine and write JSON to results/bench/",
                       description="Time exact vs approximate ops in one run; ratios are to the exact op.",
                       epilog=EXIT_CODES)
    p.add_argument("what", nargs="?", default="all", choices=["all", "elementwise", "layers"],
                   help="which benchmark to run (default: all)")
    p.add_argument("--device", default="auto", help="cpu, cuda or auto (default: auto)")
    p.add_argument("--out", default="results/bench", help="output folder (default: results/bench)")
    p.add_argument("--elements", type=int, default=10_000_000, help="elementwise benchmark size (default: 1e7)")
    p.add_argument("--repeat", type=int, default=5, help="elementwise: timed repetitions; the median is kept")
    p.add_argument("--batches", type=int, nargs="+", default=[16, 128], help="layers: batch sizes (default: 16 128)")
    p.add_argument("--gemm-size", type=int, default=2048, help="layers: size of the square GEMM, 0 to skip")
    p.add_argument("--rounds", type=int, default=5, help="layers: interleaved timing rounds; medians are kept")
    p.add_argument("--attention", type=int, nargs=2, default=[4, 4], metavar=("BATCH", "HEADS"),
                   help="layers: batch and heads of the attention rows (Q K^T and P V at 256 tokens x 64; default: "
                        "4 4)")
    p.add_argument("--no-attention", action="store_true", help="layers: leave out the attention rows")
    p.add_argument("--multipliers", nargs="+", default=["mitchell", "mbm", "mbm-int8"],
                   help="layers: multipliers to time; integer and table ones (mbm-int8, table:<file.csv>) run as "
                        "quantised layers (default: mitchell mbm mbm-int8)")
    p.add_argument("--backends", nargs="+", default=None,
                   help="layers: backends to time (default: every one usable on the device)")
    p.add_argument("--sass", action="store_true",
                   help="instead of timing: compile every Triton kernel ahead of time for sm_75/sm_80/sm_90 (no GPU "
                        "needed), read its K loop's SASS and write results/bench/sass-<arch>.json (ceilings, not "
                        "timings)")
    p.set_defaults(func=_run_bench)


def _run_bench(args) -> int:
    if args.sass:
        from . import sass  # loads Triton and its compiler: only for this report

        for path in sass.write_reports(args.out):
            print(f"wrote {path}")
        return 0
    if args.what in ("all", "layers"):  # a bad layer option fails before the elementwise run, not after it
        bench.check_layer_options(args.batches, args.gemm_size, args.multipliers, args.backends, args.rounds,
                                  _attention(args))
    if args.what in ("all", "elementwise"):
        report = bench.stamp(bench.bench_elementwise(args.elements, args.device, args.repeat), args.device)
        path = bench.save_report(report, args.out)
        for name, r in report["results"].items():
            print(f"{name:>14}: {r['median_s'] * 1e3:8.2f} ms  ({r['ratio_to_torch_mul']:.2f}x torch.mul)")
        print(f"wrote {path}")
    if args.what in ("all", "layers"):
        report = bench.bench_layers(args.device, tuple(args.batches), args.gemm_size, tuple(args.multipliers),
                                    args.backends, args.rounds, attention=_attention(args))
        print(f"wrote {bench.save_report(bench.stamp(report, args.device), args.out)}")
    return 0


def _attention(args):
    """(batch, heads) of the bench's attention rows, or None with --no-attention."""
    return None if args.no_attention else tuple(args.attention)


def _add_train(sub) -> None:
    p = sub.add_parser(
        "train", help="train a model (MNIST by default) with an approximate multiplier",
        description="Train / validate / test a model with every multiplication approximate: an image classifier "
                    "(SeedNet on MNIST by default, vit-tiny, ...) or the character-level language model gpt-char "
                    "on --dataset stdlib-chars (scored in bits per character; an epoch is --epoch-steps steps). "
                    "Writes results/runs/<run-name>/ (config.json, metrics.json, history.csv, checkpoint.pt). "
                    "Under `torchrun --nproc-per-node N` it trains with DistributedDataParallel.",
        epilog=EXIT_CODES)
    add_config_arguments(p)
    p.set_defaults(func=_run_train)


def _run_train(args) -> int:
    train(config_from_args(args))
    return 0


def parse_overrides(items: Sequence[str] | None) -> dict:
    """``["key=value", ...]`` -> dict; values are read as YAML (``512`` is an int, ``[a, b]`` a list, ``null`` None)."""
    import yaml

    out = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"--set expects key=value, got {item!r}")
        try:
            out[key.strip()] = yaml.safe_load(value) if value.strip() else ""
        except yaml.YAMLError as err:
            raise ValueError(f"--set {item!r}: the value is not valid YAML ({' '.join(str(err).split())}); "
                             "quote it or fix the brackets, e.g. --set 'multiplier=[exact, mbm]'") from None
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
    summary = run_sweep(args.config, parse_overrides(args.overrides), dry_run=args.dry_run, root=args.root,
                        results_dir=args.results_dir, kernel_name=args.kernel, timeout=args.timeout,
                        run_after=args.run_after)
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

    if not Path(args.results_dir).is_dir():
        raise FileNotFoundError(f"results folder {args.results_dir} does not exist; pass --results-dir with the "
                                "folder that holds runs/ and bench/")
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
    parser.add_argument("--designs", action="append", default=[], metavar="FILE.py",
                        help="a Python file that registers your own designs (mbmlib.register_design) before the "
                             f"command runs (repeat for more); also env {plugins.ENV_VAR} (paths separated by "
                             f"'{os.pathsep}')")
    _add_evoapprox_option(parser, None)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _add_train(sub)
    _add_bench(sub)
    add_sweep_parser(sub)
    add_report_parser(sub)
    _add_evaluate(sub)
    _add_sensitivity(sub)
    _add_designs(sub)
    _add_explore(sub)
    return parser


def _add_evoapprox_option(p, default) -> None:
    """``--evoapprox-dir``: on the main parser and on the commands that take multipliers (there without a default,
    so that it does not hide the main parser's value)."""
    p.add_argument("--evoapprox-dir", default=default, metavar="DIR",
                   help="a checkout of github.com/ehw-fit/evoapproxlib (branch v2022) where evoapprox:<circuit> "
                        f"names are looked up (default: ${EVOAPPROX_ENV})")


def _add_designs(sub) -> None:
    p = sub.add_parser("designs", help="the design catalogue: every design of one width with its error and "
                                       "published cost",
                       description="Error statistics over every operand pair and the published relative power/area "
                                   "of every registered integer design of --bits (MBM, Mitchell, DRUM-k, your own) "
                                   "and every EvoApproxLib circuit of that width in the checkout; CSV and markdown "
                                   "to results/tables/, the Pareto figure to results/figures/.", epilog=EXIT_CODES)
    p.add_argument("--bits", type=int, default=8, help="operand width (default: 8)")
    p.add_argument("--out", default="results/tables", help="table folder (default: results/tables)")
    p.add_argument("--figures", default="results/figures", help="figure folder (default: results/figures)")
    p.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")
    _add_evoapprox_option(p, argparse.SUPPRESS)
    p.set_defaults(func=_run_designs)


def _run_designs(args) -> int:
    from .catalogue import catalogue, save_catalogue, checkout_description

    table = catalogue(args.bits, args.evoapprox_dir, args.progress)
    for kind, path in save_catalogue(table, args.bits, checkout_description(args.evoapprox_dir), args.out,
                                     args.figures).items():
        print(f"wrote {kind}: {path}")
    return 0


def main(argv: list[str] | None = None) -> int:
    """Run one command; expected failures become one line on stderr and the exit status of ``EXIT_CODES``."""
    args = build_parser().parse_args(argv)
    try:
        if args.evoapprox_dir:
            os.environ[EVOAPPROX_ENV] = str(Path(args.evoapprox_dir).expanduser().resolve())
        _load_designs(args.designs)
        return args.func(args)
    except Exception as err:
        if os.environ.get("MBMLIB_DEBUG") == "1":
            raise
        code, message = _failure(err)
    except KeyboardInterrupt:
        code, message = 3, "interrupted; a run continues from its last finished epoch with --resume"
    print(f"error: {message}", file=sys.stderr)
    return code


def _load_designs(files: list[str]) -> None:
    """Register the user designs of ``--designs`` and ``$MBMLIB_DESIGNS``; the env var carries the files on to the
    processes the command starts (sweep's notebooks, torchrun's workers)."""
    plugins.load_design_files()
    if files:
        plugins.load_design_files(files)
        known = [p for p in os.environ.get(plugins.ENV_VAR, "").split(os.pathsep) if p]
        os.environ[plugins.ENV_VAR] = os.pathsep.join(known + [str(Path(f).resolve()) for f in files])


def _failure(err: Exception) -> tuple[int, str]:
    """(exit status, message) of an exception that ended a command."""
    if isinstance(err, TrainingDiverged):
        return 1, str(err)
    if isinstance(err, OSError) and err.filename is not None:
        return 2, f"cannot create or open {err.filename}: {err.strerror}; check the option that names this path"
    if isinstance(err, (ValueError, TypeError, FileNotFoundError)):
        return 2, str(err)
    first = (str(err).splitlines() or [""])[0]
    return 3, f"{type(err).__name__}: {first} (MBMLIB_DEBUG=1 shows the traceback)"


def _add_model_and_data(p) -> None:
    """Options shared by ``evaluate`` and ``sensitivity``: which weights, which data, where results go."""
    p.add_argument("--model", default="seednet", help="seednet, lenet5, example, vit-tiny, resnet20, resnet8, a "
                                                      "torchvision.models name (resnet18, mobilenet_v2, ...) or "
                                                      "gpt-char (on stdlib-chars)")
    p.add_argument("--dataset", default="mnist", help="mnist, fashion-mnist, kmnist, cifar10, cifar100, svhn, "
                                                      "imagefolder:<path>, fake or stdlib-chars (a text corpus, "
                                                      "for gpt-char) (default: mnist)")
    p.add_argument("--checkpoint", default=None, help="state dict to load: a file from torch.save(model.state_dict()) "
                                                      "or a run's checkpoint.pt")
    p.add_argument("--pretrained", action="store_true", help="torchvision's default pretrained weights")
    p.add_argument("--data-dir", default=None, help="data root (default: $MBMLIB_DATA, else ./data)")
    p.add_argument("--split", default="test", choices=["test", "val"], help="which split to score (default: test)")
    p.add_argument("--samples", type=int, default=None, help="a stratified subset of the split (default: all; a "
                                                             "text corpus: that many windows, default 256)")
    p.add_argument("--batch-size", type=int, default=128, help="evaluation batch size (default: 128)")
    p.add_argument("--device", default="auto", help="cpu, cuda or auto (default: auto)")
    p.add_argument("--out", default="results/eval", help="JSON/CSV folder (default: results/eval)")
    p.add_argument("--figures", default="results/figures", help="figure folder (default: results/figures)")
    p.add_argument("--name", default=None, help="file name stem of the results (default: model-dataset-...)")
    p.add_argument("--overwrite", action="store_true", help="move earlier results of the same name to .replaced/ "
                                                            "first (without it, existing results are refused)")
    p.add_argument("--random-weights", action="store_true", help="score freshly initialised weights (without it, "
                                                                 "--checkpoint or --pretrained is required)")
    p.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")


def _check_weights(args) -> None:
    """Refuse to score random weights by accident: one of --checkpoint, --pretrained, --random-weights."""
    if args.checkpoint is None and not args.pretrained and not args.random_weights:
        raise ValueError("no weights given: pass --checkpoint FILE (a state dict or a run's checkpoint.pt) or "
                         "--pretrained; --random-weights scores a freshly initialised model on purpose")


def _add_evaluate(sub) -> None:
    p = sub.add_parser("evaluate", help="top-1/top-5 accuracy and loss of one model under several multipliers",
                       description="Load a model's weights once, then score it on a dataset split with each "
                                   "multiplier (exact first, the baseline); JSON/CSV to results/eval/, a bar chart "
                                   "to results/figures/eval-<name>.png.", epilog=EXIT_CODES)
    _add_model_and_data(p)
    _add_evoapprox_option(p, argparse.SUPPRESS)
    p.add_argument("--multipliers", nargs="+", default=None,
                   help="multipliers to score, e.g. exact mitchell mbm mbm-t16 mbm-int8 (default: exact mitchell mbm; "
                        "with --multiplier-map: exact)")
    p.add_argument("--multiplier-map", nargs="+", default=[], metavar="FILE.json",
                   help="assignment files (a JSON \"multipliers\" object of layer patterns to multipliers, as explore "
                        "writes them) to score too, each as a row map:<file stem>")
    p.set_defaults(func=_run_evaluate)


def _run_evaluate(args) -> int:
    from .evaluate import evaluate_multipliers, result_paths, save_results

    _check_weights(args)
    claim_result_files(result_paths(args.model, args.dataset, args.split, args.out, args.figures, args.name).values(),
                       args.overwrite)
    multipliers = args.multipliers or (["exact"] if args.multiplier_map else ["exact", "mitchell", "mbm"])
    report = evaluate_multipliers(args.model, args.dataset, multipliers, args.checkpoint, args.pretrained,
                                  args.data_dir, args.split, args.samples, args.batch_size, args.device,
                                  progress=args.progress, multiplier_maps=args.multiplier_map)
    for kind, path in save_results(report, args.out, args.figures, args.name).items():
        print(f"wrote {kind}: {path}")
    return 0


def _add_sensitivity(sub) -> None:
    p = sub.add_parser("sensitivity", help="accuracy drop when one layer at a time uses the approximate multiplier",
                       description="With the rest exact, make one layer at a time approximate and measure the "
                                   "top-1 drop against exact; then the --top most tolerant layers together, then "
                                   "all. Table and JSON to results/eval/, figure to results/figures/.",
                       epilog=EXIT_CODES)
    _add_model_and_data(p)
    _add_evoapprox_option(p, argparse.SUPPRESS)
    p.add_argument("--multiplier", default="mbm", help="the approximate multiplier (default: mbm)")
    p.add_argument("--layers", nargs="+", default=None, help="glob patterns of the layers to try (default: every "
                                                             "layer convert can make approximate: Conv2d/Linear "
                                                             "and each attention's in_proj, qk, pv, out_proj)")
    p.add_argument("--top", type=int, default=3, help="how many of the most tolerant layers to combine (default: 3)")
    p.set_defaults(func=_run_sensitivity)


def _run_sensitivity(args) -> int:
    from .sensitivity import run_sensitivity, save_sensitivity, sensitivity_paths

    _check_weights(args)
    if args.top < 0:
        raise ValueError(f"--top must be 0 or more (how many of the most tolerant layers to combine), got {args.top}")
    claim_result_files(sensitivity_paths(args.model, args.dataset, args.multiplier, args.out, args.figures,
                                         args.name).values(), args.overwrite)
    report = run_sensitivity(args.model, args.dataset, args.multiplier, args.checkpoint, args.pretrained,
                             args.data_dir, args.split, args.samples, args.batch_size, args.device, args.layers,
                             args.top, args.progress)
    for kind, path in save_sensitivity(report, args.out, args.figures, args.name).items():
        print(f"wrote {kind}: {path}")
    return 0


def _add_explore(sub) -> None:
    p = sub.add_parser("explore", help="search per-layer design assignments for the most energy saved within an "
                                       "accuracy loss",
                       description="Multi-objective search (Optuna's NSGA-II) over assignments of the given designs "
                                   "(or exact) to every Conv2d/Linear layer: top-1 on held-out validation images "
                                   "against the model's relative multiplier energy (published costs, or --cost). "
                                   "Writes results/explore/<name>/ (every point, the Pareto front, one assignment "
                                   "file per front point) and results/figures/explore-<name>.png; the front's points "
                                   "within --max-loss are re-scored on the test split.", epilog=EXIT_CODES)
    _add_model_and_data(p)
    _add_evoapprox_option(p, argparse.SUPPRESS)
    p.set_defaults(out="results/explore", samples=1000)
    for action in p._actions:  # the shared options' help, as explore reads them
        if action.dest in ("samples", "out", "split"):
            action.help = {"samples": "held-out validation images the search scores on (default: 1000)",
                           "out": "results folder (default: results/explore)",
                           "split": "explore searches on validation images and re-scores on the test split: leave "
                                    "it"}[action.dest]
    p.add_argument("--designs", dest="candidates", nargs="+", required=True, metavar="DESIGN",
                   help="the designs a layer may get besides exact, e.g. mbm mitchell mbm-int8 evoapprox:mul8s_1L2J")
    p.add_argument("--max-loss", type=float, default=1.0, help="top-1 points a point may lose against exact and "
                                                                "stay feasible (default: 1.0)")
    p.add_argument("--evaluations", type=int, default=300, help="distinct assignments to score, the uniform and "
                                                                "one-layer ones included (default: 300)")
    p.add_argument("--population", type=int, default=30, help="NSGA-II population size (default: 30)")
    p.add_argument("--seed", type=int, default=0, help="seed of the search (default: 0)")
    p.add_argument("--cost", action="append", default=[], metavar="NAME=RELATIVE_POWER",
                   help="a relative power for a design without a published one (recorded as user-given); repeatable")
    p.add_argument("--cost-file", action="append", default=[], metavar="FILE.csv",
                   help="user-given costs as a CSV with columns design,relative_power")
    p.add_argument("--test-samples", type=int, default=None, help="test images the front's points are re-scored "
                                                                  "on (default: all)")
    p.add_argument("--finetune", type=int, default=0, metavar="E", help="fine-tune each front point within the loss "
                                                                        "for E epochs before its test score (default: 0)")
    p.add_argument("--finetune-samples", type=int, default=None, help="training images for --finetune (default: all)")
    p.add_argument("--finetune-lr", type=float, default=1e-4, help="Adam learning rate of --finetune (default: 1e-4)")
    p.set_defaults(func=_run_explore)


def _run_explore(args) -> int:
    from .explore import design_costs, explore_paths, parse_costs, run_explore, save_explore

    _check_weights(args)
    if args.split != "test":
        raise ValueError("explore searches on the validation split and re-scores on the test split; drop --split")
    costs = parse_costs(args.cost, args.cost_file)
    design_costs(args.candidates, costs)  # a design without a cost is refused before anything is claimed or loaded
    claim_result_files(explore_paths(args.model, args.dataset, args.out, args.figures, args.name).values(),
                       args.overwrite)
    report = run_explore(args.model, args.dataset, args.candidates, args.checkpoint, args.pretrained, args.data_dir,
                         args.samples, args.test_samples, args.max_loss, args.evaluations, args.seed, args.population,
                         costs, args.finetune, args.finetune_samples, args.finetune_lr, args.batch_size, args.device,
                         progress=args.progress)
    for row in report["summary"]:
        print(f"within {row['max_loss']:g} points: best energy {row['best_energy']:.3f} (top-1 {row['best_top1']:.2f}%)"
              f", best uniform {row['uniform']} {row['uniform_energy']:.3f} (top-1 {row['uniform_top1']:.2f}%)")
    for kind, path in save_explore(report, args.out, args.figures, args.name).items():
        print(f"wrote {kind}: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
