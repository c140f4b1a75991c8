"""Command line: ``python -m mbmlib bench|train|sweep``."""
from __future__ import annotations

import argparse
import sys


def _add_bench(sub) -> None:
    p = sub.add_parser("bench", help="measure throughput on this machine and write JSON to results/bench/",
                       description="Time exact vs approximate ops in one run; ratios are to the exact op.")
    p.add_argument("what", nargs="?", default="all", choices=["all", "elementwise", "layers"],
                   help="which benchmark to run (default: all)")
    p.add_argument("--device", default="auto", help="cpu, cuda or auto (default: auto)")
    p.add_argument("--out", default="results/bench", help="output folder (default: results/bench)")
    p.add_argument("--elements", type=int, default=10_000_000, help="elementwise benchmark size (default: 1e7)")
    p.add_argument("--repeat", type=int, default=5, help="timed repetitions per case; the median is kept")
    p.set_defaults(func=_run_bench)


def _run_bench(args) -> int:
    from . import bench

    if args.what in ("all", "elementwise"):
        report = bench.stamp(bench.bench_elementwise(args.elements, args.device, args.repeat), args.device)
        path = bench.save_report(report, args.out)
        for name, r in report["results"].items():
            print(f"{name:>14}: {r['median_s'] * 1e3:8.2f} ms  ({r['ratio_to_torch_mul']:.2f}x torch.mul)")
        print(f"wrote {path}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m mbmlib",
                                     description="Approximate-multiplier (MBM, Mitchell) tools for PyTorch.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _add_bench(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
