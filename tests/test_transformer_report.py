"""The transformer comparison (notebook 07): one row per design over seeds, attention-only runs labelled."""
import json
import math

import pytest
from scipy import stats

from mbmlib.workflow import report
from mbmlib.workflow.transformer_report import design_label, design_table, select_runs
from test_notebooks import execute  # papermill with the repository as working directory

REPO_ROOT = __import__("pathlib").Path(__file__).resolve().parents[1]


def _write_run(runs_dir, name, model, dataset, multiplier, seed, score, ratio, mapped=None):
    folder = runs_dir / name
    folder.mkdir(parents=True)
    text = dataset == "stdlib-chars"
    final = {"test_bits_per_char" if text else "test_accuracy": score, "val_accuracy": 50.0,
             "speed": None if ratio is None else {"approx_to_exact_time_per_sample": ratio}}
    metrics = {"run_name": name, "status": "finished", "finished_at": f"2026-12-03T16:00:0{seed}+00:00",
               "config": {"model": model, "dataset": dataset, "multiplier": multiplier, "multiplier_map": mapped,
                          "seed": seed, "epochs": 1},
               "runtime": {"device": "cpu", "device_name": "Test CPU", "runtime": "cpu-test"},
               "epochs": [{"epoch": 1, "steps": 3, "epoch_time_s": 1.0, "samples": 30}], "final": final}
    (folder / "metrics.json").write_text(json.dumps(metrics))
    (folder / "history.csv").write_text("step,epoch,loss,lr,elapsed\n1,1,2.0,0.001,0.1\n2,1,1.5,0.001,0.2\n"
                                        "3,1,1.2,0.001,0.3\n")


@pytest.fixture
def results(tmp_path):
    runs = tmp_path / "results" / "runs"
    for seed, (acc_exact, acc_mbm, acc_attn) in enumerate([(90.0, 89.0, 90.5), (92.0, 88.0, 91.5)]):
        _write_run(runs, f"vit-tiny-exact-s{seed}", "vit-tiny", "mnist", "exact", seed, acc_exact, None)
        _write_run(runs, f"vit-tiny-mbm-s{seed}", "vit-tiny", "mnist", "mbm", seed, acc_mbm, 1.5 + seed)
        _write_run(runs, f"vit-tiny-attention-mbm-s{seed}", "vit-tiny", "mnist", "mbm", seed, acc_attn, 1.1,
                   mapped="experiments/maps/attention-mbm.json")
        _write_run(runs, f"gpt-char-exact-s{seed}", "gpt-char", "stdlib-chars", "exact", seed, 3.5 + seed / 10, None)
        _write_run(runs, f"gpt-char-mbm-int8-s{seed}", "gpt-char", "stdlib-chars", "mbm-int8", seed, 3.7, 2.0)
    _write_run(runs, "seednet-mbm-s0", "seednet", "mnist", "mbm", 0, 98.0, 1.2)
    return tmp_path / "results"


def test_one_row_per_design_with_the_seed_interval_and_the_change_against_exact(results):
    runs, history = select_runs(*report.load_runs(results), ["vit-tiny-*", "gpt-char-*"])
    assert "seednet-mbm-s0" not in set(runs["run"]) and set(history["run"]) == set(runs["run"])
    table = design_table(runs).set_index(["model", "design"])
    half = stats.t.ppf(0.975, 1) * math.sqrt(2) / math.sqrt(2)  # values 90, 92: std sqrt(2)
    exact = table.loc[("vit-tiny", "exact")]
    assert (exact["mean"], exact["seeds"], exact["delta"], exact["time_vs_exact"]) == (91.0, 2, 0.0, 1.0)
    assert exact["ci95"] == pytest.approx(half)
    mbm = table.loc[("vit-tiny", "mbm")]
    assert (mbm["mean"], mbm["delta"], mbm["time_vs_exact"]) == (88.5, -2.5, 2.0)
    attention = table.loc[("vit-tiny", "attention only (mbm)")]
    assert attention["delta"] == pytest.approx(0.0) and attention["multiplier"] == "map:attention-mbm"
    gpt = table.loc[("gpt-char", "mbm-int8")]
    assert gpt["score"] == "test bits/char" and gpt["delta"] == pytest.approx(3.7 - 3.55)
    assert list(design_table(runs)["design"]) == ["exact", "mbm-int8", "exact", "mbm", "attention only (mbm)"]


def test_labels_and_a_pattern_that_matches_nothing(results):
    assert design_label("map:attention-mitchell") == "attention only (mitchell)"
    assert design_label("mbm-int8") == "mbm-int8"
    with pytest.raises(ValueError, match="no finished run matches"):
        select_runs(*report.load_runs(results), ["bert-*"])


@pytest.mark.slow
def test_07_writes_the_table_and_the_figures(results, tmp_path):
    execute(REPO_ROOT / "notebooks/07_transformers.ipynb", tmp_path, results_dir=str(results))
    table = (results / "tables" / "transformers.csv").read_text()
    assert "attention only (mbm)" in table and "mbm-int8" in table
    for figure in ("attention", "loss"):
        assert (results / "figures" / f"transformers-{figure}.png").stat().st_size > 10_000
