"""Accuracy of one trained (or pretrained) model under several multipliers: ``python -m mbmlib evaluate``.

The model's weights are loaded once; for each multiplier (exact first, the baseline) a copy is
made approximate with :func:`mbmlib.convert` and run over one split of a dataset, giving top-1
and top-5 accuracy and the mean cross-entropy loss.  A language model's predictions are its
next-token predictions at every position: top-1 is next-character accuracy, and the loss is also
given in bits per character and as perplexity.  Integer multipliers (``mbm-int8``) make
quantised layers; their scales are calibrated first on a few training batches.  Results go to
``results/eval/<name>.json`` and ``.csv``, and a bar chart to ``results/figures/eval-<name>.png``.
"""
from __future__ import annotations

import csv
import io
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, List, Optional, Sequence, Tuple

import torch
from torch import Tensor, nn

from .. import calibrate, convert
from ..energy import model_energy
from ..multipliers import as_multiplier
from ..nn import is_multiplier_map_path, read_multiplier_map
from .config import check_run_name, safe_stem
from .models import load_model, model_channels, model_context
from .runtime import describe, resolve_device
from .store import write_json, write_text
from .text import bits_per_char
from .train_data import check_model_dataset, open_splits

__all__ = ["EvalData", "load_eval_data", "accuracy", "evaluate_multipliers", "approximate", "approximate_layers",
           "score_changes", "save_results"]

Batches = List[Tuple[Tensor, Tensor]]
CALIBRATION_BATCHES = 8


@dataclass
class EvalData:
    """Evaluation batches (on the device), calibration batches, and what the model needs to know."""

    batches: Batches
    calibration: Batches
    num_classes: int
    channels: Optional[int]
    image_size: Optional[int]

    @property
    def example(self) -> Tensor:
        """One sample of the batches (its dtype kept: token ids for a language model), for counting MACs."""
        return self.batches[0][0][:1]


def load_eval_data(dataset: str, root=None, split: str = "test", samples: Optional[int] = None,
                   batch_size: int = 128, device="cpu", channels: Optional[int] = None,
                   workers: int = 2, image_size: int = 224, context: Optional[int] = None) -> EvalData:
    """One split (``test`` or ``val``) of a dataset as batches held on ``device``, read once, and the first
    :data:`CALIBRATION_BATCHES` training batches for calibrating integer designs.

    Read through :func:`mbmlib.workflow.train_data.open_splits`, as training reads it: ``mnist`` in memory
    (pixels in [0, 1], no normalisation), every other image dataset normalised, a text corpus as windows of
    ``context`` tokens.  ``samples`` keeps a stratified subset (a text corpus: that many windows).
    """
    if split not in ("test", "val"):
        raise ValueError(f"split must be 'test' or 'val', got {split!r}")
    data = open_splits(dataset, root, channels, torch.device(device), workers=workers, image_size=image_size,
                       context=context, **{f"{split}_samples": samples})
    calibration = data.first_batch(CALIBRATION_BATCHES * batch_size)
    calibration = list(zip(calibration[0].split(batch_size), calibration[1].split(batch_size)))
    return EvalData(list(data.eval_batches(split, batch_size)), calibration, data.num_classes, data.channels,
                    data.image_size)


def accuracy(model: nn.Module, batches: Iterable[Tuple[Tensor, Tensor]], progress: bool = False,
             desc: str = "") -> dict:
    """Top-1 and top-5 accuracy (%) and mean cross-entropy of ``model`` (eval mode) over ``batches``.

    The one evaluation loop: ``evaluate``, ``sensitivity`` and the trainer's validation and test use it.
    A language model's every position is a prediction (``samples`` counts them), and the loss is also given as
    ``bits_per_char`` (loss / ln 2) and ``perplexity`` (e^loss).  The model's training mode is restored afterwards.
    """
    from tqdm.auto import tqdm

    was_training = model.training
    model.eval()
    correct1 = correct5 = 0
    loss = 0.0
    n = 0
    per_token = False
    start = time.perf_counter()
    with torch.no_grad():
        for x, y in tqdm(batches, desc=desc, disable=not progress, leave=False):
            logits = model(x)  # (B, classes), or (B, T, vocab)
            per_token = logits.dim() == 3
            logits, y = logits.flatten(0, -2), y.flatten()
            loss += float(nn.functional.cross_entropy(logits, y, reduction="sum"))
            top = logits.topk(min(5, logits.shape[1]), dim=1).indices  # (B, 5)
            correct1 += int((logits.argmax(1) == y).sum())  # argmax: the first of tied logits, as torch picks it
            correct5 += int((top == y[:, None]).any(dim=1).sum())
            n += len(y)
    model.train(was_training)
    if n == 0:
        raise ValueError("nothing to evaluate: the split is empty")
    text = {"bits_per_char": bits_per_char(loss / n), "perplexity": math.exp(loss / n)} if per_token else {}
    return {"top1": 100.0 * correct1 / n, "top5": 100.0 * correct5 / n, "loss": loss / n, **text, "samples": n,
            "seconds": time.perf_counter() - start}


