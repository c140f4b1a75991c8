"""evaluate (accuracy per multiplier) and sensitivity (one layer approximate at a time), and their commands."""
import json

import pytest
import torch
from torch import nn

import mbmlib
from mbmlib.workflow import cli
from mbmlib.workflow.evaluate import accuracy, evaluate_multipliers, load_eval_data, save_results
from mbmlib.workflow.models import count_macs, new_model
from mbmlib.workflow.sensitivity import layer_sensitivity, run_sensitivity, save_sensitivity


class FixedLogits(nn.Module):
    """Returns row ``x[i]`` of a fixed logits table: inputs are sample indices."""

    def __init__(self, logits):
        super().__init__()
        self.logits = logits

    def forward(self, x):
        return self.logits[x.long()]


def test_accuracy_top1_top5_and_loss_by_hand():
    logits = torch.tensor([[9.0, 1, 2, 3, 4, 5, 6],  # label 0: top-1
                           [1.0, 9, 8, 7, 6, 5, 4],  # label 6: outside the top 5
                           [1.0, 2, 3, 4, 5, 6, 7],  # label 2: in the top 5, not top-1
                           [0.0, 0, 0, 0, 0, 0, 1]])  # label 6: top-1
    y = torch.tensor([0, 6, 2, 6])
    batches = [(torch.tensor([0, 1, 2]), y[:3]), (torch.tensor([3]), y[3:])]  # uneven batches
    got = accuracy(FixedLogits(logits), batches)
    assert (got["top1"], got["top5"], got["samples"]) == (50.0, 75.0, 4)
    assert got["loss"] == pytest.approx(float(nn.functional.cross_entropy(logits, y)))
    with pytest.raises(ValueError, match="nothing to evaluate"):
        accuracy(FixedLogits(logits), [])


@pytest.fixture
def lenet_checkpoint(tmp_path):
    torch.manual_seed(1)
    model = new_model("lenet5", multiplier="exact")
    path = tmp_path / "lenet.pt"
    torch.save({"model": model.state_dict(), "epoch": 1}, path)  # a run's checkpoint.pt layout
    return model.eval(), path


def test_evaluate_scores_each_multiplier_like_the_reference_backend(mnist_root, lenet_checkpoint):
    model, path = lenet_checkpoint
    report = evaluate_multipliers("lenet5", "mnist", ["mbm", "mitchell", "mbm"], checkpoint=path, root=mnist_root,
                                  samples=40, batch_size=16, device="cpu", progress=False)
    rows = report["results"]
    assert [r["multiplier"] for r in rows] == ["exact", "mbm", "mitchell"]  # exact first, each once
    data = load_eval_data("mnist", mnist_root, "test", 40, 16, "cpu")
    assert rows[0]["top1"] == accuracy(model, data.batches)["top1"] and rows[0]["top1_drop"] == 0
    for row in rows[1:]:
        reference = mbmlib.convert(model, multiplier=row["multiplier"], backend="reference")
        want = accuracy(reference, data.batches)
        assert row["top1"] == want["top1"] and row["top5"] == want["top5"]
        assert row["loss"] == pytest.approx(want["loss"], rel=1e-5)
        assert row["top1_drop"] == pytest.approx(rows[0]["top1"] - row["top1"])
    assert all(r["samples"] == 40 for r in rows)


def test_integer_multipliers_are_calibrated_before_scoring(mnist_root, lenet_checkpoint):
    _, path = lenet_checkpoint
    report = evaluate_multipliers("lenet5", "mnist", ["mbm-int8"], checkpoint=path, root=mnist_root, samples=20,
                                  batch_size=10, device="cpu", progress=False)
    exact, int8 = report["results"]
    assert int8["multiplier"] == "mbm-int8" and abs(int8["loss"] - exact["loss"]) < 0.5 * exact["loss"]
    assert exact["relative_energy"] == 1.0 and int8["relative_energy"] == pytest.approx(21.6 / 35.3)  # every layer
    assert int8["energy_sources"].startswith("Saadat et al., TCAD 2018")


def test_evaluate_reports_energy_beside_accuracy_and_draws_it(mnist_root, lenet_checkpoint, tmp_path):
    _, path = lenet_checkpoint
    report = evaluate_multipliers("lenet5", "mnist", ["mitchell-int8", "drum4-int8"], checkpoint=path,
                                  root=mnist_root, samples=20, batch_size=10, device="cpu", progress=False)
    energy = {r["multiplier"]: r["relative_energy"] for r in report["results"]}
    assert energy == {"exact": 1.0, "mitchell-int8": pytest.approx(16.0 / 35.3), "drum4-int8": None}
    paths = save_results(report, tmp_path / "eval", tmp_path / "fig")
    assert paths["energy_figure"].name == "eval-lenet5-mnist-test-energy.png"
    assert paths["energy_figure"].stat().st_size > 10_000


