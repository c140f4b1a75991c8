"""The notebooks run end to end under papermill; sweeps, the report tables and the figures.

Notebooks run with tiny parameters on the repo's MNIST subset (tests/data), the
repository root as working directory and a temporary results folder.
"""
import json
import re
import sys
import zipfile
from pathlib import Path

import pytest

pm = pytest.importorskip("papermill")
pd = pytest.importorskip("pandas")
pytest.importorskip("matplotlib")
pytest.importorskip("yaml")
import matplotlib.image  # noqa: E402
import nbformat  # noqa: E402
from papermill.exceptions import PapermillExecutionError  # noqa: E402

from mbmlib.workflow import cli, plots, report, runtime, sweep  # noqa: E402

REPO = Path(__file__).parent.parent
TEST_DATA = Path(__file__).parent / "data"
NOTEBOOKS = sorted((REPO / "notebooks").glob("[0-9][0-9]_*.ipynb")) + [REPO / "colab" / "mbmlib_colab.ipynb"]
LABEL = runtime.describe("cpu")["runtime"]  # tests pass device="cpu" where they can
AUTO_LABEL = runtime.describe("auto")["runtime"]  # what device "auto" runs name themselves after

TINY_TRAIN = dict(train_samples=64, val_samples=40, test_samples=40, max_steps=4, log_interval=2,
                  speed_ratio_steps=2, device="cpu")
TINY_BENCH = dict(batches=[2], gemm_size=32, rounds=1, elements=10_000, multipliers=["mbm"],
                  backends=["reference"], device="cpu")