def score_changes(row: dict, baseline: dict) -> dict:
    """How far ``row`` fell behind ``baseline``: ``top1_drop`` (points) and, for a language model,
    ``bits_per_char_rise`` (bits per character more than the baseline)."""
    changes = {"top1_drop": baseline["top1"] - row["top1"]}
    if "bits_per_char" in row:
        changes["bits_per_char_rise"] = row["bits_per_char"] - baseline["bits_per_char"]
    return changes


def approximate_layers(model: nn.Module) -> list:
    """The modules of ``model`` that carry a multiplier (approximate layers and attention ops, exact or not)."""
    return [m for m in model.modules() if hasattr(m, "multiplier") and hasattr(m, "quantiser")]


def approximate(base: nn.Module, multiplier, calibration: Batches, backend: Optional[str] = None) -> nn.Module:
    """A copy of ``base`` with ``multiplier`` (one name, a dict of layer patterns or an assignment file); integer
    layers calibrated on the float model (:func:`calibrate_on_float`)."""
    if is_multiplier_map_path(multiplier):
        multiplier = read_multiplier_map(multiplier)
    model = convert(base, multiplier=multiplier, backend=backend)
    names = multiplier.values() if isinstance(multiplier, dict) else [multiplier]
    if any(as_multiplier(m).is_integer for m in names):
        calibrate_on_float(model, calibration)
    return model


def calibrate_on_float(model: nn.Module, calibration: Batches) -> nn.Module:
    """Calibrate the integer layers with every other layer exact: quantised layers already run float while they
    are calibrated, so each layer's scales then depend on its own design only, whatever the other layers use
    (``explore`` calibrates once per design and gets the very same scales)."""
    floats = [m for m in approximate_layers(model) if m.quantiser is None and not m.multiplier.is_exact]
    saved = [m.multiplier for m in floats]
    try:
        for layer in floats:
            layer.multiplier = as_multiplier("exact")
        calibrate(model, calibration)
    finally:
        for layer, mult in zip(floats, saved):
            layer.multiplier = mult
    return model


def _ordered(multipliers: Sequence[str]) -> list:
    """The multipliers with ``exact`` first (added if missing), each once."""
    names = [str(as_multiplier(m)) for m in multipliers]
    return ["exact"] + [m for m in dict.fromkeys(names) if m != "exact"]


def load_model_and_data(model: str, dataset: str, checkpoint, pretrained: bool, root, split: str,
                        samples: Optional[int], batch_size: int, device: torch.device) -> tuple[nn.Module, EvalData]:
    """The model (exact, its weights loaded, on ``device``) and one split's batches; the model is checked
    against the dataset's images before anything loads."""
    check_model_dataset(model, dataset)
    data = load_eval_data(dataset, root, split, samples, batch_size, device, channels=model_channels(model),
                          context=model_context(model))
    base = load_model(model, num_classes=data.num_classes, in_channels=data.channels, pretrained=pretrained,
                      checkpoint=checkpoint).to(device)
    return base, data


def _map_rows(maps: Sequence) -> dict:
    """``{row name: assignment dict}`` of assignment files, each row named ``map:<file stem>``; files read first."""
    rows = {}
    for path in maps:
        name = f"map:{Path(path).stem}"
        if name in rows:
            raise ValueError(f"two assignment files are named {Path(path).stem}; rename one so their rows differ")
        rows[name] = read_multiplier_map(path)
        for mult in rows[name].values():
            as_multiplier(mult)
    return rows


