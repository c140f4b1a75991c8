"""Which design for which layer: ``python -m mbmlib explore``, a multi-objective search over per-layer assignments.

Every approximate layer gets one of the given designs or stays exact; an assignment is scored on two
objectives, top-1 on a held-out subset of the *validation* split (never the test split) and the model's
relative multiplier energy (SPEC section 7: the MAC-weighted mean of the layers' published relative powers,
each against its own source's exact multiplier; a point keeps the sources it mixes).  A design without a
published cost needs one from the user (``--cost NAME=RELATIVE_POWER`` or a CSV), recorded as user-given.

The search is Optuna's NSGA-II sampler (ask and tell, one categorical parameter per layer), its first
trials the uniform assignments, every design on one layer alone (the one-layer sensitivity ranking), and
the assignments that ranking suggests; points beyond ``--max-loss`` are infeasible (a constraint).  Each
distinct assignment is scored once (a cache); integer designs are calibrated once per design, which gives
the very scales a fresh calibration of the mixed model gives (:func:`mbmlib.workflow.evaluate.approximate`
calibrates on the float model).  The front's points within the loss are re-scored on the test split, and
with ``finetune`` fine-tuned with straight-through gradients first.
"""
from __future__ import annotations

import copy
import csv
import io
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional, Sequence

import torch
from torch import nn

from .. import convert
from ..energy import layer_macs
from ..multipliers import as_multiplier
from ..multipliers.cost import cost
from .config import check_run_name, safe_stem
from .models import model_context
from .evaluate import EvalData, accuracy, approximate, load_eval_data, load_model_and_data
from .runtime import describe, resolve_device
from .sensitivity import layer_names
from .store import write_json, write_text
from .train import prediction_loss
from .train_data import open_splits

__all__ = ["DesignCost", "parse_costs", "design_costs", "Scorer", "explore", "run_explore", "explore_paths",
           "save_explore", "front_of", "best_within", "USER_GIVEN"]

EXACT = "exact"
USER_GIVEN = "user-given (--cost)"
SUMMARY_LOSSES = (0.5, 1.0)


@dataclass(frozen=True)
class DesignCost:
    """A design's relative power (design / its source's exact multiplier) and where the figure comes from."""

    design: str
    relative_power: float
    source: str


def _relative_power(name: str, text: str, where: str) -> float:
    """A positive finite relative power read from ``text``; ValueError naming ``where`` otherwise."""
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not (math.isfinite(value) and value > 0):
        raise ValueError(f"{where}: the relative power of {name} must be a positive number (design power / exact "
                         f"multiplier power, e.g. 0.45), got {text!r}")
    return value


def parse_costs(items: Sequence[str] = (), files: Sequence[str] = ()) -> dict[str, float]:
    """User-given relative powers: ``NAME=RELATIVE_POWER`` items and CSV files with columns ``design`` and
    ``relative_power``; names are canonical multiplier names (``mitchell-t0`` is ``mitchell``)."""
    given: dict[str, float] = {}
    for item in items:
        name, sep, value = item.partition("=")
        if not sep or not name.strip():
            raise ValueError(f"--cost expects NAME=RELATIVE_POWER (e.g. drum4-int8=0.5), got {item!r}")
        given[as_multiplier(name.strip()).name] = _relative_power(name.strip(), value.strip(), "--cost")
    for file in files:
        path = Path(file)
        if not path.is_file():
            raise FileNotFoundError(f"cost file {path} does not exist; give a CSV with columns design,relative_power")
        rows = list(csv.DictReader(io.StringIO(path.read_text())))
        if not rows or not {"design", "relative_power"} <= set(rows[0]):
            raise ValueError(f"cost file {path} needs the columns design,relative_power and at least one row")
        for number, row in enumerate(rows, 2):
            name = (row["design"] or "").strip()
            given[as_multiplier(name).name] = _relative_power(name, row["relative_power"] or "", f"{path}:{number}")
    return given