@pytest.fixture(scope="module", autouse=True)
def _test_data():
    """Kernels inherit the environment: point MNIST at the repo's small subset."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MBMLIB_DATA", str(TEST_DATA))
        yield


def execute(notebook: Path, out_dir: Path, **parameters) -> dict:
    """Run a notebook like the sweep does (kernel python3, cwd = repo root); return the executed notebook."""
    out = out_dir / f"{notebook.stem}.ipynb"
    pm.execute_notebook(str(notebook), str(out), parameters=parameters, kernel_name="python3",
                        progress_bar=False, log_output=False, cwd=str(REPO))
    return nbformat.read(str(out), as_version=4)


def stream_text(nb) -> str:
    return "".join(o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])
                   if o.get("output_type") == "stream")


def assert_png(path: Path) -> None:
    assert path.is_file(), f"missing figure {path}"
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", f"{path} is not a PNG"
    image = matplotlib.image.imread(str(path))
    assert image.ndim == 3 and image.shape[0] > 100 and image.shape[1] > 100


def assert_no_temporaries(folder: Path) -> None:
    assert not [p for p in folder.rglob("*.tmp")], "an atomic write left a temporary file"


# ----------------------------------------------------------------------------- the notebooks themselves


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_has_one_flat_parameters_cell(path):
    nb = nbformat.read(str(path), as_version=4)
    nbformat.validate(nb)
    assert nb.nbformat == 4 and nb.metadata.kernelspec.name == "python3"
    tagged = [i for i, c in enumerate(nb.cells) if "parameters" in c.metadata.get("tags", [])]
    assert len(tagged) == 1
    source = nb.cells[tagged[0]].source
    assigned = [line.split("=")[0].strip() for line in source.splitlines() if line and not line.startswith("#")]
    # papermill must parse every line, or a sweep could not pass that parameter
    assert sorted(pm.inspect_notebook(str(path))) == sorted(assigned)
    assert not any(c.get("outputs") for c in nb.cells if c.cell_type == "code"), "commit notebooks without outputs"


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory):
    """01 -> 02 (mbm, the default fast backend) -> 03 -> 04 into one results folder."""
    results = tmp_path_factory.mktemp("results")
    out = tmp_path_factory.mktemp("executed")
    nbs = {
        "01": execute(REPO / "notebooks/01_multiplier_error.ipynb", out, n_samples=10_000, map_bins=32,
                      hist_bins=64, results_dir=str(results)),
        "02": execute(REPO / "notebooks/02_train_mnist.ipynb", out, multiplier="mbm", run_name="nb-mbm",
                      results_dir=str(results), **TINY_TRAIN),
        "03": execute(REPO / "notebooks/03_benchmark.ipynb", out, results_dir=str(results), **TINY_BENCH),
        "04": execute(REPO / "notebooks/04_compare_runtimes.ipynb", out, results_dir=str(results)),
    }
    return results, nbs


@pytest.mark.slow
class TestPipeline:
    """The outputs of the one pipeline run: a class, so that pytest-xdist gives its tests to one worker (see
    conftest.py) and the notebooks run once."""

    def test_01_error_table_and_figures(self, pipeline):
        results, _ = pipeline
        table = pd.read_csv(results / "tables" / "multiplier_error.csv")
        assert list(table["multiplier"]) == ["mitchell", "mbm", "mbm-t16", "mbm-t18"]
        mbm = table.set_index("multiplier").loc["mbm"]
        assert mbm["bias reference"] == pytest.approx(-0.095)
        assert mbm["max computed"] == pytest.approx(7.8125, abs=1e-3)  # the peak at powers of two
        assert mbm["max difference"] == pytest.approx(mbm["max computed"] - mbm["max reference"])
        assert re.search(r"^\| mbm +\|", (results / "tables" / "multiplier_error.md").read_text(), re.M)
        assert_png(results / "figures" / "error_map.png")
        assert_png(results / "figures" / "error_hist.png")
        ints = pd.read_csv(results / "tables" / "integer_multiplier_error.csv").set_index("multiplier")
        assert list(ints.index) == ["mitchell-int8", "mbm-int8", "table:results/tables/mbm_int8_products.csv"]
        assert ints.loc["mbm-int8", "n"] == 256 * 256 and ints.loc["mbm-int8", "max"] == pytest.approx(7.8125)
        assert ints.loc["mbm-int8", "wce"] == 2816 and 0 < ints.loc["mbm-int8", "ep"] < 100  # the hardware figures
        assert ints.iloc[2].tolist() == ints.loc["mbm-int8"].tolist()  # the table read from CSV is mbm-int8
        assert_png(results / "figures" / "error_map_int.png")

    def test_02_trains_writes_the_run_folder_and_logs_per_epoch(self, pipeline):
        results, nbs = pipeline
        run = results / "runs" / "nb-mbm"
        metrics = json.loads((run / "metrics.json").read_text())
        assert metrics["status"] == "finished" and metrics["config"]["multiplier"] == "mbm"
        assert metrics["config"]["progress"] is False
        assert len(pd.read_csv(run / "history.csv")) == 4
        assert_png(run / "loss.png")
        assert_png(run / "accuracy.png")
        log = stream_text(nbs["02"])
        assert log.count("epoch 1: train loss") == 1 and "\r" not in log  # one line per epoch, no progress bar
        assert_no_temporaries(results)

    def test_03_benchmark_report_and_charts(self, pipeline):
        results, _ = pipeline
        # backends=["reference"]
        layers = json.loads((results / "bench" / f"layers-reference-{LABEL}.json").read_text())
        assert layers["benchmark"] == "layers" and layers["runtime"]["runtime"] == LABEL
        timed = [r for r in layers["results"] if "G_MAC_per_s" in r]
        assert {(r["multiplier"], r["backend"]) for r in timed} == {("exact", "torch"), ("mbm", "reference")}
        elementwise = json.loads((results / "bench" / f"elementwise-{LABEL}.json").read_text())
        assert elementwise["n"] == 10_000
        assert_png(results / "figures" / f"layers-{LABEL}.png")
        assert_png(results / "figures" / f"elementwise-{LABEL}.png")

    def test_04_summary_tables_and_comparison_figures(self, pipeline):
        results, nbs = pipeline
        summary = pd.read_csv(results / "summary.csv")
        assert list(summary.columns) == [c for c, _, _ in report.SUMMARY_COLUMNS]
        row = summary.set_index("run").loc["nb-mbm"]
        assert row["multiplier"] == "mbm" and row["samples"] == 64 and 0 <= row["val_accuracy"] <= 100
        assert "| nb-mbm |" in (results / "summary.md").read_text()
        bench = pd.read_csv(results / "bench_summary.csv")
        assert set(bench["benchmark"]) == {"layers", "elementwise"}
        assert len(pd.read_csv(results / "tables" / "training_speed.csv")) == 1
        for name in ("loss_curves", "accuracy", "training_speed", "runtime_throughput", "elementwise",
                     f"layers-{LABEL}"):
            assert_png(results / "figures" / f"{name}.png")
        assert_no_temporaries(results)


@pytest.mark.slow
def test_05_evaluates_a_run_checkpoint_and_its_layer_sensitivity(tmp_path):
    import torch

    from mbmlib.workflow.models import LeNet5

    torch.save({"model": LeNet5().state_dict()}, tmp_path / "checkpoint.pt")
    results = tmp_path / "results"
    nb = execute(REPO / "notebooks/05_evaluate_and_sensitivity.ipynb", tmp_path, model="lenet5",
                 checkpoint=str(tmp_path / "checkpoint.pt"), multipliers=["mbm"], sensitivity_multiplier="mitchell",
                 layers=["classifier.*"], top=2, samples=20, batch_size=10, device="cpu", results_dir=str(results))
    scores = json.loads((results / "eval" / "lenet5-mnist-test.json").read_text())
    assert [r["multiplier"] for r in scores["results"]] == ["exact", "mbm"] and scores["results"][0]["samples"] == 20
    study = json.loads((results / "eval" / "sensitivity-lenet5-mnist-mitchell.json").read_text())
    assert [r["layer"] for r in study["layers"]] == ["classifier.0", "classifier.2", "classifier.4"]
    for png in ("eval-lenet5-mnist-test.png", "sensitivity-lenet5-mnist-mitchell.png"):
        assert_png(results / "figures" / png)
    assert any(o.get("output_type") == "display_data" for c in nb.cells for o in c.get("outputs", []))


@pytest.mark.slow
def test_06_explores_assignments_and_writes_the_front(tmp_path):
    import torch

    from mbmlib.workflow.models import LeNet5

    torch.save(LeNet5().state_dict(), tmp_path / "lenet.pt")
    results = tmp_path / "results"
    nb = execute(REPO / "notebooks/06_explore.ipynb", tmp_path, model="lenet5", checkpoint=str(tmp_path / "lenet.pt"),
                 designs=["mbm"], evaluations=10, population=2, samples=20, test_samples=20, batch_size=10,
                 device="cpu", results_dir=str(results))
    folder = results / "explore" / "lenet5-mnist"
    found = json.loads((folder / "explore.json").read_text())
    assert found["evaluations"] == 10 and found["search_split"] == "val" and found["test_samples"] == 20
    assert (folder / "front.csv").read_text().startswith("id,origin,label,top1")
    assert list((folder / "assignments").glob("point-*.json"))
    assert_png(results / "figures" / "explore-lenet5-mnist.png")
    assert any(o.get("output_type") == "display_data" for c in nb.cells for o in c.get("outputs", []))


@pytest.mark.slow
def test_a_bad_parameter_fails_with_the_cells_error(tmp_path):
    with pytest.raises(PapermillExecutionError) as err:
        execute(REPO / "notebooks/02_train_mnist.ipynb", tmp_path, multiplier="bogus",
                results_dir=str(tmp_path / "results"), **TINY_TRAIN)
    assert err.value.ename == "ValueError"
    assert "bogus" in err.value.evalue and "valid names are" in err.value.evalue and "mbm" in err.value.evalue
    assert not (tmp_path / "results" / "runs").exists()  # failed before training started


@pytest.mark.slow
def test_colab_notebook_runs_locally_with_tiny_parameters(tmp_path):
    """The notebooks whose parameters the Colab notebook derives (the sweep's run names, the exact run's checkpoint
    for 05 and 06); 01, 03 and 04 get theirs passed through as they are, and run in the pipeline above."""
    results = tmp_path / "results"
    nb = execute(REPO / "colab" / "mbmlib_colab.ipynb", tmp_path, results_dir=str(results),
                 run_notebooks=["02_train_mnist", "05_evaluate_and_sensitivity", "06_explore"],
                 multipliers=["exact"], train_samples=64, val_samples=40, test_samples=40, max_steps=2,
                 speed_ratio_steps=0, eval_multipliers=["mitchell"], eval_samples=20,
                 explore_designs=["mbm"], explore_evaluations=10, explore_population=2, explore_samples=20)
    log = stream_text(nb)
    assert "not on Colab" in log and "pip install" not in log
    sweep = json.loads((results / "runs" / f"sweep-{AUTO_LABEL}.json").read_text())
    assert sweep["ok"] == 1 and sweep["failed"] == 0
    run = results / "runs" / f"seednet-exact-exact-b16-{AUTO_LABEL}"
    assert json.loads((run / "metrics.json").read_text())["status"] == "finished"
    assert (run / "02_train_mnist.ipynb").is_file()
    assert not (results / "notebooks" / f"01_multiplier_error-{AUTO_LABEL}.ipynb").exists()  # not asked for
    scores = json.loads((results / "eval" / "seednet-mnist-test.json").read_text())  # 05 on the exact run
    assert scores["checkpoint"].endswith(f"seednet-exact-exact-b16-{AUTO_LABEL}/checkpoint.pt")
    assert [r["multiplier"] for r in scores["results"]] == ["exact", "mitchell"]
    explored = json.loads((results / "explore" / f"seednet-{AUTO_LABEL}" / "explore.json").read_text())  # 06
    assert explored["evaluations"] == 10 and explored["checkpoint"].endswith("checkpoint.pt")


# ----------------------------------------------------------------------------- sweeps


def toy_notebook(path: Path, fail_on: str = "bad") -> Path:
    """A notebook with parameters x, run_name, results_dir that fails when x == fail_on."""
    cells = [
        nbformat.v4.new_code_cell('x = "good"\nrun_name = None\nresults_dir = "results"',
                                  metadata={"tags": ["parameters"]}),
        nbformat.v4.new_code_cell(
            "from pathlib import Path\n"
            f"if x == {fail_on!r}:\n"
            "    raise ValueError(f'unusable x {x!r}; valid values are good, fine')\n"
            "out = Path(results_dir) / ('after.txt' if run_name is None else f'runs/{run_name}/done.txt')\n"
            "out.parent.mkdir(parents=True, exist_ok=True)\n"
            "out.write_text(x)"),
    ]
    nb = nbformat.v4.new_notebook(cells=cells, metadata={"kernelspec": {"name": "python3", "language": "python",
                                                                        "display_name": "Python 3"}})
    path.parent.mkdir(parents=True, exist_ok=True)
    nbformat.write(nb, str(path))
    return path


def toy_sweep(tmp_path: Path, **spec) -> Path:
    import yaml

    toy_notebook(tmp_path / "nbs" / "toy.ipynb")
    config = {"notebook": "nbs/toy.ipynb", "grid": {"x": ["good", "bad"]}, "name": "toy-{x}",
              "after": ["nbs/toy.ipynb"], **spec}
    path = tmp_path / "toy.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def sweep_cli(argv):
    """The sweep / report subcommands through the package's command line (its error boundary included)."""
    return cli.main(argv)


