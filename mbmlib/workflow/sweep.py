"""Sweeps: run a parameterised notebook over a grid of parameters with papermill.

A sweep is described by a YAML file (or the same keys in a dict)::

    sweep: demo                       # optional; default: the YAML file's name
    notebook: notebooks/02_train_mnist.ipynb
    base: {model: seednet, epochs: 1, train_samples: 2048}
    grid: {multiplier: [exact, mitchell, mbm], backward: [exact]}
    name: "{model}-{multiplier}-{backward}-b{batch_size}-{runtime}"
    after: [notebooks/04_compare_runtimes.ipynb]

Every point of the grid (the product of the ``grid`` lists, over ``base``) is one
run: the notebook executed by papermill with those parameters, its executed copy
saved as ``<results>/runs/<name>/<notebook>.ipynb``.  ``name`` is a
``str.format`` template over the run's parameters plus ``{runtime}`` (this
machine's runtime label, e.g. ``cpu-amd-epyc`` or ``colab-gpu-tesla-t4``) and
``{sweep}``.  A notebook with ``run_name`` / ``results_dir`` parameters gets the
run's name and the results folder.  A failing run is recorded with its cell's
error and the sweep goes on; the ``after`` notebooks run once at the end.  The
summary is printed, returned, and written to ``<results>/runs/sweep-<sweep>.json``
after every run.  Paths in the file are relative to the repository root, which
is also the notebooks' working directory.  Needs papermill and pyyaml (the
``notebooks`` extra).
"""
from __future__ import annotations

import fnmatch
import itertools
import os
import re
import time
import zipfile
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Mapping, Optional, Sequence

from . import runtime
from .store import atomic_write, holds_run, move_run_aside, write_json

__all__ = [
    "repo_root",
    "resolve_results_dir",
    "load_sweep",
    "plan_sweep",
    "run_notebook",
    "run_sweep",
    "archive_results",
]

KERNEL = "python3"
_SAFE = re.compile(r"[^A-Za-z0-9_.-]+")


def repo_root(start: str | os.PathLike | None = None) -> Path:
    """The repository root at or above ``start`` (default: the working directory).

    The root is the first folder holding both ``pyproject.toml`` and ``notebooks/``;
    where there is none (e.g. the package installed elsewhere) it is ``start`` itself.
    Papermill runs notebooks with the working directory it is given, so a notebook
    finds the root from its own working directory.
    """
    start = Path(start or os.getcwd()).resolve()
    for folder in (start, *start.parents):
        if (folder / "pyproject.toml").is_file() and (folder / "notebooks").is_dir():
            return folder
    return start


def resolve_results_dir(results_dir: str | os.PathLike = "results", root: str | os.PathLike | None = None) -> Path:
    """``results_dir`` as an absolute path; a relative one is taken relative to the repository root."""
    path = Path(results_dir).expanduser()
    return path if path.is_absolute() else repo_root(root) / path


# ----------------------------------------------------------------------------- planning


def load_sweep(config: str | os.PathLike | Mapping) -> dict:
    """Read and check a sweep description (YAML path or dict); returns a plain dict."""
    if isinstance(config, Mapping):
        spec, source = dict(config), None
    else:
        import yaml

        source = Path(config)
        if not source.is_file():
            raise FileNotFoundError(f"sweep file {source} does not exist")
        with open(source) as f:
            try:
                spec = yaml.safe_load(f) or {}
            except yaml.YAMLError as err:
                raise ValueError(f"{source} is not valid YAML: {' '.join(str(err).split())}") from None
        if not isinstance(spec, dict):
            raise ValueError(f"{source}: a sweep file is a mapping with keys notebook, base, grid, name, after")
    known = {"sweep", "notebook", "base", "grid", "name", "after", "description"}
    unknown = set(spec) - known
    if unknown:
        raise ValueError(f"unknown key(s) in the sweep description: {', '.join(sorted(unknown))}; "
                         f"valid keys are {', '.join(sorted(known))}")
    if not spec.get("notebook"):
        raise ValueError("the sweep description needs 'notebook': the notebook to run for every grid point")
    _check_types(spec)
    for key in ("base", "grid"):
        if not isinstance(spec.get(key) or {}, Mapping):
            raise ValueError(f"'{key}' must be a mapping of parameter names to values (e.g. {key}: "
                             f"{{multiplier: [exact, mbm]}}), got {spec[key]!r}")
    spec["base"] = dict(spec.get("base") or {})
    grid = dict(spec.get("grid") or {})
    for key, values in grid.items():
        if isinstance(values, list) and not values:
            raise ValueError(f"grid axis {key!r} is empty; give it at least one value (e.g. {key}: [mbm])")
        if not isinstance(values, list):
            grid[key] = [values]  # a scalar is a one-value axis
    spec["grid"] = grid
    after = spec.get("after") or []
    spec["after"] = [after] if isinstance(after, (str, dict)) else list(after)
    spec.setdefault("sweep", source.stem if source else "sweep")
    spec.setdefault("name", "{sweep}-" + "-".join("{%s}" % k for k in grid) if grid else "{sweep}")
    spec["_source"] = str(source) if source else None
    return spec


