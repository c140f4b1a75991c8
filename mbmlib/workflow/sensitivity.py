"""Which layers tolerate an approximate multiplier: ``python -m mbmlib sensitivity``.

With the rest of the model exact, one layer at a time uses the approximate multiplier and the
accuracy drop against the all-exact baseline is measured; then the ``top`` most tolerant layers
(smallest drop) are made approximate together, and finally every layer.  The layers are those
:func:`mbmlib.convert` can target (:func:`mbmlib.nn.approximable_layers`): in a transformer each
attention's ``in_proj``, ``qk`` (Q K^T), ``pv`` (softmax(.) V) and ``out_proj`` are layers of their own.
A language model is ranked by its rise in bits per character instead of the top-1 drop.  Each row
carries the layer's forward multiply-accumulates per sample, so a drop can be weighed against the
share of the work that moved to the approximate multiplier.
"""
from __future__ import annotations

import fnmatch
from pathlib import Path
from typing import Optional, Sequence

from torch import nn

from .. import nn as approx_nn
from .config import check_run_name, safe_stem
from ..energy import layer_macs
from .evaluate import accuracy, approximate, energy_columns, load_model_and_data, score_changes
from .runtime import describe, resolve_device
from .store import write_json

__all__ = ["layer_names", "layer_sensitivity", "run_sensitivity", "save_sensitivity"]


def _approximable(model: nn.Module) -> list:
    """The names ``convert`` can target: :func:`mbmlib.nn.approximable_layers` where the core has it, else the
    Conv2d/Linear layers outside MultiheadAttention (a core whose ``convert`` leaves attention exact)."""
    if hasattr(approx_nn, "approximable_layers"):
        return approx_nn.approximable_layers(model)
    inside = {id(m) for a in model.modules() if isinstance(a, nn.MultiheadAttention) for m in a.modules()}
    return [n for n, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear)) and id(m) not in inside]


def layer_names(model: nn.Module, patterns: Optional[Sequence[str]] = None) -> list:
    """Names of the layers ``convert`` can make approximate (attention ops included), optionally only those
    matching a glob."""
    names = _approximable(model)
    if patterns:
        chosen = [n for n in names if any(fnmatch.fnmatchcase(n, p) for p in patterns)]
        if not chosen:
            raise ValueError(f"no Conv2d/Linear layer matches {list(patterns)}; the layers are {', '.join(names)}")
        names = chosen
    return names


def layer_sensitivity(base: nn.Module, data, multiplier: str, layers: Optional[Sequence[str]] = None,
                      top: int = 3, progress: bool = True) -> dict:
    """Rows ``{layer, macs, top1, top5, loss, top1_drop, relative_energy}`` (a language model's also
    ``bits_per_char``, ``perplexity`` and ``bits_per_char_rise``, by which it is ranked): baseline, one layer each,
    the ``top`` most tolerant, all (relative multiplier energy of the model: None where the design has no published
    cost)."""
    names = layer_names(base, layers)
    macs = layer_macs(base, data.example)
    baseline = accuracy(approximate(base, "exact", data.calibration), data.batches)
    rank_by = "bits_per_char_rise" if "bits_per_char" in baseline else "top1_drop"

    def run(label: str, chosen: Sequence[str]) -> dict:
        model = approximate(base, {n: multiplier for n in chosen}, data.calibration)
        result = accuracy(model, data.batches, progress, label)
        row = {"layer": label, "layers": list(chosen), "macs": sum(macs.get(n, 0) for n in chosen), **result,
               **score_changes(result, baseline), **energy_columns(model, data.example)}
        energy = "unknown" if row["relative_energy"] is None else f"{row['relative_energy']:.3f}"
        bits = f", {row['bits_per_char_rise']:+.4f} bits/char" if "bits_per_char" in row else ""
        print(f"{label:>30}: top-1 {result['top1']:6.2f}% (drop {row['top1_drop']:+.2f}{bits})  {row['macs']:,} MACs"
              f"  energy {energy}")
        return row

    single = [run(n, [n]) for n in names]
    tolerant = [r["layer"] for r in sorted(single, key=lambda r: (r[rank_by], -r["macs"]))[:top]]
    combined = [run(f"{len(tolerant)} most tolerant together", tolerant)] if 1 < len(tolerant) < len(names) else []
    every = run("all layers", names)
    return {"multiplier": multiplier, "ranked_by": rank_by,
            "baseline": {"layer": "exact (baseline)", "macs": 0, **baseline, **score_changes(baseline, baseline),
                         "relative_energy": 1.0},
            "total_macs": sum(macs.values()), "layers": single, "combined": combined + [every],
            "most_tolerant": tolerant}