def test_evaluate_command_writes_json_csv_and_chart(tmp_path, capsys):
    code = cli.main(["evaluate", "--model", "resnet8", "--dataset", "fake", "--samples", "24", "--batch-size", "8",
                     "--multipliers", "mitchell", "--device", "cpu", "--out", str(tmp_path / "eval"),
                     "--figures", str(tmp_path / "fig"), "--no-progress", "--data-dir", str(tmp_path),
                     "--random-weights"])
    assert code == 0
    out = capsys.readouterr().out
    assert "exact: top-1" in out and "mitchell: top-1" in out
    report = json.loads((tmp_path / "eval" / "resnet8-fake-test.json").read_text())
    assert [r["multiplier"] for r in report["results"]] == ["exact", "mitchell"]
    assert (tmp_path / "eval" / "resnet8-fake-test.csv").read_text().startswith("multiplier,top1,top5,loss")
    png = tmp_path / "fig" / "eval-resnet8-fake-test.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_evaluate_command_bad_input_is_one_line(tmp_path, capsys):
    code = cli.main(["evaluate", "--dataset", "imagenet", "--random-weights", "--out", str(tmp_path)])
    err = capsys.readouterr().err.strip()
    assert code == 2 and "unknown dataset 'imagenet'" in err and len(err.splitlines()) == 1


def test_sensitivity_rows_add_up(mnist_root, lenet_checkpoint, tmp_path):
    model, path = lenet_checkpoint
    data = load_eval_data("mnist", mnist_root, "test", 30, 10, "cpu")
    report = layer_sensitivity(model, data, "mitchell", top=2, progress=False)
    names = ["features.0", "features.3", "classifier.0", "classifier.2", "classifier.4"]
    assert [r["layer"] for r in report["layers"]] == names
    assert report["total_macs"] == count_macs(model)["total"] == sum(r["macs"] for r in report["layers"])
    baseline = accuracy(model, data.batches)["top1"]
    assert report["baseline"]["top1"] == baseline
    for row in report["layers"]:  # one layer approximate, the rest exact
        alone = mbmlib.convert(model, multiplier={row["layer"]: "mitchell"}, backend="reference")
        assert row["top1"] == accuracy(alone, data.batches)["top1"]
        assert row["top1_drop"] == pytest.approx(baseline - row["top1"])
    drops = sorted((r["top1_drop"], -r["macs"], r["layer"]) for r in report["layers"])
    assert report["most_tolerant"] == [name for _, _, name in drops[:2]]
    together, every = report["combined"]
    assert together["layers"] == report["most_tolerant"] and every["layers"] == names
    assert every["top1"] == accuracy(mbmlib.convert(model, multiplier="mitchell"), data.batches)["top1"]
    assert report["baseline"]["relative_energy"] == 1.0 and every["relative_energy"] == pytest.approx(1 / 19.2)
    paths = save_sensitivity({**report, "model": "lenet5", "dataset": "mnist", "split": "test", "checkpoint": None,
                              "runtime": {}}, tmp_path / "eval", tmp_path / "fig")
    assert "| features.3 " in paths["markdown"].read_text() and paths["figure"].stat().st_size > 1000


def test_sensitivity_layers_patterns_and_command(mnist_root, lenet_checkpoint, tmp_path, capsys):
    _, path = lenet_checkpoint
    report = run_sensitivity("lenet5", "mnist", "mbm", checkpoint=path, root=mnist_root, samples=20, batch_size=10,
                             device="cpu", layers=["classifier.*"], top=2, progress=False)
    assert [r["layer"] for r in report["layers"]] == ["classifier.0", "classifier.2", "classifier.4"]
    with pytest.raises(ValueError, match="no Conv2d/Linear layer matches \\['conv\\*'\\]; the layers are features.0"):
        run_sensitivity("lenet5", "mnist", checkpoint=path, root=mnist_root, samples=20, layers=["conv*"],
                        progress=False)
    code = cli.main(["sensitivity", "--model", "lenet5", "--checkpoint", str(path), "--data-dir", str(mnist_root),
                     "--samples", "20", "--layers", "features.*", "--multiplier", "mitchell", "--device", "cpu",
                     "--out", str(tmp_path / "eval"), "--figures", str(tmp_path / "fig"), "--no-progress"])
    assert code == 0 and (tmp_path / "fig" / "sensitivity-lenet5-mnist-mitchell.png").is_file()
    assert json.loads((tmp_path / "eval" / "sensitivity-lenet5-mnist-mitchell.json").read_text())["most_tolerant"]


def test_save_results_names_files_after_model_dataset_and_split(tmp_path):
    report = {"model": "resnet18", "dataset": "imagefolder:/x/y", "split": "val", "checkpoint": None,
              "pretrained": True, "runtime": {}, "results": [
                  {"multiplier": "exact", "top1": 70.0, "top5": 89.0, "loss": 1.2, "samples": 10, "seconds": 1.0,
                   "top1_drop": 0.0},
                  {"multiplier": "mbm", "top1": 69.0, "top5": 89.0, "loss": 1.3, "samples": 10, "seconds": 2.0,
                   "top1_drop": 1.0}]}
    paths = save_results(report, tmp_path / "eval", tmp_path / "fig")
    assert paths["json"].name == "resnet18-imagefolder__x_y-val.json" and paths["figure"].is_file()