def design_costs(designs: Sequence[str], user: Optional[dict] = None) -> dict[str, DesignCost]:
    """Each design's cost: the user's figure where given (recorded as user-given), else the published one;
    ValueError naming every design that has neither."""
    user = user or {}
    out, missing = {EXACT: DesignCost(EXACT, 1.0, "definition")}, []
    for design in designs:
        name = as_multiplier(design).name
        published = cost(name)
        if name in user:
            out[name] = DesignCost(name, user[name], USER_GIVEN)
        elif published is not None:
            out[name] = DesignCost(name, published.relative_power, published.source)
        elif name != EXACT:
            missing.append(name)
    if missing:
        first = missing[0]
        raise ValueError(f"no published cost for {', '.join(missing)} (SPEC section 7): explore cannot weigh "
                         f"{'it' if len(missing) == 1 else 'them'}; give one with --cost {first}=RELATIVE_POWER "
                         "(or --cost-file), recorded as user-given, or leave it out of --designs")
    unused = sorted(set(user) - set(out))
    if unused:
        raise ValueError(f"--cost names {', '.join(unused)}, which is not among --designs; add it there or drop "
                         "the cost")
    return out


class Scorer:
    """Scores assignments (one design name per layer) on the search batches; each distinct assignment once.

    Integer designs are calibrated once per design: calibration runs the float model, so a layer's scales
    depend on its own design only, and copying them reproduces a fresh calibration bit for bit.
    """

    def __init__(self, base: nn.Module, data: EvalData, layers: Sequence[str], macs: dict,
                 costs: dict[str, DesignCost], backend: Optional[str] = None):
        self.base, self.data, self.layers, self.costs, self.backend = base, data, list(layers), costs, backend
        self.macs = [macs[name] for name in self.layers]
        self.cache: dict[tuple, dict] = {}
        self._scales: dict[str, dict] = {}

    def energy(self, assignment: Sequence[str]) -> tuple[float, list[str]]:
        """Relative multiplier energy (MAC-weighted) and the cost sources the assignment mixes."""
        total = sum(self.macs)
        energy = sum(m * self.costs[d].relative_power for m, d in zip(self.macs, assignment)) / total
        return energy, sorted({self.costs[d].source for d in assignment if d != EXACT})

    def scales(self, design: str) -> dict:
        """Every layer's calibrated quantiser state under the integer ``design``, calibrated on first use."""
        if design not in self._scales:
            model = approximate(self.base, design, self.data.calibration, self.backend)
            modules = dict(model.named_modules())
            self._scales[design] = {n: copy.deepcopy(modules[n].quantiser.state_dict()) for n in self.layers}
        return self._scales[design]

    def model(self, assignment: Sequence[str]) -> nn.Module:
        """A copy of the model with ``assignment``, integer layers carrying their design's calibrated scales."""
        model = convert(self.base, multiplier=dict(zip(self.layers, assignment)), backend=self.backend)
        modules = dict(model.named_modules())
        for name, design in zip(self.layers, assignment):
            if as_multiplier(design).is_integer:
                modules[name].quantiser.load_state_dict(self.scales(design)[name])
        return model

    def score(self, assignment: Sequence[str]) -> tuple[dict, bool]:
        """``({top1, loss, relative_energy, sources}, whether it was computed now)``; repeats come from the cache."""
        key = tuple(assignment)
        if key not in self.cache:
            result = accuracy(self.model(key), self.data.batches)
            energy, sources = self.energy(key)
            self.cache[key] = {"top1": result["top1"], "loss": result["loss"], "relative_energy": energy,
                               "sources": sources}
            return self.cache[key], True
        return self.cache[key], False