def _check_types(spec: Mapping) -> None:
    """ValueError naming the key whose value has the wrong type (a notebook path is a string, ...)."""
    for key in ("notebook", "name", "sweep", "description"):
        if key in spec and not isinstance(spec[key], str):
            raise ValueError(f"'{key}' must be a string, got {spec[key]!r}")
    after = spec.get("after") or []
    for entry in after if isinstance(after, list) else [after]:
        if not (isinstance(entry, str) or (isinstance(entry, dict) and isinstance(entry.get("notebook"), str))):
            raise ValueError(f"'after' takes notebook paths or {{notebook: <path>, parameters: {{...}}}} entries, "
                             f"got {entry!r}")


def _notebook_parameters(path: Path) -> dict:
    import papermill

    return papermill.inspect_notebook(str(path))


def _runtime_label(params: Mapping) -> str:
    return runtime.describe(params.get("device") or "auto")["runtime"]


def plan_sweep(spec: Mapping, overrides: Optional[Mapping] = None, root: str | os.PathLike | None = None,
               results_dir: str | os.PathLike | None = None) -> list[dict]:
    """The runs of a sweep: ``[{name, notebook, output, parameters}]``, checked but not executed.

    ``overrides`` replace ``base`` values; an override of a ``grid`` key replaces that
    axis (a list value gives a new axis).  Raises ValueError for parameters the notebook
    does not declare, unfillable name templates and duplicate run names.
    """
    root = repo_root(root)
    results = resolve_results_dir(results_dir or "results", root)
    base, grid = dict(spec["base"]), dict(spec["grid"])
    for key, value in (overrides or {}).items():
        if key in grid:
            grid[key] = value if isinstance(value, list) else [value]
        else:
            base[key] = value
    notebook = (root / spec["notebook"]).resolve()
    if not notebook.is_file():
        raise FileNotFoundError(f"notebook {spec['notebook']} not found under {root}")
    declared = _notebook_parameters(notebook)
    unknown = sorted((set(base) | set(grid)) - set(declared))
    if unknown:
        raise ValueError(f"parameter(s) {', '.join(unknown)} are not in the 'parameters' cell of {spec['notebook']}; "
                         f"its parameters are {', '.join(declared)}")
    runs, labels = [], {}
    for values in itertools.product(*grid.values()) if grid else [()]:
        params = {**base, **dict(zip(grid, values))}
        fields = dict(params)
        fields["sweep"] = spec["sweep"]
        if "{runtime" in spec["name"]:
            device = params.get("device") or "auto"
            if device not in labels:
                labels[device] = _runtime_label(params)
            fields["runtime"] = labels[device]
        try:
            name = _SAFE.sub("-", spec["name"].format(**fields)).strip("-")
        except (KeyError, IndexError) as err:
            raise ValueError(f"run name template {spec['name']!r} uses {err}, which is neither a parameter nor "
                             "'runtime' / 'sweep'") from None
        if "run_name" in declared and params.get("run_name") is None:
            params["run_name"] = name
        if "results_dir" in declared:
            params["results_dir"] = str(results)
        runs.append({"name": name, "notebook": str(notebook), "parameters": params,
                     "output": str(results / "runs" / name / f"{notebook.stem}.ipynb")})
    names = [r["name"] for r in runs]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise ValueError(f"the name template {spec['name']!r} gives several runs the same name ({', '.join(dupes)}); "
                         "add the varying grid keys to it")
    return runs


