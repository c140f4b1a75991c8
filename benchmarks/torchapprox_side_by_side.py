"""mbmlib's CPU table kernels side by side with TorchApprox's (issue 22): same table, same outputs, paired timings.

TorchApprox (github.com/etrommer/torch-approx) multiplies int8 operands through a 256 x 256 int32 lookup table
read as ``lut[uint8(a)][uint8(b)]``: indexed by the operands' two's-complement bytes, the convention of mbmlib's
signed tables (``T[a mod 256, b mod 256]``).  Both sides get the signed table of mbmlib's ``mbm-int8`` design;
before any timing, all 65,536 int8 pairs are multiplied through both kernels and checked against the design.

Cases: SeedNet conv2 at batch 16 and a 1024 x 1024 x 1024 GEMM on random int8 operands.  mbmlib runs its
``compiled`` backend (``kernels.conv2d_int``, ``bmm_nt_int``: exact sums, float64); TorchApprox runs the path its
own layers take on the CPU (``_im2col_conv2d`` for ApproxConv2d, ``approx`` with one row per batch entry for
ApproxLinear), without their quantisation around it.  The weight operand is the same tensor every round, so
mbmlib's kernels reuse what they prepared from it, as in a layer's evaluation.  Rounds alternate the two sides;
both use the same torch threads (TorchApprox's OpenMP loop shares torch's libgomp).  Fetching and building
TorchApprox is the user's step: see benchmarks/README.md.

    python benchmarks/torchapprox_side_by_side.py /tmp/ta-site [--out DIR] [--rounds N] [--threads N]
"""
from __future__ import annotations

import argparse
import importlib
import json
import statistics
import subprocess
import sys
from importlib.metadata import distribution
from pathlib import Path
from urllib.parse import unquote, urlparse

import torch

import mbmlib
from mbmlib import kernels
from mbmlib.multipliers import Multiplier, as_multiplier
from mbmlib.multipliers.integer import approx_mul_int
from mbmlib.workflow.bench import save_report, stamp
from mbmlib.workflow.timing import compare

DESIGN = "mbm-int8"
BACKEND = "compiled"
TARGET = 5.0  # issue 22: mbmlib at least this many times faster than TorchApprox
CPU = torch.device("cpu")
FETCH_HINT = ("fetch and build it first: git clone https://github.com/etrommer/torch-approx /tmp/torchapprox && "
              "pip install --no-deps --target /tmp/ta-site /tmp/torchapprox (see benchmarks/README.md)")


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("peer", type=Path, help="folder TorchApprox is installed in (pip install --target)")
    parser.add_argument("--out", type=Path, default=Path("results/bench/torchapprox"), help="folder of the JSON")
    parser.add_argument("--rounds", type=int, default=9, help="timed rounds per case, each side once a round")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads(), help="torch threads, both sides")
    args = parser.parse_args(argv)
    if args.rounds < 1 or args.threads < 1:
        parser.error(f"--rounds and --threads must be >= 1, got {args.rounds} and {args.threads}")
    return args


def import_peer(path: Path):
    """TorchApprox's backend and conv2d modules, imported from ``path`` (its C++ kernel is built on first import)."""
    if not path.is_dir():
        raise SystemExit(f"{path}: no such folder; {FETCH_HINT}")
    sys.path.insert(0, str(path.resolve()))
    try:
        backend = importlib.import_module("torchapprox.operators.backend")
        conv = importlib.import_module("torchapprox.operators.conv2d")
    except Exception as err:  # not installed there (PackageNotFoundError), or its kernel failed to build
        reason = (str(err).splitlines() or [""])[0]
        raise SystemExit(f"cannot import TorchApprox from {path} ({type(err).__name__}: {reason}); {FETCH_HINT}")
    if not Path(backend.__file__).resolve().is_relative_to(path.resolve()):
        raise SystemExit(f"torchapprox was imported from {backend.__file__}, not from {path}; {FETCH_HINT}")
    return backend, conv


def git_head(folder: Path) -> str | None:
    done = subprocess.run(["git", "-C", str(folder), "rev-parse", "HEAD"], capture_output=True, text=True)
    return done.stdout.strip() if done.returncode == 0 else None