@dataclass
class _Search:
    """What one exploration carries between its phases."""

    scorer: Scorer
    designs: list  # the approximate designs, canonical names
    max_loss: float
    budget: int
    study: object = None
    exact_top1: float = math.nan
    origin: dict = None  # assignment -> how it entered: uniform, one-layer, sensitivity, search
    bar: object = None
    trials: int = 0

    def label(self, assignment: tuple) -> str:
        """A short name: ``all exact``, ``uniform mbm``, ``mbm on features.3``, or ``mixed``."""
        used = set(assignment) - {EXACT}
        if not used:
            return "all exact"
        if len(used) == 1 and EXACT not in assignment:
            return f"uniform {used.pop()}"
        if len(used) == 1 and sum(d != EXACT for d in assignment) == 1:
            layer = self.scorer.layers[next(i for i, d in enumerate(assignment) if d != EXACT)]
            return f"{used.pop()} on {layer}"
        return "mixed"


def _study(seed: int, population: int):
    """An in-memory Optuna study: maximise top-1, minimise energy, NSGA-II with the loss limit as constraint."""
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    sampler = optuna.samplers.NSGAIISampler(population_size=population, seed=seed)
    return optuna.create_study(directions=["maximize", "minimize"], sampler=sampler)


def _trial(s: _Search, origin: str) -> None:
    """Ask the study for one assignment (an enqueued one first), score it (or take it from the cache), tell."""
    trial = s.study.ask()
    choices = [EXACT] + s.designs
    assignment = tuple(trial.suggest_categorical(layer, choices) for layer in s.scorer.layers)
    row, new = s.scorer.score(assignment)
    if math.isnan(s.exact_top1):
        s.exact_top1 = row["top1"]  # the first trial is the all-exact model
    trial.set_constraint("over_loss", s.exact_top1 - s.max_loss - row["top1"])  # feasible at <= 0
    s.study.tell(trial, [row["top1"], row["relative_energy"]])
    s.trials += 1
    if new:
        s.origin[assignment] = origin
        s.bar.update(1)
        best = best_within(_points(s), s.max_loss)
        if best is not None:
            s.bar.set_postfix_str(f"best within {s.max_loss:g} points: energy {best['relative_energy']:.3f}, "
                                  f"top-1 {best['top1']:.2f}%")


def _run_queue(s: _Search, assignments: Sequence[tuple], origin: str) -> None:
    """Enqueue the assignments not scored yet and run them as trials (the seeds of the population)."""
    todo = [a for a in dict.fromkeys(assignments) if a not in s.scorer.cache]
    for assignment in todo:
        s.study.enqueue_trial(dict(zip(s.scorer.layers, assignment)))
    for _ in todo:
        _trial(s, origin)


def _probes(s: _Search) -> list[tuple]:
    """All exact, every design on every layer (uniform), and every design on one layer alone."""
    n = len(s.scorer.layers)
    uniform = [tuple([EXACT] * n)] + [tuple([d] * n) for d in s.designs]
    single = [tuple(d if i == j else EXACT for j in range(n)) for d in s.designs for i in range(n)]
    return uniform + single


def _suggestions(s: _Search) -> list[tuple]:
    """What the one-layer ranking suggests: per design, its most tolerant layers while their one-layer drops sum
    within the loss; and a mix giving each layer the cheapest design whose one-layer drop fits its share."""
    n, out = len(s.scorer.layers), []
    drop = {(d, i): max(0.0, s.exact_top1 - s.scorer.cache[tuple(d if i == j else EXACT for j in range(n))]["top1"])
            for d in s.designs for i in range(n)}
    for d in s.designs:
        order = sorted(range(n), key=lambda i: (drop[d, i], -s.scorer.macs[i]))
        chosen, spent = [], 0.0
        for i in order:
            if spent + drop[d, i] > s.max_loss:
                break
            chosen.append(i)
            spent += drop[d, i]
        if 1 < len(chosen) < n:
            out.append(tuple(d if i in chosen else EXACT for i in range(n)))
    cheapest = sorted(s.designs, key=lambda d: s.scorer.costs[d].relative_power)
    for share in (s.max_loss / n, 0.0):
        out.append(tuple(next((d for d in cheapest if drop[d, i] <= share), EXACT) for i in range(n)))
    return out