# ----------------------------------------------------------------------------- running


def run_notebook(notebook: str | os.PathLike, output: str | os.PathLike, parameters: Mapping[str, Any],
                 cwd: str | os.PathLike, kernel_name: str = KERNEL, timeout: Optional[float] = None) -> dict:
    """Execute one notebook with papermill; never raises for a failing cell.

    The executed notebook is written beside ``output`` while it runs and moved onto
    ``output`` when done (failed runs included: it shows the failing cell).  Returns
    ``{status: ok|failed, seconds, error, ename, evalue, cell}``.
    """
    import papermill
    from papermill.exceptions import PapermillExecutionError

    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    partial = output.with_name(f".{output.stem}.running.ipynb")
    result = {"status": "ok", "seconds": None, "error": None, "ename": None, "evalue": None, "cell": None}
    extra = {"execution_timeout": timeout} if timeout else {}
    t0 = time.perf_counter()
    try:
        papermill.execute_notebook(str(notebook), str(partial), parameters=dict(parameters), kernel_name=kernel_name,
                                   progress_bar=False, log_output=False, cwd=str(cwd), **extra)
    except PapermillExecutionError as err:
        result.update(status="failed", ename=err.ename, evalue=err.evalue, cell=err.exec_count,
                      error=f"{err.ename}: {err.evalue}")
    except Exception as err:  # the kernel died, a timeout, an unreadable notebook: the sweep goes on
        result.update(status="failed", ename=type(err).__name__, evalue=str(err),
                      error=f"{type(err).__name__}: {err}")
    finally:
        result["seconds"] = round(time.perf_counter() - t0, 2)
        if partial.exists():
            os.replace(partial, output)
    return result


def _print_summary(summary: dict, log: Callable[[str], None]) -> None:
    rows = summary["runs"] + summary["after"]
    width = max([len(r["name"]) for r in rows] + [4])
    log(f"sweep {summary['sweep']}: {summary['ok']} ok, {summary['failed']} failed, "
        f"{summary['elapsed_s']:.1f} s in all")
    for r in rows:
        secs = "" if r.get("seconds") is None else f"{r['seconds']:8.1f} s"
        log(f"  {r['name']:<{width}}  {r['status']:<7} {secs}" + (f"  {r['error']}" if r.get("error") else ""))


def run_sweep(config: str | os.PathLike | Mapping, overrides: Optional[Mapping] = None, dry_run: bool = False,
              root: str | os.PathLike | None = None, results_dir: str | os.PathLike | None = None,
              kernel_name: str = KERNEL, timeout: Optional[float] = None, run_after: bool = True,
              log: Callable[[str], None] = print) -> dict:
    """Run every grid point of a sweep through papermill, then the ``after`` notebooks; return the summary.

    ``config`` is a YAML path or a dict (see the module docstring); ``overrides``
    replace ``base`` values (or grid axes).  ``root`` is the repository root (default:
    found above the YAML file, else above the working directory) and the notebooks'
    working directory; ``results_dir`` defaults to ``<root>/results``.  With
    ``dry_run`` nothing is executed or written: the summary lists the planned runs.
    The summary (``sweep``, ``ok``, ``failed``, ``runs``, ``after``, ...) is written to
    ``<results>/runs/sweep-<sweep>.json`` after every run.
    """
    spec = load_sweep(config)
    if root is None:
        root = repo_root(Path(spec["_source"]).resolve().parent if spec["_source"] else None)
    root = repo_root(root)
    results = resolve_results_dir(results_dir or "results", root)
    runs = plan_sweep(spec, overrides, root, results)
    after = _plan_after(spec, root, results) if run_after else []
    summary = {"sweep": spec["sweep"], "config": spec["_source"], "notebook": spec["notebook"],
               "root": str(root), "results_dir": str(results), "overrides": dict(overrides or {}),
               "dry_run": dry_run, "started_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
               "finished_at": None, "elapsed_s": 0.0, "ok": 0, "failed": 0,
               "runs": [{**r, "status": "planned", "seconds": None, "error": None} for r in runs],
               "after": [{**r, "status": "planned", "seconds": None, "error": None} for r in after]}
    if dry_run:
        log(f"sweep {spec['sweep']} (dry run): {len(runs)} run(s) of {spec['notebook']}, then "
            f"{len(after)} notebook(s) once; outputs under {results}")
        for r in summary["runs"] + summary["after"]:
            log(f"  {r['name']}: " + ", ".join(f"{k}={v!r}" for k, v in r["parameters"].items()))
        return summary
    if spec.get("description"):
        log(f"sweep {spec['sweep']}: {spec['description']}")
    summary_path = results / "runs" / f"sweep-{spec['sweep']}.json"
    _execute(summary, root, kernel_name, timeout, summary_path, log)
    summary["summary_path"] = str(summary_path)
    _print_summary(summary, log)
    log(f"summary: {summary_path}")
    return summary