def peer_commit() -> str | None:
    """The commit TorchApprox was installed from: pip's record of a git URL, else the HEAD of the checkout it names."""
    origin = json.loads(distribution("torchapprox").read_text("direct_url.json") or "{}")
    if "vcs_info" in origin:
        return origin["vcs_info"].get("commit_id")
    url = urlparse(origin.get("url", ""))
    return git_head(Path(unquote(url.path))) if url.scheme == "file" else None


def mbmlib_source() -> dict:
    """mbmlib's commit, and whether its package differs from it (kernels timed before they are committed)."""
    root = Path(mbmlib.__file__).resolve().parent.parent
    status = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--", "mbmlib"], capture_output=True,
                            text=True).stdout
    return {"commit": git_head(root), "package_modified": bool(status.strip()), "backend": BACKEND}


def signed_table(design: str) -> tuple[torch.Tensor, torch.Tensor]:
    """The design's products of every int8 pair by value (256 x 256, row a + 128), and the same products as a signed
    table indexed by two's-complement bytes, ``T[a mod 256, b mod 256]``."""
    values = torch.arange(-128, 128)
    products = approx_mul_int(values[:, None], values[None, :], as_multiplier(design))
    table = torch.empty_like(products)
    index = values & 255
    table[index[:, None], index[None, :]] = products
    return products, table


def check_every_pair(products: torch.Tensor, mult: Multiplier, lut: torch.Tensor, peer) -> int:
    """Multiply all int8 pairs through both kernels (K = 1); SystemExit unless both give the design's products."""
    values = torch.arange(-128, 128, dtype=torch.int8)
    ours = kernels.load(BACKEND).bmm_nt_int(values.view(1, 256, 1), values.view(1, 256, 1), mult)[0]
    theirs = peer.approx(values.view(256, 1, 1), values.view(1, 256), lut)[:, 0, :]
    for side, grid in (("mbmlib", ours), ("TorchApprox", theirs)):
        wrong = (grid.to(torch.int64) != products).nonzero()
        if len(wrong):
            a, b = (int(i) - 128 for i in wrong[0])
            raise SystemExit(f"{side} multiplies {a} x {b} as {int(grid[a + 128, b + 128])}, the table says "
                             f"{int(products[a + 128, b + 128])}: the two sides would not compute the same products")
    return products.numel()


def conv_case(gen: torch.Generator, mult: Multiplier, table: torch.Tensor, peer_conv) -> dict:
    """SeedNet conv2 at batch 16: (16, 32, 28, 28) * (64, 32, 3, 3), padding 1."""
    x = torch.randint(-128, 128, (16, 32, 28, 28), generator=gen, dtype=torch.int8)
    w = torch.randint(-128, 128, (64, 32, 3, 3), generator=gen, dtype=torch.int8)
    # TorchApprox's layer hands its conv rounded float operands, and its conv reads lut[weight][input] where
    # mbmlib's reads T[input, weight]: the transposed table (the same one for a symmetric table like MBM's)
    args = peer_conv.Conv2dArgs(32, 64, (3, 3), (1, 1), (1, 1), (1, 1), 1)
    lut_wx, xf, wf = table.T.to(torch.int32).contiguous(), x.float(), w.float()
    return {"name": "seednet.conv2@b16", "macs": 16 * 64 * 28 * 28 * 32 * 9,
            "mbmlib": lambda: kernels.conv2d_int(BACKEND, x, w, (1, 1), (1, 1), (1, 1), 1, mult, ranged=True),
            "torchapprox": lambda: peer_conv._im2col_conv2d(xf, wf, args, lut_wx, (28, 28), None)}


def gemm_case(gen: torch.Generator, mult: Multiplier, table: torch.Tensor, peer) -> dict:
    """A (1024, 1024) @ (1024, 1024) GEMM; TorchApprox gets the layout of its ApproxLinear: (M, 1, K) and (K, N)."""
    a = torch.randint(-128, 128, (1024, 1024), generator=gen, dtype=torch.int8)
    b = torch.randint(-128, 128, (1024, 1024), generator=gen, dtype=torch.int8)  # (N, K): b.t() is (K, N)
    lut = table.to(torch.int32)
    return {"name": "gemm1024", "macs": 1024**3,
            "mbmlib": lambda: kernels.load(BACKEND).bmm_nt_int(a[None], b[None], mult, ranged=True),
            "torchapprox": lambda: peer.approx(a[:, None, :], b.t(), lut)}