def _points(s: _Search) -> list[dict]:
    """Every scored assignment as a point, in the order it was first scored."""
    rows = []
    for number, (assignment, row) in enumerate(s.scorer.cache.items()):
        rows.append({"id": number, "origin": s.origin.get(assignment, "search"), "label": s.label(assignment),
                     "top1": row["top1"], "top1_drop": s.exact_top1 - row["top1"], "loss": row["loss"],
                     "relative_energy": row["relative_energy"], "sources": row["sources"],
                     "assignment": dict(zip(s.scorer.layers, assignment))})
    return rows


def best_within(points: Sequence[dict], loss: float, origin: Optional[str] = None) -> Optional[dict]:
    """The lowest-energy point (of ``origin`` only, if given) that loses at most ``loss`` top-1 points; ties go to
    the more accurate."""
    fits = [p for p in points if p["top1_drop"] <= loss + 1e-9 and (origin is None or p["origin"] == origin)]
    return min(fits, key=lambda p: (p["relative_energy"], -p["top1"]), default=None)


def front_of(points: Sequence[dict]) -> list[dict]:
    """The points no other point beats on both objectives (higher top-1, lower energy), by rising energy, with the
    all-exact point kept as the front's reference end (``reference``: true where another point dominates it)."""
    from .design_plots import pareto_front

    chosen = pareto_front([p["relative_energy"] for p in points], [-p["top1"] for p in points])
    front = [dict(points[i], reference=False) for i in chosen]
    exact = next(p for p in points if p["label"] == "all exact")
    if all(p["id"] != exact["id"] for p in front):
        front.append(dict(exact, reference=True))
    return front


def explore(base: nn.Module, data: EvalData, designs: Sequence[str], costs: dict[str, DesignCost],
            max_loss: float = 1.0, evaluations: int = 300, seed: int = 0, population: int = 30,
            layers: Optional[Sequence[str]] = None, backend: Optional[str] = None, progress: bool = True) -> dict:
    """Search the assignments of ``designs`` (and exact) to the model's layers; returns every point and the front."""
    from tqdm.auto import tqdm

    names = layer_names(base, layers)
    macs = layer_macs(base, data.example)
    approx = [d for d in dict.fromkeys(as_multiplier(d).name for d in designs) if d != EXACT]
    if not approx:
        raise ValueError("--designs names no approximate design; give at least one, e.g. --designs mbm mitchell")
    s = _Search(Scorer(base, data, names, macs, costs, backend), approx, max_loss, evaluations, origin={})
    probes = _probes(s)
    if evaluations < len(probes) + population:
        raise ValueError(f"--evaluations {evaluations} leaves no room for the search: the uniform and one-layer "
                         f"assignments alone take {len(probes)} ({len(approx)} designs x {len(names)} layers); give "
                         f"at least {len(probes) + population} (that plus one population)")
    s.study = _study(seed, population)
    with tqdm(total=evaluations, desc="explore", disable=not progress, leave=False) as s.bar:
        _run_queue(s, probes[:1 + len(approx)], "uniform")
        _run_queue(s, probes[1 + len(approx):], "one-layer")
        _run_queue(s, _suggestions(s), "sensitivity")
        while len(s.scorer.cache) < evaluations and s.trials < 20 * evaluations:
            _trial(s, "search")
    points = _points(s)
    return {"layers": names, "macs": dict(zip(names, s.scorer.macs)), "designs": approx,
            "costs": {d: c.__dict__ for d, c in costs.items() if d == EXACT or d in approx},
            "exact_top1": s.exact_top1, "max_loss": max_loss, "seed": seed, "population": population,
            "evaluations": len(points), "trials": s.trials, "points": points,
            "front": front_of(points), "summary": _summary(points, max_loss), "scorer": s.scorer}