def _eval_args(tmp_path, *extra):
    return ["evaluate", "--model", "resnet8", "--dataset", "fake", "--samples", "8", "--batch-size", "8",
            "--multipliers", "exact", "--device", "cpu", "--out", str(tmp_path / "eval"), "--figures",
            str(tmp_path / "fig"), "--no-progress", "--data-dir", str(tmp_path / "data"), *extra]


def test_evaluate_refuses_to_overwrite_and_moves_aside_with_overwrite(tmp_path, capsys):
    assert cli.main(_eval_args(tmp_path, "--random-weights")) == 0
    first = (tmp_path / "eval" / "resnet8-fake-test.json").read_text()
    assert cli.main(_eval_args(tmp_path, "--random-weights")) == 2
    err = capsys.readouterr().err
    assert "resnet8-fake-test.json exists" in err and "--overwrite" in err and len(err.strip().splitlines()) == 1
    assert (tmp_path / "eval" / "resnet8-fake-test.json").read_text() == first  # untouched
    assert cli.main(_eval_args(tmp_path, "--random-weights", "--overwrite")) == 0
    aside = list((tmp_path / "eval" / ".replaced").glob("resnet8-fake-test-*.json"))
    assert len(aside) == 1 and aside[0].read_text() == first
    assert len(list((tmp_path / "fig" / ".replaced").glob("eval-resnet8-fake-test-*.png"))) == 1


@pytest.mark.parametrize("command, extra, message", [
    ("evaluate", [], "no weights given: pass --checkpoint"),
    ("evaluate", ["--random-weights", "--name", "../outside"], "--name '../outside' must be a plain file name"),
    ("sensitivity", ["--random-weights", "--top", "-1"], "--top must be 0 or more"),
    ("sensitivity", ["--random-weights", "--name", "a/b"], "--name 'a/b' must be a plain file name"),
    ("evaluate", ["--random-weights", "--model", "vit_b_16"], "vit_b_16 cannot take fake's 32x32 images"),
])
def test_evaluate_and_sensitivity_refuse_bad_options_before_any_work(tmp_path, capsys, command, extra, message):
    args = _eval_args(tmp_path, *extra)
    if command == "sensitivity":
        args = ["sensitivity"] + [a for a in args[1:] if a not in ("--multipliers", "exact")]
    assert cli.main(args) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "data").exists() and not (tmp_path / "eval").exists()  # nothing loaded or written


def test_a_quantised_runs_checkpoint_evaluates_and_junk_checkpoints_are_one_line(tmp_path, mnist_root, capsys):
    from mbmlib.workflow.train import config_with_preset, train

    train(config_with_preset("seed", model="lenet5", multiplier="mbm-int8", data_dir=str(mnist_root),
                             train_samples=16, val_samples=8, test_samples=8, batch_size=8, epochs=1,
                             runs_dir=str(tmp_path / "runs"), progress=False, speed_ratio_steps=0, run_name="q"))
    checkpoint = tmp_path / "runs" / "q" / "checkpoint.pt"
    args = ["evaluate", "--model", "lenet5", "--data-dir", str(mnist_root), "--samples", "10", "--device", "cpu",
            "--multipliers", "mbm-int8", "--out", str(tmp_path / "eval"), "--figures", str(tmp_path / "fig"),
            "--no-progress", "--checkpoint"]
    assert cli.main([*args, str(checkpoint)]) == 0
    for name, content in (("text.pt", b"not a checkpoint\n"), ("bytes.pt", bytes(range(256)) * 8)):
        (tmp_path / name).write_bytes(content)
        assert cli.main([*args, str(tmp_path / name), "--name", name.replace(".", "_")]) == 2
        err = capsys.readouterr().err.strip()
        assert f"cannot read the checkpoint {tmp_path / name}" in err and len(err.splitlines()) == 1


def test_user_errors_of_evaluate_are_exit_2_not_3(tmp_path, monkeypatch, capsys):
    """An empty image folder and pretrained weights without network: one line, exit 2."""
    from urllib.error import URLError

    from torchvision.models import _api

    (tmp_path / "empty").mkdir()
    base = ["evaluate", "--device", "cpu", "--no-progress", "--out", str(tmp_path / "eval"), "--figures",
            str(tmp_path / "fig")]
    assert cli.main([*base, "--model", "resnet18", "--dataset", f"imagefolder:{tmp_path / 'empty'}",
                     "--random-weights"]) == 2
    assert "holds no class folders" in capsys.readouterr().err

    def offline(self, *args, **kwargs):
        raise URLError("no network in tests")

    monkeypatch.setattr(_api.WeightsEnum, "get_state_dict", offline)
    assert cli.main([*base, "--model", "resnet18", "--dataset", "fake", "--pretrained", "--samples", "8"]) == 2
    assert "the pretrained weights of resnet18 could not be loaded" in capsys.readouterr().err