def agreement(ours: torch.Tensor, theirs: torch.Tensor) -> dict:
    """Exact comparison of the sums: identical, or how many differ, the largest difference and where."""
    theirs = theirs.to(torch.float64).reshape(ours.shape)
    diff = (ours - theirs).abs()
    if not bool(diff.any()):
        return {"identical": True}
    where = [int(i) for i in torch.unravel_index(diff.argmax(), diff.shape)]
    return {"identical": False, "differing": int((diff > 0).sum()), "max_abs_difference": diff.max().item(),
            "at": where, "mbmlib_value": ours[tuple(where)].item(), "torchapprox_value": theirs[tuple(where)].item()}


def time_case(case: dict, rounds: int) -> dict:
    """Paired rounds (mbmlib, then TorchApprox, each round) after one untimed round: medians, minima, and the
    ratio TorchApprox / mbmlib of each round (above 1: mbmlib is faster)."""
    fns = {"mbmlib": case["mbmlib"], "torchapprox": case["torchapprox"]}
    per_round = [compare(fns, CPU, "mbmlib", rounds=1, warmup=0) for _ in range(rounds + 1)][1:]
    result = {"name": case["name"], "macs": case["macs"]}
    for side in fns:
        times = [r[side]["median_s"] for r in per_round]
        result[side] = {"median_s": statistics.median(times), "min_s": min(times), "times_s": times,
                        "gmac_per_s": case["macs"] / statistics.median(times) / 1e9}
    ratios = [r["torchapprox"]["ratio_to_exact"] for r in per_round]
    result.update(ratio_per_round=ratios, ratio_median=statistics.median(ratios),
                  ratio_of_minima=result["torchapprox"]["min_s"] / result["mbmlib"]["min_s"])
    result["meets_target"] = result["ratio_median"] >= TARGET
    return result


def measured(case: dict, rounds: int) -> dict:
    """One case: its outputs compared (which also warms both sides up), then timed; a line of it printed."""
    same = agreement(case["mbmlib"](), case["torchapprox"]())
    result = {**time_case(case, rounds), "outputs": same}
    outputs = "identical outputs" if same["identical"] else "OUTPUTS DIFFER " + json.dumps(same)
    print(f"{case['name']}: {outputs}; TorchApprox / mbmlib {result['ratio_median']:.2f} (median of {rounds} "
          f"rounds), mbmlib {result['mbmlib']['median_s'] * 1e3:.1f} ms, TorchApprox "
          f"{result['torchapprox']['median_s'] * 1e3:.1f} ms (median)")
    return result


def run(args: argparse.Namespace) -> dict:
    """The whole comparison, as a stamped report."""
    torch.set_num_threads(args.threads)
    peer, peer_conv = import_peer(args.peer)
    products, table = signed_table(DESIGN)
    mult = Multiplier.from_table(table, signed=True)
    pairs = check_every_pair(products, mult, table.to(torch.int32), peer)
    gen = torch.Generator().manual_seed(0)
    cases = [conv_case(gen, mult, table, peer_conv), gemm_case(gen, mult, table, peer)]
    report = {"benchmark": "torchapprox-side-by-side", "design": DESIGN, "threads": args.threads,
              "rounds": args.rounds, "target_ratio": TARGET, "mbmlib": mbmlib_source(),
              "torchapprox": {"commit": peer_commit(), "installed_in": str(args.peer.resolve()),
                              "extension": peer.ta_backend.__file__},
              "table": {"signed": True, "digest": mult.key, "pairs_checked": pairs},
              "cases": [measured(case, args.rounds) for case in cases]}
    return stamp(report, "cpu")


def main(argv=None) -> int:
    args = parse_args(argv)
    report = run(args)
    print(f"wrote {save_report(report, args.out)}")
    return 0 if all(case["outputs"]["identical"] for case in report["cases"]) else 1


if __name__ == "__main__":
    sys.exit(main())