def _summary(points: Sequence[dict], max_loss: float) -> list[dict]:
    """For each loss (0.5, 1.0 and ``max_loss`` points): the best point found and the best uniform assignment."""
    rows = []
    for loss in sorted(set(SUMMARY_LOSSES) | {max_loss}):
        best, uniform = best_within(points, loss), best_within(points, loss, "uniform")
        rows.append({"max_loss": loss, "best_id": best["id"], "best_energy": best["relative_energy"],
                     "best_top1": best["top1"], "uniform": uniform["label"],
                     "uniform_energy": uniform["relative_energy"], "uniform_top1": uniform["top1"]})
    return rows


def finetune(model: nn.Module, batches: Callable[[int], object], epochs: int, lr: float, seed: int) -> nn.Module:
    """Train ``model`` in place for ``epochs`` epochs (Adam, straight-through gradients: the layers' backward is
    exact) on ``batches(epoch)``; returns it in eval mode."""
    torch.manual_seed(seed)
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    model.train()
    for epoch in range(epochs):
        for x, y in batches(epoch):
            optimizer.zero_grad(set_to_none=True)
            prediction_loss(model(x), y).backward()
            optimizer.step()
    return model.eval()


def score_on_test(result: dict, base: nn.Module, test: EvalData, train_batches=None, finetune_epochs: int = 0,
                  lr: float = 1e-4, seed: int = 0, progress: bool = True) -> list[dict]:
    """Test-split top-1 of the front's points within the loss (each calibrated as ``evaluate`` does), and after
    ``finetune_epochs`` epochs of fine-tuning if asked; the rows are also stored on the front's points."""
    rows = []
    exact_test = None
    for point in [p for p in result["front"] if p["top1_drop"] <= result["max_loss"] + 1e-9]:
        model = approximate(base, point["assignment"], test.calibration, result["scorer"].backend)
        score = accuracy(model, test.batches, progress, point["label"])
        exact_test = score["top1"] if point["label"] == "all exact" else exact_test
        row = {"id": point["id"], "test_top1": score["top1"], "test_loss": score["loss"], "test_samples":
               score["samples"]}
        if finetune_epochs:
            tuned = finetune(model, train_batches, finetune_epochs, lr, seed)
            row["finetuned_test_top1"] = accuracy(tuned, test.batches, progress, "fine-tuned")["top1"]
        point.update(row)
        rows.append(row)
    for row, point in zip(rows, [p for p in result["front"] if "test_top1" in p]):
        point["test_top1_drop"] = row["test_top1_drop"] = exact_test - row["test_top1"]
    return rows


def run_explore(model: str, dataset: str, designs: Sequence[str], checkpoint=None, pretrained: bool = False,
                root=None, samples: Optional[int] = 1000, test_samples: Optional[int] = None, max_loss: float = 1.0,
                evaluations: int = 300, seed: int = 0, population: int = 30, costs: Optional[dict] = None,
                finetune_epochs: int = 0, finetune_samples: Optional[int] = None, finetune_lr: float = 1e-4,
                batch_size: int = 128, device: str = "auto", backend: Optional[str] = None,
                progress: bool = True) -> dict:
    """Load the weights, search on ``samples`` validation images, re-score the front on the test split (after
    fine-tuning if asked); returns the JSON-ready report (``scorer`` included until it is saved)."""
    if not (math.isfinite(max_loss) and max_loss >= 0):
        raise ValueError(f"--max-loss must be 0 or more top-1 points, got {max_loss}")
    if finetune_epochs < 0 or population < 2:
        raise ValueError("--finetune must be 0 or more epochs and --population at least 2")
    prices = design_costs(list(designs), costs)
    dev = resolve_device(device)
    base, search_data = load_model_and_data(model, dataset, checkpoint, pretrained, root, "val", samples,
                                            batch_size, dev)
    result = explore(base, search_data, designs, prices, max_loss, evaluations, seed, population, None, backend,
                     progress)
    context = model_context(model)
    test = load_eval_data(dataset, root, "test", test_samples, batch_size, dev, channels=search_data.channels,
                          context=context)
    train_batches = None
    if finetune_epochs:
        splits = open_splits(dataset, root, search_data.channels, dev, train_samples=finetune_samples, context=context)
        train_batches = lambda epoch: splits.train_batches(batch_size, seed + epoch, 0, 1)  # noqa: E731
    result["test"] = score_on_test(result, base, test, train_batches, finetune_epochs, finetune_lr, seed, progress)
    return {"model": model, "dataset": dataset, "checkpoint": str(checkpoint) if checkpoint else None,
            "pretrained": pretrained, "search_split": "val", "search_samples": sum(len(y) for _, y in search_data.batches),
            "test_samples": result["test"][0]["test_samples"],
            "finetune": {"epochs": finetune_epochs, "samples": finetune_samples, "lr": finetune_lr},
            "runtime": describe(dev), **result}


