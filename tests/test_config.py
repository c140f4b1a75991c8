"""TrainConfig is the one source of the training options: CLI, notebook 02 and validation derive from it."""
import dataclasses
import json
from pathlib import Path

import pytest

from mbmlib.workflow import cli
from mbmlib.workflow.config import (TrainConfig, config_from_args, config_with_preset, default_run_name,
                                    describe_fields, identity_differences)

REPO = Path(__file__).parent.parent


def parsed(*argv):
    return cli.build_parser().parse_args(["train", *argv])


def test_cli_options_map_one_to_one_onto_config_fields():
    cfg = config_from_args(parsed("--batch-size", "32", "--exact-linear", "--no-progress", "--backend", "auto",
                                  "--lr", "0.01", "--max-steps", "5"))
    assert (cfg.batch_size, cfg.approx_linear, cfg.progress, cfg.backend, cfg.lr, cfg.max_steps) == \
        (32, False, False, None, 0.01, 5)
    assert config_from_args(parsed()) == TrainConfig()  # nothing given: the dataclass defaults


def test_preset_then_explicit_options():
    cfg = config_from_args(parsed("--preset", "seed", "--batch-size", "64"))
    assert (cfg.preset, cfg.model, cfg.lr, cfg.step_size, cfg.batch_size) == ("seed", "seednet", 3e-3, 7, 64)


def test_default_names_carry_what_differs_from_the_preset_baseline():
    seed = config_with_preset("seed", multiplier="mbm")
    assert default_run_name(seed, "cpu-x") == "seednet-mbm-exact-b16-cpu-x"
    other = config_with_preset("seed", multiplier="mbm", lr=0.01, train_samples=512, seed=3)
    assert default_run_name(other, "cpu-x") == "seednet-mbm-exact-b16-lr0.01-s3-n512-cpu-x"
    csv = config_with_preset("seed", data_csv="/some/very/long/path/to/train.csv")
    name = default_run_name(csv, "cpu-x")
    assert "/" not in name and name.startswith("seednet-mbm-exact-b16-csv") and name.endswith("-cpu-x")
    assert default_run_name(config_with_preset("seed", device="cpu", progress=False), "cpu-x") == \
        default_run_name(seed, "cpu-x")  # how a run is shown or where it runs is not what it computes


def test_identity_differences_ignore_run_control():
    a = TrainConfig(epochs=1, progress=True, runs_dir="x")
    b = TrainConfig(epochs=5, progress=False, runs_dir="y", lr=0.1)
    assert identity_differences(a, b) == {"lr": (3e-3, 0.1)}
    assert identity_differences(dataclasses.asdict(a), a) == {}
    saved_before_the_rename = {**dataclasses.asdict(a), "results_dir": "x"}  # runs_dir's earlier name
    del saved_before_the_rename["runs_dir"]
    assert identity_differences(saved_before_the_rename, a) == {}


def test_every_notebook_02_parameter_is_a_config_field_documented_from_it():
    nb = json.loads((REPO / "notebooks" / "02_train_mnist.ipynb").read_text())
    cell = next(c for c in nb["cells"] if "parameters" in c.get("metadata", {}).get("tags", []))
    names = [line.split("=")[0].strip() for line in "".join(cell["source"]).splitlines() if "=" in line]
    fields = {f.name for f in dataclasses.fields(TrainConfig)}
    assert set(names) - fields == {"results_dir"}  # the notebook's results root; its runs go to runs/ in it
    table = describe_fields(names)
    for name in set(names) & fields:
        assert f"| `{name}` |" in table
    assert "stratified subset of this many training samples" in table


@pytest.mark.parametrize("field, value, message", [
    ("epochs", 0, "epochs must be an integer >= 1"),
    ("speed_ratio_steps", -1, "speed_ratio_steps must be an integer >= 0"),
    ("val_fraction", 1.0, "val_fraction must lie strictly between 0 and 1"),
    ("backend", "cuda", "backend must be one of auto, reference, compiled, triton"),
    ("optimizer", "rmsprop", "optimizer must be one of adam, sgd"),
    ("train_samples", 0, "train_samples must be a positive number (or omitted)"),
])
def test_validation_names_the_field_and_the_rule(field, value, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        config_with_preset(**{field: value})


def test_a_torchvision_model_that_cannot_take_the_images_is_refused_by_the_config():
    with pytest.raises(ValueError, match="vit_b_16 cannot take cifar10's 32x32 images .*Wrong image height"):
        TrainConfig(model="vit_b_16", dataset="cifar10").validate()
    TrainConfig(model="resnet18", dataset="cifar10").validate()  # takes them
