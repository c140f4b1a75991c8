"""gpt-char and vit-tiny through the workflow: train (CLI), resume, report, evaluate and sensitivity."""
import csv
import json
import math

import pytest
import torch

import mbmlib
from mbmlib.workflow import cli, plots, report
from mbmlib.workflow.text import load_corpus
from mbmlib.workflow.train import RunFolderError, config_with_preset, train

needs_attention = pytest.mark.skipif(not hasattr(mbmlib.nn, "approximable_layers"),
                                     reason="this core's convert leaves attention exact")
GPT = ["--model", "gpt-char", "--dataset", "stdlib-chars", "--epoch-steps", "3", "--batch-size", "4",
       "--val-samples", "8", "--test-samples", "8", "--no-progress", "--log-interval", "3"]


def gpt_config(tmp_path, **kw):
    opts = dict(model="gpt-char", dataset="stdlib-chars", epoch_steps=3, batch_size=4, val_samples=8, test_samples=8,
                runs_dir=str(tmp_path / "runs"), progress=False, speed_ratio_steps=0, multiplier="exact", run_name="g")
    return config_with_preset(**{**opts, **kw})


def losses(run_dir):
    with open(run_dir / "history.csv") as f:
        return [float(r["loss"]) for r in csv.DictReader(f)]


@pytest.fixture(scope="module")
def gpt_run(tmp_path_factory):
    """One gpt-char run with MBM products: 2 epochs of 3 steps, through the CLI."""
    runs = tmp_path_factory.mktemp("gpt") / "runs"
    assert cli.main(["train", *GPT, "--multiplier", "mbm", "--epochs", "2", "--runs-dir", str(runs), "--run-name",
                     "gpt", "--speed-ratio-steps", "1"]) == 0
    return runs / "gpt"


def test_gpt_char_trains_through_the_cli_and_records_bits_per_char(gpt_run, capsys):
    m = json.loads((gpt_run / "metrics.json").read_text())
    assert m["status"] == "finished" and m["global_step"] == 6 and len(losses(gpt_run)) == 6
    data = m["data"]
    assert (data["train"], data["val"], data["test"], data["context"]) == (12, 8, 8, 64)
    assert data["corpus_sha256"] == load_corpus().sha256 and data["python"]
    final = m["final"]
    for split in ("val", "test"):
        assert final[f"{split}_bits_per_char"] == pytest.approx(final[f"{split}_loss"] / math.log(2))
        assert final[f"{split}_perplexity"] == pytest.approx(math.exp(final[f"{split}_loss"]))
        assert 0 <= final[f"{split}_accuracy"] <= 100
    assert final["val_bits_per_char"] == m["epochs"][-1]["val_bits_per_char"] < 8.0  # it learnt something
    assert final["samples"] == 24 and final["speed"]["approx_to_exact_time_per_sample"] > 0


def test_resume_continues_the_same_text_run_and_refuses_another_corpus(tmp_path):
    straight = train(gpt_config(tmp_path, epochs=2, run_name="straight"))
    train(gpt_config(tmp_path, epochs=1, run_name="resumed"))
    resumed = train(gpt_config(tmp_path, epochs=2, run_name="resumed", resume=True))
    assert losses(tmp_path / "runs" / "resumed") == pytest.approx(losses(tmp_path / "runs" / "straight"), rel=1e-5)
    assert resumed["final"]["test_bits_per_char"] == pytest.approx(straight["final"]["test_bits_per_char"])
    checkpoint = tmp_path / "runs" / "resumed" / "checkpoint.pt"
    state = torch.load(checkpoint, weights_only=False)
    torch.save({**state, "corpus_sha256": "another python"}, checkpoint)
    with pytest.raises(RunFolderError, match="the text corpus is not the one the run started with"):
        train(gpt_config(tmp_path, epochs=3, run_name="resumed", resume=True))