def run_sensitivity(model: str, dataset: str, multiplier: str = "mbm", checkpoint=None, pretrained: bool = False,
                    root=None, split: str = "test", samples: Optional[int] = 2000, batch_size: int = 128,
                    device: str = "auto", layers: Optional[Sequence[str]] = None, top: int = 3,
                    progress: bool = True) -> dict:
    """Load a model's weights and a split, then :func:`layer_sensitivity`; returns the JSON-ready report."""
    dev = resolve_device(device)
    base, data = load_model_and_data(model, dataset, checkpoint, pretrained, root, split, samples, batch_size, dev)
    report = layer_sensitivity(base, data, multiplier, layers, top, progress)
    return {"model": model, "dataset": dataset, "split": split, "checkpoint": str(checkpoint) if checkpoint else None,
            "pretrained": pretrained, "runtime": describe(dev), **report}


def sensitivity_paths(model: str, dataset: str, multiplier: str, out_dir="results/eval",
                      figures_dir="results/figures", name: Optional[str] = None) -> dict:
    """Where :func:`save_sensitivity` writes (``name`` default ``<model>-<dataset>-<multiplier>``, a plain name)."""
    name = check_run_name(name, "--name", "file") if name else f"{model}-{safe_stem(dataset)}-{safe_stem(multiplier)}"
    return {"json": Path(out_dir) / f"sensitivity-{name}.json", "markdown": Path(out_dir) / f"sensitivity-{name}.md",
            "figure": Path(figures_dir) / f"sensitivity-{name}.png"}


def save_sensitivity(report: dict, out_dir="results/eval", figures_dir="results/figures",
                     name: Optional[str] = None) -> dict:
    """Write ``sensitivity-<name>.json``, a markdown table beside it, and the figure; returns the paths."""
    from . import plots, report as rep
    import pandas as pd

    paths = sensitivity_paths(report["model"], report["dataset"], report["multiplier"], out_dir, figures_dir, name)
    json_path = write_json(paths["json"], report)
    rows = [report["baseline"], *report["layers"], *report["combined"]]
    text = "bits_per_char" in report["baseline"]
    bits = ["bits_per_char", "bits_per_char_rise"] if text else []
    table = pd.DataFrame(rows).reindex(columns=["layer", "macs", "top1", "top5", "loss", *bits, "top1_drop",
                                                "relative_energy"])
    table["macs_share"] = 100.0 * table["macs"] / report["total_macs"]
    md = rep.to_markdown(table, {"macs": "MACs / " + ("window" if text else "image"), "top1": "top-1 (%)",
                                 "top5": "top-5 (%)", "top1_drop": "top-1 drop (points)",
                                 "bits_per_char": "bits/char", "bits_per_char_rise": "bits/char rise",
                                 "macs_share": "share of MACs (%)", "relative_energy": "relative multiplier energy"},
                         {"macs": "{:,.0f}", "top1": "{:.2f}", "top5": "{:.2f}", "loss": "{:.4f}",
                          "bits_per_char": "{:.4f}", "bits_per_char_rise": "{:+.4f}",
                          "top1_drop": "{:+.2f}", "macs_share": "{:.1f}", "relative_energy": "{:.3f}"})
    md_path = rep.write_text(paths["markdown"],
                             f"# Layer sensitivity: {report['model']} on {report['dataset']} ({report['split']}), "
                             f"multiplier {report['multiplier']}\n\n{md}")
    png = plots.layer_sensitivity(report, paths["figure"])
    return {"json": json_path, "markdown": md_path, "figure": png}