def test_command_line_parsers_need_no_notebook_extras():
    import subprocess

    code = ("import argparse, sys; from mbmlib.workflow import cli; p = argparse.ArgumentParser(); "
            "s = p.add_subparsers(); cli.add_sweep_parser(s); cli.add_report_parser(s); "
            "print(sorted(m for m in ('pandas', 'matplotlib', 'papermill', 'yaml') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


@pytest.mark.slow
def test_sweep_goes_on_after_a_failed_run_and_reports_it(tmp_path, capsys):
    config = toy_sweep(tmp_path)
    rc = sweep_cli(["sweep", str(config), "--root", str(tmp_path)])
    assert rc == 1  # a run failed
    out = capsys.readouterr().out
    summary = json.loads((tmp_path / "results" / "runs" / "sweep-toy.json").read_text())
    runs = {r["name"]: r for r in summary["runs"]}
    assert runs["toy-good"]["status"] == "ok" and runs["toy-good"]["error"] is None
    bad = runs["toy-bad"]
    assert bad["status"] == "failed" and bad["ename"] == "ValueError" and "valid values are good" in bad["error"]
    assert summary["after"][0]["status"] == "ok"  # the sweep went on to the end
    assert (summary["ok"], summary["failed"]) == (2, 1)
    assert (tmp_path / "results" / "runs" / "toy-good" / "done.txt").read_text() == "good"
    assert (tmp_path / "results" / "after.txt").exists()
    for name in ("toy-good", "toy-bad"):  # executed copies, the failed one showing its error
        assert (tmp_path / "results" / "runs" / name / "toy.ipynb").is_file()
    assert not list((tmp_path / "results").rglob(".*.running.ipynb"))
    assert "toy-bad" in out and "failed" in out and "unusable x 'bad'" in out
    assert "sweep toy: 2 ok, 1 failed" in out


def test_sweep_dry_run_overrides_and_checks(tmp_path, capsys):
    config = toy_sweep(tmp_path)
    summary = sweep.run_sweep(config, {"x": ["fine"]}, dry_run=True, root=tmp_path)
    assert [r["name"] for r in summary["runs"]] == ["toy-fine"]
    assert summary["runs"][0]["parameters"] == {"x": "fine", "run_name": "toy-fine",
                                               "results_dir": str(tmp_path / "results")}
    assert not (tmp_path / "results").exists()  # a dry run writes nothing
    assert sweep_cli(["sweep", str(config), "--root", str(tmp_path), "--dry-run", "--set", "y=1"]) == 2
    assert "y are not in the 'parameters' cell" in capsys.readouterr().err
    with pytest.raises(ValueError, match="same name"):
        sweep.run_sweep(toy_sweep(tmp_path, name="toy"), dry_run=True, root=tmp_path)
    with pytest.raises(ValueError, match="neither a parameter"):
        sweep.run_sweep(toy_sweep(tmp_path, name="{nope}"), dry_run=True, root=tmp_path)
    assert cli.parse_overrides(["n=512", "m=[a, b]", "s=null", "t=x=y"]) == {
        "n": 512, "m": ["a", "b"], "s": None, "t": "x=y"}
    with pytest.raises(ValueError, match="key=value"):
        cli.parse_overrides(["oops"])


def test_demo_and_seed_sweeps_plan_against_the_real_notebook():
    for name, n in (("demo", 3), ("seed", 3)):
        summary = sweep.run_sweep(REPO / "experiments" / f"{name}.yaml", dry_run=True, log=lambda _: None)
        assert len(summary["runs"]) == n and summary["after"]
        assert {r["parameters"]["multiplier"] for r in summary["runs"]} == {"exact", "mitchell", "mbm"}
        assert all(r["name"].endswith(AUTO_LABEL) for r in summary["runs"])


def test_repo_root_and_results_dir(tmp_path):
    assert sweep.repo_root(REPO / "notebooks") == REPO
    assert sweep.resolve_results_dir("results", REPO / "mbmlib") == REPO / "results"
    assert sweep.resolve_results_dir(tmp_path) == tmp_path


def test_archive_results_leaves_out_checkpoints(tmp_path):
    (tmp_path / "results" / "runs" / "r").mkdir(parents=True)
    (tmp_path / "results" / "runs" / "r" / "metrics.json").write_text("{}")
    (tmp_path / "results" / "runs" / "r" / "checkpoint.pt").write_bytes(b"x" * 100)
    archive = sweep.archive_results(tmp_path / "results", tmp_path / "out.zip")
    assert zipfile.ZipFile(archive).namelist() == ["results/runs/r/metrics.json"]


# ----------------------------------------------------------------------------- report and plots


def fake_run(results: Path, name: str, multiplier: str, device_name: str, device_type: str = "CPU",
             colab: bool = False, steps: int = 30, sps: float = 100.0, seed=None, test_acc: float = 88.0) -> None:
    run = results / "runs" / name
    run.mkdir(parents=True)
    epochs = [{"epoch": e, "steps": steps // 2, "train_loss": 2.0 / e, "val_loss": 1.8 / e,
               "val_accuracy": 60.0 + 15 * e, "epoch_time_s": 240 / sps, "samples": 240, "samples_per_s": sps, "time_per_sample_s": 1 / sps}
              for e in (1, 2)]
    metrics = {"run_name": name, "status": "finished",
               "config": {"model": "seednet", "multiplier": multiplier, "backward": "exact", "batch_size": 16,
                          "backend": None, "preset": "seed", "seed": seed, "run_name": name},
               "runtime": {"device": "cuda" if device_type == "GPU" else "cpu", "device_type": device_type,
                           "device_name": device_name, "colab": colab, "runtime": f"x-{device_name}", "torch": "2"},
               "data": {"train": 240, "val": 60, "test": 50}, "epochs": epochs, "global_step": steps,
               "final": {"val_accuracy": 90.0, "val_loss": 0.9, "test_accuracy": test_acc, "test_loss": 1.0,
                         "train_time_s": 480 / sps, "samples": 480, "samples_per_s": sps,
                         "time_per_sample_s": 1 / sps,
                         "speed": None if multiplier == "exact" else {"approx_to_exact_time_per_sample": 3.0}}}
    (run / "metrics.json").write_text(json.dumps(metrics))
    rows = ["step,epoch,loss,lr,elapsed"] + [f"{s},{1 + (s > steps // 2)},{2.3 * 0.97 ** s},0.003,{s * 0.1}"
                                              for s in range(1, steps + 1)]
    (run / "history.csv").write_text("\n".join(rows) + "\n")


def fake_bench(results: Path, device_name: str, colab: bool, scale: float) -> None:
    rows = []
    for b in (16, 128):
        for layer, macs in (("conv1", 7.2e6), ("conv2", 2.3e8), ("conv3", 1.2e8), ("fc1", 1.3e7), ("fc2", 1.3e5),
                            ("fc3", 1e4)):
            case = f"seednet.{layer}@b{b}"
            for mult, backend, gmacs in (("exact", "torch", 50), ("mitchell", "compiled", 20), ("mbm", "compiled", 6),
                                         ("mbm", "reference", 0.05)):
                g = gmacs * scale
                rows.append({"case": case, "multiplier": mult, "backend": backend, "macs": macs * b,
                             "median_s": macs * b / g / 1e9, "min_s": 0, "repeats": 3,
                             "ratio_to_exact": 50 / gmacs, "G_MAC_per_s": g})
    rows.append({"case": "gemm2048", "multiplier": "mbm", "backend": "reference", "macs": 8.6e9,
                 "note": "skipped: too slow"})
    label = f"{'colab-' if colab else ''}x-{device_name}"
    report_ = {"benchmark": "layers", "results": rows, "timestamp": "2026-01-01T00:00:00+00:00",
               "runtime": {"device_name": device_name, "device_type": "GPU" if scale > 1 else "CPU", "colab": colab,
                           "runtime": label}}
    (results / "bench").mkdir(parents=True, exist_ok=True)
    (results / "bench" / f"layers-{label}.json").write_text(json.dumps(report_))


@pytest.fixture
def fake_results(tmp_path):
    results = tmp_path / "results"
    fake_run(results, "cpu-exact", "exact", "AMD EPYC", sps=30)
    fake_run(results, "cpu-mbm", "mbm", "AMD EPYC", sps=12)
    fake_run(results, "t4-mbm", "mbm", "Tesla T4", "GPU", colab=True, sps=900)
    (results / "runs" / "broken").mkdir()
    (results / "runs" / "broken" / "metrics.json").write_text("{ not json")
    (results / "runs" / "not-a-run").mkdir()  # no metrics.json: ignored silently
    (results / "runs" / "t4-mbm" / "history.csv").write_text("nonsense\n1\n")
    fake_bench(results, "AMD EPYC", False, 1.0)
    fake_bench(results, "Tesla T4", True, 40.0)
    (results / "bench" / "half-written.json").write_text('{"benchmark": "layers", "resu')
    return results


def test_report_reads_runs_and_benchmarks_and_flags_broken_files(fake_results):
    with pytest.warns(report.ReportWarning) as caught:
        res = report.load_results(fake_results)
    flagged = {Path(p).parent.name + "/" + Path(p).name for p, _ in res.problems}
    assert flagged == {"broken/metrics.json", "t4-mbm/history.csv", "bench/half-written.json"}
    assert len(caught) == 3
    assert sorted(res.runs["run"]) == ["cpu-exact", "cpu-mbm", "t4-mbm"]
    t4 = res.runs.set_index("run").loc["t4-mbm"]
    assert t4["runtime"] == "Tesla T4 (Colab)" and t4["epochs"] == 2 and t4["approx_to_exact"] == 3.0
    assert res.runs.set_index("run").loc["cpu-exact", "runtime"] == "AMD EPYC CPU"
    assert set(res.history["run"]) == {"cpu-exact", "cpu-mbm"}  # t4's history is broken
    assert len(res.bench) == 2 * (2 * 6 * 4 + 1) and res.bench["note"].notna().sum() == 2

    out = report.write_summary(fake_results, results=res)
    table = pd.read_csv(out["csv"])
    assert list(table.columns) == [c for c, _, _ in report.SUMMARY_COLUMNS] and len(table) == 3
    md = " ".join(out["markdown"].read_text().split())  # pandas pads the cells
    assert "| run | model | dataset | multiplier | backward | seed | runtime / device |" in md
    assert "| t4-mbm | seednet | mnist | mbm | exact | – | Tesla T4 (Colab) | 2 | 480 | 90.00 | 88.00 |" in md
    assert "broken/metrics.json" in md  # skipped files are listed
    assert len(pd.read_csv(out["bench_csv"])) == 2 * 2 * 6 * 4
    assert_no_temporaries(fake_results)


def test_report_command_and_single_run(fake_results, capsys):
    with pytest.warns(report.ReportWarning):
        assert sweep_cli(["report", "--results-dir", str(fake_results)]) == 0
    assert "3 run(s)" in capsys.readouterr().out
    assert len(pd.read_csv(fake_results / "summary.csv")) == 3
    assert_png(fake_results / "figures" / "training_speed.png")
    runs, history = report.read_run(fake_results / "runs" / "cpu-mbm")
    assert list(runs["run"]) == ["cpu-mbm"] and len(history) == 30
    with pytest.warns(report.ReportWarning):
        runs, history = report.read_run(fake_results / "runs" / "broken")
    assert runs.empty and history.empty


def test_report_of_an_empty_results_folder(tmp_path):
    res = report.load_results(tmp_path)
    assert res.runs.empty and res.history.empty and res.bench.empty and not res.problems
    out = report.write_summary(tmp_path, results=res)
    assert pd.read_csv(out["csv"]).empty
    for png in plots.comparison_figures(res, tmp_path / "figures"):
        assert_png(png)  # "nothing found" figures, not crashes


def test_comparison_figures_from_several_runtimes(fake_results):
    with pytest.warns(report.ReportWarning):
        res = report.load_results(fake_results)
    paths = plots.comparison_figures(res, fake_results / "figures")
    names = sorted(p.name for p in paths)
    assert names == sorted(["loss_curves.png", "accuracy.png", "training_speed.png", "seed_intervals.png",
                            "runtime_throughput.png",
                            "elementwise.png", "layers-x-AMD EPYC.png", "layers-colab-x-Tesla T4.png"])
    for p in paths:
        assert_png(p)
    labels = plots.run_labels(res.runs)
    assert labels["t4-mbm"] == "mbm – Tesla T4 (Colab)"
    totals = plots._seednet_totals(res.bench)
    assert set(totals["backend"]) == {"torch", "compiled"} and set(totals["batch"]) == {128}


def test_run_and_error_figures(tmp_path, fake_results):
    metrics = json.loads((fake_results / "runs" / "cpu-mbm" / "metrics.json").read_text())
    assert_png(plots.run_epochs(metrics, tmp_path / "epochs.png"))
    assert_png(plots.run_epochs({"run_name": "empty", "epochs": []}, tmp_path / "none.png"))
    assert_png(plots.error_maps(["mitchell", "mbm"], tmp_path / "map.png", bins=16))
    assert_png(plots.error_histograms(["mbm", "mbm-t16"], tmp_path / "hist.png", bins=32))
    with pytest.raises(ValueError, match="valid names"):
        plots.error_maps(["bogus"], tmp_path / "x.png")


T_975 = {2: 4.302652729911275, 1: 12.706204736174707}  # Student-t 97.5% quantiles for 2 and 1 degrees of freedom


def test_t_interval_by_hand():
    mean, std, half = report.t_interval([88.0, 90.0, 92.0])
    assert (mean, std) == (90.0, 2.0) and half == pytest.approx(T_975[2] * 2.0 / 3 ** 0.5)
    assert report.t_interval([5.0, 7.0])[2] == pytest.approx(T_975[1] * 2 ** 0.5 / 2 ** 0.5)
    one = report.t_interval([3.0])
    assert one[0] == 3.0 and all(v != v for v in one[1:])  # NaN: one run has no spread


def test_runs_that_differ_only_in_seed_are_grouped_with_intervals(tmp_path):
    results = tmp_path / "results"
    for seed, acc in enumerate((88.0, 90.0, 92.0)):
        fake_run(results, f"mbm-s{seed}", "mbm", "AMD EPYC", sps=10 + seed, seed=seed, test_acc=acc)
    fake_run(results, "exact-s0", "exact", "AMD EPYC", sps=30, seed=0)
    fake_run(results, "mbm-gpu-s0", "mbm", "Tesla T4", "GPU", sps=900, seed=0)  # another runtime: its own group
    fake_run(results, "exact-s0-again", "exact", "AMD EPYC", sps=31, seed=0)  # the same seed again: the latest counts
    for name, when in (("exact-s0", "2026-01-01"), ("exact-s0-again", "2026-01-02")):
        metrics = json.loads((results / "runs" / name / "metrics.json").read_text())
        (results / "runs" / name / "metrics.json").write_text(json.dumps({**metrics, "finished_at": when}))
    res = report.load_results(results)
    groups = report.seed_groups(res.runs).set_index("runs")
    assert sorted(groups["seeds"]) == [1, 1, 3]
    assert groups.loc["exact-s0-again", "epoch_time_s_mean"] == pytest.approx(480 / 31 / 2)
    mbm = groups.loc["mbm-s0, mbm-s1, mbm-s2"]
    assert mbm["test_accuracy_mean"] == 90.0 and mbm["test_accuracy_std"] == 2.0
    assert mbm["test_accuracy_ci95"] == pytest.approx(T_975[2] * 2 / 3 ** 0.5)
    times = [480 / sps / 2 for sps in (10, 11, 12)]  # mean epoch time of each run
    assert mbm["epoch_time_s_mean"] == pytest.approx(sum(times) / 3)
    out = report.write_summary(results, results=res)
    md = " ".join(out["markdown"].read_text().split())
    assert "| seednet | mnist | mbm | exact | AMD EPYC CPU | 240 | 2 | 3 | 90.00 ± 4.97 | 2.00 |" in md
    assert len(pd.read_csv(results / "summary_by_seed.csv")) == 3
    assert_png(plots.seed_intervals(res.runs, tmp_path / "seeds.png"))
