"""Everything a lent GPU should measure, in one command: ``python -m mbmlib.workflow.gpu_check`` (``make gpu-check``).

Steps, each a subprocess with its own time limit (together under 8 minutes): the CUDA test subset
(every Triton kernel against the reference on the device: float, integer, table, DRUM / L-Mul and
batched kernels), tile autotuning on the benchmark shapes of ``bench --sass`` (GEMM 4096^3, attention,
SeedNet layers; every tile the host may pick, timed, beside the host's pick), ``bench layers`` (SeedNet
layers at batch 16 and the 4096^3 GEMM) and one SeedNet epoch each for exact, MBM and Mitchell.
Results go under ``results/`` named by the device (:func:`mbmlib.workflow.runtime.runtime_label`):
``results/gpu/<runtime>/`` (test report, tiles, the check's summary), ``results/bench/layers-triton-<runtime>.json``,
``results/runs/gpu-check-<runtime>-<multiplier>/``.

``--dry-run`` (automatic without a CUDA device) plans and checks every step (its command parses, its files
exist, the limits add up) and prints the plan; the CUDA steps are skipped with a message.
"""
from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path
from typing import NamedTuple

__all__ = ["Step", "BUDGET_S", "plan", "check_plan", "run_plan", "autotune", "main"]

BUDGET_S = 480  # the whole check, planned: 8 minutes on one GPU
TEST_FILES = ("tests/test_kernels_triton.py", "tests/test_designs.py", "tests/test_drum_lmul_kernels.py",
              "tests/test_signed_tables.py")
TRAIN_MULTIPLIERS = ("exact", "mbm", "mitchell")


class Step(NamedTuple):
    """One step of the check: its name, what it shows, its time limit (s), the command, whether it needs CUDA."""
    name: str
    what: str
    limit_s: int
    command: tuple[str, ...]
    needs_cuda: bool = True


def plan(results: Path, label: str) -> list[Step]:
    """The check's steps for a device labelled ``label`` (e.g. ``gpu-nvidia-h100-80gb-hbm3``), results under
    ``results``."""
    py = (sys.executable,)
    folder = results / "gpu" / label
    steps = [
        Step("tests", "every Triton kernel against the reference on the device (float, integer, table, batched)",
             110, py + ("-m", "pytest", "-q", "-p", "no:cacheprovider", *TEST_FILES,
                        f"--junitxml={folder / 'tests.xml'}")),
        Step("autotune", "every tile the host may pick, timed on the benchmark shapes, beside the host's pick",
             70, py + ("-m", "mbmlib.workflow.gpu_check", "--autotune", str(folder / "tiles.json"))),
        Step("bench", "SeedNet layers at batch 16 and the 4096^3 GEMM: exact vs every backend x multiplier",
             100, py + ("-m", "mbmlib", "bench", "layers", "--batches", "16", "--gemm-size", "4096",
                        "--rounds", "3", "--backends", "triton", "--out", str(results / "bench"))),
    ]
    for mult in TRAIN_MULTIPLIERS:
        steps.append(Step(f"train-{mult}", f"one SeedNet epoch with {mult} products", 60,
                          py + ("-m", "mbmlib", "train", "--preset", "seed", "--multiplier", mult,
                                "--run-name", f"gpu-check-{label}-{mult}", "--runs-dir", str(results / "runs"),
                                "--overwrite")))
    return steps


def check_plan(steps: list[Step], root: Path) -> list[str]:
    """Problems of a plan (empty if none): over budget, a missing test file, a command the CLI refuses."""
    from .cli import build_parser

    problems = []
    total = sum(s.limit_s for s in steps)
    if total > BUDGET_S:
        problems.append(f"the steps' limits add up to {total} s, over the {BUDGET_S} s budget")
    for step in steps:
        args = list(step.command[1:])
        problems += [f"{step.name}: {f} is missing" for f in args if f.startswith("tests/") and not (root / f).exists()]
        if args[:2] == ["-m", "mbmlib"]:
            try:
                build_parser().parse_args(args[2:])
            except SystemExit:
                problems.append(f"{step.name}: python -m mbmlib refuses {' '.join(args[2:])}")
    return problems


def run_plan(steps: list[Step], cuda: bool, summary: Path) -> list[dict]:
    """Run the steps in order (each killed at its limit); without CUDA every CUDA step is skipped, said so."""
    from .store import write_json

    done = []
    for step in steps:
        if step.needs_cuda and not cuda:
            print(f"[skip] {step.name}: needs a CUDA device (dry run)", flush=True)
            done.append({"step": step.name, "status": "skipped: no CUDA device (dry run)"})
            continue
        print(f"[run ] {step.name} (limit {step.limit_s} s): {' '.join(step.command[1:])}", flush=True)
        t0 = time.perf_counter()
        try:
            rc = subprocess.run(step.command, timeout=step.limit_s).returncode
            status = "passed" if rc == 0 else f"failed (exit {rc})"
        except subprocess.TimeoutExpired:
            status = f"timed out after {step.limit_s} s"
        done.append({"step": step.name, "status": status, "seconds": round(time.perf_counter() - t0, 1)})
        print(f"[{'ok' if status == 'passed' else 'FAIL':4}] {step.name}: {status}", flush=True)
    if cuda:
        write_json(summary, {"steps": done})
    return done