def explore_paths(model: str, dataset: str, out_dir="results/explore", figures_dir="results/figures",
                  name: Optional[str] = None) -> dict:
    """Where :func:`save_explore` writes: the folder ``<out_dir>/<name>/`` and ``explore-<name>.png``."""
    name = check_run_name(name, "--name", "folder") if name else f"{model}-{safe_stem(dataset)}"
    return {"folder": Path(out_dir) / name, "figure": Path(figures_dir) / f"explore-{name}.png"}


def _table(points: Sequence[dict], layers: Sequence[str], extra: Sequence[str] = ()) -> str:
    """CSV of points: scores, sources, then one column per layer holding its design."""
    buffer = io.StringIO()
    columns = ["id", "origin", "label", "top1", "top1_drop", "loss", "relative_energy", *extra, "sources"]
    writer = csv.writer(buffer)
    writer.writerow(columns + list(layers))
    for p in points:
        writer.writerow([p.get(c) if c != "sources" else "; ".join(p["sources"]) for c in columns]
                        + [p["assignment"][layer] for layer in layers])
    return buffer.getvalue()


def _assignment_file(report: dict, point: dict) -> dict:
    """An assignment file: ``multipliers`` (what convert, train and evaluate read), its scores and costs."""
    used = set(point["assignment"].values())
    return {"format": "mbmlib assignment 1", "model": report["model"], "dataset": report["dataset"],
            "checkpoint": report["checkpoint"], "multipliers": point["assignment"],
            "search": {"split": "val", "samples": report["search_samples"], "top1": point["top1"],
                       "top1_drop": point["top1_drop"], "loss": point["loss"]},
            "test": {k: point[k] for k in ("test_top1", "test_top1_drop", "finetuned_test_top1") if k in point},
            "relative_energy": point["relative_energy"], "sources": point["sources"],
            "costs": {d: c for d, c in report["costs"].items() if d in used}}


def save_explore(report: dict, out_dir="results/explore", figures_dir="results/figures",
                 name: Optional[str] = None) -> dict:
    """Write ``explore.json``, ``points.csv``, ``front.csv`` / ``.json``, one assignment file per front point
    (``assignments/point-<id>.json``) and the figure; returns the paths."""
    from .design_plots import explore_figure

    report = {k: v for k, v in report.items() if k != "scorer"}
    paths = explore_paths(report["model"], report["dataset"], out_dir, figures_dir, name)
    folder = paths["folder"]
    written = {"json": write_json(folder / "explore.json", report),
               "points": write_text(folder / "points.csv", _table(report["points"], report["layers"]))}
    front_extra = ["reference", "test_top1", "test_top1_drop", "finetuned_test_top1"]
    written["front_csv"] = write_text(folder / "front.csv", _table(report["front"], report["layers"], front_extra))
    written["front_json"] = write_json(folder / "front.json", report["front"])
    for point in report["front"]:
        write_json(folder / "assignments" / f"point-{point['id']}.json", _assignment_file(report, point))
    written["assignments"] = folder / "assignments"
    written["figure"] = explore_figure(report, paths["figure"])
    return written