def _plan_after(spec: Mapping, root: Path, results: Path) -> list[dict]:
    """The sweep's ``after`` notebooks as runs (each gets the results folder if it takes one)."""
    after = []
    for entry in spec["after"]:
        if isinstance(entry, str):
            nb_rel, params = entry, {}
        else:
            nb_rel, params = entry["notebook"], dict(entry.get("parameters") or {})
        nb = (root / nb_rel).resolve()
        if not nb.is_file():
            raise FileNotFoundError(f"'after' notebook {nb_rel} not found under {root}")
        if "results_dir" in _notebook_parameters(nb):
            params["results_dir"] = str(results)
        after.append({"name": f"after:{nb.stem}", "notebook": str(nb), "parameters": params,
                      "output": str(results / "runs" / f"sweep-{spec['sweep']}-{nb.stem}.ipynb")})
    return after


def _replace_if_asked(run: Mapping) -> None:
    """With ``overwrite``, move an earlier run aside before papermill writes into its folder.

    The trainer would move it itself, but only after papermill has started saving the executed
    notebook there: the folder would vanish under papermill's feet.
    """
    folder = Path(run["output"]).parent
    if run["parameters"].get("overwrite") and holds_run(folder):
        move_run_aside(folder)


def _execute(summary: dict, root: Path, kernel_name: str, timeout: Optional[float], summary_path: Path,
             log: Callable[[str], None]) -> None:
    """Run every planned notebook in turn, updating and writing the summary after each one."""
    t_start = time.perf_counter()
    todo = summary["runs"] + summary["after"]
    try:
        for i, r in enumerate(todo, 1):
            log(f"[{i}/{len(todo)}] {r['name']}: running {Path(r['notebook']).name}")
            r["status"] = "running"
            _replace_if_asked(r)
            r.update(run_notebook(r["notebook"], r["output"], r["parameters"], root, kernel_name, timeout))
            summary["ok"] = sum(x["status"] == "ok" for x in todo)
            summary["failed"] = sum(x["status"] == "failed" for x in todo)
            summary["elapsed_s"] = round(time.perf_counter() - t_start, 2)
            log(f"[{i}/{len(todo)}] {r['name']}: {r['status']} in {r['seconds']:.1f} s"
                + (f" -- {r['error']}" if r["error"] else ""))
            write_json(summary_path, summary)
    except KeyboardInterrupt:
        for r in todo:
            if r["status"] == "running":
                r["status"] = "interrupted"
        raise
    finally:
        summary["elapsed_s"] = round(time.perf_counter() - t_start, 2)
        summary["finished_at"] = datetime.now(timezone.utc).isoformat(timespec="seconds")
        write_json(summary_path, summary)


def archive_results(results_dir: str | os.PathLike, archive: str | os.PathLike,
                    exclude: Sequence[str] = ("checkpoint*.pt", ".*")) -> Path:
    """Zip ``results_dir`` (paths inside start with its folder name) into ``archive``, atomically.

    Files matching an ``exclude`` pattern (default: checkpoints and hidden temporaries) are left out.
    """
    results_dir, archive = Path(results_dir).resolve(), Path(archive)

    def write(f) -> None:
        with zipfile.ZipFile(f, "w", compression=zipfile.ZIP_DEFLATED) as zf:
            for path in sorted(results_dir.rglob("*")):
                if path.is_file() and not any(fnmatch.fnmatch(path.name, pat) for pat in exclude) \
                        and path.resolve() != archive.resolve():
                    zf.write(path, Path(results_dir.name) / path.relative_to(results_dir))

    return atomic_write(archive, write, mode="wb")
