"""Training beyond the in-memory MNIST: --dataset through DataLoaders, CIFAR ResNets and torchvision models."""
import json

import pandas as pd
import pytest
import torch

from mbmlib.nn import MBMConv2d, MBMLinear
from mbmlib.workflow import cli, report
from mbmlib.workflow.config import TrainConfig, identity_differences
from mbmlib.workflow.models import new_model
from mbmlib.workflow.train import train
from test_datasets import no_download, trusted, write_cifar  # noqa: F401  (fixtures used by name)


def small(tmp_path, **overrides) -> TrainConfig:
    """A few steps of ResNet-8 on FakeData, in-process, writing under ``tmp_path``."""
    values = dict(dataset="fake", model="resnet8", multiplier="mbm", batch_size=16, train_samples=64,
                  val_samples=32, test_samples=32, workers=0, progress=False, speed_ratio_steps=0,
                  runs_dir=str(tmp_path / "runs"), run_name="run")
    return TrainConfig(**{**values, **overrides})


def test_cifar_resnet_trains_on_fake_data_and_records_the_dataset(tmp_path):
    metrics = train(small(tmp_path, run_name=None, speed_ratio_steps=2))
    assert metrics["status"] == "finished"
    assert metrics["data"] == {"train": 64, "val": 32, "test": 32}
    assert metrics["config"]["dataset"] == "fake"
    assert "-fake-" in metrics["run_name"]  # default names carry the dataset
    assert metrics["final"]["test_accuracy"] is not None
    assert metrics["final"]["speed"]["batch_size"] == 16  # approx vs exact step time on a loader batch
    assert [e["steps"] for e in metrics["epochs"]] == [4]


@pytest.mark.slow
def test_loader_runs_resume_to_the_same_history(tmp_path):
    """Shuffle and augmentation come from seeded generators: a run cut after epoch 1 and resumed equals one run."""
    whole = train(small(tmp_path, epochs=2, run_name="whole", workers=2))
    train(small(tmp_path, epochs=1, run_name="cut", workers=2))
    resumed = train(small(tmp_path, epochs=2, run_name="cut", resume=True, workers=2))
    losses = lambda m: pd.read_csv(tmp_path / "runs" / m["run_name"] / "history.csv")["loss"].tolist()  # noqa: E731
    assert losses(resumed) == losses(whole)
    assert resumed["final"]["val_accuracy"] == whole["final"]["val_accuracy"]


def test_torchvision_model_trains_with_every_layer_approximate(tmp_path):
    cfg = small(tmp_path, model="mobilenet_v3_small", batch_size=4, max_steps=2, train_samples=16, val_samples=8,
                test_samples=8, approx_linear=False)
    metrics = train(cfg)
    assert metrics["status"] == "finished" and metrics["global_step"] == 2
    model = new_model("mobilenet_v3_small", num_classes=10, in_channels=3, multiplier="mbm", approx_linear=False)
    convs = [m for m in model.modules() if isinstance(m, torch.nn.Conv2d)]
    assert convs and all(isinstance(m, MBMConv2d) and m.multiplier.name == "mbm" for m in convs)
    linears = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
    assert linears and not any(isinstance(m, MBMLinear) for m in linears)  # --exact-linear keeps them plain


def test_cifar10_from_files_in_torchvision_layout(tmp_path, trusted):  # noqa: F811
    write_cifar(tmp_path / "data", 10)
    code = cli.main(["train", "--dataset", "cifar10", "--model", "resnet8", "--data-dir", str(tmp_path / "data"),
                     "--batch-size", "8", "--workers", "0", "--no-progress", "--speed-ratio-steps", "0",
                     "--runs-dir", str(tmp_path / "runs"), "--run-name", "c10"])
    assert code == 0
    metrics = json.loads((tmp_path / "runs" / "c10" / "metrics.json").read_text())
    assert metrics["data"] == {"train": 40, "val": 10, "test": 20}  # 5 per class split 80/20; 2 per class to test


@pytest.mark.parametrize("args, message", [
    (["--dataset", "cifar10", "--model", "seednet"], "seednet takes 1x28x28 images"),
    (["--dataset", "imagenet"], "unknown dataset 'imagenet'"),
    (["--dataset", "fake", "--data-csv", "x.csv"], "data_csv and dataset 'fake' exclude each other"),
    (["--workers", "-1"], "workers must be an integer >= 0"),
    (["--model", "resnet1000"], "unknown model 'resnet1000'"),
])
def test_bad_dataset_options_are_one_line(tmp_path, capsys, args, message):
    assert cli.main(["train", "--runs-dir", str(tmp_path), *args]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and message in err and len(err.splitlines()) == 1, err
    assert not any(tmp_path.iterdir())


def test_configs_saved_before_the_dataset_field_are_mnist_runs(tmp_path):
    old = {k: v for k, v in TrainConfig().__dict__.items() if k not in ("dataset", "workers")}
    assert identity_differences(old, TrainConfig()) == {}
    assert identity_differences(old, TrainConfig(dataset="fake")) == {"dataset": ("mnist", "fake")}
    run = tmp_path / "runs" / "old"
    run.mkdir(parents=True)
    (run / "metrics.json").write_text(json.dumps({"run_name": "old", "status": "finished", "config": old,
                                                  "final": {"val_accuracy": 90.0}}))
    runs, _ = report.read_run(run)
    assert runs.loc[0, "dataset"] == "mnist"


def test_final_validation_is_the_last_epochs_and_that_of_the_saved_weights(tmp_path):
    from mbmlib.workflow import train as trainer

    cfg = small(tmp_path, epochs=2)
    metrics = train(cfg)
    assert metrics["final"]["val_accuracy"] == metrics["epochs"][-1]["val_accuracy"]
    model = new_model("resnet8", num_classes=10, in_channels=3, multiplier="mbm")
    model.load_state_dict(torch.load(tmp_path / "runs" / "run" / "checkpoint.pt", weights_only=False)["model"])
    again = trainer.evaluate(model, trainer._load_data(cfg, torch.device("cpu")).eval_batches("val"))
    assert again == {"loss": metrics["final"]["val_loss"], "accuracy": metrics["final"]["val_accuracy"]}