def evaluate_multipliers(model: str, dataset: str, multipliers: Sequence[str], checkpoint=None,
                         pretrained: bool = False, root=None, split: str = "test", samples: Optional[int] = None,
                         batch_size: int = 128, device: str = "auto", backend: Optional[str] = None,
                         progress: bool = True, multiplier_maps: Sequence = ()) -> dict:
    """Evaluate one model's weights under each multiplier (exact first), then under each assignment file of
    ``multiplier_maps`` (rows ``map:<stem>``); returns the JSON-ready report."""
    maps = _map_rows(multiplier_maps)
    dev = resolve_device(device)
    base, data = load_model_and_data(model, dataset, checkpoint, pretrained, root, split, samples, batch_size, dev)
    rows = []
    for name in _ordered(multipliers) + list(maps):
        approx_model = approximate(base, maps.get(name, name), data.calibration, backend)
        result = accuracy(approx_model, data.batches, progress, name)
        rows.append({"multiplier": name, **result, **energy_columns(approx_model, data.example)})
        energy = rows[-1]["relative_energy"]
        bits = f"  {result['bits_per_char']:.4f} bits/char" if "bits_per_char" in result else ""
        print(f"{name:>12}: top-1 {result['top1']:6.2f}%  top-5 {result['top5']:6.2f}%  loss {result['loss']:.4f}"
              f"{bits}  energy {'unknown' if energy is None else f'{energy:.3f}'}"
              f"  ({result['samples']} {'characters' if bits else 'images'}, {result['seconds']:.1f} s)")
    for row in rows:
        row.update(score_changes(row, rows[0]))
    return {"model": model, "dataset": dataset, "split": split, "checkpoint": str(checkpoint) if checkpoint else None,
            "pretrained": pretrained, "runtime": describe(dev), "results": rows,
            "multiplier_maps": {name: {"file": str(path), "multipliers": maps[name]}
                                for name, path in zip(maps, multiplier_maps)}}


def energy_columns(model: nn.Module, example) -> dict:
    """The model's relative multiplier energy (None where a cost is unpublished) and its sources, for a row;
    ``example`` is a sample batch or its shape."""
    energy = model_energy(model, example)
    return {"relative_energy": energy["relative_energy"], "energy_sources": "; ".join(energy["sources"])}


def result_paths(model: str, dataset: str, split: str, out_dir="results/eval", figures_dir="results/figures",
                 name: Optional[str] = None) -> dict:
    """Where :func:`save_results` writes: ``<name>.json`` / ``.csv`` in ``out_dir``, ``eval-<name>.png``.

    ``name`` (default ``<model>-<dataset>-<split>``) is one plain file name; ValueError otherwise.
    """
    name = check_run_name(name, "--name", "file") if name else f"{model}-{safe_stem(dataset)}-{split}"
    return {"json": Path(out_dir) / f"{name}.json", "csv": Path(out_dir) / f"{name}.csv",
            "figure": Path(figures_dir) / f"eval-{name}.png",
            "energy_figure": Path(figures_dir) / f"eval-{name}-energy.png"}


def save_results(report: dict, out_dir="results/eval", figures_dir="results/figures",
                 name: Optional[str] = None) -> dict:
    """Write ``<name>.json`` and ``<name>.csv`` under ``out_dir``, the bar chart, and top-1 against relative
    energy where any approximate multiplier has a published cost; returns the paths."""
    from . import design_plots, plots

    paths = result_paths(report["model"], report["dataset"], report["split"], out_dir, figures_dir, name)
    json_path = write_json(paths["json"], report)
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(report["results"][0]))
    writer.writeheader()
    writer.writerows(report["results"])
    csv_path = write_text(paths["csv"], buffer.getvalue())
    written = {"json": json_path, "csv": csv_path, "figure": plots.multiplier_accuracy(report, paths["figure"])}
    if any(r.get("relative_energy") is not None and r["multiplier"] != "exact" for r in report["results"]):
        written["energy_figure"] = design_plots.accuracy_energy(report["results"], paths["energy_figure"],
                                                                f"{plots.report_title(report)}: top-1 against "
                                                                "relative multiplier energy")
    return written