def format_plan(steps: list[Step]) -> str:
    """The plan as printed (and quoted in the README): one line per step, its limit, then the total."""
    lines = [f"{i}. {s.name:15} <= {s.limit_s:3d} s  {s.what}" for i, s in enumerate(steps, 1)]
    lines.append(f"   total          <= {sum(s.limit_s for s in steps)} s (budget {BUDGET_S} s)")
    return "\n".join(lines)


def _cases(device):
    """(shape name, multiplier name, the tiles the host may pick, a call taking a tile) per benchmark shape."""
    import torch

    from ..kernels import triton as tk
    from ..multipliers import as_multiplier
    from .sass import SHAPES

    for name, shape in SHAPES.items():
        for mult in ("mbm",) if name != "gemm4096" else ("mbm", "mitchell"):  # each tile compiles: kept to 8 minutes
            m = as_multiplier(mult)
            if shape.kind == "gemm":
                g, rows, cols, k = shape.dims
                a, b = torch.rand(g, rows, k, device=device), torch.rand(g, cols, k, device=device)
                yield name, mult, tk.TILES, lambda t, a=a, b=b, m=m: tk.bmm_nt(a, b, m, _tile=t)
            else:
                x, w, p = torch.rand(shape.dims, device=device), torch.rand(shape.weight, device=device), shape.padding
                yield name, mult, tk.CONV_TILES, lambda t, x=x, w=w, m=m, p=p: tk.conv2d(
                    x, w, (1, 1), (p, p), (1, 1), 1, m, _tile=t)


def autotune(path: Path, rounds: int = 3) -> Path:
    """Time every tile the host may pick on each benchmark shape (CUDA), with the host's pick marked; write JSON."""
    import torch

    from ..kernels.triton import pick_tile
    from .bench import stamp
    from .sass import SHAPES, _gemm_mnk
    from .store import write_json
    from .timing import compare

    device = torch.device("cuda")
    rows = []
    for name, mult, tiles, call in _cases(device):
        _, m, n, _ = _gemm_mnk(SHAPES[name], "conv2d" if SHAPES[name].kind == "conv" else "gemm")
        host = pick_tile(m, n, tiles)
        timed = compare({t: (lambda t=t: call(t)) for t in tiles}, device, tiles[0], rounds=rounds)
        for t, r in timed.items():
            rows.append({"shape": name, "multiplier": mult, "tile": f"{t.tm}x{t.tn}/{t.num_warps}w",
                         "median_s": r["median_s"], "host_pick": t == host})
        print(f"{name:20} {mult:9} host {host.tm}x{host.tn}/{host.num_warps}w: "
              f"{timed[host]['median_s'] * 1e3:.3f} ms, best {min(r['median_s'] for r in timed.values()) * 1e3:.3f} ms",
              flush=True)
    return write_json(path, stamp({"benchmark": "tiles", "rounds": rounds, "results": rows}, "cuda"))


def main(argv: list[str] | None = None) -> int:
    """Plan, check and run the GPU check (``--dry-run``: plan and check only); 0 when every step passed."""
    import torch

    from .runtime import describe

    p = argparse.ArgumentParser(prog="python -m mbmlib.workflow.gpu_check", description=__doc__.split("\n\n")[0])
    p.add_argument("--dry-run", action="store_true", help="plan and check every step, run none (automatic without "
                                                          "a CUDA device)")
    p.add_argument("--results", default="results", help="results root (default: results)")
    p.add_argument("--autotune", metavar="JSON", help=argparse.SUPPRESS)  # the autotune step's own entry point
    args = p.parse_args(argv)
    if args.autotune:
        print(f"wrote {autotune(Path(args.autotune))}")
        return 0
    cuda = torch.cuda.is_available() and not args.dry_run
    label = describe("auto")["runtime"]  # the device's name: gpu-nvidia-..., or this CPU's in a dry run
    steps = plan(Path(args.results), label)
    print(f"gpu-check for {label}{'' if cuda else ' (dry run: CUDA steps skipped)'}\n{format_plan(steps)}")
    problems = check_plan(steps, Path(__file__).resolve().parents[2])
    for problem in problems:
        print(f"plan problem: {problem}")
    if problems:
        return 2
    done = run_plan(steps, cuda, Path(args.results) / "gpu" / label / "gpu-check.json")
    return 0 if all(d["status"] in ("passed",) or d["status"].startswith("skipped") for d in done) else 1


if __name__ == "__main__":
    sys.exit(main())