def test_the_cli_refuses_gpt_char_on_images_with_one_line(capsys):
    assert cli.main(["train", "--model", "gpt-char", "--epochs", "1"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: gpt-char is a language model") and err.count("\n") == 1


def test_vit_tiny_trains_on_mnist_through_the_cli(tmp_path, mnist_root):
    assert cli.main(["train", "--model", "vit-tiny", "--multiplier", "mbm", "--data-dir", str(mnist_root),
                     "--train-samples", "32", "--val-samples", "20", "--test-samples", "20", "--batch-size", "16",
                     "--runs-dir", str(tmp_path / "runs"), "--run-name", "vit", "--no-progress",
                     "--speed-ratio-steps", "0"]) == 0
    m = json.loads((tmp_path / "runs" / "vit" / "metrics.json").read_text())
    assert m["status"] == "finished" and m["data"] == {"train": 32, "val": 20, "test": 20}
    assert "val_bits_per_char" not in m["final"] and 0 <= m["final"]["test_accuracy"] <= 100


def test_report_gives_bits_per_char_beside_image_runs_and_draws_them(gpt_run, tmp_path, mnist_root):
    train(config_with_preset(model="vit-tiny", data_dir=str(mnist_root), train_samples=12, val_samples=10,
                             test_samples=10, batch_size=12, runs_dir=str(gpt_run.parent), progress=False,
                             speed_ratio_steps=0, multiplier="exact", run_name="vit"))
    results = report.load_results(gpt_run.parent.parent)
    runs = results.runs.set_index("run")
    assert runs.loc["gpt", "test_bits_per_char"] == pytest.approx(
        json.loads((gpt_run / "metrics.json").read_text())["final"]["test_bits_per_char"])
    assert math.isnan(runs.loc["vit", "test_bits_per_char"])
    summary = report.write_summary(gpt_run.parent.parent, results=results)
    assert "test bits/char" in summary["markdown"].read_text()
    assert f"{runs.loc['gpt', 'test_bits_per_char']:.3f}" in summary["markdown"].read_text()
    assert "test_bits_per_char_mean" in summary["groups"]
    panels = plots._panels(results.history, results.runs)
    assert {key[0] for key in panels} == {"mnist", "stdlib-chars"}  # text and images never share a loss axis
    assert panels[("stdlib-chars", runs.loc["gpt", "runtime"], 12)] == ["gpt"]
    for path in plots.comparison_figures(results, tmp_path / "figures"):
        assert path.read_bytes()[:4] == b"\x89PNG"
    metrics = json.loads((gpt_run / "metrics.json").read_text())
    assert plots.run_epochs(metrics, tmp_path / "epochs.png").exists()


@needs_attention
def test_evaluate_and_sensitivity_treat_attention_matmuls_as_layers(gpt_run, tmp_path):
    out = tmp_path / "eval"
    common = ["--model", "gpt-char", "--dataset", "stdlib-chars", "--checkpoint", str(gpt_run / "checkpoint.pt"),
              "--samples", "4", "--batch-size", "4", "--out", str(out), "--figures", str(out), "--no-progress"]
    assert cli.main(["evaluate", *common, "--multipliers", "mbm"]) == 0
    rows = json.loads((out / "gpt-char-stdlib-chars-test.json").read_text())["results"]
    assert [r["multiplier"] for r in rows] == ["exact", "mbm"] and rows[0]["samples"] == 4 * 64
    assert rows[1]["bits_per_char_rise"] == pytest.approx(rows[1]["bits_per_char"] - rows[0]["bits_per_char"])
    assert rows[0]["relative_energy"] == 1.0 and 0 < rows[1]["relative_energy"] < 1
    assert cli.main(["sensitivity", *common, "--layers", "blocks.0.attn.*", "--top", "2"]) == 0
    result = json.loads((out / "sensitivity-gpt-char-stdlib-chars-mbm.json").read_text())
    assert [r["layer"] for r in result["layers"]] == [f"blocks.0.attn.{op}" for op in ("in_proj", "qk", "pv",
                                                                                       "out_proj")]
    assert result["ranked_by"] == "bits_per_char_rise"
    model = mbmlib.workflow.models.new_model("gpt-char", 256, multiplier="exact")
    macs = mbmlib.energy.layer_macs(model, torch.zeros(1, 64, dtype=torch.long))
    assert {r["layer"]: r["macs"] for r in result["layers"]} == {f"blocks.0.attn.{op}": macs[f"blocks.0.attn.{op}"]
                                                                 for op in ("in_proj", "qk", "pv", "out_proj")}
    assert macs["blocks.0.attn.qk"] == 64 * 64 * 128
    tolerant = sorted(result["layers"], key=lambda r: (r["bits_per_char_rise"], -r["macs"]))[:2]
    assert result["most_tolerant"] == [r["layer"] for r in tolerant]
    assert (out / "sensitivity-gpt-char-stdlib-chars-mbm.png").exists()


def _fake_run(runs, name: str, seed: int, model: str, dataset: str, final: dict) -> None:
    """A finished run's metrics.json as the trainer writes it (no training), for the report's grouping."""
    config = {"model": model, "dataset": dataset, "multiplier": "mbm", "seed": seed}
    metrics = {"run_name": name, "status": "finished", "config": config, "runtime": {"device_name": "CPU X"},
               "data": {"train": 64}, "epochs": [{"epoch": 1, "epoch_time_s": 2.0, "samples": 64, "steps": 4}],
               "final": {"samples": 64, "train_time_s": 2.0, **final}, "finished_at": f"2026-01-0{seed + 1}"}
    (runs / name).mkdir(parents=True)
    (runs / name / "metrics.json").write_text(json.dumps(metrics))


def test_repeated_seeds_of_a_language_model_give_a_bits_per_char_interval(tmp_path):
    for seed, bits in ((0, 3.5), (1, 3.7)):
        _fake_run(tmp_path / "runs", f"gpt-{seed}", seed, "gpt-char", "stdlib-chars",
                  {"test_accuracy": 40.0, "test_bits_per_char": bits, "val_bits_per_char": bits + 0.1})
        _fake_run(tmp_path / "runs", f"vit-{seed}", seed, "vit-tiny", "mnist", {"test_accuracy": 90.0 + seed})
    results = report.load_results(tmp_path)
    groups = report.seed_groups(results.runs).set_index("model")
    assert groups.loc["gpt-char", "seeds"] == groups.loc["vit-tiny", "seeds"] == 2
    assert groups.loc["gpt-char", "test_bits_per_char_mean"] == pytest.approx(3.6)
    # t(0.975, 1) * std / sqrt(2) with std = 0.1 * sqrt(2)
    assert groups.loc["gpt-char", "test_bits_per_char_ci95"] == pytest.approx(12.7062 * 0.1, rel=1e-4)
    assert math.isnan(groups.loc["vit-tiny", "test_bits_per_char_mean"])
    assert "3.600 ± 1.271" in report.groups_markdown(report.seed_groups(results.runs))
    assert plots.seed_intervals(results.runs, tmp_path / "seeds.png").read_bytes()[:4] == b"\x89PNG"
